"""The Gradio app end to end: launched in-process on 127.0.0.1 and driven through gradio_client.

Models: the bundled CIFAR-10 checkpoints when ``checkpoints/`` has them, else random-weight stand-ins of the
same presets written to a temporary folder; the real DeiT-Tiny folder from ``../shared/data`` when present.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import sampled_rss_mb
from posenc import views
from posenc.encodings import window_partition
from posenc.hub import load
from posenc.labels import CIFAR10_LABELS
from posenc.mechanisms import MECHANISMS
from posenc.models import build_model
from posenc.registry import HUB_MODELS
from posenc.train import cifar_model
from posenc.app import (
    EXPORT_MAX_FOLDERS,
    KIND_TITLES,
    QUEUE_OPTIONS,
    Catalog,
    Handlers,
    HubStatus,
    ModelCache,
    create_demo,
    launch_options,
)

ROOT = Path(__file__).resolve().parents[1]
DEIT = ROOT.parent / "shared" / "data" / "deit_tiny_patch16_224.fb_in1k"
EXAMPLES = ROOT / "assets" / "examples"
FAMILIES = ("none", "learned", "sincos", "relative", "windowed", "rope")

pytestmark = [
    pytest.mark.timeout(300),
    # gradio 6.31's queue calls pandas options that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _noise(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A random RGB image (w, h) = size, converted to ``mode``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled checkpoints, or random-weight stand-ins of the same presets when they are absent."""
    bundled = ROOT / "checkpoints"
    if all((bundled / f"cifar10-{f}" / "model.safetensors").is_file() for f in FAMILIES):
        return bundled
    root = tmp_path_factory.mktemp("checkpoints")
    for seed, family in enumerate(FAMILIES):
        torch.manual_seed(seed)
        folder = root / f"cifar10-{family}"
        build_model(cifar_model(family)).save_pretrained(folder)
        (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.1, "dataset": "cifar10-jpeg.zip"}))
    return root


@pytest.fixture(scope="module")
def server(checkpoints: Path) -> str:
    """The app on a free port of 127.0.0.1, closed after the module."""
    demo = create_demo(
        checkpoints_dir=checkpoints,
        registry=HUB_MODELS,
        cache_size=4,
        examples_dir=EXAMPLES,
        extra_models=[DEIT] if DEIT.is_dir() else [],
        hub_probe=lambda: False,
    )
    port = _free_port()
    demo.queue(**QUEUE_OPTIONS).launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options(EXAMPLES)
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server: str, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(_noise(0, (64, 48)), tmp_path_factory.mktemp("img") / "photo.png")


def source(checkpoints: Path, family: str) -> str:
    return str(checkpoints / f"cifar10-{family}")


def deit() -> str:
    if not DEIT.is_dir():
        pytest.skip(f"real DeiT-Tiny weights {DEIT} are absent (they are present in CI)")
    return str(DEIT)


def _confidences(result: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in result["confidences"]}


def _png(path: str) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------------------------------ prediction


def test_predict_matches_the_model_run_in_process(client: Client, checkpoints: Path, photo: Path) -> None:
    result = client.predict(handle_file(photo), source(checkpoints, "learned"), None, api_name="/predict")
    got = _confidences(result)
    expected = load(source(checkpoints, "learned")).predict(photo, top_k=5)
    assert list(got) == [p.label for p in expected]
    assert set(got) <= set(CIFAR10_LABELS)
    np.testing.assert_allclose(list(got.values()), [p.probability for p in expected], atol=1e-5)


def test_deit_folder_predicts_like_the_library(client: Client) -> None:
    folder = deit()
    image = EXAMPLES / "grace_hopper.jpg"
    got = _confidences(client.predict(handle_file(image), folder, None, api_name="/predict"))
    expected = load(folder).predict(image, top_k=5)
    assert list(got) == [p.label for p in expected]
    np.testing.assert_allclose(list(got.values()), [p.probability for p in expected], atol=1e-4)


# ------------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize(
    ("endpoint", "family", "args"),
    [
        ("/rope", "learned", (None, 0, 0)),
        ("/relative_bias", "rope", (None, 0, 0, 0)),
        ("/position_embedding", "windowed", (None, 0, 0)),
        ("/position_embedding", "none", (None, 0, 0)),
    ],
)
def test_views_refuse_models_without_that_encoding(
    client: Client, checkpoints: Path, photo: Path, endpoint: str, family: str, args: tuple
) -> None:
    with pytest.raises(AppError, match="has no (rotary|relative position|absolute position) mechanism; its "
                       "mechanisms: ") as refused:
        client.predict(handle_file(photo), source(checkpoints, family), *args, api_name=endpoint)
    message = str(refused.value).replace(f"cifar10-{family}", "")
    for mechanism in MECHANISMS.values():  # the titles may be named; the internal names and old families not
        message = message.replace(mechanism.title, "")
    assert not re.search(rf"\b({'|'.join(MECHANISMS)}|windowed|BEiT|Swin)\b", message), message


def _analyse(client: Client, image: Path, model: str, size: str | None, block: int, row: int, col: int) -> dict:
    result = client.predict(handle_file(image), model, size, block, row, col, api_name="/analyse")
    with np.load(result[-2]) as npz:  # the .npz and the summary are always the last two outputs
        return {k: npz[k] for k in npz.files} | {"summary": result[-1]}


def _inspect(model: str, image: Path, size: tuple[int, int] | None = None):
    loaded = load(model)
    with torch.inference_mode():
        return loaded.model.inspect(loaded.pixels(image, size))


def test_analyse_exports_the_resampled_embedding(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "learned")
    got = _analyse(client, photo, model, "48x48", 0, 11, 3)
    seen = _inspect(model, photo, (48, 48))
    assert tuple(got["grid"]) == (12, 12) and tuple(got["patch"]) == (11, 3)
    expected = seen.pos_embed[0, seen.pos_embed_prefix :]  # 144, C
    torch.testing.assert_close(torch.from_numpy(got["pos_embed"]), expected.float())
    sims = torch.nn.functional.normalize(expected, dim=-1) @ torch.nn.functional.normalize(expected[11 * 12 + 3], dim=0)
    got_sims = torch.from_numpy(got["pos_similarity_to_patch"])
    torch.testing.assert_close(got_sims, sims.reshape(12, 12), rtol=0, atol=1e-5)


def test_analyse_exports_beit_query_bias_and_attention(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "relative")
    got = _analyse(client, photo, model, None, 3, 2, 5)
    trace = _inspect(model, photo).blocks[3]
    q = 1 + 2 * 8 + 5  # cls token first
    torch.testing.assert_close(torch.from_numpy(got["query_bias"]), trace.pos_bias[:, q, 1:].reshape(-1, 8, 8))
    torch.testing.assert_close(torch.from_numpy(got["query_bias_to_prefix"]), trace.pos_bias[:, q, :1])
    torch.testing.assert_close(torch.from_numpy(got["attention"]), trace.attn[0, :, q, 1:].reshape(-1, 8, 8))
    no_pos = trace.attn_no_pos[0, :, q, 1:].reshape(-1, 8, 8)  # heads, 8, 8
    torch.testing.assert_close(torch.from_numpy(got["attention_no_pos"]), no_pos)


def test_analyse_exports_swin_shifted_window_keys(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "windowed")
    got = _analyse(client, photo, model, None, 1, 7, 0)  # block 1: shifted by 2, patch at the wrap-around corner
    trace = _inspect(model, photo).blocks[1]
    (gh, gw), (sh, sw) = trace.grid, trace.shift
    assert any(trace.shift)
    ids = torch.roll(torch.arange(gh * gw).reshape(gh, gw), shifts=(-sh, -sw), dims=(0, 1))  # token id per shifted cell
    windows = window_partition(ids[None, :, :, None], trace.window)[0, :, :, 0]  # nW, Wh*Ww
    w, qi = (windows == 7 * gw + 0).nonzero()[0].tolist()
    expected_bias = torch.full((trace.pos_bias.shape[0], gh, gw), float("nan"))
    expected_attn = expected_bias.clone()
    for k, token in enumerate(windows[w].tolist()):
        if trace.mask[w, qi, k] == 0:
            expected_bias[:, token // gw, token % gw] = trace.pos_bias[:, qi, k]
            expected_attn[:, token // gw, token % gw] = trace.attn[0, w, :, qi, k]
    masked = int((trace.mask[w, qi] != 0).sum())
    assert 0 < masked < trace.mask.shape[-1]  # the corner's window mixes regions
    torch.testing.assert_close(torch.from_numpy(got["query_bias"]), expected_bias, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(got["attention"]), expected_attn, equal_nan=True)


def test_analyse_maps_the_patch_onto_a_later_swin_stage(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "windowed")
    got = _analyse(client, photo, model, "64x64", 3, 13, 6)  # stage 1 of the 16x16 input grid is 8x8
    assert tuple(got["grid"]) == (16, 16)
    assert tuple(got["block_grid"]) == (8, 8) and tuple(got["block_patch"]) == (6, 3)
    assert np.isfinite(got["query_bias"][0, 6, 3])


def test_analyse_exports_rope_similarity(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "rope")
    got = _analyse(client, photo, model, "40x40", 0, 9, 2)
    angles = _inspect(model, photo, (40, 40)).rope_angles  # 100, hd/2
    expected = torch.cos(angles[9 * 10 + 2] - angles).mean(-1).reshape(10, 10)
    torch.testing.assert_close(torch.from_numpy(got["rope_similarity"]), expected, rtol=0, atol=1e-5)
    assert "patch **(9, 2)**" in got["summary"]


def test_compare_maps_the_patch_to_the_second_models_grid(client: Client, checkpoints: Path, photo: Path) -> None:
    model_b, patch_b, last_b = (DEIT, "patch (4, 9) of 14x14", "block 11 of 12") if DEIT.is_dir() else (
        checkpoints / "cifar10-windowed", "patch (2, 5) of 8x8", "block 6 of 7")
    result = client.predict(handle_file(photo), source(checkpoints, "learned"), str(model_b), "last", 2, 5,
                            api_name="/compare")
    picker, label_a, position_a, attention_a, label_b, position_b, attention_b, summary = result
    assert len(label_a["confidences"]) == 5 and len(label_b["confidences"]) == 5
    for path in (picker, position_a, attention_a, position_b, attention_b):
        _png(path)
    line_a, line_b = summary.split("  \n")
    assert "patch (2, 5) of 8x8" in line_a and "block 5 of 6" in line_a
    assert patch_b in line_b and last_b in line_b


def test_every_size_that_works_is_accepted_and_others_refused_with_the_rule(
    client: Client, checkpoints: Path, photo: Path
) -> None:
    windowed, learned = source(checkpoints, "windowed"), source(checkpoints, "learned")
    assert len(client.predict(handle_file(photo), windowed, "64x96", api_name="/predict")["confidences"]) == 5
    got = _analyse(client, photo, learned, "100x44", 0, 24, 10)  # not in the offered list, but a multiple of 4
    assert tuple(got["grid"]) == (25, 11) and tuple(got["patch"]) == (24, 10)
    with pytest.raises(AppError, match="48x48 does not fit this model: it needs a height that is a multiple of 32"):
        client.predict(handle_file(photo), windowed, "48x48", api_name="/predict")
    with pytest.raises(AppError, match="at most 4 times the native 32x32"):
        client.predict(handle_file(photo), learned, "132x32", api_name="/predict")
    with pytest.raises(AppError, match="not a size"):
        client.predict(handle_file(photo), windowed, "big", api_name="/predict")
    with pytest.raises(AppError, match="outside the 8x8 patch grid"):
        client.predict(handle_file(photo), windowed, None, 0, 8, 0, api_name="/attention")


@pytest.mark.parametrize(("block", "expected"), [(99, 5), (-3, 0), (2, 2)])
def test_explore_and_compare_clamp_a_block_out_of_range_alike(
    client: Client, checkpoints: Path, photo: Path, block: int, expected: int
) -> None:
    model = source(checkpoints, "learned")
    got = _analyse(client, photo, model, None, block, 1, 1)
    assert int(got["block"]) == expected and f"block {expected} of 6" in got["summary"]
    alone = _png(client.predict(handle_file(photo), model, None, block, 1, 1, api_name="/attention"))
    clamped = _png(client.predict(handle_file(photo), model, None, expected, 1, 1, api_name="/attention"))
    np.testing.assert_array_equal(alone, clamped)
    summary = client.predict(handle_file(photo), model, model, block, 1, 1, api_name="/compare")[-1]
    assert summary.count(f"block {expected} of 6") == 2
    with pytest.raises(AppError, match="not a whole number"):
        client.predict(handle_file(photo), model, None, 1.5, 1, 1, api_name="/attention")


# ------------------------------------------------------------------------------------------------ bad inputs


def _cmyk_jpeg(path: Path) -> Path:
    return _save(_noise(3).convert("CMYK"), path, format="JPEG")


def _sixteen_bit(path: Path) -> Path:
    ramp = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    return _save(img, path)


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    _noise(4, (96, 96)).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


BAD_INPUTS = {
    "text_renamed.png": (lambda p: (p.write_text("this is not an image\n"), p)[1], "is not an image"),
    "truncated.jpg": (_truncated_jpeg, "truncated or corrupt"),
    "one_pixel.png": (lambda p: _save(Image.new("RGB", (1, 1), (200, 30, 30)), p), None),
    "sixteen_bit.png": (_sixteen_bit, None),
    "rgba.png": (lambda p: _save(_noise(5, mode="RGBA"), p), None),
    "grey.png": (lambda p: _save(_noise(6, mode="L"), p), None),
    "palette.png": (lambda p: _save(_noise(7, mode="P"), p), None),
    "cmyk.jpg": (_cmyk_jpeg, None),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_unusual_uploads_get_a_result_or_a_clear_error(
    client: Client, checkpoints: Path, tmp_path: Path, name: str
) -> None:
    make, error = BAD_INPUTS[name]
    path = make(tmp_path / name)
    if error is None:
        result = client.predict(handle_file(path), source(checkpoints, "sincos"), None, api_name="/predict")
        assert len(result["confidences"]) == 5
    else:
        with pytest.raises(AppError, match=error):
            client.predict(handle_file(path), source(checkpoints, "sincos"), None, api_name="/predict")


def test_exif_orientation_is_applied(client: Client, checkpoints: Path, tmp_path: Path) -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=95)
    got = _analyse(client, path, source(checkpoints, "learned"), None, 0, 0, 0)
    top, bottom = got["photo"][:6].reshape(-1, 3).mean(0), got["photo"][-6:].reshape(-1, 3).mean(0)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


HUGE_PNG = """
import sys
import numpy as np
from PIL import Image
ramp = np.linspace(0, 255, 8000, dtype=np.float32).astype(np.uint8)
rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], np.uint8(90)), axis=-1)
Image.fromarray(np.ascontiguousarray(rgb)).save(sys.argv[1], compress_level=1)
"""


def test_huge_image_is_handled_with_bounded_memory(client: Client, checkpoints: Path, tmp_path: Path) -> None:
    path = tmp_path / "huge.png"  # 8000x8000 RGB, drawn in a subprocess so this process never holds it
    subprocess.run([sys.executable, "-c", HUGE_PNG, str(path)], check=True, timeout=120)
    assert path.stat().st_size < 20e6
    with sampled_rss_mb() as samples:
        result = client.predict(handle_file(path), source(checkpoints, "learned"), None, api_name="/predict")
    assert len(result["confidences"]) == 5
    assert max(samples) - samples[0] < 1000  # decoded once (192 MB of RGB) and reduced, not copied over and over


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nobody-posenc/no-such-model", "no-such-model"),
        ("/etc", "not a model this app may load"),
        ("../checkpoints", "not a model this app may load"),
        ("", "Pick a model"),
    ],
)
def test_unknown_or_unsafe_models_are_refused(client: Client, photo: Path, model: str, message: str) -> None:
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(photo), model, None, api_name="/predict")


def test_app_keeps_serving_after_errors(client: Client, checkpoints: Path, photo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(AppError):
        client.predict(handle_file(bad), source(checkpoints, "learned"), None, api_name="/predict")
    assert len(client.predict(handle_file(photo), source(checkpoints, "learned"), None,
                              api_name="/predict")["confidences"]) == 5


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_each_get_their_own_result(client: Client, checkpoints: Path, tmp_path: Path) -> None:
    requests = []
    for i in range(8):
        image = _save(_noise(100 + i, (40 + 8 * i, 48)), tmp_path / f"img{i}.png")
        family = ("learned", "windowed", "rope", "relative")[i % 4]
        requests.append((handle_file(image), source(checkpoints, family), None, i % 2, i % 8, (3 * i) % 8))
    one_by_one = [_png(client.predict(*r, api_name="/attention")) for r in requests]
    assert all(not np.array_equal(one_by_one[i], one_by_one[j]) for i in range(8) for j in range(i))
    jobs = [client.submit(*r, api_name="/attention") for r in requests]
    together = [_png(job.result(timeout=240)) for job in jobs]
    for alone, concurrent in zip(one_by_one, together):
        np.testing.assert_array_equal(alone, concurrent)


def test_model_cache_is_a_bounded_lru_that_loads_each_model_once() -> None:
    calls: list[str] = []
    lock = threading.Lock()

    def loader(source: str) -> str:
        time.sleep(0.05)
        with lock:
            calls.append(source)
        return f"model:{source}"

    cache = ModelCache(loader, size=2)
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: cache.get("a"), range(8))) == {"model:a"}
    assert calls == ["a"]
    cache.get("b")
    cache.get("a")  # a becomes the most recent
    cache.get("c")  # drops b
    assert cache.sources() == ["a", "c"]
    cache.get("b")
    assert calls == ["a", "b", "c", "b"]
    with pytest.raises(ValueError, match="at least one"):
        ModelCache(loader, size=0)


# ------------------------------------------------------------------------------------------------ offline start-up


def test_banner_says_hub_models_are_unavailable_when_offline(checkpoints: Path) -> None:
    catalog = Catalog.build(checkpoints, HUB_MODELS, [])
    offline = HubStatus(lambda: False)
    offline.start()
    banner = Handlers(cache=ModelCache(load), catalog=catalog, hub=offline).explore.banner()
    assert banner.visible is True and "Hub models are unavailable" in banner.value
    online = HubStatus(lambda: True)
    online.start()
    assert Handlers(cache=ModelCache(load), catalog=catalog, hub=online).explore.banner().visible is False


def test_slow_hub_probe_does_not_delay_start_up(checkpoints: Path) -> None:
    started = time.perf_counter()
    demo = create_demo(checkpoints_dir=checkpoints, registry=HUB_MODELS, hub_probe=lambda: time.sleep(30) or True)
    assert time.perf_counter() - started < 15
    assert demo is not None


def test_app_script_honours_gradio_env_and_serves_offline(checkpoints: Path, tmp_path: Path) -> None:
    port = _free_port()
    host = "127.0.0.2"  # a loopback address other than Gradio's default, so the test sees the variable work
    env = {**os.environ, "GRADIO_SERVER_NAME": host, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "POSENC_CHECKPOINTS": str(checkpoints), "HF_HOME": str(tmp_path / "hf"), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py did not serve on port {port}: {proc.stdout.read().decode()[-2000:]}")
                time.sleep(0.5)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)  # not bound to the default address
        remote = Client(f"http://{host}:{port}/", verbose=False, download_files=str(tmp_path))
        result = remote.predict(handle_file(EXAMPLES / "red_car.png"), source(checkpoints, "rope"), None,
                                api_name="/predict")
        assert len(result["confidences"]) == 5
        with pytest.raises(AppError, match="is not stored on this server and the Hugging Face Hub cannot be reached"):
            remote.predict(handle_file(EXAMPLES / "red_car.png"), "timm/deit_tiny_patch16_224.fb_in1k", None,
                           api_name="/predict")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ names, paths, state


def _no_progress(*args: object, **kwargs: object) -> None:
    return None


@pytest.fixture()
def handlers(checkpoints: Path) -> Handlers:
    catalog = Catalog.build(checkpoints, HUB_MODELS, [])
    status = HubStatus(lambda: False)
    status.start()
    return Handlers(cache=ModelCache(load), catalog=catalog, hub=status, examples=[str(EXAMPLES / "red_car.png")])


def _explore(h: Handlers, shown: dict | None, model: str, size=None, block=0, row=None, col=None) -> dict:
    return h.explore.run({"path": str(EXAMPLES / "red_car.png")}, model, size, block, row, col, shown,
                     progress=_no_progress)


def test_one_path_syncs_the_controls_and_a_refusal_puts_them_back(handlers: Handlers) -> None:
    first = _explore(handlers, None, "cifar10-learned")
    shown = first["shown"]
    assert shown["model"] == "cifar10-learned" and shown["patch"] == [4, 4] and first["row"] == 4
    assert first["status"].visible is False and first["picker"] and first["view:learned/pca"]
    # a new model: its size list and block range, the patch at the same place of its grid, views drawn
    native = _explore(handlers, shown, "cifar10-rope", size="48x48", block=5, row=4, col=4)
    assert native["size"].value == "32x32" and native["shown"]["patch"] == [4, 4]  # a new model: its native size
    rope = _explore(handlers, native["shown"], "cifar10-rope", size="48x48", block=5, row=4, col=4)
    assert rope["model"].value == "cifar10-rope" and rope["size"].value == "48x48" and rope["row"] == 6
    assert rope["block"].maximum == 5 and rope["block"].value == 5
    assert rope["group:rope_axial"].visible and not rope["group:learned"].visible
    assert rope["view:rope_axial/rope"] and rope["view:learned/similarity_grid"] is None
    assert rope["note:absolute"].visible and "no absolute position mechanism" in rope["note:absolute"].value
    # an unknown name, a bad size, a patch off the grid: one message, controls back, pictures kept
    for model, size, row, message in [("nonsense-model", "48x48", 6, "'nonsense-model' is not a model this app"),
                                      ("cifar10-rope", "50x50", 6, "50x50 does not fit this model"),
                                      ("cifar10-rope", "48x48", 12, "lies outside the 12x12 patch grid")]:
        refused = _explore(handlers, rope["shown"], model, size=size, block=5, row=row, col=6)
        assert set(refused) == {"status", "summary", "model", "size", "block", "row", "col"}
        assert refused["status"].visible and message in refused["status"].value
        assert "previous request" in refused["status"].value and refused["summary"].startswith("*Previous request:*")
        assert (refused["model"].value, refused["size"].value, refused["row"]) == ("cifar10-rope", "48x48", 6)
    # the same request again (a slider release after its input event) runs nothing
    again = _explore(handlers, rope["shown"], "cifar10-rope", size="48x48", block=5, row=6, col=6)
    assert again == {}
    # a block past the end is clamped to what the slider shows
    clamped = _explore(handlers, rope["shown"], "cifar10-rope", size="48x48", block=40, row=5, col=6)
    assert clamped["block"].value == 5 and clamped["shown"]["block"] == 5 and clamped["shown"]["patch"] == [5, 6]
    typed = _explore(handlers, clamped["shown"], "cifar10-rope", size="48x48", block=40, row=5, col=6)
    assert set(typed) == {"block"} and typed["block"].value == 5  # nothing runs; the box shows the block again


def test_a_bundled_model_through_the_repo_field_is_the_bundled_model(
    handlers: Handlers, checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the README's relative spelling works from any working directory
    shown = None
    for text in ["cifar10-sincos", f"{checkpoints.name}/cifar10-sincos", str(checkpoints / "cifar10-sincos"),
                 str(checkpoints / "cifar10-sincos") + "/"]:
        result = handlers.explore.run_repo(text, {"path": str(EXAMPLES / "red_car.png")}, None, 0, None, None, shown,
                                       progress=_no_progress)
        assert result["model"].value == "cifar10-sincos", text
        assert "**cifar10-sincos** (bundled)" in result["info"]
        shown = None
    assert handlers.cache.sources() == ["cifar10-sincos"]


def test_offline_the_list_marks_uncached_hub_models_unavailable(handlers: Handlers) -> None:
    banner, model, *_ = handlers.explore.first_visit()
    assert banner.visible and "Hub models are unavailable" in banner.value
    labels = dict((value, label) for label, value in model.choices)
    for entry in HUB_MODELS:
        assert labels[entry.source].endswith("Hub: unavailable offline")
    assert labels["cifar10-rope"].endswith("bundled") and "unavailable" not in labels["cifar10-rope"]
    message = _explore(handlers, None, HUB_MODELS[0].source)["status"].value
    assert "cannot be reached" in message and "local_files_only" not in message


def test_headless_model_says_no_classifier(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "headless"
    build_model(dataclasses.replace(cifar_model("rope"), num_classes=0, labels=None)).save_pretrained(folder)
    status = HubStatus(lambda: False)
    h = Handlers(cache=ModelCache(load), catalog=Catalog.build(folder.parent, (), []), hub=status)
    image = {"path": str(EXAMPLES / "red_car.png")}
    assert h.api.predict(image, "headless", progress=_no_progress) == views.NO_CLASSIFIER
    result = _explore(h, None, "headless")
    assert result["label"] == views.NO_CLASSIFIER and result["view:rope_axial/rope"] and result["attention"]
    assert "no classifier" in result["info"]


def test_download_folders_are_bounded_and_removed(handlers: Handlers) -> None:
    shown = None
    for block in range(3):
        shown = _explore(handlers, shown, "cifar10-none", block=block)["shown"]
    root = handlers.files.root
    assert root is not None and len(list(root.iterdir())) == 3
    seen = views.inspect_image(load(str(handlers.catalog.checkpoints_dir / "cifar10-none")), EXAMPLES / "red_car.png")
    for _ in range(EXPORT_MAX_FOLDERS + 10):
        handlers.files.downloads(seen, (0, 0), 0)
    assert len(list(root.iterdir())) == EXPORT_MAX_FOLDERS
    handlers.close()
    assert not root.exists()


def test_launch_serves_the_example_images_only() -> None:
    allowed = launch_options(EXAMPLES)["allowed_paths"]
    assert allowed and all(Path(p).suffix in (".png", ".jpg") and Path(p).parent == EXAMPLES for p in allowed)
    assert str(EXAMPLES / "make_examples.py") not in allowed and str(EXAMPLES) not in allowed


def test_view_tabs_are_generated_from_the_mechanism_registry(checkpoints: Path) -> None:
    demo = create_demo(checkpoints_dir=checkpoints, hub_probe=lambda: False)
    ids = {block.elem_id for block in demo.blocks.values()}
    tabs = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    for mechanism in MECHANISMS.values():
        assert f"group-{mechanism.name}" in ids
        assert {f"view-{mechanism.name}-{spec.key}" for spec in mechanism.views} <= ids
        assert KIND_TITLES[mechanism.kind] in tabs
    endpoint = next(d for d in demo.config["dependencies"] if d["api_name"] == "view")
    view_input = demo.blocks[endpoint["inputs"][-1]]
    assert {value for _, value in view_input.choices} == {
        f"{m.name}/{s.key}" for m in MECHANISMS.values() for s in m.views}


# ------------------------------------------------------------------------------------------------ another directory


@pytest.fixture(scope="module")
def elsewhere(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python /abs/app.py`` started from an unrelated working directory, with an extra local model folder."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    extra = cwd / "models" / "my-rope"
    shutil.copytree(checkpoints / "cifar10-rope", extra)
    port = _free_port()
    (cwd / "tmp").mkdir()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "POSENC_MODELS": str(extra),
           "POSENC_CHECKPOINTS": str(checkpoints), "HF_HOME": str(cwd / "hf"), "GRADIO_ANALYTICS_ENABLED": "False",
           "TMPDIR": str(cwd / "tmp")}
    env.pop("GRADIO_SERVER_NAME", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py did not serve: {proc.stdout.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url, cwd, extra
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not list((cwd / "tmp").glob("posenc-app-*")), "the app left its download folder behind"


SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:tmp|home|root|work|usr|var|opt|srv|mnt|private|Users)/")


def test_no_server_path_in_config_or_api_schema(elsewhere, checkpoints: Path) -> None:
    url, cwd, extra = elsewhere
    config = urllib.request.urlopen(url + "config").read().decode()
    schema = json.dumps(Client(url, verbose=False).view_api(return_format="dict", print_info=False))
    for text in (config, schema):
        for path in (str(ROOT), str(checkpoints), str(cwd), str(EXAMPLES), tempfile.gettempdir() + "/"):
            assert path not in text
        assert not SERVER_PATH.search(text), SERVER_PATH.search(text)
    assert '"cifar10-rope"' in config and '"my-rope"' in config  # public names
    assert "multiples of the model's patch" in schema  # the size rule is documented for API users


def test_public_names_everywhere_from_another_directory(elsewhere, tmp_path: Path) -> None:
    url, cwd, extra = elsewhere
    remote = Client(url, verbose=False, download_files=str(tmp_path))
    image = handle_file(EXAMPLES / "red_car.png")
    by_name = _confidences(remote.predict(image, "cifar10-rope", None, api_name="/predict"))
    by_readme_path = _confidences(remote.predict(image, "checkpoints/cifar10-rope", None, api_name="/predict"))
    assert by_name == by_readme_path
    for model, public in [("cifar10-rope", "cifar10-rope"), ("my-rope", "my-rope"), (str(extra), "my-rope")]:
        result = remote.predict(image, model, None, 0, 1, 1, api_name="/analyse")
        with np.load(result[-2]) as npz:
            assert str(npz["source"]) == public
        assert result[-1].startswith(f"**{public}**")
    assert len(list((cwd / "tmp").glob("posenc-app-*"))) == 1  # the downloads' folder, removed on exit
    with pytest.raises(AppError, match="cannot be reached") as refused:
        remote.predict(image, "timm/deit_tiny_patch16_224.fb_in1k", None, api_name="/predict")
    assert "local_files_only" not in str(refused.value)


def test_cli_predicts_with_a_public_name_from_another_directory(checkpoints: Path, tmp_path: Path) -> None:
    env = {**os.environ, "POSENC_CHECKPOINTS": str(checkpoints), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "posenc", "predict", "--model", "cifar10-rope", "--json",
                          str(EXAMPLES / "red_car.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    expected = load(str(checkpoints / "cifar10-rope")).predict(EXAMPLES / "red_car.png", top_k=5)
    assert [p["label"] for p in json.loads(run.stdout)] == [p.label for p in expected]


@pytest.mark.parametrize("model, prefix", [("cifar10-learned", True), ("cifar10-windowed", False)])
def test_attention_tab_shows_prefix_shares_only_for_models_with_prefix_tokens(
    handlers: Handlers, checkpoints: Path, model: str, prefix: bool
) -> None:
    result = _explore(handlers, None, model, block=1)
    assert result["prefix_attention"].visible is prefix and bool(result["prefix_attention"].value) is prefix
    with np.load(result["npz"]) as arrays:
        assert ("prefix_attention_share" in arrays) is prefix
        if prefix:
            seen = views.inspect_image(load(str(checkpoints / model)), EXAMPLES / "red_car.png")
            expected, _ = views.prefix_attention_shares(seen)
            np.testing.assert_allclose(arrays["prefix_attention_share"], expected, atol=1e-6)
            np.testing.assert_allclose(arrays["prefix_attention_share"].sum(-1), 1.0, atol=1e-5)


def test_mechanism_views_are_wide_unless_two_share_a_row() -> None:
    from posenc.app.explore import mechanism_tabs

    with gr.Blocks():
        named = mechanism_tabs()
    wide = {key: "posenc-wide" in named[key].elem_classes for key in named if key.startswith("view:")}
    # Swin V2's four views: each per-head sheet keeps its own scrolling row instead of a third of one
    assert all(wide[f"view:cpb/{key}"] for key in ("cpb_table", "cpb_extrapolation", "cpb_temperature",
                                                   "cpb_query_bias"))
    assert wide["view:learned/similarity_grid"] and not wide["view:learned/similarity"] and not wide["view:learned/pca"]


@pytest.mark.parametrize(("arch", "config", "why"), [
    ("coat", dict(img_size=64, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1), num_heads=2,
                  crpe_window=((3, 1), (5, 1))), "no token-to-token map"),
    ("xcit", dict(img_size=64, embed_dim=32, depth=2, num_heads=4), "channels attend to channels"),
])
def test_attention_tab_says_why_in_place_of_a_picture_it_cannot_draw(tmp_path: Path, arch, config, why) -> None:
    from posenc.models import CoaTConfig, XCiTConfig
    from posenc.preprocess import Preprocess

    config_cls = {"coat": CoaTConfig, "xcit": XCiTConfig}[arch]
    folder = tmp_path / "checkpoints" / f"tiny-{arch}"
    torch.manual_seed(0)
    build_model(config_cls(**config, num_classes=5, preprocess=Preprocess(input_size=(64, 64), crop_pct=1.0))
                ).save_pretrained(folder)  # fmt: skip
    h = Handlers(cache=ModelCache(load), catalog=Catalog.build(folder.parent, (), []), hub=HubStatus(lambda: False))
    result = _explore(h, None, f"tiny-{arch}")
    assert result["picker"] and not result["status"].visible  # the request ran
    note = result["attention_note"]
    assert note.visible and "**Attention per head:**" in note.value and why in note.value
    assert result["attention"].visible is False  # no empty box under the note
    if arch == "coat":  # no block attends between tokens: no rollout or prefix shares either, and the note says so
        assert "**Attention rollout:**" in note.value and "no cls token" not in note.value
    else:  # XCiT's token norms draw on its channel-attention blocks
        assert result["token_norms"].visible is True and "Token norms" not in note.value
