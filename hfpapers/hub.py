"""Publish a saved model folder to a Hugging Face Hub (the real one or a `LocalHub`) and fetch it back.

The Hub is `HF_ENDPOINT` (huggingface_hub reads it when first imported) unless `endpoint=` is given. Every failure
to reach or use the Hub becomes one `HubError` that names the endpoint and the repo and says what happened to the
local files. huggingface_hub is imported inside the functions so that `import hfpapers` stays fast.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CONFIG_FILES", "HubError", "pull", "push"]

# A folder is publishable if it holds one of these: transformers, diffusers pipeline, peft adapter.
CONFIG_FILES = ("config.json", "model_index.json", "adapter_config.json")
# Training state (optimizer, RNG) stays local: a published repo holds the model, its code and its card.
NOT_PUBLISHED = ("checkpoints",)


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
) -> str:
    """Create `repo_id` if needed, upload `folder` to it in one commit and return the commit URL.

    `card`, when given, is uploaded as the repo's README.md instead of the folder's (a card that names the
    repo it lives in). Training checkpoints are not uploaded. The local folder is only read, never modified.
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

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    what = f"cannot push {folder} to {repo_id}"
    unchanged = f"the local folder {folder} is unchanged"
    with _reporting(api.endpoint, what, f"nothing was uploaded, {unchanged}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
    with _reporting(api.endpoint, what, f"the upload did not complete, {unchanged}"):
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.relative_to(folder).parts[0] not in NOT_PUBLISHED)
        operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files
                      if not (card is not None and p.relative_to(folder).as_posix() == "README.md")]
        if card is not None:
            operations.append(CommitOperationAdd("README.md", card.encode()))
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or f"Upload {folder.name} with hfpapers"
        )
    return commit.commit_url


def pull(
    repo_id: str,
    *,
    local_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download every file of `repo_id` (into the HF cache, or into `local_dir`) and return the folder."""
    from huggingface_hub import constants, snapshot_download

    with _reporting(endpoint or constants.ENDPOINT, f"cannot download {repo_id}", "the download did not complete"):
        path = snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token, endpoint=endpoint)
    return Path(path)


@contextmanager
def _reporting(endpoint: str, what: str, outcome: str):
    """Turn the ways a Hub call fails into one `HubError`; anything else (a bug) propagates unchanged."""
    try:
        yield
    except Exception as error:
        message = _describe(error, endpoint.rstrip("/") + "/", what, outcome)
        if message is None:
            raise
        raise HubError(message) from error


def _describe(error: Exception, endpoint: str, what: str, outcome: str) -> str | None:
    import httpx2
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    # snapshot_download wraps connection failures in LocalEntryNotFoundError; report the underlying cause.
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
    if isinstance(cause, httpx2.ConnectError):
        reason = "connection refused" if "refused" in str(cause).lower() else str(cause)
        return f"{what}: cannot reach the Hub at {endpoint}: {reason}; {outcome}"
    if isinstance(cause, httpx2.TimeoutException):
        return f"{what}: the Hub at {endpoint} did not answer in time; {outcome}"
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
