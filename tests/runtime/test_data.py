"""Dataset files read through `datasets` (every format, custom columns, splits), their user errors, fingerprints,
tokenization with the prompt masked, and the deterministic, resumable batch stream."""

import hashlib
import json

import pyarrow as pa
import pyarrow.feather  # noqa: F401 - pa.feather
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, DatasetDict

from adapterflow.runtime.base_models import load_tokenizer, resolve_base_model
from adapterflow.runtime.data import (IGNORE_INDEX, BatchStream, DataSpec, DatasetError, Example, dataset_fingerprint,
                                      load_examples, split_examples, tokenize)

ROWS = [{"q": "Q1 ->", "a": " A1", "body": None}, {"q": None, "a": None, "body": "plain text"},
        {"q": "", "a": " A3", "body": None}]
EXPECTED = [Example("Q1 ->", " A1"), Example("", "plain text"), Example("", " A3")]
CUSTOM = dict(prompt_field="q", completion_field="a", text_field="body")
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base_model("builtin:tiny-llama"))


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_every_format(folder, rows) -> dict[str, str]:
    """The same rows as .jsonl, .json, .parquet, .csv (text columns only), .arrow and a save_to_disk folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines are skipped
    (folder / "data.json").write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "data.parquet")
    with pa.OSFile(str(folder / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # the IPC stream format datasets itself writes
    pa.feather.write_feather(table, str(folder / "file.arrow"))  # the IPC file format pyarrow/feather writes
    Dataset(table).save_to_disk(str(folder / "saved"))
    paths = {name: str(folder / name) for name in ("data.jsonl", "data.json", "data.parquet", "data.arrow", "file.arrow",
                                                             "saved")}
    if all(isinstance(v, (str, type(None))) for r in rows for v in r.values()):
        import csv

        with open(folder / "data.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths["data.csv"] = str(folder / "data.csv")
    return paths


def test_every_format_with_custom_columns_reads_the_same_examples(tmp_path):
    paths = write_every_format(tmp_path / "user-data", ROWS)
    before = snapshot(tmp_path / "user-data")
    for name, path in paths.items():
        assert load_examples(DataSpec(path, **CUSTOM)) == EXPECTED, name  # csv: empty cells read as None
    assert snapshot(tmp_path / "user-data") == before  # datasets' cache is elsewhere; nothing written next to data


def test_chat_rows_in_jsonl_and_parquet(tmp_path):
    paths = write_every_format(tmp_path / "chat", CHAT)
    expected = [Example(messages=(("user", "hi"), ("assistant", "hello"))),
                Example(messages=(("system", "s"), ("user", "u"), ("assistant", "a")))]
    for name in ("data.jsonl", "data.parquet", "saved"):
        assert load_examples(DataSpec(paths[name])) == expected, name
    (tmp_path / "conv.jsonl").write_text(json.dumps({"conversation": CHAT[0]["messages"]}) + "\n")
    assert load_examples(DataSpec(str(tmp_path / "conv.jsonl"), messages_field="conversation")) == expected[:1]


def test_today_formats_and_builtins(tmp_path):
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Q ->", "completion": " A"}) + "\n\n")
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n" +
                                          json.dumps({"completion": " B"}) + "\n")
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert load_examples(str(tmp_path / "pc.jsonl")) == [Example("Q ->", " A")]
    assert load_examples(str(tmp_path / "mixed.jsonl")) == [Example("", "plain text"), Example("", " B")]
    assert load_examples(str(tmp_path / "lines.txt")) == [Example("", "first line"), Example("", "second line")]
    assert len(load_examples("builtin:instructions")) > 1000
    chat = load_examples("builtin:chat")
    assert len(chat) == 1500 and all(e.messages and e.messages[-1][0] == "assistant" for e in chat)


def test_splits_of_a_saved_dataset_dict(tmp_path):
    DatasetDict({"train": Dataset.from_list([{"text": "a"}]),
                 "validation": Dataset.from_list([{"text": "b"}])}).save_to_disk(str(tmp_path / "dict"))
    assert load_examples(DataSpec(str(tmp_path / "dict"), split="validation")) == [Example("", "b")]
    with pytest.raises(DatasetError, match=r"dataset.split='test'.*available: \['train', 'validation'\]"):
        load_examples(DataSpec(str(tmp_path / "dict"), split="test"))
    (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DatasetError, match=r"no split 'test'; available: \['train'\]"):
        load_examples(DataSpec(str(tmp_path / "one.jsonl"), split="test"))


@pytest.mark.parametrize("name, content, spec, fragments", [
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": \n', {}, ["bad.jsonl, line 3: not JSON"]),
    ("bad.json", '[{"text": "ok"},\n {"text": }]', {}, ["bad.json, line 2: not JSON"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, ["latin1.jsonl, line 2: not UTF-8", "0xe9"]),
    ("latin1.txt", b"ok\ncaf\xe9\n", {}, ["latin1.txt, line 2: not UTF-8"]),
    ("nofield.jsonl", '{"text": "ok"}\n\n{"other": 1}\n', {}, ["nofield.jsonl, line 3", 'needs a non-empty "text"']),
    ("typed.jsonl", '{"text": "ok"}\n{"text": 5}\n', {}, ["typed.jsonl, line 2", "'text' (dataset.text_field) holds int"]),
    ("typed.parquet", [{"text": "ok"}, {"text": None}], {}, ["typed.parquet, row 2", 'needs a non-empty "text"']),
    ("prompt.jsonl", '{"prompt": 3, "completion": "x"}\n', {}, ["line 1", "(dataset.prompt_field) holds int"]),
    ("chat.jsonl", '{"messages": [{"role": "user"}]}\n', {}, ["line 1", "dataset.messages_field", '"content": str']),
    ("cols.csv", "body,other\nhello,1\n", {}, ["has columns ['body', 'other']", "dataset.text_field='text'",
                                               "dataset.text_field for plain text",
                                               "dataset.completion_field (with dataset.prompt_field)"]),
    ("header.csv", "prompt,completion\n", {}, ["header.csv holds no examples (no data rows)"]),
    ("numbers.csv", "q,answer\nx,0\n", {"prompt_field": "q", "completion_field": "answer"},
     ["numbers.csv, row 1", "holds int", "convert the file to .jsonl or .parquet"]),
    ("noprompt.csv", "question,answer\nx,y\n", {"prompt_field": "q", "completion_field": "answer"},
     ["dataset.prompt_field='q'", "no such column", "['question', 'answer']"]),
    ("cols.csv", "body\nhello\n", {"text_field": "content"}, ["dataset.text_field='content'"]),
    ("empty.jsonl", "\n\n", {}, ["empty.jsonl holds no examples"]),
    ("empty.txt", "\n\n", {}, ["empty.txt holds no examples"]),
    ("data.xml", "<a/>", {}, ["extension '.xml'", ".parquet"]),
    ("garbage.parquet", "not parquet", {}, ["garbage.parquet cannot be read as parquet"]),
])
def test_user_errors_name_the_file_line_and_parameter(tmp_path, name, content, spec, fragments):
    path = tmp_path / name
    if isinstance(content, list):
        pq.write_table(pa.Table.from_pylist(content), path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as error:
        load_examples(DataSpec(str(path), **spec))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_missing_files_folders_and_builtins(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="is a folder but not one written by Dataset.save_to_disk"):
        load_examples(str(tmp_path))
    with pytest.raises(DatasetError, match=r"available: \['chat', 'instructions'\]"):
        load_examples("builtin:nope")


def test_fingerprint_is_stable_and_changes_with_one_byte(tmp_path):
    paths = write_every_format(tmp_path / "d", [{"text": "abc"}, {"text": "def"}])
    for name in ("data.jsonl", "data.parquet", "saved"):
        first = dataset_fingerprint(DataSpec(paths[name]))
        assert first == dataset_fingerprint(paths[name]) and len(first) == 64
        load_examples(paths[name])  # reading changes nothing
        assert dataset_fingerprint(paths[name]) == first
    jsonl = tmp_path / "d" / "data.jsonl"
    before = dataset_fingerprint(str(jsonl))
    assert before == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    jsonl.write_bytes(jsonl.read_bytes().replace(b"abc", b"abd"))
    assert dataset_fingerprint(str(jsonl)) != before
    saved = tmp_path / "d" / "saved"
    before = dataset_fingerprint(str(saved))
    arrow = next(saved.glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[data.index(b"def")] = ord("x")
    arrow.write_bytes(bytes(data))
    assert dataset_fingerprint(str(saved)) != before
    assert dataset_fingerprint("builtin:chat") == dataset_fingerprint("builtin:chat")


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
