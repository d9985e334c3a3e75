"""Pure views of position encodings: arrays in, a ``PIL.Image`` or a :class:`Sheet` of panels out.

Conventions:
- Patch grids are ``(h, w)`` with ``indexing="ij"`` and row-major flattening: token ``t = r * w + c``.
  A patch is ``(row, col)``; a pixel click is ``(x, y)`` as Gradio's ``evt.index`` gives it.
- Per-key maps are ``(gh, gw)`` arrays (``(heads, gh, gw)`` for one map per head). ``NaN`` marks keys that are
  absent or masked (outside a Swin window, another shift region); they are drawn as the dimmed photo.
- Inputs may be numpy arrays or torch tensors; nothing here depends on ``posenc.models``.
- Everything is drawn with numpy and PIL: maps are coloured per cell through a 256-level lookup table sampled
  from a matplotlib colormap, upsampled nearest and blended in C. matplotlib supplies colormaps and the
  DejaVu font only; no figure is built (a matplotlib figure costs tens of milliseconds, the views' whole
  budget), and nothing touches ``matplotlib.pyplot``, so concurrent requests cannot mix.
- Pass the photo the model actually saw (the resized, center-cropped input), so the grid lies on the right pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from matplotlib.colors import Colormap, Normalize
from PIL import Image, ImageDraw, ImageFont

from posenc.encodings import shift_region_ids

logger = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor
Grid = tuple[int, int]
Patch = tuple[int, int]

MAX_COLS = 6  # heads per sheet row before wrapping
DIM = 0.35  # brightness of the photo under NaN (absent or masked) cells
_DIM_LUT = [round(v * DIM) for v in range(256)] * 3  # Image.point table dimming each RGB band
_SAMPLE_MAP_SIDE = 320  # longer side, in pixels, of a map drawn without a photo
_PANEL_MIN, _PANEL_MAX = 224, 320  # longer side of each photo panel in a sheet of heads
_MOSAIC_SIDE = 560  # about the longer side of the similarity mosaic, in pixels
_TABLE_SIDE = 160  # about the longer side of one head's bias table, in pixels


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


def _to_numpy(x: Array, name: str) -> np.ndarray:
    """Return ``x`` as a float32 numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from err


def _to_tensor(x: Array, name: str) -> torch.Tensor:
    """Return ``x`` as a float32 CPU tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32)
    return torch.from_numpy(_to_numpy(x, name))


def _check_grid(grid: Sequence[int], name: str = "grid") -> Grid:
    """Validate a ``(h, w)`` pair of positive integers."""
    if len(grid) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"{name} must be (h, w) with positive integers, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _check_patch(patch: Sequence[int], grid: Grid) -> Patch:
    """Validate that ``patch`` is a ``(row, col)`` inside ``grid``."""
    if len(patch) != 2:
        raise ValueError(f"patch must be (row, col), got {patch!r}")
    r, c = int(patch[0]), int(patch[1])
    if not (0 <= r < grid[0] and 0 <= c < grid[1]):
        raise ValueError(f"patch {(r, c)} lies outside the {grid[0]}x{grid[1]} grid; use patch_at() to map a click")
    return r, c


def _patch_rows(pos_embed: Array, grid: Grid) -> torch.Tensor:
    """Return the patch rows of an absolute embedding as a float tensor (N, C), checking N = h * w."""
    e = _to_tensor(pos_embed, "pos_embed")
    if e.ndim == 3 and e.shape[0] == 1:
        e = e[0]  # N, C
    n = grid[0] * grid[1]
    if e.ndim != 2 or e.shape[0] != n:
        raise ValueError(
            f"pos_embed must be (N, C) with N = {grid[0]}*{grid[1]} = {n} patch rows, got {tuple(e.shape)}; "
            "drop the prefix rows first (pos_embed[0, num_prefix:])"
        )
    return e


def _cell_of_pixel(n_pixels: int, n_cells: int) -> np.ndarray:
    """Grid cell index of every pixel along one axis (pixel p lies in cell floor(p * n_cells / n_pixels))."""
    return (np.arange(n_pixels) * n_cells) // n_pixels


def _cell_bounds(cell: int, n_pixels: int, n_cells: int) -> tuple[int, int]:
    """First and last pixel (inclusive) of ``cell`` along one axis; the inverse of ``_cell_of_pixel``."""
    start = -((-cell * n_pixels) // n_cells)
    stop = -((-(cell + 1) * n_pixels) // n_cells)
    return start, stop - 1


def _norm(values: np.ndarray, vmin: float | None, vmax: float | None, *, symmetric: bool = False) -> Normalize:
    """A colour normalisation over the finite values; symmetric puts 0 in the middle of the scale."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if not hi > lo:
        pad = max(abs(lo) * 0.05, 1e-6)
        lo, hi = lo - pad, hi + pad
    return Normalize(vmin=lo, vmax=hi)


def format_number(v: float) -> str:
    """Short number for labels, with a typographic minus."""
    text = f"{v:.3g}"
    return text.replace("-", "\u2212")


def _head_layout(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """Rows and columns for ``n`` panels with at most ``max_cols`` per row, balanced across rows."""
    rows = max(1, math.ceil(n / max_cols))
    return rows, math.ceil(n / rows)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's data (it has Δ, → and −), or PIL's default font."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry


def patch_at(xy: Sequence[float], image_size: Sequence[int], grid: Sequence[int]) -> Patch:
    """The patch under a click in image pixels, clamped to the grid.

    Args:
        xy: click position ``(x, y)`` in pixels of the displayed image (Gradio's ``evt.index``).
        image_size: ``(w, h)`` of that image in pixels (PIL's ``image.size``).
        grid: patch grid ``(gh, gw)``.

    Returns:
        ``(row, col)`` of the patch; pixel ``p`` lies in cell ``floor(p * cells / pixels)`` on each axis,
        the same mapping ``overlay`` uses, so sizes that are not multiples of the grid stay aligned.
    """
    gh, gw = _check_grid(grid)
    w, h = _check_grid(image_size, "image_size")
    x, y = xy
    if isinstance(x, int) and isinstance(y, int):
        row, col = (y * gh) // h, (x * gw) // w
    else:
        row, col = math.floor(float(y) * gh / h), math.floor(float(x) * gw / w)
    return min(max(row, 0), gh - 1), min(max(col, 0), gw - 1)


class SwinWindowKeys(NamedTuple):
    """Where a query patch's window lies for one Swin block.

    window_index: index of the window in the block's (nW, ...) window axis (row-major over windows, shifted frame).
    query_index: the query's token index inside its window (row-major, ``Wh * Ww`` tokens).
    keys: LongTensor (Wh*Ww, 2) of the window's tokens as (row, col) in the unshifted image grid, in window order.
    masked: BoolTensor (Wh*Ww,) True for keys in another shift region than the query (always False without shift).
    """

    window_index: int
    query_index: int
    keys: torch.Tensor
    masked: torch.Tensor


def swin_window_keys(
    patch: Sequence[int], grid: Sequence[int], window: Sequence[int], shift: Sequence[int] = (0, 0)
) -> SwinWindowKeys:
    """The window, in-window query index, key positions and masked keys of a patch in a (shifted) Swin block.

    The block rolls the grid by ``(-sh, -sw)`` before windowing, so image position ``(r, c)`` sits at
    ``((r - sh) % H, (c - sw) % W)`` in the shifted frame; keys are mapped back with the roll undone.

    Args:
        patch: query ``(row, col)`` in the image grid.
        grid: the stage's patch grid ``(H, W)``; both must be multiples of the window.
        window: ``(Wh, Ww)`` as the block used it.
        shift: ``(sh, sw)`` cyclic shift of the block, each in ``[0, window)``.

    Returns:
        ``SwinWindowKeys(window_index, query_index, keys (Wh*Ww, 2), masked (Wh*Ww,))``.
    """
    H, W = _check_grid(grid)
    Wh, Ww = _check_grid(window, "window")
    sh, sw = int(shift[0]), int(shift[1])
    if H % Wh or W % Ww:
        raise ValueError(f"grid {(H, W)} is not a multiple of window {(Wh, Ww)}; pass the block's effective window")
    if not (0 <= sh < Wh and 0 <= sw < Ww):
        raise ValueError(f"shift {(sh, sw)} must lie in [0, window) for window {(Wh, Ww)}")
    r, c = _check_patch(patch, (H, W))
    i, j = (r - sh) % H, (c - sw) % W  # position in the shifted frame
    wi, wj = i // Wh, j // Ww
    window_index = wi * (W // Ww) + wj
    query_index = (i % Wh) * Ww + (j % Ww)
    rows = torch.arange(wi * Wh, (wi + 1) * Wh)  # Wh
    cols = torch.arange(wj * Ww, (wj + 1) * Ww)  # Ww
    ri, cj = torch.meshgrid(rows, cols, indexing="ij")  # Wh, Ww
    ri, cj = ri.reshape(-1), cj.reshape(-1)  # Wh*Ww
    keys = torch.stack(((ri + sh) % H, (cj + sw) % W), dim=-1)  # Wh*Ww, 2
    region = shift_region_ids((H, W), (Wh, Ww), (sh, sw))[ri, cj]  # Wh*Ww
    masked = region != region[query_index]
    return SwinWindowKeys(window_index, query_index, keys, masked)


def window_values_to_grid(
    values: Array, keys: torch.Tensor, grid: Sequence[int], masked: torch.Tensor | None = None
) -> np.ndarray:
    """Scatter per-key values of one window onto the image grid, NaN elsewhere and at masked keys.

    Args:
        values: (..., Wh*Ww) values in window key order, e.g. ``attn[0, window_index, :, query_index]`` (heads, Wh*Ww).
        keys: (Wh*Ww, 2) key positions from ``swin_window_keys``.
        grid: image patch grid ``(H, W)``.
        masked: optional (Wh*Ww,) bool; True keys are set to NaN.

    Returns:
        (..., H, W) float32 array.
    """
    H, W = _check_grid(grid)
    v = _to_numpy(values, "values")
    k = np.asarray(keys, dtype=np.int64)
    if k.ndim != 2 or k.shape[1] != 2 or v.shape[-1] != k.shape[0]:
        raise ValueError(f"values (..., K) and keys (K, 2) disagree: {v.shape} vs {k.shape}")
    out = np.full(v.shape[:-1] + (H, W), np.nan, dtype=np.float32)  # ..., H, W
    out[..., k[:, 0], k[:, 1]] = v
    if masked is not None:
        m = np.asarray(masked, dtype=bool)
        out[..., k[m, 0], k[m, 1]] = np.nan
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Maps computed from encodings


def cosine_similarity_matrix(pos_embed: Array, grid: Sequence[int]) -> np.ndarray:
    """Cosine similarity between every pair of patch embeddings.

    Args:
        pos_embed: (N, C) patch rows of an absolute position embedding, N = gh * gw (prefix rows dropped).
        grid: patch grid ``(gh, gw)``.

    Returns:
        (N, N) float32 array.
    """
    e = F.normalize(_patch_rows(pos_embed, _check_grid(grid)), dim=-1)  # N, C
    return (e @ e.T).numpy()  # N, N


def similarity_map(pos_embed: Array, grid: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Cosine similarity of one patch's embedding to every patch's embedding.

    Args:
        pos_embed: (N, C) patch rows, N = gh * gw.
        grid: ``(gh, gw)``.
        patch: query ``(row, col)``.

    Returns:
        (gh, gw) float32 array, 1 at the query.
    """
    gh, gw = _check_grid(grid)
    r, c = _check_patch(patch, (gh, gw))
    e = F.normalize(_patch_rows(pos_embed, (gh, gw)), dim=-1)  # N, C
    return (e @ e[r * gw + c]).reshape(gh, gw).numpy()  # gh, gw


def pos_embed_pca_rgb(pos_embed: Array, grid: Sequence[int]) -> np.ndarray:
    """The top three principal components of the patch embeddings as an RGB map.

    Components are the top eigenvectors of the (C, C) scatter matrix of the centred (N, C) embedding (an
    eigendecomposition of a small symmetric matrix: several times cheaper than an SVD of the embedding);
    each score is sign-fixed (its largest magnitude positive) and min-max scaled to [0, 1]. Missing
    components (C or N below 3) and constant ones are 0.5.

    Args:
        pos_embed: (N, C) patch rows, N = gh * gw.
        grid: ``(gh, gw)``.

    Returns:
        (gh, gw, 3) float32 array in [0, 1].
    """
    gh, gw = _check_grid(grid)
    e = _patch_rows(pos_embed, (gh, gw))  # float32 is ample for colours, and twice as fast as float64 here
    x = e - e.mean(dim=0, keepdim=True)  # N, C
    k = min(3, *x.shape)
    evals, evecs = torch.linalg.eigh(x.T @ x)  # C; C, C (ascending)
    scores = x @ evecs[:, -k:].flip(-1)  # N, k, largest variance first
    sign = torch.sign(scores.gather(0, scores.abs().argmax(dim=0, keepdim=True)))  # 1, k
    scores = scores * torch.where(sign == 0, 1.0, sign)
    lo, hi = scores.min(dim=0).values, scores.max(dim=0).values  # k
    span = hi - lo
    top = evals[-1].clamp_min(0).sqrt().clamp_min(1e-30)  # the largest singular value
    scaled = torch.where(span > 1e-5 * top, (scores - lo) / span.clamp_min(1e-30), 0.5)
    rgb = torch.full((gh * gw, 3), 0.5)
    rgb[:, :k] = scaled
    return rgb.reshape(gh, gw, 3).float().clamp(0, 1).numpy()  # gh, gw, 3


def rope_phase_similarity(angles: Array, grid: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Relative-phase similarity of one position to all others under RoPE.

    RoPE makes q.k depend on ``angle_q - angle_k`` per frequency pair; the mean of ``cos(angle_q - angle_k)``
    over pairs is 1 at the query and falls off with distance at a rate set by the frequencies.

    Args:
        angles: (N, head_dim // 2) rotation angles for the N = gh * gw patches (no prefix rows).
        grid: ``(gh, gw)``.
        patch: query ``(row, col)``.

    Returns:
        (gh, gw) float32 array in [-1, 1].
    """
    gh, gw = _check_grid(grid)
    r, c = _check_patch(patch, (gh, gw))
    a = _to_tensor(angles, "angles").double()
    if a.ndim != 2 or a.shape[0] != gh * gw:
        raise ValueError(f"angles must be (N, head_dim//2) with N = {gh * gw}, got {tuple(a.shape)}")
    return torch.cos(a[r * gw + c] - a).mean(dim=-1).reshape(gh, gw).float().numpy()  # gh, gw


# ----------------------------------------------------------------------------------------------------------------------
# Drawing (numpy + PIL; matplotlib supplies only colormaps and the font)


def _lut(cmap: Colormap) -> np.ndarray:
    """The colormap sampled at 256 levels as uint8 (256, 3)."""
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def _levels(values: np.ndarray, norm: Normalize) -> np.ndarray:
    """Normalised values as LUT levels 0..255 (uint8); NaN maps to 0 (callers mask it)."""
    scaled = np.clip((values - norm.vmin) / (norm.vmax - norm.vmin), 0.0, 1.0)
    return np.round(np.nan_to_num(scaled) * 255.0).astype(np.uint8)


def colorize(
    values: Array, cmap: str | Colormap, norm: Normalize, *, bad: Sequence[int] = (255, 255, 255)
) -> np.ndarray:
    """Map values through a colormap: (...,) floats to uint8 (..., 3); NaN gets the ``bad`` colour.

    The colormap is sampled at 256 levels, so a value maps to ``cmap(round(255 * norm(value)) / 255)``.
    """
    v = _to_numpy(values, "values")
    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    out = _lut(cm)[_levels(v, norm)]  # ..., 3
    out[~np.isfinite(v)] = np.asarray(bad, dtype=np.uint8)
    return out


def _upsample(cells: np.ndarray, height: int, width: int) -> Image.Image:
    """Nearest upsampling of a uint8 (gh, gw) or (gh, gw, 3) array to a (width, height) L or RGB image.

    Pixel p takes cell floor(p * cells / pixels). For whole factors PIL's nearest resize does exactly that, in C.
    """
    if height % cells.shape[0] == 0 and width % cells.shape[1] == 0:
        return Image.fromarray(cells).resize((width, height), Image.Resampling.NEAREST)
    rows = np.bincount(_cell_of_pixel(height, cells.shape[0]), minlength=cells.shape[0])  # gh: pixels per cell row
    cols = np.bincount(_cell_of_pixel(width, cells.shape[1]), minlength=cells.shape[1])  # gw
    return Image.fromarray(np.repeat(np.repeat(cells, rows, axis=0), cols, axis=1))  # height, width, ...


def _photo_image(image: Image.Image | np.ndarray | None, grid: Grid, min_side: int, max_side: int) -> Image.Image:
    """The photo in RGB, resized so its longer side lies in [min_side, max_side]; a light canvas if None."""
    if image is None:
        cell = max(1, _SAMPLE_MAP_SIDE // max(grid))
        return Image.new("RGB", (grid[1] * cell, grid[0] * cell), (235, 235, 235))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}; or pass a PIL image"
            )
        pil = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        raise TypeError(f"image must be a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    w, h = pil.size
    side = max(w, h)
    if side < min_side:  # a whole factor, nearest: the model's input pixels exactly, cheap to draw and to compress
        k = max(1, min(math.ceil(min_side / side), max_side // side))
        pil = pil.resize((w * k, h * k), Image.Resampling.NEAREST)
    elif side > max_side:
        k = max_side / side
        pil = pil.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS)
    return pil


def _blend(
    photo: Image.Image,
    values: np.ndarray,
    cmap: Colormap,
    norm: Normalize | None,
    alpha: float,
    *,
    alpha_by_value: bool = False,
) -> Image.Image:
    """Colour a (gh, gw) map (or take a (gh, gw, 3) RGB map), upsample it nearest to the photo and blend.

    Colours and weights are computed per cell, upsampled as uint8, and blended by PIL in C:
    ``out = photo + weight * (colour - photo)``. With ``alpha_by_value`` the weight is
    ``alpha * sqrt(normalised value)``, so low values leave the photo visible (suits sparse maps such as attention).

    Returns:
        A new RGB image of the photo's size; NaN cells show the photo dimmed to ``DIM``.
    """
    W, H = photo.size
    if values.ndim == 3:
        finite = np.isfinite(values).all(axis=-1)  # gh, gw
        colour = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0).astype(np.uint8)  # gh, gw, 3
        weight = np.full(finite.shape, alpha, dtype=np.float32)  # gh, gw
    else:
        finite = np.isfinite(values)  # gh, gw
        levels = _levels(np.where(finite, values, norm.vmin), norm)  # gh, gw
        colour = _lut(cmap)[levels]  # gh, gw, 3
        weight = alpha * np.sqrt(levels / 255.0) if alpha_by_value else np.full(finite.shape, alpha)  # gh, gw
    weight = np.where(finite, np.round(weight * 255.0), 0).astype(np.uint8)  # gh, gw
    base = photo
    if not finite.all():
        base = Image.composite(base, base.point(_DIM_LUT), _upsample(finite.astype(np.uint8) * 255, H, W))
    layer = _upsample(colour, H, W)  # H, W, 3
    mask = _upsample(weight, H, W)  # H, W
    return Image.composite(layer, base, mask)


def _outline_patch(img: Image.Image, patch: Patch, grid: Grid) -> Image.Image:
    """Outline ``patch``'s cell in white, exactly on its bounds, with black rims either side; draws on ``img``."""
    W, H = img.size
    y0, y1 = _cell_bounds(patch[0], H, grid[0])
    x0, x1 = _cell_bounds(patch[1], W, grid[1])
    width = int(np.clip(min(x1 - x0 + 1, y1 - y0 + 1) // 10, 1, 3))
    rim = max(1, (width + 1) // 2)
    draw = ImageDraw.Draw(img)
    draw.rectangle((x0 - rim, y0 - rim, x1 + rim, y1 + rim), outline=(0, 0, 0), width=rim)
    draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 255), width=width)
    if x1 - x0 > 2 * (width + rim) and y1 - y0 > 2 * (width + rim):
        draw.rectangle((x0 + width, y0 + width, x1 - width, y1 - width), outline=(0, 0, 0), width=rim)
    return img


def _fit_font(lines: Sequence[str], width: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest font of at most ``size`` points (and at least 8) in which every line fits ``width``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(size)
    while size > 8 and max(probe.textlength(line, font=font) for line in lines) > width - 8:
        size -= 1
        font = _font(size)
    return font


def _wrap(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """``line`` broken at spaces into pieces no wider than ``width`` where possible (a long word stays whole)."""
    pieces: list[str] = []
    for word in line.split(" "):
        if pieces and font.getlength(f"{pieces[-1]} {word}") <= width:
            pieces[-1] = f"{pieces[-1]} {word}"
        else:
            pieces.append(word)
    return pieces


@lru_cache(maxsize=512)
def text_strip(text: str, width: int, size: int, *, lines: int | None = None) -> Image.Image:
    """A white strip holding ``text`` (``\\n`` splits lines) centred, shrinking the font to fit, then wrapping.

    ``lines`` reserves room for that many lines, so strips of one row of panels line up. Memoised (rendering
    text is the costliest part of a small view): callers paste the strip and never draw on it.
    """
    rows = text.split("\n")
    font = _fit_font(rows, width, size)
    rows = [wrapped for row in rows for wrapped in _wrap(row, font, width - 8)]
    line_h = round(font.size * 1.25)
    strip = Image.new("RGB", (width, line_h * max(len(rows), lines or 0) + font.size // 2), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, row in enumerate(rows):
        draw.text((width / 2, font.size // 4 + i * line_h), row, font=font, fill=(0, 0, 0), anchor="mt")
    return strip


@lru_cache(maxsize=512)
def text_label(text: str, size: int, colour: tuple[int, int, int]) -> Image.Image:
    """``text`` on white, cropped to its ink box; memoised like :func:`text_strip`."""
    font = _font(size)
    x0, y0, x1, y1 = font.getbbox(text)
    img = Image.new("RGB", (max(1, x1 - x0), max(1, y1 - y0)), (255, 255, 255))
    ImageDraw.Draw(img).text((-x0, -y0), text, font=font, fill=colour)
    return img


def paste_label(
    canvas: Image.Image, text: str, xy: tuple[float, float], anchor: str, *, size: int = 11,
    colour: tuple[int, int, int] = (0, 0, 0),
) -> None:
    """Paste a small label at ``xy``; ``anchor`` is two letters: l/m/r horizontally, then t/m/b vertically."""
    img = text_label(text, size, colour)
    dx = {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]] * img.width
    dy = {"t": 0.0, "m": 0.5, "b": 1.0}[anchor[1]] * img.height
    canvas.paste(img, (round(xy[0] - dx), round(xy[1] - dy)))


@lru_cache(maxsize=128)
def _colorbar_strip(cmap: str, vmin: float, vmax: float, width: int, size: int, label: str | None) -> Image.Image:
    """A horizontal colour bar from ``vmin`` to ``vmax`` with min / middle / max tick labels and an optional label.

    Memoised like :func:`text_strip`: callers paste it and never draw on it.
    """
    font = _font(size)
    pad = max(10, width // 16)
    bar_w = max(32, width - 2 * pad)
    bar_h = max(10, size)
    label_h = size + 6 if label else 0
    height = 6 + label_h + bar_h + 4 + size + 8
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    if label:
        draw.text((width / 2, 6), label, font=_fit_font([label], width, size), fill=(0, 0, 0), anchor="mt")
    top = 6 + label_h
    gradient = _lut(matplotlib.colormaps[cmap])[np.round(np.linspace(0.0, 255.0, bar_w)).astype(np.int64)]  # bar_w, 3
    strip.paste(Image.fromarray(np.ascontiguousarray(np.broadcast_to(gradient, (bar_h, bar_w, 3)))), (pad, top))
    draw.rectangle((pad - 1, top - 1, pad + bar_w, top + bar_h), outline=(90, 90, 90), width=1)
    lo, hi = float(vmin), float(vmax)
    for frac, anchor in ((0.0, "lt"), (0.5, "mt"), (1.0, "rt")):
        x = pad + frac * (bar_w - 1)
        draw.line((x, top + bar_h, x, top + bar_h + 3), fill=(60, 60, 60), width=1)
        draw.text((x, top + bar_h + 4), format_number(lo + frac * (hi - lo)), font=font, fill=(0, 0, 0), anchor=anchor)
    return strip


def vstack(parts: Sequence[Image.Image]) -> Image.Image:
    """Stack images top to bottom, each centred on the widest."""
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        out.paste(p, ((width - p.width) // 2, y))
        y += p.height
    return out


def overlay(
    image: Image.Image | np.ndarray | None,
    values: Array,
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.6,
    alpha_by_value: bool = False,
    mark: Sequence[int] | None = None,
    title: str | None = None,
    colorbar: bool = True,
    colorbar_label: str | None = None,
    min_side: int = 256,
    max_side: int = 1024,
) -> Image.Image:
    """Blend a per-patch map with the photo, outline the clicked patch and add a title and a colour bar.

    The map is upsampled nearest so patches stay crisp; pixel p lies in cell floor(p * cells / pixels), the same
    mapping as ``patch_at``, so images whose size is not a multiple of the grid stay aligned.

    Args:
        image: the photo the model saw (PIL or uint8 (H, W, 3)); None draws the map alone on a light canvas.
        values: (gh, gw) scalar map (NaN = absent, drawn as the dimmed photo) or (gh, gw, 3) RGB in [0, 1].
        cmap: matplotlib colormap name for scalar maps.
        vmin, vmax: colour scale; default the finite min / max.
        alpha: weight of the colour over the photo (1 when ``image`` is None).
        alpha_by_value: scale the weight by sqrt of the normalised value, so low values leave the photo visible.
        mark: ``(row, col)`` to outline, or None.
        title: text above the image, or None.
        colorbar: add a colour bar strip below (scalar maps only).
        colorbar_label: text above the colour bar.
        min_side, max_side: the photo is resized so its longer side lies in this range.

    Returns:
        RGB ``PIL.Image``; the photo area is at least as large as the input (before any ``max_side`` shrink).
    """
    vals = _to_numpy(values, "values")
    rgb = vals.ndim == 3 and vals.shape[-1] == 3
    if vals.ndim != 2 and not rgb:
        raise ValueError(f"values must be (gh, gw) or (gh, gw, 3), got {vals.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    grid = (vals.shape[0], vals.shape[1])
    photo = _photo_image(image, grid, min_side, max_side)
    cm = matplotlib.colormaps[cmap]
    norm = None if rgb else _norm(vals, vmin, vmax)
    img = _blend(photo, vals, cm, norm, 1.0 if image is None else alpha, alpha_by_value=alpha_by_value)
    if mark is not None:
        img = _outline_patch(img, _check_patch(mark, grid), grid)
    width = img.width
    size = int(np.clip(round(width / 22), 11, 18))
    parts = []
    if title:
        parts.append(text_strip(title, width, size + 1))
    parts.append(img)
    if colorbar and norm is not None:
        parts.append(_colorbar_strip(cmap, float(norm.vmin), float(norm.vmax), width, size, colorbar_label))
    return vstack(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Sheets: several panels with titles and one shared colour bar, composed with PIL


@dataclass(frozen=True)
class Panel:
    """One panel of a :class:`Sheet`: its title and where its picture lies, ``(x0, y0, x1, y1)``, ends exclusive."""

    title: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Sheet:
    """A composed view: the picture, its panels in row-major order, and the shared colour scale."""

    image: Image.Image
    panels: tuple[Panel, ...]
    vmin: float
    vmax: float

    def crop(self, k: int) -> np.ndarray:
        """The pixels of panel ``k`` as uint8 (h, w, 3)."""
        return np.asarray(self.image.crop(self.panels[k].box))


_GAP = 8  # pixels between panels
_MARGIN = 12  # pixels around the sheet
_MIN_SHEET_WIDTH = 480  # narrower sheets (a few thin panels) are widened, so title and colour bar stay legible
_HEAD_WIDTH = 560  # a wider sheet's title, row labels, colour bar and footer sit over its left 560 px, which the
# app's sideways-scrolling box shows first (centred, they were scrolled out of sight)


def _compose(
    panels: Sequence[Image.Image | None],
    titles: Sequence[str],
    *,
    ncols: int,
    title: str,
    cmap: str,
    norm: Normalize,
    colorbar_label: str,
    row_labels: Sequence[str] | None = None,
    footer: str | None = None,
) -> Sheet:
    """Lay equally sized panels out row-major under ``title``, each under its title, with one colour bar below.

    None panels leave their cell blank (and get no :class:`Panel`); ``row_labels`` head each row of panels.
    Everything is placed first and pasted once onto one canvas.
    """
    pw, ph = next(p for p in panels if p is not None).size
    content = ncols * pw + (ncols - 1) * _GAP
    width = max(2 * _MARGIN + content, _MIN_SHEET_WIDTH)
    left = (width - content) // 2  # the panels are centred
    size = int(np.clip(round(pw / 16), 10, 15))
    title_lines = max(t.count("\n") + 1 for t in titles)
    placed: list[tuple[Image.Image, int, int]] = []  # (image, x, y)
    boxes: list[Panel] = []

    head = min(width, _HEAD_WIDTH)  # the width texts and the colour bar are centred in, from the left edge

    def place(img: Image.Image, y: int, x: int | None = None) -> int:
        placed.append((img, (head - img.width) // 2 if x is None else x, y))
        return y + img.height

    y = place(text_strip(title, head, size + 3), 0)
    for r in range(math.ceil(len(panels) / ncols)):
        if row_labels is not None:
            y = place(text_strip(row_labels[r], head, size + 1), y)
        ks = [k for k in range(r * ncols, min((r + 1) * ncols, len(panels))) if panels[k] is not None]
        strips = {k: text_strip(titles[k], pw, size, lines=title_lines) for k in ks}
        strip_h = max((s.height for s in strips.values()), default=0)
        for k in ks:
            x = left + (k - r * ncols) * (pw + _GAP)
            place(strips[k], y, x)
            place(panels[k], y + strip_h, x)
            boxes.append(Panel(titles[k], (x, y + strip_h, x + pw, y + strip_h + ph)))
        y += strip_h + ph + _GAP
    bar_w = min(head - 2 * _MARGIN, max(320, 2 * pw))
    y = place(_colorbar_strip(cmap, float(norm.vmin), float(norm.vmax), bar_w, size, colorbar_label), y)
    if footer:
        y = place(text_strip(footer, head, size), y)
    canvas = Image.new("RGB", (width, y), (255, 255, 255))
    for img, x, top in placed:
        canvas.paste(img, (x, top))
    return Sheet(canvas, tuple(boxes), float(norm.vmin), float(norm.vmax))


def _heads_maps(maps: Array, name: str) -> np.ndarray:
    """Validate a (heads, gh, gw) stack of maps."""
    m = _to_numpy(maps, name)
    if m.ndim != 3:
        raise ValueError(f"{name} must be (heads, gh, gw), got {m.shape}")
    return m


def similarity_mosaic(pos_embed: Array, grid: Sequence[int], *, similarity: Array | None = None) -> np.ndarray:
    """ViT Figure 7's mosaic: tile (i, j) is the cosine similarity of patch (i, j)'s embedding to every patch.

    Tiles are (gh, gw) and separated by NaN gaps one cell wide. ``similarity``, the (N, N)
    :func:`cosine_similarity_matrix` when already computed, is used as it is.

    Returns:
        (gh*(gh+1)-1, gw*(gw+1)-1) float32 array: tile (i, j) occupies rows ``i*(gh+1) + [0, gh)`` and
        columns ``j*(gw+1) + [0, gw)``.
    """
    gh, gw = _check_grid(grid)
    if similarity is None:
        similarity = cosine_similarity_matrix(pos_embed, (gh, gw))  # N, N
    sims = torch.as_tensor(_to_numpy(similarity, "similarity")).reshape(gh, gw, gh, gw)  # i, j, a, b
    padded = F.pad(sims, (0, 1, 0, 1), value=float("nan"))  # i, j, a+1, b+1
    return rearrange(padded, "i j a b -> (i a) (j b)")[:-1, :-1].numpy()  # gh*(gh+1)-1, gw*(gw+1)-1


def pos_embed_similarity_grid(
    pos_embed: Array, grid: Sequence[int], *, title: str = "Position embedding similarity", cmap: str = "viridis",
    similarity: Array | None = None,
) -> Sheet:
    """ViT Figure 7 style: one tile per patch, holding its embedding's cosine similarity to every patch.

    The mosaic of :func:`similarity_mosaic` is drawn with one colour scale (its minimum to 1), every cell an
    integer number of pixels (at least 2) so tiles stay square and crisp, white gaps between tiles, and the
    tiles' row and column numbers along the left and top edges.

    Args:
        pos_embed: (N, C) patch rows, N = gh * gw.
        grid: ``(gh, gw)``.
        title: sheet title.
        cmap: matplotlib colormap name.
        similarity: the (N, N) :func:`cosine_similarity_matrix` when already computed.

    Returns:
        A :class:`Sheet` with one panel: the mosaic, ``cell`` pixels per mosaic entry.
    """
    gh, gw = _check_grid(grid)
    mosaic = similarity_mosaic(pos_embed, (gh, gw), similarity=similarity)  # gh*(gh+1)-1, gw*(gw+1)-1
    cell = max(2, math.ceil(_MOSAIC_SIDE / max(mosaic.shape)))
    norm = Normalize(float(np.nanmin(mosaic)), 1.0) if np.nanmin(mosaic) < 1.0 else Normalize(0.0, 1.0)
    cm = matplotlib.colormaps[cmap]
    picture = _upsample(colorize(mosaic, cm, norm), mosaic.shape[0] * cell, mosaic.shape[1] * cell)  # H, W, 3
    gutter = 44  # room for row numbers on the left and column numbers on top
    framed = Image.new("RGB", (picture.width + gutter, picture.height + gutter), (255, 255, 255))
    framed.paste(picture, (gutter, gutter))
    step_r, step_c = max(1, math.ceil(gh / 12)), max(1, math.ceil(gw / 12))
    for i in range(0, gh, step_r):
        paste_label(framed, str(i), (gutter - 4, gutter + (i * (gh + 1) + gh / 2) * cell), "rm")
    for j in range(0, gw, step_c):
        paste_label(framed, str(j), (gutter + (j * (gw + 1) + gw / 2) * cell, gutter - 4), "mb")
    paste_label(framed, "row \u2193  col \u2192", (4, 4), "lt", colour=(90, 90, 90))
    sheet = _compose(
        [framed], [f"tile (row, col): similarity of that patch to every patch ({gh}x{gw})"],
        ncols=1, title=title, cmap=cmap, norm=norm, colorbar_label="cosine similarity",
    )  # fmt: skip
    x0, y0, x1, y1 = sheet.panels[0].box
    return replace(sheet, panels=(Panel(sheet.panels[0].title, (x0 + gutter, y0 + gutter, x1, y1)),))


def bias_table_heatmaps(
    table: Array,
    window: Sequence[int],
    *,
    cls_entries: bool = False,
    title: str = "Relative position bias table",
    cmap: str = "RdBu_r",
    outline: Sequence[int] | None = None,
    symmetric: bool = True,
) -> Sheet:
    """Every head's relative position bias table as a (2Wh-1) x (2Ww-1) heatmap over offsets.

    Row i, column j of a heatmap is offset ``dy = i - (Wh-1)``, ``dx = j - (Ww-1)`` (query minus key), i.e. the
    table reshaped row-major as Swin and BEiT index it; the zero-offset cell is outlined in black and the edge
    offsets are labelled. BEiT's three cls rows (cls->token, token->cls, cls->cls) are split off and printed
    under each head's title.

    Args:
        table: (R, heads) with R = (2Wh-1)(2Ww-1), plus 3 when ``cls_entries``.
        window: ``(Wh, Ww)``.
        cls_entries: whether the last 3 rows are BEiT's cls entries.
        title: sheet title.
        cmap: colormap name; the scale is shared by all heads.
        outline: ``(Oh, Ow)``: also outline the offsets a window of that size holds (|dy| < Oh, |dx| < Ow), e.g. the
            trained window inside a wider span.
        symmetric: scale symmetric about 0 (for biases of either sign); False fits it to the values' range.

    Returns:
        A :class:`Sheet` with one panel per head (at most 6 per row), ``cell`` pixels per offset; panel boxes
        cover the heatmaps only.
    """
    Wh, Ww = _check_grid(window, "window")
    t = _to_numpy(table, "table")
    n_rel = (2 * Wh - 1) * (2 * Ww - 1)
    expected = n_rel + 3 if cls_entries else n_rel
    if t.ndim != 2 or t.shape[0] != expected:
        hint = "" if cls_entries else "; pass cls_entries=True for BEiT tables with 3 cls rows"
        raise ValueError(f"table must be ({expected}, heads) for window {(Wh, Ww)}, got {t.shape}{hint}")
    heads = t.shape[1]
    maps = t[:n_rel].T.reshape(heads, 2 * Wh - 1, 2 * Ww - 1)  # heads, 2Wh-1, 2Ww-1
    cls = t[n_rel:].T  # heads, 3 (empty without cls entries)
    norm = _norm(maps, None, None, symmetric=symmetric)
    cm = matplotlib.colormaps[cmap]
    cell = max(2, _TABLE_SIDE // max(2 * Wh - 1, 2 * Ww - 1))
    if outline is not None:
        Oh, Ow = (min(int(o), w) for o, w in zip(outline, (Wh, Ww)))
    pictures = np.repeat(np.repeat(colorize(maps, cm, norm), cell, axis=1), cell, axis=2)  # heads, H, W, 3
    gutter, pad = 30, 12  # offset labels left of and below each heatmap; room for the last one on the right
    H, W = pictures.shape[1:3]
    panels = []
    for h in range(heads):
        framed = Image.new("RGB", (W + gutter + pad, H + gutter), (255, 255, 255))
        framed.paste(Image.fromarray(pictures[h]), (gutter, 0))
        x0, y0 = gutter + (Ww - 1) * cell, (Wh - 1) * cell
        ImageDraw.Draw(framed).rectangle(
            (x0, y0, x0 + cell - 1, y0 + cell - 1), outline=(0, 0, 0), width=max(1, cell // 8)
        )
        if outline is not None:
            ox, oy = gutter + (Ww - Ow) * cell, (Wh - Oh) * cell
            ImageDraw.Draw(framed).rectangle(
                (ox, oy, ox + (2 * Ow - 1) * cell - 1, oy + (2 * Oh - 1) * cell - 1), outline=(0, 0, 0), width=2
            )
        for i, dy in ((0, -(Wh - 1)), (Wh - 1, 0), (2 * Wh - 2, Wh - 1)):
            paste_label(framed, format_number(dy), (gutter - 3, (i + 0.5) * cell), "rm", size=10)
        for j, dx in ((0, -(Ww - 1)), (Ww - 1, 0), (2 * Ww - 2, Ww - 1)):
            paste_label(framed, format_number(dx), (gutter + (j + 0.5) * cell, H + 3), "mt", size=10)
        panels.append(framed)
    head_titles = []
    for h in range(heads):
        head_title = f"head {h}"
        if cls_entries:
            c2t, t2c, c2c = cls[h]
            head_title += f"\ncls\u2192tok {format_number(c2t)}\ntok\u2192cls {format_number(t2c)}\ncls\u2192cls {format_number(c2c)}"
        head_titles.append(head_title)
    _, ncols = _head_layout(heads)
    sheet = _compose(
        panels, head_titles, ncols=ncols, title=title, cmap=cmap, norm=norm,
        colorbar_label="bias (added to attention logits)",
        footer="offsets, query \u2212 key: row \u0394y on the left, column \u0394x below\n"
               "the outlined cell is zero offset" + ("; the outlined box is the trained window" if outline else ""),
    )  # fmt: skip
    boxes = tuple(Panel(p.title, (p.box[0] + gutter, p.box[1], p.box[2] - pad, p.box[3] - gutter)) for p in sheet.panels)
    return replace(sheet, panels=boxes)


def head_values(
    values: Array, *, title: str, colorbar_label: str, cmap: str = "viridis", fmt: str = "{:.3g}"
) -> Sheet:
    """One scalar per head as a coloured tile with its value in the title (e.g. each head's attention temperature).

    Args:
        values: (heads,).
        title: sheet title.
        colorbar_label: what the values are.
        cmap: colormap name; the scale spans the values.
        fmt: format of the value printed under each head's name.

    Returns:
        A :class:`Sheet` with one panel per head (at most 6 per row).
    """
    v = _to_numpy(values, "values").reshape(-1)  # heads
    norm = _norm(v, None, None)
    colours = colorize(v[:, None, None], matplotlib.colormaps[cmap], norm)  # heads, 1, 1, 3
    side = 96
    panels = [Image.new("RGB", (side, side), tuple(int(c) for c in colours[h, 0, 0])) for h in range(v.shape[0])]
    titles = [f"head {h}\n{fmt.format(float(x))}" for h, x in enumerate(v)]
    return _compose(panels, titles, ncols=_head_layout(len(panels))[1], title=title, cmap=cmap, norm=norm,
                    colorbar_label=colorbar_label)  # fmt: skip


def matrix_heatmaps(
    matrices: Array,
    names: Sequence[str],
    *,
    title: str,
    colorbar_label: str,
    footer: str | None = None,
    mark_row: int | None = None,
    cmap: str = "magma",
) -> Sheet:
    """Several (rows, cols) matrices as heatmaps side by side, on one colour scale fitted to their values.

    Each cell is a square of pixels; ``mark_row`` outlines one row in every panel (e.g. the chosen block).

    Args:
        matrices: (G, rows, cols) values; NaN cells are drawn white.
        names: G panel titles.
        title: sheet title.
        colorbar_label: what the values are.
        footer: text under the colour bar (say what the rows and columns are).
        mark_row: a row to outline, or None.
        cmap: colormap name.

    Returns:
        A :class:`Sheet` with one panel per matrix, boxes covering the heatmaps.
    """
    m = _to_numpy(matrices, "matrices")
    if m.ndim != 3 or m.shape[0] != len(names):
        raise ValueError(f"matrices must be (G, rows, cols) with G = {len(names)} names, got {m.shape}")
    _, rows, cols = m.shape
    norm = _norm(m, 0.0 if np.nanmin(m) >= 0 else None, None)
    cell = max(4, _TABLE_SIDE // max(rows, cols))
    pictures = np.repeat(np.repeat(colorize(m, cmap, norm), cell, axis=1), cell, axis=2)  # G, rows*cell, cols*cell, 3
    panels = []
    for picture in pictures:
        img = Image.fromarray(picture)
        if mark_row is not None:
            ImageDraw.Draw(img).rectangle((0, mark_row * cell, cols * cell - 1, (mark_row + 1) * cell - 1),
                                          outline=(0, 200, 255), width=max(1, cell // 12))
        panels.append(img)
    return _compose(panels, list(names), ncols=min(len(names), MAX_COLS), title=title, cmap=cmap, norm=norm,
                    colorbar_label=colorbar_label, footer=footer)


def query_bias_overlays(
    image: Image.Image | np.ndarray,
    bias_row_per_head: Array,
    patch: Sequence[int],
    *,
    title: str | None = None,
    cls_bias: Array | None = None,
    cmap: str = "RdBu_r",
    alpha: float = 0.65,
    symmetric: bool = True,
) -> Sheet:
    """Each head's relative position bias from the clicked patch to every key it can attend to, on the photo.

    Args:
        image: the photo the model saw.
        bias_row_per_head: (heads, gh, gw) bias from the query to each key; NaN where the query cannot attend.
        patch: the query ``(row, col)``, outlined.
        title: sheet title; default names the patch.
        cls_bias: optional (heads,) token->cls bias (BEiT), printed in each head's title.
        cmap: colormap name; the scale is shared by all heads.
        alpha: weight of the colour over the photo.
        symmetric: scale symmetric about 0; False fits it to the values (e.g. Swin V2's positive bias).

    Returns:
        A :class:`Sheet` with one panel per head (at most 6 per row) and one colour bar.
    """
    maps = _heads_maps(bias_row_per_head, "bias_row_per_head")
    heads, gh, gw = maps.shape
    p = _check_patch(patch, (gh, gw))
    notes = [""] * heads
    if cls_bias is not None:
        cb = _to_numpy(cls_bias, "cls_bias").reshape(-1)  # heads
        if cb.shape[0] != heads:
            raise ValueError(f"cls_bias must be (heads,) = ({heads},), got {cb.shape}")
        notes = [f"\ntok\u2192cls {format_number(float(v))}" for v in cb]
    photo = _photo_image(image, (gh, gw), _PANEL_MIN, _PANEL_MAX)
    norm = _norm(maps, None, None, symmetric=symmetric)
    cm = matplotlib.colormaps[cmap]
    panels = [_outline_patch(_blend(photo, maps[h], cm, norm, alpha), p, (gh, gw)) for h in range(heads)]
    return _compose(
        panels, [f"head {h}{notes[h]}" for h in range(heads)], ncols=_head_layout(heads)[1],
        title=title or f"Relative position bias from patch {p}", cmap=cmap, norm=norm,
        colorbar_label="bias (added to attention logits)",
    )  # fmt: skip


def frequency_planes(
    freqs: Array, *, title: str = "Learned RoPE frequencies", cmap: str = "viridis", side: int = 200
) -> Sheet:
    """Every head's 2D frequency vectors as arrows from the origin, drawn in image orientation (x right, y down).

    An arrow points along the direction in which that channel pair's phase grows on the image; its length and
    colour give the magnitude (radians per patch). One scale, fitted to the longest vector, serves all heads.

    Args:
        freqs: (heads, K, 2) frequency vectors ``(f_x, f_y)`` per head and rotated pair.
        title: sheet title.
        cmap: colormap for the magnitude.
        side: panel side in pixels.

    Returns:
        A :class:`Sheet` with one square panel per head; the colour bar is the magnitude.
    """
    f = _to_numpy(freqs, "freqs").astype(np.float64)
    if f.ndim != 3 or f.shape[-1] != 2:
        raise ValueError(f"freqs must be (heads, K, 2), got {f.shape}")
    heads = f.shape[0]
    mag = np.hypot(f[..., 0], f[..., 1])  # heads, K
    norm = _norm(mag, 0.0, None)
    reach = float(mag.max()) if mag.size and mag.max() > 0 else 1.0
    colours = colorize(mag, cmap, norm)  # heads, K, 3
    centre, radius = side / 2, side / 2 - 10
    panels = []
    for h in range(heads):
        img = Image.new("RGB", (side, side), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), outline=(215, 215, 215))
        draw.line((centre - radius, centre, centre + radius, centre), fill=(190, 190, 190))
        draw.line((centre, centre - radius, centre, centre + radius), fill=(190, 190, 190))
        for k in np.argsort(-mag[h]):  # long arrows first, so short ones stay visible on top
            x = centre + f[h, k, 0] / reach * radius
            y = centre + f[h, k, 1] / reach * radius
            colour = tuple(int(c) for c in colours[h, k])
            draw.line((centre, centre, x, y), fill=colour, width=2)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour, outline=(0, 0, 0))
        paste_label(img, "x\u2192", (side - 3, centre - 3), "rb", size=10, colour=(90, 90, 90))
        paste_label(img, "y\u2193", (centre + 3, side - 3), "lb", size=10, colour=(90, 90, 90))
        panels.append(img)
    return _compose(
        panels, [f"head {h}" for h in range(heads)], ncols=_head_layout(heads)[1], title=title, cmap=cmap, norm=norm,
        colorbar_label="frequency magnitude (radians per patch)",
        footer=f"outer circle: {format_number(reach)} radians per patch; one arrow per rotated channel pair",
    )  # fmt: skip


def head_map_overlays(
    image: Image.Image | np.ndarray,
    maps: Array,
    patch: Sequence[int],
    *,
    title: str,
    colorbar_label: str,
    cmap: str = "viridis",
    alpha: float = 0.65,
) -> Sheet:
    """One scalar map per head on the photo, the clicked patch outlined, on one scale fitted to all heads' values.

    Args:
        image: the photo the model saw.
        maps: (heads, gh, gw) values per key position.
        patch: the clicked ``(row, col)``, outlined.
        title: sheet title.
        colorbar_label: text above the colour bar.
        cmap: colormap name; the scale runs from the smallest to the largest finite value.
        alpha: weight of the colour over the photo.

    Returns:
        A :class:`Sheet` with one panel per head (at most 6 per row) and one colour bar.
    """
    m = _heads_maps(maps, "maps")
    heads, gh, gw = m.shape
    p = _check_patch(patch, (gh, gw))
    photo = _photo_image(image, (gh, gw), _PANEL_MIN, _PANEL_MAX)
    norm = _norm(m, None, None)
    cm = matplotlib.colormaps[cmap]
    panels = [_outline_patch(_blend(photo, m[h], cm, norm, alpha), p, (gh, gw)) for h in range(heads)]
    return _compose(panels, [f"head {h}" for h in range(heads)], ncols=_head_layout(heads)[1], title=title,
                    cmap=cmap, norm=norm, colorbar_label=colorbar_label)


def signed_head_overlays(
    image: Image.Image | np.ndarray,
    maps: Array,
    patch: Sequence[int],
    *,
    row_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    cmap: str = "RdBu_r",
    alpha: float = 0.65,
) -> Sheet:
    """Several signed maps per head on the photo, one row of panels per map kind, on one scale symmetric about 0.

    Args:
        image: the photo the model saw.
        maps: (R, heads, gh, gw) values (NaN where undefined), e.g. the two factors of a decomposed bias.
        patch: the query ``(row, col)``, outlined.
        row_labels: R labels, one per map kind.
        title: sheet title.
        colorbar_label: what the values are.

    Returns:
        A :class:`Sheet`: for each group of at most 6 heads, R rows of panels (labelled), and one colour bar.
    """
    stacked = _to_numpy(maps, "maps")
    if stacked.ndim != 4 or stacked.shape[0] != len(row_labels):
        raise ValueError(f"maps must be (R, heads, gh, gw) with R = {len(row_labels)} row labels, got {stacked.shape}")
    kinds, heads, gh, gw = stacked.shape
    p = _check_patch(patch, (gh, gw))
    norm = _norm(stacked, None, None, symmetric=True)
    photo = _photo_image(image, (gh, gw), _PANEL_MIN, _PANEL_MAX)
    cm = matplotlib.colormaps[cmap]
    head_rows, ncols = _head_layout(heads)
    panels, titles, labels = [], [], []
    for hr in range(head_rows):
        for k in range(kinds):
            for h in range(hr * ncols, (hr + 1) * ncols):
                if h < heads:
                    panels.append(_outline_patch(_blend(photo, stacked[k, h], cm, norm, alpha), p, (gh, gw)))
                    titles.append(f"head {h}")
                else:
                    panels.append(None)
                    titles.append("")
            labels.append(row_labels[k])
    return _compose(panels, titles, ncols=ncols, title=title, cmap=cmap, norm=norm, colorbar_label=colorbar_label,
                    row_labels=labels)


def attention_overlays(
    image: Image.Image | np.ndarray,
    attn_row_per_head: Array,
    patch: Sequence[int],
    *,
    title: str | None = None,
    attn_no_pos: Array | None = None,
    prefix_attn: Array | None = None,
    shared_scale: bool = False,
    no_pos_label: str = "without the position term",
    cmap: str = "inferno",
    alpha: float = 0.8,
) -> Sheet:
    """Every head's attention from the clicked patch overlaid on the photo, optionally beside the same without position.

    By default each head is scaled to its own maximum (heads differ widely in how peaked they are) and its title
    gives that maximum; with ``attn_no_pos`` a second row per head row shows attention with the position term left
    out, on the same scale as the head above it.

    Args:
        image: the photo the model saw.
        attn_row_per_head: (heads, gh, gw) attention probabilities from the query to the patch keys; NaN where the
            query cannot attend (outside its window or masked).
        patch: the query ``(row, col)``, outlined.
        title: sheet title; default names the patch.
        attn_no_pos: optional (heads, gh, gw) attention without the position term.
        prefix_attn: optional (heads,) or (heads, P) attention to prefix tokens (cls, dist), printed in titles.
        shared_scale: one scale for all heads instead of one per head.
        no_pos_label: row label for ``attn_no_pos``.
        cmap: colormap name.
        alpha: weight of the colour over the photo at the head's maximum (it falls with the value).

    Returns:
        A :class:`Sheet` with one panel per head (two with ``attn_no_pos``), at most 6 per row, and one colour bar;
        with ``attn_no_pos`` the rows alternate "with position" and ``no_pos_label`` and are headed so.
    """
    attn = _heads_maps(attn_row_per_head, "attn_row_per_head")
    heads, gh, gw = attn.shape
    p = _check_patch(patch, (gh, gw))
    rows = [attn]
    if attn_no_pos is not None:
        no_pos = _heads_maps(attn_no_pos, "attn_no_pos")
        if no_pos.shape != attn.shape:
            raise ValueError(f"attn_no_pos must match attn_row_per_head {attn.shape}, got {no_pos.shape}")
        rows.append(no_pos)
    stacked = np.stack(rows)  # R, heads, gh, gw
    finite = np.where(np.isfinite(stacked), stacked, 0.0)  # R, heads, gh, gw
    scale = np.full(heads, finite.max()) if shared_scale else finite.max(axis=(0, 2, 3))  # heads
    scale = np.where(scale > 0, scale, 1.0)  # heads
    notes = [""] * heads
    if prefix_attn is not None:
        pa = _to_numpy(prefix_attn, "prefix_attn")
        if pa.shape[0] != heads or pa.ndim > 2:
            raise ValueError(f"prefix_attn must be (heads,) or (heads, P) with heads = {heads}, got {pa.shape}")
        pa = pa.reshape(heads, -1).sum(axis=-1)  # heads
        notes = [f"\n\u2192prefix {format_number(float(v))}" for v in pa]
    if shared_scale:
        norm, label = Normalize(0.0, float(scale[0])), "attention weight"
        head_titles = [f"head {h}{notes[h]}" for h in range(heads)]
    else:
        norm, label = Normalize(0.0, 1.0), "attention \u00f7 head max"
        head_titles = [f"head {h} (max {format_number(float(scale[h]))}){notes[h]}" for h in range(heads)]
        stacked = stacked / scale[None, :, None, None]  # R, heads, gh, gw
    photo = _photo_image(image, (gh, gw), _PANEL_MIN, _PANEL_MAX)
    cm = matplotlib.colormaps[cmap]
    head_rows, ncols = _head_layout(heads)
    panels, titles, row_labels = [], [], []
    for hr in range(head_rows):
        chunk = range(hr * ncols, min(heads, (hr + 1) * ncols))
        for k, label_row in enumerate(("with position", no_pos_label)[: len(rows)]):
            for h in range(hr * ncols, (hr + 1) * ncols):
                if h in chunk:
                    blended = _blend(photo, stacked[k, h], cm, norm, alpha, alpha_by_value=True)
                    panels.append(_outline_patch(blended, p, (gh, gw)))
                    titles.append(head_titles[h] if k == 0 else f"head {h}, no position")
                else:
                    panels.append(None)
                    titles.append("")
            row_labels.append(label_row)
    return _compose(
        panels, titles, ncols=ncols, title=title or f"Attention from patch {p}", cmap=cmap, norm=norm,
        colorbar_label=label, row_labels=row_labels if len(rows) > 1 else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Export


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a view as PNG with light compression (views are flat colour: level 1 is several times faster than
    the default 6 and the files stay small)."""
    path = Path(path)
    image.save(path, format="PNG", compress_level=1)
    return path


def save_npz(path: str | Path, **arrays: Array | None) -> Path:
    """Save raw tensors / arrays as numpy arrays in a compressed ``.npz``; None values are skipped.

    Args:
        path: output file; ``.npz`` is appended by numpy when missing.
        **arrays: name -> array or tensor of any shape (low-precision floats are widened to float32).

    Returns:
        The path written.
    """
    out = {}
    for name, value in arrays.items():
        if value is None:
            logger.debug("save_npz: skipping %s (None)", name)
            continue
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            out[name] = t.numpy()
        else:
            out[name] = np.asarray(value)
    if not out:
        raise ValueError("save_npz got no arrays to save; pass name=array keyword arguments")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    np.savez_compressed(path, **out)
    return path
