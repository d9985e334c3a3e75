"""SAM's image encoder (timm ``samvit_*``) and ViTDet (transformers ``vitdet``): parity, position terms, bad input.

Reference models are tiny (depth 2-3, width 32, 64 px inputs with 8 px patches and 3-patch windows, so the
8x8 grid is padded to 9x9 in windowed blocks), perturbed, saved in their Hub layout and loaded with
:func:`posenc.load`, as a download would be.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers as hf
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from timm.models.vision_transformer_sam import get_rel_pos
from torch.testing import assert_close

import posenc
from posenc.encodings import decomposed_rel_pos, pad_to_window, padded_grid
from posenc.hub import HubLoadError
from tests.test_parity import perturb

TOL = dict(atol=1e-4, rtol=1e-4)
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,))
SAM_CASES = {
    # headless, conv neck, absolute embedding: what the sa1b checkpoints are
    "samvit_base_patch16": {**TINY, "neck_chans": 16, "num_classes": 0},
    # no absolute embedding, LayerNorm neck and a classifier
    "samvit_base_patch16_224": {**TINY, "num_classes": 7},
}


def timm_sam(tmp_path, name: str, **kwargs) -> torch.nn.Module:
    """A perturbed tiny timm SAM encoder, saved to ``tmp_path`` in the timm Hub layout."""
    torch.manual_seed(0)
    overlay = dict(input_size=(3, 64, 64))  # as a real checkpoint records the size it was built for
    ref = perturb(timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay,
                                    **{**SAM_CASES[name], **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


def outputs(out: torch.Tensor, headless: bool) -> torch.Tensor:
    """Probabilities of a classifier; a headless model's features as they are."""
    return out if headless else out.softmax(dim=-1)


@pytest.mark.parametrize("size", [64, 80], ids=["native", "80px-padded-and-resized"])
@pytest.mark.parametrize("name", list(SAM_CASES))
def test_timm_sam_matches_reference_at_native_and_other_size(tmp_path, name, size):
    ref = timm_sam(tmp_path, name)
    loaded = posenc.load(str(tmp_path))
    headless = SAM_CASES[name]["num_classes"] == 0
    assert loaded.model.headless == headless
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = outputs(ref(x), headless)  # timm resamples pos_embed and resizes global tables on the fly
        assert_close(outputs(loaded.model(x), headless), expected, **TOL)
        assert_close(outputs(loaded.model.inspect(x).logits, headless), expected, **TOL)


def test_sam_attention_maps_match_timm_with_and_without_the_bias(tmp_path):
    ref = timm_sam(tmp_path, "samvit_base_patch16")
    model = posenc.load(str(tmp_path)).model
    seen = {}
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    no_bias = timm.create_model("samvit_base_patch16", pretrained=False, **SAM_CASES["samvit_base_patch16"]).eval()
    no_bias.load_state_dict(ref.state_dict())
    with torch.no_grad():
        no_bias.blocks[0].attn.rel_pos_h.zero_()
        no_bias.blocks[0].attn.rel_pos_w.zero_()
    no_bias.blocks[0].attn.fused_attn = False
    no_bias.blocks[0].attn.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("no_bias", out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref(x)
        no_bias(x)
        insp = model.inspect(x)
    windowed, global_ = insp.blocks[0], insp.blocks[1]
    assert windowed.window == (3, 3) and windowed.grid == (8, 8) and global_.window is None
    assert windowed.attn.shape == (1, 9, 2, 9, 9)  # 8x8 padded to 9x9: nine 3x3 windows
    assert_close(windowed.attn[0], seen[0].reshape(9, 2, 9, 9), **TOL)  # timm: (B*nW*heads, n, n)
    assert_close(global_.attn[0], seen[1].reshape(2, 64, 64), **TOL)
    assert_close(windowed.attn_no_pos[0], seen["no_bias"].reshape(9, 2, 9, 9), **TOL)
    assert not torch.allclose(windowed.attn, windowed.attn_no_pos, atol=1e-3)


def test_sam_bias_factors_rebuild_the_bias_timm_adds(tmp_path):
    ref = timm_sam(tmp_path, "samvit_base_patch16")
    model = posenc.load(str(tmp_path)).model
    x = torch.randn(1, 3, 80, 80)  # 10x10 grid: the global block's 15-offset tables are resized to 19
    with torch.no_grad():
        insp = model.inspect(x)
        trace = insp.blocks[1]
        attn = ref.blocks[1].attn
        tokens = ref.patch_embed(x) + timm.layers.resample_abs_pos_embed_nhwc(ref.pos_embed, (10, 10))
        tokens = ref.blocks[0](tokens)
        q = attn.qkv(ref.blocks[1].norm1(tokens).reshape(1, 100, 32)).reshape(1, 100, 3, 2, 16)[:, :, 0]  # 1, N, 2, 16
        q = q.permute(0, 2, 1, 3).reshape(2, 100, 16)  # heads, N, hd
        expected = timm.models.vision_transformer_sam.get_decomposed_rel_pos_bias(
            q, attn.rel_pos_h, attn.rel_pos_w, (10, 10), (10, 10))  # heads, N, N
    rebuilt = trace.position["rel_h"][0][..., :, None] + trace.position["rel_w"][0][..., None, :]  # heads, N, h, w
    assert_close(rebuilt.reshape(2, 100, 100), expected, **TOL)
    assert trace.position["rel_pos_h"].shape == (10, 10, 16)


def test_sam_without_position_leaves_out_both_embeddings(tmp_path):
    ref = timm_sam(tmp_path, "samvit_base_patch16")
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        ref.pos_embed.zero_()
        for block in ref.blocks:
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        insp = model.inspect(x, position=False)
        assert not torch.allclose(model(x), ref(x), atol=1e-3)
    assert insp.pos_embed is None and all(not b.position and b.attn_no_pos is None for b in insp.blocks)


def test_sam_pos_embed_is_flattened_as_added(tmp_path):
    ref = timm_sam(tmp_path, "samvit_base_patch16")
    insp = posenc.load(str(tmp_path)).model.inspect(torch.randn(1, 3, 80, 80))
    expected = timm.layers.resample_abs_pos_embed_nhwc(ref.pos_embed, (10, 10)).reshape(1, 100, 32)
    assert insp.pos_embed_prefix == 0 and insp.num_prefix_tokens == 0
    assert_close(insp.pos_embed, expected)


@pytest.mark.parametrize(("q_size", "k_size", "length"), [(5, 5, 9), (7, 7, 9), (3, 6, 11), (6, 3, 11)])
def test_decomposed_offsets_match_timm_get_rel_pos(q_size, k_size, length):
    table = torch.randn(length, 4)
    assert_close(decomposed_rel_pos(q_size, k_size, table), get_rel_pos(q_size, k_size, table))


def test_padding_rounds_the_grid_up_to_whole_windows():
    x = torch.randn(1, 8, 10, 2)
    padded = pad_to_window(x, (3, 5))
    assert padded.shape[1:3] == padded_grid((8, 10), (3, 5)) == (9, 10)
    assert_close(padded[:, :8], x)
    assert padded[:, 8:].abs().sum() == 0


def test_model_args_contradicting_the_weights_name_the_key_and_shapes(tmp_path):
    timm_sam(tmp_path, "samvit_base_patch16")
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["img_size"] = 96  # the global block's tables were learned for an 8x8 grid
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"blocks\.1\.attn\.rel_pos_h \(15, 16\) in the checkpoint vs \(23, 16\)"):
        posenc.load(str(tmp_path))


def test_unsupported_architecture_names_the_sam_presets():
    from posenc.convert import UnsupportedModelError, config_from_timm

    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*samvit_base_patch16.*samvit_huge_patch16"):
        config_from_timm({"architecture": "resnet50", "num_classes": 1000})


# --------------------------------------------------------------------------- transformers ViTDet

VITDET = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64, pretrain_image_size=48,
              patch_size=8, window_size=3, window_block_indices=[0, 2], use_relative_position_embeddings=True)


def vitdet(tmp_path, model_cls: type = hf.VitDetModel) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = perturb(model_cls(hf.VitDetConfig(**VITDET)))
    ref.save_pretrained(tmp_path)
    return ref


def vitdet_features(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map averaged over the grid: (B, C)."""
    out = ref(pixel_values=x)
    fmap = out.feature_maps[-1] if hasattr(out, "feature_maps") else out.last_hidden_state  # B, C, h, w
    return fmap.mean(dim=(2, 3))


@pytest.mark.parametrize("size", [64, 80], ids=["native", "80px"])
@pytest.mark.parametrize("model_cls", [hf.VitDetModel, hf.VitDetBackbone], ids=["model", "backbone"])
def test_vitdet_matches_transformers_at_native_and_other_size(tmp_path, model_cls, size):
    ref = vitdet(tmp_path, model_cls)
    loaded = posenc.load(str(tmp_path))
    assert loaded.model.headless and loaded.model.config.pos_embed_grid == (6, 6)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close(loaded.model(x), vitdet_features(ref, x), **TOL)
        insp = loaded.model.inspect(x, position=True)
    assert [b.window for b in insp.blocks] == [(3, 3), None, (3, 3)]


def test_vitdet_attention_matches_transformers(tmp_path):
    ref = vitdet(tmp_path)
    model = posenc.load(str(tmp_path)).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        attentions = ref(pixel_values=x, output_attentions=True).attentions
        insp = model.inspect(x)
    assert_close(insp.blocks[0].attn.reshape(9, 2, 9, 9), attentions[0].reshape(9, 2, 9, 9), **TOL)
    assert_close(insp.blocks[1].attn, attentions[1], **TOL)


def test_vitdet_split_projection_layout_loads(tmp_path):
    ref = vitdet(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for key in [k for k in weights if ".attention.qkv." in k]:
        for name, part in zip(("q_proj", "k_proj", "v_proj"), weights.pop(key).chunk(3, dim=0)):
            weights[key.replace("qkv", name)] = part.contiguous()
    for key in [k for k in weights if ".attention.proj." in k]:
        weights[key.replace(".proj.", ".o_proj.")] = weights.pop(key)
    save_file(weights, tmp_path / "model.safetensors")
    model = posenc.load(str(tmp_path)).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), vitdet_features(ref, x), **TOL)


def test_vitdet_with_residual_blocks_is_refused(tmp_path):
    torch.manual_seed(0)
    hf.VitDetModel(hf.VitDetConfig(**VITDET, residual_block_indices=[1])).save_pretrained(tmp_path)
    with pytest.raises(HubLoadError, match=r"residual conv blocks \[1\]"):
        posenc.load(str(tmp_path))


@pytest.mark.parametrize("size", [(64, 64), (80, 72)])
def test_sam_trace_bytes_count_the_attention_an_inspection_keeps(tmp_path, size):
    timm_sam(tmp_path, "samvit_base_patch16")
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        insp = model.inspect(torch.randn(1, 3, *size))
    kept = sum(t.numel() * 4 for b in insp.blocks for t in (b.attn, b.attn_no_pos) if t is not None)
    assert model.trace_bytes(size) == kept


def test_posenc_sam_checkpoint_round_trips(tmp_path):
    from posenc.models import SamConfig, build_model

    cfg = SamConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, window_size=3,
                    global_attn_indexes=(1,), neck_chans=8)
    ref = perturb(build_model(cfg))
    ref.save_pretrained(tmp_path)
    loaded = posenc.load(str(tmp_path))
    assert loaded.layout == "posenc" and loaded.model.config == cfg
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded.model(x), ref(x), **TOL)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"embed_dim": 30, "num_heads": 4}, r"embed_dim 30 is not divisible by num_heads 4"),
        ({"img_size": 60}, r"img_size \(60, 60\) is not a multiple of patch_size 16"),
        ({"depth": 2, "global_attn_indexes": (1, 5)}, r"global_attn_indexes \[5\] are not blocks of a depth-2 model"),
        ({"window_size": -1}, r"window_size must be an integer from 0"),
        ({"global_attn_indexes": (-1,)}, r"global_attn_indexes\[0\] must be an integer from 0"),
    ],
)
def test_sam_config_errors_name_the_field_and_the_rule(fields, message):
    from posenc.models import SamConfig

    with pytest.raises(ValueError, match=message):
        SamConfig(**fields)


@pytest.mark.parametrize(("window_size", "global_attn_indexes"), [(0, (0, 1)), (3, ()), (3, (0,))])
def test_sam_configs_with_all_global_or_all_windowed_blocks_are_valid(window_size, global_attn_indexes):
    from posenc.models import SamConfig, build_model

    cfg = SamConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, window_size=window_size,
                    global_attn_indexes=global_attn_indexes, neck_chans=8)
    windows = [block.window for block in build_model(cfg).blocks]
    assert windows == [0 if window_size == 0 or i in global_attn_indexes else 3 for i in range(2)]
