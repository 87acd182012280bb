"""The one secret scrubber: everything the pipeline writes (plan.json, MLflow params, tags and artifacts, Prefect
artifacts and logs, error messages) goes through `redact` / `redact_text` first. Plain Python, no Prefect or MLflow.

What counts as a secret:
- URL credentials: `scheme://user:password@host` becomes `scheme://user:***@host` (the host stays readable);
- values of query parameters named like a secret (`?token=...`, `&api_key=...`) and `Bearer <token>` headers;
- the value of every secret environment variable (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, any *TOKEN* / *SECRET* /
  *PASSWORD* / *KEY* variable of 8+ characters), plain and URL-encoded;
- values registered at run time with `register_secret` (e.g. a token loaded from a Prefect Secret block);
- in dicts, the value of any key named like a secret (`token`, `hf_token`, `api_key`, `password`, ...).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Optional
from urllib.parse import quote, urlsplit

MASK = "***"
MIN_SECRET_LENGTH = 8  # shorter values of such variables ("false", "1") are settings, not secrets
SECRET_KEY = re.compile(r"(?i)(?:^|[^a-z])(token|secret|password|passwd|api[_-]?key|apikey|credentials?)(?:$|[^a-z])")
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
ALWAYS_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# scheme://user:password@ (RFC 3986 userinfo; the password runs to the last "@" before the path).
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*):(?P<password>[^\s/?#]*)@")
# ?token=..., &access_token=..., &X-Amz-Signature=...: a query key ending in a secret word.
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:[^=&;\s#]*[_.-])?(?:token|secret|password|passwd|api[_-]?key|apikey|signature|sig|auth)=)"
    r"(?P<value>[^&;\s#'\"]+)", re.IGNORECASE)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",]+")
_registered: set[str] = set()


def register_secret(value: Optional[str]) -> None:
    """Scrub `value` from everything redacted in this process from now on (e.g. a token read from a Prefect
    Secret block, which no environment variable holds). Values under MIN_SECRET_LENGTH are ignored."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def secret_values(extra: Iterable[str] = ()) -> set[str]:
    """The literal secrets to scrub: secret environment variables, registered values and `extra`."""
    names = set(ALWAYS_SECRET_ENV) | {k for k in os.environ if SECRET_ENV_NAME.search(k)}
    values = {os.environ[k] for k in names if len(os.environ.get(k, "")) >= MIN_SECRET_LENGTH}
    return values | _registered | {s for s in extra if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH}


def url_password(url: Any) -> Optional[str]:
    """The password in a URL's userinfo (`http://user:secret@host` -> "secret"), or None."""
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return None
    try:
        return urlsplit(url.strip()).password or None
    except ValueError:
        return None


def redact_text(text: str, secrets: Optional[Iterable[str]] = None) -> str:
    """`text` with URL passwords, secret query values, Bearer tokens and secret values replaced by "***".

    Args:
        secrets: literal values to scrub; default `secret_values()` (environment and registered secrets).
    """
    if not isinstance(text, str) or not text:
        return text
    for secret in sorted(secret_values() if secrets is None else set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
            encoded = quote(secret, safe="")
            if encoded != secret:
                text = text.replace(encoded, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _SECRET_QUERY.sub(lambda m: m["head"] + MASK, text)
    return _BEARER.sub(lambda m: f"{m[1]} {MASK}", text)


def redact(obj: Any, secrets: Optional[Iterable[str]] = None) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings, scalars) with every secret replaced by "***": the values of
    keys named like a secret (token, secret, password, api_key, credentials; not e.g. `tokens_per_second`), and
    in all strings what `redact_text` scrubs. Keys are redacted as text too."""
    secrets = secret_values() if secrets is None else set(secrets)
    if isinstance(obj, dict):
        return {redact_text(key, secrets) if isinstance(key, str) else key:
                MASK if isinstance(key, str) and SECRET_KEY.search(key) and value not in (None, "")
                else redact(value, secrets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(value, secrets) for value in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def redact_exception(exc: Optional[BaseException]) -> Optional[BaseException]:
    """Scrub, in place, the message of `exc` and of every exception in its cause / context chain: string `args`
    and a string `message` attribute (as MlflowException has). Returns `exc`, so `raise redact_exception(e)`
    works; the type, and so any retry classification, is unchanged."""
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.args = tuple(redact_text(arg) if isinstance(arg, str) else arg for arg in error.args)
        if isinstance(getattr(error, "message", None), str):
            try:
                error.message = redact_text(error.message)
            except AttributeError:  # a read-only property
                pass
        error = error.__cause__ or error.__context__
    return exc


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs each record's message, arguments and traceback text with `redact_text`.

    Attach it to handlers (a logger's own filters miss records propagated from child loggers); see
    `install_log_redaction`. It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: leave it to the handler to report
            return True
        record.msg, record.args = redact_text(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(*loggers: logging.Logger) -> None:
    """Attach the redacting filter to every handler of the root logger, of every logger created so far (Prefect's
    console and API handlers included) and of `loggers`; idempotent, so call it again after handlers change."""
    candidates = [logging.getLogger(), *loggers]
    candidates += [log for log in logging.Logger.manager.loggerDict.values() if isinstance(log, logging.Logger)]
    for log in candidates:
        for handler in log.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
