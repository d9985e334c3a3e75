"""The Measure tab: how the chosen model uses position on the uploaded image (:mod:`posenc.measure`).

:func:`measure_tab` builds the tab inside the caller's ``gr.Blocks``; :class:`MeasureHandlers` holds its
handlers, one named API endpoint per measurement: ``/attention_distance``, ``/patch_filters``,
``/position_reliance``, ``/resolution_sweep``, and ``/measure`` for all four with the numbers as ``.npz``.
Position decodability needs a folder of images and is left to ``python -m posenc measure``.

As in the Explore tab, one measurement that does not apply to a model, or fails, shows a one-line note in
place of its plot; the others still run and show their plots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from posenc import measure, plots, views, viz
from posenc.app.common import (
    Outputs,
    RequestFiles,
    choices_of,
    image_path,
    sentence,
    user_errors,
    user_message,
    view_image,
)
from posenc.hub import LoadedModel

logger = logging.getLogger(__name__)

#: (model choice, progress) -> (public name, loaded model), e.g. :meth:`posenc.app.state.Models.load`.
Loader = Callable[[str | None, Callable[..., Any]], tuple[str, LoadedModel]]
#: The four measurements of the tab: name -> the plot's label.
MEASUREMENTS = {"distance": "Mean attention distance", "filters": "Patch-embedding filters",
                "reliance": "Position reliance", "sweep": "Resolution sweep"}

HELP = """**How much does the model use position?** For the image and model of the Explore tab, at the model's
native input size:

* **Mean attention distance** (ViT paper, Fig. 7 right): per block and head, the attention-weighted distance in
  input pixels between a query patch and the key patches, averaged over query patches; pick models to compare
  (one colour per model; models at different input sizes are drawn as a fraction of the image side, distance /
  side, so a model at 518 pixels and one at 224 share one scale). Prefix tokens (cls, distillation, registers) are dropped as queries and keys
  and the rest is not renormalised. Every token sits where its block's token layout puts it: windowed blocks
  place each token before the shift and drop padding, subsampled or pooled blocks measure from each query to each
  key, and a block without token-to-token attention is left out with a note.
* **Patch-embedding filters** (Fig. 7 left): the top 28 principal components of the patch-embedding conv as RGB.
* **Position reliance**: the prediction against the image with its patches shuffled (seeds 0, 1, 2) and against
  the model with every position term removed: top-1 agreement, KL divergence, probability of the original class.
* **Resolution sweep**: the top-1 and its probability at every input size the model offers.

A measurement that does not apply to the model says so in place of its plot.
Position decodability needs many images: run `python -m posenc measure --model ... --images DIR --out OUT`."""


@dataclass
class Measured:
    """The four measurements of one request.

    Attributes:
        name, seen: the model's public name and its inspection of the image.
        images: measurement -> plot, for those that ran.
        notes: measurement -> one line saying why it has no plot (it does not apply, or it failed).
        arrays: the numbers behind the plots, for the ``.npz``.
        reliance: the position-reliance summary (empty when it did not run).
        sweep: one row per input size (empty when it did not run).
    """

    name: str
    seen: views.Seen
    images: dict[str, Image.Image] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    reliance: dict[str, Any] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def run(self, what: str, make: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...] | None:
        """Run one measurement: keep its plot and numbers, or a note in its place (it does not apply, or failed).

        ``make`` returns (plot, arrays, ...); the rest of its tuple is returned.
        """
        try:
            image, arrays, *rest = make()
        except measure.NotApplicable as error:
            reason = sentence(str(error))
            named = reason.lower().startswith(MEASUREMENTS[what].lower())  # the reason may name it already
            self.notes[what] = reason if named else f"{MEASUREMENTS[what]} does not apply to {self.name}: {reason}"
            return None
        except Exception as error:  # one measurement's failure must not take the others down
            self.notes[what] = f"{MEASUREMENTS[what]} could not be measured: {sentence(user_message(error))}"
            return None
        self.images[what] = image
        self.arrays.update(arrays)
        return tuple(rest)


class MeasureHandlers:
    """The Measure tab's handlers.

    Args:
        load: (model choice, progress) -> (public name, loaded model); refuses sources the app may not load.
        files: where each request's files go (default: a store of its own).
    """

    def __init__(self, load: Loader, files: RequestFiles | None = None) -> None:
        self.load = load
        self.files = files if files is not None else RequestFiles(prefix="posenc-measure-")

    def _run(self, image: Any, model: str, progress: Callable[..., Any]) -> tuple[str, LoadedModel, str, views.Seen]:
        """Load the model and inspect the image at its default size (the native one, unless that needs more than
        ``views.MAX_TRACE_BYTES`` of attention maps, as SAM-B's 1024x1024): (name, loaded, image path, seen)."""
        path = image_path(image)
        name, loaded = self.load(model, progress)
        progress(0.3, desc=f"Running {name}")
        return name, loaded, path, views.inspect_image(loaded, path, views.default_size(loaded), name=name)

    @staticmethod
    def _distance(seen: views.Seen, *others: views.Seen) -> tuple[Image.Image, dict[str, np.ndarray]]:
        """The attention-distance plot of one model, or of several in one colour each, and its numbers (pixels).

        Models at different input sizes are plotted on one scale, as a fraction of the image side
        (:func:`posenc.atlas.distance_fraction`); models at one size in input pixels.
        """
        from posenc.atlas import distance_fraction

        everyone = (seen, *others)
        same = len({tuple(one.size) for one in everyone}) == 1
        series, arrays = {}, {}
        for k, one in enumerate(everyone):
            heads = [d[0].tolist() for d in measure.mean_attention_distance(one.inspection)]
            name = one.name if same else f"{one.name} at {views.format_size(one.size)}"
            name = name if name not in series else f"{name} ({k + 1})"
            series[name] = heads if same else distance_fraction(heads, one.size)
            key = "" if k == 0 else "compared_" if k == 1 else f"compared{k}_"
            arrays.update({f"{key}attention_distance_block{b}": np.asarray(h) for b, h in enumerate(heads)})
        if same:
            title = f"Mean attention distance per head ({' vs '.join(series)}, this image)"
            return plots.attention_distance(series, title=title), arrays
        title = "Mean attention distance per head as a fraction of the image side (this image)"
        return plots.attention_distance(series, title=title, ylabel="distance / image side (fraction)"), arrays

    def _others(self, image: Any, others: str | list[str] | None, progress: Callable[..., Any]) -> list[views.Seen]:
        """The compared models' inspections of the image: ``others`` is one model (a string), several (a list), or
        none (None or "")."""
        chosen = [others] if isinstance(others, str) else list(others or [])
        return [self._run(image, other, progress)[3] for other in chosen if (other or "").strip()]

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

    def _png(self, image: Image.Image | None, what: str, folder: Any = None) -> str | None:
        if image is None:
            return None
        return str(viz.save_png(image, (folder or self.files.folder()) / f"posenc_{what}.png"))

    # ---------------------------------------------------------------- all four

    def measure_all(self, image: Any, model: str, compare_with: str | list[str] | None, progress: Callable[..., Any]) -> Measured:
        """Every measurement of the image; one that does not apply or fails leaves a note, the others still run.

        Raises:
            ValueError, HubLoadError, ...: no image, or the model cannot be loaded or run (nothing to measure).
        """
        if image is None:
            raise ValueError("Upload an image or pick an example in the Explore tab.")
        name, loaded, path, seen = self._run(image, model, progress)
        found = Measured(name, seen)
        progress(0.5, desc="Measuring")
        found.run("distance", lambda: self._distance(seen, *self._others(image, compare_with, progress)))
        found.run("filters", lambda: self._filters(loaded))
        found.reliance = (found.run("reliance", lambda: self._reliance(seen, path)) or ({},))[0]
        found.sweep = (found.run("sweep", lambda: self._sweep(seen, path)) or ([],))[0]
        return found

    def _saved(self, found: Measured) -> tuple[dict[str, str | None], str]:
        """The plots as PNGs by measurement (None where there is none) and the ``.npz``, in one request folder."""
        folder = self.files.folder()
        names = {"distance": "attention_distance", "filters": "patch_filters", "reliance": "position_reliance",
                 "sweep": "resolution_sweep"}
        pngs = {what: self._png(found.images.get(what), names[what], folder) for what in MEASUREMENTS}
        return pngs, str(viz.save_npz(folder / "posenc_measures.npz", **found.arrays))

    def page(self, image: Any, model: str, compare_with: str | list[str] | None,
             progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """The tab's button: each plot, or a note in its place; a request that cannot run at all says so once."""
        try:
            found = self.measure_all(image, model, compare_with, progress)
        except Exception as error:
            return {"summary": f"**Not run.** {sentence(user_message(error))} The plots below, if any, are those of "
                               "the previous measurement."}
        pngs, npz = self._saved(found)
        out: dict[str, Any] = {"npz": npz, "summary": _summary(found)}
        for what in MEASUREMENTS:
            out[what] = gr.Image(value=pngs[what], visible=pngs[what] is not None)
            out[f"note:{what}"] = gr.Markdown(found.notes.get(what, ""), visible=what in found.notes)
        return out

    # ---------------------------------------------------------------- endpoints

    @user_errors
    def measure(
        self, image: Any, model: str, compare_with: str | list[str] | None = None, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, ...]:
        """All four measurements: four PNGs (None for one that does not apply or fails: the summary says why),
        the ``.npz`` and a summary."""
        if image is None:
            return None, None, None, None, None, "Upload an image or pick an example in the Explore tab."
        found = self.measure_all(image, model, compare_with, progress)
        pngs, npz = self._saved(found)
        notes = "".join(f"\n\n*{note}*" for note in found.notes.values())
        return (*pngs.values(), npz, _summary(found) + notes)

    @user_errors
    def attention_distance(
        self, image: Any, model: str, compare_with: str | list[str] | None = None, progress: gr.Progress = gr.Progress()
    ) -> str | None:
        """PNG: mean attention distance of every head against depth, for this image and the compared models
        (``compare_with``: one model as a string, as before, or a list of models); models at different input sizes
        are drawn as a fraction of the image side."""
        _, _, _, seen = self._run(image, model, progress)
        return self._png(self._distance(seen, *self._others(image, compare_with, progress))[0], "attention_distance")

    @user_errors
    def patch_filters(self, model: str, progress: gr.Progress = gr.Progress()) -> str | None:
        """PNG: the top 28 principal components of the patch-embedding filters (no image needed)."""
        _, loaded = self.load(model, progress)
        return self._png(self._filters(loaded)[0], "patch_filters")

    @user_errors
    def position_reliance(self, image: Any, model: str, progress: gr.Progress = gr.Progress()) -> str | None:
        """PNG: the prediction against shuffled patches and against the model without position."""
        _, _, path, seen = self._run(image, model, progress)
        return self._png(self._reliance(seen, path)[0], "position_reliance")

    @user_errors
    def resolution_sweep(self, image: Any, model: str, progress: gr.Progress = gr.Progress()) -> str | None:
        """PNG: top-1 agreement and probabilities at every offered input size."""
        _, _, path, seen = self._run(image, model, progress)
        return self._png(self._sweep(seen, path)[0], "resolution_sweep")


def _summary(found: Measured) -> str:
    """Markdown: the reliance numbers and the top-1 at each size (what of them was measured)."""
    seen, reliance, rows = found.seen, found.reliance, found.sweep
    lines = [f"**{found.name}** at {views.format_size(seen.size)}", ""]
    if "p_top1" in reliance:
        lines += ["| compared with | agreement | KL (nats) | p(original class) |", "|---|---:|---:|---:|"]
        for key, what in (("shuffle", "patches shuffled (mean of 3 seeds)"), ("no_position", "no position term")):
            f = reliance[key]
            lines.append(f"| {what} | {f['top1_agreement']:.2f} | {f['kl']:.3f} | {f['p_original']:.3f} |")
        lines += ["", f"Original top-1 probability {reliance['p_top1']:.3f}."]
    elif reliance:
        lines.append(f"Feature cosine similarity: shuffled {reliance['shuffle']['cosine']:.3f}, "
                     f"no position term {reliance['no_position']['cosine']:.3f}.")
    if rows:
        lines += ["", "| input size | top-1 | p |", "|---|---|---:|"]
        lines += [f"| {r['size'][0]}x{r['size'][1]} | {r['label']} | {r['p_top1']:.3f} |" for r in rows]
    return "\n".join(lines)


def measure_tab(h: MeasureHandlers, *, image: gr.components.Component, model: gr.components.Component) -> None:
    """Build the Measure tab inside the current ``gr.Blocks`` and wire its page event and endpoints.

    Args:
        h: its handlers.
        image: the Explore tab's image input (measured as it is).
        model: the Explore tab's model choice.
    """
    named: dict[str, Any] = {}
    with gr.Tab("Measure", id="measure"):
        gr.Markdown(HELP)
        with gr.Row():
            other = gr.Dropdown(choices_of(model), value=[], allow_custom_value=True, multiselect=True,
                                label="Compare the attention distance with (optional, several models)",
                                elem_id="measure-other")
            button = gr.Button("Measure the image of the Explore tab", variant="primary")
        summary = gr.Markdown(elem_id="measure-summary")
        for pair in (("distance", "filters"), ("reliance", "sweep")):
            with gr.Row():
                for what in pair:
                    with gr.Column():
                        named[f"note:{what}"] = gr.Markdown(visible=False, elem_id=f"measure-note-{what}")
                        named[what] = view_image(MEASUREMENTS[what], elem_id=f"measure-{what}")
        npz = gr.File(label="The numbers behind the plots (.npz)", elem_id="measure-npz")
    page = Outputs({"summary": summary, "npz": npz, **named})
    button.click(page.wrap(h.page), inputs=[image, model, other], outputs=page.components, preprocess=False,
                 api_visibility="private", trigger_mode="always_last", show_progress_on=[summary])
    hidden = gr.Button("measure API", visible=False)
    plots_out = [named[what] for what in MEASUREMENTS]
    hidden.click(h.measure, inputs=[image, model, other], outputs=[*plots_out, npz, summary], api_name="measure",
                 preprocess=False)
    hidden.click(h.attention_distance, inputs=[image, model, other], outputs=named["distance"],
                 api_name="attention_distance", preprocess=False)
    hidden.click(h.patch_filters, inputs=[model], outputs=named["filters"], api_name="patch_filters")
    hidden.click(h.position_reliance, inputs=[image, model], outputs=named["reliance"], api_name="position_reliance",
                 preprocess=False)
    hidden.click(h.resolution_sweep, inputs=[image, model], outputs=named["sweep"], api_name="resolution_sweep",
                 preprocess=False)
