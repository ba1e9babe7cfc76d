"""LocalHub against the real clients (huggingface_hub, transformers), its on-disk persistence, its safety, and
hfpapers.hub.push/pull.

huggingface_hub reads HF_ENDPOINT when it is imported, so every client-side check runs in a subprocess whose
environment points at the LocalHub under test. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from hfpapers.testing import LocalHub

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = "tester/tiny-vit"


# ---------------------------------------------------------------- helpers


def run_client(code: str, hub_url: str, hf_home: Path, token: str = "hf_fake", **extra_env: str) -> dict:
    """Run `code` in a fresh interpreter pointed at `hub_url` (writing with `token`); it must print one JSON object
    as its last line."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **extra_env,
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"client failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def request(hub: LocalHub, method: str, path: str, body: bytes | None = None, headers=None):
    """A raw request as huggingface_hub sends it: writes carry the hub's token and a JSON content type unless
    `headers` says otherwise."""
    if method not in ("GET", "HEAD"):
        headers = {"Authorization": f"Bearer {hub.token}", "Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def create_repo(hub: LocalHub, repo_id: str, repo_type: str = "model") -> int:
    namespace, name = repo_id.split("/")
    payload = json.dumps({"name": name, "organization": namespace, "type": repo_type}).encode()
    return request(hub, "POST", "/api/repos/create", payload, {"Content-Type": "application/json"})[0]


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def commit_body(files: dict[str, bytes], parent: str | None = None) -> bytes:
    header = {"summary": "test commit", "description": ""}
    if parent is not None:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}]
    for path, data in files.items():
        content = base64.b64encode(data).decode()
        lines.append({"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}})
    return ndjson(*lines)


def post_commit(hub: LocalHub, repo_id: str, body: bytes):
    headers = {"Content-Type": "application/x-ndjson"}
    status, _, answer = request(hub, "POST", f"/api/models/{repo_id}/commit/main", body, headers)
    return status, json.loads(answer)


def head_sha(hub: LocalHub, repo_id: str) -> str:
    status, _, answer = request(hub, "GET", f"/api/models/{repo_id}")
    assert status == 200, answer
    return json.loads(answer)["sha"]


def tree_paths(hub: LocalHub, repo_id: str, revision: str = "main") -> set[str]:
    status, _, answer = request(hub, "GET", f"/api/models/{repo_id}/tree/{revision}?recursive=true")
    assert status == 200, answer
    return {entry["path"] for entry in json.loads(answer) if entry["type"] == "file"}


def race(hub: LocalHub, bodies: list[bytes]) -> list:
    """Post the commits from parallel threads released together; results in the order of `bodies`."""
    start = threading.Barrier(len(bodies))
    results = [None] * len(bodies)

    def send(index: int) -> None:
        start.wait()
        results[index] = post_commit(hub, "tester/repo", bodies[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def disk_state(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry below `folder` with its bytes and mtime, to prove that nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def stopped_hub_url() -> str:
    """The URL of a hub that has been stopped: nothing listens there any more."""
    hub = LocalHub().start()
    url = hub.url
    hub.stop()
    return url


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("model-hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def pushed(model_hub, tmp_path_factory):
    """A tiny ViT classifier and its image processor, saved locally and pushed with transformers' push_to_hub,
    then loaded back from the hub by the same client."""
    work = tmp_path_factory.mktemp("pushed")
    local_dir, hf_home = work / "local", work / "hf-home"
    result = run_client(
        f"""
        import json, torch
        from PIL import Image
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file
        from transformers import (AutoModelForImageClassification, ViTConfig, ViTForImageClassification,
                                  ViTImageProcessor, pipeline)

        torch.manual_seed(0)
        config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=8, patch_size=4, num_labels=3)
        model = ViTForImageClassification(config).eval()
        processor = ViTImageProcessor(size={{"height": 8, "width": 8}})
        model.save_pretrained({str(local_dir)!r})
        processor.save_pretrained({str(local_dir)!r})
        model.push_to_hub({MODEL_REPO!r})
        processor.push_to_hub({MODEL_REPO!r})

        local = load_file({str(local_dir / "model.safetensors")!r})
        remote = load_file(hf_hub_download({MODEL_REPO!r}, "model.safetensors"))
        loaded = AutoModelForImageClassification.from_pretrained({MODEL_REPO!r})
        image = Image.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy())
        from_hub = pipeline("image-classification", model={MODEL_REPO!r})(image)
        from_local = pipeline("image-classification", model=model, image_processor=processor)(image)
        print(json.dumps({{
            "same_safetensors": local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local),
            "same_state_dict": loaded.state_dict().keys() == model.state_dict().keys()
            and all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()),
            "from_hub": from_hub,
            "from_local": from_local,
        }}))
        """,
        model_hub.url,
        hf_home,
        token=model_hub.token,
    )
    return SimpleNamespace(local_dir=local_dir, hf_home=hf_home, result=result, requests=list(model_hub.requests))


# ---------------------------------------------------------------- the real clients


def test_push_to_hub_then_from_pretrained_and_pipeline(pushed):
    assert pushed.result["same_safetensors"]
    assert pushed.result["same_state_dict"]
    assert pushed.result["from_hub"] == pushed.result["from_local"]


def test_request_log_shows_the_expected_endpoints(pushed):
    repo = MODEL_REPO
    for expected in [
        ("POST", "/api/repos/create"),
        ("HEAD", f"/{repo}/resolve/main/README.md"),  # push_to_hub looks for an existing model card
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{repo}/preupload/main"),
        ("POST", f"/api/models/{repo}/commit/main"),
        ("GET", f"/api/models/{repo}"),  # from_pretrained resolves main to a commit sha
    ]:
        assert expected in pushed.requests
    downloads = {path.rsplit("/", 1)[-1] for method, path in pushed.requests if method == "GET" and "/resolve/" in path}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= downloads
    # Every request went to a route LocalHub implements: nothing unexpected (LFS, xet, ...) was needed.
    known = re.compile(
        r"/api/repos/create|/api/validate-yaml|/api/models/[^/]+/[^/]+(/(revision|preupload|commit|tree)/.*)?"
        r"|/[^/]+/[^/]+/resolve/.+"
    )
    assert [request for request in pushed.requests if not known.fullmatch(request[1])] == []


def test_offline_mode_loads_from_the_cache_with_the_server_stopped(model_hub, pushed):
    model_hub.stop()
    try:
        result = run_client(
            f"""
            import json, torch
            from transformers import AutoModelForImageClassification
            loaded = AutoModelForImageClassification.from_pretrained({MODEL_REPO!r}).state_dict()
            local = AutoModelForImageClassification.from_pretrained({str(pushed.local_dir)!r}).state_dict()
            same = loaded.keys() == local.keys() and all(torch.equal(loaded[k], v) for k, v in local.items())
            print(json.dumps({{"same": same}}))
            """,
            model_hub.url,
            pushed.hf_home,
            HF_HUB_OFFLINE="1",
        )
    finally:
        model_hub.start()
    assert result["same"]


def test_hub_push_to_a_stopped_server_fails_clearly_and_leaves_the_folder_alone(pushed, tmp_path):
    dead_url = stopped_hub_url()
    before = folder_state(pushed.local_dir)
    result = run_client(
        f"""
        import json
        from hfpapers.hub import HubError, push
        messages = []
        for endpoint in (None, {dead_url!r}):  # from HF_ENDPOINT, then given explicitly
            try:
                push({str(pushed.local_dir)!r}, "tester/never", endpoint=endpoint)
            except HubError as e:
                messages.append(str(e))
        print(json.dumps(messages))
        """,
        dead_url,
        tmp_path / "hf-home",
    )
    assert len(result) == 2
    for message in result:
        assert f"cannot reach the Hub at {dead_url}/" in message
        assert "tester/never" in message and "nothing was uploaded" in message
    assert folder_state(pushed.local_dir) == before


def test_hub_push_refuses_a_folder_that_is_not_a_saved_model(tmp_path):
    from hfpapers.hub import HubError, push  # checks the folder before importing huggingface_hub

    with pytest.raises(HubError, match="no such folder"):
        push(tmp_path / "missing", "tester/x")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(HubError, match="save_pretrained"):
        push(tmp_path, "tester/x")


def test_hub_pull_returns_the_pushed_files(model_hub, pushed, tmp_path):
    before = folder_state(pushed.local_dir)
    result = run_client(
        f"""
        import json
        from hfpapers.hub import pull, push
        url = push({str(pushed.local_dir)!r}, "tester/via-hfpapers", commit_message="hfpapers push")
        print(json.dumps({{"url": url, "folder": str(pull("tester/via-hfpapers"))}}))
        """,
        model_hub.url,
        tmp_path / "hf-home",
        token=model_hub.token,
    )
    assert result["url"].startswith(f"{model_hub.url}/tester/via-hfpapers/commit/")
    assert disk_state(Path(result["folder"])) == disk_state(pushed.local_dir)
    assert folder_state(pushed.local_dir) == before  # a successful push does not touch the folder either


def test_repos_survive_a_restart_on_the_same_data_dir(tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    upload = f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        shas = {{}}
        for repo_type in ("model", "dataset"):
            api.create_repo("tester/kept", repo_type=repo_type)
            shas[repo_type] = api.upload_folder(folder_path={str(source)!r}, repo_id="tester/kept",
                                                repo_type=repo_type).oid
        print(json.dumps(shas))
        """
    download = """
        import json
        from huggingface_hub import HfApi, snapshot_download
        print(json.dumps({
            "model": snapshot_download("tester/kept"),
            "dataset": snapshot_download("tester/kept", repo_type="dataset"),
            "sha": HfApi().model_info("tester/kept").sha,
            "files": HfApi().list_repo_files("tester/kept", repo_type="dataset"),
        }))
        """
    with LocalHub(tmp_path / "data") as first:
        shas = run_client(upload, first.url, tmp_path / "home-1", token=first.token)
    with LocalHub(tmp_path / "data") as second:
        result = run_client(download, second.url, tmp_path / "home-2")
    assert result["sha"] == shas["model"]
    assert sorted(result["files"]) == ["config.json", "sub/weights.bin"]
    for repo_type in ("model", "dataset"):
        assert disk_state(Path(result[repo_type])) == disk_state(source)


# ---------------------------------------------------------------- protocol details and safety, over raw HTTP


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "data", max_request_bytes=1 << 20) as hub:
        assert create_repo(hub, "tester/repo") == 200
        yield hub


def test_binds_to_loopback_by_default():
    hub = LocalHub()
    assert hub.host == "127.0.0.1"
    with hub:
        assert hub.url == f"http://127.0.0.1:{hub.port}"


def test_serve_prints_the_url_and_serves_until_stopped(tmp_path):
    code = f"from hfpapers.testing.localhub import serve; serve({str(tmp_path)!r}, port=0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        url = re.search(r"export HF_ENDPOINT=(http://127\.0\.0\.1:(\d+))", line)
        assert url, line
        conn = http.client.HTTPConnection("127.0.0.1", int(url.group(2)), timeout=10)
        conn.request("GET", "/api/models/tester/none")
        assert conn.getresponse().headers["X-Error-Code"] == "RepoNotFound"
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    "path",
    [
        "/api/models/../secret",
        "/api/models/tester/..",
        "/api/models/tester/../tree/main",
        "/api/models/%2Fetc%2Fpasswd",
        "/api/models/tester//tree/main",
        "/api/models/tester%5C..%5Csecret",
        "/api/models/tester/a%00b",
        "/api/models/a/b/c",
        "/../../etc/resolve/main/passwd",
        "/tester/repo/resolve/main/../../../etc/passwd",
        "/tester/repo/resolve/main/%2E%2E/secret",
        "/tester/repo/resolve/main/%2Fetc%2Fpasswd",
        "/tester/repo/resolve/main/a%5Cb",
        "/tester/repo/resolve/main/a//b",
        "/tester/repo/resolve/main/a%00b",
        "/api/models/tester/repo/tree/main/..%2F..",
    ],
)
def test_escaping_repo_ids_and_paths_in_urls_are_refused(hub, path):
    status, _, _ = request(hub, "GET", path)
    assert status == 400


@pytest.mark.parametrize(
    "fields",
    [{"name": ".."}, {"name": "x", "organization": ".."}, {"name": "a\\b"}, {"name": ""}, {"name": "/etc"},
     {"name": "x", "organization": ""}, {"name": "a\0b"}],
)
def test_escaping_repo_ids_in_create_are_refused(hub, fields):
    before = disk_state(hub.data_dir)
    assert request(hub, "POST", "/api/repos/create", json.dumps(fields).encode())[0] == 400
    assert disk_state(hub.data_dir) == before


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a\\b", "a//b", "a/./b", "a\0b", ""])
def test_escaping_paths_in_commits_are_refused(hub, path):
    before = disk_state(hub.data_dir)
    status, answer = post_commit(hub, "tester/repo", commit_body({"ok.txt": b"fine", path: b"bad"}))
    assert status == 400, answer
    assert disk_state(hub.data_dir) == before


def test_an_oversized_body_is_refused_from_its_header_without_being_read(hub):
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    conn.putrequest("POST", "/api/models/tester/repo/commit/main")
    conn.putheader("Content-Length", str(10 << 30))  # 10 GiB announced, a few bytes sent
    conn.putheader("Authorization", f"Bearer {hub.token}")
    conn.putheader("Content-Type", "application/x-ndjson")
    conn.endheaders(b"{")
    response = conn.getresponse()  # would time out if the server waited for the announced body
    assert response.status == 413
    assert "exceeds" in json.loads(response.read())["error"]
    conn.close()


def test_a_body_over_the_limit_is_refused(hub):
    status, answer = post_commit(hub, "tester/repo", commit_body({"big.bin": os.urandom(1 << 20)}))
    assert status == 413
    assert tree_paths(hub, "tester/repo") == set()


def test_concurrent_commits_with_the_same_parent_apply_exactly_one(hub):
    post_commit(hub, "tester/repo", commit_body({"base.txt": b"base"}))
    parent = head_sha(hub, "tester/repo")
    batches = {name: {f"{name}/{i}.txt": f"{name}{i}".encode() * 50 for i in range(200)} for name in ("a", "b")}
    results = race(hub, [commit_body(files, parent) for files in batches.values()])
    assert sorted(status for status, _ in results) == [200, 412]
    winner = next(name for name, (status, _) in zip(batches, results) if status == 200)
    assert tree_paths(hub, "tester/repo") == {"base.txt", *batches[winner]}


def test_concurrent_commits_without_parent_are_serialised(hub):
    batches = {name: {f"{name}/{i}.txt": name.encode() * 500 for i in range(200)} for name in ("a", "b")}
    results = race(hub, [commit_body(files) for files in batches.values()])
    assert [status for status, _ in results] == [200, 200]
    assert tree_paths(hub, "tester/repo") == {*batches["a"], *batches["b"]}
    # Each commit is a coherent snapshot: its own files plus all or none of the other's.
    for (_, answer), files, other in zip(results, batches.values(), reversed(batches.values())):
        snapshot = tree_paths(hub, "tester/repo", answer["commitOid"])
        assert snapshot in ({*files}, {*files, *other})


@pytest.mark.parametrize(
    "body",
    [
        b"not json\n",
        ndjson({"key": "file", "value": {"path": "x", "content": "eA=="}}),  # no header first
        commit_body({"good.txt": b"fine"}) + b"{broken\n",
        commit_body({"good.txt": b"fine"}) + ndjson({"key": "file", "value": {"path": "y", "content": "!!"}}),
        commit_body({"good.txt": b"fine"}) + ndjson({"key": "lfsFile", "value": {"path": "z", "oid": "0" * 64}}),
        commit_body({"good.txt": b"fine"}) + ndjson({"key": "deletedFile", "value": {"path": "missing"}}),
        commit_body({"good.txt": b"fine"}, parent="not-a-sha"),
        b"",
    ],
)
def test_a_malformed_commit_changes_nothing_and_the_server_keeps_serving(hub, body):
    sha = head_sha(hub, "tester/repo")
    before = disk_state(hub.data_dir)
    status, answer = post_commit(hub, "tester/repo", body)
    assert status in (400, 404), answer
    assert answer["error"]
    assert disk_state(hub.data_dir) == before
    assert head_sha(hub, "tester/repo") == sha


def test_resolve_headers_and_error_codes(hub):
    post_commit(hub, "tester/repo", commit_body({"dir/file.txt": b"hello"}))
    sha = head_sha(hub, "tester/repo")
    status, headers, body = request(hub, "HEAD", "/tester/repo/resolve/main/dir/file.txt")
    assert (status, body) == (200, b"")
    # ETag is the git blob sha1 of the content, the same oid the tree listing reports.
    assert headers["ETag"] == '"b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"'
    assert headers["X-Repo-Commit"] == sha and headers["Content-Length"] == "5"
    assert request(hub, "GET", f"/tester/repo/resolve/{sha}/dir%2Ffile.txt")[2] == b"hello"
    for path, code in [
        ("/tester/nothing/resolve/main/a.txt", "RepoNotFound"),
        ("/tester/repo/resolve/other-branch/dir/file.txt", "RevisionNotFound"),
        (f"/tester/repo/resolve/{'0' * 40}/dir/file.txt", "RevisionNotFound"),
        ("/tester/repo/resolve/main/missing.txt", "EntryNotFound"),
        ("/api/models/tester/repo/tree/main/missing", "EntryNotFound"),
        ("/api/datasets/tester/repo", "RepoNotFound"),  # a model repo is not a dataset repo
        ("/api/unknown/route", "RouteNotFound"),
    ]:
        status, headers, _ = request(hub, "GET", path)
        assert (status, headers["X-Error-Code"]) == (404, code), path
    assert request(hub, "DELETE", "/tester/repo/resolve/main/dir/file.txt")[0] == 405
    # Asked for by every client that leaves telemetry on.
    assert json.loads(request(hub, "GET", "/api/agent-harnesses")[2]) == {"standardEnvVars": [], "harnesses": {}}
    assert create_repo(hub, "tester/repo") == 409


def test_tree_listing_and_preupload(hub):
    post_commit(hub, "tester/repo", commit_body({"a.txt": b"a", "d/b.txt": b"bb", "d/e/c.txt": b"ccc"}))
    status, _, answer = request(hub, "GET", "/api/models/tester/repo/tree/main")
    assert status == 200
    assert {(e["type"], e["path"]) for e in json.loads(answer)} == {("file", "a.txt"), ("directory", "d")}
    status, _, answer = request(hub, "GET", "/api/models/tester/repo/tree/main/d?recursive=true")
    assert status == 200
    assert {(e["path"], e.get("size")) for e in json.loads(answer)} == {
        ("d/e", None), ("d/b.txt", 2), ("d/e/c.txt", 3)
    }
    payload = json.dumps({"files": [{"path": p, "sample": "", "size": 1} for p in ("a.txt", "new.txt")]})
    status, _, answer = request(hub, "POST", "/api/models/tester/repo/preupload/main", payload.encode())
    assert status == 200
    files = {f["path"]: f for f in json.loads(answer)["files"]}
    assert {f["uploadMode"] for f in files.values()} == {"regular"}
    assert files["a.txt"]["oid"] == "2e65efe2a145dda7ee51d1741299f848e5bf752e" and files["new.txt"]["oid"] is None


def test_validate_yaml(hub):
    def validate(card: str):
        payload = json.dumps({"content": card, "repoType": "model"}).encode()
        status, _, answer = request(hub, "POST", "/api/validate-yaml", payload)
        return status, json.loads(answer)

    good = "---\nlicense: apache-2.0\nmodel-index:\n- name: tiny\n  results: []\n---\n# Tiny\n"
    assert validate(good) == (200, {"errors": [], "warnings": []})
    assert validate("# No metadata at all\n")[0] == 200
    status, answer = validate("---\nlicense: [apache-2.0\n---\n# Broken\n")
    assert status == 400 and "invalid YAML" in answer["errors"][0]["message"]
    assert validate("---\nmodel-index: {name: tiny}\n---\n")[0] == 400
