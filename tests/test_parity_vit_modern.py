"""Parity of today's absolute-embedding ViTs with timm and transformers: DeiT III, CLIP, SigLIP, register models,
DINOv2 (with and without registers), FlexiViT, I-JEPA, ViT-MSN, and headless checkpoints.

Tiny random reference models (one or two blocks, narrow, small images) are perturbed so nothing is trivially 0 or
1, saved in their Hub layout and read back through :func:`posenc.load`, as a download would be. Every case is
checked at the native size and at one other size, which the reference reaches the way its library does (timm:
``dynamic_img_size=True``; transformers: ``interpolate_pos_encoding=True`` where the model needs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import transformers as hf
from timm.models import save_for_hf
from torch.testing import assert_close

import posenc
from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.encodings import resample_abs_pos_embed
from posenc.hub import HubLoadError
from tests.test_parity import perturb

TOL = dict(atol=1e-4, rtol=1e-4)
_NARROW = dict(embed_dim=64, num_heads=2, depth=2)

# timm architecture, the overrides that shrink it (recorded in model_args), the native and one other input size
TIMM_CASES = [
    ("deit3_small_patch16_224", dict(_NARROW, img_size=64), 64, (48, 80)),
    ("vit_base_patch16_clip_224", dict(_NARROW, img_size=64), 64, (80, 48)),
    ("vit_base_patch16_clip_quickgelu_224", dict(_NARROW, img_size=32), 32, (48, 48)),
    ("vit_base_patch16_siglip_224", dict(_NARROW, img_size=64), 64, (48, 80)),
    ("vit_base_patch32_siglip_256", dict(_NARROW, img_size=64), 64, (96, 64)),
    ("vit_base_patch16_siglip_gap_224", dict(_NARROW, img_size=64), 64, (48, 48)),
    ("vit_medium_patch16_reg4_gap_256", dict(_NARROW, img_size=64), 64, (48, 80)),
    ("vit_so150m_patch16_reg4_gap_256", dict(_NARROW, img_size=64), 64, (48, 80)),
    ("vit_small_patch14_dinov2", dict(_NARROW, img_size=56), 56, (70, 42)),
    ("vit_small_patch14_reg4_dinov2", dict(_NARROW, img_size=56), 56, (70, 42)),
    ("flexivit_small", dict(_NARROW, img_size=48), 48, (64, 32)),
]


def _timm_folder(tmp_path: Path, name: str, kwargs: dict, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=num_classes, dynamic_img_size=True, **kwargs))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


@pytest.mark.parametrize(("name", "kwargs", "native", "other"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_modern_vit_gives_reference_probabilities_at_two_sizes(tmp_path, name, kwargs, native, other):
    ref = _timm_folder(tmp_path, name, kwargs, num_classes=5)
    model = posenc.load(str(tmp_path)).model
    torch.manual_seed(1)
    for size in ((native, native), other):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert_close(_probs(model(x)), _probs(ref(x)), **TOL)
            assert_close(_probs(model.inspect(x).logits), _probs(ref(x)), **TOL)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"])
def test_headless_timm_checkpoint_returns_the_reference_pooled_features(tmp_path, name):
    kwargs = next(c[1] for c in TIMM_CASES if c[0] == name)
    ref = _timm_folder(tmp_path, name, kwargs, num_classes=0)
    loaded = posenc.load(str(tmp_path))
    assert loaded.model.headless and loaded.labels == []
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = loaded.model(x)
        assert features.shape == (2, kwargs["embed_dim"])
        assert_close(features, ref(x), **TOL)
        assert_close(loaded.model.inspect(x).logits, ref(x), **TOL)


def test_dinov2_embedding_is_interpolated_like_timm_at_run_time(tmp_path):
    """At a size other than 518-like native, the embedding the model used is timm's run-time resample (bicubic, antialias)."""
    ref = _timm_folder(tmp_path, "vit_small_patch14_dinov2", dict(_NARROW, img_size=56), num_classes=0)
    model = posenc.load(str(tmp_path)).model
    seen = model.inspect(torch.randn(1, 3, 70, 42))
    expected = resample_abs_pos_embed(ref.pos_embed.detach(), (5, 3), (4, 4), 1)
    timm_used = timm.layers.resample_abs_pos_embed(ref.pos_embed.detach(), new_size=(5, 3), old_size=(4, 4),
                                                   num_prefix_tokens=1)
    assert seen.pos_embed.shape == (1, 1 + 15, 64) and seen.pos_embed_prefix == 1
    assert_close(seen.pos_embed, timm_used, atol=1e-6, rtol=1e-6)
    assert_close(expected, timm_used, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(seen.pos_embed[:, 1:], ref.pos_embed[:, 1:16].detach())  # really resampled


def test_registers_are_named_prefix_tokens_and_carry_no_position(tmp_path):
    _timm_folder(tmp_path, "vit_small_patch14_reg4_dinov2", dict(_NARROW, img_size=56), num_classes=0)
    model = posenc.load(str(tmp_path)).model
    seen = model.inspect(torch.randn(1, 3, 56, 56))
    assert seen.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3") and seen.num_prefix_tokens == 5
    assert seen.pos_embed.shape == (1, 16, 64) and seen.pos_embed_prefix == 0
    assert seen.blocks[0].attn.shape == (1, 2, 21, 21)


def test_position_false_removes_the_absolute_embedding(tmp_path):
    ref = _timm_folder(tmp_path, "deit3_small_patch16_224", dict(_NARROW, img_size=64), num_classes=5)
    model = posenc.load(str(tmp_path)).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref.pos_embed.zero_()
        assert_close(model(x, position=False), ref(x), **TOL)
        assert model.inspect(x, position=False).pos_embed is None


# --------------------------------------------------------------------------------------------------- transformers

_HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)


def _dino_config(cls: type, **extra: object) -> object:
    return cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
               layerscale_value=0.5, mlp_ratio=2, **extra)


_PLAIN = dict(_HF_SMALL, image_size=64, patch_size=16)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
# id -> (reference model factory, native size, other size, whether forward needs interpolate_pos_encoding)
HF_CASES = {
    "dinov2": (lambda: hf.Dinov2ForImageClassification(_dino_config(hf.Dinov2Config, num_labels=5)), 56, (70, 42),
               False),
    "dinov2-headless": (lambda: hf.Dinov2Model(_dino_config(hf.Dinov2Config)), 56, (70, 42), False),
    "dinov2_with_registers": (lambda: hf.Dinov2WithRegistersForImageClassification(
        _dino_config(hf.Dinov2WithRegistersConfig, num_register_tokens=4, num_labels=5)), 56, (42, 70), False),
    "dinov2_with_registers-headless": (lambda: hf.Dinov2WithRegistersModel(
        _dino_config(hf.Dinov2WithRegistersConfig, num_register_tokens=4)), 56, (42, 70), False),
    "ijepa": (lambda: hf.IJepaForImageClassification(hf.IJepaConfig(**_PLAIN, num_labels=5)), 64, (48, 80), True),
    "vit_msn": (lambda: hf.ViTMSNForImageClassification(hf.ViTMSNConfig(**_PLAIN, num_labels=5)), 64, (80, 48), True),
    "siglip": (lambda: hf.SiglipForImageClassification(
        hf.SiglipConfig(vision_config=_PLAIN, text_config=_TEXT, num_labels=5)), 64, (48, 80), True),
}


def _hf_output(model: torch.nn.Module, x: torch.Tensor, interpolate: bool) -> torch.Tensor:
    kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
    out = model(pixel_values=x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_modern_vit_gives_reference_output_at_two_sizes(tmp_path, case):
    torch.manual_seed(0)
    make, native, other, interpolate = HF_CASES[case]
    ref = perturb(make())
    ref.save_pretrained(tmp_path)
    loaded = posenc.load(str(tmp_path))
    headless = not hasattr(ref, "classifier")
    assert loaded.model.headless == headless
    torch.manual_seed(1)
    for size in ((native, native), other):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected, got = _hf_output(ref, x, interpolate), loaded.model(x)
            if headless:
                assert_close(got, expected, **TOL)
            else:
                assert_close(_probs(got), _probs(expected), **TOL)
            assert_close(loaded.model.inspect(x).logits, got, **TOL)


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["vit_giant_patch14_dinov2", "vit_dwee_patch16_reg1_gap_256", "resnet50"])
def test_unsupported_modern_architecture_names_the_supported_ones(name):
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*deit3_small_patch16_224.*vit_small_patch14_reg4_dinov2"):
        config_from_timm({"architecture": name, "num_classes": 0})


def test_model_args_contradicting_the_weights_name_key_and_shapes(tmp_path):
    _timm_folder(tmp_path, "vit_small_patch14_reg4_dinov2", dict(_NARROW, img_size=56), num_classes=0)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["reg_tokens"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"reg_token \(1, 4, 64\) in the checkpoint vs \(1, 2, 64\)") as error:
        posenc.load(str(tmp_path))
    assert error.value.reason == "mismatch"


def test_timm_builds_at_the_tags_own_input_size():
    cfg = config_from_timm({"architecture": "vit_small_patch14_dinov2", "num_classes": 0,
                            "pretrained_cfg": {"input_size": [3, 518, 518], "fixed_input_size": True}})
    assert cfg.img_size == (518, 518) and cfg.grid == (37, 37) and cfg.num_classes == 0
