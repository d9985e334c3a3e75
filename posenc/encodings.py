"""Position encodings as pure tensor functions.

Every function here takes tensors (or sizes) and returns tensors; the modules in
:mod:`posenc.attention` and :mod:`posenc.models` only wrap them.

Conventions, stated once for the whole package:

* A grid is ``(h, w)``: rows first. Coordinates come from
  ``torch.meshgrid(arange(h), arange(w), indexing="ij")`` and tokens are
  flattened row-major, so token ``t`` sits at row ``t // w``, column ``t % w``.
* A window is ``(Wh, Ww)`` in the same order.
* The 2D sin-cos embedding follows MAE: the first ``dim / 2`` channels encode
  the column (x), the last ``dim / 2`` the row (y); each half is ``[sin, cos]``
  with frequencies ``1 / 10000 ** (k / (dim / 4))``.
* 2D RoPE is axial: of the ``head_dim / 2`` rotated pairs, the first quarter of
  ``head_dim`` turns with the row (y), the second with the column (x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Size2 = tuple[int, int]

#: Logit added to attention between tokens of different shifted-window regions.
#: Swin's reference uses -100 rather than -inf; keeping it gives exact parity.
MASK_VALUE = -100.0


def to_2tuple(size: int | tuple[int, int] | list[int]) -> Size2:
    """An int or a pair as an ``(h, w)`` tuple of ints."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# --------------------------------------------------------------------------- sin-cos


def sincos_1d(positions: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """1D sin-cos embedding of scalar positions.

    Args:
        positions: (M,) positions (any float or int dtype).
        dim: even embedding width.
        temperature: the base of the geometric frequency ladder.

    Returns:
        (M, dim) embedding ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = temperature ** (-k / (dim / 2))``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2)
    omega = temperature**-omega  # dim/2
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # M, dim/2
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # M, dim


def sincos_2d(
    grid: Size2,
    dim: int,
    temperature: float = 10000.0,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2D sin-cos embedding of a patch grid (MAE convention, see module docstring).

    Args:
        grid: (h, w) patch grid.
        dim: embedding width, a multiple of 4.
        temperature: frequency base.

    Returns:
        (h*w, dim) embedding: columns ``[:dim/2]`` encode x (column), ``[dim/2:]`` encode y (row).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be a multiple of 4, got {dim}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # h, w
    emb_x = sincos_1d(xs.reshape(-1), dim // 2, temperature)  # h*w, dim/2
    emb_y = sincos_1d(ys.reshape(-1), dim // 2, temperature)  # h*w, dim/2
    return torch.cat([emb_x, emb_y], dim=1).to(dtype)  # h*w, dim


# --------------------------------------------------------------------------- relative position bias


def num_relative_positions(window: Size2, cls_token: bool = False) -> int:
    """Rows of a relative position bias table: ``(2Wh-1)(2Ww-1)``, plus 3 cls entries for BEiT."""
    wh, ww = window
    return (2 * wh - 1) * (2 * ww - 1) + (3 if cls_token else 0)


def relative_position_index(window: Size2, cls_token: bool = False, *, device: torch.device | None = None) -> Tensor:
    """Index into a relative position bias table for every (query, key) pair of a window.

    The offset ``(dy, dx) = query - key`` maps to table row ``(dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1)``,
    exactly as in Swin and BEiT. With ``cls_token`` (BEiT) token 0 is the cls token and the three last
    table rows hold cls->token, token->cls and cls->cls.

    Args:
        window: (Wh, Ww).
        cls_token: prepend a cls token to the index (BEiT's global bias).

    Returns:
        (N, N) int64 with ``N = Wh*Ww`` (+1 with ``cls_token``).
    """
    wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    )  # 2, Wh, Ww
    flat = coords.flatten(1)  # 2, Wh*Ww
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # Wh*Ww, Wh*Ww, 2
    rel[..., 0] += wh - 1
    rel[..., 1] += ww - 1
    rel[..., 0] *= 2 * ww - 1
    index = rel.sum(-1)  # Wh*Ww, Wh*Ww
    if not cls_token:
        return index
    n = num_relative_positions(window, cls_token=True)
    full = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=index.dtype, device=device)  # N+1, N+1
    full[1:, 1:] = index
    full[0, :] = n - 3  # cls -> token
    full[:, 0] = n - 2  # token -> cls
    full[0, 0] = n - 1  # cls -> cls
    return full


def gather_relative_bias(table: Tensor, index: Tensor, num_keys: int | None = None) -> Tensor:
    """Per-head bias matrix from a relative position bias table.

    Args:
        table: (R, heads) learned table.
        index: (Nq, Nq) from :func:`relative_position_index`.
        num_keys: number of keys when the attention has an integer multiple ``r`` of the window's
            tokens as keys (the bias is then tiled ``r`` times along the keys).

    Returns:
        (heads, Nq, Nk) bias added to the attention logits.
    """
    nq = index.shape[0]
    bias = table[index.reshape(-1)].reshape(nq, nq, -1).permute(2, 0, 1)  # heads, Nq, Nq
    if num_keys is None or num_keys == nq:
        return bias
    if num_keys % nq:
        raise ValueError(f"keys ({num_keys}) must be a multiple of the window's {nq} tokens")
    return bias.repeat(1, 1, num_keys // nq)  # heads, Nq, Nk


def resize_rel_pos_bias_table(
    table: Tensor, new_window: Size2, old_window: Size2, cls_token: bool = False
) -> Tensor:
    """Bicubically resize a relative position bias table to another window.

    Args:
        table: (R_old, heads) with ``R_old = num_relative_positions(old_window, cls_token)``.
        new_window, old_window: (Wh, Ww) windows.
        cls_token: the last 3 rows are BEiT's cls entries; they are kept as they are.

    Returns:
        (R_new, heads) table.
    """
    if tuple(new_window) == tuple(old_window):
        return table
    expected = num_relative_positions(old_window, cls_token)
    if table.shape[0] != expected:
        raise ValueError(f"table has {table.shape[0]} rows, expected {expected} for window {tuple(old_window)}")
    extra = table[-3:] if cls_token else None
    grid = table[:-3] if cls_token else table
    old_h, old_w = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    new_h, new_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    heads = grid.shape[1]
    grid = grid.T.reshape(1, heads, old_h, old_w).float()  # 1, heads, 2Wh-1, 2Ww-1
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = grid.reshape(heads, new_h * new_w).T.to(table.dtype)  # R_new, heads
    return torch.cat([grid, extra], dim=0) if extra is not None else grid


# --------------------------------------------------------------------------- decomposed relative bias (SAM, ViTDet)


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Linearly resize a 1D table of relative position embeddings to ``length`` offsets (SAM's and ViTDet's rule).

    Args:
        rel_pos: (L, C) one embedding per offset ``-(L-1)/2 .. (L-1)/2``.
        length: offsets wanted, ``2 * size - 1``.

    Returns:
        (length, C); ``rel_pos`` itself when the length already fits.
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    table = rel_pos.T[None]  # 1, C, L
    table = F.interpolate(table, size=length, mode="linear")  # 1, C, length
    return table[0].T  # length, C


def decomposed_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """The embedding of every (query, key) offset along one axis, from a 1D table.

    The table is resized to ``2 * max(q_size, k_size) - 1`` offsets when it has another length. When
    queries and keys differ in number, the shorter axis is stretched to the longer one before the offset
    is taken (MViTv2's rule); the offset is then truncated to an integer index.

    Args:
        q_size, k_size: query and key positions along the axis.
        rel_pos: (L, C) table.

    Returns:
        (q_size, k_size, C) with ``[i, j] = table[i - j + k_size - 1]`` when the sizes are equal.
    """
    table = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)  # 2*max-1, C
    device = rel_pos.device
    q = torch.arange(q_size, dtype=torch.float32, device=device)[:, None] * max(k_size / q_size, 1.0)  # q, 1
    k = torch.arange(k_size, dtype=torch.float32, device=device)[None, :] * max(q_size / k_size, 1.0)  # 1, k
    index = (q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()  # q, k
    return table[index]  # q, k, C


def decomposed_rel_pos_factors(q: Tensor, rel_h: Tensor, rel_w: Tensor, grid: Size2) -> tuple[Tensor, Tensor]:
    """The two factors of the decomposed relative bias: each query's dot product with its row and column offsets.

    ``bias[q, k] = factor_h[q, row(k)] + factor_w[q, col(k)]`` with ``factor_h[q, kr] = q . R_h[row(q) - kr]``.

    Args:
        q: (..., h*w, head_dim) queries (unscaled), row-major over the grid.
        rel_h: (h, h, head_dim) from :func:`decomposed_rel_pos` for the rows.
        rel_w: (w, w, head_dim) for the columns.
        grid: (h, w).

    Returns:
        (..., h*w, h) and (..., h*w, w).
    """
    h, w = grid
    q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])  # ..., h, w, hd
    factor_h = torch.einsum("...hwc,hkc->...hwk", q, rel_h)  # ..., h, w, h
    factor_w = torch.einsum("...hwc,wkc->...hwk", q, rel_w)  # ..., h, w, w
    return factor_h.flatten(-3, -2), factor_w.flatten(-3, -2)  # ..., h*w, h and ..., h*w, w


def decomposed_rel_pos_bias(factor_h: Tensor, factor_w: Tensor) -> Tensor:
    """The bias of every (query, key) pair from its two factors: (..., N, h) and (..., N, w) -> (..., N, h*w)."""
    bias = factor_h[..., :, None] + factor_w[..., None, :]  # ..., N, h, w
    return bias.flatten(-2)  # ..., N, h*w


def pad_to_window(x: Tensor, window: Size2) -> Tensor:
    """Zero-pad a feature map at the bottom and right to a multiple of the window (SAM, ViTDet).

    Args:
        x: (B, H, W, C).

    Returns:
        (B, Hp, Wp, C) with ``Hp, Wp`` the next multiples of ``Wh, Ww``; ``x`` itself when nothing is padded.
    """
    pad_h, pad_w = (-x.shape[1]) % window[0], (-x.shape[2]) % window[1]
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # B, Hp, Wp, C


def padded_grid(grid: Size2, window: Size2) -> Size2:
    """(Hp, Wp): the grid rounded up to a multiple of the window, as :func:`pad_to_window` pads it."""
    return (-(-grid[0] // window[0]) * window[0], -(-grid[1] // window[1]) * window[1])


# --------------------------------------------------------------------------- windows (Swin)


def window_partition(x: Tensor, window: Size2) -> Tensor:
    """Split a feature map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H, W multiples of the window.

    Returns:
        (B, nW, Wh*Ww, C) with windows in row-major order.
    """
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c)  # B, H/Wh, Wh, W/Ww, Ww, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // wh) * (w // ww), wh * ww, c)  # B, nW, Wh*Ww, C


def window_reverse(x: Tensor, window: Size2, grid: Size2) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nW, Wh*Ww, C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    wh, ww = window
    h, w = grid
    x = x.reshape(b, h // wh, w // ww, wh, ww, c)  # B, H/Wh, W/Ww, Wh, Ww, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)  # B, H, W, C


def shift_region_ids(grid: Size2, window: Size2, shift: Size2, *, device: torch.device | None = None) -> Tensor:
    """Region id of every position of the cyclically shifted grid (Swin's shifted-window regions).

    Each axis of the shifted frame is cut into ``[0, H-Wh)``, ``[H-Wh, H-sh)`` and ``[H-sh, H)``;
    tokens in different regions were not neighbours before the shift.

    Returns:
        (H, W) int64 region ids.
    """
    ids = torch.zeros(grid, dtype=torch.long, device=device)  # H, W
    bounds = []
    for size, win, sh in zip(grid, window, shift):
        bounds.append(((0, size - win), (size - win, size - sh), (size - sh, size)) if sh else ((0, size),))
    region = 0
    for h0, h1 in bounds[0]:
        for w0, w1 in bounds[1]:
            ids[h0:h1, w0:w1] = region
            region += 1
    return ids


def shifted_window_mask(
    grid: Size2, window: Size2, shift: Size2, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive attention mask that keeps tokens of different shifted-window regions apart.

    Args:
        grid: (H, W) feature grid, multiples of the window.
        window: (Wh, Ww).
        shift: (sh, sw) cyclic shift.

    Returns:
        (nW, Wh*Ww, Wh*Ww) with 0 inside a region and :data:`MASK_VALUE` across regions.
    """
    ids = shift_region_ids(grid, window, shift, device=device)  # H, W
    ids = window_partition(ids[None, :, :, None], window)[0, :, :, 0]  # nW, Wh*Ww
    same = ids[:, :, None] == ids[:, None, :]  # nW, Wh*Ww, Wh*Ww
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill(~same, MASK_VALUE)


def check_window_divides(grid: Size2, window: Size2) -> None:
    """Raise a ValueError naming the sizes when a window does not tile the grid."""
    if grid[0] % window[0] or grid[1] % window[1]:
        raise ValueError(
            f"window {tuple(window)} does not divide the {grid[0]}x{grid[1]} patch grid; "
            "pick an image size whose grid at every stage is a multiple of the window"
        )


# --------------------------------------------------------------------------- RoPE


def rope_2d_angles(
    grid: Size2, head_dim: int, base: float = 100.0, *, device: torch.device | None = None
) -> Tensor:
    """Rotation angles of axial 2D RoPE on a patch grid.

    Args:
        grid: (h, w).
        head_dim: per-head width, a multiple of 4.
        base: frequency base (100 for images, as in RoPE-ViT).

    Returns:
        (h*w, head_dim/2) angles: the first ``head_dim/4`` pairs turn with the row, the rest with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    h, w = grid
    freqs = base ** -(torch.arange(head_dim // 4, dtype=torch.float32, device=device) / (head_dim // 4))  # hd/4
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )  # h, w
    ang_y = ys.reshape(-1, 1) * freqs  # h*w, hd/4
    ang_x = xs.reshape(-1, 1) * freqs  # h*w, hd/4
    return torch.cat([ang_y, ang_x], dim=1)  # h*w, hd/2


def apply_rope(x: Tensor, angles: Tensor, num_prefix: int = 0) -> Tensor:
    """Rotate query or key vectors by RoPE angles; prefix (cls) tokens are left unrotated.

    Channel pairs are ``(x[..., i], x[..., i + head_dim/2])`` (rotate-half layout).

    Args:
        x: (..., N, head_dim) with ``N = num_prefix + len(angles)``.
        angles: (N - num_prefix, head_dim/2).

    Returns:
        Tensor of the same shape.
    """
    prefix, tokens = x[..., :num_prefix, :], x[..., num_prefix:, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # N', hd/2
    a, b = tokens.chunk(2, dim=-1)  # ..., N', hd/2
    rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)  # ..., N', hd
    return torch.cat([prefix, rotated], dim=-2) if num_prefix else rotated


# --------------------------------------------------------------------------- resampling


def resample_abs_pos_embed(
    pos_embed: Tensor,
    new_grid: Size2,
    old_grid: Size2 | None = None,
    num_prefix: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a learned absolute position embedding to another patch grid.

    Prefix rows (cls, distillation) are kept apart and left unchanged.

    Args:
        pos_embed: (1, num_prefix + old_h*old_w, C).
        new_grid: (h, w) target grid.
        old_grid: (old_h, old_w); inferred as a square when omitted.
        num_prefix: number of leading rows that are not patches.
        antialias: low-pass when shrinking, as timm does; transformers' ViTDet does not.

    Returns:
        (1, num_prefix + h*w, C).
    """
    n_old = pos_embed.shape[1] - num_prefix
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"cannot infer the grid of {n_old} patch embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"pos_embed has {n_old} patch rows, not {old_grid[0]}x{old_grid[1]}")
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    c = patches.shape[-1]
    patches = patches.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)  # 1, C, old_h, old_w
    patches = F.interpolate(patches.float(), size=tuple(new_grid), mode=interpolation,
                            antialias=antialias and interpolation != "nearest")
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)  # 1, h*w, C
    return torch.cat([prefix, patches], dim=1)
