"""A learned attention bias per head and absolute offset (|dy|, |dx|) between query and key: LeViT, TinyViT."""

from __future__ import annotations

import numpy as np
import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable, describe_block, query_row


def signed_offset_table(table: torch.Tensor) -> torch.Tensor:
    """Unfold a table by absolute offset onto signed offsets, where its symmetry shows.

    Args:
        table: (heads, h, w), entry [k, |dy|, |dx|].

    Returns:
        ((2h-1)(2w-1), heads), row ``(dy + h-1) * (2w-1) + (dx + w-1)``: the layout of a Swin/BEiT table.
    """
    heads, h, w = table.shape
    dy = torch.arange(-(h - 1), h).abs()  # 2h-1
    dx = torch.arange(-(w - 1), w).abs()  # 2w-1
    full = table[:, dy[:, None], dx[None, :]]  # heads, 2h-1, 2w-1
    return full.reshape(heads, -1).T  # (2h-1)(2w-1), heads


def _trace(seen: Seen, block: int):
    trace = seen.inspection.blocks[block]
    if "offset_bias_table" not in trace.position:
        raise ViewUnavailable(f"block {block} of {seen.name} added no offset bias in this inspection (position left out?)")
    return trace


def bias_table(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's bias by offset, unfolded onto signed offsets so its mirror symmetry shows, as the block used it."""
    trace = _trace(seen, block)
    table = trace.position["offset_bias_table"].detach().float()  # heads, h, w
    span = tuple(table.shape[1:])
    sheet = viz.bias_table_heatmaps(
        signed_offset_table(table), span,
        title=f"{seen.name}: attention bias by offset, learned for |\u0394y|, |\u0394x| only (so mirrored)\n"
              f"{describe_block(seen, block)}",
    )  # fmt: skip
    return View(sheet.image, {"offset_bias_table": table.numpy(), "offset_bias_span": np.array(span)})


def query_bias(seen: Seen, block: int, patch: Patch) -> View:
    """The bias the clicked query adds to every key it attends to, drawn where the keys lie."""
    trace = _trace(seen, block)
    with torch.inference_mode():
        rows, _, query = query_row(seen, block, trace.pos_bias, patch)  # heads, hk, wk
    block_patch = query.patch
    sheet = viz.query_bias_overlays(
        seen.photo, rows, block_patch,
        title=f"{seen.name}: bias from {query.describe()} to the keys it attends to\n"
              f"{describe_block(seen, block)}",
    )  # fmt: skip
    return View(sheet.image, {"query_bias": rows, "block_grid": np.array(trace.tokens().key_grid),
                              "block_patch": np.array(block_patch)})


MECHANISMS = (
    Mechanism(
        "offset_bias",
        "attention bias by absolute offset",
        "a learned bias per head and absolute offset (|\u0394y|, |\u0394x|) added to the attention logits (LeViT, TinyViT).",
        "relative",
        "The learned bias added to the attention logits depends only on the absolute offset between query and key, "
        "(|\u0394y|, |\u0394x|), one value per head. Drawn over signed offsets like a Swin table, it is mirrored "
        "left-right and up-down; the outlined cell is offset 0. Below: the bias the clicked patch adds to every key "
        "it attends to (its window for TinyViT, the stage grid for LeViT). At another input size the tables are "
        "resized to the stage grid (LeViT) as the model used them.",
        {
            "offset_bias_table": "BlockTrace.position: (heads, h, w) bias by absolute offset, entry [k, |dy|, |dx|]",
            "pos_bias": "BlockTrace.pos_bias: (heads, N, N) the table gathered for every query and key",
        },
        (
            ViewSpec("offset_bias_table", "Bias by offset per head", bias_table, per_block=True),
            ViewSpec("offset_query_bias", "Bias of the clicked query", query_bias, per_block=True, compare=True),
        ),
    ),
)
