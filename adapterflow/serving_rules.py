"""The rules of the serving preflight, one function per rule, each returning (verdict, message with the fix).

Sources (read 2026; `shared/notes/serving-rules.md` in the project notes lists them with the user reports):
vLLM `vllm/lora/peft_helper.py` (config keys, rank limit, modules_to_save, DoRA, bias, scaling),
`vllm/lora/lora_model.py` (weight files, accepted tensor names), `vllm/lora/utils.py` (names matched by their last
component only: a wrong full path loads silently and does nothing, vllm#34186), `vllm/config/lora.py`
(`--max-lora-rank` values); llama.cpp `convert_lora_to_gguf.py` (one `adapter.lora.alpha`, accepted tensors,
embeddings refused, A/B pairs, tied lm_head) and `src/llama-adapter.h` (runtime scale alpha / rank); PEFT
`peft/tuners/lora/config.py`, `peft/tuners/lora/layer.py` (PiSSA re-initialised at load) and
`peft/utils/save_and_load.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from adapterflow import formats
from adapterflow.model_references import is_hub_model_id
from adapterflow.serving_files import AdapterFiles, BaseShapes

PASS, FAIL, WARN = "pass", "fail", "warn"
# `--max-lora-rank` choices and default (vllm/config/lora.py).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_ALLOWED_MODULES_TO_SAVE = {"classifier", "score"}  # newest vllm/lora/peft_helper.py
LORA_SUFFIXES = (f".{formats.LORA_A}.weight", f".{formats.LORA_B}.weight", f".{formats.LORA_EMBEDDING_A}",
                 f".{formats.LORA_EMBEDDING_B}")
# init_lora_weights values whose factors belong to a rewritten (residual) base, not the published one.
RESIDUAL_INITS = re.compile(r"^(pissa|pissa_niter_\d+|olora|corda|loftq|eva)$")


@dataclass(frozen=True)
class Inputs:
    """What every rule may look at: the adapter's files, the base (None: not given), vLLM's rank limit."""

    adapter: AdapterFiles
    base: Optional[BaseShapes]
    max_lora_rank: Optional[int]

    @property
    def config(self) -> dict:
        return self.adapter.config

    def ranks(self) -> list[int]:
        """r, every rank_pattern value and every LoRA A's first dimension (the rank as the tensors say)."""
        config = self.config
        ranks = [config["r"]] if isinstance(config.get("r"), int) else []
        ranks += [v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int)]
        ranks += [shape[0] for key, shape in self.adapter.shapes.items() if formats.is_lora_a(key) and shape]
        return ranks

    def lora_keys(self) -> list[str]:
        return [k for k in self.adapter.shapes if k.endswith(LORA_SUFFIXES) and formats.BASE_LAYER not in k]


def _short(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (and {len(items) - n} more)" if len(items) > n else shown


def required_keys(ctx: Inputs, runtime: str, keys: tuple[str, ...]) -> tuple[str, str]:
    missing = [k for k in keys if ctx.config.get(k) in (None, "", [])]
    if missing:
        return FAIL, (f"adapter_config.json lacks {', '.join(missing)}: {runtime} needs {', '.join(keys)}; "
                      f"re-save the adapter with PEFT or adapterflow")
    return PASS, f"{', '.join(keys)} present"


def vllm_rank(ctx: Inputs) -> tuple[str, str]:
    ranks = ctx.ranks()
    if not ranks or min(ranks) <= 0:
        return FAIL, f"r={ctx.config.get('r')!r}: vLLM needs a rank > 0; re-save the adapter with a positive r"
    rank = max(ranks)
    needed = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
    if needed is None:
        return FAIL, (f"rank {rank} is above vLLM's largest --max-lora-rank "
                      f"({VLLM_MAX_LORA_RANKS[-1]}); retrain with r <= {VLLM_MAX_LORA_RANKS[-1]}")
    if ctx.max_lora_rank is not None:
        if rank > ctx.max_lora_rank:
            return FAIL, (f"rank {rank} > --max-lora-rank {ctx.max_lora_rank}: vLLM refuses it; start vLLM with "
                          f"--max-lora-rank {needed} or retrain with r <= {ctx.max_lora_rank}")
        return PASS, f"rank {rank} <= --max-lora-rank {ctx.max_lora_rank}"
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        return WARN, (f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
                      f"start vLLM with --max-lora-rank {needed}")
    return PASS, f"rank {rank} <= vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}"


def modules_to_save(ctx: Inputs, runtime: str, allowed: frozenset = frozenset()) -> tuple[str, str]:
    modules = list(ctx.config.get("modules_to_save") or [])
    if not modules:
        return PASS, "no modules_to_save"
    if set(modules) <= allowed:
        return WARN, (f"modules_to_save {modules}: only vLLM's newest revisions accept {sorted(allowed)}; check the "
                      f"server's version, or serve with PEFT")
    return FAIL, (f"modules_to_save [{', '.join(modules)}]: {runtime} refuses it; retrain without it or serve "
                  f"with PEFT")


def dora(ctx: Inputs, runtime: str) -> tuple[str, str]:
    if ctx.config.get("use_dora"):
        return FAIL, f"use_dora: {runtime} does not support DoRA; retrain without use_dora or serve with PEFT"
    return PASS, "no DoRA"


def bias(ctx: Inputs, runtime: str) -> tuple[str, str]:
    value = ctx.config.get("bias", "none")
    if value not in (None, "none"):
        return FAIL, (f"bias={value!r}: {runtime} refuses adapter biases; retrain with bias='none' or serve "
                      f"with PEFT")
    if ctx.config.get("lora_bias"):
        return FAIL, f"lora_bias: {runtime} refuses lora_B biases; retrain with lora_bias=false or serve with PEFT"
    return PASS, "bias='none'"


def residual_init(ctx: Inputs, runtime: str) -> tuple[str, str]:
    init = ctx.config.get("init_lora_weights", True)
    if isinstance(init, str) and RESIDUAL_INITS.match(init):
        return FAIL, (f"init_lora_weights={init!r}: the factors act on a rewritten (residual) base that {runtime} "
                      f"does not rebuild, so it refuses or serves a wrong model; save with the PiSSA->LoRA "
                      f"conversion (save.convert_pissa_to_lora=true; PEFT: path_initial_model_for_weight_conversion)")
    return PASS, f"init_lora_weights={init!r} acts on the published base"


def peft_residual_init(ctx: Inputs) -> tuple[str, str]:
    init = ctx.config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return FAIL, (f"init_lora_weights={init!r}: PEFT re-runs the randomized SVD at every load and gets another "
                      f"residual, so the reloaded model differs from the trained one; save with the PiSSA->LoRA "
                      f"conversion (save.convert_pissa_to_lora=true)")
    if isinstance(init, str) and RESIDUAL_INITS.match(init):
        return WARN, (f"init_lora_weights={init!r}: PEFT rebuilds the residual base at every load (slow, and right "
                      f"only on the exact base); save with the PiSSA->LoRA conversion to avoid it")
    return PASS, f"init_lora_weights={init!r}"


def layer_replication(ctx: Inputs) -> tuple[str, str]:
    if ctx.config.get("layer_replication"):
        return WARN, "layer_replication: vLLM may refuse it (unconfirmed on main); serve with PEFT"
    return PASS, "no layer_replication"


def weights_file(ctx: Inputs, runtime: str, names: tuple[str, ...]) -> tuple[str, str]:
    if ctx.adapter.weights_file in names:
        return PASS, f"reads {ctx.adapter.weights_file}"
    found = f"found only {ctx.adapter.weights_file}" if ctx.adapter.weights_file else "found none"
    return FAIL, f"{runtime} reads {' or '.join(names)}, {found}; re-save the adapter (safe_serialization=true)"


def weight_keys(ctx: Inputs, runtime: str, skipped: str) -> tuple[str, str]:
    """Only LoRA A/B and lora_embedding_A/B tensors; keys containing `skipped` are ignored (vLLM: any
    `.base_layer.` key; llama.cpp: `.base_layer.weight` only, so bias="lora_only"'s base_layer.bias stops it).
    Such a key is the full copy of a targeted embedding / lm_head that PEFT's save_embedding_layers writes
    (`peft/utils/save_and_load.py`); the message names it and its size, since it is not needed for serving."""
    ignored = sorted(k for k in ctx.adapter.shapes if skipped in k)
    odd = sorted(k for k in ctx.adapter.shapes if not k.endswith(LORA_SUFFIXES) and skipped not in k)
    note = ""
    if ignored:
        names = [k.removeprefix(formats.PEFT_KEY_PREFIX) for k in ignored]
        size = _size(sum(ctx.adapter.nbytes.get(k, 0) for k in ignored))
        note = (f"; {len(ignored)} {formats.BASE_LAYER} key{'s' if len(ignored) > 1 else ''} skipped by {runtime} "
                f"({_short(names)}, {size} not needed for serving)")
    if not odd:
        return PASS, f"{len(ctx.adapter.shapes) - len(ignored)} LoRA A/B tensors{note}"
    embeddings = [k for k in odd if k.endswith(tuple(f"{n}.weight" for n in formats.EMBEDDING_LAYER_NAMES))]
    fixes = []
    if embeddings:
        fixes.append("full embedding weights (\"Embeddings is present in the adapter\" in llama.cpp): save with "
                     "save_embedding_layers=false and without modules_to_save, or merge the adapter")
    if any("magnitude" in k for k in odd):
        fixes.append("DoRA magnitudes: retrain without use_dora")
    if any(k.endswith(".bias") for k in odd):
        fixes.append("biases: retrain with bias='none' and lora_bias=false")
    if not fixes:
        fixes.append("retrain as a plain LoRA adapter, or serve with PEFT")
    return FAIL, f"{runtime} refuses tensors other than LoRA A/B: {_short(odd)}; " + "; ".join(fixes) + note


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


# What a rank that differs from the config does in each runtime.
_RANK_EFFECTS = {
    "PEFT": "PEFT builds each module with the config's rank and refuses other tensor shapes at load (size mismatch)",
    "vLLM": "vLLM scales by lora_alpha / r with the config's r, not the tensors' rank, so the update comes out scaled "
            "wrong (and a lora_A/lora_B mismatch does not load)",
    "llama.cpp": "llama.cpp takes the rank from the tensor shape, so its scale alpha / rank is not the one the config "
                 "says (and a lora_A/lora_B mismatch is refused at load)"}


def ranks_match(ctx: Inputs, runtime: str) -> tuple[str, str]:
    """Every module's lora_A rows (lora_embedding_A rows) equal its lora_B columns (lora_embedding_B columns) and
    the config's rank for it: `r`, or the first rank_pattern key matching the module's name (PEFT's
    `get_pattern_key`, `peft/utils/other.py`). PEFT builds the layers from the config and `load_state_dict` refuses
    other shapes; vLLM scales by lora_alpha / r from the config (`vllm/lora/peft_helper.py`); llama.cpp takes the
    rank from lora_A's shape (`src/llama-adapter.h`) and refuses A/B shapes that do not chain."""
    keys = set(ctx.lora_keys())
    shapes = ctx.adapter.shapes
    problems = []
    for a in sorted(k for k in keys if formats.is_lora_a(k) and len(shapes[k]) == 2):
        b, module = formats.lora_partner(a), formats.module_of_key(a).removeprefix(formats.PEFT_KEY_PREFIX)
        a_rank, b_shape = shapes[a][0], shapes.get(b)
        if b in keys and b_shape and len(b_shape) == 2 and b_shape[1] != a_rank:
            problems.append(f"{module} (lora_A rank {a_rank}, lora_B rank {b_shape[1]})")
            continue
        config_rank, source = _config_rank(ctx.config, module)
        if config_rank is not None and config_rank != a_rank:
            problems.append(f"{module} (config rank {config_rank} from {source}, tensor rank {a_rank})")
    if problems:
        return FAIL, (f"{len(problems)} module(s) whose tensors disagree with the config's rank: {_short(problems)}; "
                      f"{_RANK_EFFECTS[runtime]}; re-save the adapter with the config it was trained with (r and "
                      f"rank_pattern as the tensors say)")
    return PASS, f"every module's A/B rank matches the config ({len(keys) // 2} modules)"


def _config_rank(config: dict, module: str) -> tuple[Optional[int], str]:
    for key, value in (config.get("rank_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):  # as peft.utils.other.get_pattern_key
                return (value if isinstance(value, int) else None), f"rank_pattern[{key!r}]"
        except re.error:
            continue
    r = config.get("r")
    return (r if isinstance(r, int) and not isinstance(r, bool) else None), "r"


def pairs(ctx: Inputs, runtime: str) -> tuple[str, str]:
    keys = set(ctx.lora_keys())
    alone = sorted(k for k in keys if formats.lora_partner(k) not in keys)
    if alone:
        return FAIL, (f"{runtime} needs both A and B of every module; without a partner: {_short(alone)}; "
                      f"re-save the adapter")
    return PASS, f"{len(keys) // 2} A/B pairs"


def llama_cpp_base(ctx: Inputs) -> tuple[str, str]:
    if ctx.base is not None:
        return PASS, f"base config from {ctx.base.source} (pass it to convert_lora_to_gguf.py as --base)"
    name = ctx.config.get("base_model_name_or_path")
    if isinstance(name, str) and is_hub_model_id(name):
        return PASS, f"convert_lora_to_gguf.py fetches {name}'s config from the Hub"
    return WARN, (f"base_model_name_or_path={name!r} is not a Hub id: convert_lora_to_gguf.py needs "
                  f"--base FOLDER (the base model's folder)")


def rslora(ctx: Inputs) -> tuple[str, str]:
    if ctx.config.get("use_rslora") and set(ctx.ranks()) - {1}:
        return FAIL, ("use_rslora: llama.cpp will scale by alpha/r, off by sqrt(r); set use_rslora=false or rescale "
                      "alpha (lora_alpha x sqrt(r)) before converting")
    return PASS, "scale alpha/r, as llama.cpp computes it"


def alpha_pattern(ctx: Inputs) -> tuple[str, str]:
    alpha = ctx.config.get("lora_alpha")
    differing = {k: v for k, v in (ctx.config.get("alpha_pattern") or {}).items() if v != alpha}
    if differing:
        return FAIL, (f"alpha_pattern {differing}: llama.cpp stores one alpha ({alpha}), so these modules come out "
                      f"scaled wrong, silently; retrain without alpha_pattern (rank_pattern is fine) or fold each "
                      f"module's alpha/lora_alpha ratio into its lora_B before converting")
    return PASS, "one alpha for every module"


def tied_lm_head(ctx: Inputs) -> tuple[str, str]:
    adapted = sorted({formats.module_of_key(k).removeprefix(formats.PEFT_KEY_PREFIX) for k in ctx.lora_keys()})
    heads = [m for m in adapted if m.split(".")[-1] == "lm_head"]
    if not heads:
        return PASS, "lm_head not adapted"
    if ctx.base is None:
        return WARN, "lm_head is adapted: pass --base to check that the base does not tie it to the embeddings"
    if ctx.base.tie_word_embeddings:
        return FAIL, ("lm_head is adapted but the base ties it to the embeddings: convert_lora_to_gguf.py refuses "
                      "it; retrain without lm_head in target_modules")
    return PASS, "lm_head adapted, not tied"

