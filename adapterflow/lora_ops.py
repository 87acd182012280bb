"""The training forward and backward of a LoRA linear layer as one autograd node.

    y = x W^T + b + s * (d(x) A^T) B^T        x (..., in), W (out, in), A (r, in), B (out, r), s = scaling,
                                              d = the adapter's dropout (the identity without it)

Autograd over the plain modules (ours before, PEFT's `lora.Linear`) spends, per layer and step, an (N, out) scale and
an (N, out) add in the forward and the same again, plus an (N, in) add of the two input gradients, in the backward.
This node folds all of them into the matrix products (`addmm` / `addmm_` with alpha and beta, BLAS's own
accumulation): the scaling is applied to the small (N, r) and (r, in) / (out, r) tensors only, and the LoRA part
of the input gradient accumulates into the base part in place. It saves only d(x) and h = d(x) A^T (N, r), plus
references to the weights: under autocast the low-precision copies of W, A, B are made again in the backward
instead of being kept, which `nn.Linear` under autocast does keep.

Used by `LoraLinear.forward` for training (grad enabled, trainable A and B, frozen W) of a plain `nn.Linear` with one
active adapter, without autocast when x, W and A share a dtype or under torch.autocast (computing in the autocast
dtype, as autocast's `linear` does: torch.amp docs, "CPU/CUDA Ops that can autocast to lower precision"). Anything
else (inference, Conv1D, hooks on the base layer, bf16 base with fp32 adapters and no autocast) takes the plain
path. Gradients match the plain path's to rounding (tests/core/test_fused_training.py, against PEFT).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def can_fuse(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether `layer` (a LoraLinear) can run its forward through FusedLoraLinear for this input."""
    if layer.disabled or len(layer.active_adapters) != 1 or args or kwargs or not torch.is_grad_enabled():
        return False
    base = layer.base_layer
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or base.weight.requires_grad:
        return False
    adapter = layer.active_adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not (a.requires_grad and b.requires_grad):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    return x.dtype == base.weight.dtype == a.dtype == b.dtype


def _no_autocast(device_type: str, autocast: bool):
    return torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()


class FusedLoraLinear(torch.autograd.Function):
    """apply(x, x_lora, weight, bias, lora_a, lora_b, scaling) -> y (..., out); x_lora is d(x) (x itself without
    dropout: then one input gradient comes back for both)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        with _no_autocast(device_type, autocast):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            xl2 = x2 if x_lora is x else x_lora.reshape(-1, x.shape[-1]).to(dtype)
            h = torch.mm(xl2, lora_a.to(dtype).T)  # (N, r)
            w = weight.to(dtype)
            out = torch.mm(x2, w.T) if bias is None else torch.addmm(bias.to(dtype), x2, w.T)
            out.addmm_(h, lora_b.to(dtype).T, alpha=scaling)  # += s * h B^T, accumulated by the GEMM
        ctx.save_for_backward(xl2, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.same_input, ctx.x_shape = scaling, dtype, x_lora is x, x.shape
        ctx.bias_grad = bias is not None and bias.requires_grad
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl2, h, weight, lora_a, lora_b = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        a = lora_a.to(dtype)
        gh = torch.mm(g, lora_b.to(dtype)).mul_(scaling)  # dL/dh, scaled: (N, r)
        grad_a = torch.mm(gh.T, xl2)  # (r, in)
        grad_b = torch.mm(g.T, h).mul_(scaling)  # (out, r)
        grad_x = grad_x_lora = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.same_input:
                grad_x = torch.mm(g, weight.to(dtype)).addmm_(gh, a)  # base and LoRA parts in one buffer
            else:
                grad_x = torch.mm(g, weight.to(dtype)) if ctx.needs_input_grad[0] else None
                grad_x_lora = torch.mm(gh, a).reshape(ctx.x_shape) if ctx.needs_input_grad[1] else None
            grad_x = grad_x.reshape(ctx.x_shape) if grad_x is not None else None
        grad_bias = g.sum(0) if ctx.bias_grad else None
        # Gradients of fp32 tensors computed in a lower dtype are cast back by autograd (as autocast's casts do).
        return grad_x, grad_x_lora, None, grad_bias, grad_a, grad_b, None


def fused_lora_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LoraLinear's training forward through FusedLoraLinear (call only when `can_fuse` says so)."""
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    x_lora = layer.lora_dropout[adapter](x)
    return FusedLoraLinear.apply(x, x_lora, base.weight, base.bias, layer.lora_A[adapter].weight,
                                 layer.lora_B[adapter].weight, layer.scaling[adapter])
