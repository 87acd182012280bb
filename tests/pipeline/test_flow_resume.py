"""A training run killed with SIGKILL resumes from its last checkpoint when the flow is rerun, and ends with the
same adapter as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flow_helpers import run_flow

TRAINING = {"steps": 60, "checkpoint_every": 5}


@pytest.mark.slow
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, prefect_api):
    runs = tmp_path / "runs"
    overrides = ["--set", f"runs_root={runs}", "--set", "run_name=killed", "--set", "adapter.r=4",
                 "--set", "adapter.init=pissa_niter_2"]
    for key, value in {**TRAINING, "batch_size": 8, "max_seq_len": 32, "warmup_steps": 2}.items():
        overrides += ["--set", f"training.{key}={value}"]
    process = subprocess.Popen([sys.executable, "-m", "adapterflow.flows.save_adapter", *overrides],
                               env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=Path(__file__).parents[2],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = runs / "killed" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("step-*/progress.json")):
        assert process.poll() is None, "the training process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/progress.json"))
    assert killed_at < TRAINING["steps"]

    resumed = run_flow(runs, run_name="killed", training=TRAINING)
    assert resumed.is_completed(), resumed.message
    resumed_from = json.loads((runs / "killed" / "training.json").read_text())["resumed_from"]
    assert resumed_from is not None and killed_at <= resumed_from < TRAINING["steps"]

    straight = run_flow(runs, run_name="straight", training=TRAINING)
    assert straight.is_completed(), straight.message
    resumed_tensors = load_file(Path(resumed.result()["adapter_dir"]) / "adapter_model.safetensors")
    straight_tensors = load_file(Path(straight.result()["adapter_dir"]) / "adapter_model.safetensors")
    assert resumed_tensors.keys() == straight_tensors.keys()
    for key in straight_tensors:
        torch.testing.assert_close(resumed_tensors[key], straight_tensors[key], atol=1e-6, rtol=0)
