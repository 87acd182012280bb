"""Verification of saved adapters and the checks on extracted state dicts."""

import pytest
import torch

from adapterflow import LoraConfig, get_adapter_model, get_adapter_state_dict
from adapterflow.verify import VerificationError, check_extracted_state, verify_adapter
from tiny import randomize_adapters

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def trained(load_base, tmp_path, input_ids):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        logits = model.eval()(input_ids).logits
    return model, tmp_path / "adapter", {"input_ids": input_ids}, logits


def test_a_faithful_adapter_passes(trained, load_base):
    _, folder, probe, logits = trained
    report = verify_adapter(load_base(), folder, probe, logits, atol=1e-5)
    assert report.passed and report.tensors_loaded == 8 and report.max_abs_diff <= 1e-5


def test_other_logits_or_untrained_modules_fail(trained, load_base, tmp_path):
    model, folder, probe, logits = trained
    with pytest.raises(VerificationError, match="logits differ from the trained model's by") as error:
        verify_adapter(load_base(), folder, probe, logits + 0.1, atol=1e-3)
    assert not error.value.report.passed and error.value.report.max_abs_diff == pytest.approx(0.1, abs=1e-4)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.zero_()
    model.save_pretrained(tmp_path / "half-trained")
    with pytest.raises(VerificationError, match="lora_B is all zero in 1 modules .*layers.1.self_attn.v_proj"):
        verify_adapter(load_base(), tmp_path / "half-trained", probe, logits, atol=10.0)


def test_broken_extracted_states_are_refused(trained):
    model = trained[0]
    state = get_adapter_state_dict(model, model.peft_config["default"])
    check_extracted_state(model, "default", state)  # the real one is fine
    broken = dict(state)
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    broken[key_a] = torch.empty(0, 32)  # what a ZeRO-3 state dict without its shards looks like
    broken["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.full((32, 4), float("nan"))
    for key in [k for k in broken if "layers.1.self_attn.q_proj" in k]:
        del broken[key]
    with pytest.raises(VerificationError) as error:
        check_extracted_state(model, "default", broken)
    message = str(error.value)
    assert "empty tensor (0, 32)" in message and "contains NaN or Inf" in message
    assert "layers.1.self_attn.q_proj: targeted but has no tensors" in message
