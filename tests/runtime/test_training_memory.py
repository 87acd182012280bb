"""Gradient checkpointing and mixed precision in the training loop, on the builtin tiny Llama: checkpointing changes
neither the loss nor the adapter's gradients (it recomputes the layers, visibly), a checkpointed run resumes exactly,
bf16 autocast trains on CPU with fp32 adapters, and the fp16 grad scaler's state travels in the checkpoint."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from adapterflow import LoraConfig, get_adapter_model
from adapterflow.layers import LoraLinear
from adapterflow.runtime.base_models import load_base_model, resolve_base_model
from adapterflow.runtime.checkpoints import STATE_FILE, Checkpoints
from adapterflow.runtime.data import TokenizedExample, collate
from adapterflow.runtime.training import TrainingSettings, enable_gradient_checkpointing, train

PAD = 0
SETTINGS = dict(steps=6, batch_size=8, checkpoint_every=2, learning_rate=1e-2, warmup_steps=1)
INITS = {
    # plain LoRA starts with B = 0 (so A gets no gradient): give every factor a value, and dropout a mask to draw
    "lora": dict(init_lora_weights=True, lora_dropout=0.1),
    "pissa": dict(init_lora_weights="pissa_niter_2"),
}


@pytest.fixture(scope="module")
def builtin_dir():
    return resolve_base_model("builtin:tiny-llama")  # built into $ADAPTERFLOW_CACHE (the test session's) once


def examples(n: int = 32, length: int = 24) -> list[TokenizedExample]:
    rng = random.Random(0)
    data = []
    for _ in range(n):
        ids = [rng.randrange(4, 64) for _ in range(length)]  # a small alphabet: learnable within a few steps
        data.append(TokenizedExample(ids, [-100] * 4 + ids[4:]))
    return data


def adapter_model(builtin_dir, init: str = "lora", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **INITS[init])
    model = get_adapter_model(load_base_model(builtin_dir, dtype=dtype), config).train()
    if init == "lora":
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.05)
    return model


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the trainable parameters' gradients, and the bytes autograd keeps from the forward for the
    backward (what checkpointing saves; torch.autograd.graph.saved_tensors_hooks sees every saved tensor)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(saved)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("init", list(INITS))
def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients(builtin_dir, init):
    model = adapter_model(builtin_dir, init)
    batch = collate(examples(8), PAD)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LoraLinear)
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: the recompute stops right after its last op

    loss, grads, saved = loss_and_grads(model, batch)
    assert len(calls) == 1
    disable = enable_gradient_checkpointing(model)
    calls.clear()
    loss_checkpointed, grads_checkpointed, saved_checkpointed = loss_and_grads(model, batch)
    assert len(calls) == 2  # the layer ran again in the backward: checkpointing is on
    assert saved_checkpointed < saved / 3  # only the decoder layers' inputs (and what lies outside them) are kept
    disable()

    torch.testing.assert_close(loss_checkpointed, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_checkpointed.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 linears, 2 blocks
    assert all(g.abs().sum() > 0 for g in grads.values())  # every factor learns: a missing gradient would show
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    calls.clear()
    loss_and_grads(model, batch)
    assert len(calls) == 1 and model.base_model.model.config.use_cache  # switched off again, as it was


def test_a_checkpointed_run_trains_like_a_plain_one_and_resumes_exactly(builtin_dir, tmp_path):
    settings = TrainingSettings(**SETTINGS)
    plain = adapter_model(builtin_dir, "pissa")
    plain_result = train(plain, examples(), settings, PAD, Checkpoints(tmp_path / "plain"))
    checkpointed_settings = TrainingSettings(**SETTINGS, gradient_checkpointing=True)
    checkpointed = adapter_model(builtin_dir, "pissa")
    result = train(checkpointed, examples(), checkpointed_settings, PAD, Checkpoints(tmp_path / "straight"))
    torch.testing.assert_close(result.losses, plain_result.losses, atol=1e-5, rtol=0)
    for key, value in adapter_state(plain).items():
        torch.testing.assert_close(adapter_state(checkpointed)[key], value, atol=1e-5, rtol=0)

    # A checkpointed run killed after step 4 resumes from its checkpoint to the uninterrupted adapter.
    (tmp_path / "killed").mkdir()
    shutil.copytree(tmp_path / "straight" / "step-000004", tmp_path / "killed" / "step-000004")
    resumed = adapter_model(builtin_dir, "pissa")
    resumed_result = train(resumed, examples(), checkpointed_settings, PAD, Checkpoints(tmp_path / "killed"))
    assert resumed_result.resumed_from == 4
    torch.testing.assert_close(resumed_result.losses, result.losses, atol=1e-6, rtol=0)
    for key, value in adapter_state(checkpointed).items():
        torch.testing.assert_close(adapter_state(resumed)[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_trains_on_cpu_with_float32_adapters(builtin_dir, tmp_path, base_dtype):
    settings = dict(SETTINGS, steps=20, checkpoint_every=20)
    model = adapter_model(builtin_dir, "pissa", dtype=base_dtype)
    result = train(model, examples(), TrainingSettings(**settings, precision="bf16"), PAD, Checkpoints(tmp_path / "a"))
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0  # learning is visible (6.9 -> ~4.3 in fp32)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == base_dtype
    if base_dtype == torch.float32:  # autocast was in effect: the same run in fp32 gives other losses
        fp32 = adapter_model(builtin_dir, "pissa")
        fp32_losses = train(fp32, examples(), TrainingSettings(**settings), PAD, Checkpoints(tmp_path / "b")).losses
        assert max(abs(a - b) for a, b in zip(result.losses, fp32_losses)) > 1e-4


def test_the_fp16_grad_scaler_state_is_checkpointed_and_restored(builtin_dir, tmp_path):
    """torch runs fp16 autocast and GradScaler on CPU too (the pipeline asks for CUDA, tasks/run_plan.py): enough to
    check that the scaler's state (scale, growth tracker) lands in training_state.pt and comes back on resume."""
    settings = TrainingSettings(**SETTINGS, precision="fp16")
    straight = adapter_model(builtin_dir, "lora")
    train(straight, examples(), settings, PAD, Checkpoints(tmp_path / "straight"))
    state = torch.load(tmp_path / "straight" / "step-000006" / STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] > 1 and state["scaler"]["_growth_tracker"] == 6  # 6 steps without overflow

    (tmp_path / "killed").mkdir()
    shutil.copytree(tmp_path / "straight" / "step-000004", tmp_path / "killed" / "step-000004")
    resumed = adapter_model(builtin_dir, "lora", seed=1)
    train(resumed, examples(), settings, PAD, Checkpoints(tmp_path / "killed"))
    assert torch.load(tmp_path / "killed" / "step-000006" / STATE_FILE, weights_only=True)["scaler"] == state["scaler"]
    for key, value in adapter_state(straight).items():
        torch.testing.assert_close(adapter_state(resumed)[key], value, atol=1e-6, rtol=0)
