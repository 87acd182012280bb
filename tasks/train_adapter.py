"""train-adapter: train the adapter, resuming from the newest checkpoint when retried or rerun.

With training.num_processes == 1 and training.nnodes == 1 the training job runs in this process; otherwise the
task starts it under torchrun (`adapterflow.runtime.launch`) as a subprocess, streams its output into the task
log and reads <run>/training.json back. Either way a failure is one failed attempt of this task (retried when
transient), and a retry or a rerun resumes from the last checkpoint. While it trains, the task shows progress in
Prefect, the terminal and the live MLflow run (adapterflow.tasks.train_progress).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from adapterflow.runtime.launch import run_torchrun
from adapterflow.flows.parameters import MlflowSettings
from adapterflow.runtime.train_job import TrainingJob, run_training_job
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan
from adapterflow.tasks.train_progress import training_display


def training_job(plan: RunPlan) -> TrainingJob:
    """The runtime's job for this plan."""
    return TrainingJob(
        run_dir=plan.run_dir, adapter_name=plan.adapter_name, base_model_path=plan.base_model_path, dtype=plan.dtype,
        dataset=plan.dataset, eval_fraction=plan.eval_fraction, max_seq_len=plan.max_seq_len,
        lora_config=plan.lora_config, training=plan.training, save_embedding_layers=plan.save_embedding_layers,
        **plan.launch)


@task(name="train-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def train_adapter(plan: RunPlan, mlflow: MlflowSettings | None = None, flow_run_id: str | None = None) -> dict:
    """Returns the training summary (also in <run>/training.json): steps, eval loss before/after, tokens/s, ...,
    and `mlflow_live`: what the live MLflow run sent (None without `mlflow` or `flow_run_id`)."""
    logger = get_run_logger()
    job = training_job(plan)
    with training_display(plan, mlflow, flow_run_id, logger) as display:
        if job.world_size == 1:
            summary = run_training_job(job, logger.info, display.observer)
        else:
            logger.info("Starting %d training processes on this node: %s", job.num_processes, job.path)
            summary = run_torchrun(job, logger.info, display.observer)
    create_table_artifact(
        key="training-summary",
        table=[{"metric": k, "value": _fmt(summary[k])} for k in (
            "steps", "final_loss", "eval_loss_before", "eval_loss_after", "tokens_per_second", "trainable_parameters",
            "total_parameters", "resumed_from", "num_processes", "precision",
            "gradient_checkpointing")],
        description=f"Training of adapter '{plan.adapter_name}' in {plan.run_dir}",
    )
    return {**{k: v for k, v in summary.items() if k != "losses"}, "mlflow_live": display.mlflow}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
