"""``python -m posenc space``: what goes to a Space, how it goes up, and that what arrived runs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from hub_server import HubServer, hub_client_env
from posenc.space import space_files

ROOT = Path(__file__).resolve().parents[1]
SPACE = "posenc-test/posenc-space"
BINARY_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".webp")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _space_command(hub: HubServer, hf_home: Path, *args: str, token: str | None = "hf_fake_write_token"):
    """Run ``python -m posenc space`` in a subprocess pointed at the fake hub (Xet off, as hub_client_env sets)."""
    env = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"} | ({"HF_TOKEN": token} if token else {})
    return subprocess.run(
        [sys.executable, "-m", "posenc", "space", *args],
        env=hub_client_env(endpoint=hub.endpoint, hf_home=hf_home, env=env),
        cwd=str(ROOT), capture_output=True, text=True, timeout=180, check=False,
    )


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def uploaded(hub: HubServer, tmp_path_factory: pytest.TempPathFactory):
    """The project uploaded once to the fake hub's Space SPACE, as a user would: ``python -m posenc space``."""
    hub.reset_log()
    done = _space_command(hub, tmp_path_factory.mktemp("hf-home"), SPACE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done, hub.uploaded(SPACE, repo_type="space"), hub.requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_space_files_are_what_the_space_runs_and_nothing_else(tmp_path: Path) -> None:
    for name in ("app.py", "requirements.txt", "README.md", ".gitattributes", "posenc/__init__.py",
                 "posenc/models/vit.py", "checkpoints/m/config.json", "checkpoints/m/model.safetensors",
                 "checkpoints/m/README.md", "checkpoints/m/metrics.json", "assets/examples/a.png",
                 "assets/examples/b.jpg",
                 # what stays home
                 "tests/test_x.py", "bench/run.py", "tools/x.py", ".ci/run", "posenc/__pycache__/ui.cpython-311.pyc",
                 "checkpoints/m/train_state.pt", "assets/examples/make_examples.py", "assets/measure/plot.png",
                 "requirements-test.txt", "pyproject.toml", ".gradio/flagged/x.csv", "notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".gitattributes").write_text((ROOT / ".gitattributes").read_text())
    files = {f.path: f.large for f in space_files(tmp_path)}
    assert files == {
        ".gitattributes": False, "README.md": False, "app.py": False, "requirements.txt": False,
        "posenc/__init__.py": False, "posenc/models/vit.py": False,
        "checkpoints/m/config.json": False, "checkpoints/m/model.safetensors": True,
        "checkpoints/m/README.md": False, "checkpoints/m/metrics.json": False,
        "assets/examples/a.png": True, "assets/examples/b.jpg": True,
    }
    (tmp_path / "app.py").unlink()
    with pytest.raises(ValueError, match="no app.py"):
        space_files(tmp_path)


def test_gitattributes_sends_weights_and_images_through_lfs() -> None:
    every = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    binaries = [p for p in every if p.endswith(BINARY_SUFFIXES)]
    attributes = subprocess.run(["git", "check-attr", "filter", "--", *binaries], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
    assert binaries and all(line.endswith(": filter: lfs") for line in attributes), attributes
    assert subprocess.run(["git", "check-attr", "filter", "--", "app.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip().endswith(": filter: unspecified")


def test_readme_front_matter_pins_the_tested_python_as_a_string() -> None:
    front = yaml.safe_load((ROOT / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert front["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"  # a string: 3.10 != "3.1"


def test_dry_run_lists_the_space_files_and_sends_nothing(hub: HubServer, tmp_path: Path) -> None:
    before = hub.request_count
    done = _space_command(hub, tmp_path / "hf", SPACE + "-dry", "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    listed = [line.split("\t")[0] for line in done.stdout.splitlines() if "\t" in line]
    assert listed == [f.path for f in space_files(ROOT)]
    assert "dry run: nothing uploaded" in done.stdout
    assert hub.request_count == before


def test_upload_sends_the_files_the_space_needs_and_nothing_else(uploaded) -> None:
    done, repo, _ = uploaded
    expected = [f.path for f in space_files(ROOT)]
    assert sorted(repo.files) == sorted(expected)
    assert {"app.py", "requirements.txt", "README.md", ".gitattributes", "posenc/__init__.py"} <= set(repo.files)
    assert not [p for p in repo.files if p.split("/")[0] in ("tests", "bench", "tools", ".ci") or "__pycache__" in p]
    for path in expected:
        assert (repo.folder / path).read_bytes() == (ROOT / path).read_bytes(), path
    assert repo.sdk == "gradio" and len(repo.commits) == 1
    assert re.search(rf"uploaded: http://127\.0\.0\.1:\d+/spaces/{SPACE}/commit/[0-9a-f]{{40}}", done.stdout)


def test_binaries_arrive_as_large_files(uploaded) -> None:
    _, repo, requests = uploaded
    binaries = sorted(p for p in repo.files if p.endswith(BINARY_SUFFIXES))
    assert len([p for p in binaries if p.endswith(".safetensors")]) == len(list(ROOT.glob("checkpoints/*/model.safetensors")))
    assert repo.lfs_files == binaries
    assert all(mode == "regular" for path, mode in repo.files.items() if path not in binaries)
    # each binary went up once through the LFS batch API and a PUT of its bytes, none inside the commit
    puts = sorted(r.path.rsplit("/", 1)[-1] for r in requests if r.method == "PUT")
    assert puts == sorted({hashlib.sha256((ROOT / p).read_bytes()).hexdigest() for p in binaries})
    assert any(r.path == f"/spaces/{SPACE}.git/info/lfs/objects/batch" for r in requests)
    assert not [r for r in requests if "xet" in r.path.lower()]


def test_upload_without_a_token_fails_with_the_hub_answer(hub: HubServer, tmp_path: Path) -> None:
    done = _space_command(hub, tmp_path / "hf", "posenc-test/no-token", token=None)
    assert done.returncode == 1
    assert "error: the upload to spaces/posenc-test/no-token failed" in done.stderr and "401" in done.stderr


def test_clean_folder_from_the_uploaded_files_starts_the_app_and_serves_a_bundled_model(uploaded, tmp_path) -> None:
    from gradio_client import Client, handle_file

    _, repo, _ = uploaded
    clean = tmp_path / "space"
    shutil.copytree(repo.folder, clean)
    port = _free_port()
    # no PYTHONPATH: app.py's own folder comes first on sys.path, so the uploaded posenc package is the one used
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSENC_", "GRADIO_", "HF_", "PYTHON"))}
    env |= {"GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"), "POSENC_FIRST_MODEL": "off"}
    (tmp_path / "cwd").mkdir()
    proc = subprocess.Popen([sys.executable, str(clean / "app.py")], cwd=tmp_path / "cwd", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the uploaded app did not serve: {proc.stdout.read().decode()[-3000:]}")
                time.sleep(0.5)
        config = urllib.request.urlopen(url + "config", timeout=10).read().decode()
        assert '"cifar10-rope"' in config
        remote = Client(url, verbose=False, download_files=str(tmp_path))
        result = remote.predict(handle_file(clean / "assets" / "examples" / "red_car.png"), "cifar10-rope", None,
                                api_name="/predict")
        assert len(result["confidences"]) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
