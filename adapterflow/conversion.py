"""PiSSA -> LoRA conversion: express a trained PiSSA adapter as a LoRA adapter for the ORIGINAL base model.

PiSSA trains on the residual W_res = W - s * B0 @ A0, so the trained model computes W_res + s * B @ A. Against the
original W that is W + s * (B @ A - B0 @ A0) = W + s * [B, -B0] @ [A; A0]: a LoRA adapter of rank 2r with
A' = cat(A, A0) and B' = cat(B, -B0). To keep the scaling s, lora_alpha doubles with r (x sqrt(2) with rsLoRA,
whose scaling is alpha / sqrt(r)).

The initial adapter is checked before anything is combined (see `initial_adapter_problems`): a plain LoRA init of the
same shapes would otherwise give a wrong adapter without any error.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping

import torch

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_pissa


class ConversionError(ValueError):
    """The trained and initial adapters cannot be combined; the message lists every problem."""


def convert_pissa_to_lora(
    state: dict[str, torch.Tensor],
    config: LoraConfig,
    initial_state: dict[str, torch.Tensor],
    initial_config: LoraConfig,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Convert a trained PiSSA adapter to LoRA, given the adapter as it was before training.

    Args:
        state: trained adapter in checkpoint layout (e.g. from `get_adapter_state_dict`).
        config: its config.
        initial_state / initial_config: the same adapter saved right after PiSSA initialisation.
        base_weights: optional {module path as in the checkpoint keys: (out, in) base weight the adapter was trained
            on}, i.e. the live residuals; with them the initial factors are also checked against the residual.

    Returns:
        (converted state, converted config). Keys other than LoRA factors (modules_to_save copies, embedding
        layers, biases) are passed through; PEFT drops them.

    Raises:
        ConversionError: rsLoRA with rank/alpha patterns, different target modules, ranks, scaling or shapes, a
            saved base weight that PiSSA rewrote (saving the residual would corrupt the original base), or an
            initial adapter that is not a PiSSA initialisation (of this base, when base_weights are given).
    """
    problems = _problems(state, config, initial_state, initial_config)
    if not problems:
        problems = initial_adapter_problems(initial_state, initial_config, base_weights or {})
    if problems:
        raise ConversionError(
            "Cannot convert the PiSSA adapter to LoRA:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    if not is_pissa(config.init_lora_weights):
        warnings.warn(
            f"path_initial_model_for_weight_conversion converts PiSSA adapters, but this adapter was initialised "
            f"with init_lora_weights={config.init_lora_weights!r}; the result is a rank-{2 * config.r} LoRA "
            f"with the same effect."
        )
    converted = {}
    for key, tensor in state.items():
        if formats.is_lora_a(key):
            converted[key] = torch.cat([tensor, initial_state[key].to(tensor)], dim=0)
        elif formats.is_lora_b(key):
            converted[key] = torch.cat([tensor, -initial_state[key].to(tensor)], dim=1)
        else:
            converted[key] = tensor
    return converted, doubled_rank_config(config)


def doubled_rank_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: r and the patterns doubled, the scaling unchanged."""
    new = copy.deepcopy(config)
    new.init_lora_weights = True
    new.r = config.r * 2
    new.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    new.rank_pattern = {k: v * 2 for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {k: v * 2 for k, v in config.alpha_pattern.items()}
    return new


def _problems(state, config, initial_state, initial_config) -> list[str]:
    problems = []
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        problems.append(
            "use_rslora together with rank_pattern/alpha_pattern cannot be converted: the per-module alpha cannot "
            "keep the sqrt(r) scaling. Save without path_initial_model_for_weight_conversion."
        )
    trained_keys = {k for k in state if formats.is_lora_a(k) or formats.is_lora_b(k)}
    initial_keys = {k for k in initial_state if formats.is_lora_a(k) or formats.is_lora_b(k)}
    only_trained = sorted({formats.module_of_key(k) for k in trained_keys - initial_keys})
    only_initial = sorted({formats.module_of_key(k) for k in initial_keys - trained_keys})
    if only_trained or only_initial:
        problems.append(
            f"the initial adapter targets different modules (only in the trained adapter: {only_trained}; only in "
            f"the initial adapter: {only_initial}). Pass the adapter saved right after initialising THIS adapter."
        )
    if (initial_config.r, initial_config.rank_pattern) != (config.r, config.rank_pattern):
        problems.append(
            f"ranks differ: trained r={config.r}, rank_pattern={config.rank_pattern}; initial r={initial_config.r}, "
            f"rank_pattern={initial_config.rank_pattern}."
        )
    scaling = ("lora_alpha", "alpha_pattern", "use_rslora")
    if any(getattr(initial_config, f) != getattr(config, f) for f in scaling):
        problems.append(
            "scaling differs: trained " + ", ".join(f"{f}={getattr(config, f)!r}" for f in scaling) + "; initial "
            + ", ".join(f"{f}={getattr(initial_config, f)!r}" for f in scaling) + " (the residual was made with the "
            "initial scaling)."
        )
    mismatched = [
        f"{k}: trained {tuple(state[k].shape)} vs initial {tuple(initial_state[k].shape)}"
        for k in sorted(trained_keys & initial_keys)
        if state[k].shape != initial_state[k].shape
    ]
    if mismatched:
        problems.append("shapes differ: " + "; ".join(mismatched))
    if is_pissa(config.init_lora_weights):
        linear_modules = {formats.module_of_key(k) for k in trained_keys if formats.LORA_A in k.split(".")}
        rewritten = sorted(m for m in linear_modules if formats.base_layer_weight_key(m) in state)
        if rewritten:
            problems.append(
                f"the adapter includes the base weights of {rewritten}, which PiSSA replaced by residuals; the "
                f"converted adapter would overwrite the original weights with them. Save with "
                f"save_embedding_layers=False (the original base model already has these weights), or do not "
                f"target these layers with PiSSA."
            )
    return problems


# How far from exact a PiSSA initial adapter may be: its factors are computed in fp32 (so their Gram matrices agree
# to ~1e-6), the residual may be rounded to the base dtype (bf16: ~4e-3 relative).
_GRAM_TOL = 1e-3
_RESIDUAL_TOL = 0.1


def initial_adapter_problems(initial_state: dict[str, torch.Tensor], initial_config: LoraConfig,
                             base_weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Why `initial_state` is not a PiSSA initialisation (empty when it is), from cheap exact properties:

    1. the config says PiSSA, or True (what a conversion by PEFT or an older adapterflow rewrote it to);
    2. linear layers: with W = U S Vh, A0 = sqrt(S_r/s) Vh_r and B0 = U_r sqrt(S_r/s), so A0 @ A0.T and B0.T @ B0
       are the same diagonal r x r matrix (exact for "pissa" and "pissa_niter_K" alike; a LoRA init has B0 = 0);
    3. linear layers with a base weight given: the residual W - s B0 A0 has no part along U_r nor Vh_r, so
       B0.T @ W_res = 0 and W_res @ A0.T = 0 (the randomized SVD is exact on one of the two sides), probed on 4
       fixed columns and 4 fixed rows of W_res (a gather, no product with the whole weight; global RNG untouched);
    4. embeddings: PiSSA gives them the standard init, A0 = 0, so that B0 @ A0 = 0.
    Source of the factor formulas: PEFT `tuners/lora/layer.py` `LoraLayer.pissa_init`.
    """
    init = initial_config.init_lora_weights
    if not (is_pissa(init) or init is True):
        return [f"the initial adapter's config says init_lora_weights={init!r}, not a PiSSA initialisation; pass the "
                f"folder saved right after get_adapter_model with init_lora_weights='pissa' (or 'pissa_niter_K')."]
    bad = []
    for key in sorted(k for k in initial_state if formats.is_lora_a(k)):
        module, a0, b0 = formats.module_of_key(key), initial_state[key], initial_state.get(formats.lora_partner(key))
        if b0 is None:
            continue  # reported as a key mismatch
        a0, b0 = a0.float(), b0.float()
        if formats.LORA_EMBEDDING_A in key.split("."):
            if a0.any() and b0.any():
                bad.append(f"{module}: embedding factors are not PiSSA's (A0 = 0)")
        elif not _gram_matches(a0, b0):
            bad.append(f"{module}: A0 @ A0.T != B0.T @ B0 (not singular-vector factors)")
        elif module in base_weights and not _residual_orthogonal(a0, b0, base_weights[module]):
            bad.append(f"{module}: B0 is not the top singular subspace of the base weight's residual")
    if bad:
        return [f"the initial adapter is not the PiSSA initialisation of this model's base ({len(bad)} modules, "
                f"e.g. {'; '.join(bad[:3])}). Pass the folder that model.save_pretrained wrote right after "
                f"get_adapter_model, before any training step, for this base model."]
    return []


def _gram_matches(a0: torch.Tensor, b0: torch.Tensor) -> bool:
    gram_a, gram_b = a0 @ a0.T, b0.T @ b0  # (r, r) each
    scale = gram_a.norm()
    off_diagonal = gram_a - torch.diag(torch.diagonal(gram_a))
    return bool(scale > 0 and (gram_a - gram_b).norm() <= _GRAM_TOL * scale and off_diagonal.norm() <= _GRAM_TOL * scale)


def _residual_orthogonal(a0: torch.Tensor, b0: torch.Tensor, weight: torch.Tensor) -> bool:
    """W_res has no part along B0's columns (left) or along A0's rows (right). The exact SVD gives both; the
    randomized SVD (torch.svd_lowrank) is exact on the side it projects, which depends on the weight's shape.

    Probed with 4 fixed columns and 4 fixed rows of the residual (if U_r.T @ W_res = 0, every column of W_res is
    orthogonal to U_r): a gather, where a product with the whole weight would cost ~0.5 s per 4096x11008 bf16 layer
    on a CPU."""
    generator = torch.Generator().manual_seed(0)
    columns = torch.randint(weight.shape[1], (4,), generator=generator).to(weight.device)
    rows = torch.randint(weight.shape[0], (4,), generator=generator).to(weight.device)
    left = _part_along(b0, weight[:, columns])
    right = _part_along(a0.T, weight[rows, :].T)
    return left or right


def _part_along(factor: torch.Tensor, probed: torch.Tensor) -> bool:
    """Is the residual (seen through 4 probe vectors, `probed` (n, 4)) orthogonal to the columns of factor (n, r)?
    A random subspace of dimension r holds a fraction sqrt(r / n) of a vector; a PiSSA residual holds ~0."""
    n, r = factor.shape
    probed = probed.to(factor.device, torch.float32)
    q = factor / factor.norm(dim=0, keepdim=True).clamp_min(1e-30)  # orthonormal columns for a PiSSA init
    size = probed.norm()
    return bool(size == 0 or (q.T @ probed).norm() <= _RESIDUAL_TOL * math.sqrt(r / n) * size)
