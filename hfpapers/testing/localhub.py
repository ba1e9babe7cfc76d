"""`LocalHub`: a Hugging Face Hub HTTP server for tests and offline work (standard library only).

It speaks the part of the Hub protocol that huggingface_hub and transformers use to create repos, upload folders
(preupload + NDJSON commit) and download files (revision info, tree listing, resolve), for model and dataset repos.
Point a client at it with `HF_ENDPOINT=<hub.url>` (read when huggingface_hub is imported).

Repos live on disk under `data_dir`, so they survive restarts:

    blobs/<oid[:2]>/<oid>                         file contents, named by their git blob sha1 (shared by all repos)
    repos/<type>/<namespace>--<name>/repo.json    {"id", "type", "private", "createdAt"}
    repos/<type>/<namespace>--<name>/commits/<sha>.json   {"parent", "files": {path: oid}, "message", ...}
    repos/<type>/<namespace>--<name>/refs.json    {"main": <sha>}

Commits are immutable snapshots. The only branch is `main`; any commit sha is also a revision. Preupload always
answers uploadMode "regular", so file contents travel base64 inside the commit and neither LFS nor xet is ever used.
There is no authentication: tokens are accepted and ignored, and `private` is only recorded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "LocalHub", "serve"]

DEFAULT_MAX_REQUEST_BYTES = 512 * 1024 * 1024
# After refusing a body as too large, read and drop at most this much of it (see `_Handler._discard_body`).
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
BRANCH = "main"
URL_REPO_TYPES = {"models": "model", "datasets": "dataset"}
# URL prefix of a repo page / resolve route per repo type (models have none).
URL_PREFIXES = {"model": "", "dataset": "datasets/"}
REPO_ACTIONS = {"revision", "preupload", "commit", "tree"}

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


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


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


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
    """A file path inside a repo: relative, '/'-separated, no empty, '.' or '..' segment, no backslash or NUL."""
    if (
        not isinstance(path, str)
        or not path
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise _HttpError(400, f"invalid file path {path!r}: expected a relative path like 'dir/file.json'")
    return path


def _all_parents(paths) -> set[str]:
    """Every folder that holds one of `paths` ('a/b/c' gives 'a' and 'a/b')."""
    parents = set()
    for path in paths:
        parts = path.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return parents


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _card_metadata_errors(card: str) -> list[str]:
    """Errors in a README's YAML front matter, checked the way the Hub's validate-yaml route does."""
    match = re.match(r"\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", card)
    if match is None:
        return []  # a card without metadata is valid
    try:
        import yaml  # a huggingface_hub dependency; optional so that the server itself stays stdlib-only
    except ImportError:
        return []  # without PyYAML only the front matter's delimiters are checked

    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"invalid YAML in the README front matter: {e}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["the README front matter must be a YAML mapping"]
    model_index = metadata.get("model-index")
    if model_index is not None and not (
        isinstance(model_index, list)
        and all(isinstance(e, dict) and "name" in e and isinstance(e.get("results"), list) for e in model_index)
    ):
        return ["'model-index' must be a list of entries with a 'name' and a list of 'results'"]
    return []


class _Store:
    """Repos on disk. Every change to a repo happens under its lock and ends with an atomic rename."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for repo_type in URL_PREFIXES:
            (root / "repos" / repo_type).mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, repo_type: str, repo_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((repo_type, repo_id), threading.Lock())

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        # "--" is forbidden inside names, so "namespace--name" cannot collide with another repo's folder.
        return self.root / "repos" / repo_type / repo_id.replace("/", "--")

    def blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid

    def blob_size(self, oid: str) -> int:
        return self.blob_path(oid).stat().st_size

    def _put_blob(self, data: bytes) -> None:
        path = self.blob_path(_git_blob_oid(data))
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            _atomic_write(path, data)

    def _write_commit(self, repo_dir: Path, commit: dict) -> str:
        raw = json.dumps(commit, sort_keys=True).encode()
        sha = hashlib.sha1(raw).hexdigest()
        _atomic_write(repo_dir / "commits" / f"{sha}.json", raw)
        return sha

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo holding one empty commit on `main`; False if it already exists."""
        with self._lock(repo_type, repo_id):
            final = self._repo_dir(repo_type, repo_id)
            if final.exists():
                return False
            # Build the repo in a hidden staging folder (hidden names are never valid repo folders), then rename it
            # into place, so a half-created repo is never visible.
            staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=".new-"))
            try:
                (staging / "commits").mkdir()
                created = _now()
                repo = {"id": repo_id, "type": repo_type, "private": private, "createdAt": created}
                _atomic_write(staging / "repo.json", json.dumps(repo).encode())
                initial = {"parent": None, "files": {}, "message": "initial commit", "description": "", "date": created}
                sha = self._write_commit(staging, initial)
                _atomic_write(staging / "refs.json", json.dumps({BRANCH: sha}).encode())
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

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """The commit sha a revision names (`main` or a commit sha of this repo)."""
        self.repo(repo_type, repo_id)
        repo_dir = self._repo_dir(repo_type, repo_id)
        if revision == BRANCH:
            return json.loads((repo_dir / "refs.json").read_bytes())[BRANCH]
        if _COMMIT_SHA.fullmatch(revision) and (repo_dir / "commits" / f"{revision}.json").is_file():
            return revision
        message = f"revision {revision!r} not found in {repo_id!r} (only '{BRANCH}' and commit shas exist)"
        raise _HttpError(404, message, "RevisionNotFound")

    def read_commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self._repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_bytes())

    def commit(self, repo_type: str, repo_id: str, header: dict, operations: list[tuple[str, str, bytes]]) -> str:
        """Apply a parsed commit to `main` atomically and return its sha.

        All checks run before anything is written, under the repo lock; then blobs, then the commit object, then
        the ref is replaced in one rename. A concurrent commit is therefore either serialised after this one or,
        when it names a stale parentCommit, refused with 412.
        """
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._lock(repo_type, repo_id):
            head = self.resolve(repo_type, repo_id, BRANCH)
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                message = f"parentCommit {parent} is not the head of '{BRANCH}' ({head}): a commit happened since"
                raise _HttpError(412, message + "; refresh and try again")
            files = dict(self.read_commit(repo_type, repo_id, head)["files"])
            contents: dict[str, bytes] = {}
            for kind, path, data in operations:
                if kind == "file":
                    oid = _git_blob_oid(data)
                    files[path] = oid
                    contents[oid] = data
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
            for oid in set(files.values()) & contents.keys():
                self._put_blob(contents[oid])
            commit = {
                "parent": head,
                "files": dict(sorted(files.items())),
                "message": header.get("summary", ""),
                "description": header.get("description", ""),
                "date": _now(),
            }
            sha = self._write_commit(repo_dir, commit)
            try:
                _atomic_write(repo_dir / "refs.json", json.dumps({BRANCH: sha}).encode())
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


def _parse_commit(body: bytes) -> tuple[dict, list[tuple[str, str, bytes]]]:
    """Parse and check a whole NDJSON commit before anything is applied: a bad line means nothing changes."""
    header = None
    operations: list[tuple[str, str, bytes]] = []
    for number, line in enumerate(body.splitlines(), start=1):
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
            try:
                data = base64.b64decode(value["content"], validate=True)
            except binascii.Error:
                raise _HttpError(400, f"commit line {number}: file content is not valid base64") from None
            operations.append(("file", _check_path(value.get("path")), data))
        elif key in ("deletedFile", "deletedFolder"):
            path = value.get("path")
            if key == "deletedFolder" and isinstance(path, str):
                path = path.rstrip("/")
            operations.append((key, _check_path(path), b""))
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


def _json_body(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise _HttpError(400, "the request body must be JSON") from None
    if not isinstance(payload, dict):
        raise _HttpError(400, "the request body must be a JSON object")
    return payload


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries a Content-Length
    server_version = "hfpapers-LocalHub"
    timeout = 120  # a stalled client frees its thread instead of holding it forever

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
        try:
            body = self._read_body(hub.max_request_bytes)
            response = self._route(hub._store, path, parse_qs(query), body)
        except _HttpError as e:
            response = _json_response({"error": e.message}, e.status)
            response.headers.update(e.headers)
            # Header-safe: user-supplied names in the message must not break or inject header lines.
            response.headers["X-Error-Message"] = re.sub(r"[^\x20-\x7e]", "?", e.message)
            if e.code:
                response.headers["X-Error-Code"] = e.code
        except Exception as e:  # answer, log nothing to stderr, keep serving
            response = _json_response({"error": f"LocalHub internal error: {type(e).__name__}: {e}"}, 500)
        self._send(response)
        if self._refused_body_bytes:
            self._discard_body(self._refused_body_bytes)

    def _read_body(self, limit: int) -> bytes:
        # Checked from the headers before reading, so an oversized body is never read into memory. The connection
        # is closed on these errors because the unread body would otherwise be parsed as the next request.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HttpError(411, "send a Content-Length: chunked request bodies are not supported")
        declared = self.headers.get("Content-Length", "0")
        if not (declared.isascii() and declared.isdigit()):
            self.close_connection = True
            raise _HttpError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            self.close_connection = True
            self._refused_body_bytes = int(declared)
            raise _HttpError(413, f"request body of {declared} bytes exceeds this hub's limit of {limit} bytes")
        body = self.rfile.read(int(declared))
        if len(body) != int(declared):
            self.close_connection = True
            raise _HttpError(400, "request body shorter than its Content-Length")
        return body

    def _discard_body(self, declared: int) -> None:
        """After a 413, throw away (a bounded part of) the body the client is still sending: clients such as httpx
        send the whole body before reading the answer, and closing on unread data would reset the connection and
        lose the 413. Bodies larger than the bound still get the connection closed on them."""
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
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
        except OSError:  # the client went away mid-answer
            self.close_connection = True

    def _base_url(self) -> str:
        # The Host the client used, so that returned URLs start with the client's own HF_ENDPOINT.
        return f"http://{self.headers.get('Host') or self.server.hub.url.split('://', 1)[1]}"

    def _allow(self, *methods: str) -> None:
        if self.command not in methods:
            raise _HttpError(405, f"{self.command} is not allowed here", headers={"Allow": ", ".join(methods)})

    # ---- routes

    def _route(self, store: _Store, path: str, query: dict, body: bytes) -> _Response:
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

    def _repo_api(self, store: _Store, repo_type: str, rest: list[str], query: dict, body: bytes) -> _Response:
        # /api/{type}s/{id}[/{action}/{revision}[/{path}]]; an id has one or two segments.
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
            return self._repo_info(store, repo_type, repo_id, BRANCH)
        if not args:
            raise _HttpError(404, f"missing revision after /{action}", "RevisionNotFound")
        revision = unquote(args[0])
        if action == "revision":
            self._allow("GET", "HEAD")
            return self._repo_info(store, repo_type, repo_id, unquote("/".join(args)))
        if action == "tree":
            self._allow("GET", "HEAD")
            folder = unquote("/".join(args[1:]))
            folder = _check_path(folder) if folder else ""
            files = store.read_commit(repo_type, repo_id, store.resolve(repo_type, repo_id, revision))["files"]
            return _json_response(_tree_entries(files, folder, _flag(query, "recursive"), store.blob_size))
        self._allow("POST")
        if _flag(query, "create_pr"):
            raise _HttpError(400, "LocalHub does not support pull requests (create_pr)")
        if action == "preupload":
            return self._preupload(store, repo_type, repo_id, revision, _json_body(body))
        return self._commit(store, repo_type, repo_id, revision, body)

    def _repo_info(self, store: _Store, repo_type: str, repo_id: str, revision: str) -> _Response:
        sha = store.resolve(repo_type, repo_id, revision)
        repo = store.repo(repo_type, repo_id)
        commit = store.read_commit(repo_type, repo_id, sha)
        return _json_response(
            {
                "id": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": sha,
                "private": repo["private"],
                "gated": False,
                "disabled": False,
                "createdAt": repo["createdAt"],
                "lastModified": commit["date"],
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": path} for path in commit["files"]],
            }
        )

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

    def _commit(self, store: _Store, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        header, operations = _parse_commit(body)
        if revision != BRANCH:
            store.resolve(repo_type, repo_id, revision)  # 404 for an unknown revision
            raise _HttpError(400, f"commits can only go to the branch '{BRANCH}', not to {revision!r}")
        sha = store.commit(repo_type, repo_id, header, operations)
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub):
        self.hub = hub
        if ":" in hub.host:
            self.address_family = socket.AF_INET6
        super().__init__((hub.host, hub._requested_port), _Handler)

    def handle_error(self, request, client_address):
        # A client that drops its connection is routine, not worth a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalHub:
    """A Hub-protocol server on `host:port` (port 0 picks a free one), storing repos under `data_dir`.

    `data_dir=None` uses a temporary folder that lives as long as this object. `requests` logs every request as
    (method, path without query). Use `with LocalHub() as hub:` or `start()`/`stop()`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self._tmp = tempfile.TemporaryDirectory(prefix="localhub-") if data_dir is None else None
        self.data_dir = Path(self._tmp.name if self._tmp else data_dir)
        self.host = host
        self._requested_port = port
        self.max_request_bytes = max_request_bytes
        self.requests: list[tuple[str, str]] = []
        self._store = _Store(self.data_dir)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
) -> None:
    """Serve a LocalHub in the foreground until Ctrl-C (`hfpapers hub serve`)."""
    hub = LocalHub(data_dir, host, port, max_request_bytes)
    hub._server = _Server(hub)
    print(f"LocalHub serving {hub.data_dir} at {hub.url}; point clients at it with: export HF_ENDPOINT={hub.url}")
    sys.stdout.flush()
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()
