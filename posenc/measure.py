"""Measure how a model *uses* position: attention distance, patch filters, reliance, resolution, decodability.

Every measurement is a pure function of an inspection (:class:`~posenc.models.Inspection`), of model calls
or of accumulated statistics; nothing is stored on the model. Units: distances are in input pixels,
probabilities in [0, 1], KL divergences in nats, R² unitless (1 = perfect, 0 = the test mean).

* :func:`mean_attention_distance` (ViT paper, Fig. 7 right; Appendix D.7): for each block and head, the
  attention-weighted Euclidean distance between the centre of the query patch and the centres of the key
  patches, averaged over query patches. Convention: prefix tokens (cls, distillation, registers) are dropped
  as queries and as keys, and the attention left over is **not** renormalised, so a head that sends a third of
  its attention to cls reports two thirds of its patch-to-patch distance. Positions come from each block's
  token layout (:class:`~posenc.models.TokenLayout`): windowed blocks put each token at its place before the
  cyclic shift and drop padding tokens the same way; subsampled or pooled blocks measure from each query's
  position to each key's. A block whose attention is not between image tokens gets a note instead.
* :func:`patch_embedding_filters` (Fig. 7 left): the top principal components of the patch-embedding conv.
* :func:`position_reliance`: the model as it is against seeded patch shuffles and against itself with every
  position term removed (``model(x, position=False)``): top-1 agreement, KL(original || other) and the
  probability of the original class; for a headless model the cosine similarity of the features.
* :func:`resolution_sweep`: top-1 and its probability at each input size the model offers.
* :class:`Decodability`: a closed-form ridge regression from the tokens after each block to each token's
  image position (row, column) from the block's layout, fitted on some images and scored as R² on held-out ones, from streamed statistics.
* token norms (:mod:`posenc.norms`): the share of high-norm output tokens per block and the decodability of the
  high-norm tokens against the rest (``"token_norms"`` in ``measures.json``).

:func:`measure_folder` runs all of them over an image folder in batches, and ``python -m posenc measure`` (see
:func:`add_parser`) writes ``measures.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from posenc.encodings import Size2
from posenc.hub import HubLoadError, LoadedModel
from posenc.models import BlockTrace, Inspection
from posenc.norms import NormStats, block_outputs
from posenc.preprocess import ImageError, build_transform, load_image

logger = logging.getLogger(__name__)

#: Principal components of the patch-embedding filters drawn (the ViT paper shows 28).
NUM_FILTER_PCS = 28
#: Seeds of the patch shuffles.
SHUFFLE_SEEDS = (0, 1, 2)
#: Ridge strength, relative to the mean diagonal of the (centred) token Gram matrix.
RIDGE = 1e-3
#: Every ``HOLDOUT_EVERY``-th image (by sorted file name) is held out for the decodability R².
HOLDOUT_EVERY = 5
#: File name endings treated as images in a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class NotApplicable(ValueError):
    """The measurement does not apply to this model (the message says why)."""


# ------------------------------------------------------------------------------------ 1. attention distance


def block_attention_distance(trace: BlockTrace) -> Tensor:
    """Mean attention distance of every head of one block, per image, from the block's token layout.

    Each query's distance is its attention-weighted distance to the keys, from the query's image position to each
    key's (so subsampled or pooled blocks measure across their two grids). Prefix keys and padding keys are dropped
    without renormalising; prefix and padding queries are not averaged; a block without prefix tokens drops none.

    Args:
        trace: the block's trace; ``attn`` is (B, heads, Nq, Nk) or windowed (B, nW, heads, n, n), read through
            ``trace.layout``.

    Returns:
        (B, heads) float64, in input pixels, averaged over the patch queries (summed in the attention's dtype).

    Raises:
        NotApplicable: the block's attention is not between image tokens, or it has no patch queries.
    """
    note = _distance_note(trace)
    if note:
        raise NotApplicable(note)
    layout = trace.layout
    try:
        attn = layout.grouped(trace.attn.float())  # B, G, heads, nq, nk
    except ValueError as error:  # attention that does not match its layout
        raise NotApplicable(str(error)) from None
    queries, keys = layout.query_is_patch, layout.key_is_patch  # G, nq / G, nk
    q_pix = layout.query_pixels[layout.query_tokens.clamp(min=0)]  # G, nq, 2
    k_pix = layout.key_pixels[layout.key_tokens.clamp(min=0)]  # G, nk, 2
    dist = torch.cdist(q_pix, k_pix).masked_fill_(~(queries[:, :, None] & keys[:, None, :]), 0.0)  # G, nq, nk
    dist = dist.to(device=attn.device, dtype=attn.dtype)
    per_query = torch.einsum("bghqk,gqk->bghq", attn, dist)  # B, G, heads, nq
    weight = (queries.double() / queries.sum()).to(attn.device)  # G, nq
    return torch.einsum("bghq,gq->bh", per_query.double(), weight)  # B, heads


def mean_attention_distance(inspection: Inspection) -> list[Tensor]:
    """:func:`block_attention_distance` of every block: a list of (B, heads) tensors in input pixels.

    A block the measure does not apply to (see :func:`attention_distance_notes`) gives NaN.
    """
    out = []
    for trace in inspection.blocks:
        try:
            out.append(block_attention_distance(trace))
        except NotApplicable:
            out.append(torch.full((trace.attn.shape[0], trace.attn.shape[-3]), math.nan, dtype=torch.float64))
    return out


def attention_distance_notes(inspection: Inspection) -> list[str]:
    """Per block, why it has no attention distance ("" where it has one), without computing the distances."""
    return [_distance_note(trace) for trace in inspection.blocks]


def _distance_note(trace: BlockTrace) -> str:
    """Why a block has no attention distance, or ""."""
    if trace.layout is None:
        return trace.no_layout
    if not trace.layout.query_is_patch.any():
        return "this block has no patch queries (class attention): it has no attention distance"
    return ""


# ------------------------------------------------------------------------------------ 2. patch-embedding filters


def patch_conv(model: nn.Module) -> nn.Conv2d:
    """The model's plain patch-embedding conv (kernel = stride, RGB in), or :class:`NotApplicable`."""
    conv = getattr(getattr(model, "patch_embed", None), "proj", None)
    if (not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or tuple(conv.kernel_size) != tuple(conv.stride)
            or conv.groups != 1):
        raise NotApplicable(
            "patch-embedding filters are not applicable: this model has no plain patch-embedding conv "
            "(one RGB convolution whose kernel equals its stride) to take principal components of"
        )
    return conv


def patch_embedding_filters(weight: Tensor, k: int = NUM_FILTER_PCS) -> tuple[np.ndarray, np.ndarray]:
    """Top principal components of patch-embedding filters, as RGB patches (ViT paper, Fig. 7 left).

    The C filters of the conv are the samples; their mean filter is removed before the SVD.

    Args:
        weight: (C, 3, p, q) conv weight.
        k: components kept (fewer when the rank is lower).

    Returns:
        (k, p, q, 3) float32 components, each scaled to [0, 1] on its own for display, and (k,) the fraction of
        the filters' variance each explains.
    """
    c, _, p, q = weight.shape
    flat = weight.detach().double().cpu().reshape(c, -1)  # C, 3*p*q
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # vh: r, 3*p*q
    k = min(k, vh.shape[0])
    pcs = vh[:k].reshape(k, 3, p, q).permute(0, 2, 3, 1)  # k, p, q, 3
    lo = pcs.amin(dim=(1, 2, 3), keepdim=True)
    hi = pcs.amax(dim=(1, 2, 3), keepdim=True)
    rgb = ((pcs - lo) / (hi - lo).clamp_min(1e-12)).float().numpy()
    explained = (s**2 / (s**2).sum().clamp_min(1e-30))[:k].float().numpy()
    return rgb, explained


# ------------------------------------------------------------------------------------ 3. position reliance


def shuffle_patches(x: Tensor, patch: Size2, perm: Tensor) -> Tensor:
    """Move the image's patches: output patch t is input patch ``perm[t]`` (row-major over the patch grid).

    Args:
        x: (B, 3, H, W) with H, W multiples of ``patch``.
        patch: (ph, pw) patch size in pixels.
        perm: (h*w,) permutation of the patch indices.

    Returns:
        (B, 3, H, W).
    """
    b, ch, hh, ww = x.shape
    ph, pw = patch
    h, w = hh // ph, ww // pw
    tiles = x.reshape(b, ch, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, ch, ph, pw)  # B, h*w, 3, ph, pw
    tiles = tiles[:, perm.to(x.device)]  # B, h*w, 3, ph, pw
    return tiles.reshape(b, h, w, ch, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, hh, ww)  # B, 3, H, W


def seeded_permutation(n: int, seed: int) -> Tensor:
    """(n,) permutation drawn from ``torch.Generator`` seeded with ``seed`` (the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def compare_outputs(reference: Tensor, other: Tensor, *, headless: bool) -> dict[str, Tensor]:
    """How far ``other`` is from ``reference``, per image.

    Args:
        reference, other: (B, num_classes) logits, or (B, C) features when ``headless``.

    Returns:
        {"top1_agreement", "kl", "p_original"} of (B,) each (KL(reference || other) in nats; the probability
        ``other`` gives the reference's top-1 class); headless: {"cosine"} (B,).
    """
    if headless:
        return {"cosine": F.cosine_similarity(reference.double(), other.double(), dim=-1)}
    logp, logq = reference.double().log_softmax(-1), other.double().log_softmax(-1)  # B, K
    top = logp.argmax(-1)  # B
    return {
        "top1_agreement": (logq.argmax(-1) == top).double(),
        "kl": (logp.exp() * (logp - logq)).sum(-1),
        "p_original": logq.gather(-1, top[:, None])[:, 0].exp(),
    }


def position_reliance(
    model: nn.Module, x: Tensor, patch: Size2, *, seeds: Sequence[int] = SHUFFLE_SEEDS, reference: Tensor | None = None
) -> dict[str, Any]:
    """The model as it is against shuffled patches (one permutation per seed) and against no position term.

    Args:
        model: a posenc model (``model(x, position=False)``, ``model.headless``).
        x: (B, 3, H, W) model input.
        patch: (ph, pw) patch size in pixels.
        seeds: one seeded permutation of the patches each.
        reference: (B, K) the model's output on ``x`` when already computed.

    Returns:
        {"shuffle": [per seed: :func:`compare_outputs` dict], "no_position": dict, "p_top1": (B,) the original
        top-1 probability (absent when headless)}.
    """
    headless = bool(getattr(model, "headless", False))
    ref = model(x) if reference is None else reference
    grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    shuffles = [
        compare_outputs(ref, model(shuffle_patches(x, patch, seeded_permutation(grid[0] * grid[1], s))),
                        headless=headless)
        for s in seeds
    ]
    out: dict[str, Any] = {"shuffle": shuffles,
                           "no_position": compare_outputs(ref, model(x, position=False), headless=headless)}
    if not headless:
        out["p_top1"] = ref.double().softmax(-1).amax(-1)
    return out


# ------------------------------------------------------------------------------------ 4. resolution sweep


def resolution_sweep(
    model: nn.Module, inputs: dict[Size2, Tensor], native: Size2, reference: Tensor | None = None
) -> dict[Size2, dict[str, Tensor]]:
    """Top-1 and its probability at each input size (the model resamples its own positions).

    Args:
        model: a classifier.
        inputs: (h, w) -> (B, 3, h, w) the same images preprocessed at that size.
        native: the size whose top-1 is the reference.
        reference: (B, K) logits at ``native`` when already computed.

    Returns:
        size -> {"top1": (B,) class, "p_top1": (B,), "agrees": (B,) 1.0 where the top-1 equals the native
        one, "p_native_class": (B,) probability of the native top-1 class}.
    """
    if getattr(model, "headless", False):
        raise NotApplicable("the resolution sweep needs class probabilities; this model is headless")
    logits = {size: (reference if size == native and reference is not None else model(x)) for size, x in inputs.items()}
    native_top = logits[native].argmax(-1)  # B
    out = {}
    for size, lg in logits.items():
        probs = lg.double().softmax(-1)  # B, K
        p, top = probs.max(-1)
        out[size] = {"top1": top, "p_top1": p, "agrees": (top == native_top).double(),
                     "p_native_class": probs.gather(-1, native_top[:, None])[:, 0]}
    return out


# ------------------------------------------------------------------------------------ 5. decodability


def patch_tokens(tokens: Tensor, trace: BlockTrace) -> Tensor:
    """A block's output as its patch tokens (the block's queries, prefix dropped): (B, Pq + hq*wq, C) or
    (B, hq, wq, C) -> (B, hq*wq, C); their positions are ``trace.layout.query_pixels[Pq:]``."""
    try:
        layout = trace.tokens()
    except ValueError as error:
        raise NotApplicable(str(error)) from None
    p, (h, w) = len(layout.query_prefix), layout.query_grid
    if tokens.ndim == 4 and tuple(tokens.shape[1:3]) == (h, w):
        return tokens.reshape(tokens.shape[0], h * w, tokens.shape[-1])  # B, h*w, C
    if tokens.ndim != 3 or tokens.shape[1] != p + h * w:
        raise NotApplicable(f"block output {tuple(tokens.shape)} is not {p} prefix + {h}x{w} patch tokens")
    return tokens[:, p:]  # B, h*w, C


def ridge_fit(xtx: np.ndarray, xty: np.ndarray, n: int, sx: np.ndarray, sy: np.ndarray, ridge: float = RIDGE
              ) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression with an unpenalised intercept, from sums.

    Args:
        xtx: (C, C) sum of x xᵀ; xty: (C, T) sum of x yᵀ; n: samples; sx: (C,) sum of x; sy: (T,) sum of y.
        ridge: penalty relative to the mean diagonal of the centred Gram matrix.

    Returns:
        weights (C, T) and intercept (T,): y ≈ x @ weights + intercept.
    """
    mx, my = sx / n, sy / n
    gram = xtx - n * np.outer(mx, mx)  # C, C centred
    cross = xty - n * np.outer(mx, my)  # C, T centred
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    weights = np.linalg.solve(gram + lam * np.eye(len(gram)), cross)  # C, T
    return weights, my - mx @ weights


@dataclass
class _Moments:
    """Running sums of one split of one block: n, Σx, Σy, Σxxᵀ, Σxyᵀ, Σy² (float64)."""

    n: int = 0
    sx: np.ndarray | None = None
    sy: np.ndarray | None = None
    xtx: np.ndarray | None = None
    xty: np.ndarray | None = None
    yy: np.ndarray | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x (M, C), y (M, T)."""
        if self.sx is None:
            self.sx, self.sy = np.zeros(x.shape[1]), np.zeros(y.shape[1])
            self.xtx, self.xty = np.zeros((x.shape[1], x.shape[1])), np.zeros((x.shape[1], y.shape[1]))
            self.yy = np.zeros(y.shape[1])
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yy += (y * y).sum(0)


@dataclass
class Decodability:
    """Streamed ridge regression from each block's patch tokens to the patch centre (y, x), scored by held-out R².

    Feed it batches with :meth:`add`; images flagged ``held_out`` are only scored. Everything it keeps is
    (C, C) per block and split, so a folder of any size fits.
    """

    ridge: float = RIDGE
    train: list[_Moments] = field(default_factory=list)
    test: list[_Moments] = field(default_factory=list)

    def add(self, block: int, tokens: Tensor, targets: Tensor, held_out: Sequence[bool],
            score: Tensor | None = None) -> None:
        """tokens (B, h*w, C), targets (h*w, 2) in pixels, held_out (B,) per image; score (B, h*w) bool: the tokens
        of held-out images scored (default all)."""
        while len(self.train) <= block:
            self.train.append(_Moments())
            self.test.append(_Moments())
        x = tokens.detach().double().cpu().numpy()  # B, h*w, C
        y = targets.double().cpu().numpy()  # h*w, 2
        for split, keep in ((self.train[block], [not h for h in held_out]), (self.test[block], list(held_out))):
            if not any(keep):
                continue
            chosen = x[np.asarray(keep)]  # b, h*w, C
            targets_b = np.broadcast_to(y, (len(chosen), *y.shape))  # b, h*w, 2
            if score is not None and split is self.test[block]:
                mask = score.cpu().numpy()[np.asarray(keep)]  # b, h*w
                if mask.any():
                    split.add(chosen[mask], targets_b[mask])
            else:
                split.add(chosen.reshape(-1, x.shape[-1]), targets_b.reshape(-1, y.shape[-1]))

    def r2(self, blocks: int | None = None) -> np.ndarray:
        """(blocks, 2) held-out R² of the row (y) and column (x) coordinate for every block (NaN: not fitted)."""
        out = np.full((max(len(self.train), blocks or 0), 2), np.nan)
        for b, (tr, te) in enumerate(zip(self.train, self.test)):
            if tr.n == 0 or te.n == 0:
                continue
            w, c = ridge_fit(tr.xtx, tr.xty, tr.n, tr.sx, tr.sy, self.ridge)
            # Σ(y - xw - c)² expanded into the test sums, per target column
            sse = (te.yy - 2 * np.einsum("ct,ct->t", w, te.xty) - 2 * c * te.sy
                   + np.einsum("ct,cd,dt->t", w, te.xtx, w) + 2 * c * (te.sx @ w) + te.n * c * c)
            sst = te.yy - te.sy**2 / te.n
            out[b] = 1.0 - sse / np.maximum(sst, 1e-30)
        return out


# ------------------------------------------------------------------------------------ folders


@dataclass(frozen=True)
class Folder:
    """The image files of a folder and the files skipped as not images."""

    images: list[Path]
    skipped: list[Path]


def list_images(folder: str | Path, limit: int | None = None) -> Folder:
    """Image files of ``folder`` (not recursive), sorted by name; other files are listed as skipped.

    Raises:
        ValueError: the folder does not exist, or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass --images a folder of JPEG or PNG files")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                         f"{len(skipped)} other file(s) were found. Point --images at a folder of photos")
    return Folder(images[:limit] if limit else images, skipped)


def _read(path: Path) -> Image.Image | None:
    """The decoded image, or None (logged) when the file cannot be read as one."""
    try:
        return load_image(path)
    except (ImageError, OSError) as error:
        logger.warning("skipping %s: %s", path.name, error)
        return None


@dataclass
class FolderResult:
    """Everything :func:`measure_folder` measured, ready for ``measures.json`` and the plots."""

    model: str
    size: Size2
    images: int
    skipped: list[str]
    attention_distance: list[list[float]]
    distance_notes: list[str]
    filters: tuple[np.ndarray, np.ndarray] | str
    reliance: dict[str, Any]
    sweep: list[dict[str, Any]] | str
    decodability: np.ndarray
    held_out: int
    seconds: float
    token_norms: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``measures.json`` record."""
        filters = ({"not_applicable": self.filters} if isinstance(self.filters, str)
                   else {"components": len(self.filters[1]), "explained_variance": _round(self.filters[1])})
        return {
            "model": self.model,
            "input_size": list(self.size),
            "images": self.images,
            "skipped": {"count": len(self.skipped), "files": self.skipped},
            "mean_attention_distance": _round(self.attention_distance, 3),
            "mean_attention_distance_unit": "input pixels, from each query's image position to each key's; prefix "
                                            "and padding tokens dropped as queries and keys, no renormalisation",
            "mean_attention_distance_notes": {str(b): note for b, note in enumerate(self.distance_notes) if note},
            "patch_embedding_filters": filters,
            "position_reliance": _round(self.reliance),
            "resolution_sweep": self.sweep if isinstance(self.sweep, str) else _round(self.sweep),
            "position_decodability": {
                "r2_row": _round(self.decodability[:, 0]), "r2_col": _round(self.decodability[:, 1]),
                "r2": _round(self.decodability.mean(1)), "ridge": RIDGE,
                "train_images": self.images - self.held_out, "held_out_images": self.held_out,
            },
            "token_norms": _round(self.token_norms),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images / max(self.seconds, 1e-9), 3),
        }


def _round(value: Any, digits: int = 5) -> Any:
    """Nested lists / dicts / arrays of floats rounded for JSON."""
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    if isinstance(value, (np.ndarray, Tensor)):
        return _round(np.asarray(value, dtype=np.float64).tolist(), digits)
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


class _Mean:
    """Running means of named per-image tensors."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.double().sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def get(self, key: str) -> float:
        return self.sums[key] / self.counts[key]


def measure_folder(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    size: Size2 | None = None,
    batch: int = 16,
    sizes: Sequence[Size2] | None = None,
    seeds: Sequence[int] = SHUFFLE_SEEDS,
    progress: Callable[[int], None] | None = None,
) -> FolderResult:
    """All five measurements over image files, in batches.

    Args:
        loaded: the model.
        paths: image files; unreadable ones are skipped (and listed).
        size: (h, w) input size; None for the checkpoint's own.
        batch: images per forward pass.
        sizes: the resolution sweep's sizes; None for every size the app offers (:func:`posenc.views.input_sizes`).
        seeds: patch-shuffle seeds.
        progress: called with the number of files done after each batch.
    """
    from posenc import views

    started = time.perf_counter()
    model = loaded.model
    native = views.native_size(loaded) if size is None else tuple(size)
    sweep_sizes = sorted(set(views.input_sizes(loaded) if sizes is None else map(tuple, sizes)) | {native})
    transforms = {s: build_transform(replace(loaded.preprocess, input_size=s)) for s in sweep_sizes}
    device = next(model.parameters()).device
    headless = model.headless
    dist_sum: list[Tensor] = []
    notes: list[str] = []
    means, decode = _Mean(), Decodability()
    norms = NormStats(Decodability(), Decodability())
    skipped: list[str] = []
    used = held = 0
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        decoded = [(p, _read(p)) for p in chunk]
        skipped += [p.name for p, img in decoded if img is None]
        imgs = [img for _, img in decoded if img is not None]
        if imgs:
            holdout = [(used + i) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(imgs))]
            used += len(imgs)
            held += sum(holdout)
            _measure_batch(model, imgs, native, sweep_sizes, transforms, device, seeds, headless, holdout,
                           dist_sum, notes, means, decode, norms)
        if progress is not None:
            progress(len(chunk))
    if used == 0:
        raise ValueError(f"none of the {len(paths)} image files could be read ({len(skipped)} skipped); "
                         "check that they are JPEG or PNG photos")
    try:
        filters: tuple[np.ndarray, np.ndarray] | str = patch_embedding_filters(patch_conv(model).weight)
    except NotApplicable as error:
        filters = str(error)
    reliance: dict[str, Any] = {"seeds": list(seeds)}
    metrics = ("cosine",) if headless else ("top1_agreement", "kl", "p_original")
    reliance["shuffle"] = {m: means.get(f"shuffle/{m}") for m in metrics}
    reliance["shuffle_per_seed"] = [{m: means.get(f"shuffle{s}/{m}") for m in metrics} for s in seeds]
    reliance["no_position"] = {m: means.get(f"nopos/{m}") for m in metrics}
    if not headless:
        reliance["p_top1"] = means.get("p_top1")
    sweep: list[dict[str, Any]] | str = (
        "not applicable: the model is headless" if headless else
        [{"size": list(s), **{m: means.get(f"sweep{s}/{m}") for m in ("agrees", "p_top1", "p_native_class")}}
         for s in sweep_sizes]
    )
    return FolderResult(
        model=loaded.source, size=native, images=used, skipped=skipped,
        attention_distance=[(d / used).tolist() for d in dist_sum], distance_notes=notes, filters=filters,
        reliance=reliance,
        sweep=sweep, decodability=decode.r2(len(dist_sum)), held_out=held, seconds=time.perf_counter() - started,
        token_norms=norms.to_json(),
    )


def _measure_batch(
    model: nn.Module, imgs: list[Image.Image], native: Size2, sweep_sizes: list[Size2],
    transforms: dict[Size2, Callable[[Image.Image], Tensor]], device: torch.device, seeds: Sequence[int],
    headless: bool, holdout: list[bool], dist_sum: list[Tensor], notes: list[str], means: _Mean, decode: Decodability,
    norms: NormStats,
) -> None:
    """One batch of :func:`measure_folder`: one inspection pass, the reliance passes, the sweep passes."""
    inputs = {s: torch.stack([transforms[s](img) for img in imgs]).to(device) for s in sweep_sizes}  # B, 3, h, w
    x = inputs[native]
    with torch.inference_mode():
        with block_outputs(model) as tokens:
            seen = model.inspect(x)
        for b, trace in enumerate(seen.blocks):
            try:
                d = block_attention_distance(trace)  # B, heads
            except NotApplicable as error:  # NaN in measures.json (null), with the block's note
                logger.debug("block %d: no attention distance: %s", b, error)
                d = torch.full((x.shape[0], trace.attn.shape[-3]), math.nan, dtype=torch.float64)
                note = str(error)
            else:
                note = ""
            if len(dist_sum) <= b:
                dist_sum.append(torch.zeros(d.shape[1], dtype=torch.float64))
                notes.append(note)
            dist_sum[b] += d.sum(0).cpu()
        if len(tokens) == len(seen.blocks):
            for b, (out, trace) in enumerate(zip(tokens, seen.blocks)):
                try:
                    found = patch_tokens(out, trace)  # B, hq*wq, C
                    targets = trace.layout.query_pixels[len(trace.layout.query_prefix) :]  # hq*wq, 2
                    decode.add(b, found, targets, holdout)
                except NotApplicable as error:  # that block's R² stays NaN
                    logger.debug("block %d: no decodability: %s", b, error)
            norms.add(tokens, seen, holdout)
        patch = (native[0] // seen.grid[0], native[1] // seen.grid[1])
        rel = position_reliance(model, x, patch, seeds=seeds, reference=seen.logits)
        for s, found in zip(seeds, rel["shuffle"]):
            for m, v in found.items():
                means.add(f"shuffle{s}/{m}", v)
                means.add(f"shuffle/{m}", v)
        for m, v in rel["no_position"].items():
            means.add(f"nopos/{m}", v)
        if not headless:
            means.add("p_top1", rel["p_top1"])
            for s, found in resolution_sweep(model, inputs, native, reference=seen.logits).items():
                for m in ("agrees", "p_top1", "p_native_class"):
                    means.add(f"sweep{s}/{m}", found[m])


# ------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``measure`` subcommand."""
    parser = subparsers.add_parser(
        "measure", help="measure how a model uses position over an image folder (writes measures.json + PNG plots)")
    parser.add_argument("--model", required=True, help="Hub repo id (org/name) or a folder with config.json + weights")
    parser.add_argument("--images", required=True, help="folder of images (JPEG, PNG, ...); not recursive")
    parser.add_argument("--out", required=True, help="output folder for measures.json and the PNG plots")
    parser.add_argument("--size", default=None, help="input size HxW (default: the checkpoint's own)")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="use the first N images")
    parser.add_argument("--batch", type=_positive_int, default=16, metavar="B", help="images per batch (default 16)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, measure the folder, write ``OUT/measures.json`` and the plots; returns the exit status."""
    from posenc import plots, views
    from posenc.hub import load

    try:
        folder = list_images(args.images, args.limit)
    except ValueError as error:
        return _fail(str(error))
    try:
        loaded = load(args.model, revision=args.revision)
        size = None if args.size is None else views.parse_size(args.size, loaded)
    except (HubLoadError, ValueError) as error:
        return _fail(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _progress(len(folder.images)) as step:
        result = _safe_measure(loaded, folder.images, size, args.batch, step)
    if isinstance(result, str):
        return _fail(result)
    record = result.to_json()
    record["skipped"]["files"] += [p.name for p in folder.skipped]
    record["skipped"]["count"] = len(record["skipped"]["files"])
    record["plots"] = [p.name for p in plots.write_folder_plots(result, out)]
    (out / "measures.json").write_text(json.dumps(record, indent=1) + "\n")
    skipped = record["skipped"]["count"]
    print(f"measured {result.images} images in {result.seconds:.1f} s "
          f"({record['images_per_second']:.2f} images/s); skipped {skipped} file(s) that are not readable images; "
          f"wrote {out / 'measures.json'} and {len(record['plots'])} plots", file=sys.stderr)
    return 0


def _safe_measure(loaded: LoadedModel, images: list[Path], size: Size2 | None, batch: int,
                  step: Callable[[int], None]) -> FolderResult | str:
    try:
        return measure_folder(loaded, images, size=size, batch=batch, progress=step)
    except ValueError as error:
        return str(error)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr counting files; yields its ``update``."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="measuring", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()


def _fail(message: str) -> int:
    """Print one line to stderr and return the usage-error status (2)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
