"""Publish a saved adapter folder to the Hugging Face Hub as it is: one commit, retries, a timeout.

huggingface_hub is imported inside the functions only, so `import adapterflow` stays torch + safetensors. The
folder's README.md is the card adapterflow.model_card rendered when the adapter was saved; the push adds nothing,
and refuses a folder whose files no longer match their manifest (adapterflow.json, adapterflow.manifest).
Design (huggingface_hub 2.4): uploads take the classic LFS path: one commit per push, never retried blindly (the
Xet pipeline retries the commit POST and can duplicate it). Each upload names the head it started from
(parent_commit), so a retry after a lost commit response finds the files there or gets 412 and retries on the new
head. Two settings of huggingface_hub are process-wide with no per-client alternative (HfApi has no client or
timeout argument; every call goes through the one shared `get_session()` client): `_configure_hub_client` sets
them once per process, under a lock, and says why.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from adapterflow import formats
from adapterflow.integrations.hub_errors import (HubPushError, HubPushPermanentError, HubPushTimeout, HubPushTransientError,
                                    classify, hub_error, is_transient_hub_error, retry_after_seconds)
from adapterflow.manifest import ManifestError, rewrite_file, verify_manifest
from adapterflow.model_card import build_model_card, read_configs
from adapterflow.redaction import redact_text, secret_values

__all__ = ["HubPushError", "HubPushPermanentError", "HubPushTransientError", "HubPushTimeout", "PushResult",
           "build_model_card", "is_transient_hub_error", "push_adapter_folder", "push_adapter_model"]

logger = logging.getLogger(__name__)

_PUSH_LOCK = threading.Lock()  # one push at a time per process: a new timeout replaces the shared client
_client_timeout: list = []  # the timeout of the client factory _configure_hub_client installed, if any
_CARD_OPTIONS = ("license", "datasets", "training")
_PUSH_OPTIONS = ("endpoint", "tag", "commit_description", "timeout", "max_attempts", "retry_delay")
# A merged model's weights in the repo: replaced as a whole (upload_folder keeps the paths it uploads).
_MODEL_WEIGHTS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]


@dataclass(frozen=True)
class PushResult:
    """What a push did. `commit_oid` is the branch head holding the files (the existing head when nothing changed,
    `created_commit` False); `revision` is the branch, or the PR ref (refs/pr/N) with create_pr."""

    repo_id: str
    commit_url: str
    commit_oid: str
    revision: str
    tag: str | None
    created_commit: bool


def push_adapter_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None,
                        endpoint: str | None = None, private: bool | None = None, revision: str | None = None,
                        tag: str | None = None, commit_message: str | None = None,
                        commit_description: str | None = None, create_pr: bool = False,
                        timeout: float | None = 60.0, max_attempts: int = 3, retry_delay: float = 1.0,
                        merged_model: bool = False) -> PushResult:
    """Upload an adapter folder to a Hub model repo as one commit; a no-op when the files are already there.

    Steps: create_repo(exist_ok) -> create_branch(revision) -> upload_folder (one commit with parent_commit = the
    head it started from; a weights file of the other format left in the repo is deleted, as a local re-save
    does) -> create_tag (fine when the tag already points at that commit; an existing tag is never moved).

    Args:
        folder: a saved adapter folder (adapter_config.json at the root or in adapter subfolders), uploaded as it
            is, hidden files (names starting with ".") left out; its files must match their adapterflow.json
            (adapterflow.manifest.verify_manifest) when it has one. repo_id: "namespace/name", or "name" for the token owner's namespace.
        token: a write token (default: HF_TOKEN or the stored login). endpoint: default HF_ENDPOINT or the Hub.
        private: visibility of a repo this call creates. revision: a branch, created from main when missing.
        tag: tag the pushed commit. create_pr: open a pull request against main instead (not with revision).
        timeout: seconds per HTTP request (connect/read/write), None for none. Requests that huggingface_hub
            retries itself (preupload, LFS) can take 6 timeouts plus its ~23 s backoff before failing.
        max_attempts: tries per step for 5xx, 408, 412, 429, timeouts and connection errors, with exponential
            backoff from retry_delay seconds (at most 30 s; a Retry-After header is honoured up to 60 s).
        merged_model: the folder is a merged model (config.json, safetensors shards, tokenizer files, README.md)
            instead of an adapter; weights files and shard indexes in the repo that the folder lacks (another
            shard count) are deleted in the same commit.

    Returns:
        PushResult; created_commit is False when the branch head already held these files.

    Raises:
        HubPushPermanentError: at once for 401 (invalid/missing token), 403 (no write access), 404 (repo or
            revision not found), other 4xx, an invalid card, a tag at another commit, a folder holding the token,
            a folder whose files differ from its manifest (the message names each file).
        HubPushTransientError, HubPushTimeout: the last transient error, after max_attempts. All are
            HubPushError (.transient, .status); neither their message nor their chain holds the token.
        FileNotFoundError: the folder is missing or no saved adapter. ValueError: invalid arguments.
    """
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No {'merged model' if merged_model else 'adapter'} folder at {folder}.")
    if merged_model and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {folder}: not a merged model folder.")
    if not merged_model:
        read_configs(folder)  # FileNotFoundError: not a saved adapter
    stale = _MODEL_WEIGHTS if merged_model else _stale_weights(folder)
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}.")
    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr opens a pull request against main; do not pass a revision with it.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    secrets = [s for s in (token, get_token()) if isinstance(s, str) and s]
    branch = revision or "main"
    ctx = _Context(repo_id, branch if revision else None, redact_text(api.endpoint), secrets, max_attempts, retry_delay)
    _refuse_folder_with_secret(folder, ctx)
    _refuse_folder_not_matching_its_manifest(folder, ctx)
    with _PUSH_LOCK:
        _configure_hub_client(timeout)
        ctx.repo_id = ctx.run("create repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True)).repo_id
        if branch != "main":  # create_pr: branch is "main"
            ctx.run("create branch", lambda: api.create_branch(ctx.repo_id, branch=branch, exist_ok=True))
        heads: list[str] = []

        def upload():
            parent = None
            if not create_pr:
                parent = api.repo_info(ctx.repo_id, revision=branch).sha
                heads.append(parent)
            return api.upload_folder(
                repo_id=ctx.repo_id, folder_path=folder, revision=None if create_pr else branch,
                commit_message=commit_message or "Upload adapter with adapterflow",
                commit_description=commit_description, create_pr=create_pr, parent_commit=parent,
                delete_patterns=stale, ignore_patterns=[".*", "*/.*"])

        info = ctx.run("upload", upload)
        if tag:
            ctx.run("tag", lambda: _tag(api, ctx, tag, info.oid))
    result = PushResult(repo_id=ctx.repo_id, commit_url=str(info.commit_url), commit_oid=info.oid,
                        revision=(info.pr_revision or branch) if create_pr else branch, tag=tag,
                        created_commit=bool(info.pr_url) if create_pr else info.oid != heads[0])
    logger.info("Pushed %s to %s@%s: %s commit %s", folder, result.repo_id, result.revision,
                "new" if result.created_commit else "unchanged, head", result.commit_oid)
    return result


def push_adapter_model(model, repo_id: str, private: bool | None = None, revision: str | None = None,
                       commit_message: str | None = None, token: str | None = None, safe_serialization: bool = True,
                       selected_adapters: Sequence[str] | None = None, create_pr: bool = False,
                       tags: Sequence[str] | None = None, **kwargs: Any) -> PushResult:
    """AdapterModel.push_to_hub: save_pretrained into a temporary folder, replace its README.md with
    build_model_card (and its digest in the folder's manifest), then push_adapter_folder.

    Args:
        repo_id, private, revision, commit_message, token, create_pr: see push_adapter_folder.
        safe_serialization, selected_adapters: see save_pretrained. tags: see build_model_card.
        **kwargs: license, datasets, training (build_model_card); endpoint, tag, commit_description, timeout,
            max_attempts, retry_delay (push_adapter_folder).

    Returns:
        PushResult (PEFT returns a CommitInfo). Raises: TypeError for unknown kwargs; HubPushError.
    """
    if unknown := sorted(set(kwargs) - set(_CARD_OPTIONS) - set(_PUSH_OPTIONS)):
        raise TypeError(f"push_to_hub() got unexpected keyword arguments {unknown}.")
    card = {key: kwargs.pop(key) for key in _CARD_OPTIONS if key in kwargs}
    with tempfile.TemporaryDirectory(prefix="adapterflow-push-") as tmp:
        model.save_pretrained(tmp, safe_serialization=safe_serialization, selected_adapters=selected_adapters)
        card_text = build_model_card(tmp, tags=tags, repo_id=repo_id, **card)
        rewrite_file(tmp, formats.MODEL_CARD_NAME, card_text.encode())  # the manifest then describes this card
        return push_adapter_folder(tmp, repo_id, private=private, revision=revision, commit_message=commit_message,
                                   token=token, create_pr=create_pr, **kwargs)


@dataclass
class _Context:
    repo_id: str
    revision: str | None
    endpoint: str
    secrets: list[str]
    max_attempts: int
    retry_delay: float

    def scrub(self, text: str) -> str:
        return redact_text(text, secret_values(self.secrets))  # tokens, URL passwords, Bearer headers

    def run(self, step: str, fn: Callable[[], Any]) -> Any:
        """fn(), retried on transient errors; errors leave as HubPushError without the original in the chain
        (the client's exceptions keep the request, whose headers hold the token)."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except HubPushError as exc:
                error, retry_after = exc, None
            except Exception as exc:
                if (kind := classify(exc)) is None:
                    raise
                error = hub_error(exc, step, *kind, repo_id=self.repo_id, revision=self.revision,
                                  endpoint=self.endpoint, scrub=self.scrub)
                retry_after = retry_after_seconds(exc)
            if not error.transient or attempt == self.max_attempts:
                raise error  # outside the except block: no __context__ pointing at the client's exception
            delay = max(min(self.retry_delay * 2 ** (attempt - 1), 30.0), min(retry_after or 0.0, 60.0))
            logger.warning("%s (attempt %d/%d); retrying in %.2f s.", error, attempt, self.max_attempts, delay)
            time.sleep(delay)


def _configure_hub_client(timeout: float | None) -> None:
    """The process-wide huggingface_hub settings a push needs, set once per process (call under _PUSH_LOCK).

    Why global: in huggingface_hub 2.4 every HfApi call uses the one shared client from `get_session()`, made
    by the factory given to the public `set_client_factory`; there is no per-HfApi client or upload timeout.
    And Xet is chosen by `constants.HF_HUB_DISABLE_XET` alone (no per-call switch).
    1. Xet off for the process: its pipelined upload retries the commit POST and can duplicate a commit; the
       classic LFS path makes exactly one. Downloads then use plain HTTP, which every Hub serves.
    2. A client with `timeout` (default factory: no timeout at all, so a stalled upload hangs forever). It is
       installed again only when the timeout changes (that closes the shared client, hence the lock), and
       replaces a factory someone else installed; timeout=None leaves the client alone.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http, set_client_factory

    constants.HF_HUB_DISABLE_XET = True
    if timeout is None or _client_timeout == [timeout]:
        return

    def factory() -> httpx2.Client:
        client = _http.default_client_factory()  # huggingface_hub's own event hooks and redirects
        client.timeout = httpx2.Timeout(timeout)
        return client

    set_client_factory(factory)
    _client_timeout[:] = [timeout]


def _tag(api, ctx: _Context, tag: str, oid: str) -> Any:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.create_tag(ctx.repo_id, tag=tag, revision=oid)
    except HfHubHTTPError as exc:
        if exc.response.status_code != 409:
            raise
    existing = {t.name: t.target_commit for t in api.list_repo_refs(ctx.repo_id).tags}.get(tag)
    if existing != oid:
        raise HubPushPermanentError(f"Tag {tag!r} of {ctx.repo_id} already points at commit {existing}, not at the "
                                    f"pushed commit {oid}; tags are never moved. Use another tag or delete the old "
                                    f"one.", status=409, repo_id=ctx.repo_id, step="tag")


def _stale_weights(folder: Path) -> list[str] | None:
    """Repo paths of weights files in the other format next to the ones uploaded (a loader would prefer them)."""
    names = formats.WEIGHTS_NAMES
    return sorted((p.parent / other).relative_to(folder).as_posix() for name, other in zip(names, names[::-1])
                  for p in folder.rglob(name) if not (p.parent / other).exists()) or None


def _refuse_folder_not_matching_its_manifest(folder: Path, ctx: _Context) -> None:
    """What is pushed must be what was saved (and verified): every file its adapterflow.json lists, unchanged."""
    try:
        problems = verify_manifest(folder)
    except ManifestError as exc:
        problems = [str(exc)]
    if problems:
        raise HubPushPermanentError(
            "Not pushing: the folder's files no longer match its manifest (adapterflow.json), so it is not the "
            "adapter that was saved:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\nSave the adapter again (or restore the files), then push.", repo_id=ctx.repo_id, step="check folder")


def _refuse_folder_with_secret(folder: Path, ctx: _Context) -> None:
    needles = [s.encode() for s in ctx.secrets if len(s) >= 8]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size and ".git" not in p.parts):
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if any(data.find(needle) != -1 for needle in needles):
                raise HubPushPermanentError(f"{path.relative_to(folder)} contains the Hub token; not uploading it.",
                                            repo_id=ctx.repo_id, step="check folder")
