"""``python -m posenc predict``: output formats and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import posenc.predict
from posenc.cli import main

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "n01440764_tench.JPEG"


@pytest.fixture(scope="module")
def deit(shared_data: Path) -> tuple[Path, Path, dict]:
    """The DeiT-Tiny folder, the sample image and its timm reference."""
    folder = shared_data / "deit_tiny_patch16_224.fb_in1k"
    samples = shared_data / "imagenet-samples"
    if not (folder / "model.safetensors").is_file() or not (samples / IMAGE).is_file():
        pytest.skip(f"DeiT-Tiny weights or sample images under {shared_data} are absent")
    reference = json.loads((samples / "timm_reference.json").read_text())["images"][IMAGE]
    return folder, samples / IMAGE, reference


@pytest.fixture
def quiet_hub_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs must not change huggingface_hub's verbosity for the rest of the session."""
    monkeypatch.setattr(posenc.predict.hf_logging, "set_verbosity_error", lambda: None)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "posenc", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=80
    )


@pytest.mark.slow
def test_predict_json_lists_the_top_k_most_probable_first_and_matches_timm(deit):
    folder, image, reference = deit
    result = run_cli("predict", "--model", str(folder), str(image), "--json", "--top", "3")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [list(row) for row in rows] == [["index", "label", "probability"]] * 3
    assert all(isinstance(r["index"], int) and isinstance(r["label"], str) and isinstance(r["probability"], float) for r in rows)
    assert [r["index"] for r in rows] == reference["top5_index"][:3]
    assert rows[0]["label"] == "tench"
    assert [r["probability"] for r in rows] == sorted((r["probability"] for r in rows), reverse=True)
    assert rows[0]["probability"] == pytest.approx(reference["top5_prob"][0], abs=1e-3)


def test_predict_prints_a_table_of_the_top_classes(deit, capsys, quiet_hub_logging):
    folder, image, reference = deit
    assert main(["predict", "--model", str(folder), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["70.12%", "tench", "(0)"]
    assert [int(line.rsplit("(", 1)[1].rstrip(")")) for line in lines] == reference["top5_index"]


def test_predict_on_a_synthetic_model_prints_the_librarys_top_classes(tmp_path, capsys, quiet_hub_logging):
    """The synthetic twin of the DeiT-Tiny CLI tests: a tiny random model folder, answers from posenc.load."""
    from PIL import Image

    from posenc.hub import load
    from posenc.models import ViTConfig, build_model
    from posenc.preprocess import Preprocess

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10,
                       labels=tuple(f"class{i}" for i in range(10)), preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0))
    build_model(config).save_pretrained(tmp_path / "model")
    image = tmp_path / "photo.png"
    Image.effect_noise((40, 36), 60).convert("RGB").save(image)
    assert main(["predict", "--model", str(tmp_path / "model"), str(image), "--json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = load(str(tmp_path / "model")).predict(image, top_k=3)
    assert [r["index"] for r in rows] == [p.index for p in expected]
    assert [r["label"] for r in rows] == [f"class{p.index}" for p in expected]
    assert [r["probability"] for r in rows] == pytest.approx([p.probability for p in expected], abs=1e-6)


def _bad_images(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {"missing": tmp_path / "nope.jpg", "folder": tmp_path, "text": text, "empty": empty}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "cannot read the image"),
        ("folder", "cannot read the image"),
        ("text", "format that can be read"),
        ("empty", "is empty"),
    ],
)
def test_a_bad_image_exits_2_with_one_clear_line(tmp_path, capsys, quiet_hub_logging, kind, message):
    image = _bad_images(tmp_path)[kind]
    assert main(["predict", "--model", str(tmp_path), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err


def test_a_model_folder_without_config_exits_2_naming_it(tmp_path, capsys, quiet_hub_logging, shared_data):
    image = shared_data / "imagenet-samples" / IMAGE
    if not image.is_file():
        pytest.skip(f"sample image {image} is absent")
    assert main(["predict", "--model", str(tmp_path), str(image)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "has no config.json" in err[0]


@pytest.mark.slow
def test_a_bad_image_from_the_command_line_prints_no_traceback(tmp_path):
    text = tmp_path / "photo.jpg"
    text.write_text("not really a photo")
    result = run_cli("predict", "--model", "timm/deit_tiny_patch16_224.fb_in1k", str(text))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "'photo.jpg'" in lines[0] and "format that can be read" in lines[0]
