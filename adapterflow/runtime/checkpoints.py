"""Training checkpoints that are PEFT adapters, with the optimizer state beside them.

    <checkpoints>/step-000050/adapter_config.json        the adapter's config        } written by adapterflow's
    <checkpoints>/step-000050/adapter_model.safetensors  its tensors, PEFT's keys    } write_adapters: the folder
    <checkpoints>/step-000050/README.md                  the model card              } loads in from_pretrained
    <checkpoints>/step-000050/adapterflow.json           the manifest of those three }
    <checkpoints>/step-000050/training_state.pt          optimizer, scheduler, grad scaler, RNG state (torch.save;
                                                         read weights_only)
    <checkpoints>/step-000050/progress.json              step, loss history, tokens, seconds; present = complete

A checkpoint lands through a staging folder (`adapterflow.atomic.staged_directory`): a run killed while writing
leaves no partial one. The last `keep` checkpoints stay. Writing uses the library's extraction
(`get_adapter_state_dict`) and loading its key matching (`match_checkpoint`), the same mapping as every saved
adapter, so the key conventions exist once. The adapter files hold what the pipeline publishes (embedding layers
per `save.save_embedding_layers`), so the final checkpoint is the trained adapter as it is.

Checkpoints of adapterflow before issue #12 (`trainable.safetensors`, model-parameter keys) are not migrated: a
rerun that finds one stops with a `CheckpointError` saying what to do.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterflow import formats, read_adapter, write_adapters
from adapterflow.atomic import staged_directory
from adapterflow.runtime.distributed import Parallel
from adapterflow.state_dict import AdapterLoadError, SaveEmbeddingLayers, load_adapter_state_dict, match_checkpoint

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
LEGACY_TRAINABLE_FILE = "trainable.safetensors"  # the model-key checkpoints written before issue #12
# Config fields that change what the checkpoint's tensors mean; a rerun with other values cannot resume from it.
_RESUME_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "bias",
                  "modules_to_save", "init_lora_weights")


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message says why and what to do (a user error: not retried)."""


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of one training run: where they go, which adapter they hold, how many stay."""

    folder: Path
    adapter_name: str = formats.DEFAULT_ADAPTER_NAME
    save_embedding_layers: SaveEmbeddingLayers = False
    keep: int = 2

    def save(self, step: int, model: torch.nn.Module, optimizer, scheduler, progress: dict,
             parallel: Parallel = Parallel(), scaler: torch.amp.GradScaler | None = None) -> Path:
        """Write step-<N>/ atomically, then delete all but the newest `keep` checkpoints. Under torchrun every rank
        calls it (the FSDP gather is a collective); rank 0 alone writes, and all ranks leave together.

        Args:
            model: the AdapterModel being trained (not its DDP wrapper; its tensors may live on any device or be
                FSDP shards: they are gathered in full and checked by `check_saveable`).
            progress: JSON-able record of the run so far (loss history etc.), stored with "step".
            scaler: fp16 training's grad scaler; its state (current scale, growth tracker) is saved so a resumed
                run scales the next loss exactly as the uninterrupted run would.
        """
        target = self.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        config = model.peft_config[self.adapter_name]
        state = parallel.full_adapter_state(model, config, self.adapter_name, self.save_embedding_layers)
        optimizer_state = parallel.optimizer_state(model, optimizer)
        if parallel.is_main_process:
            with staged_directory(target) as staging:
                # 1. the adapter, as write_adapters lays it out (it stages its own folder inside ours)
                write_adapters(staging, {formats.DEFAULT_ADAPTER_NAME: (state, config)}, base_model=model)
                # 2. what only training needs
                scaler_state = {"scaler": scaler.state_dict()} if scaler is not None else {}
                torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **scaler_state,
                            **_rng_state()}, staging / STATE_FILE)
                # 3. last: the file that marks the checkpoint complete
                (staging / PROGRESS_FILE).write_text(json.dumps({**progress, "step": step}))
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return target

    def complete(self) -> list[Path]:
        """Complete checkpoints (with progress.json), oldest first."""
        return sorted(p for p in self.folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / PROGRESS_FILE).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None.

        Raises:
            CheckpointError: the folder holds a checkpoint of the old model-key layout.
        """
        complete = self.complete()
        legacy = [p for p in complete if (p / LEGACY_TRAINABLE_FILE).is_file()]
        if legacy:
            raise CheckpointError(
                f"{legacy[-1]} is a training checkpoint of an older adapterflow ({LEGACY_TRAINABLE_FILE}, model "
                f"parameter keys); this version resumes only from checkpoints in PEFT's adapter layout and does not "
                f"convert old ones. Delete {self.folder} to train this run from the start, or use a new run_name.")
        return complete[-1] if complete else None

    def restore(self, checkpoint: Path, model: torch.nn.Module, optimizer, scheduler,
                parallel: Parallel = Parallel(), scaler: torch.amp.GradScaler | None = None) -> dict:
        """`restore_adapter`, then `restore_training_state` (for a model that is not sharded); returns progress."""
        progress = self.restore_adapter(checkpoint, model)
        self.restore_training_state(checkpoint, model, optimizer, scheduler, parallel, scaler)
        return progress

    def restore_adapter(self, checkpoint: Path, model: torch.nn.Module) -> dict:
        """Load a checkpoint's adapter into the model through the library's key matching (before the model is
        wrapped for DDP or sharded by FSDP); returns its progress record.

        Raises:
            CheckpointError: the checkpoint's adapter does not fit the model (other r, targets, ...) or leaves a
                trainable parameter unset.
        """
        state, saved_config = read_adapter(checkpoint)
        config = model.peft_config[self.adapter_name]
        changed = [f"{f}: checkpoint {getattr(saved_config, f)!r}, this run {getattr(config, f)!r}"
                   for f in _RESUME_FIELDS if _comparable(getattr(saved_config, f)) != _comparable(getattr(config, f))]
        try:
            pairs = match_checkpoint(model, state, self.adapter_name)
        except AdapterLoadError as exc:
            changed.append(str(exc))
            pairs = {}
        loaded = {t.data_ptr() for t in pairs.values()}
        unset = [name for name, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in loaded]
        if changed or unset:
            details = changed or [f"trainable parameters not in it: {unset[:5]}"]
            raise CheckpointError(
                f"Cannot resume from {checkpoint}: it was trained with another adapter config.\n"
                + "\n".join(f"  - {d}" for d in details)
                + f"\nDelete {self.folder} to train this run from the start, or use a new run_name.")
        load_adapter_state_dict(pairs, state)
        return json.loads((checkpoint / PROGRESS_FILE).read_text())

    def restore_training_state(self, checkpoint: Path, model: torch.nn.Module, optimizer, scheduler,
                               parallel: Parallel = Parallel(), scaler: torch.amp.GradScaler | None = None) -> None:
        """Load the optimizer (through `parallel`: FSDP re-shards the full state), scheduler, grad scaler (when both
        it and the checkpoint have a state: a run that switches precision starts with a fresh scale) and RNG state
        of a checkpoint, on every rank.

        Raises:
            CheckpointError: the optimizer state was written under the other training.strategy.
        """
        training_state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        try:
            parallel.load_optimizer_state(model, optimizer, training_state["optimizer"])
        except ValueError as exc:
            raise CheckpointError(f"Cannot resume from {checkpoint}: {exc}.") from None
        scheduler.load_state_dict(training_state["scheduler"])
        if scaler is not None and training_state.get("scaler"):
            scaler.load_state_dict(training_state["scaler"])
        _set_rng_state(training_state)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was taken at."""
    return json.loads((Path(checkpoint) / PROGRESS_FILE).read_text())["step"]


def _comparable(value):
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def _rng_state() -> dict:
    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
