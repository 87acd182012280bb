"""Training under torchrun (real torch.distributed.run, gloo on the CPU, 2 ranks): DDP and FSDP train the
one-process adapter, only rank 0 writes files, a killed rank fails the launch with its rank and signal and a
rerun resumes to the uninterrupted adapter, a rank's user error stays a user error, and an FSDP-sharded model
cannot save its shards.

torch 2.13 runs `fully_shard` (FSDP2) with gloo on the CPU, so the FSDP tests run here, not only on a GPU."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterflow import LoraConfig
from adapterflow.init_methods import init_lora_weights_for
from adapterflow.runtime.base_models import resolve_base_model
from adapterflow.runtime.launch import RankUserError, TrainingProcessError, run_torchrun, torchrun_command
from adapterflow.runtime.progress import TrainingObserver
from adapterflow.runtime.train_job import TrainingJob, run_training_job
from adapterflow.tasks.retries import is_transient, is_user_error

SUPPORT = Path(__file__).parents[1] / "support"
TRAINING = dict(steps=10, batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=3e-3,
                warmup_steps=2, checkpoint_every=2, keep_checkpoints=2, seed=0, device="cpu")
pytestmark = pytest.mark.slow


class Seen(TrainingObserver):
    def __init__(self) -> None:
        self.records, self.evals, self.starts = [], [], []

    def started(self, start_step, steps):
        self.starts.append((start_step, steps))

    def logged(self, record):
        self.records.append(record)

    def evaluated(self, step, eval_loss, at):
        self.evals.append((step, eval_loss))


def make_job(run_dir: Path, **changes) -> TrainingJob:
    base = str(resolve_base_model("builtin:tiny-llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=init_lora_weights_for("pissa_niter_2"), base_model_name_or_path=base)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = TrainingJob(run_dir=str(run_dir), adapter_name="default", base_model_path=base, dtype="float32",
                      dataset={"path": "builtin:instructions"}, eval_fraction=0.1, max_seq_len=32,
                      lora_config=config.to_dict(), training=dict(TRAINING), num_processes=2)
    return replace(job, **changes)


def adapter(job: TrainingJob, step: int = TRAINING["steps"]) -> dict[str, torch.Tensor]:
    return load_file(job.run.checkpoints / f"step-{step:06d}" / "adapter_model.safetensors")


def assert_same_adapter(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and len(got) == 28
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same job in this process (no torchrun, world size 1)."""
    job = make_job(tmp_path_factory.mktemp("one") / "run", num_processes=1)
    return job, run_training_job(job, log=lambda line: None)


def test_ddp_on_two_processes_trains_the_one_process_adapter_and_only_rank_0_writes(one_process, tmp_path,
                                                                                   monkeypatch):
    reference, reference_summary = one_process
    job = make_job(tmp_path / "run")
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT / "rank_audit"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ADAPTERFLOW_AUDIT_DIR", str(audit))
    monkeypatch.setenv("ADAPTERFLOW_AUDIT_ROOT", str(tmp_path / "run"))
    lines, seen = [], Seen()
    summary = run_torchrun(job, lines.append, seen)

    assert summary["num_processes"] == 2 and summary["strategy"] == "ddp"
    assert "Training on 2 processes (ddp, cpu)" in lines
    # Rank 0's metrics reach this process through <run>/metrics.jsonl, once each (not through the output).
    assert [r.step for r in seen.records] == list(range(1, 11)) and [s for s, _ in seen.evals] == [0, 10]
    assert [r.loss for r in seen.records] == pytest.approx(summary["losses"]) and seen.starts == [(0, 10)]
    assert not any(line.startswith("step ") for line in lines)
    assert_same_adapter(adapter(job), adapter(reference))
    for key in ("losses", "eval_loss_before", "eval_loss_after"):
        torch.testing.assert_close(torch.tensor(summary[key]), torch.tensor(reference_summary[key]),
                                   atol=1e-5, rtol=0)
    assert summary["tokens"] == reference_summary["tokens"]
    # Exactly one writer: the audit hook saw rank 1 write nothing, and rank 0 write every file the run holds
    # (except the job file, which the launcher wrote before torchrun started): the file itself, or the staging
    # folder renamed into place with it (atomic saves).
    assert sorted(p.name for p in audit.iterdir()) == ["rank-0.log", "rank-1.log"]
    assert (audit / "rank-1.log").read_text() == ""
    written = {line.split(" ", 1)[1] for line in (audit / "rank-0.log").read_text().splitlines()}
    files = {str(p) for p in (tmp_path / "run").rglob("*") if p.is_file()} - {str(job.path)}
    assert {"training.json", "probe.safetensors", "adapter_model.safetensors", "training_state.pt"} <= {
        Path(f).name for f in files}
    assert {f for f in files if not any(f == w or f.startswith(w + os.sep) for w in written)} == set()


def test_fsdp_on_two_processes_trains_the_one_process_adapter_and_resumes(one_process, tmp_path):
    reference, _ = one_process
    job = make_job(tmp_path / "run", strategy="fsdp")
    assert run_torchrun(job, lambda line: None)["strategy"] == "fsdp"
    assert_same_adapter(adapter(job), adapter(reference))
    # Resume from the checkpoint at step 8: its optimizer state was gathered in full when written and is
    # re-sharded when read; the rerun ends at the same adapter.
    final = job.run.checkpoints / "step-000010"
    for path in sorted(final.iterdir()):
        path.unlink()
    final.rmdir()
    assert run_torchrun(job, lambda line: None)["resumed_from"] == 8
    assert_same_adapter(adapter(job), adapter(reference))


def test_a_killed_rank_fails_the_launch_and_a_rerun_resumes_to_the_uninterrupted_adapter(one_process, tmp_path):
    reference, _ = one_process
    job = make_job(tmp_path / "run", training={**TRAINING, "checkpoint_every": 1})
    failure = {}
    thread = threading.Thread(target=lambda: _capture(failure, run_torchrun, job, lambda line: None))
    thread.start()
    deadline = time.monotonic() + 240
    while not list(job.run.checkpoints.glob("step-*/progress.json")):
        assert thread.is_alive() and time.monotonic() < deadline, failure
        time.sleep(0.01)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    thread.join(120)
    error = failure.get("error")
    assert isinstance(error, TrainingProcessError), failure
    assert "rank 1 (local rank 1" in str(error) and "killed by SIGKILL (exit code -9)" in str(error)
    assert "rerun with the same run_name" in str(error)
    assert not is_transient(error)  # a failed attempt; the task's retry rule decides, as for any error
    killed_at = max(int(p.parent.name.split("-")[1]) for p in job.run.checkpoints.glob("step-*/progress.json"))
    assert killed_at < TRAINING["steps"]

    summary = run_torchrun(job, lambda line: None)
    assert summary["resumed_from"] == killed_at
    assert_same_adapter(adapter(job), adapter(reference))


def test_a_user_error_on_the_ranks_stays_a_user_error(tmp_path):
    job = make_job(tmp_path / "run", dataset={"path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found") as raised:
        run_torchrun(job, lambda line: None)
    assert is_user_error(raised.value) and not is_transient(raised.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    job = make_job(tmp_path / "run2", dataset={"path": str(bad)})
    with pytest.raises(RankUserError, match=r"bad.jsonl, line 2: needs a non-empty") \
            as raised:
        run_torchrun(job, lambda line: None)
    assert is_user_error(raised.value) and not is_transient(raised.value)
    assert sorted(p.name for p in (tmp_path / "run2" / "errors").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_torchrun_commands_for_one_and_several_nodes(tmp_path):
    job = make_job(tmp_path / "run-a")
    assert torchrun_command(job)[:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                         "--standalone"]
    assert torchrun_command(job)[-3:] == ["-m", "adapterflow.runtime.launch", str(job.path)]
    multi = replace(job, nnodes=2, rdzv_endpoint="node1:29500")
    assert torchrun_command(multi)[5:13] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                             "node1:29500", "--rdzv-id", "run-a"]


def test_an_fsdp_sharded_model_cannot_save_its_shards(base_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(SUPPORT / "fsdp_unsaved.py"), str(base_dir), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        results = json.loads((out / f"result-{rank}.json").read_text())
        assert "Refusing to save the adapter" in results["save_pretrained"]
        assert "q_proj.lora_A.weight: a DTensor sharded over 2 ranks ((2, 32) on this rank)" in results[
            "save_pretrained"]
        assert "lora_A.weight: shape (2, 32), but r=4 must be its dimension 0" in results["local_shards"]
        assert "v_proj.lora_B.weight: checkpoint (8, 4) vs model (16, 4) (a rank's slice?)" in results[
            "lora_B_shards"]
        assert not results["save_pretrained_wrote"] and not results["local_shards_wrote"]
        assert results["gathered_equal"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["gathered"]  # no folder from the refusals


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl: one GPU per rank)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_on_two_gpus_trains_the_one_gpu_adapter(tmp_path, strategy):
    training = {**TRAINING, "device": "cuda"}
    one = make_job(tmp_path / "one", num_processes=1, training=training)
    run_training_job(one, log=lambda line: None)
    job = make_job(tmp_path / "run", strategy=strategy, training=training)
    lines = []
    assert run_torchrun(job, lines.append)["num_processes"] == 2
    assert f"Training on 2 processes ({strategy}, cuda)" in lines
    expected, got = adapter(one), adapter(job)
    assert got.keys() == expected.keys()
    for key in expected:  # bf16 autocast on CUDA: rounding differs with the batch split
        torch.testing.assert_close(got[key], expected[key], atol=2e-3, rtol=0)


def _capture(into: dict, function, *args) -> None:
    try:
        into["result"] = function(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        into["error"] = exc


def _rank_pid(job: TrainingJob, rank: int) -> int:
    """The pid of the process running `job` as torchrun rank `rank` (from /proc: its command line and RANK)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(job.path).encode() in cmdline and f"RANK={rank}".encode() in environ and b"-m" in cmdline \
                and b"adapterflow.runtime.launch" in cmdline and b"torch.distributed.run" not in cmdline:
            return int(proc.name)
    raise AssertionError(f"no process runs rank {rank} of {job.path}")
