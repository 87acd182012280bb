"""The files of one pipeline run, and rebuilding its models from them alone.

Every pipeline step reads its inputs from the run directory and writes its outputs there, so any step can be
retried in a fresh process:

    <run>/plan.json                resolved parameters
    <run>/initial/                 the adapter right after initialisation (PiSSA: its factors define the residual)
    <run>/checkpoints/step-N/      resumable training checkpoints; the last one is the trained adapter
    <run>/training.json            loss history, eval losses, throughput
    <run>/probe.safetensors        a fixed batch and the trained model's logits on it, for verification
    <run>/extracted/               the trained adapter in PEFT layout
    <run>/converted/               the same, converted from PiSSA to LoRA (when asked)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterflow import formats
from adapterflow.atomic import write_file_atomic
from adapterflow.runtime.base_models import load_base_model
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_pissa
from adapterflow.model import AdapterModel, get_adapter_model
from adapterflow.save import write_adapters
from adapterflow.serialization import write_safetensors
from adapterflow.state_dict import get_adapter_state_dict
from adapterflow.runtime.training import latest_checkpoint, load_trainable_state


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
    def training_summary(self) -> Path:
        return self.root / "training.json"

    @property
    def probe(self) -> Path:
        return self.root / "probe.safetensors"

    @property
    def extracted(self) -> Path:
        return self.root / "extracted"

    @property
    def converted(self) -> Path:
        return self.root / "converted"

    def final_checkpoint(self) -> Path:
        checkpoint = latest_checkpoint(self.checkpoints)
        if checkpoint is None:
            raise FileNotFoundError(f"No training checkpoint in {self.checkpoints}; run the training step first.")
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


def load_trained_model(base_path: str | os.PathLike, dtype: torch.dtype, config: LoraConfig, adapter_name: str,
                       run: RunDir, seed: int) -> AdapterModel:
    """The trained model, rebuilt from the base model, the initial adapter and the final checkpoint."""
    model = build_adapter_model(base_path, dtype, config, adapter_name, run, seed)
    load_trainable_state(model, run.final_checkpoint())
    return model.eval()


def write_probe(path: Path, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
    tensors = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float()}
    write_file_atomic(path, lambda fd: write_safetensors(fd, tensors))


def read_probe(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors = load_file(path)
    return {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]}, tensors["logits"]
