"""A late class token (CaiT): the cls token carries no position and joins only in the class-attention blocks, where
its one query reads the patches, which carry the position embedding. Its attention per head shows where it reads."""

from __future__ import annotations

import numpy as np
import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable, query_row


def class_attention_blocks(seen: Seen) -> list[int]:
    """Blocks whose queries are prefix tokens only (no patch queries) and whose keys include patches, by layout."""
    return [
        i for i, t in enumerate(seen.inspection.blocks)
        if t.layout is not None and t.layout.query_prefix and not bool(t.layout.query_is_patch.any())
        and bool(t.layout.key_is_patch.any())
    ]  # fmt: skip


def class_attention(seen: Seen, block: int, patch: Patch) -> View:
    """Each head's attention from the prefix query over the patches in a class-attention block, on the photo.

    The chosen block when it is a class-attention block, else the last one (the one the classifier reads).
    """
    blocks = class_attention_blocks(seen)
    if not blocks:
        raise ViewUnavailable(f"{seen.name} has no class-attention blocks (a cls token that joins late)")
    shown = block if block in blocks else blocks[-1]
    with torch.inference_mode():  # the block's one (first prefix) query, read from its layout
        rows, to_prefix, query = query_row(seen, shown, seen.inspection.blocks[shown].attn[0], patch)  # heads, hk, wk
    which = f"class-attention block {blocks.index(shown)} of {len(blocks)} (block {shown})"
    note = "" if shown == block else f"; block {block} has patch queries, so the last class-attention block is shown"
    sheet = viz.attention_overlays(
        seen.photo, rows, query.patch, prefix_attn=to_prefix,
        title=f"{seen.name}: {query.describe()}'s attention over the patches, per head\n{which}{note}",
    )  # fmt: skip
    arrays = {"class_attention": rows, "class_attention_block": np.array(shown)}
    if to_prefix is not None:
        arrays["class_attention_to_prefix"] = to_prefix
    return View(sheet.image, arrays)


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
        {"attn": "BlockTrace.attn of a class-attention block: (B, heads, 1, 1 + h*w), its layout says the one query is "
                 "the cls token and the keys are the cls token then the patch grid"},
        (ViewSpec("class_attention", "Class attention per head", class_attention, per_block=True),),
    ),
)
