"""Publish a saved model folder to a Hugging Face Hub (the real one or a `LocalHub`) and fetch it back.

The Hub is `HF_ENDPOINT` (huggingface_hub reads it when first imported) unless `endpoint=` is given. Every failure
to reach or use the Hub becomes one `HubError` that names the endpoint and the repo and says what happened to the
local files. huggingface_hub is imported inside the functions so that `import hfpapers` stays fast.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CONFIG_FILES", "DEFAULT_TIMEOUT", "HubError", "NOT_PUBLISHED", "pull", "push"]

# A folder is publishable if it holds one of these: transformers, diffusers pipeline, peft adapter.
CONFIG_FILES = ("config.json", "model_index.json", "adapter_config.json")
# Training state (optimizer, RNG, pickled scheduler state) stays local: a published repo holds the model, its code
# and its card. Patterns as in `upload_folder(ignore_patterns=...)` (fnmatch on the path; "*" crosses folders).
NOT_PUBLISHED = ("checkpoints/*", "*/checkpoints/*", "*.pkl")
# Seconds a Hub may stay silent (connect, send, each read) before a push or pull gives up; HF_HUB_DOWNLOAD_TIMEOUT,
# huggingface_hub's own knob, overrides it.
DEFAULT_TIMEOUT = 60.0


class HubError(RuntimeError):
    """A push or pull that failed; the message names the endpoint, the repo and the state of local files."""


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    card: str | None = None,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep: list[str] | None = None,
    timeout: float | None = None,
) -> str:
    """Make `repo_id` (at branch `revision`, default main) hold exactly `folder`, in one commit; return its URL.

    Files of the repo that are not in the folder are deleted in the same commit, except those matching `keep`
    (patterns, e.g. ["*.md", "logs/*"]), so a re-saved (e.g. re-sharded) model never leaves stale weights behind.
    `include` / `exclude` select the folder's files (`hf upload`'s --include / --exclude); training state
    (`NOT_PUBLISHED`) is never uploaded. `card`, when given, is uploaded as the repo's README.md instead of the
    folder's (a card that names the repo it lives in). The repo and the branch are created if needed. Every network
    operation is bounded by `timeout` seconds (default: HF_HUB_DOWNLOAD_TIMEOUT if set, else DEFAULT_TIMEOUT). The
    local folder is only read, never modified.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"cannot push {folder}: no such folder")
    # a diffusers model made of components (e.g. a TransparentVAE) keeps one config per subfolder
    if not any((folder / name).is_file() for name in CONFIG_FILES) and not any(folder.glob("*/config.json")):
        raise HubError(
            f"cannot push {folder}: it holds none of {', '.join(CONFIG_FILES)} (nor component folders with a "
            "config.json); save the model with save_pretrained() first"
        )

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    ignore = [*NOT_PUBLISHED, *DEFAULT_IGNORE_PATTERNS, *(exclude or [])]
    uploaded = [path for path in filter_repo_objects(local, allow_patterns=include, ignore_patterns=ignore)
                if not (card is not None and path == "README.md")]
    if not uploaded and card is None:
        raise HubError(f"cannot push {folder}: no file is left to upload after --include/--exclude")
    operations = [CommitOperationAdd(path, str(folder / path)) for path in uploaded]
    if card is not None:
        operations.append(CommitOperationAdd("README.md", card.encode()))

    api = HfApi(endpoint=endpoint, token=token)
    seconds = _timeout(timeout)
    what = f"cannot push {folder} to {repo_id}" + (f" (branch {revision})" if revision else "")
    unchanged = f"the local folder {folder} is unchanged"
    with _bounded(seconds):
        with _reporting(api.endpoint, what, f"nothing was uploaded, {unchanged}", seconds):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # The deletions are computed against this exact commit, and the commit names it as its parent, so a
            # concurrent push makes this one fail instead of deleting files this push never saw.
            parent = api.repo_info(repo_id, revision=revision).sha
            remote = api.list_repo_files(repo_id, revision=parent)
        added = {op.path_in_repo for op in operations}
        kept = set(filter_repo_objects(remote, allow_patterns=list(keep))) if keep else set()
        operations += [CommitOperationDelete(path) for path in remote
                       if path not in added and path not in kept and path != ".gitattributes"]
        with _reporting(api.endpoint, what, f"the upload did not complete, {unchanged}", seconds):
            commit = api.create_commit(
                repo_id, operations, commit_message=commit_message or f"Upload {folder.name} with hfpapers",
                revision=revision, parent_commit=parent,
            )
    return commit.commit_url


def pull(
    repo_id: str,
    *,
    local_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Download every file of `repo_id` (into the HF cache, or into `local_dir`) and return the folder.

    Every network operation is bounded by `timeout` seconds, as in `push`."""
    from huggingface_hub import constants, snapshot_download

    seconds = _timeout(timeout)
    what = f"cannot download {repo_id}"
    with _bounded(seconds), _reporting(endpoint or constants.ENDPOINT, what, "the download did not complete", seconds):
        path = snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token, endpoint=endpoint,
                                 etag_timeout=seconds)
    return Path(path)


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        timeout = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or DEFAULT_TIMEOUT)
    if not timeout > 0:
        raise HubError(f"timeout must be a positive number of seconds, got {timeout}")
    return timeout


@contextmanager
def _bounded(seconds: float):
    """Bound every request of huggingface_hub's shared client by `seconds`.

    huggingface_hub's default client has no timeout and passes none for create_repo, preupload or commit, so a Hub
    that accepts the connection and never answers would hang forever. A client the user configured with its own
    timeouts (`set_client_factory`) is left alone."""
    from huggingface_hub.utils import get_session

    session = get_session()
    previous = session.timeout
    unbounded = all(value is None for value in (previous.connect, previous.read, previous.write, previous.pool))
    if unbounded:
        session.timeout = seconds
    try:
        yield
    finally:
        if unbounded:
            session.timeout = previous


@contextmanager
def _reporting(endpoint: str, what: str, outcome: str, seconds: float):
    """Turn the ways a Hub call fails into one `HubError`; anything else (a bug) propagates unchanged."""
    try:
        yield
    except Exception as error:
        message = _describe(error, endpoint.rstrip("/") + "/", what, outcome, seconds)
        if message is None:
            raise
        raise HubError(message) from error


def _describe(error: Exception, endpoint: str, what: str, outcome: str, seconds: float) -> str | None:
    import httpx2
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    # snapshot_download wraps connection failures in LocalEntryNotFoundError; report the underlying cause.
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
    if isinstance(cause, httpx2.ConnectError):
        reason = "connection refused" if "refused" in str(cause).lower() else str(cause)
        return f"{what}: cannot reach the Hub at {endpoint}: {reason}; {outcome}"
    if isinstance(cause, httpx2.TimeoutException):
        return (f"{what}: the Hub at {endpoint} did not answer within {seconds:g} s (set HF_HUB_DOWNLOAD_TIMEOUT or "
                f"timeout= to wait longer); {outcome}")
    if isinstance(cause, OfflineModeIsEnabled):
        return f"{what}: HF_HUB_OFFLINE is set, so the Hub at {endpoint} was not contacted; {outcome}"
    if isinstance(cause, HfHubHTTPError):
        status = cause.response.status_code
        detail = cause.server_message or str(cause).strip().splitlines()[0]
        hint = " (check the token: HF_TOKEN or token=)" if status in (401, 403) else ""
        return f"{what}: the Hub at {endpoint} answered HTTP {status}: {detail}{hint}; {outcome}"
    if isinstance(cause, (httpx2.HTTPError, HFValidationError, LocalEntryNotFoundError)):
        return f"{what} (Hub at {endpoint}): {cause}; {outcome}"
    return None
