"""Adapter state dicts: extract one adapter's tensors from a model in PEFT's checkpoint layout, and load them back.

Both directions enumerate the adapter layers of the model and map names through `formats.checkpoint_key`, so
what is saved is exactly what loading expects. Extraction returns references to the live tensors (no copies)
and visits adapter layers only: its cost grows with the adapter, not with the base model.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Iterator, Literal, Union

import torch
from torch import nn

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.layers import AdapterLayer, LoraLayer
from adapterflow.serialization import AdapterLoadError
from adapterflow.targeting import embedding_is_targeted

SaveEmbeddingLayers = Union[bool, Literal["auto"]]
__all__ = ["AdapterLoadError", "AdapterSaveError", "changed_base_tensors", "check_saveable", "get_adapter_state_dict", "load_adapter_state_dict",
           "match_checkpoint"]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(path, layer) of every adapter layer; paths are parameter-name prefixes of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_model_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{model parameter name: tensor} of one adapter, e.g. `base_model.model.x.q_proj.lora_A.default.weight`."""
    tensors = {}
    for path, layer in adapter_layers(model):
        for local_name, tensor in layer.adapter_tensors(adapter_name).items():
            tensors[f"{path}.{local_name}"] = tensor
    return tensors


def adapter_checksums(model: nn.Module, adapter_name: str) -> dict[str, tuple[float, float]]:
    """{parameter name: (sum, sum of squares) in float64} of one adapter's tensors: a cheap record of their values
    (e.g. right after a PiSSA initialisation, to tell at save time whether they have changed since)."""
    return {key: (t.detach().double().sum().item(), t.detach().double().square().sum().item())
            for key, t in adapter_model_tensors(model, adapter_name).items()}


def get_adapter_state_dict(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = formats.DEFAULT_ADAPTER_NAME,
    save_embedding_layers: SaveEmbeddingLayers = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed as in PEFT's files (`base_model.model.<path>.lora_A.weight`, ...).

    Args:
        model: an AdapterModel (any module whose parameter names carry the `base_model.model.` prefix).
        config: the adapter's config (decides biases and embedding layers).
        adapter_name: which adapter.
        save_embedding_layers: True adds the input/output embedding weights, False never does, "auto" does
            when an embedding layer is targeted or the vocabulary differs from the base model's config.json.

    Returns:
        {checkpoint key: tensor}; tensors are detached views of the model's own, not copies.
    """
    state = {
        formats.checkpoint_key(key, adapter_name): tensor.detach()
        for key, tensor in adapter_model_tensors(model, adapter_name).items()
    }
    state.update({name: param.detach() for name, param in bias_parameters(model, config.bias).items()})
    if save_embedding_layers is not False:
        embeddings_targeted = embedding_is_targeted(config.target_modules, _bare_model(model))
        if _resolve_save_embedding_layers(model, config, save_embedding_layers, embeddings_targeted):
            state.update(_embedding_tensors(model, embeddings_targeted))
    return state


def bias_parameters(model: nn.Module, bias: str) -> dict[str, torch.Tensor]:
    """The biases that `bias` ("none" | "all" | "lora_only") makes part of the adapter, by parameter name."""
    if bias == "none":
        return {}
    if bias == "lora_only":
        return {
            f"{path}.{formats.BASE_LAYER}.bias": layer.base_layer.bias
            for path, layer in adapter_layers(model)
            if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None
        }
    internal = tuple(
        f"{path}.{name}." for path, layer in adapter_layers(model)
        for name in layer.adapter_layer_names + (formats.ORIGINAL_MODULE,)
    )
    return {
        name: param for name, param in model.named_parameters() if name.endswith(".bias") and not name.startswith(internal)
    }


def _resolve_save_embedding_layers(
    model: nn.Module, config: LoraConfig, flag: SaveEmbeddingLayers, embeddings_targeted: bool
) -> bool:
    if isinstance(flag, bool):
        return flag
    if flag != "auto":
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {flag!r}.")
    if embeddings_targeted:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        return True
    base_vocab = _base_vocab_size(config.base_model_name_or_path)
    vocab = _vocab_size(model)
    if base_vocab is not None and vocab is not None and base_vocab != vocab:
        warnings.warn(
            f"Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning "
            f"({base_vocab} -> {vocab} tokens)."
        )
        return True
    return False


def _bare_model(model: nn.Module) -> nn.Module:
    """The wrapped transformers model of an AdapterModel (or the module itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_vocab_size(base_model_name_or_path: str | None) -> int | None:
    """vocab_size from the base model's config.json, read only from a local folder (never a network call)."""
    if not base_model_name_or_path:
        return None
    path = Path(base_model_name_or_path) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))


def _vocab_size(model: nn.Module) -> int | None:
    base = _bare_model(model)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if isinstance(embeddings, LoraLayer):
        embeddings = embeddings.base_layer
    return getattr(embeddings, "num_embeddings", None)


def _embedding_tensors(model: nn.Module, targeted: bool) -> dict[str, torch.Tensor]:
    """The input/output embedding weights under their model names (`...embed_tokens.base_layer.weight` when
    the embedding is LoRA-wrapped), as PEFT saves them."""
    base = _bare_model(model)
    if not hasattr(base, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a transformers model.")
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    state = {}
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        if isinstance(layer, LoraLayer):
            layer = layer.base_layer
        elif targeted or layer is None or isinstance(layer, AdapterLayer):
            # PEFT saves only the wrapped embeddings when embeddings are targeted; a modules_to_save copy is
            # already saved in full.
            continue
        prefix = names[id(layer)]
        state.update({f"{prefix}.{k}": v.detach() for k, v in layer.state_dict(keep_vars=True).items()})
    return state


def match_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """Pair every checkpoint key with the model tensor it loads into, checking keys and shapes; changes nothing.

    Keys that name a base-model tensor (saved embedding layers, biases) pair with it and overwrite it on load,
    as in PEFT.

    Returns:
        {checkpoint key: model tensor}.

    Raises:
        AdapterLoadError: an adapter tensor has no checkpoint entry, a checkpoint entry matches nothing in the
            model, or shapes differ.
    """
    resolved, missing, unexpected, mismatched = _pair_with_model(model, state, adapter_name)
    if missing or unexpected or mismatched:
        raise AdapterLoadError(_load_error_message(missing, unexpected, mismatched))
    return resolved


def _pair_with_model(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str):
    """(resolved {key: model tensor}, missing keys, unexpected keys, shape mismatch lines)."""
    model_tensors = adapter_model_tensors(model, adapter_name)
    targets = formats.checkpoint_to_model_keys(list(model_tensors), adapter_name)
    extra_keys = [k for k in state if k not in targets]
    base_tensors = dict(model.state_dict(keep_vars=True)) if extra_keys else {}
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(k for k in extra_keys if k not in base_tensors)
    resolved = {k: model_tensors[targets[k]] if k in targets else base_tensors[k] for k in state if k not in unexpected}
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(t.shape)}"
        for k, t in resolved.items()
        if t.shape != state[k].shape
    ]
    return resolved, missing, unexpected, mismatched


class AdapterSaveError(ValueError):
    """Tensors that must not reach a saved adapter file (a shard of a distributed parameter, an empty tensor, a
    shape the config and the model do not imply); the message names each key and how to gather in full."""


_RANK_DIMS = {f".{formats.LORA_A}.weight": 0, f".{formats.LORA_B}.weight": 1, f".{formats.LORA_EMBEDDING_A}": 0,
              f".{formats.LORA_EMBEDDING_B}": 1}  # where r sits: lora_A (r, in), lora_B (out, r), PEFT's layouts


def check_saveable(state: dict[str, torch.Tensor], config: LoraConfig, model: nn.Module | None = None,
                   adapter_name: str = formats.DEFAULT_ADAPTER_NAME) -> None:
    """Refuse a state dict that would save a rank's slice instead of the adapter (the failure accelerate fixed in
    its PR #4206: FSDP-sharded LoRA weights saved as each rank's shard, or empty).

    Args:
        state: {PEFT checkpoint key: tensor} about to be written.
        config: the adapter's config: lora_A must be (r, in_features), lora_B (out_features, r), lora_embedding_A
            (r, num_embeddings), lora_embedding_B (embedding_dim, r), with r after rank_pattern.
        model: when given, every tensor's shape must also equal the (logical, unsharded) shape of the model
            tensor it belongs to (`match_checkpoint`'s pairing).

    Raises:
        AdapterSaveError: a DTensor (torch.distributed.tensor), a meta or empty tensor, or a wrong shape; nothing
            was written.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # none exists unless loaded
    problems = []
    for key, tensor in state.items():
        if dtensor is not None and isinstance(tensor, dtensor):
            problems.append(f"{key}: a DTensor sharded over {tensor.device_mesh.size()} ranks "
                            f"({tuple(tensor.to_local().shape)} on this rank); gather it first (DTensor.full_tensor(), "
                            f"or get_model_state_dict(..., options=StateDictOptions(full_state_dict=True)))")
        elif tensor.is_meta or tensor.numel() == 0:
            problems.append(f"{key}: {'a meta' if tensor.is_meta else 'an empty'} tensor {tuple(tensor.shape)}; "
                            f"a distributed rank's empty shard is not the adapter: gather it in full first")
        else:
            problems += _rank_problems(key, tensor, config)
    if model is not None:
        _, _, unexpected, mismatched = _pair_with_model(model, state, adapter_name)
        problems += [f"{k}: no such tensor in the model" for k in unexpected]
        problems += [f"{line} (a rank's slice?)" for line in mismatched]
    if problems:
        raise AdapterSaveError("Refusing to save the adapter: these tensors are not the full adapter weights:\n"
                               + "\n".join(f"  - {p}" for p in problems[:10]))


def _rank_problems(key: str, tensor: torch.Tensor, config: LoraConfig) -> list[str]:
    name = key[len(formats.PEFT_KEY_PREFIX):] if key.startswith(formats.PEFT_KEY_PREFIX) else key
    for suffix, dim in _RANK_DIMS.items():
        if name.endswith(suffix):
            r = config.rank_and_alpha(name[:-len(suffix)])[0]
            if tensor.ndim != 2 or tensor.shape[dim] != r:
                return [f"{key}: shape {tuple(tensor.shape)}, but r={r} must be its dimension {dim}"]
    return []


@torch.no_grad()
def changed_base_tensors(model: nn.Module, adapter_name: str, targets: dict[str, torch.Tensor],
                         state: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint keys paired (by `match_checkpoint`) with base-model tensors, not the adapter's own, whose saved
    values differ from the model's: loading them would change what every other adapter computes."""
    own = {id(t) for t in adapter_model_tensors(model, adapter_name).values()}
    return sorted(k for k, t in targets.items() if id(t) not in own and not torch.equal(t, state[k].to(t)))


@torch.no_grad()
def load_adapter_state_dict(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model tensors paired by `match_checkpoint` (casting dtype and device)."""
    for key, tensor in targets.items():
        tensor.copy_(state[key])


def _load_error_message(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = ["The adapter checkpoint does not match the model's adapter layers:"]
    for title, keys in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                        ("shape mismatch", mismatched)):
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines += [f"    {k}" for k in keys]
    if mismatched and any("embed" in k or "lm_head" in k for k in mismatched):
        lines.append("  The vocabulary size differs: call base_model.resize_token_embeddings(<saved size>) first.")
    lines.append(
        "  Check that the base model is the one the adapter was trained on and that adapter_config.json "
        "(target_modules, r, rank_pattern) belongs to these weights."
    )
    return "\n".join(lines)
