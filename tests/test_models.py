"""Model behaviour: the two attention paths, save/load, permutation sensitivity, other image sizes, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from einops import rearrange
from torch.testing import assert_close

from posenc.models import SwinConfig, SwinTransformer, ViTConfig, VisionTransformer, build_model

SMALL = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=4)

CONFIGS = {
    "none": ViTConfig(**SMALL, pos_embed="none"),
    "learned": ViTConfig(**SMALL),
    "learned_no_embed_class": ViTConfig(**SMALL, no_embed_class=True),
    "sincos": ViTConfig(**SMALL, pos_embed="sincos", global_pool="avg"),
    "relative": ViTConfig(**SMALL, pos_embed="none", rel_pos_bias=True, qkv_bias="qv", global_pool="avg", init_values=0.1),
    "rope": ViTConfig(**SMALL, pos_embed="none", rope=True),
    "distilled": ViTConfig(**SMALL, distilled=True),
    "windowed": SwinConfig(img_size=32, patch_size=2, num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so no position table or norm is trivially zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_and_inspection_paths_agree(name):
    model = randomize(build_model(CONFIGS[name]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        seen = model.inspect(x)
    assert_close(seen.logits, fast, atol=1e-5, rtol=1e-5)
    assert len(seen.blocks) == sum(getattr(model.config, "depths", (getattr(model.config, "depth", 0),)))
    for block in seen.blocks:
        assert_close(block.attn.sum(-1), torch.ones_like(block.attn.sum(-1)), atol=1e-5, rtol=0)


def test_inspection_returns_the_position_tensors_actually_used():
    model = randomize(VisionTransformer(CONFIGS["relative"]))
    seen = model.inspect(torch.randn(1, 3, 32, 32))
    assert seen.grid == (8, 8)
    block = seen.blocks[0]
    assert block.attn.shape == (1, 4, 65, 65)
    assert block.pos_bias.shape == (4, 65, 65)
    table = model.blocks[0].attn.relative_position_bias_table
    assert_close(block.pos_bias[:, 0, 1], table[-3])  # cls -> token entry
    assert block.attn_no_pos is not None and not torch.allclose(block.attn_no_pos, block.attn)

    swin = randomize(SwinTransformer(CONFIGS["windowed"]))
    traces = swin.inspect(torch.randn(1, 3, 32, 32)).blocks
    assert [t.shift for t in traces] == [(0, 0), (2, 2), (0, 0), (2, 2)]
    assert traces[1].attn.shape == (1, 16, 2, 16, 16) and traces[1].mask.shape == (16, 16, 16)
    assert traces[0].mask is None and traces[2].grid == (8, 8) and traces[2].stage == 1


def test_learned_embedding_at_another_size_matches_timm_on_a_non_square_grid():
    timm = pytest.importorskip("timm")
    config = dataclasses.replace(CONFIGS["learned"], img_size=(32, 48))  # 8x12 grid
    model = randomize(VisionTransformer(config))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=4, embed_dim=32,
                                  depth=2, num_heads=4, num_classes=10, dynamic_img_size=True).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 32)  # 12x8: the transposed grid
    with torch.no_grad():
        seen = model.inspect(x)
        expected = reference(x)
    assert seen.grid == (12, 8)
    assert_close(seen.logits, expected, atol=1e-4, rtol=1e-4)
    resampled = timm.layers.resample_abs_pos_embed(model.pos_embed.detach(), [12, 8], [8, 12], num_prefix_tokens=1)
    assert_close(seen.pos_embed, resampled)


@pytest.mark.parametrize("name", ["sincos", "relative", "rope", "windowed"])
def test_a_model_run_at_another_size_equals_one_built_for_that_size(name):
    """Run at 48x64 = built at 48x64 with the same weights (BEiT tables resized by timm's bicubic resize)."""
    model = randomize(build_model(CONFIGS[name]))
    built = build_model(dataclasses.replace(CONFIGS[name], img_size=(48, 64))).eval()
    state = model.state_dict()
    if name == "relative":
        pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
        rows = (2 * 12 - 1) * (2 * 16 - 1) + 3  # window 12x16 with BEiT's three cls rows
        for key in [k for k in state if k.endswith("relative_position_bias_table")]:
            state[key] = pos_embed_rel.resize_rel_pos_bias_table_simple(state[key], (12, 16), (rows, state[key].shape[1]))
    built.load_state_dict(state)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = model.inspect(x)
        assert_close(out.logits, built(x), atol=1e-5, rtol=1e-5)
        assert_close(model(x), built(x), atol=1e-5, rtol=1e-5)
    assert out.grid == (48 // CONFIGS[name].patch_size, 64 // CONFIGS[name].patch_size)


def test_save_and_load_give_identical_logits_and_a_card(tmp_path):
    model = randomize(VisionTransformer(CONFIGS["rope"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "posenc_vit" and config["rope"] is True
    assert "preprocess" in config and config["preprocess"]["input_size"] == [224, 224]
    card = (tmp_path / "README.md").read_text()
    assert "rope" in card and "posenc" in card
    loaded = VisionTransformer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config == model.config


def test_swin_save_and_load_give_identical_logits(tmp_path):
    model = randomize(SwinTransformer(CONFIGS["windowed"]))
    model.save_pretrained(tmp_path)
    loaded = build_model(json.loads((tmp_path / "config.json").read_text()))
    loaded.load_state_dict(SwinTransformer.from_pretrained(tmp_path).state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_loading_is_strict(tmp_path):
    VisionTransformer(CONFIGS["learned"]).save_pretrained(tmp_path)
    bigger = dict(json.loads((tmp_path / "config.json").read_text()), embed_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(bigger))
    with pytest.raises(RuntimeError, match="size mismatch"):
        VisionTransformer.from_pretrained(tmp_path)


def permute_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Shuffle the non-overlapping patches of an image batch."""
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
    return rearrange(tokens[:, perm], "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=patch, p2=patch)


@pytest.mark.parametrize("name", ["learned", "learned_no_embed_class", "sincos", "relative", "rope", "windowed"])
def test_each_position_encoding_sees_a_patch_permutation(name):
    config = CONFIGS[name]
    model = randomize(build_model(config))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    perm = torch.randperm((32 // config.patch_size) ** 2)
    with torch.no_grad():
        diff = (model(x) - model(permute_patches(x, config.patch_size, perm))).abs().max()
    assert diff > 1e-3


def test_no_position_encoding_is_permutation_equivariant_before_pooling():
    model = randomize(VisionTransformer(CONFIGS["none"]))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    perm = torch.randperm(64)
    with torch.no_grad():
        tokens = model.patch_embed(x).flatten(1, 2)
        tokens_perm = model.patch_embed(permute_patches(x, 4, perm)).flatten(1, 2)
        assert_close(tokens_perm, tokens[:, perm])
        assert_close(model(permute_patches(x, 4, perm)), model(x), atol=1e-5, rtol=1e-5)


def test_image_not_divisible_by_patch_names_the_sizes():
    model = VisionTransformer(CONFIGS["learned"])
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 30, 32))


def test_window_that_does_not_divide_the_grid_names_the_sizes():
    with pytest.raises(ValueError, match=r"window \(6, 6\) does not divide the 56x56 grid"):
        SwinConfig(window_size=6)
    model = SwinTransformer(CONFIGS["windowed"])
    with pytest.raises(ValueError, match=r"window \(4, 4\) does not divide the 18x18 patch grid"):
        model(torch.randn(1, 3, 36, 36))


def test_config_round_trips_through_json():
    config = CONFIGS["relative"]
    again = ViTConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config))))
    assert again == config
