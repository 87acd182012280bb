"""`adapterflow run` ended by Ctrl-C, SIGTERM or SIGKILL leaves no process behind (flows/server.py).

Real processes: the CLI runs without PREFECT_API_URL, so it starts its own temporary Prefect server, in a new session
so that its descendants can be found through /proc.
"""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterflow.flows.server import temporary_prefect_api

ADAPTERFLOW = Path(sys.executable).parent / "adapterflow"
# Long enough never to finish before the signal (the fused LoRA step trains 400 tiny steps in seconds).
TINY_RUN = ["training.steps=100000", "training.log_every=10", "training.batch_size=8", "training.max_seq_len=32", "mlflow.enabled=false",
            "adapter.init=lora"]


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) of every process, from /proc/<pid>/stat."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of `root` (so a reused pid is not mistaken for it)."""
    table, found, frontier = _processes(), {}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, state, _) in table.items() if ppid in frontier and state != "Z"}
        found.update({pid: table[pid][2] for pid in frontier})
    return found


def _alive(recorded: dict[int, str]) -> dict[int, str]:
    """Those of `recorded` still running (a zombie, dead but not reaped by its new parent, counts as gone)."""
    table = _processes()
    return {pid: start for pid, start in recorded.items() if pid in table and table[pid][1] != "Z"
            and table[pid][2] == start}


def _wait_gone(recorded: dict[int, str], timeout: float) -> dict[int, str]:
    """Wait up to `timeout` s for every recorded process to end; return those left."""
    deadline = time.monotonic() + timeout
    while (left := _alive(recorded)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _as_from_a_terminal() -> None:
    """SIGINT as a shell's foreground command gets it: default, even when the test itself runs with SIGINT ignored
    (pytest started as a background job `cmd &`, which a non-interactive shell starts with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for the module: its DB is migrated by the first run only."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def training_run(tmp_path, prefect_home):
    """Start `adapterflow run` and wait until it is training; yield (process, its descendants, output file).
    Afterwards SIGKILL whatever of it is still running."""
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    output = tmp_path / "output.txt"
    arguments = [arg for item in [f"runs_root={tmp_path / 'runs'}", *TINY_RUN] for arg in ("--set", item)]
    with output.open("w") as out:
        process = subprocess.Popen([str(ADAPTERFLOW), "run", *arguments], env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_as_from_a_terminal)
    recorded = {}
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"step \d+/100000", output.read_text()):
            assert process.poll() is None, f"adapterflow run ended before training:\n{output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.1)
        recorded = _descendants(process.pid)
        servers = [pid for pid in recorded if "prefect.server.api.server:create_app" in _command_line(pid)]
        assert len(servers) == 1, {pid: _command_line(pid) for pid in recorded}
        yield process, recorded, output
    finally:
        for pid in _alive(recorded):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _flow_run_state(prefect_home: Path, runs_root: Path) -> str:
    """The state of the run's flow run in the Prefect DB (the run folder is named after the flow run id)."""
    (run_dir,) = runs_root.iterdir()
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        (state,) = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (run_dir.name,)).fetchone()
    return state


@pytest.mark.parametrize("interrupt", ["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_no_process_and_marks_the_flow_run(training_run, interrupt, prefect_home, tmp_path):
    process, recorded, output = training_run
    if interrupt == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)  # a terminal sends SIGINT to the whole foreground process group
    else:
        process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    returncode = process.wait(timeout=20)
    assert not _wait_gone(recorded, 3), "processes left after the CLI exited"
    text = output.read_text()
    assert returncode == 130 and "adapterflow run: interrupted" in text, text[-3000:]  # SIGTERM acts as Ctrl-C
    assert "Error logging to API" not in text  # logs were sent before the server stopped
    assert time.monotonic() - started < 20
    assert _flow_run_state(prefect_home, tmp_path / "runs") == "CRASHED"


def test_temporary_server_exits_when_the_cli_is_killed(training_run):
    process, recorded, _ = training_run
    (server,) = [pid for pid in recorded if "create_app" in _command_line(pid)]
    assert _alive({server: recorded[server]})
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not _wait_gone({server: recorded[server]}, 10), "the temporary server outlived the SIGKILLed CLI"


def test_a_given_api_url_is_used_as_is_and_nothing_starts(monkeypatch, prefect_api):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    before = _descendants(os.getpid())
    with temporary_prefect_api() as url:
        assert url == prefect_api
        assert _descendants(os.getpid()).keys() <= before.keys()
    assert os.environ["PREFECT_API_URL"] == prefect_api


def test_a_given_api_url_that_answers_nothing_is_refused(monkeypatch):
    from adapterflow.flows.server import PrefectApiUnreachable

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    with pytest.raises(PrefectApiUnreachable, match="PREFECT_API_URL=http://127.0.0.1:1/api: no Prefect API"):
        with temporary_prefect_api():
            pass


def test_a_server_that_is_not_healthy_in_time_is_stopped_and_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "1")  # an int, as in prefect
    before = _descendants(os.getpid())
    with pytest.raises(RuntimeError, match=r"was not healthy within 1 s.*temporary-server.log"):
        with temporary_prefect_api():
            pass
    assert _descendants(os.getpid()).keys() <= before.keys()
    assert "PREFECT_API_URL" not in os.environ
