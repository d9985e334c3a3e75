"""First visit: the real DeiT-Tiny once it is fetched in the background, the bundled model until then or offline."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import save_file

from hub_server import HubServer, hub_client_env, patched_hub_client
from posenc.app import create_demo
from posenc.app.state import DEFAULT_MODEL, FIRST_MODEL, FirstModel, first_model_from_env, ready_notes
from posenc.registry import HUB_MODELS

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
EXAMPLES = ROOT / "assets" / "examples"
WEIGHTS = "model.safetensors"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def deit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeiT-Tiny repo in timm's Hub layout with random weights and 2 blocks (small, never needs shared data)."""
    import timm

    folder = tmp_path_factory.mktemp("deit-tiny")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2)
    config = {
        "architecture": "deit_tiny_patch16_224", "num_classes": 1000, "num_features": 192, "global_pool": "token",
        "model_args": {"depth": 2, "num_classes": 1000, "global_pool": "token", "img_size": [224, 224]},
        "pretrained_cfg": {"tag": "fb_in1k", "input_size": [3, 224, 224], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    return folder


@pytest.fixture
def hub(deit_repo: Path):
    with HubServer() as server:
        server.add_repo(FIRST_MODEL, deit_repo)
        yield server


def _labels(dropdown) -> dict[str, str]:
    return {key: label for label, key in dropdown.choices}


# ------------------------------------------------------------------------------------------------ the fetch alone


@pytest.mark.parametrize(("value", "expected"), [
    (None, FIRST_MODEL), ("off", None), ("None", None), ("", None), (" timm/other ", "timm/other"),
])
def test_first_model_setting_comes_from_the_environment(value, expected) -> None:
    environ = {} if value is None else {"POSENC_FIRST_MODEL": value}
    assert first_model_from_env(environ) == expected


def test_fetch_runs_in_the_background_and_is_picked_only_once_ready() -> None:
    release, fetched = threading.Event(), []
    first = FirstModel("org/model", fetch=lambda name: (fetched.append(name), release.wait(10)), online=lambda s: True)
    first.start()
    deadline = time.monotonic() + 10
    while first.state != "downloading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.state == "downloading" and first.pick("bundled") == "bundled"
    assert ready_notes(["org/model", "org/cached", "org/absent"], ["org/model", "org/absent"], first) == {
        "org/model": "downloading", "org/cached": "ready"}
    release.set()
    assert first.wait(10)
    assert first.state == "ready" and first.pick("bundled") == "org/model" and fetched == ["org/model"]
    assert ready_notes(["org/model"], [], first) == {"org/model": "ready"}


@pytest.mark.parametrize("online", [False, None])
def test_without_the_hub_nothing_is_fetched(online) -> None:
    fetched = []
    first = FirstModel("org/model", fetch=fetched.append, online=lambda s: online, probe_wait=0.1)
    first.start()
    assert first.wait(10)
    assert first.state == "offline" and fetched == [] and first.pick("bundled") == "bundled"


def test_a_failed_fetch_keeps_the_bundled_model() -> None:
    def fail(name: str) -> None:
        raise OSError("connection reset")

    first = FirstModel("org/model", fetch=fail, online=lambda s: True)
    first.start()
    assert first.wait(10)
    assert first.state == "failed" and first.pick("bundled") == "bundled"


# ------------------------------------------------------------------------------------------------ the app, in-process


def test_hub_reachable_first_visit_shows_deit_once_fetched_and_the_bundled_model_until_then(hub, tmp_path) -> None:
    hub.set_fault(FIRST_MODEL, "slow", filename=WEIGHTS, seconds=3.0, methods="GET", times=1)
    with patched_hub_client(endpoint=hub.endpoint, hf_home=tmp_path / "hf", download_timeout=10):
        demo = create_demo(checkpoints_dir=CHECKPOINTS, registry=HUB_MODELS, examples_dir=EXAMPLES,
                           first_model=FIRST_MODEL)
        h = demo.posenc_handlers
        try:
            started = time.monotonic()
            banner, model, *_ = h.explore.first_visit()
            assert time.monotonic() - started < 3, "the first visit does not wait for the download"
            assert model.value != FIRST_MODEL  # the bundled default stays
            assert _labels(model)[FIRST_MODEL].endswith("Hub: downloading")
            assert not banner.visible
            assert h.models.first_model.wait(60), "the background fetch did not finish"
            assert h.models.first_model.state == "ready"
            banner, model, *_ = h.explore.first_visit()
        finally:
            h.close()
    assert model.value == FIRST_MODEL
    labels = _labels(model)
    assert labels[FIRST_MODEL].endswith("Hub: ready")
    assert labels[DEFAULT_MODEL].endswith("bundled")
    assert h.cache.sources() == [FIRST_MODEL], "the fetch loaded it, so the first visit's views need no download"
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and FIRST_MODEL in r.path}
    assert fetched == {"config.json", WEIGHTS}


@pytest.mark.parametrize("offline_mode", [False, True], ids=["hub-unreachable", "hf-hub-offline"])
def test_hub_unreachable_first_visit_stays_on_the_bundled_model(hub, tmp_path, offline_mode) -> None:
    with patched_hub_client(endpoint=None, hf_home=tmp_path / "hf", offline=offline_mode):
        demo = create_demo(checkpoints_dir=CHECKPOINTS, registry=HUB_MODELS, examples_dir=EXAMPLES,
                           first_model=FIRST_MODEL)
        h = demo.posenc_handlers
        try:
            assert h.models.first_model.wait(30)
            banner, model, *_ = h.explore.first_visit()
        finally:
            h.close()
    assert h.models.first_model.state == "offline"
    assert model.value != FIRST_MODEL and banner.visible
    assert _labels(model)[FIRST_MODEL].endswith("Hub: unavailable offline")
    assert h.cache.sources() == [] and hub.request_count == 0


# ------------------------------------------------------------------------------------------------ app.py


def test_app_script_fetches_deit_at_start_up_from_the_hub(hub, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = hub_client_env(endpoint=hub.endpoint, hf_home=tmp_path / "hf", download_timeout=10, env={
        "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"})
    env = {k: v for k, v in env.items() if k not in ("POSENC_FIRST_MODEL", "POSENC_CHECKPOINTS", "GRADIO_SERVER_NAME")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(r.method == "GET" and r.path.endswith(f"{FIRST_MODEL}/resolve/main/{WEIGHTS}")
                      for r in hub.requests):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("app.py did not fetch the first model at start-up")
            time.sleep(0.2)
        while True:  # and it serves
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("app.py did not serve")
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
