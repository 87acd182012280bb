"""Where the flow's parameters come from: the embedded defaults, then a YAML `--config` file, then each `--set`.

Relative paths resolve against the file's folder for values in a config file and against the current directory
for `--set` values (`resolve_paths`). Every mistake is a `ParameterError` whose lines name the parameter, where it
was given (`--set adapter.r=0`, `run.yaml, line 3`) and what to do.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from adapterflow.flows.parameters import (BUILTIN_PREFIX, ParameterError, SaveAdapterParameters, is_local_reference,
                                          local_path)
from adapterflow.model_references import is_hub_dataset_id
from adapterflow.redaction import redact_text
from adapterflow.runtime.chat import is_template_text

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_parameters(config_file: str | None, overrides: list[str]) -> SaveAdapterParameters:
    """Defaults < YAML file < `--set key.sub=value` overrides, validated by the flow's pydantic model.

    Raises:
        ParameterError: the config file is missing, not UTF-8, not YAML or not a mapping (file and line named), an
            override is malformed, or a value breaks the model (every problem listed, with its source).
    """
    from pydantic import ValidationError

    data, lines = ({}, {}) if config_file is None else read_config_file(config_file)
    given = resolve_paths(apply_overrides({}, overrides), Path.cwd())
    sources = {key: f"{config_file}, line {line}" for key, line in lines.items()}
    sources.update({item.split("=", 1)[0]: f"--set {item}" for item in overrides})
    try:
        return SaveAdapterParameters.model_validate(merge(data, given))
    except ValidationError as exc:
        raise ParameterError(redact_text("Invalid parameters:\n" + "\n".join(  # pydantic quotes the inputs
            f"  - {line}" for line in describe_validation_errors(exc, sources)))) from None


def read_config_file(config_file: str) -> tuple[dict, dict[str, int]]:
    """A YAML config file's parameters (relative paths made absolute against the file's folder) and the line of
    each dotted key (`{"adapter.r": 3}`), for messages.

    Raises:
        ParameterError: the file is missing, unreadable, not UTF-8, not YAML, or not a mapping of sections.
    """
    import yaml

    path = Path(config_file).expanduser()
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ParameterError(f"--config {config_file}: no such file ({path.absolute()}); "
                             f"check the path (relative paths start in the current directory).") from None
    except IsADirectoryError:
        raise ParameterError(f"--config {config_file}: is a folder; pass a YAML file.") from None
    except UnicodeDecodeError as exc:
        line = text_line(exc.object, exc.start)
        raise ParameterError(f"--config {config_file}, line {line}: not UTF-8 text; save the file as UTF-8.") from None
    except OSError as exc:
        raise ParameterError(f"--config {config_file}: cannot be read ({exc.strerror}).") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParameterError(f"--config {config_file}{where}: not valid YAML ({problem}).") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ParameterError(f"--config {config_file}: expected a mapping of parameter sections (base_model:, "
                             f"dataset:, adapter:, training:, ...), got a YAML {type(data).__name__}.")
    return resolve_paths(data, path.absolute().parent), _key_lines(node)


def text_line(raw: bytes, offset: int) -> int:
    """The 1-based line number of byte `offset` in `raw`."""
    return raw.count(b"\n", 0, offset) + 1


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    import yaml

    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{prefix}{key.value}"
            lines[dotted] = key.start_mark.line + 1
            lines.update(_key_lines(value, dotted + "."))
    return lines


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML: `5`, `true`, `[q_proj, v_proj]`, `null`) to a nested
    parameter dict; returns `data`, changed.

    Raises:
        ParameterError: an item without `=`, a malformed key, a value that is not YAML, or a key below a value.
    """
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ParameterError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set training.steps=50.")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            raise ParameterError(f"--set {item}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                                 f"quote it, e.g. --set '{key}=\"{raw}\"'.") from None
        node = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParameterError(f"--set {item}: {'.'.join(parents[:depth + 1])} is a value, not a section.")
        node[leaf] = value
    return data


def merge(base: dict, updates: dict) -> dict:
    """`updates` merged into `base` section by section (nested dicts merge, other values replace); `base` changes."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def resolve_paths(data: dict, base: Path) -> dict:
    """Make the path parameters of a parameter dict absolute against `base` (a --config file's folder, or the
    current directory for --set): runs_root, save.output_dir, dataset.path and evaluate.dataset unless they are
    Hub dataset ids; dataset.chat_template when it is a file name, not a template; base_model.name_or_path when
    it names a local folder (`is_local_reference`). Hub ids and builtin: names stay as they are. Returns `data`."""
    def fix(section: str, key: str, always: bool, unless=lambda value: False) -> None:
        node = data.get(section) if section else data
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not value.startswith(BUILTIN_PREFIX) and not unless(value) and (
                always or is_local_reference(value, base)):
            node[key] = str(local_path(base / Path(value).expanduser()))

    fix("", "runs_root", always=True)
    fix("save", "output_dir", always=True)
    fix("dataset", "path", always=True, unless=lambda value: is_hub_dataset_id(value, base))
    fix("dataset", "chat_template", always=True, unless=is_template_text)
    fix("evaluate", "dataset", always=True, unless=lambda value: is_hub_dataset_id(value, base))
    fix("base_model", "name_or_path", always=False)
    return data


def describe_validation_errors(exc, sources: dict[str, str]) -> list[str]:
    """pydantic's errors as one line per parameter: `adapter.r = 0 (--set adapter.r=0): Input should be ...`; an
    unknown key gets the closest known name. `sources` maps dotted keys to where they were given."""
    described: dict[str, list[str]] = {}
    for error in exc.errors():
        path = _parameter_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown parameter" + _did_you_mean(path)
        elif error["input"] is None and error["type"].endswith("_type"):  # `--set key=` or `key: null`
            message = (f"needs a value ({error['msg'].removeprefix('Input should be ').rstrip('.')}); an empty "
                       f"value or null means none, which this parameter does not take: give one, or leave the "
                       f"key out for its default")
        elif error["type"] == "string_pattern_mismatch" and (help_text := _description(path)):
            rule = f"{error['input']!r} {_PATTERN_RULES[path]}" if path in _PATTERN_RULES else message
            message = f"{rule} ({help_text})"
        elif path in sources or "." in path:
            message = f"{message} (got {error['input']!r})" if not isinstance(error["input"], dict) else message
        described.setdefault(path, [])
        if message not in described[path]:
            described[path].append(message)
    return [f"{path}{_source(path, sources)}: {'; '.join(messages)}" for path, messages in described.items()]


# Field patterns in words, with an example (the pattern itself in flows/parameters.py).
_PATTERN_RULES = {
    "run_name": "is not a plain name: use letters, digits, '_', '.' and '-', starting with a letter or digit, "
                "e.g. 'qwen-chat-1'",
    "adapter.name": "is not a plain name: use letters, digits, '_' and '-', e.g. 'default' or 'chat_v2'",
}


def _parameter_path(loc: tuple) -> str:
    """('adapter', 'target_modules', 'list[str]', 0) -> 'adapter.target_modules': the longest prefix of `loc` that
    names fields of the parameter model (union branches, list indexes and dict keys are not parameters); an unknown
    key keeps its own name."""
    parts: list[str] = []
    model = SaveAdapterParameters
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or not isinstance(part, str):
            break
        parts.append(part)
        if part not in fields:
            break
        model = _section_model(fields[part].annotation)
    return ".".join(parts) or "parameters"


def _section_model(annotation):
    """The pydantic model class of a section field (None for plain values)."""
    return annotation if hasattr(annotation, "model_fields") else None


def _description(path: str) -> str | None:
    *sections, name = path.split(".")
    model = SaveAdapterParameters
    for part in sections:
        model = _section_model(model.model_fields[part].annotation) if part in model.model_fields else None
        if model is None:
            return None
    field = model.model_fields.get(name)
    return field.description if field is not None else None


def _did_you_mean(path: str) -> str:
    *section, name = path.split(".")
    model: Any = SaveAdapterParameters
    for part in section:
        field = model.model_fields.get(part)
        model = _section_model(field.annotation) if field else None
        if model is None:
            return ""
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    prefix = ".".join(section) + "." if section else ""
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(model.model_fields)}"


def _source(path: str, sources: dict[str, str]) -> str:
    """Where a key was given; for a section (an unknown `trainig`), where its first key was given."""
    where = sources.get(path) or next((w for key, w in sources.items() if key.startswith(path + ".")), None)
    return f" ({where})" if where else ""
