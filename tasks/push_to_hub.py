"""push-to-hub: publish the saved output folder, as it is, to a Hugging Face Hub model repo as one commit.

The folder's README.md is already the Hub card (the save step renders it with adapterflow.model_card); nothing
is copied or rewritten here.

Skipped (a Completed state named "Skipped") when no hub.repo_id is given. The token comes from a Prefect Secret
block (hub.token_secret_block) or HF_TOKEN, and is never logged, returned or written anywhere: a token from a
block is registered with adapterflow.redaction, whose filter scrubs it (and URL passwords) from the logs.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.states import Completed

from adapterflow.integrations.hub import push_adapter_folder
from adapterflow.redaction import install_log_redaction, redact_text, register_secret
from adapterflow.flows.parameters import HubSettings, MlflowSettings, local_path
from adapterflow.integrations.mlflow_logging import resolve_tracking_uri, set_hub_commit_tag
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="push-to-hub", **RETRY_OPTIONS, **RESULT_OPTIONS)
def push_to_hub(plan: RunPlan, settings: HubSettings, mlflow_settings: MlflowSettings, saved: dict,
                tracked: dict | None, flow_run_id: str, skip_reason: str | None = None):
    """Returns {"repo_id", "commit_url", "commit_oid", "created_commit"}; pushing identical files again makes no
    new commit and returns the existing one. {} (a "Skipped" state) without hub.repo_id, or with `skip_reason`
    (the promotion gate did not promote, flows/parameters_promote.hub_push_allowed)."""
    install_log_redaction()
    if not settings.repo_id:
        return Completed(name="Skipped", message="Skipped: no hub.repo_id given", data={})
    if skip_reason:
        return Completed(name="Skipped", message=skip_reason, data={})
    folder = saved["output_dir"]
    mlflow_note = f", MLflow run {tracked['run_id']}" if tracked else ""
    result = push_adapter_folder(
        folder, settings.repo_id, token=_token(settings), endpoint=settings.endpoint, private=settings.private,
        revision=settings.revision, tag=settings.tag, timeout=settings.timeout_seconds,
        commit_message=f"adapterflow: adapter '{plan.adapter_name}' from Prefect flow run {flow_run_id}{mlflow_note}",
    )
    commit_url, label = redact_text(result.commit_url), f"{result.repo_id}@{result.commit_oid[:12]}"
    create_link_artifact(key="hub-commit", link=commit_url, link_text=label,
                         description="The Hub commit holding the adapter folder (model card, config, weights)"
                         + ("" if result.created_commit else "; the files were already there, no new commit"))
    if tracked:  # the tracked URI is redacted: resolve the real one again
        uri = resolve_tracking_uri(mlflow_settings, local_path(plan.parameters["runs_root"]))
        set_hub_commit_tag(mlflow_settings, uri, tracked["run_id"], commit_url, label=label,
                           registered_model_name=tracked["registered_model_name"], model_version=tracked["model_version"])
    return {"repo_id": result.repo_id, "commit_url": commit_url, "commit_oid": result.commit_oid,
            "created_commit": result.created_commit}


def _token(settings: HubSettings) -> str | None:
    if not settings.token_secret_block:
        return None  # huggingface_hub reads HF_TOKEN
    from prefect.blocks.system import Secret

    token = Secret.load(settings.token_secret_block).get()
    register_secret(token)  # no environment variable holds it: tell the scrubber
    return token
