"""verify-adapter: a fresh base model plus the saved files must reproduce the trained model's logits, and the
serving preflight (`adapterflow.serving`) says where the files will serve."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from adapterflow.runtime.base_models import load_base_model
from adapterflow.runtime.run_dir import read_probe
from adapterflow.serving import ServingReport, check_serving
from adapterflow.verify import VerificationError, VerificationReport, verify_adapter
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS
from adapterflow.tasks.run_plan import RunPlan


class ServingCheckError(VerificationError):
    """A runtime named in verify.require_runtimes fails the serving preflight (permanent: not retried)."""


@task(name="verify-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def verify_adapter_task(plan: RunPlan, saved: dict) -> dict:
    """Load the saved adapter onto the ORIGINAL base model with our loader and compare probe logits, then run the
    serving preflight against the base model's folder.

    Returns:
        The VerificationReport's dict with `serving` (the ServingReport's dict) added.

    Raises:
        VerificationError: a permanent failure (not retried); the report artifact says what differs.
        ServingCheckError: a runtime of `plan.require_runtimes` fails the preflight; the message names its rules.
    """
    probe, expected = read_probe(plan.run.probe)
    base = load_base_model(plan.base_model_path, dtype=plan.torch_dtype)
    try:
        report = verify_adapter(base, saved["adapter_dir"], probe, expected, plan.atol, plan.adapter_name)
    except VerificationError as exc:
        _report_artifact(exc.report)
        raise
    try:
        serving = check_serving(saved["adapter_dir"], base=plan.base_model_path)
    except (OSError, ValueError) as exc:  # a base folder the preflight cannot read (e.g. no weights it knows)
        if plan.require_runtimes:
            raise ServingCheckError(f"verify.require_runtimes={plan.require_runtimes}: the serving preflight could "
                                    f"not read the adapter or the base model: {exc}", report) from exc
        _report_artifact(report, problem=f"serving preflight skipped: {exc}")
        return {**report.to_dict(), "serving": {"error": str(exc)}}
    failing = [rt for rt in plan.require_runtimes if not serving.passed(rt)]
    _report_artifact(report, serving, failing)
    _warn_unservable(serving, saved["adapter_dir"], exclude=failing)
    if failing:
        details = "; ".join(f"{r.runtime} {r.rule}: {r.message}" for rt in failing for r in serving.rules(rt)
                            if r.verdict == "fail")
        raise ServingCheckError(f"verify.require_runtimes={plan.require_runtimes}: the adapter will not serve in "
                                f"{', '.join(failing)} ({details}). Fix the adapter as said, or drop the runtime "
                                f"from verify.require_runtimes.", report)
    return {**report.to_dict(), "serving": serving.to_dict()}


def _warn_unservable(serving: ServingReport, adapter_dir: str, exclude: list[str]) -> None:
    """One WARNING line per runtime the adapter fails (those in `exclude` fail the task with their own message)."""
    logger = get_run_logger()
    for runtime in serving.runtimes:
        if runtime not in exclude and not serving.passed(runtime):
            logger.warning("The adapter will not serve in %s: it fails %s. `adapterflow check %s` says why and how "
                           "to fix it; verify.require_runtimes=[%r] makes this fail the run.", runtime,
                           ", ".join(serving.failed_rules(runtime)), adapter_dir, runtime)


def _report_artifact(report: VerificationReport, serving: ServingReport | None = None, failing: list[str] = (),
                     problem: str | None = None) -> None:
    """The `verification-report` markdown artifact: the logits check, then the serving preflight as a table."""
    status = "PASSED" if report.passed and not failing else "FAILED"
    lines = [f"# Verification {status}", "", f"- adapter: `{report.adapter_dir}`",
             f"- tensors loaded: {report.tensors_loaded} (every key matched)",
             f"- max |logit difference| vs the trained model: {report.max_abs_diff:.3g} (atol {report.atol:g})",
             f"- modules with all-zero lora_B: {len(report.zero_lora_b)}"]
    lines += [f"- problem: {p}" for p in report.problems + ([problem] if problem else [])]
    lines += [f"- problem: required runtime {rt} fails {', '.join(serving.failed_rules(rt))}" for rt in failing]
    if serving is not None:
        verdicts = ", ".join(f"{rt} {'passes' if serving.passed(rt) else 'fails'}" for rt in serving.runtimes)
        lines += ["", f"## Will it serve? {verdicts}", "", "| runtime | rule | verdict | message |",
                  "|---|---|---|---|"]
        lines += [f"| {r.runtime} | {r.rule} | {r.verdict} | {r.message.replace('|', '/')} |"
                  for r in serving.results]
    create_markdown_artifact(key="verification-report", markdown="\n".join(lines), description=f"Verification {status}")
