"""Adapter layers: LoRA for linear layers (nn.Linear, transformers' Conv1D) and embeddings, and full trainable copies
for `modules_to_save`.

Attribute names match PEFT's (`base_layer`, `lora_A.<adapter>`, `lora_embedding_A.<adapter>`,
`modules_to_save.<adapter>`, `original_module`), so parameter names and state dicts are interchangeable with
PEFT. Each layer declares the attributes that hold adapter tensors (`adapter_layer_names`); everything that
collects adapter tensors asks the layers instead of matching substrings of parameter names.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterflow import formats
from adapterflow.init_methods import (
    EMBEDDING_INIT_METHODS,
    LINEAR_INIT_METHODS,
    parse_init_method,
    subtract_factors_from_base,
)
from adapterflow.lora_ops import can_fuse, fused_lora_linear


class AdapterLayer(nn.Module):
    """A module that holds per-adapter tensors in the containers named by `adapter_layer_names`."""

    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def adapter_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors keyed by their name inside this module, e.g. `lora_A.default.weight`."""
        tensors = {}
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if adapter not in container:
                continue
            item = container[adapter]
            if isinstance(item, nn.Parameter):
                tensors[f"{layer_name}.{adapter}"] = item
            else:
                for key, value in item.state_dict(keep_vars=True).items():
                    tensors[f"{layer_name}.{adapter}.{key}"] = value
        return tensors

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [t for t in self.adapter_tensors(adapter).values() if isinstance(t, nn.Parameter)]

    def set_active(self, adapters: list[str], trainable: bool) -> None:
        """Activate `adapters` (those this layer has); only they are trainable, and only if `trainable`."""
        self.active_adapters = [a for a in adapters if a in self.adapter_names]
        for adapter in self.adapter_names:
            for param in self.adapter_parameters(adapter):
                param.requires_grad_(trainable and adapter in self.active_adapters)

    def delete_adapter(self, adapter: str) -> None:
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if adapter in container:
                del container[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]


class LoraLayer(AdapterLayer):
    """Common part of LoRA layers: per-adapter rank, alpha and scaling, init, merge.

    Subclasses store A with shape (r, in) and B with shape (out, r) and define `base_weight_matrix`, the base
    weight seen as an (out, in) matrix, so that the update is always `scaling * B @ A` in that layout.
    """

    init_methods: dict = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.training = base_layer.training  # a wrapper is in the mode of what it wraps (eval stays eval)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        """Create the adapter's (uninitialised) tensors; call `initialize` or load weights afterwards."""
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.scaling[adapter] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self._create_tensors(adapter, r, lora_dropout)

    def initialize(self, adapter: str, init_lora_weights: bool | str) -> None:
        method, options = parse_init_method(init_lora_weights)
        self.init_methods[method](self, adapter, **options)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter, None)

    def adapter_dtype(self) -> torch.dtype:
        # Adapters of a half-precision base are kept in fp32, as PEFT's autocast_adapter_dtype does: small LoRA
        # updates vanish in bf16 otherwise.
        dtype = self.base_weight_matrix().dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def base_weight_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def restore_pissa_residual(self, adapter: str) -> None:
        """Turn the base weight into the PiSSA residual given this adapter's (initial) factors."""
        raise NotImplementedError

    def lora_a(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def lora_b(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A as an (out, in) fp32 matrix."""
        return (self.lora_b(adapter).float() @ self.lora_a(adapter).float()) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapters' updates into the base weight: the sum is formed in fp32 and rounded to the
        weight's dtype once (PEFT rounds each delta first, then the sum: two roundings for a half-precision base)."""
        weight = self.base_weight_matrix()
        merged = weight.float()  # the weight itself when it is fp32
        for adapter in self.active_adapters:
            merged += self.delta_weight(adapter)
        weight.copy_(merged)

    def _create_tensors(self, adapter: str, r: int, lora_dropout: float) -> None:
        raise NotImplementedError


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, or around transformers' Conv1D (GPT-2), whose weight is stored (in, out)."""

    adapter_layer_names = (formats.LORA_A, formats.LORA_B)
    init_methods = LINEAR_INIT_METHODS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape[::-1] if not self.fan_in_fan_out else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_A.training = self.lora_B.training = self.lora_dropout.training = self.training

    def _create_tensors(self, adapter: str, r: int, lora_dropout: float) -> None:
        kwargs: dict[str, Any] = {"bias": False, "device": self.base_weight_matrix().device, "dtype": self.adapter_dtype()}
        # skip_init: the values come from an init method or a checkpoint right after, so don't spend RNG on them.
        self.lora_A[adapter] = nn.utils.skip_init(nn.Linear, self.in_features, r, **kwargs)
        self.lora_B[adapter] = nn.utils.skip_init(nn.Linear, r, self.out_features, **kwargs)
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter].train(self.training)
        self.lora_B[adapter].train(self.training)
        self.lora_dropout[adapter].train(self.training)  # no live dropout in a model set up for evaluation

    def restore_pissa_residual(self, adapter: str) -> None:
        subtract_factors_from_base(self, adapter)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        if adapter in self.lora_dropout:
            del self.lora_dropout[adapter]

    def base_weight_matrix(self) -> torch.Tensor:
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def lora_a(self, adapter: str) -> torch.Tensor:
        return self.lora_A[adapter].weight.data

    def lora_b(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].weight.data

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if can_fuse(self, x, args, kwargs):  # training: one autograd node for base + LoRA (adapterflow.lora_ops)
            return fused_lora_linear(self, x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.active_adapters:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            x_lora = x.to(lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[adapter](x_lora))) * self.scaling[adapter]
        return result.to(result_dtype)


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (embedding_dim, r)."""

    adapter_layer_names = (formats.LORA_EMBEDDING_A, formats.LORA_EMBEDDING_B)
    init_methods = EMBEDDING_INIT_METHODS

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_embedding_A.training = self.lora_embedding_B.training = self.training

    def _create_tensors(self, adapter: str, r: int, lora_dropout: float) -> None:
        # PEFT creates no dropout for embeddings (dropping token ids makes no sense), so lora_dropout is ignored.
        num_embeddings, embedding_dim = self.base_layer.weight.shape
        kwargs = {"device": self.base_layer.weight.device, "dtype": self.adapter_dtype()}
        self.lora_embedding_A[adapter] = nn.Parameter(torch.empty(r, num_embeddings, **kwargs))
        self.lora_embedding_B[adapter] = nn.Parameter(torch.empty(embedding_dim, r, **kwargs))

    def base_weight_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.data.T  # (embedding_dim, num_embeddings) = (out, in)

    def restore_pissa_residual(self, adapter: str) -> None:
        pass  # PiSSA leaves embeddings' base weights alone (see init_methods)

    def lora_a(self, adapter: str) -> torch.Tensor:
        return self.lora_embedding_A[adapter].data

    def lora_b(self, adapter: str) -> torch.Tensor:
        return self.lora_embedding_B[adapter].data

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.active_adapters:
            return result
        result_dtype = result.dtype
        base = self.base_layer
        # Scaled embeddings (e.g. Gemma's) multiply their output; the LoRA part must be scaled alike.
        embed_scale = getattr(base, "embed_scale", None)
        for adapter in self.active_adapters:
            after_a = F.embedding(
                x, self.lora_embedding_A[adapter].T, base.padding_idx, base.max_norm, base.norm_type,
                base.scale_grad_by_freq, base.sparse,
            )  # (..., r)
            update = (after_a @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]  # (..., embedding_dim)
            if embed_scale is not None:
                update = update * embed_scale.to(update.dtype)
            result = result + update
        return result.to(result_dtype)


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full: `original_module` stays frozen, each adapter trains its own copy."""

    adapter_layer_names = (formats.MODULES_TO_SAVE,)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.training = module.training
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.modules_to_save.training = self.training  # the copies (deepcopy) keep the original's mode

    def add_adapter(self, adapter: str) -> None:
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Code outside (e.g. transformers' weight tying, `lm_head.weight`) reads attributes of the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family): a linear layer with weight (in, out). Detected without importing
    transformers, which the core does not depend on."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def lora_layer_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap `module`, or None if LoRA does not support it."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None
