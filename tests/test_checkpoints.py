"""The bundled CIFAR-10 checkpoints: present for every training preset, small, loadable like Hub models, accurate,
and described the same way in their model cards, their metrics.json and the README's ablation table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import posenc
from posenc.train import PRESETS, ablation_table, cifar_model, load_cifar_zip, normalize

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
MAX_BYTES = 5 * 1024 * 1024

#: Accuracy floors (percent) on the fixed slice: a few points under each model's measured value there.
FLOORS: dict[str, float] = {
    "none": 52.4,  # measured 55.4
    "learned": 60.0,  # measured 63.0
    "sincos": 58.9,  # measured 61.9
    "relative": 53.1,  # measured 56.1
    "windowed": 54.3,  # measured 57.3
    "rope": 63.1,  # measured 66.1
}


def checkpoint(family: str) -> Path:
    return CHECKPOINTS / f"cifar10-{family}"


def read_metrics(family: str) -> dict:
    return json.loads((checkpoint(family) / "metrics.json").read_text())


@pytest.mark.parametrize("family", PRESETS)
def test_every_preset_ships_a_small_safetensors_checkpoint(family):
    folder = checkpoint(family)
    assert (folder / "config.json").is_file() and (folder / "README.md").is_file()
    weights = folder / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= MAX_BYTES
    assert not (folder / "train_state.pt").exists(), "optimizer state is not shipped"
    metrics = read_metrics(family)
    assert metrics["family"] == family and metrics["epochs_done"] == metrics["epochs"]
    assert 500_000 <= metrics["params"] <= 1_000_000


@pytest.mark.parametrize("family", PRESETS)
def test_model_card_states_the_measured_accuracy_and_recipe(family):
    card = (checkpoint(family) / "README.md").read_text()
    metrics = read_metrics(family)
    assert f"{100 * metrics['accuracy']:.2f}%" in card
    assert family in card and "AdamW" in card and f"{metrics['epochs']}" in card


def test_readme_ablation_table_matches_the_model_cards():
    readme = (ROOT / "README.md").read_text()
    assert ablation_table(CHECKPOINTS) in readme


@pytest.fixture(scope="module")
def cifar_slice(shared_data: Path):
    """A fixed, class-balanced 1,000-image slice of the CIFAR-10 test split."""
    return load_cifar_zip(shared_data / "cifar10-jpeg.zip", "test", limit=1000, cache_dir=None)


@pytest.mark.parametrize("family", PRESETS)
def test_bundled_checkpoint_reaches_its_accuracy_floor(family, cifar_slice):
    loaded = posenc.load(str(checkpoint(family)))
    assert loaded.model.mechanisms == cifar_model(family).mechanisms and loaded.labels[3] == "cat"
    pp = loaded.preprocess
    with torch.inference_mode():
        logits = torch.cat([loaded.model(normalize(x, pp.mean, pp.std)) for x in cifar_slice.images.split(250)])
    accuracy = 100 * (logits.argmax(-1) == cifar_slice.labels).float().mean().item()
    assert accuracy >= FLOORS[family], f"{family}: {accuracy:.1f} % on the 1,000-image slice"
