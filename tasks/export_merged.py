"""export-merged: write the base model with the saved adapter merged in to {run dir}/merged (export.merged).

Runs after verify-adapter and before MLflow and the Hub; without export.merged the task run ends in a Completed
state named "Skipped". The merge reads the saved adapter folder (what verification checked) onto the original
base model (a PiSSA adapter saved without conversion: onto the residual its loader derives, as verification
does), and the folder is written only once transformers loads it back with the logits of base + adapter
(adapterflow.runtime.merged_export). Its README.md is the merged model's card, so hub.push_merged uploads the
folder as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.states import Completed

from adapterflow.flows.parameters import HubSettings
from adapterflow.flows.parameters_export import ExportSettings
from adapterflow.model_card import read_configs, render_merged_model_card
from adapterflow.runtime.merged_export import FP32_ATOL, export_merged_model
from adapterflow.runtime.run_dir import read_probe
from adapterflow.tasks.model_card_inputs import card_info
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import DTYPES, RunPlan

HALF_PRECISION_ATOL = 5e-2  # verify's default tolerance for a 16-bit base (tasks/prepare_run.py)


@task(name="export-merged", **RETRY_OPTIONS, **RESULT_OPTIONS)
def export_merged(plan: RunPlan, settings: ExportSettings, hub: HubSettings, saved: dict):
    """Returns {"path", "bytes", "shards", "dtype", "max_abs_diff", "atol"}; {} (a "Skipped" state) without
    export.merged.

    Raises:
        adapterflow.runtime.merged_export.MergedExportError: the merged model's logits differ from base + adapter's
            (permanent: not retried; nothing written).
    """
    if not settings.merged:
        return Completed(name="Skipped", message="Skipped: export.merged is false", data={})
    dtype = settings.dtype or plan.dtype
    info = replace(card_info(plan), repo_id=hub.merged_repo_id if hub.push_merged else None)
    probe, _ = read_probe(plan.run.probe)
    result = export_merged_model(
        plan.base_model_path, saved["adapter_dir"], plan.run.merged, probe, base_dtype=plan.torch_dtype,
        dtype=DTYPES[dtype], atol=merged_atol(plan, dtype), max_shard_size=settings.max_shard_size,
        adapter_name=plan.adapter_name, card=render_merged_model_card(read_configs(Path(saved["output_dir"])), info))
    files = sorted(Path(result["path"]).iterdir())
    create_table_artifact(key="merged-model", table=[{"name": p.name, "bytes": p.stat().st_size} for p in files],
                          description=f"Merged model in {result['path']} ({result['dtype']}, {result['shards']} "
                                      f"shards; logits within {result['max_abs_diff']:.2e} of base + adapter)")
    return result


def merged_atol(plan: RunPlan, dtype: str) -> float:
    """fp32 base and export: FP32_ATOL; a 16-bit base or export rounds every weight: the verify tolerance for
    16-bit bases (verify.atol when given, else HALF_PRECISION_ATOL)."""
    if plan.dtype == "float32" and dtype == "float32":
        return FP32_ATOL
    return (plan.parameters.get("verify") or {}).get("atol") or HALF_PRECISION_ATOL
