"""A plain PyTorch training loop for adapters, with checkpoints that a killed run resumes from.

AdamW with linear warmup and cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA. A
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
from adapterflow.runtime.data import BatchStream, TokenizedExample, collate


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
          checkpoints: Checkpoints, on_step: StepCallback | None = None) -> TrainingResult:
    """Train the model's trainable parameters; resume from the newest of `checkpoints` if there is one.

    Args:
        model: an AdapterModel whose active adapter is `checkpoints.adapter_name`.
        checkpoints: where checkpoints go every `settings.checkpoint_every` steps and after the last step
            (the newest `checkpoints.keep` stay).

    Returns:
        The loss history and throughput of the whole run (including steps done before a resume).

    Raises:
        adapterflow.runtime.checkpoints.CheckpointError: the newest checkpoint does not fit this model, or is
            of the old model-key layout.
    """
    device = torch.device(settings.device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps))
    stream = BatchStream(examples, settings.batch_size, settings.seed, pad_id)
    result = TrainingResult(steps=settings.steps)
    checkpoint = checkpoints.latest()
    if checkpoint is None:
        torch.manual_seed(settings.seed)
        start = 0
    else:
        start = _restore(checkpoints, checkpoint, model, optimizer, scheduler, result)
    progress = _progress_bar(settings.steps, start)
    started = time.perf_counter() - result.seconds
    for step in range(start, settings.steps):
        loss, tokens = _optimizer_step(model, params, optimizer, stream, step, settings, device)
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
            checkpoints.save(step + 1, model, optimizer, scheduler, asdict(result))
    if progress is not None:
        progress.close()
    model.eval()
    return result


def _optimizer_step(model, params, optimizer, stream, step, settings, device) -> tuple[float, int]:
    accumulation = settings.gradient_accumulation_steps
    total_loss, tokens = 0.0, 0
    for micro in range(accumulation):
        batch = {k: v.to(device) for k, v in stream[step * accumulation + micro].items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss / accumulation
        loss.backward()
        total_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, tokens


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[TokenizedExample], batch_size: int, pad_id: int,
             device: str = "cpu") -> float:
    """Mean loss per completion token over the examples."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        if n_tokens:
            total += model(**batch).loss.item() * n_tokens
            count += n_tokens
    return total / count if count else float("nan")


def _restore(checkpoints: Checkpoints, checkpoint: Path, model, optimizer, scheduler, result: TrainingResult) -> int:
    progress = checkpoints.restore(checkpoint, model, optimizer, scheduler)
    result.losses, result.tokens, result.seconds = progress["losses"], progress["tokens"], progress["seconds"]
    result.resumed_from = progress["step"]
    return progress["step"]


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm  # only for interactive terminals

    return tqdm(total=total, initial=start, desc="training", unit="step")
