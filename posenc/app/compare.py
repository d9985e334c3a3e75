"""The Compare tab: two models side by side on the Explore tab's image and the same patch.

One comparison (:meth:`CompareHandlers.draw`) is drawn for both the page and the ``/compare`` endpoint: model A's
patch picker, then for each model its top-5, the compare view of every mechanism it uses and its attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from posenc import mechanisms, views
from posenc.app.common import (
    Outputs,
    RequestFiles,
    block_number,
    choices_of,
    image_path,
    pick_patch,
    predictions,
    sentence,
    user_errors,
    user_message,
    view_image,
    view_key,
)
from posenc.app.state import Models
from posenc.hub import HubLoadError
from posenc.mechanisms import MECHANISMS, Mechanism

HELP = ("Two models on the image of the Explore tab and the same patch: click a patch on model A's input; model B "
        "uses the patch at the same place. Both run at their native sizes; a block number past a model's last block "
        "means its last block.")


def compare_mechanisms() -> list[Mechanism]:
    """The mechanisms that have a view for the Compare tab."""
    return [m for m in MECHANISMS.values() if any(spec.compare for spec in m.views)]


@dataclass(frozen=True)
class Side:
    """One model of a comparison.

    Attributes:
        seen, patch, block: what was run and drawn.
        label: the top-5 (or the words for a model without a classifier).
        position: mechanism name -> PNG of its compare view, for the mechanisms the model uses, in display order.
        attention: PNG of the attention from the patch.
    """

    seen: views.Seen
    patch: views.Patch
    block: int
    label: dict[str, float] | str
    position: dict[str, str | None]
    attention: str | None

    @property
    def line(self) -> str:
        """Markdown: the model, its mechanisms, the patch and the block."""
        seen = self.seen
        return (f"**{seen.name}** ({mechanisms.describe(seen.loaded.model.mechanisms)}): patch {self.patch} of "
                f"{seen.grid[0]}x{seen.grid[1]}, {views.describe_block(seen, self.block)}")


@dataclass(frozen=True)
class Comparison:
    """Two models on one image and patch: model A's patch picker and both sides."""

    picker_a: str | None
    sides: tuple[Side, Side]

    @property
    def summary(self) -> str:
        return "  \n".join(side.line for side in self.sides)


class CompareHandlers:
    """The Compare tab's handlers.

    Args:
        models: where models are loaded from.
        files: where each request's downloadable files go.
    """

    def __init__(self, models: Models, files: RequestFiles) -> None:
        self.models = models
        self.files = files

    def draw(self, image: Any, model_a: str, model_b: str, block: Any, row: Any, col: Any,
             progress: Callable[..., Any]) -> Comparison:
        """Run both models at their native sizes and draw the comparison.

        ``row``/``col`` are on model A's grid (None: the centre); model B gets the patch at the same relative place.
        ``block`` is "first", "middle", "last" or a number (clamped to each model's blocks, as everywhere).
        """
        if image is None:
            raise ValueError("Upload an image in the Explore tab first, or pick one of the examples.")
        path = image_path(image)
        seen_a = self.models.see(path, model_a, None, progress)
        seen_b = self.models.see(path, model_b, None, progress)
        patch_a = views.check_patch(row, col, seen_a.grid)
        patch_b = views.map_patch(patch_a, seen_a.grid, seen_b.grid)
        progress(0.6, desc="Drawing the views")
        picker_a = self.files.downloads(seen_a, patch_a, 0).png("input", views.patch_picker(seen_a, patch_a))
        sides = []
        for seen, patch in ((seen_a, patch_a), (seen_b, patch_b)):
            b = block_number(block, seen.num_blocks)
            files = self.files.downloads(seen, patch, b)
            position = {}
            for m in mechanisms.of(seen.loaded.model.mechanisms):
                spec = next((s for s in m.views if s.compare), None)
                if spec is not None:
                    position[m.name] = files.png(view_key(m, spec).replace("/", "_"), spec.draw(seen, b, patch).image)
            drawn, _ = views.try_view(lambda s=seen, k=b, p=patch: views.attention_view(s, k, p))  # None: no token map
            attention = files.png("attention", drawn.image if drawn else None)
            sides.append(Side(seen, patch, b, predictions(seen), position, attention))
        return Comparison(picker_a, (sides[0], sides[1]))

    def page(self, image: Any, model_a: str, model_b: str, block: Any, row: Any, col: Any,
             progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """The Compare tab: every compare view of each model's mechanisms; a refusal keeps the last result."""
        try:
            found = self.draw(image, model_a, model_b, block, row, col, progress)
        except Exception as error:
            return {"status": gr.Markdown(f"**Not run.** {sentence(user_message(error))} The pictures below are "
                                          "those of the previous comparison.", visible=True)}
        side_a = found.sides[0]
        out: dict[str, Any] = {"picker_a": found.picker_a, "summary": found.summary, "grid_a": list(side_a.seen.grid),
                               "status": gr.Markdown(visible=False), "row": side_a.patch[0], "col": side_a.patch[1]}
        for name, side in zip("ab", found.sides):
            for m in compare_mechanisms():
                out[f"{name}:{m.name}"] = gr.Image(value=side.position.get(m.name), visible=m.name in side.position)
            out[f"{name}:label"] = side.label
            out[f"{name}:attention"] = side.attention
        return out

    @user_errors
    def compare(
        self, image: Any, model_a: str, model_b: str, block: Any = "first", row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """The ``/compare`` endpoint: two models side by side at their native sizes, on one image and patch.

        Returns:
            model A's patch picker, then for A and B: top-5, position view (the compare view of the model's
            first mechanism that has one; see ``/view`` for the others), attention; a summary.
        """
        found = self.draw(image, model_a, model_b, block, row, col, progress)
        outputs: list[Any] = [found.picker_a]
        for side in found.sides:
            outputs += [side.label, next(iter(side.position.values()), None), side.attention]
        return (*outputs, found.summary)

    def carry_patch(
        self, model_a: str, row: Any, col: Any, shown: Any, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, Any]:
        """The Explore tab's patch on model A's grid (same relative place), for the Compare tab."""
        try:
            grid = tuple((shown or {})["grid"])
            _, loaded = self.models.load(model_a, progress)
            grid_a = views.input_grid(loaded, views.native_size(loaded))
            return views.map_patch(views.check_patch(row, col, grid), grid, grid_a)
        except (KeyError, TypeError, ValueError, HubLoadError):
            return None, None

    @staticmethod
    def clear_patch() -> tuple[None, None]:
        """Forget the Compare tab's patch (model A changed): the centre is used."""
        return None, None


@dataclass(frozen=True)
class CompareTab:
    """The Compare tab's components that the API uses."""

    model_a: gr.Dropdown
    model_b: gr.Dropdown
    block: gr.Radio
    row: gr.Number
    col: gr.Number
    picker_a: gr.Image
    summary: gr.Markdown


def compare_tab(h: CompareHandlers, *, explore_model: gr.Dropdown, image: gr.Image, row: Any, col: Any, shown: Any,
                default_model: str | None, second_model: str | None) -> CompareTab:
    """Build the Compare tab inside the current ``gr.Blocks`` and wire its page events.

    Args:
        h: its handlers.
        explore_model: the Explore tab's model list (its choices are listed here too).
        image, row, col, shown: the Explore tab's image, patch and ``shown`` state (its patch is carried over).
        default_model, second_model: models A and B on a first visit.
    """
    choices = choices_of(explore_model)
    grid_a = gr.State(None)
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown(HELP)
        with gr.Row():
            model_a = gr.Dropdown(choices, value=default_model, label="Model A", allow_custom_value=True,
                                  elem_id="model-a", min_width=360)
            model_b = gr.Dropdown(choices, value=second_model, label="Model B", allow_custom_value=True,
                                  elem_id="model-b", min_width=360)
        with gr.Row():
            block = gr.Radio(["first", "middle", "last"], value="first", label="Block", scale=3)
            button = gr.Button("Compare", variant="primary", scale=1)
        status = gr.Markdown(visible=False, elem_id="compare-status")
        with gr.Row():
            picker_a = gr.Image(label="Click a patch (model A's input)", type="filepath", image_mode=None,
                                format="png", interactive=False, elem_id="picker-a")
            with gr.Column():
                summary = gr.Markdown(elem_id="compare-summary")
                row_c = gr.Number(label="Patch row (model A)", precision=0, minimum=0)
                col_c = gr.Number(label="Patch column (model A)", precision=0, minimum=0)
        named: dict[str, Any] = {}
        with gr.Row():
            for side in "ab":
                with gr.Column():
                    named[f"{side}:label"] = gr.Label(num_top_classes=5, label=f"Model {side.upper()}: top-5")
                    for m in compare_mechanisms():
                        named[f"{side}:{m.name}"] = view_image(
                            f"Model {side.upper()}: {m.title}", visible=False, elem_id=f"compare-{side}-{m.name}",
                            elem_classes=["posenc-wide"])
                    named[f"{side}:attention"] = view_image(
                        f"Model {side.upper()}: attention", elem_id=f"compare-{side}-attention",
                        elem_classes=["posenc-wide"])

    outputs = Outputs({"picker_a": picker_a, "summary": summary, "grid_a": grid_a, "status": status, "row": row_c,
                       "col": col_c, **named})
    run = dict(fn=outputs.wrap(h.page), inputs=[image, model_a, model_b, block, row_c, col_c],
               outputs=outputs.components, preprocess=False, api_visibility="private", trigger_mode="always_last",
               show_progress_on=[summary])
    button.click(**run)
    model_a.input(h.clear_patch, outputs=[row_c, col_c], api_visibility="private", queue=False).then(**run)
    gr.on([model_b.input, block.input], **run)
    picker_a.select(pick_patch, inputs=[grid_a, picker_a], outputs=[row_c, col_c], api_visibility="private",
                    queue=False).success(**run)
    tab.select(h.carry_patch, inputs=[model_a, row, col, shown], outputs=[row_c, col_c],
               api_visibility="private").then(**run)
    return CompareTab(model_a=model_a, model_b=model_b, block=block, row=row_c, col=col_c, picker_a=picker_a,
                      summary=summary)
