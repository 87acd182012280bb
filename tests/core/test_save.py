"""save_pretrained: files, layout, selected adapters, embedding layers, model card, and refused saves."""

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from tiny import load_llama, logits, randomize_adapters

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def model(load_base):
    adapter_model = get_adapter_model(load_base(), LoraConfig(**CONFIG))
    randomize_adapters(adapter_model)
    return adapter_model


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_files_metadata_and_keys(model, tmp_path):
    written = model.save_pretrained(tmp_path)
    assert sorted(p.name for p in written) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                               "adapterflow.json"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not any("default" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["peft_type"] == "LORA"
    assert model.peft_config["default"].inference_mode is False  # the live config is not changed


def test_keys_carry_no_adapter_name(load_base, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG), adapter_name="task_a")
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "task_a" / "adapter_model.safetensors").keys()
    assert keys and not any("task_a" in k for k in keys)


def test_other_adapters_go_to_subfolders_and_selected_adapters_limits_the_save(model, tmp_path):
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path / "all")
    assert listing(tmp_path / "all") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                         "adapterflow.json", "other", "other/adapter_config.json",
                                         "other/adapter_model.safetensors", "other/adapterflow.json"]
    model.save_pretrained(tmp_path / "only_other", selected_adapters=["other"])
    assert listing(tmp_path / "only_other") == ["README.md", "other", "other/adapter_config.json",
                                                "other/adapter_model.safetensors", "other/adapterflow.json"]


def test_unknown_selected_adapter_is_refused_and_nothing_written(model, tmp_path):
    with pytest.raises(ValueError, match=r"supported adapter names are \['default'\] - got \['default', 'nope'\]"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["default", "nope"])
    assert not (tmp_path / "out").exists()


def test_save_directory_that_is_a_file_is_refused(model, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model.save_pretrained(target)
    assert target.read_text() == "keep me"


def test_not_main_process_writes_nothing(model, tmp_path):
    assert model.save_pretrained(tmp_path / "out", is_main_process=False) == []
    assert not (tmp_path / "out").exists()


def test_unknown_keyword_and_bad_embedding_flag_are_refused(model, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['safe_serialisation'\\]"):
        model.save_pretrained(tmp_path / "out", safe_serialisation=False)
    with pytest.raises(ValueError, match="save_embedding_layers must be True, False or 'auto'"):
        model.save_pretrained(tmp_path / "out", save_embedding_layers="yes")
    assert not (tmp_path / "out").exists()


def test_save_embedding_layers_true_adds_embedding_weights(model, tmp_path):
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys)


def test_targeted_embedding_saves_its_base_layer_unless_false(load_base, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(**{**CONFIG, "target_modules": ["embed_tokens"]}))
    with pytest.warns(UserWarning, match="embedding layers found in `target_modules`"):
        model.save_pretrained(tmp_path / "auto")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "auto" / "adapter_model.safetensors")
    model.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    assert set(load_file(tmp_path / "off" / "adapter_model.safetensors")) == {
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"}


def test_auto_saves_embeddings_when_vocabulary_was_resized(load_base, base_dir, input_ids, tmp_path):
    base = load_base()
    base.resize_token_embeddings(base.config.vocab_size + 8)
    model = get_adapter_model(base, LoraConfig(**CONFIG))
    randomize_adapters(model)
    with pytest.warns(UserWarning, match="resized during finetuning"):
        model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.model.embed_tokens.weight"].shape[0] == base.config.vocab_size
    resized = load_base()
    resized.resize_token_embeddings(base.config.vocab_size)
    reloaded = AdapterModel.from_pretrained(resized, tmp_path)
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-6, rtol=0)


def test_tied_embeddings_are_saved_as_separate_tensors_and_load_in_peft(tied_base_dir, input_ids, tmp_path):
    model = get_adapter_model(load_llama(tied_base_dir), LoraConfig(**CONFIG))
    randomize_adapters(model)
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    state = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(state["base_model.model.lm_head.weight"], state["base_model.model.model.embed_tokens.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_llama(tied_base_dir), tmp_path)
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


def test_non_contiguous_adapter_tensors_are_saved(model, input_ids, tmp_path):
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    lora_a.weight = torch.nn.Parameter(lora_a.weight.detach().T.contiguous().T)  # same values, transposed layout
    assert not lora_a.weight.is_contiguous()
    model.save_pretrained(tmp_path)
    reloaded = AdapterModel.from_pretrained(model_base_copy(model), tmp_path)
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-6, rtol=0)


def model_base_copy(model):
    return load_llama(model.peft_config["default"].base_model_name_or_path)


def test_resave_in_other_format_removes_the_stale_weights_file(model, tmp_path):
    (tmp_path / "notes.txt").write_text("user file")
    model.save_pretrained(tmp_path, safe_serialization=False)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "adapterflow.json", "notes.txt"]
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "notes.txt").read_text() == "user file"


def test_model_card_front_matter(model, tmp_path, base_dir):
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["base_model"] == str(base_dir) and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == [f"base_model:adapter:{base_dir}", "lora", "transformers"]


def test_existing_model_card_keeps_its_text_and_gains_missing_metadata(model, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nHand-written.\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "mit" and meta["tags"] == ["mine"] and meta["library_name"] == "peft"
    assert card.endswith("# My adapter\n\nHand-written.\n")


def test_plain_save_leaves_rng_untouched(model, tmp_path):
    before = torch.get_rng_state()
    model.save_pretrained(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)


def test_rank_slices_and_empty_tensors_never_reach_a_file(model, tmp_path):
    """The save guard (check_saveable): a rank's slice or an empty shard, as an FSDP rank holds them, is refused
    before anything is written (the FSDP2 DTensor case runs under torchrun in tests/runtime/test_distributed.py)."""
    from adapterflow import get_adapter_state_dict, write_adapters
    from adapterflow.state_dict import AdapterSaveError, check_saveable

    config = model.peft_config["default"]
    state = get_adapter_state_dict(model, config)
    a_key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    b_key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    for broken, fragment in (({a_key: state[a_key][:2]}, f"{a_key}: shape (2, 32), but r=4 must be its dimension 0"),
                             ({a_key: torch.empty(0)}, f"{a_key}: an empty tensor (0,)")):
        with pytest.raises(AdapterSaveError, match=r"Refusing to save the adapter") as error:
            write_adapters(tmp_path / "out", {"default": ({**state, **broken}, config)})
        assert fragment in str(error.value)
    assert not (tmp_path / "out").exists()
    half_b = {**state, b_key: state[b_key][:16]}  # (out/2, r): only the model knows out_features
    check_saveable(half_b, config)
    with pytest.raises(AdapterSaveError, match=r"q_proj.lora_B.weight: checkpoint \(16, 4\) vs model \(32, 4\)"):
        check_saveable(half_b, config, model)
