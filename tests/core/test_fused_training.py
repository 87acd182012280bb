"""The training forward/backward of our LoRA linear layers (one fused autograd node, adapterflow/lora_ops.py) against
PEFT's modules on the same weights: same loss, same gradients of every adapter tensor (and of trained biases),
same dropout masks; under bf16 autocast no further from the fp32 gradients than PEFT's; the plain path where the
fused one does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

import peft
from adapterflow import LoraConfig, get_adapter_model
from tiny import VOCAB, load_llama

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def pair(base, **overrides):
    """Ours and PEFT's adapter model on copies of `base`, in training mode, with the same random adapter values."""
    kwargs = {**LORA, **overrides}
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kwargs)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, param in mine.items():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(mine[name])
    return ours, theirs


def loss_and_grads(model, ids, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # dropout draws the same masks in both libraries
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def grad_fn_name(model, ids) -> str:
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    names = []
    handle = layer.register_forward_hook(lambda module, args, output: names.append(type(output.grad_fn).__name__))
    with torch.enable_grad():
        model(input_ids=ids)
    handle.remove()
    return names[0]


@pytest.mark.parametrize("overrides", [{}, {"lora_dropout": 0.2}, {"bias": "all"}, {"use_rslora": True}],
                         ids=["plain", "dropout", "bias-all", "rslora"])
def test_fused_training_step_matches_peft(load_base, ids, overrides):
    ours, theirs = pair(load_base(), **overrides)  # the tiny Llama has attention biases: the fused addmm adds them
    assert grad_fn_name(ours, ids) == "FusedLoraLinearBackward"
    our_loss, our_grads = loss_and_grads(ours, ids)
    their_loss, their_grads = loss_and_grads(theirs, ids)
    torch.testing.assert_close(our_loss, their_loss, atol=1e-6, rtol=0)
    assert our_grads.keys() == their_grads.keys()
    assert len(our_grads) == 2 * 7 * 2 + (8 if overrides.get("bias") == "all" else 0)  # A, B per linear (+ biases)
    for name, grad in their_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_under_bf16_autocast_gradients_are_as_close_to_fp32_as_peft(load_base, ids):
    ours, theirs = pair(load_base())
    _, exact = loss_and_grads(theirs, ids)
    our_loss, our_grads = loss_and_grads(ours, ids, torch.bfloat16)
    their_loss, their_grads = loss_and_grads(theirs, ids, torch.bfloat16)
    torch.testing.assert_close(our_loss, their_loss, atol=2e-2, rtol=0)
    assert all(g.dtype == torch.float32 for g in our_grads.values())  # fp32 adapters get fp32 gradients

    def error(grads):
        return sum((grads[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5 / sum(g.norm() ** 2 for g in exact.values()) ** 0.5

    assert error(their_grads) > 1e-4  # bf16 rounding is visible at all
    assert error(our_grads) <= 1.5 * error(their_grads)  # one rounding per product instead of one per op


def test_the_plain_path_where_fusing_does_not_apply(base_dir, ids):
    """bf16 base weights with fp32 adapters and no autocast (the sum is taken in fp32), and eval under no_grad,
    run the plain modules, still matching PEFT."""
    ours, theirs = pair(load_llama(base_dir, dtype=torch.bfloat16))
    assert grad_fn_name(ours, ids) != "FusedLoraLinearBackward"
    our_loss, our_grads = loss_and_grads(ours, ids)
    their_loss, their_grads = loss_and_grads(theirs, ids)
    torch.testing.assert_close(our_loss, their_loss, atol=0, rtol=0)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        out = ours.base_model.model.model.layers[0].self_attn.q_proj(torch.randn(1, 3, 32, dtype=torch.bfloat16))
    assert out.grad_fn is None and out.dtype == torch.bfloat16
