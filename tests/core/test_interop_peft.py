"""Interop with real PEFT (the oracle): our files load in PEFT with identical outputs, PEFT's files load in ours,
and for the same weights both write the same keys, shapes, dtypes, metadata and config values."""

import json
import re
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from tiny import ADAPTER_CASES, logits, randomize_adapters

CASES = ADAPTER_CASES
ATOL = 1e-5


def peft_config(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)


def ours(load_base, seed=0, **kwargs) -> AdapterModel:
    model = get_adapter_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **kwargs))
    randomize_adapters(model, seed)
    return model


def load_in_peft(load_base, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base(), path, **kwargs)


def tensors(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return f.metadata(), {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_identical_logits(case, load_base, input_ids, tmp_path):
    model = ours(load_base, **CASES[case])
    model.save_pretrained(tmp_path)
    theirs = load_in_peft(load_base, tmp_path)
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_ours_with_identical_logits(case, load_base, input_ids, tmp_path):
    theirs = peft.get_peft_model(load_base(), peft_config(**CASES[case]))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(load_base(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(theirs, input_ids), atol=ATOL, rtol=0)


def targeted_modules(model, target_modules):
    names = [n for n, _ in model.named_modules()]
    if isinstance(target_modules, str):
        return {n for n in names if re.fullmatch(target_modules, n)}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)}


@pytest.mark.parametrize("case", CASES)
def test_same_weights_give_peft_files(case, load_base, tmp_path):
    """Both libraries build the adapter from the same settings; PEFT gets our weights; both save: the two folders
    must agree on keys, shapes, dtypes, metadata and every config value PEFT writes."""
    model = ours(load_base, **CASES[case])
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(load_base(), peft_config(**CASES[case]))
    result = peft.set_peft_model_state_dict(theirs, load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert not [k for k in result.missing_keys if "lora_" in k]
    theirs.save_pretrained(tmp_path / "peft")
    our_meta, our_tensors = tensors(tmp_path / "ours")
    peft_meta, peft_tensors = tensors(tmp_path / "peft")
    assert our_meta == peft_meta == {"format": "pt"}
    assert our_tensors == peft_tensors
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    missing = set(peft_config_written) - set(our_config) - {"peft_version"}
    assert not missing
    for key, value in peft_config_written.items():
        if key == "peft_version":
            continue
        if key == "target_modules":  # PEFT writes set order, and "all-linear" as full module names
            base = load_base()
            assert targeted_modules(base, our_config[key]) == targeted_modules(base, value)
        else:
            assert our_config[key] == value, key


def test_second_named_adapter_round_trips_both_ways(load_base, input_ids, tmp_path):
    model = ours(load_base, **CASES["default"])
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    randomize_adapters(model, seed=1)
    model.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    theirs = load_in_peft(load_base, tmp_path / "ours")
    theirs.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    back = AdapterModel.from_pretrained(load_base(), tmp_path / "peft")
    back.load_adapter(tmp_path / "peft" / "other", "other")
    back.set_adapter("other")
    torch.testing.assert_close(logits(back, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)


def test_bin_format_round_trips_both_ways(load_base, input_ids, tmp_path):
    model = ours(load_base, **CASES["modules_to_save"])
    model.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin",
                                                                       "adapterflow.json"]
    theirs = load_in_peft(load_base, tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    back = AdapterModel.from_pretrained(load_base(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)
    assert torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True).keys() == torch.load(
        tmp_path / "peft" / "adapter_model.bin", weights_only=True).keys()


def test_converted_pissa_loads_in_peft_on_the_original_base(load_base, input_ids, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **CASES["pissa"]))
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)  # stands in for training
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = load_in_peft(load_base, tmp_path / "converted")
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)


def test_peft_converted_pissa_loads_in_ours(load_base, input_ids, tmp_path):
    theirs = peft.get_peft_model(load_base(), peft_config(**CASES["pissa"]))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for saving the initial adapter
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize_adapters(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours_loaded = AdapterModel.from_pretrained(load_base(), tmp_path / "converted")
    assert ours_loaded.peft_config["default"].r == 8
    torch.testing.assert_close(logits(ours_loaded, input_ids), logits(theirs, input_ids), atol=ATOL, rtol=0)
