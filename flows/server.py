"""A temporary Prefect API server for `adapterflow run` that cannot outlive the CLI, and SIGTERM as Ctrl-C.

Why not Prefect's own temporary server: without PREFECT_API_URL, Prefect 3.9 starts one itself
(`prefect/server/api/server.py`, `SubprocessASGIServer.start` / `_run_uvicorn_command`): a plain
`subprocess.Popen` of `python -m uvicorn --factory prefect.server.api.server:create_app ...`, stopped only by
`atexit.register(self.stop)`. atexit never runs when the CLI is SIGKILLed (or dies of a signal it does not
handle), so that uvicorn process is left behind, orphaned, holding its port and the SQLite DB in PREFECT_HOME.

`temporary_prefect_api` starts the same command, with the same environment markers, but:
- Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)` in the child: the kernel sends it SIGTERM when the CLI dies, however
  it dies (the death of the thread that started it, which is the main thread here);
- in its own process group, so a terminal's Ctrl-C reaches only the CLI, which first sends its queued logs and
  events, then stops the server (a server gone before that drain makes exit hang about 80 s);
- its output goes to `$PREFECT_HOME/temporary-server.log`, not to the terminal.
The server keeps its DB where Prefect's own temporary server keeps it (PREFECT_HOME), so the run history is the same.

This module imports nothing from prefect: it must run before `import prefect`, which reads PREFECT_API_URL once.
On other platforms than Linux there is no PDEATHSIG: a SIGKILLed CLI still leaves the server behind there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from adapterflow.runtime.processes import die_with_parent as _die_with_parent

STOP_TIMEOUT_S = 5  # then SIGKILL, as Prefect's SubprocessASGIServer.stop does
DRAIN_TIMEOUT_S = 10
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def uses_temporary_server() -> bool:
    """Whether `temporary_prefect_api` will start a server of its own (no PREFECT_API_URL): one that ends with
    the command."""
    return not os.environ.get("PREFECT_API_URL")


@contextlib.contextmanager
def temporary_prefect_api() -> Iterator[str]:
    """Yield a Prefect API URL: PREFECT_API_URL when set, else that of a temporary server started here.

    The temporary server's URL is in `os.environ["PREFECT_API_URL"]` inside the block, so a later `import prefect`
    uses it (PREFECT_UI_URL is "" unless set: the server has no UI). On leaving the block (normally, by an exception
    or a KeyboardInterrupt), Prefect's queued logs and events are sent, the server is stopped and both variables
    are restored.

    Raises:
        RuntimeError: the server exited or was not healthy within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
            (default 120); the message has the tail of its log.
    """
    if not uses_temporary_server():
        given = os.environ["PREFECT_API_URL"]
        _check_reachable(given)
        yield given
        return
    server, url = _start_server(_log_path())
    # An empty PREFECT_UI_URL: no "View at" links to a UI that is off (PREFECT_UI_ENABLED=0) and soon gone.
    client_env = {"PREFECT_API_URL": url, "PREFECT_UI_URL": os.environ.get("PREFECT_UI_URL", "")}
    saved = {name: os.environ.get(name) for name in client_env}
    try:
        os.environ.update(client_env)
        with _prefect_settings(client_env):
            try:
                yield url
            finally:
                _drain_prefect_workers()  # while prefect still points at the server
    finally:
        _restore_environ(saved)
        _stop(server)


class PrefectApiUnreachable(ValueError):
    """PREFECT_API_URL names a server that does not answer: a setting to fix, not a failure to retry."""

    transient = False


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    import urllib.request

    from adapterflow.redaction import redact_text

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise PrefectApiUnreachable(
        f"PREFECT_API_URL={redact_text(url)}: no Prefect API answers there ({redact_text(reason)}). Start the "
        f"server (`prefect server start`), fix the URL, or unset PREFECT_API_URL to run on a temporary local one.")


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so `finally` blocks run and the flow
    run is marked crashed instead of the process dying on the spot; the previous handler is restored after.

    Raises:
        ValueError: not called from the main thread (only the main thread may set signal handlers).
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start uvicorn with Prefect's app on a free port and wait until /api/health answers.

    Raises:
        RuntimeError: see `temporary_prefect_api`.
    """
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(_prefect_package_parent()), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    with log_path.open("a") as log:
        log.write(f"--- adapterflow pid {os.getpid()}: temporary Prefect server on port {port}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        server = subprocess.Popen(command, env={**os.environ, **_SERVER_ENV}, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, process_group=0,
                                  preexec_fn=_die_with_parent(os.getpid()))
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(server, url, log_path)
    except BaseException:
        _stop(server)
        raise
    return server, url


def _wait_healthy(server: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll `url/health` every 0.1 s until it answers 200.

    Raises:
        RuntimeError: the server exited, or the startup timeout passed; with the tail of `log_path`.
    """
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            problem = f"exited with code {server.returncode}"
            break
        with contextlib.suppress(OSError):
            with opener.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    else:
        problem = f"was not healthy within {timeout:g} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"The temporary Prefect server at {url} {problem}. "
                       f"Last lines of {log_path}:\n{tail}\n"
                       "Set PREFECT_API_URL to use a running server (`prefect server start`) instead.")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; reaps the process."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
    server.wait()


def _restore_environ(saved: dict[str, str | None]) -> None:
    """Put back the saved environment variables; None: it was not set."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _drain_prefect_workers() -> None:
    """Send the logs and events prefect still has queued, if prefect was imported; with the server gone first,
    their retries make the process hang about 80 s at exit."""
    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        worker = getattr(sys.modules.get(module), name, None)
        if worker is not None:
            worker.drain_all(timeout=DRAIN_TIMEOUT_S)


def _prefect_settings(client_env: dict[str, str]) -> contextlib.AbstractContextManager:
    """If prefect is already imported (`python -m adapterflow.flows.save_adapter` imports it before the CLI runs),
    its frozen settings must be given `client_env` too; else the environment variables suffice."""
    settings = sys.modules.get("prefect.settings")
    if settings is None:
        return contextlib.nullcontext()
    return settings.temporary_settings(updates={getattr(settings, name): value for name, value in client_env.items()})


def _free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_package_parent() -> Path:
    """The folder holding the `prefect` package (uvicorn's --app-dir, as Prefect passes it), found without
    importing prefect."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise RuntimeError("prefect is not installed in this environment")
    return Path(spec.origin).parent.parent


def _log_path() -> Path:
    """`$PREFECT_HOME/temporary-server.log` (PREFECT_HOME defaults to ~/.prefect, as in prefect)."""
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home / "temporary-server.log"
