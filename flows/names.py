"""Names that leave the pipeline, checked against the receiving system's rules before any work starts.

MLflow (experiment, registered model, LoggedModel, alias, run name), the Hugging Face Hub (repo id, branch, tag)
and the file system (run folder, output folder, adapter folder) each refuse some names, and they used to do so
only at the end of a run. The `*_problem` functions return one line naming the parameter, the value, the rule
(with the library function it comes from) and the fix, or None; `check_names` applies the rules that need more
than one value. `flows/parameters.py` calls them from its validators, so `adapterflow run` and a deployment run
(validated again at flow start) refuse a bad name before training.

The rules are restated here rather than imported: `import mlflow` takes seconds, and MLflow's validators are
private; tests/test_names.py checks that these rules agree with MLflow's own validators.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

BUILTIN_PREFIX = "builtin:"
# mlflow.utils.validation._validate_logged_model_name: LoggedModel names may not contain these characters.
LOGGED_MODEL_BAD_CHARS = ("/", ":", ".", "%", '"', "'")
LOGGED_MODEL_RULE = "MLflow LoggedModel names may not contain / : . % \" ' (mlflow _validate_logged_model_name)"
MLFLOW_NAME_MAX = 256  # registered_models.name and experiments.name are String(256) in MLflow's SQL schema
MLFLOW_RUN_NAME_MAX = 250  # runs.name is String(250)
ALIAS_MAX = 255  # mlflow.utils.validation.MAX_REGISTERED_MODEL_ALIAS_LENGTH
DERIVED_NAME_MAX = 120  # derived registered model names are cut to this (plus a hash) to stay readable
HASH_CHARS = 8
# adapterflow.atomic writes through ".<name>.staging-<pid>-<random>" folders and ".<name>.<random>.tmp" files
# next to the target: a name needs this much room below the file system's NAME_MAX.
STAGING_ROOM = 40
RUN_DIR_DEPTH = 160  # bytes below a run folder for its deepest file (checkpoints/<staging>/<adapter>/<file>)
OUTPUT_DIR_DEPTH = 120  # bytes below an output folder for its deepest file (<staging>/<adapter>/<temp file>)
NEW_VERSION_SUFFIX = "-v9999"  # save.if_exists=new_version appends -v2, -v3, ...
FLOW_RUN_ID_LENGTH = 36  # the default run_name: a Prefect flow run id (a UUID)


class Problem(str):
    """One problem line, `<param>=<value>: <rule>; <fix>.`; `.detail` is the part after the value (for messages
    whose frame already names the parameter and value, such as a pydantic field error)."""

    detail: str


def _line(param: str, value: object, rule: str, fix: str) -> Problem:
    problem = Problem(f"{param}={_short(value)!r}: {rule}; {fix}.")
    problem.detail = f"{rule}; {fix}."
    return problem


def _short(value: object, keep: int = 60) -> object:
    text = str(value)
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def _mlflow_safe(text: str) -> str:
    """`text` with what LoggedModel names refuse replaced: "/" -> "--", "." -> "_", others -> "-"."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text.replace("/", "--").replace(".", "_"))


def registered_model_name_problem(value: Optional[str], param: str = "mlflow.registered_model_name") -> Optional[str]:
    """The registered model name names the run's LoggedModel too, so it must pass both MLflow rules:
    `_validate_model_name` (not empty, no / or :) and `_validate_logged_model_name` (no / : . % " '), and fit
    MLflow's SQL column (256 characters)."""
    if value is None:
        return None
    if not value.strip():
        return _line(param, value, "MLflow model names must not be empty or blank", "give a name or leave it unset")
    if any(c in value for c in LOGGED_MODEL_BAD_CHARS):
        suggestion = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-") or "adapter"
        return _line(param, value, f"{LOGGED_MODEL_RULE}, and the run's LoggedModel takes this name",
                     f"use e.g. {suggestion!r}, or leave it unset for the derived default")
    if len(value) > MLFLOW_NAME_MAX:
        return _line(param, value, f"MLflow stores model names in {MLFLOW_NAME_MAX} characters, this one "
                     f"has {len(value)}", "use a shorter name")
    return None


def experiment_problem(value: str, param: str = "mlflow.experiment") -> Optional[str]:
    """mlflow.utils.validation._validate_experiment_name: not empty, at most 500 characters; MLflow's SQL schema
    stores 256 (experiments.name String(256)), so that is the limit here. Blank names are refused as well."""
    if not value.strip():
        return _line(param, value, "MLflow experiment names must not be empty or blank",
                     "give a name, e.g. 'adapterflow'")
    if len(value) > MLFLOW_NAME_MAX:
        return _line(param, value, f"MLflow stores experiment names in {MLFLOW_NAME_MAX} characters, "
                     f"this one has {len(value)}", "use a shorter name")
    return None


def alias_problem(value: Optional[str], param: str = "mlflow.alias") -> Optional[str]:
    """mlflow.utils.validation._validate_model_alias_name and _validate_model_alias_name_reserved: letters,
    digits, _ and - (regex ^[\\w\\-]*$), not empty, at most 255 characters, not "latest" (any case) and not a
    version alias like "v3"."""
    if value is None:
        return None
    if not value or not re.fullmatch(r"[\w\-]+", value):
        rule = "MLflow alias names may only contain letters, digits, underscores (_) and dashes (-), and not be empty"
        suggestion = re.sub(r"[^\w-]", "-", value) or "candidate"
        return _line(param, value, rule, f"use e.g. {suggestion!r}")
    if len(value) > ALIAS_MAX:
        return _line(param, value, f"MLflow aliases have at most {ALIAS_MAX} characters", "use a shorter one")
    if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        return _line(param, value, "MLflow reserves the alias 'latest' and version aliases v<N>",
                     "use another alias, e.g. 'candidate' or 'champion'")
    return None


def hub_repo_id_problem(value: Optional[str], param: str = "hub.repo_id") -> Optional[str]:
    """huggingface_hub.utils.validate_repo_id: "name" or "namespace/name", 1-96 characters of letters, digits,
    - _ and ., not starting or ending with - or ., no "--" or "..", not ending in ".git"."""
    if value is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return _line(param, value, f"huggingface_hub validate_repo_id refuses it: {str(exc).rstrip('.')}",
                     "use 'namespace/name', e.g. 'my-user/tiny-llama-lora'")
    return None


def git_ref_problem(value: Optional[str], param: str) -> Optional[str]:
    """A Hub branch (hub.revision) or tag (hub.tag) name, by `git check-ref-format` (huggingface_hub has no
    validator for them; the Hub refuses what git refuses): no space, ~ ^ : ? * [ \\ or control characters, no
    "..", "@{" or "//", not "@", no part starting with "." or ending with ".lock", not starting or ending with
    "/" or ending with "."; and, for adapterflow, not a full ref ("refs/...") or a 40-digit commit id."""
    if value is None:
        return None
    rule = ("Hub branch and tag names follow git check-ref-format: no spaces or ~ ^ : ? * [ \\, no '..', '@{' or "
            "'//', no part starting with '.' or ending with '.lock', not starting/ending with '/', not ending with '.'")
    bad = (not value or value == "@" or re.search(r"[\x00-\x20\x7f~^:?*\[\\]", value) or ".." in value
           or "@{" in value or "//" in value or value.startswith("/") or value.endswith(("/", "."))
           or any(part.startswith(".") or part.endswith(".lock") for part in value.split("/")))
    if bad:
        suggestion = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-") or "v1"
        return _line(param, value, rule, f"use e.g. {suggestion!r}")
    if value.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", value):
        return _line(param, value, "give a plain branch or tag name, not a full ref or a commit id",
                     f"use e.g. {value.rsplit('/', 1)[-1][:12]!r}")
    return None


def name_length_problem(value: Optional[str], param: str, limit: Optional[int] = None) -> Optional[str]:
    """A name that becomes a folder: at most NAME_MAX bytes of the file system (os.pathconf PC_NAME_MAX, 255 on
    Linux) minus STAGING_ROOM for adapterflow.atomic's staging names, and at most `limit` characters."""
    if value is None:
        return None
    name_max = _pathconf(Path.cwd(), "PC_NAME_MAX", 255) - STAGING_ROOM
    size = len(os.fsencode(value))
    if size > name_max:
        return _line(param, value, f"folder names may have at most {name_max} bytes here (the file "
                     f"system's NAME_MAX minus {STAGING_ROOM} for staging names), this one has {size}",
                     "use a shorter name")
    if limit is not None and len(value) > limit:
        return _line(param, value, f"at most {limit} characters (MLflow stores run names in "
                     f"{limit}), this one has {len(value)}", "use a shorter name")
    return None


def path_problem(path: Path, param: str, depth: int) -> Optional[str]:
    """A folder the run writes into: each part at most NAME_MAX bytes (minus STAGING_ROOM), and the path plus
    `depth` bytes for the deepest file inside at most PATH_MAX (os.pathconf PC_PATH_MAX, 4096 on Linux)."""
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    name_max = _pathconf(existing, "PC_NAME_MAX", 255) - STAGING_ROOM
    long_part = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long_part is not None:
        return _line(param, str(path), f"the folder name {long_part[:30]!r}... has "
                     f"{len(os.fsencode(long_part))} bytes; at most {name_max} fit here (NAME_MAX minus {STAGING_ROOM} "
                     f"for staging names)", "use shorter folder names")
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(str(path))) + depth
    if size >= path_max:
        return _line(param, str(path), f"the path is {size - depth} bytes, and with {depth} bytes for the "
                     f"files inside it exceeds the file system's PATH_MAX of {path_max}", "use a shorter path")
    return None


def default_registered_model_name(adapter_name: str, base_model: str, cwd: Optional[Path] = None) -> str:
    """The registered model name used when mlflow.registered_model_name is unset: `<adapter>-<base>`, valid as
    an MLflow registered model name and LoggedModel name, the same for the same base model in every run.

    <base> is the base model reference made MLflow-safe: `builtin:NAME` -> NAME; a Hub id keeps its namespace
    with "/" -> "--" (Hub ids never contain "--") and "." -> "_"; a local folder -> its folder name; a URL -> its
    last path part. Whenever that lost information (a "." replaced, a local folder's parent path, a URL, a Hub id
    that equals a builtin name, a cut to DERIVED_NAME_MAX characters), "-" and the first 8 hex digits of the
    sha256 of "<adapter>\\n<base reference>" follow, so two base models never share a name. Examples:
    builtin:tiny-llama -> default-tiny-llama; openai-community/gpt2 -> default-openai-community--gpt2;
    Qwen/Qwen2.5-0.5B -> default-Qwen--Qwen2_5-0_5B-<hash>; /models/Qwen2.5-0.5B-Instruct ->
    default-Qwen2_5-0_5B-Instruct-<hash of the absolute path>.
    """
    from adapterflow.flows.parameters import local_path

    reference, lossy = base_model, False
    if base_model.startswith(BUILTIN_PREFIX):
        readable = base_model[len(BUILTIN_PREFIX):]
    elif "://" in base_model:
        parts = urlsplit(base_model)
        readable, lossy = Path(parts.path).name or (parts.hostname or "model"), True
    elif _is_local(base_model, cwd or Path.cwd()):
        reference = str(local_path(base_model) if cwd is None else (cwd / Path(base_model).expanduser()).absolute())
        readable, lossy = Path(reference).name or "model", True
    else:
        readable = base_model
        lossy = "--" in base_model or base_model in _builtin_names()
    safe = _mlflow_safe(readable)
    lossy = lossy or safe != readable.replace("/", "--") or not safe
    name = f"{adapter_name}-{safe}" if safe else adapter_name
    if len(name) > DERIVED_NAME_MAX:
        name, lossy = name[:DERIVED_NAME_MAX].rstrip("-_"), True
    if not lossy:
        return name
    digest = hashlib.sha256(f"{adapter_name}\n{reference}".encode()).hexdigest()[:HASH_CHARS]
    return f"{name}-{digest}"


def mlflow_run_name(label: str, essentials: str) -> str:
    """The MLflow run's name: `label` (the Prefect flow run's name, or run_name) and `essentials` (e.g.
    "pissa r8"), the label cut so the whole fits MLflow's MLFLOW_RUN_NAME_MAX characters. MLflow allows any
    characters in run names."""
    room = MLFLOW_RUN_NAME_MAX - len(essentials) - 1
    return f"{label[:room]} {essentials}".strip()


def logged_model_name(registered_name: str, label: Optional[str], flow_run_id: str) -> str:
    """The run's LoggedModel name, distinct per flow run: `<registered name>-<label>-<first 8 characters of the
    flow run id>`, e.g. default-tiny-llama-rational-inchworm-3f2a9c1d. The label (the Prefect flow run's name) is
    made MLflow-safe ("." -> "_", other refused characters -> "-") and cut to DERIVED_NAME_MAX characters, the
    registered name cut to what is left; the result passes
    `registered_model_name_problem` (MLflow's LoggedModel rule, MLFLOW_NAME_MAX characters)."""
    label = _mlflow_safe(label or "")[:DERIVED_NAME_MAX].strip("-")
    suffix = "-".join(part for part in (label, _mlflow_safe(flow_run_id[:HASH_CHARS])) if part)
    return f"{registered_name[:MLFLOW_NAME_MAX - len(suffix) - 1]}-{suffix}"


def check_names(params) -> list[str]:
    """The name rules that need more than one parameter value (one problem line each; empty when all is well):
    the registered model name (explicit or derived from the base model), the run folder (runs_root/run_name, or
    the 36-character flow run id) and the output folder (save.output_dir, or <run folder>/adapter, with room for
    -vN and the adapter subfolder) against the file system's NAME_MAX and PATH_MAX.

    Args:
        params: a SaveAdapterParameters (relative paths resolve against the current directory).
    """
    from adapterflow.flows.parameters import local_path

    problems = []
    name = params.mlflow.registered_model_name or default_registered_model_name(
        params.adapter.name, params.base_model.name_or_path)
    if problem := registered_model_name_problem(name, "mlflow.registered_model_name (derived)"
                                                if not params.mlflow.registered_model_name else
                                                "mlflow.registered_model_name"):
        problems.append(problem)
    run_dir = local_path(params.runs_root) / (params.run_name or "x" * FLOW_RUN_ID_LENGTH)
    adapter_room = len(os.fsencode(params.adapter.name)) + 1
    param = "run_name" if params.run_name else "runs_root"
    if problem := path_problem(run_dir, param, RUN_DIR_DEPTH + adapter_room):
        problems.append(problem)
    output = local_path(params.save.output_dir) if params.save.output_dir else run_dir / "adapter"
    if params.save.if_exists == "new_version":
        output = output.with_name(output.name + NEW_VERSION_SUFFIX)
    if problem := path_problem(output, "save.output_dir", OUTPUT_DIR_DEPTH + adapter_room):
        problems.append(problem)
    return problems


def _builtin_names() -> set[str]:
    """The builtin base model names (adapterflow/runtime/builtin/<name>.json; adapterflow.runtime.base_models
    itself sits behind a transformers import)."""
    from adapterflow.runtime.data import BUILTIN_DIR

    return {p.stem for p in BUILTIN_DIR.glob("*.json")}


def _is_local(reference: str, cwd: Path) -> bool:
    from adapterflow.model_references import is_local_reference

    return is_local_reference(reference, cwd)  # a name too long for the file system is no folder


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. ENAMETOOLONG
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
