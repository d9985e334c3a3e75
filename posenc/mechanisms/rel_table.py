"""A learned relative position bias table, gathered through the relative index: BEiT (global, with cls entries), Swin (windows)."""

from __future__ import annotations

from posenc import views
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View


def bias_table(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's table by offset (query minus key), as the block used it."""
    return views.relative_views(seen, block, patch)[0]


def query_bias(seen: Seen, block: int, patch: Patch) -> View:
    """The bias the clicked query adds to every key it attends to, on the photo."""
    return views.relative_views(seen, block, patch)[1]


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
