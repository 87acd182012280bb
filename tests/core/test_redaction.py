"""adapterflow.redaction, the one secret scrubber: tokens, secret environment variables, URL credentials, secret
query values and Bearer headers, in values, log records and exceptions."""

import ast
import logging
from pathlib import Path

import pytest

from adapterflow import redaction
from adapterflow.redaction import (RedactingFilter, install_log_redaction, redact, redact_exception, redact_text,
                                   register_secret, url_password)

ROOT = Path(__file__).parents[2]


def test_redact():
    secrets = {"hf_abcdefgh12345"}
    data = {"hub": {"token": "x", "Api_Key": 3, "password": None, "repo": "me/r"}, "HF_TOKEN": "",
            "urls": ["https://h/?t=hf_abcdefgh12345", ("hf_abcdefgh12345",)], "n": 1}
    assert redact(data, secrets) == {"hub": {"token": "***", "Api_Key": "***", "password": None, "repo": "me/r"},
                                     "HF_TOKEN": "", "urls": ["https://h/?t=***", ("***",)], "n": 1}


def test_keys_that_only_contain_a_secret_word_are_kept():
    data = {"tokens_per_second": 12.5, "max_new_tokens": 32, "hf_token": "abc", "token_secret_block": "blk"}
    assert redact(data, set()) == {"tokens_per_second": 12.5, "max_new_tokens": 32, "hf_token": "***",
                                   "token_secret_block": "***"}


def test_redact_reads_secret_environment_variables(monkeypatch):
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_hub_token_value")
    monkeypatch.setenv("MY_SERVICE_SECRET", "s3cr3t-value-long")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a setting, too short to be a secret
    assert redact("a hf_hub_token_value b s3cr3t-value-long false") == "a *** b *** false"


def test_url_encoded_secret_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss/word:123")
    assert redact_text("x=p%40ss%2Fword%3A123 y=p@ss/word:123") == "x=*** y=***"


@pytest.mark.parametrize("text, expected", [
    ("http://user:secret@host:5000/api", "http://user:***@host:5000/api"),
    ("https://alice:p@ss@mlflow.example.com", "https://alice:***@mlflow.example.com"),
    ("see postgresql://u:pw@db/x and http://h2/?token=abc&x=1",
     "see postgresql://u:***@db/x and http://h2/?token=***&x=1"),
    ("https://s3/x?X-Amz-Signature=deadbeef&author=me", "https://s3/x?X-Amz-Signature=***&author=me"),
    ("Authorization: Bearer hf_abc.def", "Authorization: Bearer ***"),
    ("http://host:5000/path", "http://host:5000/path"),  # no credentials: unchanged
    ("ssh://git@host/repo", "ssh://git@host/repo"),  # a user without a password is no secret
])
def test_url_credentials_and_query_secrets(text, expected):
    assert redact_text(text, set()) == expected


def test_url_password():
    assert url_password("http://u:s3cret@h:1") == "s3cret"
    assert url_password("http://u@h") is None and url_password("sqlite:///a/b.db") is None
    assert url_password("not a url") is None and url_password(None) is None


def test_registered_secrets_are_scrubbed(monkeypatch):
    monkeypatch.setattr(redaction, "_registered", set())
    register_secret("short")  # under MIN_SECRET_LENGTH: a setting, not scrubbed
    register_secret("block-token-value-42")
    assert redact_text("block-token-value-42 short") == "*** short"


def test_log_filter_scrubs_message_arguments_and_traceback():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "uri %s failed", ("http://u:pw123456@h",), None)
    try:
        raise ConnectionError("http://u:pw123456@h refused")
    except ConnectionError:
        import sys
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "pw123456" not in text and "http://u:***@h refused" in text
    assert record.getMessage() == "uri http://u:***@h failed"


def test_install_log_redaction_reaches_handlers_of_child_loggers(caplog):
    logger = logging.getLogger("adapterflow.test.child")
    install_log_redaction()  # caplog's handler sits on the root logger
    logger.warning("tracking %s", "https://me:hunter2hunter2@mlflow.example")
    assert "hunter2hunter2" not in caplog.text and "https://me:***@mlflow.example" in caplog.text


def test_redact_exception_keeps_the_type_and_scrubs_the_chain():
    class WithMessage(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.message = message

    try:
        try:
            raise OSError("http://u:topsecret1@h unreachable")
        except OSError as inner:
            raise WithMessage("API request to http://u:topsecret1@h/api failed") from inner
    except WithMessage as exc:
        error = redact_exception(exc)
    assert isinstance(error, WithMessage) and "topsecret1" not in str(error) + error.message
    assert "topsecret1" not in str(error.__cause__) and "http://u:***@h" in str(error.__cause__)


def test_one_scrubber():
    """No other module keeps its own secret patterns or replaces secrets with "***" itself."""
    owners = []
    for path in sorted(p for package in ("adapterflow", "flows", "tasks") for p in (ROOT / package).rglob("*.py")):
        if path.name == "redaction.py":
            continue
        strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)]
        if any(s == "***" or "bearer" in s.lower() or s.startswith("token|secret") for s in strings):
            owners.append(path.relative_to(ROOT).as_posix())
    assert owners == []
