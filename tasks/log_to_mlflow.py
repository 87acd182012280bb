"""log-to-mlflow: complete the flow run's MLflow run (started by train-adapter) with what training did not send,
its summary metrics and artifacts, and the adapter as a registered model; and the end of that run, after the
flow's last step (`end_mlflow_run`) or when the flow fails or crashes (`mlflow_run_hook`, a flow state hook).

Importing this module (the flow does) attaches adapterflow.redaction's log filter to Prefect's handlers, so
no URL password or token reaches the Prefect logs; each run of the task attaches it again to handlers added since.
"""

from __future__ import annotations

import warnings

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Completed

from adapterflow.redaction import install_log_redaction
from adapterflow.runtime.chat import chat_prompt
from adapterflow.runtime.data import load_examples, split_examples
from adapterflow.runtime.data_sources import classify
from adapterflow.runtime.metrics_log import read_history
from adapterflow.runtime.run_dir import read_json
from adapterflow.flows.parameters import MlflowSettings, SaveAdapterParameters, local_path
from adapterflow.integrations.mlflow_logging import end_run, log_adapter_run
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.prefect_links import flow_run_url
from adapterflow.tasks.run_plan import RunPlan


install_log_redaction()


@task(name="log-to-mlflow", **RETRY_OPTIONS, **RESULT_OPTIONS)
def log_to_mlflow(plan: RunPlan, settings: MlflowSettings, saved: dict, verification: dict, flow_run_id: str):
    """Returns the MLflow run and model version ids and URLs ({} and a "Skipped" state when mlflow.enabled is false).

    Idempotent: a retry finds the MLflow run and model version it created before, by the flow run id, and logs
    only the metric points of <run>/metrics.jsonl that the run lacks. The run stays RUNNING: the flow ends it.
    """
    install_log_redaction()
    if not settings.enabled:
        return Completed(name="Skipped", message="Skipped: MLflow logging is off (mlflow.enabled=false)", data={})
    runs_root = local_path(plan.parameters["runs_root"])
    result = log_adapter_run(
        settings, runs_root=runs_root, run_dir=plan.run_dir, adapter_dir=saved["adapter_dir"],
        flow_run_id=flow_run_id, flow_run_url=flow_run_url(flow_run_id), flow_run_name=flow_run.get_name(),
        training=read_json(plan.run.training_summary), verification=verification, plan=plan.model_dump(mode="json"),
        input_example=prompt_examples(plan), dataset_file=_dataset_file(plan), end_run=False,
        metric_history=[(p.key, p.value, p.step, p.timestamp_ms) for p in read_history(plan.run.metrics)] or None,
    )
    if result["run_url"]:
        create_link_artifact(key="mlflow-run", link=result["run_url"], link_text=f"MLflow run {result['run_name']}",
                             description="The MLflow run: params, metrics, the loss chart, the dataset input")
        create_link_artifact(key="mlflow-model-version", link=result["model_version_url"],
                             link_text=f"{result['registered_model_name']} version {result['model_version']}",
                             description="The registered model version (a pyfunc: base model + adapter -> text)")
    else:
        create_markdown_artifact(key="mlflow-run", markdown=(
            f"MLflow run `{result['run_id']}`, model `{result['registered_model_name']}` version "
            f"{result['model_version']}, in `{result['tracking_uri']}`.\n\n"
            f"Browse it with `mlflow ui --backend-store-uri {result['tracking_uri']}`."))
    get_run_logger().info("MLflow run %s (%s), model %s version %s", result["run_name"],
                          result["run_url"] or result["tracking_uri"], result["registered_model_name"],
                          result["model_version"])
    return result  # its URIs are redacted


def prompt_examples(plan: RunPlan, count: int = 2) -> list[str]:
    """Prompts of held-out examples (the training data's format, e.g. "Repeat: red map ->"), for the model's
    input example; chat data gives the conversation up to its first assistant turn through the chat template;
    text-only datasets give the start of a text. [] when the dataset cannot be read."""
    spec = plan.data_spec()
    try:
        _, held_out = split_examples(load_examples(spec), plan.eval_fraction, plan.training_settings().seed)
        if any(example.messages for example in held_out[:count]):
            from adapterflow.runtime.base_models import load_tokenizer

            tokenizer = load_tokenizer(plan.base_model_path)
            return [chat_prompt(example.messages, tokenizer, spec.chat_template) for example in held_out[:count]]
    except (OSError, ValueError):
        return []
    return [example.prompt or " ".join(example.completion.split()[:6]) for example in held_out[:count]]


def _dataset_file(plan: RunPlan) -> str | None:
    try:
        kind, location = classify(plan.dataset_path)
        return location if kind in ("builtin", "file") else None
    except (OSError, ValueError):
        return None


def end_mlflow_run(config: SaveAdapterParameters, flow_run_id: str, status: str = "FINISHED",
                   fast: bool = False) -> None:
    """End the flow run's MLflow run with `status` (nothing without mlflow.enabled or a run). Best effort: a
    failure is a warning (the run then stays RUNNING or keeps its status), never the flow's failure."""
    if not config.mlflow.enabled:
        return
    try:
        end_run(config.mlflow, runs_root=local_path(config.runs_root), flow_run_id=flow_run_id, status=status,
                fast=fast)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the flow's result stands
        _logger().warning("Could not end the MLflow run as %s: %s", status, exc)


def mlflow_run_hook(status: str):
    """A flow state hook (on_failure: FAILED; on_crashed, on_cancellation: KILLED) that ends the MLflow run,
    without HTTP retries (a failing flow must not wait on a dead server)."""
    def end_mlflow_run_hook(flow, flow_run, state) -> None:
        with warnings.catch_warnings():  # the parameters warned once already, when the run started
            warnings.simplefilter("ignore")
            try:
                config = SaveAdapterParameters.model_validate((flow_run.parameters or {}).get("config") or {})
            except ValueError:  # parameters that never got as far as training: no MLflow run to end
                return
        end_mlflow_run(config, str(flow_run.id), status, fast=True)

    return end_mlflow_run_hook


def _logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run context (prefect.exceptions.MissingContextError)
        import logging

        return logging.getLogger("adapterflow")
