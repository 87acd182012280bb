"""RunPlan: the flow's parameters resolved into absolute paths and core settings, passed between tasks."""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import BaseModel

from adapterflow import LoraConfig
from adapterflow.run_dir import RunDir
from adapterflow.training import TrainingSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunPlan(BaseModel):
    run_dir: str
    adapter_name: str
    base_model_path: str
    dtype: Literal["float32", "bfloat16", "float16"]
    dataset_path: str
    dataset_sha256: str
    eval_fraction: float
    max_seq_len: int
    lora_config: dict
    training: dict  # TrainingSettings fields, steps and device resolved
    output_dir: str
    safe_serialization: bool
    save_embedding_layers: Union[bool, Literal["auto"]]
    convert_pissa_to_lora: bool  # PiSSA init and conversion asked
    atol: float
    parameters: dict  # the flow parameters as given, for the record

    @property
    def run(self) -> RunDir:
        from pathlib import Path

        return RunDir(Path(self.run_dir))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self) -> LoraConfig:
        return LoraConfig.from_dict(self.lora_config)

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(**self.training)
