"""extract-adapter: the trained adapter is the final training checkpoint; read it and check it, writing nothing."""

from __future__ import annotations

from prefect import task

from adapterflow import read_adapter
from adapterflow.runtime.run_dir import adapter_modules
from adapterflow.verify import check_adapter_state
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="extract-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def extract_adapter(plan: RunPlan) -> dict:
    """Read the final checkpoint's adapter (a PEFT adapter folder) and check its tensors against the modules the
    config adapts in the base model's architecture; no base model weights are loaded.

    Returns:
        {"path": the final checkpoint folder, "tensors": count, "bytes": total tensor bytes}.

    Raises:
        adapterflow.verify.VerificationError: empty tensors (as ZeRO-3 saves leave them), NaN/Inf, a LoRA factor
            without its partner, or a targeted module without tensors.
        adapterflow.runtime.checkpoints.CheckpointError: the newest checkpoint is not from the last step.
    """
    checkpoint = plan.run.final_checkpoint(plan.training_settings().steps)
    state, config = read_adapter(checkpoint)
    check_adapter_state(state, adapter_modules(plan.base_model_path, config))
    return {"path": str(checkpoint), "tensors": len(state),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}
