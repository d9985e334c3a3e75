"""Continuous position bias (Swin V2): an MLP maps log-spaced window offsets to a bias per head, with cosine attention.

The table is computed, not learned, so it exists for any window: the views show the table the block used for its
window at this input size, the MLP over a wider span than the window (the extrapolation a continuous bias allows),
each head's cosine-attention temperature, and the clicked query's bias over the photo.
"""

from __future__ import annotations

import numpy as np
import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable, describe_block, query_row


def _position(seen: Seen, block: int, key: str) -> torch.Tensor:
    """A tensor the block's continuous position bias used, or ViewUnavailable naming what is missing."""
    found = seen.inspection.blocks[block].position.get(key)
    if found is None:
        raise ViewUnavailable(
            f"{seen.name} has no continuous position bias ({key}) in block {block}; pick a Swin V2 model "
            "(or an inspection made with the position term)"
        )
    return found.detach().float()


def _heatmaps(values: torch.Tensor, window: tuple[int, int], title: str, outline: tuple[int, int] | None = None) -> viz.Sheet:
    """(2Wh-1, 2Ww-1, heads) -> one heatmap per head, symmetric about 0 only when the bias takes both signs."""
    table = values.reshape(-1, values.shape[-1])  # R, heads
    return viz.bias_table_heatmaps(table, window, title=title, outline=outline, symmetric=bool((table < 0).any()))


def bias_table(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's bias by offset, as the MLP computed it for the block's window at this input size."""
    table = _position(seen, block, "cpb_table")  # 2Wh-1, 2Ww-1, heads
    window = ((table.shape[0] + 1) // 2, (table.shape[1] + 1) // 2)
    trained = tuple(int(v) for v in _position(seen, block, "cpb_trained_window").tolist())
    note = "" if window == trained else f" (computed afresh: the checkpoint's window is {trained[0]}x{trained[1]})"
    sheet = _heatmaps(table, window, f"{seen.name}: continuous position bias, {window[0]}x{window[1]} window{note}\n"
                                     f"{describe_block(seen, block)}")  # fmt: skip
    return View(sheet.image, {"cpb_table": table.numpy(), "cpb_window": np.array(window),
                              "cpb_coords": _position(seen, block, "cpb_coords").numpy()})  # fmt: skip


def extrapolation(seen: Seen, block: int, patch: Patch) -> View:
    """The MLP over twice the window's span of offsets, the trained window outlined: what it extrapolates to."""
    wide = _position(seen, block, "cpb_wide")  # 2Sh-1, 2Sw-1, heads
    span = ((wide.shape[0] + 1) // 2, (wide.shape[1] + 1) // 2)
    trained = tuple(int(v) for v in _position(seen, block, "cpb_trained_window").tolist())
    sheet = _heatmaps(wide, span, f"{seen.name}: the bias MLP over offsets up to \u00b1{span[0] - 1}x\u00b1{span[1] - 1}, "
                                  f"beyond the trained {trained[0]}x{trained[1]} window (outlined)\n"
                                  f"{describe_block(seen, block)}", outline=trained)  # fmt: skip
    return View(sheet.image, {"cpb_wide": wide.numpy(), "cpb_wide_span": np.array(span),
                              "cpb_trained_window": np.array(trained)})  # fmt: skip


def temperature(seen: Seen, block: int, patch: Patch) -> View:
    """Each head's cosine-attention temperature ``exp(min(logit_scale, log 100))``."""
    values = _position(seen, block, "cpb_temperature")  # heads
    sheet = viz.head_values(values, title=f"{seen.name}: cosine-attention temperature per head\n"
                                          f"{describe_block(seen, block)}",
                            colorbar_label="logits = temperature \u00d7 cos(q, k) + bias (at most 100)")  # fmt: skip
    return View(sheet.image, {"cpb_temperature": values.numpy()})


def query_bias(seen: Seen, block: int, patch: Patch) -> View:
    """The bias the clicked query adds to every key of its (shifted) window, on the photo."""
    trace = seen.inspection.blocks[block]
    if trace.pos_bias is None or "cpb_table" not in trace.position:
        _position(seen, block, "cpb_table")  # raises the ViewUnavailable
    rows, _, query = query_row(seen, block, trace.pos_bias, patch)  # heads, hk, wk
    block_patch = query.patch
    sheet = viz.query_bias_overlays(
        seen.photo, rows, block_patch, symmetric=bool(np.nanmin(rows) < 0),
        title=f"{seen.name}: continuous bias from {query.describe()} to the keys it attends to\n"
              f"{describe_block(seen, block)}")  # fmt: skip
    return View(sheet.image, {"query_bias": rows, "block_grid": np.array(trace.tokens().key_grid),
                              "block_patch": np.array(block_patch)})


MECHANISMS = (
    Mechanism(
        "cpb",
        "continuous position bias (Swin V2)",
        "a relative bias per head that a small MLP computes from log-spaced window offsets, with cosine attention "
        "(Swin V2).",
        "relative",
        "Swin V2 computes its relative bias with a small MLP over log-spaced offsets (query minus key) instead of "
        "learning a table, so it exists for any window. Shown for the chosen block: the table the MLP produced for "
        "the window used at this input size (recomputed when the size changes the window); the MLP over twice that "
        "span with the trained window outlined (extrapolation); each head's cosine-attention temperature; and the "
        "bias the clicked patch adds to the keys of its (shifted) window.",
        {
            "cpb_table": "BlockTrace.position: (2Wh-1, 2Ww-1, heads) bias per offset as used (16*sigmoid(MLP) in Swin V2)",
            "cpb_coords": "BlockTrace.position: (2Wh-1, 2Ww-1, 2) log-spaced offsets the MLP read",
            "cpb_wide": "BlockTrace.position: (2Sh-1, 2Sw-1, heads) the MLP over twice the window's span",
            "cpb_trained_window": "BlockTrace.position: (2,) the block's window in the checkpoint",
            "cpb_temperature": "BlockTrace.position: (heads,) exp(min(logit_scale, log 100))",
            "pos_bias": "BlockTrace.pos_bias: (heads, N, N) bias added to the logits of every window",
        },
        (
            ViewSpec("cpb_table", "Bias table per head (computed)", bias_table, per_block=True),
            ViewSpec("cpb_extrapolation", "Bias MLP beyond the window", extrapolation, per_block=True),
            ViewSpec("cpb_temperature", "Cosine-attention temperature per head", temperature, per_block=True),
            ViewSpec("cpb_query_bias", "Bias of the clicked query", query_bias, per_block=True, compare=True),
        ),
    ),
)
