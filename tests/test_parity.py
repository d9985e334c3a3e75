"""Converter parity: timm and transformers checkpoints, saved in their Hub layouts, give the same logits in posenc.

Reference models get random weights (every parameter perturbed, norms included), are saved with
``timm.models.save_for_hf`` or ``save_pretrained`` and read back from the folder through
:mod:`posenc.convert`, exactly as a Hub download would be.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import transformers as hf
from safetensors.torch import load_file
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc.convert import (
    CheckpointMismatchError,
    UnsupportedModelError,
    check_state_dict,
    config_from_timm,
    config_from_transformers,
    convert_state_dict,
    detect_layout,
    supported_table,
)
from posenc.models import SwinConfig, ViTConfig, build_model
from posenc.preprocess import IMAGENET_MEAN, IMAGENET_STD

TOL = dict(atol=1e-4, rtol=1e-4)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so no norm, bias, layer scale or position table is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """config.json, the weights (safetensors, else pytorch_model.bin) and preprocessor_config.json if any."""
    config = json.loads((folder / "config.json").read_text())
    if (folder / "model.safetensors").exists():
        weights = load_file(folder / "model.safetensors")
    else:
        weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    pp_path = folder / "preprocessor_config.json"
    return config, weights, json.loads(pp_path.read_text()) if pp_path.exists() else None


def load_posenc(folder: Path, **overrides: Any) -> torch.nn.Module:
    """Build and strictly load a posenc model from a Hub folder; ``overrides`` replace config fields."""
    config, weights, preprocessor = read_folder(folder)
    layout = detect_layout(config)
    cfg = config_from_timm(config) if layout == "timm" else config_from_transformers(config, preprocessor)
    cfg = dataclasses.replace(cfg, **overrides)
    model = build_model(cfg)
    state = convert_state_dict(layout, weights, cfg)
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, strict=True)
    return model.eval()


# Shrunk for speed: save_for_hf records the overrides under ``model_args``, which the converter applies.
TIMM_CASES = [
    ("vit_tiny_patch16_224", {"depth": 2}),
    ("vit_base_patch32_224", {"depth": 2}),
    ("deit_small_distilled_patch16_224", {"depth": 2}),
    ("beit_base_patch16_224", {"depth": 2}),
    ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}),
    # narrower too; at 192 px the last stage's 6x6 grid is smaller than the window, which shrinks to 6
    ("swin_base_patch4_window12_384", {"depths": (2, 2, 2, 2), "embed_dim": 64, "num_heads": (2, 4, 8, 16), "img_size": 192}),
]


@pytest.mark.parametrize(("name", "kwargs"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_checkpoint_gives_reference_logits(tmp_path, name, kwargs):
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **kwargs))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, *model.config.img_size)
    with torch.no_grad():
        assert_close(model(x), ref(x), **TOL)


def test_timm_checkpoint_resamples_pos_embed_like_timm(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load_posenc(tmp_path, img_size=(160, 128))
    assert model.pos_embed.shape == (1, 1 + 10 * 8, 192)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=(160, 128)).eval()
    small.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(ref.state_dict(), small))
    x = torch.randn(1, 3, 160, 128)
    with torch.no_grad():
        assert_close(model(x), small(x), **TOL)


def test_relative_tables_are_resized_to_the_config_window_like_timms_bicubic_resize(tmp_path):
    """A window-7 checkpoint loaded at window 8 gives timm's logits with tables resized by its bicubic resize.

    (timm's own checkpoint filter uses its geometric ``resize_rel_pos_bias_table`` instead; see the README.)
    """
    pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
    torch.manual_seed(0)
    ref = perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1)))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load_posenc(tmp_path, img_size=(256, 256), window_size=(8, 8))  # stage grids 64, 32, 16, 8
    target = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), img_size=256,
                               window_size=8).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith(("relative_position_index", "attn_mask"))}
    for key, table in list(state.items()):
        if key.endswith("relative_position_bias_table"):
            state[key] = pos_embed_rel.resize_rel_pos_bias_table_simple(table, (8, 8), (225, table.shape[1]))
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("relative_position_index", "attn_mask")) for k in missing)
    table = model.layers[2].blocks[0].attn.relative_position_bias_table.detach()  # 225, heads
    assert_close(table, state["layers.2.blocks.0.attn.relative_position_bias_table"])
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert_close(model(x), target(x), **TOL)


def test_real_deit_tiny_weights_match_timm(shared_data):
    folder = shared_data / "deit_tiny_patch16_224.fb_in1k"
    model = load_posenc(folder)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    ref.load_state_dict(load_file(folder / "model.safetensors"))
    assert model.config.preprocess.mean == IMAGENET_MEAN and model.config.preprocess.crop_pct == pytest.approx(0.9)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(model(x), ref(x), **TOL)


SMALL_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
NAMES = {i: name for i, name in enumerate(["cat", "dog", "ship", "frog", "bird"])}
HF_CASES = {
    "vit": (hf.ViTForImageClassification, hf.ViTConfig(**SMALL_VIT, id2label=NAMES), hf.ViTImageProcessor()),
    "deit_distilled": (
        hf.DeiTForImageClassificationWithTeacher, hf.DeiTConfig(**SMALL_VIT, num_labels=5), hf.DeiTImageProcessor()
    ),
    "beit": (
        hf.BeitForImageClassification,
        hf.BeitConfig(**SMALL_VIT, num_labels=5, use_relative_position_bias=True, use_mean_pooling=True),
        None,
    ),
    "beit_shared_bias_abs_pos_token_pool": (
        hf.BeitForImageClassification,
        hf.BeitConfig(**SMALL_VIT, num_labels=5, use_shared_relative_position_bias=True,
                      use_absolute_position_embeddings=True, use_mean_pooling=False),
        None,
    ),  # fmt: skip
    "swin": (
        hf.SwinForImageClassification,
        hf.SwinConfig(embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8], image_size=64, patch_size=4, window_size=4, num_labels=5),
        None,
    ),
}


HF_FILES = [(case, False) for case in HF_CASES] + [("vit", True), ("swin", True)]


@pytest.mark.parametrize(("case", "bin_file"), HF_FILES, ids=[f"{c}-{'bin' if b else 'safetensors'}" for c, b in HF_FILES])
def test_transformers_checkpoint_gives_reference_logits(tmp_path, case, bin_file):
    model_cls, config, processor = HF_CASES[case]
    torch.manual_seed(0)
    ref = perturb(model_cls(config))
    ref.save_pretrained(tmp_path)
    if processor is not None:
        processor.save_pretrained(tmp_path)
    if bin_file:  # an older repo: the same Hub layout as a pickled state dict
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, *model.config.img_size)
    with torch.no_grad():
        assert_close(model(x), ref(pixel_values=x).logits, **TOL)
    assert model.config.norm_eps == config.layer_norm_eps
    if case == "vit":
        assert model.config.labels == ("cat", "dog", "ship", "frog", "bird")


def test_posenc_checkpoint_round_trips(tmp_path):
    cfg = SwinConfig(img_size=32, patch_size=2, num_classes=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    ref = perturb(build_model(cfg))
    ref.save_pretrained(tmp_path)
    config, weights, _ = read_folder(tmp_path)
    assert detect_layout(config) == "posenc"
    model = build_model(config)
    state = convert_state_dict("posenc", weights, model.config)
    check_state_dict(model, state, str(tmp_path))
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(model.eval()(x), ref(x), **TOL)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)),
        ("vit_small_patch32_384.augreg_in21k_ft_in1k", dict(embed_dim=384, img_size=(384, 384), patch_size=32)),
        ("deit_tiny_distilled_patch16_224.fb_in1k", dict(embed_dim=192, distilled=True)),
        ("beit_base_patch16_224.in22k_ft_in22k_in1k", dict(qkv_bias="qv", rel_pos_bias=True, pos_embed="none", init_values=0.1)),
        ("beitv2_large_patch16_224", dict(embed_dim=1024, depth=24, global_pool="avg", init_values=1e-5)),
        ("swin_large_patch4_window12_384", dict(embed_dim=192, window_size=(12, 12), img_size=(384, 384))),
    ],
)
def test_timm_sizes_follow_from_the_architecture_name(name, expected):
    cfg = config_from_timm({"architecture": name, "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 224, 224]}})
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("name", ["resnet50", "vit_base_patch16_224_miil", "vit_giant_patch14_dinov2", "vit_huge_patch14_224"])
def test_unsupported_timm_architecture_lists_supported_families(name):
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*beit_.*deit_.*swin_.*vit_tiny_patch16_224"):
        config_from_timm({"architecture": name, "num_classes": 1000})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_args": {"act_layer": "relu"}}, "act_layer.*'relu'"),
        ({"model_args": {"dynamic_img_pad": True}}, "dynamic_img_pad=True"),
    ],
)
def test_timm_options_posenc_cannot_rebuild_are_refused(config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_timm({"architecture": "vit_tiny_patch16_224", "num_classes": 10, **config})


def test_beit_shared_table_is_copied_into_every_block(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("beit_base_patch16_224", pretrained=False, depth=2, use_rel_pos_bias=False,
                                    use_shared_rel_pos_bias=True))  # fmt: skip
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load_posenc(tmp_path)
    shared = ref.state_dict()["rel_pos_bias.relative_position_bias_table"]
    for block in model.blocks:
        assert_close(block.attn.relative_position_bias_table.detach(), shared)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close(model(x), ref(x), **TOL)


def test_unsupported_transformers_models_are_refused():
    with pytest.raises(UnsupportedModelError, match="vit.*deit.*beit.*swin"):
        detect_layout({"model_type": "bert"})
    with pytest.raises(UnsupportedModelError, match="DeiTForImageClassification"):
        config_from_transformers({"model_type": "deit", "architectures": ["DeiTForImageClassification"], **SMALL_VIT}, None)


def test_wrong_shape_raises_mismatch_naming_source_and_key(tmp_path):
    model = build_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3))
    state = model.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(48, 32)
    state["extra.weight"] = state.pop("norm.weight")
    expected = r"(?s)my/repo.*norm\.weight.*extra\.weight.*blocks\.0\.attn\.qkv\.weight \(48, 32\).*config\.json"
    with pytest.raises(CheckpointMismatchError, match=expected):
        check_state_dict(model, state, "my/repo")


def test_deit_uses_imagenet_statistics_whatever_the_preprocessor_says(caplog):
    stated = {
        "image_processor_type": "DeiTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    }  # fmt: skip
    deit = {"model_type": "deit", **SMALL_VIT, "image_size": 224, "patch_size": 16}
    with caplog.at_level(logging.WARNING, logger="posenc.convert"):
        pp = config_from_transformers(deit, stated).preprocess
    assert (pp.mean, pp.std, pp.input_size) == (IMAGENET_MEAN, IMAGENET_STD, (224, 224))
    assert "ImageNet mean/std" in caplog.text
    vit = config_from_transformers({**deit, "model_type": "vit"}, {**stated, "image_processor_type": "ViTImageProcessor"})
    assert vit.preprocess.mean == (0.5, 0.5, 0.5)
    swin = config_from_transformers(
        {"model_type": "swin", "embed_dim": 16, "depths": [2], "num_heads": [2], "image_size": 32, "window_size": 4},
        {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "size": {"height": 32, "width": 32}},
    )
    assert isinstance(swin, SwinConfig) and swin.preprocess.std == IMAGENET_STD


def test_readme_table_of_supported_architectures_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = supported_table()
    assert "`deit_tiny_patch16_224`" in table and "`swin`" in table
    assert "<!-- supported:start -->\n" + table + "<!-- supported:end -->" in readme

