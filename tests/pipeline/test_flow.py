"""The save-adapter flow end to end on a tiny model, against a real Prefect API."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft
from adapterflow.runtime.base_models import load_base_model
from flow_helpers import artifacts, flow_logs, run_flow, task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")
STEPS = ("prepare-run", "train-adapter", "extract-adapter", "convert-pissa-to-lora", "save-adapter", "verify-adapter",
         "export-merged", "evaluate-adapter", "log-to-mlflow", "promote-adapter", "push-to-hub")


def test_pissa_run_trains_converts_saves_and_verifies(tmp_path):
    state = run_flow(tmp_path / "runs", run_name="pissa")
    assert state.is_completed(), state.message
    summary = state.result()
    adapter_dir = Path(summary["adapter_dir"])
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                             "adapterflow.json"]
    assert summary["converted"] and summary["verification"]["passed"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # converted: rank 2r, plain LoRA
    card = (adapter_dir / "README.md").read_text()  # named as the user named the base, not by its cache folder
    assert card.count("builtin:tiny-llama") >= 2 and config["base_model_name_or_path"] not in card
    assert "Trained as PiSSA r=4; saved as LoRA r=8 (PiSSA->LoRA conversion doubles the rank)" in card
    assert summary["saved_as"].startswith("trained as PiSSA r=4; saved as LoRA r=8")

    runs = task_runs(state)
    assert set(runs) == set(STEPS)
    optional = {"export-merged", "log-to-mlflow", "promote-adapter", "push-to-hub"}  # off: no export.merged, mlflow.enabled=false, no hub.repo_id
    assert all(run.state.name == "Completed" for name, run in runs.items() if name not in optional)
    assert all(runs[name].state.name == "Skipped" for name in optional)

    found = artifacts(state)
    kind, rows = found["saved-files"]
    assert kind == "table"
    assert {r["name"]: r["sha256"] for r in rows} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter_dir.iterdir()}
    metrics = {r["metric"]: r["value"] for r in found["training-summary"][1]}
    assert metrics["steps"] == "8" and float(metrics["eval_loss_after"]) < float(metrics["eval_loss_before"])
    assert "Verification PASSED" in found["verification-report"][1]
    serving = summary["verification"]["serving"]  # the serving preflight against the base model's folder
    assert serving["base"] == config["base_model_name_or_path"] and serving["passed"], serving
    assert [serving["runtimes"][rt]["failed_rules"] for rt in ("vllm", "llama.cpp", "peft")] == [[], [], []]
    assert "| vllm | module_paths | pass |" in found["verification-report"][1]
    assert "will it serve | vllm ok, llama.cpp ok, peft ok |" in found["run-summary"][1]

    # Adapter tensors land in the initial adapter, the checkpoints (PEFT adapter folders) and the output only.
    run_dir = Path(summary["run_dir"])
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "adapter", "checkpoints", "initial", "metrics.jsonl", "plan.json", "probe.safetensors", "training.json"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000004", "step-000008"]

    # The saved adapter is a PEFT adapter for the ORIGINAL base model, reproducing the trained model's logits.
    probe = load_file(run_dir / "probe.safetensors")
    base = load_base_model(config["base_model_name_or_path"])
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = theirs(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=0)


def test_lora_run_skips_the_conversion_visibly_and_warns_of_runtimes_it_fails(tmp_path, capsys):
    """Also: save_embedding_layers=true (full embedding copies vLLM and llama.cpp refuse) without
    verify.require_runtimes completes, with one warning per failing runtime and a `serving:` summary line."""
    from adapterflow.flows.cli import _print_summary

    state = run_flow(tmp_path / "runs", adapter={"init": "lora"},
                     save={"safe_serialization": False, "save_embedding_layers": True})
    assert state.is_completed(), state.message
    convert = task_runs(state, "convert-pissa-to-lora")["convert-pissa-to-lora"]
    assert convert.state.name == "Skipped" and "not a PiSSA adapter" in convert.state.message
    adapter_dir = Path(state.result()["adapter_dir"])
    assert (adapter_dir / "adapter_model.bin").is_file() and not state.result()["converted"]
    warnings = [m for m in flow_logs(state, lambda ms: sum("will not serve" in m for m in ms) >= 2)
                if "will not serve" in m]
    assert warnings == [f"The adapter will not serve in {rt}: it fails weight_keys. `adapterflow check "
                        f"{adapter_dir}` says why and how to fix it; verify.require_runtimes=['{rt}'] makes this "
                        f"fail the run." for rt in ("vllm", "llama.cpp")], warnings
    _print_summary(state.result())
    assert "serving:         vLLM fails weight_keys, llama.cpp fails weight_keys, PEFT ok\n" in capsys.readouterr().out


def test_a_required_runtime_that_refuses_the_adapter_fails_verify_before_mlflow(tmp_path):
    """verify.require_runtimes=["vllm"] and save.save_embedding_layers=true (full embedding copies, which vLLM
    refuses; only the saved files show it, so the pre-training check cannot): verify-adapter fails, not retried,
    naming the rule; log-to-mlflow and push-to-hub never run."""
    state = run_flow(tmp_path / "runs", adapter={"init": "lora"}, save={"save_embedding_layers": True},
                     verify={"require_runtimes": ["vllm"]})
    assert state.is_failed()
    runs = task_runs(state, "verify-adapter")
    verify = runs["verify-adapter"]
    assert verify.state.name == "Failed" and verify.run_count == 1
    assert "log-to-mlflow" not in runs and "push-to-hub" not in runs
    message = str(state.result(raise_on_failure=False))
    assert "verify.require_runtimes=['vllm']" in message and "vllm weight_keys: vLLM refuses tensors" in message
    assert "embed_tokens.weight" in message, message
    report = artifacts(state)["verification-report"][1]
    assert "Verification FAILED" in report and "required runtime vllm fails weight_keys\n" in report, report


def test_bad_parameters_fail_before_training_and_name_every_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    existing_file = tmp_path / "taken"
    existing_file.write_text("x")
    state = run_flow(tmp_path / "runs", run_name="bad", dataset={"path": str(empty)},
                     adapter={"target_modules": ["query", "value"]}, save={"output_dir": str(existing_file)},
                     training={"device": "cpu" if torch.cuda.is_available() else "cuda"})
    assert state.is_failed()
    message = state.message + str(state.result(raise_on_failure=False))
    assert "holds no examples" in message and "matches no adaptable module" in message
    assert "is an existing file" in message
    assert torch.cuda.is_available() or "training.device=cuda: no CUDA device" in message  # a parameter error
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
    assert set(task_runs(state, "prepare-run")) == {"prepare-run"}
    assert task_runs(state, "prepare-run")["prepare-run"].run_count == 1  # permanent: not retried

    missing = run_flow(tmp_path / "runs", base_model={"name_or_path": str(tmp_path / "no-such-model")},
                       dataset={"path": str(tmp_path / "nope.jsonl")})
    message = str(missing.result(raise_on_failure=False))
    assert "no-such-model" in message and "nope.jsonl not found" in message


def test_invalid_rank_is_rejected_by_the_parameter_schema(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="adapter.r"):
        run_flow(tmp_path / "runs", adapter={"r": 0})


class _FailingOpen:
    """Make opening one file fail at the OS level: once with EIO (transient), or always with EACCES."""

    def __init__(self, suffix: str, errno_: int, times: int | None) -> None:
        import io

        self.suffix, self.errno, self.times, self.calls, self.real = suffix, errno_, times, 0, io.open

    def __call__(self, file, *args, **kwargs):
        if str(file).endswith(self.suffix) and (self.times is None or self.calls < self.times):
            self.calls += 1
            raise OSError(self.errno, os.strerror(self.errno), str(file))
        return self.real(file, *args, **kwargs)


def test_transient_failure_is_retried_and_permanent_one_is_not(tmp_path, monkeypatch):
    import errno
    import io

    # The convert step is the first to read <run>/initial after training wrote it.
    transient = _FailingOpen("initial/adapter_config.json", errno.EIO, times=1)
    monkeypatch.setattr(io, "open", transient)
    state = run_flow(tmp_path / "runs")
    assert state.is_completed(), state.message
    assert transient.calls == 1 and task_runs(state, "convert-pissa-to-lora")["convert-pissa-to-lora"].run_count == 2

    permanent = _FailingOpen("initial/adapter_config.json", errno.EACCES, times=None)
    monkeypatch.setattr(io, "open", permanent)
    state = run_flow(tmp_path / "runs")
    assert state.is_failed()
    assert permanent.calls == 1 and task_runs(state, "convert-pissa-to-lora")["convert-pissa-to-lora"].run_count == 1
    assert "Permission denied" in str(state.result(raise_on_failure=False))


def test_an_output_folder_is_never_shared_between_runs(tmp_path):
    shared = tmp_path / "adapters" / "nightly"
    first = run_flow(tmp_path / "runs", run_name="first", adapter={"init": "lora"}, save={"output_dir": str(shared)})
    assert first.is_completed(), first.message
    before = {p.name: p.read_bytes() for p in shared.iterdir()}

    refused = run_flow(tmp_path / "runs", run_name="second", adapter={"init": "lora"}, save={"output_dir": str(shared)})
    assert refused.is_failed() and "already holds (or is reserved for) another run's adapter" in str(
        refused.result(raise_on_failure=False))
    assert not (tmp_path / "runs" / "second" / "checkpoints").exists()  # refused before training

    versioned = run_flow(tmp_path / "runs", run_name="third", adapter={"init": "lora"},
                         save={"output_dir": str(shared), "if_exists": "new_version"})
    assert versioned.is_completed(), versioned.message
    assert Path(versioned.result()["adapter_dir"]) == shared.with_name("nightly-v2")
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before  # the first run's adapter is untouched

    rerun = run_flow(tmp_path / "runs", run_name="first", adapter={"init": "lora"}, save={"output_dir": str(shared)})
    assert rerun.is_completed(), rerun.message  # a run may rewrite its own folder


def test_epochs_set_the_number_of_steps(tmp_path):
    from flow_helpers import parameters
    from adapterflow.tasks.run_plan import CheckedRun, training_settings

    params = parameters(tmp_path, training={"steps": None, "epochs": 1.5, "batch_size": 10,
                                            "gradient_accumulation_steps": 2})
    from adapterflow.runtime.data import DataSpec

    checked = CheckedRun(base_path=tmp_path, dataset=DataSpec("builtin:instructions"), config=None, n_train=95,
                         output_dir=None, device="cpu")
    assert training_settings(params, checked)["steps"] == 8  # ceil(1.5 * ceil(95 / 10 / 2))
