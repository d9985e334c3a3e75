"""Twins parity: timm ``twins_svt_*`` / ``twins_pcpvt_*`` checkpoints (random weights, Hub layout) give timm's
probabilities in posenc, and the inspection gives the PEG contribution and attention timm computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc import measure, mechanisms, views
from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.hub import load
from posenc.models import TIMM_PRESETS, TwinsConfig
from tests.test_parity import load_posenc, perturb

TOL = {"atol": 1e-4, "rtol": 1e-4}
#: tiny Twins: four stages of 2 blocks, widths 16..64; SVT windows of 4 and 2 tokens. At 64 px the stage grids are
#: 16, 8, 4, 2; at 64x96 the last stage (2x3) is padded to whole windows.
TINY = {
    "twins_svt_small": {"embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 2, 4), "depths": (2, 2, 2, 2),
                        "wss": (4, 4, 2, 2), "img_size": 64},
    "twins_pcpvt_small": {"embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 2, 4), "depths": (2, 1, 1, 2),
                          "img_size": 64},
}  # fmt: skip
NAMES = sorted(TINY)
PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def _reference(tmp_path, name, **kwargs):
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=7, **{**TINY[name], **kwargs}))
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # maps are compared below; the fast path is compared through the logits
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64)], ids=["native", "64x96", "96x64"])
def test_twins_checkpoint_gives_timm_probabilities(tmp_path, name, size):
    ref = _reference(tmp_path, name)
    model = load_posenc(tmp_path)
    assert model.mechanisms == ("conv_pos",)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = _probs(ref(x))  # timm's Twins runs at any size its convs take; nothing is sized by img_size
        assert_close(_probs(model(x)), expected, **TOL)
        assert_close(_probs(model.inspect(x).logits), expected, **TOL)


def test_fast_path_matches_timm_fused_attention(tmp_path):
    ref = _reference(tmp_path, "twins_svt_small")
    model = load_posenc(tmp_path)
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_close(_probs(model(x)), _probs(ref(x)), **TOL)


def test_inspection_gives_timm_peg_contribution_and_attention(tmp_path):
    ref = _reference(tmp_path, "twins_svt_small")
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        seen = model.inspect(x)
        tokens, grid = ref.patch_embeds[0](x)  # 1, 16*24, 16
        after_first = ref.blocks[0][0](tokens, grid)
        peg = ref.pos_block[0].proj(after_first.transpose(1, 2).reshape(1, 16, *grid))  # 1, C, 16, 24
        # the second block's global sub-sampled attention, from the tokens after the PEG
        gsa = ref.blocks[0][1].attn
        y = ref.blocks[0][1].norm1(ref.pos_block[0](after_first, grid))
        q = gsa.q(y).reshape(1, -1, 1, 16).permute(0, 2, 1, 3)  # 1, heads, N, hd
        kv = gsa.norm(gsa.sr(y.transpose(1, 2).reshape(1, 16, *grid)).flatten(2).transpose(1, 2))  # 1, 2*3, C
        k = gsa.kv(kv).reshape(1, -1, 2, 1, 16).permute(2, 0, 3, 1, 4)[0]  # 1, heads, 6, hd
        attn = ((q * gsa.scale) @ k.transpose(-2, -1)).softmax(-1)  # 1, heads, 384, 6
    stage0 = [t for t in seen.blocks if t.stage == 0]
    assert list(stage0[0].position) == ["conv_pos"] and stage0[1].position == {}
    assert_close(stage0[0].position["conv_pos"], peg, **TOL)
    assert stage0[0].window == (4, 4) and stage0[0].attn.shape == (1, 24, 1, 16, 16)  # 4x6 windows of 4x4
    assert stage0[1].window is None and stage0[1].attn.shape == (1, 1, 384, 6)  # keys on the 2x3 reduced grid
    assert_close(stage0[1].attn, attn, **TOL)
    last = next(t for t in seen.blocks if t.stage == 3)
    assert last.grid == (2, 3) and last.attn.shape == (1, 2, 4, 4, 4)  # 2x3 padded to 2x4: two 2x2 windows


def test_peg_reads_zero_padding_on_a_blank_input(tmp_path):
    _reference(tmp_path, "twins_pcpvt_small")
    model = load_posenc(tmp_path)
    with torch.no_grad():
        seen = model.inspect(torch.zeros(1, 3, 64, 96))
    delta = seen.blocks[0].position["conv_pos"][0]  # C, 16, 24
    assert delta.shape == (16, 16, 24)
    norm = delta.norm(dim=0)  # 16, 24: a constant input, so only the border (zero padding) differs
    inner = norm[1:-1, 1:-1]
    assert_close(inner, inner.mean().expand_as(inner), atol=1e-4, rtol=1e-4)
    assert (norm[0, 1:-1] - inner.mean()).abs().min() > 1e-3  # the top row reads the padding


def test_twins_without_position_leaves_every_peg_out(tmp_path):
    ref = _reference(tmp_path, "twins_svt_small")
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        assert_close(model(x, position=False), off.logits)
        # timm with every PEG's conv zeroed is the model without position
        for peg in ref.pos_block:
            peg.proj[0].weight.zero_()
            peg.proj[0].bias.zero_()
        assert_close(_probs(off.logits), _probs(ref(x)), **TOL)
        assert not torch.allclose(off.logits, model(x))
    assert all(t.position == {} for t in off.blocks)


def test_every_timm_twins_name_has_a_preset_with_its_sizes():
    names = {n for n in timm.list_models("twins_*")}
    assert names == {n for n, (arch, _) in TIMM_PRESETS.items() if arch.config is TwinsConfig}
    for name in names:
        with torch.device("meta"):  # sizes only: no weights are initialised
            ref = timm.create_model(name, pretrained=False)
        cfg = config_from_timm({"architecture": f"{name}.in1k", "num_classes": 1000})
        assert cfg.embed_dims == tuple(ref.embed_dims) and cfg.depths == tuple(ref.depths)
        assert [cfg.window(i, 0) for i in range(4)] == [getattr(b[0].attn, "ws", None) for b in ref.blocks]
        assert cfg.num_heads == tuple(b[0].attn.num_heads for b in ref.blocks)


def test_twins_sizes_must_be_multiples_of_32(tmp_path):
    _reference(tmp_path, "twins_svt_small")
    model = load_posenc(tmp_path)
    assert model.size_step() == (32, 32) and model.fits((64, 96)) and not model.fits((64, 80))
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.zeros(1, 3, 64, 80))
    with pytest.raises(ValueError, match="one value for each of the 4 stages"):
        TwinsConfig(depths=(2, 2, 2))


def test_unknown_twins_variant_lists_supported_architectures():
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*twins_svt_small"):
        config_from_timm({"architecture": "twins_svt_huge", "num_classes": 1000})


@pytest.fixture(scope="module")
def twins_seen(tmp_path_factory):
    """A tiny SVT inspecting a random 64x96 photo at 64x96, and its timm reference."""
    folder = tmp_path_factory.mktemp("twins")
    ref = _reference(folder, "twins_svt_small")
    loaded = load(str(folder))
    return ref, views.inspect_image(loaded, PHOTO, (64, 96))


def test_peg_view_draws_this_images_and_a_blank_images_contribution(twins_seen):
    ref, seen = twins_seen
    view = mechanisms.get("conv_pos").views[0].draw(seen, 1, (3, 5))  # block 1: its stage's PEG follows block 0
    assert int(view.arrays["conv_pos_block"]) == 0 and view.arrays["block_grid"].tolist() == [16, 24]
    with torch.no_grad():  # the blank image is the mean colour: 0 after normalisation
        tokens, grid = ref.patch_embeds[0](torch.zeros(1, 3, 64, 96))
        x = ref.blocks[0][0](tokens, grid)
        expected = ref.pos_block[0].proj(x.transpose(1, 2).reshape(1, 16, *grid))[0].norm(dim=0)  # 16, 24
    np.testing.assert_allclose(view.arrays["conv_pos_norm_blank"], expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(view.arrays["conv_pos_norm"],
                               seen.inspection.blocks[0].position["conv_pos"][0].norm(dim=0).numpy(), atol=1e-6)
    assert view.image.size[0] > 400


def test_peg_stage_view_has_one_blank_map_per_stage(twins_seen):
    _, seen = twins_seen
    view = mechanisms.get("conv_pos").views[1].draw(seen, 0, (0, 0))
    assert [view.arrays[f"conv_pos_norm_blank_stage{s}"].shape for s in range(4)] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_peg_views_say_why_without_position(twins_seen, tmp_path):
    _, seen = twins_seen
    off = dataclasses.replace(seen, inspection=seen.loaded.model.inspect(torch.zeros(1, 3, 64, 96), position=False))
    with pytest.raises(views.ViewUnavailable, match="adds no convolutional position"):
        mechanisms.get("conv_pos").views[0].draw(off, 0, (0, 0))


def test_twins_folder_measurement_measures_windowed_and_sub_sampled_blocks(tmp_path):
    ref = _reference(tmp_path / "model", "twins_svt_small")
    del ref
    loaded = load(str(tmp_path / "model"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        PHOTO.rotate(90 * i).save(images / f"p{i}.png")
    found = measure.measure_folder(loaded, sorted(images.iterdir()), batch=3, sizes=[(64, 64)], seeds=(0,))
    distances = found.to_json()["mean_attention_distance"]
    assert len(distances) == 8
    # windows (padded in the last stage) and keys on the reduced grid: every block is measured through its layout
    assert all(v is not None and 0 < v < 64 * 2**0.5 for heads in distances for v in heads)


def test_twins_layout_puts_sub_sampled_keys_at_the_centre_of_what_they_pool(twins_seen):
    _, seen = twins_seen
    local, sub = seen.inspection.blocks[0].layout, seen.inspection.blocks[1].layout
    assert local.window == (4, 4) and local.query_grid == local.key_grid == (16, 24)
    assert sub.window is None and sub.query_grid == (16, 24) and sub.key_grid == (2, 3)
    assert sub.key_pixels[0].tolist() == [16.0, 16.0]  # the first key pools 8x8 tokens of 4 px: centre (16, 16)
    assert sub.query_pixels[0].tolist() == [2.0, 2.0]
