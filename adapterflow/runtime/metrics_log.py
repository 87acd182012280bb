"""`<run>/metrics.jsonl`: the training metrics as rank 0 produces them, one JSON object per line, appended.

Why a file: under torchrun the training runs in other processes (on several machines, rank 0 may not even be on
the flow's node), and the run folder is the one place every rank and the flow share (README, "Several processes
and machines"). Rank 0 appends here; the train task tails the file and forwards each record to its observers
(MLflow, Prefect, the terminal) exactly as the one-process path calls them; the log-to-mlflow step reads the whole
history back to complete the MLflow record. The file survives a crash of any process, so nothing logged is lost.

Lines (`time` is the wall clock in seconds since the epoch):
    {"event": "start", "start_step": N, "steps": S, "time": t}      each training attempt (N > 0: resumed)
    {"event": "progress", "step": s, "loss": l, "time": t}          at most one per PROGRESS_INTERVAL seconds
    {"step": s, "loss": ..., "learning_rate": ..., "grad_norm": ..., "epoch": ..., "time": t}   every log_every
    {"step": s, "eval_loss": ..., "time": t}                        each evaluation (step 0: before training)
    {"event": "end", "time": t}

An attempt that resumes from the checkpoint at step N supersedes the records after step N of the attempts
before it (they trained steps that were trained again): `read_history` keeps, per metric and step, the value of
the newest attempt, so the history has each step once.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from adapterflow.runtime.progress import EVAL_KEY, METRIC_KEYS, StepMetrics, TrainingObserver, now

PROGRESS_INTERVAL = 1.0  # seconds between "progress" lines (the terminal bar under torchrun)
POLL_SECONDS = 0.25  # how often a tail looks for new lines


@dataclass(frozen=True)
class MetricPoint:
    key: str
    value: float
    step: int
    timestamp_ms: int


class MetricsFile(TrainingObserver):
    """Appends the records to `path` (line-buffered; each line written whole with one write)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._last_progress = 0.0

    def started(self, start_step: int, steps: int) -> None:
        self._write({"event": "start", "start_step": start_step, "steps": steps, "time": now()})

    def stepped(self, step: int, loss: float) -> None:
        if now() - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now()
            self._write({"event": "progress", "step": step, "loss": loss, "time": self._last_progress})

    def logged(self, record: StepMetrics) -> None:
        self._write({"step": record.step, **record.metrics(), "time": record.time})

    def evaluated(self, step: int, eval_loss: float, at: float) -> None:
        self._write({"step": step, EVAL_KEY: eval_loss, "time": at})

    def finished(self) -> None:
        self._write({"event": "end", "time": now()})

    def _write(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # O_APPEND: a reader never sees half of another writer's line
        finally:
            os.close(fd)


def read_history(path: str | os.PathLike) -> list[MetricPoint]:
    """Every metric point of the file, each (metric, step) once: the newest attempt's value (module docstring).
    [] when there is no file (a run folder from before metrics.jsonl)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    points: dict[tuple[str, int], MetricPoint] = {}
    for line in lines:
        record = _parse(line)
        try:
            points = _add(points, record) if record is not None else points
        except (KeyError, TypeError, ValueError):  # a record of another version: skipped
            continue
    return sorted(points.values(), key=lambda p: (p.key, p.step))


def _add(points: dict[tuple[str, int], MetricPoint], record: dict) -> dict[tuple[str, int], MetricPoint]:
    """`points` updated by one record: a start event drops what it supersedes, a metrics line adds its values."""
    if record.get("event") == "start":
        start = int(record["start_step"])
        return {k: p for k, p in points.items() if p.step <= start}
    if "event" not in record:
        stamp, step = int(float(record["time"]) * 1000), int(record["step"])
        for key in (*METRIC_KEYS, EVAL_KEY):
            if key in record:
                points[(key, step)] = MetricPoint(key, float(record[key]), step, stamp)
    return points


def replay(record: dict, observer: TrainingObserver) -> None:
    """Call `observer` as the training loop did for this record."""
    event = record.get("event")
    if event == "start":
        observer.started(int(record["start_step"]), int(record["steps"]))
    elif event == "progress":
        observer.stepped(int(record["step"]), float(record["loss"]))
    elif event == "end":
        observer.finished()
    elif EVAL_KEY in record:
        observer.evaluated(int(record["step"]), float(record[EVAL_KEY]), float(record["time"]))
    elif all(key in record for key in METRIC_KEYS):
        observer.logged(StepMetrics(int(record["step"]), *(float(record[k]) for k in METRIC_KEYS),
                                    time=float(record["time"])))


@contextlib.contextmanager
def tail(path: str | os.PathLike, observer: TrainingObserver) -> Iterator[None]:
    """For the block's duration, a thread replays each record appended to `path` (from its size at entry) to
    `observer`; on exit it reads to the end once more, so every record written inside the block is delivered.
    The thread runs in a copy of the caller's context (contextvars: e.g. Prefect's settings and run context)."""
    path = Path(path)
    state = {"offset": path.stat().st_size if path.exists() else 0, "partial": b""}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            _read_new(path, state, observer)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(poll,), name="metrics-tail", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _read_new(path, state, observer)


def _read_new(path: Path, state: dict, observer: TrainingObserver) -> None:
    try:
        with open(path, "rb") as file:
            file.seek(state["offset"])
            data = file.read()
    except FileNotFoundError:
        return
    state["offset"] += len(data)
    *lines, state["partial"] = (state["partial"] + data).split(b"\n")
    for line in lines:
        record = _parse(line.decode(errors="replace"))
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a record of another version: skipped
            if record is not None:
                replay(record, observer)


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut by a crash
        return None
    return record if isinstance(record, dict) else None
