"""Every view and every measurement works on every supported architecture, through each block's token layout.

Each architecture is a tiny random-weight timm model saved in its Hub layout and loaded with :func:`posenc.load`:
ViT (DeiT, distilled: two prefix tokens), BEiT (global relative table with cls entries), RoPE-ViT (mixed),
EVA-02 (embedding + RoPE), Swin, Swin V2 (shifted windows), SAM (windows padded: 8x8 patches in 3x3 windows),
ConViT (GPSA blocks without cls, then blocks with cls), LeViT (subsampling attention: queries on their own grid)
and TinyViT (padded windows). The mean attention distance is checked against one computed here from timm's own
attention maps (fused attention off) with positions worked out independently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import mvitv2 as timm_mvitv2
from timm.models import save_for_hf

import posenc
from posenc import mechanisms, measure, views
from posenc.cli import main
from posenc.models.layers import NO_LAYOUT, window_token_index
from tests.test_parity import perturb
from tests.test_parity_levit import perturb_all

SWINV2_SMALL = dict(embed_dim=16, num_heads=(1, 2, 2, 4), depths=(2, 2, 1, 1), img_size=128)
#: name -> (timm architecture, its overrides, the input size (h, w) the test runs at)
ARCHITECTURES = {
    "deit": ("deit_small_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=64), (64, 48)),
    "deit_distilled": ("deit_small_distilled_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=64),
                       (64, 64)),
    "beit": ("beit_base_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=64), (64, 64)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (64, 48)),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=56), (56, 56)),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, num_heads=(1, 2, 2, 4), depths=(2, 2, 1, 1)),
             (224, 224)),
    "swinv2": ("swinv2_tiny_window8_256", SWINV2_SMALL, (128, 128)),
    "sam": ("samvit_base_patch16", dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3,
                                        global_attn_indexes=(1,), neck_chans=16, num_classes=0), (64, 64)),
    "convit": ("convit_tiny", dict(depth=3, local_up_to_layer=2, embed_dim=8, num_heads=4, img_size=64, num_classes=7),
               (64, 64)),
    "levit": ("levit_128s", dict(embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), img_size=64,
                                 num_classes=5), (64, 64)),
    "tiny_vit": ("tiny_vit_5m_224", dict(embed_dims=(16, 32, 48), depths=(1, 2, 1), num_heads=(1, 2, 3),
                                         window_sizes=(4, 4, 4), num_classes=5), (80, 96)),
    # the later families: channel attention, class attention, pooled keys, PEG windows, factorised attention,
    # a resampled 2D table, parallel blocks
    "xcit": ("xcit_nano_12_p16_224", dict(depth=2, embed_dim=32, num_heads=4, img_size=64, num_classes=5), (64, 48)),
    "cait": ("cait_xxs24_224", dict(depth=2, depth_token_only=2, embed_dim=32, num_heads=4, img_size=64,
                                    num_classes=5), (64, 64)),
    "mvitv2": ("mvitv2_tiny", dict(img_size=64, num_classes=5), (64, 64)),
    "twins": ("twins_svt_small", dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), depths=(2, 2, 2, 2),
                                      wss=(4, 4, 2, 2), img_size=64, num_classes=5), (64, 64)),
    "coat": ("coat_lite_tiny", dict(embed_dims=(16, 24, 32, 32), serial_depths=(1, 1, 1, 2), img_size=64,
                                    num_classes=5), (64, 64)),
    "naflexvit": ("naflexvit_base_patch16_par_gap", dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                                                         pos_embed_grid_size=(4, 4), num_classes=5), (32, 48)),
    "vit_18x2": ("vit_small_patch16_18x2_224", dict(depth=2, embed_dim=32, num_heads=4, img_size=64, num_classes=5),
                 (64, 48)),
}  # fmt: skip
#: timm's MViTv2 takes its shape from a registered config, not from keyword arguments: name -> that config
TIMM_CONFIGS = {"mvitv2": dict(depths=(1, 1, 2), embed_dim=16, num_heads=1, stride_q=((1, 1), (2, 2), (2, 2)))}


def _reference(name: str, folder: Path) -> torch.nn.Module:
    """The tiny timm model, perturbed (BatchNorm statistics too), saved to ``folder`` in its Hub layout."""
    arch, kwargs, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    overlay = dict(input_size=(3, *size))  # the checkpoint's own size, as a real one records it
    with pytest.MonkeyPatch.context() as patch:
        if name in TIMM_CONFIGS:
            patch.setitem(timm_mvitv2.model_cfgs, arch, timm_mvitv2.MultiScaleVitCfg(**TIMM_CONFIGS[name]))
        ref = perturb_all(timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs))
    shared = len({t.data_ptr() for t in ref.state_dict().values()}) < len(ref.state_dict())  # CoaT's shared CPE
    save_for_hf(ref, folder, model_args=TIMM_CONFIGS.get(name), safe_serialization=not shared)
    return ref


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every architecture's reference model and its folder, built once for the module."""
    out = {}
    for name in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (_reference(name, folder), folder)
    return out


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _seen(saved, name: str) -> views.Seen:
    _, folder = saved[name]
    size = ARCHITECTURES[name][2]
    return views.inspect_image(posenc.load(str(folder)), _photo(size), size)


# ------------------------------------------------------------------------------------------- every view renders


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_attention_view_and_every_mechanism_view_render_on_every_block(saved, name):
    seen = _seen(saved, name)
    patch = (seen.grid[0] - 1, seen.grid[1] // 3)  # off the centre, so a mapping slip shows
    for block in range(seen.num_blocks):
        trace = seen.inspection.blocks[block]
        if trace.layout is None:  # channel or factorised attention: the view says why, in the model's words
            with pytest.raises(views.ViewUnavailable) as refused:
                views.attention_view(seen, block, patch)
            assert trace.no_layout != NO_LAYOUT and trace.no_layout in str(refused.value)
            continue
        view = views.attention_view(seen, block, patch)
        attention = view.arrays["attention"]  # heads, hk, wk
        assert view.image.width > 0 and np.isfinite(attention).any()
        to_prefix = view.arrays.get("attention_to_prefix", np.zeros(attention.shape[:1] + (0,)))
        np.testing.assert_array_less(np.nansum(attention, axis=(1, 2)) + to_prefix.sum(-1), 1.0 + 1e-4)
    for mechanism in mechanisms.of(seen.loaded.model.mechanisms):
        for spec in mechanism.views:
            drawn, notes = 0, []
            for block in range(seen.num_blocks) if spec.per_block else (0,):
                try:
                    drawn += spec.draw(seen, block, patch).image.width > 0
                except views.ViewUnavailable as error:  # e.g. a GPSA view of ConViT's plain blocks
                    notes.append(str(error))
            assert drawn, f"{mechanism.name}/{spec.key} rendered on no block: {notes}"
    laid = [t.layout is not None for t in seen.inspection.blocks]
    if any(t.layout.key_prefix for t in seen.inspection.blocks if t.layout is not None):
        shares, groups = views.prefix_attention_shares(seen)
        assert np.isfinite(shares[laid]).all() and np.isnan(shares[np.logical_not(laid)]).all()
        assert groups[-1] == "patches"


def test_sam_attention_view_draws_the_padded_windows_without_the_padding(saved):
    seen = _seen(saved, "sam")  # 8x8 patches, 3x3 windows: the grid is padded to 9x9 in windowed blocks
    trace = seen.inspection.blocks[0]
    assert trace.layout.padded == (9, 9) and "grid padded to 9x9" in views.describe_block(seen, 0)
    attention = views.attention_view(seen, 0, (7, 7)).arrays["attention"]  # heads, 8, 8
    assert attention.shape == (2, 8, 8)
    assert np.isfinite(attention[0]).sum() == 4 and np.isfinite(attention[0, 6:, 6:]).all()  # 4 real keys
    row = trace.attn[0, 8, :, 4]  # the last window (rows and columns 6..8), slot (1, 1): patch (7, 7); heads, 9
    np.testing.assert_allclose(attention[:, 6:, 6:], row[:, [0, 1, 3, 4]].reshape(2, 2, 2).numpy(), atol=1e-6)
    assert (row[:, [2, 5, 6, 7, 8]].sum(-1) > 0).all()  # the padding keys took some attention, not drawn


def test_convit_blocks_say_which_have_a_cls_token(saved):
    seen = _seen(saved, "convit")
    assert [t.layout.key_prefix for t in seen.inspection.blocks] == [(), (), ("cls",)]
    shares, groups = views.prefix_attention_shares(seen)
    assert groups == ("cls", "patches")
    np.testing.assert_allclose(shares[:2, :, 0], 0.0)  # the GPSA blocks have no cls to attend to
    np.testing.assert_allclose(shares[:2, :, 1], 1.0, atol=1e-5)
    assert (shares[2, :, 0] > 0).all()


# ------------------------------------------------------------------------------------------- attention distance


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_mean_attention_distance_is_finite_for_every_block_and_head(saved, name):
    seen = _seen(saved, name)
    found = measure.mean_attention_distance(seen.inspection)
    notes = measure.attention_distance_notes(seen.inspection)
    for trace, dist, note in zip(seen.inspection.blocks, found, notes):
        assert dist.shape == (1, trace.attn.shape[-3])
        if trace.layout is None or not trace.layout.query_is_patch.any():  # no token map, or only a cls query
            assert note and torch.isnan(dist).all()
            continue
        assert note == "" and torch.isfinite(dist).all() and (dist > 0).all()
        assert (dist < math.hypot(*seen.size)).all()


def test_a_block_without_token_attention_gets_a_note_not_a_failure(saved):
    seen = _seen(saved, "deit")
    channels = type(seen.inspection.blocks[0])(**{**seen.inspection.blocks[0].__dict__, "layout": None,
                                                 "no_layout": "it attends over channels, not tokens"})
    inspection = type(seen.inspection)(**{**seen.inspection.__dict__, "blocks": [channels, seen.inspection.blocks[1]]})
    found = measure.mean_attention_distance(inspection)
    assert torch.isnan(found[0]).all() and torch.isfinite(found[1]).all()
    assert measure.attention_distance_notes(inspection) == ["it attends over channels, not tokens", ""]
    with pytest.raises(measure.NotApplicable, match="over channels"):
        measure.block_attention_distance(channels)
    other = views.Seen(seen.name, seen.loaded, seen.photo, seen.size, inspection)
    with pytest.raises(views.ViewUnavailable, match="over channels"):
        views.attention_view(other, 0, (0, 0))
    assert "over channels" in views.describe_block(other, 0)


def _timm_attention(ref: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention probabilities as timm computes them (fused attention off), in block order, as
    (B*nW, heads, n, m)."""
    found: list[torch.Tensor] = []
    modules = [m for m in ref.modules() if hasattr(m, "attn_drop") and hasattr(m, "num_heads")]
    for module in modules:
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        heads = module.num_heads  # SAM merges the heads into the batch axis: (B*nW*heads, n, n)
        module.attn_drop.register_forward_hook(lambda _m, _a, out, h=heads: found.append(out.reshape(-1, h, *out.shape[-2:])))
    with torch.no_grad():
        ref(x)
    return found


def _distance(attn: torch.Tensor, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """(heads,) attention-weighted distance, summed over keys with a position (no renormalising) and averaged over
    queries with a position; attn (W, heads, n, m), positions (W, n, 2) / (W, m, 2) in pixels, NaN for none."""
    a = attn.double().numpy()
    d = np.linalg.norm(q_pos[:, :, None] - k_pos[:, None, :], axis=-1)  # W, n, m
    d = np.where(np.isnan(d), 0.0, d)
    per_query = np.einsum("whnm,wnm->whn", a, d)  # W, heads, n
    queries = ~np.isnan(q_pos[..., 0])  # W, n
    return per_query.transpose(1, 0, 2)[:, queries].mean(-1)  # heads


def _centres(grid: tuple[int, int], patch: int) -> np.ndarray:
    """(h, w, 2) patch centres (y, x) in pixels."""
    ys, xs = np.meshgrid((np.arange(grid[0]) + 0.5) * patch, (np.arange(grid[1]) + 0.5) * patch, indexing="ij")
    return np.stack([ys, xs], -1)


def _windows(centres: np.ndarray, window: int, shift: int = 0) -> np.ndarray:
    """(nW, window**2, 2) positions of each window's tokens: rolled by -shift, padded with NaN, row-major windows."""
    rolled = np.roll(centres, (-shift, -shift), axis=(0, 1))
    h, w = rolled.shape[:2]
    hp, wp = -(-h // window) * window, -(-w // window) * window
    padded = np.full((hp, wp, 2), np.nan)
    padded[:h, :w] = rolled
    return padded.reshape(hp // window, window, wp // window, window, 2).transpose(0, 2, 1, 3, 4).reshape(-1, window**2, 2)


def test_sam_distance_equals_one_from_timms_attention_in_padded_windows(saved):
    ref, folder = saved["sam"]
    model = posenc.load(str(folder)).model
    x = torch.randn(1, 3, 64, 64)
    timm_attn = _timm_attention(ref, x)  # windowed: (nW, heads, 9, 9); global: (1, heads, 64, 64)
    with torch.no_grad():
        found = measure.mean_attention_distance(model.inspect(x))
    centres = _centres((8, 8), 8)
    for block, attn in enumerate(timm_attn):
        if block == 1:  # the global block
            pos = centres.reshape(1, -1, 2)
        else:
            pos = _windows(centres, 3)  # 9 windows of 3x3, the last row and column padding
            assert attn.shape[0] == 9 and np.isnan(pos).any()
        expected = _distance(attn, pos, pos)
        np.testing.assert_allclose(found[block][0].numpy(), expected, rtol=1e-4)


def test_convit_distance_equals_one_from_timms_attention_in_gpsa_and_cls_blocks(saved):
    ref, folder = saved["convit"]
    model = posenc.load(str(folder)).model
    x = torch.randn(1, 3, 64, 64)
    timm_attn = _timm_attention(ref, x)  # GPSA: (1, heads, 16, 16); later: (1, heads, 17, 17) with cls first
    with torch.no_grad():
        found = measure.mean_attention_distance(model.inspect(x))
    patches = _centres((4, 4), 16).reshape(1, -1, 2)
    with_cls = np.concatenate([np.full((1, 1, 2), np.nan), patches], axis=1)
    for block, attn in enumerate(timm_attn):
        pos = patches if block < 2 else with_cls
        np.testing.assert_allclose(found[block][0].numpy(), _distance(attn, pos, pos), rtol=1e-4)


def test_swinv2_shifted_block_distance_equals_one_from_timms_attention(saved):
    ref, folder = saved["swinv2"]
    model = posenc.load(str(folder)).model
    x = torch.randn(1, 3, 128, 128)
    timm_attn = _timm_attention(ref, x)
    with torch.no_grad():
        seen = model.inspect(x)
    trace = seen.blocks[1]
    assert trace.shift == (4, 4) and trace.grid == (32, 32)  # stage 0: 32x32 patches of 4 px, 8x8 windows
    pos = _windows(_centres((32, 32), 4), 8, shift=4)
    expected = _distance(timm_attn[1], pos, pos)
    np.testing.assert_allclose(measure.block_attention_distance(trace)[0].numpy(), expected, rtol=1e-4)
    stage1 = seen.blocks[3]  # stage 1, shifted: merged tokens sit at the centre of the 2x2 patches they pool
    assert stage1.shift == (4, 4) and stage1.grid == (16, 16)
    pos = _windows(_centres((16, 16), 8), 8, shift=4)
    np.testing.assert_allclose(measure.block_attention_distance(stage1)[0].numpy(), _distance(timm_attn[3], pos, pos),
                               rtol=1e-4)


def test_window_slots_match_the_swin_window_keys_of_every_patch():
    grid, window, shift = (8, 12), (4, 3), (2, 1)
    index = window_token_index(grid, window, shift)  # nW, 12
    for r in range(grid[0]):
        for c in range(grid[1]):
            keys = views.viz.swin_window_keys((r, c), grid, window, shift)
            assert index[keys.window_index, keys.query_index] == r * grid[1] + c
            assert index[keys.window_index].tolist() == [kr * grid[1] + kc for kr, kc in keys.keys.tolist()]


def test_measure_command_reports_finite_distances_for_sam_and_convit_local_blocks(saved, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        _photo((64, 64), seed=i).save(images / f"p{i}.png")
    for name in ("sam", "convit"):
        out = tmp_path / name
        args = ["measure", "--model", str(saved[name][1]), "--images", str(images), "--out", str(out), "--batch", "2"]
        assert main(args) == 0
        record = json.loads((out / "measures.json").read_text())
        distance = record["mean_attention_distance"]
        assert len(distance) == 3 and all(isinstance(v, float) and v > 0 for heads in distance for v in heads)
        assert record["mean_attention_distance_notes"] == {}


# ------------------------------------------------------------------------------------------- kind views


@pytest.mark.parametrize("name", ["swinv2", "sam", "levit", "tiny_vit", "beit", "convit"])
def test_relative_kind_gives_the_relative_views_of_every_model_that_has_one(saved, name):
    seen = _seen(saved, name)
    block = seen.num_blocks - 1
    drawn = mechanisms.kind_views(seen, "relative", block, (1, 1))
    used = [m for m in mechanisms.of(seen.loaded.model.mechanisms) if m.kind == "relative"]
    assert [k.key for k in drawn] == [f"{m.name}/{s.key}" for m in used for s in m.views]
    assert any(k.view is not None for k in drawn)
    assert all((k.view is None) == bool(k.note) for k in drawn)


def test_a_model_without_the_kind_is_told_its_mechanisms_by_title(saved):
    seen = _seen(saved, "rope_mixed")
    with pytest.raises(views.ViewUnavailable) as error:
        mechanisms.kind_views(seen, "relative", 0, (0, 0))
    message = str(error.value).replace(seen.name, "")  # the folder's name is the model's own
    assert "mixed 2D RoPE (learned frequencies)" in message and "so it has no relative position bias" in message
    for internal in ("rope_mixed", "rel_table", "cpb", "windowed", "family"):
        assert internal not in message


# ------------------------------------------------------------------------------------------- outlines


def _run_around(mask: np.ndarray, at: int) -> tuple[int, int]:
    """[start, end) of the run of True in a 1D mask that holds index ``at``."""
    start, end = at, at
    while start > 0 and mask[start - 1]:
        start -= 1
    while end < len(mask) and mask[end]:
        end += 1
    return start, end


def _between_black(white: np.ndarray, black: np.ndarray, axis: int, reach: int = 4) -> np.ndarray:
    """White pixels with a black pixel within ``reach`` on both sides along ``axis``."""
    before = np.zeros_like(white)
    after = np.zeros_like(white)
    for k in range(1, reach + 1):
        before |= np.roll(black, k, axis=axis)
        after |= np.roll(black, -k, axis=axis)
    return white & before & after


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """[start, end) of the longest run of True in a 1D mask."""
    best, start = (0, 0), None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    return best


def _outline_cell(image: Image.Image, grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the outlined cell of one map drawn over a black photo.

    The photo is the tallest block of rows that are mostly not white (titles, labels and gaps are white), and the
    widest block of such columns in it; the outline is the white between black rims inside it.
    """
    px = np.asarray(image.convert("RGB")).astype(int)
    white, black = (px == 255).all(-1), (px == 0).all(-1)  # H, W
    top, bottom = _longest_run(white.mean(1) < 0.35)  # the outline's edges take a sixth of a row
    left, right = _longest_run(white[top:bottom].mean(0) < 0.35)
    white, black = white[top:bottom, left:right], black[top:bottom, left:right]
    ys, xs = np.nonzero(_between_black(white, black, 0) | _between_black(white, black, 1))
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    return int(cy * grid[0] // (bottom - top)), int(cx * grid[1] // (right - left))


@pytest.mark.parametrize(("arch", "kwargs", "view"), [
    ("deit_small_patch16_224", {}, "learned/similarity"),
    ("beit_base_patch16_224", {}, "rel_table/query_bias"),
    ("vit_small_patch16_rope_224", {}, "rope_axial/rope"),
    ("deit_small_patch16_224", {}, "attention"),
])  # fmt: skip
def test_per_patch_views_outline_the_clicked_row_and_column_not_the_transpose(tmp_path, arch, kwargs, view):
    torch.manual_seed(0)
    ref = perturb(timm.create_model(arch, pretrained=False, depth=1, embed_dim=32, num_heads=2, img_size=(48, 96),
                                    patch_size=16, **kwargs))  # fmt: skip
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    seen = views.inspect_image(loaded, Image.new("RGB", (96, 48)), (48, 96))
    assert seen.grid == (3, 6)
    patch = (2, 1)  # its transpose (1, 2) lies inside the grid too
    if view == "attention":
        image = views.attention_view(seen, 0, patch).image
        panel = _first_panel(image)
    else:
        mechanism, key = view.split("/")
        spec = next(s for s in mechanisms.get(mechanism).views if s.key == key)
        image = spec.draw(seen, 0, patch).image
        panel = _first_panel(image) if spec.per_block else image
    assert _outline_cell(panel, seen.grid) == patch


def _first_panel(sheet: Image.Image) -> Image.Image:
    """The first head's panel of a sheet: the leftmost run of columns that are mostly not white, in its photo rows."""
    white = (np.asarray(sheet.convert("RGB")) == 255).all(-1)  # H, W
    top, bottom = _longest_run(white.mean(1) < 0.5)
    cols = white[top:bottom].mean(0) < 0.5
    left = int(np.argmax(cols))
    return sheet.crop((left, 0, _run_around(cols, left)[1], sheet.height))


def test_titles_name_the_clicked_patch_and_the_pooled_query_that_answers_it(saved):
    seen = _seen(saved, "mvitv2")  # 16x16 input patches; block 1 pools its queries to 8x8
    assert seen.grid == (16, 16) and seen.inspection.blocks[1].layout.query_grid == (8, 8)
    assert views.block_query(seen, 0, (9, 9)).describe() == "patch (9, 9)"  # queries on the input grid
    query = views.block_query(seen, 1, (9, 9))
    assert query.describe() == "patch (9, 9) (query (4, 4) of the block's 8x8 grid)"
    layout = seen.inspection.blocks[1].layout
    y, x = layout.query_pixels[query.token].tolist()  # the answering query covers the clicked patch's centre
    assert abs(y - 38) <= 4 and abs(x - 38) <= 4
