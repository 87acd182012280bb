"""merge_adapter: the merged base model against PEFT's merge_and_unload (the oracle) and against base + adapter,
for every adapter shape the library writes; PiSSA converted and unconverted give the same merged weights."""

import warnings

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from adapterflow.layers import AdapterLayer
from adapterflow.merge import merge_adapter
from tiny import load_llama, logits, randomize_adapters

CASES = {
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embed_tokens": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only"),
    "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="all"),
}
ATOL = 1e-5


def saved_adapter(load_base, folder, seed=0, **config):
    """A 'trained' adapter (random factors, modules_to_save copies and biases) saved in folder; its model."""
    model = get_adapter_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **config))
    randomize_adapters(model, seed)
    with torch.no_grad():  # trained biases differ from the base's: a merge that drops them shows
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith(".bias"):
                param.add_(0.5)
    model.save_pretrained(folder)
    return model


def peft_merged(load_base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base(), folder).merge_and_unload()


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_equal_peft_merge_and_unload(case, load_base, input_ids, tmp_path):
    model = saved_adapter(load_base, tmp_path, **CASES[case])
    expected = logits(model, input_ids)
    merged = merge_adapter(load_base(), tmp_path)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    theirs = peft_merged(load_base, tmp_path).state_dict()
    ours = merged.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    assert any(not torch.equal(ours[k], load_base().state_dict()[k]) for k in ours)  # something was merged
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=ATOL, rtol=0)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    load = lambda: GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")  # noqa: E731
    saved_adapter(load, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], r=4)
    ids = torch.randint(0, 64, (2, 8))
    merged = merge_adapter(load(), tmp_path / "adapter")
    theirs = peft_merged(load, tmp_path / "adapter")
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight,
                               theirs.transformer.h[0].attn.c_attn.weight, atol=ATOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", [dict(target_modules=["embed_tokens", "q_proj"]),
                                    dict(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["lora_on_tied_embedding", "modules_to_save_tied_head"])
def test_tied_embeddings_are_untied_so_only_the_adapted_module_changes(config, tied_base_dir, input_ids, tmp_path):
    load = lambda: load_llama(tied_base_dir)  # noqa: E731
    model = saved_adapter(load, tmp_path / "adapter", r=4, lora_alpha=8, **config)
    expected = logits(model, input_ids)
    merged = merge_adapter(load(), tmp_path / "adapter")
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=ATOL, rtol=0)
    merged.save_pretrained(tmp_path / "merged")  # transformers saves both matrices and does not tie them again
    torch.testing.assert_close(logits(load_llama(tmp_path / "merged"), input_ids), expected, atol=ATOL, rtol=0)


def test_pissa_converted_on_the_original_and_unconverted_on_the_residual_merge_alike(load_base, input_ids, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights="pissa",
                        task_type="CAUSAL_LM")
    model = get_adapter_model(load_base(), config)
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    model.save_pretrained(tmp_path / "pissa")  # unconverted: its factors act on the residual base
    converted = merge_adapter(load_base(), tmp_path / "converted")  # LoRA r=8 on the original base
    on_residual = merge_adapter(load_base(), tmp_path / "pissa")  # the loader derives the residual (exact SVD)
    trained = merge_adapter(model)  # the trained model itself: residual + trained factors
    for other in (on_residual, trained):
        for key, value in converted.state_dict().items():
            torch.testing.assert_close(value, other.state_dict()[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(logits(converted, input_ids), expected, atol=ATOL, rtol=0)
    theirs = peft_merged(load_base, tmp_path / "converted").state_dict()
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("base_dtype, dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, None)])
def test_dtype_is_rounded_once_from_the_fp32_sum(base_dtype, dtype, base_dir, tmp_path):
    saved_adapter(lambda: load_llama(base_dir), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    merged = merge_adapter(load_llama(base_dir, dtype=base_dtype), tmp_path, dtype=dtype)
    out = dtype or base_dtype
    assert {p.dtype for p in merged.parameters()} == {out}
    exact = merge_adapter(load_llama(base_dir, dtype=base_dtype).float(), tmp_path)  # the fp32 sum
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged.state_dict()[q], exact.state_dict()[q].to(out))


def test_an_adapter_model_is_merged_without_reloading_and_bad_calls_say_why(load_base, tmp_path):
    model = saved_adapter(load_base, tmp_path, r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="pass a base model with adapter_dir, or an AdapterModel without it"):
        merge_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="a base model needs adapter_dir"):
        merge_adapter(load_base())
    with pytest.raises(ValueError, match="'other' not found"):
        merge_adapter(model, adapter_name="other")
    assert isinstance(AdapterModel.from_pretrained(load_base(), tmp_path), AdapterModel)
    assert type(merge_adapter(model)).__name__ == "LlamaForCausalLM"
