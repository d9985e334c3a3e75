"""RoPE coordinate scale (angles, models, the sweep) and accuracy on labelled folders, against independent computations."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import posenc
from posenc import measure
from posenc.cli import main
from posenc.encodings import rope_2d_angles, rope_centered_angles, rope_mixed_angles
from posenc.models import Eva, EvaConfig, ViTConfig, build_model
from posenc.synsets import IMAGENET_SYNSETS, synset_index

pytestmark = pytest.mark.timeout(120)

SCALES = (0.5, 0.75, 1.25, 2.0)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def vit_rope(num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(24, 32), patch_size=8, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2,
                    pos_embed="none", rope=True)
    return _perturbed(build_model(cfg))


def eva(num_classes: int = 5, **fields) -> Eva:
    torch.manual_seed(0)
    cfg = EvaConfig(img_size=(40, 24), patch_size=8, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2,
                    use_rot_pos_emb=True, **fields)
    return _perturbed(Eva(cfg))


# ------------------------------------------------------------------------------------ angles at scale s


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_axial_angles_at_scale_s_are_those_of_a_grid_whose_coordinates_are_scaled(s, indexing):
    grid = (5, 3)
    # ref_grid = s * grid puts position i at i * s: the scaled grid, through the other code path
    expected = rope_2d_angles(grid, 16, 100.0, indexing=indexing, ref_grid=(grid[0] * s, grid[1] * s))
    torch.testing.assert_close(rope_2d_angles(grid, 16, 100.0, indexing=indexing, scale=s), expected)
    # EVA-02: rescaled to its reference grid first, then by s
    torch.testing.assert_close(rope_2d_angles(grid, 16, 10000.0, ref_grid=(16, 16), scale=s),
                               rope_2d_angles(grid, 16, 10000.0, ref_grid=(16 * s, 16 * s)))


@pytest.mark.parametrize("s", SCALES)
def test_centred_angles_at_scale_s_match_dinov3_coordinates_times_s(s):
    grid, head_dim, base = (4, 6), 16, 100.0
    found = rope_centered_angles(grid, head_dim, base, scale=s).numpy()
    for r in range(grid[0]):
        for c in range(grid[1]):
            y = (2 * (r + 0.5) / grid[0] - 1) * s  # DINOv3's coordinates in [-1, 1], box-jittered by s
            x = (2 * (c + 0.5) / grid[1] - 1) * s
            periods = base ** (4 * np.arange(head_dim // 4) / head_dim)
            expected = np.concatenate([2 * np.pi * y / periods, 2 * np.pi * x / periods])
            np.testing.assert_allclose(found[r * grid[1] + c], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", SCALES)
def test_mixed_angles_at_scale_s_equal_frequencies_times_s(s):
    freqs = torch.randn(2, 3, 2, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rope_mixed_angles(freqs, (4, 5), scale=s), rope_mixed_angles(freqs * s, (4, 5)))


# ------------------------------------------------------------------------------------ the model call


def test_vit_rope_scale_equals_a_model_whose_angle_buffer_holds_the_scaled_grid():
    model = vit_rope()
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    other = copy.deepcopy(model)
    other.rope_angles = rope_2d_angles((3, 4), 16, model.config.rope_base, ref_grid=(6, 8))  # coordinates x 2
    with torch.inference_mode():
        torch.testing.assert_close(model(x, rope_scale=1.0), model(x))
        torch.testing.assert_close(model(x, rope_scale=2.0), other(x))
        assert not torch.allclose(model(x, rope_scale=2.0), model(x))
        seen = model.inspect(x, rope_scale=2.0)
    torch.testing.assert_close(seen.rope_angles, other.rope_angles)
    torch.testing.assert_close(seen.logits, other(x))


@pytest.mark.parametrize("kind", ["axial", "dinov3", "mixed"])
def test_eva_rope_scale_equals_a_model_built_for_the_scaled_coordinates(kind):
    s = 1.5
    if kind == "axial":
        model, fields = eva(ref_feat_shape=(4, 4)), dict(ref_feat_shape=(6, 6))  # 4 * s
    elif kind == "dinov3":
        model, fields = eva(rope_type="dinov3", rope_rotate_half=True), None
    else:
        model, fields = eva(rope_type="mixed"), None
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(x)
        torch.testing.assert_close(model(x, rope_scale=1.0), plain)
        scaled = model(x, rope_scale=s)
        assert not torch.allclose(scaled, plain)
        if kind == "axial":  # the same weights with the reference grid scaled by s
            other = Eva(dataclasses.replace(model.config, **fields)).eval()
            other.load_state_dict(model.state_dict())
            torch.testing.assert_close(scaled, other(x))
        elif kind == "mixed":  # the same weights with the learned frequencies times s
            other = copy.deepcopy(model)
            other.rope.freqs.mul_(s)
            torch.testing.assert_close(scaled, other(x))
        else:  # the angles the blocks used are the centred ones times s
            seen = model.inspect(x, rope_scale=s)
            torch.testing.assert_close(seen.rope_angles, rope_centered_angles(
                (5, 3), 16, model.config.rope_temperature, indexing=model.config.rope_grid_indexing, scale=s))
            torch.testing.assert_close(seen.logits, scaled)


# ------------------------------------------------------------------------------------ the sweep


@pytest.mark.parametrize("make", [vit_rope, lambda: eva(rope_type="dinov3", rope_rotate_half=True)])
def test_rope_scale_sweep_compares_each_scale_with_the_plain_prediction(make):
    model = make()
    h, w = model.config.img_size
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, -1, 3])
    with torch.inference_mode():
        found = measure.rope_scale_sweep(model, x, (0.5, 1.0, 2.0), labels=labels)
        ref = model(x)
        at2 = model(x, rope_scale=2.0)
    one = found[1.0]
    assert one["top1_agreement"].tolist() == [1.0] * 3
    torch.testing.assert_close(one["kl"], torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(one["p_original"], ref.double().softmax(-1).amax(-1))
    assert one["top1"].tolist() == ref.argmax(-1).tolist()
    p, q = ref.double().softmax(-1), at2.double().softmax(-1)
    torch.testing.assert_close(found[2.0]["kl"], (p * (p.log() - q.log())).sum(-1))
    assert found[2.0]["top1_agreement"].tolist() == (at2.argmax(-1) == ref.argmax(-1)).double().tolist()
    assert found[2.0]["top1_accuracy"].tolist() == [float(at2[0].argmax() == 0), float(at2[2].argmax() == 3)]
    assert found[2.0]["top5_accuracy"].tolist() == [1.0, 1.0]  # 5 classes: the label is always in the top 5


def test_rope_scale_sweep_of_a_headless_model_is_the_feature_cosine():
    model = eva(num_classes=0, rope_type="mixed")
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        found = measure.rope_scale_sweep(model, x, (1.0, 0.5))
        expected = torch.nn.functional.cosine_similarity(model(x).double(), model(x, rope_scale=0.5).double())
    assert set(found[0.5]) == {"cosine"}
    torch.testing.assert_close(found[1.0]["cosine"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(found[0.5]["cosine"], expected)


def test_rope_scale_sweep_does_not_apply_without_a_rotary_mechanism():
    torch.manual_seed(0)
    model = build_model(ViTConfig(img_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2))
    with pytest.raises(measure.NotApplicable, match="no rotary mechanism"):
        measure.rope_scale_sweep(model, torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------------ labels


def test_synset_order_is_the_sorted_one_and_matches_the_shared_reference(shared_data):
    assert len(IMAGENET_SYNSETS) == 1000 and list(IMAGENET_SYNSETS) == sorted(IMAGENET_SYNSETS)
    assert synset_index("n01440764") == 0 and synset_index("n15075141") == 999 and synset_index("n00000000") is None
    reference = shared_data / "imagenet-samples" / "timm_reference.json"
    if not reference.is_file():
        pytest.skip(f"{reference} is absent (shared data)")
    images = json.loads(reference.read_text())["images"]
    assert len(images) == 250
    paths = [reference.parent / name for name in images]
    found, info = measure.folder_labels(paths, [f"class {i}" for i in range(1000)], root=reference.parent)
    assert found == [v["true_index"] for v in images.values()]
    assert info == {"source": "synset prefix in the file name", "labelled": 250, "unresolved": []}


def test_synsets_agree_with_timms_list():
    timm = pytest.importorskip("timm")
    listed = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert list(IMAGENET_SYNSETS) == listed


def test_class_index_reads_indices_synsets_and_names():
    names = ["tench, Tinca tinca", "great white shark", "airplane"]
    assert measure.class_index("2", names) == 2 and measure.class_index("3", names) is None
    assert measure.class_index("Great_White-shark", names) == 1
    assert measure.class_index("tinca tinca", names) == 0
    assert measure.class_index("n01440764", names) is None  # a synset id needs the 1000 ImageNet classes
    assert measure.class_index("n01440764", [str(i) for i in range(1000)]) == 0
    assert measure.class_index("zebra", names) is None


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_image_folder_layout_and_labels_file_label_the_images(tmp_path):
    names = ["cat", "dog", "frog"]
    for i, cls in enumerate(["cat", "dog", "dog", "zebra"]):
        _photo(tmp_path / "tree" / cls / f"{i}.png", i)
    folder = measure.list_images(tmp_path / "tree")
    assert [p.relative_to(folder.root).as_posix() for p in folder.images] == [
        "cat/0.png", "dog/1.png", "dog/2.png", "zebra/3.png"]
    found, info = measure.folder_labels(folder.images, names, root=folder.root)
    assert found == [0, 1, 1, -1]
    assert info == {"source": "class folders", "labelled": 3, "unresolved": ["zebra"]}
    labels = tmp_path / "labels.tsv"
    labels.write_text("# name<TAB>class\ncat/0.png\t2\n1.png,frog\n")
    found, info = measure.folder_labels(folder.images, names, root=folder.root, labels_file=labels)
    assert found == [2, 2, -1, -1] and info["source"] == "labels file"
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(ValueError, match="line 1"):
        measure.read_labels_file(tmp_path / "bad.txt")


def _saved(model: torch.nn.Module, folder: Path, size: tuple[int, int]) -> Path:
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["preprocess"]["input_size"] = list(size)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_measure_folder_reports_the_rope_sweep_and_accuracy_as_a_direct_computation(tmp_path, capsys):
    model_dir = _saved(vit_rope(num_classes=6), tmp_path / "model", (24, 32))
    images = tmp_path / "images"
    paths = [_photo(images / f"{i}.png", i) for i in range(5)]
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{i % 6}\n" for i in range(4)))  # the last one unlabelled
    out = tmp_path / "out"
    args = ["measure", "--model", str(model_dir), "--images", str(images), "--out", str(out), "--batch", "2",
            "--labels", str(tmp_path / "labels.csv"), "--rope-scales", "0.5,2"]
    assert main(args) == 0
    assert "labelled 4" in capsys.readouterr().err
    record = json.loads((out / "measures.json").read_text())
    assert record["labels"] == {"source": "labels file", "labelled": 4, "unresolved": []}
    assert "rope_scale_sweep.png" in record["plots"] and (out / "rope_scale_sweep.png").is_file()
    rows = {row["scale"]: row for row in record["rope_scale_sweep"]}
    assert sorted(rows) == [0.5, 1.0, 2.0]
    assert rows[1.0]["top1_agreement"] == 1.0 and rows[1.0]["kl"] == 0.0

    loaded = posenc.load(str(model_dir))
    x = torch.stack([loaded.pixels(p)[0] for p in paths])  # 5, 3, 24, 32
    y = torch.tensor([0, 1, 2, 3])
    with torch.inference_mode():
        ref, at2 = loaded.model(x), loaded.model(x, rope_scale=2.0)
        plain = loaded.model(x, position=False)
    assert rows[2.0]["top1_agreement"] == pytest.approx(float((at2.argmax(-1) == ref.argmax(-1)).double().mean()),
                                                        abs=1e-5)
    assert rows[2.0]["top1_accuracy"] == pytest.approx(float((at2[:4].argmax(-1) == y).double().mean()), abs=1e-5)
    top5 = (at2[:4].topk(5, -1).indices == y[:, None]).any(-1).double().mean()
    assert rows[2.0]["top5_accuracy"] == pytest.approx(float(top5), abs=1e-5)
    accuracy = record["position_reliance"]["accuracy"]
    assert accuracy["original"]["top1_accuracy"] == pytest.approx(float((ref[:4].argmax(-1) == y).double().mean()),
                                                                   abs=1e-5)
    assert accuracy["no_position"]["top1_accuracy"] == pytest.approx(
        float((plain[:4].argmax(-1) == y).double().mean()), abs=1e-5)
    native = [r for r in record["resolution_sweep"] if r["size"] == [24, 32]][0]
    assert native["top1_accuracy"] == accuracy["original"]["top1_accuracy"]


def test_measure_folder_says_the_rope_sweep_does_not_apply_without_rope(tmp_path):
    torch.manual_seed(0)
    model = build_model(ViTConfig(img_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2))
    loaded = posenc.load(str(_saved(model, tmp_path / "m", (16, 16))))
    paths = [_photo(tmp_path / "i" / f"{i}.png", i) for i in range(2)]
    result = measure.measure_folder(loaded, paths, sizes=[(16, 16)])
    record = result.to_json()
    assert record["rope_scale_sweep"] == "not applicable: no rotary mechanism"
    assert record["labels"]["labelled"] == 0 and "accuracy" not in record["position_reliance"]
    assert not math.isnan(record["position_reliance"]["p_top1"])


def test_real_deit_tiny_accuracy_on_the_shared_photos_matches_timms_reference(shared_data):
    model_dir = shared_data / "deit_tiny_patch16_224.fb_in1k"
    photos = shared_data / "imagenet-samples"
    if not (model_dir.is_dir() and (photos / "timm_reference.json").is_file()):
        pytest.skip("the real DeiT-Tiny or the shared photos are absent (shared data)")
    loaded = posenc.load(str(model_dir))
    folder = measure.list_images(photos, limit=8)
    labels, info = measure.folder_labels(folder.images, loaded.labels, root=folder.root)
    assert info["labelled"] == 8
    result = measure.measure_folder(loaded, folder.images, sizes=[(224, 224)], seeds=(0,), labels=labels, batch=8)
    reference = json.loads((photos / "timm_reference.json").read_text())["images"]
    expected = np.mean([v["top5_index"][0] == v["true_index"] for n, v in reference.items()
                        if n in {p.name for p in folder.images}])
    assert result.reliance["accuracy"]["original"]["top1_accuracy"] == pytest.approx(expected)
