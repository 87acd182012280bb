"""training.precision and training.gradient_checkpointing through the pipeline: recorded in plan.json, the
training summary and its Prefect artifact, the run verifies; fp16 combinations that cannot work are refused before
training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterflow.flows.parameters import SaveAdapterParameters
from adapterflow.tasks.parameter_checks import precision_problems as _precision_problems
from flow_helpers import artifacts, run_flow


@pytest.mark.usefixtures("prefect_api")
def test_bf16_with_gradient_checkpointing_runs_verifies_and_is_recorded(tmp_path):
    state = run_flow(tmp_path / "runs", run_name="bf16-gc", training={"precision": "bf16", "gradient_checkpointing": True})
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["verification"]["passed"] and summary["eval_loss_after"] < summary["eval_loss_before"]
    run_dir = Path(summary["run_dir"])
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["training"]["precision"] == "bf16" and plan["training"]["gradient_checkpointing"] is True
    training = json.loads((run_dir / "training.json").read_text())
    assert training["precision"] == "bf16" and training["gradient_checkpointing"] is True
    metrics = {r["metric"]: r["value"] for r in artifacts(state)["training-summary"][1]}
    assert metrics["precision"] == "bf16" and metrics["gradient_checkpointing"] == "True"


def test_the_default_is_fp32_without_checkpointing():
    training = SaveAdapterParameters().training
    assert training.precision == "fp32" and training.gradient_checkpointing is False


@pytest.mark.parametrize("settings, fragment", [
    ({"base_model": {"dtype": "bfloat16"}}, "use training.precision=bf16 with a bfloat16 base"),
    ({"base_model": {"dtype": "float16"}, "adapter": {"modules_to_save": ["lm_head"]}}, "GradScaler cannot unscale"),
    ({"base_model": {"dtype": "float16"}, "adapter": {"bias": "all"}}, "GradScaler cannot unscale"),
    ({"training": {"strategy": "fsdp", "num_processes": 2}}, "use training.precision=bf16, or training.strategy=ddp"),
])
def test_fp16_with_half_precision_base_tensors_that_cannot_work_is_refused(settings, fragment):
    settings = {**settings, "training": {**settings.get("training", {}), "precision": "fp16"}}
    params = SaveAdapterParameters.model_validate(settings)
    problems = _precision_problems(params, "cuda")  # the checks after the CUDA one, as on a GPU machine
    assert len(problems) == 1 and problems[0].startswith("training.precision=fp16") and fragment in problems[0]


def test_fp16_on_cuda_with_float32_or_float16_adapters_only_is_accepted():
    for dtype in ("float32", "float16"):
        params = SaveAdapterParameters.model_validate({"base_model": {"dtype": dtype}, "training": {"precision": "fp16"}})
        assert _precision_problems(params, "cuda") == []
