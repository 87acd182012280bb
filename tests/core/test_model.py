"""AdapterModel: trainability, adapter management, init methods, merge, passthrough."""

import pytest
import torch

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from adapterflow.layers import AdapterLayer
from tiny import load_llama, logits, randomize_adapters

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_adapter_parameters_are_trainable(load_base):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    names = trainable(model)
    assert names and all(any(k in n for k in (".lora_A.default.", ".lora_B.default.", "lora_embedding_A.default",
                                               "lora_embedding_B.default", "modules_to_save.default.")) for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" not in names


@pytest.mark.parametrize("bias, expected", [("all", 8), ("lora_only", 4)])
def test_bias_options_train_the_right_biases(load_base, bias, expected):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG, bias=bias))
    assert len([n for n in trainable(model) if n.endswith(".bias")]) == expected  # 2 layers x (q,k,v,o) / (q,v)


def test_default_init_is_a_no_op_and_other_inits_are_not(load_base, input_ids):
    expected = logits(load_base(), input_ids)
    for init in (True, "gaussian"):
        torch.testing.assert_close(logits(get_adapter_model(load_base(), LoraConfig(**CONFIG, init_lora_weights=init)), input_ids), expected)
    random_model = get_adapter_model(load_base(), LoraConfig(**CONFIG, init_lora_weights=False))
    assert (logits(random_model, input_ids) - expected).abs().max() > 1e-3
    gaussian = get_adapter_model(load_base(), LoraConfig(r=16, target_modules=["gate_proj"], init_lora_weights="gaussian"))
    lora_a = gaussian.base_model.model.model.layers[0].mlp.gate_proj.lora_A["default"].weight
    assert abs(lora_a.std().item() - 1 / 16) < 0.01


def test_half_precision_base_keeps_fp32_adapters(base_dir, input_ids):
    model = get_adapter_model(load_llama(base_dir, dtype=torch.bfloat16), LoraConfig(**CONFIG))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert model(input_ids).logits.dtype == torch.bfloat16


def test_add_set_delete_and_disable(load_base, input_ids):
    base_logits = logits(load_base(), input_ids)
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG))
    randomize_adapters(model)
    default_logits = logits(model, input_ids)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    assert model.active_adapter == "default" and not any(".other." in n for n in trainable(model))
    torch.testing.assert_close(logits(model, input_ids), default_logits)
    model.set_adapter("other")
    assert trainable(model) and all(".other." in n for n in trainable(model))
    torch.testing.assert_close(logits(model, input_ids), base_logits)  # "other" is still a no-op
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base_logits)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert not any("k_proj" in n and "lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, input_ids), default_logits)
    with pytest.raises(ValueError, match=r"Adapter 'nope' not found; adapters: \['default'\]"):
        model.set_adapter("nope")


def test_deleting_the_last_adapter_restores_the_plain_model(load_base, input_ids):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    model.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, input_ids), logits(load_base(), input_ids))


def test_merge_and_unload_returns_the_plain_model_with_the_same_outputs(load_base, input_ids):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    randomize_adapters(model)
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)


def test_print_trainable_parameters_and_passthrough(load_base, capsys):
    model = get_adapter_model(load_base(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == 2 * (4 * 32 + 32 * 4)
    assert capsys.readouterr().out == (f"trainable params: {trainable_count:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable_count / total:.4f}\n")
    assert model.config.model_type == "llama"  # read from the wrapped model
    assert model.get_base_model() is model.base_model.model


def test_wrapping_twice_and_bad_adapter_names_are_refused(load_base):
    model = get_adapter_model(load_base(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapters; add more with AdapterModel.add_adapter"):
        get_adapter_model(model.get_base_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Invalid adapter name '../x'"):
        model.add_adapter("../x", LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="Adapter 'default' already exists"):
        model.add_adapter("default", LoraConfig(r=4, target_modules=["v_proj"]))


def test_state_dict_names_match_peft(load_base):
    import peft

    ours = get_adapter_model(load_base(), LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    theirs = peft.get_peft_model(load_base(), peft.LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(ours, AdapterModel)  # the public type of get_adapter_model's result
