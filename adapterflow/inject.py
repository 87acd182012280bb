"""Injecting adapter layers into a model (and taking them out again): the structural side of AdapterModel.

`inject_adapter` wraps every module a config targets in a LoRA layer (or a modules_to_save wrapper), adds the
adapter's tensors and initialises them. Everything that can be refused is checked before the first module is
replaced, including whether the new adapter would change what the adapters already in the model compute
(`coexistence_problems`). Config flags are normalised as PEFT normalises them at injection (fan_in_fan_out).
"""

from __future__ import annotations

import copy
import warnings
from typing import Mapping

import torch
from torch import nn

from adapterflow import formats
from adapterflow.config import ConfigError, LoraConfig, check_config_type
from adapterflow.init_methods import is_pissa
from adapterflow.layers import AdapterLayer, LoraLayer, ModulesToSaveWrapper, is_conv1d, lora_layer_for
from adapterflow.targeting import TargetPlan, plan_targets


def inject_adapter(model: nn.Module, adapter_name: str, config: LoraConfig, initialize: bool,
                   existing: Mapping[str, LoraConfig] | None = None) -> LoraConfig:
    """Add adapter `adapter_name` to `model` (in place); returns the config as resolved for this model.

    Args:
        initialize: run the init method; False leaves the tensors to be filled from a checkpoint.
        existing: the configs of the adapters already in the model, which the new one must not disturb.

    Raises:
        ConfigError: config is not a LoraConfig, or the new adapter would change the outputs of `existing` ones.
        ValueError: an invalid adapter name; PiSSA on weights it cannot rewrite.
        adapterflow.targeting.TargetError: the config does not fit the model.
    """
    check_config_type(config)
    formats.check_adapter_name(adapter_name)
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    if config.task_type is None and "auto_mapping" not in config.extra_fields:
        # PEFT records the model class so AutoPeftModel can rebuild it when no task type says which.
        cls = type(model)
        config.extra_fields["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    plan = plan_targets(model, config)
    config.target_modules = plan.target_modules
    modules = {path: model.get_submodule(path) for path in plan.lora_modules}
    if is_pissa(config.init_lora_weights) and initialize:
        check_pissa_targets(model, modules)
    problems = coexistence_problems(model, config, existing or {}, plan)
    if problems:
        raise ConfigError(f"Adapter {adapter_name!r} cannot be added next to {sorted(existing)}:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    normalise_fan_in_fan_out(config, modules)
    for path, module in modules.items():
        layer = module if isinstance(module, LoraLayer) else lora_layer_for(module)(module)
        if layer is not module:
            replace_module(model, path, layer)
        r, alpha = config.rank_and_alpha(path)
        layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora)
        if initialize:
            layer.initialize(adapter_name, config.init_lora_weights)
    for path in plan.modules_to_save:
        module = model.get_submodule(path)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        if wrapper is not module:
            replace_module(model, path, wrapper)
        wrapper.add_adapter(adapter_name)
    return config


def normalise_fan_in_fan_out(config: LoraConfig, modules: dict[str, nn.Module]) -> None:
    """fan_in_fan_out says whether the adapted weights are stored (in, out): True for transformers' Conv1D, False
    for nn.Linear; a wrong value is corrected with PEFT's warning, so the saved config describes the layers
    (PEFT `tuners/lora/layer.py` `dispatch_default`). Embeddings do not use the flag."""
    bases = [m.base_layer if isinstance(m, LoraLayer) else m for m in modules.values()]
    if any(is_conv1d(m) for m in bases):
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=4)
        config.fan_in_fan_out = True
    elif config.fan_in_fan_out and any(isinstance(m, nn.Linear) for m in bases):
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                      "fan_in_fan_out to False.", stacklevel=4)
        config.fan_in_fan_out = False


def coexistence_problems(model: nn.Module, config: LoraConfig, existing: Mapping[str, LoraConfig],
                         plan: TargetPlan) -> list[str]:
    """Why adding `config` would change what the adapters in `existing` compute (empty when it would not).

    - bias: biases belong to the base model, so an adapter that trains them changes every other adapter's output
      (PEFT refuses a second bias-training adapter; we refuse any bias adapter next to another adapter);
    - PiSSA rewrites base weights that the other adapters compute with (PEFT only warns);
    - a modules_to_save copy of a module that holds other adapters' layers would rename their tensors.
    """
    if not existing:
        return []
    problems = []
    with_bias = {name: c.bias for name, c in existing.items() if c.bias != "none"}
    if config.bias != "none" or with_bias:
        problems.append(
            f"bias={config.bias!r} (new) and {with_bias or 'none'} (existing): biases are base-model tensors shared "
            f"by every adapter, so only a single adapter may train them. Use bias='none' for every adapter, or put "
            f"the bias-training adapter in a model of its own."
        )
    if is_pissa(config.init_lora_weights):
        problems.append(
            f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights of the targeted layers into "
            f"PiSSA residuals, which the existing adapters compute with. Convert the PiSSA adapter to LoRA first "
            f"(save_pretrained(..., path_initial_model_for_weight_conversion=<initial folder>)) and load that, or "
            f"use a model of its own."
        )
    for path in plan.modules_to_save:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper) and any(isinstance(m, AdapterLayer) for m in module.modules()):
            problems.append(
                f"modules_to_save {path!r} holds LoRA layers of the existing adapters; a full copy of it would rename "
                f"their tensors. Leave {path!r} out of modules_to_save, or target it with LoRA instead."
            )
    return problems


def check_pissa_targets(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """PiSSA rewrites base weights: refuse dtypes it cannot decompose and weights shared with other modules."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    problems = []
    for path, module in modules.items():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Embedding):
            continue  # embeddings get the standard init under PiSSA (see init_methods)
        if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            problems.append(f"{path}: dtype {base.weight.dtype}; PiSSA needs fp32/fp16/bf16 (initialise before quantising).")
        if len(owners.get(id(base.weight), [])) > 1:
            problems.append(
                f"{path}: its weight is shared with {owners[id(base.weight)]}; PiSSA would rewrite both. Untie the "
                f"weights (tie_word_embeddings=False) or leave {path} out of target_modules."
            )
    if problems:
        raise ValueError("PiSSA cannot initialise these modules:\n" + "\n".join(f"  - {p}" for p in problems))


def unwrapped(layer: AdapterLayer) -> nn.Module:
    if isinstance(layer, LoraLayer):
        return layer.base_layer
    if layer.active_adapters:
        return layer.modules_to_save[layer.active_adapters[0]]
    return layer.original_module


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)
