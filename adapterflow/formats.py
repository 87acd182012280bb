"""Every on-disk name and key convention of the PEFT adapter format, in one place.

The reference is PEFT 0.21 (`peft/utils/constants.py`, `tuners_utils._remove_adapter_name_from_state_dict_key`,
`ModulesToSaveWrapper.adapter_state_dict`). Nothing else in the package spells these strings: save and load both
go through `checkpoint_key`, so they cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

# Files of one saved adapter.
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
WEIGHTS_NAMES = (SAFETENSORS_WEIGHTS_NAME, BIN_WEIGHTS_NAME)  # load order: safetensors first
PT_WEIGHTS_NAME = "adapter_model.pt"  # vLLM's third choice (vllm/lora/lora_model.py); PEFT never writes it
CONFIG_NAME = "adapter_config.json"
MODEL_CARD_NAME = "README.md"
# adapterflow's integrity manifest (adapterflow.manifest): digests of the files above and the base's fingerprint.
# PEFT, vLLM and llama.cpp open the files above by name and never list the folder, so they ignore it.
MANIFEST_NAME = "adapterflow.json"
SAFETENSORS_METADATA = {"format": "pt"}

# The adapter called "default" lives at the root of a save directory, every other one in a subfolder.
DEFAULT_ADAPTER_NAME = "default"

# Checkpoint keys are named as in PEFT's PeftModel(LoraModel(model)): `base_model.model.<module path>...`.
PEFT_KEY_PREFIX = "base_model.model."

# Attribute names of the adapter parameters inside wrapped modules (PEFT's `adapter_layer_names`).
LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_EMBEDDING_A = "lora_embedding_A"
LORA_EMBEDDING_B = "lora_embedding_B"
BASE_LAYER = "base_layer"
MODULES_TO_SAVE = "modules_to_save"
ORIGINAL_MODULE = "original_module"

# Module-valued adapter layers hold `<name>.<adapter>.weight`; parameter-valued ones hold `<name>.<adapter>`.
_MODULE_ADAPTER_LAYERS = (LORA_A, LORA_B)
_PARAMETER_ADAPTER_LAYERS = (LORA_EMBEDDING_A, LORA_EMBEDDING_B)

# PEFT's names for the input/output embeddings (`EMBEDDING_LAYER_NAMES`) and the "all-linear" shorthand.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
ALL_LINEAR = "all-linear"

# adapter_config.json keys that PEFT 0.21 writes for a LoRA adapter, beyond the LoraConfig fields we implement,
# with the value PEFT writes. A different value switches on a PEFT feature we do not implement (DoRA, LoftQ, ...),
# so reading one is an error rather than a silent change of behaviour.
PEFT_FEATURE_KEYS = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "velora_config": None,
}
# Keys PEFT writes that carry no behaviour for plain LoRA (metadata, or settings of disabled features).
PEFT_INERT_KEYS = {
    "auto_mapping": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
}
# Keys PEFT writes as pure metadata of the file (kept verbatim, never warned about).
PEFT_METADATA_KEYS = ("peft_version",)
PEFT_TYPE_LORA = "LORA"


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Folder that holds one adapter's files: the root for "default", `<root>/<name>` otherwise."""
    root = Path(save_directory)
    return root if adapter_name == DEFAULT_ADAPTER_NAME else root / adapter_name


def weights_name(safe_serialization: bool) -> str:
    return SAFETENSORS_WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME


def checkpoint_key(model_key: str, adapter_name: str) -> str:
    """Map a model parameter name to its checkpoint key by removing the adapter name, as PEFT does.

    A pure function of its arguments, used for saving and (inverted by `checkpoint_to_model_keys`) for loading:

        base_model.model.m.q_proj.lora_A.default.weight         -> base_model.model.m.q_proj.lora_A.weight
        base_model.model.m.embed_tokens.lora_embedding_A.default -> base_model.model.m.embed_tokens.lora_embedding_A
        base_model.model.lm_head.modules_to_save.default.weight  -> base_model.model.lm_head.weight
        base_model.model.m.q_proj.base_layer.weight              -> unchanged (no adapter name in it)

    Only an adapter name that directly follows one of the adapter-layer attributes is removed, so a module that
    happens to share the adapter's name is left alone. The last such occurrence wins (nested modules_to_save).
    """
    parts = model_key.split(".")
    for i in range(len(parts) - 2, -1, -1):
        layer, name = parts[i], parts[i + 1]
        if name != adapter_name:
            continue
        if layer in _MODULE_ADAPTER_LAYERS and i + 2 < len(parts):
            return ".".join(parts[: i + 1] + parts[i + 2 :])
        if layer in _PARAMETER_ADAPTER_LAYERS and i + 2 == len(parts):
            return ".".join(parts[: i + 1])
        if layer == MODULES_TO_SAVE and i + 2 < len(parts):
            return ".".join(parts[:i] + parts[i + 2 :])
    return model_key


def checkpoint_to_model_keys(model_keys: list[str], adapter_name: str) -> dict[str, str]:
    """Inverse of `checkpoint_key` over the given model keys: {checkpoint key: model key}."""
    return {checkpoint_key(key, adapter_name): key for key in model_keys}


def module_of_key(key: str) -> str:
    """The module path a checkpoint key belongs to: `...q_proj.lora_A.weight` -> `...q_proj`."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _MODULE_ADAPTER_LAYERS + _PARAMETER_ADAPTER_LAYERS + (BASE_LAYER,):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def lora_partner(key: str) -> str | None:
    """For a LoRA A key the matching B key and vice versa; None for any other key."""
    pairs = {LORA_A: LORA_B, LORA_B: LORA_A, LORA_EMBEDDING_A: LORA_EMBEDDING_B, LORA_EMBEDDING_B: LORA_EMBEDDING_A}
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in pairs:
            return ".".join(parts[:i] + [pairs[parts[i]]] + parts[i + 1 :])
    return None


def is_lora_a(key: str) -> bool:
    return any(part in (LORA_A, LORA_EMBEDDING_A) for part in key.split("."))


def is_lora_b(key: str) -> bool:
    return any(part in (LORA_B, LORA_EMBEDDING_B) for part in key.split("."))


def base_layer_weight_key(module_path: str) -> str:
    return f"{module_path}.{BASE_LAYER}.weight"


def check_adapter_name(name: object) -> None:
    """Adapter names become folder names and parts of parameter names: no path separators, no dots, not empty."""
    if not isinstance(name, str) or not name or "." in name or "/" in name or "\\" in name or os.sep in name:
        raise ValueError(
            f"Invalid adapter name {name!r}: it becomes a folder name and a parameter-name part, so it must be "
            f"non-empty and contain no '/', '\\\\' or '.' (e.g. 'default', 'task_a')."
        )
