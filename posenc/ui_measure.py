"""The app's Measure tab: how the chosen model uses position on the uploaded image (:mod:`posenc.measure`).

:func:`measure_tab` builds the tab inside the caller's ``gr.Blocks`` from its dependencies (the model
loader and the Explore tab's image and model controls); :class:`MeasureHandlers` holds its handlers, one
named API endpoint per measurement: ``/attention_distance``, ``/patch_filters``, ``/position_reliance``,
``/resolution_sweep``, and ``/measure`` for all four with the numbers as ``.npz``. Position decodability
needs a folder of images and is left to ``python -m posenc measure``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from posenc import measure, plots, views, viz
from posenc.hub import LoadedModel
from posenc.ui import _image_path, _user_errors

logger = logging.getLogger(__name__)

Loader = Callable[[str | None, Callable[..., Any]], tuple[str, LoadedModel]]
_MAX_AGE_S = 15 * 60  # request folders older than this are deleted (Gradio keeps its own copies)

HELP = """**How much does the model use position?** For the image and model of the Explore tab, at the model's
native input size:

* **Mean attention distance** (ViT paper, Fig. 7 right): per block and head, the attention-weighted distance in
  input pixels between a query patch and the key patches, averaged over query patches; pick a second model to
  compare (one colour per model). Prefix tokens (cls, distillation, registers) are dropped as queries and keys
  and the rest is not renormalised; windowed (Swin) blocks are measured on their own stage grid.
* **Patch-embedding filters** (Fig. 7 left): the top 28 principal components of the patch-embedding conv as RGB.
* **Position reliance**: the prediction against the image with its patches shuffled (seeds 0, 1, 2) and against
  the model with every position term removed: top-1 agreement, KL divergence, probability of the original class.
* **Resolution sweep**: the top-1 and its probability at every input size the model offers.

Position decodability needs many images: run `python -m posenc measure --model ... --images DIR --out OUT`."""


class MeasureHandlers:
    """The Measure tab's handlers; ``load`` maps a model choice to (display name, loaded model)."""

    def __init__(self, load: Loader) -> None:
        self.load = load
        self._root: Path | None = None
        self._lock = threading.Lock()

    def _folder(self) -> Path:
        """A fresh folder for one request's files; folders older than 15 minutes are deleted."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="posenc-measure-"))
            cutoff = time.time() - _MAX_AGE_S
            for old in self._root.iterdir():
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            folder = self._root / uuid.uuid4().hex
            folder.mkdir()
        return folder

    def _run(self, image: Any, model: str, progress: Callable[..., Any]) -> tuple[str, LoadedModel, str, views.Seen]:
        """Load the model and inspect the image at its default size (the native one, unless that needs more than
        ``views.MAX_TRACE_BYTES`` of attention maps, as SAM-B's 1024x1024): (name, loaded, image path, seen)."""
        path = _image_path(image)
        name, loaded = self.load(model, progress)
        progress(0.3, desc=f"Running {name}")
        return name, loaded, path, views.inspect_image(loaded, path, views.default_size(loaded), name=name)

    @staticmethod
    def _distance(seen: views.Seen, other: views.Seen | None = None) -> tuple[Image.Image, dict[str, np.ndarray]]:
        """The attention-distance plot of one model, or of two in two colours, and its numbers."""
        series, arrays = {}, {}
        for key, one in (("", seen), ("compared_", other)):
            if one is None:
                continue
            heads = [d[0].tolist() for d in measure.mean_attention_distance(one.inspection)]
            series[one.name if one.name not in series else f"{one.name} (2)"] = heads
            arrays.update({f"{key}attention_distance_block{b}": np.asarray(h) for b, h in enumerate(heads)})
        title = f"Mean attention distance per head ({' vs '.join(series)}, this image)"
        return plots.attention_distance(series, title=title), arrays

    def _other(self, image: Any, other: str | None, progress: Callable[..., Any]) -> views.Seen | None:
        """The second model's inspection of the image, or None when no second model is chosen."""
        if not (other or "").strip():
            return None
        return self._run(image, other, progress)[3]

    @staticmethod
    def _filters(loaded: LoadedModel) -> tuple[Image.Image, dict[str, np.ndarray]]:
        rgb, explained = measure.patch_embedding_filters(measure.patch_conv(loaded.model).weight)
        return plots.filters(rgb, explained), {"filter_components": rgb, "filter_explained_variance": explained}

    @staticmethod
    def _reliance(seen: views.Seen, path: str) -> tuple[Image.Image, dict[str, np.ndarray], dict[str, Any]]:
        model, x = seen.loaded.model, seen.loaded.pixels(path, seen.size)  # 1, 3, h, w
        patch = (seen.size[0] // seen.grid[0], seen.size[1] // seen.grid[1])
        with torch.inference_mode():
            found = measure.position_reliance(model, x, patch)
        metrics = list(found["no_position"])
        summary: dict[str, Any] = {
            "shuffle": {m: float(torch.cat([s[m] for s in found["shuffle"]]).mean()) for m in metrics},
            "no_position": {m: float(found["no_position"][m][0]) for m in metrics},
        }
        if "p_top1" in found:
            summary["p_top1"] = float(found["p_top1"][0])
        arrays = {f"reliance_shuffle_{m}": np.asarray([float(s[m][0]) for s in found["shuffle"]]) for m in metrics}
        arrays.update({f"reliance_no_position_{m}": np.asarray(v) for m, v in summary["no_position"].items()})
        arrays["reliance_seeds"] = np.asarray(measure.SHUFFLE_SEEDS)
        return plots.reliance(summary, title=f"Position reliance ({seen.name}, this image)"), arrays, summary

    @staticmethod
    def _sweep(seen: views.Seen, path: str) -> tuple[Image.Image, dict[str, np.ndarray], list[dict[str, Any]]]:
        loaded = seen.loaded
        sizes = views.input_sizes(loaded)
        inputs = {s: loaded.pixels(path, s) for s in sizes}  # size -> 1, 3, h, w
        with torch.inference_mode():
            found = measure.resolution_sweep(loaded.model, inputs, seen.size)
        rows = [{"size": list(s), "label": loaded.labels[int(f["top1"][0])],
                 **{k: float(f[k][0]) for k in ("agrees", "p_top1", "p_native_class")}} for s, f in found.items()]
        top1 = [int(f["top1"][0]) for f in found.values()]
        arrays = {"sweep_sizes": np.asarray(sizes), "sweep_top1": np.asarray(top1),
                  **{f"sweep_{k}": np.asarray([r[k] for r in rows]) for k in ("p_top1", "p_native_class")}}
        return plots.sweep(rows, title=f"Resolution sweep ({seen.name}, this image)"), arrays, rows

    def _png(self, image: Image.Image, what: str, folder: Path | None = None) -> str:
        return str(viz.save_png(image, (folder or self._folder()) / f"posenc_{what}.png"))

    # ---------------------------------------------------------------- endpoints

    @_user_errors
    def attention_distance(
        self, image: Any, model: str, compare_with: str | None = None, progress: gr.Progress = gr.Progress()
    ) -> str:
        """PNG: mean attention distance of every head against depth, for this image (and a second model)."""
        _, _, _, seen = self._run(image, model, progress)
        return self._png(self._distance(seen, self._other(image, compare_with, progress))[0], "attention_distance")

    @_user_errors
    def patch_filters(self, model: str, progress: gr.Progress = gr.Progress()) -> str:
        """PNG: the top 28 principal components of the patch-embedding filters (no image needed)."""
        _, loaded = self.load(model, progress)
        return self._png(self._filters(loaded)[0], "patch_filters")

    @_user_errors
    def position_reliance(self, image: Any, model: str, progress: gr.Progress = gr.Progress()) -> str:
        """PNG: the prediction against shuffled patches and against the model without position."""
        _, _, path, seen = self._run(image, model, progress)
        return self._png(self._reliance(seen, path)[0], "position_reliance")

    @_user_errors
    def resolution_sweep(self, image: Any, model: str, progress: gr.Progress = gr.Progress()) -> str:
        """PNG: top-1 agreement and probabilities at every offered input size."""
        _, _, path, seen = self._run(image, model, progress)
        return self._png(self._sweep(seen, path)[0], "resolution_sweep")

    @_user_errors
    def measure(
        self, image: Any, model: str, compare_with: str | None = None, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, ...]:
        """All four measurements: four PNGs (the filters None when not applicable), the ``.npz`` and a summary."""
        if image is None:
            return None, None, None, None, None, "Upload an image or pick an example in the Explore tab."
        name, loaded, path, seen = self._run(image, model, progress)
        folder = self._folder()
        progress(0.5, desc="Measuring")
        distance, arrays = self._distance(seen, self._other(image, compare_with, progress))
        try:
            filters_image, filter_arrays = self._filters(loaded)
            arrays.update(filter_arrays)
            filters_note = ""
        except measure.NotApplicable as error:
            filters_image, filters_note = None, f"\n\n*{error}*"
        reliance, reliance_arrays, found = self._reliance(seen, path)
        arrays.update(reliance_arrays)
        try:
            sweep_image, sweep_arrays, rows = self._sweep(seen, path)
            arrays.update(sweep_arrays)
        except measure.NotApplicable as error:
            sweep_image, rows, filters_note = None, [], filters_note + f"\n\n*{error}*"
        npz = viz.save_npz(folder / "posenc_measures.npz", **arrays)
        return (self._png(distance, "attention_distance", folder),
                None if filters_image is None else self._png(filters_image, "patch_filters", folder),
                self._png(reliance, "position_reliance", folder),
                None if sweep_image is None else self._png(sweep_image, "resolution_sweep", folder),
                str(npz), _summary(name, seen, found, rows) + filters_note)


def _summary(name: str, seen: views.Seen, found: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown: the reliance numbers and the top-1 at each size."""
    lines = [f"**{name}** at {views.format_size(seen.size)}", "", "| compared with | agreement | KL (nats) | "
             "p(original class) |", "|---|---:|---:|---:|"] if "p_top1" in found else [f"**{name}**", ""]
    if "p_top1" in found:
        for key, what in (("shuffle", "patches shuffled (mean of 3 seeds)"), ("no_position", "no position term")):
            f = found[key]
            lines.append(f"| {what} | {f['top1_agreement']:.2f} | {f['kl']:.3f} | {f['p_original']:.3f} |")
        lines += ["", f"Original top-1 probability {found['p_top1']:.3f}.", "", "| input size | top-1 | p |",
                  "|---|---|---:|"]
        lines += [f"| {r['size'][0]}x{r['size'][1]} | {r['label']} | {r['p_top1']:.3f} |" for r in rows]
    else:
        lines.append(f"Feature cosine similarity: shuffled {found['shuffle']['cosine']:.3f}, "
                     f"no position term {found['no_position']['cosine']:.3f}.")
    return "\n".join(lines)


def measure_tab(*, load: Loader, image: gr.components.Component, model: gr.components.Component) -> MeasureHandlers:
    """Build the Measure tab inside the current ``gr.Blocks`` and wire its endpoints.

    Args:
        load: (model choice, progress) -> (display name, loaded model); refuses sources the app may not load.
        image: the Explore tab's image input (measured as it is).
        model: the Explore tab's model choice.

    Returns:
        The handlers (for tests).
    """
    h = MeasureHandlers(load)
    with gr.Tab("Measure", id="measure"):
        gr.Markdown(HELP)
        with gr.Row():
            other = gr.Dropdown(getattr(model, "choices", None) or [], value=None, allow_custom_value=True,
                                label="Compare the attention distance with (optional)", elem_id="measure-other")
            button = gr.Button("Measure the image of the Explore tab", variant="primary")
        summary = gr.Markdown(elem_id="measure-summary")
        with gr.Row():
            distance = _image("Mean attention distance", "measure-distance")
            filters = _image("Patch-embedding filters", "measure-filters")
        with gr.Row():
            reliance = _image("Position reliance", "measure-reliance")
            sweep = _image("Resolution sweep", "measure-sweep")
        npz = gr.File(label="The numbers behind the plots (.npz)", elem_id="measure-npz")
    button.click(h.measure, inputs=[image, model, other], outputs=[distance, filters, reliance, sweep, npz, summary],
                 api_name="measure", preprocess=False, trigger_mode="always_last")
    hidden = gr.Button("measure API", visible=False)
    hidden.click(h.attention_distance, inputs=[image, model, other], outputs=distance, api_name="attention_distance",
                 preprocess=False)
    hidden.click(h.patch_filters, inputs=[model], outputs=filters, api_name="patch_filters")
    hidden.click(h.position_reliance, inputs=[image, model], outputs=reliance, api_name="position_reliance",
                 preprocess=False)
    hidden.click(h.resolution_sweep, inputs=[image, model], outputs=sweep, api_name="resolution_sweep",
                 preprocess=False)
    return h


def _image(label: str, elem_id: str) -> gr.Image:
    """An output PNG with download and full-screen buttons above the plot's own title (the app's posenc-view style;
    over the title they hid its end)."""
    return gr.Image(label=label, show_label=False, format="png", interactive=False, type="filepath",
                    buttons=["download", "fullscreen"], elem_id=elem_id, elem_classes=["posenc-view"])
