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

from posenc import views as posenc_views
from posenc.models import build_model
from posenc.registry import HUB_MODELS
from posenc.train import cifar_model
from posenc.app import QUEUE_OPTIONS, create_demo, launch_options

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
FAMILIES = ("learned", "windowed", "rope")
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
    _wait_for_new_image(page, "#view-learned-similarity_grid", "")
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
    page.get_by_role("tab", name="Relative position").click()
    _wait_for_new_image(page, "#view-rel_table-query_bias", "")
    assert page.locator("#group-learned").first.is_hidden() and page.locator("#group-rel_table").first.is_visible()
    table = _shot(page, "02-relative-table.png", "#view-rel_table-bias_table")
    query = _shot(page, "03-relative-query.png", "#view-rel_table-query_bias")
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


@pytest.fixture()
def runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model of every inspection the in-process app runs, in order."""
    calls: list[str] = []
    inspect = posenc_views.inspect_image

    def counted(loaded, *args, **kwargs):
        calls.append(loaded.source)
        return inspect(loaded, *args, **kwargs)

    monkeypatch.setattr(posenc_views, "inspect_image", counted)
    return calls


def _settled(page, runs: list[str], before: int, *parts: str) -> None:
    """Wait for the summary to show ``parts``, then check that exactly one more inspection ran."""
    _wait_for_summary(page, *parts)
    page.wait_for_timeout(1500)  # a second, late run would show up here
    assert len(runs) == before + 1, runs[before:]


def _status(page) -> str:
    status = page.locator("#status")
    return status.inner_text() if status.count() and status.is_visible() else ""


def test_typing_keyboard_edits_and_errors_behave(page, runs: list[str]) -> None:
    page.reload()
    _wait_for_summary(page, "cifar10-learned", "· patch (4, 4)")
    _wait_for_new_image(page, "#patch-picker", "")

    # 1. a model name typed and entered syncs every control and runs once
    before, picker = len(runs), _src(page, "#patch-picker")
    model = page.locator("#model input")
    model.click()
    model.fill("cifar10-rope")
    model.press("Enter")
    _settled(page, runs, before, "cifar10-rope", "· patch (4, 4)")
    _wait_for_new_image(page, "#patch-picker", picker)
    assert "rotary" in page.locator("#model-info").inner_text().lower()
    assert "Block (0-5)" in page.locator("#block").inner_text()
    assert page.locator("#size input").input_value().startswith("32x32")
    page.get_by_role("tab", name="Rotary").click()
    _wait_for_new_image(page, "#view-rope_axial-rope", "")
    page.get_by_role("tab", name="Absolute position").click()
    assert page.locator("#group-learned").first.is_hidden() and "no absolute position mechanism" in page.locator(
        "#note-absolute").inner_text()

    # 1, 4. an unknown name: one message, the previous model stays selected, the pictures stay
    before, picker = len(runs), _src(page, "#patch-picker")
    model.click()
    model.fill("nonsense-model")
    model.press("Enter")
    page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').includes('nonsense-model')")
    assert "cifar10-rope" in model.input_value() and len(runs) == before
    assert _src(page, "#patch-picker") == picker
    assert "previous request" in _status(page) and "Previous request" in page.locator("#summary").inner_text()
    assert page.locator(".error").count() == 0, "no output is marked as failed"
    _shot(page, "10-refused-model-1400.png")

    # 3. the block box: typed, clamped to the range it shows, sent as shown
    before = len(runs)
    number = page.locator("#block input[type=number]")
    number.fill("9")
    number.press("Enter")
    _settled(page, runs, before, "cifar10-rope", "block 5 of 6")
    assert number.input_value() == "5"
    assert _status(page) == "", "a good request clears the message"

    # 3. the slider moved with the arrow keys
    before = len(runs)
    page.locator("#block input[type=range]").focus()  # the box loses focus: it sends its (same) value again
    page.wait_for_timeout(1000)
    page.keyboard.press("ArrowLeft")
    _settled(page, runs, before, "cifar10-rope", "block 4 of 6")

    # 3. a typed size plus Enter runs at once; a size that does not fit is refused at once and put back
    before = len(runs)
    size = page.locator("#size input")
    size.click()
    size.fill("48x48")
    size.press("Enter")
    _settled(page, runs, before, "cifar10-rope at 48x48", "block 4 of 6")
    before = len(runs)
    size.click()
    size.fill("50x50")
    size.press("Enter")
    page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').includes('50x50 does not fit')")
    assert len(runs) == before and size.input_value().startswith("48x48")

    # 4. an error, then a good request: the message goes, the new pictures come
    picker = _src(page, "#patch-picker")
    before = len(runs)
    row = page.locator("#row input")
    row.fill("2")
    row.press("Enter")
    _settled(page, runs, before, "cifar10-rope at 48x48", "patch (2, 6)")
    _wait_for_new_image(page, "#patch-picker", picker)
    assert _status(page) == ""


@pytest.mark.parametrize("width", [1400, 1024])
def test_screenshots_at_common_widths(page, app_url: str, width: int) -> None:
    """Full pages of every tab at a laptop's and a tablet's width, for a person to look at."""
    tab = page.context.browser.new_page(viewport={"width": width, "height": 900})
    try:
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(app_url)
        _wait_for_summary(tab, "cifar10-learned", "· patch (")
        _wait_for_new_image(tab, "#view-learned-similarity_grid", "")
        _shot(tab, f"20-absolute-{width}.png")
        labels = tab.locator("#model input").input_value()
        assert labels.endswith("bundled"), f"the model's label is cut: {labels!r}"
        tab.locator("#model input").click()
        tab.locator("[role=option]", has_text="cifar10-windowed").first.click()
        _wait_for_summary(tab, "cifar10-windowed", "· patch (")
        tab.get_by_role("tab", name="Relative position").click()
        _wait_for_new_image(tab, "#view-rel_table-query_bias", "")
        _shot(tab, f"21-relative-{width}.png")
        tab.get_by_role("tab", name="Attention").click()
        _wait_for_new_image(tab, "#attention", "")
        _shot(tab, f"22-attention-{width}.png")
        tab.get_by_role("tab", name="Compare").click()
        _wait_for_new_image(tab, "#picker-a", "")
        tab.wait_for_timeout(1000)
        _shot(tab, f"23-compare-{width}.png")
    finally:
        tab.close()
