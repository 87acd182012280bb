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


def training_job(run_dir, **training):
    """A TrainingJob of a few seconds: a LoRA r=2 on q/v of the builtin tiny Llama, builtin:instructions with a
    small eval split, batches of 4 in 2 micro-batches; `training` overrides TrainingSettings fields."""
    from adapterflow import LoraConfig
    from adapterflow.runtime.base_models import resolve_base_model
    from adapterflow.runtime.train_job import TrainingJob

    base = str(resolve_base_model("builtin:tiny-llama"))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        base_model_name_or_path=base)
    settings = {**dict(steps=6, batch_size=4, gradient_accumulation_steps=2, checkpoint_every=4, warmup_steps=2,
                       device="cpu"), **training}
    return TrainingJob(run_dir=str(run_dir), adapter_name="default", base_model_path=base, dtype="float32",
                       dataset={"path": "builtin:instructions"}, eval_fraction=0.02, max_seq_len=24,
                       lora_config=config.to_dict(), training=settings)


# Adapter configs that cover PEFT's features (the interop and merge tests run each against PEFT).
ADAPTER_CASES = {
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embed_tokens": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "pissa": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights="pissa"),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only"),
    "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="all"),
}
