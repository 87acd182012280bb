"""The README's main command, `adapterflow run`, with the embedded default parameters."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapterflow.flows.cli import parse_parameters

ROOT = Path(__file__).parents[2]


def test_parameters_come_from_defaults_yaml_and_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("adapter:\n  r: 4\n  target_modules: [q_proj, v_proj]\ntraining:\n  steps: 30\n")
    params = parse_parameters(str(config), ["training.steps=12", "save.save_embedding_layers=false"])
    assert params.adapter.r == 4 and params.adapter.target_modules == ["q_proj", "v_proj"]
    assert params.training.steps == 12 and params.save.save_embedding_layers is False
    assert params.adapter.init == "pissa_niter_4"  # untouched default


def test_relative_paths_resolve_against_the_config_folder_and_the_current_directory(tmp_path, monkeypatch):
    """A path inside a --config file is relative to that file's folder; a --set path to the current directory;
    a Hub id or builtin: name is left alone; a relative base-model folder that exists is a folder."""
    (tmp_path / "project" / "models" / "Qwen2.5-0.5B-Instruct").mkdir(parents=True)
    config = tmp_path / "project" / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("dataset:\n  path: ../data/chat.jsonl\nruns_root: ../runs\nsave:\n  output_dir: out\n"
                      "base_model:\n  name_or_path: ../models/Qwen2.5-0.5B-Instruct\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    params = parse_parameters(str(config), [])
    assert params.dataset.path == str(tmp_path / "project" / "data" / "chat.jsonl")
    assert params.runs_root == str(tmp_path / "project" / "runs")
    assert params.save.output_dir == str(tmp_path / "project" / "configs" / "out")
    assert params.base_model.name_or_path == str(tmp_path / "project" / "models" / "Qwen2.5-0.5B-Instruct")
    given = parse_parameters(str(config), ["save.output_dir=mine", "base_model.name_or_path=Qwen/Qwen2.5-0.5B",
                                           "dataset.path=builtin:instructions"])
    assert given.save.output_dir == str(tmp_path / "elsewhere" / "mine")
    assert given.base_model.name_or_path == "Qwen/Qwen2.5-0.5B" and given.dataset.path == "builtin:instructions"
    assert parse_parameters(None, []).runs_root == "runs"  # the default: ./runs wherever the flow runs
    # dataset.path: a Hub dataset id stays an id; dataset.chat_template: a file name resolves, a template stays.
    config.write_text("dataset:\n  path: my-org/support-chats\n  chat_template: ../templates/chatml.jinja\n")
    params = parse_parameters(str(config), [])
    assert params.dataset.path == "my-org/support-chats"
    assert params.dataset.chat_template == str(tmp_path / "project" / "templates" / "chatml.jinja")
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    config.write_text(f"dataset:\n  path: data/train.jsonl\n  chat_template: '{template}'\n")
    params = parse_parameters(str(config), [])
    assert params.dataset.path == str(tmp_path / "project" / "configs" / "data" / "train.jsonl")  # a file suffix
    assert params.dataset.chat_template == template


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


@pytest.mark.slow
def test_a_failed_verification_exits_1_with_its_report_and_no_traceback(tmp_path, prefect_api):
    """Not a user error (exit 2) and not a crash: the run failed, and the message says what differs."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "adapterflow"), "run", "--set", f"runs_root={tmp_path}",
         "--set", "training.steps=2", "--set", "verify.atol=1e-30"],  # a converted PiSSA: not bit-exact
        env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=tmp_path, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    block = result.stderr[result.stderr.rindex("adapterflow run failed:"):]
    assert block.startswith("adapterflow run failed: Verification of the saved adapter failed:")
    assert "1e-30" in block and "--debug" not in block, block
