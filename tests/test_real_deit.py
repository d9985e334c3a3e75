"""Real DeiT-Tiny ImageNet weights loaded through posenc.load agree with timm on 250 real photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posenc.hub import load
from posenc.preprocess import Preprocess

pytestmark = pytest.mark.timeout(120)

BATCH = 50


@pytest.fixture(scope="module")
def deit(shared_data: Path):
    folder = shared_data / "deit_tiny_patch16_224.fb_in1k"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"DeiT-Tiny weights {folder} are absent")
    return load(str(folder))


@pytest.fixture(scope="module")
def reference(shared_data: Path) -> tuple[Path, dict, dict]:
    samples = shared_data / "imagenet-samples"
    ref_file = samples / "timm_reference.json"
    if not ref_file.is_file():
        pytest.skip(f"timm reference {ref_file} is absent")
    summary = json.loads(ref_file.read_text())
    return samples, summary["images"], summary


def test_real_deit_loads_as_timm_layout_with_checkpoint_preprocessing(deit):
    assert deit.layout == "timm"
    assert deit.model.mechanisms == ("learned",)
    assert deit.num_params == 5_717_416
    assert deit.labels[0] == "tench" and len(deit.labels) == 1000
    assert deit.preprocess == Preprocess(input_size=(224, 224), interpolation="bicubic", crop_pct=0.9)
    assert not deit.model.training


@pytest.mark.slow
def test_real_deit_top5_matches_timm_on_every_sample_image(deit, reference):
    samples, images, summary = reference
    assert len(images) == 250
    names = sorted(images)
    mismatched, top1_hits = [], 0
    for start in range(0, len(names), BATCH):
        batch = names[start : start + BATCH]
        predictions = deit.predict_batch([samples / name for name in batch], top_k=5)
        for name, top5 in zip(batch, predictions):
            expected = images[name]
            got_index = [p.index for p in top5]
            top1_hits += got_index[0] == expected["true_index"]
            got_prob = torch.tensor([p.probability for p in top5], dtype=torch.float64)
            want_prob = torch.tensor(expected["top5_prob"], dtype=torch.float64)
            if got_index != expected["top5_index"] or not torch.allclose(got_prob, want_prob, rtol=0, atol=1e-3):
                mismatched.append((name, got_index, expected["top5_index"], got_prob.tolist(), expected["top5_prob"]))
    assert not mismatched, f"{len(mismatched)} of 250 images differ from timm, e.g. {mismatched[:3]}"
    assert top1_hits / len(names) == pytest.approx(summary["top1"], abs=1e-9)


def test_pixels_run_at_the_checkpoint_size_and_at_an_override(deit, reference):
    samples, images, _ = reference
    image = samples / sorted(images)[0]
    x = deit.pixels(image)
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == torch.float32
    with torch.inference_mode():
        logits = deit.model(x)
    assert int(logits.argmax()) == images[image.name]["top5_index"][0]
    assert deit.pixels(image, input_size=(160, 192)).shape == (1, 3, 160, 192)
