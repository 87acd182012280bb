"""What a base-model reference names: a builtin model, a URL, a local folder or a Hugging Face Hub repo id.

The one classifier for that question; the flow parameters, the name rules, the base-model loader and the model
card all ask it. No huggingface_hub import: the Hub id rule is restated from
`huggingface_hub.utils.validate_repo_id` (2.4: REPO_ID_REGEX, no "--" or "..", not ending in ".git"), restricted
to the "namespace/name" form. A bare "name" is treated as a local folder: it is also a valid relative path, and
the Hub's unprefixed legacy ids (e.g. "gpt2") now live under a namespace ("openai-community/gpt2").
tests/test_model_references.py checks the rule against validate_repo_id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

BUILTIN_PREFIX = "builtin:"
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"  # 1-96 characters, word characters at both ends
HUB_ID_PATTERN = re.compile(rf"^{_PART}/{_PART}$")
_PATH_SPELLINGS = ("/", "~", "./", "../")

ReferenceKind = Literal["builtin", "url", "local", "hub"]


def reference_kind(value: str, base: Optional[Path] = None) -> ReferenceKind:
    """Classify a base-model (or dataset) reference.

    Args:
        value: what the user wrote, e.g. "builtin:tiny-llama", "/models/x", "./x", "org/name", "https://...".
        base: the folder relative references resolve against (default: the current directory).

    Returns:
        "builtin" for `builtin:<name>`; "url" for anything with "://"; "local" when spelt as a path (absolute,
        `~`, `./`, `../`, `.`, `..`), when it exists relative to `base`, or when it is no Hub id; "hub" for a
        "namespace/name" Hub repo id that is not a local path.
    """
    if value.startswith(BUILTIN_PREFIX):
        return "builtin"
    if "://" in value:
        return "url"
    if value.startswith(_PATH_SPELLINGS) or value in (".", "..") or _exists((base or Path.cwd()) / value):
        return "local"
    return "hub" if is_hub_id_syntax(value) else "local"


def is_hub_model_id(value: str, base: Optional[Path] = None) -> bool:
    """True when `value` names a Hub model repo ("namespace/name") rather than a local folder, builtin or URL."""
    return reference_kind(value, base) == "hub"


# Dataset file suffixes (adapterflow.runtime.data_sources reads them): a dataset.path ending in one is a file.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")


def is_hub_dataset_id(value: str, base: Optional[Path] = None) -> bool:
    """True when a `dataset.path` value names a Hub dataset repo ("namespace/name"): a Hub id by `reference_kind`
    that does not end in a dataset file suffix (so a missing `data/train.jsonl` is a missing file, not a repo)."""
    return reference_kind(value, base) == "hub" and not value.lower().endswith(DATA_SUFFIXES)


def is_local_reference(value: str, base: Path) -> bool:
    """True when `value` is spelt as a local path (absolute, `~`, `./`, `../`, `.`, `..`) or exists relative to
    `base`: the references the parameter loader makes absolute. A name that is neither that nor a Hub id is
    still "local" for reference_kind (a folder that is missing), but it is left as written."""
    if reference_kind(value, base) != "local":
        return False
    return value.startswith(_PATH_SPELLINGS) or value in (".", "..") or _exists(base / value)


def is_hub_id_syntax(value: str) -> bool:
    """The Hub's repo id rule for "namespace/name" (validate_repo_id), ignoring what exists on disk."""
    return bool(HUB_ID_PATTERN.match(value)) and "--" not in value and ".." not in value and (
        not value.endswith(".git"))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long for the file system is no folder
        return False
