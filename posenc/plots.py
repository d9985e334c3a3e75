"""Charts of the measurements in :mod:`posenc.measure`, drawn with numpy and PIL like :mod:`posenc.viz`.

Each function takes numbers and returns a ``PIL.Image``; nothing touches ``matplotlib.pyplot`` (matplotlib
supplies only colours and the font), so concurrent requests cannot mix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from posenc import viz

if TYPE_CHECKING:
    from posenc.measure import FolderResult

#: One colour per series (matplotlib's tab10).
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
_W, _H = 560, 380  # chart size in pixels
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 32, 44, 52  # plot-area margins


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Axes:
    """A white chart with a frame, y ticks and labels; maps data to pixel coordinates."""

    def __init__(self, title: str, xlabel: str, ylabel: str, x_range: tuple[float, float],
                 y_range: tuple[float, float]) -> None:
        self.image = Image.new("RGB", (_W, _H), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.x0, self.x1 = _LEFT, _W - _RIGHT
        self.y0, self.y1 = _TOP, _H - _BOTTOM
        self.xr, self.yr = x_range, y_range
        self.draw.rectangle((self.x0, self.y0, self.x1, self.y1), outline=(80, 80, 80))
        self.image.paste(viz.text_strip(title, _W, 14), (0, 4))
        if xlabel:
            viz.paste_label(self.image, xlabel, ((self.x0 + self.x1) / 2, _H - 6), "mb", size=12)
        label = viz.text_label(ylabel, 12, (0, 0, 0)).rotate(90, expand=True)
        self.image.paste(label, (4, round((self.y0 + self.y1 - label.height) / 2)))
        for v in _nice_ticks(*y_range):
            if y_range[0] - 1e-9 <= v <= y_range[1] + 1e-9:
                y = self.py(v)
                self.draw.line((self.x0, y, self.x1, y), fill=(232, 232, 232))
                self.draw.line((self.x0 - 4, y, self.x0, y), fill=(80, 80, 80))
                viz.paste_label(self.image, viz.format_number(v), (self.x0 - 6, y), "rm", size=11)
        self.draw.rectangle((self.x0, self.y0, self.x1, self.y1), outline=(80, 80, 80))

    def px(self, v: float) -> float:
        lo, hi = self.xr
        return self.x0 + 10 + (v - lo) / (hi - lo or 1.0) * (self.x1 - self.x0 - 20)

    def py(self, v: float) -> float:
        lo, hi = self.yr
        return self.y1 - (v - lo) / (hi - lo or 1.0) * (self.y1 - self.y0)

    def xticks(self, values: Sequence[float], labels: Sequence[str]) -> None:
        step = max(1, math.ceil(len(values) / 14))
        for v, text in list(zip(values, labels))[::step]:
            x = self.px(v)
            self.draw.line((x, self.y1, x, self.y1 + 4), fill=(80, 80, 80))
            for i, line in enumerate(text.split("\n")):
                viz.paste_label(self.image, line, (x, self.y1 + 6 + 13 * i), "mt", size=11)

    def legend(self, names: Sequence[str]) -> None:
        """A strip below the chart naming each series in its colour (call last: it replaces the image)."""
        if len(names) < 2:
            return
        strip = Image.new("RGB", (_W, 22), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        widths = [24 + viz.text_label(name, 11, (0, 0, 0)).width + 16 for name in names]
        x = max(4, (_W - sum(widths)) // 2)
        for k, (name, width) in enumerate(zip(names, widths)):
            draw.rectangle((x, 6, x + 10, 16), fill=COLOURS[k % len(COLOURS)])
            viz.paste_label(strip, name, (x + 16, 11), "lm", size=11)
            x += width
        self.image = viz.vstack([self.image, strip])


def _range(values: Sequence[float], floor: float | None = None, ceil: float | None = None) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.08 or 0.5
    lo, hi = lo - pad, hi + pad
    return (lo if floor is None else max(floor, lo), hi if ceil is None else min(ceil, hi))


def attention_distance(series: dict[str, Sequence[Sequence[float]]], *, title: str | None = None,
                       ylabel: str = "mean attention distance (pixels)") -> Image.Image:
    """ViT Fig. 7 right: one dot per head at its block, mean attention distance; a colour per model.

    Args:
        series: model name -> blocks -> heads' distances, in input pixels or, for models at different input sizes,
            as a fraction of the image side (then say so in ``ylabel``).
    """
    depth = max(len(blocks) for blocks in series.values())
    values = [v for blocks in series.values() for heads in blocks for v in heads if v is not None and math.isfinite(v)]
    ax = _Axes(title or "Mean attention distance per head", "block (network depth)",
               ylabel, (-0.5, depth - 0.5), (0.0, _range([0.0, *values])[1]))
    ax.xticks(list(range(depth)), [str(b) for b in range(depth)])
    offsets = np.linspace(-0.12, 0.12, len(series)) if len(series) > 1 else [0.0]
    for k, (blocks, dx) in enumerate(zip(series.values(), offsets)):
        colour = COLOURS[k % len(COLOURS)]
        for b, heads in enumerate(blocks):
            for v in heads:
                if v is None or not math.isfinite(v):  # a block the measurement does not apply to
                    continue
                x, y = ax.px(b + dx), ax.py(v)
                ax.draw.ellipse((x - 3.5, y - 3.5, x + 3.5, y + 3.5), fill=colour, outline=(40, 40, 40))
    ax.legend(list(series))
    return ax.image


def lines(
    x: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
    xlabels: Sequence[str] | None = None, y_range: tuple[float, float] | None = None,
) -> Image.Image:
    """One line with dots per series over shared x values (the sweep, the decodability curve)."""
    values = [v for ys in series.values() for v in ys]
    ax = _Axes(title, xlabel, ylabel, (min(x), max(x)) if len(x) > 1 else (x[0] - 1, x[0] + 1),
               y_range or _range(values))
    ax.xticks(list(x), list(xlabels) if xlabels is not None else [viz.format_number(v) for v in x])
    for k, ys in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        points = [(ax.px(a), ax.py(b)) for a, b in zip(x, ys) if b is not None and math.isfinite(b)]
        if len(points) > 1:
            ax.draw.line(points, fill=colour, width=2)
        for px, py in points:
            ax.draw.ellipse((px - 3.5, py - 3.5, px + 3.5, py + 3.5), fill=colour)
    ax.legend(list(series))
    return ax.image


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
         y_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """One bar per label with its value written on top (the reliance figures)."""
    n = len(labels)
    ax = _Axes(title, "", ylabel, (-0.5, n - 0.5), (y_range[0], y_range[1] + 0.1 * (y_range[1] - y_range[0])))
    ax.xticks(list(range(n)), list(labels))
    half = (ax.x1 - ax.x0 - 20) / max(1, n) * 0.32
    for k, v in enumerate(values):
        x, y = ax.px(k), ax.py(min(max(v, y_range[0]), y_range[1]))
        ax.draw.rectangle((x - half, y, x + half, ax.y1), fill=COLOURS[k % len(COLOURS)])
        viz.paste_label(ax.image, f"{v:.3f}", (x, y - 3), "mb", size=11)
    return ax.image


def grouped_bars(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str, ylabel: str,
                 y_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """A group of bars per label, one bar per series in its colour (None draws no bar); a legend names the series."""
    n, k = len(labels), max(1, len(series))
    ax = _Axes(title, "", ylabel, (-0.5, n - 0.5), y_range)
    ax.xticks(list(range(n)), list(labels))
    width = (ax.x1 - ax.x0 - 20) / max(1, n) * 0.8 / k
    for j, values in enumerate(series.values()):
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            x = ax.px(i) + (j - (k - 1) / 2) * width
            y = ax.py(min(max(v, y_range[0]), y_range[1]))
            ax.draw.rectangle((x - width / 2 + 1, y, x + width / 2 - 1, ax.y1), fill=COLOURS[j % len(COLOURS)])
    ax.legend(list(series))
    return ax.image


def filters(components: np.ndarray, explained: np.ndarray, *, cols: int = 7, cell: int = 48) -> Image.Image:
    """The principal components of the patch-embedding filters as RGB patches, 7 to a row (ViT Fig. 7 left).

    Args:
        components: (k, p, q, 3) in [0, 1]; explained: (k,) variance fractions, written under each.
    """
    k, p, q, _ = components.shape
    rows = math.ceil(k / cols)
    pad, label_h = 6, 14
    width = cols * (cell + pad) + pad
    canvas = Image.new("RGB", (width, 34 + rows * (cell + label_h + pad)), (255, 255, 255))
    canvas.paste(viz.text_strip("Patch-embedding filters: top principal components as RGB", width, 14), (0, 2))
    for i in range(k):
        r, c = divmod(i, cols)
        tile = Image.fromarray(np.round(components[i] * 255).astype(np.uint8)).resize((cell, cell),
                                                                                     Image.Resampling.NEAREST)
        x, y = pad + c * (cell + pad), 34 + r * (cell + label_h + pad)
        canvas.paste(tile, (x, y))
        viz.paste_label(canvas, f"{100 * explained[i]:.1f}%", (x + cell / 2, y + cell + 2), "mt", size=10)
    return canvas


def reliance(found: dict[str, object], *, title: str = "Position reliance") -> Image.Image:
    """The reliance figures of :func:`posenc.measure.position_reliance` (means) as bars."""
    if "cosine" in found["no_position"]:  # headless: feature cosine similarity
        labels = ["shuffled patches", "no position term"]
        return bars(labels, [found["shuffle"]["cosine"], found["no_position"]["cosine"]], title=title,
                    ylabel="cosine similarity of features", y_range=(min(0.0, found["shuffle"]["cosine"]), 1.0))
    labels = ["p(top-1)", "shuffled\nagree", "shuffled\np(orig.)", "no pos.\nagree", "no pos.\np(orig.)"]
    values = [found["p_top1"], found["shuffle"]["top1_agreement"], found["shuffle"]["p_original"],
              found["no_position"]["top1_agreement"], found["no_position"]["p_original"]]
    kl = f"KL(original || shuffled) {found['shuffle']['kl']:.3f}, KL(original || no position) " \
         f"{found['no_position']['kl']:.3f} nats"
    return viz.vstack([bars(labels, values, title=title, ylabel="fraction / probability"),
                        viz.text_strip(kl, _W, 12)])


def sweep(rows: Sequence[dict[str, object]], *, title: str = "Resolution sweep") -> Image.Image:
    """Top-1 agreement with the native size and the top-1 probability at each input size."""
    x = list(range(len(rows)))
    labels = [f"{r['size'][0]}x{r['size'][1]}" for r in rows]
    return lines(x, {"top-1 = native top-1": [r["agrees"] for r in rows],
                     "p(top-1)": [r["p_top1"] for r in rows],
                     "p(native top-1 class)": [r["p_native_class"] for r in rows]},
                 title=title, xlabel="input size (h x w)", ylabel="fraction / probability", xlabels=labels,
                 y_range=(0.0, 1.0))


def decodability(r2: np.ndarray, *, title: str = "Position decodability (held-out R²)") -> Image.Image:
    """Held-out R² of the row and column of each patch, decoded from the tokens after each block."""
    x = list(range(len(r2)))
    lo = min(0.0, float(np.nanmin(r2))) if np.isfinite(r2).any() else 0.0
    return lines(x, {"row": r2[:, 0].tolist(), "column": r2[:, 1].tolist()}, title=title,
                 xlabel="after block", ylabel="R² (1 = position fully readable)",
                 xlabels=[str(b) for b in x], y_range=(lo, 1.0))


def histogram(values: np.ndarray, *, title: str, xlabel: str, marks: dict[str, float] | None = None,
              bins: int = 40) -> Image.Image:
    """Counts of ``values`` in equal bins, with a vertical line and a name at each of ``marks`` (thresholds,
    the cls and register norms), so a bimodal distribution shows."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    marks = {k: float(v) for k, v in (marks or {}).items() if math.isfinite(v)}
    lo = min([float(values.min()) if len(values) else 0.0, *marks.values()])
    hi = max([float(values.max()) if len(values) else 1.0, *marks.values()])
    hi = hi if hi > lo else lo + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ax = _Axes(title, xlabel, "tokens", (lo, hi), (0.0, max(1.0, float(counts.max()) * 1.15)))
    ticks = _nice_ticks(lo, hi)
    ax.xticks(ticks, [viz.format_number(t) for t in ticks])
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            ax.draw.rectangle((ax.px(a), ax.py(float(c)), max(ax.px(a) + 1, ax.px(b) - 1), ax.y1), fill=COLOURS[0])
    for k, (name, v) in enumerate(marks.items()):
        colour = COLOURS[(k + 1) % len(COLOURS)]
        ax.draw.line((ax.px(v), ax.y0, ax.px(v), ax.y1), fill=colour, width=2)
        right = ax.px(v) > ax.x1 - 90  # write the name on the side with room
        viz.paste_label(ax.image, name, (ax.px(v) + (-3 if right else 3), ax.y0 + 4 + 13 * k), "rt" if right else "lt",
                        size=11)
    return ax.image


def token_norms(found: dict[str, object], *, title: str = "High-norm tokens") -> Image.Image:
    """The folder's ``"token_norms"`` record: share of high-norm tokens and the decodability R² of high-norm
    against normal tokens, per block, with the rule under the chart."""
    share = [v if v is not None else math.nan for v in found["high_norm_share"]]
    x = list(range(len(share)))
    r2 = {"share of high-norm tokens": share,
          "R² of high-norm tokens": [v if v is not None else math.nan for v in found["decodability_r2_high"]],
          "R² of normal tokens": [v if v is not None else math.nan for v in found["decodability_r2_normal"]]}
    finite = [v for ys in r2.values() for v in ys if math.isfinite(v)]
    chart = lines(x, r2, title=title, xlabel="after block", ylabel="share / R²", xlabels=[str(b) for b in x],
                  y_range=(min([0.0, *finite]), 1.0))
    return viz.vstack([chart, viz.text_strip(f"high-norm: {found['rule']}", _W, 12)])


def write_folder_plots(result: FolderResult, out: Path) -> list[Path]:
    """The CLI's PNG files for a :class:`~posenc.measure.FolderResult`, written into ``out``."""
    name = Path(result.model).name or result.model
    about = f"{name}, {result.images} images"
    written = [viz.save_png(attention_distance({name: result.attention_distance},
                                               title=f"Mean attention distance per head ({about})"),
                            out / "attention_distance.png")]
    if not isinstance(result.filters, str):
        written.append(viz.save_png(filters(*result.filters), out / "patch_filters.png"))
    written.append(viz.save_png(reliance(result.reliance, title=f"Position reliance ({about})"), out / "reliance.png"))
    if not isinstance(result.sweep, str):
        written.append(viz.save_png(sweep(result.sweep, title=f"Resolution sweep ({about})"),
                                    out / "resolution_sweep.png"))
    written.append(viz.save_png(decodability(result.decodability, title=f"Position decodability, held-out R² "
                                             f"({name}, {result.held_out} held-out images)"),
                                out / "decodability.png"))
    if result.token_norms:
        written.append(viz.save_png(token_norms(result.token_norms, title=f"High-norm tokens ({about})"),
                                    out / "token_norms.png"))
    return written
