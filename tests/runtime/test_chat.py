"""Chat rows: rendered by the chat template, the loss on every assistant turn and nothing else, token by token."""

import copy
import json

import pytest

from adapterflow.runtime.base_models import load_tokenizer, resolve_base_model
from adapterflow.runtime.chat import chat_prompt, resolve_chat_template, tokenize_chat
from adapterflow.runtime.data import BUILTIN_DIR, IGNORE_INDEX, DatasetError, Example, tokenize

CONVERSATION = (("system", "Be brief."), ("user", "Next number after 4"), ("assistant", "5"),
                ("user", "Opposite of hot"), ("assistant", "cold"), ("user", "Plural of cat"), ("assistant", "cats"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base_model("builtin:tiny-llama"))


def hand_expectation(tokenizer) -> tuple[list[int], list[int]]:
    """The builtin template (builtin/tiny-llama.chat_template.jinja) written out by hand for CONVERSATION:

        <s><|system|>\\nBe brief.\\n<|user|>\\nNext number after 4\\n<|assistant|>\\n[5</s>]\\n<|user|>\\n...

    Pieces in brackets are the assistant turns (content and the </s> that closes the turn): the loss is on them only.
    Special tokens are looked up by name, text pieces encoded one by one (they never merge across a newline)."""
    pieces = [("<s>", 0), ("<|system|>", 0), "\n", "Be brief.", "\n",
              ("<|user|>", 0), "\n", "Next number after 4", "\n", ("<|assistant|>", 0), "\n", ("5", 1), ("</s>", 1),
              "\n", ("<|user|>", 0), "\n", "Opposite of hot", "\n", ("<|assistant|>", 0), "\n", ("cold", 1),
              ("</s>", 1),
              "\n", ("<|user|>", 0), "\n", "Plural of cat", "\n", ("<|assistant|>", 0), "\n", ("cats", 1), ("</s>", 1)]
    ids, labels = [], []
    for piece in pieces:
        text, loss = piece if isinstance(piece, tuple) else (piece, 0)
        if text.startswith("<") and text.endswith(">"):
            tokens = [tokenizer.convert_tokens_to_ids(text)]
        else:
            tokens = tokenizer.encode(text, add_special_tokens=False)
        ids += tokens
        labels += tokens if loss else [IGNORE_INDEX] * len(tokens)
    return ids, labels


def test_assistant_mask_token_by_token_for_three_turns_with_a_system_message(tokenizer):
    expected_ids, expected_labels = hand_expectation(tokenizer)
    input_ids, labels = tokenize_chat(CONVERSATION, tokenizer)
    assert input_ids == expected_ids
    assert labels == expected_labels
    # The same ids the model sees at inference (apply_chat_template tokenizes the rendering as a whole).
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    assert input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    # Read back: exactly the three answers and their end tokens carry a loss.
    learned = [tokenizer.decode([t]) for t in labels if t != IGNORE_INDEX]
    assert "".join(learned) == "5</s>cold</s>cats</s>"
    assert [tokenizer.convert_ids_to_tokens(t) for t in input_ids[:2]] == ["<s>", "<|system|>"]


def test_truncation_keeps_labels_aligned(tokenizer):
    full_ids, full_labels = tokenize_chat(CONVERSATION, tokenizer)
    first = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)  # the answer "5"
    for n in (len(full_ids) - 1, len(full_ids) - 6, first + 1):
        [example] = tokenize([Example(messages=CONVERSATION)], tokenizer, max_seq_len=n)
        assert example.input_ids == full_ids[:n] and example.labels == full_labels[:n]
    assert tokenize([Example(messages=CONVERSATION)], tokenizer, max_seq_len=first) == []  # no assistant token left


def test_a_tokenizer_without_a_template_names_the_parameter_and_a_given_template_works(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DatasetError, match="dataset.chat_template.*template text, or a file"):
        tokenize([Example(messages=CONVERSATION)], bare, 64)
    assert tokenize([Example("p", " c")], bare, 64)  # prompt/completion needs no template
    [example] = tokenize([Example(messages=CONVERSATION)], bare, 256, chat_template=tokenizer.chat_template)
    assert (example.input_ids, example.labels) == hand_expectation(tokenizer)


def test_a_template_that_is_not_prefix_stable_is_refused(tokenizer):
    counting = "{% for m in messages %}{{ m['content'] }}{% endfor %} ({{ messages | length }} messages)"
    with pytest.raises(DatasetError, match="not prefix-stable"):
        tokenize_chat(CONVERSATION, tokenizer, counting)
    failing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(DatasetError, match="fails on a conversation.*only user turns"):
        tokenize_chat(CONVERSATION, tokenizer, failing)


def test_chat_template_from_a_string_or_a_file(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(template) == template and resolve_chat_template(None) is None
    (tmp_path / "t.jinja").write_text(template)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == template
    with pytest.raises(DatasetError, match="neither a Jinja template .* nor an existing file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(DatasetError, match="is empty"):
        resolve_chat_template(str(tmp_path / "empty.jinja"))


def test_builtin_chat_dataset_renders_every_assistant_turn(tokenizer):
    rows = [json.loads(line) for line in (BUILTIN_DIR / "chat.jsonl").read_text().splitlines()[:50]]
    for row in rows:
        messages = tuple((m["role"], m["content"]) for m in row["messages"])
        ids, labels = tokenize_chat(messages, tokenizer)
        learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert learned == "".join(c + "</s>" for r, c in messages if r == "assistant")


def test_chat_generator_regenerates_the_shipped_file(tmp_path):
    import os
    import subprocess
    import sys

    from adapterflow.runtime.builtin import make_chat

    shipped = (BUILTIN_DIR / "chat.jsonl").read_bytes()
    assert make_chat.render(make_chat.generate()) == shipped
    output = tmp_path / "chat.jsonl"
    subprocess.run([sys.executable, "-m", "adapterflow.runtime.builtin.make_chat", "--output", str(output)],
                   check=True, env={**os.environ, "PYTHONHASHSEED": "random"}, capture_output=True)
    assert output.read_bytes() == shipped and make_chat.main(["--check"]) == 0


def test_the_chat_prompt_is_the_conversation_up_to_the_first_assistant_turn(tokenizer):
    messages = CONVERSATION
    assert chat_prompt(messages, tokenizer) == "<s><|system|>\nBe brief.\n<|user|>\nNext number after 4\n<|assistant|>\n"
    # what training saw before the first assistant token is exactly this prompt
    ids, labels = tokenize_chat(messages, tokenizer)
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.encode(chat_prompt(messages, tokenizer), add_special_tokens=False) == ids[:first]
