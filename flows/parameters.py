"""The `save-adapter` flow's parameters: one pydantic model, so Prefect renders a form and the server validates
runs against its JSON schema before they start."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterflow import LoraConfig
from adapterflow.flows import names
from adapterflow.flows.parameters_export import ExportSettings
from adapterflow.flows.parameters_promote import EvaluateSettings, PromoteSettings
from adapterflow.init_methods import PIPELINE_INIT_PATTERN, init_lora_weights_for
from adapterflow.model_references import BUILTIN_PREFIX, is_local_reference
from adapterflow.redaction import redact_text, register_secret, url_password

__all__ = ["BUILTIN_PREFIX", "is_local_reference"]  # re-exported: the pipeline imports them from here


class ParameterError(ValueError):
    """Flow parameters that cannot work; the message lists every problem, each naming its parameter (or file) and
    the fix. Permanent: a retry cannot fix it."""

    transient = False


def local_path(path: str | os.PathLike) -> Path:
    """A path parameter as an absolute path: relative paths resolve against the current directory (the user's
    folder for `adapterflow run`, the deployment's working directory for a deployment run), `..` folded away."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


class CredentialInUrlWarning(UserWarning):
    """A URL parameter carries a password: Prefect stores flow parameters as given."""


def _refuse(problem: Optional[str], value):
    """A field validator's verdict: pydantic's error names the field and the value, so only the rule and the fix."""
    if problem:
        raise ValueError(getattr(problem, "detail", problem))
    return value


def _warn_url_credentials(data, path: str = "") -> None:
    """Warn for each string parameter that is a URL with a password (and scrub that password from everything
    adapterflow writes in this process)."""
    if isinstance(data, dict):
        for key, value in data.items():
            _warn_url_credentials(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for value in data:
            _warn_url_credentials(value, path)
    elif (password := url_password(data)) is not None:
        register_secret(password)
        hub = (" huggingface_hub's HTTP client also sends URL credentials as basic auth instead of the HF token."
               if path == "hub.endpoint" else "")
        warnings.warn(
            f"{path}={redact_text(data)!r} carries a password. adapterflow redacts it from everything it writes, but "
            f"Prefect stores flow parameters as given, so it is visible in the flow run's parameters. Pass "
            f"credentials through environment variables instead (MLFLOW_TRACKING_USERNAME / "
            f"MLFLOW_TRACKING_PASSWORD for MLflow, HF_TOKEN for the Hub) or a Prefect Secret block "
            f"(hub.token_secret_block).{hub}", CredentialInUrlWarning, stacklevel=2)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silently ignored setting


class BaseModelSettings(_Section):
    name_or_path: str = Field(
        "builtin:tiny-llama", description="builtin:tiny-llama, a local transformers model folder, or a Hub repo id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the base weights")


class DatasetSettings(_Section):
    path: str = Field("builtin:instructions", description=".jsonl/.json, .parquet, .csv, .arrow or .txt file, a "
                                                        "Dataset.save_to_disk folder, a Hub dataset id "
                                                        "(namespace/name), or builtin:instructions / builtin:chat")
    split: str = Field("train", min_length=1, description="split to read (a file has one: train)")
    text_field: str = Field("text", min_length=1, description="column of plain-text rows")
    prompt_field: str = Field("prompt", min_length=1, description="column of prompts (masked from the loss)")
    completion_field: str = Field("completion", min_length=1, description="column of completions")
    messages_field: str = Field("messages", min_length=1,
                                description='column of chat rows: [{"role": ..., "content": ...}, ...]')
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template for chat rows (the text, or a file holding it); default: the base "
                          "model tokenizer's")
    revision: Optional[str] = Field(
        None, description="Hub dataset only: branch, tag or commit to read; default main. The run pins the commit it "
                          "points to at the start, so every step and retry reads the same data")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out for eval loss")


class AdapterSettings(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$",
                      description="adapter name (a folder name for non-default): letters, digits, _ and -, at most "
                                  "NAME_MAX - 40 bytes (215 on most file systems)")
    init: str = Field("pissa_niter_4", pattern=PIPELINE_INIT_PATTERN,
                      description="lora | gaussian | random | pissa | pissa_niter_K (PiSSA with K fast-SVD "
                                  "iterations, e.g. pissa_niter_4)")
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
            modules_to_save=self.modules_to_save, init_lora_weights=init_lora_weights_for(self.init),
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=self.layers_to_transform, layers_pattern=self.layers_pattern,
            base_model_name_or_path=base_model_name_or_path, task_type="CAUSAL_LM",
        )

    @field_validator("name")
    @classmethod
    def _name_fits(cls, value: str) -> str:
        return _refuse(names.name_length_problem(value, "adapter.name"), value)


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
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept (each a PEFT adapter folder)")
    log_every: Optional[int] = Field(
        None, ge=1, description="optimizer steps between metric points (loss, learning_rate, grad_norm, epoch) in "
                                "MLflow, the Prefect task log and the terminal; default: steps // 50, at least 1 "
                                "(about 50 points per run)")
    eval_every: Optional[int] = Field(
        None, ge=1, description="optimizer steps between eval_loss evaluations during training (each one pass over "
                                "the held-out examples); default: only before and after training")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int = Field(1, ge=1, description="training processes per node; more than 1 runs under torchrun "
                                                    "(one GPU each on CUDA); batch_size stays the global batch")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with several processes: ddp (DistributedDataParallel) "
                                                               "or fsdp (fully_shard, FSDP2)")
    nnodes: int = Field(1, ge=1, description="machines; each runs torchrun with the same rdzv_endpoint (README)")
    rdzv_endpoint: Optional[str] = Field(None, description="host:port of torchrun's c10d rendezvous (on the first "
                                                           "node), required when nnodes is 2 or more")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the training forward: fp32 (none), bf16 (CPU and CUDA), fp16 (CUDA "
                            "only, with a grad scaler); adapter weights stay fp32, base weights keep base_model.dtype")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in the backward instead of keeping its activations "
                           "(transformers' non-reentrant checkpointing): less memory, about one more forward per step")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingParameters":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs (to train by epochs over a "
                             "config that sets steps: --set training.steps=null --set training.epochs=N)")
        return self


class SaveSettings(_Section):
    output_dir: Optional[str] = Field(None, description="where the adapter lands (default: {run dir}/adapter)")
    safe_serialization: bool = True
    selected_adapters: Optional[list[str]] = None
    save_embedding_layers: Union[bool, Literal["auto"]] = "auto"
    convert_pissa_to_lora: bool = Field(True, description="save a PiSSA adapter as LoRA for the original base model")
    if_exists: Literal["error", "new_version"] = Field(
        "error", description="output_dir taken by another run's adapter: fail, or write to {output_dir}-v2, -v3, ...")


class VerifySettings(_Section):
    atol: Optional[float] = Field(None, gt=0, description="logit tolerance (default: 1e-4 fp32, 5e-2 half precision)")
    require_runtimes: list[Literal["vllm", "llama.cpp", "peft"]] = Field(
        default_factory=list, description="serving runtimes (vllm, llama.cpp, peft) whose preflight must pass, or "
                                          "the run fails before MLflow and the Hub; the report is always made")


class HubSettings(_Section):
    repo_id: Optional[str] = Field(None, description="Hub model repo (namespace/name) to push to; empty: no push. "
                                                     "Checked with huggingface_hub's validate_repo_id")
    private: Optional[bool] = Field(None, description="create the repo private (an existing repo keeps its setting)")
    revision: Optional[str] = Field(None, description="branch to push to (created if missing); default: main. A git "
                                                      "branch name (git check-ref-format), not refs/... or a commit id")
    tag: Optional[str] = Field(None, description="tag to put on the pushed commit (git check-ref-format rules)")
    endpoint: Optional[str] = Field(None, description="Hub endpoint; default: $HF_ENDPOINT, else huggingface.co. No "
                                                      "credentials in the URL: use HF_TOKEN or token_secret_block")
    token_secret_block: Optional[str] = Field(
        None, description="name of a Prefect Secret block holding the token; default: $HF_TOKEN")
    license: Optional[str] = Field(None, description="license in the model card, e.g. apache-2.0")
    datasets: Optional[list[str]] = Field(None, description="Hub dataset ids for the model card")
    tags: list[str] = Field(default_factory=list, description="extra model card tags")
    timeout_seconds: float = Field(120, gt=0, description="timeout of one Hub request")
    push_merged: bool = Field(False, description="also push the merged model (export.merged) to merged_repo_id")
    merged_repo_id: Optional[str] = Field(None, description="Hub model repo (namespace/name) for the merged model; "
                                                            "not the adapter's repo_id")
    push_when_not_promoted: bool = Field(False, description="push also when the promotion gate did not promote the "
                                                            "new version (default: only promoted versions)")

    @field_validator("repo_id", "merged_repo_id")
    @classmethod
    def _valid_repo_id(cls, value: Optional[str], info) -> Optional[str]:
        return _refuse(names.hub_repo_id_problem(value, f"hub.{info.field_name}"), value)

    @field_validator("revision", "tag")
    @classmethod
    def _valid_ref(cls, value: Optional[str], info) -> Optional[str]:
        return _refuse(names.git_ref_problem(value, f"hub.{info.field_name}"), value)


class MlflowSettings(_Section):
    """Where and how a run is recorded in MLflow."""

    enabled: bool = Field(True, description="record the run in MLflow; false skips the step")
    tracking_uri: Optional[str] = Field(
        None, description="tracking server (http://host:port) or store URI; default: $MLFLOW_TRACKING_URI, else "
                          "sqlite:///{runs_root}/mlflow.db with artifacts in {runs_root}/mlartifacts. No "
                          "credentials in the URL: use MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    experiment: str = Field("adapterflow", min_length=1, description="MLflow experiment name (1-256 characters)")
    registered_model_name: Optional[str] = Field(
        None, description="registered model to add a version to; it also names the run's LoggedModel, so no / : . "
                          "% \" ' and at most 256 characters. Default: {adapter name}-{base model} made MLflow-safe "
                          "('/' becomes '--', '.' becomes '_', a local folder is named by its folder name) plus an "
                          "8-digit hash when that lost information, e.g. default-tiny-llama, "
                          "default-Qwen--Qwen2_5-0_5B-9fc3a057")
    alias: Optional[str] = Field(None, description='alias to point at the new version, e.g. "candidate": letters, '
                                                   'digits, _ and -; not "latest" or vN such as v1')
    request_timeout_seconds: float = Field(10, gt=0, description="timeout of one HTTP request (whole seconds)")
    max_retries: int = Field(2, ge=0, description="MLflow's own retries of a failed HTTP request")

    @field_validator("experiment")
    @classmethod
    def _valid_experiment(cls, value: str) -> str:
        return _refuse(names.experiment_problem(value), value)

    @field_validator("registered_model_name")
    @classmethod
    def _valid_model_name(cls, value: Optional[str]) -> Optional[str]:
        return _refuse(names.registered_model_name_problem(value), value)

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, value: Optional[str]) -> Optional[str]:
        return _refuse(names.alias_problem(value), value)


class SaveAdapterParameters(_Section):
    run_name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="names the run directory (and the MLflow run): at most 250 characters; a rerun with the same "
                    "name resumes it (default: the flow run's id)")
    runs_root: str = Field(default_factory=lambda: os.environ.get("ADAPTERFLOW_RUNS_ROOT", "runs"),
                           description="where run directories go; default ./runs in the current directory, or "
                                       "$ADAPTERFLOW_RUNS_ROOT (relative paths: against the current directory)")
    base_model: BaseModelSettings = Field(default_factory=BaseModelSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    training: TrainingParameters = Field(default_factory=TrainingParameters)
    save: SaveSettings = Field(default_factory=SaveSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    promote: PromoteSettings = Field(default_factory=PromoteSettings)

    @field_validator("run_name")
    @classmethod
    def _run_name_fits(cls, value: Optional[str]) -> Optional[str]:
        return _refuse(names.name_length_problem(value, "run_name", names.MLFLOW_RUN_NAME_MAX), value)

    @model_validator(mode="after")
    def _names_fit(self) -> "SaveAdapterParameters":
        """Rules that need several values (flows/names.check_names); URL parameters with a password warn."""
        _warn_url_credentials(self.model_dump(mode="json"))
        if problems := names.check_names(self):
            raise ValueError("\n  - ".join(problems))  # each line names its parameter
        return self

