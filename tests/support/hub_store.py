"""On-disk storage behind the fake Hugging Face Hub in `hub_server.py`.

Layout under `root_dir`::

    blobs/<sha256>               content-addressed file contents (regular and LFS files alike)
    repos/<ns>/<name>.json       one metadata document per model repo
    dataset-repos/<ns>/<name>.json   the same per dataset repo (store key "datasets/<ns>/<name>")

A metadata document holds `branches` and `tags` (name -> commit oid) and `commits` (oid -> commit). Every commit
carries the full file map of its tree, `path -> {"sha256", "size", "gitoid", "lfs"}`, so resolving any revision is
one dictionary lookup. `gitoid` is what the Hub reports as a file's `oid`/`blobId`: the git-sha1 of the content for
regular files and of the LFS pointer file for LFS files. Every write goes to a temporary file first and is moved into
place with `os.replace`, so a reader never sees a half-written commit or blob.

Domain errors are raised as `HubError`, which the HTTP layer turns into a JSON error response.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable

# The Hub creates every model repo with this file in an "initial commit" (shortened from the real list).
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.gguf", "*.h5", "*.npy", "*.npz", "*.onnx", "*.pickle", "*.pkl", "*.pt",
                    "*.pth", "*.safetensors", "*.tar", "*.zip", "*tfevents*")
)
LFS_SUFFIXES = (".bin", ".ckpt", ".gguf", ".h5", ".msgpack", ".npy", ".npz", ".onnx", ".pickle", ".pkl", ".pt",
                ".pth", ".safetensors", ".tar", ".gz", ".zip")
LFS_MIN_SIZE = 10 * 1024  # bytes; larger files go to LFS whatever their type
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """An error the Hub reports to the client: HTTP status, message, optional `X-Error-Code` and extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def now_iso() -> str:
    """The Hub's timestamp format, e.g. `2024-05-01T12:00:00.000Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_sha1(data: bytes) -> str:
    """The git blob id of `data` (sha1 of `blob <size>\\0<data>`)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in for an LFS file in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """`lfs` for binary or large files, `regular` otherwise (what preupload answers)."""
    if path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE or b"\x00" in sample:
        return "lfs"
    return "regular"


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class HubStore:
    """Model repos, commits and blobs on disk. Metadata updates are serialised by one lock."""

    def __init__(self, root_dir: Path):
        self.root = Path(root_dir)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # ---- blobs -------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            _atomic_write(self.blob_path(sha), [data])
        return sha

    def put_blob_stream(self, expected_sha256: str, chunks: Iterable[bytes]) -> int:
        """Store a streamed upload under its sha256 and return its size.

        Raises HubError(400) when the content's sha256 is not `expected_sha256`; nothing is stored then.
        """
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise HubError(400, f"Uploaded content has sha256 {digest.hexdigest()}, expected {expected_sha256}")
            os.replace(tmp, self.blob_path(expected_sha256))
        except BaseException:
            os.unlink(tmp)
            raise
        return size

    def open_blob(self, sha256: str) -> BinaryIO:
        return open(self.blob_path(sha256), "rb")

    # ---- repo metadata -----------------------------------------------------------------------------------------
    def _meta_path(self, repo_id: str) -> Path:
        """Where a repo's metadata lives; `repo_id` is "ns/name" (a model) or "datasets/ns/name" (a dataset)."""
        folder = "repos"
        if repo_id.startswith("datasets/"):
            folder, repo_id = "dataset-repos", repo_id[len("datasets/"):]
        ns, _, name = repo_id.partition("/")
        if not all(_REPO_PART.fullmatch(part) and ".." not in part for part in (ns, name)):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name' of [A-Za-z0-9_.-]")
        return self.root / folder / ns / f"{name}.json"

    def exists(self, repo_id: str) -> bool:
        return self._meta_path(repo_id).is_file()

    def load(self, repo_id: str) -> dict:
        """The repo's metadata document; HubError(404, RepoNotFound) when there is no such repo."""
        try:
            return json.loads(self._meta_path(repo_id).read_text())
        except FileNotFoundError:
            raise HubError(404, "Repository not found", "RepoNotFound") from None

    def _save(self, repo_id: str, meta: dict) -> None:
        _atomic_write(self._meta_path(repo_id), [json.dumps(meta, indent=1).encode()])

    def create_repo(self, repo_id: str, private: bool) -> None:
        """Create a repo with the Hub's initial commit (a `.gitattributes`); HubError(409) when it exists."""
        with self.lock:
            if self.exists(repo_id):
                kind = "dataset" if repo_id.startswith("datasets/") else "model"
                raise HubError(409, f"You already created this {kind} repo")
            meta = {"id": repo_id, "private": private, "createdAt": now_iso(), "branches": {}, "tags": {},
                    "commits": {}}
            data = GITATTRIBUTES.encode()
            files = {".gitattributes": {"sha256": self.put_blob(data), "size": len(data), "gitoid": git_sha1(data),
                                        "lfs": False}}
            meta["branches"]["main"] = self._add_commit(meta, None, "initial commit", "", files)
            self._save(repo_id, meta)

    def delete_repo(self, repo_id: str) -> None:
        with self.lock:
            self.load(repo_id)
            self._meta_path(repo_id).unlink()

    # ---- revisions ---------------------------------------------------------------------------------------------
    @staticmethod
    def resolve(meta: dict, revision: str) -> str:
        """Commit oid of a branch, tag or commit sha; HubError(404, RevisionNotFound) otherwise."""
        for name in (revision, revision.removeprefix("refs/heads/"), revision.removeprefix("refs/tags/")):
            if name in meta["branches"]:
                return meta["branches"][name]
            if name in meta["tags"]:
                return meta["tags"][name]
        if revision in meta["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, meta: dict, oid: str) -> list[dict]:
        """Commits reachable from `oid`, newest first (first-parent chain)."""
        out = []
        while oid is not None:
            commit = meta["commits"][oid]
            out.append(commit)
            oid = commit["parents"][0] if commit["parents"] else None
        return out

    def last_commit(self, meta: dict, oid: str, path: str) -> dict:
        """The newest commit from `oid` back that changed `path` (a file or a folder)."""
        def view(files):
            return {p: e for p, e in files.items() if p == path or p.startswith(path.rstrip("/") + "/")}

        chain = self.history(meta, oid)
        for commit, parent in zip(chain, chain[1:] + [None]):
            if parent is None or view(commit["files"]) != view(parent["files"]):
                return commit
        return chain[-1]

    def create_ref(self, repo_id: str, kind: str, name: str, revision: str | None) -> None:
        """Create a branch or tag (`kind` is "branches" or "tags") at `revision` (default: main)."""
        with self.lock:
            meta = self.load(repo_id)
            if name in meta["branches"] or name in meta["tags"]:
                raise HubError(409, f"Reference already exists: {name}")
            meta[kind][name] = self.resolve(meta, revision or "main")
            self._save(repo_id, meta)

    def delete_ref(self, repo_id: str, kind: str, name: str) -> None:
        with self.lock:
            meta = self.load(repo_id)
            if meta[kind].pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self._save(repo_id, meta)

    # ---- commits -----------------------------------------------------------------------------------------------
    @staticmethod
    def _add_commit(meta: dict, parent: str | None, title: str, message: str, files: dict) -> str:
        date = now_iso()
        seed = json.dumps([parent, title, message, date, files, uuid.uuid4().hex], sort_keys=True)
        oid = hashlib.sha1(seed.encode()).hexdigest()
        meta["commits"][oid] = {"oid": oid, "parents": [parent] if parent else [], "title": title,
                                "message": message, "date": date, "files": files}
        return oid

    def commit(self, repo_id: str, branch: str, header: dict, operations: list[dict]) -> str:
        """Apply NDJSON commit operations on top of `branch` as one atomic commit and return its oid.

        Raises HubError: 404 for an unknown repo/branch or a missing deleted path, 412 for a stale `parentCommit`,
        400 for an LFS pointer to content that was never uploaded or an unknown operation.
        """
        with self.lock:
            meta = self.load(repo_id)
            if branch not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {branch} (commits can only be made to a branch)",
                               "RevisionNotFound")
            head = meta["branches"][branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = copy.deepcopy(meta["commits"][head]["files"])
            for op in operations:
                self._apply(files, op["key"], op["value"])
            meta["branches"][branch] = self._add_commit(
                meta, head, header.get("summary") or "Upload files", header.get("description") or "", files)
            self._save(repo_id, meta)
            return meta["branches"][branch]

    def _apply(self, files: dict, key: str, value: dict) -> None:
        path = value.get("path", "")
        if key == "file":
            data = base64.b64decode(value["content"])
            files[path] = {"sha256": self.put_blob(data), "size": len(data), "gitoid": git_sha1(data), "lfs": False}
        elif key == "lfsFile":
            oid, size = value["oid"], int(value["size"])
            if not _SHA256.fullmatch(oid) or not self.has_blob(oid, size):
                raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                                    f"exist: {path} (sha256 {oid}, {size} bytes)")
            files[path] = {"sha256": oid, "size": size, "gitoid": git_sha1(lfs_pointer(oid, size)), "lfs": True}
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")

    # ---- trees -------------------------------------------------------------------------------------------------
    @staticmethod
    def folders(files: dict) -> set[str]:
        """Every folder path implied by the file paths (without the root)."""
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    @staticmethod
    def folder_oid(files: dict, folder: str) -> str:
        inside = sorted((p, e["gitoid"]) for p, e in files.items() if p.startswith(folder + "/"))
        return hashlib.sha1(json.dumps(inside).encode()).hexdigest()
