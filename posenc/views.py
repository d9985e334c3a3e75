"""What every view shares, between loaded models and the pure views of :mod:`posenc.viz`, for the app.

A request runs one inspection (:func:`inspect_image`) and every view is a function of that
:class:`Seen` record, a patch and a block: it picks the tensors the view needs from the
:class:`~posenc.models.Inspection`, calls :mod:`posenc.viz` and returns the picture together with the
raw arrays behind it (:class:`View`), which :func:`save_npz` writes for download. This module holds the generic
parts (sizes, patches, blocks, the attention and prefix-share views); each position mechanism's views live in
its module of :mod:`posenc.mechanisms`.

Conventions:

* Sizes are ``(h, w)`` in pixels, grids ``(h, w)`` in patches, patches ``(row, col)`` on the input patch
  grid. In a block, the clicked patch is the block's patch query nearest its centre, and rows are drawn on the
  block's key grid, all read from the block's token layout (:mod:`posenc.queries`).
* Nothing is stored between calls and no module hooks are used, so concurrent requests cannot mix.
* Errors a user can cause raise ``ValueError`` (:class:`ViewUnavailable` when a view does not apply to
  the model) with a message that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from posenc import norms, plots, queries, rollout, viz
from posenc.encodings import Size2
from posenc.hub import LoadedModel
from posenc.models import Inspection
from posenc.preprocess import ImageSource, build_transform, load_image

logger = logging.getLogger(__name__)

Patch = tuple[int, int]

#: Factors of the native input side offered by the resolution control.
SIZE_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
#: Offered sizes keep the attention maps of one inspection below this many bytes (float32, all blocks); 640 MiB
#: lets DINOv2-S/14 run at its own 518x518 (544 MiB).
MAX_TRACE_BYTES = 640 * 2**20
#: No input side may exceed this multiple of the native side (bounds the work of one request).
MAX_SIZE_FACTOR = 4
#: Shortest longer side, in pixels, of the single-map overlays (small inputs such as CIFAR's are enlarged).
OVERLAY_SIDE = 384


class ViewUnavailable(ValueError):
    """The view does not apply to this model (e.g. a RoPE view of a model without RoPE)."""


@dataclass(frozen=True)
class View:
    """One picture and the raw arrays it was drawn from.

    Attributes:
        image: the rendered view (RGB).
        arrays: name -> array, written to the ``.npz`` download.
    """

    image: Image.Image
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Seen:
    """One model's inspection of one image.

    Attributes:
        name: display name of the model.
        loaded: the loaded model.
        photo: the image the model saw (resized and cropped, before normalisation), RGB (w, h) = size[::-1].
        size: (h, w) input size in pixels.
        inspection: logits and every position tensor of the forward pass.
        pixels: (1, 3, h, w) the normalised input, for views that run the model again (rollout without position
            for a model whose position enters only at the input); None when not kept.
        norms: the output-token norms of every block (:func:`posenc.norms.token_norms`), or () when not collected.
        derived: what views derive from this request and share, computed once (:meth:`once`); e.g. the model's
            inspection of a blank image, which three convolutional-position views draw from.
    """

    name: str
    loaded: LoadedModel
    photo: Image.Image
    size: Size2
    inspection: Inspection
    pixels: torch.Tensor | None = None
    norms: tuple = ()
    derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)  # per request

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` the first time a view of this request asks for ``key``; the same object after."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @property
    def grid(self) -> Size2:
        """(h, w) input patch grid."""
        return tuple(self.inspection.grid)

    @property
    def num_blocks(self) -> int:
        return len(self.inspection.blocks)


# ------------------------------------------------------------------------------------------- sizes and grids


def native_size(loaded: LoadedModel) -> Size2:
    """(h, w) input size of the checkpoint's own preprocessing."""
    return tuple(loaded.preprocess.input_size)


def size_step(loaded: LoadedModel) -> Size2:
    """(h, w) that every input size must be a multiple of (the model's ``size_step()``).

    ViT: the patch. Swin: at every stage s, the grid (size / patch / 2**s) must be a multiple of that stage's
    window, so the step is the lcm over stages of ``patch * 2**s * window_s``. Swin V2: the patch times the grid's
    halvings; its windows shrink on smaller grids, so its ``fits`` says which multiples it takes.
    """
    return tuple(loaded.model.size_step())


def input_sizes(loaded: LoadedModel) -> list[Size2]:
    """The input sizes the resolution control offers: multiples of :func:`size_step` around the native size that the
    model takes (its config's ``fits``: Swin V2 windows shrink on small grids, so not every multiple does).

    Returns:
        Sorted (h, w) sizes; the native size among them unless its inspection needs more than
        :data:`MAX_TRACE_BYTES` and a smaller size does not.
    """
    native = native_size(loaded)
    step = size_step(loaded)
    sizes = set()
    for factor in SIZE_FACTORS:
        size = tuple(max(s, round(n * factor / s) * s) for n, s in zip(native, step))
        if loaded.model.fits(size) and loaded.model.trace_bytes(size) <= MAX_TRACE_BYTES:
            sizes.add(size)
    if not sizes and _fits(loaded, (side := max_square_size(loaded), side)):
        sizes.add((side, side))  # none near the native size fits (SAM-B at 1024x1024): the largest square that does
    if native not in sizes and (not sizes or loaded.model.trace_bytes(native) <= MAX_TRACE_BYTES):
        sizes.add(native)
    return sorted(sizes)


def format_size(size: Size2) -> str:
    """``"224x224"``."""
    return f"{size[0]}x{size[1]}"


def max_square_size(loaded: LoadedModel) -> int:
    """The largest square side (a multiple of the size step) that :func:`parse_size` accepts.

    Every multiple up to the side limit is tried: Swin V2 takes 512 but not 384, so the first gap is not the end.
    """
    step = max(size_step(loaded))
    limit = MAX_SIZE_FACTOR * max(native_size(loaded))
    return max((side for side in range(step, limit + 1, step) if _fits(loaded, (side, side))), default=step)


def _fits(loaded: LoadedModel, size: Size2) -> bool:
    """Whether the model runs at ``size``: sizes it takes (``model.fits``), sides within the factor, memory within the bound."""
    native = native_size(loaded)
    return (all(0 < n <= MAX_SIZE_FACTOR * max(native) for n in size) and loaded.model.fits(size)
            and loaded.model.trace_bytes(size) <= MAX_TRACE_BYTES)


def default_size(loaded: LoadedModel) -> Size2:
    """The size a model runs at when none is asked for: its native size, or the largest offered size when the
    native one needs more than :data:`MAX_TRACE_BYTES` of attention maps (SAM's encoder at 1024x1024)."""
    native = native_size(loaded)
    if _fits(loaded, native):
        return native
    offered = [s for s in input_sizes(loaded) if _fits(loaded, s)]
    return max(offered, key=lambda s: s[0] * s[1]) if offered else native


def size_rule(loaded: LoadedModel) -> str:
    """The sizes a model runs at, in words, for messages and the API documentation."""
    step, native, side = size_step(loaded), native_size(loaded), max_square_size(loaded)
    return (f"a height that is a multiple of {step[0]} and a width that is a multiple of {step[1]} pixels, up to "
            f"{side}x{side} (each side at most {MAX_SIZE_FACTOR} times the native {format_size(native)}, and at most "
            f"{MAX_TRACE_BYTES >> 20} MB of attention maps), that the model takes (sizes that work: "
            f"{', '.join(format_size(s) for s in input_sizes(loaded))})")


def parse_size(value: str | int | None, loaded: LoadedModel) -> Size2:
    """The (h, w) input size asked for: None or "" for :func:`default_size`, ``224`` or ``"224x224"``.

    Every size works whose height and width are positive multiples of :func:`size_step`, at most
    :data:`MAX_SIZE_FACTOR` times the native side, and whose inspection keeps at most
    :data:`MAX_TRACE_BYTES` of attention maps; :func:`input_sizes` is only the short list the app offers.

    Raises:
        ValueError: the text is not a size, or the model cannot run at that size (the message states the rule).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return default_size(loaded)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = (int(value), int(value))
    else:
        parts = str(value).lower().replace("\u00d7", "x").split("x")
        try:
            numbers = [int(p.strip()) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2):
            raise ValueError(f"input size {value!r} is not a size; write it as 224 or 224x224")
        size = (numbers[0], numbers[-1])
    if not _fits(loaded, size):
        raise ValueError(f"input size {format_size(size)} does not fit this model: it needs {size_rule(loaded)}")
    return size


def input_grid(loaded: LoadedModel, size: Size2) -> Size2:
    """(h, w) input patch grid at ``size``."""
    p = loaded.model.config.patch_size
    return (size[0] // p, size[1] // p)


def default_patch(grid: Size2) -> Patch:
    """The centre patch of a grid."""
    return (grid[0] // 2, grid[1] // 2)


def check_patch(row: float | None, col: float | None, grid: Size2) -> Patch:
    """(row, col) as ints inside ``grid``; None for both gives the centre.

    Raises:
        ValueError: naming the grid when the patch lies outside it.
    """
    if row is None and col is None:
        return default_patch(grid)
    if row is None or col is None:
        raise ValueError("give both the patch row and column (or neither, for the centre patch)")
    r, c = int(row), int(col)
    if r != row or c != col or not (0 <= r < grid[0] and 0 <= c < grid[1]):
        raise ValueError(
            f"patch ({row}, {col}) lies outside the {grid[0]}x{grid[1]} patch grid; "
            f"rows run 0..{grid[0] - 1} and columns 0..{grid[1] - 1}"
        )
    return (r, c)


def map_patch(patch: Patch, grid_from: Size2, grid_to: Size2) -> Patch:
    """The patch of ``grid_to`` that holds the centre of ``patch`` of ``grid_from`` (same relative position)."""
    return tuple(min(g_to - 1, int((p + 0.5) * g_to / g_from)) for p, g_from, g_to in zip(patch, grid_from, grid_to))


# ------------------------------------------------------------------------------------------- running the model


def _photo(pixels: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> Image.Image:
    """Undo the normalisation of a (3, h, w) input: the RGB image the model saw."""
    m = torch.tensor(tuple(mean)).view(3, 1, 1)  # 3, 1, 1
    s = torch.tensor(tuple(std)).view(3, 1, 1)  # 3, 1, 1
    rgb = (pixels * s + m).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)  # h, w, 3
    return Image.fromarray(rgb.numpy())


def inspect_image(
    loaded: LoadedModel, image: ImageSource, size: Size2 | None = None, *, name: str | None = None
) -> Seen:
    """Run the model's own preprocessing and one inspection pass on an image.

    Args:
        loaded: the model.
        image: a path or anything :func:`posenc.preprocess.load_image` reads (its size limits apply).
        size: (h, w) input size; None for the checkpoint's own.
        name: display name; default the model's source.

    Raises:
        ImageError: the image cannot be read; ValueError: the size does not fit the model.
    """
    size = native_size(loaded) if size is None else tuple(size)
    pp = replace(loaded.preprocess, input_size=size)
    pixels = build_transform(pp)(load_image(image))  # 3, h, w
    device = next(loaded.model.parameters()).device
    x = pixels[None].to(device)  # 1, 3, h, w
    inspection, block_norms = norms.inspect_with_outputs(loaded.model, x)
    logger.debug("inspected %s at %s: %d blocks", loaded.source, format_size(size), len(inspection.blocks))
    return Seen(name or loaded.source, loaded, _photo(pixels, pp.mean, pp.std), size, inspection, x,
                tuple(block_norms))


#: What :func:`predictions` says for a headless model.
NO_CLASSIFIER = "no classifier: this checkpoint is headless (it returns features, not classes)"


def predictions(seen: Seen, top_k: int = 5) -> dict[str, float]:
    """The top-k classes as {label: probability} (repeated names get their class index appended).

    A headless model has no classes: the answer is ``{NO_CLASSIFIER: 0.0}``.
    """
    if seen.loaded.headless:
        return {NO_CLASSIFIER: 0.0}
    probs = seen.inspection.logits[0].float().softmax(dim=-1)  # num_classes
    values, indices = probs.topk(min(top_k, probs.numel()))
    labels = seen.loaded.labels
    names = [labels[int(i)] for i in indices]
    return {
        (f"{name} (class {int(i)})" if names.count(name) > 1 else name): float(p)
        for name, i, p in zip(names, indices, values)
    }


def patch_picker(seen: Seen, patch: Patch) -> Image.Image:
    """The image the model saw, with its patch grid shaded as a checkerboard and ``patch`` outlined; click to pick.

    The result has no title or colour bar, so a click at pixel (x, y) maps to a patch with
    :func:`posenc.viz.patch_at` and the image's own size.
    """
    gh, gw = seen.grid
    checker = ((np.arange(gh)[:, None] + np.arange(gw)[None, :]) % 2).astype(np.float32)  # gh, gw
    return viz.overlay(seen.photo, checker, cmap="Greys", vmin=0.0, vmax=1.0, alpha=0.12, mark=patch,
                       colorbar=False, min_side=384, max_side=640)


# ------------------------------------------------------------------------------------------- blocks


def num_blocks(loaded: LoadedModel) -> int:
    """Transformer blocks of a model (all stages for Swin), without running it."""
    return loaded.model.num_blocks




def describe_block(seen: Seen, block: int) -> str:
    """One line about a block: its stage and what it attends over (windows, shift, padding, query and key grids)."""
    trace = seen.inspection.blocks[block]
    head = f"block {block} of {seen.num_blocks}"
    if trace.layout is None:
        return f"{head}: {trace.no_layout}"
    stage = f"stage {trace.stage}, " if trace.stage else ""
    return f"{head}: {stage}{trace.layout.describe()}"


def block_query(seen: Seen, block: int, patch: Patch) -> queries.Query:
    """The chosen block's query nearest the clicked input patch (:func:`posenc.queries.block_query`).

    Raises:
        ViewUnavailable: the block's attention is not between image tokens, or it has no queries at all.
    """
    try:
        return queries.block_query(seen.inspection.blocks[block], patch, seen.grid, seen.size)
    except ValueError as error:  # NoTokenLayout, or a block without patch queries
        raise ViewUnavailable(f"block {block} of {seen.name}: {error}") from None


def query_row(seen: Seen, block: int, per_pair: torch.Tensor, patch: Patch
              ) -> tuple[np.ndarray, np.ndarray | None, queries.Query]:
    """:func:`posenc.queries.query_row` for the chosen block of a :class:`Seen`; ViewUnavailable for a block without
    token attention or without patch queries, or a tensor that does not match the block's layout."""
    try:
        return queries.query_row(seen.inspection.blocks[block], per_pair, patch, seen.grid, seen.size)
    except ValueError as error:  # NoTokenLayout, no patch queries, a tensor that does not match the layout
        raise ViewUnavailable(f"block {block} of {seen.name}: {error}") from None


# ------------------------------------------------------------------------------------------- views


def attention_view(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's attention from the clicked patch in the chosen block (from its prefix query in a block without
    patch queries, such as class attention), on the photo.

    For relative-bias and RoPE models a second row shows the same attention with the position term left out.
    """
    trace = seen.inspection.blocks[block]
    rows, prefix, query = query_row(seen, block, trace.attn[0], patch)  # heads, hk, wk
    no_pos = None
    if trace.attn_no_pos is not None:
        no_pos, _, _ = query_row(seen, block, trace.attn_no_pos[0], patch)  # heads, hk, wk
    block_patch = query.patch
    sheet = viz.attention_overlays(
        seen.photo, rows, block_patch, attn_no_pos=no_pos, prefix_attn=prefix,
        no_pos_label="without the position term",
        title=f"{seen.name}: attention from {query.describe()}\n{describe_block(seen, block)}")
    arrays = {"attention": rows, "attention_no_pos": no_pos, "attention_to_prefix": prefix}
    return View(sheet.image, {k: v for k, v in arrays.items() if v is not None})


def prefix_attention_shares(seen: Seen) -> tuple[np.ndarray, tuple[str, ...]]:
    """The share of attention every head of every block gives to each prefix group and to the patches.

    Groups, in order: "cls" and "dist" where present, "registers" (all register tokens together) and "patches".
    Shares are attention probabilities summed over a group's keys and averaged over the patch queries (prefix
    queries and padding left out; over every query in a block without patch queries), so the groups of one head
    and block add up to 1 less what goes to padding keys. Each block's prefix keys come from its token layout: a
    block without prefix tokens (ConViT's GPSA blocks) gives its prefix groups 0.

    Returns:
        (blocks, heads, G) shares and the G group names; a block without token attention is NaN.

    Raises:
        ViewUnavailable: no block of the model has prefix keys.
    """
    insp = seen.inspection
    if all(trace.layout is None for trace in insp.blocks):
        raise ViewUnavailable(f"{seen.name}: no block attends between tokens, so no attention goes to prefix tokens")
    names: list[str] = []
    for trace in insp.blocks:
        names += [n for n in (trace.layout.key_prefix if trace.layout is not None else ()) if n not in names]
    if not names:
        raise ViewUnavailable(f"{seen.name} has no cls token or registers: every key is a patch")
    groups = [(n, [n]) for n in names if not n.startswith("reg")]
    registers = [n for n in names if n.startswith("reg")]
    if registers:
        groups.append(("registers", registers))
    heads = max(trace.attn.shape[-3] for trace in insp.blocks)
    shares = np.full((len(insp.blocks), heads, len(groups) + 1), np.nan, dtype=np.float32)  # blocks, heads, G
    for b, trace in enumerate(insp.blocks):
        if trace.layout is None:
            continue
        layout = trace.layout
        attn = layout.grouped(trace.attn[0]).float()  # G, heads, nq, nk
        queries_used = layout.query_is_patch if layout.query_is_patch.any() else layout.query_tokens >= 0  # G, nq
        weight = queries_used.to(attn.dtype) / queries_used.sum()  # G, nq
        per_slot = torch.einsum("ghqk,gq->ghk", attn, weight)  # G, heads, nk: mean over the chosen queries
        tokens = layout.key_tokens  # G, nk
        columns = []
        for _, members in groups:
            idx = [i for i, n in enumerate(layout.key_prefix) if n in members]
            hit = torch.isin(tokens, torch.tensor(idx, dtype=tokens.dtype))  # G, nk
            columns.append((per_slot * hit[:, None]).sum(dim=(0, 2)))  # heads
        columns.append((per_slot * layout.key_is_patch[:, None]).sum(dim=(0, 2)))  # heads
        shares[b, : attn.shape[1]] = torch.stack(columns, dim=-1).numpy()  # heads, G
    return shares, tuple(n for n, _ in groups) + ("patches",)


def prefix_attention_view(seen: Seen, block: int, patch: Patch) -> View:
    """Per block and head, the share of attention given to the cls token, the registers and the patches.

    Averaged over patch queries (it does not depend on the clicked patch); the chosen block is outlined.
    Registers that soak up attention in the later blocks are the high-norm "artefact" tokens they were added for.
    """
    shares, groups = prefix_attention_shares(seen)  # blocks, heads, G
    footer = f"rows: blocks 0..{shares.shape[0] - 1}, top to bottom; columns: heads 0..{shares.shape[1] - 1}"
    blank = [b for b in range(shares.shape[0]) if np.isnan(shares[b]).all()]
    if blank:  # e.g. XCiT's channel attention: say why those rows are empty
        footer += f"\nblank rows (blocks {_block_ranges(blank)}): no token-to-token attention"
    only_prefix = [b for b, t in enumerate(seen.inspection.blocks)
                   if t.layout is not None and not t.layout.query_is_patch.any()]  # class attention: cls queries
    queries = "patch queries" + (f" (the {', '.join(seen.inspection.blocks[only_prefix[0]].layout.query_prefix)} query "
                                 f"in blocks {_block_ranges(only_prefix)})" if only_prefix else "")
    sheet = viz.matrix_heatmaps(
        np.moveaxis(shares, -1, 0), [f"to {g}" for g in groups],  # G, blocks, heads
        title=f"{seen.name}: share of attention to prefix tokens and patches\n"
              f"averaged over {queries}; the chosen block is outlined",
        colorbar_label="attention share (sums to 1 over the panels)", footer=footer, mark_row=block)
    return View(sheet.image, {"prefix_attention_share": shares, "prefix_attention_groups": np.array(groups)})


def _block_ranges(blocks: list[int]) -> str:
    """Block numbers as runs: [0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _hstack(parts: list[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures side by side on white, tops aligned."""
    out = Image.new("RGB", (sum(p.width for p in parts) + gap * (len(parts) - 1), max(p.height for p in parts)),
                    (255, 255, 255))
    x = 0
    for p in parts:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def rollout_maps(seen: Seen, block: int, patch: Patch) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """Rollout up to ``block`` from the clicked patch's token (where the block outputs patch tokens) and from cls
    (once a block up to ``block`` has queried it), with and without position, on the input patch grid.

    Returns:
        (2, R, h0, w0) with / without position, (2, R, P) their shares on the input prefix tokens, the R start names,
        and one line saying what "without position" is for this model.

    Raises:
        ViewUnavailable: no block attends between tokens.
    """
    insp = seen.inspection
    try:
        after = rollout.block_tokens(insp)[block]
    except rollout.RolloutUnavailable as error:
        raise ViewUnavailable(f"{seen.name}: {error}") from None
    # from the clicked patch where the block outputs patch tokens (a class-attention block outputs only cls), and
    # from cls once a block up to this one has queried it (XCiT and CaiT bring it in late)
    cls_seen = any(t.layout is not None and "cls" in t.layout.query_prefix for t in insp.blocks[: block + 1])
    starts, names = [], []
    if len(after.pixels):
        starts.append(after.nearest(queries.patch_pixel(patch, seen.grid, seen.size)))
        names.append(f"patch {patch}")
    if cls_seen and "cls" in after.prefix:
        starts.append(after.prefix.index("cls"))
        names.append("cls")
    if not starts:
        raise ViewUnavailable(f"{seen.name}: block {block} outputs no patch tokens, and its cls token is not one of the "
                              "model's input tokens (it enters late), so no rollout starts here")
    select = torch.eye(len(after), dtype=torch.float64)[starts]  # R, len(after)
    if seen.pixels is None and rollout.needs_position_free_run(insp):
        raise ViewUnavailable(f"{seen.name}: the rollout without position needs the input; inspect it again")
    with_pos, without, rule = rollout.rollout_pair(seen.loaded.model, seen.pixels, insp, block=block, select=select)
    grids, prefixes = zip(*(r.on_grid() for r in (with_pos, without)))
    return np.stack([g[0] for g in grids]), np.stack([p[0] for p in prefixes]), tuple(names), rule


def rollout_view(seen: Seen, block: int, patch: Patch) -> View:
    """Attention rollout up to the chosen block, with position, without, and the difference, on the photo: from the
    clicked patch, and from cls where there is one (:mod:`posenc.rollout`)."""
    maps, prefix, names, rule = rollout_maps(seen, block, patch)  # 2, R, h0, w0
    grid0 = maps.shape[-2:]
    mark = map_patch(patch, seen.grid, grid0)
    rows = []
    for r, name in enumerate(names):
        vmax = float(np.nanmax(maps[:, r]))
        diff = maps[0, r] - maps[1, r]
        span = float(np.nanmax(np.abs(diff))) or 1e-12
        share = f"; on prefix tokens {prefix[0, r].sum():.2f} / {prefix[1, r].sum():.2f}" if prefix.shape[-1] else ""
        panels = [viz.overlay(seen.photo, maps[0, r], vmin=0.0, vmax=vmax, mark=mark, title=f"from {name}: with position",
                              colorbar_label="rollout share", min_side=224, max_side=320),
                  viz.overlay(seen.photo, maps[1, r], vmin=0.0, vmax=vmax, mark=mark, title="without position",
                              colorbar_label="rollout share", min_side=224, max_side=320),
                  viz.overlay(seen.photo, diff, cmap="RdBu_r", vmin=-span, vmax=span, mark=mark,
                              title="with - without", colorbar_label="share from position", min_side=224, max_side=320)]
        rows.append(_hstack(panels))
        rows.append(viz.text_strip(f"{name}: total variation between with and without "
                                   f"{0.5 * np.abs(diff).sum() + 0.5 * np.abs(prefix[0, r] - prefix[1, r]).sum():.3f}"
                                   f"{share}", rows[-1].width, 12))
    head = viz.text_strip(f"{seen.name}: attention rollout through blocks 0..{block} (heads averaged, + identity, rows "
                          f"renormalised); {rule}", rows[0].width, 13)
    arrays = {"rollout": maps[0], "rollout_no_pos": maps[1], "rollout_to_prefix": prefix[0],
              "rollout_no_pos_to_prefix": prefix[1], "rollout_starts": np.array(names)}
    return View(viz.vstack([head, *rows]), arrays)


def token_norms_view(seen: Seen, block: int, patch: Patch) -> View:
    """The norm of every output token of the chosen block on its grid, the high-norm tokens, and a histogram with
    the threshold and the cls / register norms marked (:mod:`posenc.norms`)."""
    if not seen.norms:
        raise ViewUnavailable(f"{seen.name}: the block outputs were not collected for this inspection")
    found = seen.norms[block]
    if isinstance(found, str):
        raise ViewUnavailable(f"{seen.name}: {found}")
    values, high = found.patches[0], found.high[0]  # hq, wq
    mark = map_patch(patch, seen.grid, values.shape)
    threshold = float(found.threshold[0])
    panels = [viz.overlay(seen.photo, values, mark=mark, title=f"token norms after block {block}",
                          colorbar_label="L2 norm", min_side=224, max_side=360),
              viz.overlay(seen.photo, np.where(high, values, np.nan), cmap="magma", vmin=threshold,
                          vmax=max(threshold, float(values.max())), mark=mark,
                          title=f"high-norm tokens: {int(high.sum())} of {high.size}",
                          colorbar_label="L2 norm", min_side=224, max_side=360)]
    marks = {"threshold": threshold, **{n: float(v) for n, v in zip(found.prefix_names, found.prefix[0])}}
    hist = plots.histogram(values, title=f"patch-token norms after block {block}", xlabel="L2 norm", marks=marks)
    top = _hstack(panels)
    rule = viz.text_strip(f"{seen.name}: high-norm rule: {norms.HIGH_NORM_RULE}; prefix norms: "
                          + (", ".join(f"{n} {v:.1f}" for n, v in zip(found.prefix_names, found.prefix[0])) or "none"),
                          max(top.width, hist.width), 12)
    arrays = {"token_norms": values, "token_norms_high": high, "token_norms_prefix": found.prefix[0],
              "token_norms_prefix_names": np.array(found.prefix_names, dtype=str),
              "token_norms_threshold": np.array(threshold)}
    return View(viz.vstack([rule, top, hist]), arrays)


def try_view(make: Callable[[], View | tuple[View, ...]]) -> tuple[View | tuple[View, ...] | None, str]:
    """Run a view; a :class:`ViewUnavailable` becomes (None, its message) for the UI to show as a note."""
    try:
        return make(), ""
    except ViewUnavailable as error:
        return None, str(error)


# ------------------------------------------------------------------------------------------- export


def save_npz(path: str | Path, seen: Seen, patch: Patch, block: int, views: Iterable[View | None]) -> Path:
    """Write the raw tensors behind the views, plus the logits, the input and the geometry, to a ``.npz``.

    Returns:
        The path written.
    """
    logits = seen.inspection.logits[0].float()  # num_classes, or C pooled features when headless
    outputs = {"features": logits.numpy()} if seen.loaded.headless else {
        "logits": logits.numpy(), "probabilities": logits.softmax(-1).numpy()}
    arrays: dict[str, np.ndarray] = {
        **outputs,
        "labels": np.array(seen.loaded.labels),
        "photo": np.asarray(seen.photo),
        "input_size": np.array(seen.size),
        "grid": np.array(seen.grid),
        "patch": np.array(patch),
        "block": np.array(block),
        "mechanisms": np.array(seen.loaded.model.mechanisms, dtype=str),
        "source": np.array(seen.loaded.source),
    }
    for view in views:
        if view is not None:
            arrays.update(view.arrays)
    return viz.save_npz(path, **arrays)
