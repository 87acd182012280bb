"""The MLflow run of one pipeline run: experiment, params, tags, the metric histories (`loss`, `learning_rate`,
`grad_norm`, `epoch`, `eval_loss`: see adapterflow.runtime.progress), summary metrics, plots and the run's JSON
records. The adapter itself is not a run artifact: it is stored once, as the LoggedModel's files
(mlflow_registry), and the run links to that model (run outputs and the `adapter.model_uri` tag).

Every function is idempotent for a retried flow run: it skips what an earlier attempt logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from adapterflow.integrations.mlflow_describe import FLOW_RUN_TAG  # noqa: F401 - API
HUB_COMMIT_TAG = "hub.commit_url"
MODEL_URI_TAG = "adapter.model_uri"
# The UI opens an experiment of this kind in its "Model training" view (runs, charts, models) rather than the
# GenAI one (traces, prompts, an assistant panel); values from the UI bundle's experiment kinds.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
MAX_PARAM_CHARS = 500  # MLflow truncates past 6000 chars, then refuses the full value again on a retry


def experiment_id(client, name: str, uri: str, runs_root: Path) -> str:
    """The experiment's id, created if missing. A server stores artifacts itself; other stores get
    <runs_root>/mlartifacts (MLflow's default is ./mlruns in whatever the current directory is). Tagged with
    EXPERIMENT_KIND unless it has a kind."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    remote = urlparse(uri).scheme in ("http", "https") or uri.startswith("databricks")
    try:
        return client.create_experiment(name, None if remote else (runs_root / "mlartifacts").as_uri(),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:  # created concurrently
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def find_run(client, experiment: str, flow_run_id: str):
    """The run of this flow run (by its FLOW_RUN_TAG; the first if there were several), or None."""
    from mlflow.entities import ViewType

    found = client.search_runs([experiment], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", ViewType.ACTIVE_ONLY,
                               max_results=1, order_by=["attributes.start_time ASC"])
    return found[0] if found else None


def find_or_create_run(client, experiment: str, flow_run_id: str, run_name: str, tags: dict,
                       start_time: Optional[int] = None) -> tuple[Any, bool]:
    """(run, found): the run that the training or an earlier attempt of this flow run created (by its
    FLOW_RUN_TAG), else a new one starting at `start_time` (ms since the epoch; default: now)."""
    run = find_run(client, experiment, flow_run_id)
    if run is not None:
        return run, True
    return client.create_run(experiment, start_time=start_time, run_name=run_name, tags=tags), False


def log_run_data(client, run, params: dict, tags: dict, training: dict, history: list, records: dict) -> None:
    """Params, tags, the metric `history` (points (key, value, step, timestamp_ms); only the (key, step) points
    the run does not have yet: the training logged most of them live), the JSON `records` (artifact path ->
    redacted data) and plots/train_loss.png."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = run.info.run_id
    logged = {(key, m.step) for key in {p[0] for p in history} for m in client.get_metric_history(run_id, key)}
    metrics = [Metric(key, float(value), int(stamp), int(step)) for key, value, step, stamp in history
               if (key, step) not in logged and value is not None]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()],  # MLflow splits it
                     params=[Param(k, v) for k, v in params.items() if run.data.params.get(k) != v])
    for path, data in records.items():
        client.log_dict(run_id, data, path)
    if training.get("losses"):
        client.log_figure(run_id, _loss_figure(training["losses"], tags["adapter.name"]), "plots/train_loss.png")


def log_summary_metrics(client, run, model_id: str, training: dict, verification: dict, adapter_dir: Path) -> None:
    """One value each, on the run and on the model (shown in the Models tab); skipped if already logged."""
    from mlflow.entities import Metric

    values = {key: training.get(key) for key in ("eval_loss_before", "eval_loss_after", "final_loss",
                                                 "tokens_per_second", "trainable_parameters", "total_parameters")}
    values.update(adapter_bytes=sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file()),
                  verification_max_abs_diff=verification.get("max_abs_diff"))
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0, model_id=model_id)
                                               for k, v in values.items() if v is not None and k not in run.data.metrics])


def run_params(plan: dict) -> dict[str, str]:
    """`lora.*`, `training.*`, base model, dataset, adapter and save settings, each at most MAX_PARAM_CHARS."""
    given = plan.get("parameters", {})
    params = {**{f"lora.{k}": v for k, v in plan.get("lora_config", {}).items() if k != "base_model_name_or_path"},
              **{f"training.{k}": v for k, v in plan.get("training", {}).items()},
              "base_model": plan.get("base_model_path"),
              "base_model.name_or_path": given.get("base_model", {}).get("name_or_path"),
              "base_model.dtype": plan.get("dtype"), "adapter.name": plan.get("adapter_name"),
              "adapter.init": given.get("adapter", {}).get("init"),
              "dataset.path": plan.get("dataset_path"), "dataset.fingerprint": plan.get("dataset_fingerprint"),
              "dataset.eval_fraction": plan.get("eval_fraction"), "max_seq_len": plan.get("max_seq_len"),
              "save.convert_pissa_to_lora": plan.get("convert_pissa_to_lora"), "verify.atol": plan.get("atol"),
              **{f"training.{k}": v for k, v in plan.get("launch", {}).items()},  # num_processes, strategy, ...
              **_dataset_params(plan.get("dataset") or {})}
    return {key: _compact(value) for key, value in params.items() if value not in (None, "", [], {})}


def _dataset_params(spec: dict) -> dict:
    """The DataSpec's split, columns and Hub revision; the chat template as the sha256 of its text (the text itself
    is in the run/plan.json artifact)."""
    params = {f"dataset.{k}": v for k, v in spec.items() if k not in ("path", "chat_template")}
    if spec.get("chat_template"):
        params["dataset.chat_template_sha256"] = hashlib.sha256(spec["chat_template"].encode()).hexdigest()
    return params


def _compact(value: Any) -> str:
    """A param value: lists comma-joined, dicts as compact JSON, at most MAX_PARAM_CHARS."""
    text = (",".join(map(str, value)) if isinstance(value, (list, tuple)) else
            json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, dict) else str(value))
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."


def _loss_figure(losses: list, adapter_name: str):
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend (Agg renders)

    figure = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    figure.subplots().plot(range(1, len(losses) + 1), [math.nan if v is None else v for v in losses], linewidth=1.2)
    figure.axes[0].set(xlabel="step", ylabel="train loss", title=f"Training loss, adapter {adapter_name}")
    return figure
