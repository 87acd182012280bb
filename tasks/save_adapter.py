"""save-adapter: write the final adapter into the output folder (the core's atomic save), and list the files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from adapterflow import formats, write_adapters
from adapterflow.base_fingerprint import snapshot_commit
from adapterflow.runtime.base_models import meta_base_model
from adapterflow.runtime.run_dir import final_adapter
from adapterflow.tasks.model_card_inputs import card_info
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="save-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def save_adapter(plan: RunPlan, source: dict) -> dict:
    """Write the adapter that `source` (the convert step's result) describes: the final checkpoint's, converted
    against source["initial"] when that is set. The only write of the published adapter's tensors.

    Returns:
        {"output_dir", "adapter_dir", "files": [{"name", "bytes", "sha256"}], "converted"}.
    """
    state, config = final_adapter(source["path"], source.get("initial"))
    written = write_adapters(plan.output_dir, {plan.adapter_name: (state, config)}, plan.safe_serialization,
                             card=card_info(plan),  # the README.md is the Hub's card: the push uploads this folder
                             base_model=meta_base_model(plan.base_model_path),
                             base_hub_commit=snapshot_commit(plan.base_model_path))
    files = [{"name": str(path.relative_to(plan.output_dir)), **_digest(path)} for path in written]
    create_table_artifact(key="saved-files", table=files, description=f"Adapter files in {plan.output_dir}")
    return {"output_dir": plan.output_dir, "adapter_dir": str(formats.adapter_dir(plan.output_dir, plan.adapter_name)),
            "files": files, "converted": source.get("converted", False)}


def _digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a written file, from its folder's manifest (hashed while it was written); the small
    manifest itself is read back."""
    if path.name != formats.MANIFEST_NAME:
        entry = json.loads((path.parent / formats.MANIFEST_NAME).read_bytes())["files"].get(path.name)
        if entry is not None:
            return {"bytes": entry["size"], "sha256": entry["sha256"]}
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
