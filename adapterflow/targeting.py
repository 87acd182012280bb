"""Which modules of a model an adapter config adapts, with PEFT's matching rules.

- target_modules as a list: a module matches when its path equals an entry or ends with `.<entry>`;
  as a string: the regex must match the whole path; "all-linear": every nn.Linear / Conv1D except the output
  head. exclude_modules use the same rules. layers_to_transform (an int or a list; an empty list means every
  layer) keeps only modules of the listed layer indices, except modules named by their exact path, which are
  always adapted (PEFT `tuners_utils.check_target_module_exists`).
- A list of 20 or more target_modules is saved as the shortest suffixes that match the same modules, as PEFT
  saves it (`_find_minimal_target_modules`, MIN_TARGET_MODULES_FOR_OPTIMIZATION).
- modules_to_save: a module whose path ends with an entry (PEFT's plain `endswith`) is trained in full; such
  modules and their children are never LoRA targets.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT's threshold for saving target_modules as minimal suffixes

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.layers import AdapterLayer, LoraLayer, is_conv1d, lora_layer_for


class TargetError(ValueError):
    """target_modules / modules_to_save do not fit the model."""


@dataclass
class TargetPlan:
    lora_modules: list[str]  # module paths to wrap with LoRA
    modules_to_save: list[str]  # module paths to train in full
    target_modules: list[str] | str  # config.target_modules, with "all-linear" resolved to module names


def plan_targets(model: nn.Module, config: LoraConfig) -> TargetPlan:
    """Find the modules `config` adapts in `model` (the bare model, e.g. a LlamaForCausalLM).

    Raises:
        TargetError: nothing matches (the message lists the adaptable module names that exist), or a matched
            module is of a type LoRA does not support.
    """
    modules = _visible_modules(model)
    to_save = [name for name in modules if config.modules_to_save and _is_module_to_save(name, config.modules_to_save)]
    target_modules = config.target_modules
    if config.targets_all_linear:
        target_modules = _all_linear(model, modules)
    problems, lora_modules = [], []
    for name, module in modules.items():
        if not _matches_target(name, target_modules, config) or _is_excluded(name, config):
            continue
        if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
            continue
        if isinstance(module, LoraLayer) or lora_layer_for(module) is not None:
            lora_modules.append(name)
        else:
            problems.append(
                f"{name!r} ({type(module).__name__}) matches target_modules but LoRA supports only nn.Linear, "
                f"nn.Embedding and transformers' Conv1D; narrow target_modules to those layers."
            )
    if not lora_modules:
        problems.append(_nothing_matched(model, modules, target_modules, config))
    if config.modules_to_save and not to_save:
        problems.append(f"modules_to_save {config.modules_to_save!r} matches no module of {type(model).__name__}.")
    if problems:
        raise TargetError("The adapter config does not fit the model:\n" + "\n".join(f"  - {p}" for p in problems))
    _warn_unused_entries(config, lora_modules)
    if isinstance(target_modules, list) and config.targets_all_linear:
        target_modules = _minimal_suffixes(target_modules, [n for n in modules if n not in target_modules])
    elif isinstance(target_modules, list) and len(target_modules) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        others = [n for n in modules if not _name_matches(n, target_modules)]
        minimal = _minimal_suffixes(target_modules, others)
        target_modules = minimal if len(minimal) < len(target_modules) else target_modules
    return TargetPlan(lora_modules, to_save, target_modules)


def _nothing_matched(model: nn.Module, modules: dict[str, nn.Module], target_modules, config: LoraConfig) -> str:
    """The problem to report when no module is adapted: blame layers_to_transform when it filtered out every
    module that target_modules matches."""
    if isinstance(target_modules, list) and config.layers_to_transform is not None:
        matching = [n for n, m in modules.items() if _name_matches(n, target_modules) and _is_adaptable(m)]
        if matching:
            found = sorted({i for i in (_layer_index(n, config) for n in matching) if i is not None})
            return (f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) "
                    f"selects none of the {len(matching)} modules target_modules matches; their layer indices are "
                    f"{found}. Pick indices from that list.")
    return (f"target_modules {config.target_modules!r} matches no adaptable module of {type(model).__name__}. "
            f"Adaptable module names: {adaptable_names(modules)}.")


def adaptable_names(modules: dict[str, nn.Module]) -> list[str]:
    """The distinct last path parts of the modules LoRA could wrap, e.g. ['embed_tokens', 'q_proj', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if _is_adaptable(m)})


def _visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, without the internals of adapter layers already in the model (their lora_A etc.)."""
    modules, hidden = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in hidden):
            continue
        modules[name] = module
        if isinstance(module, AdapterLayer):
            hidden.append(name + ".")
    return modules


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or lora_layer_for(module) is not None


def _matches_target(name: str, target_modules: list[str] | str, config: LoraConfig) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True  # an exact module path is adapted whatever layers_to_transform says, as in PEFT
    if not _name_matches(name, target_modules):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:  # PEFT: an empty list selects every layer
        return True
    index = _layer_index(name, config)
    return index is not None and index in ([wanted] if isinstance(wanted, int) else wanted)


def _name_matches(name: str, names: list[str]) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in names)


def _layer_index(name: str, config: LoraConfig) -> int | None:
    # As PEFT: the first number after `<layers_pattern>.` (or after any `<part>.` without a pattern).
    patterns = config.layers_pattern or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            break
    return None if match is None else int(match.group("idx"))


def _is_excluded(name: str, config: LoraConfig) -> bool:
    excluded = config.exclude_modules
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, name) is not None
    return any(name == e or name.endswith(f".{e}") for e in excluded)


def _is_module_to_save(name: str, modules_to_save: list[str]) -> bool:
    return any(name.endswith(m) for m in modules_to_save)


def _all_linear(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in modules.items()
        if module is not output_head
        and (isinstance(module, nn.Linear) or is_conv1d(module) or _wraps_linear(module))
    ]


def _wraps_linear(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and not isinstance(getattr(module, "base_layer", None), nn.Embedding)


def _minimal_suffixes(targets: list[str], others: list[str]) -> list[str]:
    """Shortest dotted suffixes that match every target and no other module (like PEFT's
    _find_minimal_target_modules), so "all-linear" is saved as e.g. ["down_proj", "q_proj", ...]."""
    other_suffixes = set()
    for other in others:
        parts = other.split(".")
        other_suffixes.update(".".join(parts[i:]) for i in range(len(parts)))
    chosen: set[str] = set()
    for name in sorted(targets, key=lambda n: n.count(".")):
        if any(name == c or name.endswith(f".{c}") for c in chosen):
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if suffix not in other_suffixes:
                chosen.add(suffix)
                break
    return sorted(chosen)


def _warn_unused_entries(config: LoraConfig, lora_modules: list[str]) -> None:
    if not isinstance(config.target_modules, list):
        return
    unused = [t for t in config.target_modules if not any(m == t or m.endswith(f".{t}") for m in lora_modules)]
    if unused:
        warnings.warn(
            f"target_modules entries {unused} match no module of this model; they are ignored "
            f"(adapted: {len(lora_modules)} modules).",
            stacklevel=3,
        )


def embedding_is_targeted(target_modules: list[str] | str | None, model: nn.Module) -> bool:
    """PEFT's rule for save_embedding_layers="auto": an embedding-named module is a target. Only a regex needs the
    module names, so a plain list never walks the model."""
    if isinstance(target_modules, str):
        if target_modules.lower() == formats.ALL_LINEAR:
            return False
        return any(
            re.fullmatch(target_modules, name)
            for name, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in formats.EMBEDDING_LAYER_NAMES)
        )
    return bool(target_modules) and any(e in target_modules for e in formats.EMBEDDING_LAYER_NAMES)
