"""extract-adapter: the trained adapter's state dict in PEFT's layout, checked, written to <run>/extracted."""

from __future__ import annotations

from prefect import task

from adapterflow import get_adapter_state_dict, write_adapters
from adapterflow.runtime.run_dir import load_trained_model
from adapterflow.verify import check_extracted_state
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="extract-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def extract_adapter(plan: RunPlan) -> dict:
    """Rebuild the trained model from the run directory and extract its adapter (the core's extraction).

    Raises:
        adapterflow.verify.VerificationError: empty tensors (as ZeRO-3 saves leave them), NaN/Inf, or a targeted
            module without tensors.
    """
    run = plan.run
    model = load_trained_model(plan.base_model_path, plan.torch_dtype, plan.config(), plan.adapter_name, run,
                               plan.training_settings().seed)
    config = model.peft_config[plan.adapter_name]
    state = get_adapter_state_dict(model, config, plan.adapter_name, plan.save_embedding_layers)
    check_extracted_state(model, plan.adapter_name, state)
    write_adapters(run.extracted, {plan.adapter_name: (state, config)})
    return {"path": str(run.extracted), "tensors": len(state),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}
