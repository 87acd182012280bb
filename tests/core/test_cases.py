"""Regression tests from public PEFT bug reports (the situations of ../shared/cases/, each with its own input and
expected value). Expected values come from PEFT 0.21 on the same input where PEFT is right, otherwise from what
the report's discussion settled on (said per test)."""

import json
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from adapterflow.layers import LoraLayer

X = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))


def llama(layers=2, causal_lm=True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (LlamaForCausalLM if causal_lm else LlamaModel)(config).eval()


@torch.no_grad()
def perturb(model, seed=3, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def requires_grad_by_adapter(model):
    out = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for layer in ("lora_A", "lora_B"):
            if layer in parts:
                out.setdefault(parts[parts.index(layer) + 1], set()).add(param.requires_grad)
    return {k: sorted(v) for k, v in sorted(out.items())}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_02_load_adapter_is_trainable_applies_to_the_loaded_adapter(tmp_path):
    """huggingface/peft#3487 (fixed in 0.21 by #3495). Oracle: PEFT's requires_grad per adapter."""
    get_adapter_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    theirs = quiet(peft.PeftModel.from_pretrained, llama(), tmp_path)
    theirs.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    ours = AdapterModel.from_pretrained(llama(), tmp_path)
    ours.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert requires_grad_by_adapter(ours) == requires_grad_by_adapter(theirs) == {"default": [False], "other": [True]}
    ours.load_adapter(tmp_path, adapter_name="third")  # a later frozen load leaves "other" trainable, as in PEFT
    assert requires_grad_by_adapter(ours)["other"] == [True] and requires_grad_by_adapter(ours)["third"] == [False]


@pytest.mark.parametrize("how", ["get_adapter_model", "add_adapter", "load_adapter"])
def test_03_eval_mode_is_kept_and_forward_is_deterministic(how, tmp_path):
    """huggingface/peft#3753 (accepted, unfixed in 0.21.2): wrapping an eval() model must keep eval mode, so LoRA
    dropout is off and two identical forwards agree."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    model = get_adapter_model(llama(), LoraConfig(**kwargs))
    if how != "get_adapter_model":
        model.save_pretrained(tmp_path)
        model = get_adapter_model(llama(), LoraConfig(r=2, target_modules=["k_proj"]))
        if how == "add_adapter":
            model.add_adapter("other", LoraConfig(**kwargs))
        else:
            model.load_adapter(tmp_path, "other")
        model.set_adapter("other")
    with torch.no_grad():
        first, second = model(input_ids=X).logits, model(input_ids=X).logits
    assert not model.training and torch.equal(first, second)
    assert {m.training for m in model.modules() if isinstance(m, nn.Dropout)} == {False}
    model.train()  # and train() still switches dropout on
    assert {m.training for m in model.modules() if isinstance(m, nn.Dropout)} == {True}


def test_03_train_mode_is_kept_too():
    base = llama().train()
    model = get_adapter_model(base, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    assert model.training and all(m.training for m in model.modules())


def test_05_fan_in_fan_out_is_saved_as_peft_corrects_it(tmp_path):
    """huggingface/peft#324: fan_in_fan_out=True on nn.Linear targets is corrected to False with a warning.
    Oracle: PEFT's saved adapter_config.json."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], fan_in_fan_out=True)
    quiet(peft.get_peft_model, llama(), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_adapter_model(llama(), LoraConfig(**kwargs))
    model.save_pretrained(tmp_path / "ours")
    expected = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"]
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is expected is False
    assert model.peft_config["default"].fan_in_fan_out is False


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_no_bias = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return torch.relu(self.linear_no_bias(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.msa_pair_weighted_averaging = _Block()
        self.weight_head = nn.Linear(8, 4)

    def forward(self, x):
        return self.weight_head(self.msa_pair_weighted_averaging(x))


def _net():
    torch.manual_seed(0)
    return _Net().eval()


def test_09_module_names_containing_weight_reload_exactly(tmp_path):
    """huggingface/peft#2772: key renaming must not touch "weight" inside module names."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    model = get_adapter_model(_net(), LoraConfig(r=2, lora_alpha=4, target_modules=["linear_no_bias", "weight_head"]))
    perturb(model, scale=0.1)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(quiet(peft.PeftModel.from_pretrained, _net(), tmp_path)(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(AdapterModel.from_pretrained(_net(), tmp_path)(x), expected, atol=1e-6, rtol=0)


def r_and_scaling(model):
    return {n.removeprefix("base_model.model."): (m.r["default"], round(float(m.scaling["default"]), 6))
            for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def test_11_rank_and_alpha_patterns_of_different_generality(tmp_path):
    """huggingface/peft#2194 (fixed by #2195). Oracle: PEFT's per-module r and scaling, and PEFT reloading ours."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                  alpha_pattern={"layers.0.self_attn.q_proj": 32})
    model = get_adapter_model(llama(), LoraConfig(**kwargs))
    expected = r_and_scaling(quiet(peft.get_peft_model, llama(), peft.LoraConfig(**kwargs)))
    assert r_and_scaling(model) == expected
    assert expected["model.layers.0.self_attn.q_proj"] == (2, 16.0) and expected["model.layers.1.self_attn.q_proj"] == (2, 4.0)
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids=X).logits
        model.save_pretrained(tmp_path)
        reloaded = quiet(peft.PeftModel.from_pretrained, llama(), tmp_path)(input_ids=X).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)


def test_13_layers_pattern_with_the_layer_list_at_the_root(tmp_path):
    """huggingface/peft#3610: a bare LlamaModel ("layers.0...."). Oracle: PEFT's adapted modules and reload."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")
    adapted = lambda m: sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules() if hasattr(mod, "lora_A"))
    expected = adapted(quiet(peft.get_peft_model, llama(3, causal_lm=False), peft.LoraConfig(**kwargs)))
    model = get_adapter_model(llama(3, causal_lm=False), LoraConfig(**kwargs))
    assert adapted(model) == expected == ["layers.0.self_attn.q_proj"]
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids=X).last_hidden_state
        model.save_pretrained(tmp_path)
        reloaded = quiet(peft.PeftModel.from_pretrained, llama(3, causal_lm=False), tmp_path)(input_ids=X).last_hidden_state
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)


def test_15_converted_save_keeps_the_adapter_trainable(tmp_path):
    """huggingface/peft PR #3290 / #3487: a converted checkpoint mid-training must not freeze the adapter.
    Oracle: PEFT keeps the trainable set; expected here also: the next step updates every tensor, train mode."""
    config = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = get_adapter_model(llama().train(), LoraConfig(**config))
    model.save_pretrained(tmp_path / "init")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)

    def step():
        loss = model(input_ids=X, labels=X).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path / "ckpt", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before and len(before) == 8
    snapshot = [p.detach().clone() for p in params]
    step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(snapshot, params)) and model.training
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLayer)
