"""Tiny models for tests: built from a config (no download), saved to a local folder, loaded from the path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(path)
    return path


def load_llama(path: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype)


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter tensor random values, as training would: zero-initialised B would make key-mapping
    and loading bugs invisible in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(part in name for part in ("lora_", "modules_to_save")):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids).logits.float()
