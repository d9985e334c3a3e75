"""A late class token (CaiT): the cls token carries no position and joins only in the class-attention blocks, where
its one query reads the patches, which carry the position embedding. Its attention per head shows where it reads."""

from __future__ import annotations

import numpy as np
import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable


def class_attention_blocks(seen: Seen) -> list[int]:
    """Blocks whose only query is the cls token: attention (B, heads, 1, 1 + h*w), key 0 the cls token."""
    gh, gw = seen.grid
    return [i for i, t in enumerate(seen.inspection.blocks) if tuple(t.attn.shape[-2:]) == (1, 1 + gh * gw)]


def class_attention(seen: Seen, block: int, patch: Patch) -> View:
    """Each head's attention from the cls token over the patches in a class-attention block, on the photo.

    The chosen block when it is a class-attention block, else the last one (the one the classifier reads).
    """
    blocks = class_attention_blocks(seen)
    if not blocks:
        raise ViewUnavailable(f"{seen.name} has no class-attention blocks (a cls token that joins late)")
    shown = block if block in blocks else blocks[-1]
    gh, gw = seen.grid
    attn = seen.inspection.blocks[shown].attn[0, :, 0].float()  # heads, 1 + h*w
    with torch.inference_mode():
        rows = attn[:, 1:].reshape(-1, gh, gw).numpy()  # heads, gh, gw
        to_cls = attn[:, :1].numpy()  # heads, 1
    which = f"class-attention block {blocks.index(shown)} of {len(blocks)} (block {shown})"
    note = "" if shown == block else f"; block {block} is a self-attention block, so the last one is shown"
    sheet = viz.attention_overlays(
        seen.photo, rows, patch, prefix_attn=to_cls,
        title=f"{seen.name}: the cls token's attention over the patches, per head\n{which}{note}",
    )  # fmt: skip
    return View(sheet.image, {"class_attention": rows, "class_attention_to_cls": to_cls[:, 0],
                              "class_attention_block": np.array(shown)})


MECHANISMS = (
    Mechanism(
        "class_attention",
        "late class token with class attention (CaiT)",
        "the cls token has no position of its own and joins late, reading the position-carrying patches through "
        "class attention.",
        "absolute",
        "CaiT adds its learned embedding to the patches only (no cls entry). The patches attend to each other through "
        "talking-heads attention; the cls token joins only in the last, class-attention blocks, where its single query "
        "attends over itself and the patches (which stay unchanged). The sheet shows each head's class attention over "
        "the patches for the chosen class-attention block (the last one when a self-attention block is chosen); the "
        "titles give each head's attention to the cls token itself.",
        {"attn": "BlockTrace.attn of a class-attention block: (B, heads, 1, 1 + h*w), key 0 the cls token"},
        (ViewSpec("class_attention", "Class attention per head", class_attention, per_block=True),),
    ),
)
