"""Retries: which failures are worth a retry, and the task options that follow from it, shared by every task.

Transient failures (I/O hiccups, timeouts, dropped connections, 5xx answers) are retried with exponential
backoff; everything else fails at once, so the cause is the first thing visible in Prefect: user errors (bad
parameters, datasets, models, names, missing or unwritable files), a failed verification, and errors of unknown
kind (a bug is not fixed by running it again). An error that knows says so with a `transient` attribute: the
Hub push (adapterflow.integrations.hub.HubPushError), MLflow (adapterflow.integrations.mlflow_client.MlflowTrackingError) and
parameter errors do, so `is_transient` is the one retry condition and no task carries its own.
"""

from __future__ import annotations

import errno
import os

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

# OSError numbers that a retry cannot fix.
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EISDIR,
                     errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call may succeed: the error's own `transient` flag when it has one, else
    connection errors, timeouts, I/O errors other than the permanent errnos above, and HTTP 5xx / 408 / 429."""
    declared = getattr(exc, "transient", None)  # errors that know (e.g. adapterflow.integrations.hub.HubPushError) say so
    if isinstance(declared, bool):
        return declared
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno not in _PERMANENT_ERRNOS
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return False


def is_user_error(exc: BaseException) -> bool:
    """A permanent error in what the user gave or where it points (parameters, config file, dataset, base model,
    names, folders, tokens), or a failed verification: its message is meant for the user as it is."""
    return not is_transient(exc) and isinstance(exc, (ValueError, OSError))


def retry_condition(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn for every task: retry when the failure `is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classify whatever the task raised
        return is_transient(exc)
    return False


def retry_options() -> dict:
    """Task options: 2 retries with exponential backoff (2 s, 4 s; tests shrink it with ADAPTERFLOW_RETRY_BACKOFF),
    only for failures `retry_condition` calls transient."""
    return dict(
        retries=2,
        retry_delay_seconds=exponential_backoff(backoff_factor=float(os.environ.get("ADAPTERFLOW_RETRY_BACKOFF", "2"))),
        retry_jitter_factor=0.2,
        retry_condition_fn=retry_condition,
    )


RETRY_OPTIONS = retry_options()
# Results are small and rebuilt from the run directory; Prefect need not hash inputs or persist outputs.
RESULT_OPTIONS = dict(cache_policy=NO_CACHE, persist_result=False)
