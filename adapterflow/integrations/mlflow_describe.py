"""What an MLflow run says about itself: its name, tags, markdown description (also the model version's), the
dataset input, and the links to the Prefect flow run and the Hub commit.

Plain data in, plain data out (no MLflow import) except `log_dataset_input`, which logs through the client.
"""

from __future__ import annotations

import getpass
import json
import warnings
from pathlib import Path
from typing import Optional

from adapterflow.flows.names import mlflow_run_name
from adapterflow.init_methods import is_pissa, pipeline_init_name
from adapterflow.model_card import base_model_label, conversion_note

FLOW_RUN_TAG = "prefect.flow_run_id"
SOURCE_NAME = "adapterflow.flows.save_adapter"  # the Prefect flow's module: what MLflow's "Source" shows
DATASET_CONTEXT = "training"
MAX_DIGEST_CHARS = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE


def dataset_fingerprint(plan: dict) -> Optional[str]:
    """The dataset's content fingerprint from the run plan (`dataset_fingerprint`, formerly `dataset_sha256`)."""
    return plan.get("dataset_fingerprint") or plan.get("dataset_sha256")


def adapter_init(plan: dict) -> str:
    """The pipeline init name (`adapter.init`, e.g. pissa_niter_4) of a run plan."""
    given = plan.get("parameters", {}).get("adapter", {}).get("init")
    return given or pipeline_init_name(plan.get("lora_config", {}).get("init_lora_weights", True))


def run_name(plan: dict, flow_run_name: Optional[str]) -> str:
    """`<run label> <init family> r<trained r>`, e.g. "rational-inchworm pissa r8": the label is run_name when
    given, else the Prefect flow run's name, else the run folder's name."""
    label = plan.get("parameters", {}).get("run_name") or flow_run_name or Path(plan["run_dir"]).name
    family = "pissa" if is_pissa(adapter_init(plan)) else adapter_init(plan)
    return mlflow_run_name(label, f"{family} r{plan.get('lora_config', {}).get('r')}")


def saved_rank(adapter_dir: Path) -> Optional[int]:
    """r of the saved adapter (its adapter_config.json), which a PiSSA->LoRA conversion doubled."""
    try:
        return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError):
        return None


def run_tags(plan: dict, flow_run_id: str, flow_run_url: Optional[str], training: dict, verification: dict,
             saved_r: Optional[int], flow_run_name: Optional[str] = None) -> dict[str, str]:
    """`prefect.*`, `mlflow.source.*` / `mlflow.user`, `base_model` (as the user named it), `adapter.*` (init,
    trained and saved rank, conversion), `verification.passed`, and the description (`mlflow.note.content`)."""
    given, lora = plan.get("parameters", {}), plan.get("lora_config", {})
    init, trained_r = adapter_init(plan), lora.get("r")
    converted = bool(plan.get("convert_pissa_to_lora"))
    tags = {FLOW_RUN_TAG: flow_run_id, "mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "JOB",
            "mlflow.user": _user(),
            "base_model": base_model_label(given.get("base_model", {}).get("name_or_path")) or plan["base_model_path"],
            "adapter.name": plan.get("adapter_name", "default"), "adapter.init": init,
            "adapter.r": str(trained_r), "adapter.saved_r": str(saved_r or trained_r),
            "adapter.converted": str(converted).lower(), "verification.passed": str(verification.get("passed")).lower()}
    tags.update(serving_tags(verification))
    if converted:
        tags["adapter.conversion"] = conversion_note(trained_r, saved_r or 2 * trained_r)
    if flow_run_name:
        tags["prefect.flow_run_name"] = flow_run_name
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    tags["mlflow.note.content"] = description(tags, training, verification)
    return tags


def serving_tags(verification: dict) -> dict[str, str]:
    """`serving.vllm`, `serving.llama_cpp`: "ok", or the comma-joined names of the failed rules, from the verify
    step's serving preflight (`verification["serving"]`, `adapterflow.serving.ServingReport.to_dict`)."""
    runtimes = (verification.get("serving") or {}).get("runtimes", {})
    return {f"serving.{runtime.replace('.', '_')}": ",".join(result.get("failed_rules", [])) or "ok"
            for runtime, result in runtimes.items() if runtime in ("vllm", "llama.cpp")}


def training_tags(plan: dict, flow_run_id: str, flow_run_url: Optional[str],
                  flow_run_name: Optional[str] = None) -> dict[str, str]:
    """The tags of a run whose training is under way: `run_tags` without what only the finished run knows (the
    saved rank, verification), and a description saying so; the log-to-mlflow step replaces them."""
    tags = run_tags(plan, flow_run_id, flow_run_url, {}, {}, None, flow_run_name)
    for key in ("adapter.saved_r", "verification.passed"):
        tags.pop(key)
    shape = tags.get("adapter.conversion") or f"{tags['adapter.init']} r={tags['adapter.r']}"
    tags["mlflow.note.content"] = "\n".join([
        f"Adapter `{tags['adapter.name']}` for `{tags['base_model']}`: {shape}.", "",
        "- training: in progress (loss, learning_rate, grad_norm, epoch and eval_loss are logged as it runs); "
        "eval loss, verification and the adapter's model follow when the flow's log-to-mlflow step completes the run",
        f"- Prefect flow run: {_prefect_link(tags)}"])
    return tags


def _prefect_link(tags: dict) -> str:
    if tags.get("prefect.flow_run_url"):
        return f"[{tags.get('prefect.flow_run_name') or tags[FLOW_RUN_TAG]}]({tags['prefect.flow_run_url']})"
    return f"`{tags.get('prefect.flow_run_name') or tags[FLOW_RUN_TAG]}` (id `{tags[FLOW_RUN_TAG]}`)"


def description(tags: dict, training: dict, verification: dict) -> str:
    """The run's markdown description (the model version gets the same): what was trained, its result, links."""
    prefect = _prefect_link(tags)
    shape = tags.get("adapter.conversion") or f"{tags['adapter.init']} r={tags['adapter.r']}"
    lines = [f"Adapter `{tags['adapter.name']}` for `{tags['base_model']}`: {shape}.", "",
             f"- eval loss: {_number(training.get('eval_loss_before'))} before training, "
             f"{_number(training.get('eval_loss_after'))} after",
             f"- verification: {'passed' if verification.get('passed') else 'failed'}, max abs logit difference "
             f"{_number(verification.get('max_abs_diff'))} (atol {verification.get('atol')})",
             f"- Prefect flow run: {prefect}",
             *[f"- {key.removeprefix('serving.')} preflight: {'ok' if value == 'ok' else 'fails ' + value}"
               for key, value in tags.items() if key.startswith("serving.")],
             "", "The adapter's files are the run's logged model (Models tab)."]
    return "\n".join(lines)


def with_hub_link(text: Optional[str], commit_url: str, label: str) -> str:
    """`text` with a "Hub commit" link line added (once: a retry adds nothing)."""
    text = text or ""
    if commit_url in text:
        return text
    return f"{text.rstrip()}\n\n- Hub commit: [{label}]({commit_url})".lstrip()


def log_dataset_input(client, run, plan: dict, dataset_file: Optional[str] = None) -> None:
    """The dataset as the run's input (context `training`): name (the file's stem), digest (the fingerprint, cut
    to MLflow's 36 characters), source (`dataset_file`, the file read, e.g. for builtin:NAME; else the plan's
    dataset_path). Skipped if already logged."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    fingerprint, reference = dataset_fingerprint(plan), plan.get("dataset_path")
    if not fingerprint or not reference:
        return
    source = _dataset_source(dataset_file or reference)
    name = Path(str(reference).split(":", 1)[-1]).stem or str(reference)
    dataset = MetaDataset(source, name=name, digest=fingerprint[:MAX_DIGEST_CHARS])._to_mlflow_entity()
    logged = run.inputs.dataset_inputs if run.inputs else []
    if any(i.dataset.name == dataset.name and i.dataset.digest == dataset.digest for i in logged):
        return
    client.log_inputs(run.info.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context",
                                                                                  DATASET_CONTEXT)])])


def _dataset_source(path: str):
    """A URL as an HTTP source; a file (or any other reference) through MLflow's resolver, which makes a path a
    `local` source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if "://" in path:
        return HTTPDatasetSource(path)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways: LocalArtifactDatasetSource, <same>"
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways", category=UserWarning)
        return resolve_dataset_source(str(Path(path).absolute()) if Path(path).exists() else path)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
