"""NaFlex position: a learned embedding resampled per image to the patch grid of its own aspect ratio, and the
factorised embedding (a row table plus a column table) that NaViT and NaFlexViT can use instead of a 2D table.

Two mechanisms, each drawn from tensors the model put into its inspection:

* ``factorized``: ``Inspection.pos_embed`` (the sum as added) and the row and column tables as used at this
  grid (``position["pos_embed_rows"]``, ``position["pos_embed_cols"]``);
* ``aspect_resample``: the embedding as added at this grid beside the same embedding resampled for the square
  grid of the input's longer side (``position["pos_embed_square"]``). Whether the non-square one is the square
  one squeezed (plain resize) or its top-left crop (aspect-ratio preserving) is then plain to see.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.mechanisms.absolute import pca, similarity_grid, similarity_to_patch
from posenc.views import OVERLAY_SIDE, Patch, Seen, View, ViewUnavailable


def _tensor(seen: Seen, key: str, what: str) -> torch.Tensor:
    """A model-level position tensor of the inspection, or :class:`ViewUnavailable` naming what is missing."""
    value = seen.inspection.position.get(key)
    if value is None:
        raise ViewUnavailable(f"{seen.name} has no {what}; pick a NaFlexViT model")
    return value.detach().float().cpu()


def _arrange(rows: list[list[Image.Image]], gap: int = 12) -> Image.Image:
    """Rows of images on white, each row centred, tops aligned within a row."""
    widths = [sum(im.width for im in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(im.height for im in row) for row in rows]
    out = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for row, width, height in zip(rows, widths, heights):
        x = (out.width - width) // 2
        for im in row:
            out.paste(im, (x, y))
            x += im.width + gap
        y += height + gap
    return out


def square_vs_aspect(seen: Seen, block: int, patch: Patch) -> View:
    """The embedding for the square grid of the longer side beside the one as added at this aspect ratio.

    Both are coloured by the same three principal components (fitted to both at once), so equal colours mean equal
    embeddings; below, the clicked patch's embedding compared with every entry of the square one.
    """
    if seen.inspection.pos_embed is None:
        raise ViewUnavailable(f"{seen.name} ran without a position embedding; pick a NaFlexViT model")
    here = seen.inspection.pos_embed[0, seen.inspection.pos_embed_prefix :].detach().float().cpu()  # h*w, C
    square = _tensor(seen, "pos_embed_square", "square-grid embedding")[0]  # L*L, C
    (gh, gw), side = seen.grid, math.isqrt(square.shape[0])
    both = viz.pos_embed_pca_rgb(torch.cat([square, here]), (side * side + gh * gw, 1))[:, 0]  # L*L + h*w, 3
    rgb_square = both[: side * side].reshape(side, side, 3)  # L, L, 3
    rgb_here = both[side * side :].reshape(gh, gw, 3)  # h, w, 3
    r, c = patch
    sims = (F.normalize(square, dim=-1) @ F.normalize(here[r * gw + c], dim=-1)).reshape(side, side).numpy()  # L, L
    px = max(OVERLAY_SIDE // max(gh, gw), 1) * max(gh, gw)
    panels = [
        viz.overlay(None, rgb_square, title=f"square {side}x{side} grid", min_side=px, max_side=px),
        viz.overlay(seen.photo, rgb_here, alpha=0.75, mark=patch, title=f"this input, {gh}x{gw} grid",
                    min_side=px, max_side=px),
        viz.overlay(None, sims, vmax=1.0, title=f"patch {patch} vs the square grid",
                    colorbar_label="cosine similarity", min_side=px, max_side=px),
    ]  # fmt: skip
    return View(_arrange([panels[:2], panels[2:]]), {
        "pos_embed_square": square.numpy(), "pos_embed": here.numpy(), "pca_rgb_square": rgb_square,
        "pca_rgb": rgb_here, "similarity_to_square": sims,
    })  # fmt: skip


def rows_and_columns(seen: Seen, block: int, patch: Patch) -> View:
    """Cosine similarity between every pair of rows, and of columns, of the factorised tables as used here."""
    rows = F.normalize(_tensor(seen, "pos_embed_rows", "factorised row table"), dim=-1)  # h, C
    cols = F.normalize(_tensor(seen, "pos_embed_cols", "factorised column table"), dim=-1)  # w, C
    n = max(rows.shape[0], cols.shape[0])
    mats = np.full((2, n, n), np.nan, dtype=np.float32)
    mats[0, : rows.shape[0], : rows.shape[0]] = (rows @ rows.T).numpy()  # h, h
    mats[1, : cols.shape[0], : cols.shape[0]] = (cols @ cols.T).numpy()  # w, w
    sheet = viz.matrix_heatmaps(
        mats, [f"rows ({rows.shape[0]})", f"columns ({cols.shape[0]})"], title=f"{seen.name}: factorised tables",
        colorbar_label="cosine similarity", footer="entry (i, j): similarity of row (column) i to row (column) j",
        cmap="viridis",
    )  # fmt: skip
    return View(sheet.image, {"row_similarity": mats[0], "column_similarity": mats[1]})


_SUM_HELP = (
    "Position (i, j) gets row[i] + column[j]: a row table and a column table, each resized linearly to this "
    "grid. The similarity grid, the clicked patch's similarity and the PCA are drawn from that sum as added; "
    "the last view compares the rows with each other and the columns with each other."
)
_ASPECT_HELP = (
    "NaFlex resamples its position table for each image's own grid. Left: the embedding for the square grid of "
    "the longer side; right: as added at this input's grid, coloured by the same principal components; below: the "
    "clicked patch's embedding against every entry of the square one. A plain resize squeezes the square table to "
    "the aspect ratio; an aspect-preserving one (timm's *par* models, RADIO) keeps its top-left part."
)

MECHANISMS = (
    Mechanism(
        "factorized", "factorised embedding (rows + columns)",
        "a learned row table plus a learned column table, resized per image and added to the patch tokens (NaViT).",
        "absolute", _SUM_HELP,
        {
            "pos_embed": "Inspection.pos_embed: (1, h*w, C) row + column sums as added at this grid",
            "pos_embed_rows": "Inspection.position: (h, C) row table as resized for this grid",
            "pos_embed_cols": "Inspection.position: (w, C) column table as resized for this grid",
        },
        (
            ViewSpec("similarity_grid", "Similarity of position embeddings", similarity_grid),
            ViewSpec("similarity", "Similarity to the clicked patch", similarity_to_patch, compare=True),
            ViewSpec("pca", "PCA of the embeddings", pca),
            ViewSpec("rows_columns", "Row and column tables", rows_and_columns),
        ),
    ),
    Mechanism(
        "aspect_resample", "resampled per aspect ratio (NaFlex)",
        "the position embedding is resampled per image to the patch grid of its own aspect ratio.",
        "absolute", _ASPECT_HELP,
        {
            "pos_embed": "Inspection.pos_embed: (1, h*w, C) as added at this grid",
            "pos_embed_square": "Inspection.position: (1, L*L, C) the same rule at the square grid, L = max(h, w)",
        },
        (ViewSpec("aspect", "Square grid vs this aspect ratio", square_vs_aspect),),
    ),
)  # fmt: skip
