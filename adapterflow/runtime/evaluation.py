"""Evaluation of a base model with or without an adapter on held-out examples: the eval loss, its perplexity and
(optionally) greedy-generation exact match. Plain PyTorch + transformers (no Prefect, no MLflow): the
evaluate-adapter task calls it for the base model, the new adapter and the adapter holding the promotion alias.

The loss is the training loop's (`adapterflow.runtime.training.evaluate`): the mean cross-entropy per label
token (completion and <eos>, or the assistant turns of chat rows), in nats, over the examples as `tokenize` cuts
them at max_seq_len; so on the training run's held-out split, with the same base, batch size and device, the
new adapter's loss is the number train-adapter reports as eval_loss_after. Perplexity is exp(loss)
(Jelinek et al. 1977; the usual definition for causal LMs, e.g. the transformers "Perplexity of fixed-length
models" guide, without its sliding window: every example fits max_seq_len by construction).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from adapterflow.runtime.data import DataSpec, Example, load_examples, split_examples, tokenize
from adapterflow.runtime.training import evaluate


@dataclass(frozen=True)
class ModelScore:
    """What one model scored on the evaluation examples.

    loss: mean cross-entropy per label token (nats); perplexity: exp(loss); exact_match: share (0..1) of the
    prompt/completion pairs whose greedy continuation equals the completion (None: not measured, or no such
    pair); examples: examples scored (those with a label token left after truncation); pairs: pairs generated
    for; loss_source: "computed", or where a reused number came from (e.g. "train-adapter eval_loss_after").
    """

    loss: float
    perplexity: float
    exact_match: Optional[float]
    examples: int
    pairs: int = 0
    loss_source: str = "computed"

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows (a loss above ~709 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def evaluation_examples(spec: DataSpec, eval_fraction: float, seed: int,
                        separate: Optional[DataSpec] = None) -> list[Example]:
    """The examples to evaluate on: all of `separate` when given (evaluate.dataset), else the held-out
    `eval_fraction` of `spec` split with `seed`, exactly as training split it (`split_examples`).

    Raises:
        FileNotFoundError, DatasetError: as `load_examples`.
    """
    if separate is not None:
        return load_examples(separate)
    return split_examples(load_examples(spec), eval_fraction, seed)[1]


def load_model(base_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               adapter_dir: Optional[str | os.PathLike] = None, adapter_name: str = "default",
               device: str = "cpu") -> torch.nn.Module:
    """The base model from its folder, with the adapter folder loaded onto it when given (our loader, which
    refuses any key that does not fit), in eval mode on `device`.

    Raises:
        OSError: no loadable model in base_path; FileNotFoundError / AdapterLoadError: no usable adapter.
    """
    from adapterflow import AdapterModel
    from adapterflow.runtime.base_models import load_base_model

    model = load_base_model(base_path, dtype=dtype, device=device)
    if adapter_dir is not None:
        model = AdapterModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
    return model.eval()


def score(model: Optional[torch.nn.Module], tokenizer, examples: list[Example], *, max_seq_len: int, batch_size: int,
          device: str = "cpu", chat_template: Optional[str] = None, exact_match: bool = False,
          max_new_tokens: int = 32, reuse_loss: Optional[tuple[float, str]] = None) -> ModelScore:
    """Score one model on `examples`.

    Args:
        model: a causal LM (or an AdapterModel around one) on `device`, in eval mode; None is enough when
            reuse_loss is given and exact_match is False.
        tokenizer: the base model's tokenizer; chat_template: template text for chat rows (None: the tokenizer's).
        max_seq_len, batch_size: as training used them (the loss is the same number for the same settings).
        exact_match, max_new_tokens: also measure greedy exact match on the prompt/completion pairs.
        reuse_loss: (loss, where it comes from): a loss already computed on these examples with this model
            (e.g. train-adapter's eval_loss_after); no forward pass for the loss then.

    Raises:
        DatasetError: chat rows without a usable chat template (as `tokenize`).
        ValueError: no example keeps a label token within max_seq_len.
    """
    tokenized = tokenize(examples, tokenizer, max_seq_len, chat_template)
    if not tokenized:
        raise ValueError(f"no evaluation example keeps a label token within max_seq_len={max_seq_len}")
    if reuse_loss is not None:
        loss, source = float(reuse_loss[0]), reuse_loss[1]
    else:
        loss, source = evaluate(model, tokenized, batch_size, tokenizer.pad_token_id, device), "computed"
    rate, pairs = (exact_match_rate(model, tokenizer, examples, max_new_tokens, max_seq_len, device)
                   if exact_match else (None, 0))
    return ModelScore(loss, perplexity(loss), rate, len(tokenized), pairs, source)


def prompt_completion_pairs(examples: list[Example]) -> list[Example]:
    """The examples exact match applies to: a non-empty prompt and completion (no chat rows, no plain text)."""
    return [e for e in examples if e.messages is None and e.prompt and e.completion.strip()]


@torch.no_grad()
def exact_match_rate(model: torch.nn.Module, tokenizer, examples: list[Example], max_new_tokens: int,
                     max_seq_len: int, device: str = "cpu") -> tuple[Optional[float], int]:
    """(share of pairs whose greedy continuation is the completion, number of pairs); (None, 0) without pairs.

    Each prompt is encoded as training encodes it (<bos> prompt, no completion), cut to max_seq_len tokens, and
    continued with transformers' `generate(do_sample=False)` (greedy) for at most max_new_tokens tokens or up to
    <eos>; the decoded continuation (special tokens skipped) and the completion are compared with runs of
    whitespace collapsed and the ends stripped.
    """
    pairs = prompt_completion_pairs(examples)
    if not pairs:
        return None, 0
    generate = model.generate  # an AdapterModel passes it to the wrapped transformers model
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = 0
    for example in pairs:
        ids = (head + tokenizer.encode(example.prompt, add_special_tokens=False))[:max_seq_len]
        input_ids = torch.tensor([ids], device=device)
        output = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                          eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        hits += " ".join(text.split()) == " ".join(example.completion.split())
    return hits / len(pairs), len(pairs)
