"""The kind endpoints answer by kind, and the Measure tab keeps going when one measurement cannot run.

Small random-weight models of several architectures are written in posenc's Hub layout and served by the
app in-process (as extra local models); the endpoints are called through gradio_client.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import posenc
from posenc import measure
from posenc.app import QUEUE_OPTIONS, create_demo, launch_options
from posenc.app.api import KIND_ENDPOINTS, kind_views
from posenc.app.common import block_number, sentence, view_key, views_of
from posenc.app.measure import MEASUREMENTS, MeasureHandlers
from posenc.mechanisms import MECHANISMS
from posenc.models import CoaTConfig, LeViTConfig, SamConfig, SwinV2Config, XCiTConfig, build_model
from posenc.preprocess import Preprocess
from posenc.train import cifar_model

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

#: tiny configs (the sizes of tests/test_measure.py): SAM's 3x3 windows pad its 8x8 grid
TINY = {
    "tiny-swinv2": (SwinV2Config, dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4)),
    "tiny-sam": (SamConfig, dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3,
                                 global_attn_indexes=(1,))),
    "tiny-levit": (LeViTConfig, dict(embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), img_size=64)),
    # blocks without a token map: XCiT's channel attention, CoaT's factorised attention
    "tiny-xcit": (XCiTConfig, dict(img_size=64, embed_dim=32, depth=2, num_heads=4)),
    "tiny-coat": (CoaTConfig, dict(img_size=64, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                                   parallel_depth=1, num_heads=2, crpe_window=((3, 1), (5, 1)))),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name, (config_cls, kwargs) in TINY.items():
        size = kwargs["img_size"]
        config = config_cls(**kwargs, num_classes=5, preprocess=Preprocess(input_size=(size, size), crop_pct=1.0))
        torch.manual_seed(0)
        build_model(config).save_pretrained(root / name)
        folders[name] = root / name
    torch.manual_seed(0)
    build_model(cifar_model("rope")).save_pretrained(root / "tiny-rope")
    folders["tiny-rope"] = root / "tiny-rope"
    return folders


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def client(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    demo = create_demo(checkpoints_dir=tmp_path_factory.mktemp("no-checkpoints"), extra_models=list(models.values()),
                       hub_probe=lambda: False)
    port = _free_port()
    demo.queue(**QUEUE_OPTIONS).launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                                       quiet=True, **launch_options())
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False,
                     download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        demo.close()
        demo.posenc_handlers.close()


@pytest.mark.parametrize(("model", "mechanism"), [("tiny-swinv2", "cpb"), ("tiny-sam", "decomposed"),
                                                  ("tiny-levit", "offset_bias")])
def test_relative_bias_answers_every_model_with_a_relative_mechanism(client, photo, model, mechanism) -> None:
    pngs = client.predict(handle_file(photo), model, None, 1, 2, 3, api_name="/relative_bias")
    assert len(pngs) == KIND_ENDPOINTS["relative_bias"][1]
    expected = kind_views(MECHANISMS[mechanism], len(pngs))
    assert len(expected) == len(pngs)
    for path, spec in zip(pngs, expected):
        assert path is not None, f"{model}: no picture for {spec.key}"
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 32
        assert spec.key in Path(path).name, (spec.key, path)  # the file is named after the view it holds
    # the per-patch view is among them (the Swin V2 mechanism has four views; its query bias is kept)
    assert any(spec.compare for spec in expected)


def test_kind_endpoints_refuse_a_model_without_that_kind_by_the_titles_of_its_mechanisms(client, photo) -> None:
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(photo), "tiny-rope", None, 0, 1, 1, api_name="/relative_bias")
    message = str(refused.value)
    assert "tiny-rope has no relative position mechanism" in message
    assert MECHANISMS["rope_axial"].title in message and "/rope" in message
    stripped = message.replace("tiny-rope", "").replace(MECHANISMS["rope_axial"].title, "")
    assert not re.search(rf"\b({'|'.join(MECHANISMS)}|windowed|BEiT|Swin)\b", stripped), message
    # and the other way round: the rotary endpoint refuses Swin V2, naming its continuous bias
    with pytest.raises(AppError, match=re.escape(MECHANISMS["cpb"].title)) as refused:
        client.predict(handle_file(photo), "tiny-swinv2", None, 1, 1, api_name="/rope")
    assert not re.search(r"\bcpb\b", str(refused.value).replace(MECHANISMS["cpb"].title, ""))


def test_rope_and_position_embedding_answer_by_kind(client, photo) -> None:
    rope = client.predict(handle_file(photo), "tiny-rope", None, 1, 1, api_name="/rope")
    with Image.open(rope) as img:
        assert img.format == "PNG"
    absolute = client.predict(handle_file(photo), "tiny-sam", None, 1, 1, api_name="/position_embedding")
    assert len(absolute) == 3 and all(path is not None for path in absolute)


@pytest.mark.parametrize(("model", "mechanism", "why"), [("tiny-xcit", "fourier", "channels attend to channels"),
                                                         ("tiny-coat", "conv_pos", "no token-to-token map")])
def test_analyse_draws_every_view_of_a_block_without_a_token_map_and_says_why_it_has_no_attention(
    client, photo, model, mechanism, why
) -> None:
    *views_, npz, summary = client.predict(handle_file(photo), model, None, 0, 1, 1, api_name="/analyse")
    picker, _top5, *pictures, attention = views_
    assert picker is not None and attention is None  # block 0 has no token-to-token attention to draw
    assert why in summary
    keys = [view_key(m, v) for m, v in views_of()]  # the registry order of /analyse
    drawn = {k for k, path in zip(keys, pictures) if path is not None}
    assert {f"{mechanism}/{v.key}" for v in MECHANISMS[mechanism].views} <= drawn
    with np.load(npz) as arrays:
        assert "attention" not in arrays and "logits" in arrays


def _no_progress(*args: object, **kwargs: object) -> None:
    return None


def test_measure_tab_notes_a_measurement_that_fails_or_does_not_apply_and_runs_the_others(
    models: dict[str, Path], photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = posenc.load(str(models["tiny-rope"]))

    def no_conv(*args: object, **kwargs: object) -> None:
        raise measure.NotApplicable("the patch embedding is not one convolution")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the distance broke")

    monkeypatch.setattr(measure, "patch_conv", no_conv)  # filters: not applicable

    monkeypatch.setattr(measure, "mean_attention_distance", broken)  # distance: fails
    h = MeasureHandlers(lambda source, progress: ("tiny-rope", loaded))
    try:
        page = h.page(str(photo), "tiny-rope", None, progress=_no_progress)
        for what in ("distance", "filters"):
            assert page[what].visible is False and page[f"note:{what}"].visible
        assert "does not apply to tiny-rope" in page["note:filters"].value
        assert "could not be measured" in page["note:distance"].value and "the distance broke" in page[
            "note:distance"].value
        for what in ("reliance", "sweep"):
            assert page[what].visible and page[f"note:{what}"].visible is False
            value = page[what].value  # the update holds the file as Gradio's FileData
            with Image.open(value["path"] if isinstance(value, dict) else value) as img:
                assert img.format == "PNG"
        numbers = np.load(page["npz"])
        assert "reliance_shuffle_kl" in numbers and "sweep_p_top1" in numbers
        assert "attention_distance_block0" not in numbers and "filter_components" not in numbers
        assert "no position term" in page["summary"]
        # the /measure endpoint: None for the two, PNGs for the others, and the summary says why
        *pngs, npz, summary = h.measure(str(photo), "tiny-rope", None, progress=_no_progress)
        assert dict(zip(MEASUREMENTS, [p is not None for p in pngs])) == {
            "distance": False, "filters": False, "reliance": True, "sweep": True, "rope": True}
        assert "the distance broke" in summary and "does not apply" in summary
    finally:
        h.files.close()


def test_measure_tab_on_a_model_that_cannot_load_says_so_once(photo: Path) -> None:
    def refuse(source: str | None, progress: object) -> None:
        raise ValueError(f"{source!r} is not a model this app may load")

    h = MeasureHandlers(refuse)
    page = h.page(str(photo), "nonsense", None, progress=_no_progress)
    assert set(page) == {"summary"} and page["summary"].startswith("**Not run.**") and "nonsense" in page["summary"]


@pytest.mark.parametrize(("block", "expected"), [(None, 0), ("", 0), ("first", 0), ("middle", 2), (" Last ", 5),
                                                 (3, 3), (3.0, 3), ("4", 4), (40, 5), (-2, 0)])
def test_one_block_parser_for_every_tab_and_endpoint(block, expected) -> None:
    assert block_number(block, 6) == expected


@pytest.mark.parametrize("block", [1.5, "1.5", "second", float("nan")])
def test_block_parser_refuses_what_is_not_a_block(block) -> None:
    with pytest.raises(ValueError, match="block"):
        block_number(block, 6)


def test_a_message_keeps_the_case_of_the_repo_id_it_starts_with() -> None:
    assert sentence("nonsense/model is not stored on this server") == "nonsense/model is not stored on this server."
    assert sentence("my_folder  has no config.json") == "my_folder has no config.json."
    assert sentence("the size must be a multiple of 16") == "The size must be a multiple of 16."
