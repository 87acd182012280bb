"""The `save-adapter` flow: train -> extract -> convert -> save -> verify -> (merged export) -> evaluate -> MLflow
-> promote -> Hub, each a retryable Prefect task.

Run it with `adapterflow run` (or `python -m adapterflow.flows.save_adapter`), or as a deployment:
`prefect deployment run 'save-adapter/local'`.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed

from adapterflow.flows.parameters import SaveAdapterParameters
from adapterflow.flows.parameters_promote import hub_push_allowed
from adapterflow.tasks.convert_pissa_to_lora import convert_pissa_to_lora_task
from adapterflow.tasks.export_merged import export_merged
from adapterflow.tasks.evaluate_adapter import evaluate_adapter
from adapterflow.tasks.extract_adapter import extract_adapter
from adapterflow.tasks.flow_report import flow_run_tags, report, saved_as, tag_flow_run
from adapterflow.tasks.log_to_mlflow import end_mlflow_run, log_to_mlflow, mlflow_run_hook
from adapterflow.tasks.prepare_run import prepare_run
from adapterflow.tasks.promote_adapter import promote
from adapterflow.tasks.push_to_hub import push_to_hub
from adapterflow.tasks.save_adapter import save_adapter as save_adapter_files
from adapterflow.tasks.train_adapter import train_adapter
from adapterflow.tasks.verify_adapter import verify_adapter_task


@flow(name="save-adapter", log_prints=True, on_failure=[mlflow_run_hook("FAILED")],
      on_crashed=[mlflow_run_hook("KILLED")], on_cancellation=[mlflow_run_hook("KILLED")])
def save_adapter(config: SaveAdapterParameters = SaveAdapterParameters()) -> dict:
    """Fine-tune a LoRA / PiSSA adapter and publish exactly the adapter.

    Returns a summary: run and adapter folders, eval loss before/after, verification result, flow run id, the
    MLflow, evaluation, promotion and Hub results; as the data of a Completed state named NotPromoted when the
    promotion gate kept the alias where it was. Also shown as the run's `run-summary` artifact and its last log
    lines. The MLflow run starts with the training and ends after the last step (FAILED / KILLED by the state hooks when the flow fails,
    crashes or is cancelled).
    """
    tag_flow_run(flow_run.get_id(), flow_run_tags(config))
    run_name = config.run_name or flow_run.get_id()
    plan = prepare_run(config, run_name)
    training = train_adapter(plan, config.mlflow, flow_run.get_id())
    extracted = extract_adapter(plan)
    source = _result(convert_pissa_to_lora_task(plan, extracted))
    saved = save_adapter_files(plan, source)
    verification = verify_adapter_task(plan, saved)
    exported = _result(export_merged(plan, config.export, config.hub, saved))  # after verify passed
    evaluation = evaluate_adapter(plan, config.evaluate, config.promote, config.mlflow, training, saved)
    tracked = _result(log_to_mlflow(plan, config.mlflow, saved, verification, flow_run.get_id()))
    promotion = promote(config, plan, evaluation, tracked, flow_run.get_id())
    pushed = _result(push_to_hub(plan, config.hub, config.mlflow, saved, tracked, flow_run.get_id(), exported,
                                 skip_reason=hub_push_allowed(config, promotion)))
    summary = {
        "flow_run_id": flow_run.get_id(),
        "run_dir": plan.run_dir,
        "adapter_dir": saved["adapter_dir"],
        "converted": saved["converted"],
        "saved_as": saved_as(plan, saved),
        "eval_loss_before": training["eval_loss_before"],
        "eval_loss_after": training["eval_loss_after"],
        "verification": verification,
        "merged": exported,
        "mlflow": tracked,
        "evaluation": evaluation,
        "promotion": promotion,
        "hub": pushed,
    }
    report(summary, flow_run.get_name())
    end_mlflow_run(config, flow_run.get_id())
    if promotion and not promotion["promoted"]:  # Completed, named so in the UI; the summary is its result
        return Completed(name="NotPromoted", message=f"Not promoted: {promotion['reason']}", data=summary)
    return summary


def _result(value):
    """A step that skips returns a Completed state named "Skipped" (visible in the UI); its data is the result."""
    return value.result() if isinstance(value, State) else value


if __name__ == "__main__":
    from adapterflow.flows.cli import main

    main(["run", *__import__("sys").argv[1:]])
