"""LoraConfig: PEFT's names and defaults, validation, and lossless adapter_config.json round trips."""

import dataclasses
import json

import peft
import pytest

from adapterflow import AdapterLoadError, ConfigError, LoraConfig


def test_field_defaults_match_peft():
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    for field in dataclasses.fields(LoraConfig):
        if field.name in ("extra_fields", "target_modules", "peft_type"):
            continue
        peft_field = theirs[field.name]
        ours_default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        peft_default = (peft_field.default_factory() if peft_field.default_factory is not dataclasses.MISSING
                        else peft_field.default)
        assert ours_default == peft_default, field.name
    assert LoraConfig(target_modules=["q"]).peft_type == peft.LoraConfig().peft_type == "LORA"


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, lora_dropout=1.5, bias="some", target_modules=["q_proj"], init_lora_weights="loftq",
                   rank_pattern={"q": -1})
    message = str(info.value)
    for expected in ("r must be a positive integer, got 0", "lora_dropout must be in [0, 1)", "bias must be one of",
                     "init_lora_weights='loftq' is not supported", "rank_pattern values must be positive"):
        assert expected in message


def test_target_modules_is_required_and_layer_options_are_checked():
    with pytest.raises(ConfigError, match="target_modules is required"):
        LoraConfig()
    with pytest.raises(ConfigError, match="layers_pattern needs layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="cannot be combined with a regex target_modules"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_sets_are_stored_sorted():
    config = LoraConfig(target_modules={"v_proj", "q_proj", "k_proj"})
    assert config.target_modules == ["k_proj", "q_proj", "v_proj"]


def test_peft_written_config_round_trips_losslessly(tmp_path):
    peft_config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft_config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    written["some_future_peft_field"] = {"kept": [1, 2]}
    with pytest.warns(UserWarning, match=r"keys adapterflow does not know: \['some_future_peft_field'\]") as record:
        config = LoraConfig.from_dict(written)
    assert len([w for w in record if "does not know" in str(w.message)]) == 1  # one warning, peft_version not in it
    assert config.extra_fields["peft_version"] == written["peft_version"]
    assert config.to_dict() == written


def test_save_and_load_pretrained(tmp_path):
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights="pissa_niter_4")
    config.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.inference_mode is True  # saved as PEFT saves it
    loaded.inference_mode = False
    assert loaded == config


def test_broken_json_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json at"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json is not readable JSON"):
        LoraConfig.from_pretrained(tmp_path)


def test_rank_and_alpha_patterns_match_module_name_suffixes():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                        alpha_pattern={"q_proj": 4})
    assert config.rank_and_alpha("model.layers.1.self_attn.q_proj") == (2, 4)
    assert config.rank_and_alpha("model.layers.0.self_attn.q_proj") == (8, 4)
    assert config.rank_and_alpha("model.layers.11.self_attn.q_proj") == (8, 4)
