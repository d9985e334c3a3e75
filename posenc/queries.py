"""The clicked query of a block and its values over the keys, read from the block's token layout.

Every per-patch view (attention, a query's bias, a query's bias factors, positional attention) draws one query's
row of a per-pair tensor on the key grid. These helpers find that query and place the row, for any block: global
attention with or without prefix tokens, (shifted, padded) windows, subsampled queries, pooled keys. They read
positions from :class:`~posenc.models.TokenLayout` only, so they never branch on an architecture.

Conventions: ``patch`` is ``(row, col)`` on the model's input patch grid ``grid`` for an input of ``size`` pixels
(both ``(h, w)``); the query is the block's patch query nearest the patch's centre, and the outline goes on the key
patch nearest that query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posenc.encodings import Size2
from posenc.models.layers import BlockTrace, TokenLayout

Patch = tuple[int, int]


@dataclass(frozen=True)
class Query:
    """Where the clicked patch's query sits in a block.

    Attributes:
        group: index on the attention's group (window) axis; 0 for global attention.
        slot: the query's index inside its group.
        token: its row in ``layout.query_pixels``.
        patch: (row, col) on the key grid of the key patch nearest the query, for outlines; for a prefix query,
            the key patch nearest the clicked patch.
        prefix: the query's name when it is a prefix token ("cls": a block without patch queries, such as class
            attention, answers with its first prefix query); None for a patch query.
    """

    group: int
    slot: int
    token: int
    patch: Patch
    prefix: str | None = None
    label: str = ""

    def describe(self) -> str:
        """Who the query is, for titles, in the input grid's numbering: "patch (31, 31)", "patch (31, 31) (query
        (15, 15) of the block's 28x28 grid)" when the block's queries are pooled or subsampled, "the cls token"."""
        if self.prefix is not None:
            return f"the {self.prefix} token (the block's query)"
        return self.label or f"patch {self.patch}"


def patch_pixel(patch: Patch, grid: Size2, size: Size2) -> tuple[float, float]:
    """(y, x) centre of an input patch in input pixels."""
    return tuple((p + 0.5) * s / g for p, g, s in zip(patch, grid, size))


def block_query(trace: BlockTrace, patch: Patch, grid: Size2, size: Size2) -> Query:
    """The block's patch query nearest the clicked input patch (raises ``NoTokenLayout`` for a block without one).

    A block whose queries are prefix tokens only (class attention) answers with its first prefix query, whatever
    the patch; a block with neither raises ValueError.
    """
    layout = trace.tokens()
    pixel = patch_pixel(patch, grid, size)
    if not bool(layout.query_is_patch.any()) and layout.query_prefix:
        group, slot = layout.query_slot(0)
        return Query(group, slot, 0, layout.nearest_key_patch(pixel), layout.query_prefix[0])
    token = layout.nearest_query(pixel)
    group, slot = layout.query_slot(token)
    label = f"patch {tuple(patch)}"
    if tuple(layout.query_grid) != tuple(grid):  # pooled or subsampled queries: say which one answers
        row, col = divmod(token - len(layout.query_prefix), layout.query_grid[1])
        label += f" (query ({row}, {col}) of the block's {layout.query_grid[0]}x{layout.query_grid[1]} grid)"
    return Query(group, slot, token, layout.nearest_key_patch(tuple(layout.query_pixels[token].tolist())), label=label)


def key_values(layout: TokenLayout, group: int, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-slot values of one group's keys placed where the keys are.

    Args:
        values: (..., nk) in the group's key-slot order.

    Returns:
        (..., hk, wk) float32 on the key grid, NaN at keys the group does not hold (other windows; padding slots
        are dropped), and (..., Pk) the values at the prefix keys, or None without prefix keys.
    """
    values = values.detach().float().cpu()
    tokens = layout.key_tokens[group]  # nk
    p = len(layout.key_prefix)
    hk, wk = layout.key_grid
    grid = torch.full((*values.shape[:-1], hk * wk), float("nan"))  # ..., hk*wk
    patches = tokens >= p
    grid[..., tokens[patches] - p] = values[..., patches]
    prefix = None
    if p:
        prefix = torch.full((*values.shape[:-1], p), float("nan"))  # ..., Pk
        at_prefix = (tokens >= 0) & (tokens < p)
        prefix[..., tokens[at_prefix]] = values[..., at_prefix]
        prefix = prefix.numpy()
    return grid.reshape(*values.shape[:-1], hk, wk).numpy(), prefix  # ..., hk, wk


def query_row(
    trace: BlockTrace, per_pair: torch.Tensor, patch: Patch, grid: Size2, size: Size2
) -> tuple[np.ndarray, np.ndarray | None, Query]:
    """The clicked query's row of a per-pair tensor, on the block's key grid.

    Args:
        per_pair: (heads, Nq, Nk) or (G, heads, n, n) for one image, or a (heads, n, n) bias shared by every window.

    Returns:
        (heads, hk, wk) values (NaN where the query cannot attend: other windows, keys of another shift region),
        (heads, Pk) the values at the prefix keys or None, and the :class:`Query`.
    """
    layout = trace.tokens()
    query = block_query(trace, patch, grid, size)
    row = layout.grouped(per_pair)[query.group, :, query.slot, :].float()  # heads, nk
    if trace.mask is not None:  # keys of another shift region are masked out of the query's window
        masked = trace.mask[query.group, query.slot] != 0  # nk
        row = row.masked_fill(masked.to(row.device), float("nan"))
    values, prefix = key_values(layout, query.group, row)
    return values, prefix, query
