"""Attention rollout (Abnar & Zuidema 2020; ViT paper, Appendix D.8), with and without the position term.

Recipe, per block: average the attention over heads, add the identity (the residual), renormalise every row to
sum to 1 (``sum(-1, keepdim=True)``: dropping the ``keepdim`` divides columns instead, vit-explain#16), and
multiply through the blocks. The maps come from :meth:`inspect` (never from hooks), so fused attention cannot hide
them (vit-explain#23).

Every block goes through its token layout (:class:`~posenc.models.TokenLayout`), so nothing here branches on an
architecture:

* windowed blocks are read window by window through ``layout.grouped(attn)`` and the query / key tokens of each
  slot (padding slots dropped; the attention they held is renormalised away with the rows), without forming the
  full token-by-token matrix;
* the rollout keeps a state over the model's prefix tokens (``Inspection.prefix_labels``) and the current patch
  grid. A block without prefix queries passes the prefix rows through unchanged (identity); prefix keys are
  matched by name;
* when a block's key grid is not the current grid (patch merging, pooled keys, subsampled queries), each new
  token takes the tokens of the previous grid at its own position (a subsample), or else the tokens whose
  centres fall in its cell (a merge: the cell is the new grid's stride around its centre), averaged; only
  positions are read, never the architecture;
* a block without token attention (``layout`` None) passes through as identity and adds a note.

"Without position": each block's ``attn_no_pos`` (the attention with its relative bias / RoPE rotation / GPSA
positional part left out, same inputs) where it has one, its ``attn`` where it has none. A model whose blocks
have no position term (absolute embedding only) has no ``attn_no_pos`` anywhere: then "without position" is the
model run with ``position=False`` (:func:`needs_position_free_run`); pass that inspection as ``no_pos_source``.

Rows are computed backwards from the chosen output tokens, so a rollout from a few tokens never forms the
product of full matrices (a Swin stage-1 block is 3136 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from posenc.models import BlockTrace, Inspection

#: Two positions closer than this many pixels are the same token (a subsampled grid).
SAME_PIXEL = 1e-6


class RolloutUnavailable(ValueError):
    """No block of the model attends between tokens (the message says why)."""


@dataclass(frozen=True)
class Tokens:
    """The tokens after a block: the model's prefix tokens, then a patch grid row-major.

    Attributes:
        prefix: names of the prefix tokens (every one the model has, whether or not the block used it).
        grid: (h, w) patch grid.
        pixels: (h*w, 2) float64 (y, x) patch centres in input pixels.
    """

    prefix: tuple[str, ...]
    grid: tuple[int, int]
    pixels: Tensor

    def __len__(self) -> int:
        return len(self.prefix) + len(self.pixels)

    def nearest(self, pixel: tuple[float, float]) -> int:
        """Index of the patch token nearest an image position (y, x)."""
        d = (self.pixels - torch.tensor(pixel, dtype=self.pixels.dtype)).square().sum(-1)  # h*w
        return len(self.prefix) + int(d.argmin())


def token_map(to_pixels: Tensor, from_pixels: Tensor) -> Tensor:
    """Which tokens of one grid each token of another grid stands for, from positions only.

    A new token at the position of an old one is that token (subsampled queries); otherwise it averages the old
    tokens whose centres fall in its cell, ``[c - s/2, c + s/2)`` per axis with ``s`` the new grid's spacing
    (patch merging, pooled keys); a cell holding none takes the nearest old token.

    Args:
        to_pixels: (M, 2) new token positions; from_pixels: (N, 2) old ones (y, x) in pixels.

    Returns:
        (M, N) float64, rows summing to 1.
    """
    to_pixels, from_pixels = to_pixels.double(), from_pixels.double()
    if to_pixels.shape == from_pixels.shape and torch.equal(to_pixels, from_pixels):  # the same grid
        return torch.eye(len(to_pixels), dtype=torch.float64)
    dist = torch.cdist(to_pixels, from_pixels)  # M, N
    same = dist < SAME_PIXEL
    spacing = torch.tensor([_spacing(to_pixels[:, a]) for a in range(2)], dtype=torch.float64)  # 2
    offset = from_pixels[None, :, :] - to_pixels[:, None, :]  # M, N, 2
    inside = ((offset >= -spacing / 2) & (offset < spacing / 2)).all(-1)  # M, N
    chosen = torch.where(same.any(1, keepdim=True), same, inside)  # M, N
    empty = ~chosen.any(1)
    if empty.any():
        nearest = dist[empty].argmin(1)  # m
        chosen[empty.nonzero()[:, 0], nearest] = True
    chosen = chosen.double()
    return chosen / chosen.sum(1, keepdim=True)


def _spacing(values: Tensor) -> float:
    """Smallest gap between distinct coordinates (inf for a single row or column)."""
    distinct = torch.unique(values)
    return float(distinct.diff().min()) if len(distinct) > 1 else math.inf


def input_tokens(inspection: Inspection) -> Tokens:
    """The tokens the first attending block reads: the model's prefix tokens and that block's key grid."""
    for trace in inspection.blocks:
        if trace.layout is not None:
            layout = trace.layout
            return Tokens(tuple(inspection.prefix_labels), tuple(layout.key_grid),
                          layout.key_pixels[len(layout.key_prefix):].double())
    raise RolloutUnavailable("no block of this model attends between image tokens, so it has no attention rollout")


def block_tokens(inspection: Inspection) -> list[Tokens]:
    """The tokens after every block (a block without a layout, or with only prefix queries, keeps the patch tokens
    it got)."""
    current, out = input_tokens(inspection), []
    for trace in inspection.blocks:
        layout = trace.layout
        if layout is not None and len(layout.query_pixels) > len(layout.query_prefix):  # the block has patch queries
            current = Tokens(current.prefix, tuple(layout.query_grid),
                             layout.query_pixels[len(layout.query_prefix):].double())
        out.append(current)  # class attention (only prefix queries) leaves the patch tokens as they were
    return out


def block_transfer(trace: BlockTrace, attn: Tensor, before: Tokens, after: Tokens) -> Tensor:
    """One block's rollout step as a matrix: how much each token after the block draws on each token before it.

    ``attn`` averaged over heads, its keys mapped onto the tokens before the block, plus
    the identity (each query's own token before the block), rows renormalised (``keepdim``: vit-explain#16);
    prefix tokens the block does not query pass through unchanged.

    Returns:
        (B, len(after), len(before)) float64, rows summing to 1.
    """
    batch = attn.shape[0]
    eye = torch.eye(len(after), dtype=torch.float64, device=attn.device).expand(batch, -1, -1)  # B, N', N'
    return step_back(eye, trace, attn, before, after)


def step_back(rows: Tensor, trace: BlockTrace, attn: Tensor, before: Tokens, after: Tokens) -> Tensor:
    """Rollout rows over the tokens after a block, carried to the tokens before it: ``rows @ transfer``.

    Computed rows first and window by window, without forming the transfer matrix or the block's dense
    token-by-token attention (a Swin stage-1 block is 3136 tokens); the maps from the block's key and query grids
    onto the tokens before it are sparse (most are the identity).

    Args:
        rows: (B, R, len(after)).

    Returns:
        (B, R, len(before)) float64.
    """
    layout = trace.tokens()
    p = len(before.prefix)
    pk, pq = len(layout.key_prefix), len(layout.query_prefix)
    device = attn.device
    keys = _map_onto(before, layout.key_prefix, layout.key_pixels[pk:]).to(device)  # sparse Nk, P + N
    own = _map_onto(before, layout.query_prefix, layout.query_pixels[pq:]).to(device)  # sparse Nq, P + N
    grouped = layout.grouped(attn).mean(-3).double()  # B, G, nq, nk: heads averaged (in the maps' dtype, then float64)
    batch, groups, nq, nk = grouped.shape
    q, k = layout.query_tokens.to(device), layout.key_tokens.to(device)  # G, nq / G, nk; -1: padding
    q_slot, k_slot = (q >= 0).reshape(-1), (k >= 0).reshape(-1)  # G*nq / G*nk
    q_tok, k_tok = q.clamp(min=0).reshape(-1), k.clamp(min=0).reshape(-1)  # G*nq / G*nk
    # row sums of (A K + I), kept per query row (vit-explain#16); a padding key slot weighs nothing
    key_weight = torch.sparse.sum(keys, 1).to_dense()[k_tok] * k_slot  # G*nk
    slot_total = grouped @ key_weight.reshape(groups, nk, 1)  # B, G, nq, 1
    total = torch.sparse.sum(own, 1).to_dense().expand(batch, -1).clone()  # B, Nq
    total.index_add_(1, q_tok[q_slot], slot_total.reshape(batch, -1)[:, q_slot])  # B, Nq
    rows = rows.double()
    per_query = rows.new_zeros(*rows.shape[:2], len(layout.query_pixels))  # B, R, Nq
    passed = rows.new_zeros(*rows.shape[:2], len(before))  # B, R, P + N
    if len(layout.query_pixels) > pq:
        per_query[..., pq:] = rows[..., p:]
    else:  # class attention: the patch tokens pass the block unchanged (``after`` holds ``before``'s patches)
        passed[..., p:] = rows[..., p:]
    for i, name in enumerate(before.prefix):
        if name in layout.query_prefix:
            per_query[..., layout.query_prefix.index(name)] = rows[..., i]
        else:  # the block does not touch this prefix token
            passed[..., i] = rows[..., i]
    per_query = per_query / total.clamp_min(1e-30)[:, None, :]  # B, R, Nq
    slots = per_query[..., q_tok] * q_slot  # B, R, G*nq: each query slot's row weight
    drawn = torch.einsum("brgq,bgqk->brgk", slots.reshape(*slots.shape[:2], groups, nq), grouped)  # B, R, G, nk
    per_key = rows.new_zeros(*rows.shape[:2], len(layout.key_pixels))  # B, R, Nk
    per_key.index_add_(2, k_tok[k_slot], drawn.reshape(*drawn.shape[:2], -1)[..., k_slot])  # B, R, Nk
    return _times_sparse(per_key, keys) + _times_sparse(per_query, own) + passed  # B, R, P + N


def _times_sparse(dense: Tensor, sparse: Tensor) -> Tensor:
    """``dense @ sparse`` for (B, R, N) dense and a sparse (N, M) matrix -> (B, R, M)."""
    flat = dense.reshape(-1, dense.shape[-1])  # B*R, N
    return torch.sparse.mm(sparse.t(), flat.t()).t().reshape(*dense.shape[:-1], sparse.shape[1])  # B, R, M


def _map_onto(before: Tokens, prefix: tuple[str, ...], pixels: Tensor) -> Tensor:
    """Sparse (len(prefix) + M, len(before)): prefix tokens by name (an unknown name maps to nothing), patches by
    position (:func:`token_map`; the same grid is the identity, built without a dense matrix)."""
    p = len(before.prefix)
    rows = [i for i, name in enumerate(prefix) if name in before.prefix]
    cols = [before.prefix.index(prefix[i]) for i in rows]
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)  # 2, matched prefix
    values = torch.ones(index.shape[1], dtype=torch.float64)
    if len(pixels):
        pixels = pixels.double()
        if pixels.shape == before.pixels.shape and torch.equal(pixels, before.pixels):  # the same grid
            patch = torch.arange(len(pixels))
            index = torch.cat([index, torch.stack([len(prefix) + patch, p + patch])], 1)  # 2, nnz
            values = torch.cat([values, torch.ones(len(pixels), dtype=torch.float64)])
        else:
            mapped = token_map(pixels, before.pixels)  # M, N
            at = mapped.nonzero().T  # 2, nnz
            index = torch.cat([index, at + torch.tensor([[len(prefix)], [p]])], 1)
            values = torch.cat([values, mapped[at[0], at[1]]])
    size = (len(prefix) + len(pixels), len(before))
    return torch.sparse_coo_tensor(index, values, size, dtype=torch.float64, check_invariants=True).coalesce()


def needs_position_free_run(inspection: Inspection) -> bool:
    """True when no block has a position term in its attention (absolute embedding only): "without position" is
    then the model run with ``position=False``."""
    return all(t.attn_no_pos is None for t in inspection.blocks)


@dataclass(frozen=True)
class Rollout:
    """Rollout rows from chosen tokens after a block, over the input tokens.

    Attributes:
        rows: (B, R, P + h0*w0) float64: for each chosen token, its share of every input token (prefix first).
        inputs: the input tokens (prefix names, grid, pixels).
        block: the last block multiplied in.
        notes: one line per block passed through as identity.
    """

    rows: Tensor
    inputs: Tokens
    block: int
    notes: tuple[str, ...]

    def on_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, R, h0, w0) the rows on the input patch grid and (B, R, P) their prefix shares, float32."""
        p, (h, w) = len(self.inputs.prefix), self.inputs.grid
        rows = self.rows.float().cpu()
        return rows[..., p:].reshape(*rows.shape[:-1], h, w).numpy(), rows[..., :p].numpy()  # B, R, h0, w0


def rollout(inspection: Inspection, *, block: int | None = None, select: Tensor | None = None,
            no_pos: bool = False) -> Rollout:
    """Attention rollout from tokens after ``block`` back to the input tokens.

    Args:
        inspection: the forward pass's maps.
        block: last block multiplied in (default: the last block).
        select: (R, len(block_tokens(inspection)[block])) weights of the starting tokens (rows of the identity to
            pick tokens); default every token after the block.
        no_pos: use each block's attention without its position term (``attn_no_pos``) where it has one.

    Returns:
        :class:`Rollout` with ``rows`` (B, R, P + h0*w0).
    """
    blocks = inspection.blocks
    block = len(blocks) - 1 if block is None else block
    if not 0 <= block < len(blocks):
        raise ValueError(f"block {block} is out of range: the model has {len(blocks)} blocks")
    tokens = block_tokens(inspection)
    before = [input_tokens(inspection), *tokens[:-1]]
    batch = blocks[0].attn.shape[0]
    rows = (torch.eye(len(tokens[block]), dtype=torch.float64) if select is None else select.double())
    rows = rows.to(blocks[0].attn.device).expand(batch, *rows.shape)  # B, R, len(tokens[block])
    notes = []
    for b in range(block, -1, -1):
        trace = blocks[b]
        if trace.layout is None:
            notes.append(f"block {b}: passed through as identity ({trace.no_layout})")
            continue
        attn = trace.attn_no_pos if no_pos and trace.attn_no_pos is not None else trace.attn
        rows = step_back(rows, trace, attn, before[b], tokens[b])  # B, R, len(before[b])
    return Rollout(rows, before[0], block, tuple(reversed(notes)))


#: What "without position" means, by the source used (written on the pictures and in summaries).
WITHOUT_PER_BLOCK = "without position: each block's attention with its position term left out (same inputs)"
WITHOUT_MODEL_RUN = "without position: the model run with its position embedding left out (position=False)"


def rollout_pair(model: Any, x: Tensor, inspection: Inspection, *, block: int | None = None,
                 select: Tensor | None = None) -> tuple[Rollout, Rollout, str]:
    """The rollout with position and without, and a line saying what "without" is for this model.

    Without: each block's ``attn_no_pos`` where the blocks have a position term; for a model whose position
    enters only at the input, a second inspection of ``x`` with ``position=False`` (the only extra model call).

    Args:
        model: the model that made ``inspection`` (anything with ``inspect(x, position=...)``).
        x: (B, 3, h, w) the input of ``inspection``.
    """
    with_pos = rollout(inspection, block=block, select=select)
    if needs_position_free_run(inspection):
        with torch.inference_mode():
            free = model.inspect(x, position=False)
        return with_pos, rollout(free, block=block, select=select), WITHOUT_MODEL_RUN
    return with_pos, rollout(inspection, block=block, select=select, no_pos=True), WITHOUT_PER_BLOCK


def rollout_summary(with_pos: Rollout, without_pos: Rollout, starts: tuple[str, ...]) -> dict[str, object]:
    """How far the rollouts with and without position differ, per starting token (JSON-able, averaged over images).

    Args:
        with_pos, without_pos: rollouts over the same starting tokens; ``starts`` names each row ("cls",
            "patch (r, c)", ...).

    Returns:
        per start: ``total_variation`` (half the L1 distance between the two rows, 0 = the same, 1 = disjoint),
        and ``prefix_share`` (the rollout's share on the input prefix tokens) with and without position; and
        ``total_variation_mean`` over the starts.
    """
    a, b = with_pos.rows, without_pos.rows  # B, R, P + N
    p = len(with_pos.inputs.prefix)
    tv = 0.5 * (a - b).abs().sum(-1).mean(0)  # R
    out: dict[str, object] = {"total_variation_mean": float(tv.mean()), "starts": {}}
    for r, name in enumerate(starts):
        out["starts"][name] = {
            "total_variation": float(tv[r]),
            "prefix_share": [float(x[:, r, :p].sum(-1).mean()) for x in (a, b)],
        }
    return out
