"""A decomposed relative bias that depends on the query's content: SAM's image encoder, ViTDet (MViTv2's rule).

``bias[q, k] = q . R_h[row(q) - row(k)] + q . R_w[col(q) - col(k)]``: each block learns one table of offset
embeddings per axis and the query's dot product with them is added to the logits. Unlike a bias table it differs
from image to image, so every view here is computed for the clicked query of *this* image, from the two factors
the block used (``BlockTrace.position["rel_h"]`` and ``["rel_w"]``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.queries import Query, key_values
from posenc.views import Patch, Seen, View, ViewUnavailable, block_query, describe_block

_DEPENDS = "computed from this query's content: it changes with the image"


def query_factors(seen: Seen, block: int, patch: Patch) -> tuple[np.ndarray, np.ndarray, Query]:
    """The clicked query's row and column terms over the keys it attends to, on the block's grid.

    Returns:
        (heads, gh, gw) row term ``q . R_h[row offset]`` and column term ``q . R_w[column offset]`` (NaN for keys
        outside the query's window), and the clicked patch's query in the block (:class:`~posenc.queries.Query`).
    """
    trace = seen.inspection.blocks[block]
    if "rel_h" not in trace.position:
        raise ViewUnavailable(
            f"{seen.name} block {block} adds no decomposed relative bias (none in this model, or position terms off); "
            "pick a SAM or ViTDet model with relative positions")
    rel_h, rel_w = trace.position["rel_h"][0].float(), trace.position["rel_w"][0].float()  # [nW,] heads, N, kh / kw
    query = block_query(seen, block, patch)
    layout = trace.tokens()
    if not layout.window_axis:  # global attention: one group
        rel_h, rel_w = rel_h[None], rel_w[None]  # 1, heads, N, kh / kw
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    rows = torch.arange(kh).repeat_interleave(kw)  # kh*kw: each key slot's row inside the attended map
    cols = torch.arange(kw).repeat(kh)  # kh*kw
    # the factors cover patch queries and patch keys only: prefix tokens (MViTv2's cls) get no bias
    slot = query.slot - len(layout.query_prefix)
    fh = rel_h[query.group, :, slot]  # heads, kh
    fw = rel_w[query.group, :, slot]  # heads, kw
    no_bias = fh.new_zeros(fh.shape[0], len(layout.key_prefix))  # heads, Pk
    row_term, _ = key_values(layout, query.group, torch.cat([no_bias, fh[:, rows]], dim=-1))  # heads, hk, wk
    col_term, _ = key_values(layout, query.group, torch.cat([no_bias, fw[:, cols]], dim=-1))  # heads, hk, wk
    return row_term, col_term, query


def query_bias(seen: Seen, block: int, patch: Patch) -> View:
    """Each head's decomposed bias from the clicked query to every key it attends to, on the photo."""
    row_term, col_term, query = query_factors(seen, block, patch)
    bias = row_term + col_term  # heads, gh, gw
    sheet = viz.query_bias_overlays(
        seen.photo, bias, query.patch,
        title=f"{seen.name}: decomposed bias from {query.describe()} to the keys it attends to ({_DEPENDS})\n"
              f"{describe_block(seen, block)}")  # fmt: skip
    return View(sheet.image, {"decomposed_bias": bias, "block_patch": np.array(query.patch)})


def factors(seen: Seen, block: int, patch: Patch) -> View:
    """The two terms of the clicked query's bias: along rows (``q . R_h``) and along columns (``q . R_w``)."""
    row_term, col_term, query = query_factors(seen, block, patch)
    sheet = viz.signed_head_overlays(
        seen.photo, np.stack([row_term, col_term]), query.patch,
        row_labels=("row term q\u00b7R_h[\u0394row]", "column term q\u00b7R_w[\u0394col]"),
        title=f"{seen.name}: the two factors of the bias from {query.describe()} ({_DEPENDS})\n"
              f"{describe_block(seen, block)}",
        colorbar_label="added to the attention logits (their sum is the bias)")  # fmt: skip
    return View(sheet.image, {"bias_row_term": row_term, "bias_column_term": col_term})


def stage_biases(seen: Seen, block: int, patch: Patch) -> View:
    """The clicked query's bias over the (pooled) key grid of every stage, one sheet per stage (its first block;
    a single-stage model such as SAM gives one sheet).

    Raises:
        ViewUnavailable: no block added a decomposed bias (position terms left out).
    """
    firsts = {}
    for i, trace in enumerate(seen.inspection.blocks):
        if "rel_h" in trace.position:
            firsts.setdefault(trace.stage, i)
    if not firsts:
        raise ViewUnavailable(f"{seen.name} added no decomposed relative bias in this inspection (position terms "
                              "off, or none in this model)")  # fmt: skip
    sheets, arrays = [], {}
    for stage, i in firsts.items():
        row_term, col_term, query = query_factors(seen, i, patch)
        bias = row_term + col_term  # heads, kh, kw
        layout = seen.inspection.blocks[i].tokens()
        (qh, qw), (kh, kw) = layout.query_grid, layout.key_grid
        title = (f"{seen.name}, stage {stage} (block {i}): decomposed bias from input patch {tuple(patch)} "
                 f"({_DEPENDS})\n{qh}x{qw} queries over {kh}x{kw} pooled keys; the query is outlined at its "
                 "nearest key")  # fmt: skip
        sheets.append(viz.query_bias_overlays(seen.photo, bias, query.patch, title=title).image)
        arrays[f"stage{stage}_decomposed_bias"] = bias
    out = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), (255, 255, 255))
    y = 0
    for sheet in sheets:  # left-aligned: the app's scrolling box shows the left of a wide sheet first
        out.paste(sheet, (0, y))
        y += sheet.height
    return View(out, arrays)


MECHANISMS = (
    Mechanism(
        "decomposed",
        "decomposed relative bias (query-dependent)",
        "a relative bias computed from each query's content and two learned tables of row and column offsets "
        "(SAM, ViTDet, MViTv2).",
        "relative",
        "The bias is q\u00b7R_h[\u0394row] + q\u00b7R_w[\u0394col]: the query's dot product with learned embeddings "
        "of the row and column offsets. It depends on the image, so it is drawn for the clicked patch of this "
        "image, per head, over the keys it attends to (its window in windowed blocks; the grid is padded at the "
        "bottom and right to whole windows and the padded keys are not drawn). Below: its two terms, along rows "
        "and along columns. Where keys are pooled (MViTv2), the bias is drawn on the pooled key grid, the query "
        "outlined at its nearest key; the last view shows it for the first block of every stage.",
        {
            "rel_h": "BlockTrace.position: (B, [nW,] heads, Nq, kh) each patch query's dot product with its row "
                     "offsets to the kh key rows (kh = h unless keys are pooled; prefix tokens get no bias)",
            "rel_w": "BlockTrace.position: (B, [nW,] heads, Nq, kw) each query's dot product with its column offsets",
            "rel_pos_h": "BlockTrace.position: (h, kh, head_dim) the row offset embeddings used (resized table)",
            "rel_pos_w": "BlockTrace.position: (w, kw, head_dim) the column offset embeddings used",
        },
        (
            ViewSpec("decomposed_bias", "Decomposed bias of the clicked query (depends on the image)", query_bias,
                     per_block=True, compare=True),
            ViewSpec("decomposed_factors", "Its row and column terms (depend on the image)", factors, per_block=True),
            ViewSpec("decomposed_stages", "The bias on each stage's pooled key grid (depends on the image)",
                     stage_biases),
        ),
    ),
)
