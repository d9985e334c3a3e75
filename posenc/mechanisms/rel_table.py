"""A learned relative position bias table, gathered through the relative index: BEiT (global, with cls entries), Swin (windows)."""

from __future__ import annotations

import numpy as np
import torch

from posenc import viz
from posenc.attention import Attention
from posenc.encodings import resize_rel_pos_bias_table
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable, describe_block, query_row


def _attention_module(seen: Seen, block: int) -> Attention:
    """The chosen block's attention module, in the order of ``Inspection.blocks`` (stages in order)."""
    model = seen.loaded.model
    if hasattr(model, "layers"):
        found = [b.attn for layer in model.layers for b in layer.blocks]
    else:
        found = [b.attn for b in model.blocks]
    attn = found[block]
    if getattr(attn, "relative_position_bias_table", None) is None:
        raise ViewUnavailable(f"block {block} of {seen.name} learns no relative position bias table")
    return attn


def bias_table(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's table by offset (query minus key), as the block used it.

    A global table (BEiT) at another grid is the one the model used there: resized bicubically from the trained
    one to the block's key grid; a window's table is fixed.
    """
    trace = seen.inspection.blocks[block]
    attn = _attention_module(seen, block)
    layout = trace.tokens()
    span = layout.window or layout.key_grid  # what the queries attend over: their window or the whole grid
    with torch.inference_mode():
        table, window = attn.relative_position_bias_table, attn.rel_pos_window  # R, heads
        if tuple(span) != tuple(window):
            table = resize_rel_pos_bias_table(table, span, window, attn.rel_pos_cls)  # R', heads
            window = tuple(span)
        table = table.detach().float().cpu()
        sheet = viz.bias_table_heatmaps(table, window, cls_entries=attn.rel_pos_cls,
                                        title=f"{seen.name}: relative position bias table\n"
                                              f"{describe_block(seen, block)}")  # fmt: skip
    return View(sheet.image, {"bias_table": table.numpy(), "bias_window": np.array(window)})


def query_bias(seen: Seen, block: int, patch: Patch) -> View:
    """The bias the clicked query adds to every key it attends to, on the photo.

    In windows the clicked patch is mapped to the block's stage grid and only the keys of its (shifted) window are
    coloured, keys of other shift regions masked.
    """
    trace = seen.inspection.blocks[block]
    if trace.pos_bias is None:
        raise ViewUnavailable(f"block {block} of {seen.name} added no relative bias in this inspection "
                              "(position left out?)")
    rows, prefix, query = query_row(seen, block, trace.pos_bias, patch)  # heads, hk, wk
    with torch.inference_mode():
        sheet = viz.query_bias_overlays(
            seen.photo, rows, query.patch, cls_bias=None if prefix is None else prefix[:, 0],
            title=f"{seen.name}: bias from {query.describe()} to the keys it attends to\n"
                  f"{describe_block(seen, block)}")  # fmt: skip
    arrays = {"query_bias": rows, "block_grid": np.array(trace.tokens().key_grid), "block_patch": np.array(query.patch)}
    if prefix is not None:
        arrays["query_bias_to_prefix"] = prefix
    return View(sheet.image, arrays)


MECHANISMS = (
    Mechanism(
        "rel_table",
        "learned relative position bias table",
        "a learned relative position bias added to the attention logits, looked up by offset (BEiT, Swin).",
        "relative",
        "The learned bias added to the attention logits, by offset (query minus key), for every head of the chosen "
        "block; the outlined cell is offset 0. Below: the bias the clicked patch adds to every key it can attend to. "
        "In Swin that is the (shifted) window holding the patch on the block's stage grid; keys from another shift "
        "region are masked (dimmed).",
        {"pos_bias": "BlockTrace.pos_bias: (heads, N, N) bias added to the logits (per window for Swin)"},
        (
            ViewSpec("bias_table", "Bias table per head", bias_table, per_block=True),
            ViewSpec("query_bias", "Bias of the clicked query", query_bias, per_block=True, compare=True),
        ),
    ),
)
