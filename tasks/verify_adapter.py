"""verify-adapter: a fresh base model plus the saved files must reproduce the trained model's logits."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from adapterflow.runtime.base_models import load_base_model
from adapterflow.runtime.run_dir import read_probe
from adapterflow.verify import VerificationError, VerificationReport, verify_adapter
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


@task(name="verify-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def verify_adapter_task(plan: RunPlan, saved: dict) -> dict:
    """Load the saved adapter onto the ORIGINAL base model with our loader and compare probe logits.

    Raises:
        VerificationError: a permanent failure (not retried); the report artifact says what differs.
    """
    probe, expected = read_probe(plan.run.probe)
    base = load_base_model(plan.base_model_path, dtype=plan.torch_dtype)
    try:
        report = verify_adapter(base, saved["adapter_dir"], probe, expected, plan.atol, plan.adapter_name)
    except VerificationError as exc:
        _report_artifact(exc.report)
        raise
    _report_artifact(report)
    return report.to_dict()


def _report_artifact(report: VerificationReport) -> None:
    status = "PASSED" if report.passed else "FAILED"
    lines = [f"# Verification {status}", "", f"- adapter: `{report.adapter_dir}`",
             f"- tensors loaded: {report.tensors_loaded} (every key matched)",
             f"- max |logit difference| vs the trained model: {report.max_abs_diff:.3g} (atol {report.atol:g})",
             f"- modules with all-zero lora_B: {len(report.zero_lora_b)}"]
    lines += [f"- problem: {p}" for p in report.problems]
    create_markdown_artifact(key="verification-report", markdown="\n".join(lines), description=f"Verification {status}")
