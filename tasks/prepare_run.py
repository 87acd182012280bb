"""prepare-run: check every parameter against the real files before any training starts, and resolve them."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from adapterflow import formats
from adapterflow.runtime.data import dataset_fingerprint
from adapterflow.flows.parameters import SaveAdapterParameters, local_path
from adapterflow.init_methods import is_pissa
from adapterflow.redaction import redact
from adapterflow.runtime.checkpoints import Checkpoints
from adapterflow.runtime.run_dir import RunDir, read_json, write_json
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.targeting import embedding_is_targeted
from adapterflow.tasks.run_plan import (ParameterError, RunPlan, check_run, launch_settings, meta_model,
                                        training_settings)

__all__ = ["ParameterError", "claim_output_dir", "prepare_run"]


@task(name="prepare-run", **RETRY_OPTIONS, **RESULT_OPTIONS)
def prepare_run(params: SaveAdapterParameters, run_name: str) -> RunPlan:
    """Check the parameters (`run_plan.check_run`), claim the output folder and write <run>/plan.json.

    Raises:
        ParameterError: listing everything that is wrong (permanent: not retried).
    """
    checked = check_run(params)
    run = RunDir(local_path(params.runs_root) / run_name)
    output_dir = checked.output_dir or run.root / "adapter"
    if params.save.output_dir:
        output_dir = claim_output_dir(output_dir, run, local_path(params.runs_root) / "claims", params.save.if_exists)
    plan = build_plan(params, checked, run, output_dir)
    record = redact(plan.model_dump(mode="json"))  # no token or URL password on disk
    _refuse_changed_rerun(run, record, run_name)
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.plan, record)
    if params.save.save_embedding_layers == "auto" and plan.save_embedding_layers:
        get_run_logger().info("adapter.target_modules names an embedding layer, so the adapter also stores the full "
                              "embedding weights, as PEFT does (save.save_embedding_layers=auto; false leaves "
                              "them out)")
    get_run_logger().info("Run directory %s; %d training examples", run.root, checked.n_train)
    return plan


def claim_output_dir(output_dir: Path, run: RunDir, claims_dir: Path, if_exists: str) -> Path:
    """Reserve the output folder for this run, so concurrent or later runs never write into each other's adapter.

    A claim is a file in <runs_root>/claims created with O_EXCL (exactly one run wins a race). A folder already
    claimed by another run, or holding an adapter from outside the pipeline, is refused ("error") or skipped for
    the next free `<output_dir>-v<N>` ("new_version"). A rerun of the same run keeps its own claim.

    Raises:
        ParameterError: the folder is taken and if_exists is "error".
    """
    for version in range(1, 10_000):
        candidate = output_dir if version == 1 else output_dir.with_name(f"{output_dir.name}-v{version}")
        claim = claims_dir / f"{hashlib.sha256(os.path.realpath(candidate).encode()).hexdigest()[:24]}.json"
        if claim.is_file() and read_json(claim).get("run_dir") == str(run.root):
            return candidate
        if not claim.is_file() and not _holds_adapter(candidate):
            claims_dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(claim, "x") as file:  # O_EXCL: one winner per folder
                    json.dump({"output_dir": str(candidate), "run_dir": str(run.root)}, file)
                return candidate
            except FileExistsError:
                pass
        if if_exists == "error":
            raise ParameterError(
                f"save.output_dir {candidate} already holds (or is reserved for) another run's adapter; pick a new "
                f"folder, delete it, or set save.if_exists=new_version to write to {candidate.name}-v2 and so on.")
    raise ParameterError(f"No free version of {output_dir} left.")


def _holds_adapter(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(f"**/{formats.CONFIG_NAME}"))


# What a rerun may change and still resume its checkpoints: where and how fast it runs, not what it trains.
def build_plan(params: SaveAdapterParameters, checked, run: RunDir, output_dir: Path) -> RunPlan:
    """The run's plan from its parameters and what check_run found (`checked`); writes nothing."""
    return RunPlan(
        run_dir=str(run.root), adapter_name=params.adapter.name, base_model_path=str(checked.base_path),
        dtype=params.base_model.dtype, dataset_path=checked.dataset.path,
        dataset_fingerprint=dataset_fingerprint(checked.dataset), dataset=asdict(checked.dataset),
        eval_fraction=params.dataset.eval_fraction,
        max_seq_len=params.training.max_seq_len, lora_config=checked.config.to_dict(),
        training=training_settings(params, checked), launch=launch_settings(params), output_dir=str(output_dir),
        safe_serialization=params.save.safe_serialization, save_embedding_layers=_embedding_layers(params, checked),
        convert_pissa_to_lora=is_pissa(params.adapter.init) and params.save.convert_pissa_to_lora,
        atol=params.verify.atol or (1e-4 if params.base_model.dtype == "float32" else 5e-2),
        require_runtimes=list(params.verify.require_runtimes),
        parameters=params.model_dump(mode="json"),
    )


def _embedding_layers(params: SaveAdapterParameters, checked) -> bool:
    """save.save_embedding_layers with "auto" decided now, as the library would decide it at every save (PEFT's
    rule: an embedding layer is targeted; the vocabulary never changes in this pipeline): the run's log says it
    once, instead of a Python warning at every checkpoint."""
    flag = params.save.save_embedding_layers
    if flag != "auto":
        return flag
    targets = checked.config.target_modules
    needs_names = isinstance(targets, str) and targets.lower() != formats.ALL_LINEAR  # a regex: match module names
    return embedding_is_targeted(targets, meta_model(checked.base_path) if needs_names else None)


def check_rerun(params: SaveAdapterParameters, checked) -> None:
    """For `adapterflow run` before it starts a server: a named run that has trained is only rerun with the same
    training settings (prepare-run checks it again in the flow).

    Raises:
        ParameterError: see _refuse_changed_rerun.
    """
    if params.run_name:
        run = RunDir(local_path(params.runs_root) / params.run_name)
        record = redact(build_plan(params, checked, run, checked.output_dir or run.root / "adapter")
                        .model_dump(mode="json"))
        _refuse_changed_rerun(run, record, params.run_name)


_RESUMABLE_CHANGES = {"training.device", "training.checkpoint_every", "training.keep_checkpoints",
                      "training.log_every", "training.eval_every", "training.gradient_checkpointing",
                      "training.precision"}
_TRAINED_FIELDS = ("adapter_name", "base_model_path", "dtype", "dataset_fingerprint", "dataset", "eval_fraction",
                   "max_seq_len", "lora_config", "training")


def _refuse_changed_rerun(run: RunDir, record: dict, run_name: str) -> None:
    """A rerun of a run that has trained (an initial adapter or a checkpoint) resumes it, so it must train the same
    thing: refuse, before anything is written, a rerun whose adapter, data, base or schedule differ.

    Raises:
        ParameterError: the differences listed, with the fix.
    """
    if not run.plan.is_file() or not (run.initial.exists() or Checkpoints(run.checkpoints).complete()):
        return
    before = read_json(run.plan)
    changes = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in _differences(before, record).items()
               if key not in _RESUMABLE_CHANGES]
    if changes:
        shown = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
        raise ParameterError(
            f"run_name={run_name!r} has already trained in {run.root} with other settings ({shown}), and a rerun "
            f"resumes its checkpoints. Pick a new run_name, or delete {run.checkpoints} and {run.initial} to train "
            f"this run again from the start.")


def _differences(before: dict, after: dict) -> dict[str, tuple]:
    """Dotted key -> (before, after) for the trained fields that differ (lora_config.r, training.steps, ...)."""
    found = {}
    for field in _TRAINED_FIELDS:
        old, new = before.get(field), after.get(field)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    found[f"{field}.{key}"] = (old.get(key), new.get(key))
        elif old != new:
            found[field] = (old, new)
    return found
