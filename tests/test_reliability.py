"""The app keeps serving under bad uploads, Hub faults, a full queue, load and memory pressure.

Every test talks to a launched app on 127.0.0.1 through gradio_client:

* bad uploads and Hub faults: the app in this process, inside ``patched_hub_client`` so its huggingface_hub
  talks to a fake Hub (``tests/hub_server.py``) with fault injection, and its own Hub probe finds that Hub;
* the full queue: the app in this process with a loader that waits, so the queue can be filled on purpose;
* load and memory: ``python app.py`` in a subprocess, driven by the functions of ``bench/reliability.py``,
  with the resident memory read from ``/proc/<pid>/status`` of that process.

The load and memory tests run smaller counts than the issue's figures (200 requests from 8 clients;
1,000 requests): CI has 2 cores and shares 90 minutes with the rest of the suite. The full counts are
measured by ``python -m bench.reliability`` (``bench/results/reliability.json``, the README's table).

Models: the bundled CIFAR-10 checkpoints when ``checkpoints/`` has them, else random-weight stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from PIL import Image, ImageOps

from bench.reliability import (
    bundled_or_stand_ins,
    free_port,
    request_mix,
    run_load,
    run_memory,
    sample_images,
    start_app,
)
from conftest import rss_mb, sampled_rss_mb
from hub_server import HubServer, patched_hub_client
from posenc import views
from posenc.hub import HubLoadError, load
from posenc.labels import CIFAR10_LABELS
from posenc.models import ViTConfig, build_model
from posenc.preprocess import Preprocess
from posenc.registry import HUB_MODELS
from posenc.train import PRESETS
from posenc.app import QUEUE_OPTIONS, Catalog, Handlers, HubStatus, ModelCache, create_demo, launch_options

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"

pytestmark = [
    pytest.mark.timeout(300),
    # gradio 6.31's queue calls pandas options that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _launch(demo, **queue: int) -> str:
    """Launch ``demo`` on a free port of 127.0.0.1 with the app's launch options; returns its URL."""
    port = free_port()
    demo.queue(**{**QUEUE_OPTIONS, **queue}).launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options(EXAMPLES)
    )
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled checkpoints, or random-weight stand-ins of the same presets when they are absent."""
    return bundled_or_stand_ins(tmp_path_factory.mktemp("checkpoints"))


def source(checkpoints: Path, family: str) -> str:
    return str(checkpoints / f"cifar10-{family}")


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_images(tmp_path_factory.mktemp("photo"), count=1)[0]


@pytest.fixture(scope="module")
def hub() -> HubServer:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="module")
def client(checkpoints: Path, hub: HubServer, hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Client:
    """A client of the app launched in this process, whose Hub client points at the fake Hub."""
    with patched_hub_client(endpoint=hub.endpoint, hf_home=hf_home):
        demo = create_demo(checkpoints_dir=checkpoints, registry=HUB_MODELS, cache_size=4, examples_dir=EXAMPLES)
        url = _launch(demo)
        try:
            yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        finally:
            demo.close()


def _top5(result: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in result["confidences"]}


def _assert_serves(client: Client, checkpoints: Path, photo: Path) -> None:
    """The next good request with a bundled model succeeds."""
    result = client.predict(handle_file(photo), source(checkpoints, "learned"), None, api_name="/predict")
    assert len(result["confidences"]) == 5


def _seen_photo(client: Client, image: Path, model: str) -> np.ndarray:
    """The image the model saw in the app (the ``photo`` array of the /analyse export), (h, w, 3) uint8."""
    result = client.predict(handle_file(image), model, None, 0, 0, 0, api_name="/analyse")
    with np.load(result[-2]) as npz:  # the .npz is always the last but one output
        return npz["photo"]


# ------------------------------------------------------------------------------------------------ bad uploads


def _noise(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """Random RGB pixels, (h, w, 3) uint8 for (w, h) = size."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite ``rgb`` with ``alpha`` (both uint8) on white."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb(path: Path, side: int = 40000) -> None:
    """A valid 1-bit PNG of side x side black pixels: about 200 KB that would decode to side**2 bytes (1.6 GB)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))


HUGE_JPEG = """
import sys
import numpy as np
from PIL import Image
ramp = np.linspace(0, 255, 8000).astype(np.uint8)
rgb = np.empty((8000, 8000, 3), dtype=np.uint8)
rgb[..., 0], rgb[..., 1], rgb[..., 2] = ramp[None, :], ramp[:, None], 90
img = Image.fromarray(rgb)
img.save(sys.argv[1], quality=90)
img.resize((32, 32), Image.Resampling.BICUBIC).save(sys.argv[2])
"""


def _make_upload(name: str, folder: Path) -> tuple[Path, np.ndarray | None]:
    """Write the upload ``name``; returns its path and the RGB pixels it must be read as (None: an error)."""
    path = folder / name
    if name == "empty.png":
        path.write_bytes(b"")
        return path, None
    if name == "text-named.png":
        path.write_text("this is not an image\n")
        return path, None
    if name == "truncated.jpg":
        Image.fromarray(_noise(1, (96, 96))).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, None
    if name == "drawing.svg":
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><circle r="9"/></svg>')
        return path, None
    if name == "bomb.png":
        _bomb(path)
        return path, None
    if name == "one-pixel.png":
        pixels = np.array([[[200, 30, 30]]], dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return path, pixels
    if name == "sixteen-bit.png":
        ramp = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)  # 40, 48
        Image.fromarray(ramp).save(path)
        grey = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
        return path, np.repeat(grey[..., None], 3, axis=-1)
    if name == "rgba.png":
        rgb, alpha = _noise(2), np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
        return path, _on_white(rgb, alpha)
    if name == "la.png":
        grey, alpha = _noise(3)[..., 0], np.tile(np.linspace(255, 0, 40).astype(np.uint8)[:, None], (1, 48))
        Image.fromarray(np.dstack([grey, alpha])).save(path)  # two channels: mode LA
        return path, _on_white(np.repeat(grey[..., None], 3, axis=-1), alpha)
    if name == "palette-transparent.png":
        palette = np.array([[0, 0, 0], [220, 20, 60], [30, 144, 255], [50, 205, 50]], dtype=np.uint8)
        index = np.random.default_rng(4).integers(0, 4, (40, 48), dtype=np.uint8)  # 40, 48
        img = Image.frombytes("P", (48, 40), index.tobytes())
        img.putpalette(palette.flatten().tolist())
        img.save(path, transparency=0)  # index 0 is transparent
        expected = palette[index]  # 40, 48, 3
        expected[index == 0] = 255
        return path, expected
    if name == "cmyk.jpg":
        Image.fromarray(_noise(5)).convert("CMYK").save(path, quality=95)
        with Image.open(path) as img:
            return path, np.asarray(img.convert("RGB"))
    if name == "exif-rotated.jpg":
        pixels = np.zeros((32, 64, 3), dtype=np.uint8)
        pixels[:, :32], pixels[:, 32:] = (255, 0, 0), (0, 0, 255)  # red left, blue right as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top
        Image.fromarray(pixels).save(path, exif=exif, quality=95)
        with Image.open(path) as img:
            upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert upright.shape == (64, 32, 3) and upright[:8].mean((0, 1))[0] > 200, "the reference is upright"
        return path, upright
    if name == "animated.gif":
        first = np.zeros((40, 48, 3), dtype=np.uint8)
        first[:, :24], first[:, 24:] = (255, 0, 0), (0, 0, 255)
        frames = [Image.fromarray(first), Image.fromarray(np.full((40, 48, 3), (0, 255, 0), dtype=np.uint8))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return path, first
    if name == "strip-1x20000.png":
        strip = np.repeat(np.linspace(0, 255, 20000).astype(np.uint8)[:, None, None], 3, axis=-1)  # 20000, 1, 3
        strip[:, :, 1] = 255 - strip[:, :, 1]
        Image.fromarray(strip).save(path)
        # Resize all of it as torchvision would (32 wide, 640,000 high), then take the centre.
        tall = Image.fromarray(strip).resize((32, 640_000), Image.Resampling.BICUBIC)
        return path, np.asarray(tall.crop((0, 320_000 - 16, 32, 320_000 + 16)))
    if name == "photo-8000x8000.jpg":
        reference = folder / "photo-reference.png"
        subprocess.run([sys.executable, "-c", HUGE_JPEG, str(path), str(reference)], check=True, timeout=240)
        with Image.open(reference) as img:
            return path, np.asarray(img.convert("RGB"))
    raise ValueError(name)


#: The issue's set of uploads: name -> (message of a refusal, or None for a result; tolerance of the result).
UPLOADS = {
    "empty.png": ("is empty (0 bytes)", 0),
    "text-named.png": ("is not an image", 0),
    "truncated.jpg": ("truncated or corrupt", 0),
    "drawing.svg": ("is an SVG", 0),
    "one-pixel.png": (None, 0),
    "sixteen-bit.png": (None, 1),
    "rgba.png": (None, 2),
    "la.png": (None, 2),
    "palette-transparent.png": (None, 0),
    "cmyk.jpg": (None, 1),
    "exif-rotated.jpg": (None, 1),
    "animated.gif": (None, 0),
    "strip-1x20000.png": (None, 2),
    "photo-8000x8000.jpg": (None, 6),  # decoded at 1/2 scale (JPEG draft), then reduced: close, not equal
    "bomb.png": ("megapixels", 0),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_bad_upload_gets_a_correct_result_or_a_clear_message_and_the_next_request_succeeds(
    client: Client, checkpoints: Path, photo: Path, tmp_path: Path, name: str
) -> None:
    message, tolerance = UPLOADS[name]
    path, expected = _make_upload(name, tmp_path)
    model = source(checkpoints, "learned")
    with sampled_rss_mb() as samples:
        if message is not None:
            with pytest.raises(AppError, match=re.escape(message)) as refused:
                client.predict(handle_file(path), model, None, api_name="/predict")
            assert "Please" in str(refused.value), "the message says what to do"
        else:
            seen = _seen_photo(client, path, model)
            reference = views.inspect_image(load(model), Image.fromarray(expected)).photo  # what it must see
            np.testing.assert_allclose(seen.astype(int), np.asarray(reference).astype(int), rtol=0, atol=tolerance)
    if name == "bomb.png":  # refused from the header: a decode would need 1,600 MB
        assert max(samples) - samples[0] < 150, f"memory rose by {max(samples) - samples[0]:.0f} MB"
    _assert_serves(client, checkpoints, photo)


# ------------------------------------------------------------------------------------------------ Hub faults


def _tiny_model(folder: Path, seed: int) -> Path:
    """A small posenc ViT with CIFAR-10 labels saved in Hub layout."""
    torch.manual_seed(seed)
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                       labels=CIFAR10_LABELS, preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0))
    build_model(config).save_pretrained(folder)
    return folder


def _cache_blobs_are_intact(hf_home: Path, repo_id: str) -> None:
    """Every finished download of ``repo_id`` in the Hub cache holds exactly the bytes its ETag names."""
    repo_cache = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for blob in (repo_cache / "blobs").glob("*"):
        if blob.suffix != ".incomplete":  # a partial download, resumed or restarted by the next one
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt cached blob {blob}"
    for link in (repo_cache / "snapshots").rglob("*"):
        if link.is_symlink():
            assert link.resolve().is_file(), f"dangling cached file {link}"


def test_app_finds_the_fake_hub_and_loads_a_repo_from_it(
    client: Client, hub: HubServer, tmp_path: Path, photo: Path
) -> None:
    folder = _tiny_model(tmp_path / "repo", seed=0)
    hub.add_repo("posenc-test/healthy", folder)
    got = _top5(client.predict(handle_file(photo), "posenc-test/healthy", None, api_name="/predict"))
    expected = load(str(folder)).predict(photo, top_k=5)
    assert list(got) == [p.label for p in expected]
    np.testing.assert_allclose(list(got.values()), [p.probability for p in expected], atol=1e-5)
    paths = [(r.method, r.path) for r in hub.requests]
    assert ("HEAD", "/api/models") in paths, "the app's probe asked the fake Hub"
    assert ("GET", "/posenc-test/healthy/resolve/main/model.safetensors") in paths, "the weights were downloaded"


def _wrong_config(hub: HubServer, repo_id: str, folder: Path) -> Callable[[], None]:
    """Make config.json disagree with the weights (7 classes, not 10); returns the heal."""
    good = (folder / "config.json").read_text()
    config = json.loads(good)
    config.update(num_classes=7, labels=None)
    (folder / "config.json").write_text(json.dumps(config))
    return lambda: (folder / "config.json").write_text(good)


def _fault(**fault: object) -> Callable[[HubServer, str, Path], Callable[[], None]]:
    def inject(hub: HubServer, repo_id: str, folder: Path) -> Callable[[], None]:
        hub.set_fault(repo_id, **fault)
        return lambda: hub.clear_fault(repo_id)

    return inject


#: fault -> (how to inject it, what the user is told)
HUB_FAULTS = {
    "repo-404": (_fault(kind="not_found"), "was not found on the Hub: check the repo id"),
    "gated-401": (_fault(kind="gated", status=401), "is a gated repo: accept its terms"),
    "server-500": (_fault(kind="server_error"), "the Hub answered HTTP 500"),
    "cut-mid-file": (_fault(kind="cut", filename="model.safetensors"), "interrupted or timed out"),
    "slower-than-timeout": (_fault(kind="slow", filename="model.safetensors", seconds=3, methods="GET"),
                            r"interrupted or timed out \(ReadTimeout\)"),
    "truncated-weights": (_fault(kind="truncate_file", filename="model.safetensors", nbytes=4000),
                          "corrupt or truncated"),
    "config-mismatch": (_wrong_config, r"head.weight \(10, 32\) in the checkpoint vs \(7, 32\) in the model"),
}


@pytest.mark.parametrize("fault", list(HUB_FAULTS))
def test_hub_fault_gives_a_clear_message_keeps_bundled_models_and_a_retry_succeeds_once_healed(
    client: Client, hub: HubServer, hf_home: Path, checkpoints: Path, photo: Path, tmp_path: Path, fault: str
) -> None:
    inject, message = HUB_FAULTS[fault]
    repo_id = f"posenc-test/{fault}"  # a repo of its own: a cached copy would hide the fault
    folder = _tiny_model(tmp_path / "repo", seed=len(fault))
    hub.add_repo(repo_id, folder)
    heal = inject(hub, repo_id, folder)
    with pytest.raises(AppError, match=message) as caught:
        client.predict(handle_file(photo), repo_id, None, api_name="/predict")
    assert repo_id in str(caught.value)
    _assert_serves(client, checkpoints, photo)
    _cache_blobs_are_intact(hf_home, repo_id)
    if fault == "truncated-weights":
        truncated = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "blobs" / hub.etag(
            repo_id, "model.safetensors")
        assert not truncated.exists(), "the truncated download was removed from the cache"

    heal()
    got = _top5(client.predict(handle_file(photo), repo_id, None, api_name="/predict"))
    expected = load(str(folder)).predict(photo, top_k=5)
    assert list(got) == [p.label for p in expected]
    np.testing.assert_allclose(list(got.values()), [p.probability for p in expected], atol=1e-5)
    _cache_blobs_are_intact(hf_home, repo_id)


#: config.json edits a hostile repo might serve -> what the user is told
HOSTILE_CONFIGS = {
    "embed-dim-65536": ({"embed_dim": 65536}, "is too large to serve"),
    "depth-100000": ({"depth": 100000}, "depth must be an integer from 1 to 65536, got 100000"),
    "patch-size-0": ({"patch_size": 0}, "patch_size must be an integer from 1 to 65536, got 0"),
    "img-size-negative": ({"img_size": [-32, -32]}, "img_size[0] must be an integer from 1 to 65536, got -32"),
    "mlp-ratio-1e6": ({"mlp_ratio": 1e6}, "is too large to serve"),
}


@pytest.mark.parametrize("edit", list(HOSTILE_CONFIGS))
def test_hostile_config_gets_one_clear_message_then_bundled_models_serve_and_memory_comes_back(
    client: Client, hub: HubServer, checkpoints: Path, photo: Path, tmp_path: Path, edit: str
) -> None:
    changes, message = HOSTILE_CONFIGS[edit]
    repo_id = f"posenc-test/hostile-{edit}"
    folder = _tiny_model(tmp_path / "repo", seed=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    hub.add_repo(repo_id, folder)
    _assert_serves(client, checkpoints, photo)
    before = rss_mb()
    with sampled_rss_mb() as samples, pytest.raises(AppError) as caught:
        client.predict(handle_file(photo), repo_id, None, api_name="/predict")
    assert message in str(caught.value) and repo_id in str(caught.value)
    assert max(samples) - before < 100, f"resident memory rose by {max(samples) - before:.0f} MB"
    _assert_serves(client, checkpoints, photo)
    assert rss_mb() - before < 30, "resident memory is back near where it was"


@pytest.mark.parametrize("still_reachable", [True, False])
def test_failed_download_probes_the_hub_again_and_downloads_stop_only_when_it_is_down(
    checkpoints: Path, photo: Path, still_reachable: bool
) -> None:
    answers = [True, still_reachable]  # reachable at start-up; then, after the failure, up or down
    status = HubStatus(lambda: answers.pop(0))
    status.start()
    assert status.online(wait=10) is True

    def failing(source: str):
        raise HubLoadError(f"the download of model.safetensors from {source} was interrupted", source=source,
                           reason="network")

    handlers = Handlers(cache=ModelCache(failing), catalog=Catalog.build(checkpoints, (), []), hub=status)
    with pytest.raises(gr.Error, match="was interrupted"):
        handlers.api.predict({"path": str(photo)}, "someone/model", progress=lambda *a, **k: None)
    assert answers == [], "the Hub was probed again"
    assert status.online() is still_reachable


# ------------------------------------------------------------------------------------------------ full queue


def _wait_for(job, codes: tuple[Status, ...], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while job.status().code not in codes:
        assert time.monotonic() < deadline, f"job still {job.status().code}, expected one of {codes}"
        time.sleep(0.05)


def test_full_queue_answers_busy_at_once_and_the_app_serves_again_once_drained(
    checkpoints: Path, photo: Path, tmp_path: Path
) -> None:
    """One request runs (its model load waits on an event) and two wait; with max_size=2 a fourth is refused."""
    release = threading.Event()

    def waiting_loader(source: str):
        release.wait(120)
        return load(source)

    demo = create_demo(checkpoints_dir=checkpoints, loader=waiting_loader, hub_probe=lambda: False)
    url = _launch(demo, default_concurrency_limit=1, max_size=2)
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path))
        args = (handle_file(photo), source(checkpoints, "rope"), None)
        running = client.submit(*args, api_name="/predict")
        _wait_for(running, (Status.PROCESSING, Status.PROGRESS))
        waiting = [client.submit(*args, api_name="/predict") for _ in range(2)]
        for job in waiting:
            _wait_for(job, (Status.IN_QUEUE,))
        started = time.monotonic()
        with pytest.raises(QueueError, match="Queue is full! Please try again"):
            client.predict(*args, api_name="/predict")
        assert time.monotonic() - started < 15, "the refusal comes at once, not after the queue drains"
        release.set()
        for job in (running, *waiting):
            assert len(job.result(timeout=120)["confidences"]) == 5
        assert len(client.predict(*args, api_name="/predict")["confidences"]) == 5
    finally:
        release.set()
        demo.close()


CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"  # ignored by git; for a person to look at


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent; install it with apt-get install -y chromium")
def test_full_queue_shows_busy_in_the_browser(checkpoints: Path, photo: Path, tmp_path: Path) -> None:
    """A page opened while the queue is full tells the visitor the app is busy (its first run is refused)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    release = threading.Event()

    def waiting_loader(source: str):
        release.wait(120)
        return load(source)

    demo = create_demo(checkpoints_dir=checkpoints, loader=waiting_loader, hub_probe=lambda: False,
                       examples_dir=EXAMPLES)
    url = _launch(demo, default_concurrency_limit=1, max_size=1)
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path))
        args = (handle_file(photo), source(checkpoints, "rope"), None)
        jobs = [client.submit(*args, api_name="/predict")]
        _wait_for(jobs[0], (Status.PROCESSING, Status.PROGRESS))
        jobs.append(client.submit(*args, api_name="/predict"))
        _wait_for(jobs[1], (Status.IN_QUEUE,))
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.set_default_timeout(120_000)
                page.goto(url)
                page.get_by_text("This application is currently busy. Please try again.").first.wait_for()
                SHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SHOTS / "queue_full.png"))
            finally:
                browser.close()
        release.set()
        for job in jobs:
            assert len(job.result(timeout=120)["confidences"]) == 5
    finally:
        release.set()
        demo.close()


# ------------------------------------------------------------------------------------------------ load and memory

#: CI counts; ``python -m bench.reliability`` runs the issue's 200 load requests and 1,000 memory requests.
LOAD_REQUESTS, LOAD_DISTINCT, LOAD_CLIENTS = 48, 16, 8
MEMORY_REQUESTS, MEMORY_WARMUP, CACHE_SIZE = 240, 60, 3


@pytest.fixture(scope="module")
def app_process(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python app.py`` in a subprocess (offline), its cache holding three of the six bundled models."""
    app = start_app(checkpoints, cache_size=CACHE_SIZE, work_dir=tmp_path_factory.mktemp("app"))
    yield app
    app.close()


@pytest.mark.slow
def test_concurrent_clients_get_no_errors_and_the_same_answers_as_alone(
    app_process, checkpoints: Path, tmp_path: Path
) -> None:
    """8 clients, 48 requests over 16 distinct ones (CI counts; the script runs 200 over 40)."""
    sources = {f: source(checkpoints, f) for f in PRESETS}
    requests = request_mix(sample_images(tmp_path / "images"), sources, LOAD_DISTINCT)
    assert len({r.endpoint for r in requests}) == 5 and len(set(requests)) == LOAD_DISTINCT
    result = run_load(app_process.url, requests, total=LOAD_REQUESTS, clients=LOAD_CLIENTS,
                      download_dir=tmp_path / "downloads")
    assert result["errors"] == 0, result["first_errors"]
    assert result["completed"] == LOAD_REQUESTS
    assert result["mismatches"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"]


@pytest.mark.slow
def test_memory_stays_flat_and_the_cache_evicts_least_recently_used(
    app_process, checkpoints: Path, tmp_path: Path
) -> None:
    """240 requests over 6 models with a cache of 3 (CI count; the script runs 1,000)."""
    sources = [source(checkpoints, f) for f in PRESETS]
    result = run_memory(app_process, sources, sample_images(tmp_path / "images"), total=MEMORY_REQUESTS,
                        cache_size=CACHE_SIZE, warmup=MEMORY_WARMUP, download_dir=tmp_path / "downloads")
    assert result["errors"] == 0, result["first_errors"]
    assert result["eviction_order_differs_from_fifo"], "the request pattern tells LRU from FIFO"
    assert result["evictions_after_first_cycle"] > 20
    assert result["eviction_order_is_lru"]
    assert result["rss_growth_pct"] < 10.0, result["rss_samples_mb"]
