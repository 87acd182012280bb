"""RunPlan: the flow's parameters checked against the real files and resolved into absolute paths and core
settings, passed between tasks. Plain Python (no Prefect): `adapterflow run` runs the same checks before it starts
any server, and the prepare-run task runs them again for deployment runs.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
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
from adapterflow.init_methods import is_randomized_pissa
from adapterflow.redaction import redact_text
from adapterflow.runtime.run_dir import RunDir
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


def check_run(params: SaveAdapterParameters) -> CheckedRun:
    """Every check that needs no Prefect server and writes nothing: the base model folder (or Hub download), the
    dataset file, the adapter config against the model's modules, the training device, the output folder.

    Relative paths resolve against the current directory.

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
    examples = _check(problems, "dataset.path", lambda: load_examples(dataset)) if dataset else None
    # Adapters name their base as others can find it: a Hub id stays a Hub id, a local base is its folder.
    is_hub_id = base_path is not None and is_hub_model_id(params.base_model.name_or_path)
    config = _check(problems, "adapter", lambda: params.adapter.lora_config(base_name if is_hub_id else str(base_path)))
    if base_path is not None and config is not None:
        from adapterflow.targeting import plan_targets

        _check(problems, "adapter.target_modules", lambda: plan_targets(_meta_model(base_path), config))
    n_train = 0
    if base_path is not None and examples is not None:
        train_examples, _ = split_examples(examples, params.dataset.eval_fraction, params.training.seed)
        tokenizer = _check(problems, "base_model.name_or_path", lambda: _tokenizer(load_tokenizer, base_path))
        tokenized = _check(problems, "dataset.chat_template", lambda: tokenize(
            train_examples, tokenizer, params.training.max_seq_len, dataset.chat_template)) if tokenizer else None
        n_train = len(tokenized or [])
        if tokenized is not None and n_train == 0:
            problems.append(f"dataset.path {dataset.path}: no example keeps a completion token within training."
                            f"max_seq_len={params.training.max_seq_len}; raise training.max_seq_len.")
    device = _device(problems, params.training.device)
    problems += _precision_problems(params, device)
    output_dir = local_path(params.save.output_dir) if params.save.output_dir else None
    problems += _folder_problems("save.output_dir", output_dir) if output_dir else []
    problems += _folder_problems("runs_root", local_path(params.runs_root))
    problems += _combination_problems(params) + _distributed_problems(params.training, device)
    if problems:
        message = "Invalid parameters:\n" + "\n".join(f"  - {p}" for p in problems)
        raise ParameterError(redact_text(message))  # a base model URL may carry a password
    return CheckedRun(base_path, dataset, config, n_train, output_dir, device)


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


def dataset_record(spec: DataSpec) -> dict:
    """RunPlan.dataset: the DataSpec's fields."""
    return asdict(spec)


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


def _meta_model(base_path: Path) -> torch.nn.Module:
    # The module tree without weights: enough to match target_modules, at no memory cost.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))


def _device(problems: list[str], device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("training.device=cuda: no CUDA device is visible to torch on this machine "
                        "(torch.cuda.is_available() is False); use training.device=auto or cpu.")
    return device


def _precision_problems(params: SaveAdapterParameters, device: str) -> list[str]:
    """fp16 autocast needs CUDA (torch's CPU autocast is meant for bf16, and fp16 training needs the grad scaler);
    fp16 training of fp16 base tensors (modules_to_save copies, biases) cannot be unscaled by torch's GradScaler."""
    training, dtype = params.training, params.base_model.dtype
    if training.precision != "fp16":
        return []
    if device != "cuda":
        where = ("no CUDA device is visible to torch on this machine" if params.training.device != "cpu"
                 else "training.device=cpu")
        return [f"training.precision=fp16 needs a CUDA device ({where}); use training.precision=bf16 (CPU and "
                f"CUDA) or fp32, or train on a machine with a GPU."]
    if training.strategy == "fsdp" and training.num_processes * training.nnodes > 1:
        return ["training.precision=fp16 with training.strategy=fsdp: torch.amp.GradScaler checks each rank's "
                "gradient shards alone, so ranks could disagree on skipping a step; use training.precision=bf16, "
                "or training.strategy=ddp."]
    trains_base_tensors = params.adapter.modules_to_save or params.adapter.bias != "none"
    if dtype == "float16" and trains_base_tensors:
        return ["training.precision=fp16 with base_model.dtype=float16 trains float16 copies of base tensors "
                "(adapter.modules_to_save / adapter.bias), which torch's GradScaler cannot unscale; use "
                "base_model.dtype=float32, or training.precision=bf16."]
    if dtype == "bfloat16":
        return ["training.precision=fp16 with base_model.dtype=bfloat16 would cast every bfloat16 base weight to "
                "float16 (a smaller range) in each matmul; use training.precision=bf16 with a bfloat16 base."]
    return []


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


def _combination_problems(params: SaveAdapterParameters) -> list[str]:
    problems = []
    if is_randomized_pissa(params.adapter.init) and not params.save.convert_pissa_to_lora:
        problems.append(f"adapter.init={params.adapter.init} without save.convert_pissa_to_lora: reloading re-runs a "
                        f"randomized SVD and gives another model, so verification would fail. Set "
                        f"save.convert_pissa_to_lora=true, or use init 'pissa' (exact SVD).")
    selected = params.save.selected_adapters
    if selected is not None and selected != [params.adapter.name]:
        problems.append(f"save.selected_adapters={selected}: this run trains one adapter, "
                        f"{params.adapter.name!r}; use [{params.adapter.name!r}] or null.")
    return problems


_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def _distributed_problems(training, device: str) -> list[str]:
    """training.num_processes / nnodes / rdzv_endpoint / batch_size fit together (torchrun's rules)."""
    problems = []
    world = training.num_processes * training.nnodes
    if training.batch_size % world:
        problems.append(f"training.batch_size={training.batch_size} is the global batch: it must be divisible by "
                        f"training.num_processes x training.nnodes = {world} (each process takes an equal share); "
                        f"use a multiple of {world}.")
    endpoint = training.rdzv_endpoint
    if training.nnodes > 1 and not endpoint:
        problems.append(f"training.nnodes={training.nnodes} needs training.rdzv_endpoint: host:port of the first "
                        f"node, reachable from every node (e.g. node1.example.org:29500).")
    match = _ENDPOINT.match(endpoint) if endpoint else None
    if endpoint and (match is None or not 0 < int(match["port"]) < 65536):
        problems.append(f"training.rdzv_endpoint={endpoint!r} is not host:port (a host name or IP address, a colon, "
                        f"a port 1-65535; IPv6 in brackets), e.g. node1.example.org:29500.")
    if device == "cuda" and torch.cuda.is_available() and training.num_processes > torch.cuda.device_count():
        problems.append(f"training.num_processes={training.num_processes}: this machine has "
                        f"{torch.cuda.device_count()} CUDA devices, one per process; use at most that many, or "
                        f"training.device=cpu.")
    return problems
