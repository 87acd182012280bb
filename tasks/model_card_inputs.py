"""What the save step's model card says beyond the adapter configs: the Hub settings and the training summary.

The save step writes the card into the output folder (adapterflow.model_card renders it) and the push step
uploads that folder as it is, so the card a user finds next to the adapter is the one on the Hub.
"""

from __future__ import annotations

from adapterflow.model_card import ModelCardInfo, conversion_note
from adapterflow.runtime.run_dir import read_json

TRAINING_SUMMARY_KEYS = ("steps", "final_loss", "eval_loss_before", "eval_loss_after")


def card_info(plan) -> ModelCardInfo:
    """ModelCardInfo of a RunPlan: hub.license / datasets / tags / repo_id, the base model as the user named it
    (base_model.name_or_path, e.g. a Hub id or builtin:tiny-llama, not a cache folder) and the training summary
    (<run>/training.json; none before training finished), and for a converted PiSSA adapter the note that
    explains its doubled rank."""
    given = plan.parameters
    hub = given.get("hub") or {}
    summary = plan.run.training_summary
    training = read_json(summary) if summary.is_file() else {}
    trained_r = plan.lora_config.get("r")
    notes = (conversion_note(trained_r, 2 * trained_r),) if plan.convert_pissa_to_lora else ()
    return ModelCardInfo(
        base_model=(given.get("base_model") or {}).get("name_or_path"), license=hub.get("license"),
        datasets=tuple(hub.get("datasets") or ()), tags=tuple(hub.get("tags") or ()), repo_id=hub.get("repo_id"),
        training={k: training[k] for k in TRAINING_SUMMARY_KEYS if training.get(k) is not None} or None,
        notes=notes)
