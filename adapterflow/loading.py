"""Reading a saved adapter for AdapterModel.from_pretrained / load_adapter, checked against its manifest.

With an adapterflow.json in the folder (adapterflow.manifest), the two files the loader reads are checked against
it before any tensor reaches the model: adapter_config.json from the very bytes that are then parsed, the weights
file by one sequential read right before safetensors maps it (the mapping then reads from the page cache). The
README.md is not read by a load and does not change the loaded model; `verify_manifest` checks it too (the Hub
push does). Then the base model's fingerprint (adapterflow.base_fingerprint) is compared with the manifest's.
A folder without a manifest (written by PEFT, or by adapterflow before it wrote one) loads as before.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from adapterflow import formats
from adapterflow.base_fingerprint import base_differences, base_fingerprint
from adapterflow.config import LoraConfig
from adapterflow.manifest import ManifestError, config_sha256, file_digest, file_problem, read_manifest
from adapterflow.serialization import find_weights_file, read_weights
from adapterflow.digest import bytes_digest

_SKIP = "pass verify_manifest=False to load it anyway"


def read_verified_adapter(folder: Path, model: nn.Module, verify_manifest: bool = True
                          ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(state dict, config) of the adapter folder, checked against its manifest when it has one.

    Args:
        folder: the adapter folder. model: the base model it is about to be loaded on (plain or an AdapterModel).
        verify_manifest: False reads the folder as if it had no manifest.

    Raises:
        ManifestError: a file differs from the manifest (changed, missing, or a weights file it does not list),
            or the base model differs in a compared field (architecture, model_type, hidden_size,
            num_hidden_layers, vocab_size, target module shapes); the message names it and the fix. A different
            Hub commit of the base only warns (a commit also changes when only the base's README does).
        Everything `read_adapter` raises.
    """
    manifest = read_manifest(folder) if verify_manifest else None
    if manifest is None:
        return read_weights(folder), LoraConfig.from_pretrained(folder)
    config_path, weights = folder / formats.CONFIG_NAME, find_weights_file(folder)
    if not config_path.is_file():
        LoraConfig.from_pretrained(folder)  # raises its FileNotFoundError
    config_bytes = config_path.read_bytes()
    data = _json_or_none(config_bytes)
    # The same settings written differently (re-indented, keys reordered) are the same adapter: a load compares
    # them by their canonical digest; verify_manifest (the Hub push) still wants the very bytes.
    settings_sha256 = None if data is None else config_sha256(data)
    same_settings = settings_sha256 is not None and manifest.get("adapter_config_sha256") == settings_sha256
    problems = [None if same_settings else file_problem(folder, formats.CONFIG_NAME, manifest,
                                                        bytes_digest(config_bytes)),
                file_problem(folder, weights.name, manifest, file_digest(weights))]
    problems += [file_problem(folder, name, manifest, None) for name in formats.WEIGHTS_NAMES
                 if name != weights.name and name in manifest["files"]]
    if problems := [p for p in problems if p is not None]:
        raise ManifestError(
            "The adapter's files changed after it was saved (a corrupt copy, a partial download, an edit, or another "
            f"tool, e.g. PEFT's save_pretrained, wrote into the folder and left its {formats.MANIFEST_NAME} as it "
            "was):\n" + "\n".join(f"  - {p}" for p in problems)
            + f"\nSave or download the adapter again; if the folder was rewritten on purpose, delete "
              f"{folder / formats.MANIFEST_NAME}; or {_SKIP}.")
    if manifest.get("adapter_config_sha256") not in (None, settings_sha256):
        raise ManifestError(f"{config_path} does not have the settings its {formats.MANIFEST_NAME} records "
                            f"(adapter_config_sha256); save the adapter again, or {_SKIP}.")
    state, config = read_weights(folder), LoraConfig.from_dict(data)
    _check_base(folder, manifest.get("base"), model, state)
    return state, config


def _json_or_none(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:  # not JSON or not UTF-8: the digest comparison names the file
        return None
    return value if isinstance(value, dict) else None


def _check_base(folder: Path, saved: dict | None, model: nn.Module, state: dict) -> None:
    if not saved:
        return
    errors, notes = base_differences(saved, base_fingerprint(model, state))
    if errors:
        raise ManifestError(
            f"The adapter at {folder} was saved for another base model than this one ({formats.MANIFEST_NAME}):\n"
            + "\n".join(f"  - {e}" for e in errors)
            + f"\nLoad it on the base model it was trained on, or {_SKIP}.")
    for note in notes:
        warnings.warn(f"{folder}: {note}; the base model may have changed since the adapter was trained.",
                      stacklevel=4)


def adapter_folder(model_id_or_path: str | os.PathLike, subfolder: str | None) -> Path:
    folder = Path(model_id_or_path) / (subfolder or "")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No adapter folder at {folder}. adapterflow loads local folders only; for a Hub repo, download it "
            f"first (huggingface_hub.snapshot_download(repo_id)) and pass the returned path."
        )
    return folder
