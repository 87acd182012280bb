"""PiSSA -> LoRA conversion: express a trained PiSSA adapter as a LoRA adapter for the ORIGINAL base model.

PiSSA trains on the residual W_res = W - s * B0 @ A0, so the trained model computes W_res + s * B @ A. Against the
original W that is W + s * (B @ A - B0 @ A0) = W + s * [B, -B0] @ [A; A0]: a LoRA adapter of rank 2r with
A' = cat(A, A0) and B' = cat(B, -B0). To keep the scaling s, lora_alpha doubles with r (x sqrt(2) with rsLoRA,
whose scaling is alpha / sqrt(r)).
"""

from __future__ import annotations

import copy
import math
import warnings

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
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Convert a trained PiSSA adapter to LoRA, given the adapter as it was before training.

    Args:
        state: trained adapter in checkpoint layout (e.g. from `get_adapter_state_dict`).
        config: its config.
        initial_state / initial_config: the same adapter saved right after PiSSA initialisation.

    Returns:
        (converted state, converted config). Keys other than LoRA factors (modules_to_save copies, embedding
        layers, biases) are passed through; PEFT drops them.

    Raises:
        ConversionError: rsLoRA with rank/alpha patterns, different target modules, different ranks or shapes,
            or a saved base weight that PiSSA rewrote (saving the residual would corrupt the original base).
    """
    problems = _problems(state, config, initial_state, initial_config)
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
