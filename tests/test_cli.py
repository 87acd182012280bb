"""The README's main command, `adapterflow run`, with the embedded default parameters."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapterflow.flows.cli import parse_parameters

ROOT = Path(__file__).parents[1]


def test_parameters_come_from_defaults_yaml_and_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("adapter:\n  r: 4\n  target_modules: [q_proj, v_proj]\ntraining:\n  steps: 30\n")
    params = parse_parameters(str(config), ["training.steps=12", "save.save_embedding_layers=false"])
    assert params.adapter.r == 4 and params.adapter.target_modules == ["q_proj", "v_proj"]
    assert params.training.steps == 12 and params.save.save_embedding_layers is False
    assert params.adapter.init == "pissa_niter_4"  # untouched default


@pytest.mark.parametrize("overrides, message", [
    (["training.stepz=3"], "Extra inputs are not permitted"),
    (["adapter.init=olora"], "String should match pattern"),
    (["training.steps"], "expected key.subkey=value"),
])
def test_bad_parameters_exit_with_a_message(overrides, message):
    with pytest.raises(SystemExit, match=message):
        parse_parameters(None, overrides)


@pytest.mark.slow
def test_embedded_default_run(tmp_path, prefect_api):
    """`adapterflow run` with no parameter changes: PiSSA on the builtin model and dataset, converted, verified."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "adapterflow"), "run", "--set", f"runs_root={tmp_path}"],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = Path(re.search(r"^adapter:\s+(\S+)", result.stdout, re.M).group(1))
    assert (adapter / "adapter_model.safetensors").is_file()
    before, after = map(float, re.search(r"^eval loss:\s+([\d.]+) -> ([\d.]+)", result.stdout, re.M).groups())
    assert after < before - 1.0  # learning is visible
    assert re.search(r"^prefect run:\s+[0-9a-f-]{36}", result.stdout, re.M)
