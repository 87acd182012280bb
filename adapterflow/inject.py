"""Injecting adapter layers into a model (and taking them out again): the structural side of AdapterModel.

`inject_adapter` wraps every module a config targets in a LoRA layer (or a modules_to_save wrapper), adds the
adapter's tensors and initialises them. Everything that can be refused is checked before the first module is
replaced.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_pissa
from adapterflow.layers import AdapterLayer, LoraLayer, ModulesToSaveWrapper, is_conv1d, lora_layer_for
from adapterflow.targeting import plan_targets


def inject_adapter(model: nn.Module, adapter_name: str, config: LoraConfig, initialize: bool) -> LoraConfig:
    """Add adapter `adapter_name` to `model` (in place); returns the config as resolved for this model.

    Args:
        initialize: run the init method; False leaves the tensors to be filled from a checkpoint.

    Raises:
        ValueError: an invalid adapter name; PiSSA on weights it cannot rewrite.
        adapterflow.targeting.TargetError: the config does not fit the model.
    """
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
    if any(is_conv1d(m) for m in modules.values()) and not config.fan_in_fan_out:
        # As PEFT: Conv1D stores weights (in, out), which the saved config must say.
        config.fan_in_fan_out = True
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
