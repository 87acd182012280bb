"""Which modules an adapter config adapts (PEFT's matching rules), and the errors when it does not fit."""

import json
import warnings

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adapterflow import AdapterModel, LoraConfig, TargetError, get_adapter_model
from adapterflow.layers import LoraLayer, ModulesToSaveWrapper
from tiny import logits, randomize_adapters


def adapted(model):
    return sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer))


def peft_adapted(model):
    return sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*layers\.1\..*(gate|up)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["down_proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*\.0\..*"),
    dict(target_modules=["q_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
])
def test_same_modules_as_peft(kwargs, load_base):
    ours = get_adapter_model(load_base(), LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_base(), peft.LoraConfig(**kwargs))
    assert adapted(ours) == peft_adapted(theirs) and adapted(ours)


def test_all_linear_skips_the_output_head_and_is_saved_as_module_names(load_base):
    model = get_adapter_model(load_base(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in adapted(model)
    assert model.peft_config["default"].target_modules == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_modules_to_save_wraps_a_trainable_copy(load_base):
    model = get_adapter_model(load_base(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper)
    assert head.modules_to_save["default"].weight.requires_grad and not head.original_module.weight.requires_grad
    assert head.weight is head.original_module.weight  # attribute reads reach the wrapped module


def test_nothing_matched_lists_the_module_names_that_exist(load_base):
    with pytest.raises(TargetError) as info:
        get_adapter_model(load_base(), LoraConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "matches no adaptable module of LlamaForCausalLM" in message
    assert "['down_proj', 'embed_tokens', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in message


def test_unsupported_layer_type_is_an_error(load_base):
    with pytest.raises(TargetError, match=r"'model.norm' \(LlamaRMSNorm\) matches target_modules but LoRA supports only"):
        get_adapter_model(load_base(), LoraConfig(target_modules=["q_proj", "norm"]))


def test_entries_that_match_nothing_are_reported(load_base):
    with pytest.warns(UserWarning, match=r"entries \['v_prj'\] match no module"):
        get_adapter_model(load_base(), LoraConfig(target_modules=["q_proj", "v_prj"]))


def test_rank_and_alpha_patterns_apply_per_module(load_base):
    model = get_adapter_model(load_base(), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32}))
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.v_proj.r["default"] == 2 and layers[0].self_attn.q_proj.scaling["default"] == 1.0
    assert layers[1].self_attn.q_proj.scaling["default"] == 4.0


def test_gpt2_conv1d_layers(tmp_path):
    """transformers' Conv1D stores weights (in, out): fan_in_fan_out is set, and PEFT agrees on the result."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    load = lambda: GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    model = get_adapter_model(load(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"))
    assert model.peft_config["default"].fan_in_fan_out is True
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)
    merged = AdapterModel.from_pretrained(load(), tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj"], layers_to_transform=[]),  # PEFT: an empty list means every layer
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj"], layers_to_transform=[], layers_pattern="layers"),
    # an exact module path is adapted whatever layers_to_transform says
    dict(target_modules=["model.layers.0.self_attn.k_proj", "q_proj"], layers_to_transform=[1]),
    dict(target_modules=["model.layers.1.mlp.up_proj"], layers_to_transform=[0], layers_pattern="layers"),
])
def test_layers_to_transform_in_every_form_as_peft(kwargs, load_base):
    ours = get_adapter_model(load_base(), LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_base(), peft.LoraConfig(**kwargs))
    assert adapted(ours) == peft_adapted(theirs) and adapted(ours)


def test_layers_to_transform_that_selects_nothing_is_blamed_on_it(load_base):
    with pytest.raises(TargetError, match=r"layers_to_transform=\[5\] .*selects none of the 2 modules.*indices are \[0, 1\]"):
        get_adapter_model(load_base(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


def test_twenty_or_more_target_modules_are_saved_as_peft_saves_them(tmp_path):
    """PEFT replaces a list of 20+ module paths by the shortest suffixes matching the same modules."""
    from transformers import LlamaForCausalLM

    from tiny import tiny_llama_config

    def load():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))

    names = [n for n, m in load().named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert len(names) == 21
    ours = get_adapter_model(load(), LoraConfig(r=2, target_modules=names))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(), peft.LoraConfig(r=2, target_modules=names))
    theirs.save_pretrained(tmp_path / "peft")
    read = lambda p: json.loads((p / "adapter_config.json").read_text())["target_modules"]
    assert sorted(read(tmp_path / "ours")) == sorted(read(tmp_path / "peft")) and len(read(tmp_path / "ours")) < 21
    assert adapted(ours) == peft_adapted(theirs)
