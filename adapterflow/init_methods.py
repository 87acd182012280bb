"""LoRA initialisation methods, looked up by name in a registry per layer kind.

Every method fills A (shape r x in) and B (shape out x r) of one adapter of one layer. Linear layers and
embeddings use different defaults (as in PEFT and the reference LoRA code), so each layer class points at its
own registry. PiSSA also rewrites the base weight; for embeddings PEFT applies its standard embedding init
instead, and so do we, so that a PiSSA adapter means the same thing in both libraries.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from adapterflow.layers import LoraLayer

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
SUPPORTED = 'True, False, "gaussian", "pissa" or "pissa_niter_<K>"'
# The pipeline's `adapter.init` names (one word each, so they fit a form field and a tag) -> init_lora_weights.
# "pissa" and "pissa_niter_<K>" are PEFT's own values and pass through.
PIPELINE_INIT_PATTERN = r"^(lora|gaussian|random|pissa|pissa_niter_[0-9]+)$"
PIPELINE_INIT_ALIASES: dict[str, Union[bool, str]] = {"lora": True, "gaussian": "gaussian", "random": False}


def init_lora_weights_for(init: str) -> Union[bool, str]:
    """The LoraConfig.init_lora_weights value for a pipeline `adapter.init` name ("lora" -> True, "random" ->
    False, "gaussian", "pissa", "pissa_niter_4" as they are); ValueError for a name outside PIPELINE_INIT_PATTERN."""
    if not re.fullmatch(PIPELINE_INIT_PATTERN, init):
        raise ValueError(f"adapter.init={init!r} is not supported; use lora, gaussian, random, pissa or pissa_niter_<K>.")
    return PIPELINE_INIT_ALIASES.get(init, init)


def pipeline_init_name(init_lora_weights: Union[bool, str]) -> str:
    """The inverse of init_lora_weights_for: True -> "lora", False -> "random", strings as they are."""
    names = {value: name for name, value in PIPELINE_INIT_ALIASES.items() if isinstance(value, bool)}
    return names[init_lora_weights] if isinstance(init_lora_weights, bool) else str(init_lora_weights)


def parse_init_method(value: Union[bool, str]) -> tuple[str, dict]:
    """Normalise `init_lora_weights` to (registry name, options); ValueError for anything unsupported."""
    if value is True:
        return "default", {}
    if value is False:
        return "random", {}
    if isinstance(value, str):
        if value.lower() == "gaussian":
            return "gaussian", {}
        if value == "pissa":
            return "pissa", {"niter": None}
        match = _PISSA_NITER.fullmatch(value)
        if match:
            return "pissa", {"niter": int(match.group(1))}
    raise ValueError(f"init_lora_weights={value!r} is not supported; use {SUPPORTED}.")


def is_pissa(value: Union[bool, str]) -> bool:
    return isinstance(value, str) and value.startswith("pissa")


def is_randomized_pissa(value: Union[bool, str]) -> bool:
    return isinstance(value, str) and _PISSA_NITER.fullmatch(value) is not None


# Linear layers ---------------------------------------------------------------------------------------------------


def _linear_default(layer: "LoraLayer", adapter: str) -> None:
    # A like nn.Linear's default init, B zero, so the adapter starts as a no-op (Microsoft's loralib, PEFT).
    nn.init.kaiming_uniform_(layer.lora_a(adapter), a=math.sqrt(5))
    nn.init.zeros_(layer.lora_b(adapter))


def _linear_gaussian(layer: "LoraLayer", adapter: str) -> None:
    nn.init.normal_(layer.lora_a(adapter), std=1 / layer.r[adapter])
    nn.init.zeros_(layer.lora_b(adapter))


def _linear_random(layer: "LoraLayer", adapter: str) -> None:
    # init_lora_weights=False: both factors random, the adapter changes outputs from the start (PEFT: nn.Linear init).
    nn.init.kaiming_uniform_(layer.lora_a(adapter), a=math.sqrt(5))
    nn.init.kaiming_uniform_(layer.lora_b(adapter), a=math.sqrt(5))


@torch.no_grad()
def _linear_pissa(layer: "LoraLayer", adapter: str, niter: int | None) -> None:
    """PiSSA (arXiv:2404.02948): A, B from the top-r singular triplets of W, W replaced by the residual.

    With W = U S Vh and s = scaling: A0 = sqrt(S_r / s) Vh_r, B0 = U_r sqrt(S_r / s), so s * B0 @ A0 is the best
    rank-r approximation of W and W_res = W - s * B0 @ A0. The SVD runs in fp32; the residual is cast back.
    """
    weight = layer.base_weight_matrix()  # (out, in), a view of the base parameter
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"PiSSA needs a float32, float16 or bfloat16 base weight, got {weight.dtype}; initialise PiSSA before "
            f"quantising the base model."
        )
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    work = weight.to(torch.float32, copy=True)
    if niter is None:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(work, q=r, niter=niter)
        vh = v.T
    sqrt_s = (s / scaling).sqrt()
    layer.lora_a(adapter).copy_(sqrt_s[:, None] * vh)  # (r, in)
    layer.lora_b(adapter).copy_(u * sqrt_s[None, :])  # (out, r)
    subtract_factors_from_base(layer, adapter, work)


@torch.no_grad()
def subtract_factors_from_base(layer: "LoraLayer", adapter: str, work: torch.Tensor | None = None) -> None:
    """W <- W - s * B @ A with the adapter's current factors: the PiSSA residual. Given the same factors this is
    bit-for-bit the residual that the initialisation produced, so a saved initial adapter restores it exactly.

    Args:
        work: an fp32 copy of the base weight matrix, if the caller already has one.
    """
    weight = layer.base_weight_matrix()
    work = weight.to(torch.float32, copy=True) if work is None else work
    lora_a, lora_b = layer.lora_a(adapter).to(torch.float32), layer.lora_b(adapter).to(torch.float32)
    work.addmm_(lora_b, lora_a, alpha=-layer.scaling[adapter])  # in place: no (out, in) temporaries
    weight.copy_(work)


# Embedding layers ------------------------------------------------------------------------------------------------


def _embedding_default(layer: "LoraLayer", adapter: str) -> None:
    # A zero, B normal (loralib's Embedding init), so the adapter starts as a no-op.
    nn.init.zeros_(layer.lora_a(adapter))
    nn.init.normal_(layer.lora_b(adapter))


def _embedding_random(layer: "LoraLayer", adapter: str) -> None:
    nn.init.normal_(layer.lora_a(adapter))
    nn.init.normal_(layer.lora_b(adapter))


def _embedding_pissa(layer: "LoraLayer", adapter: str, niter: int | None) -> None:
    # PEFT gives targeted embeddings the standard embedding init under PiSSA and leaves their base weight alone.
    _embedding_default(layer, adapter)


InitMethod = Callable[..., None]

LINEAR_INIT_METHODS: dict[str, InitMethod] = {
    "default": _linear_default,
    "gaussian": _linear_gaussian,
    "random": _linear_random,
    "pissa": _linear_pissa,
}

EMBEDDING_INIT_METHODS: dict[str, InitMethod] = {
    "default": _embedding_default,
    "gaussian": _embedding_default,  # PEFT has no gaussian variant for embeddings
    "random": _embedding_random,
    "pissa": _embedding_pissa,
}
