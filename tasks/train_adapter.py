"""train-adapter: train the adapter, resuming from the newest checkpoint when retried or rerun."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from adapterflow.runtime.base_models import load_tokenizer
from adapterflow.runtime.checkpoints import Checkpoints
from adapterflow.runtime.data import collate, load_examples, split_examples, tokenize
from adapterflow.runtime.run_dir import build_adapter_model, write_json, write_probe
from adapterflow.runtime.training import evaluate, train
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan

PROBE_SIZE = 4  # eval examples whose logits verification compares


@task(name="train-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def train_adapter(plan: RunPlan) -> dict:
    """Returns the training summary (also in <run>/training.json): steps, losses, eval loss before/after, tokens/s."""
    logger = get_run_logger()
    run, settings = plan.run, plan.training_settings()
    tokenizer = load_tokenizer(plan.base_model_path)
    spec = plan.data_spec()
    train_examples, eval_examples = split_examples(load_examples(spec), plan.eval_fraction, settings.seed)
    train_data = tokenize(train_examples, tokenizer, plan.max_seq_len, spec.chat_template)
    eval_data = tokenize(eval_examples, tokenizer, plan.max_seq_len, spec.chat_template)
    model = build_adapter_model(plan.base_model_path, plan.torch_dtype, plan.config(), plan.adapter_name, run,
                                settings.seed)
    model.to(settings.device)
    eval_before = evaluate(model, eval_data, settings.batch_size, tokenizer.pad_token_id, settings.device)

    def log_step(step: int, loss: float, lr: float) -> None:
        logger.info("step %d/%d loss %.4f lr %.2e", step, settings.steps, loss, lr)

    # Checkpoints hold the adapter as the pipeline publishes it (embedding layers per save.save_embedding_layers),
    # so the last one is the trained adapter: the later steps read it instead of rebuilding the model.
    checkpoints = Checkpoints(run.checkpoints, plan.adapter_name, plan.save_embedding_layers, settings.keep_checkpoints)
    result = train(model, train_data, settings, tokenizer.pad_token_id, checkpoints, on_step=log_step)
    if result.resumed_from is not None:
        logger.info("Resumed from the checkpoint at step %d", result.resumed_from)
    eval_after = evaluate(model, eval_data, settings.batch_size, tokenizer.pad_token_id, settings.device)
    probe = collate(eval_data[:PROBE_SIZE], tokenizer.pad_token_id)
    with torch.no_grad():
        probe_logits = model(input_ids=probe["input_ids"].to(settings.device),
                             attention_mask=probe["attention_mask"].to(settings.device)).logits
    write_probe(run.probe, probe, probe_logits.cpu())
    trainable, total = model.get_nb_trainable_parameters()
    summary = {
        "steps": result.steps, "final_loss": result.losses[-1], "losses": result.losses,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after, "tokens": result.tokens,
        "train_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "trainable_parameters": trainable, "total_parameters": total, "resumed_from": result.resumed_from,
        "checkpoint": str(run.final_checkpoint(settings.steps)),
        "initial_adapter": str(run.initial) if run.initial.exists() else None,
    }
    write_json(run.training_summary, summary)
    create_table_artifact(
        key="training-summary",
        table=[{"metric": k, "value": _fmt(summary[k])} for k in (
            "steps", "final_loss", "eval_loss_before", "eval_loss_after", "tokens_per_second", "trainable_parameters",
            "total_parameters", "resumed_from")],
        description=f"Training of adapter '{plan.adapter_name}' in {run.root}",
    )
    return {k: v for k, v in summary.items() if k != "losses"}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
