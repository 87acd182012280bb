"""The `save-adapter` flow's parameters: one pydantic model, so Prefect renders a form and the server validates
runs against its JSON schema before they start."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterflow import LoraConfig
from tasks.mlflow_logging import MlflowSettings

PROJECT_ROOT = Path(os.environ.get("ADAPTERFLOW_PROJECT_ROOT", Path(__file__).resolve().parents[1]))
INIT_PATTERN = r"^(lora|gaussian|random|pissa|pissa_niter_[0-9]+)$"
_INIT_TO_LORA = {"lora": True, "gaussian": "gaussian", "random": False}


def project_path(path: str | os.PathLike) -> Path:
    """Relative paths mean "relative to the project root", wherever the flow runs (a worker's cwd differs)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silently ignored setting


class BaseModelSettings(_Section):
    name_or_path: str = Field(
        "builtin:tiny-llama", description="builtin:tiny-llama, a local transformers model folder, or a Hub repo id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the base weights")


class DatasetSettings(_Section):
    path: str = Field("builtin:instructions", description=".jsonl (text, or prompt/completion) or .txt file")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out for eval loss")


class AdapterSettings(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$", description="adapter name (a folder name for non-default)")
    init: str = Field("pissa_niter_4", pattern=INIT_PATTERN,
                      description="lora | gaussian | random | pissa | pissa_niter_<K>")
    r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[list[str], str] = Field("all-linear", description='module names, a regex, or "all-linear"')
    exclude_modules: Union[list[str], str, None] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    layers_to_transform: Optional[list[int]] = None
    layers_pattern: Optional[str] = None

    def lora_config(self, base_model_name_or_path: str) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=self.target_modules,
            exclude_modules=self.exclude_modules, bias=self.bias, use_rslora=self.use_rslora,
            modules_to_save=self.modules_to_save, init_lora_weights=_INIT_TO_LORA.get(self.init, self.init),
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=self.layers_to_transform, layers_pattern=self.layers_pattern,
            base_model_name_or_path=base_model_name_or_path, task_type="CAUSAL_LM",
        )


class TrainingParameters(_Section):
    steps: Optional[int] = Field(300, ge=1, description="optimizer steps (or set epochs and steps: null)")
    epochs: Optional[float] = Field(None, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_seq_len: int = Field(64, ge=4)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingParameters":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs")
        return self


class SaveSettings(_Section):
    output_dir: Optional[str] = Field(None, description="where the adapter lands (default: <run dir>/adapter)")
    safe_serialization: bool = True
    selected_adapters: Optional[list[str]] = None
    save_embedding_layers: Union[bool, Literal["auto"]] = "auto"
    convert_pissa_to_lora: bool = Field(True, description="save a PiSSA adapter as LoRA for the original base model")
    if_exists: Literal["error", "new_version"] = Field(
        "error", description="output_dir taken by another run's adapter: fail, or write to <output_dir>-v2, -v3, ...")


class VerifySettings(_Section):
    atol: Optional[float] = Field(None, gt=0, description="logit tolerance (default: 1e-4 fp32, 5e-2 half precision)")


class HubSettings(_Section):
    repo_id: Optional[str] = Field(None, description="Hub model repo (namespace/name) to push to; empty: no push")
    private: Optional[bool] = Field(None, description="create the repo private (an existing repo keeps its setting)")
    revision: Optional[str] = Field(None, description="branch to push to (created if missing); default: main")
    tag: Optional[str] = Field(None, description="tag to put on the pushed commit")
    endpoint: Optional[str] = Field(None, description="Hub endpoint; default: $HF_ENDPOINT, else huggingface.co")
    token_secret_block: Optional[str] = Field(
        None, description="name of a Prefect Secret block holding the token; default: $HF_TOKEN")
    license: Optional[str] = Field(None, description="license in the model card, e.g. apache-2.0")
    datasets: Optional[list[str]] = Field(None, description="Hub dataset ids for the model card")
    tags: list[str] = Field(default_factory=list, description="extra model card tags")
    timeout_seconds: float = Field(120, gt=0, description="timeout of one Hub request")


class SaveAdapterParameters(_Section):
    run_name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="names the run directory; a rerun with the same name resumes it (default: the flow run's id)")
    runs_root: str = Field(default_factory=lambda: os.environ.get("ADAPTERFLOW_RUNS_ROOT", "runs"),
                           description="where run directories go (relative: to the project root)")
    base_model: BaseModelSettings = Field(default_factory=BaseModelSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    training: TrainingParameters = Field(default_factory=TrainingParameters)
    save: SaveSettings = Field(default_factory=SaveSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    hub: HubSettings = Field(default_factory=HubSettings)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) to a nested parameter dict."""
    import yaml

    for item in overrides:
        if "=" not in item or not re.fullmatch(r"[A-Za-z0-9_.]+", item.split("=", 1)[0]):
            raise ValueError(f"--set {item!r}: expected key.subkey=value, e.g. training.steps=50")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else None
    return data
