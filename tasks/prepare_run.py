"""prepare-run: check every parameter against the real files before any training starts, and resolve them."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from prefect import get_run_logger, task
from transformers import AutoConfig, AutoModelForCausalLM

from adapterflow import ConfigError, TargetError, formats
from adapterflow.base_models import load_tokenizer, resolve_base_model
from adapterflow.data import DatasetError, dataset_sha256, load_examples, split_examples, tokenize
from adapterflow.init_methods import is_pissa, is_randomized_pissa
from adapterflow.run_dir import RunDir, read_json, write_json
from adapterflow.targeting import plan_targets
from adapterflow.flows.parameters import SaveAdapterParameters, is_local_reference, local_path
from adapterflow.tasks.policy import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


class ParameterError(ValueError):
    """Flow parameters that cannot work; the message lists every problem."""


@task(name="prepare-run", **RETRY_OPTIONS, **RESULT_OPTIONS)
def prepare_run(params: SaveAdapterParameters, run_name: str) -> RunPlan:
    """Resolve the base model and dataset, check the adapter against the model and the output folder, and write
    <run>/plan.json. Raises ParameterError listing everything that is wrong."""
    runs_root = local_path(params.runs_root)
    run = RunDir(runs_root / run_name)
    problems: list[str] = []
    base_name = params.base_model.name_or_path
    if is_local_reference(base_name, Path.cwd()):
        base_name = str(local_path(base_name))  # a relative folder is in the current directory
    base_path = _check(problems, lambda: resolve_base_model(base_name))
    dataset = local_path(params.dataset.path) if not params.dataset.path.startswith("builtin:") else params.dataset.path
    examples = _check(problems, lambda: load_examples(dataset))
    # Adapters name their base as others can find it: a Hub id stays a Hub id, a local base is its folder.
    is_hub_id = base_path is not None and not base_name.startswith("builtin:") and not Path(base_name).exists()
    config = _check(problems, lambda: params.adapter.lora_config(base_name if is_hub_id else str(base_path)))
    n_train = None
    if base_path is not None and config is not None:
        _check(problems, lambda: plan_targets(_meta_model(base_path), config))
    if base_path is not None and examples is not None:
        train_examples, _ = split_examples(examples, params.dataset.eval_fraction, params.training.seed)
        tokenizer = load_tokenizer(base_path)
        n_train = len(tokenize(train_examples, tokenizer, params.training.max_seq_len))
        if n_train == 0:
            problems.append(f"dataset {dataset}: no example keeps a completion token within max_seq_len="
                            f"{params.training.max_seq_len}; raise training.max_seq_len.")
    output_dir = local_path(params.save.output_dir) if params.save.output_dir else run.root / "adapter"
    problems += _output_problems(output_dir)
    if is_randomized_pissa(params.adapter.init) and not params.save.convert_pissa_to_lora:
        problems.append(f"adapter.init={params.adapter.init} without save.convert_pissa_to_lora: reloading re-runs a "
                        f"randomized SVD and gives another model, so verification would fail. Set "
                        f"save.convert_pissa_to_lora=true, or use init 'pissa' (exact SVD).")
    selected = params.save.selected_adapters
    if selected is not None and selected != [params.adapter.name]:
        problems.append(f"save.selected_adapters={selected}: this run trains one adapter, "
                        f"{params.adapter.name!r}; use [{params.adapter.name!r}] or null.")
    if problems:
        raise ParameterError("Invalid save-adapter parameters:\n" + "\n".join(f"  - {p}" for p in problems))
    if params.save.output_dir:
        output_dir = claim_output_dir(output_dir, run, runs_root / "claims", params.save.if_exists)
    plan = RunPlan(
        run_dir=str(run.root), adapter_name=params.adapter.name, base_model_path=str(base_path),
        dtype=params.base_model.dtype, dataset_path=str(dataset), dataset_sha256=dataset_sha256(dataset),
        eval_fraction=params.dataset.eval_fraction, max_seq_len=params.training.max_seq_len,
        lora_config=config.to_dict(), training=_training_settings(params, n_train), output_dir=str(output_dir),
        safe_serialization=params.save.safe_serialization, save_embedding_layers=params.save.save_embedding_layers,
        convert_pissa_to_lora=is_pissa(params.adapter.init) and params.save.convert_pissa_to_lora,
        atol=params.verify.atol or (1e-4 if params.base_model.dtype == "float32" else 5e-2),
        parameters=params.model_dump(mode="json"),
    )
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.plan, plan.model_dump(mode="json"))
    get_run_logger().info("Run directory %s; %d training examples", run.root, n_train)
    return plan


def _check(problems: list[str], step):
    """Run one check; a failure becomes a problem line instead of stopping the others."""
    try:
        return step()
    except (FileNotFoundError, DatasetError, ConfigError, TargetError, ValueError) as exc:
        problems.append(str(exc))
        return None


def _meta_model(base_path: Path) -> torch.nn.Module:
    # The module tree without weights: enough to match target_modules, at no memory cost.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))


def _output_problems(output_dir: Path) -> list[str]:
    if output_dir.exists() and not output_dir.is_dir():
        return [f"save.output_dir {output_dir} is an existing file; pass a folder."]
    ancestor = output_dir
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        return [f"save.output_dir {output_dir} is not writable ({ancestor} is read-only for this user)."]
    return []


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


def _training_settings(params: SaveAdapterParameters, n_train: int) -> dict:
    training = params.training
    steps = training.steps
    if steps is None:
        per_epoch = math.ceil(n_train / training.batch_size / training.gradient_accumulation_steps)
        steps = max(1, math.ceil(training.epochs * per_epoch))
    device = training.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dict(steps=steps, learning_rate=training.learning_rate, batch_size=training.batch_size,
                gradient_accumulation_steps=training.gradient_accumulation_steps,
                max_grad_norm=training.max_grad_norm, weight_decay=training.weight_decay,
                warmup_steps=min(training.warmup_steps, steps), seed=training.seed,
                checkpoint_every=training.checkpoint_every, device=device)

