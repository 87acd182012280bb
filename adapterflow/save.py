"""save_pretrained, as the composition of three steps that the pipeline also runs one at a time:

1. extract each selected adapter's state dict (`state_dict.get_adapter_state_dict`),
2. optionally convert a PiSSA adapter to LoRA against its initial adapter (`pissa.convert_pissa_to_lora`),
3. write all files into the save directory in one atomic step (`write_adapters`).

Every check runs before the first byte is written, so a refused save leaves the disk untouched. A conversion
reads the initial adapter and never writes to it: PEFT rewrites its adapter_config.json (init_lora_weights true)
only because PEFT loads the initial adapter into the live, residual model; reading its tensors needs no rewrite,
and the folder stays a valid PiSSA initial adapter (AdapterModel.from_initial_adapter, PEFT on the original base).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from adapterflow import formats
from adapterflow.atomic import staged_directory
from adapterflow.base_fingerprint import base_fingerprint
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_randomized_pissa
from adapterflow.layers import LoraLinear
from adapterflow.manifest import FolderManifest, ManifestError, read_manifest
from adapterflow.model_card import ModelCardInfo, render_model_card
from adapterflow.conversion import convert_pissa_to_lora
from adapterflow.serialization import payload_bytes, read_weights, write_weights
from adapterflow.state_dict import (SaveEmbeddingLayers, adapter_checksums, adapter_layers, check_saveable,
                                   get_adapter_state_dict)

Adapter = tuple[dict[str, torch.Tensor], LoraConfig]


def write_adapters(
    save_directory: str | os.PathLike, adapters: Mapping[str, Adapter], safe_serialization: bool = True,
    card: ModelCardInfo | None = None, base_model: torch.nn.Module | None = None, base_hub_commit: str | None = None,
) -> list[Path]:
    """Write adapters (name -> (state dict, config)), the model card and the manifests into `save_directory`,
    atomically. `card`: publishing inputs for the model card (adapterflow.model_card); None writes PEFT's card.

    "default" goes to the root, any other adapter to `<save_directory>/<name>/`. Files of the directory that
    are not rewritten stay, except a weights file of the other format in a rewritten adapter folder, which would
    shadow the new one (loaders read safetensors first). Each adapter folder gets an adapterflow.json
    (adapterflow.manifest) with the digests of its files, hashed as they are written, and the fingerprint of
    `base_model`; the root's also lists README.md (and, when only other adapters are saved over an old default
    adapter with a manifest, keeps that adapter's entries).

    Args:
        base_model: the model the adapters belong to (plain, an AdapterModel, or built on the meta device from
            the base's config.json); None leaves the manifests' `base` null. base_hub_commit: the Hub commit the
            base was downloaded at (adapterflow.base_fingerprint.base_fingerprint).

    Returns:
        The paths of the written files, inside `save_directory` (the manifests last).

    Raises:
        ValueError: an invalid adapter name, or save_directory is a file.
        adapterflow.state_dict.AdapterSaveError: a tensor is a distributed shard (DTensor), empty, or not of the
            shape r implies (`check_saveable`); nothing is written.
        OSError: a write failed; the message names save_directory and, for a full disk, the bytes needed.
    """
    for name, (state, config) in adapters.items():
        check_saveable(state, config)
    return _write_checked(save_directory, adapters, safe_serialization, card, base_model, base_hub_commit)


def _write_checked(save_directory, adapters: Mapping[str, Adapter], safe_serialization: bool,
                   card: ModelCardInfo | None, base_model, base_hub_commit: str | None) -> list[Path]:
    """write_adapters after its tensors passed check_saveable (save_adapter_model checks them before converting)."""
    for name in adapters:
        formats.check_adapter_name(name)
    root = Path(save_directory)
    weights = formats.weights_name(safe_serialization)
    stale = {formats.adapter_dir(Path(), name) / formats.weights_name(not safe_serialization) for name in adapters}
    card_path = root / formats.MODEL_CARD_NAME
    existing_card = card_path.read_text() if card_path.is_file() else None
    manifests = {name: FolderManifest(base=None if base_model is None else
                                      base_fingerprint(base_model, state, base_hub_commit))
                 for name, (state, _) in adapters.items()}
    if formats.DEFAULT_ADAPTER_NAME not in adapters and (old := _root_manifest(root)) is not None:
        manifests[formats.DEFAULT_ADAPTER_NAME] = old  # the old default adapter stays: its entries too
    size = sum(payload_bytes(state) for state, _ in adapters.values())
    try:
        with staged_directory(root, keep=lambda rel: rel not in stale, size_hint=size) as staging:
            for name, (state, config) in adapters.items():
                folder = formats.adapter_dir(staging, name)
                folder.mkdir(parents=True, exist_ok=True)
                manifests[name].files[weights] = write_weights(folder / weights, state)
                manifests[name].write_file(folder / formats.CONFIG_NAME, config.for_saving().to_json_string().encode())
            configs = {name: config for name, (_, config) in adapters.items()}
            card_bytes = render_model_card(configs, existing_card, card).encode()
            root_manifest = manifests.get(formats.DEFAULT_ADAPTER_NAME)
            (staging / formats.MODEL_CARD_NAME).write_bytes(card_bytes)
            if root_manifest is not None:
                root_manifest.record(formats.MODEL_CARD_NAME, card_bytes)
            for name, manifest in manifests.items():
                (formats.adapter_dir(staging, name) / formats.MANIFEST_NAME).write_bytes(manifest.document())
    finally:
        for manifest in manifests.values():
            manifest.close()
    written = [formats.adapter_dir(root, name) / n for name in adapters for n in (weights, formats.CONFIG_NAME)]
    return written + [card_path] + [formats.adapter_dir(root, name) / formats.MANIFEST_NAME for name in manifests]


def _root_manifest(root: Path) -> FolderManifest | None:
    """The manifest of the default adapter already at the root of a save directory, if it has one."""
    try:
        document = read_manifest(root) if root.is_dir() else None
    except ManifestError:
        return None  # unreadable: the new save does not vouch for files it did not write
    return None if document is None else FolderManifest.from_document(document)


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """(state dict, config) of a saved adapter folder."""
    return read_weights(folder), LoraConfig.from_pretrained(folder)


def read_initial_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter saved right after PiSSA initialisation, with a clear error when it is not there."""
    folder = Path(os.path.normpath(path))  # a trailing "/" is fine
    if not (folder / formats.CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"No initial adapter at {folder} (no {formats.CONFIG_NAME}). PiSSA->LoRA conversion needs the adapter "
            f"saved right after initialisation, before training: call model.save_pretrained({str(folder)!r}) "
            f"before the first optimizer step and pass that folder."
        )
    return read_adapter(folder)


def save_adapter_model(
    model,
    save_directory: str | os.PathLike,
    safe_serialization: bool = True,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: SaveEmbeddingLayers = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    base_hub_commit: str | None = None,
) -> list[Path]:
    """`AdapterModel.save_pretrained` (see there); returns the written files ([] when not the main process)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = _selected(model.peft_config, selected_adapters)
    if path_initial_model_for_weight_conversion is not None and len(names) != 1:
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts one adapter, but {names} are selected; pass "
            f"selected_adapters=[<the PiSSA adapter>]."
        )
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        initial = read_initial_adapter(path_initial_model_for_weight_conversion)
    adapters = {}
    for name in names:
        config = model.peft_config[name]
        state = get_adapter_state_dict(model, config, name, save_embedding_layers)
        # e.g. an FSDP model's shards: gather first. Not paired with `model` (check_saveable's model=): these
        # are the model's own tensors, so their shapes are its shapes by construction.
        check_saveable(state, config)
        if initial is not None:
            state, config = convert_pissa_to_lora(state, config, *initial, base_weights=_base_weights(model, name))
        elif is_randomized_pissa(config.init_lora_weights) and not _initial_state(model, name):
            warn_randomized_pissa(config.init_lora_weights)
        adapters[name] = (state, config)
    if not is_main_process:
        return []
    return _write_checked(save_directory, adapters, safe_serialization, None, model, base_hub_commit)


def _initial_state(model, adapter_name: str) -> bool:
    """Whether the adapter still holds the values its PiSSA initialisation gave it (the initial adapter being
    saved before training, which is what a later conversion needs: no warning then)."""
    recorded = getattr(model, "initial_checksums", {}).get(adapter_name)
    return recorded is not None and recorded == adapter_checksums(model, adapter_name)


def _base_weights(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """{module path: (out, in) base weight} of the linear layers that hold `adapter_name` (views, no copies)."""
    return {
        path: layer.base_weight_matrix()
        for path, layer in adapter_layers(model)
        if isinstance(layer, LoraLinear) and adapter_name in layer.adapter_names
    }


def resolve_conversion_path(convert_pissa_to_lora, path_initial_model_for_weight_conversion):
    """The initial-adapter folder, from the current argument or its deprecated alias (with a FutureWarning)."""
    if convert_pissa_to_lora is None:
        return path_initial_model_for_weight_conversion
    warnings.warn(
        "`convert_pissa_to_lora` is deprecated; use `path_initial_model_for_weight_conversion` (same meaning).",
        FutureWarning,
        stacklevel=3,
    )
    if path_initial_model_for_weight_conversion is not None and os.path.normpath(
        convert_pissa_to_lora
    ) != os.path.normpath(path_initial_model_for_weight_conversion):
        raise ValueError(
            "convert_pissa_to_lora and path_initial_model_for_weight_conversion name different folders; pass only "
            "path_initial_model_for_weight_conversion."
        )
    return convert_pissa_to_lora


def warn_randomized_pissa(init_lora_weights: str) -> None:
    warnings.warn(
        f"Saving a PiSSA adapter initialised with {init_lora_weights!r} without conversion: loading it runs the "
        f"randomized SVD again on the original base model and gets a different residual, so the reloaded model "
        f"differs from the trained one. Save the adapter right after initialisation and pass that folder as "
        f"path_initial_model_for_weight_conversion to get a plain LoRA adapter that reloads exactly.",
        stacklevel=3,
    )


def _selected(peft_config: Mapping[str, LoraConfig], selected_adapters: Sequence[str] | None) -> list[str]:
    if selected_adapters is None:
        return list(peft_config)
    if isinstance(selected_adapters, str):
        raise TypeError(f"selected_adapters must be a list of names, got the string {selected_adapters!r}.")
    unknown = [name for name in selected_adapters if name not in peft_config]
    if unknown or not selected_adapters:
        raise ValueError(
            f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
            f"{list(peft_config)} - got {list(selected_adapters)}."
        )
    return list(dict.fromkeys(selected_adapters))
