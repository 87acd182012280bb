"""Training data: read a dataset, split it, tokenize it, and cut it into deterministic batches.

A dataset (`DataSpec.path`: a .jsonl/.json, .parquet, .csv, .arrow or .txt file, a `Dataset.save_to_disk` folder,
a Hub dataset id or `builtin:<name>`, read by `data_sources`) holds one of three kinds of rows, told apart per row
by which column has a value (in this order):
- chat: `messages_field` holds [{"role": ..., "content": ...}, ...], rendered by the chat template; the loss is on
  the assistant turns only (`chat.tokenize_chat`);
- prompt/completion: `completion_field` (and optionally `prompt_field`); the loss is on the completion and <eos>;
- text: `text_field` (every line of a .txt file); the loss is on all of it and <eos>.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Union

import torch

from adapterflow.runtime.chat import IGNORE_INDEX, Message, resolve_chat_template, tokenize_chat
from adapterflow.runtime.data_sources import BUILTIN_DIR, DatasetError, Table, fingerprint, read_split
from adapterflow.model_references import BUILTIN_PREFIX

__all__ = ["BUILTIN_DIR", "BUILTIN_PREFIX", "IGNORE_INDEX", "BatchStream", "DataSpec", "DatasetError", "Example",
           "TokenizedExample", "collate", "dataset_fingerprint", "load_examples", "resolve_chat_template",
           "split_examples", "tokenize"]


@dataclass(frozen=True)
class DataSpec:
    """What to read and how (the `dataset.*` parameters): the path, the split, the column names, the template."""

    path: str
    split: str = "train"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chat_template: Optional[str] = None  # template text, or a file holding it (resolve_chat_template)
    revision: Optional[str] = None  # Hub datasets: the branch, tag or commit to read (pin_revision makes it a commit)

    def fields(self) -> dict[str, str]:
        """Parameter name -> column name, in the order rows are told apart."""
        return {"dataset.messages_field": self.messages_field, "dataset.completion_field": self.completion_field,
                "dataset.text_field": self.text_field}


@dataclass(frozen=True)
class Example:
    """One row: `messages` for chat; else prompt (may be empty) and completion (the text of a text row)."""

    prompt: str = ""
    completion: str = ""
    messages: Optional[tuple[Message, ...]] = None


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken (prompt, non-assistant turns)


def load_examples(spec: Union[DataSpec, str]) -> list[Example]:
    """Every example of the dataset's split.

    Args:
        spec: a DataSpec, or just a path (default split and column names).

    Raises:
        FileNotFoundError: the file does not exist, or a Hub dataset cannot be downloaded.
        DatasetError: unreadable data, an unknown split, a missing column (the parameter and the columns found
            named), a wrong-typed value (line or row named), or no example at all.
    """
    spec = spec if isinstance(spec, DataSpec) else DataSpec(str(spec))
    table = read_split(spec.path, spec.split, spec.revision)
    columns = table.rows.column_names
    present = {parameter: column for parameter, column in spec.fields().items() if column in columns}
    if not present:
        wanted = ", ".join(f"{p}={c!r}" for p, c in spec.fields().items())
        raise DatasetError(f"Dataset {table.name} has columns {columns}, none of {wanted}; set the parameter that "
                           f"names your column: dataset.completion_field (with dataset.prompt_field) for "
                           f"prompt/completion data, dataset.text_field for plain text, dataset.messages_field for "
                           f"chat rows.")
    if spec.prompt_field != DataSpec.prompt_field and spec.prompt_field not in columns:
        # a prompt column the user named must exist: training on completions alone is another task
        raise DatasetError(f"dataset.prompt_field={spec.prompt_field!r}: {table.name} has no such column (its "
                           f"columns: {columns}); name one of them.")
    prompt_column = spec.prompt_field if spec.prompt_field in columns else None
    needed = list(dict.fromkeys([*present.values(), *([prompt_column] if prompt_column else [])]))
    data = table.rows.select_columns(needed).to_dict()  # column -> list: no per-row formatting, no cache files
    examples = []
    for index in range(len(table.rows)):
        example = _example({column: data[column][index] for column in needed}, present, prompt_column, table, index)
        if example is not None:
            examples.append(example)
    if not examples:
        raise DatasetError(f"Dataset {table.name} holds no examples; add lines with text, or prompt/completion "
                           f"records.")
    return examples


def _example(row: dict, present: dict[str, str], prompt_column: Optional[str], table: Table,
             index: int) -> Optional[Example]:
    """The example of one row (None for a blank text line), from the first of `present`'s columns with a value."""
    for parameter, column in present.items():
        value = row[column]
        if value is None:
            continue
        if parameter == "dataset.messages_field":
            return Example(messages=_messages(value, parameter, column, table, index))
        if not isinstance(value, str):
            raise DatasetError(f"Dataset {table.name}, {table.where(index)}: column {column!r} ({parameter}) holds "
                               f"{type(value).__name__}, expected a string (datasets typed the column from its "
                               f"values); store it as text: e.g. convert the file to .jsonl or .parquet with string "
                               f"values.")
        if table.lines_of_text:
            return Example("", value) if value.strip() else None
        if not value:
            continue
        if parameter == "dataset.text_field":
            return Example("", value)
        prompt = row[prompt_column] if prompt_column else ""
        if not isinstance(prompt, (str, type(None))):
            raise DatasetError(f"Dataset {table.name}, {table.where(index)}: column {prompt_column!r} "
                               f"(dataset.prompt_field) holds {type(prompt).__name__}, expected a string.")
        return Example(prompt or "", value)
    needs = " or ".join(f'"{column}"' for column in present.values())
    raise DatasetError(f"Dataset {table.name}, {table.where(index)}: needs a non-empty {needs} "
                       f"(the columns dataset.messages_field, dataset.completion_field, dataset.text_field name).")


def _messages(value, parameter: str, column: str, table: Table, index: int) -> tuple[Message, ...]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise DatasetError(f"Dataset {table.name}, {table.where(index)}: column {column!r} ({parameter}) must be a "
                           f'non-empty list of {{"role": str, "content": str}} messages.')
    if not any(m["role"] == "assistant" for m in value):  # nothing to learn from: most likely a misspelt role
        roles = ", ".join(dict.fromkeys(repr(m["role"]) for m in value))
        raise DatasetError(f"Dataset {table.name}, {table.where(index)}: the conversation in column {column!r} has "
                           f"no 'assistant' message (roles: {roles}); the loss is on the assistant's turns, so "
                           f"every conversation needs one: check the role names.")
    return tuple((m["role"], m["content"]) for m in value)


def dataset_fingerprint(spec: Union[DataSpec, str]) -> str:
    """sha256 (hex) of the dataset's files (a Hub dataset: of its commit); see `data_sources.fingerprint`."""
    if isinstance(spec, DataSpec):
        return fingerprint(spec.path, spec.revision)
    return fingerprint(str(spec))


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically and hold out `eval_fraction` (at least one example) for evaluation."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction)) if len(shuffled) > 1 else 0
    return shuffled[n_eval:], shuffled[:n_eval]


def tokenize(examples: list[Example], tokenizer, max_seq_len: int,
             chat_template: Optional[str] = None) -> list[TokenizedExample]:
    """Token ids and labels of each example, truncated to max_seq_len (labels cut at the same place).

    Chat: rendered by `chat_template` (template text; None: the tokenizer's), loss on assistant turns only.
    Otherwise: <bos> prompt completion <eos>; the loss covers completion and <eos>. Examples left with no
    labelled token after truncation are dropped.

    Raises:
        DatasetError: chat examples without any chat template (names dataset.chat_template), or a template that
            fails or is not prefix-stable.
    """
    tokenized = []
    for example in examples:
        if example.messages is not None:
            input_ids, labels = tokenize_chat(example.messages, tokenizer, chat_template)
        else:
            prompt = tokenizer.encode(example.prompt, add_special_tokens=False) if example.prompt else []
            completion = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
            head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            input_ids, labels = head + prompt + completion, [IGNORE_INDEX] * len(head + prompt) + completion
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        if any(label != IGNORE_INDEX for label in labels):
            tokenized.append(TokenizedExample(input_ids, labels))
    return tokenized


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors of shape (batch, seq)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shard(examples: list[TokenizedExample], rank: int, world_size: int) -> list[TokenizedExample]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one). An empty slice becomes the
    batch's first example with every label ignored: the rank still runs forward and backward with the others
    (DDP and FSDP communicate there), contributing nothing to the loss."""
    n = len(examples)
    mine = examples[rank * n // world_size:(rank + 1) * n // world_size]
    return mine or [TokenizedExample(examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].labels))]


def label_tokens(examples: list[TokenizedExample]) -> int:
    """Tokens the causal-LM loss is taken on (labels shifted by one, as the model does)."""
    return sum(label != IGNORE_INDEX for example in examples for label in example.labels[1:])


class BatchStream:
    """Micro-batch number m -> batch, the same on every run with the same seed: epoch e visits the examples in a
    permutation seeded by (seed, e). Resuming at step k just asks for batch k * accumulation onwards. Under
    torchrun, `batch_size` is the global batch: rank r of `world_size` gets its `shard` of every micro-batch."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if not examples:
            raise DatasetError("No training example is left after tokenization; check max_seq_len and the data.")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = -(-len(examples) // batch_size)
        self._order: tuple[int, list[int]] | None = None

    def global_batch(self, m: int) -> list[TokenizedExample]:
        """The examples of micro-batch m, over all ranks."""
        epoch, index = divmod(m, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        chosen = self._order[1][index * self.batch_size:(index + 1) * self.batch_size]
        return [self.examples[i] for i in chosen]

    def __getitem__(self, m: int) -> dict[str, torch.Tensor]:
        """This rank's part of micro-batch m, collated."""
        return collate(shard(self.global_batch(m), self.rank, self.world_size), self.pad_id)
