"""Crash-safe file and directory writes.

A single file lands through a temp file in the same folder, fsync and rename. A whole save directory (weights,
config, model card, adapter subfolders) lands through a staging folder next to it that is swapped in with one
atomic `renameat2(RENAME_EXCHANGE)`: after a crash at any moment the directory is either exactly as it was or
holds the complete new content, never a mix. Entries of the old directory that the new content does not
replace (other adapters' folders, the user's own files) are hard-linked into the staging folder first, so they
survive the swap without being copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_STAGING_MARK = ".staging-"
_BACKUP_MARK = ".replaced-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable."""
    _fsync_path(path, os.O_DIRECTORY)


def write_file_atomic(path: str | os.PathLike, data: bytes | Callable[[int], None], fsync: bool = True) -> None:
    """Write `data` (bytes, or a callable writing to a file descriptor) to `path` via temp file + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            if callable(data):
                data(fd)
            else:
                _write_all(fd, data)
            os.fchmod(fd, 0o644)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, keep: Callable[[Path], bool] = lambda rel: True,
                     size_hint: int | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit its content atomically becomes `target`.

    Args:
        target: the directory to create or replace.
        keep: called with the path (relative to target) of each old entry the new content does not contain;
            False drops it (e.g. a stale weights file of the other format), True carries it over.
        size_hint: bytes the new content needs, named in the error when the disk is full.

    Raises:
        ValueError: `target` exists and is not a directory.
        OSError: a write failed; the message names `target` (never the hidden staging folder) and, for a full
            disk, the bytes needed. The errno (and so the subclass, e.g. NotADirectoryError) is the OS's.
    """
    # realpath: "..", "." and symlinked folders name the real directory, which is what gets replaced.
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"Provided path ({target}) should be a directory, not a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted(target)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_MARK}{os.getpid()}-", dir=target.parent))
        yield staging
        _commit(staging, target, keep)
    except OSError as exc:
        raise _error_naming_target(exc, staging, target, size_hint) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _error_naming_target(exc: OSError, staging: Path | None, target: Path, size_hint: int | None) -> OSError:
    """The same OS error, told about the user's folder: paths inside the staging folder become paths in target."""
    where = target
    for name in (exc.filename, exc.filename2):
        if name is not None and staging is not None:
            with contextlib.suppress(ValueError, TypeError):
                where = target / Path(os.fsdecode(name)).relative_to(staging)
                break
    message = f"Could not save into {target}: {exc.strerror or exc} (writing {where})."
    if exc.errno == errno.ENOSPC:
        needed = f"about {size_hint:,d} bytes" if size_hint else "more space"
        message += f" The disk is full: the save needs {needed} free next to {target}; free some space and save again."
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)


def _commit(staging: Path, target: Path, keep: Callable[[Path], bool]) -> None:
    """Publish staging as target. An error raised from here means target is as it was: a failed fsync of the
    parent after the swap swaps back (the old content returns), so a failed save never reports new content."""
    staging.chmod(0o755)
    if not target.exists():
        fsync_tree(staging)
        os.rename(staging, target)
        _fsync_parent_or_undo(target, lambda: os.rename(target, staging))
        return
    _carry_over(target, staging, Path(), keep)
    fsync_tree(staging)
    cwd_inside = _cwd_relative_to(target)
    swap = _exchange
    try:
        _exchange(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
            raise
        swap = _swap_with_backup
        swap(staging, target)
    _fsync_parent_or_undo(target, lambda: swap(staging, target))
    if cwd_inside is not None:
        # The process' working directory was inside the old tree, which now sits at the staging path and is
        # about to be deleted; follow the path to the new tree instead.
        os.chdir(target / cwd_inside)


def _fsync_parent_or_undo(target: Path, undo: Callable[[], None]) -> None:
    try:
        fsync_dir(target.parent)
    except OSError:
        undo()  # a second failure here propagates too; the next save then recovers what is left
        raise


def _carry_over(old_root: Path, new_root: Path, rel: Path, keep: Callable[[Path], bool]) -> None:
    """Hard-link every entry of old_root/rel that new_root/rel lacks; recurse into folders present in both."""
    for entry in os.scandir(old_root / rel):
        entry_rel = rel / entry.name
        new_path = new_root / entry_rel
        if new_path.is_dir() and entry.is_dir(follow_symlinks=False):
            _carry_over(old_root, new_root, entry_rel, keep)
        elif new_path.exists() or new_path.is_symlink() or not keep(entry_rel):
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), new_path)
        elif entry.is_dir():
            new_path.mkdir()
            _carry_over(old_root, new_root, entry_rel, keep)
        else:
            try:
                os.link(entry.path, new_path)
            except OSError:  # a file system without hard links: fall back to a copy
                shutil.copy2(entry.path, new_path)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root, so a rename that publishes it cannot expose lost data."""
    for dirpath, _, filenames in os.walk(root):
        files = [(os.lstat(path), path) for path in (os.path.join(dirpath, name) for name in filenames)]
        # Largest first: its journal commit also carries the small files, whose own fsyncs then find little to do.
        for info, path in sorted(files, key=lambda file: -file[0].st_size):
            if not stat.S_ISLNK(info.st_mode):
                _fsync_path(path)
        fsync_dir(dirpath)


def _fsync_path(path: str | os.PathLike, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _swap_with_backup(staging: Path, target: Path) -> None:
    """Fallback where RENAME_EXCHANGE is unsupported: three renames; a crash between them is undone on the next
    save, a failure (an OSError) at once, so that the error leaves the old content in place."""
    backup = target.parent / f".{target.name}{_BACKUP_MARK}{os.getpid()}"
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(backup, target)  # a failed (not crashed) save puts the old content back at once
        raise
    try:
        os.rename(backup, staging)  # the finally-clause of staged_directory deletes it
    except OSError:
        os.rename(target, staging)
        os.rename(backup, target)
        raise


def _recover_interrupted(target: Path) -> None:
    """Clean up after a save that crashed: stale staging folders go, a replaced-but-not-restored target returns."""
    prefix = f".{target.name}"
    for entry in target.parent.iterdir():
        rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        mark = next((m for m in (_STAGING_MARK, _BACKUP_MARK) if rest.startswith(m)), None)
        if mark is None:
            continue
        pid = rest[len(mark) :].split("-")[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue  # another save in progress
        if mark == _BACKUP_MARK and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cwd_relative_to(root: Path) -> Path | None:
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return None
    try:
        return cwd.relative_to(root)
    except ValueError:
        return None
