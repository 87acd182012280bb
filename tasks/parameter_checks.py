"""Checks of the parameters against each other and the machine (no file is read): device, precision, the
pipeline's combinations, torchrun's rules. `run_plan.check_run` runs them with the checks of the files."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import torch

from adapterflow.flows.parameters import SaveAdapterParameters
from adapterflow.flows.parameters_promote import PREVIOUS_ALIAS, promotion_active
from adapterflow.init_methods import is_pissa, is_randomized_pissa


def device_for(problems: list[str], device: str) -> str:
    """The training device `auto` resolves to (a problem added when cuda is asked and absent)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("training.device=cuda: no CUDA device is visible to torch on this machine "
                        "(torch.cuda.is_available() is False); use training.device=auto or cpu.")
    return device


def precision_problems(params: SaveAdapterParameters, device: str) -> list[str]:
    """fp16 autocast needs CUDA (torch's CPU autocast is meant for bf16, and fp16 training needs the grad scaler);
    fp16 training of fp16 base tensors (modules_to_save copies, biases) cannot be unscaled by torch's GradScaler."""
    training, dtype = params.training, params.base_model.dtype
    if training.precision != "fp16":
        return []
    if device != "cuda":
        where = ("no CUDA device is visible to torch on this machine" if params.training.device != "cpu"
                 else "training.device=cpu")
        return [f"training.precision=fp16 needs a CUDA device ({where}); use training.precision=bf16 (CPU and "
                f"CUDA) or fp32, or train on a machine with a GPU."]
    if training.strategy == "fsdp" and training.num_processes * training.nnodes > 1:
        return ["training.precision=fp16 with training.strategy=fsdp: torch.amp.GradScaler checks each rank's "
                "gradient shards alone, so ranks could disagree on skipping a step; use training.precision=bf16, "
                "or training.strategy=ddp."]
    trains_base_tensors = params.adapter.modules_to_save or params.adapter.bias != "none"
    if dtype == "float16" and trains_base_tensors:
        return ["training.precision=fp16 with base_model.dtype=float16 trains float16 copies of base tensors "
                "(adapter.modules_to_save / adapter.bias), which torch's GradScaler cannot unscale; use "
                "base_model.dtype=float32, or training.precision=bf16."]
    if dtype == "bfloat16":
        return ["training.precision=fp16 with base_model.dtype=bfloat16 would cast every bfloat16 base weight to "
                "float16 (a smaller range) in each matmul; use training.precision=bf16 with a bfloat16 base."]
    return []


def combination_problems(params: SaveAdapterParameters) -> list[str]:
    """Parameters that work alone but not together in this pipeline."""
    problems = []
    converts = is_pissa(params.adapter.init) and params.save.convert_pissa_to_lora
    if converts and params.base_model.dtype != "float32" and params.verify.atol is None:
        # measured: bf16 tiny llama, 0.09 > the 5e-2 default atol of 16-bit bases
        problems.append(f"adapter.init={params.adapter.init} with save.convert_pissa_to_lora and base_model.dtype="
                        f"{params.base_model.dtype}: the trained model runs on the residual base W - B0A0 rounded to "
                        f"{params.base_model.dtype}, the converted adapter on the original W, so their logits differ "
                        f"by about 0.1 and verification would fail after training. Use base_model.dtype=float32, "
                        f"adapter.init=lora, or accept the rounding with verify.atol (e.g. 0.2).")
    if is_randomized_pissa(params.adapter.init) and not params.save.convert_pissa_to_lora:
        problems.append(f"adapter.init={params.adapter.init} without save.convert_pissa_to_lora: reloading re-runs a "
                        f"randomized SVD and gives another model, so verification would fail. Set "
                        f"save.convert_pissa_to_lora=true, or use init 'pissa' (exact SVD).")
    selected = params.save.selected_adapters
    if selected is not None and selected != [params.adapter.name]:
        problems.append(f"save.selected_adapters={selected}: this run trains one adapter, "
                        f"{params.adapter.name!r}; use [{params.adapter.name!r}] or null.")
    return problems + export_problems(params) + promotion_problems(params) + tracking_uri_problems(params)


# The URI schemes MLflow has a tracking store for (mlflow/tracking/_tracking_service/utils.py
# `_tracking_store_registry`; the model registry takes the same ones). "" is a local folder.
MLFLOW_URI_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                      "databricks-uc", "uc")


def tracking_uri_problems(params: SaveAdapterParameters) -> list[str]:
    """mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) has a scheme MLflow can record to; found before training,
    not by log-to-mlflow after it. The value is quoted without its password (redact_text)."""
    from adapterflow.redaction import redact_text

    if not params.mlflow.enabled:
        return []
    given = params.mlflow.tracking_uri
    uri, source = (given, "mlflow.tracking_uri") if given else (os.environ.get("MLFLOW_TRACKING_URI"),
                                                                "$MLFLOW_TRACKING_URI")
    if not uri:
        return []
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2://, mysql+pymysql://
    if base in MLFLOW_URI_SCHEMES or (len(scheme) == 1 and os.name == "nt"):
        return []
    return [f"{source}={redact_text(uri)!r}: MLflow has no tracking store for the scheme {scheme!r}; use "
            f"http(s)://host:port for a tracking server, sqlite:///path/mlflow.db, a database URI "
            f"(postgresql, mysql, mssql), file:///path or a local folder, or set mlflow.enabled=false."]


def export_problems(params: SaveAdapterParameters) -> list[str]:
    """The merged export and its push: a bfloat16 merge needs a tolerance that accepts its rounding;
    hub.push_merged needs export.merged and a repo of its own."""
    hub, export, problems = params.hub, params.export, []
    dtype = export.dtype or params.base_model.dtype
    if export.merged and dtype == "bfloat16" and params.verify.atol is None:
        # measured: builtin tiny llama, random r=4 LoRA: 0.07 > the 5e-2 default (float16: 0.009)
        parameter = "export.dtype" if export.dtype else "base_model.dtype"
        problems.append(f"export.merged with {parameter}=bfloat16: the merged weights W + scaling B A are rounded "
                        f"to bfloat16, so the merged model's logits differ from base + adapter's by about 0.1 (0.07 "
                        f"measured on the builtin model), above the default 16-bit tolerance 5e-2, and the export "
                        f"would fail after training. Accept the rounding with verify.atol (e.g. 0.2), or export "
                        f"float32 (export.dtype).")
    if not hub.push_merged:
        if hub.merged_repo_id:
            problems.append(f"hub.merged_repo_id={hub.merged_repo_id!r} is only used with hub.push_merged=true; "
                            f"remove it, or set hub.push_merged=true.")
        return problems
    if not export.merged:
        problems.append("hub.push_merged=true pushes the merged model, which only export.merged=true writes; set "
                        "export.merged=true, or hub.push_merged=false.")
    if not hub.merged_repo_id:
        problems.append("hub.push_merged=true needs hub.merged_repo_id, the Hub model repo for the merged model "
                        "(namespace/name, e.g. my-user/tiny-llama-merged).")
    elif hub.merged_repo_id.lower() == (hub.repo_id or "").lower():  # Hub repo ids ignore case
        problems.append(f"hub.merged_repo_id={hub.merged_repo_id!r} is also hub.repo_id: transformers loads a repo "
                        f"holding adapter_config.json as the adapter, not as the merged model; use another repo "
                        f"for the merged model.")
    return problems


def promotion_problems(params: SaveAdapterParameters) -> list[str]:
    """The promote and evaluate sections against MLflow's: the gate moves an alias of the registered model."""
    promote, problems = params.promote, []
    if promote.explicitly_enabled() and not params.mlflow.enabled:
        problems.append("promote.enabled=true needs mlflow.enabled=true: the gate moves an alias of the MLflow "
                        "registered model; set mlflow.enabled=true, or promote.enabled=false.")
    if promotion_active(params) and params.mlflow.alias in (promote.alias, PREVIOUS_ALIAS):
        problems.append(f"mlflow.alias={params.mlflow.alias!r} is an alias the promotion gate manages (promote.alias="
                        f"{promote.alias!r}, and {PREVIOUS_ALIAS!r} for its former holder): log-to-mlflow would move "
                        f"it to every new version; use another mlflow.alias (e.g. candidate), or none.")
    if promote.enabled and promote.metric == "exact_match" and not params.evaluate.exact_match:
        problems.append("promote.metric=exact_match needs evaluate.exact_match=true (exact match is only measured "
                        "then); set it, or use promote.metric=eval_loss.")
    if promote.require_approval and not promote.enabled:
        problems.append("promote.require_approval=true with promote.enabled=false: approval is asked only when the "
                        "gate runs (and passes); set promote.enabled=true, or remove promote.require_approval.")
    evaluate = params.evaluate
    if evaluate.split != DEFAULT_SPLIT and not evaluate.dataset:
        problems.append(f"evaluate.split={evaluate.split!r} without evaluate.dataset: the split is only read from "
                        f"evaluate.dataset (without it the held-out dataset.eval_fraction of the training data is "
                        f"evaluated); set evaluate.dataset, or remove evaluate.split (dataset.split picks the "
                        f"training data's split).")
    return problems


DEFAULT_SPLIT = "train"  # EvaluateSettings.split's default: a deployment form sends it even when nobody chose it


def approval_problems(params: SaveAdapterParameters, temporary_prefect_api: bool) -> list[str]:
    """`adapterflow run` without PREFECT_API_URL runs on a temporary Prefect server that ends with the command:
    a run waiting for approval there can only time out (promote.approval_timeout_minutes, default a day)."""
    promote = params.promote
    if not (temporary_prefect_api and promote.require_approval and promotion_active(params)):
        return []
    return [f"promote.require_approval=true needs a lasting Prefect server: without PREFECT_API_URL, adapterflow "
            f"run uses a temporary one that ends with the command, so nobody could approve and the run would wait "
            f"promote.approval_timeout_minutes={promote.approval_timeout_minutes:g} for nothing. Start one "
            f"(`prefect server start`) and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), or run it through "
            f"a deployment (`prefect deployment run`), or remove promote.require_approval."]


def exact_match_problems(params: SaveAdapterParameters, examples) -> list[str]:
    """evaluate.exact_match needs prompt/completion pairs among the evaluation `examples` (the Example list the
    evaluate-adapter step scores: evaluate.dataset's, or the training data's held-out split)."""
    from adapterflow.runtime.evaluation import prompt_completion_pairs

    if not params.evaluate.exact_match or examples is None or prompt_completion_pairs(examples):
        return []
    asked = ("promote.metric=exact_match with evaluate.exact_match=true"
             if params.promote.enabled and params.promote.metric == "exact_match" else "evaluate.exact_match=true")
    source = (f"evaluate.dataset={params.evaluate.dataset!r}" if params.evaluate.dataset
              else f"the held-out examples of dataset.path={params.dataset.path!r}")
    kind = "chat rows (messages)" if any(e.messages is not None for e in examples) else "plain-text rows"
    verb = "has" if params.evaluate.dataset else "have"
    return [f"{asked}: {source} {verb} no prompt/completion pairs ({kind}); exact match compares the greedy "
            f"continuation of a prompt with its completion. Evaluate on prompt/completion data (evaluate.dataset), "
            f"or set evaluate.exact_match=false (and promote.metric=eval_loss)."]


_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def distributed_problems(training, device: str) -> list[str]:
    """training.num_processes / nnodes / rdzv_endpoint / batch_size fit together (torchrun's rules)."""
    problems = []
    world = training.num_processes * training.nnodes
    if training.batch_size % world:
        problems.append(f"training.batch_size={training.batch_size} is the global batch: it must be divisible by "
                        f"training.num_processes x training.nnodes = {world} (each process takes an equal share); "
                        f"use a multiple of {world}.")
    endpoint = training.rdzv_endpoint
    if training.nnodes > 1 and not endpoint:
        problems.append(f"training.nnodes={training.nnodes} needs training.rdzv_endpoint: host:port of the first "
                        f"node, reachable from every node (e.g. node1.example.org:29500).")
    if training.nnodes == 1 and endpoint:
        problems.append(f"training.rdzv_endpoint={endpoint!r} is only used with training.nnodes > 1 (one node "
                        f"starts its own rendezvous); remove it, or set training.nnodes.")
    match = _ENDPOINT.match(endpoint) if endpoint else None
    if endpoint and (match is None or not 0 < int(match["port"]) < 65536):
        problems.append(f"training.rdzv_endpoint={endpoint!r} is not host:port (a host name or IP address, a colon, "
                        f"a port 1-65535; IPv6 in brackets), e.g. node1.example.org:29500.")
    if device == "cuda" and torch.cuda.is_available() and training.num_processes > torch.cuda.device_count():
        problems.append(f"training.num_processes={training.num_processes}: this machine has "
                        f"{torch.cuda.device_count()} CUDA devices, one per process; use at most that many, or "
                        f"training.device=cpu.")
    return problems


def serving_problems(params: SaveAdapterParameters, config) -> list[str]:
    """verify.require_runtimes against the adapter_config.json the run will save (`adapterflow.serving.check_config`:
    the rules that need no files), so a run a required runtime refuses fails before training, not after."""
    if not params.verify.require_runtimes or config is None:
        return []
    from adapterflow.conversion import doubled_rank_config
    from adapterflow.serving import check_config

    if is_pissa(params.adapter.init) and params.save.convert_pissa_to_lora:
        config = doubled_rank_config(config)
    report = check_config(config.to_dict(), tuple(params.verify.require_runtimes))
    return [f"verify.require_runtimes={params.verify.require_runtimes}: {r.runtime} {r.rule}: {r.message}"
            for r in report.results if r.verdict == "fail"]

