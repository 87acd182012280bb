"""The files of one pipeline run, and what the steps after training read from them.

Every pipeline step reads its inputs from the run directory, so any step can be retried in a fresh process. Only
training writes adapter tensors here; the steps after it read the final checkpoint and write the output folder once:

    <run>/plan.json                resolved parameters
    <run>/initial/                 PiSSA only: the adapter right after initialisation (its factors define the
                                   residual; resume and the PiSSA->LoRA conversion need it)
    <run>/checkpoints/step-N/      resumable training checkpoints, each a PEFT adapter folder plus optimizer
                                   state (`adapterflow.runtime.checkpoints`); the last one is the trained adapter
    <run>/metrics.jsonl            the metrics as training logged them, appended (adapterflow.runtime.metrics_log)
    <run>/training.json            loss history, eval losses, throughput, start and end times
    <run>/probe.safetensors        a fixed batch and the trained model's logits on it, for verification
    <run>/merged/                  export.merged only: the base model with the adapter merged in (transformers format)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterflow import convert_pissa_to_lora, formats, read_adapter
from adapterflow.atomic import write_file_atomic
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_pissa
from adapterflow.model import AdapterModel, get_adapter_model
from adapterflow.runtime.base_models import load_base_model
from adapterflow.runtime.checkpoints import CheckpointError, Checkpoints, checkpoint_step
from adapterflow.save import Adapter, write_adapters
from adapterflow.serialization import write_safetensors
from adapterflow.state_dict import get_adapter_state_dict
from adapterflow.targeting import plan_targets


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def initial(self) -> Path:
        return self.root / "initial"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def training_summary(self) -> Path:
        return self.root / "training.json"

    @property
    def probe(self) -> Path:
        return self.root / "probe.safetensors"

    @property
    def merged(self) -> Path:
        return self.root / "merged"  # export.merged: the base model with the adapter merged in

    def final_checkpoint(self, steps: int | None = None) -> Path:
        """The newest checkpoint; with `steps`, it must be the one taken after the last of them.

        Raises:
            FileNotFoundError: no checkpoint.
            adapterflow.runtime.checkpoints.CheckpointError: an old model-key checkpoint, or the newest one is not
                from step `steps`.
        """
        checkpoint = Checkpoints(self.checkpoints).latest()
        if checkpoint is None:
            raise FileNotFoundError(f"No training checkpoint in {self.checkpoints}; run the training step first.")
        if steps is not None and checkpoint_step(checkpoint) != steps:
            raise CheckpointError(f"The newest checkpoint, {checkpoint}, is from step {checkpoint_step(checkpoint)}, "
                                  f"but this run trains for {steps} steps. Delete {self.checkpoints} to train again "
                                  f"with these settings, or use a new run_name.")
        return checkpoint


def write_json(path: Path, data: dict) -> None:
    write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def build_adapter_model(base_path: str | os.PathLike, dtype: torch.dtype, config: LoraConfig, adapter_name: str,
                        run: RunDir, seed: int) -> AdapterModel:
    """The model at the start of training: restored from <run>/initial if a previous attempt saved it (PiSSA's
    randomized SVD would not give the same residual twice), else freshly initialised (and, for PiSSA, saved)."""
    base = load_base_model(base_path, dtype=dtype)
    if (run.initial / formats.CONFIG_NAME).is_file():
        return AdapterModel.from_initial_adapter(base, run.initial, adapter_name)
    torch.manual_seed(seed)
    model = get_adapter_model(base, config, adapter_name)
    if is_pissa(config.init_lora_weights):
        saved_config = model.peft_config[adapter_name]
        state = get_adapter_state_dict(model, saved_config, adapter_name, save_embedding_layers=False)
        write_adapters(run.initial, {adapter_name: (state, saved_config)})
    return model


def final_adapter(checkpoint: str | os.PathLike, initial: str | os.PathLike | None = None) -> Adapter:
    """The adapter to publish: the final checkpoint's (state dict, config), converted from PiSSA to LoRA for the
    original base model when `initial` (the folder saved right after initialisation) is given. Reads two small
    folders and concatenates tensors; writes nothing.

    Raises:
        adapterflow.ConversionError: the initial adapter does not belong to the checkpoint's.
    """
    state, config = read_adapter(checkpoint)
    if initial is None:
        return state, config
    return convert_pissa_to_lora(state, config, *read_adapter(initial))


def adapter_modules(base_path: str | os.PathLike, config: LoraConfig) -> set[str]:
    """Paths (with PEFT's `base_model.model.` prefix) of the modules `config` adapts in the base model, found on
    the model's architecture alone (config.json, built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    plan = plan_targets(model, config)
    return {formats.PEFT_KEY_PREFIX + path for path in plan.lora_modules + plan.modules_to_save}


def write_probe(path: Path, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
    tensors = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float()}
    write_file_atomic(path, lambda fd: write_safetensors(fd, tensors))


def read_probe(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors = load_file(path)
    return {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]}, tensors["logits"]
