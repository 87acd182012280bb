"""LoraConfig: PEFT's LoRA configuration (field names, defaults and adapter_config.json layout).

Reading a PEFT-written adapter_config.json keeps every key we do not use, so a read-then-write round trip loses
nothing. A key that would switch on a PEFT feature we do not implement (DoRA, LoftQ, a non-LORA peft_type, ...)
is an error: loading such an adapter as plain LoRA would silently compute something else.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from adapterflow import formats
from adapterflow.atomic import write_file_atomic
from adapterflow.init_methods import parse_init_method
from adapterflow.serialization import read_json_object

BIAS_OPTIONS = ("none", "all", "lora_only")
# PEFT task types whose PeftModel subclass adds no modules of its own (SEQ_CLS silently adds the classifier head
# to modules_to_save in PEFT, which our files would not match).
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class ConfigError(ValueError):
    """A LoraConfig or adapter_config.json that cannot be used; the message lists every problem and its fix."""


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter, with PEFT's field names and defaults.

    Args:
        r: LoRA rank.
        lora_alpha: scaling numerator; the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
        lora_dropout: dropout on the LoRA input path.
        target_modules: module names (a name matches itself and any `<parent>.<name>`), a regex matched against
            the full module path, or "all-linear" (every linear layer except the output head).
        exclude_modules: names or a regex, as target_modules, of modules never to adapt.
        bias: "none", "all" (train and save every bias) or "lora_only" (the biases of adapted layers).
        fan_in_fan_out: True when the layer stores its weight as (in, out), as GPT-2's Conv1D does.
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        modules_to_save: modules trained in full and saved as complete copies (e.g. ["lm_head"]).
        init_lora_weights: True (kaiming A, zero B), False (random A and B), "gaussian", "pissa" (full SVD) or
            "pissa_niter_<K>" (randomised SVD with K subspace iterations).
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha, keyed by a module-name regex.
        layers_to_transform / layers_pattern: only adapt the layers with these indices (found after
            `layers_pattern`, e.g. "layers").
        base_model_name_or_path, revision: the base model the adapter belongs to.
        task_type: PEFT task type, e.g. "CAUSAL_LM".
        inference_mode: True freezes the adapter; saved files always say true, as PEFT writes them.
    """

    r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    modules_to_save: Union[list[str], None] = None
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, Union[int, float]] = field(default_factory=dict)
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    base_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    task_type: Union[str, None] = None
    inference_mode: bool = False
    peft_type: str = formats.PEFT_TYPE_LORA
    # Keys of adapter_config.json that we carry but do not use (PEFT metadata, newer PEFT fields), kept verbatim.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Sets are accepted like in PEFT but stored sorted, so files do not depend on PYTHONHASHSEED.
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
        problems = self._problems()
        if problems:
            raise ConfigError("Invalid LoraConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    def _problems(self) -> list[str]:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}.")
        if not _is_finite_number(self.lora_alpha):
            problems.append(f"lora_alpha must be a finite number, got {self.lora_alpha!r} (NaN or inf makes every "
                            f"output NaN).")
        if not _is_finite_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        for flag in ("fan_in_fan_out", "use_rslora", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.bias not in BIAS_OPTIONS:
            problems.append(f"bias must be one of {list(BIAS_OPTIONS)}, got {self.bias!r}.")
        if self.peft_type != formats.PEFT_TYPE_LORA:
            problems.append(
                f"peft_type {self.peft_type!r} is not supported: adapterflow implements LoRA (and PiSSA-initialised "
                f"LoRA) only; load this adapter with PEFT itself."
            )
        if self.task_type not in TASK_TYPES:
            problems.append(f"task_type must be one of {list(TASK_TYPES)}, got {self.task_type!r}.")
        problems += _module_list_problems("target_modules", self.target_modules)
        problems += _module_list_problems("exclude_modules", self.exclude_modules)
        if self.target_modules is None:
            problems.append('target_modules is required: e.g. ["q_proj", "v_proj"] or "all-linear".')
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            problems.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}.")
        try:
            parse_init_method(self.init_lora_weights)
        except ValueError as exc:
            problems.append(str(exc))
        problems += _pattern_problems("rank_pattern", self.rank_pattern, int)
        problems += _pattern_problems("alpha_pattern", self.alpha_pattern, (int, float))
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern needs layers_to_transform (the layer indices to adapt).")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            problems.append("layers_to_transform cannot be combined with a regex target_modules; put the layer "
                            "indices into the regex instead.")
        if self.layers_to_transform is not None and not _is_int_or_int_list(self.layers_to_transform):
            problems.append(f"layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}.")
        return problems

    @property
    def targets_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == formats.ALL_LINEAR

    def to_dict(self) -> dict[str, Any]:
        """adapter_config.json content: every key PEFT 0.21 writes for LoRA, plus the carried extra keys."""
        data = {**formats.PEFT_FEATURE_KEYS, **formats.PEFT_INERT_KEYS}
        data = copy.deepcopy(data)
        data.update(copy.deepcopy(self.extra_fields))
        for f in dataclasses.fields(self):
            if f.name != "extra_fields":
                data[f.name] = copy.deepcopy(getattr(self, f.name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build a config from adapter_config.json content; unknown keys are kept, unsupported features refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter_config.json must hold a JSON object, got {type(data).__name__}: {data!r:.80}.")
        own = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
        _warn_unknown_keys(data, own)
        problems = []
        for key, default in formats.PEFT_FEATURE_KEYS.items():
            value = data.get(key, default)
            if value not in (default, None, False, {}, []):
                problems.append(
                    f"{key}={value!r} switches on a PEFT feature adapterflow does not implement; load this adapter "
                    f"with PEFT, or retrain it without {key}."
                )
        # Feature keys are validated above and rewritten by to_dict; inert keys only matter when not at default.
        extra = {
            k: copy.deepcopy(v)
            for k, v in data.items()
            if k not in own and k not in formats.PEFT_FEATURE_KEYS and formats.PEFT_INERT_KEYS.get(k, ...) != v
        }
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in own}
        try:
            config = cls(**kwargs, extra_fields=extra)
        except ConfigError as exc:
            problems += [line.strip()[2:] for line in str(exc).splitlines()[1:]]
            config = None
        except TypeError as exc:  # a field of the wrong kind, e.g. a list where a dict belongs
            problems.append(str(exc))
            config = None
        if problems:
            raise ConfigError("Unsupported adapter_config.json:\n" + "\n".join(f"  - {p}" for p in problems))
        return config

    def to_json_string(self) -> str:
        # PEFT writes indent 2 with sorted keys; we do the same so files diff cleanly against PEFT's.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` (with inference_mode true, as PEFT saves it) atomically."""
        saved = self.for_saving()
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path / formats.CONFIG_NAME, saved.to_json_string().encode())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LoraConfig":
        """Read `adapter_config.json` from an adapter folder (or the file itself).

        Raises:
            FileNotFoundError: no such file; OSError: the OS could not read it (as raised, so retries can tell).
            adapterflow.serialization.AdapterLoadError: the file is not JSON or is not a JSON object.
            ConfigError: the values are invalid or switch on a PEFT feature we do not implement.
        """
        config_path = Path(path)
        if config_path.is_dir():
            config_path = config_path / formats.CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"No {formats.CONFIG_NAME} at {config_path}. Pass the folder that save_pretrained wrote "
                f"(it holds {formats.CONFIG_NAME} and {formats.SAFETENSORS_WEIGHTS_NAME})."
            )
        # An OSError (EIO, EACCES) stays one: it may be transient.
        data = read_json_object(config_path, fix="; re-save or re-download the adapter")
        return cls.from_dict(data)

    def for_saving(self) -> "LoraConfig":
        """A copy as it is written to disk: inference_mode true."""
        saved = copy.deepcopy(self)
        saved.inference_mode = True
        return saved

    def rank_and_alpha(self, module_name: str) -> tuple[int, Union[int, float]]:
        """r and lora_alpha for one module, after rank_pattern / alpha_pattern (first matching key wins)."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )


def check_config_type(config: object) -> None:
    """Refuse anything but our LoraConfig (a dict, PEFT's LoraConfig, ...) before it is used.

    Raises:
        ConfigError: naming the type found and how to build a LoraConfig from it.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(
            f"config must be an adapterflow.LoraConfig, got {type(config).__module__}.{type(config).__name__}. "
            f"Build one with LoraConfig(r=..., target_modules=[...]), from a dict with LoraConfig.from_dict(d), "
            f"or from a PEFT config with LoraConfig.from_dict(peft_config.to_dict())."
        )


def _warn_unknown_keys(data: dict, own: set[str]) -> None:
    """One warning listing the keys neither we nor PEFT 0.21 know (as PEFT's `check_kwargs` warns); they are kept."""
    known = own | set(formats.PEFT_FEATURE_KEYS) | set(formats.PEFT_INERT_KEYS) | set(formats.PEFT_METADATA_KEYS)
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        warnings.warn(
            f"adapter_config.json has keys adapterflow does not know: {unknown}. They were probably written by a "
            f"newer PEFT; they are ignored here and written back unchanged when the adapter is saved again.",
            stacklevel=3,
        )


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_value(pattern: dict, module_name: str, default):
    # PEFT's get_pattern_key: a key matches the module's full name or any dotted suffix of it.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _module_list_problems(name: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            return [f"{name} {value!r} is not a valid regular expression ({exc})."]
        return []
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return []
    return [f"{name} must be a non-empty list of module names or a regex string, got {value!r}."]


def _pattern_problems(name: str, pattern, value_type) -> list[str]:
    if not isinstance(pattern, dict):
        return [f"{name} must be a dict of module-name regex -> value, got {pattern!r}."]
    bad = {k: v for k, v in pattern.items() if not isinstance(v, value_type) or not _is_finite_number(v) or v <= 0}
    return [f"{name} values must be positive finite numbers, got {bad!r}."] if bad else []


def _is_int_or_int_list(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
