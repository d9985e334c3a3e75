"""Parallel-block ViTs: timm's ``vit_*_18x2_*`` (ParallelThingsBlock, two attention then two MLP branches summed)
load with timm's probabilities and maps; every block's trace holds both branches' heads side by side. timm's
``vit_pwee_*`` (ParallelScalingBlock: attention and MLP side by side from one fused input projection) too."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed as timm_resample
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc import views
from posenc.convert import check_state_dict, config_from_timm, convert_state_dict
from posenc.hub import load
from posenc.measure import block_attention_distance, block_outputs, patch_tokens
from posenc.models import VisionTransformer, ViTConfig, build_model
from tests.test_parity import load_posenc, perturb

TOL = dict(atol=1e-4, rtol=1e-4)
NAMES = ("vit_small_patch16_18x2_224", "vit_base_patch16_18x2_224")
#: tiny 18x2 ViT: 2 parallel blocks of 2 branches, 4 heads of 8 channels, 64 px (a 4x4 grid plus cls)
TINY = dict(depth=2, embed_dim=32, num_heads=4, img_size=64, num_classes=7)


def _reference(tmp_path, name: str = NAMES[0], **kwargs):
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_parallel_vit_checkpoint_gives_timm_probabilities(tmp_path, global_pool):
    ref = _reference(tmp_path, global_pool=global_pool)
    model = load_posenc(tmp_path)
    assert model.config.parallel == 2 and model.config.init_values == 1e-5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_parallel_vit_at_a_non_square_size_matches_timm_built_for_it(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    other = timm.create_model(NAMES[0], pretrained=False, **{**TINY, "img_size": (48, 80)}).eval()
    state = dict(ref.state_dict())
    state["pos_embed"] = timm_resample(state["pos_embed"], (3, 5), (4, 4), num_prefix_tokens=1)
    other.load_state_dict(state)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        expected = other(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_parallel_block_trace_holds_each_branch_heads_as_timm_computes_them(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    maps: list[torch.Tensor] = []
    for block in ref.blocks:
        for branch in block.attns:
            branch.attn.fused_attn = False
            branch.attn.attn_drop.register_forward_hook(lambda _m, args, _out: maps.append(args[0]))
    with torch.no_grad():
        ref(x)
        seen = model.inspect(x)
    assert len(seen.blocks) == 2 and len(maps) == 4
    for b, trace in enumerate(seen.blocks):
        assert trace.attn.shape == (2, 8, 17, 17) and trace.attn_no_pos is None
        assert_close(trace.attn[:, :4], maps[2 * b], **TOL)  # branch 0: heads 0..3
        assert_close(trace.attn[:, 4:], maps[2 * b + 1], **TOL)  # branch 1: heads 4..7


def test_parallel_vit_without_position_is_timm_with_a_zero_embedding(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        assert_close(model(x, position=False), off.logits)
        ref.pos_embed.zero_()
        assert_close(off.logits.softmax(-1), ref(x).softmax(-1), **TOL)


def test_parallel_vit_with_rope_keeps_each_branch_attention_without_position():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, parallel=3,
                                        pos_embed="none", rope=True, num_classes=3)).eval()  # fmt: skip
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 32, 32))
        assert_close(model(torch.ones(1, 3, 32, 32)), model.inspect(torch.ones(1, 3, 32, 32)).logits, **TOL)
    trace = seen.blocks[0]
    assert trace.attn.shape == trace.attn_no_pos.shape == (1, 6, 17, 17)
    assert not torch.allclose(trace.attn, trace.attn_no_pos)


def test_measure_finds_one_output_per_parallel_block_and_every_branch_head(tmp_path):
    _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), block_outputs(model) as tokens:
        seen = model.inspect(x)
    assert len(tokens) == len(seen.blocks) == 2
    assert patch_tokens(tokens[0], seen.blocks[0]).shape == (2, 16, 32)
    layout = seen.blocks[1].layout  # one layout for both branches: the heads axis is parallel*heads
    assert layout.query_prefix == layout.key_prefix == ("cls",) and layout.key_grid == (4, 4)
    assert layout.grouped(seen.blocks[1].attn[0]).shape == (1, 8, 17, 17)  # G, parallel*heads, N, N
    dist = block_attention_distance(seen.blocks[1])
    assert dist.shape == (2, 8) and torch.isfinite(dist).all()
    for j in range(2):  # each branch's heads measure as the same block with only that branch
        branch = replace(seen.blocks[1], attn=seen.blocks[1].attn[:, 4 * j : 4 * (j + 1)])  # B, heads, N, N
        assert_close(block_attention_distance(branch), dist[:, 4 * j : 4 * (j + 1)])
    assert model.trace_bytes((64, 64)) == 2 * 2 * 4 * 17 * 17 * 4  # blocks x branches x heads x N^2 x float32


def test_attention_view_shows_both_branches_heads(tmp_path):
    _reference(tmp_path)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    seen = views.inspect_image(load(str(tmp_path)), photo)
    view = views.attention_view(seen, 1, (2, 1))
    expected = seen.inspection.blocks[1].attn[0, :, 1 + 9, 1:].reshape(8, 4, 4).numpy()
    np.testing.assert_allclose(view.arrays["attention"], expected, atol=1e-6)


def test_sequential_vit_keeps_its_state_dict_names():
    keys = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)).state_dict()
    assert "blocks.0.attn.qkv.weight" in keys and "blocks.0.mlp.fc1.weight" in keys
    assert not any("attns" in k or "ffns" in k for k in keys)


def test_parallel_blocks_refuse_a_relative_bias_table():
    with pytest.raises(ValueError, match="parallel blocks with a relative position bias"):
        ViTConfig(parallel=2, rel_pos_bias=True, pos_embed="none")


@pytest.mark.parametrize("name", NAMES)
def test_every_timm_18x2_vit_builds_with_timm_keys_and_shapes(name):
    ref = timm.create_model(name, pretrained=False, device="meta")
    config = config_from_timm({"architecture": name, "num_classes": 1000})
    with torch.device("meta"):
        model = build_model(config)
    check_state_dict(model, convert_state_dict("timm", ref.state_dict(), config), name)
    assert (config.parallel, config.depth, config.init_values) == (2, 18, 1e-5)


def test_the_preset_table_lists_every_timm_18x2_vit():
    from posenc.models import TIMM_PRESETS

    assert set(timm.list_models("vit_*_18x2_*")) == set(NAMES) <= set(TIMM_PRESETS)


PWEE = "vit_pwee_patch16_reg1_gap_256"


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["fused_bias", "separate_mlp_bias"])
def test_parallel_scaling_vit_gives_timm_probabilities_and_maps(tmp_path, qkv_bias):
    ref = _reference(tmp_path, PWEE, qkv_bias=qkv_bias)
    model = load_posenc(tmp_path)
    assert model.config.parallel_scaling and model.config.reg_tokens == 1 and model.config.global_pool == "avg"
    maps: list[torch.Tensor] = []
    for block in ref.blocks:
        block.fused_attn = False
        block.attn_drop.register_forward_hook(lambda _m, args, _out: maps.append(args[0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        seen = model.inspect(x)
    assert_close(seen.logits.softmax(-1), expected, **TOL)
    assert len(maps) == len(seen.blocks) == 2
    for trace, want in zip(seen.blocks, maps):
        assert trace.attn.shape == (2, 4, 17, 17)  # register + 4x4 patches
        assert_close(trace.attn, want, **TOL)


def test_parallel_scaling_vit_at_a_non_square_size_matches_timm_built_for_it(tmp_path):
    ref = _reference(tmp_path, PWEE)
    model = load_posenc(tmp_path)
    other = timm.create_model(PWEE, pretrained=False, **{**TINY, "img_size": (48, 80)}).eval()
    state = dict(ref.state_dict())
    state["pos_embed"] = timm_resample(state["pos_embed"], (3, 5), (4, 4), num_prefix_tokens=0)  # no prefix rows
    other.load_state_dict(state)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), other(x).softmax(-1), **TOL)


def test_measure_finds_one_output_per_parallel_scaling_block(tmp_path):
    _reference(tmp_path, PWEE)
    model = load_posenc(tmp_path)
    with torch.no_grad(), block_outputs(model) as tokens:
        seen = model.inspect(torch.randn(1, 3, 64, 64))
    assert len(tokens) == len(seen.blocks) == 2
    assert patch_tokens(tokens[1], seen.blocks[1]).shape == (1, 16, 32)


def test_parallel_scaling_refuses_rope_and_branches():
    with pytest.raises(ValueError, match="parallel_scaling blocks take neither"):
        ViTConfig(parallel_scaling=True, rope=True, pos_embed="none")
    with pytest.raises(ValueError, match="parallel_scaling blocks take neither"):
        ViTConfig(parallel_scaling=True, parallel=2)


def test_pwee_builds_with_timm_keys_and_shapes():
    ref = timm.create_model(PWEE, pretrained=False, device="meta")
    config = config_from_timm({"architecture": f"{PWEE}.sbb_in1k", "num_classes": 1000})
    with torch.device("meta"):
        model = build_model(config)
    check_state_dict(model, convert_state_dict("timm", ref.state_dict(), config), PWEE)
    assert model.num_params() == sum(p.numel() for p in ref.parameters()) == 15_253_480
