"""Record an adapter run in MLflow; plain Python (no Prefect), called by the `train-adapter` task (the live run:
`start_live_run`), the `log-to-mlflow` task (`log_adapter_run`) and the flow (`end_run`).

One MLflow run per Prefect flow run (mlflow_run), started when training starts and ended after the flow's last
step: params (`lora.*`, `training.*`, base model, dataset), the metric histories logged while training
(mlflow_live: `loss`, `learning_rate`, `grad_norm`, `epoch`, `eval_loss`), completed from `<run>/metrics.jsonl`,
and summary metrics, tags (`prefect.*`, `base_model`, `adapter.*`), artifacts
(`plots/train_loss.png`, `parameters.json`, `run/*.json`). The adapter is stored once (mlflow_registry): as the
files of a pyfunc LoggedModel (base model + adapter -> text) that the run links to, registered as a new model
version, optionally under an alias.

Retries are safe: the run, the model and the version are found again by their `prefect.flow_run_id` tag and only
what is missing is logged, so a retried call creates no second run, model or version. Failures are bounded and
typed (mlflow_client): MLflow's own HTTP retries and timeout come from the settings; an unreachable server raises
MlflowUnavailableError (transient) naming the tracking URI, a refusal MlflowRefusedError (permanent).
adapterflow.redaction keeps secrets (tokens, URL passwords) out of params, tags, the JSON artifacts, the returned
URIs and error messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlparse

from adapterflow.flows.names import default_registered_model_name, logged_model_name
from adapterflow.integrations import mlflow_describe, mlflow_registry, mlflow_run
from adapterflow.integrations.mlflow_live import LiveRun
from adapterflow.integrations.mlflow_client import (MlflowRefusedError, MlflowTrackingError,  # noqa: F401 - API
                                                    MlflowUnavailableError, fail_fast, is_transient_mlflow_error,
                                                    registry_store_tracking_uri, resolve_tracking_uri,
                                                    tracking_client)
from adapterflow.integrations.mlflow_run import FLOW_RUN_TAG, HUB_COMMIT_TAG, MODEL_URI_TAG
from adapterflow.redaction import redact, redact_text


def log_adapter_run(settings, *, runs_root: str | os.PathLike, run_dir: str | os.PathLike,
                    adapter_dir: str | os.PathLike, flow_run_id: str, flow_run_url: Optional[str], training: dict,
                    verification: dict, plan: dict, flow_run_name: Optional[str] = None,
                    input_example: Optional[list[str]] = None, dataset_file: Optional[str] = None,
                    metric_history: Optional[list[tuple]] = None, end_run: bool = True) -> dict:
    """Record one finished pipeline run in MLflow; idempotent per flow_run_id (see the module docstring).

    Args:
        settings: flows.parameters.MlflowSettings (tracking_uri, experiment, registered_model_name, alias,
            request_timeout_seconds, max_retries).
        runs_root: root of the run directories; holds the default sqlite store and its artifacts.
        run_dir: this run's directory.
        adapter_dir: the saved adapter folder (README.md, adapter_config.json, weights); only read.
        flow_run_id, flow_run_url, flow_run_name: the Prefect flow run, recorded as tags and linked from the
            description; its name (or run_name) plus init and rank names the MLflow run ("rational-inchworm pissa
            r8") and, with the id, the LoggedModel (mlflow_describe, flows/names.py).
        training: <run>/training.json; verification: the verify step's report; plan: <run>/plan.json.
        input_example: prompts in the training data's format, saved as the pyfunc's input example.
        dataset_file: the dataset file read (for builtin:NAME datasets), the source of the run's dataset input.
        metric_history: (key, value, step, timestamp_ms) points (adapterflow.runtime.metrics_log.read_history);
            those the run lacks are logged. None: training["losses"] as `loss`, one point per step.
        end_run: end the run FINISHED (False: the flow ends it after its last step, `end_run`); a failure here
            ends it FAILED only when True.

    Returns:
        {"run_id", "run_name", "experiment_id", "tracking_uri", "run_url", "model_id", "model_name" (the
         LoggedModel's), "model_uri", "registered_model_name", "model_version", "model_version_url"}; the two URLs
         are None unless the tracking URI is http(s). URIs
        are redacted (no URL password): call resolve_tracking_uri again to reach the server.

    Raises:
        MlflowUnavailableError: the server is unreachable (after settings.max_retries retries) or keeps failing.
        MlflowRefusedError: anything else MLflow refuses (e.g. a param that changed its value).
        ValueError: flow_run_id is not a plain id.
    """
    _check_flow_run_id(flow_run_id)
    uri, adapter_dir = resolve_tracking_uri(settings, runs_root), Path(adapter_dir)
    params = redact(mlflow_run.run_params(plan))
    tags = redact(mlflow_describe.run_tags(plan, flow_run_id, flow_run_url, training, verification,
                                           mlflow_describe.saved_rank(adapter_dir), flow_run_name))
    name = registered_model_name(settings, plan)  # both valid: flows/names.py
    model_name = logged_model_name(name, flow_run_name, flow_run_id)
    run_name = redact(mlflow_describe.run_name(plan, flow_run_name))
    records = {"parameters.json": plan.get("parameters", {}), "run/plan.json": plan, "run/training.json": training,
               "run/verification.json": verification}
    history = metric_history if metric_history is not None else _loss_history(training)
    started = int(training["started_at"] * 1000) if training.get("started_at") else None
    with tracking_client(settings, uri) as client:
        experiment_id = mlflow_run.experiment_id(client, settings.experiment, uri, Path(runs_root).absolute())
        run, _ = mlflow_run.find_or_create_run(client, experiment_id, flow_run_id, run_name, tags, started)
        run_id = run.info.run_id
        try:
            mlflow_run.log_run_data(client, run, params, tags, training, history,
                                    {path: redact(data) for path, data in records.items()})
            mlflow_describe.log_dataset_input(client, run, plan, dataset_file)
            model = mlflow_registry.logged_model(client, run, flow_run_id, model_name, adapter_dir, plan, params,
                                                 tags, input_example)
            client.set_tag(run_id, MODEL_URI_TAG, f"models:/{model.model_id}")
            mlflow_run.log_summary_metrics(client, run, model.model_id, training, verification, adapter_dir)
            with registry_store_tracking_uri(uri):
                version = mlflow_registry.model_version(client, name, model.model_id, run_id, flow_run_id, tags, plan)
            if settings.alias:
                client.set_registered_model_alias(name, settings.alias, version.version)
            if end_run:
                client.set_terminated(run_id, "FINISHED")
        except Exception:
            if end_run:
                with fail_fast(), contextlib.suppress(Exception):
                    client.set_terminated(run_id, "FAILED")  # best effort; a retry finds the run again, finishes it
            raise
    web = redact_text(uri).rstrip("/") if urlparse(uri).scheme in ("http", "https") else None
    return {"run_id": run_id, "run_name": run.info.run_name, "experiment_id": experiment_id,
            "tracking_uri": redact_text(uri),
            "run_url": f"{web}/#/experiments/{experiment_id}/runs/{run_id}" if web else None,
            "model_id": model.model_id, "model_name": model.name, "model_uri": f"models:/{model.model_id}",
            "registered_model_name": name,
            "model_version": str(version.version),
            "model_version_url": f"{web}/#/models/{quote(name)}/versions/{version.version}" if web else None}


def set_hub_commit_tag(settings, tracking_uri: str, mlflow_run_id: str, commit_url: str, *,
                       registered_model_name: Optional[str] = None, model_version: Optional[str] = None,
                       label: Optional[str] = None) -> None:
    """Record the Hub commit the adapter was pushed as: the `hub.commit_url` tag and a link (`label`, e.g.
    "me/adapter@0123abcd") in the descriptions of the run and, when given, the model version; pass the
    `tracking_uri`, `run_id`, `registered_model_name` and `model_version` that log_adapter_run returned.
    Idempotent: a retry adds no second link.

    Raises: MlflowUnavailableError, MlflowRefusedError (see log_adapter_run)."""
    commit_url = redact(commit_url)
    label = label or commit_url.rstrip("/").rsplit("/", 1)[-1][:12]
    with tracking_client(settings, tracking_uri) as client:
        note = client.get_run(mlflow_run_id).data.tags.get("mlflow.note.content")
        client.set_tag(mlflow_run_id, HUB_COMMIT_TAG, commit_url)
        client.set_tag(mlflow_run_id, "mlflow.note.content", mlflow_describe.with_hub_link(note, commit_url, label))
        if registered_model_name and model_version:
            version = client.get_model_version(registered_model_name, str(model_version))
            client.set_model_version_tag(registered_model_name, str(model_version), HUB_COMMIT_TAG, commit_url)
            client.update_model_version(registered_model_name, str(model_version),
                                        mlflow_describe.with_hub_link(version.description, commit_url, label))


def start_live_run(settings, *, runs_root: str | os.PathLike, plan: dict, flow_run_id: str,
                   flow_run_url: Optional[str], flow_run_name: Optional[str], start_time_ms: int) -> LiveRun:
    """Start the flow run's MLflow run for a training that starts now: a background thread creates it (or finds
    it, on a retry) with start time `start_time_ms`, the params and the in-progress tags, then sends what the
    training `add`s (mlflow_live). Returns at once; the server need not be reachable.

    Raises:
        ValueError: flow_run_id is not a plain id.
    """
    _check_flow_run_id(flow_run_id)
    return LiveRun(settings, resolve_tracking_uri(settings, runs_root), experiment=settings.experiment,
                   runs_root=Path(runs_root), flow_run_id=flow_run_id,
                   run_name=redact(mlflow_describe.run_name(plan, flow_run_name)),
                   tags=redact(mlflow_describe.training_tags(plan, flow_run_id, flow_run_url, flow_run_name)),
                   params=redact(mlflow_run.run_params(plan)), start_time_ms=start_time_ms).start()


def end_run(settings, *, runs_root: str | os.PathLike, flow_run_id: str, status: str = "FINISHED",
            fast: bool = False) -> Optional[str]:
    """End the flow run's MLflow run with `status` (FINISHED, FAILED, KILLED); returns its id, or None when
    there is none (the flow failed before training). `fast`: no HTTP retries and a 2 s timeout (failure hooks).

    Raises: MlflowUnavailableError, MlflowRefusedError (see log_adapter_run)."""
    _check_flow_run_id(flow_run_id)
    with tracking_client(settings, resolve_tracking_uri(settings, runs_root)) as client, \
            (fail_fast() if fast else contextlib.nullcontext()):
        experiment = client.get_experiment_by_name(settings.experiment)
        run = experiment and mlflow_run.find_run(client, experiment.experiment_id, flow_run_id)
        if not run:
            return None
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id


def _check_flow_run_id(flow_run_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", flow_run_id):
        raise ValueError(f"flow_run_id {flow_run_id!r} must be a plain id (letters, digits, _.:-)")


def _loss_history(training: dict) -> list[tuple]:
    """Without metrics.jsonl (a run folder from before it): the per-step losses as `loss`."""
    now = int(time.time() * 1000)
    return [("loss", loss, step, now) for step, loss in enumerate(training.get("losses") or [], 1)]


def registered_model_name(settings, plan: dict) -> str:
    """The registered model a run's version goes to: mlflow.registered_model_name, else derived from the plan."""
    return settings.registered_model_name or _derived_model_name(plan)


def _derived_model_name(plan: dict) -> str:
    # The base model as the user named it ("builtin:tiny-llama" -> "default-tiny-llama"), not its cache folder.
    given = plan.get("parameters", {}).get("base_model", {}).get("name_or_path") or plan["base_model_path"]
    return default_registered_model_name(plan.get("adapter_name", "default"), given)


__all__ = ["FLOW_RUN_TAG", "HUB_COMMIT_TAG", "MODEL_URI_TAG", "MlflowRefusedError", "MlflowTrackingError",
           "MlflowUnavailableError", "end_run", "is_transient_mlflow_error", "log_adapter_run", "registered_model_name",
           "resolve_tracking_uri",
           "set_hub_commit_tag", "start_live_run"]
