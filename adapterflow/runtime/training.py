"""A plain PyTorch training loop for adapters, with checkpoints that a killed run resumes from.

AdamW with linear warmup and cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA. Under
torchrun every rank runs this loop on its slice of the same global batches (`adapterflow.runtime.distributed`:
DDP or FSDP2); the loss of a step is normalised by the label tokens of the whole step, so N processes train the
one-process adapter. A
checkpoint (`adapterflow.runtime.checkpoints`) is a PEFT adapter folder plus the optimizer and scheduler state,
the RNG state and the loss history, so a resumed run continues exactly where the checkpoint was taken: the final
adapter equals an uninterrupted run's.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adapterflow.runtime.checkpoints import Checkpoints
from adapterflow.runtime.data import BatchStream, TokenizedExample, collate, label_tokens, shard
from adapterflow.runtime.distributed import Parallel


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


StepCallback = Callable[[int, float, float], None]  # (step, loss, learning rate)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """1) linear warmup to 1, 2) cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: torch.nn.Module, examples: list[TokenizedExample], settings: TrainingSettings, pad_id: int,
          checkpoints: Checkpoints, on_step: StepCallback | None = None,
          parallel: Parallel = Parallel()) -> TrainingResult:
    """Train the model's trainable parameters; resume from the newest of `checkpoints` if there is one.

    Args:
        model: an AdapterModel whose active adapter is `checkpoints.adapter_name` (on `settings.device`; under
            torchrun the same model on every rank; FSDP shards it in place).
        checkpoints: where checkpoints go every `settings.checkpoint_every` steps and after the last step
            (the newest `checkpoints.keep` stay; rank 0 writes them).
        parallel: this process's rank among the torchrun ranks (default: the only process).

    Returns:
        The loss history and throughput of the whole run (including steps done before a resume), the same on
        every rank.

    Raises:
        adapterflow.runtime.checkpoints.CheckpointError: the newest checkpoint does not fit this model, or is
            of the old model-key layout.
    """
    device = torch.device(settings.device)
    result = TrainingResult(steps=settings.steps)
    checkpoint = checkpoints.latest()
    start = 0 if checkpoint is None else _restore(checkpoints, checkpoint, model.to(device), result)
    module = parallel.wrap(model.to(device))
    module.train()
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: fully_shard replaces them
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps))
    stream = BatchStream(examples, settings.batch_size, settings.seed, pad_id, parallel.rank, parallel.world_size)
    if checkpoint is None:
        torch.manual_seed(settings.seed)
    else:
        checkpoints.restore_training_state(checkpoint, model, optimizer, scheduler, parallel)
    progress = _progress_bar(settings.steps, start) if parallel.is_main_process else None
    started = time.perf_counter() - result.seconds
    for step in range(start, settings.steps):
        loss, tokens = _optimizer_step(module, params, optimizer, stream, step, settings, device, parallel)
        scheduler.step()
        result.losses.append(loss)
        result.tokens += tokens
        result.seconds = time.perf_counter() - started
        if on_step is not None:
            on_step(step + 1, loss, scheduler.get_last_lr()[0])
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}")
            progress.update()
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            checkpoints.save(step + 1, model, optimizer, scheduler, asdict(result), parallel)
    if progress is not None:
        progress.close()
    model.eval()
    return result


def _optimizer_step(module, params, optimizer, stream, step, settings, device, parallel) -> tuple[float, int]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches (this rank's slice of each).

    The loss is the sum of token losses over the whole step (all micro-batches, all ranks) divided by the number
    of label tokens in it, passed to the model as transformers' `num_items_in_batch` (its fix of the gradient
    accumulation loss in 4.46: a mean per micro-batch, divided by the accumulation steps, over-weights the tokens
    of short micro-batches). DDP and FSDP average gradients over ranks, hence the factor world_size: every rank
    count gives the one-process gradient. Returns the step's loss and its non-padding tokens (all ranks).
    """
    accumulation = settings.gradient_accumulation_steps
    micro_batches = [step * accumulation + micro for micro in range(accumulation)]
    examples = [example for m in micro_batches for example in stream.global_batch(m)]
    n_labels = max(1, label_tokens(examples))
    total_loss = 0.0
    for micro, m in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in stream[m].items()}
        with parallel.accumulating(module, last=micro == accumulation - 1):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = module(**batch, num_items_in_batch=n_labels).loss
            (loss * parallel.world_size).backward()
        total_loss += loss.item()
    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parallel.sum([total_loss])[0], sum(len(example.input_ids) for example in examples)


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


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm  # only for interactive terminals

    return tqdm(total=total, initial=start, desc="training", unit="step")
