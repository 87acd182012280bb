"""adapterflow.integrations.mlflow_logging against a real `mlflow server` over HTTP, and against the default sqlite store.

Everything logged is read back through MlflowClient / mlflow.artifacts, never from the server's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
                                          TEMPORARILY_UNAVAILABLE)

import tiny
from adapterflow import LoraConfig, get_adapter_model
from adapterflow.runtime.base_models import load_base_model, resolve_base_model
from servers import free_port
from adapterflow.flows.parameters import MlflowSettings
from adapterflow.integrations import mlflow_registry
from adapterflow.integrations.mlflow_logging import (MlflowRefusedError, MlflowUnavailableError,
                                                     is_transient_mlflow_error, log_adapter_run, set_hub_commit_tag)
from adapterflow.tasks.retries import is_transient

STEPS = 40
SECRET = "hf_secret_test_value"


@pytest.fixture(autouse=True)
def _quiet_downloads(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> str:
    """The server's URI, also as the process default (models:/ URIs resolve against the default URI)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="module")
def base_model_dir() -> Path:
    """The pipeline's default base: the builtin tiny Llama (it has a tokenizer, which generation needs)."""
    return resolve_base_model("builtin:tiny-llama")


@pytest.fixture(scope="module")
def adapter_dir(base_model_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter (README.md, adapter_config.json, adapter_model.safetensors) with non-zero weights."""
    model = get_adapter_model(load_base_model(base_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tiny.randomize_adapters(model)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _inputs(base_model_dir: Path, adapter_dir: Path, tmp_path: Path, **parameter_overrides) -> dict:
    """log_adapter_run's keyword arguments for a fresh flow run, with realistic plan / training / verification."""
    flow_run_id = str(uuid.uuid4())
    run_dir = tmp_path / "runs" / flow_run_id
    lora_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    parameters = {"run_name": None, "runs_root": str(tmp_path / "runs"),
                  "base_model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                  "dataset": {"path": "builtin:instructions", "eval_fraction": 0.1},
                  "adapter": {"name": "default", "init": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                  "training": {"steps": STEPS, "learning_rate": 3e-3}, **parameter_overrides}
    plan = {"run_dir": str(run_dir), "adapter_name": "default", "base_model_path": str(base_model_dir),
            "dtype": "float32", "dataset_path": "/data/instructions.jsonl", "dataset_fingerprint": "ab" * 32,
            "eval_fraction": 0.1, "max_seq_len": 64, "lora_config": lora_config,
            "dataset": {"path": "/data/instructions.jsonl", "split": "train", "completion_field": "answer",
                        "chat_template": "{{ messages }}", "revision": None},
            "launch": {"num_processes": 2, "strategy": "fsdp"},
            "training": {"steps": STEPS, "learning_rate": 3e-3, "batch_size": 16, "gradient_accumulation_steps": 1,
                         "max_grad_norm": 1.0, "weight_decay": 0.0, "warmup_steps": 4, "seed": 0,
                         "checkpoint_every": 20, "device": "cpu"},
            "output_dir": str(adapter_dir), "safe_serialization": True, "save_embedding_layers": "auto",
            "convert_pissa_to_lora": False, "atol": 1e-4, "parameters": parameters}
    losses = [3.0 * math.exp(-step / 15) + 0.5 for step in range(STEPS)]
    training = {"steps": STEPS, "losses": losses, "final_loss": losses[-1], "eval_loss_before": 3.4,
                "eval_loss_after": 1.1, "tokens": 51200, "train_seconds": 4.0, "tokens_per_second": 12800.0,
                "trainable_parameters": 4096, "total_parameters": 500000, "resumed_from": None}
    verification = {"adapter_dir": str(adapter_dir), "tensors_loaded": 8, "max_abs_diff": 2.5e-7, "atol": 1e-4,
                    "zero_lora_b": [], "problems": [], "passed": True}
    return dict(runs_root=tmp_path / "runs", run_dir=run_dir, adapter_dir=adapter_dir, flow_run_id=flow_run_id,
                flow_run_url=f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}", training=training,
                verification=verification, plan=plan, flow_run_name="rational-inchworm",
                input_example=["Repeat: red map ->", "Min(8, 91) ->"])


def _runs_of(client: MlflowClient, experiment: str, flow_run_id: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def test_logs_everything_readable_over_http(tracking, mlflow_server, base_model_dir, adapter_dir, tmp_path):
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path)
    name = f"test-adapter-{uuid.uuid4().hex[:8]}"
    settings = MlflowSettings(tracking_uri=mlflow_server, registered_model_name=name, alias="candidate")
    before = _snapshot(adapter_dir)
    result = log_adapter_run(settings, **inputs)

    assert set(result) == {"run_id", "run_name", "experiment_id", "tracking_uri", "run_url", "model_id", "model_name",
                           "model_uri", "registered_model_name", "model_version", "model_version_url"}
    run_id = result["run_id"]
    assert result["run_url"] == f"{mlflow_server}/#/experiments/{result['experiment_id']}/runs/{run_id}"
    assert result["model_version_url"] == f"{mlflow_server}/#/models/{name}/versions/1"
    assert _snapshot(adapter_dir) == before
    client = MlflowClient(mlflow_server, mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == result["run_name"] == "rational-inchworm lora r4"
    params = run.data.params
    assert params["lora.r"] == "4" and params["lora.target_modules"] in ("q_proj,v_proj", "v_proj,q_proj")
    assert params["training.learning_rate"] == "0.003" and params["training.steps"] == str(STEPS)
    assert params["base_model"] == str(base_model_dir) and params["base_model.name_or_path"] == "builtin:tiny-llama"
    assert params["dataset.path"] == "/data/instructions.jsonl" and params["dataset.fingerprint"] == "ab" * 32
    assert params["dataset.split"] == "train" and params["dataset.completion_field"] == "answer"
    assert params["dataset.chat_template_sha256"] == hashlib.sha256(b"{{ messages }}").hexdigest()
    assert "dataset.revision" not in params and "dataset.chat_template" not in params
    assert params["training.num_processes"] == "2" and params["training.strategy"] == "fsdp"
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == inputs["flow_run_id"] and tags["prefect.flow_run_url"] == inputs["flow_run_url"]
    assert (tags["base_model"], tags["adapter.init"], tags["adapter.converted"]) == ("builtin:tiny-llama", "lora", "false")
    assert tags["mlflow.source.name"] == "adapterflow.flows.save_adapter" and tags["mlflow.user"]
    experiment_tags = client.get_experiment(result["experiment_id"]).tags  # the UI's "Model training" view
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert (tags["adapter.r"], tags["adapter.saved_r"]) == ("4", "4") and "adapter.conversion" not in tags
    prefect_link = f"[rational-inchworm]({inputs['flow_run_url']})"
    assert prefect_link in tags["mlflow.note.content"] and "eval loss: 3.4 before training, 1.1 after" in \
        tags["mlflow.note.content"]
    [dataset_input] = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("instructions", ("ab" * 32)[:36], "local")
    assert json.loads(dataset.source) == {"uri": "/data/instructions.jsonl"}
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(step, pytest.approx(loss)) for step, loss in enumerate(inputs["training"]["losses"], 1)]
    metrics = run.data.metrics
    assert metrics["eval_loss_before"] == 3.4 and metrics["eval_loss_after"] == 1.1
    assert metrics["adapter_bytes"] == sum(len(b) for b in before.values())
    assert metrics["trainable_parameters"] == 4096 and metrics["tokens_per_second"] == 12800.0
    assert metrics["verification_max_abs_diff"] == 2.5e-7

    assert "adapter" not in {a.path for a in client.list_artifacts(run_id)}  # stored once: as the model's files
    assert run.data.tags["adapter.model_uri"] == result["model_uri"]
    assert [o.model_id for o in run.outputs.model_outputs] == [result["model_id"]]
    parameters = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/parameters.json", dst_path=str(tmp_path / "p"), tracking_uri=mlflow_server)).read_text())
    assert parameters == inputs["plan"]["parameters"]
    png = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/plots/train_loss.png",
                                                   dst_path=str(tmp_path / "png"), tracking_uri=mlflow_server))
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000

    model = client.get_logged_model(result["model_id"])
    assert str(model.status) == "READY" and model.source_run_id == run_id
    assert model.tags["prefect.flow_run_id"] == inputs["flow_run_id"]
    assert [m.model_id for m in client.search_logged_models([result["experiment_id"]],
            f"tags.`prefect.flow_run_id` = '{inputs['flow_run_id']}'")] == [result["model_id"]]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.version == result["model_version"] == "1" and version.source == result["model_uri"]
    assert {k: version.tags[k] for k in ("base_model", "r", "saved_r", "init", "converted")} == \
        {"base_model": "builtin:tiny-llama", "r": "4", "saved_r": "4", "init": "lora", "converted": "false"}
    assert prefect_link in version.description
    assert model.name == result["model_name"] == f"{name}-rational-inchworm-{inputs['flow_run_id'][:8]}"

    sys_path = list(sys.path)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
        outputs = loaded.predict(["Write a short poem about the sea."], params={"max_new_tokens": 5})
    finally:
        sys.path[:] = sys_path  # load_model puts the model's code folder first
    assert isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], str)
    assert outputs[0]  # 5 new tokens of a byte-level BPE decode to a non-empty string
    assert loaded.input_example == ["Repeat: red map ->", "Min(8, 91) ->"] or \
        list(loaded.input_example.iloc[:, 0]) == ["Repeat: red map ->", "Min(8, 91) ->"]
    import pandas as pd

    frame = loaded.predict(pd.DataFrame({"prompt": ["Hello", "Name a color."]}), params={"max_new_tokens": 3})
    assert len(frame) == 2 and all(isinstance(text, str) for text in frame)
    model_files = Path(mlflow.artifacts.download_artifacts(f"models:/{result['model_id']}", tracking_uri=mlflow_server,
                                                           dst_path=str(tmp_path / "model")))
    assert _snapshot(model_files / "artifacts" / "adapter") == before  # byte-identical to the output folder
    assert "peft" not in (model_files / "requirements.txt").read_text()
    code = [p.relative_to(model_files).as_posix() for p in model_files.rglob("*") if p.is_file()
            and p.relative_to(model_files).parts[0] == "code"]
    assert "code/adapterflow/model.py" in code and "code/adapterflow/runtime/base_models.py" in code
    assert all(p.endswith(".py") for p in code), [p for p in code if not p.endswith(".py")]  # no .jsonl, no data
    assert not any("/integrations/" in p or "/tasks/" in p or "/flows/" in p for p in code)
    assert sum(f.name == "adapter_model.safetensors" for f in model_files.rglob("*")) == 1

    commit = "https://huggingface.co/me/adapter/commit/0123abcd"  # what the Hub push step records later
    set_hub_commit_tag(settings, result["tracking_uri"], run_id, commit, registered_model_name=name,
                       model_version=result["model_version"])
    set_hub_commit_tag(settings, result["tracking_uri"], run_id, commit, registered_model_name=name,
                       model_version=result["model_version"], label="me/adapter@0123abcd")  # a retry: no second link
    assert client.get_run(run_id).data.tags["hub.commit_url"] == commit
    assert client.get_model_version(name, "1").tags["hub.commit_url"] == commit
    hub_link = f"[0123abcd]({commit})"  # the first call's label: the commit id from the URL
    for text in (client.get_run(run_id).data.tags["mlflow.note.content"], client.get_model_version(name, "1").description):
        assert text.count(commit) == 1 and hub_link in text and prefect_link in text

    with pytest.raises(MlflowException) as refused:  # a real server refusal is permanent
        client.log_param(run_id, "lora.r", "8")
    assert not is_transient_mlflow_error(refused.value)
    changed = {**inputs, "plan": {**inputs["plan"], "max_seq_len": 128}}  # a retry whose param changed
    with pytest.raises(MlflowRefusedError) as ours:
        log_adapter_run(settings, **changed)
    assert ours.value.transient is False and not is_transient(ours.value)
    assert mlflow_server in str(ours.value) and isinstance(ours.value.__cause__, MlflowException)


def test_converted_pissa_runs_explain_the_rank_and_get_distinct_names(tracking, mlflow_server, base_model_dir,
                                                                      adapter_dir, tmp_path):
    """The saved adapter (r=4) of a PiSSA run trained at r=2; two flow runs of the same registered model."""
    name = f"test-pissa-{uuid.uuid4().hex[:8]}"
    settings = MlflowSettings(tracking_uri=mlflow_server, registered_model_name=name)
    client = MlflowClient(mlflow_server, mlflow_server)
    results = []
    for flow_run_name in ("rational-inchworm", "rational-inchworm"):  # Prefect's random names can repeat
        inputs = _inputs(base_model_dir, adapter_dir, tmp_path, adapter={"name": "default", "init": "pissa_niter_2",
                                                                         "r": 2})
        inputs["plan"].update(convert_pissa_to_lora=True, lora_config={**inputs["plan"]["lora_config"], "r": 2,
                                                                       "init_lora_weights": "pissa_niter_2"})
        results.append(log_adapter_run(settings, **{**inputs, "flow_run_name": flow_run_name}))
    note = "trained as PiSSA r=2; saved as LoRA r=4 (PiSSA->LoRA conversion doubles the rank)"
    for result in results:
        run = client.get_run(result["run_id"])
        assert run.info.run_name == "rational-inchworm pissa r2"
        assert (run.data.tags["adapter.r"], run.data.tags["adapter.saved_r"]) == ("2", "4")
        assert run.data.tags["adapter.conversion"].startswith(note) and note in run.data.tags["mlflow.note.content"]
        version = client.get_model_version(name, result["model_version"])
        assert note in version.description and version.tags["conversion"].startswith(note)
        assert client.get_logged_model(result["model_id"]).name == result["model_name"]
    assert results[0]["model_name"] != results[1]["model_name"]
    assert [r["model_name"].startswith(f"{name}-rational-inchworm-") for r in results] == [True, True]


def test_retries_create_no_second_run_model_or_version(tracking, mlflow_server, base_model_dir, adapter_dir,
                                                       tmp_path, monkeypatch):
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path)
    name = f"test-retry-{uuid.uuid4().hex[:8]}"
    settings = MlflowSettings(tracking_uri=mlflow_server, registered_model_name=name, alias="candidate")
    client = MlflowClient(mlflow_server, mlflow_server)
    flow_run_filter = f"tags.`prefect.flow_run_id` = '{inputs['flow_run_id']}'"

    def dropped_connection(*args, **kwargs):
        raise requests.exceptions.ConnectionError("connection reset by peer")

    def registry_hiccup(*args, **kwargs):
        raise MlflowException("registry hiccup", error_code=TEMPORARILY_UNAVAILABLE)

    with monkeypatch.context() as patch:  # attempt 1 dies before the model's files are uploaded
        patch.setattr(mlflow_registry, "_pip_requirements", dropped_connection)
        with pytest.raises(MlflowUnavailableError):
            log_adapter_run(settings, **inputs)
    [run] = _runs_of(client, settings.experiment, inputs["flow_run_id"])
    assert run.info.status == "FAILED"
    [pending] = client.search_logged_models([run.info.experiment_id], flow_run_filter)
    assert str(pending.status) != "READY"
    with monkeypatch.context() as patch:  # attempt 2 dies after the model is complete, before registering
        patch.setattr(mlflow_registry, "model_version", registry_hiccup)
        with pytest.raises(MlflowUnavailableError) as failed:
            log_adapter_run(settings, **inputs)
    assert is_transient_mlflow_error(failed.value) and failed.value.transient and is_transient(failed.value)
    first = log_adapter_run(settings, **inputs)
    second = log_adapter_run(settings, **inputs)

    assert first == second and first["run_id"] == run.info.run_id and first["model_id"] == pending.model_id
    assert [r.info.run_id for r in _runs_of(client, settings.experiment, inputs["flow_run_id"])] == [first["run_id"]]
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    models = client.search_logged_models([first["experiment_id"]], flow_run_filter)
    assert [(m.model_id, str(m.status)) for m in models] == [(first["model_id"], "READY")]
    assert len(client.get_metric_history(first["run_id"], "loss")) == STEPS
    assert len(client.get_metric_history(first["run_id"], "eval_loss_after")) == 1
    finished = client.get_run(first["run_id"])
    assert finished.info.status == "FINISHED"
    assert [o.model_id for o in finished.outputs.model_outputs] == [first["model_id"]]
    assert mlflow.active_run() is None


def test_default_sqlite_store_under_runs_root(base_model_dir, adapter_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path)
    tracking_before = mlflow.get_tracking_uri()
    result = log_adapter_run(MlflowSettings(), **inputs)

    runs_root = inputs["runs_root"].absolute()
    assert result["tracking_uri"] == f"sqlite:///{runs_root / 'mlflow.db'}"
    assert result["run_url"] is None and result["model_version_url"] is None
    assert result["registered_model_name"] == "default-tiny-llama"  # from "builtin:tiny-llama", not the cache folder
    assert mlflow.get_tracking_uri() == tracking_before and "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(result["tracking_uri"], result["tracking_uri"])
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    stored = runs_root / "mlartifacts" / result["run_id"] / "artifacts"
    assert not (stored / "adapter").exists()
    assert (stored / "plots" / "train_loss.png").is_file() and (stored / "parameters.json").is_file()
    assert client.get_model_version(result["registered_model_name"], "1").source == result["model_uri"]
    [mlmodel] = list((runs_root / "mlartifacts").rglob("MLmodel"))  # the LoggedModel's files
    assert _snapshot(mlmodel.parent / "artifacts" / "adapter") == _snapshot(adapter_dir)
    weights = [p for p in (runs_root / "mlartifacts").rglob("adapter_model.safetensors")]
    assert len(weights) == 1  # the adapter is stored once
    assert not list((runs_root / "mlartifacts").rglob("*.jsonl"))
    assert not list(cwd.iterdir())  # no ./mlruns, no ./mlflow.db


def test_dead_server_fails_fast_with_a_clear_message(base_model_dir, adapter_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path)
    before = _snapshot(adapter_dir)
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    start = time.monotonic()
    with pytest.raises(MlflowUnavailableError) as failed:
        log_adapter_run(MlflowSettings(tracking_uri=uri), **inputs)
    assert time.monotonic() - start < 15
    message = str(failed.value)
    assert uri in message and "Start the server" in message
    assert "unset MLFLOW_TRACKING_URI" in message and "mlflow.enabled=false" in message
    assert isinstance(failed.value.__cause__, MlflowException)
    assert is_transient_mlflow_error(failed.value) and is_transient_mlflow_error(failed.value.__cause__)
    assert _snapshot(adapter_dir) == before
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == env_before


def test_no_secret_in_params_tags_or_artifacts(tracking, mlflow_server, base_model_dir, adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    inputs = _inputs(base_model_dir, adapter_dir, tmp_path,
                     hub={"repo_id": "me/adapter", "token": SECRET, "note": f"Bearer {SECRET}"})
    inputs["flow_run_url"] += f"?auth={SECRET}"
    inputs["plan"]["dataset_path"] = f"/data/{SECRET}/instructions.jsonl"
    name = f"test-secret-{uuid.uuid4().hex[:8]}"
    result = log_adapter_run(MlflowSettings(tracking_uri=mlflow_server, registered_model_name=name), **inputs)

    client = MlflowClient(mlflow_server, mlflow_server)
    run = client.get_run(result["run_id"])
    model = client.get_logged_model(result["model_id"])
    version = client.get_model_version(name, result["model_version"])
    recorded = json.dumps([run.data.params, run.data.tags, model.params, model.tags, version.tags])
    assert SECRET not in recorded and "***" in recorded
    files = [Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], dst_path=str(tmp_path / "run"),
                                                      tracking_uri=mlflow_server)),
             Path(mlflow.artifacts.download_artifacts(f"models:/{result['model_id']}", dst_path=str(tmp_path / "m"),
                                                      tracking_uri=mlflow_server))]
    scanned = [f for folder in files for f in folder.rglob("*") if f.is_file()]
    assert any(f.name == "parameters.json" for f in scanned) and any(f.name == "MLmodel" for f in scanned)
    assert [f for f in scanned if SECRET.encode() in f.read_bytes()] == []
    assert json.loads((files[0] / "parameters.json").read_text())["hub"]["token"] == "***"


def test_transient_error_classification():
    def caused_by(cause: BaseException) -> MlflowException:
        try:
            raise MlflowException("API request failed") from cause
        except MlflowException as exc:
            return exc

    transient = [
        MlflowUnavailableError("down"),
        caused_by(requests.exceptions.ConnectionError("[Errno 111] Connection refused")),
        caused_by(requests.exceptions.ReadTimeout("read timed out")),
        caused_by(requests.exceptions.RetryError("too many 503 error responses")),
        MlflowException("unavailable", error_code=TEMPORARILY_UNAVAILABLE),
        RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}),
        ConnectionRefusedError(111, "refused"), TimeoutError("slow"),
    ]
    permanent = [
        MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE),
        MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST),
        MlflowException("Failed to save the model"),  # client side; the code defaults to INTERNAL_ERROR
        RestException({"error_code": "BAD_REQUEST", "message": "bad"}),
        RestException({"error_code": "PERMISSION_DENIED", "message": "no"}),
        ValueError("bad input"), FileNotFoundError("adapter_config.json"),
    ]
    assert [is_transient_mlflow_error(e) for e in transient] == [True] * len(transient)
    assert [is_transient_mlflow_error(e) for e in permanent] == [False] * len(permanent)


def test_settings_forbid_unknown_keys():
    with pytest.raises(ValueError):
        MlflowSettings(tracking_url="http://x")
    assert MlflowSettings().model_dump() == {
        "enabled": True, "tracking_uri": None, "experiment": "adapterflow", "registered_model_name": None,
        "alias": None, "request_timeout_seconds": 10.0, "max_retries": 2}


def test_two_threads_with_different_tracking_uris_do_not_cross(base_model_dir, adapter_dir, tmp_path, monkeypatch):
    """No global tracking URI: each call talks to its own store, even when two run at once."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking_before = mlflow.get_tracking_uri()
    jobs = {side: _inputs(base_model_dir, adapter_dir, tmp_path / side) for side in ("left", "right")}
    settings = {side: MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / side / 'mlflow.db'}",
                                     registered_model_name=f"model-{side}") for side in jobs}
    with ThreadPoolExecutor(2) as pool:
        futures = {side: pool.submit(log_adapter_run, settings[side], **jobs[side]) for side in jobs}
        results = {side: future.result() for side, future in futures.items()}

    for side, other in (("left", "right"), ("right", "left")):
        client = MlflowClient(settings[side].tracking_uri, settings[side].tracking_uri)
        assert [r.info.run_id for r in _runs_of(client, "adapterflow", jobs[side]["flow_run_id"])] == \
            [results[side]["run_id"]]
        assert _runs_of(client, "adapterflow", jobs[other]["flow_run_id"]) == []
        assert [m.name for m in client.search_registered_models()] == [f"model-{side}"]
        assert client.get_logged_model(results[side]["model_id"]).source_run_id == results[side]["run_id"]
    assert mlflow.get_tracking_uri() == tracking_before
    assert not [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]


def test_the_log_task_uses_the_one_retry_condition():
    from adapterflow.tasks import retries
    from adapterflow.tasks.log_to_mlflow import log_to_mlflow
    from adapterflow.tasks.push_to_hub import push_to_hub

    assert log_to_mlflow.retry_condition_fn is push_to_hub.retry_condition_fn is retries.retry_condition
    assert is_transient(MlflowUnavailableError("down")) and not is_transient(MlflowRefusedError("no"))
