"""Loading adapters: every refused load names the problem, and leaves the user's model as it was."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterflow import AdapterLoadError, AdapterModel, ConfigError, LoraConfig, get_adapter_model
from adapterflow.layers import AdapterLayer
from tiny import logits, randomize_adapters

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def saved(load_base, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    # These tests edit the files by hand to reach the loader's own checks, as for a folder PEFT wrote: without
    # the manifest, which would refuse every edited file first (tests/core/test_manifest.py).
    (tmp_path / "adapter" / "adapterflow.json").unlink()
    return tmp_path / "adapter"


def rewrite_weights(folder, edit):
    state = load_file(folder / "adapter_model.safetensors")
    edit(state)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def assert_untouched(base, reference):
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    for (name, param), (_, ref) in zip(base.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(param, ref), name


def test_missing_key_is_an_error_naming_it(saved, load_base):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_weights(saved, lambda state: state.pop(key))
    base = load_base()
    with pytest.raises(AdapterLoadError, match=rf"missing from the checkpoint \(1\):\n    {key}"):
        AdapterModel.from_pretrained(base, saved)
    assert_untouched(base, load_base())


def test_unexpected_and_misshaped_keys_are_listed_together(saved, load_base):
    def edit(state):
        state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 32)

    rewrite_weights(saved, edit)
    with pytest.raises(AdapterLoadError) as info:
        AdapterModel.from_pretrained(load_base(), saved)
    message = str(info.value)
    assert "unexpected in the checkpoint (1):\n    base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in message
    assert "layers.0.self_attn.q_proj.lora_A.weight: checkpoint (3, 32) vs model (4, 32)" in message


def test_config_rank_that_does_not_fit_the_weights(saved, load_base):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 2
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=r"shape mismatch \(8\)"):
        AdapterModel.from_pretrained(load_base(), saved)


def test_missing_folder_and_missing_weights(saved, load_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter folder at .*snapshot_download"):
        AdapterModel.from_pretrained(load_base(), tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected adapter_model.safetensors or adapter_model.bin"):
        AdapterModel.from_pretrained(load_base(), saved)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/adapterflow-pwned", "w"))


def test_bin_files_are_loaded_without_running_pickled_code(saved, load_base):
    (saved / "adapter_model.safetensors").unlink()
    with open(saved / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.bin holds pickled Python objects.*refused for safety") as info:
        AdapterModel.from_pretrained(load_base(), saved)
    assert "weights_only=False" not in str(info.value)
    import os

    assert not os.path.exists("/tmp/adapterflow-pwned")


@pytest.mark.parametrize("key, value, match", [
    ("use_dora", True, "use_dora=True switches on a PEFT feature"),
    ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
    ("lora_bias", True, "lora_bias=True"),
    ("init_lora_weights", "olora", "init_lora_weights='olora' is not supported"),
])
def test_unsupported_peft_features_are_refused(saved, load_base, key, value, match):
    config = json.loads((saved / "adapter_config.json").read_text())
    config[key] = value
    (saved / "adapter_config.json").write_text(json.dumps(config))
    base = load_base()
    with pytest.raises(ConfigError, match=match):
        AdapterModel.from_pretrained(base, saved)
    assert_untouched(base, load_base())


def test_trainable_or_frozen_after_load(saved, load_base, input_ids):
    frozen = AdapterModel.from_pretrained(load_base(), saved)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = AdapterModel.from_pretrained(load_base(), saved, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    torch.testing.assert_close(logits(trainable, input_ids), logits(frozen, input_ids))


def test_load_adapter_adds_a_second_adapter(saved, load_base, input_ids):
    model = AdapterModel.from_pretrained(load_base(), saved)
    model.load_adapter(saved, "copy")
    with pytest.raises(ValueError, match="Adapter 'copy' already exists"):
        model.load_adapter(saved, "copy")
    expected = logits(model, input_ids)
    model.set_adapter("copy")
    torch.testing.assert_close(logits(model, input_ids), expected)


def test_unknown_config_keys_of_a_newer_peft_load_with_one_warning_and_round_trip(saved, load_base, tmp_path):
    config = json.loads((saved / "adapter_config.json").read_text())
    config.update({"future_flag": False, "future_settings": {"a": 1}})
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning) as record:
        model = AdapterModel.from_pretrained(load_base(), saved)
    messages = [str(w.message) for w in record if "does not know" in str(w.message)]
    assert messages == ["adapter_config.json has keys adapterflow does not know: ['future_flag', 'future_settings']. "
                        "They were probably written by a newer PEFT; they are ignored here and written back unchanged "
                        "when the adapter is saved again."]
    model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["future_flag"] is False and written["future_settings"] == {"a": 1}


def test_os_read_errors_stay_os_errors(saved, load_base, monkeypatch):
    """EIO / EACCES are not the file's fault and may be transient: they reach the caller as OSError (retry
    policies tell them apart), not as AdapterLoadError."""
    import errno
    import io
    from pathlib import Path

    real_open = io.open

    def failing_open(file, *args, **kwargs):
        if Path(str(file)).name == "adapter_config.json":
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError, match="Input/output error") as info:
        AdapterModel.from_pretrained(load_base(), saved)
    assert not isinstance(info.value, AdapterLoadError)
