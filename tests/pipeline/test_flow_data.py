"""The save-adapter flow end to end on chat data (`builtin:chat`) and on a parquet file with custom column names,
against a real Prefect API: the data reaches training, the loss falls, the plan records the fingerprint."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapterflow.runtime.data import dataset_fingerprint
from flow_helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_chat_run_trains_on_the_assistant_turns(tmp_path):
    state = run_flow(tmp_path / "runs", run_name="chat", dataset={"path": "builtin:chat"},
                     adapter={"init": "lora", "r": 8}, training={"max_seq_len": 96, "steps": 12})
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["verification"]["passed"]
    assert summary["eval_loss_after"] < 0.8 * summary["eval_loss_before"], summary  # clearly, in 12 steps
    plan = json.loads((Path(summary["run_dir"]) / "plan.json").read_text())
    assert plan["dataset"]["path"] == "builtin:chat" and plan["dataset_path"] == "builtin:chat"
    assert plan["dataset_fingerprint"] == dataset_fingerprint("builtin:chat")
    assert plan["dataset"]["chat_template"] is None  # the builtin tokenizer's own template


def test_parquet_run_with_custom_column_names(tmp_path):
    data = tmp_path / "user-data"
    data.mkdir()
    rows = [{"question": f"Next number after {n} ->", "answer": f" {n + 1}", "id": n} for n in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    state = run_flow(tmp_path / "runs", run_name="parquet", adapter={"init": "lora"},
                     dataset={"path": str(data / "train.parquet"), "prompt_field": "question",
                              "completion_field": "answer"})
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    plan = json.loads((Path(summary["run_dir"]) / "plan.json").read_text())
    assert plan["dataset"]["prompt_field"] == "question" and plan["dataset"]["completion_field"] == "answer"
    assert plan["dataset_fingerprint"] == hashlib.sha256((data / "train.parquet").read_bytes()).hexdigest()
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing written into the data folder
