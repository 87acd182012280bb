"""Adapters never disturb each other: for every way to add a second adapter, the outputs of the adapter already in
the model stay bit for bit the same, or the call is refused before anything changes. PEFT is the oracle for the
allowed cases (same weights, same logits for both adapters) and shows the hazard of the refused ones."""

import warnings

import peft
import pytest
import torch

from adapterflow import AdapterLoadError, AdapterModel, ConfigError, LoraConfig, get_adapter_model
from tiny import logits, randomize_adapters

FIRST = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embeddings": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "pissa": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"),
}
SECOND = {
    "lora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "embeddings": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False),
}
REFUSED_SECOND = {
    "bias": (dict(r=2, target_modules=["k_proj"], bias="all"), "only a single adapter may train them"),
    "pissa": (dict(r=2, target_modules=["k_proj"], init_lora_weights="pissa"), "rewrites the base weights"),
    "modules_to_save_on_lora": (dict(r=2, target_modules=["k_proj"], modules_to_save=["q_proj"]),
                                "modules_to_save .*q_proj.* holds LoRA layers"),
}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, names_before):
    after = model.state_dict()
    assert list(after) == list(before), "the model's structure changed"
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a tensor changed"
    assert [n for n, _ in model.named_modules()] == names_before


def first_model(load_base, kind):
    model = quiet(get_adapter_model, load_base(), LoraConfig(**FIRST[kind]))
    randomize_adapters(model)
    return model


def peft_twin(load_base, ours, configs):
    """The same adapters in PEFT, with our tensors copied in (the state-dict names are the same)."""
    names = list(configs)
    theirs = quiet(peft.get_peft_model, load_base(), peft.LoraConfig(**configs[names[0]]))
    for name in names[1:]:
        quiet(theirs.add_adapter, name, peft.LoraConfig(**configs[name]))
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    return theirs


@pytest.mark.parametrize("second", SECOND)
@pytest.mark.parametrize("first", FIRST)
def test_add_adapter_leaves_the_first_adapter_unchanged(first, second, load_base, input_ids):
    model = first_model(load_base, first)
    expected = logits(model, input_ids)
    quiet(model.add_adapter, "other", LoraConfig(**SECOND[second]))
    assert torch.equal(logits(model, input_ids), expected)
    model.set_adapter("other")
    other = logits(model, input_ids)
    model.set_adapter("default")
    assert torch.equal(logits(model, input_ids), expected)
    if first != "pissa":  # PEFT would run its own SVD; the structure check below needs the same base weights
        theirs = peft_twin(load_base, model, {"default": FIRST[first], "other": SECOND[second]})
        torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-5, rtol=0)
        theirs.set_adapter("other")
        torch.testing.assert_close(logits(theirs, input_ids), other, atol=1e-5, rtol=0)


@pytest.mark.parametrize("second", REFUSED_SECOND)
@pytest.mark.parametrize("first", ["lora", "modules_to_save"])
def test_add_adapter_that_would_disturb_the_first_is_refused_before_any_change(first, second, load_base, input_ids):
    model = first_model(load_base, first)
    expected, before, names = logits(model, input_ids), state(model), [n for n, _ in model.named_modules()]
    config, match = REFUSED_SECOND[second]
    with pytest.raises(ConfigError, match=match):
        model.add_adapter("other", LoraConfig(**config))
    assert_unchanged(model, before, names)
    assert list(model.peft_config) == ["default"] and torch.equal(logits(model, input_ids), expected)


def test_a_bias_adapter_refuses_any_second_adapter_and_peft_refuses_two(load_base):
    model = get_adapter_model(load_base(), LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(ConfigError, match=r"bias='none' \(new\) and \{'default': 'all'\}"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    theirs = quiet(peft.get_peft_model, load_base(), peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"], bias="all"))


@pytest.fixture
def first_saved(load_base, tmp_path):
    model = first_model(load_base, "lora")
    model.save_pretrained(tmp_path / "first")
    return tmp_path / "first"


def save_second(load_base, tmp_path, kind):
    """A saved second adapter of `kind`; returns its folder."""
    folder = tmp_path / kind
    if kind == "converted_pissa":
        model = get_adapter_model(load_base(), LoraConfig(**FIRST["pissa"]))
        model.save_pretrained(tmp_path / "pissa_initial")
        randomize_adapters(model)
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=tmp_path / "pissa_initial")
        return folder
    configs = {**SECOND, "pissa_unconverted": FIRST["pissa"],
               "bias": dict(r=2, target_modules=["k_proj"], bias="all")}
    model = quiet(get_adapter_model, load_base(), LoraConfig(**configs[kind]))
    randomize_adapters(model, seed=5)
    if kind == "bias":
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.o_proj.bias.add_(1.0)  # "trained" biases
    quiet(model.save_pretrained, folder)
    return folder


@pytest.mark.parametrize("kind", ["lora", "modules_to_save", "embeddings", "converted_pissa"])
def test_load_adapter_leaves_the_first_adapter_unchanged(kind, first_saved, load_base, input_ids, tmp_path):
    second = save_second(load_base, tmp_path, kind)
    model = AdapterModel.from_pretrained(load_base(), first_saved)
    expected = logits(model, input_ids)
    quiet(model.load_adapter, second, "other")
    assert torch.equal(logits(model, input_ids), expected)
    model.set_adapter("other")
    other = logits(model, input_ids)
    theirs = quiet(peft.PeftModel.from_pretrained, load_base(), first_saved)
    quiet(theirs.load_adapter, second, adapter_name="other")
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-5, rtol=0)
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(theirs, input_ids), other, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, error, match", [
    ("bias", ConfigError, "only a single adapter may train them"),
    ("pissa_unconverted", ConfigError, "rewrites the base weights.*path_initial_model_for_weight_conversion"),
])
def test_load_adapter_that_would_disturb_the_first_is_refused(kind, error, match, first_saved, load_base, input_ids,
                                                              tmp_path):
    second = save_second(load_base, tmp_path, kind)
    model = AdapterModel.from_pretrained(load_base(), first_saved)
    expected, before, names = logits(model, input_ids), state(model), [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        quiet(model.load_adapter, second, "other")
    assert_unchanged(model, before, names)
    assert list(model.peft_config) == ["default"] and torch.equal(logits(model, input_ids), expected)
    # The hazard, in PEFT: the same load moves the first adapter's logits.
    theirs = quiet(peft.PeftModel.from_pretrained, load_base(), first_saved)
    quiet(theirs.load_adapter, second, adapter_name="other")
    assert (logits(theirs, input_ids) - expected).abs().max() > 1e-3


def test_saved_base_tensors_that_differ_are_refused_and_equal_ones_load(first_saved, load_base, input_ids, tmp_path):
    donor = get_adapter_model(load_base(), LoraConfig(r=2, target_modules=["k_proj"]))
    donor.save_pretrained(tmp_path / "same", save_embedding_layers=True)  # the base's own embeddings: harmless
    with torch.no_grad():
        donor.base_model.model.lm_head.weight.mul_(2.0)
    donor.save_pretrained(tmp_path / "changed", save_embedding_layers=True)
    model = AdapterModel.from_pretrained(load_base(), first_saved)
    expected, before, names = logits(model, input_ids), state(model), [n for n, _ in model.named_modules()]
    with pytest.raises(AdapterLoadError, match=r"would overwrite base-model tensors .*\['default'\].*lm_head.weight"):
        model.load_adapter(tmp_path / "changed", "other")
    assert_unchanged(model, before, names)
    model.load_adapter(tmp_path / "same", "other")
    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.parametrize("training", [False, True])
def test_add_and_load_keep_the_mode_and_the_trainable_set(training, first_saved, load_base):
    model = AdapterModel.from_pretrained(load_base(), first_saved, is_trainable=True).train(training)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter("added", LoraConfig(r=2, target_modules=["k_proj"], lora_dropout=0.1))
    model.load_adapter(first_saved, "loaded")
    assert model.training is training
    assert {m.training for m in model.modules()} == {training}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
