"""The adapter in MLflow's model registry: one pyfunc LoggedModel holding the adapter folder (its only copy in
MLflow), and this flow run's version of the registered model.

The model is built without MLflow's fluent API (which reads the global tracking URI): `mlflow.pyfunc.save_model`
writes it into a local folder ("models from code": mlflow_pyfunc.py, plus the adapter folder as the `adapter`
artifact and the library's Python files as code), then `MlflowClient.log_model_artifacts` uploads it into the
LoggedModel and `finalize_logged_model` marks it READY, the steps `mlflow.pyfunc.log_model` takes
(mlflow/models/model.py `Model.log`). The local folder holds the adapter's small files only: its weight files are
uploaded straight from the adapter folder into `artifacts/adapter`, so MLflow writes the tensors once (the upload),
not three times (a staging copy, save_model's copy, the upload). The model's code is the library's `.py` files
only: no data files (the builtin dataset), no pipeline, no integrations.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Optional

import adapterflow
from adapterflow.formats import WEIGHTS_NAMES
from adapterflow.integrations.mlflow_run import FLOW_RUN_TAG
from adapterflow.redaction import redact

MODEL_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
PACKAGE_DIR = Path(adapterflow.__file__).parent
CODE_EXCLUDED = {"flows", "tasks", "integrations", "__pycache__"}  # subfolders the model's loader never imports
MODEL_TYPE = "peft-lora-adapter"
ADAPTER_ARTIFACT = "artifacts/adapter"  # where mlflow.pyfunc.save_model puts the `adapter` artifact


def logged_model(client, run, flow_run_id: str, name: str, adapter_dir: Path, plan: dict, params: dict,
                 tags: dict, input_example: Optional[list[str]] = None):
    """The run's READY pyfunc LoggedModel, named `name` (distinct per run: flows/names.logged_model_name). It is
    created (tagged with the flow run id, linked to the run) before its files are uploaded, so a retry after a
    failed upload fills the same model instead of creating another. `input_example`: prompts in the training
    data's format, saved with the model (the UI shows it; MLflow does not run it)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    experiment_id, run_id = run.info.experiment_id, run.info.run_id
    models = list(client.search_logged_models([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
                                              order_by=[{"field_name": "creation_time", "ascending": True}]))
    model = next((m for m in models if str(m.status) == "READY"), models[0] if models else None)
    if model is None:
        model_tags = {FLOW_RUN_TAG: flow_run_id, **{k: tags[k] for k in (
            "base_model", "adapter.name", "adapter.init", "adapter.r", "adapter.saved_r", "adapter.converted",
            "adapter.conversion", "prefect.flow_run_name", "mlflow.source.name", "mlflow.source.type", "mlflow.user")
            if k in tags}}  # the mlflow.* ones: the Models tab's "Logged from"
        model = client.create_logged_model(experiment_id, name, source_run_id=run_id, tags=model_tags,
                                           params=params, model_type=MODEL_TYPE)
    if model.model_id not in {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if str(model.status) == "READY":
        return model
    with tempfile.TemporaryDirectory() as tmp:
        local = _save_pyfunc(Path(tmp), model, run_id, adapter_dir, plan, input_example)
        client.log_model_artifacts(model.model_id, str(local))
    for weights in _weight_files(adapter_dir):  # the adapter's tensors, written once in MLflow: by this upload
        folder = weights.parent.relative_to(adapter_dir).as_posix()
        client.log_model_artifact(model.model_id, str(weights),
                                  ADAPTER_ARTIFACT if folder == "." else f"{ADAPTER_ARTIFACT}/{folder}")
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def model_version(client, name: str, model_id: str, run_id: str, flow_run_id: str, run_tags: dict, plan: dict):
    """This flow run's version of `name`: found by its tag (or source) if an earlier attempt created it, else
    created. OSS stores create versions READY at once, so no polling (nor its "Waiting up to 300 s" log line)."""
    from mlflow.exceptions import MlflowException

    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == name and (version.tags.get(FLOW_RUN_TAG) == flow_run_id
                                     or version.source == f"models:/{model_id}"):
            return version
    try:
        client.create_registered_model(name, description=f"Adapters for {run_tags['base_model']} by adapterflow.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {FLOW_RUN_TAG: flow_run_id, "base_model": run_tags["base_model"], "r": run_tags["adapter.r"],
            "saved_r": run_tags["adapter.saved_r"], "init": run_tags["adapter.init"],
            "converted": run_tags["adapter.converted"],
            **({"conversion": run_tags["adapter.conversion"]} if "adapter.conversion" in run_tags else {})}
    return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id,
                                       description=run_tags["mlflow.note.content"], await_creation_for=0)


def _save_pyfunc(tmp: Path, model, run_id: str, adapter_dir: Path, plan: dict,
                 input_example: Optional[list[str]] = None) -> Path:
    """The model's files in `tmp/model`: MLmodel, the code, the environment files, artifacts/adapter/*."""
    import mlflow
    from mlflow.models import Model

    local = tmp / "model"
    adapter = _copy_files(adapter_dir, tmp / "adapter", skip=WEIGHTS_NAMES)
    mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id)
    with warnings.catch_warnings():
        # The signature is explicit, so save_model stores the example without running the model on it
        # (mlflow/pyfunc/__init__.py `save_model`); runs without one need no warning.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            path=str(local), mlflow_model=mlflow_model, python_model=str(MODEL_CODE),
            artifacts={"adapter": str(adapter)}, code_paths=[str(_code_package(tmp))],  # adapter: no weights
            pip_requirements=_pip_requirements(), signature=_signature(), input_example=input_example or None,
            model_config=redact({"base_model_path": plan["base_model_path"],
                                 "adapter_name": plan.get("adapter_name", "default")}))
    for cache in list(local.rglob("__pycache__")):  # save_model imports the code to check it
        shutil.rmtree(cache, ignore_errors=True)
    return local


def _weight_files(folder: Path) -> list[Path]:
    """The adapter's weight files (formats.WEIGHTS_NAMES), in the folder and in per-adapter subfolders."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name in WEIGHTS_NAMES)


def _copy_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a folder file by file, leaving out files named in `skip` (target is created even if empty). Read
    here, not by MLflow: MLflow's copy turns an I/O error into a plain MlflowException without its errno, and
    shutil.copytree into shutil.Error (errno None), so a transient EIO would look permanent; shutil.copyfile
    raises the OSError itself, which the retry condition classifies."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name not in skip:
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.relative_to(source))
    return target


def _code_package(tmp: Path) -> Path:
    """A copy of the library and runtime `.py` files (what mlflow_pyfunc imports), as `tmp/code/adapterflow`."""
    target = tmp / "code" / "adapterflow"
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        if CODE_EXCLUDED.isdisjoint(relative.parts[:-1]):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
    return target


def _signature():
    """One unnamed string column (a list of prompts, or a DataFrame with one column, e.g. "prompt") -> strings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32),
                                              ParamSpec("temperature", "double", 0.0)]))


def _pip_requirements() -> list[str]:
    """What loading the model needs. Explicit: inferring them takes seconds and adds torchvision."""
    return [f"{name}=={package_version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "transformers", "safetensors", "tokenizers")]
