"""promote-adapter: the promotion gate on an MLflow alias, after log-to-mlflow registered the new version and
before the Hub push; and `promote`, the flow's step around it, which pauses for a person's approval when
promote.require_approval asks for it.

The task logs the evaluation as MLflow metrics (eval.loss, eval.perplexity, eval.base_loss, eval.champion_loss,
their perplexities and exact matches) on the run and its LoggedModel, decides with adapterflow.runtime.gate and
applies the decision with adapterflow.integrations.mlflow_promotion (alias move, `previous`, tags; idempotent per
flow run, compare-and-set against the holder right before the move). Skipped (a Completed state named
"Skipped") without MLflow; with promote.enabled=false it only logs the metrics.

Approval: the flow (not a task: a paused task would hold its task run open) shows the comparison in the
`promotion-approval` artifact and pauses with Prefect's `pause_flow_run(wait_for_input=ApprovalInput)`; the
flow run's Resume form in the UI (or `PrefectClient.resume_flow_run(id, run_input={"approve": ..., "comment":
...})`) answers. The run blocks its process meanwhile (reschedule=False: the flow keeps its trained model and
MLflow run, nothing is re-run). No answer within promote.approval_timeout_minutes: not promoted.
"""

from __future__ import annotations

import math
from typing import Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from prefect.client.schemas.objects import State
from prefect.states import Completed
from pydantic import Field

from adapterflow.flows.parameters import MlflowSettings, SaveAdapterParameters, local_path
from adapterflow.flows.parameters_promote import EvaluateSettings, PromoteSettings
from adapterflow.redaction import redact_text
from adapterflow.runtime.gate import SCORE_FIELD, decide
from adapterflow.tasks.evaluate_adapter import champion_scores, plan_examples
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan

METRIC_NAMES = {"new": "eval.{}", "base": "eval.base_{}", "champion": "eval.champion_{}"}


class ApprovalInput(RunInput):
    """The Resume form of a flow run waiting for approval."""

    approve: bool = Field(description="promote the new version (move the alias to it)")
    comment: str = Field("", description="why; recorded in MLflow with the decision")


def evaluation_metrics(evaluation: dict) -> dict[str, float]:
    """eval.loss, eval.perplexity, eval.exact_match (the new adapter), eval.base_*, eval.champion_*."""
    metrics = {}
    for key, pattern in METRIC_NAMES.items():
        found = evaluation.get(key) or {}
        for field in ("loss", "perplexity", "exact_match"):
            if found.get(field) is not None and math.isfinite(found[field]):
                metrics[pattern.format(field)] = found[field]
    return metrics


def gate_decision(promote: PromoteSettings, evaluation: dict) -> dict:
    """adapterflow.runtime.gate.decide on the evaluation's numbers for promote.metric."""
    field = SCORE_FIELD[promote.metric]
    value = (lambda key: (evaluation.get(key) or {}).get(field))
    return decide(promote.metric, value("new"), value("base"), value("champion"),
                  min_improvement=promote.min_improvement, require_better_than_base=promote.require_better_than_base,
                  champion_version=evaluation.get("champion_version"),
                  champion_problem=evaluation.get("champion_problem")).to_dict()


@task(name="promote-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def promote_adapter(plan: RunPlan, settings: EvaluateSettings, promote: PromoteSettings, mlflow: MlflowSettings,
                    evaluation: dict, tracked: Optional[dict], flow_run_id: str, approval: Optional[dict] = None,
                    propose_only: bool = False):
    """Returns {"promoted", "reason", "version", "alias", "previous", "decision", ...}
    (mlflow_promotion.record_promotion); with `propose_only` only {"decision"} (nothing moved or tagged).
    A "Skipped" state without MLflow or with promote.enabled=false."""
    from adapterflow.integrations.mlflow_logging import resolve_tracking_uri
    from adapterflow.integrations.mlflow_promotion import log_evaluation, record_promotion

    if not tracked:
        return Completed(name="Skipped", message="Skipped: no MLflow version to promote (mlflow.enabled=false)",
                         data={})
    uri = resolve_tracking_uri(mlflow, local_path(plan.parameters["runs_root"]))
    if not propose_only:
        log_evaluation(mlflow, uri, tracked["run_id"], tracked.get("model_id"), evaluation_metrics(evaluation))
    if not promote.enabled:
        return Completed(name="Skipped", message="Skipped: promote.enabled=false", data={})
    if evaluation.get("champion_unreachable"):  # MLflow was down during evaluate-adapter: look the holder up now
        evaluation = {**evaluation, "champion_unreachable": False,
                      **champion_scores(plan, settings, promote, mlflow, plan_examples(plan, settings))}
    decision = gate_decision(promote, evaluation)
    if propose_only:
        return {"decision": decision}

    def reevaluate(holder: Optional[dict]) -> dict:
        """Another run moved the alias since evaluate-adapter: the gate again, against the new holder."""
        get_run_logger().info("The alias %s moved to version %s since the evaluation: comparing again",
                              promote.alias, holder and holder["version"])
        again = {**evaluation, "champion": None, "champion_version": None, "champion_problem": None}
        if holder is not None:
            again.update(champion_scores(plan, settings, promote, mlflow, plan_examples(plan, settings), holder))
        return gate_decision(promote, again)

    result = record_promotion(mlflow, uri, name=tracked["registered_model_name"], version=tracked["model_version"],
                              alias=promote.alias, run_id=tracked["run_id"], flow_run_id=flow_run_id,
                              decision=decision, evaluated_holder=evaluation.get("champion_version"),
                              reevaluate=reevaluate, approval=approval)
    create_markdown_artifact(key="promotion", markdown=promotion_markdown(tracked, result),
                             description=f"Promotion: {'promoted' if result['promoted'] else 'not promoted'}")
    get_run_logger().info("%s: %s", "Promoted" if result["promoted"] else "Not promoted", result["reason"])
    return result


def promotion_markdown(tracked: dict, result: dict) -> str:
    """The outcome in words: version, alias, reason, where to look in MLflow."""
    verdict = "promoted" if result["promoted"] else "not promoted"
    lines = [f"# {tracked['registered_model_name']} version {result['version']}: {verdict}", "",
             f"- alias `{result.get('alias')}`" + (f" moved here; version {result['previous']} is now `previous`"
                                                   if result.get("previous") else "")
             if result["promoted"] else f"- alias `{result.get('alias')}` stays where it was",
             f"- reason: {result['reason']}",
             "- MLflow: tags `promotion`, `promotion.reason`, `promotion.*` on the run and the model version"]
    return "\n".join(lines)


def ask_for_approval(promote: PromoteSettings, proposal: dict, evaluation: dict) -> dict:
    """Pause the flow run until a person answers (or the timeout): {"decision": approved / rejected / timeout,
    "comment", "timeout_minutes"}. Call from the flow."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    from adapterflow.tasks.evaluate_adapter import evaluation_rows

    rows = evaluation_rows(evaluation)
    table = ["| model | eval_loss | perplexity | exact_match |", "|---|---|---|---|",
             *(f"| {r['model']} | {r['eval_loss']} | {r['perplexity']} | {r['exact_match']} |" for r in rows)]
    create_markdown_artifact(key="promotion-approval", markdown="\n".join([
        f"# Approve moving `{promote.alias}`?", "", f"The gate passed: {proposal['reason']}.", "", *table, "",
        f"Resume this flow run with approve true (promote) or false (keep the alias), and a comment. No answer in "
        f"{promote.approval_timeout_minutes:g} minutes: not promoted."]), description="Waiting for approval")
    from prefect.runtime import flow_run

    from adapterflow.tasks.prefect_links import flow_run_url

    run_id = flow_run.get_id()
    get_run_logger().info(approval_instructions(run_id, flow_run_url(run_id), promote))
    timeout = max(1, math.ceil(promote.approval_timeout_minutes * 60))
    answer_of = {"timeout_minutes": promote.approval_timeout_minutes}
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout,
                                poll_interval=min(10, max(1, timeout // 10)))
    except FlowPauseTimeout:
        _running_again()
        return {**answer_of, "decision": "timeout", "comment": ""}
    return {**answer_of, "decision": "approved" if answer.approve else "rejected",
            "comment": redact_text(answer.comment or "")}


def approval_instructions(flow_run_id: str, url: Optional[str], promote: PromoteSettings) -> str:
    """The log line of a flow run that waits for approval: how to answer, by the UI's Resume button or by
    `prefect.flow_runs.resume_flow_run` (Prefect 3.9's `prefect flow-run` CLI has no resume command)."""
    where = f"open {url} and press Resume" if url else "in the Prefect UI, open this flow run and press Resume"
    command = (f"python -c \"from prefect.flow_runs import resume_flow_run; resume_flow_run('{flow_run_id}', "
               f"run_input={{'approve': True, 'comment': 'why'}})\"")
    return (f"Waiting up to {promote.approval_timeout_minutes:g} minutes for approval to move alias "
            f"{promote.alias!r} (flow run {flow_run_id}): {where} (approve true or false, a comment), or run "
            f"{command} with PREFECT_API_URL set to this server (approve False rejects). No answer in time: not "
            f"promoted.")


def _running_again() -> None:
    """After a pause timed out the server still shows the run Paused: set it Running so the flow can go on (to
    record the outcome and finish NotPromoted)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.get_id()).state
        if state is not None and state.is_paused():
            client.set_flow_run_state(flow_run.get_id(), Running(), force=True)


def promote(config: SaveAdapterParameters, plan: RunPlan, evaluation: dict, tracked: Optional[dict],
            flow_run_id: str) -> dict:
    """The flow's promotion step: the gate, with approval first when promote.require_approval and the gate
    passes. Returns the task's result ({} when skipped)."""
    args = (plan, config.evaluate, config.promote, config.mlflow, evaluation, tracked, flow_run_id)
    approval = None
    if config.promote.require_approval and tracked and config.promote.enabled:
        proposal = _result(promote_adapter(*args, propose_only=True))
        if proposal and proposal["decision"]["promote"]:
            approval = ask_for_approval(config.promote, proposal["decision"], evaluation)
    return _result(promote_adapter(*args, approval=approval))


def _result(value):
    return value.result() if isinstance(value, State) else value
