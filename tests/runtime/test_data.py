"""Dataset files, tokenization with the prompt masked, and the deterministic, resumable batch stream."""

import json

import pytest
import torch

from adapterflow.runtime.base_models import load_tokenizer, resolve_base_model
from adapterflow.runtime.data import (IGNORE_INDEX, BatchStream, DatasetError, Example, load_examples, split_examples,
                              tokenize)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base_model("builtin:tiny-llama"))


def test_the_three_formats(tmp_path):
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Q ->", "completion": " A"}) + "\n\n")
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n")
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert load_examples(tmp_path / "pc.jsonl") == [Example("Q ->", " A")]
    assert load_examples(tmp_path / "text.jsonl") == [Example("", "plain text")]
    assert load_examples(tmp_path / "lines.txt") == [Example("", "first line"), Example("", "second line")]
    assert len(load_examples("builtin:instructions")) > 1000


def test_bad_files_name_every_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DatasetError) as error:
        load_examples(bad)
    assert all(f"line {n}:" in str(error.value) for n in (1, 2, 4)) and "line 3:" not in str(error.value)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no examples"):
        load_examples(tmp_path / "empty.txt")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="use .jsonl"):
        load_examples(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="available: \\['instructions'\\]"):
        load_examples("builtin:nope")


def test_prompt_tokens_are_masked_from_the_loss(tokenizer):
    [example] = tokenize([Example("Uppercase: dog ->", " DOG")], tokenizer, max_seq_len=64)
    prompt = tokenizer.encode("Uppercase: dog ->", add_special_tokens=False)
    completion = tokenizer.encode(" DOG", add_special_tokens=False)
    assert example.input_ids == [tokenizer.bos_token_id] + prompt + completion + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * (1 + len(prompt)) + completion + [tokenizer.eos_token_id]
    assert tokenize([Example("a long prompt " * 20, " x")], tokenizer, max_seq_len=8) == []  # nothing to learn


def test_split_and_batches_are_deterministic_and_resumable(tokenizer):
    examples = load_examples("builtin:instructions")[:100]
    train, held_out = split_examples(examples, 0.1, seed=3)
    assert len(held_out) == 10 and not set(held_out) & set(train)
    assert split_examples(examples, 0.1, seed=3) == (train, held_out)
    data = tokenize(train, tokenizer, 32)
    stream, again = BatchStream(data, 8, seed=5, pad_id=0), BatchStream(data, 8, seed=5, pad_id=0)
    for m in (0, 3, 12, 40, 3):  # any order, across epochs: batch m is always the same
        assert all(torch.equal(stream[m][k], again[m][k]) for k in ("input_ids", "labels", "attention_mask"))
    first_epoch = torch.cat([stream[m]["input_ids"][:, 0] for m in range(stream.batches_per_epoch)])
    assert len(first_epoch) == len(data)
    assert not torch.equal(stream[0]["input_ids"], stream[stream.batches_per_epoch]["input_ids"])  # reshuffled
