"""Token norms and high-norm tokens (Darcet et al., "Vision Transformers Need Registers", 2023).

After each block, the L2 norm of every output token: the patch tokens on the grid where the block says its outputs
sit (:meth:`BlockTrace.outputs`: its query grid, so windowed and pooled blocks land on their own grid; XCiT's channel
attention keeps its patch grid), and the prefix tokens (cls, registers) the block outputs. A patch token is **high-norm** when its norm exceeds :data:`HIGH_NORM_FACTOR` times the median
patch-token norm of the same block and image (a scale-free rule: Darcet et al. report outliers about 10 times
the others; the rule is written on every picture).

The block outputs come from :func:`block_outputs`: forward hooks registered for a ``with`` only, which keep only
the calls made by the thread that opened it, so concurrent requests in other threads are not mixed in. Nothing is
stored on the model.

:class:`NormStats` accumulates, over a folder, the share of high-norm tokens per block and the position
decodability of high-norm tokens against the rest: one ridge probe per block fitted on **all** patch tokens of
the training images, scored (R²) separately on the high-norm and the normal tokens of the held-out images.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from posenc.models import BlockTrace, Inspection

#: A patch token is high-norm when its norm exceeds this multiple of its block's median patch norm (per image).
HIGH_NORM_FACTOR = 3.0
#: The rule, as written on the pictures and in ``measures.json``.
HIGH_NORM_RULE = f"norm > {HIGH_NORM_FACTOR:g} x the block's median patch-token norm (per image)"


@contextmanager
def block_outputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the tokens after each transformer block during the calls made inside the ``with``.

    Blocks are the modules with an ``mlp`` child and an attention child (``attn``, or LeViT's ``attn_downsample``),
    in call order: the order of ``Inspection.blocks``. Forward hooks are registered for the ``with`` only and
    removed after; they keep only calls from the thread that opened the ``with`` (run one call at a time there).

    Yields:
        A list that fills with one tensor per block call: (B, N, C) or (B, h, w, C).
    """
    found: list[Tensor] = []
    owner = threading.get_ident()
    blocks = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module)
              and any(name.startswith("attn") for name, _ in m.named_children())]

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            found.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class BlockNorms:
    """The output-token norms of one block.

    Attributes:
        patches: (B, hq, wq) float32 L2 norm of every patch token on the block's query grid.
        prefix: (B, Pq) float32 norms of the prefix tokens the block outputs; ``prefix_names`` names them.
        threshold: (B,) the high-norm threshold per image (:data:`HIGH_NORM_RULE`).
        high: (B, hq, wq) bool, the high-norm patch tokens.
    """

    patches: np.ndarray
    prefix: np.ndarray
    prefix_names: tuple[str, ...]
    threshold: np.ndarray
    high: np.ndarray


def block_norms(tokens: Tensor, trace: BlockTrace) -> BlockNorms:
    """:class:`BlockNorms` of one block's output, on the tokens :meth:`BlockTrace.outputs` places.

    Raises:
        ValueError: the block does not say where its output tokens sit, or outputs no patch tokens.
    """
    where = trace.outputs()
    prefix, patches = where.split(tokens)  # B, P, C / B, h*w, C
    h, w = where.grid
    norms = patches.double().norm(dim=-1)  # B, h*w
    threshold = HIGH_NORM_FACTOR * norms.median(dim=-1).values  # B
    high = norms > threshold[:, None]  # B, h*w
    return BlockNorms(
        patches=norms.reshape(-1, h, w).float().cpu().numpy(),  # B, h, w
        prefix=prefix.double().norm(dim=-1).float().cpu().numpy(),  # B, Pq
        prefix_names=where.prefix,
        threshold=threshold.float().cpu().numpy(),
        high=high.reshape(-1, h, w).cpu().numpy())  # fmt: skip


def token_norms(outputs: Sequence[Tensor], inspection: Inspection) -> list[BlockNorms | str]:
    """:func:`block_norms` of every block, or a note for a block that does not say where its output tokens sit."""
    if len(outputs) != len(inspection.blocks):
        raise ValueError(f"{len(outputs)} block outputs for {len(inspection.blocks)} blocks; collect them with "
                         "block_outputs around one inspect call")
    out: list[BlockNorms | str] = []
    for b, (tokens, trace) in enumerate(zip(outputs, inspection.blocks)):
        try:
            out.append(block_norms(tokens, trace))
        except ValueError as error:
            out.append(f"block {b}: {error}")
    return out


def norms_summary(found: Sequence[BlockNorms | str]) -> dict[str, Any]:
    """A JSON-able record of one inspection's token norms: per block the share of high-norm patch tokens, the mean
    patch norm and each prefix token's norm, averaged over the batch (None for a block without a layout)."""
    blocks = []
    for f in found:
        if isinstance(f, str):
            blocks.append(None)
            continue
        blocks.append({"high_norm_share": float(f.high.mean()), "mean_patch_norm": float(f.patches.mean()),
                       "prefix_norm": {n: float(f.prefix[:, i].mean()) for i, n in enumerate(f.prefix_names)}})
    return {"rule": HIGH_NORM_RULE, "blocks": blocks}


def inspect_with_outputs(model: nn.Module, x: Tensor) -> tuple[Inspection, list[BlockNorms | str]]:
    """One inspection and the token norms of its blocks (:func:`block_outputs` around ``model.inspect``)."""
    with torch.inference_mode(), block_outputs(model) as outputs:
        seen = model.inspect(x)
    if len(outputs) != len(seen.blocks):  # blocks that are not an attention + MLP module each (CoaT's serial blocks)
        note = (f"{len(outputs)} block outputs were collected for {len(seen.blocks)} blocks (the model's "
                "blocks are not one attention + MLP module each)")
        return seen, [note] * len(seen.blocks)
    return seen, token_norms(outputs, seen)


@dataclass
class NormStats:
    """Over a folder: the share of high-norm tokens per block, norm means, and position decodability (R²) of the
    high-norm and the normal tokens of held-out images under one probe per block fitted on all tokens.

    ``probe_high`` / ``probe_normal`` are two empty :class:`posenc.measure.Decodability` (passed in, so this module
    does not import the measurements that use it).
    """

    probe_high: Any
    probe_normal: Any
    high: list[int] = field(default_factory=list)
    total: list[int] = field(default_factory=list)
    patch_norm: list[float] = field(default_factory=list)
    prefix_norm: list[dict[str, float]] = field(default_factory=list)
    images: int = 0
    notes: dict[int, str] = field(default_factory=dict)

    def add(self, outputs: Sequence[Tensor], inspection: Inspection, held_out: Sequence[bool]) -> None:
        """One batch: the block outputs of one ``inspect`` call and which images are held out."""
        self.images += len(held_out)
        for b, found in enumerate(token_norms(outputs, inspection)):
            while len(self.high) <= b:
                self.high.append(0)
                self.total.append(0)
                self.patch_norm.append(0.0)
                self.prefix_norm.append({})
            if isinstance(found, str):
                self.notes[b] = found
                continue
            self.high[b] += int(found.high.sum())
            self.total[b] += found.high.size
            self.patch_norm[b] += float(found.patches.astype(np.float64).sum())
            for i, name in enumerate(found.prefix_names):
                self.prefix_norm[b][name] = self.prefix_norm[b].get(name, 0.0) + float(found.prefix[:, i].sum())
            where = inspection.blocks[b].outputs()
            _, patches = where.split(outputs[b])  # B, h*w, C
            targets = where.patch_pixels  # h*w, 2
            high = torch.from_numpy(found.high.reshape(len(held_out), -1))  # B, h*w
            self.probe_high.add(b, patches, targets, held_out, score=high)
            self.probe_normal.add(b, patches, targets, held_out, score=~high)

    def to_json(self) -> dict[str, Any]:
        """The ``"token_norms"`` record of ``measures.json``."""
        blocks = len(self.high)
        r2_high, r2_normal = (probe.r2(blocks).mean(1) for probe in (self.probe_high, self.probe_normal))
        images = max(self.images, 1)
        return {
            "rule": HIGH_NORM_RULE,
            "high_norm_share": [h / t if t else None for h, t in zip(self.high, self.total)],
            "high_norm_tokens": self.high,
            "mean_patch_norm": [s / t if t else None for s, t in zip(self.patch_norm, self.total)],
            "mean_prefix_norm": [{k: v / images for k, v in d.items()} for d in self.prefix_norm],
            "decodability_r2_high": [None if not np.isfinite(v) else float(v) for v in r2_high],
            "decodability_r2_normal": [None if not np.isfinite(v) else float(v) for v in r2_normal],
            "decodability_rule": "one ridge probe per block fitted on all patch tokens of the training images; R² "
                                 "(mean of row and column) scored separately on the high-norm and the normal tokens "
                                 "of the held-out images (null: no such token)",
            "notes": {str(b): n for b, n in self.notes.items()},
        }
