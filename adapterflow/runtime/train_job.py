"""The training job of one run: tokenizer, data, model, eval before, train, eval after, probe, training.json.

The same function runs in the train task's process (one process) and on every rank under torchrun
(`python -m adapterflow.runtime.launch <run>/training_job.json`). Under torchrun every rank builds the same
model from the same seed (PiSSA: rank 0 initialises and writes `<run>/initial/`, the others wait and load it,
so the residual is identical everywhere), and only rank 0 writes files (initial adapter, checkpoints, probe,
metrics.jsonl, training.json), logs and reports progress (to `<run>/metrics.jsonl`, which the train task tails
under torchrun, and to the observer it is given in its own process).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch

from adapterflow.config import LoraConfig
from adapterflow.runtime.base_models import load_tokenizer
from adapterflow.runtime.checkpoints import Checkpoints
from adapterflow.runtime.data import DataSpec, collate, load_examples, split_examples, tokenize
from adapterflow.runtime.distributed import Parallel
from adapterflow.runtime.metrics_log import MetricsFile
from adapterflow.runtime.progress import Observers, TrainingObserver
from adapterflow.runtime.run_dir import RunDir, build_adapter_model, write_json, write_probe
from adapterflow.runtime.training import TrainingSettings, evaluate, train

PROBE_SIZE = 4  # eval examples whose logits verification compares
JOB_FILE = "training_job.json"


@dataclass(frozen=True)
class TrainingJob:
    """Everything a training process needs, as plain JSON (`<run>/training_job.json` for torchrun)."""

    run_dir: str
    adapter_name: str
    base_model_path: str
    dtype: Literal["float32", "bfloat16", "float16"]
    dataset: dict  # DataSpec fields (adapterflow.runtime.data)
    eval_fraction: float
    max_seq_len: int
    lora_config: dict
    training: dict  # TrainingSettings fields; device "cpu" or "cuda" (ranks take cuda:LOCAL_RANK)
    save_embedding_layers: Union[bool, Literal["auto"]] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with more than one process
    num_processes: int = 1  # per node
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None  # host:port of the c10d rendezvous, for nnodes > 1

    @property
    def run(self) -> RunDir:
        return RunDir(Path(self.run_dir))

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / JOB_FILE

    @property
    def world_size(self) -> int:
        return self.num_processes * self.nnodes

    def write(self) -> Path:
        write_json(self.path, asdict(self))
        return self.path

    @classmethod
    def read(cls, path: str | Path) -> "TrainingJob":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def load_training_data(job: TrainingJob, tokenizer, seed: int):
    """(train, eval) tokenized examples: the one place that reads the dataset for training."""
    spec = DataSpec(**job.dataset)
    train_examples, eval_examples = split_examples(load_examples(spec), job.eval_fraction, seed)
    return (tokenize(train_examples, tokenizer, job.max_seq_len, spec.chat_template),
            tokenize(eval_examples, tokenizer, job.max_seq_len, spec.chat_template))


def run_training_job(job: TrainingJob, log: Callable[[str], None] = print,
                     observer: TrainingObserver | None = None) -> dict:
    """Train (resuming from the newest checkpoint), evaluate before and after, write the probe and training.json.

    Args:
        log: receives progress lines other than metrics (on rank 0 only).
        observer: receives the start, every step, the metrics records and the evaluations (on rank 0 only), as
            `<run>/metrics.jsonl` does (adapterflow.runtime.metrics_log).

    Returns:
        The training summary (as in <run>/training.json): steps, losses, eval loss before/after, tokens/s,
        started_at / finished_at (wall clock, seconds since the epoch), ...

    Raises:
        DatasetError, CheckpointError, FileNotFoundError, ...: user errors, as the steps below raise them.
    """
    started_at = time.time()
    settings = TrainingSettings(**job.training)
    parallel = Parallel.from_environment(job.strategy, settings.device)
    settings = replace(settings, device=parallel.device)
    say = log if parallel.is_main_process else (lambda message: None)
    run, tokenizer = job.run, load_tokenizer(job.base_model_path)
    report = Observers(MetricsFile(run.metrics), observer) if parallel.is_main_process else TrainingObserver()
    pad = tokenizer.pad_token_id
    train_data, eval_data = load_training_data(job, tokenizer, settings.seed)
    model = _build_model(job, run, settings.seed, parallel).to(settings.device)

    def evaluate_now() -> float:
        return evaluate(model, eval_data, settings.batch_size, pad, settings.device, parallel)

    eval_before = evaluate_now()
    report.evaluated(0, eval_before, time.time())
    # Checkpoints hold the adapter as the pipeline publishes it (embedding layers per save.save_embedding_layers),
    # so the last one is the trained adapter: the later steps read it instead of rebuilding the model.
    checkpoints = Checkpoints(run.checkpoints, job.adapter_name, job.save_embedding_layers, settings.keep_checkpoints)
    if parallel.distributed:
        say(f"Training on {parallel.world_size} processes ({job.strategy}, {parallel.device.split(':')[0]})")
    result = train(model, train_data, settings, pad, checkpoints, observer=report, parallel=parallel,
                   evaluator=evaluate_now)
    if result.resumed_from is not None:
        say(f"Resumed from the checkpoint at step {result.resumed_from}")
    eval_after = evaluate_now()
    report.evaluated(settings.steps, eval_after, time.time())
    probe = collate(eval_data[:PROBE_SIZE], pad)
    with torch.no_grad():  # every rank runs it: FSDP gathers the parameters for the forward
        probe_logits = model(input_ids=probe["input_ids"].to(settings.device),
                             attention_mask=probe["attention_mask"].to(settings.device)).logits
    trainable, total = model.get_nb_trainable_parameters()
    summary = {
        "steps": result.steps, "final_loss": result.losses[-1], "losses": result.losses,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after, "tokens": result.tokens,
        "train_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "trainable_parameters": trainable, "total_parameters": total, "resumed_from": result.resumed_from,
        "checkpoint": str(run.final_checkpoint(settings.steps)),
        "initial_adapter": str(run.initial) if run.initial.exists() else None,
        "num_processes": parallel.world_size, "strategy": job.strategy if parallel.distributed else None,
        "precision": settings.precision, "gradient_checkpointing": settings.gradient_checkpointing,
        "log_every": settings.log_every, "started_at": started_at, "finished_at": time.time(),
    }
    if parallel.is_main_process:
        write_probe(run.probe, probe, probe_logits.cpu())
        write_json(run.training_summary, summary)
    parallel.barrier()
    return summary


def _build_model(job: TrainingJob, run: RunDir, seed: int, parallel: Parallel):
    """The model at the start of training, the same on every rank: rank 0 builds it first (for PiSSA it writes
    <run>/initial/), then the others, which find that folder and load it instead of running the SVD again."""
    def build():
        return build_adapter_model(job.base_model_path, getattr(torch, job.dtype), LoraConfig.from_dict(job.lora_config),
                                   job.adapter_name, run, seed)

    model = build() if parallel.is_main_process else None
    parallel.barrier()
    return model if model is not None else build()
