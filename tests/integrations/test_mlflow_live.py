"""The live MLflow run (adapterflow.integrations.mlflow_live) against a real `mlflow server` that goes away in the
middle of a training and comes back: training goes on without waiting, the points wait in the buffer, and the
log-to-mlflow completion sends what is missing, each point once. Read back through MlflowClient."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from mlflow import MlflowClient

from adapterflow.flows.parameters import MlflowSettings
from adapterflow.integrations.mlflow_live import LiveRun
from adapterflow.integrations.mlflow_logging import log_adapter_run, start_live_run
from adapterflow.runtime.metrics_log import read_history
from adapterflow.runtime.progress import Observers, TrainingObserver
from adapterflow.runtime.train_job import run_training_job
from adapterflow.tasks.train_progress import MlflowForward
from mlflow_server import MlflowServer
from test_mlflow_logging import _inputs, adapter_dir, base_model_dir  # noqa: F401 - helpers and their fixtures
from tiny import training_job

STEPS = 6
KEYS = ("loss", "learning_rate", "grad_norm", "epoch")


class StopServerAtStep(TrainingObserver):
    """At `step`, once the live run has sent everything so far, stop the tracking server (the test's doing: this
    blocks the training loop for the few seconds the server takes to exit)."""

    def __init__(self, live: LiveRun, server: MlflowServer, step: int) -> None:
        self.live, self.server, self.step, self.sent_before = live, server, step, None

    def stepped(self, step: int, loss: float) -> None:
        if step != self.step:
            return
        deadline = time.monotonic() + 90
        while (self.live.run_id is None or self.live.pending) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.sent_before = self.live.sent
        self.server.stop()


@pytest.mark.slow
def test_training_outlives_the_tracking_server_and_the_metrics_arrive_later(tmp_path, base_model_dir,  # noqa: F811
                                                                           adapter_dir):  # noqa: F811
    server = MlflowServer(tmp_path / "mlflow").start()
    settings = MlflowSettings(tracking_uri=server.uri, request_timeout_seconds=2, registered_model_name="live-test")
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path)
    started_ms = int(time.time() * 1000)
    live = start_live_run(settings, runs_root=inputs["runs_root"], plan=inputs["plan"],
                          flow_run_id=inputs["flow_run_id"], flow_run_url=None, flow_run_name="live-test",
                          start_time_ms=started_ms)
    stopper = StopServerAtStep(live, server, step=3)
    job = training_job(tmp_path / "run", steps=STEPS, log_every=1)
    try:
        summary = run_training_job(job, log=lambda line: None, observer=Observers(MlflowForward(live), stopper))
        status = live.close(wait_seconds=5)

        total = STEPS * len(KEYS) + 2  # every step's four metrics, eval_loss before and after
        assert summary["steps"] == STEPS and len(summary["losses"]) == STEPS  # training completed, server down
        assert stopper.sent_before == 1 + 2 * len(KEYS)  # eval_loss at 0, steps 1 and 2: sent while it was up
        assert status["run_id"] and status["sent"] == stopper.sent_before and status["dropped"] == 0
        assert status["pending"] == total - status["sent"] > 0  # buffered, not waited for
        assert server.uri in status["error"]

        server = MlflowServer(tmp_path / "mlflow", port=server.port).start()  # back, same store
        history = [(p.key, p.value, p.step, p.timestamp_ms) for p in read_history(job.run.metrics)]
        inputs["training"] = summary
        result = log_adapter_run(settings, **inputs, metric_history=history)
        result_again = log_adapter_run(settings, **inputs, metric_history=history)  # a retry: nothing twice
        assert result_again["run_id"] == result["run_id"] == status["run_id"]

        client = MlflowClient(server.uri, server.uri)
        for key in KEYS:
            assert sorted(m.step for m in client.get_metric_history(result["run_id"], key)) == list(range(1, 7))
        assert [m.step for m in client.get_metric_history(result["run_id"], "eval_loss")] == [0, STEPS]
        losses = {m.step: m.value for m in client.get_metric_history(result["run_id"], "loss")}
        assert losses == {step: pytest.approx(loss) for step, loss in enumerate(summary["losses"], 1)}
        run = client.get_run(result["run_id"])
        assert run.info.start_time == started_ms <= summary["started_at"] * 1000 and run.info.status == "FINISHED"
        assert run.data.params["training.steps"] == str(inputs["plan"]["training"]["steps"])
    finally:
        live.close(wait_seconds=0)
        server.stop()


def test_an_unanswering_server_never_blocks_the_caller():
    """A server that accepts connections and never answers: `add` returns at once, points wait (bounded)."""
    with socket.create_server(("127.0.0.1", 0)) as blackhole:
        uri = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        settings = MlflowSettings(tracking_uri=uri, request_timeout_seconds=1)
        live = LiveRun(settings, uri, experiment="adapterflow", runs_root=".", flow_run_id=str(uuid.uuid4()),
                       run_name="x", tags={}, params={}, start_time_ms=0, capacity=50).start()
        for step in range(1, 101):
            live.add({"loss": 1.0 / step}, step, step)
        status = live.close(wait_seconds=0.1)
    assert status["run_id"] is None and status["sent"] == 0
    assert status["pending"] == 50 and status["dropped"] == 50  # the oldest went first; metrics.jsonl keeps all
