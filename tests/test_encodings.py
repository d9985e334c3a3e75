"""Position-encoding functions against references, fixed values and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posenc.encodings import (
    MASK_VALUE,
    apply_rope,
    gather_relative_bias,
    num_relative_positions,
    relative_position_index,
    resample_abs_pos_embed,
    resize_rel_pos_bias_table,
    rope_2d_angles,
    shifted_window_mask,
    sincos_2d,
    window_partition,
    window_reverse,
)


def reference_index(wh: int, ww: int) -> torch.Tensor:
    """The construction quoted in the core issue, line by line."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)
    rel[..., 0] += wh - 1
    rel[..., 1] += ww - 1
    rel[..., 0] *= 2 * ww - 1
    return rel.sum(-1)


@pytest.mark.parametrize("window", [(7, 7), (4, 6), (1, 5), (12, 12)])
def test_index_matches_reference_for_square_and_non_square_windows(window):
    index = relative_position_index(window)
    assert index.shape == (window[0] * window[1],) * 2
    assert torch.equal(index, reference_index(*window))
    assert int(index.max()) == num_relative_positions(window) - 1


@pytest.mark.parametrize("window", [(7, 7), (4, 6)])
def test_bias_gather_matches_reference_and_offsets(window):
    heads = 3
    table = torch.randn(num_relative_positions(window), heads)
    bias = gather_relative_bias(table, relative_position_index(window))
    n = window[0] * window[1]
    expected = table[reference_index(*window).view(-1)].view(n, n, heads).permute(2, 0, 1)
    assert_close(bias, expected)
    # the same offset always reads the same table row
    q, k = 0, n - 1
    dy, dx = q // window[1] - k // window[1], q % window[1] - k % window[1]
    row = (dy + window[0] - 1) * (2 * window[1] - 1) + dx + window[1] - 1
    assert_close(bias[:, q, k], table[row])


def test_bias_is_tiled_along_keys_when_keys_are_a_multiple_of_the_window():
    window, heads = (2, 3), 2
    table = torch.randn(num_relative_positions(window), heads)
    index = relative_position_index(window)
    base = gather_relative_bias(table, index)  # heads, 6, 6
    tiled = gather_relative_bias(table, index, num_keys=18)
    assert tiled.shape == (heads, 6, 18)
    for r in range(3):
        assert_close(tiled[:, :, 6 * r : 6 * (r + 1)], base)
    with pytest.raises(ValueError, match="multiple"):
        gather_relative_bias(table, index, num_keys=7)


def test_beit_index_routes_cls_pairs_to_the_three_extra_rows():
    window = (3, 4)
    index = relative_position_index(window, cls_token=True)
    n = num_relative_positions(window, cls_token=True)
    assert index.shape == (13, 13)
    assert torch.equal(index[1:, 1:], reference_index(*window))
    assert set(index[0, 1:].tolist()) == {n - 3}  # cls -> token
    assert set(index[1:, 0].tolist()) == {n - 2}  # token -> cls
    assert int(index[0, 0]) == n - 1  # cls -> cls


def test_sincos_2d_fixed_values_mae_convention():
    emb = sincos_2d((2, 3), 8)
    assert emb.shape == (6, 8)
    r, c = 1, 2  # token 5
    omega = torch.tensor([1.0, 0.01])  # 10000 ** -(k / 2), k = 0, 1
    x_half = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])
    y_half = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
    assert_close(emb[r * 3 + c], torch.cat([x_half, y_half]))
    # first half depends on the column only, second half on the row only
    grid = emb.view(2, 3, 8)
    assert_close(grid[0, :, :4], grid[1, :, :4])
    assert_close(grid[:, 0, 4:], grid[:, 2, 4:])


def test_sincos_2d_rejects_widths_not_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d((4, 4), 6)


def test_resampling_to_the_same_size_is_the_identity():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.equal(resample_abs_pos_embed(pos, (14, 14), (14, 14), num_prefix=1), pos)
    table = torch.randn(num_relative_positions((7, 7)), 4)
    assert torch.equal(resize_rel_pos_bias_table(table, (7, 7), (7, 7)), table)


@pytest.mark.parametrize(("old_grid", "new_grid", "num_prefix"), [((4, 6), (6, 9), 1), ((6, 4), (3, 5), 2), ((3, 5), (5, 3), 0)])
def test_resampling_a_non_square_grid_matches_timm(old_grid, new_grid, num_prefix):
    timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(1, num_prefix + old_grid[0] * old_grid[1], 8, generator=gen)
    out = resample_abs_pos_embed(pos, new_grid, old_grid, num_prefix=num_prefix)
    expected = timm_pos_embed.resample_abs_pos_embed(pos, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix)
    assert_close(out, expected)
    assert torch.equal(out[:, :num_prefix], pos[:, :num_prefix])


def test_resampling_keeps_an_embedding_that_varies_by_row_only_varying_by_row():
    old, new = (4, 6), (8, 9)
    rows = torch.arange(4.0).repeat_interleave(6)  # h*w, the row index of each patch
    pos = torch.cat([torch.zeros(1, 8), rows[:, None] * torch.linspace(1, 2, 8)])[None]  # 1, 1 + h*w, 8
    out = resample_abs_pos_embed(pos, new, old, num_prefix=1)[0, 1:].view(8, 9, 8)  # h', w', C
    assert_close(out, out[:, :1].expand(8, 9, 8))  # constant along each row
    assert float(out[-1, 0, 0] - out[0, 0, 0]) > 2.5, "the row ramp spans the new grid's rows"


@pytest.mark.parametrize(("old", "new", "cls_token"), [((3, 3), (5, 5), True), ((7, 7), (8, 8), False), ((12, 12), (7, 7), False)])
def test_rel_table_resize_matches_timms_bicubic_resize(old, new, cls_token):
    """posenc resizes tables as timm's ``resize_rel_pos_bias_table_simple`` does (bicubic on the offset grid).

    timm's ``resize_rel_pos_bias_table`` (BEiT's geometric resampling, linear without scipy) gives other values; the
    README (Position encodings at another size) says where and why posenc differs.
    """
    pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(num_relative_positions(old, cls_token=cls_token), 3, generator=gen)
    out = resize_rel_pos_bias_table(table, new, old, cls_token=cls_token)
    shape = (num_relative_positions(new, cls_token=cls_token), 3)
    assert_close(out, pos_embed_rel.resize_rel_pos_bias_table_simple(table, new, shape))
    if cls_token:
        assert torch.equal(out[-3:], table[-3:])
    geometric = pos_embed_rel.resize_rel_pos_bias_table(table, new, shape)
    assert not torch.allclose(out, geometric, atol=1e-3), "the documented difference from timm's default resize"


def test_window_partition_round_trips():
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, (4, 3))
    assert windows.shape == (2, 8, 12, 5)
    assert torch.equal(windows[0, 1, 0], x[0, 0, 3])  # window 1 starts at column 3
    assert torch.equal(window_reverse(windows, (4, 3), (8, 12)), x)


@pytest.mark.parametrize("grid,window,shift", [((8, 8), (4, 4), (2, 2)), ((14, 14), (7, 7), (3, 3)), ((8, 12), (4, 6), (2, 3))])
def test_shifted_window_mask_keeps_tokens_from_different_regions_apart(grid, window, shift):
    mask = shifted_window_mask(grid, window, shift)
    # independent rule: in the shifted frame, position p came from (p + s) mod H; tokens may attend
    # each other only if both or neither wrapped around on each axis
    rows = torch.arange(grid[0])[:, None].expand(grid)
    cols = torch.arange(grid[1])[None, :].expand(grid)
    wrap = (rows + shift[0] >= grid[0]).long() * 2 + (cols + shift[1] >= grid[1]).long()  # H, W
    wrap = window_partition(wrap[None, :, :, None], window)[0, :, :, 0]  # nW, Wh*Ww
    allowed = wrap[:, :, None] == wrap[:, None, :]
    assert torch.equal(mask == 0, allowed)
    assert torch.all(mask[~allowed] == MASK_VALUE)
    assert not allowed.all(), "a shifted grid must mask something"


def test_rope_scores_depend_only_on_the_relative_offset():
    torch.manual_seed(0)
    head_dim = 16
    angles = rope_2d_angles((6, 6), head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(p: tuple[int, int], s: tuple[int, int]) -> torch.Tensor:
        x = torch.stack([q, k])[None]  # 1, 2, hd
        pair = torch.stack([angles[p[0] * 6 + p[1]], angles[s[0] * 6 + s[1]]])  # 2, hd/2
        rq, rk = apply_rope(x, pair)[0]
        return rq @ rk

    assert_close(score((0, 0), (2, 3)), score((3, 1), (5, 4)))
    assert not torch.allclose(score((0, 0), (2, 3)), score((0, 0), (3, 2)))


def test_rope_preserves_norms_and_leaves_prefix_tokens_alone():
    angles = rope_2d_angles((3, 4), 8)
    assert angles.shape == (12, 4)
    x = torch.randn(2, 13, 8)
    out = apply_rope(x, angles, num_prefix=1)
    assert torch.equal(out[:, 0], x[:, 0])
    assert_close(out.norm(dim=-1), x.norm(dim=-1))
    # first quarter of the frequencies turns with the row, second with the column
    grid = angles.view(3, 4, 4)
    assert_close(grid[:, 0, :2], grid[:, 3, :2])
    assert_close(grid[0, :, 2:], grid[2, :, 2:])
    assert math.isclose(float(grid[1, 0, 0]), 1.0)


def test_rope_rotates_each_pair_by_its_angle_counter_clockwise():
    angles = torch.tensor([[math.pi / 2, 0.0], [math.pi / 6, -math.pi / 3]])  # N=2, hd/2=2
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [2.0, 1.0, 0.0, -1.0]]])  # 1, N, hd: pairs (x[i], x[i + 2])
    out = apply_rope(x, angles)
    # pinned: (1, 0) turned by +90 degrees is (0, 1); (0, 1) turned by 0 stays
    assert_close(out[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-6, rtol=0)
    # independent: each pair as a complex number a + ib times exp(i angle)
    z = torch.complex(x[..., :2], x[..., 2:]) * torch.polar(torch.ones_like(angles), angles)  # 1, N, hd/2
    assert_close(out, torch.cat([z.real, z.imag], dim=-1))


def test_rope_angles_match_an_independent_axial_construction_on_a_non_square_grid():
    grid, head_dim, base = (3, 5), 8, 100.0
    angles = rope_2d_angles(grid, head_dim, base)
    freqs = [base ** (-k / 2) for k in range(2)]  # head_dim/4 = 2 frequencies
    expected = torch.tensor([[r * f for f in freqs] + [c * f for f in freqs] for r in range(3) for c in range(5)])
    assert_close(angles, expected)
