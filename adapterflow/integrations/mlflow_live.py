"""Live MLflow logging while training runs: a background thread finds or creates the flow run's MLflow run (its
start time: when training started) and sends the metric points as training produces them, so the run and its
charts are there while a long training runs.

It never stops or slows training: `add` only appends to a bounded in-memory buffer (CAPACITY points; past it the
oldest are dropped and counted) and returns; the thread does all the I/O, without MLflow's own HTTP retries
(its own backoff instead: 1 s, doubling up to MAX_BACKOFF_SECONDS) and with the run's request timeout. While the
server is unreachable, points wait in the buffer; whatever is still unsent when training ends (or was dropped)
is sent by the log-to-mlflow step from `<run>/metrics.jsonl`, which logs only the (metric, step) points the run
lacks, so nothing is lost and nothing is logged twice. A retried train task finds the run again (by its
`prefect.flow_run_id` tag) and skips the points it already holds (a resumed run re-trains steps exactly).
"""

from __future__ import annotations

import collections
import itertools
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from adapterflow.integrations import mlflow_run
from adapterflow.integrations.mlflow_client import is_transient_mlflow_error, tracking_client
from adapterflow.redaction import redact_text
from adapterflow.runtime.progress import EVAL_KEY, METRIC_KEYS

CAPACITY = 100_000  # buffered points (~100 bytes each)
BATCH = 1000  # points per log_batch call (MLflow's limit per request)
MAX_BACKOFF_SECONDS = 30.0
LIVE_KEYS = (*METRIC_KEYS, EVAL_KEY)


class LiveRun:
    """The MLflow run of one flow run, fed from training. Call `start()`, then `add(...)` from the training loop,
    then `close(...)`."""

    def __init__(self, settings, uri: str, *, experiment: str, runs_root: Path, flow_run_id: str, run_name: str,
                 tags: dict[str, str], params: dict[str, str], start_time_ms: int, capacity: int = CAPACITY) -> None:
        from mlflow import MlflowClient  # noqa: F401 - imported here, in the caller's thread, not in the worker's

        self.uri, self.experiment, self.runs_root = uri, experiment, Path(runs_root).absolute()
        self.flow_run_id, self.run_name, self.tags, self.params = flow_run_id, run_name, tags, params
        self.start_time_ms = start_time_ms
        # No MLflow HTTP retries in the worker (it backs off by itself and must notice `close`); the run's timeout.
        self._settings = SimpleNamespace(max_retries=0, request_timeout_seconds=settings.request_timeout_seconds)
        self.run_id: Optional[str] = None
        self.sent = self.dropped = 0
        self.error: Optional[str] = None  # the last failure, redacted
        self._queue: collections.deque = collections.deque(maxlen=capacity)  # (sequence number, Metric)
        self._sequence = itertools.count()
        self._logged: set[tuple[str, int]] = set()  # (key, step) the run already had when found
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="mlflow-live", daemon=True)

    def start(self) -> "LiveRun":
        self._thread.start()
        return self

    def add(self, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        """Queue one point per metric (never blocks on I/O)."""
        from mlflow.entities import Metric

        with self._cond:
            for key, value in values.items():
                if len(self._queue) == self._queue.maxlen:
                    self.dropped += 1
                self._queue.append((next(self._sequence), Metric(key, float(value), int(timestamp_ms), int(step))))
            self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, wait_seconds: float) -> dict:
        """Stop the thread: a healthy one first sends what is queued (waiting at most `wait_seconds`); one that
        is backing off from a failure stops at once. Returns {"run_id", "sent", "pending", "dropped", "error"}."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(wait_seconds)
        return {"run_id": self.run_id, "sent": self.sent, "pending": self.pending, "dropped": self.dropped,
                "error": self.error}

    def _work(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                if delay:
                    if self._cond.wait_for(lambda: self._closing, timeout=delay):
                        return  # unreachable and closing: log-to-mlflow sends the rest
                else:
                    self._cond.wait_for(lambda: self._closing or self._queue or self.run_id is None)
                    if self._closing and not self._queue and self.run_id is not None:
                        return
                batch = list(itertools.islice(self._queue, BATCH))
            try:
                self._send([metric for _, metric in batch])
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none may reach training
                self.error = redact_text(str(exc))[:500]
                if not is_transient_mlflow_error(exc):
                    return  # refused: retrying sends the same request; log-to-mlflow reports it
                delay = min(MAX_BACKOFF_SECONDS, max(1.0, 2 * delay))
                continue
            delay = 0.0
            with self._cond:
                while self._queue and batch and self._queue[0][0] <= batch[-1][0]:
                    self._queue.popleft()

    def _send(self, metrics: list) -> None:
        with tracking_client(self._settings, self.uri) as client:
            if self.run_id is None:
                self._open(client)
            new = [m for m in metrics if (m.key, m.step) not in self._logged]
            if new:
                client.log_batch(self.run_id, metrics=new)
            self.sent += len(new)

    def _open(self, client) -> None:
        """Find (a retried task) or create the run, with the params; remember the points it already has."""
        from mlflow.entities import Param

        experiment_id = mlflow_run.experiment_id(client, self.experiment, self.uri, self.runs_root)
        run, found = mlflow_run.find_or_create_run(client, experiment_id, self.flow_run_id, self.run_name, self.tags,
                                                   start_time=self.start_time_ms)
        run_id = run.info.run_id
        if found:
            self._logged = {(key, m.step) for key in LIVE_KEYS for m in client.get_metric_history(run_id, key)}
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        params = [Param(k, v) for k, v in self.params.items() if run.data.params.get(k) != v]
        if params:
            client.log_batch(run_id, params=params)
        self.run_id = run_id
