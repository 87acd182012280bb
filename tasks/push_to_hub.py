"""push-to-hub: publish the saved output folder, as it is, to a Hugging Face Hub model repo as one commit.

The folder's README.md is already the Hub card (the save step renders it with adapterflow.model_card); nothing
is copied or rewritten here.

With hub.push_merged, the merged model folder (export-merged's, README.md its card) goes to hub.merged_repo_id
as one more commit, with the same private / revision / tag / endpoint settings.

Skipped (a Completed state named "Skipped") when no hub.repo_id is given and hub.push_merged is off. The token comes from a Prefect Secret
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
                tracked: dict | None, flow_run_id: str, exported: dict | None = None, skip_reason: str | None = None):
    """Returns {"repo_id", "commit_url", "commit_oid", "created_commit"} (without hub.repo_id: none of them) plus,
    with hub.push_merged, "merged": the same four for the merged model; pushing identical files again makes no
    new commit and returns the existing one. {} (a "Skipped" state) when there is nothing to push, or with
    `skip_reason` (the promotion gate did not promote, flows/parameters_promote.hub_push_allowed): then neither
    the adapter nor the merged model is pushed."""
    install_log_redaction()
    if not settings.repo_id and not settings.push_merged:
        return Completed(name="Skipped", message="Skipped: no hub.repo_id given", data={})
    if skip_reason:
        return Completed(name="Skipped", message=skip_reason, data={})
    token = _token(settings)
    source = f"Prefect flow run {flow_run_id}" + (f", MLflow run {tracked['run_id']}" if tracked else "")
    pushed = _push_adapter(plan, settings, mlflow_settings, saved, tracked, token, source) if settings.repo_id else {}
    if settings.push_merged:
        pushed["merged"] = _push_merged(plan, settings, exported, token, source)
    return pushed


def _push_adapter(plan: RunPlan, settings: HubSettings, mlflow_settings: MlflowSettings, saved: dict,
                  tracked: dict | None, token: str | None, source: str) -> dict:
    """The adapter's output folder to hub.repo_id, one commit (hub-commit artifact, MLflow hub.commit_url tag)."""
    result = push_adapter_folder(
        saved["output_dir"], settings.repo_id, token=token, endpoint=settings.endpoint, private=settings.private,
        revision=settings.revision, tag=settings.tag, timeout=settings.timeout_seconds,
        commit_message=f"adapterflow: adapter '{plan.adapter_name}' from {source}",
    )
    commit_url, label = redact_text(result.commit_url), f"{result.repo_id}@{result.commit_oid[:12]}"
    create_link_artifact(key="hub-commit", link=commit_url, link_text=label,
                         description="The Hub commit holding the adapter folder (model card, config, weights)"
                         + ("" if result.created_commit else "; the files were already there, no new commit"))
    if tracked:  # the tracked URI is redacted: resolve the real one again
        uri = resolve_tracking_uri(mlflow_settings, local_path(plan.parameters["runs_root"]))
        set_hub_commit_tag(mlflow_settings, uri, tracked["run_id"], commit_url, label=label,
                           registered_model_name=tracked["registered_model_name"], model_version=tracked["model_version"])
    return _pushed(result)


def _push_merged(plan: RunPlan, settings: HubSettings, exported: dict | None, token: str | None, source: str) -> dict:
    """The merged model folder to hub.merged_repo_id, one commit (hub-merged-commit artifact)."""
    if not exported:  # the pre-training check refuses push_merged without export.merged
        raise ValueError("hub.push_merged=true but no merged model was exported; set export.merged=true.")
    result = push_adapter_folder(
        exported["path"], settings.merged_repo_id, token=token, endpoint=settings.endpoint, private=settings.private,
        revision=settings.revision, tag=settings.tag, timeout=settings.timeout_seconds, merged_model=True,
        commit_message=f"adapterflow: base model with adapter '{plan.adapter_name}' merged, from {source}")
    pushed = _pushed(result)
    create_link_artifact(key="hub-merged-commit", link=pushed["commit_url"],
                         link_text=f"{result.repo_id}@{result.commit_oid[:12]}",
                         description="The Hub commit holding the merged model (weights, config, tokenizer, card)")
    return pushed


def _pushed(result) -> dict:
    return {"repo_id": result.repo_id, "commit_url": redact_text(result.commit_url), "commit_oid": result.commit_oid,
            "created_commit": result.created_commit}


def _token(settings: HubSettings) -> str | None:
    if not settings.token_secret_block:
        return None  # huggingface_hub reads HF_TOKEN
    from prefect.blocks.system import Secret

    token = Secret.load(settings.token_secret_block).get()
    register_secret(token)  # no environment variable holds it: tell the scrubber
    return token
