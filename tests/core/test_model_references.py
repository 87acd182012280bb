"""adapterflow.model_references: the one base-model reference classifier, and the init-name table it sits next to."""

import pytest
from huggingface_hub.utils import HFValidationError, validate_repo_id

from adapterflow import init_methods
from adapterflow.model_references import is_hub_id_syntax, is_hub_model_id, is_local_reference, reference_kind

SAMPLES = ["meta-llama/Llama-3.2-1B", "openai-community/gpt2", "a/b", "_x/y_", "org/na--me", "org/na..me",
           "org/name.git", "-org/name", "org/name-", "org/.name", "o/" + "n" * 96, "o/" + "n" * 97, "a/b/c",
           "org/na me", "org/nämé", "org/", "/name", "x" * 96 + "/y"]


@pytest.mark.parametrize("value", SAMPLES)
def test_hub_id_rule_agrees_with_huggingface_hub(value):
    try:
        validate_repo_id(value)
        accepted = "/" in value
    except HFValidationError:
        accepted = False
    assert is_hub_id_syntax(value) == accepted


def test_kinds(tmp_path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert reference_kind("builtin:tiny-llama", tmp_path) == "builtin"
    assert reference_kind("https://user:pw@host/org/model", tmp_path) == "url"
    assert reference_kind("org/model", tmp_path) == "local"  # exists here: a folder, not the Hub repo
    assert reference_kind("org/other", tmp_path) == "hub" and is_hub_model_id("org/other", tmp_path)
    for path in ("./org/other", "../x", "/abs/org", "~/models/x", ".", ".."):
        assert reference_kind(path, tmp_path) == "local" and is_local_reference(path, tmp_path), path
    assert reference_kind("gpt2", tmp_path) == "local" and not is_local_reference("gpt2", tmp_path)
    assert not is_local_reference("org/other", tmp_path) and is_local_reference("org/model", tmp_path)
    assert reference_kind("n" * 5000, tmp_path) == "local"  # ENAMETOOLONG is no crash


def test_init_names_map_both_ways():
    assert [init_methods.init_lora_weights_for(n) for n in ("lora", "random", "gaussian", "pissa", "pissa_niter_4")] \
        == [True, False, "gaussian", "pissa", "pissa_niter_4"]
    for name in ("lora", "random", "gaussian", "pissa_niter_16"):
        assert init_methods.pipeline_init_name(init_methods.init_lora_weights_for(name)) == name
        init_methods.parse_init_method(init_methods.init_lora_weights_for(name))  # a value the library takes
    with pytest.raises(ValueError, match="adapter.init='olora'"):
        init_methods.init_lora_weights_for("olora")


def test_a_dataset_path_is_a_hub_id_only_without_a_file_suffix(tmp_path):
    from adapterflow.model_references import is_hub_dataset_id

    assert is_hub_dataset_id("my-org/support-chats", tmp_path)
    assert is_hub_dataset_id("HuggingFaceH4/ultrachat_200k", tmp_path)
    for value in ("data/train.jsonl", "data/train.parquet", "a/b.CSV", "x/y.arrow", "notes/lines.txt", "d/rows.json"):
        assert not is_hub_dataset_id(value, tmp_path), value  # a missing file, not a repo
    (tmp_path / "my-org" / "support-chats").mkdir(parents=True)
    assert not is_hub_dataset_id("my-org/support-chats", tmp_path)  # an existing folder wins
    assert not is_hub_dataset_id("builtin:chat", tmp_path) and not is_hub_dataset_id("./a/b", tmp_path)
