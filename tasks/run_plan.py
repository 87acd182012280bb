"""RunPlan: the flow's parameters checked against the real files and resolved into absolute paths and core
settings, passed between tasks. Plain Python (no Prefect): `adapterflow run` runs the same checks before it starts
any server, and the prepare-run task runs them again for deployment runs.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel

from adapterflow import ConfigError, LoraConfig, TargetError
from adapterflow.runtime.data import (DataSpec, DatasetError, load_examples, resolve_chat_template, split_examples,
                                      tokenize)
from adapterflow.flows.parameters import (BUILTIN_PREFIX, ParameterError, SaveAdapterParameters, is_local_reference,
                                          local_path)
from adapterflow.model_references import is_hub_dataset_id, is_hub_model_id
from adapterflow.redaction import redact_text
from adapterflow.runtime.data_sources import UnknownSplitError, hub_commit
from adapterflow.runtime.run_dir import RunDir
from adapterflow.tasks.parameter_checks import (approval_problems, combination_problems, device_for,
                                                distributed_problems, exact_match_problems, precision_problems,
                                                serving_problems)
from adapterflow.runtime.training import TrainingSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunPlan(BaseModel):
    run_dir: str
    adapter_name: str
    base_model_path: str
    dtype: Literal["float32", "bfloat16", "float16"]
    dataset_path: str  # for the record; `dataset` is what the train step reads
    dataset_fingerprint: str  # sha256 of the dataset's files (a Hub dataset: of its commit)
    dataset: dict  # DataSpec fields: path resolved, chat_template as template text
    eval_fraction: float
    max_seq_len: int
    lora_config: dict
    training: dict  # TrainingSettings fields, steps and device resolved
    launch: dict = {}  # TrainingJob's num_processes, nnodes, rdzv_endpoint, strategy (launch_settings)
    output_dir: str
    safe_serialization: bool
    save_embedding_layers: Union[bool, Literal["auto"]]
    convert_pissa_to_lora: bool  # PiSSA init and conversion asked
    atol: float
    require_runtimes: list[str] = []  # verify.require_runtimes: serving runtimes whose preflight must pass
    parameters: dict  # the flow parameters as given, for the record

    @property
    def run(self) -> RunDir:
        return RunDir(Path(self.run_dir))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self) -> LoraConfig:
        return LoraConfig.from_dict(self.lora_config)

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(**self.training)

    def data_spec(self) -> DataSpec:
        return DataSpec(**self.dataset)


@dataclass(frozen=True)
class CheckedRun:
    """What `check_run` resolved: enough to build the RunPlan without reading anything again."""

    base_path: Path
    dataset: DataSpec  # path resolved, chat_template as template text
    config: LoraConfig
    n_train: int
    output_dir: Optional[Path]  # None: <run dir>/adapter
    device: str


_USER_ERRORS = (FileNotFoundError, NotADirectoryError, DatasetError, ConfigError, TargetError, ValueError, OSError)


def check_run(params: SaveAdapterParameters, temporary_prefect_api: bool = False) -> CheckedRun:
    """Every check that needs no Prefect server and writes nothing: the base model folder (or Hub download), the
    dataset file, the adapter config against the model's modules, the training device, the output folder.

    Relative paths resolve against the current directory. `temporary_prefect_api`: `adapterflow run` without
    PREFECT_API_URL (its Prefect server ends with the command: promote.require_approval is refused).

    Raises:
        ParameterError: listing every problem found (one line each: the parameter, what is wrong, the fix).
    """
    from adapterflow.runtime.base_models import load_tokenizer, resolve_base_model

    problems: list[str] = []
    base_name = params.base_model.name_or_path
    if is_local_reference(base_name, Path.cwd()):
        base_name = str(local_path(base_name))  # a relative folder is in the current directory
    base_path = _check(problems, "base_model.name_or_path", lambda: resolve_base_model(base_name))
    dataset = _check(problems, "dataset.chat_template", lambda: data_spec(params))
    if dataset is not None and is_hub_dataset_id(dataset.path):  # one commit for the whole run
        dataset = _check(problems, "dataset.path", lambda: replace(dataset, revision=hub_commit(dataset.path,
                                                                                                dataset.revision)))
    examples = _check(problems, "dataset.path", lambda: load_examples(dataset)) if dataset else None
    problems += evaluation_problems(params, dataset, examples)
    # Adapters name their base as others can find it: a Hub id stays a Hub id, a local base is its folder.
    is_hub_id = base_path is not None and is_hub_model_id(params.base_model.name_or_path)
    config = _check(problems, "adapter", lambda: params.adapter.lora_config(base_name if is_hub_id else str(base_path)))
    if base_path is not None and config is not None:
        from adapterflow.targeting import plan_targets

        _check(problems, "adapter.target_modules", lambda: plan_targets(meta_model(base_path), config))
    n_train = 0
    if base_path is not None and examples is not None:
        splits = split_examples(examples, params.dataset.eval_fraction, params.training.seed)
        tokenizer = _check(problems, "base_model.name_or_path", lambda: _tokenizer(load_tokenizer, base_path))
        tokenized = _check(problems, "dataset.chat_template", lambda: [tokenize(
            split, tokenizer, params.training.max_seq_len, dataset.chat_template) for split in splits]) \
            if tokenizer else None
        n_train = len(tokenized[0]) if tokenized else 0
        if tokenized is not None and not (tokenized[0] and tokenized[1]):
            problems.append(f"dataset.path {dataset.path}: {len(examples)} example(s), of which {n_train} train and "
                            f"{len(tokenized[1])} held out (dataset.eval_fraction={params.dataset.eval_fraction}) keep "
                            f"a completion token within training.max_seq_len={params.training.max_seq_len}; both "
                            f"need at least one: add examples, or raise training.max_seq_len.")
    device = device_for(problems, params.training.device)
    problems += precision_problems(params, device)
    output_dir = local_path(params.save.output_dir) if params.save.output_dir else None
    problems += _folder_problems("save.output_dir", output_dir) if output_dir else []
    problems += _folder_problems("runs_root", local_path(params.runs_root))
    problems += combination_problems(params) + distributed_problems(params.training, device)
    problems += serving_problems(params, config) + approval_problems(params, temporary_prefect_api)
    if problems:
        message = "Invalid parameters:\n" + "\n".join(f"  - {p}" for p in problems)
        raise ParameterError(redact_text(message))  # a base model URL may carry a password
    return CheckedRun(base_path, dataset, config, n_train, output_dir, device)


def evaluation_problems(params: SaveAdapterParameters, dataset: Optional[DataSpec], examples) -> list[str]:
    """evaluate.dataset readable (an unknown split named as evaluate.split, not dataset.split), and pairs for
    evaluate.exact_match among the examples evaluate-adapter will score (evaluate.dataset's, or the training
    data's held-out split, as `split_examples` makes it)."""
    if dataset is None:
        return []
    if params.evaluate.dataset:
        try:
            scored = load_examples(evaluation_spec(params.evaluate, dataset))
        except _USER_ERRORS as exc:
            message = str(exc.for_parameter("evaluate.split") if isinstance(exc, UnknownSplitError) else exc)
            return [message if message.startswith("evaluate.dataset") else f"evaluate.dataset: {message}"]
    elif examples is not None and params.evaluate.exact_match:  # the held-out split matters only for the pairs
        scored = split_examples(examples, params.dataset.eval_fraction, params.training.seed)[1]
    else:
        return []
    return exact_match_problems(params, scored)


def data_spec(params: SaveAdapterParameters) -> DataSpec:
    """The dataset parameters resolved: a local path made absolute (builtin names and Hub dataset ids kept), the
    chat template read from its file.

    Raises:
        DatasetError: dataset.chat_template is neither a template nor a readable file.
    """
    settings = params.dataset
    path = settings.path
    if not (path.startswith(BUILTIN_PREFIX) or is_hub_dataset_id(path)):
        path = str(local_path(path))
    fields = settings.model_dump(exclude={"eval_fraction"})
    return DataSpec(**{**fields, "path": path, "chat_template": resolve_chat_template(settings.chat_template)})


def evaluation_spec(settings, spec: DataSpec) -> Optional[DataSpec]:
    """evaluate.dataset (an EvaluateSettings) as a DataSpec: its path resolved as dataset.path's is, its split,
    the training dataset's column names and chat template; None without evaluate.dataset."""
    path = settings.dataset
    if not path:
        return None
    if not (path.startswith(BUILTIN_PREFIX) or is_hub_dataset_id(path)):
        path = str(local_path(path))
    return replace(spec, path=path, split=settings.split, revision=None)


def training_settings(params: SaveAdapterParameters, checked: CheckedRun) -> dict:
    """The TrainingSettings fields, with steps (from epochs), the device and log_every (default: steps // 50, about
    50 metric points per run, at least 1) resolved."""
    training = params.training
    steps = training.steps
    if steps is None:
        per_epoch = math.ceil(checked.n_train / training.batch_size / training.gradient_accumulation_steps)
        steps = max(1, math.ceil(training.epochs * per_epoch))
    return dict(steps=steps, learning_rate=training.learning_rate, batch_size=training.batch_size,
                gradient_accumulation_steps=training.gradient_accumulation_steps,
                max_grad_norm=training.max_grad_norm, weight_decay=training.weight_decay,
                warmup_steps=min(training.warmup_steps, steps), seed=training.seed,
                checkpoint_every=training.checkpoint_every, keep_checkpoints=training.keep_checkpoints,
                device=checked.device, precision=training.precision,
                gradient_checkpointing=training.gradient_checkpointing,
                log_every=training.log_every or max(1, steps // 50), eval_every=training.eval_every or 0)


def launch_settings(params: SaveAdapterParameters) -> dict:
    """How many training processes, where they meet, and how they share the model (TrainingJob fields)."""
    training = params.training
    return dict(num_processes=training.num_processes, nnodes=training.nnodes, rdzv_endpoint=training.rdzv_endpoint,
                strategy=training.strategy)


def _check(problems: list[str], parameter: str, step):
    """Run one check; a failure becomes a problem line (prefixed with the parameter unless the message names it)."""
    try:
        return step()
    except _USER_ERRORS as exc:
        message = str(exc)
        problems.append(message if message.startswith(parameter.split(".")[0]) else f"{parameter}: {message}")
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(load_tokenizer, base_path: Path):
    if not any((base_path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {base_path}; save the model's "
                                f"tokenizer into that folder too (tokenizer.save_pretrained(folder)).")
    try:
        return load_tokenizer(base_path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(": ")
        raise FileNotFoundError(f"no usable tokenizer in {base_path} ({reason}); save the model's tokenizer into "
                                f"that folder too (tokenizer.save_pretrained(folder)).") from None


def meta_model(base_path: Path) -> torch.nn.Module:
    """The base's module tree without weights (meta device): enough to match target_modules, at no memory cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))


def _folder_problems(parameter: str, folder: Path) -> list[str]:
    """A folder we will create or write into: not a file, no file on its path, writable where it starts."""
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor == folder and not folder.is_dir():
        return [f"{parameter} {folder} is an existing file; pass a folder."]
    if not ancestor.is_dir():
        return [f"{parameter} {folder}: {ancestor} is a file, so the folder cannot be created; pick another path."]
    if not os.access(ancestor, os.W_OK):
        return [f"{parameter} {folder} is not writable ({ancestor} is read-only for this user)."]
    try:  # root passes os.access everywhere; /proc, read-only mounts and full disks only show when trying
        os.rmdir(tempfile.mkdtemp(prefix=".adapterflow-probe-", dir=ancestor))
    except OSError as exc:
        return [f"{parameter} {folder}: cannot create folders in {ancestor} ({exc.strerror}); pick another path."]
    return []
