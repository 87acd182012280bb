"""The MLflow client boundary: which store, the HTTP settings, and MLflow's errors as ours (with `transient`).

Every call goes through `MlflowClient(tracking_uri, registry_uri)`: no global tracking or registry URI is set,
so two threads logging to two stores never cross. One thing stays process-wide: MLflow 3.x reads its HTTP retry
and timeout settings only from `MLFLOW_HTTP_REQUEST_*` environment variables, at request time
(mlflow/utils/rest_utils.py `http_request`; `MlflowClient` and `RestStore` take no such argument).
`tracking_client` sets them for its duration under one process-wide lock and restores them after, so calls of
this module with different settings never see each other's values (they run one at a time); MLflow calls made
elsewhere in the process meanwhile do see them. The same lock guards the one place MLflow itself needs the
global tracking URI (`registry_store_tracking_uri`).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Iterator

from adapterflow.redaction import redact_exception, redact_text

TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
_ENV_LOCK = threading.RLock()  # re-entrant: set_hub_commit_tag may run inside a logging call's thread


class MlflowTrackingError(RuntimeError):
    """MLflow failed. `transient`: whether a retry may succeed (adapterflow.tasks.retries.is_transient reads it).
    The message names the tracking URI (redacted) and what to do; `__cause__` is MLflow's error (redacted)."""

    transient = False


class MlflowUnavailableError(MlflowTrackingError, ConnectionError):
    """The tracking server could not be reached, or kept failing (5xx, 429, timeouts): transient."""

    transient = True


class MlflowRefusedError(MlflowTrackingError):
    """MLflow refused a request (4xx, e.g. a param that changed its value) or failed on the client side: a retry
    makes the same request and gets the same answer."""


def resolve_tracking_uri(settings, runs_root: str | os.PathLike) -> str:
    """settings.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite store `<runs_root>/mlflow.db`."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(runs_root).absolute() / 'mlflow.db'}"


def is_transient_mlflow_error(exc: BaseException) -> bool:
    """True when retrying may succeed: our errors' `transient`; connection refused or reset, timeouts, 5xx / 429
    answers (after MLflow's own retries). False for 4xx answers (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
    ...) and for errors raised on the client side (a plain MlflowException defaults to INTERNAL_ERROR, which is no
    server fault)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, MlflowTrackingError):
        return exc.transient
    seen, error = set(), exc
    while error is not None and id(error) not in seen:  # the cause chain
        if isinstance(error, (ConnectionError, TimeoutError)) or (
                type(error).__module__.startswith(("requests", "urllib3"))
                and any(word in type(error).__name__ for word in ("Connection", "Timeout", "Retry", "Protocol"))):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    if isinstance(exc, MlflowException):
        if exc.error_code in TRANSIENT_CODES:
            return True
        if not (isinstance(exc, RestException) or str(exc.message).startswith("API request to")):
            return False
        status = exc.get_http_status_code()
    else:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 429))


@contextlib.contextmanager
def tracking_client(settings, uri: str) -> Iterator:
    """An MlflowClient for `uri` (tracking and registry), with MLflow's HTTP retries and timeout from `settings`
    (max_retries, request_timeout_seconds), no progress bars and no "View run <URL>" lines, for the duration of
    the block.

    Raises (from the block):
        MlflowUnavailableError: a transient failure (see is_transient_mlflow_error), naming the URI and the fixes.
        MlflowRefusedError: any other MlflowException.
        Other exceptions pass unchanged. Messages are redacted (MLflow's quote the request URL, password included).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    updates = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.max_retries),
               "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(settings.request_timeout_seconds))),  # an int
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # set_terminated prints the URL, password and all
    with _ENV_LOCK, _environment(updates):
        try:
            yield MlflowClient(uri, uri)
        except Exception as exc:
            redact_exception(exc)
            if is_transient_mlflow_error(exc) and not isinstance(exc, MlflowTrackingError):
                cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise MlflowUnavailableError(
                    f"MLflow tracking server {redact_text(uri)} is unreachable or failing ({cause}). Start the server "
                    f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to log to the "
                    f"local sqlite store, or set mlflow.enabled=false to skip MLflow logging.") from exc
            if isinstance(exc, MlflowException):
                raise MlflowRefusedError(f"MLflow at {redact_text(uri)} refused the request: "
                                         f"{str(exc.message)[:500]}") from exc
            raise


@contextlib.contextmanager
def registry_store_tracking_uri(uri: str) -> Iterator[None]:
    """`uri` as MLflow's global tracking URI for the block (restored after), under the lock.

    Why: a local (sqlite / file) registry store resolves a `models:/<model_id>` version source with a bare
    `MlflowClient()`, i.e. the global tracking URI (mlflow/store/model_registry/sqlalchemy_store.py
    `create_model_version`, its TODO says so), so without this a version created through
    `MlflowClient(uri, uri)` looks the LoggedModel up in another store. A tracking server does that lookup
    itself; the scope is harmless there. Wrap only `create_model_version` in it.
    """
    from mlflow.tracking._tracking_service import utils  # holds the global; set_tracking_uri() would also
    # rewrite (and on restoring None, delete) $MLFLOW_TRACKING_URI, so the attribute is set and restored as it is

    with _ENV_LOCK:
        saved, utils._tracking_uri = utils._tracking_uri, uri
        try:
            yield
        finally:
            utils._tracking_uri = saved


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """Inside tracking_client: no HTTP retries and a 2 s timeout, for best-effort calls after a failure."""
    with _ENV_LOCK, _environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}):
        yield


@contextlib.contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
