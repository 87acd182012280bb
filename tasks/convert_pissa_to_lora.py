"""convert-pissa-to-lora: turn the trained PiSSA adapter into a LoRA adapter for the original base model.

Runs only for PiSSA adapters when conversion is asked; otherwise the task run ends in a Completed state named
"Skipped", visible as such in the Prefect UI, and passes the extracted adapter through.
"""

from __future__ import annotations

from prefect import task
from prefect.states import Completed

from adapterflow import convert_pissa_to_lora, read_adapter, write_adapters
from adapterflow.init_methods import is_pissa
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="convert-pissa-to-lora", **RETRY_OPTIONS, **RESULT_OPTIONS)
def convert_pissa_to_lora_task(plan: RunPlan, extracted: dict):
    """Returns {"path": folder of the adapter to save, "converted": bool}."""
    if not plan.convert_pissa_to_lora:
        pissa = is_pissa(plan.config().init_lora_weights)
        reason = "conversion not asked (save.convert_pissa_to_lora)" if pissa else "not a PiSSA adapter"
        return Completed(name="Skipped", message=f"Skipped: {reason}", data={"path": extracted["path"], "converted": False})
    run = plan.run
    (state, config), initial = read_adapter(extracted["path"]), read_adapter(run.initial)
    converted_state, converted_config = convert_pissa_to_lora(state, config, *initial)
    write_adapters(run.converted, {plan.adapter_name: (converted_state, converted_config)})
    return {"path": str(run.converted), "converted": True}
