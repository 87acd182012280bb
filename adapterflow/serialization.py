"""Adapter weight files: safetensors (written zero-copy) or PyTorch `.bin`, and reading either back.

The safetensors writer streams each tensor's memory straight to the file descriptor with `writev` (no copy of the
tensors, no temporary buffer) and starts the disk writeback while it goes, so the fsync of a durable save waits
little; reading uses the safetensors library. `.bin` files are read with `torch.load(weights_only=True)` only, so
a checkpoint cannot run code. Every file that cannot be read is an `AdapterLoadError` naming the file.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import pickle
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterflow import formats
from adapterflow.digest import StreamDigest

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


class AdapterLoadError(ValueError):
    """An adapter that cannot be loaded: an unreadable or corrupt file (named in the message), or a checkpoint that
    does not fit the model (every missing / unexpected key listed)."""


_IOV_MAX = 1024  # writev's per-call buffer limit on Linux
_WRITEBACK_CHUNK = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy where it already is a contiguous CPU tensor (a non-contiguous one, e.g. a
    transposed view, is copied). bf16 and float8 have no numpy dtype, so the bytes are viewed as uint8."""
    tensor = tensor.detach().to("cpu").contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(fd: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      digest: StreamDigest | None = None) -> None:
    """Write `tensors` in the safetensors format to an open file descriptor; `digest` is fed every byte written
    (the same buffers, in file order), so a manifest needs no second read of the file.

    Tensors are laid out by decreasing element size, then name, so every tensor starts aligned to its element
    size (the header is padded to 8 bytes), as the safetensors library does. The header needs only names, dtypes
    and shapes; each tensor's bytes are fetched just before they are written, so that per-tensor work runs while
    the disk is already busy with the previous ones.
    """
    unsupported = [f"{name!r} has dtype {t.dtype}" for name, t in tensors.items() if t.dtype not in _SAFETENSORS_DTYPES]
    if unsupported:
        raise TypeError(f"Tensor {', '.join(unsupported)}, which safetensors cannot store.")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    data = (_raw_bytes(tensors[name]) for name in order if tensors[name].numel())
    buffers = itertools.chain([memoryview(struct.pack("<Q", len(header_bytes))), memoryview(header_bytes)], data)
    _writev_all(fd, buffers if digest is None else _fed(digest, buffers))


def _fed(digest: StreamDigest, buffers: Iterable[memoryview]) -> Iterable[memoryview]:
    """The buffers, each handed to `digest` just before it is written (its hashing overlaps the write)."""
    for buffer in buffers:
        buffer = buffer.cast("B")
        digest.update(buffer)
        yield buffer


def _writev_all(fd: int, buffers: Iterable[memoryview]) -> None:
    """Write all buffers in groups of _WRITEBACK_CHUNK bytes, asking the kernel to start writing each group to disk
    right away: the fsync that follows then waits for the last group only, not for the whole file."""
    group, size, offset = [], 0, 0
    for buffer in buffers:
        buffer = buffer.cast("B")
        while buffer.nbytes:
            take = buffer[: _WRITEBACK_CHUNK - size]
            group.append(take)
            size += take.nbytes
            buffer = buffer[take.nbytes :]
            if size == _WRITEBACK_CHUNK or len(group) == _IOV_MAX:
                _write_group(fd, group, offset, size)
                group, offset, size = [], offset + size, 0
    if group:
        _write_group(fd, group, offset, size)


def _write_group(fd: int, group: list[memoryview], offset: int, size: int) -> None:
    written = 0
    while written < size:
        written += os.writev(fd, _skip(group, written))
    _start_writeback(fd, offset, size)


def _skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    """The buffers without their first n bytes (what a short writev left over)."""
    rest = []
    for buffer in buffers:
        if n >= buffer.nbytes:
            n -= buffer.nbytes
            continue
        rest.append(buffer[n:])
        n = 0
    return rest


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): begin writing a range to disk without waiting for it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(size), _SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    except OSError:  # no C library to load (not Linux): the fsync alone does the job, a bit slower
        return None


_sync_file_range = _load_sync_file_range()


def write_bin(fd: int, tensors: dict[str, torch.Tensor], digest: StreamDigest | None = None) -> None:
    """torch.save the tensors; each gets its own compact storage, so a view into a large tensor does not drag the
    whole storage into the file. `digest` (not threaded: torch's buffers live only during each write) is fed
    every byte written.

    Raises:
        OSError: the write failed (e.g. ENOSPC), as raised by the OS; torch would turn it into a RuntimeError.
    """
    compact = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        compact[name] = tensor
    sink = _FdWriter(fd, digest)
    try:
        torch.save(compact, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


class _FdWriter:
    """A write-only file object over a descriptor that keeps the OSError of a failed write, which torch.save
    reports only as `RuntimeError: [enforce fail at inline_container.cc]`."""

    def __init__(self, fd: int, digest: StreamDigest | None = None) -> None:
        self.fd, self.error, self.digest = fd, None, digest

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.digest is not None:
            self.digest.update(view)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.error = exc
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data a weights file holds (from shapes and dtypes; no tensor is read)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> StreamDigest:
    """Write an adapter's weights to `path` (format from its name); no fsync, the caller makes it durable.

    Returns:
        The digest of the bytes written; its hashing may still be finishing in a helper thread: call `.result()`.
    """
    bin_file = path.name == formats.BIN_WEIGHTS_NAME
    digest = StreamDigest(threaded=not bin_file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if bin_file:
            write_bin(fd, tensors, digest)
        else:
            write_safetensors(fd, tensors, formats.SAFETENSORS_METADATA, digest)
    except BaseException:
        digest.close()
        raise
    finally:
        os.close(fd)
    return digest


def read_json_object(path: str | os.PathLike, fix: str = "") -> dict:
    """The JSON object stored in `path` (adapter_config.json, a model's config.json, an index file).

    Args:
        fix: what to do, appended to the error message (e.g. "; re-save or re-download the adapter").

    Raises:
        FileNotFoundError, OSError: as the OS raised them (an EIO may be transient: retries can tell).
        AdapterLoadError: the file is not JSON (or not UTF-8), or holds a JSON value that is not an object.
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}){fix}.") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} holds a JSON {type(data).__name__} ({json.dumps(data)[:60]}), not an "
                               f"object{fix}.")
    return data


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
    """Read an adapter folder's weights onto the CPU.

    Raises:
        FileNotFoundError: neither weights file exists; OSError: the OS could not read it (as raised).
        AdapterLoadError: the file is empty, truncated or corrupt, holds something other than a dict of tensors,
            or (.bin) pickled objects that a weights-only load refuses.
    """
    path = find_weights_file(folder)
    size = path.stat().st_size
    if size == 0:
        raise AdapterLoadError(f"{path} is empty (0 bytes); the save that wrote it did not finish. {_REDO}")
    if path.name == formats.SAFETENSORS_WEIGHTS_NAME:
        try:
            return load_file(path, device="cpu")
        except OSError:
            raise  # the OS could not read the file (EIO, EACCES): not the file's fault, and maybe transient
        except Exception as exc:  # safetensors' own SafetensorError: the content is broken
            raise AdapterLoadError(
                f"{path} ({size} bytes) is not a readable safetensors file ({exc}); it is truncated or corrupt. {_REDO}"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterLoadError(
            f"{path} holds pickled Python objects besides tensors; it is refused for safety, because unpickling "
            f"them could run arbitrary code. Ask for the adapter as {formats.SAFETENSORS_WEIGHTS_NAME}."
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise AdapterLoadError(
            f"{path} ({size} bytes) is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]}); it is "
            f"truncated or corrupt. {_REDO}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterLoadError(f"{path} does not hold a dict of tensors; it is not an adapter checkpoint. {_REDO}")
    return state


_REDO = "Save the adapter again (or download it again) and load that folder."
