"""Chat conversations rendered with a chat template, the loss on the assistant turns only.

Masking method: incremental rendering. For assistant message i, `render(messages[:i], add_generation_prompt=True)`
ends where the assistant's text starts (after the template's assistant header) and `render(messages[:i + 1])` ends
where its turn ends (its content and whatever the template writes to close the turn, e.g. `</s>` or
`<|im_end|>`). The characters in between are that turn's span. The whole conversation is rendered and tokenized
once, as `apply_chat_template(..., tokenize=True)` does (no special tokens added: the template writes them), and
a token is in the loss when its first character (the tokenizer's offset mapping) lies in an assistant span.

Why this and not `return_assistant_tokens_mask`: that needs `{% generation %}` blocks, which most published chat
templates (Llama 3, Qwen 2.5, Mistral) lack; incremental rendering works with any template whose renderings of a
conversation's prefixes are prefixes of the full rendering. That is checked for every assistant turn, and a
template that is not (e.g. one that drops earlier turns' reasoning or dates the system prompt per turn) is a clear
error instead of a silently wrong mask. Tokens are taken from the one tokenization of the full text, so BPE merges
across a turn boundary cannot shift the labels. Needs a fast tokenizer (for the offset mapping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from adapterflow.runtime.data_sources import DatasetError

IGNORE_INDEX = -100  # label value that the loss skips (transformers' convention)
Message = tuple[str, str]  # (role, content)
NO_TEMPLATE = ("dataset.chat_template: the dataset holds chat messages but the base model's tokenizer has no chat "
               "template; set dataset.chat_template to a Jinja chat template (the template text, or a file holding "
               "it, e.g. the chat_template.jinja of the model's instruct version).")


def is_template_text(value: str) -> bool:
    """True when a `dataset.chat_template` value is a Jinja template itself rather than a file name."""
    return "{{" in value or "{%" in value


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """The template text of a `dataset.chat_template` value.

    Args:
        value: None (use the tokenizer's own template), a Jinja template (it contains `{{` or `{%`), or the path of
            a file holding one (relative paths: against the current directory).

    Raises:
        DatasetError: the value is neither a template nor a readable UTF-8 file, or the file is empty.
    """
    if value is None or is_template_text(value):
        return value
    file = Path(value).expanduser()
    if not file.is_file():
        raise DatasetError(f"dataset.chat_template {value!r} is neither a Jinja template (no '{{{{' or '{{%') nor an "
                           f"existing file; pass the template text or the path of a file holding it.")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset.chat_template file {file} cannot be read as UTF-8 text ({exc}).") from None
    if not text.strip():
        raise DatasetError(f"dataset.chat_template file {file} is empty; put a Jinja chat template in it.")
    return text


def tokenize_chat(messages: Sequence[Message], tokenizer, chat_template: Optional[str] = None
                  ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation.

    Args:
        messages: (role, content) pairs, e.g. system, user, assistant, user, assistant.
        tokenizer: a fast transformers tokenizer.
        chat_template: a Jinja template; None: the tokenizer's own.

    Returns:
        (input_ids, labels), equal lengths, not truncated: labels are the token id on assistant turns (content and
        turn end as the template renders them) and IGNORE_INDEX everywhere else.

    Raises:
        DatasetError: no chat template (names `dataset.chat_template`), a template that fails on the conversation or
            is not prefix-stable, or a tokenizer without offset mappings.
    """
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise DatasetError(NO_TEMPLATE)
    conversation = [{"role": role, "content": content} for role, content in messages]
    full = _render(tokenizer, conversation, chat_template, generation_prompt=False)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, conversation[:i], chat_template, generation_prompt=True)
        end = _render(tokenizer, conversation[:i + 1], chat_template, generation_prompt=False)
        if not (end.startswith(start) and full.startswith(end)):
            raise DatasetError(
                f"dataset.chat_template: the chat template is not prefix-stable (rendering the conversation up to "
                f"assistant message {i + 1} is not a prefix of rendering all of it), so the assistant tokens cannot "
                f"be found; pass a template that renders earlier turns the same whatever follows them.")
        spans.append((len(start), len(end)))
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DatasetError("Chat data needs a fast tokenizer (offset mappings); the base model's tokenizer is a "
                           "slow one: save a tokenizer.json with it.") from None
    input_ids = list(encoded["input_ids"])
    labels = [token if any(a <= first < b for a, b in spans) else IGNORE_INDEX
              for token, (first, _) in zip(input_ids, encoded["offset_mapping"])]
    return input_ids, labels


def chat_prompt(messages: Sequence[Message], tokenizer, chat_template: Optional[str] = None) -> str:
    """The text a model trained on this chat data is prompted with: the conversation up to its first assistant
    turn, rendered with the chat template and its generation prompt (the format `tokenize_chat` trained on).

    Raises:
        DatasetError: the template fails on the conversation.
    """
    conversation = []
    for role, content in messages:
        if role == "assistant":
            break
        conversation.append({"role": role, "content": content})
    return _render(tokenizer, conversation, chat_template, generation_prompt=True)


def _render(tokenizer, conversation: list[dict], chat_template: Optional[str], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja2 raises TemplateError and anything the template raises
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"dataset.chat_template: the chat template fails on a conversation of the dataset "
                           f"({type(exc).__name__}: {reason}); fix the template or the messages.") from None
