"""The Gradio app end to end: launched in-process on 127.0.0.1 and driven through gradio_client.

Models: the bundled CIFAR-10 checkpoints when ``checkpoints/`` has them, else random-weight stand-ins of the
same presets written to a temporary folder; the real DeiT-Tiny folder from ``../shared/data`` when present.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import sampled_rss_mb
from posenc.encodings import window_partition
from posenc.hub import load
from posenc.labels import CIFAR10_LABELS
from posenc.models import build_model
from posenc.registry import HUB_MODELS
from posenc.train import cifar_model
from posenc.ui import QUEUE_OPTIONS, Catalog, Handlers, HubStatus, ModelCache, create_demo, launch_options

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
    with pytest.raises(AppError, match="so it has no"):
        client.predict(handle_file(photo), source(checkpoints, family), *args, api_name=endpoint)


def _analyse(client: Client, image: Path, model: str, size: str | None, block: int, row: int, col: int) -> dict:
    result = client.predict(handle_file(image), model, size, block, row, col, api_name="/analyse")
    with np.load(result[12]) as npz:
        return {k: npz[k] for k in npz.files} | {"summary": result[13]}


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


def test_offered_sizes_and_refused_sizes(client: Client, checkpoints: Path, photo: Path) -> None:
    model = source(checkpoints, "windowed")
    assert len(client.predict(handle_file(photo), model, "64x64", api_name="/predict")["confidences"]) == 5
    with pytest.raises(AppError, match="not offered.*multiples of 32x32"):
        client.predict(handle_file(photo), model, "48x48", api_name="/predict")
    with pytest.raises(AppError, match="not a size"):
        client.predict(handle_file(photo), model, "big", api_name="/predict")
    with pytest.raises(AppError, match="outside the 8x8 patch grid"):
        client.predict(handle_file(photo), model, None, 0, 8, 0, api_name="/attention")


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
    banner = Handlers(cache=ModelCache(load), catalog=catalog, hub=offline).banner()
    assert banner.visible is True and "Hub models are unavailable" in banner.value
    online = HubStatus(lambda: True)
    online.start()
    assert Handlers(cache=ModelCache(load), catalog=catalog, hub=online).banner().visible is False


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
        with pytest.raises(AppError, match="not in the local cache"):
            remote.predict(handle_file(EXAMPLES / "red_car.png"), "timm/deit_tiny_patch16_224.fb_in1k", None,
                           api_name="/predict")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
