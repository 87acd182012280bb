"""What the training loop reports while it runs, and to whom: a `TrainingObserver` receives the start, every
step (for progress bars), a metrics record every `TrainingSettings.log_every` steps and every evaluation.

The runtime knows nothing of MLflow or Prefect: the Prefect task passes observers that forward to them
(adapterflow.tasks.train_progress). Only rank 0 calls an observer. The metrics are the ones HF Trainer's
MLflowCallback logs (transformers/integrations/integration_utils.py, `Trainer.log`): `loss` (the mean step loss
since the previous record), `learning_rate` (after the scheduler step, as HF logs it), `grad_norm` (the total
norm before clipping that `torch.nn.utils.clip_grad_norm_` returns, of the record's last step), `epoch`
(fractional: micro-batches consumed / micro-batches per epoch) and `eval_loss`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

LOGGER = logging.getLogger(__name__)
METRIC_KEYS = ("loss", "learning_rate", "grad_norm", "epoch")
EVAL_KEY = "eval_loss"


@dataclass(frozen=True)
class StepMetrics:
    """One metrics record, logged at optimizer step `step` (1-based)."""

    step: int
    loss: float  # mean loss per label token over the steps since the previous record
    learning_rate: float
    grad_norm: float  # pre-clip total L2 norm of the trainable parameters' gradients, last step of the record
    epoch: float  # fractional epochs done after this step
    time: float  # wall clock, seconds since the epoch (time.time())

    def metrics(self) -> dict[str, float]:
        """The values by metric name (METRIC_KEYS)."""
        values = asdict(self)
        return {key: float(values[key]) for key in METRIC_KEYS}


class TrainingObserver:
    """Receives training progress; every method does nothing here. Called from the training loop (rank 0), so an
    implementation must return quickly: anything slow (network) belongs in a thread of its own."""

    def started(self, start_step: int, steps: int) -> None:
        """Training starts at `start_step` (0, or the step of the checkpoint it resumes from) of `steps`."""

    def stepped(self, step: int, loss: float) -> None:
        """Optimizer step `step` (1-based) is done; `loss` is its loss. For progress displays."""

    def logged(self, record: StepMetrics) -> None:
        """A metrics record: every `log_every` steps and after the last step."""

    def evaluated(self, step: int, eval_loss: float, at: float) -> None:
        """The eval loss after `step` optimizer steps (0: before training), computed at wall-clock time `at`."""

    def finished(self) -> None:
        """The training loop is done (not called when it raised)."""


class Observers(TrainingObserver):
    """Several observers as one. An observer that raises is logged (once) and left out from then on: reporting
    must never stop training."""

    def __init__(self, *observers: TrainingObserver | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def started(self, start_step: int, steps: int) -> None:
        self._each("started", start_step, steps)

    def stepped(self, step: int, loss: float) -> None:
        self._each("stepped", step, loss)

    def logged(self, record: StepMetrics) -> None:
        self._each("logged", record)

    def evaluated(self, step: int, eval_loss: float, at: float) -> None:
        self._each("evaluated", step, eval_loss, at)

    def finished(self) -> None:
        self._each("finished")

    def _each(self, method: str, *args) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, method)(*args)
            except Exception:  # noqa: BLE001 - a broken display or sink must not end the training
                LOGGER.warning("Training progress observer %s failed in %s; it gets no more updates",
                               type(observer).__name__, method, exc_info=True)
                self.observers.remove(observer)


def record_steps(steps: int, log_every: int) -> list[int]:
    """The steps (1-based) that get a metrics record: every multiple of log_every, and the last step."""
    return sorted({*range(log_every, steps + 1, log_every), steps}) if steps > 0 else []


def is_record_step(step: int, steps: int, log_every: int) -> bool:
    return step % log_every == 0 or step == steps


def window_mean(losses: list[float], step: int, log_every: int) -> float:
    """The mean loss of the steps since the previous record step (HF's `loss`: tr_loss over the logging
    interval); `losses[i]` is step i + 1's. The same after a resume, since the loss history is restored."""
    first = ((step - 1) // log_every) * log_every
    window = losses[first:step]
    return sum(window) / len(window)


def now() -> float:
    return time.time()
