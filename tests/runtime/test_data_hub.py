"""A Hub dataset id as `dataset.path`: downloaded by `datasets.load_dataset` through the real huggingface_hub client
from the local Hub-protocol server (tests/support/hub_server.py), which serves dataset repos at the wire."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapterflow.runtime.data import DataSpec, DatasetError, Example, dataset_fingerprint, load_examples
from hub_server import HubServer, isolated_hub_client

TOKEN = "hf_dataset_test_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub with a dataset repo `tester/chat-mini` (train and test parquet files under data/), as
    HF_ENDPOINT for datasets, with HF_TOKEN set."""
    import datasets
    from huggingface_hub import HfApi

    with isolated_hub_client(tmp_path / "hf"), HubServer(tmp_path / "hub", token=TOKEN) as server:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", server.url)  # datasets reads HF_ENDPOINT at import
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("tester/chat-mini", repo_type="dataset")
        for split, rows in {"train": [{"q": "Q1 ->", "a": " A1"}, {"q": "Q2 ->", "a": " A2"}],
                            "test": [{"q": "Q3 ->", "a": " A3"}]}.items():
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buffer)
            api.upload_file(path_or_fileobj=buffer.getvalue(), path_in_repo=f"data/{split}-00000-of-00001.parquet",
                            repo_id="tester/chat-mini", repo_type="dataset")
        yield server, api


def test_a_hub_dataset_is_downloaded_with_its_splits_and_columns(hub):
    server, api = hub
    spec = DataSpec("tester/chat-mini", prompt_field="q", completion_field="a")
    assert load_examples(spec) == [Example("Q1 ->", " A1"), Example("Q2 ->", " A2")]
    assert load_examples(DataSpec("tester/chat-mini", split="test", prompt_field="q", completion_field="a")) == [
        Example("Q3 ->", " A3")]
    with pytest.raises(DatasetError, match=r"no split 'validation'; available: \['test', 'train'\]"):
        load_examples(DataSpec("tester/chat-mini", split="validation", completion_field="a"))
    paths = [path for method, path, status in server.requests if method == "GET" and status == 200]
    assert any(p.startswith("/datasets/tester/chat-mini/resolve/") and p.endswith(".parquet") for p in paths)


def test_the_fingerprint_follows_the_hub_commit(hub):
    server, api = hub
    first = dataset_fingerprint("tester/chat-mini")
    assert first == dataset_fingerprint(DataSpec("tester/chat-mini")) and len(first) == 64
    api.upload_file(path_or_fileobj=json.dumps({"note": 1}).encode(), path_in_repo="extra.json",
                    repo_id="tester/chat-mini", repo_type="dataset")
    assert dataset_fingerprint("tester/chat-mini") != first


def test_a_missing_hub_dataset_names_the_id_and_the_endpoint(hub):
    server, _ = hub
    with pytest.raises(FileNotFoundError, match=r"Hub dataset 'tester/no-such-data' could not be loaded from "
                                                rf"{server.url}.*HF_TOKEN"):
        load_examples("tester/no-such-data")
    with pytest.raises(FileNotFoundError, match="data/train.jsonl not found"):  # a file path, not a repo id
        load_examples("data/train.jsonl")


def test_a_pinned_revision_reads_the_same_data_after_a_new_commit(hub):
    from adapterflow.runtime.data_sources import hub_commit

    server, api = hub
    commit = hub_commit("tester/chat-mini")
    pinned = DataSpec("tester/chat-mini", prompt_field="q", completion_field="a", revision=commit)
    before, fingerprint = load_examples(pinned), dataset_fingerprint(pinned)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"q": "New ->", "a": " row"}]), buffer)
    api.upload_file(path_or_fileobj=buffer.getvalue(), path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id="tester/chat-mini", repo_type="dataset")
    assert hub_commit("tester/chat-mini") != commit
    assert load_examples(pinned) == before and dataset_fingerprint(pinned) == fingerprint
    assert load_examples(DataSpec("tester/chat-mini", prompt_field="q", completion_field="a")) == [
        Example("New ->", " row")]
    with pytest.raises(FileNotFoundError, match=r"at revision 'no-such-branch'.*dataset.revision"):
        hub_commit("tester/chat-mini", "no-such-branch")


def test_the_run_plan_pins_the_commit_of_main(hub, tmp_path, monkeypatch):
    """check_run (the pre-training checks every run makes) turns the branch into the commit it points to now."""
    from adapterflow.flows.parameters import SaveAdapterParameters
    from adapterflow.runtime.data_sources import hub_commit
    from adapterflow.tasks.run_plan import check_run

    monkeypatch.chdir(tmp_path)
    params = SaveAdapterParameters(dataset={"path": "tester/chat-mini", "prompt_field": "q", "completion_field": "a"},
                                   adapter={"init": "lora"}, runs_root=str(tmp_path / "runs"))
    checked = check_run(params)
    assert checked.dataset.revision == hub_commit("tester/chat-mini") and len(checked.dataset.revision) == 40
