"""Task logic through `task.fn`, without a flow: each step rebuilt from the run directory alone, as a retry in a
fresh process is, gives the same result; skipped steps say why."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from adapterflow.flows.parameters import HubSettings, MlflowSettings
from adapterflow.flows.parameters_export import ExportSettings
from adapterflow.manifest import verify_manifest
from adapterflow.tasks.convert_pissa_to_lora import convert_pissa_to_lora_task
from adapterflow.tasks.export_merged import export_merged
from adapterflow.tasks.extract_adapter import extract_adapter
from adapterflow.tasks.log_to_mlflow import log_to_mlflow
from adapterflow.tasks.push_to_hub import push_to_hub
from adapterflow.tasks.run_plan import RunPlan
from adapterflow.tasks.save_adapter import save_adapter
from flow_helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_api")


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_steps_after_training_repeat_from_the_run_directory_alone(tmp_path):
    state = run_flow(tmp_path / "runs", run_name="pissa")
    assert state.is_completed(), state.message
    summary = state.result()
    published = _files(Path(summary["adapter_dir"]))
    plan = RunPlan.model_validate(json.loads((Path(summary["run_dir"]) / "plan.json").read_text()))

    extracted = extract_adapter.fn(plan)
    assert Path(extracted["path"]) == Path(summary["run_dir"]) / "checkpoints" / "step-000008"
    source = convert_pissa_to_lora_task.fn(plan, extracted)
    assert source["converted"] and source["initial"] == str(plan.run.initial)
    saved = save_adapter.fn(plan, source)
    assert saved["converted"] and _files(Path(saved["adapter_dir"])) == published  # byte for byte the same adapter
    # The listed digests come from the manifest, hashed while writing: they are the files' digests.
    for entry in saved["files"]:
        path = Path(saved["output_dir"]) / entry["name"]
        assert (entry["bytes"], entry["sha256"]) == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    assert any(Path(entry["name"]).name == "adapterflow.json" for entry in saved["files"])
    assert verify_manifest(saved["output_dir"]) == []
    base = json.loads((Path(saved["adapter_dir"]) / "adapterflow.json").read_text())["base"]
    assert base["architecture"] == "LlamaForCausalLM" and base["hub_commit"] is None and base["targeted_modules"] > 0


def test_optional_steps_skip_visibly():
    mlflow_state = log_to_mlflow.fn(None, MlflowSettings(enabled=False), {}, {}, "flow-run")
    assert mlflow_state.name == "Skipped" and "mlflow.enabled=false" in mlflow_state.message
    assert mlflow_state.result() == {}
    hub_state = push_to_hub.fn(None, HubSettings(), MlflowSettings(), {}, None, "flow-run")
    assert hub_state.name == "Skipped" and "hub.repo_id" in hub_state.message and hub_state.result() == {}
    export_state = export_merged.fn(None, ExportSettings(), HubSettings(), {})
    assert export_state.name == "Skipped" and "export.merged" in export_state.message and export_state.result() == {}
    with pytest.raises(ValueError, match="no merged model was exported; set export.merged=true"):
        push_to_hub.fn(None, HubSettings(push_merged=True, merged_repo_id="me/m"), MlflowSettings(), {}, None, "x")
