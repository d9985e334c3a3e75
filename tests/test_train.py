"""Training: the CIFAR zip reader, batched augmentation, schedule, presets, and short end-to-end runs.

End-to-end runs use a synthetic ImageFolder made in a temporary folder (always available) and a few hundred
images of the real CIFAR-10 zip (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data.distributed import DistributedSampler

from posenc import cli, train
from posenc.models import ARCHITECTURES, build_model

#: The position mechanisms each CIFAR-10 preset builds.
PRESET_MECHANISMS = {"none": (), "learned": ("learned",), "sincos": ("sincos",), "relative": ("rel_table",),
                     "windowed": ("rel_table",), "rope": ("rope_axial",)}
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}  # ImageFolder sorts class names


def tiny(family: str):
    """A few-thousand-parameter model of ``family`` for fast runs."""
    if family == "windowed":
        return train.cifar_model(family, embed_dim=16, depths=(2, 1), num_heads=(1, 2))
    return train.cifar_model(family, embed_dim=32, depth=1, num_heads=2)


def run_cli(*argv: str) -> int:
    """``python -m posenc train ARGV`` in this process; returns the exit status."""
    return cli.main(["train", *argv])


def load_saved(folder: Path):
    """The model in a Hub-layout output folder, through the class its config.json names."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    return ARCHITECTURES[model_type].model.from_pretrained(folder)


def accuracy_of(model, data: train.ImageSet) -> float:
    """Top-1 accuracy of a loaded model on decoded images, normalised with the model's own preprocess."""
    pp = model.config.preprocess
    with torch.no_grad():
        predicted = model.eval()(train.normalize(data.images, pp.mean, pp.std)).argmax(-1)
    return (predicted == data.labels).float().mean().item()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ folders of noisy 40x48 PNGs in three colour classes: learnable, but not trivially."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 60, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def folder_config(image_folder: Path, out: Path, **changes) -> train.TrainConfig:
    settings = dict(data=image_folder, out=out, epochs=1, batch_size=8, warmup_epochs=0.5, seed=3)
    return train.TrainConfig(**{**settings, **changes})


# ------------------------------------------------------------------------------------------------------ data


def test_cifar_zip_reader_labels_a_known_file_with_its_class(shared_data):
    path = shared_data / "cifar10-jpeg.zip"
    with zipfile.ZipFile(path) as archive:
        names, labels = train.cifar_zip_members(archive, "test")
        index = names.index("test/horse/0642.jpg")
        expected = np.array(Image.open(archive.open("test/horse/0642.jpg")).convert("RGB"))
        decoded = train.decode_zip_images(archive, [names[index]])
    assert len(names) == 10_000 and names == sorted(names)
    assert train.CIFAR10_LABELS[labels[index]] == "horse"
    assert torch.bincount(labels).tolist() == [1000] * 10
    torch.testing.assert_close(decoded[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_cifar_zip_limit_gives_a_balanced_deterministic_subset(shared_data):
    first = train.load_cifar_zip(shared_data / "cifar10-jpeg.zip", "train", limit=25)
    again = train.load_cifar_zip(shared_data / "cifar10-jpeg.zip", "train", limit=25)
    assert first.images.shape == (25, 3, 32, 32) and first.images.dtype == torch.uint8
    assert sorted(torch.bincount(first.labels).tolist()) == [2] * 5 + [3] * 5
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)


def test_cifar_zip_split_is_cached_and_read_back_equal(shared_data, tmp_path):
    path = shared_data / "cifar10-jpeg.zip"
    decoded = train.load_cifar_zip(path, "test", cache_dir=tmp_path)
    cached = list(tmp_path.glob("cifar10-jpeg-*-test.pt"))
    again = train.load_cifar_zip(path, "test", cache_dir=tmp_path)
    assert len(cached) == 1 and str(path.stat().st_size) in cached[0].name
    assert decoded.images.shape == (10_000, 3, 32, 32)
    torch.testing.assert_close(again.images, decoded.images, rtol=0, atol=0)
    torch.testing.assert_close(again.labels, decoded.labels)


def test_balanced_subset_takes_classes_in_turn_earliest_first():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0, 2, 2])
    assert train.balanced_subset(labels, 5).tolist() == [0, 1, 4, 5, 6]
    assert train.balanced_subset(labels, 7).tolist() == [0, 1, 2, 4, 5, 6, 8]
    assert train.balanced_subset(labels, 50).tolist() == list(range(10))


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_random_crop_takes_each_image_from_a_window_of_its_padded_copy(mode):
    images = torch.rand(16, 3, 8, 8)
    crops = train.random_crop(images, 2, torch.Generator().manual_seed(0), mode=mode)
    padded = F.pad(images, (2,) * 4, mode="constant" if mode == "zero" else mode)
    offsets = []
    for crop, source in zip(crops, padded):
        found = [(y, x) for y in range(5) for x in range(5) if torch.equal(source[:, y : y + 8, x : x + 8], crop)]
        assert found, "a crop is not a window of the padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 3  # offsets differ per image


def test_random_flip_mirrors_each_image_or_keeps_it():
    images = torch.rand(400, 3, 4, 4)
    flipped = train.random_flip(images, torch.Generator().manual_seed(0))
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert bool((mirrored | kept).all())
    assert 150 < int(mirrored.sum()) < 250


def test_random_erasing_zeroes_one_rectangle_in_each_image():
    images = torch.ones(64, 3, 32, 32)
    erased = train.random_erasing(images, 1.0, torch.Generator().manual_seed(0))
    for image in erased:
        hole = image[0] == 0
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 0 < hole.sum() == len(rows) * len(cols)  # the zeros fill their bounding box: a rectangle
        assert bool((image[:, hole] == 0).all())
    assert 0.1 < (erased == 0).float().mean() < 0.25  # areas are uniform in 2-33 %: 17.5 % on average
    torch.testing.assert_close(train.random_erasing(images, 0.0, torch.Generator()), images)


def test_cutmix_targets_weigh_each_class_by_its_pixel_share():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32)  # image i is filled with i
    targets = F.one_hot(torch.arange(4), 4).float()
    mixed, mixed_targets = train.mix_batch(images, targets, np.random.default_rng(1), mixup=0.0, cutmix=1.0)
    for i in range(4):
        partner_share = (mixed[i] == 3 - i).float().mean()
        assert mixed_targets[i, 3 - i] == pytest.approx(partner_share.item())
        assert mixed_targets[i, i] == pytest.approx(1 - partner_share.item())


def test_mixup_blends_images_and_targets_with_the_same_weight():
    images, targets = torch.rand(6, 3, 8, 8), F.one_hot(torch.arange(6), 6).float()
    mixed, mixed_targets = train.mix_batch(images, targets, np.random.default_rng(0), mixup=0.8, cutmix=0.0)
    lam = mixed_targets[0, 0].item()
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(6))


# ------------------------------------------------------------------------------------------- recipe, presets


def test_lr_factor_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    factor = [train.lr_factor(s, total_steps=110, warmup_steps=10, min_ratio=0.01) for s in range(111)]
    assert factor[0] == pytest.approx(0.1) and factor[9] == pytest.approx(1.0)
    assert factor[10] == pytest.approx(1.0) and factor[60] == pytest.approx(0.505)
    assert factor[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factor[10:], factor[11:]))


@pytest.mark.parametrize("family", ["learned", "relative", "windowed"])
def test_param_groups_exempt_norms_biases_and_position_tables(family):
    model = build_model(tiny(family))
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert any("qkv.weight" in n for n in decayed)
    position = "pos_embed" if family == "learned" else "relative_position_bias_table"
    assert any(n.endswith(position) for n in skipped)
    assert len(skipped) + len(decayed) == len(list(model.parameters()))


@pytest.mark.parametrize(("size", "world"), [(10, 3), (12, 4), (7, 2)])
def test_shard_indices_match_distributed_sampler(size, world):
    order = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    for rank in range(world):
        sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=False)
        assert train.shard_indices(order, rank, world).tolist() == [order[i].item() for i in sampler]


@pytest.mark.parametrize("family", train.PRESETS)
def test_cifar_preset_encodes_its_position_at_a_shared_size(family):
    config = train.cifar_model(family)
    model = build_model(config)
    assert model.mechanisms == PRESET_MECHANISMS[family]
    assert 700_000 <= model.num_params() <= 900_000
    assert config.labels == train.CIFAR10_LABELS and config.img_size == (32, 32) and config.patch_size == 4
    assert config.preprocess.input_size == (32, 32) and config.preprocess.crop_pct == 1.0
    torch.testing.assert_close(torch.tensor(config.preprocess.mean), torch.tensor(train.CIFAR10_MEAN))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_family_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="rope"):
        train.cifar_model("alibi")


# ------------------------------------------------------------------------------------------------ end to end


def test_cli_trains_on_an_image_folder_and_saves_a_loadable_model(image_folder, tmp_path, caplog):
    out = tmp_path / "rope"
    with caplog.at_level(logging.INFO, logger="posenc.train"):
        status = run_cli("--family", "rope", "--data", str(image_folder), "--out", str(out), "--epochs", "1",
                         "--batch-size", "12", "--warmup-epochs", "0.5")
    assert status == 0
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert any(r.getMessage().startswith("epoch 1/1 loss ") and " acc " in r.getMessage() for r in caplog.records)
    model = load_saved(out)
    assert model.mechanisms == ("rope_axial",) and model.config.labels == tuple(sorted(COLOURS))
    val = train.load_image_folder(image_folder / "val", (32, 32))
    metrics = json.loads((out / "metrics.json").read_text())
    assert accuracy_of(model, val) == pytest.approx(metrics["accuracy"])
    assert model(train.normalize(val.images[:2], train.CIFAR10_MEAN, train.CIFAR10_STD)).shape == (2, 3)


def test_cli_trains_on_cifar_zip_subset(shared_data, tmp_path):
    out = tmp_path / "windowed"
    status = run_cli("--family", "windowed", "--data", str(shared_data / "cifar10-jpeg.zip"), "--out", str(out),
                     "--epochs", "1", "--train-limit", "300", "--test-limit", "100", "--batch-size", "100")
    assert status == 0
    model = load_saved(out)
    metrics = json.loads((out / "metrics.json").read_text())
    test = train.load_cifar_zip(shared_data / "cifar10-jpeg.zip", "test", limit=100)
    assert model.architecture == "swin" and model.config.labels == train.CIFAR10_LABELS
    assert metrics["train_images"] == 300 and metrics["test_images"] == 100
    assert accuracy_of(model, test) == pytest.approx(metrics["accuracy"])


def test_model_card_and_metrics_state_the_measured_accuracy_and_recipe(image_folder, tmp_path):
    out = tmp_path / "relative"
    returned = train.train(folder_config(image_folder, out, family="relative"), tiny("relative"))
    model = load_saved(out)
    measured = accuracy_of(model, train.load_image_folder(image_folder / "val", (32, 32)))
    metrics = json.loads((out / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    assert metrics["accuracy"] == pytest.approx(measured) == pytest.approx(returned["accuracy"])
    assert f"**{100 * measured:.2f}%**" in card
    assert metrics["params"] == model.num_params() and f"{metrics['params']:,}" in card
    for fact in ("relative", "AdamW", "cosine", "label smoothing", "torch", "threads", "wall time", "seed"):
        assert fact in card
    assert metrics["epochs"] == 1 and metrics["batch_size"] == 8 and metrics["torch_version"] == torch.__version__
    assert metrics["hardware"]["threads"] == torch.get_num_threads() and metrics["wall_time_s"] > 0


def test_same_seed_gives_identical_weights_and_another_seed_does_not(image_folder, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        torch.manual_seed(ord(name))  # the run must not depend on the caller's global RNG
        train.train(folder_config(image_folder, tmp_path / name, family="learned", seed=seed), tiny("learned"))
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["pos_embed"], c["pos_embed"])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(image_folder, tmp_path):
    recipe = dict(family="windowed", epochs=2, erasing=0.5, mixup=0.4, cutmix=1.0)
    stopped = train.train(folder_config(image_folder, tmp_path / "resumed", stop_after=1, **recipe), tiny("windowed"))
    assert stopped["epochs_done"] == 1 and not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train.train(folder_config(image_folder, tmp_path / "resumed", resume=True, **recipe), tiny("windowed"))
    straight = train.train(folder_config(image_folder, tmp_path / "straight", **recipe), tiny("windowed"))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a, b = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_earlier_state_is_kept_unless_resuming_with_the_same_recipe(image_folder, tmp_path):
    out = tmp_path / "run"
    train.train(folder_config(image_folder, out, family="none", epochs=2, stop_after=1), tiny("none"))
    with pytest.raises(ValueError, match="--resume"):
        train.train(folder_config(image_folder, out, family="none", epochs=2), tiny("none"))
    with pytest.raises(ValueError, match="epochs"):
        train.train(folder_config(image_folder, out, family="none", epochs=3, resume=True), tiny("none"))


def test_cli_reports_bad_data_path_with_status_2(tmp_path, caplog):
    status = run_cli("--family", "none", "--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert status == 2
    assert "train/ and val/" in caplog.text
