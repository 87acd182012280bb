"""The flow's MLflow step against the session's real `mlflow server`: one MLflow run and model version per flow
run (also when the step is retried), Prefect links to both, and a dead server that fails fast without harming
the saved adapter."""

import builtins
import errno
import json
import os
import time

import pytest
from mlflow import MlflowClient

from flow_helpers import artifacts, flow_logs, run_flow, task_runs
from servers import free_port

pytestmark = pytest.mark.usefixtures("prefect_api")


class _FailOnceOpen:
    """The first Python-level read of the saved weights fails with EIO: the artifact upload, after the MLflow
    run was created."""

    def __init__(self, suffix: str) -> None:
        self.suffix, self.calls, self.real = suffix, 0, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        if str(file).endswith(self.suffix) and "r" in mode and self.calls == 0:
            self.calls += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return self.real(file, mode, *args, **kwargs)


def test_retried_mlflow_step_makes_one_run_and_one_version(tmp_path, mlflow_server, monkeypatch):
    failing = _FailOnceOpen("adapter/adapter_model.safetensors")
    monkeypatch.setattr(builtins, "open", failing)
    state = run_flow(tmp_path / "runs", mlflow={"tracking_uri": mlflow_server, "registered_model_name": "flow-test",
                                                "alias": "candidate"})
    monkeypatch.undo()
    assert state.is_completed(), state.message
    assert failing.calls == 1 and task_runs(state, "log-to-mlflow")["log-to-mlflow"].run_count == 2
    tracked = state.result()["mlflow"]
    client = MlflowClient(mlflow_server, mlflow_server)
    flow_run_id = state.result()["flow_run_id"]
    runs = client.search_runs([tracked["experiment_id"]], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert [r.info.run_id for r in runs] == [tracked["run_id"]]
    assert runs[0].info.status == "FINISHED"
    versions = client.search_model_versions(f"name = 'flow-test' and run_id = '{tracked['run_id']}'")
    assert len(versions) == 1 and client.get_model_version_by_alias("flow-test", "candidate").version == versions[0].version
    history = client.get_metric_history(tracked["run_id"], "loss")
    assert [m.step for m in history] == list(range(1, 9))  # no duplicated points from the first attempt
    found = artifacts(state)
    assert found["mlflow-run"][1].endswith(f"({tracked['run_url']})")
    assert tracked["model_version_url"] in found["mlflow-model-version"][1]
    _check_what_prefect_shows(state, tracked)


def _check_what_prefect_shows(state, tracked) -> None:
    """Tags set at run start, link artifacts with descriptions, the run-summary artifact, the closing log lines,
    and the MLflow run named after the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    summary, flow_run_id = state.result(), state.result()["flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        found = {a.key: a for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        deadline = time.monotonic() + 20
        while True:  # logs reach the API in batches
            logs = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_ASC)]
            if any(m.startswith("MLflow model version:") for m in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert {"base_model:builtin:tiny-llama", "init:pissa_niter_2", "r:4"} <= set(flow_run.tags)
    assert all(found[key].description for key in ("mlflow-run", "mlflow-model-version", "run-summary"))
    markdown = found["run-summary"].data
    assert summary["adapter_dir"] in markdown and f"]({tracked['run_url']})" in markdown
    assert f"]({tracked['model_version_url']})" in markdown and "saved as LoRA r=8" in markdown
    assert f"Adapter: {summary['adapter_dir']}" in logs[-5:]
    assert f"MLflow run: {tracked['run_url']}" in logs[-5:] and f"MLflow model version: {tracked['model_version_url']}" \
        in logs[-5:]
    run = MlflowClient(tracked["tracking_uri"]).get_run(tracked["run_id"])
    assert run.info.run_name == f"{flow_run.name} pissa r4" == tracked["run_name"]
    assert f"[{flow_run.name}](" in run.data.tags["mlflow.note.content"]


def test_dead_tracking_server_fails_fast_and_a_rerun_does_not_retrain(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    state = run_flow(tmp_path / "runs", run_name="dead", mlflow={"tracking_uri": dead})
    assert state.is_failed() and time.monotonic() - started < 120
    message = str(state.result(raise_on_failure=False))
    assert dead in message and "mlflow.enabled=false" in message
    mlflow_step = task_runs(state, "log-to-mlflow")["log-to-mlflow"]
    assert mlflow_step.state.is_failed() and mlflow_step.run_count == 3  # transient: retried, then given up
    adapter = tmp_path / "runs" / "dead" / "adapter"
    saved = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert "adapter_model.safetensors" in saved

    rerun = run_flow(tmp_path / "runs", run_name="dead", mlflow={"enabled": False})
    assert rerun.is_completed(), rerun.message
    assert task_runs(rerun, "log-to-mlflow")["log-to-mlflow"].state.name == "Skipped"
    training = json.loads((tmp_path / "runs" / "dead" / "training.json").read_text())
    assert training["resumed_from"] == training["steps"]  # the checkpoint was final: no step trained again
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == saved


def test_the_mlflow_run_spans_the_flow_and_has_every_metric_history(tmp_path, mlflow_server):
    """Started when training starts, ended after the last step; loss / learning_rate / grad_norm / epoch every
    log_every steps and eval_loss before, during and after; the Prefect progress artifact and task log lines."""
    from prefect.client.orchestration import get_client

    state = run_flow(tmp_path / "runs", run_name="live", training={"log_every": 3, "eval_every": 4},
                     mlflow={"tracking_uri": mlflow_server})
    assert state.is_completed(), state.message
    tracked, flow_run_id = state.result()["mlflow"], state.result()["flow_run_id"]
    client = MlflowClient(mlflow_server, mlflow_server)
    run = client.get_run(tracked["run_id"])
    training = json.loads((tmp_path / "runs" / "live" / "training.json").read_text())
    steps = task_runs(state)
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
    last_step_end = max(r.end_time for r in steps.values()).timestamp() * 1000
    assert run.info.status == "FINISHED"
    assert run.info.start_time <= training["started_at"] * 1000 <= training["finished_at"] * 1000
    assert last_step_end <= run.info.end_time <= flow_run.end_time.timestamp() * 1000 + 1  # ms rounding
    for key in ("loss", "learning_rate", "grad_norm", "epoch"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [3, 6, 8], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 4, 8]
    assert run.data.metrics["eval_loss"] == pytest.approx(training["eval_loss_after"])
    assert "in progress" not in run.data.tags["mlflow.note.content"]  # the completed description replaced it
    assert (run.data.tags["serving.vllm"], run.data.tags["serving.llama_cpp"]) == ("ok", "ok")  # the preflight
    assert "- vllm preflight: ok" in run.data.tags["mlflow.note.content"]

    assert artifacts(state)["training-progress"] == ("progress", 100.0)
    logs = flow_logs(state, until=lambda messages: any(m.startswith("MLflow model version:") for m in messages))
    assert [m.split(":")[0] for m in logs if m.startswith("step ") and ": loss" in m] == \
        ["step 3/8", "step 6/8", "step 8/8"]
    assert [m.split(":")[0] for m in logs if ": eval_loss" in m] == ["step 0/8", "step 4/8", "step 8/8"]
    assert any(m.startswith(f"MLflow run {run.info.run_id}: 15 metric points logged while training") for m in logs)
