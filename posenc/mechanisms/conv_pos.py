"""Convolutional position: a depthwise convolution with zero padding over the token grid (Twins' PEG, CoaT's CPE), and
CoaT's convolutional relative position encoding on the values (CRPE).

Neither has a position tensor of its own: the convolution adds ``conv(x)`` to the tokens (PEG, CPE) or
``q * conv(v)`` to the attention's output (CRPE), computed from *this* image's tokens. Position comes from the zero
padding: at the border the kernel sees zeros, so border tokens get another contribution than interior ones
whatever the image shows. The views therefore draw the contribution per token (its norm over the channels, the
convolution's output minus its input) for this image beside the same for a blank image (the mean colour, 0 after
normalisation), where content is constant and what is left is position: flat inside, different at the borders.
The blank image is run through the model when the first of these views is drawn (one more forward pass per
request, shared by the views).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from posenc import views, viz
from posenc.encodings import Size2
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.models import BlockTrace, Inspection
from posenc.views import Patch, Seen, View, ViewUnavailable

#: Inspection keys (``BlockTrace.position``) of the two mechanisms.
CONV_POS = "conv_pos"
CONV_REL_POS = "conv_rel_pos"
_BLANK = "blank image (mean colour)"


def token_norm(delta: torch.Tensor) -> np.ndarray:
    """The norm over channels of a per-token contribution.

    Args:
        delta: (C, h, w) a convolution's output minus its input, for one image.

    Returns:
        (h, w) float32.
    """
    return delta.float().norm(dim=0).numpy()


def head_token_norm(term: torch.Tensor, grid: Size2) -> np.ndarray:
    """The norm over each head's channels of CRPE's term per patch token.

    Args:
        term: (heads, h*w, head_dim) ``q * conv(v)`` for one image.
        grid: (h, w).

    Returns:
        (heads, h, w) float32.
    """
    return term.float().norm(dim=-1).reshape(term.shape[0], *grid).numpy()  # heads, h, w


def blank_photo(seen: Seen) -> Image.Image:
    """The blank image the model saw for :func:`blank_inspection`: every pixel the preprocessing's mean colour."""
    mean = tuple(round(255 * m) for m in seen.loaded.preprocess.mean)
    return Image.new("RGB", seen.photo.size, mean[:3] if len(mean) >= 3 else mean * 3)


def blank_inspection(seen: Seen) -> Inspection:
    """The model's inspection of a blank image (every pixel the mean colour: 0 after normalisation) at ``seen.size``;
    run once per request, however many views draw from it."""
    model = seen.loaded.model

    def run() -> Inspection:
        param = next(model.parameters())
        blank = torch.zeros(1, model.config.in_chans, *seen.size, device=param.device, dtype=param.dtype)  # 1, 3, H, W
        with torch.inference_mode():
            return model.inspect(blank)

    return seen.once("conv_pos/blank_inspection", run)


def _blocks_with(inspection: Inspection, key: str) -> list[int]:
    return [i for i, trace in enumerate(inspection.blocks) if key in trace.position]


def _pick(seen: Seen, block: int, key: str, what: str) -> int:
    """The block whose ``key`` contribution to draw for the chosen one: itself, else the last one before it in its stage
    (Twins: the stage's PEG follows its first block), else the first of its stage."""
    have = _blocks_with(seen.inspection, key)
    if not have:
        raise ViewUnavailable(f"{seen.name} adds no {what} in this inspection (none in this model, or position off)")
    stage = seen.inspection.blocks[block].stage
    same = [i for i in have if seen.inspection.blocks[i].stage == stage]
    if not same:
        raise ViewUnavailable(f"stage {stage} of {seen.name} has no {what}; blocks with one: "
                              f"{', '.join(map(str, have))}")  # fmt: skip
    before = [i for i in same if i <= block]
    return before[-1] if before else same[0]


def _side_by_side(panels: list[Image.Image], title: str) -> Image.Image:
    """Panels left to right under one title line."""
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    height = max(p.height for p in panels)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 8
    # viz's title strip, drawn over a one-pixel-high white "photo" as wide as the panels, that pixel row cut off
    line = Image.new("RGB", (width, 1), (255, 255, 255))
    head = viz.overlay(line, np.zeros((1, 1)), title=title, colorbar=False, alpha=0.0, min_side=width, max_side=width)
    strip = head.crop((0, 0, head.width, head.height - 1))
    canvas = Image.new("RGB", (max(width, strip.width), strip.height + height), (255, 255, 255))
    canvas.paste(strip, (0, 0))
    canvas.paste(out, (0, strip.height))
    return canvas


def _describe(seen: Seen, trace: BlockTrace, index: int) -> str:
    return f"block {index}, stage {trace.stage}, {trace.grid[0]}x{trace.grid[1]} grid"


def conv_contribution(seen: Seen, block: int, patch: Patch) -> View:
    """The chosen block's convolution contribution per token, for this image and for a blank image, on the photo."""
    index = _pick(seen, block, CONV_POS, "convolutional position")
    trace = seen.inspection.blocks[index]
    blank = blank_inspection(seen).blocks[index]
    here = token_norm(trace.position[CONV_POS][0])  # h, w
    flat = token_norm(blank.position[CONV_POS][0])  # h, w
    mark = views.map_patch(patch, seen.grid, trace.grid)
    panels = [
        viz.overlay(seen.photo, here, cmap="magma", mark=mark, title="this image", min_side=views.OVERLAY_SIDE,
                    colorbar_label="|conv(x)| per token"),
        viz.overlay(blank_photo(seen), flat, cmap="magma", mark=mark, alpha=0.9, title=_BLANK, min_side=views.OVERLAY_SIDE,
                    colorbar_label="|conv(x)| per token (position alone)"),
    ]  # fmt: skip
    title = (f"{seen.name}: what the position convolution adds to each token, {_describe(seen, trace, index)}\n"
             "right: the same on a blank image, so content is constant: the border rows and columns differ "
             "because the kernel reads zero padding there")  # fmt: skip
    return View(_side_by_side(panels, title), {"conv_pos_norm": here, "conv_pos_norm_blank": flat,
                                               "conv_pos_block": np.array(index), "block_grid": np.array(trace.grid)})


def stage_profiles(seen: Seen, block: int, patch: Patch) -> View:
    """Every stage's first convolution on a blank image: the boundary effect of zero padding at each scale."""
    blank = blank_inspection(seen)
    first: dict[int, int] = {}
    for i in _blocks_with(blank, CONV_POS):
        first.setdefault(blank.blocks[i].stage, i)
    if not first or not _blocks_with(seen.inspection, CONV_POS):
        raise ViewUnavailable(f"{seen.name} adds no convolutional position in this inspection")
    panels, arrays = [], {}
    photo = blank_photo(seen)
    for stage, i in sorted(first.items()):
        trace = blank.blocks[i]
        flat = token_norm(trace.position[CONV_POS][0])  # h, w
        arrays[f"conv_pos_norm_blank_stage{stage}"] = flat
        panels.append(viz.overlay(photo, flat, cmap="magma", alpha=0.9, min_side=240, max_side=240,
                                  title=f"stage {stage}: block {i}, {trace.grid[0]}x{trace.grid[1]}",
                                  colorbar_label="|conv(x)| per token"))  # fmt: skip
    title = (f"{seen.name}: the first position convolution of every stage, on a blank image (mean colour)\n"
             "content is constant, so what varies is position: read from the zero padding at the borders")
    return View(_side_by_side(panels, title), arrays)


def crpe_heads(seen: Seen, block: int, patch: Patch) -> View:
    """The chosen block's CRPE term q * conv(v) per head and token, for this image and a blank image."""
    index = _pick(seen, block, CONV_REL_POS, "convolutional relative position")
    trace = seen.inspection.blocks[index]
    blank = blank_inspection(seen).blocks[index]
    here = head_token_norm(trace.position[CONV_REL_POS][0], trace.grid)  # heads, h, w
    flat = head_token_norm(blank.position[CONV_REL_POS][0], trace.grid)  # heads, h, w
    mark = views.map_patch(patch, seen.grid, trace.grid)
    label = "|q \u00b7 conv(v)| per token"
    top = viz.head_map_overlays(seen.photo, here, mark, title=f"this image, {_describe(seen, trace, index)}",
                                colorbar_label=label, cmap="magma").image
    bottom = viz.head_map_overlays(blank_photo(seen), flat, mark, title=f"{_BLANK}: position alone",
                                   colorbar_label=label, cmap="magma").image
    title = (f"{seen.name}: the convolutional relative position term each head adds to its attention output\n"
             "each group of heads has its own kernel size (CoaT: 3x3, 5x5, 7x7); on the blank image the border band "
             "that reads zero padding is as wide as half the head's kernel (plus the CPE's one row)")
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    return View(_side_by_side([canvas], title), {"crpe_norm": here, "crpe_norm_blank": flat,
                                                 "crpe_block": np.array(index), "block_grid": np.array(trace.grid)})


MECHANISMS = (
    Mechanism(
        "conv_pos",
        "convolutional position encoding (PEG / CPE)",
        "a depthwise convolution with zero padding adds conv(x) to the tokens: position read from the padding "
        "(CPVT's PEG in Twins, CoaT's CPE).",
        "convolutional",
        "A depthwise 3x3 convolution over the token grid adds conv(x) to every token (Twins: after the first block "
        "of each stage; CoaT: before every block). It has no position table: the position comes from the zero "
        "padding, which the kernel reads at the border. Left: the norm of what the convolution adds to each token "
        "for this image; right: the same for a blank image of the mean colour, where content is constant, so only "
        "position is left: flat inside, different along the border. Below: the first convolution of every stage "
        "on the blank image. 'Without position' leaves the convolutions out.",
        {CONV_POS: "BlockTrace.position: (B, C, h, w) the convolution's output minus its input, on the block's grid"},
        (
            ViewSpec("conv_pos", "Contribution per token: this image and a blank one", conv_contribution,
                     per_block=True, compare=True),
            ViewSpec("conv_pos_stages", "First convolution of each stage, blank image", stage_profiles),
        ),
    ),
    Mechanism(
        "conv_rel_pos",
        "convolutional relative position encoding (CoaT's CRPE)",
        "depthwise convolutions of several window sizes over the values, multiplied with the queries: q * conv(v) "
        "added to the attention output (CoaT).",
        "convolutional",
        "CoaT's factorised attention has no token-to-token map; its relative position term is q * conv(v): each "
        "head's values go through a depthwise convolution (3x3, 5x5 or 7x7 by head group, zero padded) and are "
        "multiplied with the head's queries. Top: the norm of that term per head and token for this image; below: "
        "the same on a blank image, where what varies is the zero-padding border. 'Without position' leaves it out.",
        {CONV_REL_POS: "BlockTrace.position: (B, heads, h*w, head_dim) q * conv(v) of the patch tokens"},
        (ViewSpec("crpe_heads", "Relative position term per head: this image and a blank one", crpe_heads,
                  per_block=True, compare=True),),
    ),
)
