"""Errors of a Hub push, and which of huggingface_hub's errors are worth a retry.

Every failure leaves a push as a HubPushError whose `transient` says whether a retry may succeed; its second
base class (ConnectionError / TimeoutError / ValueError) says the same to generic code. huggingface_hub and
httpx2 are imported inside the functions only.
"""

from __future__ import annotations

import contextlib
from typing import Callable

TRANSIENT_STATUSES = frozenset({408, 412, 429, 500, 502, 503, 504})  # 412: the branch moved; retry on the new head


class HubPushError(RuntimeError):
    """A push to the Hub failed. The message says what to fix; it never contains the token. Raised as one of the
    subclasses below, whose second base tells generic retry policies (adapterflow.tasks.retries.is_transient) what `transient`
    says: ConnectionError / TimeoutError when transient, ValueError when permanent.

    Attributes:
        transient: True when retrying may succeed (5xx, 408, 412, 429, timeouts, connection errors), False when
            it cannot (401, 403, 404, other 4xx, an invalid card, a tag at another commit).
        status: HTTP status of the failed request, or None. repo_id: the repository.
        step: "create repo", "create branch", "upload", "tag" or "check folder".
    """
    transient = False

    def __init__(self, message: str, *, status: int | None = None, repo_id: str | None = None,
                 step: str | None = None) -> None:
        super().__init__(message)
        self.status, self.repo_id, self.step = status, repo_id, step


class HubPushPermanentError(HubPushError, ValueError):
    """A retry cannot help: fix the token, the repo_id, the revision, the card or the tag first."""


class HubPushTransientError(HubPushError, ConnectionError):
    """The Hub or the network failed (5xx, 408, 412, 429, connection errors): retrying later may work."""
    transient = True


class HubPushTimeout(HubPushError, TimeoutError):
    """No answer within `timeout` (transient). The Hub may still apply a timed-out commit; a re-push is a no-op."""
    transient = True


def is_transient_hub_error(exc: BaseException) -> bool:
    """True when retrying may fix `exc` (for a Prefect retry_condition_fn): HubPushError.transient, or for a raw
    huggingface_hub / httpx2 error: 5xx, 408, 412, 429, timeouts and connection errors."""
    if isinstance(exc, HubPushError):
        return exc.transient
    with contextlib.suppress(ImportError):
        return bool((classify(exc) or (False,))[0])
    return False


def classify(exc: BaseException) -> tuple[bool, int | None] | None:
    """(transient, HTTP status) of an error raised by the Hub client; None for errors that are not about the Hub."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, OfflineModeIsEnabled):
        return False, None
    if isinstance(status, int):
        return status in TRANSIENT_STATUSES or status >= 500, status
    if isinstance(exc, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError,
                        ConnectionError, TimeoutError)):  # builtins.ConnectionError: raised by hf_xet
        return True, None
    if isinstance(exc, (httpx2.HTTPError, OSError, ValueError)):  # ValueError: e.g. invalid card metadata
        return False, None
    return None


def retry_after_seconds(exc: BaseException) -> float | None:
    value = (getattr(getattr(exc, "response", None), "headers", None) or {}).get("Retry-After")
    return float(value) if value and value.strip().isdigit() else None


def hub_error(exc: BaseException, step: str, transient: bool, status: int | None, *, repo_id: str,
              revision: str | None, endpoint: str, scrub: Callable[[str], str]) -> HubPushError:
    """The HubPushError for a client error `exc` that `classify` judged (transient, status): its message names
    the step, the repo, the endpoint and what to fix, and quotes the Hub's answer scrubbed of secrets."""
    import httpx2

    detail = " ".join(scrub(getattr(exc, "server_message", None) or str(exc) or repr(exc)).split())[:500]
    at_revision = f" and revision {revision!r}" if revision else ""
    hints = {401: "the token is invalid or missing. Set HF_TOKEN (or pass token=) to a token with write scope.",
             403: f"the token lacks write access to {repo_id} (namespace {repo_id.split('/')[0]!r}). "
                  f"Use a token with write scope for that namespace, or push to a namespace you own.",
             404: f"repository or revision not found: check repo_id {repo_id!r}{at_revision}."}
    timed_out = isinstance(exc, (httpx2.TimeoutException, TimeoutError))
    reason = f"HTTP {status}" if status else ("timed out" if timed_out else type(exc).__name__)
    hint = hints.get(status, "retrying later may work." if transient else "retrying will not help.")
    cls = HubPushTimeout if timed_out else HubPushTransientError if transient else HubPushPermanentError
    return cls(f"Hub push failed ({reason}) during {step} of {repo_id} at {endpoint}: {hint} "
               f"({'Hub said' if status else 'error'}: {detail})", status=status, repo_id=repo_id, step=step)
