"""The app's named API endpoints of the Explore views (see ``Use via API`` in the page footer).

``/predict``, ``/attention``, ``/view`` (any mechanism's view by key), ``/analyse`` (every view plus the
``.npz``) and the kind endpoints ``/position_embedding``, ``/relative_bias`` and ``/rope``: each answers for
every model with a mechanism of its kind (absolute, relative, rotary), with that mechanism's views, and
refuses any other model naming its mechanisms. ``/compare`` is the Compare tab's (:mod:`posenc.app.compare`),
the Measure endpoints the Measure tab's (:mod:`posenc.app.measure`). Every endpoint raises ``gr.Error`` with
the user's message (:func:`posenc.app.common.user_errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from posenc import mechanisms, views
from posenc.app.common import (
    KIND_TITLES,
    RequestFiles,
    block_number,
    draw_mechanisms,
    image_path,
    predictions,
    summary_line,
    user_errors,
    view_image,
    view_key,
    views_of,
)
from posenc.app.compare import CompareHandlers, CompareTab
from posenc.app.explore import ExploreTab
from posenc.app.state import Models
from posenc.mechanisms import Mechanism, ViewSpec

#: The kind endpoints: name -> (kind, how many pictures it returns). The counts are those of the first
#: mechanisms of each kind (learned: 3, the relative table: 2, axial RoPE: 1), kept for existing clients.
KIND_ENDPOINTS = {"position_embedding": ("absolute", 3), "relative_bias": ("relative", 2), "rope": ("rotary", 1)}
#: The kind endpoints' pictures as the API describes them.
KIND_OUTPUT_LABELS = {"position_embedding": ("similarity grid", "similarity to the patch", "PCA"),
                      "relative_bias": ("bias table", "query bias"), "rope": ("similarity to the patch",)}


def kind_views(mechanism: Mechanism, count: int) -> list[ViewSpec]:
    """The views a kind endpoint returns for a mechanism: its first ``count`` views in display order, the last
    place given to its per-patch (compare) view when that would be left out. ``/view`` gives any of them."""
    specs = list(mechanism.views[:count])
    main = next((s for s in mechanism.views if s.compare), None)
    if main is not None and main not in specs and specs:
        specs[-1] = main
    return specs


class ApiHandlers:
    """The named endpoints of the Explore views.

    Args:
        models: where models are loaded from.
        files: where each request's downloadable files go.
    """

    def __init__(self, models: Models, files: RequestFiles) -> None:
        self.models = models
        self.files = files

    def _see(self, image: Any, model: str | None, size: Any, progress: Callable[..., Any]) -> views.Seen:
        return self.models.see(image_path(image), model, size, progress)

    @user_errors
    def predict(
        self, image: Any, model: str, size: Any = None, progress: gr.Progress = gr.Progress()
    ) -> dict[str, float] | str:
        """Top-5 classes as {label: probability} (:data:`posenc.views.NO_CLASSIFIER` for a model without one)."""
        return predictions(self._see(image, model, size, progress))

    @user_errors
    def analyse(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """Every view of every mechanism of the registry (None where the model lacks it), plus the raw tensors.

        Returns:
            picker, top-5, one image per registry view (``/view`` keys, in registry order), attention, npz, summary.
        """
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        b = block_number(block, seen.num_blocks)
        progress(0.6, desc="Drawing the views")
        drawn = draw_mechanisms(seen, b, patch)
        attention, _ = views.try_view(lambda: views.attention_view(seen, b, patch))  # None: no token map (XCiT, CoaT)
        files = self.files.downloads(seen, patch, b)
        npz = files.npz(seen, patch, b, [*drawn.drawn, attention])
        images = [files.png(view_key(m, s).replace("/", "_"), drawn.images[view_key(m, s)]) for m, s in views_of()]
        return (files.png("input", views.patch_picker(seen, patch)), predictions(seen), *images,
                None if attention is None else files.png("attention", attention.image), npz,
                summary_line(seen, patch, b))  # the block's description says why a block has no attention map

    @user_errors
    def view(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        view: str = "", progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """One view of one position mechanism, by its key ("learned/similarity_grid"), as a PNG."""
        known = {view_key(m, s): (m, s) for m, s in views_of()}
        if view not in known:
            raise ValueError(f"view {view!r} does not exist; the views are: {', '.join(known)}")
        mechanism, spec = known[view]
        seen = self._see(image, model, size, progress)
        if mechanism.name not in seen.loaded.model.mechanisms:
            raise ValueError(f"{seen.name} does not use a {mechanism.title}, so it has no {spec.label.lower()} "
                             f"view; its mechanisms: {mechanisms.describe(seen.loaded.model.mechanisms)}")
        patch = views.check_patch(row, col, seen.grid)
        b = block_number(block, seen.num_blocks)
        return self.files.downloads(seen, patch, b).png(view.replace("/", "_"), spec.draw(seen, b, patch).image)

    def kind(self, endpoint: str, image: Any, model: str, size: Any, block: Any, row: Any, col: Any,
             progress: Callable[..., Any]) -> tuple[str | None, ...]:
        """A kind endpoint's pictures: the views of the model's (first) mechanism of that kind, None-padded.

        Raises:
            ValueError: the model has no mechanism of that kind; the message names the ones it has, by title,
                and the endpoint that shows them.
        """
        kind, count = KIND_ENDPOINTS[endpoint]
        seen = self._see(image, model, size, progress)
        found = [m for m in mechanisms.of(seen.loaded.model.mechanisms) if m.kind == kind]
        if not found:
            raise ValueError(_no_kind_message(seen, kind))
        mechanism = found[0]
        patch = views.check_patch(row, col, seen.grid)
        b = block_number(block, seen.num_blocks)
        files = self.files.downloads(seen, patch, b)
        pngs = [files.png(view_key(mechanism, s).replace("/", "_"), s.draw(seen, b, patch).image)
                for s in kind_views(mechanism, count)]
        return tuple(pngs + [None] * (count - len(pngs)))

    @user_errors
    def position_embedding(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str | None, ...]:
        """Absolute position views: for a learned or sin-cos embedding the similarity grid, the clicked patch's
        similarity and the PCA, as PNGs."""
        return self.kind("position_embedding", image, model, size, None, row, col, progress)

    @user_errors
    def relative_bias(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str | None, ...]:
        """Relative position views of a block: the mechanism's table (or first view) and the clicked query's bias."""
        return self.kind("relative_bias", image, model, size, block, row, col, progress)

    @user_errors
    def rope(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """Rotary views: the RoPE similarity between the clicked patch and every other."""
        return self.kind("rope", image, model, size, None, row, col, progress)[0]

    @user_errors
    def attention(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """Every head's attention from the clicked patch in a block, and without the position term if any."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        b = block_number(block, seen.num_blocks)
        return self.files.downloads(seen, patch, b).png("attention", views.attention_view(seen, b, patch).image)


def _no_kind_message(seen: views.Seen, kind: str) -> str:
    """A model without a mechanism of ``kind``: its mechanisms by title, and where their views are."""
    used = mechanisms.of(seen.loaded.model.mechanisms)
    where = {k: f"/{name}" for name, (k, _) in KIND_ENDPOINTS.items()}
    ask = sorted({where[m.kind] for m in used if m.kind in where})
    hint = f"; ask {' or '.join(ask)} for its views" if ask else ""
    return (f"{seen.name} has no {KIND_TITLES[kind].lower()} mechanism; its mechanisms: "
            f"{mechanisms.describe(seen.loaded.model.mechanisms)}{hint}")


def wire_api(h: ApiHandlers, compare: CompareHandlers, *, explore: ExploreTab, compare_tab: CompareTab) -> None:
    """Register the named endpoints on a hidden button (inside the current ``gr.Blocks``)."""
    view_keys = [view_key(m, s) for m, s in views_of()]
    named = explore.named
    with gr.Row(visible=False):
        button = gr.Button("API")  # carries the API-only endpoints; never shown
        size = gr.Textbox(label="size", value=None)
        block = gr.Number(label="block", value=None, precision=0)
        view = gr.Dropdown(view_keys, value=view_keys[0] if view_keys else None, label="view")
        api_views = [view_image(f"view {key}") for key in view_keys]
        sides = [(gr.Label(label=f"model {side}: top-5"), view_image(f"model {side}: position view"),
                  view_image(f"model {side}: attention")) for side in "AB"]
        kind_outputs = {name: [view_image(label) for label in KIND_OUTPUT_LABELS[name]] for name in KIND_ENDPOINTS}
        one = view_image("view")

    image, model, row, col = explore.image, explore.model, explore.row, explore.col
    size_doc = ("size: 'HxW' in pixels, or None for the model's native size. Any size works whose height and width "
                "are multiples of the model's patch (for Swin: of patch x 2^stage x window at every stage), each "
                f"side at most {views.MAX_SIZE_FACTOR} times the native side, with at most "
                f"{views.MAX_TRACE_BYTES >> 20} MB of attention maps; a refused size's message states the "
                "model's rule.")
    common = ("model: a public model name (a bundled model such as 'cifar10-rope', or a Hub repo id 'org/name'). "
              f"{size_doc} block: a block number; past the last block means the last, below 0 means 0. row, col: "
              "the patch on the input grid (None, None: the centre).")

    def api(fn: Callable[..., Any], inputs: list[Any], outputs: Any, name: str, what: str) -> None:
        button.click(fn, inputs=inputs, outputs=outputs, api_name=name, preprocess=False,
                     api_description=f"{what} {common}")

    def titles(kind: str) -> str:
        return ", ".join(m.title for m in mechanisms.MECHANISMS.values() if m.kind == kind)

    api(h.predict, [image, model, size], named["label"], "predict", "Top-5 classes of the image.")
    api(h.position_embedding, [image, model, size, row, col], kind_outputs["position_embedding"],
        "position_embedding", f"Absolute position views, for a model with one ({titles('absolute')}): the "
        "similarity grid, the similarity to the patch, the PCA.")
    api(h.relative_bias, [image, model, size, block, row, col], kind_outputs["relative_bias"], "relative_bias",
        f"Relative position views of a block, for a model with one ({titles('relative')}): the mechanism's first "
        "view (its table) and the clicked query's bias.")
    api(h.rope, [image, model, size, row, col], kind_outputs["rope"], "rope",
        f"Rotary view, for a model with one ({titles('rotary')}): the similarity to the patch.")
    api(h.attention, [image, model, size, block, row, col], named["attention"], "attention",
        "Every head's attention from the patch in a block, with and without the position term.")
    api(h.view, [image, model, size, block, row, col, view], one, "view",
        "One view of a position mechanism, by key (mechanism/view), e.g. "
        f"{', '.join(view_keys[:3])}; the model must use that mechanism.")
    api(h.analyse, [image, model, size, block, row, col],
        [named["picker"], named["label"], *api_views, named["attention"], named["npz"], named["summary"]], "analyse",
        "Every view at once: picker, top-5, one image per view key in this order: "
        f"{', '.join(view_keys)} (None where the model lacks the mechanism), attention, the .npz, a summary "
        "(the .npz and the summary are always the last two).")
    c = compare_tab
    button.click(compare.compare, inputs=[image, c.model_a, c.model_b, c.block, c.row, c.col],
                 outputs=[c.picker_a, *sides[0], *sides[1], c.summary], api_name="compare", preprocess=False,
                 api_description="Two models side by side on one image and patch. block: 'first', 'middle', "
                 "'last' or a number (past a model's last block means its last). Returns A's patch picker, then for "
                 "A and B: top-5, the compare view of the model's first mechanism that has one, attention; a "
                 "summary.")
