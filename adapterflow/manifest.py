"""The integrity manifest `adapterflow.json` that every save writes into each adapter folder it writes.

Schema (format_version 1; JSON, indent 2, sorted keys):

    {
      "format_version": 1,
      "created_by": "adapterflow 0.1.0",
      "files": {                                   every file the save wrote into this folder, or carried over
        "adapter_model.safetensors": {"sha256": "<64 hex>", "size": <bytes>},
        "adapter_config.json":       {"sha256": ..., "size": ...},
        "README.md":                 {"sha256": ..., "size": ...}        (root folder only: the shared card)
      },
      "adapter_config_sha256": "<64 hex>",         sha256 of the config's canonical JSON (sorted keys, no
                                                   spaces, UTF-8): equal for equal settings however formatted
      "base": {                                    adapterflow.base_fingerprint.base_fingerprint; null when
        "architecture": "LlamaForCausalLM",        the saver had no base model
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
        "targeted_modules": 224, "target_shapes_sha256": "<64 hex>", "hub_commit": "<40 hex>" or null
      }
    }

Every digest is taken from the bytes as they are written (adapterflow.digest), inside the same atomic save
(adapterflow.atomic.staged_directory), so a folder never holds a manifest that describes other files. Loaders
other than adapterflow ignore the file: PEFT (`PeftModel.from_pretrained`), vLLM (`LoRAModel.from_local_checkpoint`)
and llama.cpp (`convert_lora_to_gguf.py`) open adapter_config.json and the weights file by name and list nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterflow import formats
from adapterflow.base_fingerprint import canonical_json
from adapterflow.digest import FileDigest, StreamDigest, bytes_digest
from adapterflow.serialization import AdapterLoadError

FORMAT_VERSION = 1
# The files a manifest must list when they are present in its folder (anything else there is the user's).
ADAPTER_FILES = (*formats.WEIGHTS_NAMES, formats.CONFIG_NAME, formats.MODEL_CARD_NAME)


class ManifestError(AdapterLoadError):
    """A folder whose files, or the base model it is loaded on, do not match its adapterflow.json; the message
    names the file or the base-model field that differs and the fix (a user error: never retried)."""


@dataclass
class FolderManifest:
    """The manifest of one folder while a save writes it: file digests (some still being hashed), config, base."""

    files: dict[str, FileDigest | StreamDigest] = field(default_factory=dict)
    adapter_config_sha256: str | None = None
    base: dict | None = None

    @classmethod
    def from_document(cls, document: dict) -> "FolderManifest":
        files = {name: FileDigest(entry["sha256"], entry["size"]) for name, entry in document["files"].items()}
        return cls(files, document.get("adapter_config_sha256"), document.get("base"))

    def write_file(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` (no fsync: the staged save makes it durable) and record its digest."""
        path.write_bytes(data)
        self.record(path.name, data)

    def record(self, name: str, data: bytes) -> None:
        self.files[name] = bytes_digest(data)
        if name == formats.CONFIG_NAME:
            self.adapter_config_sha256 = config_sha256(json.loads(data))

    def document(self) -> bytes:
        """The manifest's bytes; waits for digests still being computed."""
        from adapterflow import __version__  # the package imports this module before it defines its version

        files = {name: (d.result() if isinstance(d, StreamDigest) else d).as_json() for name, d in self.files.items()}
        return (json.dumps({"format_version": FORMAT_VERSION, "created_by": f"adapterflow {__version__}", "files": files,
                            "adapter_config_sha256": self.adapter_config_sha256, "base": self.base},
                           indent=2, sort_keys=True) + "\n").encode()

    def close(self) -> None:
        """Stop digests still running (after a failed write)."""
        for digest in self.files.values():
            if isinstance(digest, StreamDigest):
                digest.close()


def config_sha256(config: dict) -> str:
    """The manifest's adapter_config_sha256 of a parsed adapter_config.json."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none (e.g. PEFT wrote it).

    Raises:
        ManifestError: the file is not a manifest this version can read (not JSON, a newer format_version).
    """
    path = Path(folder) / formats.MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_bytes())
        version, files = document["format_version"], document["files"]
        valid = all(isinstance(e, dict) and {"sha256", "size"} <= set(e) for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        version, valid = None, False
    if not valid or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(
            f"{path} is not an adapterflow manifest this version reads (format_version {FORMAT_VERSION}); it is "
            f"corrupt or from a newer adapterflow. Upgrade adapterflow, save the adapter again, or load with "
            f"verify_manifest=False.")
    return document


def file_problem(folder: Path, name: str, manifest: dict, actual: FileDigest | None) -> str | None:
    """What is wrong with file `name` of `folder` against the manifest (actual None: the file is missing)."""
    entry = manifest["files"].get(name)
    if entry is None:
        return None if actual is None else f"{folder / name} is not listed in its {formats.MANIFEST_NAME}"
    if actual is None:
        return f"{folder / name} is missing (its {formats.MANIFEST_NAME} lists it)"
    if actual.size != entry["size"]:
        return f"{folder / name} has {actual.size} bytes, its {formats.MANIFEST_NAME} says {entry['size']}"
    if actual.sha256 != entry["sha256"]:
        return (f"{folder / name}: sha256 {actual.sha256[:16]}... differs from {entry['sha256'][:16]}... in its "
                f"{formats.MANIFEST_NAME}")
    return None


def file_digest(path: Path) -> FileDigest:
    """Digest of a file on disk (one sequential read; what a later load reads again comes from the page cache)."""
    with path.open("rb") as f:
        return FileDigest(hashlib.file_digest(f, "sha256").hexdigest(), os.fstat(f.fileno()).st_size)


def verify_manifest(folder: str | os.PathLike) -> list[str]:
    """Check every manifest in `folder` and its adapter subfolders against the files next to it.

    Args:
        folder: a save directory (the root and every subfolder holding an adapterflow.json are checked).

    Returns:
        One line per problem, each naming the file: changed (size or sha256), missing, or an adapter file
        (weights, adapter_config.json, README.md) present but not listed; [] when everything matches or the
        folder has no manifest at all (written by PEFT or an older adapterflow: nothing to check against).

    Raises:
        FileNotFoundError, NotADirectoryError: `folder` does not exist or is a file (nothing could be checked).
        ManifestError: a manifest file that cannot be read.
    """
    root = Path(folder)
    if not root.is_dir():
        error = NotADirectoryError if root.exists() else FileNotFoundError
        raise error(f"verify_manifest: {root} is {'a file' if root.exists() else 'missing'}; pass a saved adapter "
                    f"folder")
    problems = []
    for path in sorted(root.rglob(formats.MANIFEST_NAME)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # staging folders and the like
        here, manifest = path.parent, read_manifest(path.parent)
        names = sorted(set(manifest["files"]) | {n for n in ADAPTER_FILES if (here / n).is_file()})
        for name in names:
            actual = file_digest(here / name) if (here / name).is_file() else None
            if (problem := file_problem(here, name, manifest, actual)) is not None:
                problems.append(problem)
    return problems


def rewrite_file(folder: str | os.PathLike, name: str, data: bytes) -> None:
    """Replace file `name` of a saved folder with `data` and update the folder's manifest to match (e.g. the
    Hub card that push_to_hub puts in place of the saved one). Without a manifest only the file is written."""
    from adapterflow.atomic import write_file_atomic

    folder = Path(folder)
    document = read_manifest(folder)
    write_file_atomic(folder / name, data)
    if document is not None:
        manifest = FolderManifest.from_document(document)
        manifest.record(name, data)
        write_file_atomic(folder / formats.MANIFEST_NAME, manifest.document())
