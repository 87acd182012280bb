"""What a save-adapter flow run shows in Prefect beyond its task runs: tags (base model, init, rank) set when the
run starts, and at the end a `run-summary` markdown artifact plus log lines that carry the adapter folder and the
links (`prefect deployment run ... --watch` prints the flow's logs, so its users see them too).

Runs in the flow itself, not as tasks: nothing here is retried or worth a task run of its own.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client

from adapterflow.model_card import base_model_label, conversion_note

SUMMARY_KEY = "run-summary"


def flow_run_tags(config) -> list[str]:
    """`base_model:<as the user named it>` (a local folder by its name), `init:<adapter.init>`, `r:<rank>`."""
    return [f"base_model:{base_model_label(config.base_model.name_or_path)}", f"init:{config.adapter.init}",
            f"r:{config.adapter.r}"]


def saved_as(plan, saved: dict) -> str:
    """The saved adapter's shape in words, e.g. "trained as PiSSA r=8; saved as LoRA r=16 (...)" or "lora r=8"."""
    r = plan.lora_config.get("r")
    return conversion_note(r, 2 * r) if saved.get("converted") else f"{plan.parameters['adapter']['init']} r={r}"


def tag_flow_run(flow_run_id: str, tags: list[str]) -> None:
    """Add `tags` to the flow run (keeping the deployment's); the UI lists and filters runs by them."""
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id).tags or []
        client.update_flow_run(flow_run_id, tags=list(dict.fromkeys([*current, *tags])))


def summary_markdown(summary: dict, flow_run_name: str | None = None) -> str:
    """The run-summary artifact: adapter folder, rank, eval loss, verification, MLflow run and model version,
    Hub commit (links where there is a web UI)."""
    verification, tracked, pushed = summary["verification"], summary.get("mlflow") or {}, summary.get("hub") or {}
    rows = [("adapter folder", f"`{summary['adapter_dir']}`"), ("run folder", f"`{summary['run_dir']}`"),
            ("saved as", summary.get("saved_as") or ""),
            ("eval loss", f"{summary['eval_loss_before']:.4f} before training, {summary['eval_loss_after']:.4f} after"),
            ("verification", f"{'passed' if verification.get('passed') else 'FAILED'}: max abs logit difference "
                             f"{verification.get('max_abs_diff'):.2e} (atol {verification.get('atol'):g})"),
            ("will it serve", _serving(verification.get("serving") or {}))]
    if merged := summary.get("merged"):
        rows.append(("merged model", f"`{merged['path']}` ({merged['dtype']}, {merged['bytes']:,d} bytes)"))
    if tracked:
        rows.append(("MLflow run", _link(tracked.get("run_name") or tracked["run_id"], tracked.get("run_url"))
                     + ("" if tracked.get("run_url") else f" in `{tracked['tracking_uri']}`")))
        rows.append(("model version", _link(f"{tracked['registered_model_name']} v{tracked['model_version']}",
                                            tracked.get("model_version_url"))))
    else:
        rows.append(("MLflow", "off (mlflow.enabled=false)"))
    if promotion := summary.get("promotion"):
        rows.append(("promotion", f"{'promoted' if promotion['promoted'] else 'not promoted'}: {promotion['reason']}"))
    rows.append(("Hub commit", _link(f"{pushed['repo_id']}@{pushed['commit_oid'][:12]}", pushed["commit_url"])
                 if pushed.get("repo_id") else "not pushed (no hub.repo_id)"))
    if merged_push := pushed.get("merged"):
        rows.append(("merged model Hub commit", _link(f"{merged_push['repo_id']}@{merged_push['commit_oid'][:12]}",
                                                     merged_push["commit_url"])))
    title = f"# Adapter run {flow_run_name}" if flow_run_name else "# Adapter run"
    return "\n".join([title, "", "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows if value)])


def _serving(serving: dict) -> str:
    """"vllm ok, llama.cpp fails use_rslora, peft ok" from the serving preflight's dict."""
    return ", ".join(f"{runtime} " + (f"fails {', '.join(result['failed_rules'])}" if result["failed_rules"] else "ok")
                     for runtime, result in serving.get("runtimes", {}).items())


def report(summary: dict, flow_run_name: str | None = None) -> None:
    """Create the run-summary artifact and log the result, one line per item, as the flow's last log lines."""
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(summary, flow_run_name),
                             description="What this run produced, with links to MLflow and the Hub")
    logger = get_run_logger()
    tracked, pushed = summary.get("mlflow") or {}, summary.get("hub") or {}
    if promotion := summary.get("promotion"):  # first: the adapter folder and the links stay the last lines
        logger.info("Promotion: %s (%s)", "promoted" if promotion["promoted"] else "not promoted", promotion["reason"])
    logger.info("Adapter: %s", summary["adapter_dir"])
    logger.info("Eval loss: %.4f -> %.4f; verification %s (max abs logit difference %.2e)",
                summary["eval_loss_before"], summary["eval_loss_after"],
                "passed" if summary["verification"].get("passed") else "FAILED",
                summary["verification"].get("max_abs_diff"))
    if summary.get("merged"):
        logger.info("Merged model: %s", summary["merged"]["path"])
    if tracked:
        logger.info("MLflow run: %s", tracked.get("run_url") or f"{tracked['run_id']} in {tracked['tracking_uri']}")
        logger.info("MLflow model version: %s", tracked.get("model_version_url")
                    or f"{tracked['registered_model_name']} v{tracked['model_version']}")
    if pushed.get("repo_id"):
        logger.info("Hub commit: %s", pushed["commit_url"])
    if pushed.get("merged"):
        logger.info("Merged model Hub commit: %s", pushed["merged"]["commit_url"])


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"
