"""The atlas across models (``python -m posenc atlas``) and the Measure tab's several-model distance plot."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import posenc
from posenc import atlas, measure
from posenc.cli import main

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
MODELS = ("learned", "windowed")


def _checkpoint(name: str) -> Path:
    folder = CHECKPOINTS / f"cifar10-{name}"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"bundled checkpoint {folder} is absent")
    return folder


def _photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir()
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        out.append(folder / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(out[-1])
    return out


def _counting(monkeypatch) -> list[str]:
    """Count the calls of measure_folder (the atlas reaches it through the module)."""
    calls: list[str] = []
    real = measure.measure_folder

    def counted(loaded, *args, **kwargs):
        calls.append(loaded.source)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(measure, "measure_folder", counted)
    return calls


def test_atlas_writes_a_self_contained_page_reports_a_broken_model_and_resumes(tmp_path, capsys, monkeypatch):
    models = [str(_checkpoint(n)) for n in MODELS]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    images = tmp_path / "images"
    photos = _photos(images)
    out = tmp_path / "out"
    args = ["atlas", "--models", models[0], str(broken), models[1], "--images", str(images), "--out", str(out),
            "--batch", "3"]
    calls = _counting(monkeypatch)

    assert main(args) == 0
    err = capsys.readouterr().err
    assert "models" in err and "img" in err  # the progress bars
    assert "2 of 3 model(s) measured (0 from the cache)" in err
    assert len(calls) == 2
    page = (out / "atlas.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # distance, reliance, sweep, decodability
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the page must not load anything from outside"
    assert "broken</b> was not measured" in page and "cannot be loaded" in page
    record = json.loads((out / "atlas.json").read_text())
    assert [m["model"] for m in record["models"]] == [models[0], str(broken), models[1]]
    assert "cannot be loaded" in record["models"][1]["error"] and "record" not in record["models"][1]
    for entry in (record["models"][0], record["models"][2]):
        assert entry["record"]["images"] == 3 and entry["cached"] is False
    assert len(list((out / "models").glob("*.json"))) == 2  # the broken model leaves no cache entry

    # the second run reads both records from the cache and measures nothing
    assert main(args) == 0
    assert "2 of 3 model(s) measured (2 from the cache)" in capsys.readouterr().err
    assert len(calls) == 2
    again = json.loads((out / "atlas.json").read_text())
    assert [m["record"] for m in again["models"] if "record" in m] == [
        m["record"] for m in record["models"] if "record" in m]
    assert "cached" in (out / "atlas.html").read_text()

    # a changed image (its mtime) is another folder: measured again
    stat = photos[0].stat()
    os.utime(photos[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert main(["atlas", "--models", models[0], "--images", str(images), "--out", str(out), "--batch", "3"]) == 0
    assert len(calls) == 3 and calls[-1] == models[0]


def test_atlas_exits_non_zero_when_no_model_could_be_measured(tmp_path, capsys):
    _photos(tmp_path / "images", 1)
    code = main(["atlas", "--models", str(tmp_path / "nowhere"), "--images", str(tmp_path / "images"), "--out",
                 str(tmp_path / "out")])
    assert code == 1
    assert "0 of 1 model(s) measured" in capsys.readouterr().err
    assert "was not measured" in (tmp_path / "out" / "atlas.html").read_text()


def test_distance_fraction_divides_by_the_image_side():
    assert atlas.distance_fraction([[112.0, None], [56.0]], (224, 224)) == [[0.5, None], [0.25]]
    # a non-square input: the side is sqrt(h * w)
    assert atlas.distance_fraction([[10.0]], (20, 80)) == [[0.25]]


def test_atlas_json_gives_the_distance_as_a_fraction_of_the_side_from_the_measured_pixels(tmp_path):
    loaded = posenc.load(str(_checkpoint("learned")))
    photos = _photos(tmp_path / "images", 2)
    entry = atlas.measure_model(str(_checkpoint("learned")), photos, out=tmp_path / "out", batch=2)
    fraction = atlas.atlas_json([entry])["models"][0]["mean_attention_distance_fraction"]
    # independent: the pixel distances of a direct inspection, averaged over the images, divided by the side
    x = torch.stack([loaded.pixels(p)[0] for p in photos])  # 2, 3, 32, 32
    with torch.inference_mode():
        pixels = measure.mean_attention_distance(loaded.model.inspect(x))
    assert x.shape[-1] == 32
    np.testing.assert_allclose(fraction, [d.mean(0).numpy() / 32 for d in pixels], atol=1e-4)
    assert all(0 < v < math.sqrt(2) for heads in fraction for v in heads)


def test_a_cached_record_with_other_settings_is_measured_again(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "images", 1)
    calls = _counting(monkeypatch)
    model = str(_checkpoint("learned"))
    first = atlas.measure_model(model, photos, out=tmp_path, batch=1)
    assert atlas.measure_model(model, photos, out=tmp_path, batch=1)["cached"] is True
    assert len(calls) == 1
    other = atlas.measure_model(model, photos, out=tmp_path, batch=1, size="16x16")
    assert other["cached"] is False and len(calls) == 2 and other["key"] != first["key"]
    assert other["record"]["input_size"] == [16, 16]


def test_the_page_renders_keys_added_to_the_record_later_and_skips_absent_ones():
    record = {"model": "m", "input_size": [32, 32], "images": 3, "mean_attention_distance": [[4.0, 8.0]],
              "token_norms": {"high_norm_share": [0.0, 0.25]}}
    page = atlas.render_html([{"model": "m", "record": record}], images=3, folder="f")
    titles = re.findall(r"<img alt='([^']*)'", page)
    assert titles == ["Mean attention distance per head", "Token norms"]
    assert "high_norm_share" in page  # and the numbers as JSON
    assert "Record key &#x27;token_norms.high_norm_share&#x27; per block" in page  # the caption names the list drawn


def test_measure_tab_plots_several_models_on_one_scale_when_their_sizes_differ(tmp_path, monkeypatch):
    from posenc import plots
    from posenc.app.measure import MeasureHandlers

    learned = posenc.load(str(_checkpoint("learned")))
    windowed = posenc.load(str(_checkpoint("windowed")))
    big = replace(learned, preprocess=replace(learned.preprocess, input_size=(64, 64)))  # the same model at 64
    models = {"learned": learned, "windowed": windowed, "big": big}
    drawn = []
    real = plots.attention_distance
    monkeypatch.setattr(plots, "attention_distance", lambda series, **kw: drawn.append((series, kw)) or real(series, **kw))
    h = MeasureHandlers(lambda source, progress: (source, models[source]))
    photo = _photos(tmp_path / "images", 1)[0]

    # several models at one size: pixels, every model in the npz
    *_, npz, _ = h.measure(str(photo), "learned", ["windowed", "learned"], progress=lambda *a, **k: None)
    series, kw = drawn[-1]
    assert list(series) == ["learned", "windowed", "learned (3)"]
    assert "ylabel" not in kw
    numbers = np.load(npz)
    assert {"attention_distance_block0", "compared_attention_distance_block0",
            "compared2_attention_distance_block0"} <= set(numbers)

    # one of them at 64x64: every model as a fraction of its image side
    path = h.attention_distance(str(photo), "learned", ["windowed", "big"], progress=lambda *a, **k: None)
    with Image.open(path) as img:
        assert img.format == "PNG"
    series, kw = drawn[-1]
    assert "image side" in kw["ylabel"]
    for name, side in (("learned", 32), ("windowed", 32), ("big", 64)):
        loaded = models[name]
        with torch.inference_mode():
            pixels = measure.mean_attention_distance(loaded.model.inspect(loaded.pixels(photo, (side, side))))
        drawn_heads = series[f"{name} at {side}x{side}"]  # the legend names each model's input size
        assert len(drawn_heads) == len(pixels)
        for heads, d in zip(drawn_heads, pixels):  # blocks may differ in their number of heads
            np.testing.assert_allclose(heads, d[0].numpy() / side, rtol=1e-5)

    # the former single second model (a string) still works
    h.attention_distance(str(photo), "learned", "windowed", progress=lambda *a, **k: None)
    assert list(drawn[-1][0]) == ["learned", "windowed"]


@pytest.mark.parametrize("labelled", [True, False])
def test_the_sweep_figure_plots_accuracy_when_measure_folder_recorded_it(labelled):
    rows = [{"size": [s, s], "agrees": 1.0 if s == 32 else 0.5, "p_top1": 0.5, "p_native_class": 0.5,
             **({"top1_accuracy": 0.25, "top5_accuracy": 0.75} if labelled else {})} for s in (16, 32)]
    record = {"model": "m", "input_size": [32, 32], "images": 4, "resolution_sweep": rows}
    (_, _, caption), = [f for f in atlas.figures({"m": record}) if f[0] == "Resolution sweep"]
    assert ("top-1 accuracy (labelled folder)" in caption) is labelled
    assert ("top-1 = native-size top-1" in caption) is not labelled


def test_atlas_reports_accuracy_for_a_folder_in_class_folders(tmp_path):
    """Class subfolders label the images (as for `posenc measure`): the record's sweep rows carry top-1 accuracy."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    code = main(["atlas", "--models", str(_checkpoint("learned")), "--images", str(folder), "--out",
                 str(tmp_path / "out"), "--batch", "4"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "atlas.json").read_text())
    (entry,) = [m for m in record["models"] if "record" in m] if "models" in record else [None]
    assert entry is not None
    rows = entry["record"]["resolution_sweep"]
    assert all(row["top1_accuracy"] is not None for row in rows)
    assert entry["record"]["labels"]["labelled"] == 4
