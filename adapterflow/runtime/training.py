"""A plain PyTorch training loop for adapters, with checkpoints that a killed run resumes from.

AdamW with linear warmup and cosine decay, gradient accumulation and clipping, optional mixed precision
(`TrainingSettings.precision`) and gradient checkpointing. Under torchrun every rank runs this loop on its slice of
the same global batches (`adapterflow.runtime.distributed`: DDP or FSDP2); the loss of a step is normalised by the
label tokens of the whole step, so N processes train the one-process adapter. A checkpoint
(`adapterflow.runtime.checkpoints`) is a PEFT adapter folder plus the optimizer, scheduler and grad-scaler state,
the RNG state and the loss history, so a resumed run continues exactly where the checkpoint was taken: the final
adapter equals an uninterrupted run's.

Precision (the autocast dtype of the training forward; the weights keep their dtypes):
    fp32  no autocast: every op runs in the dtype of its weights (base_model.dtype for the base, fp32 adapters).
    bf16  torch.autocast(device, torch.bfloat16) on CPU and CUDA; no grad scaler (bf16 has fp32's exponent range).
    fp16  torch.autocast("cuda", torch.float16) with torch.amp.GradScaler (fp16 gradients underflow without it);
          CUDA only (tasks/run_plan.check_run refuses it elsewhere).
Adapter weights, their gradients and AdamW's state stay fp32 in every mode (LoraLayer.adapter_dtype); autocast casts
them to the compute dtype per matmul (torch.amp docs, "Automatic Mixed Precision"). Evaluation and the probe run
without autocast.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adapterflow.runtime.checkpoints import Checkpoints
from adapterflow.runtime.data import BatchStream, TokenizedExample, collate, label_tokens, shard
from adapterflow.runtime.distributed import Parallel
from adapterflow.runtime.progress import StepMetrics, TrainingObserver, is_record_step, now, window_mean


@dataclass
class TrainingSettings:
    steps: int  # optimizer steps
    learning_rate: float = 2e-3
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2  # newest checkpoints kept (Checkpoints.keep)
    device: str = "cpu"
    precision: str = "fp32"  # a key of AUTOCAST_DTYPES
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (enable_gradient_checkpointing)
    log_every: int = 1  # optimizer steps between metrics records (TrainingObserver.logged)
    eval_every: int = 0  # optimizer steps between evaluations during training; 0: none (the job evaluates
    # before and after training)


@dataclass
class TrainingResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    tokens: int = 0  # non-padding tokens seen
    seconds: float = 0.0
    resumed_from: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


Evaluator = Callable[[], float]  # the eval loss of the model as it is (every rank calls it under torchrun)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of one training forward: none for fp32, torch.autocast(device.type, dtype) else."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """torch.amp.GradScaler, enabled for fp16 only (a disabled scaler passes losses and steps through as they are;
    its state_dict is empty)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_gradient_checkpointing(model: torch.nn.Module) -> Callable[[], None]:
    """Switch on transformers' non-reentrant activation checkpointing in the base model under an AdapterModel (or a
    transformers model itself); returns the function that switches it off again.

    Each decoder layer (transformers' GradientCheckpointingLayer) then keeps only its inputs in the forward and
    runs again in the backward (torch.utils.checkpoint with use_reentrant=False, which also restores the RNG state,
    so dropout draws the same masks). Our LoRA layers sit inside those decoder layers and are recomputed with them.
    The input embeddings' output is made to require grad when the embeddings are frozen (PEFT's
    prepare_model_for_gradient_checkpointing does the same): the reentrant variant needs it for gradients to reach
    the checkpointed layers; the non-reentrant one does not, but it keeps the recipe PEFT and the HF Trainer use.

    `activation_checkpointing_enable` is transformers 5's name; `gradient_checkpointing_enable` is its deprecated
    alias (FutureWarning, removal in v6) and takes the same kwargs.

    Raises:
        ValueError: the base model does not support gradient checkpointing (transformers' message).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    embeddings = base.get_input_embeddings()
    frozen = not any(p.requires_grad for p in embeddings.parameters())
    if frozen and not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    config = getattr(base, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False  # a KV cache is useless in training and incompatible with the recompute

    def disable() -> None:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()
        if use_cache:
            config.use_cache = use_cache

    return disable


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """1) linear warmup to 1, 2) cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: torch.nn.Module, examples: list[TokenizedExample], settings: TrainingSettings, pad_id: int,
          checkpoints: Checkpoints, observer: TrainingObserver | None = None,
          parallel: Parallel = Parallel(), evaluator: Evaluator | None = None) -> TrainingResult:
    """Train the model's trainable parameters; resume from the newest of `checkpoints` if there is one.

    Args:
        model: an AdapterModel whose active adapter is `checkpoints.adapter_name` (on `settings.device`; under
            torchrun the same model on every rank; FSDP shards it in place).
        checkpoints: where checkpoints go every `settings.checkpoint_every` steps and after the last step
            (the newest `checkpoints.keep` stay; rank 0 writes them).
        observer: receives progress on rank 0 (adapterflow.runtime.progress): the start, every step, a metrics
            record every `settings.log_every` steps and after the last, each evaluation.
        parallel: this process's rank among the torchrun ranks (default: the only process).
        evaluator: the eval loss, run every `settings.eval_every` steps (not after the last: the caller
            evaluates then); under torchrun every rank runs it.

    Returns:
        The loss history and throughput of the whole run (including steps done before a resume), the same on
        every rank.

    Raises:
        adapterflow.runtime.checkpoints.CheckpointError: the newest checkpoint does not fit this model, or is
            of the old model-key layout.
    """
    device = torch.device(settings.device)
    observer = observer if observer is not None and parallel.is_main_process else TrainingObserver()
    result = TrainingResult(steps=settings.steps)
    checkpoint = checkpoints.latest()
    start = 0 if checkpoint is None else _restore(checkpoints, checkpoint, model.to(device), result)
    module = parallel.wrap(model.to(device))
    module.train()
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: fully_shard replaces them
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps))
    scaler = grad_scaler(device, settings.precision)
    stream = BatchStream(examples, settings.batch_size, settings.seed, pad_id, parallel.rank, parallel.world_size)
    if checkpoint is None:
        torch.manual_seed(settings.seed)
    else:
        checkpoints.restore_training_state(checkpoint, model, optimizer, scheduler, parallel, scaler)
    disable_checkpointing = enable_gradient_checkpointing(model) if settings.gradient_checkpointing else None
    observer.started(start, settings.steps)
    started = time.perf_counter() - result.seconds
    for step in range(start, settings.steps):
        loss, tokens, grad_norm = _optimizer_step(module, params, optimizer, scaler, stream, step, settings, device,
                                                  parallel)
        scheduler.step()
        result.losses.append(loss)
        result.tokens += tokens
        result.seconds = time.perf_counter() - started
        done = step + 1
        observer.stepped(done, loss)
        if is_record_step(done, settings.steps, settings.log_every):
            epoch = done * settings.gradient_accumulation_steps / stream.batches_per_epoch
            observer.logged(StepMetrics(done, window_mean(result.losses, done, settings.log_every),
                                        scheduler.get_last_lr()[0], grad_norm, epoch, now()))
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            checkpoints.save(done, model, optimizer, scheduler, asdict(result), parallel, scaler)
        if evaluator is not None and settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
            observer.evaluated(done, evaluator(), now())
            module.train()
    if disable_checkpointing is not None:
        disable_checkpointing()
    observer.finished()
    model.eval()
    return result


def _optimizer_step(module, params, optimizer, scaler, stream, step, settings, device, parallel) -> tuple[float, int]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches (this rank's slice of each).

    The loss is the sum of token losses over the whole step (all micro-batches, all ranks) divided by the number
    of label tokens in it, passed to the model as transformers' `num_items_in_batch` (its fix of the gradient
    accumulation loss in 4.46: a mean per micro-batch, divided by the accumulation steps, over-weights the tokens
    of short micro-batches). DDP and FSDP average gradients over ranks, hence the factor world_size: every rank
    count gives the one-process gradient. Returns the step's loss, its non-padding tokens (all ranks) and the
    total gradient norm before clipping (clip_grad_norm_'s return value; under FSDP a DTensor, made whole).
    """
    accumulation = settings.gradient_accumulation_steps
    micro_batches = [step * accumulation + micro for micro in range(accumulation)]
    examples = [example for m in micro_batches for example in stream.global_batch(m)]
    n_labels = max(1, label_tokens(examples))
    total_loss = 0.0
    for micro, m in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in stream[m].items()}
        with parallel.accumulating(module, last=micro == accumulation - 1):
            with autocast(device, settings.precision):
                loss = module(**batch, num_items_in_batch=n_labels).loss
            # the backward runs outside autocast, in the forward's dtypes (torch.amp); fp16 scales the loss
            scaler.scale(loss * parallel.world_size).backward()
        total_loss += loss.item()
    scaler.unscale_(optimizer)  # clip the true gradients; a no-op unless fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    scaler.step(optimizer)  # fp16: skipped when a gradient is inf/NaN, and the scale shrinks
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over sharded gradients is a DTensor
        grad_norm = grad_norm.full_tensor()
    return (parallel.sum([total_loss])[0], sum(len(example.input_ids) for example in examples),
            float(grad_norm.item()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[TokenizedExample], batch_size: int, pad_id: int,
             device: str = "cpu", parallel: Parallel = Parallel()) -> float:
    """Mean loss per completion token over the examples (the sum of token losses over the label tokens; under
    torchrun each rank takes its `shard` of every batch and the sums are added over ranks)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(shard(chunk, parallel.rank, parallel.world_size), pad_id).items()}
        total += model(**batch, num_items_in_batch=1).loss.item()  # reduction "sum"
        count += label_tokens(chunk)
    return parallel.sum([total])[0] / count if count else float("nan")


def _restore(checkpoints: Checkpoints, checkpoint: Path, model, result: TrainingResult) -> int:
    progress = checkpoints.restore_adapter(checkpoint, model)
    result.losses, result.tokens, result.seconds = progress["losses"], progress["tokens"], progress["seconds"]
    result.resumed_from = progress["step"]
    return progress["step"]

