"""What training reports while it runs (adapterflow.runtime.progress, metrics_log): the metrics records every
log_every steps (HF's loss / learning_rate / grad_norm / epoch), eval_loss before, during and after, the
metrics.jsonl history across an interrupted and resumed run, and the tail that carries it across processes."""

from __future__ import annotations

import json

import pytest

from adapterflow.runtime.metrics_log import MetricsFile, read_history, tail
from adapterflow.runtime.progress import StepMetrics, TrainingObserver, record_steps, window_mean
from adapterflow.runtime.train_job import run_training_job
from tiny import training_job

STEPS, LOG_EVERY, EVAL_EVERY = 7, 3, 4


class Recorder(TrainingObserver):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events, self.stop_at = [], stop_at

    def started(self, start_step, steps):
        self.events.append(("started", start_step, steps))

    def stepped(self, step, loss):
        self.events.append(("stepped", step))
        if step == self.stop_at:
            raise KeyboardInterrupt  # a crash in the middle of training (BaseException: not swallowed)

    def logged(self, record):
        self.events.append(("logged", record))

    def evaluated(self, step, eval_loss, at):
        self.events.append(("evaluated", step, eval_loss))

    def finished(self):
        self.events.append(("finished",))

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


def test_record_steps_and_window_means():
    assert record_steps(7, 3) == [3, 6, 7] and record_steps(8, 1) == list(range(1, 9)) and record_steps(5, 50) == [5]
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert [window_mean(losses, s, 3) for s in (3, 6, 7)] == [2.0, 5.0, 7.0]


def test_interrupted_and_resumed_training_reports_each_step_once(tmp_path):
    job = training_job(tmp_path / "run", steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY, checkpoint_every=4,
                       max_grad_norm=1e-3)
    crashed = Recorder(stop_at=7)  # after the checkpoint at step 4 and the record at step 6
    with pytest.raises(KeyboardInterrupt):
        run_training_job(job, log=lambda line: None, observer=crashed)
    assert [e[1].step for e in crashed.of("logged")] == [3, 6] and crashed.of("finished") == []
    resumed = Recorder()
    summary = run_training_job(job, log=lambda line: None, observer=resumed)

    assert summary["resumed_from"] == 4 and resumed.of("started") == [("started", 4, STEPS)]
    assert [e[1] for e in resumed.of("stepped")] == [5, 6, 7] and len(resumed.of("finished")) == 1
    records: list[StepMetrics] = [e[1] for e in resumed.of("logged")]
    assert [r.step for r in records] == [6, 7]
    # loss: the mean of the steps since the previous record, from the restored history (not just 5-6)
    assert records[0].loss == pytest.approx(sum(summary["losses"][3:6]) / 3)
    assert records[1].loss == pytest.approx(summary["losses"][6])
    assert all(r.grad_norm > 1e-3 for r in records)  # clip_grad_norm_'s pre-clip norm, above max_grad_norm
    assert [e[1] for e in resumed.of("evaluated")] == [0, STEPS]  # step 4's evaluation was before the checkpoint
    assert resumed.of("evaluated")[-1][2] == summary["eval_loss_after"]
    assert summary["started_at"] <= records[0].time <= summary["finished_at"]
    assert summary["log_every"] == LOG_EVERY

    history = read_history(job.run.metrics)
    steps = {key: [p.step for p in history if p.key == key] for key in {p.key for p in history}}
    assert steps == {"loss": [3, 6, 7], "learning_rate": [3, 6, 7], "grad_norm": [3, 6, 7], "epoch": [3, 6, 7],
                     "eval_loss": [0, 4, 7]}
    epochs = [p.value for p in history if p.key == "epoch"]
    assert epochs[0] == pytest.approx(epochs[1] / 2) and epochs[2] == pytest.approx(epochs[0] * 7 / 3)
    final_lr = [p.value for p in history if p.key == "learning_rate"][-1]
    assert final_lr == 0.0  # cosine decay ends at 0 after the last step
    lines = [json.loads(line) for line in job.run.metrics.read_text().splitlines()]
    assert sum(r.get("step") == 6 and "event" not in r and "loss" in r for r in lines) == 2  # both attempts'
    assert [r["start_step"] for r in lines if r.get("event") == "start"] == [0, 4]


def test_tail_replays_appended_records_and_skips_what_was_there(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsFile(path)
    writer.logged(StepMetrics(1, 2.0, 1e-3, 0.5, 0.1, 100.0))  # an earlier attempt's: before the tail
    seen = Recorder()
    with tail(path, seen):
        writer.started(1, 3)
        writer.logged(StepMetrics(2, 1.5, 1e-3, 0.4, 0.2, 101.0))
        writer.evaluated(2, 1.25, 102.0)
        with open(path, "a") as file:
            file.write('{"step": 3, "loss": 1.0, ')  # half a line (the writer is mid-write): delivered once whole
        with open(path, "a") as file:
            file.write('"learning_rate": 0.0, "grad_norm": 0.3, "epoch": 0.3, "time": 103.0}\n')
        writer.finished()
    assert [e[0] for e in seen.events] == ["started", "logged", "evaluated", "logged", "finished"]
    assert seen.events[1][1] == StepMetrics(2, 1.5, 1e-3, 0.4, 0.2, 101.0) and seen.events[2] == ("evaluated", 2, 1.25)
    history = read_history(path)
    assert [(p.key, p.step) for p in history if p.key == "loss"] == [("loss", 1), ("loss", 2), ("loss", 3)]
