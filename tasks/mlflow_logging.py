"""Record a finished adapter run in MLflow; plain Python (no Prefect), called by the `log-to-mlflow` task.

One MLflow run per Prefect flow run: params (`lora.*`, `training.*`, base model, dataset), the `train_loss` curve
and summary metrics, tags (`prefect.*`, `base_model`, `adapter.*`), artifacts (`adapter/` byte-identical,
`plots/train_loss.png`, `parameters.json`, `run/*.json`), and a pyfunc LoggedModel (`mlflow_adapter_model.py`:
base model + adapter -> text) registered as a new model version, optionally under an alias.

Retries are safe: the run, the model and the version are found again by their `prefect.flow_run_id` tag and only
what is missing is logged, so a retried call creates no second run, model or version. Failures are bounded:
MLflow's own HTTP retries and timeout come from the settings, and an unreachable server raises
MlflowUnavailableError (a ConnectionError: transient) naming the tracking URI. adapterflow.redaction keeps
secrets (tokens, URL passwords) out of params, tags, the JSON artifacts, the returned URIs and error messages.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import quote, urlparse

import adapterflow
from adapterflow.flows.names import default_registered_model_name
from adapterflow.flows.parameters import MlflowSettings
from adapterflow.redaction import redact, redact_exception, redact_text

FLOW_RUN_TAG = "prefect.flow_run_id"
HUB_COMMIT_TAG = "hub.commit_url"
MODEL_CODE = Path(__file__).with_name("mlflow_adapter_model.py")
PACKAGE_DIR = Path(adapterflow.__file__).parent  # the model's copy leaves out the pipeline and builtin data
PACKAGE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "flows", "tasks", "*.jsonl")
MAX_PARAM_CHARS = 500  # MLflow truncates past 6000 chars, then refuses the full value again on a retry
TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}


class MlflowUnavailableError(ConnectionError):
    """The tracking server could not be reached, or kept failing; transient, so a task retry may succeed."""


def resolve_tracking_uri(settings: MlflowSettings, runs_root: str | os.PathLike) -> str:
    """settings.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite store `<runs_root>/mlflow.db`."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(runs_root).absolute() / 'mlflow.db'}"


def is_transient_mlflow_error(exc: BaseException) -> bool:
    """True when retrying may succeed: connection refused or reset, timeouts, 5xx / 429 answers (after MLflow's
    own retries). False for 4xx answers (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ...) and for errors
    raised on the client side (a plain MlflowException defaults to INTERNAL_ERROR, which is no server fault)."""
    from mlflow.exceptions import MlflowException, RestException

    seen, error = set(), exc
    while error is not None and id(error) not in seen:  # the cause chain
        if isinstance(error, (ConnectionError, TimeoutError)) or (
                type(error).__module__.startswith(("requests", "urllib3"))
                and any(word in type(error).__name__ for word in ("Connection", "Timeout", "Retry", "Protocol"))):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    if isinstance(exc, MlflowException):
        if exc.error_code in TRANSIENT_CODES:
            return True
        if not (isinstance(exc, RestException) or str(exc.message).startswith("API request to")):
            return False
        status = exc.get_http_status_code()
    else:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 429))


def log_adapter_run(settings: MlflowSettings, *, runs_root: str | os.PathLike, run_dir: str | os.PathLike,
                    adapter_dir: str | os.PathLike, flow_run_id: str, flow_run_url: Optional[str], training: dict,
                    verification: dict, plan: dict) -> dict:
    """Record one finished pipeline run in MLflow; idempotent per flow_run_id (see the module docstring).

    Args:
        runs_root: root of the run directories; holds the default sqlite store and its artifacts.
        run_dir: this run's directory (its name becomes the MLflow run name).
        adapter_dir: the saved adapter folder (adapter_config.json + weights); only read.
        flow_run_id, flow_run_url: the Prefect flow run, recorded as tags.
        training: <run>/training.json; verification: the verify step's report; plan: <run>/plan.json.

    Returns:
        {"run_id", "experiment_id", "tracking_uri", "run_url", "model_id", "model_uri", "registered_model_name",
         "model_version", "model_version_url"}; the two URLs are None unless the tracking URI is http(s). URIs
        are redacted (no URL password): call resolve_tracking_uri again to reach the server.

    Raises:
        MlflowUnavailableError: the server is unreachable (after settings.max_retries retries) or keeps failing.
        mlflow.exceptions.MlflowException: anything else MLflow refuses (e.g. a param that changed its value).
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", flow_run_id):
        raise ValueError(f"flow_run_id {flow_run_id!r} must be a plain id (letters, digits, _.:-)")
    uri, adapter_dir = resolve_tracking_uri(settings, runs_root), Path(adapter_dir)
    params, tags = redact(_params(plan)), redact(_run_tags(plan, flow_run_id, flow_run_url, training, verification))
    name = settings.registered_model_name or _derived_model_name(plan)  # both valid: flows/names.py
    with _session(settings, uri):
        client = MlflowClient(uri, uri)
        experiment_id = _experiment_id(client, settings.experiment, uri, Path(runs_root).absolute())
        found = client.search_runs([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", ViewType.ACTIVE_ONLY,
                                   max_results=1, order_by=["attributes.start_time ASC"])
        run = found[0] if found else client.create_run(experiment_id, run_name=Path(run_dir).name, tags=tags)
        run_id = run.info.run_id
        try:
            _log_run_data(client, run, bool(found), params, tags, training, plan, verification, adapter_dir)
            model = _logged_model(client, run, flow_run_id, name, adapter_dir, plan, params, tags)
            _log_summary_metrics(client, run, model.model_id, training, verification, adapter_dir)
            version = _model_version(client, name, model.model_id, run_id, flow_run_id, tags, plan)
            if settings.alias:
                client.set_registered_model_alias(name, settings.alias, version.version)
            client.set_terminated(run_id, "FINISHED")
        except Exception:
            with _env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}), \
                    contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")  # best effort; a retry finds the run again and finishes it
            raise
    web = redact_text(uri).rstrip("/") if urlparse(uri).scheme in ("http", "https") else None
    return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": redact_text(uri),
            "run_url": f"{web}/#/experiments/{experiment_id}/runs/{run_id}" if web else None,
            "model_id": model.model_id, "model_uri": f"models:/{model.model_id}", "registered_model_name": name,
            "model_version": str(version.version),
            "model_version_url": f"{web}/#/models/{quote(name)}/versions/{version.version}" if web else None}


def set_hub_commit_tag(settings: MlflowSettings, tracking_uri: str, mlflow_run_id: str, commit_url: str, *,
                       registered_model_name: Optional[str] = None, model_version: Optional[str] = None) -> None:
    """Tag the run (and the model version, when given) with the Hub commit the adapter was pushed as; pass the
    `tracking_uri`, `run_id`, `registered_model_name` and `model_version` that log_adapter_run returned."""
    from mlflow import MlflowClient

    with _session(settings, tracking_uri):
        client = MlflowClient(tracking_uri, tracking_uri)
        client.set_tag(mlflow_run_id, HUB_COMMIT_TAG, redact(commit_url))
        if registered_model_name and model_version:
            client.set_model_version_tag(registered_model_name, str(model_version), HUB_COMMIT_TAG, redact(commit_url))


def _experiment_id(client, name: str, uri: str, runs_root: Path) -> str:
    """The experiment's id, created if missing. A server stores artifacts itself; other stores get
    <runs_root>/mlartifacts (MLflow's default is ./mlruns in whatever the current directory is)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    remote = urlparse(uri).scheme in ("http", "https") or uri.startswith("databricks")
    try:
        return client.create_experiment(name, None if remote else (runs_root / "mlartifacts").as_uri())
    except MlflowException as exc:  # created concurrently
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _log_run_data(client, run, resumed: bool, params, tags, training, plan, verification, adapter_dir) -> None:
    """Params, tags, the train_loss curve (skipping steps an earlier attempt logged) and the artifacts."""
    from mlflow.entities import Metric, Param, RunTag

    run_id, now = run.info.run_id, int(time.time() * 1000)
    logged_steps = {m.step for m in client.get_metric_history(run_id, "train_loss")} if resumed else set()
    losses = [Metric("train_loss", float(loss), now, step) for step, loss in enumerate(training.get("losses") or [], 1)
              if step not in logged_steps and loss is not None]
    client.log_batch(run_id, metrics=losses, tags=[RunTag(k, v) for k, v in tags.items()],
                     params=[Param(k, v) for k, v in params.items() if run.data.params.get(k) != v])
    client.log_artifacts(run_id, str(adapter_dir), "adapter")
    for data, path in ((plan.get("parameters", {}), "parameters.json"), (plan, "run/plan.json"),
                       (training, "run/training.json"), (verification, "run/verification.json")):
        client.log_dict(run_id, redact(data), path)
    if training.get("losses"):
        client.log_figure(run_id, _loss_figure(training["losses"], tags["adapter.name"]), "plots/train_loss.png")


def _logged_model(client, run, flow_run_id, name, adapter_dir, plan, params, tags):
    """The run's pyfunc LoggedModel. It is created (tagged with the flow run id, linked to the run) before its
    files are uploaded, so a retry after a failed upload fills the same model instead of creating another."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    experiment_id, run_id = run.info.experiment_id, run.info.run_id
    models = list(client.search_logged_models([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
                                              order_by=[{"field_name": "creation_time", "ascending": True}]))
    model = next((m for m in models if str(m.status) == "READY"), models[0] if models else None)
    if model is None:
        model_tags = {FLOW_RUN_TAG: flow_run_id,
                      **{k: tags[k] for k in ("base_model", "adapter.name", "adapter.init", "adapter.converted")}}
        model = client.create_logged_model(experiment_id, name, source_run_id=run_id, tags=model_tags,
                                           params=params, model_type="peft-lora-adapter")
    if model.model_id not in {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if str(model.status) == "READY":
        return model
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The signature is explicit; an input example would make MLflow load the base model to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        package = shutil.copytree(PACKAGE_DIR, Path(tmp) / "adapterflow",  # the model's copy of our loader
                                  ignore=PACKAGE_IGNORE)
        mlflow.pyfunc.log_model(  # uploads the files into the existing model and marks it READY
            name=name, model_id=model.model_id, python_model=str(MODEL_CODE), artifacts={"adapter": str(adapter_dir)},
            code_paths=[str(package)], pip_requirements=_pip_requirements(), signature=_signature(),
            model_config=redact({"base_model_path": plan["base_model_path"],
                                 "adapter_name": plan.get("adapter_name", "default")}))
    return client.get_logged_model(model.model_id)


def _log_summary_metrics(client, run, model_id: str, training: dict, verification: dict, adapter_dir: Path) -> None:
    """One value each, on the run and on the model (shown in the Models tab); skipped if already logged."""
    from mlflow.entities import Metric

    values = {key: training.get(key) for key in ("eval_loss_before", "eval_loss_after", "final_loss",
                                                 "tokens_per_second", "trainable_parameters", "total_parameters")}
    values.update(adapter_bytes=sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file()),
                  verification_max_abs_diff=verification.get("max_abs_diff"))
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0, model_id=model_id)
                                               for k, v in values.items() if v is not None and k not in run.data.metrics])


def _model_version(client, name: str, model_id: str, run_id: str, flow_run_id: str, run_tags: dict, plan: dict):
    """This flow run's version of `name`: found by its tag (or source) if an earlier attempt created it, else
    created. OSS stores create versions READY at once, so no polling (nor its "Waiting up to 300 s" log line)."""
    from mlflow.exceptions import MlflowException

    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == name and (version.tags.get(FLOW_RUN_TAG) == flow_run_id
                                     or version.source == f"models:/{model_id}"):
            return version
    try:
        client.create_registered_model(name, description=f"Adapters for {run_tags['base_model']} by adapterflow.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {FLOW_RUN_TAG: flow_run_id, "base_model": run_tags["base_model"], "r": str(plan["lora_config"].get("r")),
            "init": run_tags["adapter.init"], "converted": run_tags["adapter.converted"]}
    return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id,
                                       description=run_tags["mlflow.note.content"], await_creation_for=0)


def _params(plan: dict) -> dict[str, str]:
    given = plan.get("parameters", {})
    params = {**{f"lora.{k}": v for k, v in plan.get("lora_config", {}).items() if k != "base_model_name_or_path"},
              **{f"training.{k}": v for k, v in plan.get("training", {}).items()},
              "base_model": plan.get("base_model_path"),
              "base_model.name_or_path": given.get("base_model", {}).get("name_or_path"),
              "base_model.dtype": plan.get("dtype"), "adapter.name": plan.get("adapter_name"),
              "adapter.init": given.get("adapter", {}).get("init"),
              "dataset.path": plan.get("dataset_path"), "dataset.sha256": plan.get("dataset_sha256"),
              "dataset.eval_fraction": plan.get("eval_fraction"), "max_seq_len": plan.get("max_seq_len"),
              "save.convert_pissa_to_lora": plan.get("convert_pissa_to_lora"), "verify.atol": plan.get("atol")}
    return {key: _compact(value) for key, value in params.items() if value not in (None, "", [], {})}


def _compact(value: Any) -> str:
    """A param value: lists comma-joined, dicts as compact JSON, at most MAX_PARAM_CHARS."""
    text = (",".join(map(str, value)) if isinstance(value, (list, tuple)) else
            json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, dict) else str(value))
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."


def _run_tags(plan, flow_run_id, flow_run_url, training, verification) -> dict[str, str]:
    given, lora = plan.get("parameters", {}), plan.get("lora_config", {})
    init = given.get("adapter", {}).get("init") or lora.get("init_lora_weights")  # True is LoRA's default init
    init = {True: "lora", False: "random"}[init] if isinstance(init, bool) else str(init)
    tags = {FLOW_RUN_TAG: flow_run_id, "base_model": given.get("base_model", {}).get("name_or_path")
            or plan["base_model_path"], "adapter.name": plan.get("adapter_name", "default"), "adapter.init": init,
            "adapter.converted": str(bool(plan.get("convert_pissa_to_lora"))).lower(),
            "verification.passed": str(verification.get("passed")).lower()}
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    link = f"[Prefect flow run]({flow_run_url})" if flow_run_url else f"Prefect flow run `{flow_run_id}`"
    tags["mlflow.note.content"] = (  # the run's description in the UI (also the model version's)
        f"Adapter `{tags['adapter.name']}` ({init}, r={lora.get('r')}) on `{tags['base_model']}`: eval loss "
        f"{training.get('eval_loss_before')} -> {training.get('eval_loss_after')}; verification max |diff| "
        f"{verification.get('max_abs_diff')} (atol {verification.get('atol')}). {link}.")
    return tags


def _derived_model_name(plan: dict) -> str:
    # The base model as the user named it ("builtin:tiny-llama" -> "default-tiny-llama"), not its cache folder.
    given = plan.get("parameters", {}).get("base_model", {}).get("name_or_path") or plan["base_model_path"]
    return default_registered_model_name(plan.get("adapter_name", "default"), given)


def _loss_figure(losses: list, adapter_name: str):
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend (Agg renders)

    figure = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    figure.subplots().plot(range(1, len(losses) + 1), [math.nan if v is None else v for v in losses], linewidth=1.2)
    figure.axes[0].set(xlabel="step", ylabel="train loss", title=f"Training loss, adapter {adapter_name}")
    return figure


def _signature():
    """One unnamed string column (a list of prompts, or a DataFrame with one column, e.g. "prompt") -> strings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32),
                                              ParamSpec("temperature", "double", 0.0)]))


def _pip_requirements() -> list[str]:
    """What loading the model needs. Explicit: inferring them takes seconds and adds torchvision."""
    return [f"{name}=={package_version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "transformers", "safetensors", "tokenizers")]


@contextlib.contextmanager
def _session(settings: MlflowSettings, uri: str) -> Iterator[None]:
    """For the duration of a call: MLflow's HTTP retries and timeout from the settings, no progress bars or
    "View run" lines, `uri` as the global tracking and registry URI (log_model uses the global one), and
    transient failures raised as MlflowUnavailableError. Environment and globals are restored afterwards, so
    calls in one process must not overlap."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    with _env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.max_retries),
               "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(settings.request_timeout_seconds))),  # an int
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        except Exception as exc:
            redact_exception(exc)  # MLflow's messages quote the request URL, with any password in it
            if not is_transient_mlflow_error(exc):
                raise
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise MlflowUnavailableError(
                f"MLflow tracking server {redact_text(uri)} is unreachable or failing ({cause}). Start the server "
                f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to log to the "
                f"local sqlite store, or set mlflow.enabled=false to skip MLflow logging.") from exc
        finally:
            mlflow.set_tracking_uri(saved_uris[0])
            mlflow.set_registry_uri(saved_uris[1])


@contextlib.contextmanager
def _env(updates: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
