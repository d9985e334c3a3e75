"""The fake Hub in hub_server.py, checked against the real huggingface_hub client."""

import base64
import hashlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_server import HubServer, patched_hub_client, run_hub_client

pytestmark = pytest.mark.timeout(30)

REPO = "posenc-test/tiny-vit"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _download(filename: str, repo_id: str = REPO) -> str:
    """A client snippet that downloads one file and emits its local path."""
    return f"from huggingface_hub import hf_hub_download\nemit(path=hf_hub_download({repo_id!r}, {filename!r}))\n"


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "pos_embed": torch.randn(1, 17, 32, generator=generator),  # 1, N, C
        "cls_token": torch.randn(1, 1, 32, generator=generator),  # 1, 1, C
    }


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "extra").mkdir(parents=True)
    (folder / CONFIG).write_text(json.dumps({"dim": 32, "num_patches": 16}))
    save_file(_tensors(), str(folder / WEIGHTS))
    (folder / "extra" / "notes.txt").write_text("a file in a sub-folder\n")
    return folder


@pytest.fixture
def hub(repo_dir: Path):
    with HubServer() as server:
        server.add_repo(REPO, repo_dir)
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def _assert_same_bytes(downloaded: str, original: Path) -> None:
    assert Path(downloaded).read_bytes() == original.read_bytes(), f"{downloaded} differs from {original}"


def test_download_matches_then_comes_from_cache_when_server_is_down_or_offline(hub, repo_dir, hf_home):
    first = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert first.ok, first.describe()
    _assert_same_bytes(first.values["path"], repo_dir / WEIGHTS)
    assert [(r.method, r.path) for r in hub.requests] == [
        ("HEAD", f"/{REPO}/resolve/main/{WEIGHTS}"),
        ("GET", f"/{REPO}/resolve/main/{WEIGHTS}"),
    ]

    endpoint = hub.endpoint
    hub.stop()
    down = run_hub_client(_download(WEIGHTS), endpoint=endpoint, hf_home=hf_home)
    assert down.ok, down.describe()
    assert down.values["path"] == first.values["path"]

    hub.start()
    assert hub.endpoint == endpoint, "a restarted server keeps its port"
    hub.reset_log()
    offline = hub.run_client(_download(WEIGHTS), hf_home=hf_home, offline=True)
    assert offline.ok, offline.describe()
    assert offline.values["path"] == first.values["path"]
    assert hub.request_count == 0


def test_offline_without_cache_raises_local_entry_not_found_and_makes_no_request(hub, hf_home):
    result = hub.run_client(_download(WEIGHTS), hf_home=hf_home, offline=True)
    assert result.raised("LocalEntryNotFoundError"), result.describe()
    assert hub.request_count == 0


def test_in_process_client_uses_cache_after_stop_and_close_session(hub, repo_dir, hf_home):
    from huggingface_hub import close_session, hf_hub_download

    with patched_hub_client(endpoint=hub.endpoint, hf_home=hf_home) as sleeps:
        path = hf_hub_download(REPO, WEIGHTS)
        _assert_same_bytes(path, repo_dir / WEIGHTS)
        assert Path(path).is_relative_to(hf_home / "hub")
        hub.stop()
        close_session()
        assert hf_hub_download(REPO, WEIGHTS) == path
        assert sleeps == [], "a refused HEAD falls back to the cache without back-off"
    with patched_hub_client(endpoint=hub.endpoint, hf_home=hf_home, offline=True):
        assert hf_hub_download(REPO, WEIGHTS) == path


def test_snapshot_download_fetches_every_file_of_the_repo(hub, repo_dir, hf_home):
    code = "from huggingface_hub import snapshot_download\nemit(folder=snapshot_download(%r))\n" % REPO
    result = hub.run_client(code, hf_home=hf_home)
    assert result.ok, result.describe()
    folder = Path(result.values["folder"])
    expected = sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == expected
    for rel in expected:
        _assert_same_bytes(str(folder / rel), repo_dir / rel)
    assert folder.name == hub.commit_sha(REPO)
    tree = [r for r in hub.requests if "/tree/" in r.path]
    assert [(r.path, r.query) for r in tree] == [
        (f"/api/models/{REPO}/tree/{hub.commit_sha(REPO)}", "recursive=true&expand=false")
    ]


def test_from_pretrained_loads_weights_through_the_fake_hub(hub, hf_home):
    code = f"""
import torch
from huggingface_hub import PyTorchModelHubMixin

class Tiny(torch.nn.Module, PyTorchModelHubMixin):
    def __init__(self, dim: int = 8, num_patches: int = 4):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))

model = Tiny.from_pretrained({REPO!r})
emit(pos_embed=model.pos_embed.detach().flatten().tolist(), cls_token=model.cls_token.detach().flatten().tolist())
"""
    result = hub.run_client(code, hf_home=hf_home, timeout=60)
    assert result.ok, result.describe()
    expected = _tensors()
    torch.testing.assert_close(torch.tensor(result.values["pos_embed"]), expected["pos_embed"].flatten())
    torch.testing.assert_close(torch.tensor(result.values["cls_token"]), expected["cls_token"].flatten())
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET"}
    assert fetched == {CONFIG, WEIGHTS}


@pytest.mark.parametrize(
    ("kind", "options", "expected_error"),
    [
        ("not_found", {}, "RepositoryNotFoundError"),
        ("gated", {}, "GatedRepoError"),
        ("gated", {"status": 401}, "GatedRepoError"),
        ("missing", {"filename": WEIGHTS}, "EntryNotFoundError"),
        ("server_error", {}, "LocalEntryNotFoundError"),
        ("cut", {"filename": WEIGHTS, "nbytes": 100}, "RemoteProtocolError"),
        ("drop", {}, "RemoteProtocolError"),
        ("slow", {"seconds": 2.5, "methods": "GET"}, "ReadTimeout"),
    ],
)
def test_fault_raises_the_documented_error_and_a_retry_after_healing_succeeds(
    hub, repo_dir, hf_home, kind, options, expected_error
):
    hub.set_fault(REPO, kind, **options)
    failed = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert failed.raised(expected_error), failed.describe()
    assert not list((hf_home / "hub").glob("models--*/snapshots/*/" + WEIGHTS)), "nothing usable was cached"

    hub.clear_fault(REPO)
    healed = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert healed.ok, healed.describe()
    _assert_same_bytes(healed.values["path"], repo_dir / WEIGHTS)


def test_server_error_retries_are_requested_with_back_off_but_skipped(hub, hf_home):
    hub.set_fault(REPO, "server_error")
    started = time.monotonic()
    result = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert result.raised("LocalEntryNotFoundError"), result.describe()
    assert sum(result.sleeps) > 20, f"expected the ~23 s back-off to be requested, got {result.sleeps}"
    assert time.monotonic() - started < 15
    assert sum(r.method == "HEAD" for r in hub.requests) == 1 + 6, "one fast try, then 1 + 5 retries"


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("not_found", {}),
        ("gated", {}),
        ("server_error", {}),
        ("slow", {"seconds": 3.0, "methods": "HEAD"}),
    ],
)
def test_cached_file_is_returned_silently_when_the_server_misbehaves(hub, repo_dir, hf_home, kind, options):
    first = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert first.ok, first.describe()
    hub.set_fault(REPO, kind, **options)
    again = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert again.ok, again.describe()
    assert again.values["path"] == first.values["path"]
    _assert_same_bytes(again.values["path"], repo_dir / WEIGHTS)


def test_cut_once_is_resumed_by_the_client(hub, repo_dir, hf_home):
    hub.set_fault(REPO, "cut", filename=WEIGHTS, times=1)
    result = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert result.ok, result.describe()
    _assert_same_bytes(result.values["path"], repo_dir / WEIGHTS)
    assert sum(r.method == "GET" for r in hub.requests) == 2


def test_truncated_file_is_served_consistently_and_healing_serves_a_new_commit(hub, repo_dir, hf_home):
    full = (repo_dir / WEIGHTS).read_bytes()
    healthy_commit = hub.commit_sha(REPO)
    hub.set_fault(REPO, "truncate_file", filename=WEIGHTS, nbytes=200)
    assert hub.commit_sha(REPO) != healthy_commit

    short = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert short.ok, short.describe()
    assert Path(short.values["path"]).read_bytes() == full[:200]
    assert Path(short.values["path"]).parent.name == hub.commit_sha(REPO)

    hub.clear_fault(REPO, "truncate_file")
    assert hub.commit_sha(REPO) == healthy_commit
    healed = hub.run_client(_download(WEIGHTS), hf_home=hf_home)
    assert healed.ok, healed.describe()
    assert Path(healed.values["path"]).read_bytes() == full
    assert Path(short.values["path"]).read_bytes() == full[:200], "the old commit's file is left as it was"


def test_missing_file_is_left_out_of_listings(hub):
    hub.set_fault(REPO, "missing", filename=WEIGHTS)
    with urllib.request.urlopen(f"{hub.endpoint}/api/models/{REPO}/revision/main", timeout=5) as response:
        info = json.load(response)
    sha = info["sha"]
    with urllib.request.urlopen(f"{hub.endpoint}/api/models/{REPO}/tree/{sha}?recursive=true", timeout=5) as response:
        tree = json.load(response)
    assert info["id"] == REPO and sha == hub.commit_sha(REPO)
    assert sorted(s["rfilename"] for s in info["siblings"]) == [CONFIG, "extra/notes.txt"]
    assert sorted(e["path"] for e in tree if e["type"] == "file") == [CONFIG, "extra/notes.txt"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{hub.endpoint}/{REPO}/resolve/main/{WEIGHTS}", timeout=5)
    assert caught.value.code == 404
    assert caught.value.headers["X-Error-Code"] == "EntryNotFound"
    assert caught.value.headers["X-Repo-Commit"] == sha


def test_head_sends_the_get_headers_without_a_body(hub, repo_dir):
    connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    try:
        connection.request("HEAD", f"/{REPO}/resolve/main/{WEIGHTS}")
        head = connection.getresponse()
        assert head.read() == b""
        connection.request("GET", f"/{REPO}/resolve/main/{WEIGHTS}")
        get = connection.getresponse()
        body = get.read()
    finally:
        connection.close()
    assert head.status == get.status == 200
    for name in ("Content-Length", "ETag", "X-Repo-Commit"):
        assert head.getheader(name) == get.getheader(name), name
    assert body == (repo_dir / WEIGHTS).read_bytes()
    assert int(get.getheader("Content-Length")) == len(body)
    assert get.getheader("ETag") == f'"{hub.etag(REPO, WEIGHTS)}"'
    assert get.getheader("X-Repo-Commit") == hub.commit_sha(REPO)


@pytest.mark.parametrize(
    ("path", "error_code"),
    [
        (f"/nobody/nothing/resolve/main/{CONFIG}", "RepoNotFound"),
        ("/api/models/nobody/nothing/revision/main", "RepoNotFound"),
        (f"/{REPO}/resolve/v9.9/{CONFIG}", "RevisionNotFound"),
        (f"/{REPO}/resolve/main/no-such-file.bin", "EntryNotFound"),
    ],
)
def test_unknown_names_answer_404_with_the_hub_error_code(hub, path, error_code):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(hub.endpoint + path, timeout=5)
    assert caught.value.code == 404
    assert caught.value.headers["X-Error-Code"] == error_code
    assert hub.request_count == 1


def test_stop_closes_open_connections_and_interrupts_slow_answers(hub):
    hub.set_fault(REPO, "slow", seconds=20.0)
    idle = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    slow = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    slow.request("GET", f"/{REPO}/resolve/main/{CONFIG}")
    time.sleep(0.2)
    started = time.monotonic()
    hub.stop()
    assert time.monotonic() - started < 3
    assert idle.recv(1) == b"", "the idle keep-alive connection was closed"
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        slow.getresponse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    idle.close()
    slow.close()


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("explode", {}),
        ("slow", {"seconds": 0}),
        ("slow", {"seconds": 1000}),
        ("truncate_file", {"filename": WEIGHTS}),
        ("truncate_file", {"filename": "absent.bin", "nbytes": 1}),
        ("missing", {}),
        ("gated", {"status": 500}),
        ("server_error", {"status": 404}),
        ("cut", {"times": 0}),
        ("drop", {"methods": "POST"}),
    ],
)
def test_set_fault_rejects_invalid_settings(hub, kind, options):
    with pytest.raises(ValueError):
        hub.set_fault(REPO, kind, **options)


def test_run_hub_client_without_endpoint_cannot_reach_any_hub(hf_home):
    result = run_hub_client(_download(WEIGHTS), endpoint=None, hf_home=hf_home)
    assert result.raised("LocalEntryNotFoundError"), result.describe()


# ------------------------------------------------------------------------------------------------ uploads
def _post(hub: HubServer, path: str, payload: object, *, token: str | None = "hf_fake",
          content_type: str = "application/json") -> tuple[int, dict, dict]:
    """POST to the fake hub: (status, JSON answer, headers)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(hub.endpoint + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def _create(hub: HubServer, repo_id: str, repo_type: str = "model") -> None:
    namespace, name = repo_id.split("/")
    status, answer, _ = _post(hub, "/api/repos/create", {"name": name, "organization": namespace, "type": repo_type})
    assert status == 200, answer


def _commit_lines(*lines: dict) -> bytes:
    header = {"key": "header", "value": {"summary": "test", "description": ""}}
    return b"".join(json.dumps(line).encode() + b"\n" for line in (header, *lines))


def test_writes_need_a_token(hub):
    status, answer, _ = _post(hub, "/api/repos/create", {"name": "x", "organization": "me", "type": "model"}, token=None)
    assert status == 401 and "Authorization" in answer["error"]


def test_preupload_sends_binaries_and_gitattributes_patterns_through_lfs(hub):
    _create(hub, "me/modes")
    text = base64.b64encode(b"print('hello')\n").decode()
    binary = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR").decode()
    files = [{"path": "app.py", "sample": text, "size": 15}, {"path": "a/b.png", "sample": binary, "size": 16},
             {"path": "weights.npy", "sample": text, "size": 15}, {"path": "big.txt", "sample": text, "size": 11 << 20}]
    status, answer, _ = _post(hub, "/api/models/me/modes/preupload/main", {"files": files})
    assert status == 200
    assert {f["path"]: f["uploadMode"] for f in answer["files"]} == {
        "app.py": "regular", "a/b.png": "lfs", "weights.npy": "regular", "big.txt": "lfs"}
    rule = base64.b64encode(b"*.npy filter=lfs diff=lfs merge=lfs -text\n").decode()
    status, _, _ = _post(hub, "/api/models/me/modes/commit/main", _commit_lines(
        {"key": "file", "value": {"path": ".gitattributes", "content": rule, "encoding": "base64"}}),
        content_type="application/x-ndjson")
    assert status == 200
    status, answer, _ = _post(hub, "/api/models/me/modes/preupload/main", {"files": files[2:3]})
    assert answer["files"][0]["uploadMode"] == "lfs", "a committed .gitattributes rule makes the file a large file"


def test_commit_with_a_binary_inside_is_rejected_like_the_hub(hub):
    _create(hub, "me/binary")
    content = base64.b64encode(b"\x00\x01binary weights").decode()
    status, answer, _ = _post(hub, "/api/models/me/binary/commit/main", _commit_lines(
        {"key": "file", "value": {"path": "model.safetensors", "content": content, "encoding": "base64"}}),
        content_type="application/x-ndjson")
    assert status == 400 and "rejected because it contains binary files" in answer["error"]
    missing = {"path": "model.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 10}
    status, answer, _ = _post(hub, "/api/models/me/binary/commit/main",
                              _commit_lines({"key": "lfsFile", "value": missing}), content_type="application/x-ndjson")
    assert status == 400 and "was not uploaded" in answer["error"]
    assert hub.uploaded("me/binary").files == {}


def test_lfs_put_of_other_bytes_than_announced_is_refused(hub):
    _create(hub, "me/lfs")
    data = b"\x00" * 100
    oid = hashlib.sha256(data).hexdigest()
    status, answer, _ = _post(hub, "/me/lfs.git/info/lfs/objects/batch",
                              {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 100}]})
    href = answer["objects"][0]["actions"]["upload"]["href"]
    assert status == 200 and answer["transfer"] == "basic" and href.startswith(hub.endpoint)
    for body, expected in ((b"\x01" * 100, 400), (data, 200)):
        request = urllib.request.Request(href, data=body, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                got = response.status
        except urllib.error.HTTPError as error:
            got = error.code
        assert got == expected
    status, answer, _ = _post(hub, "/me/lfs.git/info/lfs/objects/batch",
                              {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 100}]})
    assert "actions" not in answer["objects"][0], "a stored object needs no second upload"


@pytest.mark.parametrize(("front", "error"), [
    ("sdk: gradio\npython_version: 3.10\n", "python_version"),
    ("python_version: \"3.11\"\n", "sdk"),
    ("sdk: gradio\npython_version: \"3.11\"\n", None),
])
def test_validate_yaml_checks_a_space_front_matter(hub, front, error):
    status, answer, _ = _post(hub, "/api/validate-yaml", {"content": f"---\n{front}---\n# title\n", "repoType": "space"})
    if error is None:
        assert status == 200 and answer["errors"] == []
    else:
        assert status == 400 and error in answer["errors"][0]["message"]


def test_uploaded_model_repo_downloads_back_through_the_hub_client(hub, repo_dir, hf_home):
    from huggingface_hub import HfApi, hf_hub_download

    with patched_hub_client(endpoint=hub.endpoint, hf_home=hf_home):
        api = HfApi(endpoint=hub.endpoint, token="hf_fake")
        api.create_repo("me/uploaded", exist_ok=True)
        api.create_repo("me/uploaded", exist_ok=True)  # a 409 that exist_ok accepts
        api.upload_folder(repo_id="me/uploaded", folder_path=repo_dir, commit_message="weights")
        path = hf_hub_download("me/uploaded", WEIGHTS)
    _assert_same_bytes(path, repo_dir / WEIGHTS)
    uploaded = hub.uploaded("me/uploaded")
    assert uploaded.lfs_files == [WEIGHTS]
    assert uploaded.files == {WEIGHTS: "lfs", CONFIG: "regular", "extra/notes.txt": "regular"}
    assert [c.summary for c in uploaded.commits] == ["weights"]
