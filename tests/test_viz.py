"""Tests for the pure views in posenc.viz: geometry, maps, overlays and sheets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.colors import Normalize
from PIL import Image

from posenc import encodings, viz


def sincos_like(grid: tuple[int, int], dim: int = 64) -> torch.Tensor:
    """A small 2D sin-cos embedding written here independently: (h*w, dim)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    omega = 1.0 / 100.0 ** (torch.arange(dim // 4).float() / (dim // 4))  # dim/4

    def enc(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1, 1) * omega  # N, dim/4
        return torch.cat([a.sin(), a.cos()], dim=1)  # N, dim/2

    return torch.cat([enc(cols), enc(rows)], dim=1)  # N, dim


def photo(w: int, h: int, value: int = 128) -> Image.Image:
    """A flat grey RGB photo."""
    return Image.new("RGB", (w, h), (value, value, value))


# ------------------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize(
    ("xy", "image_size", "grid", "expected"),
    [
        ((0, 0), (224, 224), (14, 14), (0, 0)),
        ((223, 223), (224, 224), (14, 14), (13, 13)),
        ((15, 16), (224, 224), (14, 14), (1, 0)),
        ((112, 112), (224, 224), (14, 14), (7, 7)),
        ((17, 13), (250, 190), (14, 14), (0, 0)),  # cells are 17.86 x 13.57 pixels
        ((18, 14), (250, 190), (14, 14), (1, 1)),
        ((249, 189), (250, 190), (14, 14), (13, 13)),
        ((17.9, 13.6), (250, 190), (14, 14), (1, 1)),
        ((100, 10), (200, 100), (2, 4), (0, 2)),  # non-square grid, (w, h) image order
        ((-5, 300), (224, 224), (14, 14), (13, 0)),  # clamped
        ((1000, -1), (224, 224), (14, 14), (0, 13)),
    ],
)
def test_patch_at_maps_clicks_to_cells_and_clamps(xy, image_size, grid, expected):
    assert viz.patch_at(xy, image_size, grid) == expected


def test_patch_at_covers_every_pixel_with_contiguous_blocks_for_non_divisible_sizes():
    w, h, grid = 250, 190, (14, 9)
    rows = [viz.patch_at((0, y), (w, h), grid)[0] for y in range(h)]
    cols = [viz.patch_at((x, 0), (w, h), grid)[1] for x in range(w)]
    assert sorted(set(rows)) == list(range(grid[0])) and rows == sorted(rows)
    assert sorted(set(cols)) == list(range(grid[1])) and cols == sorted(cols)
    # block sizes differ by at most one pixel
    assert max(np.bincount(rows)) - min(np.bincount(rows)) <= 1
    assert max(np.bincount(cols)) - min(np.bincount(cols)) <= 1


def reference_windows(grid, window, shift):
    """Brute force: token ids and Swin-style region ids, rolled and partitioned into windows (nW, Wh*Ww)."""
    H, W = grid
    Wh, Ww = window
    sh, sw = shift
    ids = torch.arange(H * W).reshape(H, W)  # H, W
    rolled = torch.roll(ids, shifts=(-sh, -sw), dims=(0, 1))  # H, W
    region = torch.zeros(H, W, dtype=torch.long)  # regions live in the shifted frame
    row_slices = (slice(0, H - Wh), slice(H - Wh, H - sh), slice(H - sh, H)) if sh else (slice(0, H),)
    col_slices = (slice(0, W - Ww), slice(W - Ww, W - sw), slice(W - sw, W)) if sw else (slice(0, W),)
    n = 0
    for rs in row_slices:
        for cs in col_slices:
            region[rs, cs] = n
            n += 1

    def part(x):
        return x.reshape(H // Wh, Wh, W // Ww, Ww).permute(0, 2, 1, 3).reshape(-1, Wh * Ww)  # nW, Wh*Ww

    return part(rolled), part(region)


@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (0, 2), (3, 1)])
def test_swin_window_keys_match_rolled_and_partitioned_grid(shift):
    grid, window = (8, 8), (4, 4)
    windows, regions = reference_windows(grid, window, shift)
    for r in range(grid[0]):
        for c in range(grid[1]):
            got = viz.swin_window_keys((r, c), grid, window, shift)
            assert windows[got.window_index, got.query_index] == r * grid[1] + c
            expected_keys = torch.stack((windows[got.window_index] // grid[1], windows[got.window_index] % grid[1]), -1)
            torch.testing.assert_close(got.keys, expected_keys)
            reg = regions[got.window_index]
            torch.testing.assert_close(got.masked, reg != reg[got.query_index])
    if shift == (0, 0):
        assert not any(viz.swin_window_keys((r, c), grid, window).masked.any() for r in range(8) for c in range(8))
    else:
        assert viz.swin_window_keys((7, 7), grid, window, shift).masked.any()


@pytest.mark.parametrize(("grid", "window", "shift"), [((8, 8), (4, 4), (2, 2)), ((14, 14), (7, 7), (3, 3))])
def test_swin_masked_keys_agree_with_the_models_attention_mask(grid, window, shift):
    mask = encodings.shifted_window_mask(grid, window, shift)  # nW, Wh*Ww, Wh*Ww
    for r, c in [(0, 0), (grid[0] - 1, 1), (grid[0] // 2, grid[1] - 1), (grid[0] - 1, grid[1] - 1)]:
        got = viz.swin_window_keys((r, c), grid, window, shift)
        torch.testing.assert_close(got.masked, mask[got.window_index, got.query_index] != 0)


def test_swin_window_keys_rejects_window_that_does_not_tile_grid():
    with pytest.raises(ValueError, match="not a multiple of window"):
        viz.swin_window_keys((0, 0), (10, 10), (4, 4), (0, 0))
    with pytest.raises(ValueError, match="shift"):
        viz.swin_window_keys((0, 0), (8, 8), (4, 4), (4, 0))


def test_window_values_to_grid_places_values_at_keys_and_nan_elsewhere():
    got = viz.swin_window_keys((7, 1), (8, 8), (4, 4), (2, 2))
    values = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16)  # heads, Wh*Ww
    grid_values = viz.window_values_to_grid(values, got.keys, (8, 8), got.masked)
    assert grid_values.shape == (2, 8, 8)
    for k, (r, c) in enumerate(got.keys.tolist()):
        if got.masked[k]:
            assert np.isnan(grid_values[:, r, c]).all()
        else:
            np.testing.assert_array_equal(grid_values[:, r, c], values[:, k].numpy())
    assert np.isfinite(grid_values).sum() == 2 * int((~got.masked).sum())


# ---------------------------------------------------------------------------------------------------------------- maps


def test_similarity_map_is_one_at_query_and_symmetric():
    grid = (5, 7)
    pe = torch.randn(35, 24, generator=torch.Generator().manual_seed(0))
    maps = {(r, c): viz.similarity_map(pe, grid, (r, c)) for r in range(5) for c in range(7)}
    for (r, c), m in maps.items():
        assert m.shape == grid
        assert m[r, c] == pytest.approx(1.0, abs=1e-5)
    for p in [(0, 0), (2, 3), (4, 6)]:
        for q in [(1, 1), (3, 5)]:
            assert maps[p][q] == pytest.approx(maps[q][p], abs=1e-6)
    full = viz.cosine_similarity_matrix(pe, grid)
    torch.testing.assert_close(torch.from_numpy(full[2 * 7 + 3].reshape(grid)), torch.from_numpy(maps[(2, 3)]))


def test_similarity_map_of_sincos_embedding_falls_off_with_distance():
    grid = (8, 8)
    pe = sincos_like(grid)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    for r, c in [(0, 0), (3, 4), (7, 2)]:
        m = viz.similarity_map(pe, grid, (r, c))
        dist = np.abs(rows - r) + np.abs(cols - c)
        assert m[dist == 1].mean() > m[(dist >= 2) & (dist <= 3)].mean() > m[dist >= 6].mean()


def test_similarity_functions_reject_embeddings_with_prefix_rows():
    with pytest.raises(ValueError, match="prefix"):
        viz.similarity_map(torch.randn(1 + 16, 8), (4, 4), (0, 0))
    with pytest.raises(ValueError, match="outside"):
        viz.similarity_map(torch.randn(16, 8), (4, 4), (4, 0))


def test_pca_rgb_is_in_unit_range_and_follows_a_linear_embedding():
    grid = (6, 9)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(9.0), indexing="ij")
    # the row direction carries most variance, so PC1 must vary with the row only
    pe = 4.0 * rows.reshape(-1, 1) * a + cols.reshape(-1, 1) * b + 0.5  # N, 32
    rgb = viz.pos_embed_pca_rgb(pe, grid)
    assert rgb.shape == (6, 9, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    first = rgb[..., 0]
    steps = np.diff(first, axis=0)
    assert (steps > 0).all() or (steps < 0).all()
    np.testing.assert_allclose(np.diff(first, axis=1), 0.0, atol=0.05)
    assert first.min() == pytest.approx(0.0) and first.max() == pytest.approx(1.0)


def test_pca_rgb_of_real_pos_embed_uses_all_three_channels(shared_data):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = safetensors.load_file(str(shared_data / "deit_tiny_patch16_224.fb_in1k" / "model.safetensors"))
    rgb = viz.pos_embed_pca_rgb(sd["pos_embed"][0, 1:], (14, 14))
    np.testing.assert_allclose(rgb.reshape(-1, 3).min(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(rgb.reshape(-1, 3).max(0), 1.0, atol=1e-6)


def test_rope_phase_similarity_is_mean_cosine_of_angle_differences():
    grid = (4, 5)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    angles = torch.stack((0.3 * rows.reshape(-1), 0.7 * cols.reshape(-1)), dim=1)  # N, 2
    got = viz.rope_phase_similarity(angles, grid, (2, 1))
    expected = 0.5 * (torch.cos(0.3 * (2 - rows)) + torch.cos(0.7 * (1 - cols)))
    torch.testing.assert_close(torch.from_numpy(got), expected)
    assert got[2, 1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------ overlays


def test_overlay_is_aligned_to_the_grid_for_non_divisible_images():
    w, h, grid = 300, 260, (7, 9)
    values = np.arange(63, dtype=np.float32).reshape(grid)
    out = np.asarray(viz.overlay(photo(w, h), values, alpha=1.0, colorbar=False))
    assert out.shape == (h, w, 3)
    colours = viz.colorize(values, "viridis", Normalize(0.0, 62.0)).astype(int)  # 7, 9, 3
    for y in range(0, h, 7):
        for x in range(0, w, 5):
            r, c = viz.patch_at((x, y), (w, h), grid)
            np.testing.assert_allclose(out[y, x], colours[r, c], atol=1)


@pytest.mark.parametrize("mark", [(0, 0), (3, 4), (6, 8)])
def test_overlay_outlines_the_clicked_patch(mark):
    w, h, grid = 300, 260, (7, 9)
    out = np.asarray(viz.overlay(photo(w, h, 0), np.zeros(grid), mark=mark, colorbar=False))
    white = np.argwhere((out == 255).all(axis=-1))  # only the outline is pure white on a black photo
    y0, y1 = math.ceil(mark[0] * h / grid[0]), math.ceil((mark[0] + 1) * h / grid[0]) - 1
    x0, x1 = math.ceil(mark[1] * w / grid[1]), math.ceil((mark[1] + 1) * w / grid[1]) - 1
    assert (white[:, 0].min(), white[:, 0].max(), white[:, 1].min(), white[:, 1].max()) == (y0, y1, x0, x1)
    assert viz.patch_at((x0, y0), (w, h), grid) == mark == viz.patch_at((x1, y1), (w, h), grid)


def test_overlay_adds_a_colour_bar_and_title_and_never_shrinks_small_images():
    values = np.linspace(-1.0, 2.0, 16).reshape(4, 4)
    plain = viz.overlay(photo(32, 32), values, colorbar=False)
    out = viz.overlay(photo(32, 32), values, colorbar_label="cosine similarity")
    assert out.mode == "RGB" and plain.mode == "RGB"
    assert plain.size == (256, 256)  # small photos are scaled up by a whole factor
    assert out.width == plain.width and out.height > plain.height
    strip = np.asarray(out).astype(int)[plain.height :]  # the colour bar strip under the photo
    cmap = matplotlib.colormaps["viridis"]
    for end in (0.0, 1.0):
        colour = np.round(np.array(cmap(end)[:3]) * 255)
        assert (np.abs(strip - colour).max(axis=-1) <= 2).any(), f"colour bar lacks cmap({end})"
    titled = viz.overlay(photo(32, 32), values, title="Similarity to patch (0, 0)")
    assert titled.height > out.height


def test_overlay_draws_nan_cells_as_dimmed_photo():
    values = np.ones((2, 2))
    values[0, 1] = np.nan
    out = np.asarray(viz.overlay(photo(256, 256, 200), values, colorbar=False))
    assert (out[:128, 128:] == round(200 * viz.DIM)).all()
    assert not (out[128:, :] == round(200 * viz.DIM)).all()


def test_overlay_shows_an_rgb_map_without_colour_bar():
    rgb = np.zeros((2, 3, 3))
    rgb[..., 0] = 1.0
    out = np.asarray(viz.overlay(None, rgb, title=None))
    assert out.shape[0] * 3 == out.shape[1] * 2
    assert (out == (255, 0, 0)).all()


# -------------------------------------------------------------------------------------------------------------- sheets


def cell_colours(sheet: viz.Sheet, k: int, shape: tuple[int, int]) -> np.ndarray:
    """The colour at the centre of every cell of panel ``k`` when it shows a map of ``shape``: uint8 (*shape, 3)."""
    pixels = sheet.crop(k)
    h, w = pixels.shape[:2]
    rows = ((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int)
    return pixels[rows][:, cols]


def sheet_colours(sheet: viz.Sheet, values: np.ndarray, cmap: str) -> np.ndarray:
    """What ``values`` look like on the sheet's colour scale (NaN white)."""
    return viz.colorize(values, cmap, Normalize(sheet.vmin, sheet.vmax))


def test_colorize_samples_the_colormap_at_256_levels_and_paints_nan_bad():
    values = np.array([[0.0, 0.5, 1.0, np.nan]])
    out = viz.colorize(values, "viridis", Normalize(0.0, 1.0))
    cmap = matplotlib.colormaps["viridis"]
    expected = [np.round(np.array(cmap(level / 255)[:3]) * 255) for level in (0, 128, 255)]
    np.testing.assert_array_equal(out[0, :3], expected)
    np.testing.assert_array_equal(out[0, 3], (255, 255, 255))


@pytest.mark.parametrize(("window", "heads"), [((7, 7), 3), ((3, 4), 2)])
def test_bias_table_heatmaps_show_the_table_reshaped_by_offset(window, heads):
    Wh, Ww = window
    shape = (2 * Wh - 1, 2 * Ww - 1)
    table = torch.randn(shape[0] * shape[1], heads, generator=torch.Generator().manual_seed(0))  # R, heads
    sheet = viz.bias_table_heatmaps(table, window)
    assert [p.title for p in sheet.panels] == [f"head {h}" for h in range(heads)]
    assert sheet.vmin == -sheet.vmax  # symmetric about 0, shared by all heads
    for h in range(heads):
        shown = cell_colours(sheet, h, shape)
        expected = sheet_colours(sheet, table[:, h].reshape(shape).numpy(), "RdBu_r")
        np.testing.assert_array_equal(shown, expected)
        assert not np.array_equal(shown, sheet_colours(sheet, table[:, h].reshape(shape).numpy()[::-1], "RdBu_r"))
    # the zero-offset cell is outlined in black: the entry a token uses for itself
    pixels = sheet.crop(0)
    cell = pixels.shape[1] // shape[1]
    assert (pixels[(Wh - 1) * cell, (Ww - 1) * cell] == 0).all()
    zero = int(encodings.relative_position_index(window)[0, 0])
    assert zero == (Wh - 1) * shape[1] + (Ww - 1)


def test_bias_table_heatmaps_split_off_beit_cls_entries():
    window, heads = (3, 3), 2
    table = torch.zeros(25 + 3, heads)
    table[:25] = torch.arange(25.0)[:, None]
    table[25:] = torch.tensor([[0.5, -0.5], [1.25, -1.25], [2.0, -2.0]])  # cls->tok, tok->cls, cls->cls
    sheet = viz.bias_table_heatmaps(table, window, cls_entries=True)
    np.testing.assert_array_equal(cell_colours(sheet, 1, (5, 5)), sheet_colours(sheet, np.arange(25.0).reshape(5, 5),
                                                                                 "RdBu_r"))
    assert "cls\u2192tok 0.5" in sheet.panels[0].title and "tok\u2192cls 1.25" in sheet.panels[0].title
    assert "cls\u2192cls \u22122" in sheet.panels[1].title
    assert sheet.vmax == 24.0  # the cls rows are not on the heatmaps' scale
    with pytest.raises(ValueError, match="cls_entries=True"):
        viz.bias_table_heatmaps(table, window)


def test_many_heads_wrap_into_rows_of_at_most_six():
    sheet = viz.bias_table_heatmaps(torch.randn(13 * 13, 24), (7, 7))
    assert len(sheet.panels) == 24
    rows: dict[int, list[int]] = {}
    for p in sheet.panels:
        rows.setdefault(p.box[1], []).append(p.box[0])
    assert len(rows) == 4 and all(len(xs) == 6 and xs == sorted(xs) for xs in rows.values())
    assert sheet.image.width == max(p.box[2] for p in sheet.panels) + 12 + 12  # room for the last label, margin


def test_similarity_mosaic_tiles_hold_each_patchs_similarity_map():
    grid = (3, 5)
    pe = sincos_like(grid, 16)
    mosaic = viz.similarity_mosaic(pe, grid)
    assert mosaic.shape == (3 * 4 - 1, 5 * 6 - 1)
    for i in range(3):
        for j in range(5):
            tile = mosaic[i * 4 : i * 4 + 3, j * 6 : j * 6 + 5]
            np.testing.assert_allclose(tile, viz.similarity_map(pe, grid, (i, j)), atol=1e-6)
    assert np.isnan(mosaic[3]).all() and np.isnan(mosaic[:, 5]).all()


def test_pos_embed_similarity_grid_draws_the_mosaic_with_square_cells():
    grid = (3, 5)
    pe = sincos_like(grid, 16)
    sheet = viz.pos_embed_similarity_grid(pe, grid)
    mosaic = viz.similarity_mosaic(pe, grid)
    (panel,) = sheet.panels
    x0, y0, x1, y1 = panel.box
    assert (x1 - x0) % mosaic.shape[1] == 0 and (y1 - y0) % mosaic.shape[0] == 0
    assert (x1 - x0) // mosaic.shape[1] == (y1 - y0) // mosaic.shape[0] >= 2  # square, whole pixels per cell
    np.testing.assert_array_equal(cell_colours(sheet, 0, mosaic.shape), sheet_colours(sheet, mosaic, "viridis"))
    assert sheet.vmax == 1.0 and sheet.vmin == pytest.approx(float(np.nanmin(mosaic)))


def test_query_bias_overlays_label_heads_and_show_cls_bias():
    bias = torch.randn(4, 6, 6)
    bias[:, 0, :] = float("nan")
    sheet = viz.query_bias_overlays(photo(96, 96), bias, (2, 3), cls_bias=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    assert [p.title.splitlines()[0] for p in sheet.panels] == [f"head {h}" for h in range(4)]
    assert "tok\u2192cls \u22121" in sheet.panels[1].title
    assert sheet.vmin == -sheet.vmax == -float(bias[:, 1:].abs().max())
    weight = round(0.65 * 255) / 255  # the default alpha, as an 8-bit mask
    for k in range(4):
        top_row = sheet.crop(k)[: sheet.crop(k).shape[0] // 6]
        assert (top_row == round(128 * viz.DIM)).all()  # keys it cannot attend to: the photo, dimmed
        colour = sheet_colours(sheet, bias[k].numpy(), "RdBu_r").astype(float)  # 6, 6, 3
        expected = 128 + weight * (colour - 128)  # blended over the grey photo
        shown = cell_colours(sheet, k, (6, 6)).astype(float)
        shown[2, 3] = expected[2, 3]  # the clicked patch carries its outline
        np.testing.assert_allclose(shown[1:], expected[1:], atol=1.01)  # head k's own map, on the shared scale


def test_attention_overlays_add_a_row_without_position_on_the_pairs_scale():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 16, generator=g), -1).reshape(3, 4, 4)
    no_pos = torch.softmax(torch.randn(3, 16, generator=g), -1).reshape(3, 4, 4)
    sheet = viz.attention_overlays(photo(64, 64), attn, (1, 1), attn_no_pos=no_pos, prefix_attn=torch.zeros(3, 1))
    assert len(sheet.panels) == 6
    assert len({p.box[1] for p in sheet.panels[:3]}) == 1 and sheet.panels[3].box[1] > sheet.panels[0].box[3]
    pair_max = torch.maximum(attn.amax((1, 2)), no_pos.amax((1, 2)))
    for k, maps in enumerate((attn, no_pos)):  # each panel: its head's map over the pair's maximum, on the grey photo
        for h in range(3):
            scaled = (maps[h] / pair_max[h]).numpy()  # 4, 4
            colour = viz.colorize(scaled, "inferno", Normalize(0.0, 1.0)).astype(float)
            weight = np.round(0.8 * np.sqrt(np.round(scaled * 255) / 255) * 255) / 255  # alpha grows with the value
            expected = 128 + weight[..., None] * (colour - 128)
            shown = cell_colours(sheet, 3 * k + h, (4, 4)).astype(float)
            shown[1, 1] = expected[1, 1]  # the clicked patch carries its outline
            np.testing.assert_allclose(shown, expected, atol=1.01)
    for h in range(3):
        assert f"head {h} (max {viz.format_number(float(pair_max[h]))})" in sheet.panels[h].title
        assert sheet.panels[3 + h].title == f"head {h}, no position"
    with pytest.raises(ValueError, match="attn_no_pos"):
        viz.attention_overlays(photo(64, 64), attn, (1, 1), attn_no_pos=no_pos[:2])


def test_sheets_are_fresh_and_deterministic():
    table, attn, pe = torch.randn(25, 2), torch.rand(2, 4, 4), torch.randn(16, 8)
    makers = [
        lambda: viz.bias_table_heatmaps(table, (3, 3)),
        lambda: viz.pos_embed_similarity_grid(pe, (4, 4)),
        lambda: viz.query_bias_overlays(photo(64, 64), attn, (0, 0)),
        lambda: viz.attention_overlays(photo(64, 64), attn, (0, 0)),
    ]
    for make in makers:
        first, second = make(), make()
        assert isinstance(first, viz.Sheet) and first.image is not second.image
        np.testing.assert_array_equal(np.asarray(first.image), np.asarray(second.image))


def test_save_png_round_trips_the_pixels(tmp_path):
    image = viz.bias_table_heatmaps(torch.randn(9, 1), (2, 2)).image
    path = viz.save_png(image, tmp_path / "table.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(image))


def test_save_npz_round_trips_tensors_and_skips_none(tmp_path):
    a = torch.randn(2, 3, dtype=torch.bfloat16)
    path = viz.save_npz(tmp_path / "trace", attn=a, grid=np.array([14, 14]), attn_no_pos=None)
    assert path.name == "trace.npz"
    with np.load(path) as data:
        assert set(data.files) == {"attn", "grid"}
        assert data["attn"].dtype == np.float32
        np.testing.assert_array_equal(data["attn"], a.float().numpy())
    with pytest.raises(ValueError, match="no arrays"):
        viz.save_npz(tmp_path / "empty.npz", x=None)


def test_views_never_import_pyplot():
    root = Path(viz.__file__).resolve().parents[1]
    script = textwrap.dedent(
        """
        import sys
        import numpy as np, torch
        from PIL import Image
        from posenc import viz
        img = Image.new("RGB", (64, 64))
        pe, attn = torch.randn(16, 8), torch.rand(2, 4, 4)
        viz.pos_embed_similarity_grid(pe, (4, 4))
        viz.bias_table_heatmaps(torch.randn(28, 2), (3, 3), cls_entries=True)
        viz.query_bias_overlays(img, attn, (1, 1), cls_bias=torch.zeros(2))
        viz.attention_overlays(img, attn, (1, 1), attn_no_pos=attn)
        viz.overlay(img, viz.similarity_map(pe, (4, 4), (0, 0)), mark=(0, 0), title="t")
        viz.overlay(img, viz.pos_embed_pca_rgb(pe, (4, 4)))
        viz.overlay(img, viz.rope_phase_similarity(torch.rand(16, 4), (4, 4), (1, 2)))
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "agg"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_sheet_of_thin_panels_is_widened_with_the_panels_centred():
    # the prefix-attention view of a small ConViT: 2 panels of 12 blocks x 4 heads were a 136-pixel-wide sheet
    sheet = viz.matrix_heatmaps(np.random.default_rng(0).random((2, 12, 4)), ["to cls", "to patches"],
                                title="convit_tiny: share of attention to prefix tokens and patches",
                                colorbar_label="attention share (sums to 1 over the panels)")
    width = sheet.image.width
    assert width >= 480
    left, right = sheet.panels[0].box[0], sheet.panels[-1].box[2]
    assert abs(left - (width - right)) <= 1


def test_a_wide_sheet_keeps_its_title_and_colour_bar_in_the_left_part_a_scrolling_box_shows_first():
    maps = np.random.default_rng(0).random((6, 14, 14))
    sheet = viz.head_map_overlays(np.zeros((224, 224, 3), np.uint8), maps, (3, 3), title="a title that must be seen",
                                  colorbar_label="cosine")
    rgb = np.asarray(sheet.image).astype(int)
    assert sheet.image.width > 1000
    ink = np.nonzero((rgb[:16].max(-1) < 128).any(axis=0))[0]  # the title's dark pixels, in its first line
    assert ink.size and ink.max() < 560
    below = rgb[sheet.panels[-1].box[3]:]
    coloured = np.nonzero(((below.max(-1) - below.min(-1)) > 40).any(axis=0))[0]  # the colour bar's colours
    assert coloured.size and coloured.max() < 560
