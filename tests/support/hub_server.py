"""A local fake of the Hugging Face Hub, enough for the real `huggingface_hub` client to push and download model repos,
and for `datasets.load_dataset` to download dataset repos.

Usage::

    with HubServer(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("tester/adapter")
        hub.add_fault("POST", r"/commit/", status=503)    # the next commit fails once
        ...

The client must run with `HF_HUB_DISABLE_XET=1` (set before `huggingface_hub` is imported, or
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`): this server never speaks Xet, so uploads take the classic
path: preupload -> LFS batch / PUT / verify -> one NDJSON commit. Downloads are plain `resolve` HEAD + GET.

Behaviour worth knowing:
- Every route needs `Authorization: Bearer <token>` except the LFS PUT (it stands in for a presigned URL) and the
  control routes `/_faults` and `/_log`. A 401 on a repo route carries `X-Error-Code: RepoNotFound`, as on the Hub.
- A new repo gets the Hub's "initial commit" holding a `.gitattributes` file.
- Model and dataset repos (the same routes, under `/api/datasets/...` and `/datasets/...` for datasets; the
  inspection helpers below name a dataset repo `datasets/<ns>/<name>`). Space routes answer 400; so do pull
  requests (`create_pr=1`). `datasets.load_dataset(repo_id)` needs `datasets.config.HF_ENDPOINT` pointed at `url`
  (datasets reads HF_ENDPOINT at import); it also asks the dataset viewer (`datasets-server.<host>`), which does
  not resolve, and datasets then reads the files themselves.
- Faults (`add_fault`, or POST `/_faults` with a JSON list of the same fields) match by method and a regex searched
  in the request path (with query); each match consumes one `count` (None: unlimited). A fault with `status` answers
  that status after `delay` seconds; one with `status=None` only delays the normal handling.
- `requests` logs `(method, path, status)` for every non-control request (also GET `/_log`); no headers are logged.

The HTTP routes live in `hub_protocol.py`, the on-disk repos, commits and blobs in `hub_store.py`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from hub_protocol import HubHandler  # tests/ is on sys.path (pytest rootdir imports)
from hub_store import HubStore


@dataclass
class Fault:
    """An injected failure; see the module docstring."""

    method: str | None = None
    path_regex: str = ""
    status: int | None = 503
    count: int | None = 1
    delay: float = 0.0
    message: str = "Injected fault"
    headers: dict = field(default_factory=dict)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and re.search(self.path_regex, path) is not None


class _HTTPServer(ThreadingHTTPServer):
    """Keeps track of open connections so `stop()` can cut keep-alive sockets held by the client's pool."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        super().__init__(*args, **kwargs)

    def get_request(self):
        sock, addr = super().get_request()
        self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)


class HubServer:
    """The fake Hub: `start()` serves on 127.0.0.1 at a free port from a daemon thread; `stop()` shuts it down.

    Args:
        root_dir: where repos and blobs are stored; a new server on the same folder sees the same repos.
        token: the only accepted token.
        user: the user name `whoami` returns and the default namespace of `create_repo`.

    Attributes:
        url: `http://127.0.0.1:<port>` while started (RuntimeError otherwise).
        requests: `(method, path with query, status)` per served request, oldest first (0: no response sent).
        faults: the live `Fault`s, consumed in order.
        store: the `HubStore` holding repos and blobs.
    """

    def __init__(self, root_dir: Path, token: str = "hf_test_token", user: str = "tester"):
        self.store = HubStore(root_dir)
        self.token, self.user = token, user
        self.requests: list[tuple[str, str, int]] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError(f"HubServer is already serving at {self.url}")
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self._httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for sock in list(self._httpd.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()
        self._httpd = self._thread = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- faults and log ----------------------------------------------------------------------------------------
    def add_fault(self, method: str | None = "POST", path_regex: str = "", status: int | None = 503,
                  count: int | None = 1, delay: float = 0.0, message: str = "Injected fault",
                  headers: dict | None = None) -> Fault:
        """Make the next `count` requests matching `method` and `path_regex` fail with `status` (or just wait)."""
        if count is not None and count < 1:
            raise ValueError(f"count must be None (unlimited) or at least 1, got {count}")
        re.compile(path_regex)
        fault = Fault(method, path_regex, status, count, delay, message, dict(headers or {}))
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Consume one count of the first live fault matching this request."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- inspection helpers for tests ---------------------------------------------------------------------------
    def commits(self, repo_id: str, branch: str = "main") -> list[dict]:
        """Commits on `branch`, newest first: dicts with oid, parents, title, message, date and files
        (path -> {"sha256", "size", "gitoid", "lfs"}). The oldest is the Hub's "initial commit"."""
        meta = self.store.load(repo_id)
        return self.store.history(meta, meta["branches"][branch])

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Content of `path` at a branch, tag or commit sha; KeyError when the file is not there."""
        meta = self.store.load(repo_id)
        entry = meta["commits"][self.store.resolve(meta, revision)]["files"][path]
        return self.store.blob_path(entry["sha256"]).read_bytes()

    def refs(self, repo_id: str) -> dict:
        """{"branches": {name: oid}, "tags": {name: oid}}."""
        meta = self.store.load(repo_id)
        return {"branches": dict(meta["branches"]), "tags": dict(meta["tags"])}


@contextlib.contextmanager
def isolated_hub_client(home: Path):
    """Run the huggingface_hub client with a private HF_HOME, no Xet (this server has none), no telemetry, and no
    HF_TOKEN / HF_ENDPOINT from the developer's shell. The client reads some of these at import, hence the
    constants are patched too."""
    import pytest
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_TOKEN", raising=False)
        mp.delenv("HF_ENDPOINT", raising=False)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        yield home


def module_hub_fixture(token: str):
    """A module-scoped pytest fixture: a HubServer requiring `token`, with the huggingface_hub client isolated
    (its own HF_HOME) for the module. Use as `hub = module_hub_fixture(TOKEN)` in a test module."""
    import pytest

    @pytest.fixture(scope="module")
    def hub(tmp_path_factory):
        with isolated_hub_client(tmp_path_factory.mktemp("hf-home")), \
                HubServer(tmp_path_factory.mktemp("hub"), token=token) as server:
            yield server

    return hub
