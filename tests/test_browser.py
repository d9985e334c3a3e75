"""The app in a real browser: Playwright drives Debian's headless Chromium against an in-process server.

Screenshots land in ``artifacts/screenshots/`` (ignored by git) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from posenc.models import build_model
from posenc.registry import HUB_MODELS
from posenc.train import cifar_model
from posenc.ui import QUEUE_OPTIONS, create_demo, launch_options

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
FAMILIES = ("learned", "windowed")
TIMEOUT_MS = 180_000  # generous: the CI machine may be busy

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent; install it with apt-get install -y chromium"
    ),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The app on a free local port; bundled checkpoints, or random-weight stand-ins when they are absent."""
    checkpoints = ROOT / "checkpoints"
    if not all((checkpoints / f"cifar10-{f}" / "model.safetensors").is_file() for f in FAMILIES):
        checkpoints = tmp_path_factory.mktemp("checkpoints")
        for seed, family in enumerate(FAMILIES):
            torch.manual_seed(seed)
            build_model(cifar_model(family)).save_pretrained(checkpoints / f"cifar10-{family}")
            (checkpoints / f"cifar10-{family}" / "metrics.json").write_text(json.dumps({"accuracy": 0.1}))
    demo = create_demo(checkpoints_dir=checkpoints, registry=HUB_MODELS, examples_dir=EXAMPLES, hub_probe=lambda: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(**QUEUE_OPTIONS).launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options(EXAMPLES)
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(app_url: str):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(app_url)
        yield tab
        browser.close()


def _src(page, selector: str) -> str:
    return page.locator(f"{selector} img").first.get_attribute("src") or ""


def _wait_for_new_image(page, selector: str, old: str) -> str:
    """Wait until the image inside ``selector`` is shown with a source other than ``old``."""
    page.wait_for_function(
        "([sel, old]) => { const img = document.querySelector(sel + ' img');"
        " return img && img.src && img.src !== old && img.complete && img.naturalWidth > 0; }",
        arg=[selector, old],
        timeout=TIMEOUT_MS,
    )
    return _src(page, selector)


def _wait_for_summary(page, *parts: str) -> None:
    """Wait until the explore summary holds every one of ``parts`` and no progress message is shown."""
    page.wait_for_function(
        "(parts) => { const s = document.querySelector('#summary');"
        " return s && parts.every((p) => s.innerText.includes(p))"
        " && !['Loading ', 'Running ', 'Drawing '].some((p) => s.innerText.includes(p)); }",
        arg=list(parts),
        timeout=TIMEOUT_MS,
    )


def _shot(page, name: str, selector: str | None = None) -> Path:
    path = SHOTS / name
    if selector is None:
        page.screenshot(path=path, full_page=True)
    else:
        page.locator(selector).screenshot(path=path)
    return path


def _coloured_fraction(path: Path) -> float:
    """Fraction of clearly coloured (not grey) pixels: overlays are colourful, an empty panel is not."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return float(((rgb.max(-1) - rgb.min(-1)) > 40).mean())


def test_upload_pick_model_click_patch_shows_overlays(page, tmp_path: Path) -> None:
    # a first visit is populated: the default model, the first example and the centre patch
    first_picker = _wait_for_new_image(page, "#patch-picker", "")
    _wait_for_new_image(page, "#abs-grid", "")
    assert "Hub models are unavailable" in page.locator("#hub-banner").inner_text()
    _shot(page, "01-first-visit.png")

    # upload an image
    upload = tmp_path / "car.png"
    shutil.copyfile(EXAMPLES / "red_car.png", upload)
    page.locator("#image input[type=file]").set_input_files(str(upload))
    picker = _wait_for_new_image(page, "#patch-picker", first_picker)

    # pick the Swin model from the dropdown
    page.locator("#model input").click()
    page.locator("[role=option]", has_text="cifar10-windowed").first.click()
    # the progress text ("Running cifar10-windowed at ...") names the model too; the finished summary
    # also names the patch, and a click on the picker while the run is pending would land on its overlay
    _wait_for_summary(page, "cifar10-windowed", "· patch (")
    picker = _wait_for_new_image(page, "#patch-picker", picker)
    assert "windowed" in page.locator("#model-info").inner_text()

    # click a patch near the lower left corner of the model's input
    box = page.locator("#patch-picker img").first.bounding_box()
    page.mouse.click(box["x"] + 0.1 * box["width"], box["y"] + 0.9 * box["height"])
    _wait_for_summary(page, "cifar10-windowed", "· patch (7, 0)")
    _wait_for_new_image(page, "#patch-picker", picker)

    # the relative-bias overlays
    page.get_by_role("tab", name="Relative bias").click()
    _wait_for_new_image(page, "#rel-query", "")
    table = _shot(page, "02-relative-table.png", "#rel-table")
    query = _shot(page, "03-relative-query.png", "#rel-query")
    assert _coloured_fraction(table) > 0.05 and _coloured_fraction(query) > 0.05

    # the attention overlays, with and without the position bias
    page.get_by_role("tab", name="Attention").click()
    _wait_for_new_image(page, "#attention", "")
    attention = _shot(page, "04-attention.png", "#attention")
    assert _coloured_fraction(attention) > 0.05
    assert page.locator("#npz a").first.get_attribute("href")
    _shot(page, "05-explore-after-click.png")

    # the comparison tab fills itself with both models
    page.get_by_role("tab", name="Compare").click()
    _wait_for_new_image(page, "#picker-a", "")
    page.wait_for_function("() => document.querySelectorAll('img').length > 8")
    page.wait_for_timeout(500)
    _shot(page, "06-compare.png")
