"""The `save-adapter` flow: train -> extract -> convert -> save -> verify -> (merged export) -> MLflow -> Hub, each a
retryable Prefect task.

Run it with `adapterflow run` (or `python -m adapterflow.flows.save_adapter`), or as a deployment:
`prefect deployment run 'save-adapter/local'`.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run

from adapterflow.flows.parameters import SaveAdapterParameters
from adapterflow.tasks.convert_pissa_to_lora import convert_pissa_to_lora_task
from adapterflow.tasks.export_merged import export_merged
from adapterflow.tasks.extract_adapter import extract_adapter
from adapterflow.tasks.flow_report import flow_run_tags, report, saved_as, tag_flow_run
from adapterflow.tasks.log_to_mlflow import end_mlflow_run, log_to_mlflow, mlflow_run_hook
from adapterflow.tasks.prepare_run import prepare_run
from adapterflow.tasks.push_to_hub import push_to_hub
from adapterflow.tasks.save_adapter import save_adapter as save_adapter_files
from adapterflow.tasks.train_adapter import train_adapter
from adapterflow.tasks.verify_adapter import verify_adapter_task


@flow(name="save-adapter", log_prints=True, on_failure=[mlflow_run_hook("FAILED")],
      on_crashed=[mlflow_run_hook("KILLED")], on_cancellation=[mlflow_run_hook("KILLED")])
def save_adapter(config: SaveAdapterParameters = SaveAdapterParameters()) -> dict:
    """Fine-tune a LoRA / PiSSA adapter and publish exactly the adapter.

    Returns a summary: run and adapter folders, eval loss before/after, verification result, flow run id, the
    MLflow and Hub results. Also shown as the run's `run-summary` artifact and its last log lines. The MLflow run
    starts with the training and ends after the last step (FAILED / KILLED by the state hooks when the flow fails,
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
    tracked = _result(log_to_mlflow(plan, config.mlflow, saved, verification, flow_run.get_id()))
    pushed = _result(push_to_hub(plan, config.hub, config.mlflow, saved, tracked, flow_run.get_id(), exported))
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
        "hub": pushed,
    }
    report(summary, flow_run.get_name())
    end_mlflow_run(config, flow_run.get_id())
    return summary


def _result(value):
    """A step that skips returns a Completed state named "Skipped" (visible in the UI); its data is the result."""
    return value.result() if isinstance(value, State) else value


if __name__ == "__main__":
    from adapterflow.flows.cli import main

    main(["run", *__import__("sys").argv[1:]])
