"""`LocalHub`: a Hugging Face Hub HTTP server for tests and offline work (standard library only).

It speaks the part of the Hub protocol that huggingface_hub and transformers use to create repos and branches,
upload folders (preupload + NDJSON commit, deletions included), list repos, refs and commits, and download files
(revision info, tree listing, resolve), for model and dataset repos. Point a client at it with
`HF_ENDPOINT=<hub.url>` (read when huggingface_hub is imported) and `HF_TOKEN=<hub.token>`.

Repos live on disk under `data_dir`, so they survive restarts:

    blobs/<oid[:2]>/<oid>                         file contents, named by their git blob sha1 (shared by all repos)
    repos/<type>/<namespace>--<name>/repo.json    {"id", "type", "private", "createdAt"}
    repos/<type>/<namespace>--<name>/commits/<sha>.json   {"parent", "files": {path: oid}, "message", ...}
    repos/<type>/<namespace>--<name>/refs.json    {"main": <sha>, <other branch>: <sha>, ...}
    repos/<type>/.<namespace>--<name>.lock        taken (flock) by every change to the repo, across processes
    tmp/<server id>/  tmp/<server id>.lock        one server's temp files; removed at start once their owner is gone

Commits are immutable snapshots; a branch names one; any commit sha is also a revision. Preupload always answers
uploadMode "regular", so file contents travel base64 inside the commit and neither LFS nor xet is ever used.

Safety: reads are open; every other request needs `Authorization: Bearer <token>` (the hub's `token`, which
`hfpapers hub serve` prints) and the content type huggingface_hub sends (JSON, NDJSON for commits), and a request
whose `Origin` is not the hub itself is refused, so a web page cannot write to it. Request bodies are streamed to
disk (never held in memory), with a per-request size limit, a bound on the bytes of all requests in flight and
a bound on handler threads. `private` is only recorded.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "LocalHub", "serve"]

DEFAULT_MAX_REQUEST_BYTES = 512 * 1024 * 1024
# Bodies of all requests being received or processed at once; a request that would pass it waits (then 503).
DEFAULT_MAX_INFLIGHT_BYTES = 1024 * 1024 * 1024
INFLIGHT_WAIT_SECONDS = 60
# Handler threads at once; more connections wait in the listen backlog, then get a 503.
MAX_THREADS = 32
# JSON bodies (create, preupload, branch, validate-yaml) are parsed in memory, so they get a small limit of their own.
MAX_JSON_BYTES = 16 * 1024 * 1024
# After refusing a body, read and drop at most this much of it (see `_Handler._discard_body`).
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1 << 20
# Commit lines longer than this are not parsed whole: the base64 content is decoded straight from disk.
SMALL_LINE_BYTES = 1 << 16
# A file name must fit a file system's name limit (255 bytes on ext4, APFS, NTFS) wherever the repo is downloaded.
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 1024
BRANCH = "main"
URL_REPO_TYPES = {"models": "model", "datasets": "dataset"}
# URL prefix of a repo page / resolve route per repo type (models have none).
URL_PREFIXES = {"model": "", "dataset": "datasets/"}
REPO_ACTIONS = {"revision", "preupload", "commit", "tree", "refs", "commits", "branch"}
# What huggingface_hub sends on each kind of write; a browser "simple" request cannot send either type.
JSON_TYPE, NDJSON_TYPE = "application/json", "application/x-ndjson"

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_BRANCH_NAME = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_CONTENT_KEY = re.compile(rb'[{,]\s*"content"\s*:\s*"')


class _HttpError(Exception):
    """An error answer: status, optional `X-Error-Code` (which huggingface_hub maps to its exceptions), message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed instead of `body` (GET of a blob)


def _json_response(payload, status: int = 200) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _valid_name(segment: str) -> bool:
    return len(segment) <= 96 and bool(_NAME.fullmatch(segment)) and "--" not in segment and ".." not in segment


def _check_repo_id(segments: list[str]) -> str:
    """Repo ids become directory names, so anything but `name` or `namespace/name` of safe characters is refused."""
    if not 1 <= len(segments) <= 2 or not all(_valid_name(s) for s in segments):
        raise _HttpError(
            400,
            f"invalid repo id {'/'.join(segments)!r}: expected 'name' or 'namespace/name' made of letters, digits, "
            "'-', '_' and '.' (no '--' or '..')",
        )
    return "/".join(segments)


def _check_path(path) -> str:
    """A file path inside a repo: relative, '/'-separated, no empty, '.' or '..' segment, no backslash or control
    character (a CR/LF would break the headers and file names of a download), and short enough to be a file name
    on the downloading machine."""
    if (
        not isinstance(path, str)
        or not path
        or "\\" in path
        or _CONTROL.search(path)
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        shown = path[:200] + "..." if isinstance(path, str) and len(path) > 200 else path
        raise _HttpError(
            400,
            f"invalid file path {shown!r}: expected a relative path like 'dir/file.json' without backslashes or "
            "control characters",
        )
    if len(path.encode()) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_SEGMENT_BYTES for part in path.split("/")):
        raise _HttpError(
            400,
            f"invalid file path {path[:200]!r}...: at most {MAX_PATH_BYTES} bytes in all and {MAX_SEGMENT_BYTES} "
            "bytes per file or folder name",
        )
    return path


def _check_branch(name) -> str:
    """A new branch name: Hub-like, and never mistakable for a commit sha or a path trick."""
    if (
        not isinstance(name, str)
        or len(name) > 200
        or not _BRANCH_NAME.fullmatch(name)
        or _COMMIT_SHA.fullmatch(name)
        or any(part in (".", "..") or part.endswith(".lock") for part in name.split("/"))
        or name.startswith("refs/")
    ):
        raise _HttpError(
            400,
            f"invalid branch name {name!r}: expected letters, digits, '.', '_', '-' and '/' separators, not a "
            "commit sha or 'refs/...'",
        )
    return name


def _all_parents(paths) -> set[str]:
    """Every folder that holds one of `paths` ('a/b/c' gives 'a' and 'a/b')."""
    parents = set()
    for path in paths:
        parts = path.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return parents


def _card_metadata(card: str):
    """The README's YAML front matter as parsed by PyYAML (None without front matter or without PyYAML).

    Raises `yaml.YAMLError` for invalid YAML."""
    match = re.match(r"\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", card)
    if match is None:
        return None
    try:
        import yaml  # a huggingface_hub dependency; optional so that the server itself stays stdlib-only
    except ImportError:
        return None
    return yaml.safe_load(match.group(1))


def _card_metadata_errors(card: str) -> list[str]:
    """Errors in a README's YAML front matter, checked the way the Hub's validate-yaml route does."""
    try:
        metadata = _card_metadata(card)
    except Exception as e:  # yaml.YAMLError, imported lazily
        return [f"invalid YAML in the README front matter: {e}"]
    if metadata is None:
        return []  # a card without metadata is valid
    if not isinstance(metadata, dict):
        return ["the README front matter must be a YAML mapping"]
    model_index = metadata.get("model-index")
    if model_index is not None and not (
        isinstance(model_index, list)
        and all(isinstance(e, dict) and "name" in e and isinstance(e.get("results"), list) for e in model_index)
    ):
        return ["'model-index' must be a list of entries with a 'name' and a list of 'results'"]
    return []


def _locked(path: Path, blocking: bool = True):
    """An open file holding an exclusive flock on `path` (created if needed), or None if another holds it."""
    f = open(path, "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f


class _Store:
    """Repos on disk. Every change to a repo happens under its file lock (shared by all servers on this folder) and
    ends with an atomic rename; temp files live in this server's own folder under tmp/."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for repo_type in URL_PREFIXES:
            (root / "repos" / repo_type).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        self._remove_stale_temp_files()
        server_id = uuid.uuid4().hex
        self._work_lock = _locked(root / "tmp" / f"{server_id}.lock")
        self.work = root / "tmp" / server_id
        self.work.mkdir()

    def _remove_stale_temp_files(self) -> None:
        """Temp folders of servers that are gone (their lock is free), and temp files that older versions wrote
        next to their targets, are leftovers of a kill mid-write: nothing refers to them."""
        for lock in sorted((self.root / "tmp").glob("*.lock")):
            held = _locked(lock, blocking=False)
            if held is None:
                continue  # a live server's
            try:
                shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                lock.unlink(missing_ok=True)
            finally:
                held.close()
        for pattern in ("blobs/*/.tmp-*", "repos/*/*/.tmp-*", "repos/*/*/commits/.tmp-*", "repos/*/.new-*"):
            for path in self.root.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._work_lock is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            (self.root / "tmp" / f"{self.work.name}.lock").unlink(missing_ok=True)
            self._work_lock.close()
            self._work_lock = None

    def temp_file(self, prefix: str):
        """(open binary file, path) of a new temp file in this server's folder."""
        fd, name = tempfile.mkstemp(dir=self.work, prefix=prefix)
        return os.fdopen(fd, "wb"), Path(name)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """Write a temp file, then rename: readers see the old file or the new one, never half of one."""
        f, tmp = self.temp_file("write-")
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def _lock(self, repo_type: str, repo_id: str):
        # A file lock, not a threading lock: two servers on one data folder must not interleave commits either.
        held = _locked(self.root / "repos" / repo_type / f".{repo_id.replace('/', '--')}.lock")
        try:
            yield
        finally:
            held.close()

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        # "--" is forbidden inside names, so "namespace--name" cannot collide with another repo's folder.
        return self.root / "repos" / repo_type / repo_id.replace("/", "--")

    def blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid

    def blob_size(self, oid: str) -> int:
        return self.blob_path(oid).stat().st_size

    def _write_commit(self, repo_dir: Path, commit: dict) -> str:
        raw = json.dumps(commit, sort_keys=True).encode()
        sha = hashlib.sha1(raw).hexdigest()
        self._atomic_write(repo_dir / "commits" / f"{sha}.json", raw)
        return sha

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo holding one empty commit on `main`; False if it already exists."""
        with self._lock(repo_type, repo_id):
            final = self._repo_dir(repo_type, repo_id)
            if final.exists():
                return False
            # Build the repo in a staging folder, then rename it into place: a half-created repo is never visible.
            staging = Path(tempfile.mkdtemp(dir=self.work, prefix="repo-"))
            try:
                (staging / "commits").mkdir()
                created = _now()
                repo = {"id": repo_id, "type": repo_type, "private": private, "createdAt": created}
                self._atomic_write(staging / "repo.json", json.dumps(repo).encode())
                initial = {"parent": None, "files": {}, "message": "initial commit", "description": "", "date": created}
                sha = self._write_commit(staging, initial)
                self._atomic_write(staging / "refs.json", json.dumps({BRANCH: sha}).encode())
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return True

    def repo(self, repo_type: str, repo_id: str) -> dict:
        try:
            return json.loads((self._repo_dir(repo_type, repo_id) / "repo.json").read_bytes())
        except FileNotFoundError:
            raise _HttpError(404, f"{repo_type} repo {repo_id!r} not found", "RepoNotFound") from None

    def repos(self, repo_type: str) -> list[dict]:
        folders = sorted(p for p in (self.root / "repos" / repo_type).iterdir() if not p.name.startswith("."))
        return [json.loads((p / "repo.json").read_bytes()) for p in folders if (p / "repo.json").is_file()]

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        self.repo(repo_type, repo_id)
        return json.loads((self._repo_dir(repo_type, repo_id) / "refs.json").read_bytes())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """The commit sha a revision names (a branch, `refs/heads/<branch>` or a commit sha of this repo)."""
        refs = self.refs(repo_type, repo_id)
        branch = revision.removeprefix("refs/heads/")
        if branch in refs:
            return refs[branch]
        commits = self._repo_dir(repo_type, repo_id) / "commits"
        if _COMMIT_SHA.fullmatch(revision) and (commits / f"{revision}.json").is_file():
            return revision
        message = f"revision {revision[:200]!r} not found in {repo_id!r} (branches: {', '.join(sorted(refs))})"
        raise _HttpError(404, message, "RevisionNotFound")

    def read_commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self._repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_bytes())

    def history(self, repo_type: str, repo_id: str, revision: str) -> list[tuple[str, dict]]:
        """(sha, commit) from `revision` back to the repo's first commit."""
        sha = self.resolve(repo_type, repo_id, revision)
        out = []
        while sha is not None:
            commit = self.read_commit(repo_type, repo_id, sha)
            out.append((sha, commit))
            sha = commit["parent"]
        return out

    def _write_refs(self, repo_type: str, repo_id: str, refs: dict[str, str]) -> None:
        self._atomic_write(self._repo_dir(repo_type, repo_id) / "refs.json", json.dumps(refs).encode())

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> str:
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if branch in refs:
                raise _HttpError(409, f"branch {branch!r} already exists in {repo_id!r}")
            refs[branch] = self.resolve(repo_type, repo_id, starting_point or BRANCH)
            self._write_refs(repo_type, repo_id, refs)
            return refs[branch]

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if branch == BRANCH:
                raise _HttpError(403, f"the default branch '{BRANCH}' cannot be deleted")
            if refs.pop(branch, None) is None:
                raise _HttpError(404, f"branch {branch!r} not found in {repo_id!r}", "RevisionNotFound")
            self._write_refs(repo_type, repo_id, refs)

    def commit(self, repo_type: str, repo_id: str, branch: str, header: dict, operations: list) -> str:
        """Apply a parsed commit to `branch` atomically and return its sha.

        All checks run before anything is written, under the repo lock; then blobs (renamed from their staged temp
        files), then the commit object, then the refs are replaced in one rename. A concurrent commit, from this
        server or another one on the same folder, is therefore either serialised after this one or, when it names a
        stale parentCommit, refused with 412.
        """
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                self.resolve(repo_type, repo_id, branch)  # 404 for an unknown revision
                raise _HttpError(400, f"commits go to a branch, not to a commit sha ({branch!r})")
            head = refs[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                message = f"parentCommit {parent} is not the head of {branch!r} ({head}): a commit happened since"
                raise _HttpError(412, message + "; refresh and try again")
            files = dict(self.read_commit(repo_type, repo_id, head)["files"])
            staged: dict[str, Path] = {}
            for kind, path, value in operations:
                if kind == "file":
                    oid, staged_path = value
                    staged[oid] = staged_path
                    files[path] = oid
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HttpError(404, f"cannot delete {path!r}: no such file", "EntryNotFound")
                else:  # deletedFolder
                    inside = [p for p in files if p.startswith(path + "/")]
                    if not inside:
                        raise _HttpError(404, f"cannot delete folder {path!r}: no such folder", "EntryNotFound")
                    for p in inside:
                        del files[p]
            clashes = sorted(_all_parents(files).intersection(files))
            if clashes:
                raise _HttpError(400, f"{clashes[0]!r} would be both a file and a folder")
            for oid in set(files.values()) & staged.keys():
                target = self.blob_path(oid)
                if not target.exists():
                    target.parent.mkdir(exist_ok=True)
                    os.replace(staged[oid], target)  # already fsynced; same content under the same name if racing
            commit = {
                "parent": head,
                "files": dict(sorted(files.items())),
                "message": header.get("summary", ""),
                "description": header.get("description", ""),
                "date": _now(),
            }
            sha = self._write_commit(repo_dir, commit)
            try:
                self._write_refs(repo_type, repo_id, {**refs, branch: sha})
            except BaseException:
                # Unreferenced blobs are invisible, but a commit object would be reachable by its sha.
                (repo_dir / "commits" / f"{sha}.json").unlink()
                raise
            return sha


def _tree_entries(files: dict[str, str], folder: str, recursive: bool, size_of) -> list[dict]:
    """The `/tree` listing of `folder` ('' is the root): its files and folders, or everything below it."""
    prefix = folder + "/" if folder else ""
    inside = {path[len(prefix):]: oid for path, oid in files.items() if path.startswith(prefix)}
    if folder and not inside:
        raise _HttpError(404, f"folder {folder!r} not found", "EntryNotFound")

    def listed(relative: str) -> bool:
        return recursive or "/" not in relative

    def folder_oid(relative: str) -> str:
        below = sorted((p, oid) for p, oid in inside.items() if p.startswith(relative + "/"))
        return hashlib.sha1("".join(f"{p} {oid}\n" for p, oid in below).encode()).hexdigest()

    folders = [
        {"type": "directory", "path": prefix + rel, "oid": folder_oid(rel)}
        for rel in sorted(_all_parents(inside))
        if listed(rel)
    ]
    return folders + [
        {"type": "file", "path": prefix + rel, "oid": oid, "size": size_of(oid)}
        for rel, oid in sorted(inside.items())
        if listed(rel)
    ]


class _Base64Blob:
    """Decodes base64 pieces straight into a temp file, so a file's content is never whole in memory."""

    def __init__(self, store: _Store, temp_paths: list[Path]):
        self.file, self.path = store.temp_file("blob-")
        temp_paths.append(self.path)
        self.rest = b""
        self.ended = False  # padding seen: the content must end here

    def write(self, piece: bytes) -> bool:
        """False if `piece` cannot continue a base64 string."""
        if not piece:
            return True
        if self.ended or not _BASE64.fullmatch(piece):
            return False
        self.ended = piece.endswith(b"=")
        data = self.rest + piece
        cut = len(data) - len(data) % 4
        self.file.write(base64.b64decode(data[:cut]))
        self.rest = data[cut:]
        return True

    def finish(self) -> tuple[str, Path] | None:
        """(git blob oid, path of the decoded file), or None if the base64 string was cut short."""
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.tell()
        self.file.close()
        if self.rest:
            return None
        digest = hashlib.sha1(b"blob %d\0" % size)
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest(), self.path

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _stream_file_line(f, head: bytes, store: _Store, temp_paths: list[Path]):
    """A long commit line read as `{"key": "file", "value": {"content": "<base64>", ...}}` with the content decoded
    from `f` piece by piece. Returns (item with content "", blob) or None when the line has another shape (the
    caller then parses it whole)."""
    match = _CONTENT_KEY.search(head)
    if match is None:
        return None
    blob = _Base64Blob(store, temp_paths)
    buffer = head[match.end():]
    while buffer:
        quote = buffer.find(b'"')
        if quote < 0:
            if not blob.write(buffer):
                break
            buffer = f.read(CHUNK_BYTES)
            continue
        if not blob.write(buffer[:quote]):
            break
        tail = buffer[quote:]
        while not tail.endswith(b"\n") and len(tail) <= SMALL_LINE_BYTES:
            more = f.readline(SMALL_LINE_BYTES)
            if not more:
                break
            tail += more
        try:
            item = json.loads(head[: match.end()] + tail)
        except (ValueError, RecursionError):
            break
        if (
            isinstance(item, dict)
            and item.get("key") == "file"
            and isinstance(item.get("value"), dict)
            and item["value"].get("content") == ""
        ):
            return item, blob
        break
    blob.discard()
    return None


def _parse_commit(body: Path | None, store: _Store, temp_paths: list[Path]) -> tuple[dict, list]:
    """Parse and check a whole NDJSON commit before anything is applied: a bad line means nothing changes.

    File contents are decoded into staged temp files (listed in `temp_paths`), read from the body file in pieces."""
    header = None
    operations: list = []
    with open(body if body is not None else os.devnull, "rb") as f:
        number = 0
        while True:
            start = f.tell()
            line = f.readline(SMALL_LINE_BYTES)
            if not line:
                break
            number += 1
            item = blob = None
            if len(line) == SMALL_LINE_BYTES and not line.endswith(b"\n"):
                streamed = _stream_file_line(f, line, store, temp_paths) if header is not None else None
                if streamed is None:
                    f.seek(start)
                    line = f.readline()
                else:
                    item, blob = streamed
            if item is None:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError):
                    raise _HttpError(400, f"commit line {number} is not valid JSON") from None
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise _HttpError(400, f'commit line {number} must be {{"key": ..., "value": {{...}}}}')
            key, value = item.get("key"), item["value"]
            if header is None:
                if key != "header":
                    raise _HttpError(400, "the first commit line must be the header")
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64" or not isinstance(value.get("content"), str):
                    raise _HttpError(400, f"commit line {number}: file content must be a base64 string")
                path = _check_path(value.get("path"))
                if blob is None:
                    blob = _Base64Blob(store, temp_paths)
                    if not blob.write(value["content"].encode()):
                        blob.discard()
                        raise _HttpError(400, f"commit line {number}: file content is not valid base64")
                staged = blob.finish()
                if staged is None:
                    raise _HttpError(400, f"commit line {number}: file content is not valid base64")
                operations.append(("file", path, staged))
            elif key in ("deletedFile", "deletedFolder"):
                path = value.get("path")
                if key == "deletedFolder" and isinstance(path, str):
                    path = path.rstrip("/")
                operations.append((key, _check_path(path), None))
            elif key == "lfsFile":
                raise _HttpError(400, "LFS files are not supported: LocalHub stores every file as a regular file")
            else:
                raise _HttpError(400, f"commit line {number}: unsupported key {key!r}")
    if header is None:
        raise _HttpError(400, "empty commit: expected a header line")
    parent = header.get("parentCommit")
    if parent is not None and not (isinstance(parent, str) and _COMMIT_SHA.fullmatch(parent)):
        raise _HttpError(400, f"parentCommit must be a 40-character commit sha, got {parent!r}")
    return header, operations


def _json_body(body: Path | None) -> dict:
    try:
        payload = json.loads(body.read_bytes() if body is not None else b"")
    except (ValueError, RecursionError):
        raise _HttpError(400, "the request body must be JSON") from None
    if not isinstance(payload, dict):
        raise _HttpError(400, "the request body must be a JSON object")
    return payload


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


_COMMIT_ROUTE = re.compile(r"/api/(models|datasets)/[^/]+(/[^/]+)?/commit/[^/]+")
READ_METHODS = ("GET", "HEAD", "OPTIONS")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries a Content-Length
    server_version = "hfpapers-LocalHub"
    timeout = 60  # a stalled or idle client frees its thread (threads are bounded) instead of holding it

    def log_message(self, format, *args):
        """Silent: the hub keeps its own request log."""

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ---- plumbing

    def _handle(self) -> None:
        hub: LocalHub = self.server.hub
        path, _, query = self.path.partition("?")
        hub.requests.append((self.command, path))
        self._refused_body_bytes = 0
        self._temp_paths: list[Path] = []
        reserved = 0
        try:
            commit_route = bool(_COMMIT_ROUTE.fullmatch(path))
            declared = self._declared_length()
            try:
                self._check_access(hub, path, commit_route, declared)
                limit = hub.max_request_bytes if commit_route else MAX_JSON_BYTES
                if declared > limit:
                    raise _HttpError(413, f"request body of {declared} bytes exceeds this hub's limit of {limit} bytes")
                reserved = hub._reserve(declared)
            except _HttpError:
                # Refused before reading: drop the body the client is sending, then close the connection.
                self.close_connection = True
                self._refused_body_bytes = declared
                raise
            body = self._receive_body(hub._store, declared)
            response = self._route(hub._store, path, parse_qs(query), body)
        except _HttpError as e:
            response = _json_response({"error": e.message}, e.status)
            response.headers.update(e.headers)
            # Header-safe: user-supplied names in the message must not break or inject header lines.
            response.headers["X-Error-Message"] = re.sub(r"[^\x20-\x7e]", "?", e.message)[:1000]
            if e.code:
                response.headers["X-Error-Code"] = e.code
        except Exception as e:  # answer, log nothing to stderr, keep serving
            response = _json_response({"error": f"LocalHub internal error: {type(e).__name__}: {e}"}, 500)
        finally:
            for temp in self._temp_paths:  # the body and any blob staged but not committed
                temp.unlink(missing_ok=True)
            hub._release(reserved)
        self._send(response)
        if self._refused_body_bytes:
            self._discard_body(self._refused_body_bytes)

    def _declared_length(self) -> int:
        # The connection is closed on these errors because the unread body would otherwise be parsed as the next
        # request.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HttpError(411, "send a Content-Length: chunked request bodies are not supported")
        declared = self.headers.get("Content-Length", "0")
        if not (declared.isascii() and declared.isdigit()):
            self.close_connection = True
            raise _HttpError(400, f"invalid Content-Length {declared!r}")
        return int(declared)

    def _check_access(self, hub: LocalHub, path: str, commit_route: bool, declared: int) -> None:
        """A web page must not write here: foreign origins are refused outright, and writes need the hub's token
        and the content type huggingface_hub sends (a browser "simple" request can send neither)."""
        origin = self.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in hub._own_origins():
            raise _HttpError(403, f"cross-origin request from {origin!r} refused: LocalHub only serves its own clients")
        if self.command in READ_METHODS:
            return
        if path != "/api/validate-yaml":  # validate-yaml only reads its body
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), hub.token.encode()):
                raise _HttpError(
                    401,
                    "writing to this LocalHub needs its token: set HF_TOKEN to the token `hfpapers hub serve` prints "
                    "(LocalHub.token), or pass token=",
                )
        expected = NDJSON_TYPE if commit_route else JSON_TYPE
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if declared and media_type != expected:
            raise _HttpError(415, f"expected Content-Type {expected}, got {media_type or 'none'!r}")

    def _receive_body(self, store: _Store, declared: int) -> Path | None:
        """Stream the body to a temp file in pieces: request bodies are never held in memory."""
        if not declared:
            return None
        f, path = store.temp_file("body-")
        self._temp_paths.append(path)
        remaining = declared
        with f:
            while remaining:
                try:
                    chunk = self.rfile.read(min(remaining, CHUNK_BYTES))
                except OSError:
                    chunk = b""
                if not chunk:
                    self.close_connection = True
                    raise _HttpError(400, "request body shorter than its Content-Length")
                f.write(chunk)
                remaining -= len(chunk)
        return path

    def _discard_body(self, declared: int) -> None:
        """After a refusal, throw away (a bounded part of) the body the client is still sending: clients such as
        httpx send the whole body before reading the answer, and closing on unread data would reset the connection
        and lose the answer. Bodies larger than the bound still get the connection closed on them."""
        remaining = min(declared, DISCARD_LIMIT_BYTES)
        self.connection.settimeout(2)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    def _send(self, response: _Response) -> None:
        length = response.file.stat().st_size if response.file is not None else len(response.body)
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(length))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if response.file is None:
                self.wfile.write(response.body)
            else:
                with open(response.file, "rb") as f:
                    shutil.copyfileobj(f, self.wfile, CHUNK_BYTES)
        except OSError:  # the client went away mid-answer
            self.close_connection = True

    def _base_url(self) -> str:
        # The Host the client used, so that returned URLs start with the client's own HF_ENDPOINT.
        return f"http://{self.headers.get('Host') or self.server.hub.url.split('://', 1)[1]}"

    def _allow(self, *methods: str) -> None:
        if self.command not in methods:
            raise _HttpError(405, f"{self.command} is not allowed here", headers={"Allow": ", ".join(methods)})

    # ---- routes

    def _route(self, store: _Store, path: str, query: dict, body: Path | None) -> _Response:
        segments = path.split("/")[1:]
        if segments == ["api", "repos", "create"]:
            self._allow("POST")
            return self._create_repo(store, _json_body(body))
        if segments == ["api", "validate-yaml"]:
            self._allow("POST")
            return self._validate_yaml(_json_body(body))
        if segments == ["api", "agent-harnesses"]:
            # Fetched by huggingface_hub's user-agent code unless HF_HUB_DISABLE_TELEMETRY is set: no agents known.
            self._allow("GET", "HEAD")
            return _json_response({"standardEnvVars": [], "harnesses": {}})
        if len(segments) == 2 and segments[0] == "api" and segments[1] in URL_REPO_TYPES:
            self._allow("GET", "HEAD")
            return self._list_repos(store, URL_REPO_TYPES[segments[1]], query)
        if len(segments) >= 3 and segments[0] == "api" and segments[1] in URL_REPO_TYPES:
            return self._repo_api(store, URL_REPO_TYPES[segments[1]], segments[2:], query, body)
        if segments[0] != "api" and "resolve" in segments:
            repo_type = "model"
            if segments[0] == "datasets":
                repo_type, segments = "dataset", segments[1:]
            return self._resolve(store, repo_type, segments)
        raise _HttpError(404, f"LocalHub does not implement {self.command} {path}", "RouteNotFound")

    def _create_repo(self, store: _Store, payload: dict) -> _Response:
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise _HttpError(400, f"LocalHub hosts model and dataset repos, not {repo_type!r} repos")
        segments = [payload.get("name")]
        if payload.get("organization") is not None:
            segments.insert(0, payload["organization"])
        if not all(isinstance(s, str) for s in segments):
            raise _HttpError(400, "'name' and 'organization' must be strings")
        repo_id = _check_repo_id(segments)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not store.create_repo(repo_type, repo_id, private):
            # huggingface_hub reads "url" from the 409 answer too when create_repo(exist_ok=True).
            return _json_response({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        return _json_response({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> _Response:
        if not isinstance(payload.get("content"), str):
            raise _HttpError(400, "'content' must be the README text")
        errors = _card_metadata_errors(payload["content"])
        return _json_response({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _list_repos(self, store: _Store, repo_type: str, query: dict) -> _Response:
        """`list_models` / `list_datasets`: `author` and `search` (substring of the id) filter, `limit` cuts."""
        author = query.get("author", [None])[-1]
        search = (query.get("search", [""])[-1]).lower()
        limit = query.get("limit", [""])[-1]
        if limit and not limit.isdigit():
            raise _HttpError(400, f"limit must be a non-negative integer, got {limit!r}")
        full = _flag(query, "full") or _flag(query, "cardData")
        found = [
            repo["id"] for repo in store.repos(repo_type)
            if (author is None or repo["id"].split("/")[0] == author and "/" in repo["id"])
            and search in repo["id"].lower()
        ]
        found = found[: int(limit)] if limit else found
        return _json_response([self._info(store, repo_type, repo_id, BRANCH, full) for repo_id in found])

    def _repo_api(self, store: _Store, repo_type: str, rest: list[str], query: dict, body: Path | None) -> _Response:
        # /api/{type}s/{id}[/{action}[/{revision}[/{path}]]]; an id has one or two segments.
        if len(rest) > 2 and rest[2] in REPO_ACTIONS:
            split = 2
        elif len(rest) > 1 and rest[1] in REPO_ACTIONS:
            split = 1
        else:
            split = len(rest)
        repo_id = _check_repo_id([unquote(s) for s in rest[:split]])
        action, args = (rest[split], rest[split + 1 :]) if split < len(rest) else (None, [])
        if action is None:
            self._allow("GET", "HEAD")
            return _json_response(self._info(store, repo_type, repo_id, BRANCH, True))
        if action == "refs" and not args:
            self._allow("GET", "HEAD")
            refs = store.refs(repo_type, repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha} for n, sha in sorted(refs.items())]
            return _json_response({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if not args:
            raise _HttpError(404, f"missing revision after /{action}", "RevisionNotFound")
        revision = unquote("/".join(args)) if action in ("revision", "commits", "branch") else unquote(args[0])
        if action == "revision":
            self._allow("GET", "HEAD")
            return _json_response(self._info(store, repo_type, repo_id, revision, True))
        if action == "commits":
            self._allow("GET", "HEAD")
            return _json_response([
                {"id": sha, "authors": [], "date": commit["date"], "title": commit["message"],
                 "message": commit["description"]}
                for sha, commit in store.history(repo_type, repo_id, revision)
            ])
        if action == "tree":
            self._allow("GET", "HEAD")
            folder = unquote("/".join(args[1:]))
            folder = _check_path(folder) if folder else ""
            files = store.read_commit(repo_type, repo_id, store.resolve(repo_type, repo_id, revision))["files"]
            return _json_response(_tree_entries(files, folder, _flag(query, "recursive"), store.blob_size))
        if action == "branch":
            self._allow("POST", "DELETE")
            branch = _check_branch(revision)
            if self.command == "DELETE":
                store.delete_branch(repo_type, repo_id, branch)
                return _json_response({"success": True})
            starting_point = _json_body(body).get("startingPoint") if body is not None else None
            if starting_point is not None and not isinstance(starting_point, str):
                raise _HttpError(400, "'startingPoint' must be a revision name")
            store.create_branch(repo_type, repo_id, branch, starting_point)
            return _json_response({"success": True})
        self._allow("POST")
        if _flag(query, "create_pr"):
            raise _HttpError(400, "LocalHub does not support pull requests (create_pr)")
        if action == "preupload":
            return self._preupload(store, repo_type, repo_id, revision, _json_body(body))
        return self._commit(store, repo_type, repo_id, revision, body)

    def _info(self, store: _Store, repo_type: str, repo_id: str, revision: str, siblings: bool) -> dict:
        sha = store.resolve(repo_type, repo_id, revision)
        repo = store.repo(repo_type, repo_id)
        commit = store.read_commit(repo_type, repo_id, sha)
        card = self._card_data(store, commit["files"].get("README.md"))
        tags = card.get("tags")
        info = {
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "createdAt": repo["createdAt"],
            "lastModified": commit["date"],
            "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
            "downloads": 0,
            "likes": 0,
        }
        if repo_type == "model":
            info["pipeline_tag"] = card.get("pipeline_tag") if isinstance(card.get("pipeline_tag"), str) else None
            info["library_name"] = card.get("library_name") if isinstance(card.get("library_name"), str) else None
        if card:
            info["cardData"] = card
        if siblings:
            info["siblings"] = [{"rfilename": path} for path in commit["files"]]
        return info

    @staticmethod
    def _card_data(store: _Store, readme_oid: str | None) -> dict:
        """The README's front matter as the Hub's `cardData` ({} without README, front matter or valid YAML)."""
        if readme_oid is None or store.blob_size(readme_oid) > MAX_JSON_BYTES:
            return {}
        try:
            metadata = _card_metadata(store.blob_path(readme_oid).read_text(encoding="utf-8", errors="replace"))
            # JSON round trip: YAML dates and other non-JSON values become strings, as in the Hub's answer.
            return json.loads(json.dumps(metadata, default=str)) if isinstance(metadata, dict) else {}
        except Exception:  # invalid YAML: the Hub shows no card data either
            return {}

    def _preupload(self, store: _Store, repo_type: str, repo_id: str, revision: str, payload: dict) -> _Response:
        requested = payload.get("files")
        if not isinstance(requested, list) or not all(isinstance(f, dict) for f in requested):
            raise _HttpError(400, "'files' must be a list of {path, sample, size}")
        files = store.read_commit(repo_type, repo_id, store.resolve(repo_type, repo_id, revision))["files"]
        # "regular" for every file: contents then come base64 inside the commit, so no LFS or xet server is needed.
        # The oid of an identical remote file lets the client skip unchanged files.
        return _json_response(
            {
                "files": [
                    {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(path)}
                    for path in (_check_path(f.get("path")) for f in requested)
                ]
            }
        )

    def _commit(self, store: _Store, repo_type: str, repo_id: str, revision: str, body: Path | None) -> _Response:
        store.repo(repo_type, repo_id)  # 404 before any work for an unknown repo
        header, operations = _parse_commit(body, store, self._temp_paths)
        sha = store.commit(repo_type, repo_id, revision.removeprefix("refs/heads/"), header, operations)
        return _json_response(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, store: _Store, repo_type: str, segments: list[str]) -> _Response:
        # /{id}/resolve/{revision}/{path}; prefer the two-segment id so that a repo named "resolve" still works.
        at = 2 if len(segments) > 2 and segments[2] == "resolve" else segments.index("resolve")
        repo_id = _check_repo_id([unquote(s) for s in segments[:at]])
        self._allow("GET", "HEAD")
        if len(segments) < at + 3:
            raise _HttpError(400, "expected /{repo_id}/resolve/{revision}/{path}")
        revision, path = unquote(segments[at + 1]), _check_path(unquote("/".join(segments[at + 2 :])))
        sha = store.resolve(repo_type, repo_id, revision)
        oid = store.read_commit(repo_type, repo_id, sha)["files"].get(path)
        if oid is None:
            raise _HttpError(404, f"{path!r} not found in {repo_id!r} at {revision!r}", "EntryNotFound")
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"', "X-Repo-Commit": sha}
        return _Response(200, headers=headers, file=store.blob_path(oid))


# How long a new connection waits for a free handler thread before it is answered 503.
THREAD_WAIT_SECONDS = 2
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub):
        self.hub = hub
        self._slots = threading.BoundedSemaphore(hub.max_threads)
        if ":" in hub.host:
            self.address_family = socket.AF_INET6
        super().__init__((hub.host, hub._requested_port), _Handler)

    def process_request(self, request, client_address):
        # One thread per connection, but at most `max_threads` of them: beyond, connections wait, then get a 503.
        if not self._slots.acquire(timeout=THREAD_WAIT_SECONDS):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # A client that drops its connection is routine, not worth a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalHub:
    """A Hub-protocol server on `host:port` (port 0 picks a free one), storing repos under `data_dir`.

    `data_dir=None` uses a temporary folder that lives as long as this object. Writes need `token` (a fresh random
    one unless given; clients send it from `HF_TOKEN` or `token=`). `max_request_bytes` limits one upload (a commit
    body), `max_inflight_bytes` the bodies of all requests at once, `max_threads` the connections served at once.
    `requests` logs every request as (method, path without query). Use `with LocalHub() as hub:` or
    `start()`/`stop()`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        *,
        token: str | None = None,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_threads: int = MAX_THREADS,
    ):
        if max_request_bytes <= 0 or max_inflight_bytes <= 0 or max_threads <= 0:
            raise ValueError("max_request_bytes, max_inflight_bytes and max_threads must be positive")
        if token is not None and (not token or _CONTROL.search(token) or " " in token):
            raise ValueError("token must be a non-empty string without spaces or control characters")
        self._tmp = tempfile.TemporaryDirectory(prefix="localhub-") if data_dir is None else None
        self.data_dir = Path(self._tmp.name if self._tmp else data_dir)
        self.host = host
        self._requested_port = port
        self.max_request_bytes = max_request_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_threads = max_threads
        self.token = token or f"hf_local_{secrets.token_hex(16)}"
        self.requests: list[tuple[str, str]] = []
        self._store = _Store(self.data_dir)
        self._inflight = 0
        self._inflight_changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _own_origins(self) -> set[str]:
        return {f"http://{host}:{self.port}" for host in ("127.0.0.1", "localhost", "[::1]")} | {self.url}

    def _reserve(self, size: int) -> int:
        """Count `size` body bytes as in flight, waiting while the total would pass `max_inflight_bytes` (a lone
        request always proceeds); 503 if that takes too long."""
        if not size:
            return 0
        with self._inflight_changed:
            fits = self._inflight_changed.wait_for(
                lambda: self._inflight == 0 or self._inflight + size <= self.max_inflight_bytes,
                timeout=INFLIGHT_WAIT_SECONDS,
            )
            if not fits:
                message = "LocalHub is busy receiving other uploads; retry later"
                raise _HttpError(503, message, headers={"Retry-After": "5"})
            self._inflight += size
        return size

    def _release(self, size: int) -> None:
        if size:
            with self._inflight_changed:
                self._inflight -= size
                self._inflight_changed.notify_all()

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError(f"LocalHub is already serving at {self.url}")
        self._server = _Server(self)
        # A short poll interval makes stop() return within 50 ms instead of the default 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"LocalHub {self.url}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(
    data_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    token: str | None = None,
) -> None:
    """Serve a LocalHub in the foreground until Ctrl-C (`hfpapers hub serve`); prints its URL and write token."""
    hub = LocalHub(data_dir, host, port, max_request_bytes, token=token)
    hub._server = _Server(hub)
    print(f"LocalHub serving {hub.data_dir} at {hub.url}; point clients at it with: export HF_ENDPOINT={hub.url} "
          f"HF_TOKEN={hub.token}")
    sys.stdout.flush()
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()
        hub._store.close()
