"""LocalHub and `hfpapers push` / `pull` under abuse: cross-site writes, stale files after a re-push, training state,
silent Hubs, concurrent servers, bad paths, big and many uploads, kills mid-write; and the Hub routes the clients
use for listing, refs, commits and branches. Only 127.0.0.1 is contacted, and every wait is bounded."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from hfpapers.testing import LocalHub
from hfpapers.testing import localhub as localhub_module
from test_localhub import commit_body, create_repo, disk_state, head_sha, post_commit, request, tree_paths


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "data") as hub:
        assert create_repo(hub, "tester/repo") == 200
        yield hub


def raw(hub, method, path, body=b"", headers=None):
    """A request with exactly these headers (no token or content type added)."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def model_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in {"config.json": b'{"model_type": "toy"}', **files}.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def remote_files(hub, repo_id, revision=None):
    from huggingface_hub import HfApi

    return sorted(HfApi(endpoint=hub.url, token=hub.token).list_repo_files(repo_id, revision=revision))


# ---------------------------------------------------------------- cross-site writes (issue 16.1)


def test_a_browser_simple_post_from_another_site_is_refused(hub):
    sha, before = head_sha(hub, "tester/repo"), disk_state(hub.data_dir)
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    body = commit_body({"modeling_toy.py": b"import os; os.system('echo owned')"})
    assert raw(hub, "POST", "/api/models/tester/repo/commit/main", body, evil)[0] == 403
    # even with the right token and type, a page on another origin (or a sandboxed one, "null") cannot write
    for origin in ("http://evil.example", "null", f"http://evil.example:{hub.port}"):
        headers = {"Origin": origin, "Content-Type": "application/x-ndjson", "Authorization": f"Bearer {hub.token}"}
        assert raw(hub, "POST", "/api/models/tester/repo/commit/main", body, headers)[0] == 403
    assert raw(hub, "POST", "/api/repos/create", b'{"name": "x", "organization": "evil"}', evil)[0] == 403
    assert head_sha(hub, "tester/repo") == sha and disk_state(hub.data_dir) == before


def test_writes_need_the_token_and_the_clients_content_type_reads_stay_open(hub):
    body = commit_body({"a.txt": b"a"})
    ndjson_type = {"Content-Type": "application/x-ndjson"}
    assert raw(hub, "POST", "/api/models/tester/repo/commit/main", body, ndjson_type)[0] == 401
    wrong = {**ndjson_type, "Authorization": "Bearer hf_guess"}
    assert raw(hub, "POST", "/api/models/tester/repo/commit/main", body, wrong)[0] == 401
    plain = {"Content-Type": "text/plain", "Authorization": f"Bearer {hub.token}"}
    status, answer = raw(hub, "POST", "/api/models/tester/repo/commit/main", body, plain)
    assert status == 415 and "application/x-ndjson" in json.loads(answer)["error"]
    assert tree_paths(hub, "tester/repo") == set()
    # the hub's own origin and no origin at all are fine
    good = {**ndjson_type, "Authorization": f"Bearer {hub.token}", "Origin": hub.url}
    assert raw(hub, "POST", "/api/models/tester/repo/commit/main", body, good)[0] == 200
    assert raw(hub, "GET", "/tester/repo/resolve/main/a.txt") == (200, b"a")
    assert raw(hub, "GET", "/api/models/tester/repo")[0] == 200


def test_each_hub_has_its_own_token_and_serve_prints_it(tmp_path):
    assert LocalHub().token != LocalHub().token
    code = f"from hfpapers.testing.localhub import serve; serve({str(tmp_path)!r}, port=0)"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = server.stdout.readline()
        port, token = re.search(r"HF_ENDPOINT=http://127\.0\.0\.1:(\d+) HF_TOKEN=(\S+)", line).groups()
        served = type("Served", (), {"port": int(port), "token": token})()
        payload = b'{"name": "x", "organization": "me"}'
        assert raw(served, "POST", "/api/repos/create", payload, {"Content-Type": "application/json"})[0] == 401
        assert request(served, "POST", "/api/repos/create", payload)[0] == 200
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------- push replaces, never uploads training state


def test_a_re_push_of_a_resharded_model_deletes_the_old_weights_but_keeps_what_is_asked(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from hfpapers.hub import push

    first = model_folder(tmp_path / "v1", {"model.safetensors": b"old weights", "README.md": b"# v1"})
    push(first, "tester/model", endpoint=hub.url, token=hub.token)
    HfApi(endpoint=hub.url, token=hub.token).upload_file(path_or_fileobj=b"by hand", path_in_repo="notes/log.md",
                                                        repo_id="tester/model")
    resharded = {"model-00001-of-00002.safetensors": b"new 1", "model-00002-of-00002.safetensors": b"new 2",
                 "model.safetensors.index.json": b"{}"}
    second = model_folder(tmp_path / "v2", resharded)
    push(second, "tester/model", endpoint=hub.url, token=hub.token, keep=["notes/*"])
    assert remote_files(hub, "tester/model") == sorted(["config.json", "notes/log.md", *resharded])
    downloaded = hf_hub_download("tester/model", "model-00002-of-00002.safetensors", endpoint=hub.url,
                                 cache_dir=tmp_path / "cache")
    assert Path(downloaded).read_bytes() == b"new 2"
    push(second, "tester/model", endpoint=hub.url, token=hub.token)  # without --keep the stray file goes too
    assert remote_files(hub, "tester/model") == sorted(["config.json", *resharded])


def test_push_never_uploads_checkpoints_or_pickles(hub, tmp_path):
    from hfpapers.hub import push

    folder = model_folder(tmp_path / "run", {
        "model.safetensors": b"w",
        "runs/task-1/adapter_model.safetensors": b"a",
        "runs/task-1/checkpoints/x.pkl": b"pickle",
        "runs/task-1/checkpoints/step-3/optimizer.bin": b"adam",
        "checkpoints/step-1/scheduler.bin": b"s",
        "stray.pkl": b"pickle",
    })
    push(folder, "tester/gs", endpoint=hub.url, token=hub.token)
    published = ["config.json", "model.safetensors", "runs/task-1/adapter_model.safetensors"]
    assert remote_files(hub, "tester/gs") == published


def test_push_include_exclude_revision_and_message(hub, tmp_path):
    from huggingface_hub import HfApi
    from hfpapers.hub import push

    folder = model_folder(tmp_path / "m", {"model.safetensors": b"w", "extra.txt": b"x", "logs/a.txt": b"l"})
    push(folder, "tester/branchy", endpoint=hub.url, token=hub.token)
    push(folder, "tester/branchy", endpoint=hub.url, token=hub.token, revision="dev", exclude=["logs/*"],
         include=["*.json", "*.safetensors", "logs/*"], commit_message="only weights")
    assert remote_files(hub, "tester/branchy", revision="dev") == ["config.json", "model.safetensors"]
    assert remote_files(hub, "tester/branchy") == ["config.json", "extra.txt", "logs/a.txt", "model.safetensors"]
    commits = HfApi(endpoint=hub.url).list_repo_commits("tester/branchy", revision="dev")
    assert commits[0].title == "only weights"


# ---------------------------------------------------------------- a Hub that never answers (issue 16.6)


def test_push_to_a_hub_that_never_answers_fails_within_the_timeout(tmp_path):
    from hfpapers.hub import HubError, push

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (through the backlog) and never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    folder = model_folder(tmp_path / "m", {"model.safetensors": b"w"})
    before = disk_state(folder)
    start = time.monotonic()
    try:
        with pytest.raises(HubError, match=r"did not answer within 1 s.*nothing was uploaded.*unchanged"):
            push(folder, "tester/silent", endpoint=url, token="hf_x", timeout=1)
    finally:
        listener.close()
    assert time.monotonic() - start < 10
    assert disk_state(folder) == before


def test_cli_push_timeout_comes_from_hf_hub_download_timeout(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    folder = model_folder(tmp_path / "m", {"model.safetensors": b"w"})
    try:
        proc = run_cli("push", "tester/silent", folder, check=False, timeout=60,
                       env={"HF_ENDPOINT": url, "HF_TOKEN": "hf_x", "HF_HUB_DOWNLOAD_TIMEOUT": "1",
                            "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    finally:
        listener.close()
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "did not answer within 1 s" in proc.stderr


def test_cli_push_refuses_swapped_arguments(tmp_path):
    folder = model_folder(tmp_path / "m", {})
    proc = run_cli("push", folder, "you/scaling-mlp-tiny", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "hfpapers push REPO_ID FOLDER" in proc.stderr


# ---------------------------------------------------------------- integrity (issue 16.7)


def test_two_servers_on_one_data_folder_keep_every_commit(tmp_path):
    with LocalHub(tmp_path / "data") as first, LocalHub(tmp_path / "data", token=first.token) as second:
        assert create_repo(first, "tester/repo") == 200
        expected = set()
        for round_ in range(3):
            batches = [{f"{round_}-{name}/{i}.txt": name.encode() * 200 for i in range(150)} for name in "ab"]
            start = threading.Barrier(2)
            results = [None, None]

            def send(index, server, files):
                start.wait()
                results[index] = post_commit(server, "tester/repo", commit_body(files))

            threads = [threading.Thread(target=send, args=(i, server, files))
                       for i, (server, files) in enumerate(zip((first, second), batches))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [status for status, _ in results] == [200, 200]
            expected |= {*batches[0], *batches[1]}
        assert tree_paths(first, "tester/repo") == tree_paths(second, "tester/repo") == expected


@pytest.mark.parametrize("path", ["a" * 5000, "dir/" + "b" * 300, "line\r\nX-Injected: 1", "tab\there", "nul\x7f"])
def test_paths_a_download_cannot_use_are_refused(hub, path):
    before = disk_state(hub.data_dir)
    status, answer = post_commit(hub, "tester/repo", commit_body({"ok.txt": b"fine", path: b"bad"}))
    assert status == 400 and "invalid file path" in answer["error"]
    assert disk_state(hub.data_dir) == before


def test_a_big_upload_is_streamed_not_held_in_memory(tmp_path):
    """Peak memory of the server process grows by far less than the upload (it grew by ~5x the body before)."""
    code = f"from hfpapers.testing.localhub import serve; serve({str(tmp_path / 'data')!r}, port=0, token='t')"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", server.stdout.readline()).group(1))
        served = type("Served", (), {"port": port, "token": "t"})()
        assert create_repo(served, "tester/big") == 200

        def peak_mb():
            status = Path(f"/proc/{server.pid}/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

        data = os.urandom(48 << 20)
        body_file = tmp_path / "body.ndjson"
        body_file.write_bytes(commit_body({"weights.bin": data}))
        before = peak_mb()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with open(body_file, "rb") as body:
            conn.request("POST", "/api/models/tester/big/commit/main", body=body,
                         headers={"Authorization": "Bearer t", "Content-Type": "application/x-ndjson",
                                  "Content-Length": str(body_file.stat().st_size)})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        conn.close()
        growth = peak_mb() - before
        assert raw(served, "GET", "/tester/big/resolve/main/weights.bin") == (200, data)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"server peak memory grew by {growth:.1f} MB for a 48 MB file (64 MB body)")
    assert growth < 24, growth


def test_in_flight_bytes_and_threads_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(localhub_module, "INFLIGHT_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(localhub_module, "THREAD_WAIT_SECONDS", 0.3)
    with LocalHub(tmp_path / "data", max_inflight_bytes=1000, max_threads=3) as hub:
        assert create_repo(hub, "tester/repo") == 200
        stalled = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
        stalled.sendall(b"POST /api/models/tester/repo/commit/main HTTP/1.1\r\nHost: x\r\nContent-Length: 800\r\n"
                        b"Content-Type: application/x-ndjson\r\nAuthorization: Bearer " + hub.token.encode()
                        + b"\r\n\r\n{")  # 1 of 800 bytes, then silence
        time.sleep(0.2)
        body = commit_body({"a.txt": b"x" * 500})
        assert post_commit(hub, "tester/repo", body)[0] == 503  # 800 + ~700 bytes would pass the 1000-byte bound
        idle = [socket.create_connection(("127.0.0.1", hub.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        status, _ = raw(hub, "GET", "/api/models/tester/repo")  # the 4th connection finds 3 threads busy
        assert status == 503
        for sock in [stalled, *idle]:
            sock.close()
        time.sleep(0.3)
        assert post_commit(hub, "tester/repo", body)[0] == 200


def test_temp_files_of_a_killed_server_are_removed_at_start(tmp_path):
    data = tmp_path / "data"
    live = LocalHub(data)  # a running server's temp folder must survive another server's start
    (live._store.work / "body-in-progress").write_bytes(b"x")
    code = ("import os; from hfpapers.testing import LocalHub\n"
            f"hub = LocalHub({str(data)!r})\n"
            "(hub._store.work / 'blob-half-written').write_bytes(b'x' * 1000)\n"
            "os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == -9
    (data / "blobs" / "ab").mkdir(parents=True)
    (data / "blobs" / "ab" / ".tmp-q1w2e3").write_bytes(b"x")  # as versions that wrote temp files in place left
    orphans = [p for p in data.rglob("*") if p.is_file() and p.name in ("blob-half-written", ".tmp-q1w2e3")]
    assert len(orphans) == 2
    restarted = LocalHub(data)
    assert not any(p.exists() for p in orphans)
    assert (live._store.work / "body-in-progress").exists()
    assert sorted(p.name for p in (data / "tmp").iterdir() if p.is_dir()) == sorted(
        [live._store.work.name, restarted._store.work.name])


# ---------------------------------------------------------------- routes the clients use (issue 15.14)


def test_list_models_refs_commits_branches_and_card_data(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=hub.url, token=hub.token)
    for repo_id in ("alice/mlp-tiny", "alice/vit", "bob/mlp-large"):
        api.create_repo(repo_id)
    card = "---\nlicense: apache-2.0\npipeline_tag: image-classification\ntags:\n- arxiv:2306.13575\n---\n# MLP\n"
    first = api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="alice/mlp-tiny",
                            commit_message="add card")
    assert sorted(m.id for m in api.list_models(author="alice")) == ["alice/mlp-tiny", "alice/vit"]
    assert sorted(m.id for m in api.list_models(search="mlp")) == ["alice/mlp-tiny", "bob/mlp-large"]
    assert [m.id for m in api.list_models(author="alice", search="MLP")] == ["alice/mlp-tiny"]
    assert len(list(api.list_models(limit=2))) == 2

    info = api.model_info("alice/mlp-tiny")
    assert info.pipeline_tag == "image-classification" and info.card_data.license == "apache-2.0"
    assert info.tags == ["arxiv:2306.13575"]

    api.create_branch("alice/mlp-tiny", branch="v2")
    with pytest.raises(Exception, match="409"):
        api.create_branch("alice/mlp-tiny", branch="v2")
    on_branch = api.upload_file(path_or_fileobj=b"v2 only", path_in_repo="new.txt", repo_id="alice/mlp-tiny",
                                revision="v2", commit_message="branch work")
    refs = api.list_repo_refs("alice/mlp-tiny")
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", first.oid), ("v2", on_branch.oid)}
    assert api.list_repo_files("alice/mlp-tiny") == ["README.md"]
    path = hf_hub_download("alice/mlp-tiny", "new.txt", revision="v2", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"v2 only"
    commits = api.list_repo_commits("alice/mlp-tiny", revision="v2")
    assert [c.title for c in commits] == ["branch work", "add card", "initial commit"]
    assert [c.commit_id for c in commits][:2] == [on_branch.oid, first.oid]
    api.delete_branch("alice/mlp-tiny", branch="v2")
    assert [b.name for b in api.list_repo_refs("alice/mlp-tiny").branches] == ["main"]
