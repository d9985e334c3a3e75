"""posenc.measure: each measurement against an independent computation on tiny random models, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import posenc
from posenc import measure, views, viz
from posenc.cli import main
from posenc.models import SwinConfig, ViTConfig, build_model

pytestmark = pytest.mark.timeout(120)

TINY = {
    "vit_cls_dist": ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                              distilled=True),
    "vit_rope_avg": ViTConfig(img_size=(24, 32), patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                              pos_embed="none", rope=True, class_token=False, global_pool="avg"),
    "swin_shifted": SwinConfig(img_size=32, patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2),
                               num_heads=(2, 2), window_size=4),
}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY[name]).eval()
    with torch.no_grad():  # perturbed so no attention is uniform and no bias is zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def pixels(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = model.config.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ attention distance


def loop_distance(trace, num_prefix: int, image_size, image: int, head: int) -> float:
    """Mean attention distance of one head by a direct loop over (query patch, key patch) pairs."""
    h, w = trace.grid
    ph, pw = image_size[0] / h, image_size[1] / w
    total = 0.0
    for r in range(h):
        for c in range(w):
            if trace.window is None:
                row = trace.attn[image, head, num_prefix + r * w + c, num_prefix:].tolist()
                keys = [(k // w, k % w) for k in range(h * w)]
            else:
                where = viz.swin_window_keys((r, c), (h, w), trace.window, trace.shift)
                row = trace.attn[image, where.window_index, head, where.query_index].tolist()
                keys = where.keys.tolist()
            for a, (kr, kc) in zip(row, keys):
                total += a * math.hypot((kr - r) * ph, (kc - c) * pw)
    return total / (h * w)


@pytest.mark.parametrize("name", list(TINY))
def test_mean_attention_distance_matches_a_loop_over_patch_pairs(name):
    model = tiny(name)
    x = pixels(model)
    size = tuple(x.shape[-2:])
    with torch.inference_mode():
        seen = model.inspect(x)
    found = measure.mean_attention_distance(seen)
    assert len(found) == len(seen.blocks)
    for trace, dist in zip(seen.blocks, found):
        heads = trace.attn.shape[-3]
        expected = [[loop_distance(trace, seen.num_prefix_tokens, size, b, k) for k in range(heads)] for b in range(2)]
        torch.testing.assert_close(dist, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4)
        assert dist.min() > 0


def test_attention_distance_drops_prefix_attention_without_renormalising():
    model = tiny("vit_cls_dist")
    with torch.inference_mode():
        seen = model.inspect(pixels(model))
    trace = seen.blocks[0]
    # all attention on the cls token: no patch-to-patch distance is left
    onto_cls = torch.zeros_like(trace.attn)
    onto_cls[..., 0] = 1.0
    moved = type(trace)(**{**trace.__dict__, "attn": onto_cls})
    assert measure.block_attention_distance(moved).abs().max() == 0


# ------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("name", ["vit_cls_dist", "swin_shifted"])
def test_patch_filters_are_the_principal_components_of_the_conv_weights(name):
    weight = measure.patch_conv(tiny(name)).weight.detach()
    rgb, explained = measure.patch_embedding_filters(weight, k=5)
    flat = weight.reshape(weight.shape[0], -1).double().numpy()
    cov = np.cov(flat, rowvar=False, bias=True)  # 3*p*q, 3*p*q
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    np.testing.assert_allclose(explained, (values[order] / values.sum())[:5], rtol=1e-4, atol=1e-6)
    p, q = weight.shape[-2:]
    for i in range(5):
        v = vectors[:, order[i]].reshape(3, p, q).transpose(1, 2, 0)
        scaled = (v - v.min()) / (v.max() - v.min())
        flipped = (-v - (-v).min()) / ((-v).max() - (-v).min())
        assert min(np.abs(rgb[i] - scaled).max(), np.abs(rgb[i] - flipped).max()) < 1e-4


def test_patch_filters_are_not_applicable_without_a_plain_patch_conv():
    with pytest.raises(measure.NotApplicable, match="no plain patch-embedding conv"):
        measure.patch_conv(torch.nn.Sequential(torch.nn.Linear(3, 3)))


# ------------------------------------------------------------------------------------ reliance


def test_shuffle_moves_whole_patches_to_their_permuted_places():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    perm = torch.tensor([5, 0, 3, 1, 2, 4])  # a 2x3 grid of 4x4 patches
    out = measure.shuffle_patches(x, (4, 4), perm)
    for t, s in enumerate(perm.tolist()):
        (r, c), (sr, sc) = divmod(t, 3), divmod(s, 3)
        moved, source = out[..., 4 * r : 4 * r + 4, 4 * c : 4 * c + 4], x[..., 4 * sr : 4 * sr + 4, 4 * sc : 4 * sc + 4]
        assert torch.equal(moved, source)
    assert torch.equal(measure.shuffle_patches(x, (4, 4), torch.arange(6)), x)


@pytest.mark.parametrize("name", list(TINY))
def test_identity_shuffle_changes_nothing(name, monkeypatch):
    model = tiny(name)
    x = pixels(model)
    monkeypatch.setattr(measure, "seeded_permutation", lambda n, seed: torch.arange(n))
    with torch.inference_mode():
        found = measure.position_reliance(model, x, (8, 8) if "vit" in name else (2, 2), seeds=(0, 1))
    for seed in found["shuffle"]:
        assert seed["top1_agreement"].tolist() == [1.0, 1.0]
        torch.testing.assert_close(seed["kl"], torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(seed["p_original"], found["p_top1"])


def test_removing_position_from_a_model_without_position_changes_nothing():
    model = build_model(ViTConfig(**{**TINY["vit_cls_dist"].__dict__, "pos_embed": "none"})).eval()
    assert model.mechanisms == ()
    x = pixels(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, position=False), model(x), rtol=0, atol=0)
        found = measure.position_reliance(model, x, (8, 8))
    assert found["no_position"]["top1_agreement"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(found["no_position"]["kl"], torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(found["no_position"]["p_original"], found["p_top1"])


@pytest.mark.parametrize("name", list(TINY))
def test_reliance_figures_match_a_direct_computation(name):
    model = tiny(name)
    x = pixels(model)
    with torch.inference_mode():
        found = measure.position_reliance(model, x, (8, 8) if "vit" in name else (2, 2), seeds=(3,))
        p = model(x).double().softmax(-1)
        q = model(x, position=False).double().softmax(-1)
    top = p.argmax(-1)
    expected_kl = [sum(pi * math.log(pi / qi) for pi, qi in zip(p[b].tolist(), q[b].tolist())) for b in range(2)]
    np.testing.assert_allclose(found["no_position"]["kl"].numpy(), expected_kl, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(found["no_position"]["p_original"].numpy(), [q[b, top[b]].item() for b in range(2)])
    assert found["no_position"]["top1_agreement"].tolist() == (q.argmax(-1) == top).double().tolist()
    assert found["no_position"]["kl"].min() > 0  # every tiny model here uses position


def test_headless_outputs_are_compared_by_cosine_similarity():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    found = measure.compare_outputs(a, b, headless=True)
    assert list(found) == ["cosine"]
    torch.testing.assert_close(found["cosine"], torch.tensor([0.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------ resolution sweep


def test_resolution_sweep_reports_each_size_against_the_native_top1():
    model = tiny("vit_cls_dist")
    inputs = {(32, 32): pixels(model), (16, 24): pixels(model, seed=2)[..., :16, :24]}
    with torch.inference_mode():
        found = measure.resolution_sweep(model, inputs, (32, 32))
        native = model(inputs[(32, 32)]).softmax(-1)
        small = model(inputs[(16, 24)]).softmax(-1)
    torch.testing.assert_close(found[(32, 32)]["p_top1"].float(), native.max(-1).values)
    assert found[(32, 32)]["agrees"].tolist() == [1.0, 1.0]
    p_native_class = small.gather(-1, native.argmax(-1, keepdim=True))[:, 0]
    torch.testing.assert_close(found[(16, 24)]["p_native_class"].float(), p_native_class)
    assert found[(16, 24)]["top1"].tolist() == small.argmax(-1).tolist()


# ------------------------------------------------------------------------------------ decodability


def test_decodability_r2_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    c, tokens = 6, 12
    targets = torch.tensor(rng.uniform(0, 32, size=(tokens, 2)))
    mix = rng.normal(size=(2, c))
    images = [targets.numpy() @ mix + rng.normal(scale=3.0, size=(tokens, c)) for _ in range(10)]
    held = [i % 5 == 4 for i in range(10)]
    dec = measure.Decodability(ridge=0.05)
    for start in (0, 4, 7):  # uneven batches
        chunk = slice(start, {0: 4, 4: 7, 7: 10}[start])
        dec.add(0, torch.tensor(np.stack(images[chunk])), targets, held[chunk])
    found = dec.r2()[0]

    x_tr = np.concatenate([im for im, h in zip(images, held) if not h])
    x_te = np.concatenate([im for im, h in zip(images, held) if h])
    y_tr, y_te = np.tile(targets.numpy(), (8, 1)), np.tile(targets.numpy(), (2, 1))
    mx, my = x_tr.mean(0), y_tr.mean(0)
    xc = x_tr - mx
    lam = 0.05 * np.trace(xc.T @ xc) / c
    aug_x = np.concatenate([xc, math.sqrt(lam) * np.eye(c)])
    aug_y = np.concatenate([y_tr - my, np.zeros((c, 2))])
    w = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    pred = (x_te - mx) @ w + my
    expected = 1 - ((y_te - pred) ** 2).sum(0) / ((y_te - y_te.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-8)
    assert 0.2 < expected.min() < 1.0


@pytest.mark.parametrize("name", ["vit_cls_dist", "swin_shifted"])
def test_block_outputs_give_every_blocks_patch_tokens(name):
    model = tiny(name)
    x = pixels(model)
    with torch.inference_mode(), measure.block_outputs(model) as outs:
        seen = model.inspect(x)
    assert len(outs) == len(seen.blocks)
    for out, trace in zip(outs, seen.blocks):
        tokens = measure.patch_tokens(out, trace)
        assert tokens.shape[:2] == (2, trace.grid[0] * trace.grid[1])
    assert not any(m._forward_hooks for m in model.modules())  # hooks are gone after the with


# ------------------------------------------------------------------------------------ folders and the CLI


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny("vit_cls_dist").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["preprocess"]["input_size"] = [32, 32]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_empty_folder_gets_a_clear_message(tmp_path, capsys, model_dir):
    (tmp_path / "notes.txt").write_text("not a photo")
    assert main(["measure", "--model", str(model_dir), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no image files" in err and "1 other file(s)" in err
    assert main(["measure", "--model", str(model_dir), "--images", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_folder_of_only_unreadable_images_gets_a_clear_message(tmp_path, capsys, model_dir):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(["measure", "--model", str(model_dir), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err


def test_cli_skips_bad_files_with_a_count_keeps_every_good_one_and_writes_its_outputs(tmp_path, capsys, model_dir):
    images = tmp_path / "images"
    images.mkdir()
    good = [_photo(images / f"p{i}.png", i) for i in range(7)]
    (images / "readme.txt").write_text("hello")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["measure", "--model", str(model_dir), "--images", str(images), "--out", str(out), "--batch", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 3 file(s)" in err and "measuring" in err  # the summary line and the progress bar
    record = json.loads((out / "measures.json").read_text())
    assert record["images"] == len(good)
    assert record["skipped"] == {"count": 3, "files": sorted(["broken.jpg", "empty.png"]) + ["readme.txt"]}
    distance = record["mean_attention_distance"]
    assert len(distance) == 2 and all(len(heads) == 2 for heads in distance)
    assert all(isinstance(v, float) and 0 < v < 32 * math.sqrt(2) for heads in distance for v in heads)
    assert record["position_decodability"]["held_out_images"] == 1
    assert len(record["position_decodability"]["r2"]) == 2
    assert record["patch_embedding_filters"]["components"] == 28
    assert [row["size"] for row in record["resolution_sweep"]][:1] == [[16, 16]]
    assert set(record["position_reliance"]) == {"seeds", "shuffle", "shuffle_per_seed", "no_position", "p_top1"}
    for name in record["plots"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100

    # the folder average equals the average of per-image measurements of the same files
    loaded = posenc.load(str(model_dir))
    x = torch.stack([loaded.pixels(p)[0] for p in good])
    with torch.inference_mode():
        per_block = measure.mean_attention_distance(loaded.model.inspect(x))
    np.testing.assert_allclose(distance, [d.mean(0).numpy() for d in per_block], atol=2e-3)


# ------------------------------------------------------------------------------------ the app's Measure tab


def _noop_progress(*args, **kwargs) -> None:
    return None


@pytest.mark.parametrize("family", ["learned", "windowed"])
def test_measure_tab_returns_four_pngs_and_the_numbers_behind_them(family, tmp_path):
    from posenc.app.measure import MeasureHandlers

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / f"cifar10-{family}"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"bundled checkpoint {folder} is absent")
    loaded = posenc.load(str(folder))
    other = posenc.load(str(folder.parent / "cifar10-none"))
    h = MeasureHandlers(lambda source, progress: (source, loaded if source == family else other))
    photo = _photo(tmp_path / "photo.png", 3)
    *pngs, npz, summary = h.measure(str(photo), family, "none", progress=_noop_progress)
    for path in pngs:
        with Image.open(path) as img:
            assert img.format == "PNG"
    numbers = np.load(npz)
    with torch.inference_mode():
        seen = loaded.model.inspect(loaded.pixels(photo))
    expected = measure.mean_attention_distance(seen)
    for b, d in enumerate(expected):
        np.testing.assert_allclose(numbers[f"attention_distance_block{b}"], d[0].numpy(), rtol=1e-5)
    with torch.inference_mode():
        compared = measure.mean_attention_distance(other.model.inspect(other.pixels(photo)))
    np.testing.assert_allclose(numbers["compared_attention_distance_block0"], compared[0][0].numpy(), rtol=1e-5)
    assert numbers["filter_components"].shape[0] == 28
    assert numbers["reliance_shuffle_kl"].shape == (3,)
    assert [tuple(s) for s in numbers["sweep_sizes"]] == views.input_sizes(loaded)
    assert len(numbers["sweep_p_top1"]) == len(numbers["sweep_sizes"]) >= 2
    assert "no position term" in summary and "| 32x32 |" in summary


def test_measure_tab_says_when_filters_do_not_apply(tmp_path, monkeypatch):
    from posenc.app.measure import MeasureHandlers

    loaded = posenc.load(str(Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10-none"))
    monkeypatch.setattr(loaded.model.patch_embed, "proj", torch.nn.Identity())  # no plain patch conv any more
    h = MeasureHandlers(lambda source, progress: ("none", loaded))
    with pytest.raises(Exception, match="not applicable"):
        h.patch_filters("none", progress=_noop_progress)


def test_app_has_a_named_endpoint_per_measurement():
    from posenc.app import create_demo

    demo = create_demo(checkpoints_dir=Path(__file__).resolve().parents[1] / "checkpoints", hub_probe=lambda: False)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"measure", "attention_distance", "patch_filters", "position_reliance", "resolution_sweep"} <= names


def test_attention_distance_plot_draws_every_head_of_every_model_in_its_colour():
    from posenc import plots

    img = np.asarray(plots.attention_distance({"a": [[10.0, 20.0], [30.0, 40.0]], "b": [[15.0], [35.0]]}))
    for colour, heads in zip(plots.COLOURS[:2], (4, 2)):
        hits = np.all(img == np.asarray(colour, dtype=np.uint8), axis=-1)
        # every dot is a disc of about 40 pixels; the legend adds one 11x11 square
        assert 30 * heads < hits.sum() - 121 < 60 * heads



@pytest.mark.parametrize("heads", [[105.0, 130.0], [126.0, 130.0], [0.0, 130.0]])
def test_attention_distance_plot_keeps_the_farthest_dot_whole_inside_the_frame(heads):
    from posenc import plots

    img = np.asarray(plots.attention_distance({"a": [heads, [110.0]]}))
    rows = np.nonzero(np.all(img == np.asarray(plots.COLOURS[0], dtype=np.uint8), axis=-1).any(axis=1))[0]
    frame_top = plots._TOP
    assert rows.min() > frame_top + 4, "the highest dot touches the top of the frame"

#: a tiny config per architecture (TinyViT's smallest preset is not tiny enough for a fast test: left out)
TINY_KWARGS = {
    "posenc_vit": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "posenc_swin": dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4),
    "posenc_sam": dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3,
                       global_attn_indexes=(1,)),
    "posenc_convit": dict(depth=3, local_up_to_layer=2, embed_dim=8, num_heads=4, img_size=64),
    "posenc_eva": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "posenc_swinv2": dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4),
    "posenc_levit": dict(embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), img_size=64),
}


@pytest.mark.parametrize("model_type", list(TINY_KWARGS))
def test_every_architecture_is_measured_or_its_blocks_reported_as_not_applicable(model_type, tmp_path):
    """The folder measurement runs on each architecture; blocks it cannot measure give null, not a crash."""
    from posenc.models import ARCHITECTURES
    from posenc.preprocess import Preprocess

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        _photo(images / f"p{i}.png", i)
    kwargs = TINY_KWARGS[model_type]
    size = kwargs["img_size"]
    config_cls = ARCHITECTURES[model_type].config
    config = config_cls(**kwargs, num_classes=5, preprocess=Preprocess(input_size=(size, size), crop_pct=1.0))
    torch.manual_seed(0)
    build_model(config).save_pretrained(tmp_path / "model")
    loaded = posenc.load(str(tmp_path / "model"))
    found = measure.measure_folder(loaded, sorted(images.iterdir()), batch=3, sizes=[(size, size)], seeds=(0,))
    record = found.to_json()
    assert record["images"] == 5
    assert len(record["mean_attention_distance"]) == len(record["position_decodability"]["r2"])
    measured = [v for heads in record["mean_attention_distance"] for v in heads if v is not None]
    assert measured and all(0 < v < size * math.sqrt(2) for v in measured)


def test_measure_tab_runs_a_model_too_large_at_its_native_size_at_the_explore_tabs_default(tmp_path, monkeypatch):
    from posenc.app.measure import MeasureHandlers

    loaded = posenc.load(str(Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10-learned"))
    native = views.native_size(loaded)
    # as SAM-B at 1024x1024: the native size needs more attention maps than the app allows, a smaller one does not
    monkeypatch.setattr(views, "MAX_TRACE_BYTES", loaded.model.trace_bytes(native) - 1)
    size = views.default_size(loaded)
    assert size != native
    h = MeasureHandlers(lambda source, progress: ("learned", loaded))
    _, _, _, seen = h._run(str(_photo(tmp_path / "photo.png", 3)), "learned", _noop_progress)
    assert tuple(seen.size) == size


def test_measure_plots_keep_their_buttons_above_the_title():
    from posenc.app.common import view_image

    with gr.Blocks():
        image = view_image("distance", elem_id="measure-distance")
    assert "posenc-view" in image.elem_classes  # the class that reserves a strip for the buttons (posenc.app.demo.CSS)
