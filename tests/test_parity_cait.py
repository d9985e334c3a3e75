"""CaiT parity: timm ``cait_*`` checkpoints (random weights, Hub layout) give timm's probabilities and maps in posenc."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed as timm_resample
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc import mechanisms, views
from posenc.convert import check_state_dict, config_from_timm, convert_state_dict
from posenc.hub import load
from posenc.measure import (
    NotApplicable,
    attention_distance_notes,
    block_attention_distance,
    mean_attention_distance,
)
from posenc.mechanisms.absolute import similarity_grid, similarity_to_patch
from posenc.models import CaiT, build_model
from posenc.models.cait import TIMM_PRESETS, mix_heads
from tests.test_parity import load_posenc, perturb

TOL = dict(atol=1e-4, rtol=1e-4)
#: tiny CaiT: 2 talking-heads blocks and 2 class-attention blocks, 4 heads of 8 channels, 64 px (a 4x4 grid)
TINY = dict(depth=2, depth_token_only=2, embed_dim=32, num_heads=4, img_size=64, num_classes=7)


def _reference(tmp_path, **kwargs):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("cait_xxs24_224", pretrained=False, **{**TINY, **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_cait_checkpoint_gives_timm_probabilities(tmp_path, global_pool):
    ref = _reference(tmp_path, global_pool=global_pool)
    model = load_posenc(tmp_path)
    assert isinstance(model, CaiT) and model.config.init_values == 1e-5 and model.mechanisms[0] == "learned"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_cait_at_a_non_square_size_matches_timm_built_for_it(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    # timm's CaiT runs at its built size only: build it at 48x80 with the embedding resampled by timm's function
    other = timm.create_model("cait_xxs24_224", pretrained=False, **{**TINY, "img_size": (48, 80)}).eval()
    state = dict(ref.state_dict())
    state["pos_embed"] = timm_resample(state["pos_embed"], (3, 5), (4, 4), num_prefix_tokens=0)
    other.load_state_dict(state)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        expected = other(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        seen = model.inspect(x)
    assert_close(seen.logits.softmax(-1), expected, **TOL)
    assert seen.grid == (3, 5) and seen.pos_embed.shape == (1, 15, 32) and seen.pos_embed_prefix == 0
    assert_close(seen.pos_embed, state["pos_embed"])


def _timm_maps(ref: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """timm's own maps: each talking-heads block's softmax (the input of ``proj_w``, heads last) and the maps every
    block applies to its values (the input of ``attn_drop``, on the non-fused path)."""
    softmax: list[torch.Tensor] = []
    applied: list[torch.Tensor] = []
    handles = []
    for block in ref.blocks:
        handles.append(block.attn.proj_w.register_forward_pre_hook(
            lambda _m, args: softmax.append(args[0].permute(0, 3, 1, 2))))  # B, heads, N, N
    for block in [*ref.blocks, *ref.blocks_token_only]:
        block.attn.fused_attn = False  # the class attention would otherwise never build its map
        handles.append(block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: applied.append(args[0])))
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for handle in handles:
            handle.remove()
    return softmax, applied


def test_cait_inspection_gives_timm_talking_heads_and_class_attention_maps(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    softmax, applied = _timm_maps(ref, x)
    with torch.no_grad():
        seen = model.inspect(x)
    assert len(seen.blocks) == model.num_blocks == 4 and len(softmax) == 2 and len(applied) == 4
    assert [tuple(t.attn.shape) for t in seen.blocks] == [(2, 4, 16, 16)] * 2 + [(2, 4, 1, 17)] * 2
    for b in (0, 1):  # talking heads: the distributions after proj_l, and proj_w's mixture of them as applied
        assert_close(seen.blocks[b].attn, softmax[b], **TOL)
        with torch.no_grad():
            assert_close(mix_heads(seen.blocks[b].attn, model.blocks[b].attn.proj_w), applied[b], **TOL)
    for b in (2, 3):  # class attention: the cls query's softmax over [cls, patches]
        assert_close(seen.blocks[b].attn, applied[b], **TOL)
    for trace in seen.blocks:
        assert_close(trace.attn.sum(-1), torch.ones(trace.attn.shape[:-1]))
    # the applied talking-heads maps are no distributions: a row of head g sums to sum(W[g]) + N * b[g]
    proj_w = model.blocks[0].attn.proj_w
    rows = (proj_w.weight.sum(1) + 16 * proj_w.bias).detach().view(1, 4, 1).expand(2, 4, 16)
    assert_close(applied[0].sum(-1), rows, **TOL)
    assert seen.num_prefix_tokens == 0 and all(t.attn_no_pos is None for t in seen.blocks)


def test_cait_without_position_is_timm_with_a_zero_embedding(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        assert_close(model(x, position=False), off.logits)
        on = model(x)
        ref.pos_embed.zero_()
        assert_close(off.logits.softmax(-1), ref(x).softmax(-1), **TOL)
    assert off.pos_embed is None and not torch.allclose(off.logits, on)


def test_cait_attention_distance_is_measured_in_self_attention_blocks_only(tmp_path):
    _reference(tmp_path)
    model = load_posenc(tmp_path)
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 64, 64))
    dist = block_attention_distance(seen.blocks[0])
    assert dist.shape == (1, 4) and torch.isfinite(dist).all()
    assert (dist > 0).all() and (dist < 64 * math.sqrt(2)).all()  # a mean of distances within the 64x64 image
    with pytest.raises(NotApplicable, match="no patch queries"):  # one cls query: no patch-to-patch distance
        block_attention_distance(seen.blocks[2])
    per_block = mean_attention_distance(seen)
    assert [bool(torch.isfinite(d).all()) for d in per_block] == [True, True, False, False]
    assert all(torch.isnan(d).all() for d in per_block[2:])
    notes = attention_distance_notes(seen)
    assert notes[:2] == ["", ""] and all("class attention" in n for n in notes[2:])


def test_cait_layouts_say_where_the_tokens_sit(tmp_path):
    _reference(tmp_path)
    model = load_posenc(tmp_path)
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 48, 80))
    talking, late = seen.blocks[0].layout, seen.blocks[2].layout
    assert talking.query_prefix == talking.key_prefix == () and talking.query_grid == talking.key_grid == (3, 5)
    assert talking.grouped(seen.blocks[0].attn[0]).shape == (1, 4, 15, 15)
    assert late.query_prefix == late.key_prefix == ("cls",)
    assert late.query_grid == (0, 0) and late.key_grid == (3, 5)
    assert late.grouped(seen.blocks[2].attn[0]).shape == (1, 4, 1, 16)
    assert late.key_pixels[1].tolist() == [8.0, 8.0] and late.key_pixels[-1].tolist() == [40.0, 72.0]


@pytest.mark.parametrize("name", sorted(TIMM_PRESETS))
def test_every_timm_cait_builds_with_timm_keys_and_shapes(name):
    ref = timm.create_model(name, pretrained=False, device="meta")
    config = config_from_timm({"architecture": f"{name}.fb_dist_in1k", "num_classes": 1000})
    with torch.device("meta"):
        model = build_model(config)
    check_state_dict(model, convert_state_dict("timm", ref.state_dict(), config), name)
    side = int(math.isqrt(ref.pos_embed.shape[1])) * 16
    assert config.img_size == (side, side)


def test_cait_architecture_names_give_their_sizes_and_layer_scale():
    config = config_from_timm({"architecture": "cait_s36_384.fb_dist_in1k", "num_classes": 1000})
    assert (config.embed_dim, config.depth, config.num_heads, config.init_values) == (384, 36, 8, 1e-6)
    assert (config.depth_token_only, config.img_size, config.global_pool) == (2, (384, 384), "token")


def test_the_preset_table_lists_every_timm_cait():
    assert set(TIMM_PRESETS) == set(timm.list_models("cait_*"))


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cait")
    ref = _reference(folder)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    return ref, views.inspect_image(load(str(folder)), photo)


def test_learned_views_draw_the_embedding_without_a_cls_entry(seen):
    ref, seen = seen
    assert seen.loaded.model.mechanisms == ("learned", "class_attention")
    grid, similarity = similarity_grid(seen, 0, (1, 2)), similarity_to_patch(seen, 0, (1, 2))
    pos = ref.pos_embed[0].detach()  # 16, C: patches only
    expected = torch.nn.functional.cosine_similarity(pos[6:7], pos, dim=-1).reshape(4, 4).numpy()
    np.testing.assert_allclose(similarity.arrays["pos_similarity_to_patch"], expected, atol=1e-5)
    assert grid.arrays["pos_embed"].shape == (16, 32)


@pytest.mark.parametrize(("block", "shown"), [(3, 3), (2, 2), (0, 3)])
def test_class_attention_view_shows_the_cls_query_of_a_class_attention_block(seen, block, shown):
    ref, seen = seen
    view = mechanisms.get("class_attention").views[0].draw(seen, block, (0, 0))
    attn = seen.inspection.blocks[shown].attn[0, :, 0]  # heads, 17
    assert int(view.arrays["class_attention_block"]) == shown
    np.testing.assert_allclose(view.arrays["class_attention"], attn[:, 1:].reshape(4, 4, 4).numpy(), atol=1e-6)
    to_cls = view.arrays["class_attention_to_prefix"][:, 0]  # heads
    np.testing.assert_allclose(view.arrays["class_attention"].sum((1, 2)) + to_cls, 1, atol=1e-5)
    assert view.image.size[0] > 200


def test_attention_view_of_a_class_attention_block_is_the_cls_row(seen):
    _, seen = seen
    view = views.attention_view(seen, 2, (3, 1))
    attn = seen.inspection.blocks[2].attn[0, :, 0]  # heads, 17
    np.testing.assert_allclose(view.arrays["attention"], attn[:, 1:].reshape(4, 4, 4).numpy(), atol=1e-6)
    np.testing.assert_allclose(view.arrays["attention_to_prefix"], attn[:, :1].numpy(), atol=1e-6)
    self_attention = views.attention_view(seen, 0, (3, 1))  # a talking-heads block: the clicked patch's row (13)
    expected = seen.inspection.blocks[0].attn[0, :, 13].reshape(4, 4, 4).numpy()
    np.testing.assert_allclose(self_attention.arrays["attention"], expected, atol=1e-6)


def test_folder_measurement_runs_on_cait_with_distances_in_self_attention_blocks(tmp_path, noise_photos):
    from posenc import measure

    _reference(tmp_path / "model")
    found = measure.measure_folder(load(str(tmp_path / "model")), noise_photos, batch=3, sizes=[(64, 64)], seeds=(0,))
    record = found.to_json()
    distances = record["mean_attention_distance"]
    assert len(distances) == 4 and all(0 < d < 64 * math.sqrt(2) for block in distances[:2] for d in block)
    assert distances[2:] == [[None] * 4] * 2  # the cls query is not a patch: no distance
    assert len(record["position_decodability"]["r2"]) == 4
