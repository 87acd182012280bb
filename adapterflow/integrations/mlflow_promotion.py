"""The promotion gate in MLflow's model registry: who holds the alias, that version's adapter files, the
evaluation metrics, the alias move and the decision's tags. Plain Python (no Prefect); the promote-adapter task
calls it.

Alias move (MLflow registry aliases: `set_registered_model_alias` reassigns an alias in one call): the former
holder first gets the alias `previous`, then the promotion alias moves to the new version; a rollback is one
alias move back (README). Both the model version and the MLflow run get the tags `promotion` (promoted /
rejected), `promotion.reason`, the numbers, and, with approval, `promotion.approval` and its comment.

Idempotent per flow run: `promotion.flow_run_id` on the version is written last; a retry that finds it returns
the recorded outcome, and a retry that finds the alias already on its version records the promotion without
moving anything. Concurrency: MLflow has no compare-and-set on aliases, so `record_promotion` re-reads the holder
right before the move and, if another run moved it since this run evaluated, compares again against the new
holder (`reevaluate`), so a later run is always compared against the newly promoted version; the window left is
the one request between that read and the move, and the move is read back and reported if it was overtaken.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

from adapterflow.integrations.mlflow_client import tracking_client

PROMOTION_TAG = "promotion"
PROMOTION_FLOW_RUN_TAG = "promotion.flow_run_id"
PREVIOUS_ALIAS = "previous"
MAX_REEVALUATIONS = 3


def alias_holder(client, name: str, alias: str):
    """The ModelVersion holding `alias` of registered model `name`, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(exc) and "not found" in str(exc)):
            return None
        raise


def champion(settings, uri: str, name: str, alias: str) -> Optional[dict]:
    """The alias holder as plain data: {"version", "run_id", "model_id", "artifact_location", "base_model" (the
    base folder that run used), "base_model.name_or_path" (as its user named it), "base_model.dtype",
    "adapter.name"} from its LoggedModel's params (mlflow_run.run_params); None without a holder.

    Raises: MlflowUnavailableError, MlflowRefusedError (mlflow_client.tracking_client)."""
    with tracking_client(settings, uri) as client:
        holder = alias_holder(client, name, alias)
        if holder is None:
            return None
        model_id = getattr(holder, "model_id", None) or _logged_model_id(holder.source)
        model = client.get_logged_model(model_id) if model_id else None
    params = dict(model.params) if model is not None else {}
    return {"version": str(holder.version), "run_id": holder.run_id, "model_id": model_id,
            "artifact_location": model.artifact_location if model is not None else None,
            **{key: params.get(key) for key in ("base_model", "base_model.name_or_path", "base_model.dtype",
                                                 "adapter.name")}}


def _logged_model_id(source: Optional[str]) -> Optional[str]:
    """The LoggedModel id of a version whose source is `models:/m-<id>` (a sqlite store leaves the version's
    model_id empty; mlflow_registry.model_version creates versions with that source)."""
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


def download_champion_adapter(settings, uri: str, holder: dict, target: str | Path) -> Path:
    """Download only the holder's adapter files (its pyfunc model's `artifacts/adapter` folder: README.md,
    adapter_config.json, the weights) into `target`; returns the adapter folder.

    Raises:
        FileNotFoundError: the holder has no LoggedModel (a version registered another way).
        MlflowUnavailableError, MlflowRefusedError: as tracking_client.
    """
    import mlflow.artifacts

    if not holder.get("artifact_location"):
        raise FileNotFoundError(f"version {holder['version']} has no logged model to read the adapter from")
    with tracking_client(settings, uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{holder['artifact_location'].rstrip('/')}/artifacts/adapter",
            dst_path=str(Path(target)), tracking_uri=uri)
    return Path(local)


def log_evaluation(settings, uri: str, run_id: str, model_id: Optional[str], metrics: dict[str, float]) -> None:
    """Log `metrics` (eval.loss, ...) at step 0 on the run and its LoggedModel; keys the run has already are
    skipped (a retry logs nothing twice)."""
    import time

    from mlflow.entities import Metric

    with tracking_client(settings, uri) as client:
        have = client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0, model_id=model_id)
                 for key, value in metrics.items() if value is not None and key not in have]
        if batch:
            client.log_batch(run_id, metrics=batch)


def recorded(settings, uri: str, name: str, version: str, flow_run_id: str) -> Optional[dict]:
    """The outcome this flow run already recorded on the version (a retried task), else None."""
    with tracking_client(settings, uri) as client:
        tags = client.get_model_version(name, version).tags
    if tags.get(PROMOTION_FLOW_RUN_TAG) != flow_run_id or PROMOTION_TAG not in tags:
        return None
    return {"promoted": tags[PROMOTION_TAG] == "promoted", "reason": tags.get("promotion.reason"),
            "version": version, "alias": tags.get("promotion.alias"), "recorded_before": True}


def record_promotion(settings, uri: str, *, name: str, version: str, alias: str, run_id: str, flow_run_id: str,
                     decision: dict, evaluated_holder: Optional[str],
                     reevaluate: Callable[[dict], dict], approval: Optional[dict] = None) -> dict:
    """Apply the gate's decision: move the alias (and `previous`) when it says promote, then tag the version and
    the run with the outcome. Idempotent and compare-and-set as in the module docstring.

    Args:
        decision: adapterflow.runtime.gate.GateDecision.to_dict() against `evaluated_holder` (its version, None:
            there was no holder).
        reevaluate: holder dict (see `champion`) -> a new decision against that holder; called when another
            run moved the alias since the evaluation.
        approval: {"decision": approved / rejected / timeout, "comment"} when a person was asked.

    Returns:
        {"promoted", "reason", "version", "alias", "previous" (the former holder's version or None),
         "decision" (the gate's last one), "reevaluated" (holders compared again), "overtaken" (the alias was
         moved by another run right after this move)}.
    """
    if (done := recorded(settings, uri, name, version, flow_run_id)) is not None:
        return done
    reevaluated: list[str] = []
    with tracking_client(settings, uri) as client:
        holder = alias_holder(client, name, alias)
    if holder is not None and str(holder.version) == version:  # a retry after the move: nothing to move
        final, previous = True, _previous_of(settings, uri, name)
    else:
        for _ in range(MAX_REEVALUATIONS):  # compare-and-set: the holder right before the move
            if not decision["promote"]:
                break
            info = champion(settings, uri, name, alias)
            current = None if info is None else info["version"]
            if current == evaluated_holder:
                break
            decision, evaluated_holder = reevaluate(info), current
            reevaluated.append(current)
        final = decision["promote"] and (approval is None or approval.get("decision") == "approved")
        previous = evaluated_holder if final else None
        if final:
            with tracking_client(settings, uri) as client:
                if previous is not None:
                    client.set_registered_model_alias(name, PREVIOUS_ALIAS, previous)
                client.set_registered_model_alias(name, alias, version)
    with tracking_client(settings, uri) as client:
        now = alias_holder(client, name, alias)
    overtaken = final and (now is None or str(now.version) != version)
    reason = _reason(decision, approval)
    _tag(settings, uri, name, version, run_id, flow_run_id, alias, final, decision, reason, approval)
    return {"promoted": final, "reason": reason, "version": version, "alias": alias, "previous": previous,
            "decision": decision, "reevaluated": reevaluated, "overtaken": overtaken}


def _previous_of(settings, uri: str, name: str) -> Optional[str]:
    with tracking_client(settings, uri) as client:
        holder = alias_holder(client, name, PREVIOUS_ALIAS)
    return None if holder is None else str(holder.version)


def _reason(decision: dict, approval: Optional[dict]) -> str:
    """The gate's reason, with the reviewer's answer when one was asked (only a passed gate asks)."""
    if approval is None or not decision["promote"]:
        return decision["reason"]
    comment = f": {approval['comment']}" if approval.get("comment") else ""
    if approval["decision"] == "approved":
        return f"{decision['reason']}; approved by a reviewer{comment}"
    if approval["decision"] == "rejected":
        return f"the gate passed ({decision['reason']}) but a reviewer rejected it{comment}"
    return (f"the gate passed ({decision['reason']}) but no approval came within "
            f"{approval.get('timeout_minutes')} minutes")


def _tag(settings, uri: str, name: str, version: str, run_id: str, flow_run_id: str, alias: str, promoted: bool,
         decision: dict, reason: str, approval: Optional[dict]) -> None:
    def number(value) -> str:
        return "" if value is None else f"{value:.6g}"

    tags = {PROMOTION_TAG: "promoted" if promoted else "rejected", "promotion.reason": reason[:5000],
            "promotion.alias": alias, "promotion.metric": decision["metric"], "promotion.new": number(decision["new"]),
            "promotion.base": number(decision["base"]), "promotion.champion": number(decision["champion"]),
            "promotion.champion_version": decision.get("champion_version") or ""}
    if approval is not None:
        tags["promotion.approval"] = approval["decision"]
        tags["promotion.approval_comment"] = (approval.get("comment") or "")[:5000]
    with tracking_client(settings, uri) as client:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
            client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, PROMOTION_FLOW_RUN_TAG, flow_run_id)
        client.set_model_version_tag(name, version, PROMOTION_FLOW_RUN_TAG, flow_run_id)  # last: the retry check


def temporary_folder() -> tempfile.TemporaryDirectory:
    """Where a holder's adapter is downloaded for evaluation (removed after)."""
    return tempfile.TemporaryDirectory(prefix="adapterflow-champion-")
