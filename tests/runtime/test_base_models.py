"""Base models: the builtin tiny Llama (built once, deterministic, loadable by transformers), local folders, and
clear errors for everything else; the shipped instruction dataset and its generator."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterflow.runtime import base_models
from adapterflow.runtime.base_models import BUILTIN_PREFIX, load_base_model, load_tokenizer, resolve_base_model
from adapterflow.runtime.builtin import make_instructions

TINY = BUILTIN_PREFIX + "tiny-llama"
DATASET = base_models.BUILTIN_DIR / "instructions.jsonl"


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return resolve_base_model(TINY, tmp_path_factory.mktemp("cache"))


def records():
    return [json.loads(line) for line in DATASET.read_text().splitlines()]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_builtin_builds_a_transformers_folder(builtin_dir):
    assert builtin_dir.is_absolute() and builtin_dir.name.startswith("tiny-llama-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files(builtin_dir))
    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    shipped = json.loads((base_models.BUILTIN_DIR / "tiny-llama.json").read_text())
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.config.vocab_size == shipped["vocab_size"] == len(tokenizer)
    batch = tokenizer(["Next number after 17 ->", "Uppercase: dog ->"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], shipped["vocab_size"]) and torch.isfinite(logits).all()


def test_build_is_deterministic(builtin_dir, tmp_path):
    again = resolve_base_model(TINY, tmp_path)
    assert again.name == builtin_dir.name
    assert files(again) == files(builtin_dir)  # every file byte for byte, model.safetensors included


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resolve_base_model(TINY, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_second_call_reuses_the_folder(tmp_path, monkeypatch):
    first = resolve_base_model(TINY, tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(base_models, "_build", lambda *a: pytest.fail("rebuilt an existing builtin model"))
    assert resolve_base_model(TINY, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert os.listdir(tmp_path) == [first.name]  # no temp folder left behind


def test_default_cache_dir_is_adapterflow_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERFLOW_CACHE", str(tmp_path / "cache"))
    assert resolve_base_model(TINY).parent == tmp_path / "cache"


def test_losing_the_rename_race_keeps_the_winners_folder(builtin_dir, tmp_path):
    target = tmp_path / builtin_dir.name
    winner = resolve_base_model(TINY, tmp_path)
    assert winner == target
    before = files(target)
    config = json.loads((base_models.BUILTIN_DIR / "tiny-llama.json").read_text())
    template = (base_models.BUILTIN_DIR / "tiny-llama.chat_template.jinja").read_text()
    base_models._build(config, base_models._corpus(DATASET.read_bytes()), target, template)  # a concurrent builder, finishing 2nd
    assert files(target) == before and os.listdir(tmp_path) == [target.name]


def test_a_crashed_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base_models.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_base_model(TINY, tmp_path)
    assert os.listdir(tmp_path) == []


def test_tokenizer_round_trips_and_has_special_tokens(builtin_dir):
    tokenizer = load_tokenizer(builtin_dir)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 256
    texts = [r["prompt"] + r["completion"] for r in records()[::20]]
    texts += ["Any text: héllo wörld ✓ 12345\n\ttabs  and  spaces ", "<s> literal"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer("dog").input_ids[0] == tokenizer.bos_token_id  # <s> prepended by default, like Llama


def test_load_base_model_records_its_path(builtin_dir):
    model = load_base_model(builtin_dir, dtype=torch.bfloat16)
    assert model.name_or_path == str(builtin_dir) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_existing_local_folder_is_accepted(base_dir, monkeypatch):
    assert resolve_base_model(str(base_dir)) == base_dir.resolve()
    monkeypatch.chdir(base_dir.parent)
    assert resolve_base_model(base_dir.name) == base_dir.resolve()  # relative to the working directory
    model = load_base_model(resolve_base_model(str(base_dir)))
    assert model.name_or_path == str(base_dir.resolve())


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json") as error:
        resolve_base_model(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="folder"):
        resolve_base_model(str(tmp_path / "config.json"))


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_model(str(tmp_path / "nowhere"))


def test_unreachable_hub_repo_id_asks_for_a_local_download(tmp_path, monkeypatch):
    from hub_server import isolated_hub_client
    from servers import free_port

    with isolated_hub_client(tmp_path / "hf"):
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        with pytest.raises(FileNotFoundError) as error:
            resolve_base_model("meta-llama/Llama-2-7b-hf")
    message = str(error.value)
    assert "could not be downloaded" in message and "hf download meta-llama/Llama-2-7b-hf" in message
    assert "local folder" in message


def test_hub_repo_id_is_downloaded(tmp_path, monkeypatch):
    """A base model given as a Hub id comes through the real client (here from the local Hub-protocol server)."""
    from huggingface_hub import HfApi

    from hub_server import HubServer, isolated_hub_client

    built = resolve_base_model("builtin:tiny-llama", tmp_path / "cache")
    with isolated_hub_client(tmp_path / "hf"), HubServer(tmp_path / "hub", token="hf_base_model_test") as hub:
        api = HfApi(endpoint=hub.url, token="hf_base_model_test")
        api.create_repo("tester/tiny-base")
        api.upload_folder(folder_path=built, repo_id="tester/tiny-base")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_base_model_test")
        folder = resolve_base_model("tester/tiny-base")
    assert (folder / "config.json").read_bytes() == (built / "config.json").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert load_base_model(folder).config.hidden_size == load_base_model(built).config.hidden_size


def test_unknown_builtin_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="builtin:tiny-llama") as error:
        resolve_base_model("builtin:huge-llama", tmp_path)
    assert "builtin:huge-llama" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_dataset_records_are_well_formed():
    data = DATASET.read_bytes()
    assert len(data) < 300_000
    rows = records()
    assert 1000 <= len(rows) <= 3000
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
        assert isinstance(row["completion"], str) and row["completion"].strip()
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_generator_regenerates_the_shipped_file(tmp_path):
    assert make_instructions.render(make_instructions.generate()) == DATASET.read_bytes()
    output = tmp_path / "instructions.jsonl"
    env = {**os.environ, "PYTHONHASHSEED": "random"}  # no dependence on hash order
    subprocess.run([sys.executable, "-m", "adapterflow.runtime.builtin.make_instructions", "--output", str(output)],
                   check=True, env=env, capture_output=True)
    assert output.read_bytes() == DATASET.read_bytes()
    assert make_instructions.main(["--check"]) == 0
    output.write_text("stale\n")
    assert make_instructions.main(["--check", "--output", str(output)]) == 1
