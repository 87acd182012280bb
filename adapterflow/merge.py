"""Merging a LoRA adapter into its base model: every adapted weight becomes W + scaling * B @ A, the plain model.

The rules are PEFT's (peft 0.21, `peft/tuners/lora/layer.py`): `Linear.get_delta_weight` is
`transpose(B @ A, fan_in_fan_out) * scaling` (transformers' Conv1D stores its weight (in, out), hence the
transpose), `Embedding.get_delta_weight` is `transpose(B @ A) * scaling`; `scaling` is `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora` (`LoraLayer.update_layer`), r and alpha per module from `rank_pattern` /
`alpha_pattern`. `peft/tuners/tuners_utils.py` `BaseTuner._unload_and_optionally_merge` then replaces every
`modules_to_save` wrapper by the active adapter's trained copy; biases trained with `bias="all"` / `"lora_only"`
already live in the base layers. Those per-layer steps are `AdapterModel.merge_and_unload`
(adapterflow.layers.LoraLayer.merge / delta_weight); this module adds what a published merged model needs:

- one rounding: the sum is formed in fp32 and rounded to the output dtype once (a 16-bit base asked for as fp32
  is widened first, which is exact; a fp32 base asked for as 16-bit is merged in fp32, then cast);
- tied weights stay right: a LoRA on a weight another module shares (input embeddings tied to the output layer)
  gets its own copy first, so only the adapted module changes, and a model whose tie was broken is told so
  (`config.tie_word_embeddings = False`), so transformers saves and loads both matrices.

A PiSSA adapter saved without conversion merges onto the residual base its loader derives (the exact SVD of the
original weights, as `AdapterModel.from_pretrained` and verification do); a converted one onto the original base.
Both give the same merged weights.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from adapterflow import formats
from adapterflow.layers import LoraLayer, ModulesToSaveWrapper
from adapterflow.model import AdapterModel
from adapterflow.state_dict import adapter_layers

__all__ = ["merge_adapter"]


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_dir: str | os.PathLike | None = None, *,
                  adapter_name: str = formats.DEFAULT_ADAPTER_NAME, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The base model with one adapter merged in: outputs of base + adapter, no adapter layers left.

    Args:
        model: the base model (with `adapter_dir`: the adapter is loaded onto it with AdapterModel.from_pretrained;
            for a converted PiSSA adapter the original base, for an unconverted one too: the loader derives the
            residual), or an AdapterModel holding `adapter_name` (without `adapter_dir`). Modified in place.
        adapter_dir: a saved adapter folder (ours or PEFT's), or None.
        adapter_name: the adapter to merge (the one loaded from adapter_dir, or one of the AdapterModel's).
        dtype: dtype of the merged floating-point weights (default: the base's); rounded once from fp32.

    Returns:
        The plain base model (e.g. a transformers LlamaForCausalLM), in eval mode when the input was.

    Raises:
        ValueError: adapter_dir given with an AdapterModel, or no adapter adapter_name in it.
        FileNotFoundError, adapterflow.AdapterLoadError: adapter_dir is not an adapter of this base model.
    """
    if isinstance(model, AdapterModel):
        if adapter_dir is not None:
            raise ValueError("merge_adapter: pass a base model with adapter_dir, or an AdapterModel without it.")
        adapter_model = model
        adapter_model.set_adapter(adapter_name)  # ValueError naming the adapters when it is not there
    else:
        if adapter_dir is None:
            raise ValueError("merge_adapter: a base model needs adapter_dir, the saved adapter folder to merge.")
        adapter_model = AdapterModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
    base_dtype = _float_dtype(adapter_model.get_base_model())
    if dtype is not None and dtype != base_dtype and base_dtype != torch.float32:
        adapter_model.to(torch.float32)  # exact: the merged sum is rounded to `dtype` once, below
    untied = _untie_adapted_weights(adapter_model)
    merged = adapter_model.merge_and_unload()
    if untied:
        _say_untied(merged)
    if dtype is not None:
        merged.to(dtype)
    return merged


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _untie_adapted_weights(adapter_model: AdapterModel) -> bool:
    """Give each adapted module its own copy of a weight it shares with a module the merge leaves alone (e.g. a
    LoRA on embed_tokens tied to lm_head), so merging changes only the adapted one. Returns whether a tie was
    broken, by a copy here or by a modules_to_save copy replacing a module whose weights were shared."""
    model = adapter_model.get_base_model()
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    untied = False
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and layer.active_adapters:
            weight = layer.base_layer.weight
            if len(owners[id(weight)]) > 1:
                layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                untied = True
        elif isinstance(layer, ModulesToSaveWrapper) and layer.active_adapters:
            inside = f"{path}.original_module."
            untied |= any(any(not name.startswith(inside) for name in owners[id(p)])
                          for p in layer.original_module.parameters())
    return untied


def _say_untied(model: nn.Module) -> None:
    """transformers ties input and output embeddings when the config says so (on load, and it saves one copy):
    after the merge they differ, so the config must say they are separate."""
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for item in configs:
        if getattr(item, "tie_word_embeddings", False):
            item.tie_word_embeddings = False
