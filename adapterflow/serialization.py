"""Adapter weight files: safetensors (written zero-copy) or PyTorch `.bin`, and reading either back.

The safetensors writer streams each tensor's memory straight to the file descriptor with one `writev`, instead
of building the whole file in memory first as `safetensors.torch.save_file` does; reading uses the safetensors
library. `.bin` files are read with `torch.load(weights_only=True)` only, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterflow import formats

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_IOV_MAX = 1024  # writev's per-call buffer limit on Linux


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # Non-contiguous tensors (transposed views, tied/shared parameters) are written as their own contiguous copy.
    return tensor.detach().to("cpu").contiguous()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (bf16 and float8 have no numpy dtype, so view them as uint8)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(fd: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` in the safetensors format to an open file descriptor.

    Tensors are laid out by decreasing element size, then name, so every tensor starts aligned to its element
    size (the header is padded to 8 bytes), as the safetensors library does.
    """
    prepared = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        prepared[name] = _cpu_contiguous(tensor)
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = prepared[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    buffers = [memoryview(struct.pack("<Q", len(header_bytes))), memoryview(header_bytes)]
    buffers += [_raw_bytes(prepared[name]) for name in order if prepared[name].numel()]
    _writev_all(fd, buffers)


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b.cast("B") for b in buffers if b.nbytes]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written:
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0


def write_bin(fd: int, tensors: dict[str, torch.Tensor]) -> None:
    """torch.save the tensors; each gets its own compact storage, so a view into a large tensor does not drag the
    whole storage into the file."""
    compact = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        compact[name] = tensor
    with open(fd, "wb", closefd=False) as file:
        torch.save(compact, file)


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write an adapter's weights to `path` (format from its name); no fsync, the caller makes it durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if path.name == formats.BIN_WEIGHTS_NAME:
            write_bin(fd, tensors)
        else:
            write_safetensors(fd, tensors, formats.SAFETENSORS_METADATA)
    finally:
        os.close(fd)


def find_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of an adapter folder: safetensors first, then .bin."""
    folder = Path(folder)
    for name in formats.WEIGHTS_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"No adapter weights in {folder}: expected {formats.SAFETENSORS_WEIGHTS_NAME} or "
        f"{formats.BIN_WEIGHTS_NAME}. Pass the folder that save_pretrained wrote (for an adapter not named "
        f"'default', its subfolder)."
    )


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an adapter folder's weights onto the CPU."""
    path = find_weights_file(folder)
    if path.name == formats.SAFETENSORS_WEIGHTS_NAME:
        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors; it is not an adapter checkpoint.")
    return state
