"""What the serving preflight (`adapterflow.serving`) reads: an adapter's config and tensor shapes, and a base
model's config and weight shapes, all from file headers. No weights are loaded: safetensors files are read
through their JSON header (`safetensors.safe_open(...).get_slice(name).get_shape()`), a pickled `.bin` file is
memory-mapped (`torch.load(mmap=True, weights_only=True)`), so a 70B base costs a few header reads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from adapterflow import formats
from adapterflow.serialization import AdapterLoadError, read_json_object

# Base-model files, as transformers names them (`transformers.utils.SAFE_WEIGHTS_NAME`, `WEIGHTS_NAME`, ...).
BASE_CONFIG_NAME = "config.json"
BASE_SAFETENSORS_INDEX = "model.safetensors.index.json"
BASE_SAFETENSORS = "model.safetensors"
BASE_BIN_INDEX = "pytorch_model.bin.index.json"
BASE_BIN = "pytorch_model.bin"
# Weight files the runtimes look for, in their order (vllm/lora/lora_model.py; llama.cpp convert_lora_to_gguf.py).
ADAPTER_WEIGHT_NAMES = (*formats.WEIGHTS_NAMES, formats.PT_WEIGHTS_NAME)

Shapes = dict[str, tuple[int, ...]]
# Bytes per element of the safetensors header dtypes (safetensors format spec; unknown ones count 0).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter folder as the runtimes see it.

    Attributes:
        folder: the adapter folder.
        config: adapter_config.json as written (a dict; nothing validated or defaulted).
        weights_file: name of the first weight file found in ADAPTER_WEIGHT_NAMES order, None if there is none.
        shapes: {checkpoint key: shape} of that file's tensors.
        nbytes: {checkpoint key: size in bytes} of the same tensors (shape x dtype size).
    """

    folder: Path
    config: dict
    weights_file: Optional[str]
    shapes: Shapes = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseShapes:
    """A base model as the preflight needs it: its config.json and the shape of every weight in its checkpoint.

    Attributes:
        config: config.json content (for multimodal models the text model's settings may sit in `text_config`).
        shapes: {parameter name as stored, e.g. "model.layers.0.self_attn.q_proj.weight": shape}.
        source: where it came from (a folder, a Hub repo id), for messages.
    """

    config: dict
    shapes: Shapes
    source: str = "<base model>"

    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def vocab_size(self) -> Optional[int]:
        return self.text_config().get("vocab_size") or self.config.get("vocab_size")

    @property
    def tie_word_embeddings(self) -> bool:
        """True when config.json says so, or (it omits the key) the checkpoint has embeddings but no lm_head."""
        tied = self.config.get("tie_word_embeddings", self.text_config().get("tie_word_embeddings"))
        if tied is None:
            return "lm_head.weight" not in self.shapes and self.embedding_key() is not None
        return bool(tied)

    def embedding_key(self) -> Optional[str]:
        """The input embedding's weight name (`...embed_tokens.weight`, GPT-2's `...wte.weight`), None if unknown."""
        return next((k for k in sorted(self.shapes) if k.endswith(("embed_tokens.weight", ".wte.weight"))), None)


def read_adapter_files(folder: str | os.PathLike) -> AdapterFiles:
    """The config and tensor shapes of the adapter in `folder` (other files, e.g. adapterflow.json, are ignored).

    Raises:
        FileNotFoundError: no such folder, or no adapter_config.json in it.
        AdapterLoadError: adapter_config.json is not a JSON object, or the weight file is unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the adapter folder (it holds "
                                f"{formats.CONFIG_NAME} and {formats.SAFETENSORS_WEIGHTS_NAME}).")
    config_path = folder / formats.CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {formats.CONFIG_NAME}: pass the folder that save_pretrained wrote "
                                f"(for an adapter not named 'default', its subfolder).")
    config = read_json_object(config_path)
    name = next((n for n in ADAPTER_WEIGHT_NAMES if (folder / n).is_file()), None)
    shapes, nbytes = read_tensor_sizes(folder / name) if name else ({}, {})
    return AdapterFiles(folder, config, name, shapes, nbytes)


def read_base_shapes(folder: str | os.PathLike) -> BaseShapes:
    """config.json and the weight shapes of a transformers model folder: one `model.safetensors`, a sharded
    `model.safetensors.index.json`, any other `*.safetensors`, or `pytorch_model.bin` (or its index).

    Raises:
        FileNotFoundError: no folder, no config.json, or no weight file in it.
        AdapterLoadError: a file that is not what its name says.
    """
    folder = Path(folder)
    if not (folder / BASE_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no {BASE_CONFIG_NAME}.")
    config = read_json_object(folder / BASE_CONFIG_NAME)
    files = _base_weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} has no weights ({BASE_SAFETENSORS}, {BASE_SAFETENSORS_INDEX} or "
                                f"{BASE_BIN}): the preflight reads the weight shapes from them.")
    shapes: Shapes = {}
    for path in files:
        shapes.update(read_shapes(path))
    return BaseShapes(config, shapes, str(folder))


def _base_weight_files(folder: Path) -> list[Path]:
    for index in (BASE_SAFETENSORS_INDEX, BASE_BIN_INDEX):
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / BASE_SAFETENSORS).is_file():
        return [folder / BASE_SAFETENSORS]
    return sorted(folder.glob("*.safetensors")) or ([folder / BASE_BIN] if (folder / BASE_BIN).is_file() else [])


def read_shapes(path: Path) -> Shapes:
    """{tensor name: shape} of one weight file, from the safetensors header or a memory-mapped pickle.

    Raises:
        FileNotFoundError: no such file. AdapterLoadError: not a readable weight file.
    """
    return read_tensor_sizes(path)[0]


def read_tensor_sizes(path: Path) -> tuple[Shapes, dict[str, int]]:
    """({tensor name: shape}, {tensor name: bytes}) of one weight file, as `read_shapes` reads it; the bytes of a
    safetensors tensor come from its header dtype (safetensors format: F32 is 4 bytes, BF16 2, ...).

    Raises:
        FileNotFoundError: no such file. AdapterLoadError: not a readable weight file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (named in the folder's index).")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
                return shapes, {key: math.prod(shapes[key]) * _DTYPE_BYTES.get(s.get_dtype(), 0)
                                for key, s in slices.items()}
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # safetensors' SafetensorError, pickle / zip errors
        raise AdapterLoadError(f"{path} is not a readable weight file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state, dict):
        raise AdapterLoadError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    tensors = {key: t for key, t in state.items() if isinstance(t, torch.Tensor)}
    return {k: tuple(t.shape) for k, t in tensors.items()}, {k: t.numel() * t.element_size() for k, t in tensors.items()}
