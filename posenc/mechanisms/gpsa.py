"""ConViT's gated positional self-attention (GPSA): each head blends a positional attention, a learned function
of the offset to every key, with its content attention, through a learned gate."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable, query_row


def _gpsa_blocks(seen: Seen) -> list[int]:
    return [i for i, trace in enumerate(seen.inspection.blocks) if "gpsa_gate" in trace.position]


def _require_gpsa(seen: Seen, block: int) -> None:
    blocks = _gpsa_blocks(seen)
    if not blocks:
        raise ViewUnavailable(f"{seen.name} has no gated positional attention in this inspection (position left out?)")
    if block not in blocks:
        raise ViewUnavailable(
            f"block {block} of {seen.name} is a plain attention block; its GPSA blocks are {blocks[0]}..{blocks[-1]}"
        )


def gates(seen: Seen, block: int, patch: Patch) -> View:
    """Every GPSA block's gates, one column per block and one row per head: the share of positional attention."""
    blocks = _gpsa_blocks(seen)
    if not blocks:
        raise ViewUnavailable(f"{seen.name} has no gated positional attention in this inspection (position left out?)")
    table = np.stack([seen.inspection.blocks[i].position["gpsa_gate"].float().numpy() for i in blocks])  # blocks, heads
    chosen = ""
    if block in blocks:
        values = ", ".join(f"h{h} {g:.2f}" for h, g in enumerate(table[blocks.index(block)]))
        chosen = f"\nblock {block} (outlined at head 0): {values}"
    cell = max(24, 560 // max(table.shape))  # square cells, about 560 pixels wide
    canvas = Image.new("RGB", (table.shape[0] * cell, table.shape[1] * cell), (255, 255, 255))
    img = viz.overlay(
        canvas, table.T, alpha=1.0, cmap="magma", vmin=0.0, vmax=1.0, mark=(0, blocks.index(block)) if block in blocks else None,
        title=f"{seen.name}: GPSA gates sigmoid(gating_param)\ncolumns = blocks {blocks[0]}..{blocks[-1]}, "
              f"rows = heads 0..{table.shape[1] - 1}{chosen}",
        colorbar_label="share of positional attention (0: content only, 1: position only)",
    )  # fmt: skip
    return View(img, {"gpsa_gates": table, "gpsa_blocks": np.array(blocks)})


def positional_attention(seen: Seen, block: int, patch: Patch) -> View:
    """Each head's positional attention from the clicked patch (a function of the offset alone), on the photo."""
    _require_gpsa(seen, block)
    trace = seen.inspection.blocks[block]
    gate = trace.position["gpsa_gate"].float()  # heads
    with torch.inference_mode():
        rows, _, query = query_row(seen, block, trace.position["gpsa_pos_attn"], patch)  # heads, hk, wk
    gates_text = ", ".join(f"h{h} {g:.2f}" for h, g in enumerate(gate.tolist()))
    sheet = viz.attention_overlays(
        seen.photo, rows, query.patch,
        title=f"{seen.name}: positional attention from {query.describe()}, block {block}\n"
              f"the head mixes it in with its gate: {gates_text}",
    )  # fmt: skip
    return View(sheet.image, {"gpsa_pos_attention": rows, "gpsa_gate": gate.numpy()})


MECHANISMS = (
    Mechanism(
        "gpsa",
        "gated positional self-attention (ConViT)",
        "each head of the first blocks mixes a learned attention by offset with its content attention through a gate.",
        "relative",
        "ConViT's first blocks use gated positional self-attention: each head computes a positional attention from "
        "the offsets (dx, dy, dx\u00b2 + dy\u00b2) to every key, a learned linear function of them put through a "
        "softmax, and blends it with its content attention: (1 \u2212 g) \u00b7 content + g \u00b7 positional, with "
        "the gate g = sigmoid(gating_param). The table shows every GPSA block's gates (the chosen block outlined); "
        "below, each head's positional attention from the clicked patch. 'Without position' is the content "
        "attention alone.",
        {
            "gpsa_gate": "BlockTrace.position: (heads,) gate sigmoid(gating_param), the positional share",
            "gpsa_pos_attn": "BlockTrace.position: (heads, N, N) positional attention over the patch grid",
        },
        (
            ViewSpec("gpsa_gates", "Gate per block and head", gates, per_block=True),
            ViewSpec("gpsa_pos_attention", "Positional attention of the clicked patch", positional_attention,
                     per_block=True, compare=True),
        ),
    ),
)
