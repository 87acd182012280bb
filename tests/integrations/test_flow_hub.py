"""The flow's push-to-hub step with the real huggingface_hub client against the local Hub-protocol server."""

import json
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import snapshot_download
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flow_helpers import artifacts, run_flow, task_runs
from hub_server import module_hub_fixture

pytestmark = pytest.mark.usefixtures("prefect_api")
TOKEN = "hf_flowtest_secret_token_value"
REPO = "tester/flow-adapter"


hub = module_hub_fixture(TOKEN)


def flow_logs(flow_run_id: str, until: str | None = None, timeout: float = 20) -> str:
    """The flow run's log messages; with `until`, once one holds it (logs reach the API in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(log.message for log in logs)
        if until is None or until in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_push_with_mlflow_then_idempotent_repush(hub, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = {"repo_id": REPO, "endpoint": hub.url, "license": "apache-2.0", "tag": "v1"}
    state = run_flow(tmp_path / "runs", run_name="hub", hub=settings,
                     mlflow={"tracking_uri": mlflow_server, "registered_model_name": "hub-test"})
    assert state.is_completed(), state.message
    summary = state.result()
    pushed, tracked = summary["hub"], summary["mlflow"]
    assert pushed["created_commit"] and pushed["commit_oid"] == hub.refs(REPO)["tags"]["v1"]
    commit = hub.commits(REPO)[0]
    assert summary["flow_run_id"] in commit["title"] and tracked["run_id"] in commit["title"]

    local = tmp_path / "download"
    snapshot_download(REPO, endpoint=hub.url, token=TOKEN, local_dir=local)
    adapter_dir = Path(summary["adapter_dir"])
    received = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
                if p.is_file() and not p.relative_to(local).as_posix().startswith((".cache/", ".gitattributes"))}
    saved = {p.relative_to(adapter_dir).as_posix(): p.read_bytes() for p in adapter_dir.rglob("*") if p.is_file()}
    assert received == saved  # the output folder as it is, README.md (the one card) included
    assert sorted(saved) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapterflow.json"]
    assert not (Path(summary["run_dir"]) / "hub").exists()  # no second copy
    card = yaml.safe_load((local / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "peft" and card["license"] == "apache-2.0" and "lora" in card["tags"]
    assert "eval loss" in (local / "README.md").read_text().lower()

    client = MlflowClient(mlflow_server, mlflow_server)
    assert client.get_run(tracked["run_id"]).data.tags["hub.commit_url"] == pushed["commit_url"]
    assert pushed["commit_url"] in artifacts(state)["hub-commit"][1]
    link = f"[{REPO}@{pushed['commit_oid'][:12]}]({pushed['commit_url']})"  # clickable in MLflow and Prefect
    assert link in client.get_run(tracked["run_id"]).data.tags["mlflow.note.content"]
    assert link in client.get_model_version("hub-test", tracked["model_version"]).description
    assert link in artifacts(state)["run-summary"][1]
    hub_line = f"Hub commit: {pushed['commit_url']}"  # the flow's last log line
    assert flow_logs(summary["flow_run_id"], until=f"{hub_line}\nFinished in state Completed()").splitlines()[-2:] == [
        hub_line, "Finished in state Completed()"]

    again = run_flow(tmp_path / "runs", run_name="hub", hub=settings, mlflow={"enabled": False})
    assert again.is_completed(), again.message
    assert not again.result()["hub"]["created_commit"] and again.result()["hub"]["commit_oid"] == pushed["commit_oid"]

    secret_free = [flow_logs(summary["flow_run_id"]), str(summary), str(client.get_run(tracked["run_id"]).data)]
    secret_free += [p.read_text(errors="ignore") for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert not any(TOKEN in text for text in secret_free)


def test_token_from_a_prefect_secret_block_and_no_repo_skips(hub, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("HF_TOKEN", raising=False)
    Secret(value=TOKEN).save("hub-token-test", overwrite=True)
    state = run_flow(tmp_path / "runs", hub={"repo_id": "tester/from-secret", "endpoint": hub.url,
                                             "token_secret_block": "hub-token-test"})
    assert state.is_completed(), state.message
    assert hub.commits("tester/from-secret")[0]["oid"] == state.result()["hub"]["commit_oid"]

    skipped = run_flow(tmp_path / "runs")
    assert task_runs(skipped, "push-to-hub")["push-to-hub"].state.name == "Skipped" and skipped.result()["hub"] == {}


def test_wrong_token_fails_at_once_and_names_the_fix(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_123")
    state = run_flow(tmp_path / "runs", hub={"repo_id": REPO, "endpoint": hub.url})
    assert state.is_failed()
    push = task_runs(state, "push-to-hub")["push-to-hub"]
    assert push.run_count == 1  # permanent: no Prefect retry
    message = str(state.result(raise_on_failure=False))
    assert "HF_TOKEN" in message and "hf_wrong_token_value_123" not in message


def test_base_model_given_as_a_hub_repo_id(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from adapterflow.runtime.base_models import resolve_base_model

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/tiny-base", exist_ok=True)
    api.upload_folder(folder_path=resolve_base_model("builtin:tiny-llama"), repo_id="tester/tiny-base")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    state = run_flow(tmp_path / "runs", base_model={"name_or_path": "tester/tiny-base"})
    assert state.is_completed(), state.message
    config = json.loads((Path(state.result()["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tester/tiny-base"  # portable: the Hub id, not a cache path
