"""What `adapterflow run` prints while training: in a terminal (a real pty, python's `pty` module) a tqdm bar with
ETA and the loss; without one, a line every training.log_every steps, not one per step. Either way it ends with
the summary."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ADAPTERFLOW = Path(sys.executable).parent / "adapterflow"
STEPS, LOG_EVERY = 12, 4
SETTINGS = [f"training.steps={STEPS}", f"training.log_every={LOG_EVERY}", "training.batch_size=4",
            "training.max_seq_len=32", "training.checkpoint_every=12", "adapter.init=lora", "adapter.r=2",
            "dataset.eval_fraction=0.02", "mlflow.enabled=false"]


def _command(tmp_path: Path) -> list[str]:
    return [str(ADAPTERFLOW), "run", "--set", f"runs_root={tmp_path / 'runs'}",
            *(arg for setting in SETTINGS for arg in ("--set", setting))]


@pytest.mark.slow
def test_without_a_terminal_it_prints_a_line_every_log_every_steps(tmp_path, prefect_api):
    result = subprocess.run(_command(tmp_path), env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    steps = re.findall(rf"step (\d+)/{STEPS}: loss [\d.]+, learning_rate \S+, grad_norm [\d.]+, epoch [\d.]+", output)
    assert steps == ["4", "8", "12"]  # not one line per step
    assert re.findall(rf"step (\d+)/{STEPS}: eval_loss [\d.]+", output) == ["0", str(STEPS)]
    assert "%|" not in output and "\r" not in output  # no progress bar
    assert re.search(r"^adapter:\s+\S+", result.stdout, re.M) and re.search(r"^eval loss:\s+[\d.]+ -> ", result.stdout, re.M)


@pytest.mark.slow
def test_in_a_terminal_it_shows_a_progress_bar(tmp_path, prefect_api):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    process = subprocess.Popen(_command(tmp_path), env={**os.environ, "PREFECT_API_URL": prefect_api, "TERM": "xterm"},
                               cwd=tmp_path, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    output = _read_all(controller, process, timeout=600)
    assert process.wait(timeout=30) == 0, output[-3000:]
    bars = re.findall(rf"training:\s+(\d+)%\|[^|]*\|\s*(\d+)/{STEPS} \[[\d:]+<[\d:?]+, [^\]]*loss=([\d.]+)\]", output)
    assert bars and bars[-1][:2] == ("100", str(STEPS)), output[-3000:]  # steps, elapsed<ETA, the loss
    assert "\r" in output  # redrawn in place
    assert re.search(rf"step 8/{STEPS}: loss [\d.]+", output)  # the periodic lines, printed above the bar
    assert re.search(r"adapter:\s+\S+", output) and re.search(r"eval loss:\s+[\d.]+ -> [\d.]+", output)


def test_the_bar_shows_in_a_terminal_that_has_no_size():
    """A pty nobody sized (0 rows, 0 columns, as under `script` run from a pipe): tqdm alone would print nothing."""
    from adapterflow.tasks.train_progress import TerminalProgress

    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as stream:
        bar = TerminalProgress(stream)
        bar.started(0, 3)
        for step in (1, 2, 3):
            bar.stepped(step, 1.0 / step)
        bar.finished()
    output = b""
    while select.select([controller], [], [], 0.5)[0]:
        try:
            output += os.read(controller, 65536)
        except OSError:
            break
    os.close(controller)
    assert re.search(r"training: 100%\|.*\| 3/3 .*loss=0\.3333", output.decode(errors="replace")), output


def _read_all(controller: int, process: subprocess.Popen, timeout: float) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    return b"".join(chunks).decode(errors="replace")
