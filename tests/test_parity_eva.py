"""Parity of posenc's EVA-style models with timm's ``eva.py``: RoPE-ViT axial / mixed / ape, EVA-02, SBB, DINOv3.

Reference models are tiny timm builds (2 blocks, width 64, 4 heads of 16 channels) with every parameter
perturbed, saved in timm's Hub layout and loaded through :func:`posenc.load`, as a Hub download would be.
Each kind is checked at its native size and at a non-square size, where a transposed RoPE grid would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import pos_embed_sincos as timm_rope
from timm.models import save_for_hf
from timm.models.eva import checkpoint_filter_fn
from torch.testing import assert_close

import posenc
from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.encodings import apply_rope, rope_2d_angles, rope_centered_angles, rope_mixed_angles
from posenc.hub import HubLoadError
from posenc.models import EvaConfig

TOL = dict(atol=1e-4, rtol=1e-4)
TINY = dict(depth=2, embed_dim=64, num_heads=4)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so no norm, bias, layer scale or frequency is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# name -> (timm overrides, another input size (h, w)). The native sizes are shrunk (recorded in model_args, so they
# are the checkpoints' native sizes) to keep the file fast; the other size is non-square.
CASES = {
    "vit_small_patch16_rope_224": ({"img_size": 64}, (80, 48)),
    "vit_small_patch16_rope_mixed_224": ({"img_size": 64}, (80, 48)),
    "vit_small_patch16_rope_ape_224": ({"img_size": 64}, (80, 48)),
    "vit_small_patch16_rope_mixed_ape_224": ({"img_size": 64}, (80, 48)),
    "eva02_tiny_patch14_224": ({"img_size": 56}, (70, 42)),  # headless (mim_in22k): pooled features
    "eva02_base_patch14_224": ({"num_classes": 10, "img_size": 56}, (70, 42)),  # split q/k/v, SwiGLU, sub-LN
    "vit_medium_patch16_rope_reg1_gap_256": ({"img_size": 64}, (80, 48)),
    "vit_small_patch16_dinov3": ({"img_size": 64}, (80, 48)),  # headless
    "vit_small_patch16_dinov3_qkvb": ({"num_classes": 10, "global_pool": "token", "img_size": 64}, (80, 48)),
}


def _reference(name: str, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **TINY, **CASES[name][0]))
    save_for_hf(ref, folder, safe_serialization=True)
    return ref


def _at_size(name: str, ref: torch.nn.Module, size: tuple[int, int]) -> torch.nn.Module:
    """The reference rebuilt at another input size and loaded the way timm loads a checkpoint for it."""
    other = timm.create_model(name, pretrained=False, **TINY, **{**CASES[name][0], "img_size": size}).eval()
    other.load_state_dict(checkpoint_filter_fn(ref.state_dict(), other))
    return other


@pytest.mark.parametrize("name", list(CASES))
def test_eva_checkpoint_gives_reference_output_at_native_and_other_size(tmp_path, name):
    ref = _reference(name, tmp_path)
    loaded = posenc.load(str(tmp_path))
    model = loaded.model
    assert model.config.model_type == "posenc_eva"
    x = torch.randn(2, 3, *model.config.img_size)
    size = CASES[name][1]
    y = torch.randn(2, 3, *size)
    other = _at_size(name, ref, size)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), ref(x).softmax(-1), **TOL)
        assert_close(model(x), ref(x), **TOL)
        assert_close(model.inspect(x).logits, ref(x), **TOL)
        assert_close(model(y), other(y), **TOL)


@pytest.mark.parametrize(
    ("name", "mechanisms", "headless"),
    [
        ("vit_small_patch16_rope_224", ("rope_axial",), False),
        ("vit_small_patch16_rope_mixed_ape_224", ("learned", "rope_mixed"), False),
        ("eva02_tiny_patch14_224", ("learned", "rope_axial"), True),
        ("vit_small_patch16_dinov3", ("rope_axial",), True),
    ],
)
def test_eva_models_list_their_mechanisms_and_headless_ones_return_features(tmp_path, name, mechanisms, headless):
    ref = _reference(name, tmp_path)
    model = posenc.load(str(tmp_path)).model
    assert model.mechanisms == mechanisms
    assert model.headless is headless
    x = torch.randn(1, 3, *model.config.img_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref(x).shape == ((1, 64) if headless else (1, 1000))


def test_prefix_tokens_are_named_and_left_unrotated(tmp_path):
    _reference("vit_medium_patch16_rope_reg1_gap_256", tmp_path / "sbb")
    _reference("vit_small_patch16_dinov3", tmp_path / "dinov3")
    sbb = posenc.load(str(tmp_path / "sbb")).model
    dinov3 = posenc.load(str(tmp_path / "dinov3")).model
    with torch.no_grad():
        assert sbb.inspect(torch.randn(1, 3, 64, 64)).prefix_names == ("reg0",)
        seen = dinov3.inspect(torch.randn(1, 3, 64, 96))
    assert seen.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
    assert seen.rope_angles.shape == (4 * 6, 16 // 2)
    assert seen.blocks[0].attn.shape == (1, 4, 5 + 24, 5 + 24)


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_ape_224", "vit_small_patch16_rope_mixed_224",
                                  "vit_small_patch16_dinov3"])
def test_position_false_matches_reference_without_rope_or_embedding(tmp_path, name):
    ref = _reference(name, tmp_path)
    model = posenc.load(str(tmp_path)).model
    ref.rope = None  # timm's forward then rotates nothing
    if ref.pos_embed is not None:
        ref.pos_embed = None
    x = torch.randn(1, 3, *model.config.img_size)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        seen = model.inspect(x, position=False)
    assert seen.rope_angles is None and seen.pos_embed is None
    assert all(not b.position for b in seen.blocks)


def test_inspection_attention_matches_timm_unfused_attention(tmp_path):
    ref = _reference("vit_small_patch16_rope_mixed_224", tmp_path)
    model = posenc.load(str(tmp_path)).model
    maps = []
    attn = ref.blocks[1].attn
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda module, args, out: maps.append(out))  # dropout sees the softmax
    x = torch.randn(1, 3, 80, 48)
    other = _at_size("vit_small_patch16_rope_mixed_224", ref, (80, 48))
    other.blocks[1].attn.fused_attn = False
    other.blocks[1].attn.attn_drop.register_forward_hook(lambda module, args, out: maps.append(out))
    with torch.no_grad():
        seen = model.inspect(x)
        other(x)
    assert_close(seen.blocks[1].attn, maps[-1], **TOL)
    assert seen.blocks[1].position["rope_angles"].shape == (4, 5 * 3, 8)
    assert seen.position["rope_freqs"].shape == (2, 2, 4, 8)


# ------------------------------------------------------------------------------------------- RoPE angles


def _timm_sin(embed: torch.Tensor) -> torch.Tensor:
    """timm's concatenated [sin, cos] embedding (N, 2 * head_dim) -> the sine per rotated pair (N, head_dim/2)."""
    return embed.chunk(2, dim=-1)[0]


@pytest.mark.parametrize("indexing", ["ij", "xy"])
@pytest.mark.parametrize("ref_grid", [None, (16, 16)])
def test_axial_angles_match_timm_on_a_non_square_grid(indexing, ref_grid):
    grid = (5, 3)
    rope = timm_rope.RotaryEmbeddingCat(16, temperature=100.0, in_pixels=False, feat_shape=list(grid),
                                        ref_feat_shape=ref_grid, grid_indexing=indexing)
    sin = _timm_sin(rope.get_embed())[:, 0::2]  # interleaved layout: one sine per pair
    angles = rope_2d_angles(grid, 16, 100.0, indexing=indexing, ref_grid=ref_grid)
    assert_close(angles.sin(), sin, atol=1e-5, rtol=0)
    swapped = rope_2d_angles(grid, 16, 100.0, indexing="xy" if indexing == "ij" else "ij", ref_grid=ref_grid)
    assert (swapped.sin() - sin).abs().max() > 0.1  # a transposed grid rotates differently


def test_centered_angles_match_timm_dinov3_on_a_non_square_grid():
    grid = (4, 7)
    rope = timm_rope.RotaryEmbeddingDinoV3(16, temperature=100.0, feat_shape=list(grid))
    sin = _timm_sin(rope.get_embed())[:, :8]  # half layout: the first half holds one sine per pair
    assert_close(rope_centered_angles(grid, 16, 100.0).sin(), sin, atol=1e-5, rtol=0)
    first = torch.cat([-(7 / 8) / rope.periods, -(13 / 14) / rope.periods])  # centre of patch 0: 2 * 0.5 / n - 1
    assert_close(rope_centered_angles((8, 14), 16, 100.0)[0], 2 * torch.pi * first)


def test_mixed_angles_match_timm_per_block_and_head():
    torch.manual_seed(0)
    rope = timm_rope.RotaryEmbeddingMixed(64, depth=2, num_heads=4, temperature=10.0, grid_indexing="xy")
    grid = (3, 5)
    sin = _timm_sin(rope.get_embed(list(grid)))[..., 0::2]  # depth, heads, N, hd/2
    angles = rope_mixed_angles(rope.freqs.detach(), grid)  # depth, heads, N, hd/2
    assert_close(angles.sin(), sin, atol=1e-5, rtol=0)
    x_step = angles.reshape(2, 4, 3, 5, 8)[:, :, 0, 1] - angles.reshape(2, 4, 3, 5, 8)[:, :, 0, 0]
    assert_close(x_step, rope.freqs[0].detach())  # one column to the right adds the x frequencies


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_matches_timm_rotation(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 1 + 6, 16)  # B, heads, 1 prefix + N, hd
    angles = torch.randn(6, 8) * 3
    layout = timm_rope._rope_layout
    emb = torch.cat([layout(angles.sin(), not interleaved), layout(angles.cos(), not interleaved)], dim=-1)
    expected = timm_rope.apply_rot_embed_cat(x[:, :, 1:], emb, half=not interleaved)
    out = apply_rope(x, angles, num_prefix=1, interleaved=interleaved)
    assert_close(out[:, :, 1:], expected)
    assert torch.equal(out[:, :, :1], x[:, :, :1])


# ------------------------------------------------------------------------------------------- bad input


def test_unsupported_eva_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"(?s)eva02_large_patch14_clip_224.*not supported.*"
                                                    r"eva02_tiny_patch14_224.*vit_small_patch16_dinov3"):
        config_from_timm({"architecture": "eva02_large_patch14_clip_224", "num_classes": 0})


def test_model_args_contradicting_the_weights_name_key_and_shapes(tmp_path):
    _reference("vit_small_patch16_rope_mixed_224", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["mlp_ratio"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"blocks\.0\.mlp\.fc1\.weight \(256, 64\) in the checkpoint vs "
                                           r"\(128, 64\) in the model") as caught:
        posenc.load(str(tmp_path))
    assert caught.value.reason == "mismatch"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(embed_dim=60, num_heads=4), "head_dim"),
        (dict(img_size=100, patch_size=16), "not divisible by patch_size"),
        (dict(rope_type="mixed", rope_rotate_half=True, use_rot_pos_emb=True), "interleaved"),
        (dict(global_pool="token", class_token=False), "class_token"),
    ],
)
def test_eva_config_refuses_inconsistent_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        EvaConfig(**{"use_rot_pos_emb": True, "embed_dim": 64, "num_heads": 4, **fields})


# ------------------------------------------------------------------------------------------- transformers DINOv3

HF_DINOV3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_register_tokens=2, image_size=64, patch_size=16)


@pytest.mark.parametrize("key_bias", [False, True])
@pytest.mark.parametrize("backbone", [False, True])
def test_transformers_dinov3_gives_the_reference_cls_features_at_native_and_other_size(tmp_path, backbone, key_bias):
    import transformers as hf

    torch.manual_seed(0)
    config = hf.DINOv3ViTConfig(**HF_DINOV3, key_bias=key_bias)
    saved = perturb((hf.DINOv3ViTBackbone if backbone else hf.DINOv3ViTModel)(config))
    saved.save_pretrained(tmp_path)
    ref = hf.DINOv3ViTModel(config).eval()
    ref.load_state_dict(saved.state_dict())  # the same weights: the backbone's last stage is this model's output
    model = posenc.load(str(tmp_path)).model
    assert model.headless and model.mechanisms == ("rope_axial",)
    for size in [(64, 64), (96, 48)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert_close(model(x), ref(pixel_values=x).pooler_output, **TOL)


# ------------------------------------------------------------------------------------------- curated list

HEADLESS = {"eva02_tiny_patch14_224", "vit_small_patch16_dinov3"}


@pytest.mark.parametrize("entry", [e for e in posenc.HUB_MODELS if e.architecture == "eva"], ids=lambda e: e.name)
def test_curated_eva_models_have_the_parameter_count_of_the_model_posenc_builds(entry):
    from posenc.models import build_model

    name = entry.source.split("/", 1)[1].split(".")[0]
    config = config_from_timm({"architecture": name, "num_classes": 0 if name in HEADLESS else 1000})
    with torch.device("meta"):
        model = build_model(config)
    assert model.num_params() == entry.num_params
    assert model.mechanisms == entry.mechanisms
    assert (entry.accuracy is None) or name not in HEADLESS
