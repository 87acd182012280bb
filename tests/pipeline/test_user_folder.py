"""A first real run as a new user makes it: from their own folder outside the checkout, with a config file that
names a local model folder called like a real Hub id (dots in it) and their own dataset by relative paths, MLflow
on. Everything lands under their folder; nothing in the checkout changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _untracked_and_changed() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True).stdout


@pytest.mark.slow
def test_run_from_the_users_own_folder(tmp_path, prefect_api):
    from adapterflow.runtime.base_models import resolve_base_model

    project = tmp_path / "my project"
    shutil.copytree(resolve_base_model("builtin:tiny-llama"), project / "models" / "Qwen2.5-0.5B-Instruct")
    (project / "data").mkdir()
    (project / "data" / "support.jsonl").write_text("\n".join(
        json.dumps({"prompt": f"Ticket {i}: printer offline. Reply:", "completion": f" Restart spooler {i % 5}."})
        for i in range(60)))
    (project / "configs").mkdir()
    (project / "configs" / "run.yaml").write_text(
        "base_model:\n  name_or_path: ../models/Qwen2.5-0.5B-Instruct\n"
        "dataset:\n  path: ../data/support.jsonl\n"
        "adapter:\n  init: lora\n  r: 4\n"
        "training:\n  steps: 6\n  batch_size: 8\n  max_seq_len: 48\n  checkpoint_every: 3\n")
    checkout_before = _untracked_and_changed()

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([str(Path(sys.executable).parent / "adapterflow"), "run", "--config", "configs/run.yaml",
                             "--set", "runs_root=out"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    adapter = Path(re.search(r"^adapter:\s+(.+)$", result.stdout, re.M).group(1).strip())
    assert adapter.is_relative_to(project / "out") and (adapter / "adapter_model.safetensors").is_file()
    assert (project / "out" / "mlflow.db").is_file() and (project / "out" / "mlartifacts").is_dir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(project / "models" / "Qwen2.5-0.5B-Instruct")
    model_line = re.search(r"^mlflow run: .* model (\S+) v1$", result.stdout, re.M)
    assert model_line and "Qwen2" in model_line.group(1), result.stdout  # a readable, valid registered name
    assert set(os.listdir(project)) == {"models", "data", "configs", "out"}  # nothing strays into the folder
    assert _untracked_and_changed() == checkout_before  # nor into the checkout
