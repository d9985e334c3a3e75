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
* :func:`rope_scale_sweep`: for a model with a rotary mechanism, the model with its RoPE coordinates multiplied by
  s (``model(x, rope_scale=s)``) at the native input size against s = 1 (DINOv3 trains with such "box
  jittering"); headless: the feature cosine.
* :func:`topk_accuracy`: with class labels (:func:`folder_labels`), the sweeps and the reliance also report top-1
  and top-5 accuracy.
* :class:`Decodability`: a closed-form ridge regression from the tokens after each block to each token's
  image position (row, column) from the block's layout, fitted on some images and scored as R² on held-out ones, from streamed statistics.
* token norms (:mod:`posenc.norms`): the share of high-norm output tokens per block and the decodability of the
  high-norm tokens against the rest (``"token_norms"`` in ``measures.json``).

:func:`measure_folder` runs them all over an image folder in batches (one shard per rank under ``torchrun``,
sums reduced across ranks: :mod:`posenc.distributed`), and ``python -m posenc measure`` (see :func:`add_parser`)
writes ``measures.json`` and PNG plots.
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

from posenc import distributed
from posenc.distributed import Ranks
from posenc.encodings import Size2
from posenc.hub import HubLoadError, LoadedModel
from posenc.models import BlockTrace, Inspection
from posenc.norms import NormStats, block_outputs
from posenc.rollout import RolloutUnavailable, block_tokens, rollout_pair
from posenc.preprocess import ImageError, build_transform, load_image
from posenc.synsets import SYNSET, synset_index

logger = logging.getLogger(__name__)

#: Principal components of the patch-embedding filters drawn (the ViT paper shows 28).
NUM_FILTER_PCS = 28
#: Seeds of the patch shuffles.
SHUFFLE_SEEDS = (0, 1, 2)
#: Ridge strength, relative to the mean diagonal of the (centred) token Gram matrix.
RIDGE = 1e-3
#: Every ``HOLDOUT_EVERY``-th image (by sorted file name) is held out for the decodability R².
HOLDOUT_EVERY = 5
#: Coordinate scales s of the RoPE sweep (DINOv3's box jittering draws s in [0.5, 2]).
ROPE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
#: Mechanisms (names of :mod:`posenc.mechanisms`) that rotate queries and keys: the models that take ``rope_scale``.
ROTARY_MECHANISMS = ("rope_axial", "rope_mixed")
#: At most this many final tokens (evenly spaced) start the folder's rollout rows, to bound its memory.
ROLLOUT_STARTS = 64
#: What the folder's ``"rollout"`` record compares.
ROLLOUT_RULE = ("attention rollout (heads averaged, identity added, rows renormalised, multiplied through every block) "
                "from the final tokens (at most 64, evenly spaced) with position against without it: each block's "
                "attention without its position term, or, for a model whose position enters only at the input, the model "
                "run with position=False; total_variation = half the L1 distance between the two rows (0 = the same)")
#: The folder's rollout record: per image, averaged over its starting tokens, then over the images.
ROLLOUT_KEYS = ("total_variation", "prefix_share", "prefix_share_no_pos")
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
    model: nn.Module, x: Tensor, patch: Size2, *, seeds: Sequence[int] = SHUFFLE_SEEDS, reference: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[str, Any]:
    """The model as it is against shuffled patches (one permutation per seed) and against no position term.

    Args:
        model: a posenc model (``model(x, position=False)``, ``model.headless``).
        x: (B, 3, H, W) model input.
        patch: (ph, pw) patch size in pixels.
        seeds: one seeded permutation of the patches each.
        reference: (B, K) the model's output on ``x`` when already computed.
        labels: (B,) class indices (-1: unknown) to add accuracies; None for none (ignored when headless).

    Returns:
        {"shuffle": [per seed: :func:`compare_outputs` dict], "no_position": dict, "p_top1": (B,) the original
        top-1 probability (absent when headless)}; with labels also "accuracy": {"original": dict, "shuffle":
        [per seed: dict], "no_position": dict}, each :func:`topk_accuracy`.
    """
    headless = bool(getattr(model, "headless", False))
    ref = model(x) if reference is None else reference
    grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    shuffled = [model(shuffle_patches(x, patch, seeded_permutation(grid[0] * grid[1], s))) for s in seeds]
    plain = model(x, position=False)
    out: dict[str, Any] = {"shuffle": [compare_outputs(ref, o, headless=headless) for o in shuffled],
                           "no_position": compare_outputs(ref, plain, headless=headless)}
    if not headless:
        out["p_top1"] = ref.double().softmax(-1).amax(-1)
        if labels is not None:
            out["accuracy"] = {"original": topk_accuracy(ref, labels),
                               "shuffle": [topk_accuracy(o, labels) for o in shuffled],
                               "no_position": topk_accuracy(plain, labels)}
    return out


# ------------------------------------------------------------------------------------ 4. resolution sweep


def resolution_sweep(
    model: nn.Module, inputs: dict[Size2, Tensor], native: Size2, reference: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[Size2, dict[str, Tensor]]:
    """Top-1 and its probability at each input size (the model resamples its own positions).

    Args:
        model: a classifier.
        inputs: (h, w) -> (B, 3, h, w) the same images preprocessed at that size.
        native: the size whose top-1 is the reference.
        reference: (B, K) logits at ``native`` when already computed.
        labels: (B,) class indices (-1: unknown) to add :func:`topk_accuracy` at each size; None for none.

    Returns:
        size -> {"top1": (B,) class, "p_top1": (B,), "agrees": (B,) 1.0 where the top-1 equals the native
        one, "p_native_class": (B,) probability of the native top-1 class}, plus the accuracy keys with labels.
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
        if labels is not None:
            out[size].update(topk_accuracy(lg, labels))
    return out


def topk_accuracy(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Top-1 (and top-5 when there are at least 5 classes) correctness of the labelled images.

    Args:
        logits: (B, K).
        labels: (B,) class index, -1 for an image without a label.

    Returns:
        {"top1_accuracy": (b,), "top5_accuracy": (b,)} of 1.0 / 0.0 over the b labelled images (b may be 0).
    """
    known = labels >= 0  # B
    lg, y = logits[known.to(logits.device)], labels[known].to(logits.device)  # b, K and b
    out = {"top1_accuracy": (lg.argmax(-1) == y).double()}
    if logits.shape[-1] >= 5:
        out["top5_accuracy"] = (lg.topk(5, dim=-1).indices == y[:, None]).any(-1).double()
    return out


def has_rotary(model: nn.Module) -> bool:
    """Whether the model has a rotary mechanism (and so takes ``model(x, rope_scale=s)``)."""
    return any(m in ROTARY_MECHANISMS for m in getattr(model, "mechanisms", ()))


def rope_scale_sweep(
    model: nn.Module, x: Tensor, scales: Sequence[float] = ROPE_SCALES, *, reference: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[float, dict[str, Tensor]]:
    """The model with its RoPE coordinates multiplied by s, at the input size of ``x``, against s = 1.

    Args:
        model: a posenc model with a rotary mechanism (``model(x, rope_scale=s)``).
        x: (B, 3, H, W) model input.
        scales: the coordinate scales s.
        reference: (B, K) the model's output on ``x`` (s = 1) when already computed.
        labels: (B,) class indices (-1: unknown) to add :func:`topk_accuracy`; None for none.

    Returns:
        s -> :func:`compare_outputs` against s = 1 ({"top1_agreement", "kl", "p_original"} of (B,), with "top1"
        (B,) the class at s; headless: {"cosine"}), plus the accuracy keys when ``labels`` is given.
    """
    if not has_rotary(model):
        raise NotApplicable("the model has no rotary mechanism: the coordinate scale exists for RoPE only")
    headless = bool(getattr(model, "headless", False))
    ref = model(x) if reference is None else reference
    out = {}
    for s in scales:
        other = ref if s == 1.0 else model(x, rope_scale=float(s))
        found = compare_outputs(ref, other, headless=headless)
        if not headless:
            found["top1"] = other.argmax(-1)
            if labels is not None:
                found.update(topk_accuracy(other, labels))
        out[float(s)] = found
    return out


# ------------------------------------------------------------------------------------ 5. decodability


def patch_tokens(tokens: Tensor, trace: BlockTrace) -> Tensor:
    """A block's output as its patch tokens, prefix dropped: (B, P + h*w, C) or (B, h, w, C) -> (B, h*w, C); their
    positions are ``trace.outputs().patch_pixels`` (:meth:`BlockTrace.outputs`)."""
    try:
        return trace.outputs().split(tokens)[1]  # B, h*w, C
    except ValueError as error:  # no output layout (NoTokenLayout), or no patch tokens leave the block
        raise NotApplicable(str(error)) from None


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
    root: Path | None = None


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES])


def list_images(folder: str | Path, limit: int | None = None) -> Folder:
    """Image files of ``folder``, sorted; other files are listed as skipped.

    The folder's own images are taken (not recursive). A folder that holds no image itself but subfolders of
    images is read in the ImageFolder layout: the images of each subfolder (one level), the subfolder's name being
    the class (see :func:`folder_labels`), sorted by subfolder then name.

    Raises:
        ValueError: the folder does not exist, or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass --images a folder of JPEG or PNG files")
    images, skipped = _image_files(root)
    if not images:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found, other = _image_files(sub)
            images += found
            skipped += other
    if not images:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                         f"{len(skipped)} other file(s) were found. Point --images at a folder of photos")
    return Folder(images[:limit] if limit else images, skipped, root)


def read_labels_file(path: str | Path) -> dict[str, str]:
    """A labels file: one ``filename<TAB or comma>class`` per line (class: a name, a synset id or an index).

    Blank lines and lines starting with ``#`` are ignored; the file name may include the class subfolder.

    Raises:
        ValueError: a line has no separator, or the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read the labels file {path}: {error}") from error
    found = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else ","
        if sep not in line:
            raise ValueError(f"{path}, line {number}: expected 'filename<TAB or comma>class', got {line!r}")
        name, label = line.split(sep, 1)
        found[name.strip()] = label.strip()
    return found


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def class_index(label: str, class_names: Sequence[str]) -> int | None:
    """The model's class index of a label: an integer index, an ImageNet synset id (1000 classes), or a class name.

    Names match the model's labels ignoring case, ``_`` / ``-`` against spaces, and (for names like ImageNet's
    "tench, Tinca tinca") any of the comma-separated synonyms. None when nothing matches.
    """
    text = label.strip()
    if text.isdigit():
        return int(text) if int(text) < len(class_names) else None
    if SYNSET.fullmatch(text):
        return synset_index(text) if len(class_names) == 1000 else None
    wanted = _norm(text)
    for i, name in enumerate(class_names):
        if _norm(name) == wanted or wanted in (_norm(part) for part in name.split(",")):
            return i
    return None


def folder_labels(paths: Sequence[Path], class_names: Sequence[str], *, root: Path | None = None,
                  labels_file: str | Path | None = None) -> tuple[list[int], dict[str, Any]]:
    """The class index of every image (-1: unknown), from the first source that applies.

    Sources, first match wins: a labels file (:func:`read_labels_file`, keyed by the file name or its path
    relative to ``root``); the ImageFolder layout (the image's subfolder under ``root`` names the class); an
    ImageNet synset prefix in the file name (``n01440764_tench.JPEG``, the shared photos' naming; 1000 classes).

    Returns:
        (one index per path, {"source": str or None, "labelled": count, "unresolved": [labels that match no
        class]}).
    """
    table = read_labels_file(labels_file) if labels_file is not None else None
    found, unresolved, sources = [], set(), set()
    for path in paths:
        rel = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
        if table is not None:
            text, source = table.get(rel, table.get(path.name)), "labels file"
        elif root is not None and path.parent != root:
            text, source = path.parent.name, "class folders"
        else:
            prefix = path.name.split("_", 1)[0]
            text, source = (prefix, "synset prefix in the file name") if SYNSET.fullmatch(prefix) else (None, None)
        index = None if text is None else class_index(text, class_names)
        if text is not None and index is None:
            unresolved.add(text)
        if index is not None:
            sources.add(source)
        found.append(-1 if index is None else index)
    info = {"source": " + ".join(sorted(sources)) or None, "labelled": sum(i >= 0 for i in found),
            "unresolved": sorted(unresolved)}
    return found, info


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
    rollout: dict[str, Any] = field(default_factory=dict)
    rope_sweep: list[dict[str, Any]] | str = "not applicable: no rotary mechanism"
    labels: dict[str, Any] | None = None
    processes: int = 1

    def to_json(self) -> dict[str, Any]:
        """The ``measures.json`` record."""
        filters = ({"not_applicable": self.filters} if isinstance(self.filters, str)
                   else {"components": len(self.filters[1]), "explained_variance": _round(self.filters[1])})
        return {
            "model": self.model,
            "input_size": list(self.size),
            "images": self.images,
            "skipped": {"count": len(self.skipped), "files": self.skipped},
            "labels": self.labels or {"source": None, "labelled": 0, "unresolved": []},
            "mean_attention_distance": _round(self.attention_distance, 3),
            "mean_attention_distance_unit": "input pixels, from each query's image position to each key's; prefix "
                                            "and padding tokens dropped as queries and keys, no renormalisation",
            "mean_attention_distance_notes": {str(b): note for b, note in enumerate(self.distance_notes) if note},
            "patch_embedding_filters": filters,
            "position_reliance": _round(self.reliance),
            "resolution_sweep": self.sweep if isinstance(self.sweep, str) else _round(self.sweep),
            "rope_scale_sweep": self.rope_sweep if isinstance(self.rope_sweep, str) else _round(self.rope_sweep),
            "position_decodability": {
                "r2_row": _round(self.decodability[:, 0]), "r2_col": _round(self.decodability[:, 1]),
                "r2": _round(self.decodability.mean(1)), "ridge": RIDGE,
                "train_images": self.images - self.held_out, "held_out_images": self.held_out,
            },
            "token_norms": _round(self.token_norms),
            "rollout": _round(self.rollout),
            "processes": self.processes,
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
    """Running sums and counts of named per-image tensors (sums, so ranks can add theirs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: Tensor) -> None:
        if values.numel() == 0:
            return
        self.sums[key] = self.sums.get(key, 0.0) + float(values.double().sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def get(self, key: str) -> float | None:
        """The mean, or None when nothing was added (e.g. an accuracy without labelled images)."""
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None


@dataclass
class _Sums:
    """What one rank accumulates over its shard; :func:`_reduce` adds the ranks' together."""

    dist_sum: list[Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # per block: why it has no attention distance, or ""
    means: _Mean = field(default_factory=_Mean)
    decode: Decodability = field(default_factory=Decodability)
    norms: NormStats = field(default_factory=lambda: NormStats(Decodability(), Decodability()))
    skipped: list[str] = field(default_factory=list)
    used: int = 0
    held: int = 0


_MOMENT_FIELDS = ("n", "sx", "sy", "xtx", "xty", "yy")


def _flat_moments(name: str, decode: Decodability) -> dict[str, Any]:
    """A :class:`Decodability`'s ridge moments as named sums for :func:`posenc.distributed.all_sum`."""
    flat = {}
    for split, moments in (("train", decode.train), ("test", decode.test)):
        for b, m in enumerate(moments):
            if m.n:
                flat.update({f"{name}/{split}/{b:04d}/{f}": getattr(m, f) for f in _MOMENT_FIELDS})
    return flat


def _summed_moments(name: str, total: dict[str, Any], ridge: float) -> Decodability:
    """The :class:`Decodability` whose moments are the summed ones :func:`_flat_moments` named."""
    blocks = {int(k.split("/")[2]) for k in total if k.startswith(f"{name}/")}
    out = Decodability(ridge=ridge)
    for b in range(max(blocks, default=-1) + 1):
        for split, moments in (("train", out.train), ("test", out.test)):
            key = f"{name}/{split}/{b:04d}/"
            moments.append(_Moments(**{f: total[key + f] for f in _MOMENT_FIELDS}) if key + "n" in total
                           else _Moments())
    return out


def _reduce(sums: _Sums, ranks: Ranks) -> _Sums:
    """Every rank's sums added (attention distances, means, ridge moments, token norms, counts); itself with one
    process. Per-block notes are the same on every rank that measured an image; the first rank's that has them wins."""
    if ranks.world_size == 1:
        return sums
    norms = sums.norms
    flat: dict[str, Any] = {"used": sums.used, "held": sums.held, "norms/images": norms.images}
    flat.update({f"dist/{b:04d}": d.numpy() for b, d in enumerate(sums.dist_sum)})
    flat.update({f"sum/{k}": v for k, v in sums.means.sums.items()})
    flat.update({f"count/{k}": v for k, v in sums.means.counts.items()})
    flat.update(_flat_moments("decode", sums.decode))
    flat.update(_flat_moments("high", norms.probe_high))
    flat.update(_flat_moments("normal", norms.probe_normal))
    for b, (high, count, patch) in enumerate(zip(norms.high, norms.total, norms.patch_norm)):
        flat.update({f"norms/high/{b:04d}": high, f"norms/total/{b:04d}": count, f"norms/patch/{b:04d}": patch})
        flat.update({f"norms/prefix/{b:04d}/{k}": v for k, v in norms.prefix_norm[b].items()})
    total = distributed.all_sum(flat, ranks)
    out = _Sums(used=total["used"], held=total["held"], skipped=distributed.all_gather_list(sums.skipped, ranks))
    out.dist_sum = [torch.from_numpy(total[k]) for k in sorted(k for k in total if k.startswith("dist/"))]
    out.notes = next((n for n in distributed.all_gather_list([sums.notes], ranks) if n), [])
    out.means.sums = {k[4:]: v for k, v in total.items() if k.startswith("sum/")}
    out.means.counts = {k[6:]: v for k, v in total.items() if k.startswith("count/")}
    out.decode = _summed_moments("decode", total, sums.decode.ridge)
    out.norms = NormStats(_summed_moments("high", total, norms.probe_high.ridge),
                          _summed_moments("normal", total, norms.probe_normal.ridge), images=total["norms/images"])
    blocks = sorted({int(k.split("/")[2]) for k in total if k.startswith("norms/high/")})
    for b in range(max(blocks, default=-1) + 1):
        out.norms.high.append(total.get(f"norms/high/{b:04d}", 0))
        out.norms.total.append(total.get(f"norms/total/{b:04d}", 0))
        out.norms.patch_norm.append(total.get(f"norms/patch/{b:04d}", 0.0))
        prefix = f"norms/prefix/{b:04d}/"
        out.norms.prefix_norm.append({k[len(prefix):]: v for k, v in total.items() if k.startswith(prefix)})
    for found in distributed.all_gather_list([norms.notes], ranks):
        for b, note in found.items():
            out.norms.notes.setdefault(b, note)
    return out


def measure_folder(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    size: Size2 | None = None,
    batch: int = 16,
    sizes: Sequence[Size2] | None = None,
    seeds: Sequence[int] = SHUFFLE_SEEDS,
    rope_scales: Sequence[float] = ROPE_SCALES,
    labels: Sequence[int] | None = None,
    label_info: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    ranks: Ranks | None = None,
) -> FolderResult:
    """All the measurements over image files, in batches; under torchrun each rank takes a shard.

    Args:
        loaded: the model (on ``ranks.device`` or any device: inputs follow its parameters).
        paths: image files, the same list on every rank; unreadable ones are skipped (and listed).
        size: (h, w) input size; None for the checkpoint's own.
        batch: images per forward pass.
        sizes: the resolution sweep's sizes; None for every size the app offers (:func:`posenc.views.input_sizes`).
        seeds: patch-shuffle seeds.
        rope_scales: the RoPE coordinate scales (models with a rotary mechanism; 1 is added).
        labels: one class index per path (-1: unknown), e.g. from :func:`folder_labels`; None: no accuracy.
        label_info: where ``labels`` came from, recorded in ``measures.json``.
        progress: called with the number of files done after each batch (by every rank; show it on rank 0).
        ranks: this process among torchrun's (:func:`posenc.distributed.join`); every rank measures
            ``paths[rank::world_size]`` and gets the same, reduced, result. None: one process.
    """
    from posenc import views

    ranks = ranks or Ranks()
    started = time.perf_counter()
    model = loaded.model
    native = views.native_size(loaded) if size is None else tuple(size)
    sweep_sizes = sorted(set(views.input_sizes(loaded) if sizes is None else map(tuple, sizes)) | {native})
    scales = sorted({float(s) for s in rope_scales} | {1.0}) if has_rotary(model) else []
    transforms = {s: build_transform(replace(loaded.preprocess, input_size=s)) for s in sweep_sizes}
    device = next(model.parameters()).device
    headless = model.headless
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} images: give one label (or -1) per image")
    labelled = labels is not None and not headless and any(i >= 0 for i in labels)
    mine = list(ranks.shard(len(paths)))
    sums = _Sums()
    for start in range(0, len(mine), batch):
        chunk = mine[start : start + batch]
        decoded = [(i, _read(paths[i])) for i in chunk]
        sums.skipped += [paths[i].name for i, img in decoded if img is None]
        kept = [(i, img) for i, img in decoded if img is not None]
        if kept:
            holdout = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i, _ in kept]  # by place in the sorted folder
            sums.used += len(kept)
            sums.held += sum(holdout)
            y = torch.tensor([labels[i] for i, _ in kept]) if labelled else None
            _measure_batch(model, [img for _, img in kept], native, sweep_sizes, transforms, device, seeds,
                           headless, holdout, sums, y, scales)
        if progress is not None:
            progress(len(chunk))
    sums = _reduce(sums, ranks)
    used, means = sums.used, sums.means
    if used == 0:
        raise ValueError(f"none of the {len(paths)} image files could be read ({len(sums.skipped)} skipped); "
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
    accuracies = [k for k in ("top1_accuracy", "top5_accuracy") if f"acc/original/{k}" in means.counts]
    if accuracies:
        reliance["accuracy"] = {part: {k: means.get(f"acc/{part}/{k}") for k in accuracies}
                                for part in ("original", "shuffle", "no_position")}
    sweep_keys = ("agrees", "p_top1", "p_native_class", *accuracies)
    sweep: list[dict[str, Any]] | str = (
        "not applicable: the model is headless" if headless else
        [{"size": list(s), **{m: means.get(f"sweep{s}/{m}") for m in sweep_keys}} for s in sweep_sizes]
    )
    rope_keys = ("cosine",) if headless else ("top1_agreement", "p_original", "kl", *accuracies)
    rope_sweep: list[dict[str, Any]] | str = (
        [{"scale": s, **{m: means.get(f"rope{s}/{m}") for m in rope_keys}} for s in scales] if scales
        else "not applicable: no rotary mechanism"
    )
    return FolderResult(
        model=loaded.source, size=native, images=used, skipped=sums.skipped,
        attention_distance=[(d / used).tolist() for d in sums.dist_sum], distance_notes=sums.notes,
        filters=filters, reliance=reliance,
        sweep=sweep, decodability=sums.decode.r2(len(sums.dist_sum)), held_out=sums.held,
        seconds=time.perf_counter() - started, rope_sweep=rope_sweep,
        labels=label_info if labels is not None else None, processes=ranks.world_size,
        token_norms=sums.norms.to_json(),
        rollout={"rule": ROLLOUT_RULE, **{k: means.get(f"rollout/{k}") for k in ROLLOUT_KEYS}},
    )


def _measure_batch(
    model: nn.Module, imgs: list[Image.Image], native: Size2, sweep_sizes: list[Size2],
    transforms: dict[Size2, Callable[[Image.Image], Tensor]], device: torch.device, seeds: Sequence[int],
    headless: bool, holdout: list[bool], sums: _Sums, labels: Tensor | None, scales: Sequence[float],
) -> None:
    """One batch of :func:`measure_folder`: one inspection pass, the reliance, sweep and RoPE-scale passes."""
    dist_sum, notes, means, decode, norms = sums.dist_sum, sums.notes, sums.means, sums.decode, sums.norms
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
                    targets = trace.outputs().patch_pixels  # hq*wq, 2
                    decode.add(b, found, targets, holdout)
                except NotApplicable as error:  # that block's R² stays NaN
                    logger.debug("block %d: no decodability: %s", b, error)
            norms.add(tokens, seen, holdout)
        _add_rollout(model, x, seen, means)
        patch = (native[0] // seen.grid[0], native[1] // seen.grid[1])
        rel = position_reliance(model, x, patch, seeds=seeds, reference=seen.logits, labels=labels)
        for s, found in zip(seeds, rel["shuffle"]):
            for m, v in found.items():
                means.add(f"shuffle{s}/{m}", v)
                means.add(f"shuffle/{m}", v)
        for m, v in rel["no_position"].items():
            means.add(f"nopos/{m}", v)
        for part, found in rel.get("accuracy", {}).items():
            for acc in found if isinstance(found, list) else [found]:
                for m, v in acc.items():
                    means.add(f"acc/{part}/{m}", v)
        if not headless:
            means.add("p_top1", rel["p_top1"])
            swept = resolution_sweep(model, inputs, native, reference=seen.logits, labels=labels)
            for s, found in swept.items():
                for m, v in found.items():
                    if m != "top1":
                        means.add(f"sweep{s}/{m}", v)
        if scales:
            for s, found in rope_scale_sweep(model, x, scales, reference=seen.logits, labels=labels).items():
                for m, v in found.items():
                    if m != "top1":
                        means.add(f"rope{s}/{m}", v)


def _add_rollout(model: nn.Module, x: Tensor, seen: Inspection, means: _Mean) -> None:
    """Per image: the total variation between the rollouts with and without position (:data:`ROLLOUT_RULE`), and
    the share of the input prefix tokens in each; a model whose rollout cannot be formed adds nothing (logged)."""
    try:
        total = len(block_tokens(seen)[-1])  # the final tokens
        picks = torch.linspace(0, total - 1, min(total, ROLLOUT_STARTS)).round().long()  # R
        select = torch.eye(total, dtype=torch.float64)[picks]  # R, T
        with_pos, without_pos, _ = rollout_pair(model, x, seen, select=select)
    except RolloutUnavailable as error:
        logger.debug("no rollout: %s", error)
        return
    a, b = with_pos.rows, without_pos.rows  # B, R, P + N
    means.add("rollout/total_variation", 0.5 * (a - b).abs().sum(-1).mean(-1))  # B
    p = len(with_pos.inputs.prefix)
    if p:
        means.add("rollout/prefix_share", a[..., :p].sum(-1).mean(-1))  # B
        means.add("rollout/prefix_share_no_pos", b[..., :p].sum(-1).mean(-1))  # B


# ------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.5,1,2, got {text!r}") from error
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every scale must be a positive number, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``measure`` subcommand."""
    parser = subparsers.add_parser(
        "measure", help="measure how a model uses position over an image folder (writes measures.json + PNG plots)",
        description="Runs under torchrun too (torchrun --nproc_per_node N -m posenc measure ...): each rank measures "
                    "a shard of the folder, the sums are reduced, and rank 0 writes the files.")
    parser.add_argument("--model", required=True, help="Hub repo id (org/name) or a folder with config.json + weights")
    parser.add_argument("--images", required=True,
                        help="folder of images (JPEG, PNG, ...), not recursive; or, when it holds no image itself, "
                             "class subfolders of images (the ImageFolder layout: the subfolder names the class)")
    parser.add_argument("--out", required=True, help="output folder for measures.json and the PNG plots")
    parser.add_argument("--size", default=None, help="input size HxW (default: the checkpoint's own)")
    parser.add_argument("--sizes", default=None, metavar="S,S,...",
                        help="the resolution sweep's input sizes, e.g. 224,384,448,512 or 224x224,... (default: the "
                             "sizes the app offers); the native size is always added")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="use the first N images")
    parser.add_argument("--batch", type=_positive_int, default=16, metavar="B", help="images per batch (default 16)")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="labels file: lines 'filename<TAB or comma>class' (a class name, an ImageNet synset id "
                             "or an index); without it, class subfolders or a synset prefix in the file names "
                             "(n01440764_tench.JPEG) label the images when present")
    parser.add_argument("--rope-scales", type=_scales, default=list(ROPE_SCALES), metavar="S,S,...",
                        help="RoPE coordinate scales for models with a rotary mechanism (default "
                             f"{','.join(f'{s:g}' for s in ROPE_SCALES)})")
    distributed.add_device_option(parser)
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, measure the folder, write ``OUT/measures.json`` and the plots; returns the exit status.

    Under torchrun every rank runs this; they measure their shards and rank 0 writes the files.
    """
    with distributed.joined(getattr(args, "device", "auto")) as ranks:
        return _run(args, ranks)


def _run(args: argparse.Namespace, ranks: Ranks) -> int:
    from posenc import plots, views
    from posenc.hub import load

    try:
        folder = list_images(args.images, args.limit)
    except ValueError as error:
        return _fail(str(error))
    try:
        loaded = load(args.model, revision=args.revision)
        size = None if args.size is None else views.parse_size(args.size, loaded)
        sizes = None if getattr(args, "sizes", None) is None else _sweep_sizes(args.sizes, loaded)
        labels, info = folder_labels(folder.images, loaded.labels, root=folder.root,
                                     labels_file=getattr(args, "labels", None))
    except (HubLoadError, ValueError) as error:
        return _fail(str(error))
    loaded.model.to(ranks.device)
    out = Path(args.out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    options = dict(size=size, sizes=sizes, batch=args.batch, rope_scales=getattr(args, "rope_scales", ROPE_SCALES),
                   labels=labels if info["labelled"] else None, label_info=info, ranks=ranks)
    with _progress(len(folder.images), ranks) as step:
        try:
            result: FolderResult | str = measure_folder(loaded, folder.images, progress=step, **options)
        except ValueError as error:
            result = str(error)
    if isinstance(result, str):
        return _fail(result)
    if not ranks.main:
        return 0
    record = result.to_json()
    record["skipped"]["files"] += [p.name for p in folder.skipped]
    record["skipped"]["count"] = len(record["skipped"]["files"])
    record["plots"] = [p.name for p in plots.write_folder_plots(result, out)]
    (out / "measures.json").write_text(json.dumps(record, indent=1) + "\n")
    skipped = record["skipped"]["count"]
    print(f"measured {result.images} images in {result.seconds:.1f} s "
          f"({record['images_per_second']:.2f} images/s, {ranks.world_size} process(es)); skipped {skipped} "
          f"file(s) that are not readable images; labelled {info['labelled']}; "
          f"wrote {out / 'measures.json'} and {len(record['plots'])} plots", file=sys.stderr)
    return 0


def _sweep_sizes(text: str, loaded: LoadedModel) -> list[Size2]:
    """Sizes "224,384" or "224x224,384x384" that the model takes (multiples of its size step)."""
    found = []
    for part in text.replace(" ", "").split(","):
        numbers = part.lower().split("x")
        if not part or not all(n.isdigit() and int(n) > 0 for n in numbers) or len(numbers) > 2:
            raise ValueError(f"--sizes {text!r}: write sizes as 224,384 or 224x224,384x384")
        size = (int(numbers[0]), int(numbers[-1]))
        if not loaded.model.fits(size):
            raise ValueError(f"--sizes: the model does not take {size[0]}x{size[1]} (every side must be a multiple "
                             f"of {loaded.model.size_step()})")
        found.append(size)
    return found


@contextmanager
def _progress(total: int, ranks: Ranks | None = None) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr counting files, on rank 0 only (its shard's steps times the ranks); yields ``update``."""
    ranks = ranks or Ranks()
    if not ranks.main:
        yield lambda _done: None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc="measuring", unit="img", file=sys.stderr, dynamic_ncols=True)

    def step(done: int) -> None:
        bar.update(min(done * ranks.world_size, total - bar.n))

    try:
        yield step
    finally:
        bar.close()


def _fail(message: str) -> int:
    """Print one line to stderr and return the usage-error status (2)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
