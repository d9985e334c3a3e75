"""Model-aware glue between loaded models and the pure views of :mod:`posenc.viz`, for the app.

A request runs one inspection (:func:`inspect_image`) and every view is a function of that
:class:`Seen` record, a patch and a block: it picks the tensors the view needs from the
:class:`~posenc.models.Inspection`, calls :mod:`posenc.viz` and returns the picture together with the
raw arrays behind it (:class:`View`), which :func:`save_npz` writes for download.

Conventions:

* Sizes are ``(h, w)`` in pixels, grids ``(h, w)`` in patches, patches ``(row, col)`` on the input patch
  grid (stage 0 for Swin); a Swin block of a later stage maps the patch onto its coarser grid.
* Nothing is stored between calls and no module hooks are used, so concurrent requests cannot mix.
* Errors a user can cause raise ``ValueError`` (:class:`ViewUnavailable` when a view does not apply to
  the model) with a message that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from posenc import viz
from posenc.attention import Attention
from posenc.encodings import Size2, padded_grid, resize_rel_pos_bias_table
from posenc.hub import LoadedModel
from posenc.models import BlockTrace, Inspection
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
_ABSOLUTE = ("learned", "sincos")
_RELATIVE = ("rel_table",)


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
    """

    name: str
    loaded: LoadedModel
    photo: Image.Image
    size: Size2
    inspection: Inspection

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
    with torch.inference_mode():
        inspection = loaded.model.inspect(pixels[None].to(device))
    logger.debug("inspected %s at %s: %d blocks", loaded.source, format_size(size), len(inspection.blocks))
    return Seen(name or loaded.source, loaded, _photo(pixels, pp.mean, pp.std), size, inspection)


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


def _attention_modules(seen: Seen) -> list[Attention]:
    """Every block's attention module, in the order of ``Inspection.blocks``."""
    model = seen.loaded.model
    if hasattr(model, "layers"):
        return [block.attn for layer in model.layers for block in layer.blocks]
    return [block.attn for block in model.blocks]


def describe_block(seen: Seen, block: int) -> str:
    """One line about a block: its stage, grid, window and shift for Swin."""
    trace = seen.inspection.blocks[block]
    if trace.window is None:
        return f"block {block} of {seen.num_blocks} (global attention over the {trace.grid[0]}x{trace.grid[1]} grid)"
    shifted = f"shifted by {trace.shift[0]}x{trace.shift[1]}" if trace.shift and any(trace.shift) else "not shifted"
    padded = padded_grid(trace.grid, trace.window)
    if padded != tuple(trace.grid):
        shifted += f", grid padded to {padded[0]}x{padded[1]}"
    return (f"block {block} of {seen.num_blocks}: stage {trace.stage}, {trace.grid[0]}x{trace.grid[1]} grid, "
            f"{trace.window[0]}x{trace.window[1]} windows, {shifted}")


def _block_patch(seen: Seen, trace: BlockTrace, patch: Patch) -> Patch:
    """The input patch on the block's (stage) grid."""
    return tuple(p * g // g0 for p, g, g0 in zip(patch, trace.grid, seen.grid))


def _window_keys(seen: Seen, trace: BlockTrace, patch: Patch) -> viz.SwinWindowKeys:
    """The clicked patch's window; keys are on the block's grid padded to whole windows (SAM pads, Swin never needs to)."""
    grid = padded_grid(trace.grid, trace.window)
    return viz.swin_window_keys(_block_patch(seen, trace, patch), grid, trace.window, trace.shift or (0, 0))


def window_row_to_grid(trace: BlockTrace, keys: viz.SwinWindowKeys, values: torch.Tensor) -> np.ndarray:
    """Per-key values of one window, (..., Wh*Ww), on the block's grid (..., gh, gw): NaN outside the window, at
    masked keys, and padded keys dropped."""
    gh, gw = trace.grid
    return viz.window_values_to_grid(values, keys.keys, padded_grid(trace.grid, trace.window), keys.masked)[..., :gh, :gw]


def _query_rows(
    seen: Seen, trace: BlockTrace, per_pair: torch.Tensor, patch: Patch
) -> tuple[np.ndarray, np.ndarray | None]:
    """From a per-pair tensor, the clicked query's row over the patch keys.

    Args:
        per_pair: (heads, N, N), or for Swin (nW, heads, N, N) attention or a (heads, N, N) bias shared by all windows.

    Returns:
        (heads, gh, gw) on the block's grid (NaN where the query cannot attend) and the (heads, P) values of
        the prefix keys (cls, dist), or None without prefix tokens.
    """
    if trace.window is not None:
        keys = _window_keys(seen, trace, patch)
        if per_pair.ndim == 4:
            per_pair = per_pair[keys.window_index]  # heads, Wh*Ww, Wh*Ww
        values = per_pair[:, keys.query_index, :]  # heads, Wh*Ww
        return window_row_to_grid(trace, keys, values), None
    gh, gw = trace.grid
    prefix = per_pair.shape[-1] - gh * gw
    row, col = _block_patch(seen, trace, patch)  # a later stage of a hierarchical model (LeViT) has a coarser grid
    q = prefix + row * gw + col
    rows = per_pair[:, q, prefix:].reshape(-1, gh, gw)  # heads, gh, gw
    return rows.float().numpy(), (per_pair[:, q, :prefix].float().numpy() if prefix else None)


# ------------------------------------------------------------------------------------------- views


def _require(seen: Seen, names: tuple[str, ...], what: str, hint: str) -> None:
    """Raise :class:`ViewUnavailable` unless one of the model's mechanisms is among ``names``."""
    used = seen.loaded.model.mechanisms
    if not set(names) & set(used):
        raise ViewUnavailable(
            f"{seen.name} uses {' + '.join(used) or 'no position encoding'}, so it has no {what}; {hint}"
        )


def absolute_views(seen: Seen, patch: Patch) -> tuple[View, View, View]:
    """Views of an absolute (learned or sin-cos) embedding, as resampled for this input size.

    Returns:
        The ViT-paper similarity grid (one tile per patch), the clicked patch's similarity on the photo, and
        the top three principal components as RGB on the photo.
    """
    if seen.inspection.pos_embed is None:  # EVA-02 and the RoPE-ViT _ape models have one beside RoPE
        _require(seen, _ABSOLUTE, "absolute position embedding", "pick a learned or sin-cos model (ViT, DeiT)")
    insp = seen.inspection
    if insp.pos_embed is None:
        _require(seen, _ABSOLUTE, "absolute position embedding", "pick a learned or sin-cos model (ViT, DeiT)")
    pos = insp.pos_embed[0, insp.pos_embed_prefix :].detach().float()  # h*w, C
    grid = seen.grid
    size = f"{grid[0]}x{grid[1]} grid"
    with torch.inference_mode():
        sims = viz.cosine_similarity_matrix(pos, grid)  # N, N
        tiles = viz.pos_embed_similarity_grid(pos, grid, title=f"{seen.name}: position embedding similarity ({size})")
        sim = viz.similarity_map(pos, grid, patch)  # gh, gw
        pca = viz.pos_embed_pca_rgb(pos, grid)  # gh, gw, 3
    clicked = viz.overlay(seen.photo, sim, vmax=1.0, mark=patch, title=f"Similarity to patch {patch}",
                          colorbar_label="cosine similarity of position embeddings", min_side=OVERLAY_SIDE)
    pca_img = viz.overlay(seen.photo, pca, alpha=0.75, title="Embedding PCA as RGB",
                          min_side=OVERLAY_SIDE)
    return (
        View(tiles.image, {"pos_embed": pos.numpy(), "pos_similarity": sims}),
        View(clicked, {"pos_similarity_to_patch": sim}),
        View(pca_img, {"pos_pca_rgb": pca}),
    )


def relative_views(seen: Seen, block: int, patch: Patch) -> tuple[View, View]:
    """The chosen block's relative position bias: its table for every head, and the clicked query's bias on the photo.

    For BEiT the table is the one the model used at this grid (resized bicubically from the trained one); for
    Swin the window is fixed, the clicked patch is mapped to the block's stage grid, and only the keys of its
    (shifted) window are coloured, keys of other shift regions masked.
    """
    _require(seen, _RELATIVE, "relative position bias", "pick a BEiT or Swin model (relative / windowed)")
    trace = seen.inspection.blocks[block]
    attn = _attention_modules(seen)[block]
    with torch.inference_mode():
        table, window = attn.relative_position_bias_table, attn.rel_pos_window  # R, heads
        if trace.window is None and tuple(trace.grid) != tuple(window):
            table = resize_rel_pos_bias_table(table, trace.grid, window, attn.rel_pos_cls)  # R', heads
            window = tuple(trace.grid)
        table = table.detach().float()
        table_img = viz.bias_table_heatmaps(
            table, window, cls_entries=attn.rel_pos_cls,
            title=f"{seen.name}: relative position bias table\n{describe_block(seen, block)}").image
        rows, prefix = _query_rows(seen, trace, trace.pos_bias.float(), patch)  # heads, gh, gw
        block_patch = _block_patch(seen, trace, patch)
        query_img = viz.query_bias_overlays(
            seen.photo, rows, block_patch, cls_bias=None if prefix is None else prefix[:, 0],
            title=f"{seen.name}: bias from patch {block_patch} to the keys it attends to\n"
                  f"{describe_block(seen, block)}").image
    arrays = {"bias_table": table.numpy(), "bias_window": np.array(window), "query_bias": rows,
              "block_grid": np.array(trace.grid), "block_patch": np.array(block_patch)}
    if prefix is not None:
        arrays["query_bias_to_prefix"] = prefix
    return View(table_img, {k: arrays[k] for k in ("bias_table", "bias_window")}), View(
        query_img, {k: v for k, v in arrays.items() if k not in ("bias_table", "bias_window")})


def rope_view(seen: Seen, patch: Patch) -> View:
    """RoPE's relative-phase similarity between the clicked position and every other (angles at this grid).

    The colour scale is fitted to the map's own values: the mean cosine rarely falls far below zero, and a fixed
    -1..1 scale would hide how it falls off.
    """
    if seen.inspection.rope_angles is None:  # no RoPE, or mixed RoPE (angles per block and head, its own views)
        _require(seen, (), "axial rotary embedding", "pick a RoPE model (mixed RoPE has its own per-head views)")
    angles = seen.inspection.rope_angles.detach().float()  # h*w, head_dim/2
    sim = viz.rope_phase_similarity(angles, seen.grid, patch)  # gh, gw
    img = viz.overlay(seen.photo, sim, cmap="viridis", mark=patch,
                      title=f"RoPE similarity to {patch}", colorbar_label="mean cos(angle difference)",
                      min_side=OVERLAY_SIDE)
    return View(img, {"rope_angles": angles.numpy(), "rope_similarity": sim})


def attention_view(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's attention from the clicked patch in the chosen block, on the photo.

    For relative-bias and RoPE models a second row shows the same attention with the position term left out.
    """
    trace = seen.inspection.blocks[block]
    rows, prefix = _query_rows(seen, trace, trace.attn[0].float(), patch)  # heads, gh, gw
    no_pos = None
    if trace.attn_no_pos is not None:
        no_pos, _ = _query_rows(seen, trace, trace.attn_no_pos[0].float(), patch)  # heads, gh, gw
    block_patch = _block_patch(seen, trace, patch)
    sheet = viz.attention_overlays(
        seen.photo, rows, block_patch, attn_no_pos=no_pos, prefix_attn=prefix,
        no_pos_label="without the position term",
        title=f"{seen.name}: attention from patch {block_patch}\n{describe_block(seen, block)}")
    arrays = {"attention": rows, "attention_no_pos": no_pos, "attention_to_prefix": prefix}
    return View(sheet.image, {k: v for k, v in arrays.items() if v is not None})


def prefix_attention_shares(seen: Seen) -> tuple[np.ndarray, tuple[str, ...]]:
    """The share of attention every head of every block gives to each prefix group and to the patches.

    Groups, in order: "cls" and "dist" where present, "registers" (all register tokens together) and "patches".
    Shares are attention probabilities summed over a group's keys and averaged over the patch queries (prefix
    queries left out), so the groups of one head and block add up to 1.

    Returns:
        (blocks, heads, G) shares and the G group names.

    Raises:
        ViewUnavailable: windowed attention (Swin) or a model without prefix tokens.
    """
    insp = seen.inspection
    names = insp.prefix_labels
    if not names:
        raise ViewUnavailable(f"{seen.name} has no cls token or registers: every key is a patch")
    if any(trace.window is not None for trace in insp.blocks):
        raise ViewUnavailable(f"{seen.name} attends within windows, without prefix tokens")
    groups = [(n, [i]) for i, n in enumerate(names) if not n.startswith("reg")]
    registers = [i for i, n in enumerate(names) if n.startswith("reg")]
    if registers:
        groups.append(("registers", registers))
    p = len(names)
    shares = []
    for trace in insp.blocks:
        per_key = trace.attn[0, :, p:, :].float().mean(dim=1)  # heads, N  (mean over patch queries)
        columns = [per_key[:, idx].sum(dim=-1) for _, idx in groups] + [per_key[:, p:].sum(dim=-1)]  # G x (heads,)
        shares.append(torch.stack(columns, dim=-1))  # heads, G
    return torch.stack(shares).numpy(), tuple(n for n, _ in groups) + ("patches",)  # blocks, heads, G


def prefix_attention_view(seen: Seen, block: int, patch: Patch) -> View:
    """Per block and head, the share of attention given to the cls token, the registers and the patches.

    Averaged over patch queries (it does not depend on the clicked patch); the chosen block is outlined.
    Registers that soak up attention in the later blocks are the high-norm "artefact" tokens they were added for.
    """
    shares, groups = prefix_attention_shares(seen)  # blocks, heads, G
    sheet = viz.matrix_heatmaps(
        np.moveaxis(shares, -1, 0), [f"to {g}" for g in groups],  # G, blocks, heads
        title=f"{seen.name}: share of attention to prefix tokens and patches\n"
              "averaged over patch queries; the chosen block is outlined",
        colorbar_label="attention share (sums to 1 over the panels)",
        footer=f"rows: blocks 0..{shares.shape[0] - 1}, top to bottom; columns: heads 0..{shares.shape[1] - 1}",
        mark_row=block)  # fmt: skip
    return View(sheet.image, {"prefix_attention_share": shares, "prefix_attention_groups": np.array(groups)})


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
