"""The save-adapter flow with training.num_processes=2: the train task launches torchrun (2 ranks, gloo, DDP) as
a subprocess, and everything after it (extract, convert, save, verify) works on what rank 0 wrote; a rank's user
error fails the task once, without retries."""

import json
from pathlib import Path

import pytest

from mlflow import MlflowClient

from flow_helpers import artifacts, flow_logs, run_flow, task_runs


@pytest.mark.slow
def test_the_flow_trains_on_two_processes_under_torchrun(tmp_path, prefect_api, mlflow_server):
    runs = tmp_path / "runs"
    state = run_flow(runs, run_name="ddp", training={"num_processes": 2}, mlflow={"tracking_uri": mlflow_server})
    assert state.is_completed(), state.message
    summary = json.loads((runs / "ddp" / "training.json").read_text())
    assert summary["num_processes"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == 8
    assert json.loads((runs / "ddp" / "training_job.json").read_text())["num_processes"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    table = {row["metric"]: row["value"] for row in artifacts(state)["training-summary"][1]}
    assert table["num_processes"] == "2"
    assert (Path(state.result()["adapter_dir"]) / "adapter_model.safetensors").is_file()
    # Rank 0's metrics reach the flow's process through metrics.jsonl: the live MLflow run and the progress artifact.
    client = MlflowClient(mlflow_server, mlflow_server)
    run_id = state.result()["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [0, 8]
    assert artifacts(state)["training-progress"] == ("progress", 100.0)
    assert any(m.startswith(f"MLflow run {run_id}: 34 metric points logged while training") for m in
               flow_logs(state, until=lambda logs: any("metric points" in m for m in logs)))

    # A checkpoint of an older adapterflow in the run folder: every rank refuses it (a CheckpointError, a user
    # error), so the task fails once with that message and is not retried.
    legacy = runs / "legacy" / "checkpoints" / "step-000009"
    legacy.mkdir(parents=True)
    (legacy / "trainable.safetensors").write_bytes(b"")
    (legacy / "progress.json").write_text(json.dumps({"step": 9}))
    failed = run_flow(runs, run_name="legacy", training={"num_processes": 2, "steps": 9})
    assert failed.is_failed()
    train = task_runs(failed, "train-adapter")["train-adapter"]
    assert train.state.is_failed() and train.run_count == 1
    message = str(failed.result(raise_on_failure=False))
    assert "step-000009 is a training checkpoint of an older adapterflow" in message, message
