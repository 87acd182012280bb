"""The on-disk key convention: one pure mapping, used for saving and (inverted) for loading."""

import pytest

from adapterflow import formats


@pytest.mark.parametrize("model_key, checkpoint_key", [
    ("base_model.model.m.q_proj.lora_A.default.weight", "base_model.model.m.q_proj.lora_A.weight"),
    ("base_model.model.m.q_proj.lora_B.default.weight", "base_model.model.m.q_proj.lora_B.weight"),
    ("base_model.model.m.embed_tokens.lora_embedding_A.default", "base_model.model.m.embed_tokens.lora_embedding_A"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "base_model.model.lm_head.weight"),
    ("base_model.model.m.q_proj.base_layer.bias", "base_model.model.m.q_proj.base_layer.bias"),
    # a module that happens to carry the adapter's name is left alone
    ("base_model.model.default.q_proj.lora_A.default.weight", "base_model.model.default.q_proj.lora_A.weight"),
])
def test_checkpoint_key(model_key, checkpoint_key):
    assert formats.checkpoint_key(model_key, "default") == checkpoint_key
    assert formats.checkpoint_to_model_keys([model_key], "default") == {checkpoint_key: model_key}


def test_adapter_dir_layout(tmp_path):
    assert formats.adapter_dir(tmp_path, "default") == tmp_path
    assert formats.adapter_dir(tmp_path, "task_a") == tmp_path / "task_a"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "v1.2", None])
def test_unsafe_adapter_names_are_refused(name):
    with pytest.raises(ValueError, match="Invalid adapter name"):
        formats.check_adapter_name(name)
