"""Training checkpoints are PEFT adapter folders (plus optimizer state): PEFT loads them, training resumes from them
through the library's key matching, old model-key checkpoints and checkpoints of another config are refused."""

import json
import random
import shutil

import pytest
import torch

import peft
from adapterflow import AdapterModel, LoraConfig, get_adapter_model, read_adapter
from adapterflow.runtime.checkpoints import CheckpointError, Checkpoints
from adapterflow.runtime.data import TokenizedExample
from adapterflow.runtime.run_dir import RunDir, adapter_modules, build_adapter_model
from adapterflow.runtime.training import TrainingSettings, train
from adapterflow.verify import VerificationError, check_adapter_state
from tiny import VOCAB

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
SETTINGS = dict(steps=6, batch_size=4, checkpoint_every=2, learning_rate=1e-2, warmup_steps=1)
PAD = 0


def examples(n: int = 16, length: int = 10) -> list[TokenizedExample]:
    rng = random.Random(0)
    data = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        data.append(TokenizedExample(ids, [-100] * 3 + ids[3:]))
    return data


def trained(load_base, folder, config=LORA, steps=SETTINGS["steps"], keep=2, seed=0):
    torch.manual_seed(seed)
    model = get_adapter_model(load_base(), LoraConfig(**config))
    checkpoints = Checkpoints(folder, keep=keep)
    train(model, examples(), TrainingSettings(**{**SETTINGS, "steps": steps}), PAD, checkpoints)
    return model.eval(), checkpoints


def test_a_checkpoint_is_a_peft_adapter_reproducing_the_training_model(load_base, tmp_path, input_ids):
    model, checkpoints = trained(load_base, tmp_path / "checkpoints")
    assert [p.name for p in checkpoints.complete()] == ["step-000004", "step-000006"]  # the newest 2 stay
    final = checkpoints.latest()
    assert sorted(p.name for p in final.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterflow.json", "progress.json",
        "training_state.pt"]
    assert json.loads((final / "progress.json").read_text())["step"] == 6
    theirs = peft.PeftModel.from_pretrained(load_base(), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)
    state, _ = read_adapter(final)
    assert all(".default." not in key and key.startswith("base_model.model.") for key in state)  # PEFT's keys


def test_a_pissa_checkpoint_loads_in_peft_on_the_residual_base(load_base, base_dir, tmp_path, input_ids):
    """A PiSSA checkpoint's factors act on the residual W - s*B0@A0, which a randomized SVD would not recompute:
    PEFT reproduces the training model on that residual base, with the config's init switched to plain LoRA."""
    config = LoraConfig(**{**LORA, "init_lora_weights": "pissa_niter_2"})
    model = build_adapter_model(base_dir, torch.float32, config, "default", RunDir(tmp_path), seed=0)  # writes initial/
    train(model, examples(), TrainingSettings(**SETTINGS), PAD, Checkpoints(tmp_path / "checkpoints"))
    residual = AdapterModel.from_initial_adapter(load_base(), tmp_path / "initial")
    for name, param in residual.named_parameters():
        if "lora_B" in name:
            param.data.zero_()  # merging B=0 leaves the residual weights as they are
    residual_base = residual.merge_and_unload()
    checkpoint = Checkpoints(tmp_path / "checkpoints").latest()
    peft_config = peft.LoraConfig.from_pretrained(checkpoint)
    peft_config.init_lora_weights = True
    theirs = peft.PeftModel.from_pretrained(residual_base, checkpoint, config=peft_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids).logits, model.eval()(input_ids).logits, atol=1e-5, rtol=0)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_adapter(load_base, tmp_path):
    straight, _ = trained(load_base, tmp_path / "straight")
    # A run killed after step 4: only its first checkpoints exist.
    partial = tmp_path / "killed"
    partial.mkdir()
    shutil.copytree(tmp_path / "straight" / "step-000004", partial / "step-000004")
    resumed, _ = trained(load_base, partial, seed=123)  # other init: the checkpoint must overwrite it
    expected = {k: v for k, v in straight.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_old_model_key_checkpoints_and_other_configs_are_refused(load_base, tmp_path):
    legacy = tmp_path / "legacy" / "step-000004"
    legacy.mkdir(parents=True)
    (legacy / "trainable.safetensors").write_bytes(b"")
    (legacy / "progress.json").write_text(json.dumps({"step": 4}))
    with pytest.raises(CheckpointError, match="older adapterflow .*Delete .*legacy to train this run from the start"):
        trained(load_base, tmp_path / "legacy")

    trained(load_base, tmp_path / "r4", steps=2)
    with pytest.raises(CheckpointError, match=r"Cannot resume from .*step-000002.*\n  - r: checkpoint 4, this run 2"):
        trained(load_base, tmp_path / "r4", config={**LORA, "r": 2})


def test_the_integrity_check_works_from_the_state_dict_and_the_architecture(load_base, base_dir, tmp_path):
    _, checkpoints = trained(load_base, tmp_path / "checkpoints", steps=2)
    state, config = read_adapter(checkpoints.latest())
    modules = adapter_modules(base_dir, config)
    assert len(modules) == 6 and "base_model.model.model.layers.1.mlp.down_proj" in modules
    check_adapter_state(state, modules)  # the real checkpoint passes
    broken = {k: v for k, v in state.items() if "layers.1.mlp.down_proj" not in k}
    broken.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    broken["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.full((4, 32), float("inf"))
    with pytest.raises(VerificationError) as error:
        check_adapter_state(broken, modules)
    message = str(error.value)
    assert "layers.1.mlp.down_proj: targeted but has no tensors" in message
    assert "layers.0.self_attn.v_proj.lora_A.weight: has no partner" in message
    assert "q_proj.lora_A.weight: contains NaN or Inf" in message


def test_an_adapter_of_another_name_is_checkpointed_at_the_folder_root(load_base, tmp_path):
    torch.manual_seed(0)
    model = get_adapter_model(load_base(), LoraConfig(**LORA), adapter_name="task_a")
    checkpoints = Checkpoints(tmp_path, adapter_name="task_a")
    train(model, examples(), TrainingSettings(**{**SETTINGS, "steps": 2}), PAD, checkpoints)
    assert (checkpoints.latest() / "adapter_model.safetensors").is_file()  # loadable as the folder itself
    again = get_adapter_model(load_base(), LoraConfig(**LORA), adapter_name="task_a")
    result = train(again, examples(), TrainingSettings(**{**SETTINGS, "steps": 2}), PAD, checkpoints)
    assert result.resumed_from == 2
    torch.testing.assert_close(again.state_dict(), model.state_dict(), atol=0, rtol=0)
