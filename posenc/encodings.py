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
    The key grid (kh, kw) may differ from the query grid (MViTv2 pools its keys).

    Args:
        q: (..., h*w, head_dim) queries (unscaled), row-major over the query grid.
        rel_h: (h, kh, head_dim) from :func:`decomposed_rel_pos` for the rows.
        rel_w: (w, kw, head_dim) for the columns.
        grid: (h, w) the query grid.

    Returns:
        (..., h*w, kh) and (..., h*w, kw).
    """
    h, w = grid
    q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])  # ..., h, w, hd
    factor_h = torch.einsum("...hwc,hkc->...hwk", q, rel_h)  # ..., h, w, kh
    factor_w = torch.einsum("...hwc,wkc->...hwk", q, rel_w)  # ..., h, w, kw
    return factor_h.flatten(-3, -2), factor_w.flatten(-3, -2)  # ..., h*w, kh and ..., h*w, kw


def decomposed_rel_pos_bias(factor_h: Tensor, factor_w: Tensor) -> Tensor:
    """The bias of every (query, key) pair from its two factors: (..., N, kh) and (..., N, kw) -> (..., N, kh*kw)."""
    bias = factor_h[..., :, None] + factor_w[..., None, :]  # ..., N, kh, kw
    return bias.flatten(-2)  # ..., N, kh*kw


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


# --------------------------------------------------------------------------- continuous position bias (Swin V2)


def cpb_coords(span: Size2, *, normaliser: Size2 | None = None) -> Tensor:
    """Log-spaced relative coordinates that Swin V2's continuous-position-bias MLP reads, one per offset.

    Offsets ``(dy, dx)`` run over ``-(Sh-1) .. Sh-1`` by ``-(Sw-1) .. Sw-1`` (``span`` is usually the window;
    a wider span evaluates the MLP beyond it), rows first as in :func:`relative_position_index`, so row
    ``(dy + Sh - 1) * (2Sw - 1) + dx + Sw - 1`` of the flattened table is that offset.

    * With ``normaliser`` (Swin V2, timm ``swinv2_*`` and transformers ``swinv2``): each offset is divided by
      ``max(normaliser - 1, 1)`` (the pretrained window, or the window itself), scaled to [-8, 8] and mapped
      to ``sign(t) * log2(1 + |t|) / log2(8)``.
    * Without (timm ``swinv2_cr_*``): the raw offset is mapped to ``sign(t) * ln(1 + |t|)``.

    Args:
        span: (Sh, Sw) half-extent of the offsets, plus one.
        normaliser: (Nh, Nw) window the offsets are normalised by, or None for the natural-log variant.

    Returns:
        (2Sh-1, 2Sw-1, 2) float32 coordinates, (dy, dx) last.
    """
    sh, sw = span
    dy = torch.arange(-(sh - 1), sh, dtype=torch.float32)
    dx = torch.arange(-(sw - 1), sw, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # 2Sh-1, 2Sw-1, 2
    if normaliser is None:
        return torch.sign(coords) * torch.log1p(coords.abs())
    scale = torch.tensor([max(n - 1, 1) for n in normaliser], dtype=torch.float32)  # 2
    coords = coords / scale * 8  # in [-8, 8] inside the normalising window
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)


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
    grid: Size2,
    head_dim: int,
    base: float = 100.0,
    *,
    indexing: str = "ij",
    ref_grid: Size2 | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Rotation angles of axial 2D RoPE on a patch grid (posenc, RoPE-ViT axial, EVA-02).

    Frequencies are ``base ** (-k / (head_dim / 4))`` for ``k < head_dim / 4``; each axis gets the whole ladder.

    Args:
        grid: (h, w).
        head_dim: per-head width, a multiple of 4.
        base: frequency base ("temperature": 100 in RoPE-ViT, 10000 in EVA-02).
        indexing: "ij": the first ``head_dim/4`` angles turn with the row, the rest with the column (posenc,
            EVA-02); "xy": the column first, then the row (Naver's RoPE-ViT).
        ref_grid: (H_ref, W_ref) to rescale positions so the grid spans the reference grid (EVA-02's
            ``ref_feat_shape``: position ``i`` on an axis of ``n`` patches becomes ``i * ref / n``); None keeps
            integer positions.

    Returns:
        (h*w, head_dim/2) angles, tokens row-major.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if indexing not in ("ij", "xy"):
        raise ValueError(f"RoPE grid indexing must be 'ij' or 'xy', got {indexing!r}")
    h, w = grid
    freqs = base ** -(torch.arange(head_dim // 4, dtype=torch.float32, device=device) / (head_dim // 4))  # hd/4
    rows = torch.arange(h, dtype=torch.float32, device=device)  # h
    cols = torch.arange(w, dtype=torch.float32, device=device)  # w
    if ref_grid is not None:
        rows, cols = rows / h * ref_grid[0], cols / w * ref_grid[1]
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")  # h, w
    ang_y = ys.reshape(-1, 1) * freqs  # h*w, hd/4
    ang_x = xs.reshape(-1, 1) * freqs  # h*w, hd/4
    return torch.cat([ang_y, ang_x] if indexing == "ij" else [ang_x, ang_y], dim=1)  # h*w, hd/2


def rope_centered_angles(
    grid: Size2, head_dim: int, base: float = 100.0, *, indexing: str = "ij", device: torch.device | None = None
) -> Tensor:
    """Rotation angles of DINOv3's RoPE: patch centres normalised to [-1, 1] on each axis, periods ``base ** (4k / head_dim)``.

    A position's coordinate is ``2 * (i + 0.5) / n - 1`` on an axis of ``n`` patches, so the same image content
    gets the same angles at any resolution; the angle of period ``p`` is ``2 * pi * coordinate / p``.

    Args:
        grid: (h, w).
        head_dim: per-head width, a multiple of 4.
        base: period base (DINOv3: 100).
        indexing: "ij": the first ``head_dim/4`` angles turn with the row, the rest with the column; "xy": the
            column first.

    Returns:
        (h*w, head_dim/2) angles, tokens row-major.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if indexing not in ("ij", "xy"):
        raise ValueError(f"RoPE grid indexing must be 'ij' or 'xy', got {indexing!r}")
    h, w = grid
    periods = base ** (2.0 * torch.arange(head_dim // 4, dtype=torch.float32, device=device) / (head_dim // 2))  # hd/4
    rows = 2.0 * (torch.arange(0.5, h, dtype=torch.float32, device=device) / h) - 1.0  # h
    cols = 2.0 * (torch.arange(0.5, w, dtype=torch.float32, device=device) / w) - 1.0  # w
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")  # h, w
    ang_y = 2 * math.pi * ys.reshape(-1, 1) / periods  # h*w, hd/4
    ang_x = 2 * math.pi * xs.reshape(-1, 1) / periods  # h*w, hd/4
    return torch.cat([ang_y, ang_x] if indexing == "ij" else [ang_x, ang_y], dim=1)  # h*w, hd/2


def rope_mixed_angles(freqs: Tensor, grid: Size2) -> Tensor:
    """Rotation angles of mixed RoPE (RoPE-ViT): learned 2D frequencies per head, ``angle = x * f_x + y * f_y``.

    Args:
        freqs: (2, ..., head_dim/2) learned frequencies, ``freqs[0]`` along the column (x), ``freqs[1]`` along
            the row (y); timm's ``rope.freqs`` is (2, depth, heads, head_dim/2).
        grid: (h, w).

    Returns:
        (..., h*w, head_dim/2) angles, tokens row-major.
    """
    h, w = grid
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=freqs.device),
        torch.arange(w, dtype=torch.float32, device=freqs.device),
        indexing="ij",
    )  # h, w
    f = freqs.float()
    return xs.reshape(-1, 1) * f[0].unsqueeze(-2) + ys.reshape(-1, 1) * f[1].unsqueeze(-2)  # ..., h*w, hd/2


def rope_rotation(angles: Tensor, *, interleaved: bool = False) -> Tensor:
    """The cosines and sines of RoPE angles, one per channel: what :func:`rotate` multiplies by.

    A model can compute this once per forward pass (or keep it for its native grid as a non-persistent buffer,
    as timm keeps its sin/cos embedding), so that its blocks only multiply and add.

    Args:
        angles: (..., N', head_dim/2).
        interleaved: the channel pairs are ``(2i, 2i+1)`` (timm's EVA layout); otherwise ``(i, i + head_dim/2)``.

    Returns:
        (2, ..., N', head_dim): ``[cos, sin]``, each angle's value on both channels of its pair.
    """
    cos_sin = torch.stack([angles.cos(), angles.sin()])  # 2, ..., N', hd/2
    if interleaved:
        return cos_sin.repeat_interleave(2, dim=-1)  # 2, ..., N', hd: channels 2i and 2i+1 share angle i
    return torch.cat([cos_sin, cos_sin], dim=-1)  # 2, ..., N', hd: channels i and i + hd/2 share angle i


def rotate(x: Tensor, rotation: Tensor, num_prefix: int = 0, *, interleaved: bool = False) -> Tensor:
    """Rotate query or key vectors by a :func:`rope_rotation`; prefix (cls, register) tokens are left unrotated.

    Each pair ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)``, computed for the whole head as
    ``x * cos + turn(x) * sin`` with ``turn(a, b) = (-b, a)``, as timm does; the result is bitwise the same.

    Args:
        x: (..., N, head_dim) with ``N = num_prefix + N'``.
        rotation: (2, ..., N', head_dim) from :func:`rope_rotation` with the same ``interleaved``, broadcast
            against ``x`` (e.g. (2, N', hd), or (2, heads, N', hd) per head).

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    prefix, tokens = x[..., :num_prefix, :], x[..., num_prefix:, :]
    cos, sin = rotation  # ..., N', hd each
    if interleaved:
        turned = torch.stack([-tokens[..., 1::2], tokens[..., 0::2]], dim=-1).reshape(tokens.shape)  # ..., N', hd
    else:
        a, b = tokens.chunk(2, dim=-1)  # ..., N', hd/2
        turned = torch.cat([-b, a], dim=-1)  # ..., N', hd
    rotated = (tokens * cos + turned * sin).to(x.dtype)
    return torch.cat([prefix, rotated], dim=-2) if num_prefix else rotated


def apply_rope(x: Tensor, angles: Tensor, num_prefix: int = 0, *, interleaved: bool = False) -> Tensor:
    """Rotate query or key vectors by RoPE angles; prefix (cls, register) tokens are left unrotated.

    Args:
        x: (..., N, head_dim) with ``N = num_prefix + N'``.
        angles: (..., N', head_dim/2), broadcast against ``x`` (e.g. (N', hd/2), or (heads, N', hd/2) per head).
        interleaved: channel pairs are ``(x[..., 2i], x[..., 2i+1])`` (timm's default layout, EVA and RoPE-ViT);
            otherwise ``(x[..., i], x[..., i + head_dim/2])`` (rotate-half layout: posenc, DINOv3).

    Returns:
        Tensor of the same shape.
    """
    return rotate(x, rope_rotation(angles, interleaved=interleaved), num_prefix, interleaved=interleaved)


# --------------------------------------------------------------------------- biases by absolute offset, GPSA offsets


def offset_bias_index(key_grid: Size2, stride: int = 1, *, device: torch.device | None = None) -> Tensor:
    """Index into a per-offset bias table (LeViT, TinyViT) for every (query, key) pair.

    The bias depends on the absolute offset only: ``(|dy|, |dx|)`` maps to table entry ``|dy| * w + |dx|``
    of a table with ``h * w`` entries, so it is symmetric in both axes. With ``stride`` > 1 (LeViT's
    attention subsampling) the queries sit on every ``stride``-th row and column of the key grid.

    Args:
        key_grid: (h, w) grid of the keys.
        stride: step of the query grid over the key grid.

    Returns:
        (Nq, h*w) int64, ``Nq = ceil(h / stride) * ceil(w / stride)``, queries and keys row-major.
    """
    h, w = key_grid
    ky, kx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # h, w
    qy, qx = torch.meshgrid(
        torch.arange(0, h, stride, device=device), torch.arange(0, w, stride, device=device), indexing="ij"
    )  # h', w'
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()  # Nq, Nk
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()  # Nq, Nk
    return dy * w + dx


def gpsa_offsets(grid: Size2, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """ConViT's relative offsets between patches, the input of its positional attention.

    Args:
        grid: (h, w) patch grid.

    Returns:
        (N, N, 3) for ``N = h*w``: ``[dx, dy, dx**2 + dy**2]`` with ``(dy, dx) = key - query`` (rows, columns).
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # h, w
    ys, xs = ys.reshape(-1).to(dtype), xs.reshape(-1).to(dtype)  # N
    dx = xs[None, :] - xs[:, None]  # N, N
    dy = ys[None, :] - ys[:, None]  # N, N
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1)  # N, N, 3


# --------------------------------------------------------------------------- resampling


def resample_abs_pos_embed(
    pos_embed: Tensor,
    new_grid: Size2,
    old_grid: Size2 | None = None,
    num_prefix: int = 1,
    interpolation: str = "bicubic",
    antialias: bool | None = None,
) -> Tensor:
    """Resample a learned absolute position embedding to another patch grid.

    Prefix rows (cls, distillation) are kept apart and left unchanged. The interpolation runs in float32 with
    ``align_corners=False``, as timm and transformers do.

    Args:
        pos_embed: (1, num_prefix + old_h*old_w, C).
        new_grid: (h, w) target grid.
        old_grid: (old_h, old_w); inferred as a square when omitted.
        num_prefix: number of leading rows that are not patches.
        interpolation: ``F.interpolate`` mode.
        antialias: None: on except for "nearest" (timm's default); transformers' DINOv2 and SigLIP use False.

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
    antialias = interpolation != "nearest" if antialias is None else antialias
    patches = F.interpolate(patches.float(), size=tuple(new_grid), mode=interpolation, antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)  # 1, h*w, C
    return torch.cat([prefix, patches], dim=1)
