"""sha256 digests of bytes as they are written, for the integrity manifest (adapterflow.manifest).

A save hashes each file's bytes on their way to the disk, never by reading the file back. The weights of a large
adapter are hashed in a helper thread while the writing thread copies the same buffers into the page cache:
hashlib releases the GIL for buffers over 2 KiB (CPython `Modules/sha2module.c`, `HASHLIB_GIL_MINSIZE`), so the
two run on two cores and the digest is usually done when the writes are. sha256 is also what the Hub's LFS
stores for a large file (its `oid`).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

_THREAD_MIN_BYTES = 1 << 16  # smaller buffers are hashed at once: handing them over costs more than hashing


@dataclass(frozen=True)
class FileDigest:
    """sha256 (hex) and size (bytes) of one file's content."""

    sha256: str
    size: int

    def as_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


def bytes_digest(data: bytes) -> FileDigest:
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


class StreamDigest:
    """The sha256 of a stream of buffers, fed in order with `update` and finished with `result`.

    With `threaded`, buffers of 64 KiB and more go to a helper thread (started on the first one); the caller must
    not change a buffer's memory until `result` returns (the tensors of a save do not change). `close` stops the thread
    without a result (for a write that failed); `result` and `close` may both be called, in either order.
    """

    def __init__(self, threaded: bool = True) -> None:
        self._threaded = threaded  # False: memory that is only valid during the call (torch.save's writes)
        self._sha = hashlib.sha256()
        self.size = 0
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def update(self, buffer: memoryview) -> None:
        self.size += buffer.nbytes
        if self._thread is None and (not self._threaded or buffer.nbytes < _THREAD_MIN_BYTES):
            self._sha.update(buffer)
            return
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="adapterflow-sha256", daemon=True)
            self._thread.start()
        self._queue.put(buffer)

    def _run(self) -> None:
        while (buffer := self._queue.get()) is not None:
            self._sha.update(buffer)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def result(self) -> FileDigest:
        """Wait for the helper thread and return the digest of everything fed so far."""
        self.close()
        return FileDigest(self._sha.hexdigest(), self.size)
