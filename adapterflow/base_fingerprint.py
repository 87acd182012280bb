"""A fingerprint of the base model an adapter belongs to, for the integrity manifest (adapterflow.manifest).

It holds what decides whether an adapter's numbers mean anything on a model: the architecture, the sizes a
transformers config declares, and the shapes of the very weights the adapter's layers wrap. It is computed from
any torch module: the base model itself, an AdapterModel around it, or the model built on the meta device from
the base's config.json (no weights read), which is how the pipeline fingerprints a base it does not hold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch
from torch import nn

from adapterflow import formats
from adapterflow.layers import LoraLayer, ModulesToSaveWrapper

# Fields whose difference makes the adapter wrong on the model: a load refuses it. Other fields only warn.
COMPARED_FIELDS = ("architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                   "target_shapes_sha256")
WARNED_FIELDS = ("hub_commit",)


def base_fingerprint(model: nn.Module, state_keys: Iterable[str], hub_commit: str | None = None) -> dict:
    """The manifest's `base` entry for an adapter with checkpoint keys `state_keys` on `model`.

    Args:
        model: the base model, an AdapterModel wrapping it, or the base built on the meta device.
        state_keys: the adapter's checkpoint keys (`base_model.model.<module path>.lora_A.weight`, ...); their
            module paths are the targeted modules.
        hub_commit: the Hub commit (40 hex digits) the base was downloaded at; default: the commit of the
            huggingface_hub cache snapshot the model was loaded from (`snapshot_commit` of its name_or_path, as
            `resolve_base_model` returns for a Hub id), else None (a local folder, or a model loaded by repo id:
            transformers 5 keeps no commit on the model).

    Returns:
        {"architecture": the model's class name (what transformers writes to config.architectures),
         "model_type", "hidden_size", "num_hidden_layers", "vocab_size": from the (text) config, None without one,
         "targeted_modules": the number of module paths, "target_shapes_sha256": sha256 of the canonical JSON of
         {module path: shape of the base weight that module holds, or null when it has none or is missing},
         "hub_commit"}.
    """
    model = _plain(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    paths = sorted({_module_path(key) for key in state_keys})
    shapes = {path: _base_weight_shape(model, path) for path in paths}
    return {
        "architecture": _class_name(model),
        "model_type": getattr(config, "model_type", None) or None,
        "hidden_size": getattr(text_config, "hidden_size", None),
        "num_hidden_layers": getattr(text_config, "num_hidden_layers", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "targeted_modules": len(paths),
        "target_shapes_sha256": hashlib.sha256(canonical_json(shapes)).hexdigest(),
        "hub_commit": hub_commit or snapshot_commit(getattr(config, "_name_or_path", None)
                                                    or getattr(model, "name_or_path", None)),
    }


def base_differences(saved: dict, actual: dict) -> tuple[list[str], list[str]]:
    """(errors, warnings): one line per field of `saved` (the manifest's base) that `actual` contradicts. A field
    either side does not know (None, or absent from an older manifest) is not compared."""
    errors, warnings = [], []
    for fields, out in ((COMPARED_FIELDS, errors), (WARNED_FIELDS, warnings)):
        for field in fields:
            was, now = saved.get(field), actual.get(field)
            if was is not None and now is not None and was != now:
                detail = " (module path -> base weight shape of the targeted modules)" if field.endswith("sha256") else ""
                out.append(f"{field}{detail}: the adapter was saved for {was!r}, this model has {now!r}")
    return errors, warnings


def snapshot_commit(path) -> str | None:
    """The commit of a huggingface_hub cache snapshot folder (`.../models--ns--name/snapshots/<commit>`, what
    `snapshot_download` returns), or None for any other path."""
    if not path:
        return None
    parts = str(path).rstrip("/").replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--") and _is_commit(parts[-1]):
        return parts[-1]
    return None


def _is_commit(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def canonical_json(value) -> bytes:
    """The one JSON form digests are taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _plain(model: nn.Module) -> nn.Module:
    from adapterflow.model import AdapterModel  # the model module imports the save path, which imports this one

    return model.get_base_model() if isinstance(model, AdapterModel) else model


def _class_name(model: nn.Module) -> str:
    """The model's class name; for a model sharded by torch's fully_shard (class `FSDP<name>`), the original's."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def _module_path(key: str) -> str:
    path = formats.module_of_key(key)
    return path[len(formats.PEFT_KEY_PREFIX):] if path.startswith(formats.PEFT_KEY_PREFIX) else path


def _base_weight_shape(model: nn.Module, path: str) -> list[int] | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, LoraLayer):
        module = module.base_layer
    elif isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    weight = getattr(module, "weight", None)
    return list(weight.shape) if isinstance(weight, torch.Tensor) else None
