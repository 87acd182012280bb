"""Will this adapter serve? A preflight of a saved adapter against what vLLM, llama.cpp and PEFT demand.

`check_serving` reads only the adapter's files (adapter_config.json and the weight file's header) and, when a
base is given, the base's config.json and weight shapes (safetensors headers); it loads no weights and touches no
network. A base named by a Hub id is resolved by the caller (`adapterflow check` does it with huggingface_hub)
into a `BaseShapes`. Each rule's source is in `adapterflow.serving_rules`; in short:

vLLM (`vllm/lora/peft_helper.py`, `vllm/lora/lora_model.py`, `vllm/lora/utils.py`, `vllm/config/lora.py`): needs
r, lora_alpha and target_modules; rank <= `--max-lora-rank` (1, 8, 16, 32, 64, 128, 256, 320 or 512; default 16);
no modules_to_save (newest: only classifier/score), no DoRA, bias "none"; reads adapter_model.safetensors, .bin
or .pt; accepts only lora_A/lora_B/lora_embedding_A/B tensors; matches modules by their LAST name component
only, so an adapter whose full paths the base lacks loads and silently does nothing (vllm#34186);
lora_embedding_A's columns must equal the base vocabulary (extra vocabulary removed, vllm PR #28382). Not
checked: whether the architecture implements SupportsLoRA (that needs vLLM itself).

llama.cpp (`convert_lora_to_gguf.py`, `src/llama-adapter.h`): needs lora_alpha and the base's config; reads
adapter_model.safetensors or .bin; only LoRA A/B tensors (full embeddings exit the converter); both A and B of
every module; no lm_head adapter on tied embeddings; one alpha, scale alpha / rank: use_rslora and alpha_pattern
come out silently wrong; no DoRA.

PEFT (`peft/tuners/lora/config.py`, `peft/utils/save_and_load.py`): peft_type LORA, a weight file, A/B pairs,
PiSSA initialisations that can be rebuilt at load. For every runtime: each module's lora_A/lora_B ranks agree with
each other and with the config's r / rank_pattern (PEFT refuses other shapes, vLLM scales by alpha / r_config,
llama.cpp by alpha / the tensor's rank). With a base (`adapterflow.serving_base_rules`), for every runtime: every
adapter tensor's full module path exists in the base with a fitting shape, the embedding vocabulary matches, and
each listed target_modules entry names a base module (a warning: PEFT leaves an unmatched one out silently).
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Literal, Optional, Union

from adapterflow import formats
from adapterflow import serving_rules as rules
from adapterflow.serving_base_rules import module_paths, target_modules, vocab
from adapterflow.serving_files import AdapterFiles, BaseShapes, read_adapter_files, read_base_shapes
from adapterflow.serving_rules import FAIL, PASS, VLLM_MAX_LORA_RANKS, Inputs

RUNTIMES = ("vllm", "llama.cpp", "peft")
Runtime = Literal["vllm", "llama.cpp", "peft"]
Verdict = Literal["pass", "fail", "warn"]
# Rules that read adapter_config.json alone (check_config runs them before training).
CONFIG_RULES = frozenset({"config_keys", "max_lora_rank", "modules_to_save", "use_dora", "bias", "init_lora_weights",
                          "layer_replication", "use_rslora", "alpha_pattern", "peft_type"})


@dataclass(frozen=True)
class RuleResult:
    """One rule's outcome: `runtime`, `rule` (a short name, e.g. "modules_to_save"), `verdict` ("pass", "fail" or
    "warn": serves, but needs a server flag or is unverified) and `message` (what was found and, unless pass, the
    fix)."""

    runtime: str
    rule: str
    verdict: Verdict
    message: str


@dataclass
class ServingReport:
    """The preflight of one adapter folder: every rule of every runtime asked for, in order."""

    adapter_dir: str
    runtimes: tuple[str, ...]
    base: Optional[str] = None  # the base's source (folder or Hub id); None: not checked against a base
    results: list[RuleResult] = field(default_factory=list)

    def rules(self, runtime: str) -> list[RuleResult]:
        return [r for r in self.results if r.runtime == runtime]

    def failed_rules(self, runtime: str) -> list[str]:
        """Names of the rules `runtime` fails, in order (empty: it serves)."""
        return [r.rule for r in self.rules(runtime) if r.verdict == FAIL]

    def passed(self, runtime: Optional[str] = None) -> bool:
        """True when `runtime` (default: every runtime asked for) fails no rule; warnings do not fail."""
        return not any(self.failed_rules(rt) for rt in ([runtime] if runtime else self.runtimes))

    def to_dict(self) -> dict:
        """{"adapter_dir", "base", "passed", "runtimes": {runtime: {"passed", "failed_rules", "rules": [...]}}}:
        plain JSON types."""
        return {"adapter_dir": self.adapter_dir, "base": self.base, "passed": self.passed(),
                "runtimes": {rt: {"passed": self.passed(rt), "failed_rules": self.failed_rules(rt),
                                  "rules": [{k: v for k, v in asdict(r).items() if k != "runtime"}
                                            for r in self.rules(rt)]} for rt in self.runtimes}}


def check_serving(adapter_dir: Union[str, os.PathLike], base: Union[str, os.PathLike, BaseShapes, None] = None,
                  runtimes: tuple[str, ...] = RUNTIMES, max_lora_rank: Optional[int] = None) -> ServingReport:
    """Check a saved adapter against the loaders of the serving runtimes, without loading any weights.

    Args:
        adapter_dir: the adapter folder (adapter_config.json and adapter_model.safetensors / .bin / .pt; other
            files such as adapterflow.json or README.md are ignored).
        base: the base model: a local transformers folder (config.json plus model.safetensors, a sharded
            model.safetensors.index.json or pytorch_model.bin; only headers are read), a `BaseShapes` (config and
            {weight name: shape}, e.g. built from Hub metadata), or None to skip the base-dependent rules (then
            one `module_paths` warning per runtime says so).
        runtimes: any of "vllm", "llama.cpp", "peft".
        max_lora_rank: the vLLM server's `--max-lora-rank` (one of 1, 8, 16, 32, 64, 128, 256, 320, 512). None:
            a rank above vLLM's default 16 is a warning (start the server with a larger value), above 512 a failure.

    Returns:
        ServingReport with one RuleResult per rule and runtime.

    Raises:
        ValueError: an unknown runtime or a max_lora_rank vLLM does not accept.
        FileNotFoundError: no adapter folder or adapter_config.json; a base folder without config.json or weights.
        adapterflow.serialization.AdapterLoadError: a config that is not a JSON object, an unreadable weight file.
    """
    runtimes = tuple(runtimes)
    _check_arguments(runtimes, max_lora_rank)
    adapter = read_adapter_files(adapter_dir)
    if base is not None and not isinstance(base, BaseShapes):
        base = read_base_shapes(base)
    report = ServingReport(str(adapter_dir), runtimes, base.source if base else None)
    return _apply(report, Inputs(adapter, base, max_lora_rank), lambda name: True)


def check_config(config: dict, runtimes: tuple[str, ...] = RUNTIMES) -> ServingReport:
    """The rules of `check_serving` that read adapter_config.json alone (CONFIG_RULES), for a config as it will
    be saved, before anything is trained (the pipeline's pre-training check of verify.require_runtimes).

    Args:
        config: adapter_config.json content, e.g. `LoraConfig.to_dict()`.

    Raises:
        ValueError: an unknown runtime.
    """
    _check_arguments(tuple(runtimes), None)
    ctx = Inputs(AdapterFiles(Path(formats.CONFIG_NAME), config, None), None, None)
    return _apply(ServingReport(formats.CONFIG_NAME, tuple(runtimes)), ctx, CONFIG_RULES.__contains__)


def _apply(report: ServingReport, ctx: Inputs, wanted: Callable[[str], bool]) -> ServingReport:
    for runtime in report.runtimes:
        for name, rule in _RULES[runtime]:
            if wanted(name):
                verdict, message = rule(ctx)
                report.results.append(RuleResult(runtime, name, verdict, message))
    return report


def _check_arguments(runtimes: tuple[str, ...], max_lora_rank: Optional[int]) -> None:
    unknown = [rt for rt in runtimes if rt not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"unknown runtime {', '.join(map(repr, unknown)) or '(none given)'}: use one or more of "
                         f"{', '.join(RUNTIMES)}")
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"max_lora_rank={max_lora_rank!r} is not a value vLLM's --max-lora-rank accepts: use one of "
                         f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}")


def peft_type(ctx: Inputs) -> tuple[str, str]:
    value = ctx.config.get("peft_type")
    if value != formats.PEFT_TYPE_LORA:
        return FAIL, (f"peft_type={value!r}: PEFT picks the adapter class from it and this check covers LoRA "
                      f"({formats.PEFT_TYPE_LORA!r}); re-save the adapter with PEFT or adapterflow")
    return PASS, "peft_type LORA"


Rule = Callable[[Inputs], tuple[str, str]]
_VLLM_FILES = (formats.SAFETENSORS_WEIGHTS_NAME, formats.BIN_WEIGHTS_NAME, formats.PT_WEIGHTS_NAME)


def _table(runtime: str, entries: list[tuple[str, Callable]]) -> list[tuple[str, Rule]]:
    """Bind the runtime's display name into rules that take one."""
    label = {"vllm": "vLLM", "llama.cpp": "llama.cpp", "peft": "PEFT"}[runtime]
    shared = {rules.required_keys, rules.modules_to_save, rules.dora, rules.bias, rules.residual_init,
              rules.weights_file, rules.weight_keys, rules.pairs, rules.ranks_match}  # rules that name the runtime in their message
    bound = []
    for name, rule in entries:
        base_rule = rule.func if isinstance(rule, partial) else rule
        if base_rule in shared:
            rule = partial(rule, runtime=label)
        elif base_rule in (module_paths, vocab):
            rule = partial(rule, runtime=runtime)
        bound.append((name, rule))
    return bound


_RULES: dict[str, list[tuple[str, Rule]]] = {
    "vllm": _table("vllm", [
        ("config_keys", partial(rules.required_keys, keys=("r", "lora_alpha", "target_modules"))),
        ("max_lora_rank", rules.vllm_rank),
        ("modules_to_save", partial(rules.modules_to_save, allowed=frozenset(rules.VLLM_ALLOWED_MODULES_TO_SAVE))),
        ("use_dora", rules.dora), ("bias", rules.bias), ("init_lora_weights", rules.residual_init),
        ("layer_replication", rules.layer_replication),
        ("weights_file", partial(rules.weights_file, names=_VLLM_FILES)), ("weight_keys", partial(rules.weight_keys, skipped=f".{formats.BASE_LAYER}.")),
        ("lora_rank", rules.ranks_match), ("target_modules", target_modules),
        ("module_paths", module_paths), ("vocab", vocab)]),
    "llama.cpp": _table("llama.cpp", [
        ("config_keys", partial(rules.required_keys, keys=("lora_alpha",))), ("base_config", rules.llama_cpp_base),
        ("modules_to_save", rules.modules_to_save), ("use_dora", rules.dora), ("bias", rules.bias),
        ("init_lora_weights", rules.residual_init), ("use_rslora", rules.rslora),
        ("alpha_pattern", rules.alpha_pattern),
        ("weights_file", partial(rules.weights_file, names=formats.WEIGHTS_NAMES)),
        ("weight_keys", partial(rules.weight_keys, skipped=f".{formats.BASE_LAYER}.weight")),
        ("lora_pairs", rules.pairs), ("lora_rank", rules.ranks_match), ("tied_lm_head", rules.tied_lm_head),
        ("target_modules", target_modules), ("module_paths", module_paths), ("vocab", vocab)]),
    "peft": _table("peft", [
        ("peft_type", peft_type), ("init_lora_weights", rules.peft_residual_init),
        ("weights_file", partial(rules.weights_file, names=formats.WEIGHTS_NAMES)), ("lora_pairs", rules.pairs),
        ("lora_rank", rules.ranks_match), ("target_modules", target_modules),
        ("module_paths", module_paths), ("vocab", vocab)]),
}
