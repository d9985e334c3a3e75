"""XCiT parity: timm ``xcit_*`` checkpoints (random weights, Hub layout) give timm's probabilities and maps in posenc."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc import mechanisms, views
from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.hub import load
from posenc.models import XCiTConfig, build_model
from posenc.models.xcit import TIMM_PRESETS, fourier_features
from tests.test_parity import load_posenc
from tests.test_parity_levit import perturb_all

TOL = dict(atol=1e-4, rtol=1e-4)
#: tiny XCiT: 2 XCA blocks of 4 heads x 8 channels, 2 class-attention blocks, 64 px (a 4x4 grid at patch 16)
TINY = dict(depth=2, embed_dim=32, num_heads=4, img_size=64, num_classes=7)
#: nano: only the cls token normalised in class attention; tiny: every token; p8: three stem convs
CASES = [("xcit_nano_12_p16_224", {}), ("xcit_tiny_12_p16_224", {}), ("xcit_tiny_12_p8_224", {}),
         ("xcit_nano_12_p16_224", {"global_pool": "avg"})]  # fmt: skip
CASE_IDS = ["nano_cls_norm", "tiny_tokens_norm", "tiny_p8", "avg_pool"]


def _timm(tmp_path, name: str = "xcit_nano_12_p16_224", **kwargs):
    torch.manual_seed(0)
    ref = perturb_all(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    for module in ref.modules():  # timm's readable path, where the maps exist
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_xcit_checkpoint_gives_timm_probabilities_at_its_size(tmp_path, name, kwargs):
    ref = _timm(tmp_path, name, **kwargs)
    model = load_posenc(tmp_path)
    assert model.mechanisms == ("fourier",) and model.config.tokens_norm == ("tiny" in name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_xcit_at_a_non_square_size_gives_timm_probabilities(tmp_path, name, kwargs):
    """timm recomputes the Fourier features for the grid it gets, so the same model is the reference at 48x80."""
    ref = _timm(tmp_path, name, **kwargs)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        seen = model.inspect(x)
    assert_close(seen.logits.softmax(-1), expected, **TOL)
    assert seen.grid == ((6, 10) if "p8" in name else (3, 5))


def test_fourier_features_are_timms_before_the_projection():
    ref = timm.models.xcit.PositionalEncodingFourier(hidden_dim=32, dim=64)
    captured = {}
    ref.token_projection.register_forward_hook(lambda mod, args, out: captured.update(features=args[0]))
    ref(1, 3, 5)
    expected = captured["features"][0].permute(1, 2, 0).reshape(15, 64)  # h*w, 64
    assert_close(fourier_features((3, 5)), expected)
    # y features first, each (sin, cos) of the row's phase: patch (1, 4) has y = 2pi * 2/3 at the lowest frequency
    assert_close(fourier_features((3, 5))[9, :2], torch.tensor([np.sin(4 * np.pi / 3), np.cos(4 * np.pi / 3)]).float())


def test_inspection_gives_timms_embedding_channel_attention_and_class_attention(tmp_path):
    ref = _timm(tmp_path, "xcit_tiny_12_p16_224")
    model = load_posenc(tmp_path)
    maps = []
    for block in [*ref.blocks, *ref.cls_attn_blocks]:  # the probabilities go through attn_drop on timm's unfused path
        block.attn.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(out))
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        ref(x)
        seen = model.inspect(x)
        expected_pos = ref.pos_embed(1, 3, 5).flatten(2).transpose(1, 2)  # 1, 15, C
    assert_close(seen.pos_embed, expected_pos, **TOL)
    assert seen.pos_embed_prefix == 0 and seen.position["fourier_features"].shape == (15, 64)
    assert len(seen.blocks) == model.num_blocks == 4
    for trace, expected in zip(seen.blocks, maps):
        assert_close(trace.attn, expected, **TOL)
    assert [tuple(t.attn.shape) for t in seen.blocks] == [(1, 4, 8, 8)] * 2 + [(1, 4, 1, 16)] * 2
    assert all(t.grid == (3, 5) and t.pos_bias is None and t.attn_no_pos is None for t in seen.blocks)


def test_xcit_without_position_is_timm_without_its_fourier_term(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    ref.pos_embed = None  # timm's own switch (use_pos_embed=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        assert_close(model(x, position=False).softmax(-1), ref(x).softmax(-1), **TOL)
        assert not torch.allclose(model(x), off.logits)
    assert_close(off.logits.softmax(-1), ref(x).softmax(-1), **TOL)
    assert off.pos_embed is None and off.position == {}


def test_every_timm_xcit_name_has_a_preset_that_builds_timms_weights():
    assert set(TIMM_PRESETS) == set(timm.list_models("xcit_*"))
    for name in timm.list_models("xcit_*_384"):  # timm registers each _384 name with its _224 twin's arguments
        assert TIMM_PRESETS[name] == {**TIMM_PRESETS[name.replace("_384", "_224")], "img_size": 384}
    for name in timm.list_models("xcit_*_224"):
        with torch.device("meta"):
            expected = {k: v.shape for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
            model = build_model(config_from_timm({"architecture": f"{name}.fb_in1k", "num_classes": 1000}))
        assert {k: v.shape for k, v in model.state_dict().items()} == expected, name


def test_xcit_architecture_names_give_their_sizes_and_layer_norms():
    cfg = config_from_timm({"architecture": "xcit_small_24_p8_384.fb_dist_in1k", "num_classes": 1000,
                            "pretrained_cfg": {"input_size": [3, 384, 384], "fixed_input_size": True}})  # fmt: skip
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (384, 24, 8, 8, (384, 384))
    assert cfg.tokens_norm and not config_from_timm({"architecture": "xcit_nano_12_p8_224"}).tokens_norm
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*xcit_tiny_24_p8_384"):
        config_from_timm({"architecture": "xcit_huge_24_p16_224", "num_classes": 1000})


def test_xcit_refuses_sizes_off_the_patch_and_patches_other_than_8_or_16():
    model = build_model(XCiTConfig(**{**TINY, "depth": 1})).eval()
    with pytest.raises(ValueError, match="image size 64x72 is not divisible by the patch size 16"):
        model(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match="patch_size must be 8 or 16"):
        XCiTConfig(patch_size=12)


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("fourier_dim", 3, "must be even"), ("fourier_dim", 4096, "from 2 to 1024"),
    ("fourier_temperature", 0.0, "from 1.0"), ("embed_dim", 36, "multiple of 8"),
    ("global_pool", "map", "one of 'token', 'avg'"),
])  # fmt: skip
def test_xcit_config_refuses_values_that_would_break_or_bloat_the_model(field, value, rule):
    with pytest.raises(ValueError, match=rf"{field}.*{rule}"):
        XCiTConfig(**{field: value})


def test_xcit_trace_bytes_count_channel_maps_and_cls_rows():
    cfg = XCiTConfig(**TINY)
    # 2 XCA blocks x 4 heads x 8x8 channels, 2 class-attention blocks x 4 heads x (1 + 16) keys, float32
    assert build_model(cfg).trace_bytes((64, 64)) == (2 * 4 * 64 + 2 * 4 * 17) * 4


# ------------------------------------------------------------------------------------------- the mechanism's views

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def seen_xcit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xcit")
    ref = _timm(folder)
    return ref, views.inspect_image(load(str(folder)), PHOTO, size=(48, 80))


def _cosine_to(rows: torch.Tensor, index: int) -> np.ndarray:
    e = torch.nn.functional.normalize(rows.double(), dim=-1)
    return (e @ e[index]).numpy()


def test_fourier_similarity_views_are_cosines_of_timms_embedding_and_features(seen_xcit):
    ref, seen = seen_xcit
    fourier = mechanisms.get("fourier")
    assert fourier.kind == "absolute" and seen.grid == (3, 5)
    with torch.no_grad():
        pos = ref.pos_embed(1, 3, 5).flatten(2)[0].T  # 15, C
    view = {spec.key: spec.draw(seen, 0, (1, 3)) for spec in fourier.views}
    np.testing.assert_allclose(view["similarity"].arrays["pos_similarity_to_patch"].ravel(), _cosine_to(pos, 8),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(view["similarity_grid"].arrays["pos_similarity"][8], _cosine_to(pos, 8), atol=1e-5)
    feats = fourier_features((3, 5))
    np.testing.assert_allclose(view["feature_similarity"].arrays["fourier_feature_similarity"].ravel(),
                               _cosine_to(feats, 8), atol=1e-5)  # fmt: skip
    assert view["pca"].arrays["pos_pca_rgb"].shape == (3, 5, 3)
    assert all(v.image.size[0] >= 200 for v in view.values())


def test_fourier_feature_view_says_why_without_the_features(seen_xcit):
    _, seen = seen_xcit
    off = views.Seen(seen.name, seen.loaded, seen.photo, seen.size,
                     seen.loaded.model.inspect(torch.zeros(1, 3, 48, 80), position=False))  # fmt: skip
    with pytest.raises(views.ViewUnavailable, match="no Fourier features"):
        mechanisms.get("fourier").views[-1].draw(off, 0, (0, 0))


def test_xca_blocks_say_why_they_have_no_token_map_and_class_attention_has_one_cls_query(tmp_path):
    from posenc.models.layers import grid_pixels
    from posenc.models.xcit import XCA_NO_LAYOUT

    _timm(tmp_path)
    model = load_posenc(tmp_path)
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 48, 80))
    for trace in seen.blocks[:2]:
        assert trace.layout is None and trace.no_layout == XCA_NO_LAYOUT
    for trace in seen.blocks[2:]:
        layout = trace.layout
        assert (layout.query_prefix, layout.query_grid, layout.key_prefix, layout.key_grid) == (("cls",), (0, 0), ("cls",), (3, 5))
        assert layout.query_tokens.tolist() == [[0]] and layout.key_tokens.shape == (1, 16)
        assert_close(layout.key_pixels[1:], grid_pixels((3, 5), 16))  # patch centres: (8, 8), (8, 24), ...
        assert layout.grouped(trace.attn[0]).shape == (1, 4, 1, 16)


def test_views_say_why_an_xca_block_has_no_attention_map_and_the_rest_still_draw(seen_xcit):
    _, seen = seen_xcit
    with pytest.raises(views.ViewUnavailable, match="block 0 of .*: cross-covariance attention: channels attend to channels"):
        views.attention_view(seen, 0, (1, 1))
    assert "channels attend to channels" in views.describe_block(seen, 1)
    assert all(k.view is not None for k in mechanisms.kind_views(seen, "absolute", 0, (1, 1)))
    shares, groups = views.prefix_attention_shares(seen)  # blocks, heads, (cls, patches)
    assert groups == ("cls", "patches") and np.isnan(shares[:2]).all()
    np.testing.assert_allclose(shares[2:].sum(-1), 1.0, atol=1e-5)


def test_every_xcit_block_places_its_output_tokens_for_norms_and_decodability(tmp_path):
    """XCA blocks have no token map, but their outputs sit on the patch grid (class attention: cls, then the patches
    it passes on): token norms and the decodability probe read timm's block outputs there."""
    from posenc import norms
    from posenc.measure import block_outputs, patch_tokens
    from posenc.models.layers import grid_pixels

    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(2, 3, 48, 80)
    theirs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: theirs.append(out))
               for b in [*ref.blocks, *ref.cls_attn_blocks]]  # fmt: skip
    with torch.no_grad():
        ref(x)
    for handle in handles:
        handle.remove()
    with torch.inference_mode(), block_outputs(model) as ours:
        seen = model.inspect(x)
    assert len(ours) == len(theirs) == len(seen.blocks) == 4
    for trace, mine, timms in zip(seen.blocks, ours, theirs):
        assert_close(patch_tokens(mine, trace), timms[:, -15:], **TOL)  # B, 3*5, C: the 15 patch tokens
        assert_close(trace.outputs().patch_pixels, grid_pixels((3, 5), 16))
    found = norms.token_norms(ours, seen)
    assert [f.prefix_names for f in found] == [(), (), ("cls",), ("cls",)]
    np.testing.assert_allclose(found[0].patches, theirs[0].norm(dim=-1).reshape(2, 3, 5).numpy(), rtol=1e-4)
    np.testing.assert_allclose(found[3].prefix[:, 0], theirs[3][:, 0].norm(dim=-1).numpy(), rtol=1e-4)


def test_xcit_folder_measurement_decodes_position_from_every_block(tmp_path, noise_photos):
    from posenc import measure

    _timm(tmp_path / "model")
    record = measure.measure_folder(load(str(tmp_path / "model")), noise_photos, batch=3, sizes=[(64, 64)],
                                    seeds=(0,)).to_json()  # fmt: skip
    found = record["position_decodability"]
    assert found["held_out_images"] > 0
    for key in ("r2_row", "r2_col"):  # per block: a probe fitted on the block's patch outputs
        assert len(found[key]) == 4 and all(v is not None and np.isfinite(v) for v in found[key])
    norms = record["token_norms"]
    assert norms["notes"] == {} and len(norms["mean_patch_norm"]) == 4
    assert all(v is not None and v > 0 for v in norms["mean_patch_norm"])
    assert record["mean_attention_distance"][:2] == [[None] * 4] * 2  # channel attention: no distance
