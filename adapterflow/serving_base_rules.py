"""The serving preflight's rules that read the base model (`adapterflow.serving` runs them): every adapter tensor's
full module path and shape exist in the base (vLLM matches names by their last component only, so a wrong path
loads and silently does nothing: vllm#34186), the embedding vocabulary is the base's (vllm PR #28382), and every
list entry of target_modules names a base module (PEFT `peft/tuners/tuners_utils.py`). Without a base they say
what they could not check.
"""

from __future__ import annotations

import difflib
from typing import Optional

from adapterflow import formats
from adapterflow.serving_files import BaseShapes
from adapterflow.serving_rules import FAIL, LORA_SUFFIXES, PASS, WARN, Inputs, _short

# Without a base: what each runtime does with a module path the base lacks (sources in the module docstring).
_UNCHECKED = {
    "vllm": "a path the base lacks makes vLLM serve the base model silently, vllm#34186",
    "llama.cpp": "convert_lora_to_gguf.py maps every tensor name through the base architecture's tensor map and "
                 "stops on one it cannot map ('Can not map tensor', convert_hf_to_gguf.py map_tensor_name); llama.cpp "
                 "refuses a shape that does not fit when it loads the GGUF adapter onto the base",
    "peft": "informational for PEFT: at load it builds the layers from target_modules, raises when none is found or "
            "a shape does not fit, and warns about missing adapter keys (peft/peft_model.py load_adapter)"}
_EFFECTS = {"vllm": "vLLM loads such an adapter and silently serves the base model there (vllm#34186)",
            "llama.cpp": "convert_lora_to_gguf.py cannot map these tensors onto the base",
            "peft": "PEFT cannot place these tensors (they load as unexpected keys, or fail on the shape)"}


def module_paths(ctx: Inputs, runtime: str) -> tuple[str, str]:
    """Every adapter tensor names a module the base has, with a shape that fits its weight (vllm#34186). A module
    the base lacks is named once, with its tensors (`...q_proj.lora_A/lora_B`); `base_layer` copies are skipped."""
    if ctx.base is None:
        return WARN, (f"not checked against a base model: pass --base to check every module path and shape "
                      f"({_UNCHECKED[runtime]})")
    checked = [k for k in sorted(ctx.adapter.shapes) if formats.BASE_LAYER not in k]
    missing: dict[str, tuple[list[str], str]] = {}  # module -> (its tensors' suffixes, why)
    problems = []
    for key in checked:
        module, problem = _key_problem(ctx, key)
        if module is not None:
            suffix = key.removeprefix(formats.PEFT_KEY_PREFIX)[len(module) + 1:].removesuffix(".weight")
            missing.setdefault(module, ([], problem))[0].append(suffix)
        elif problem:
            problems.append(problem)
    problems = [f"{m}.{'/'.join(sfx)} {why}" for m, (sfx, why) in missing.items()] + problems
    if not problems:
        return PASS, f"every module path of the {len(checked)} tensors exists in {ctx.base.source}"
    count = sum(len(sfx) for sfx, _ in missing.values()) + len(problems) - len(missing)
    return FAIL, (f"{count} tensor(s) do not fit {ctx.base.source}: {_short(problems, 2)}; {_EFFECTS[runtime]}; "
                  f"train the adapter on this base model (or check with the base it was trained on)")


def _key_problem(ctx: Inputs, key: str) -> tuple[Optional[str], Optional[str]]:
    """(module, why) for a module the base lacks; (None, problem) for a shape that does not fit; (None, None)."""
    shape = ctx.adapter.shapes[key]
    path = key.removeprefix(formats.PEFT_KEY_PREFIX)
    is_lora = key.endswith(LORA_SUFFIXES)
    in_adapter_layer = any(part.startswith("lora_") for part in path.split("."))  # also DoRA, lora_bias tensors
    module = formats.module_of_key(path) if in_adapter_layer else path.rsplit(".", 1)[0]
    weight_key = f"{module}.weight" if in_adapter_layer else path
    base_shape = ctx.base.shapes.get(weight_key)
    if base_shape is None and module.split(".")[-1] == "lm_head" and ctx.base.tie_word_embeddings:
        embedding = ctx.base.embedding_key()
        base_shape = ctx.base.shapes.get(embedding) if embedding else None
    if base_shape is None:
        return module, f"(no {weight_key} in the base{_near(ctx.base, module)})"
    if not is_lora or len(shape) != 2 or len(base_shape) != 2:
        fits = in_adapter_layer or shape == base_shape  # a full copy (modules_to_save, bias) has the base's shape
        return None, (None if fits else f"{path} {shape} does not fit the base's {base_shape}")
    out_features, in_features = base_shape
    if key.endswith(LORA_SUFFIXES[2:]):  # embedding: weight (vocab, hidden); A (r, vocab), B (hidden, r)
        out_features, in_features = in_features, out_features
    elif ctx.config.get("fan_in_fan_out"):  # Conv1D stores (in, out)
        out_features, in_features = in_features, out_features
    expected = in_features if formats.is_lora_a(key) else out_features
    got = shape[1] if formats.is_lora_a(key) else shape[0]
    if got != expected:
        return None, f"{path} {shape} does not fit the base weight {weight_key} {base_shape}"
    return None, None


def _near(base: BaseShapes, module: str) -> str:
    """A hint for a missing module path: a base module with the same ending (another prefix), if any."""
    modules = sorted({k.removesuffix(".weight") for k in base.shapes if k.endswith(".weight")})
    near = [m for m in modules if m.endswith(f".{module}") or module.endswith(f".{m}")]
    tail = ".".join(module.split(".")[-3:])
    near = near or [m for m in modules if m == tail or m.endswith(f".{tail}")]
    return f"; it has {near[0]}" if near else ""


def vocab(ctx: Inputs, runtime: str) -> tuple[str, str]:
    """lora_embedding_A is (r, vocab) and full embedding weights (vocab, hidden): vocab must be the base's."""
    if ctx.base is None:
        return PASS, "vocabulary not checked (no base given)"
    size = ctx.base.vocab_size
    embedding = ctx.base.embedding_key()
    if embedding:
        size = ctx.base.shapes[embedding][0]
    found = {}
    for key, shape in ctx.adapter.shapes.items():
        if key.endswith(f".{formats.LORA_EMBEDDING_A}") and len(shape) == 2:
            found[key] = shape[1]
        elif key.endswith(tuple(f"{n}.weight" for n in formats.EMBEDDING_LAYER_NAMES)) and len(shape) == 2:
            found[key] = shape[0]
    wrong = {k: v for k, v in found.items() if v != size}
    if not found:
        return PASS, "no embedding tensors"
    if wrong:
        extra = " (vLLM removed extra-vocabulary support, PR #28382)" if runtime == "vllm" else ""
        return FAIL, (f"vocabulary {sorted(set(wrong.values()))} in {_short(sorted(wrong), 2)} but the base has "
                      f"{size}{extra}; serve on the base the adapter was trained on, with its tokenizer")
    return PASS, f"embedding vocabulary {size} matches the base"



def target_modules(ctx: Inputs) -> tuple[str, str]:
    """With a base: every entry of a list-form target_modules names a module of the base. PEFT matches an entry
    against a module's full name or any dotted suffix of it (`check_target_module_exists`,
    `peft/tuners/tuners_utils.py`), raises only when NO entry matches, and leaves the others out silently."""
    targets = ctx.config.get("target_modules")
    if ctx.base is None:
        return PASS, "target_modules not checked (no base given)"
    if not isinstance(targets, list):
        return PASS, f"target_modules {targets!r} is not a list of names"
    modules = {k.rsplit(".", 1)[0] for k in ctx.base.shapes if k.endswith((".weight", ".bias"))}
    if ctx.base.tie_word_embeddings:
        modules.add("lm_head")  # a tied checkpoint may store no lm_head.weight; the module exists
    unmatched = [t for t in targets if isinstance(t, str) and not any(m == t or m.endswith(f".{t}") for m in modules)]
    if not unmatched:
        return PASS, f"every target_modules entry names a module of {ctx.base.source}"
    names = sorted({m.split(".")[-1] for m in modules})
    hints = [f"{t!r}: did you mean {close[0]!r}?" for t in unmatched
             for close in [difflib.get_close_matches(t.split(".")[-1], names, n=1)] if close]
    return WARN, (f"target_modules {unmatched} match no module of {ctx.base.source}: PEFT adapts the other targets "
                  f"and leaves these out without an error; fix the name{' (' + '; '.join(hints) + ')' if hints else ''}"
                  f" or drop it")
