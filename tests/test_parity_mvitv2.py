"""MViTv2 parity: timm ``mvitv2_*`` checkpoints (random weights, Hub layout) in posenc, with their pooled attention.

timm's MViTv2 factory takes no architecture arguments (only ``img_size``, ``num_classes``...), so each test shrinks
the registration itself: the named ``model_cfgs`` entry is replaced by a tiny ``MultiScaleVitCfg`` for the test, timm
builds and saves the model as it would the real one, and the config fields go into ``model_args`` by their timm
names. Three stages at 64 px: 16x16 queries over 4x4 keys, then 8x8 over 8x8 and 8x8 over 4x4, then 4x4 queries
over 8x8 keys (keys finer than queries), so every case of the decomposed index is exercised.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import mvitv2 as tm
from timm.models import save_for_hf
from torch.testing import assert_close

import posenc
from posenc import mechanisms, views
from posenc.convert import UnsupportedModelError, check_state_dict, config_from_timm, convert_state_dict
from posenc.encodings import decomposed_rel_pos, decomposed_rel_pos_bias, decomposed_rel_pos_factors
from posenc.models import TIMM_PRESETS, MViTv2, MViTv2Config
from posenc.preprocess import build_transform, load_image
from tests.test_parity import perturb

TOL = dict(atol=1e-4, rtol=1e-4)
#: the shrunk registration: widths 16/32/64, heads 1/2/4, key strides 4/2/1 (timm's adaptive rule)
TINY = dict(depths=(1, 1, 2), embed_dim=16, num_heads=1, stride_q=((1, 1), (2, 2), (2, 2)))
CASES = {
    "mvitv2_tiny": TINY,  # average pooling of the tokens, no cls
    "mvitv2_small_cls": {**TINY, "use_cls_token": True},  # cls token, read by the head
    "mvitv2_large": {**TINY, "expand_attn": False},  # widening in the last MLP of a stage
    "mvitv2_base": {**TINY, "use_abs_pos": True, "residual_pooling": False},  # absolute embedding, no pooled residual
    "mvitv2_base_cls": {**TINY, "use_cls_token": True, "use_abs_pos": True, "mode": "max"},  # max pooling, no norms
}


def timm_mvitv2(monkeypatch, name: str, *, img_size: int = 64, **fields) -> torch.nn.Module:
    """timm's own ``name`` built by its factory from a tiny ``MultiScaleVitCfg`` (``CASES[name]`` + ``fields``)."""
    cfg = {**CASES[name], **fields}
    monkeypatch.setitem(tm.model_cfgs, name, tm.MultiScaleVitCfg(**cfg))
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=5).eval()


def saved_timm(tmp_path, monkeypatch, name: str) -> torch.nn.Module:
    """A perturbed tiny timm MViTv2, saved to ``tmp_path`` in the timm Hub layout with its config in ``model_args``."""
    torch.manual_seed(0)
    ref = perturb(timm_mvitv2(monkeypatch, name))
    save_for_hf(ref, tmp_path, model_args=CASES[name], safe_serialization=True)
    return ref


def resized_like_timm(ref: torch.nn.Module, monkeypatch, name: str, size: tuple[int, int]) -> torch.nn.Module:
    """timm's reference at another size: its tables resized by timm's ``checkpoint_filter_fn`` (linear, as loading
    a checkpoint into a model built for that size does). timm builds only square sizes, so the row tables come from
    a model built at the height and the column tables from one built at the width."""
    state = ref.state_dict()
    rows = tm.checkpoint_filter_fn(dict(state), timm_mvitv2(monkeypatch, name, img_size=size[0]))
    cols = tm.checkpoint_filter_fn(dict(state), timm_mvitv2(monkeypatch, name, img_size=size[1]))
    other = timm_mvitv2(monkeypatch, name, img_size=size[0])
    other.load_state_dict(rows)
    for key in (k for k in state if k.endswith("rel_pos_w")):
        other.get_submodule(key.rsplit(".", 1)[0]).rel_pos_w = torch.nn.Parameter(cols[key])
    return other


@pytest.mark.parametrize("name", list(CASES))
def test_timm_mvitv2_gives_timm_probabilities_at_the_native_size(tmp_path, monkeypatch, name):
    ref = saved_timm(tmp_path, monkeypatch, name)
    loaded = posenc.load(str(tmp_path))
    assert isinstance(loaded.model, MViTv2)
    assert loaded.model.config.use_cls_token == CASES[name].get("use_cls_token", False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(loaded.model(x).softmax(-1), expected, **TOL)
        assert_close(loaded.model.inspect(x).logits.softmax(-1), expected, **TOL)


@pytest.mark.parametrize("size", [(96, 96), (48, 80)], ids=["square-96", "non-square-48x80"])
@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_small_cls"])
def test_timm_mvitv2_at_another_size_resizes_tables_as_timm_loading_does(tmp_path, monkeypatch, name, size):
    ref = saved_timm(tmp_path, monkeypatch, name)
    model = posenc.load(str(tmp_path)).model
    other = resized_like_timm(ref, monkeypatch, name, size)
    assert other.stages[0].blocks[0].attn.rel_pos_h.shape[0] == 2 * size[0] // 4 - 1  # it was resized
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = other(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        seen = model.inspect(x)
    assert_close(seen.logits.softmax(-1), expected, **TOL)
    h, w = size[0] // 4, size[1] // 4
    assert [t.grid for t in seen.blocks] == [(h, w), (h // 2, w // 2), (h // 4, w // 4), (h // 4, w // 4)]


def _record_timm_logits(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap timm's ``cal_rel_pos_type`` to record every block's logits before and after the bias is added."""
    calls = []
    original = tm.cal_rel_pos_type

    def recording(attn, *args, **kwargs):
        before = attn.clone()  # timm adds the bias in place
        after = original(attn, *args, **kwargs)
        calls.append((before, after.clone()))
        return after

    monkeypatch.setattr(tm, "cal_rel_pos_type", recording)
    return calls


@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["native", "non-square-48x80"])
@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_small_cls"])
def test_mvitv2_attention_and_bias_factors_match_timm_on_the_pooled_key_grid(tmp_path, monkeypatch, name, size):
    ref = saved_timm(tmp_path, monkeypatch, name)
    model = posenc.load(str(tmp_path)).model
    if size != (64, 64):
        ref = resized_like_timm(ref, monkeypatch, name, size)
    calls = _record_timm_logits(monkeypatch)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref(x)
        seen = model.inspect(x)
    p = seen.num_prefix_tokens
    assert len(calls) == len(seen.blocks) == 4
    key_grids = []
    for (before, after), trace in zip(calls, seen.blocks):
        assert_close(trace.attn, after.softmax(-1), **TOL)
        assert_close(trace.attn_no_pos, before.softmax(-1), **TOL)
        rel_h, rel_w = trace.position["rel_h"], trace.position["rel_w"]  # B, heads, Nq, kh / kw
        assert_close(decomposed_rel_pos_bias(rel_h, rel_w), (after - before)[..., p:, p:], **TOL)
        assert trace.attn.shape[-2:] == (p + trace.grid[0] * trace.grid[1], p + rel_h.shape[-1] * rel_w.shape[-1])
        key_grids.append((rel_h.shape[-1], rel_w.shape[-1]))
    h, w = size[0] // 4, size[1] // 4
    # stage 0 pools keys by 4, stage 1 by 2, stage 2 not at all: its first block has 4x fewer queries than keys
    assert key_grids == [(h // 4, w // 4), (h // 2, w // 2), (h // 2, w // 2), (h // 4, w // 4)]
    assert seen.prefix_labels == ("cls",) * p


@pytest.mark.parametrize(("q_grid", "k_grid"),
                         [((16, 16), (4, 4)), ((4, 4), (8, 8)), ((12, 20), (3, 5)), ((6, 10), (12, 20))])
def test_decomposed_bias_matches_timm_cal_rel_pos_type_when_query_and_key_grids_differ(q_grid, k_grid):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, q_grid[0] * q_grid[1], 8, generator=gen)  # B, heads, Nq, hd
    table_h = torch.randn(2 * max(q_grid[0], k_grid[0]) - 1, 8, generator=gen)
    table_w = torch.randn(2 * max(q_grid[1], k_grid[1]) - 1, 8, generator=gen)
    zeros = torch.zeros(2, 3, q.shape[2], k_grid[0] * k_grid[1])
    expected = tm.cal_rel_pos_type(zeros, q, False, list(q_grid), list(k_grid), table_h, table_w)
    rel_h = decomposed_rel_pos(q_grid[0], k_grid[0], table_h)  # qh, kh, hd
    rel_w = decomposed_rel_pos(q_grid[1], k_grid[1], table_w)  # qw, kw, hd
    assert_close(decomposed_rel_pos_bias(*decomposed_rel_pos_factors(q, rel_h, rel_w, q_grid)), expected)


def test_mvitv2_without_position_matches_timm_with_zeroed_tables_and_embedding(tmp_path, monkeypatch):
    ref = saved_timm(tmp_path, monkeypatch, "mvitv2_base_cls")  # tables and an absolute embedding
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        for key, value in ref.named_parameters():
            if key.endswith(("rel_pos_h", "rel_pos_w")) or key == "pos_embed":
                value.zero_()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        off = model.inspect(x, position=False)
        assert not torch.allclose(model(x), ref(x), atol=1e-3)  # the position terms did matter
    assert off.pos_embed is None
    assert all(t.attn_no_pos is None and not t.position for t in off.blocks)


def test_mvitv2_inspection_gives_the_absolute_embedding_it_added(tmp_path, monkeypatch):
    ref = saved_timm(tmp_path, monkeypatch, "mvitv2_base_cls")
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 64, 64))
        other = model.inspect(torch.randn(1, 3, 48, 80))
    assert "learned" in model.mechanisms and seen.pos_embed_prefix == 1
    assert_close(seen.pos_embed, ref.pos_embed.detach())
    assert other.pos_embed.shape == (1, 1 + 12 * 20, 16)  # resampled to the 12x20 grid, cls row kept
    assert_close(other.pos_embed[:, 0], ref.pos_embed.detach()[:, 0])


def test_mvitv2_refuses_sizes_that_do_not_pool_exactly(tmp_path, monkeypatch):
    saved_timm(tmp_path, monkeypatch, "mvitv2_tiny")
    model = posenc.load(str(tmp_path)).model
    assert model.size_step() == (16, 16)
    assert not model.fits((72, 64)) and model.fits((48, 80))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        model(torch.randn(1, 3, 72, 64))


@pytest.mark.parametrize("name", timm.list_models("mvitv2_*"))
def test_every_timm_mvitv2_name_has_timms_stages_and_weights(name):
    expected = tm.model_cfgs[name]  # timm's own registration
    cfg = config_from_timm({"architecture": f"{name}.untrained", "num_classes": 10})
    stages = (cfg.depths, cfg.embed_dim, cfg.num_heads, cfg.stride_q, cfg.stride_kv, cfg.expand_attn, cfg.use_cls_token)
    assert stages == (
        tuple(expected.depths), tuple(expected.embed_dim), tuple(expected.num_heads),
        tuple(map(tuple, expected.stride_q)), tuple(map(tuple, expected.stride_kv)), expected.expand_attn,
        expected.use_cls_token)  # fmt: skip
    with torch.device("meta"):  # shapes only: the huge model has 695M parameters
        ref = timm.create_model(name, pretrained=False, num_classes=10)
        model = MViTv2(cfg)
    check_state_dict(model, convert_state_dict("timm", ref.state_dict(), cfg), name)
    assert model.num_params() == sum(p.numel() for p in ref.parameters())


def test_mvitv2_options_posenc_does_not_build_are_refused():
    with pytest.raises(UnsupportedModelError, match="pool_first"):
        config_from_timm({"architecture": "mvitv2_tiny", "num_classes": 10, "model_args": {"pool_first": True}})
    with pytest.raises(ValueError, match="mode must be one of"):
        MViTv2Config(**TIMM_PRESETS["mvitv2_tiny"][1], mode="conv_unshared")
    with pytest.raises(ValueError, match="multiple of 32"):
        MViTv2Config(**TIMM_PRESETS["mvitv2_tiny"][1], img_size=240)


def test_mvitv2_saved_by_posenc_loads_back_the_same(tmp_path, monkeypatch):
    saved_timm(tmp_path / "timm", monkeypatch, "mvitv2_small_cls")
    model = posenc.load(str(tmp_path / "timm")).model
    model.save_pretrained(tmp_path / "posenc")
    again = MViTv2.from_pretrained(tmp_path / "posenc").eval()
    assert dataclasses.replace(again.config, preprocess=model.config.preprocess) == model.config
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert_close(again(x), model(x))


def test_curated_mvitv2_entry_counts_the_parameters_of_the_model_it_names():
    from posenc.registry import HUB_MODELS

    entry = next(e for e in HUB_MODELS if e.architecture == "mvitv2")
    cfg = config_from_timm({"architecture": entry.source.split("/", 1)[1], "num_classes": 1000})
    with torch.device("meta"):
        assert MViTv2(cfg).num_params() == entry.num_params
    assert entry.mechanisms == cfg.mechanisms == ("decomposed",)


def test_mvitv2_pooled_tokens_sit_at_the_centre_of_what_they_pool():
    cfg = MViTv2Config(**TIMM_PRESETS["mvitv2_tiny"][1])
    grids = cfg.block_grids()
    assert [(g.query, g.key) for g in grids[:4]] == [((56, 56), (14, 14)), ((28, 28), (28, 28)),
                                                     ((28, 28), (14, 14)), ((14, 14), (28, 28))]
    assert [(g.query_stride, g.key_stride) for g in grids[:4]] == [((4, 4), (16, 16)), ((8, 8), (8, 8)),
                                                                   ((8, 8), (16, 16)), ((16, 16), (8, 8))]
    # average the input-pixel rows of stage 0's tokens (centres at 2 + 4i) with each key pooling window: the
    # interior keys land on 2 + 16j, the centre token of their 3x3 window
    rows = (2 + 4 * torch.arange(56.0))[None, None, :, None].expand(1, 1, 56, 56)
    pooled = torch.nn.functional.avg_pool2d(rows, 3, stride=4, padding=1)[0, 0, 1:, 1]  # interior keys
    assert_close(pooled, 2 + grids[0].key_stride[0] * torch.arange(1.0, 14.0))
    assert cfg.block_grids((6, 10))[-1].query == (1, 2)  # a 24x40 input: every grid still divides


# ------------------------------------------------------------------------------------------- views

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize(("block", "query", "key_grid"), [(0, (9, 5), (4, 4)), (2, (2, 1), (8, 8))],
                         ids=["stage0-16x16-queries-over-4x4-keys", "stage2-4x4-queries-over-8x8-keys"])
def test_decomposed_bias_view_draws_timms_bias_on_the_pooled_key_grid(tmp_path, monkeypatch, block, query, key_grid):
    ref = saved_timm(tmp_path, monkeypatch, "mvitv2_small_cls")
    loaded = posenc.load(str(tmp_path))
    seen = views.inspect_image(loaded, PHOTO)
    pixels = build_transform(loaded.preprocess)(load_image(PHOTO))  # what inspect_image gave the model
    calls = _record_timm_logits(monkeypatch)
    with torch.no_grad():
        ref(pixels[None])
    before, after = calls[block]
    qw = seen.inspection.blocks[block].grid[1]
    expected = (after - before)[0, :, 1 + query[0] * qw + query[1], 1:].reshape(-1, *key_grid)  # heads, kh, kw
    patch = (9, 5)  # input patch whose centre is nearest this block's query (and on it by row-major scaling too)
    view = mechanisms.get("decomposed").views[0].draw(seen, block, patch)
    np.testing.assert_allclose(view.arrays["decomposed_bias"], expected.numpy(), atol=1e-4)
    factors = mechanisms.get("decomposed").views[1].draw(seen, block, patch)
    total = factors.arrays["bias_row_term"] + factors.arrays["bias_column_term"]
    np.testing.assert_allclose(total, expected.numpy(), atol=1e-4)


def test_decomposed_stage_view_draws_every_stage_on_its_pooled_key_grid(tmp_path, monkeypatch):
    saved_timm(tmp_path, monkeypatch, "mvitv2_tiny")
    loaded = posenc.load(str(tmp_path))
    seen = views.inspect_image(loaded, PHOTO)
    view = mechanisms.get("decomposed").views[2].draw(seen, 3, (9, 5))
    shapes = {k: v.shape for k, v in view.arrays.items()}
    assert shapes == {"stage0_decomposed_bias": (1, 4, 4), "stage1_decomposed_bias": (2, 8, 8),
                      "stage2_decomposed_bias": (4, 8, 8)}  # heads, pooled key grid of each stage's first block
    per_block = mechanisms.get("decomposed").views[0].draw(seen, 2, (9, 5))  # block 2 opens stage 2
    np.testing.assert_allclose(view.arrays["stage2_decomposed_bias"], per_block.arrays["decomposed_bias"])
    assert view.image.height > 3 * 200


def test_decomposed_stage_view_of_a_single_stage_model_is_its_first_block(tmp_path):
    cfg = MViTv2Config(depths=(2,), embed_dim=16, num_heads=1, stride_q=((1, 1),), img_size=32, num_classes=3)
    MViTv2(cfg).save_pretrained(tmp_path)
    seen = views.inspect_image(posenc.load(str(tmp_path)), PHOTO)
    view = mechanisms.get("decomposed").views[2].draw(seen, 1, (3, 2))
    first = mechanisms.get("decomposed").views[0].draw(seen, 0, (3, 2))
    assert list(view.arrays) == ["stage0_decomposed_bias"]
    np.testing.assert_allclose(view.arrays["stage0_decomposed_bias"], first.arrays["decomposed_bias"])
    layout = seen.inspection.blocks[0].tokens()
    assert layout.key_grid == (layout.query_grid[0] // 4, layout.query_grid[1] // 4)  # keys pooled by 4
    assert first.arrays["decomposed_bias"].shape == (1, *layout.key_grid)
