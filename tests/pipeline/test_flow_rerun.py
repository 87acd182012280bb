"""A rerun of a run that has trained resumes its checkpoints, so it may change where it runs but not what it
trains: a changed adapter, schedule or dataset is refused by prepare-run before anything is written."""

import json

import pytest

from flow_helpers import parameters as parameters_for, run_flow, task_runs

from adapterflow.tasks.prepare_run import check_rerun
from adapterflow.tasks.run_plan import ParameterError, check_run

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_a_rerun_with_other_training_settings_is_refused_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    first = run_flow(runs, run_name="same", adapter={"init": "lora"})
    assert first.is_completed(), first.message
    plan = (runs / "same" / "plan.json").read_bytes()
    checkpoints = sorted(p.name for p in (runs / "same" / "checkpoints").iterdir())

    changed = run_flow(runs, run_name="same", adapter={"init": "lora", "r": 2}, training={"steps": 6})
    assert changed.is_failed()
    message = str(changed.result(raise_on_failure=False))
    assert "run_name='same' has already trained" in message and "lora_config.r: 4 -> 2" in message
    assert "training.steps: 8 -> 6" in message and "Pick a new run_name" in message
    assert task_runs(changed, "prepare-run")["prepare-run"].run_count == 1  # a user error: not retried
    assert (runs / "same" / "plan.json").read_bytes() == plan
    assert sorted(p.name for p in (runs / "same" / "checkpoints").iterdir()) == checkpoints

    # `adapterflow run` refuses it before it starts a server: exit 2, the same message, nothing started
    parameters = parameters_for(runs, run_name="same", adapter={"init": "lora", "r": 2}, training={"steps": 6})
    with pytest.raises(ParameterError) as refused:
        check_rerun(parameters, check_run(parameters))
    assert "run_name='same' has already trained" in str(refused.value) and "lora_config.r: 4 -> 2" in str(refused.value)
    same = parameters_for(runs, run_name="same", adapter={"init": "lora"}, training={"keep_checkpoints": 3})
    check_rerun(same, check_run(same))  # a resumable change passes
    assert (runs / "same" / "plan.json").read_bytes() == plan

    # where and how it runs may change: the rerun resumes (here: finds the training done) and completes
    again = run_flow(runs, run_name="same", adapter={"init": "lora"}, training={"keep_checkpoints": 3})
    assert again.is_completed(), again.message
    assert json.loads((runs / "same" / "training.json").read_text())["resumed_from"] == 8


@pytest.mark.parametrize("targets, given, expected", [
    (["q_proj", "lm_head"], "auto", True), (["q_proj"], "auto", False), ("all-linear", "auto", False),
    (r"(.*\.)?(q_proj|lm_head)", "auto", True), (["q_proj", "lm_head"], False, False), (["q_proj"], True, True)])
def test_the_plan_decides_save_embedding_layers_auto_once(tmp_path, recwarn, targets, given, expected):
    """PEFT's "auto" rule decided when the run is planned (a log line), not warned about at every checkpoint."""
    from adapterflow.runtime.run_dir import RunDir
    from adapterflow.tasks.prepare_run import build_plan

    params = parameters_for(tmp_path / "runs", adapter={"init": "lora", "target_modules": targets},
                            save={"save_embedding_layers": given})
    plan = build_plan(params, check_run(params), RunDir(tmp_path / "runs" / "x"), tmp_path / "out")
    assert plan.save_embedding_layers is expected
    assert not [w for w in recwarn if "save_embedding_layers" in str(w.message)]
