"""A direct computation of the eval loss, to check adapterflow.runtime.evaluation against: one unpadded example
at a time, torch's cross_entropy summed over the label tokens (labels shifted by one, as causal LMs predict the
next token), divided by their number."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterflow.runtime.data import IGNORE_INDEX, tokenize


def direct_loss(model, tokenizer, examples, max_seq_len: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for example in tokenize(examples, tokenizer, max_seq_len):
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            labels = torch.tensor(example.labels)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count
