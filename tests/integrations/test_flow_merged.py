"""The flow with export.merged and hub.push_merged: a converted PiSSA adapter merged into the original base,
checked, written to {run dir}/merged, and pushed (with the adapter, to its own repo) to the local Hub server.
One flow run: flow runs are slow on 2 cores."""

from pathlib import Path

import peft
import pytest
import torch
import yaml
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapterflow.runtime.base_models import load_base_model
from flow_helpers import artifacts, flow_logs, run_flow, task_runs
from hub_server import module_hub_fixture

pytestmark = pytest.mark.usefixtures("prefect_api")
TOKEN = "hf_mergedtest_secret_token_value"


hub = module_hub_fixture(TOKEN)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and not p.relative_to(folder).as_posix().startswith((".cache/", ".gitattributes"))}


def test_merged_export_and_push(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    state = run_flow(tmp_path / "runs", run_name="merged", export={"merged": True, "max_shard_size": "500KB"},
                     hub={"repo_id": "tester/adapter", "push_merged": True, "merged_repo_id": "tester/merged",
                          "endpoint": hub.url, "license": "apache-2.0", "tag": "v1"})
    assert state.is_completed(), state.message
    summary = state.result()
    run_dir, merged = Path(summary["run_dir"]), summary["merged"]
    folder = run_dir / "merged"
    assert merged["path"] == str(folder) and merged["dtype"] == "float32" and merged["max_abs_diff"] <= 1e-5
    names = sorted(p.name for p in folder.iterdir())
    assert merged["shards"] == sum(n.endswith(".safetensors") for n in names) >= 3  # 1.9 MB in 500 KB shards
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= set(names)
    assert task_runs(state)["export-merged"].state.name == "Completed"

    # The merged model is base + the saved (converted) adapter: PEFT on the original base is the oracle.
    probe = load_file(run_dir / "probe.safetensors")
    batch = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    adapter_dir = Path(summary["adapter_dir"])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(_original_base(adapter_dir), adapter_dir).eval()(**batch).logits
        ours = AutoModelForCausalLM.from_pretrained(folder)(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, probe["logits"], atol=1e-4, rtol=0)  # and the trained model, as verify

    # Two repos, one commit each: the adapter folder and the merged folder, each as it is on disk.
    pushed = summary["hub"]
    assert pushed["repo_id"] == "tester/adapter" and pushed["merged"]["repo_id"] == "tester/merged"
    commits = [c for c in hub.commits("tester/merged") if c["title"].startswith("adapterflow")]  # newest first
    assert [c["oid"] for c in commits] == [pushed["merged"]["commit_oid"]] == [hub.refs("tester/merged")["tags"]["v1"]]
    assert summary["flow_run_id"] in commits[0]["title"] and "merged" in commits[0]["title"]
    local = tmp_path / "download"
    snapshot_download("tester/merged", endpoint=hub.url, token=TOKEN, local_dir=local)
    assert files_of(local) == files_of(folder)
    assert "adapter_config.json" not in files_of(local)  # transformers would load the repo as an adapter
    assert sorted(files_of(adapter_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                             "adapterflow.json"]
    card = (local / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0" and "merged-lora" in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("tester/merged")' in card and "eval loss" in card.lower()

    found = artifacts(state)
    assert {row["name"] for row in found["merged-model"][1]} == set(names)
    assert pushed["merged"]["commit_url"] in found["hub-merged-commit"][1]
    assert f"Merged model: {folder}" in flow_logs(state, until=lambda m: any("Merged model Hub" in x for x in m))


def _original_base(adapter_dir: Path):
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return load_base_model(config["base_model_name_or_path"])
