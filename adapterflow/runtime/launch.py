"""Multi-process training under torchrun: the program every rank runs, and the launcher the train task calls.

    python -m torch.distributed.run --nproc-per-node N --standalone -m adapterflow.runtime.launch <job.json>
    python -m torch.distributed.run --nproc-per-node N --nnodes K --rdzv-backend c10d --rdzv-endpoint H:P \\
        --rdzv-id <run folder name> -m adapterflow.runtime.launch <job.json>

Each rank runs `run_training_job`. A rank that raises writes `<run>/errors/rank-<N>.json` (its exception's
type, message, errno and `transient` flag) before exiting; `run_torchrun` turns the failure back into the
exception the one-process path would have raised, so a user error stays a user error (never retried) and a
killed rank names its rank, exit code and signal (torchrun's "Root Cause" summary).
"""

from __future__ import annotations

import builtins
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from adapterflow.runtime.distributed import Parallel
from adapterflow.runtime.metrics_log import tail
from adapterflow.runtime.processes import die_with_parent
from adapterflow.runtime.progress import TrainingObserver
from adapterflow.runtime.run_dir import read_json, write_json
from adapterflow.runtime.train_job import TrainingJob, run_training_job

ERRORS_DIR = "errors"
_ROOT_CAUSE = re.compile(r"Root Cause.*?host\s*:\s*(?P<host>\S+)\s*\n\s*rank\s*:\s*(?P<rank>\d+) \(local_rank: "
                         r"(?P<local>\d+)\)\s*\n\s*exitcode\s*:\s*(?P<code>-?\d+)", re.S)


class TrainingProcessError(RuntimeError):
    """A training process under torchrun crashed or was killed (not a user error: the task is not retried; a
    rerun with the same run_name resumes from the last checkpoint)."""

    transient = False


class RankUserError(ValueError):
    """A user error raised on a rank (a DatasetError, CheckpointError, ...): its message as the rank raised it."""

    transient = False


def torchrun_command(job: TrainingJob) -> list[str]:
    """The torchrun command line that runs `job` (written to job.path) on this node."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(job.num_processes)]
    if job.nnodes == 1 and job.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(job.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", job.rdzv_endpoint,
                    "--rdzv-id", Path(job.run_dir).name]
    return command + ["-m", "adapterflow.runtime.launch", str(job.path)]


def run_torchrun(job: TrainingJob, on_line: Callable[[str], None], observer: TrainingObserver | None = None) -> dict:
    """Write the job file, run torchrun, stream its output (all ranks) to `on_line`, return training.json.

    Rank 0's progress reaches `observer` (in this process, from a thread) through `<run>/metrics.jsonl`, which
    rank 0 appends to wherever it runs and this process tails (adapterflow.runtime.metrics_log).
    A SIGKILLed caller takes torchrun with it (PR_SET_PDEATHSIG); an interrupted one stops it (SIGTERM, which
    torchrun passes on to the ranks).

    Raises:
        RankUserError, OSError, TrainingProcessError: see `training_failure`.
    """
    errors = Path(job.run_dir) / ERRORS_DIR
    shutil.rmtree(errors, ignore_errors=True)
    job.write()
    with tail(job.run.metrics, observer or TrainingObserver()):
        code, output = _run(job, on_line)
    if code != 0:
        raise training_failure(job, code, output)
    return read_json(job.run.training_summary)


def _run(job: TrainingJob, on_line: Callable[[str], None]) -> tuple[int, str]:
    """Run torchrun, stream its output to `on_line`; its exit code and the last 400 lines."""
    process = subprocess.Popen(torchrun_command(job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent(os.getpid()))
    last: collections.deque[str] = collections.deque(maxlen=400)
    try:
        for line in process.stdout:
            last.append(line)
            on_line(line.rstrip("\n"))
        code = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return code, "".join(last)


def training_failure(job: TrainingJob, exit_code: int, output: str) -> Exception:
    """The exception for a failed torchrun: a rank's user error as it was raised (every rank reads the same data,
    so it is the cause, not a consequence), else the rank torchrun names as the root cause (its own exception, or
    its exit code / signal), else any rank's exception."""
    records = {}
    for path in sorted((Path(job.run_dir) / ERRORS_DIR).glob("rank-*.json")):
        record = read_json(path)
        records[record["rank"]] = record
    user = [r for _, r in sorted(records.items()) if r["kind"] == "value"]
    cause = _ROOT_CAUSE.search(output)
    root = int(cause["rank"]) if cause else None
    if user:
        return _rebuild(user[0])
    if root in records:
        return _rebuild(records[root])
    resume = _resume_hint(job)
    if cause:
        code = int(cause["code"])
        how = (f"was killed by {signal.Signals(-code).name} (exit code {code})" if code < 0 and -code in
               signal.valid_signals() else f"exited with code {code}")
        return TrainingProcessError(f"Training under torchrun failed: rank {root} (local rank {cause['local']}, host "
                                    f"{cause['host']}) {how}; the task log shows its output. {resume}")
    if records:
        return _rebuild(records[min(records)])
    return TrainingProcessError(f"torchrun exited with code {exit_code} before any rank reported (rendezvous, "
                                f"port or start-up failure): the task log shows its output. {resume}")


def _resume_hint(job: TrainingJob) -> str:
    done = sorted(job.run.checkpoints.glob("step-*/progress.json"))
    if not done:
        return "No checkpoint was written yet."
    return (f"The newest checkpoint is {done[-1].parent.name}: rerun with the same run_name "
            f"({Path(job.run_dir).name}) to resume from it.")


def _rebuild(record: dict) -> Exception:
    """The exception a rank recorded, as close to the original as the record allows."""
    message = record["message"]
    if record["kind"] == "value":
        exc: Exception = RankUserError(message)
    elif record["kind"] == "os":
        cls = getattr(builtins, record["type"], OSError)
        cls = cls if isinstance(cls, type) and issubclass(cls, OSError) else OSError
        exc = cls(record["errno"], message) if record["errno"] is not None else cls(message)
    else:
        exc = TrainingProcessError(f"Training under torchrun failed: rank {record['rank']} raised "
                                   f"{record['type']}: {message} (its traceback is in the task log)")
    if isinstance(record.get("transient"), bool):
        exc.transient = record["transient"]
    return exc


def error_record(rank: int, exc: BaseException) -> dict:
    kind = "value" if isinstance(exc, ValueError) else "os" if isinstance(exc, OSError) else "other"
    message = (exc.strerror or str(exc)) if isinstance(exc, OSError) and exc.errno is not None else str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{message}: {exc.filename!r}"
    transient = getattr(exc, "transient", None)
    return {"rank": rank, "kind": kind, "type": type(exc).__name__, "message": message,
            "errno": getattr(exc, "errno", None), "transient": transient if isinstance(transient, bool) else None}


def main(argv: list[str] | None = None) -> int:
    """Run the job file named on the command line on this rank; record an exception before re-raising it."""
    job = TrainingJob.read((argv if argv is not None else sys.argv[1:])[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        run_training_job(job, log=lambda line: print(line, flush=True))
    except Exception as exc:
        errors = Path(job.run_dir) / ERRORS_DIR
        errors.mkdir(parents=True, exist_ok=True)
        write_json(errors / f"rank-{rank}.json", error_record(rank, exc))
        raise
    finally:
        Parallel().close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
