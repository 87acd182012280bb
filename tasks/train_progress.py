"""What the train-adapter task shows while the training runs, fed by the runtime's TrainingObserver calls (in this
process, or replayed from `<run>/metrics.jsonl` under torchrun):

- Prefect: a `training-progress` progress artifact (percent of steps done; updated at most every
  ARTIFACT_SECONDS and at the end) and one task log line per metrics record (every `training.log_every` steps)
  and per evaluation. Without a terminal (a deployment's worker, `adapterflow run | tee`), Prefect's console
  handler prints those lines: the plain periodic output.
- The terminal, when stderr is one (`adapterflow run` in a shell): a tqdm bar with ETA and the step loss; the
  console log lines are printed above it (tqdm's `logging_redirect_tqdm`) while it runs.
- MLflow (mlflow.enabled): the live run (adapterflow.integrations.mlflow_live), which buffers and never blocks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator, Optional

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from adapterflow.flows.parameters import MlflowSettings, local_path
from adapterflow.runtime.progress import EVAL_KEY, Observers, StepMetrics, TrainingObserver
from adapterflow.tasks.prefect_links import flow_run_url

PROGRESS_KEY = "training-progress"
ARTIFACT_SECONDS = 2.0
MLFLOW_CLOSE_SECONDS = 10.0  # at most this long after training for the live run to send what it holds


class PrefectProgress(TrainingObserver):
    """The progress artifact and the task log lines."""

    def __init__(self, logger, adapter_name: str, steps: int) -> None:
        self.logger, self.steps, self._updated = logger, steps, 0.0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=PROGRESS_KEY,
            description=f"Training of adapter '{adapter_name}': percent of the {steps} optimizer steps done")

    def started(self, start_step: int, steps: int) -> None:
        self.steps = steps
        self._update(start_step, force=True)

    def stepped(self, step: int, loss: float) -> None:
        self._update(step)

    def logged(self, record: StepMetrics) -> None:
        self.logger.info("step %d/%d: loss %.4f, learning_rate %.3e, grad_norm %.4f, epoch %.2f", record.step,
                         self.steps, record.loss, record.learning_rate, record.grad_norm, record.epoch)

    def evaluated(self, step: int, eval_loss: float, at: float) -> None:
        self.logger.info("step %d/%d: eval_loss %.4f", step, self.steps, eval_loss)

    def finished(self) -> None:
        self._update(self.steps, force=True)

    def _update(self, step: int, force: bool = False) -> None:
        if force or time.monotonic() - self._updated >= ARTIFACT_SECONDS:
            self._updated = time.monotonic()
            update_progress_artifact(self.artifact_id, progress=round(100.0 * step / max(1, self.steps), 2))


class TerminalProgress(TrainingObserver):
    """A tqdm bar on `stream` if it is a terminal (else nothing); `close()` ends it."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bar, self._redirect = None, None

    def started(self, start_step: int, steps: int) -> None:
        if self.bar is not None or not self.stream.isatty():
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # A terminal without a size (a pty that nobody sized, e.g. `script` run from a pipe) has 0 rows and
        # columns, which makes tqdm print nothing (it takes the bar for a hidden one); then assume 100 x 24.
        sized = min(_size(self.stream)) > 0
        self.bar = tqdm(total=steps, initial=start_step, desc="training", unit="step", file=self.stream,
                        dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)
        self._redirect = logging_redirect_tqdm()  # console log lines go above the bar, not through it
        self._redirect.__enter__()

    def stepped(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def finished(self) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
            self.bar = None


def _size(stream) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (OSError, ValueError, AttributeError):
        return 0, 0


class MlflowForward(TrainingObserver):
    """Metrics records and evaluations to the live MLflow run (buffered: returns at once)."""

    def __init__(self, live) -> None:
        self.live = live

    def logged(self, record: StepMetrics) -> None:
        self.live.add(record.metrics(), record.step, int(record.time * 1000))

    def evaluated(self, step: int, eval_loss: float, at: float) -> None:
        self.live.add({EVAL_KEY: eval_loss}, step, int(at * 1000))


class TrainingDisplay:
    """`observer`: what the training job reports to; `mlflow`: the live run's final state, after the block
    ({"run_id", "sent", "pending", "dropped", "error"}; None without MLflow)."""

    def __init__(self, observer: TrainingObserver) -> None:
        self.observer, self.mlflow = observer, None


@contextlib.contextmanager
def training_display(plan, mlflow: Optional[MlflowSettings], flow_run_id: Optional[str],
                     logger) -> Iterator[TrainingDisplay]:
    """The observers of one training attempt: Prefect, the terminal and (with mlflow enabled and a flow run id)
    the live MLflow run, which starts now (its start time) and is closed after the block."""
    live = None
    if mlflow is not None and mlflow.enabled and flow_run_id:
        from adapterflow.integrations.mlflow_logging import start_live_run

        live = start_live_run(mlflow, runs_root=local_path(plan.parameters["runs_root"]),
                              plan=plan.model_dump(mode="json"), flow_run_id=flow_run_id,
                              flow_run_url=flow_run_url(flow_run_id), flow_run_name=flow_run.get_name(),
                              start_time_ms=int(time.time() * 1000))
    terminal = TerminalProgress()
    display = TrainingDisplay(Observers(PrefectProgress(logger, plan.adapter_name, plan.training["steps"]),
                                        MlflowForward(live) if live else None, terminal))
    try:
        yield display
    finally:
        terminal.close()
        if live is not None:
            display.mlflow = live.close(min(MLFLOW_CLOSE_SECONDS, mlflow.request_timeout_seconds))
            _report_mlflow(logger, display.mlflow)


def _report_mlflow(logger, status: dict) -> None:
    if status["pending"] or status["dropped"] or status["error"]:
        logger.warning("MLflow: %d metric points sent while training, %d not sent yet (%s); the log-to-mlflow step "
                       "sends them from metrics.jsonl", status["sent"], status["pending"] + status["dropped"],
                       status["error"] or "still sending")
    else:
        logger.info("MLflow run %s: %d metric points logged while training", status["run_id"], status["sent"])
