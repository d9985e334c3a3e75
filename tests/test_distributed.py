"""Several processes (torchrun, gloo on the CPU) give one process's results: ``posenc measure``, ``posenc atlas``
and ``posenc train``.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` (a free port is picked) on a tiny
model and compares with the same command in one process: counts exactly, the rest to float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from posenc import distributed, train
from posenc.cli import main
from posenc.models import ViTConfig, build_model

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*argv: str, procs: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node procs -m posenc ARGV`` on the CPU, from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "posenc", *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_one_rank_is_the_identity():
    ranks = distributed.Ranks()
    assert ranks.main and list(ranks.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.all_sum({"a": 2, "b": np.ones(3)}, ranks)["a"] == 2
    assert list(distributed.Ranks(1, 3).shard(8)) == [1, 4, 7]


def _close(a, b, path: str = "") -> None:
    """Equal JSON records: ints and strings exactly, floats to 1e-6 relative (None for NaN on both sides)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}/{i}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), path
    else:
        assert a == b, path


def _tiny_model(folder: Path) -> Path:
    """A perturbed 24x32 ViT with a learned embedding and RoPE, saved with posenc's Hub layout."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(24, 32), patch_size=8, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                    pos_embed="learned", rope=True)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["preprocess"]["input_size"] = [24, 32]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _images(folder: Path) -> Path:
    """Nine noise photos and one unreadable file (which lands on one rank only)."""
    folder.mkdir()
    for i in range(9):
        _photo(folder / f"{i}.png", i)
    (folder / "8b.jpg").write_bytes(b"\xff\xd8 not an image")
    return folder


def test_measure_under_torchrun_equals_one_process(tmp_path, capsys):
    model_dir = _tiny_model(tmp_path / "model")
    images = _images(tmp_path / "images")
    # labels only for even places: rank 1 has no labelled image, so its sums lack the accuracy keys
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{i % 6}\n" for i in (0, 2, 4, 6)))
    args = ["measure", "--model", str(model_dir), "--images", str(images), "--batch", "2", "--device", "cpu",
            "--labels", str(tmp_path / "labels.csv"), "--rope-scales", "0.5,2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", str(tmp_path / "two"))
    assert done.stderr.count("measured 9 images") == 1  # rank 0 alone reports (and writes)
    one = json.loads((tmp_path / "one" / "measures.json").read_text())
    two = json.loads((tmp_path / "two" / "measures.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for record in (one, two):
        record.pop("processes"), record.pop("seconds"), record.pop("images_per_second")
        record["skipped"]["files"].sort()
    assert two["images"] == 9 and two["skipped"]["count"] == 1
    assert two["position_decodability"]["held_out_images"] == one["position_decodability"]["held_out_images"] == 1
    assert two["labels"] == {"source": "labels file", "labelled": 4, "unresolved": []}
    assert "accuracy" in two["position_reliance"]
    _close(one, two)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_atlas_under_torchrun_equals_one_process_and_rank_0_alone_writes(tmp_path):
    model_dir = _tiny_model(tmp_path / "model")
    images = _images(tmp_path / "images")
    args = ["atlas", "--models", str(model_dir), "--images", str(images), "--batch", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", str(tmp_path / "two"))
    assert done.stderr.count("atlas: 1 of 1 model(s) measured") == 1  # rank 0 alone reports (and writes)
    one, two = (json.loads((tmp_path / run / "atlas.json").read_text())["models"][0] for run in ("one", "two"))
    assert (one["record"]["processes"], two["record"]["processes"]) == (1, 2)
    for entry in (one, two):
        for key in ("processes", "seconds", "images_per_second"):
            entry["record"].pop(key)
        entry["record"]["skipped"]["files"].sort()
    assert two["record"]["images"] == 9
    _close(one, two)
    cached = sorted(p.name for p in (tmp_path / "two" / "models").iterdir())
    assert cached == sorted(p.name for p in (tmp_path / "one" / "models").iterdir()) and len(cached) == 1


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ folders of noisy 32x32 PNGs in two colour classes; 18 training images per class."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 18), ("val", 4)):
        for name, colour in (("blue", (30, 60, 220)), ("red", (220, 40, 40))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def test_train_under_torchrun_ends_with_one_process_weights(image_folder, tmp_path):
    # no augmentation: then each step's two half-batches, their gradients averaged by DDP, are the one batch
    recipe = ["--family", "rope", "--data", str(image_folder), "--epochs", "2", "--batch-size", "8",
              "--warmup-epochs", "0.5", "--padding", "0", "--no-flip", "--precision", "fp32", "--threads", "1"]
    assert main(["train", *recipe, "--out", str(tmp_path / "one")]) == 0
    torchrun("train", *recipe, "--out", str(tmp_path / "two"))
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(one) == set(two)
    torch.manual_seed(0)  # the recipe's seed: the weights training started from
    start = build_model(train.cifar_model("rope")).state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if not k.startswith("head"))
    assert moved > 1e-3  # training changed the weights, so equal weights say something
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert [m["hardware"]["world_size"] for m in metrics] == [1, 2]
    assert metrics[1]["history"][-1]["loss"] == pytest.approx(metrics[0]["history"][-1]["loss"], rel=1e-4)
    assert metrics[1]["accuracy"] == metrics[0]["accuracy"]
