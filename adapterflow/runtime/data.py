"""Training data: read a dataset file, split it, tokenize it, and cut it into deterministic batches.

Accepted files: `.jsonl` with {"text": ...} or {"prompt": ..., "completion": ...} per line, and `.txt` (one
example per non-empty line). Prompt tokens are masked from the loss; the model learns the completion.
`builtin:<name>` names a dataset shipped in `adapterflow/runtime/builtin/`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"
IGNORE_INDEX = -100  # label value that the loss skips (transformers' convention)


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken (prompt)


def resolve_dataset(path: str) -> Path:
    """The file a dataset parameter names (`builtin:<name>` or a path)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        builtin = BUILTIN_DIR / f"{name}.jsonl"
        if not builtin.is_file():
            available = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
            raise DatasetError(f"Unknown builtin dataset {name!r}; available: {available}.")
        return builtin
    return Path(path)


def load_examples(path: str | Path) -> list[Example]:
    """Read every example of a dataset file.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: an unsupported extension, malformed lines (all listed), or no example at all.
    """
    file = resolve_dataset(str(path))
    if file.is_dir():
        raise DatasetError(f"Dataset {file} is a folder; pass a .jsonl or .txt file.")
    if not file.is_file():
        raise FileNotFoundError(f"Dataset {file} not found; pass a .jsonl or .txt file (or builtin:instructions).")
    if file.suffix == ".txt":
        examples = [Example("", line.strip()) for _, line in _lines(file) if line.strip()]
    elif file.suffix == ".jsonl":
        examples = _read_jsonl(file)
    else:
        raise DatasetError(f"Dataset {file} has extension {file.suffix!r}; use .jsonl (text or prompt/completion) or .txt.")
    if not examples:
        raise DatasetError(f"Dataset {file} holds no examples; add lines with text, or prompt/completion records.")
    return examples


def _lines(file: Path) -> list[tuple[int, str]]:
    """(line number, text) for every line of a UTF-8 file, whatever the locale's encoding.

    Raises:
        DatasetError: the file is not UTF-8 (the line and column of the first bad byte named).
    """
    lines = []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig")))  # -sig: a leading BOM is not text
        except UnicodeDecodeError as exc:
            raise DatasetError(f"Dataset {file}, line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                               f"column {exc.start + 1}); save the file as UTF-8.") from None
    return lines


def _read_jsonl(file: Path) -> list[Example]:
    examples, problems = [], []
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"]:
            examples.append(Example("", record["text"]))
        elif isinstance(record, dict) and isinstance(record.get("completion"), str) and record["completion"]:
            examples.append(Example(str(record.get("prompt", "")), record["completion"]))
        else:
            problems.append(f'line {number}: needs a non-empty "text", or "prompt" and "completion" strings')
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        lines = "lines" if len(problems) > 1 else "line"
        raise DatasetError(f"Dataset {file} has {len(problems)} malformed {lines}:\n{shown}{more}")
    return examples


def dataset_sha256(path: str | Path) -> str:
    return hashlib.sha256(resolve_dataset(str(path)).read_bytes()).hexdigest()


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically and hold out `eval_fraction` (at least one example) for evaluation."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction)) if len(shuffled) > 1 else 0
    return shuffled[n_eval:], shuffled[:n_eval]


def tokenize(examples: list[Example], tokenizer, max_seq_len: int) -> list[TokenizedExample]:
    """<bos> prompt completion <eos>, truncated to max_seq_len; the loss covers completion and <eos>."""
    tokenized = []
    for example in examples:
        prompt = tokenizer.encode(example.prompt, add_special_tokens=False) if example.prompt else []
        completion = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        input_ids = (head + prompt + completion)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(head + prompt) + completion)[:max_seq_len]
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
