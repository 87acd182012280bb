"""convert-pissa-to-lora: check that the trained PiSSA adapter converts to a LoRA adapter for the original base model.

Runs only for PiSSA adapters when conversion is asked; otherwise the task run ends in a Completed state named
"Skipped", visible as such in the Prefect UI. It computes the conversion (concatenations of the final checkpoint's
and <run>/initial's factors) and writes nothing: both inputs stay in the run directory, so the save step, retried
in a fresh process or not, computes the same result from them and writes the output folder once.
"""

from __future__ import annotations

from prefect import task
from prefect.states import Completed

from adapterflow.init_methods import is_pissa
from adapterflow.runtime.run_dir import final_adapter
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="convert-pissa-to-lora", **RETRY_OPTIONS, **RESULT_OPTIONS)
def convert_pissa_to_lora_task(plan: RunPlan, extracted: dict):
    """Returns what the save step writes: {"path": the trained adapter's folder, "initial": the initial adapter's
    folder or None, "converted": bool}, plus the converted rank and tensor bytes when converting.

    Raises:
        adapterflow.ConversionError: the adapter cannot be converted (the message lists why).
    """
    if not plan.convert_pissa_to_lora:
        pissa = is_pissa(plan.config().init_lora_weights)
        reason = "conversion not asked (save.convert_pissa_to_lora)" if pissa else "not a PiSSA adapter"
        return Completed(name="Skipped", message=f"Skipped: {reason}",
                         data={"path": extracted["path"], "initial": None, "converted": False})
    state, config = final_adapter(extracted["path"], plan.run.initial)
    return {"path": extracted["path"], "initial": str(plan.run.initial), "converted": True, "r": config.r,
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}
