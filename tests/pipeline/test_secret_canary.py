"""Canary values planted in the URL parameters (mlflow.tracking_uri, hub.endpoint, base_model.name_or_path) and
the HF token must appear in nothing a run writes: the run folder, the output folder, the MLflow server's store
and artifacts, the Hub server's storage, Prefect artifacts and logs read back through the client, state
messages, the flow's result and the captured logs. (Prefect keeps the flow parameters as given; the warning
and the README say so, and they are not scanned.)"""

from pathlib import Path
from urllib.parse import quote

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from adapterflow.flows.parameters import CredentialInUrlWarning
from flow_helpers import artifacts, flow_run_id, run_flow, task_runs
from hub_server import HubServer, isolated_hub_client
from mlflow_server import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
TOKEN = "hf_canary_token_5d1c7a90e2"
MLFLOW_PASSWORD = "canary-mlflow-pw-8b2e41f7"
HUB_PASSWORD = "canary-hub-pw-0c9d3e6a"
BASE_PASSWORD = "canary-base-pw-71fa2b5c"
CANARIES = (TOKEN, MLFLOW_PASSWORD, HUB_PASSWORD, BASE_PASSWORD)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Hub server and an MLflow server of this module's own, so their whole storage can be scanned."""
    hub_dir, mlflow_dir = tmp_path_factory.mktemp("canary-hub"), tmp_path_factory.mktemp("canary-mlflow")
    mlflow = MlflowServer(mlflow_dir).start()
    try:
        with isolated_hub_client(tmp_path_factory.mktemp("hf-home")), HubServer(hub_dir, token=TOKEN) as hub:
            yield hub, mlflow, [hub_dir, mlflow_dir]
    finally:
        mlflow.stop()


def _with_credentials(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://canary:{password}@{rest}"


def _prefect_record(state) -> list[str]:
    """What Prefect keeps of a flow run besides its parameters: logs, artifacts, flow and task state messages."""
    run_id = flow_run_id(state)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        flow_state = client.read_flow_run(run_id).state
    texts = [log.message for log in logs] + [f"{a.key} {a.data} {a.description}" for a in found]
    texts += [str(flow_state.message)] + [str(run.state.message) for run in task_runs(state).values() if run.state]
    return texts


def _leaks(texts: list[str], folders: list[Path]) -> list[str]:
    needles = {c for canary in CANARIES for c in (canary, quote(canary, safe=""))}
    found = [f"text #{i}: {text[:200]}" for i, text in enumerate(texts) for n in needles if n in text]
    for folder in folders:
        for path in (p for p in Path(folder).rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


def test_url_credentials_and_token_appear_in_nothing_a_run_writes(servers, tmp_path, monkeypatch, caplog, capfd):
    hub, mlflow, server_dirs = servers
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    runs, out = tmp_path / "runs", tmp_path / "out"
    tracking_uri = _with_credentials(mlflow.uri, MLFLOW_PASSWORD)  # requests sends it as basic auth; MLflow ignores it

    # 1. A whole run: credentials in the tracking URI, the token in HF_TOKEN, a push with a tag.
    with pytest.warns(CredentialInUrlWarning, match="mlflow.tracking_uri"):
        done = run_flow(runs, run_name="canary", save={"output_dir": str(out)},
                        mlflow={"tracking_uri": tracking_uri, "registered_model_name": "canary"},
                        hub={"repo_id": "tester/canary", "endpoint": hub.url, "tag": "v1"})
    assert done.is_completed(), done.message
    summary = done.result()
    assert summary["mlflow"]["tracking_uri"] == _with_credentials(mlflow.uri, "***")
    assert hub.commits("tester/canary")[0]["oid"] == summary["hub"]["commit_oid"]
    assert "mlflow-run" in artifacts(done) and "hub-commit" in artifacts(done)

    # 2. Credentials in the Hub endpoint: httpx sends them instead of the token, so the push fails (permanently).
    with pytest.warns(CredentialInUrlWarning, match="hub.endpoint"):
        refused = run_flow(runs, run_name="canary-hub",
                           hub={"repo_id": "tester/canary", "endpoint": _with_credentials(hub.url, HUB_PASSWORD)})
    assert refused.is_failed() and task_runs(refused, "push-to-hub")["push-to-hub"].state.is_failed()
    assert "canary:***@" in str(refused.result(raise_on_failure=False))

    # 3. Credentials in a base model URL: refused before training, the message names the redacted URL.
    with pytest.warns(CredentialInUrlWarning, match="base_model.name_or_path"):
        bad_base = run_flow(runs, run_name="canary-base", base_model={
            "name_or_path": _with_credentials("http://127.0.0.1:9/models/tiny", BASE_PASSWORD)})
    assert bad_base.is_failed() and task_runs(bad_base, "prepare-run")["prepare-run"].state.is_failed()

    captured = capfd.readouterr()
    texts = [str(summary), str(refused.result(raise_on_failure=False)), str(bad_base.result(raise_on_failure=False)),
             caplog.text, captured.out, captured.err]
    for state in (done, refused, bad_base):
        texts += _prefect_record(state)
    assert _leaks(texts, [runs, out, *server_dirs]) == []
    assert (out / "adapter_model.safetensors").is_file() and (runs / "canary" / "plan.json").is_file()
