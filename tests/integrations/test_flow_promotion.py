"""The promotion gate in the flow, against the session's real `mlflow server`, the real Prefect API and the
local Hub-protocol server: three runs against one registered model, and approval through the Prefect client."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, LogFilter,
                                            LogFilterFlowRunId)
from prefect.flow_runs import resume_flow_run
from prefect.client.schemas.objects import StateType

from adapterflow.runtime.base_models import load_base_model, load_tokenizer
from adapterflow.runtime.data import DataSpec
from adapterflow.runtime.evaluation import evaluation_examples
from eval_oracle import direct_loss
from flow_helpers import TINY_TRAINING, artifacts, run_flow, task_runs
from hub_server import module_hub_fixture

pytestmark = pytest.mark.usefixtures("prefect_api")
TOKEN = "hf_promotion_test_token_value"
REPO = "tester/promoted-adapter"


hub = module_hub_fixture(TOKEN)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: contending threads cost 30x
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name: str, steps: int, hub=None, **sections):
    mlflow = {"tracking_uri": sections.pop("tracking_uri"), "registered_model_name": name}
    return run_flow(tmp_path / "runs", training={"steps": steps}, mlflow=mlflow,
                    **({"hub": {"repo_id": REPO, "endpoint": hub.url}} if hub else {}), **sections)


def test_three_runs_against_one_registered_model(tmp_path, mlflow_server, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    client, name = MlflowClient(mlflow_server, mlflow_server), "promotion-test"

    first = run(tmp_path, name, 4, hub, tracking_uri=mlflow_server)
    assert first.is_completed() and first.name == "Completed", first.message
    one = first.result()
    v1 = one["mlflow"]["model_version"]
    assert one["promotion"]["promoted"] and "first version under the alias" in one["promotion"]["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == v1 and one["hub"]["commit_oid"]
    assert one["evaluation"]["new"]["loss"] == one["eval_loss_after"]  # reused: same split, same base
    assert one["evaluation"]["new"]["loss_source"].startswith("train-adapter eval_loss_after")

    second = run(tmp_path, name, 12, hub, tracking_uri=mlflow_server)
    assert second.is_completed() and second.name == "Completed", second.message
    two = second.result()
    v2, evaluation = two["mlflow"]["model_version"], two["evaluation"]
    assert two["promotion"]["promoted"] and two["promotion"]["previous"] == v1
    assert client.get_model_version_by_alias(name, "champion").version == v2
    assert client.get_model_version_by_alias(name, "previous").version == v1
    _check_numbers(evaluation, one, two)
    metrics = client.get_run(two["mlflow"]["run_id"]).data.metrics
    assert metrics["eval.loss"] == pytest.approx(evaluation["new"]["loss"])
    assert metrics["eval.champion_loss"] == pytest.approx(evaluation["champion"]["loss"])
    assert {"eval.perplexity", "eval.base_loss", "eval.base_perplexity", "eval.champion_perplexity"} <= set(metrics)
    rows = artifacts(second)["evaluation"][1]
    assert [r["model"] for r in rows] == ["base model", "new adapter", f"champion (version {v1})"]
    commits = len(hub.commits(REPO))

    third = run(tmp_path, name, 1, hub, tracking_uri=mlflow_server)
    assert third.is_completed() and third.name == "NotPromoted", third.name
    three = third.result()
    v3, reason = three["mlflow"]["model_version"], three["promotion"]["reason"]
    assert not three["promotion"]["promoted"] and "not better than" in reason and third.message.endswith(reason)
    assert client.get_model_version_by_alias(name, "champion").version == v2
    assert client.get_model_version_by_alias(name, "previous").version == v1
    assert three["hub"] == {} and len(hub.commits(REPO)) == commits
    push = task_runs(third, "push-to-hub")["push-to-hub"]
    assert push.state.name == "Skipped" and "not promoted" in push.state.message
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion"] == "rejected" and tags["promotion.reason"] == reason
    assert tags["promotion.champion_version"] == v2
    assert client.get_run(three["mlflow"]["run_id"]).data.tags["promotion.reason"] == reason
    assert client.get_model_version(name, v2).tags["promotion"] == "promoted"


def _check_numbers(evaluation, one: dict, two: dict) -> None:
    """base, new and champion equal a direct computation (PEFT's model, token by token) on the same split."""
    plan = json.loads((Path(two["run_dir"]) / "plan.json").read_text())
    examples = evaluation_examples(DataSpec("builtin:instructions"), 0.1, 0)
    tokenizer, max_len = load_tokenizer(plan["base_model_path"]), TINY_TRAINING["max_seq_len"]
    base = direct_loss(load_base_model(plan["base_model_path"]), tokenizer, examples, max_len)

    def adapter(summary):
        model = peft.PeftModel.from_pretrained(load_base_model(plan["base_model_path"]), summary["adapter_dir"])
        return direct_loss(model.eval(), tokenizer, examples, max_len)

    assert evaluation["base"]["loss"] == pytest.approx(base, rel=1e-5)  # PiSSA init: computed, not reused
    assert evaluation["new"]["loss"] == pytest.approx(adapter(two), rel=1e-5)
    assert evaluation["champion"]["loss"] == pytest.approx(adapter(one), rel=1e-5)
    assert evaluation["champion"]["loss"] == pytest.approx(one["eval_loss_after"], rel=1e-5)
    assert evaluation["new"]["loss"] < evaluation["champion"]["loss"] < evaluation["base"]["loss"]


def _answer_when_paused(name: str, run_input: dict | None, seen: list) -> threading.Thread:
    """A reviewer: waits for the flow run of registered model `name` to pause, then resumes it with run_input
    (None: never answers)."""
    def review():
        deadline = time.monotonic() + 300
        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                for flow_run in client.read_flow_runs(flow_run_filter=paused):
                    if flow_run.parameters["config"]["mlflow"]["registered_model_name"] == name:
                        seen.append(flow_run.id)
                        seen.append(_approval_log_line(client, flow_run.id, deadline))
                        if run_input is not None:  # as the log line says (the id as text, as it is printed)
                            resume_flow_run(str(flow_run.id), run_input=run_input)
                        return
                time.sleep(0.5)

    # The thread runs in a copy of this context: Prefect's settings (the session's API URL) are context variables.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(review,), daemon=True)
    thread.start()
    return thread


def _approval_log_line(client, flow_run_id, deadline: float) -> str:
    """The flow run's log line that says how to approve (logs reach the API in batches: polled)."""
    logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    while time.monotonic() < deadline:
        for log in client.read_logs(log_filter=logs):
            if "for approval" in log.message:
                return log.message
        time.sleep(0.5)
    return ""


@pytest.mark.parametrize("answer, promoted, words", [
    ({"approve": True, "comment": "looks good"}, True, "approved by a reviewer: looks good"),
    ({"approve": False, "comment": "wait for the new data"}, False, "reviewer rejected it: wait for the new data"),
    (None, False, "no approval came within 0.1 minutes"),
], ids=["approve", "reject", "timeout"])
def test_approval_through_the_prefect_client(tmp_path_factory, mlflow_server, answer, promoted, words):
    client, name = MlflowClient(mlflow_server, mlflow_server), f"approval-{'none' if answer is None else answer['approve']}"
    seen = []
    reviewer = _answer_when_paused(name, answer, seen)
    runs_root = tmp_path_factory.getbasetemp() / "approval-runs"  # one training, resumed by the other cases
    state = run_flow(runs_root, run_name="approval", training={"steps": 4},
                     mlflow={"tracking_uri": mlflow_server, "registered_model_name": name},
                     promote={"require_approval": True, "approval_timeout_minutes": 0.1 if answer is None else 5})
    reviewer.join(timeout=10)
    assert seen, "the flow run never paused"
    flow_run_id, line = seen  # the log says how to answer: the id, the call, the timeout
    assert f"resume_flow_run('{flow_run_id}', run_input={{'approve': True" in line, line
    assert "press Resume" in line and "minutes for approval to move alias 'champion'" in line, line
    assert state.is_completed() and state.name == ("Completed" if promoted else "NotPromoted"), state.message
    summary = state.result()
    version = summary["mlflow"]["model_version"]
    assert summary["promotion"]["promoted"] is promoted and words in summary["promotion"]["reason"]
    aliases = client.get_registered_model(name).aliases
    assert aliases == ({"champion": version} if promoted else {})
    tags = client.get_model_version(name, version).tags
    assert tags["promotion.approval"] == ("timeout" if answer is None else "approved" if promoted else "rejected")
    assert tags["promotion.approval_comment"] == ("" if answer is None else answer["comment"])
    assert "champion" in artifacts(state)["promotion-approval"][1]
