"""The Explore tab: one model, one image, one patch and one block, every view of the model's mechanisms.

Every page event of the tab (first visit, model picked, typed or loaded from the repo field, size, block,
patch, image) runs :meth:`ExploreHandlers.run`, which syncs the controls and draws the views, or refuses
with one message and puts the controls back to what the pictures show.

The view tabs are built from :data:`posenc.mechanisms.MECHANISMS`: one tab per kind, one group per mechanism
with its help and its ``ViewSpec`` pictures, shown only for the mechanisms the model lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from posenc import mechanisms, views
from posenc.app.common import (
    KIND_TITLES,
    Downloads,
    Drawn,
    Outputs,
    RequestFiles,
    block_number,
    draw_mechanisms,
    image_path,
    pick_patch,
    predictions,
    sentence,
    summary_line,
    user_errors,
    user_message,
    view_image,
    view_key,
)
from posenc.app.state import Models, ready_notes
from posenc.hub import LoadedModel
from posenc.mechanisms import MECHANISMS

ATTENTION_HELP = (
    "Attention from the clicked patch in the chosen block, one panel per head, each scaled to its own maximum. "
    "For models with a relative bias or RoPE the second row leaves the position term out. Below, for models with "
    "prefix tokens (cls, registers), the share of attention each head gives them and the patches, block by block."
)
ROLLOUT_HELP = (
    "**Attention rollout** through blocks 0 to the chosen block (heads averaged, plus the identity, rows "
    "renormalised, multiplied): from the clicked patch and from cls, with position, without, and the difference. "
    "**Token norms** after the chosen block: every patch token's L2 norm, the high-norm tokens (rule on the picture) "
    "and a histogram with the cls and register norms marked."
)


class ExploreHandlers:
    """The Explore tab's handlers, and the page's first visit (it lands on this tab).

    Args:
        models: where models are loaded from.
        files: where each request's downloadable files go.
        examples: the example images a visitor may pick.
    """

    def __init__(self, models: Models, files: RequestFiles, examples: Sequence[str] = ()) -> None:
        self.models = models
        self.files = files
        self.examples = list(examples)

    # ---------------------------------------------------------------- page start

    def first_visit(self) -> tuple[Any, ...]:
        """The Hub banner, three model lists (which Hub models are ready, uncached ones marked while offline) and
        the first example; the Explore list picks the model fetched at start-up once it is ready."""
        offline = self.models.hub.online(wait=4.0) is False
        catalog = self.models.catalog
        first_model = self.models.first_model
        uncached = catalog.uncached_hub()
        notes = ready_notes([item.key for item in catalog.listed if item.kind == "Hub"], uncached, first_model)
        pick = first_model.pick(None) if first_model is not None else None
        banner = gr.Markdown(visible=False)
        if offline:
            banner = gr.Markdown(
                "**Hub models are unavailable**: the Hugging Face Hub cannot be reached from this server. "
                "The bundled CIFAR-10 models work; Hub models load only if this server already stored them "
                "(the others are marked *unavailable offline* in the list).", visible=True)
        choices = catalog.choices(uncached if offline else [], notes)
        first = self.examples[0] if self.examples else None
        model = gr.Dropdown(choices=choices, value=pick) if pick else gr.Dropdown(choices=choices)
        return (banner, model, gr.Dropdown(choices=choices), gr.Dropdown(choices=choices),
                first, [(p, Path(p).stem.replace("_", " ")) for p in self.examples])

    def banner(self) -> Any:
        """A visible notice when the Hub cannot be reached (waits briefly for the start-up probe)."""
        return self.first_visit()[0]

    def pick_example(self, evt: gr.SelectData) -> str:
        """The example image clicked in the gallery."""
        return self.examples[evt.index]

    @user_errors
    def use_custom(self, repo_id: str) -> Any:
        """Select the model typed into the repo field, under its public name."""
        catalog = self.models.catalog
        if not catalog.allowed(repo_id):
            raise ValueError(
                f"{(repo_id or '').strip()!r} is not a Hub repo id (org/name, e.g. "
                "'timm/deit_tiny_patch16_224.fb_in1k') or a listed model; server paths are not accepted"
            )
        return gr.Dropdown(value=catalog.resolve(repo_id)[0], allow_custom_value=True)

    def info(self, key: str, loaded: LoadedModel) -> str:
        """Markdown about a model: its position mechanisms, architecture, parameters, accuracy, public name."""
        catalog = self.models.catalog
        listed = catalog.get(key)
        cfg = loaded.model.config
        accuracy = ""
        if listed is not None and listed.entry.accuracy is not None:
            accuracy = f" · top-1 **{listed.entry.accuracy:.1f}%** on {listed.entry.dataset}"
        size = views.native_size(loaded)
        grid = views.input_grid(loaded, size)
        used = mechanisms.of(loaded.model.mechanisms)
        position = "; ".join(m.description.rstrip(".") for m in used) or "none: the model cannot tell patches apart"
        head = " · no classifier (features only)" if loaded.model.headless else ""
        return (
            f"**{key}** ({catalog.kind(key)}) · position: **{mechanisms.describe(loaded.model.mechanisms)}**: "
            f"{position}.\n\n"
            f"{type(loaded.model).__name__} · {loaded.num_params:,} parameters{accuracy}{head} · "
            f"input {views.format_size(size)}, patch {cfg.patch_size}, grid {grid[0]}x{grid[1]}"
        )

    # ---------------------------------------------------------------- the one path

    def run_repo(self, repo: str, image: Any, size: Any, block: Any, row: Any, col: Any, shown: Any,
                 progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """:meth:`run` for the model typed into the repo field."""
        return self.run(image, repo, size, block, row, col, shown, progress=progress)

    def run(self, image: Any, model: str, size: Any, block: Any, row: Any, col: Any, shown: Any,
            progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """Every page event of the Explore tab: sync the controls to the model and draw its views, or refuse.

        Args:
            image, model, size, block, row, col: the controls as the page holds them.
            shown: what the pictures show (``None`` before the first result): model, size, block, patch, grid.

        Returns:
            Output name -> value (see :func:`explore_tab`); names left out keep their value. A refused request
            returns its message, puts the controls back to ``shown`` and keeps the pictures, marked as the
            previous request's.
        """
        shown = dict(shown or {})
        try:
            return self._run(image, model, size, block, row, col, shown, progress)
        except Exception as error:  # the page must never be left half-updated
            return self._refused(user_message(error), shown)

    @staticmethod
    def _refused(message: str, shown: dict[str, Any]) -> dict[str, Any]:
        """The one message of a refused request; the controls go back to what the pictures show."""
        message = sentence(message)
        if not shown:
            return {"status": gr.Markdown(f"**Not run.** {message}", visible=True)}
        return {
            "status": gr.Markdown(f"**Not run.** {message}  \nThe pictures below still show the previous request.",
                                  visible=True),  # the summary line under them names it
            "summary": f"*Previous request:* {shown['summary']}",
            "model": gr.Dropdown(value=shown["model"], allow_custom_value=True),
            "size": gr.Dropdown(value=shown["size"], allow_custom_value=True),
            "block": gr.Slider(value=shown["block"]),
            "row": shown["patch"][0],
            "col": shown["patch"][1],
        }

    def _run(self, image: Any, model: str, size: Any, block: Any, row: Any, col: Any, shown: dict[str, Any],
             progress: Callable[..., Any]) -> dict[str, Any]:
        if image is None:
            raise ValueError("Upload an image or pick one of the examples.")
        path = image_path(image)
        key, loaded = self.models.load(model, progress)
        new_model = key != shown.get("model")
        # a new model starts at its default size (the old model's size may not fit it, or mean little)
        input_size = views.default_size(loaded) if new_model else views.parse_size(size, loaded)
        grid = views.input_grid(loaded, input_size)
        if (new_model or list(grid) != shown.get("grid")) and shown.get("grid"):
            patch = views.map_patch(tuple(shown["patch"]), tuple(shown["grid"]), grid)
        elif shown:
            patch = views.check_patch(row, col, grid)
        else:  # a first visit shows the centre patch
            patch = views.default_patch(grid)
        depth = views.num_blocks(loaded)
        b = block_number(block, depth)
        request = [_image_key(image, path), key, views.format_size(input_size), b, list(patch)]
        if request == shown.get("request"):  # e.g. a slider release right after its input event
            # put back only a control that shows something else (a typed block past the end), so that a
            # late no-op never overwrites a newer result
            asked = {"block": block, "row": row, "col": col}
            kept = {"block": b, "row": patch[0], "col": patch[1]}
            return {name: gr.Slider(value=value) if name == "block" else value for name, value in kept.items()
                    if asked[name] is not None and asked[name] != value}
        progress(0.3, desc=f"Running {key} at {views.format_size(input_size)}")
        seen = views.inspect_image(loaded, path, input_size, name=key)
        progress(0.6, desc="Drawing the views")
        drawn = draw_mechanisms(seen, b, patch)
        attention, why_attention = views.try_view(lambda: views.attention_view(seen, b, patch))  # None: no token map
        prefix, why_prefix = views.try_view(lambda: views.prefix_attention_view(seen, b, patch))
        rolled, why_rolled = views.try_view(lambda: views.rollout_view(seen, b, patch))
        normed, why_normed = views.try_view(lambda: views.token_norms_view(seen, b, patch))
        missing = [f"**{what}:** {sentence(why)}" for what, why in (
            ("Attention per head", why_attention), ("Attention to prefix tokens", why_prefix),
            ("Attention rollout", why_rolled), ("Token norms", why_normed)) if why]  # fmt: skip
        files = self.files.downloads(seen, patch, b)
        summary = summary_line(seen, patch, b)
        native = views.native_size(loaded)
        sizes = [(views.format_size(s) + (" (native)" if s == native else ""), views.format_size(s))
                 for s in views.input_sizes(loaded)]
        if input_size not in views.input_sizes(loaded):
            sizes.append((views.format_size(input_size), views.format_size(input_size)))
        shown = {"model": key, "size": views.format_size(input_size), "block": b, "patch": list(patch),
                 "grid": list(grid), "summary": summary, "request": request}
        return mechanism_outputs(seen, drawn, files) | {
            "npz": files.npz(seen, patch, b, [*drawn.drawn, attention, prefix, rolled, normed]),
            "status": gr.Markdown(visible=False),
            "summary": summary,
            "info": self.info(key, loaded),
            "model": gr.Dropdown(value=key, allow_custom_value=True),
            "size": gr.Dropdown(choices=sizes, value=views.format_size(input_size), allow_custom_value=True),
            "block": gr.Slider(minimum=0, maximum=max(depth - 1, 1), value=b, step=1, label=f"Block (0-{depth - 1})",
                               interactive=depth > 1),
            "row": patch[0],
            "col": patch[1],
            "shown": shown,
            "picker": files.png("input", views.patch_picker(seen, patch)),
            "label": predictions(seen),
            "attention": gr.Image(files.png("attention", attention.image if attention else None), visible=bool(attention)),
            "attention_note": gr.Markdown("\n\n".join(missing), visible=bool(missing)),
            "prefix_attention": gr.Image(files.png("prefix_attention", prefix.image if prefix else None),
                                         visible=bool(prefix)),
            "rollout": gr.Image(files.png("rollout", rolled.image if rolled else None), visible=bool(rolled)),
            "token_norms": gr.Image(files.png("token_norms", normed.image if normed else None), visible=bool(normed)),
        }


def mechanism_outputs(seen: views.Seen, drawn: Drawn, files: Downloads) -> dict[str, Any]:
    """The mechanism tabs' outputs: each kind's note, each mechanism's group (shown when the model uses it)
    and its views' PNGs."""
    used = set(seen.loaded.model.mechanisms)
    out: dict[str, Any] = {}
    for m in MECHANISMS.values():
        out[f"group:{m.name}"] = gr.Group(visible=m.name in used)
        for spec in m.views:
            key = view_key(m, spec)
            out[f"view:{key}"] = files.png(key.replace("/", "_"), drawn.images[key])
    for kind in mechanisms.KINDS:
        if any(m.kind == kind for m in MECHANISMS.values()):
            notes = drawn.notes.get(kind, [])
            out[f"note:{kind}"] = gr.Markdown("\n\n".join(notes), visible=bool(notes))
    return out


def _image_key(image: Any, path: str) -> str:
    """What identifies the image of a request (Gradio gives each upload its own cached path)."""
    return path if not isinstance(image, dict) else str(image.get("path") or image.get("url") or path)


# --------------------------------------------------------------------------------------------------- the tab


def mechanism_tabs() -> dict[str, Any]:
    """One tab per kind with views, in it one group per mechanism (hidden until a model uses it).

    Returns:
        note, group and view components by output name ("note:absolute", "group:learned", "view:learned/pca").
    """
    named: dict[str, Any] = {}
    for kind in mechanisms.KINDS:
        members = [m for m in MECHANISMS.values() if m.kind == kind and m.views]
        if not members:
            continue
        with gr.Tab(KIND_TITLES[kind], id=f"kind-{kind}"):
            named[f"note:{kind}"] = gr.Markdown(visible=False, elem_id=f"note-{kind}")
            for m in members:
                with gr.Group(visible=False, elem_id=f"group-{m.name}") as group:
                    gr.Markdown(f"**{m.title[0].upper() + m.title[1:]}.** {m.help}", padding=True)
                    specs = list(m.views)
                    # the first view alone and wide; two more side by side; more than two would be too narrow
                    rows = [specs[:1], specs[1:]] if len(specs) == 3 else [[spec] for spec in specs]
                    for row_specs in rows:
                        with gr.Row(equal_height=False):
                            for spec in row_specs:
                                image = view_image(spec.label, elem_id=f"view-{m.name}-{spec.key}",
                                                   elem_classes=["posenc-wide"] if len(row_specs) == 1 else [])
                                named[f"view:{view_key(m, spec)}"] = image
                named[f"group:{m.name}"] = group
    return named


@dataclass(frozen=True)
class ExploreTab:
    """The Explore tab's components that other tabs and the API use, and the tab's named outputs."""

    model: gr.Dropdown
    image: gr.Image
    gallery: gr.Gallery
    row: gr.Number
    col: gr.Number
    shown: gr.State
    outputs: Outputs
    named: dict[str, Any]


def explore_tab(h: ExploreHandlers, *, choices: list[tuple[str, str]], default_model: str | None) -> ExploreTab:
    """Build the Explore tab inside the current ``gr.Blocks`` and wire its page events.

    Returns:
        Its components; the first visit (:meth:`ExploreHandlers.first_visit`) is wired by the caller, which
        then runs ``explore.outputs`` through :meth:`ExploreHandlers.run` (see :func:`run_event`).
    """
    shown = gr.State(None)
    with gr.Tab("Explore", id="explore"):
        with gr.Row(equal_height=True):  # the model's full label needs the page's width
            model = gr.Dropdown(choices, value=default_model, label="Model", allow_custom_value=True,
                                elem_id="model", scale=3, min_width=420)
            repo = gr.Textbox(label="Or a Hub repo id", placeholder="timm/deit_tiny_patch16_224.fb_in1k",
                              scale=2, min_width=260, elem_id="repo")
            load_button = gr.Button("Load", scale=0, min_width=80)
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                info = gr.Markdown(elem_id="model-info")
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 height=280, elem_id="image")
                gallery = gr.Gallery(label="Examples", columns=6, height=120, allow_preview=False,
                                     interactive=False, elem_id="examples", visible=bool(h.examples))
                with gr.Row():
                    size = gr.Dropdown(label="Input size (h x w)", choices=[], allow_custom_value=True,
                                       elem_id="size", info="pick, or type e.g. 48x48 and press Enter")
                    block = gr.Slider(0, 1, value=0, step=1, label="Block", elem_id="block")
                with gr.Row():
                    row = gr.Number(label="Patch row", precision=0, minimum=0, elem_id="row")
                    col = gr.Number(label="Patch column", precision=0, minimum=0, elem_id="col")
            with gr.Column(scale=3):
                status = gr.Markdown(visible=False, elem_id="status")
                summary = gr.Markdown(elem_id="summary")
                with gr.Row():
                    picker = gr.Image(label="Click a patch", type="filepath", image_mode=None, format="png",
                                      interactive=False, elem_id="patch-picker")
                    label = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="label")
                with gr.Tabs():
                    mechanism_named = mechanism_tabs()
                    with gr.Tab("Attention", id="attention-tab"):
                        gr.Markdown(ATTENTION_HELP)
                        attention_note = gr.Markdown(visible=False, elem_id="note-attention")  # what cannot be drawn
                        attention = view_image("Attention per head", elem_id="attention", elem_classes=["posenc-wide"])
                        prefix_attention = view_image("Attention to prefix tokens", elem_id="prefix-attention",
                                                      elem_classes=["posenc-wide"], visible=False)
                        gr.Markdown(ROLLOUT_HELP)
                        rollout = view_image("Attention rollout", elem_id="rollout", elem_classes=["posenc-wide"],
                                             visible=False)
                        token_norms = view_image("Token norms", elem_id="token-norms", elem_classes=["posenc-wide"],
                                                 visible=False)
                npz = gr.File(label="Raw tensors behind the views (.npz)", elem_id="npz")

    named = {"status": status, "summary": summary, "info": info, "model": model, "size": size, "block": block,
             "row": row, "col": col, "shown": shown, "picker": picker, "label": label, "attention": attention,
             "attention_note": attention_note, "prefix_attention": prefix_attention, "rollout": rollout,
             "token_norms": token_norms, "npz": npz, **mechanism_named}
    outputs = Outputs(named)
    tab = ExploreTab(model=model, image=image, gallery=gallery, row=row, col=col, shown=shown, outputs=outputs,
                     named=named)
    run = run_event(h, tab)
    gr.on([model.input, size.input, block.input, block.release, row.submit, col.submit, image.upload], **run)
    gr.on([repo.submit, load_button.click], **{**run, "fn": outputs.wrap(h.run_repo),
                                               "inputs": [repo, image, size, block, row, col, shown]})
    gallery.select(h.pick_example, outputs=image, api_visibility="private", queue=False).then(**run)
    picker.select(pick_patch, inputs=[shown, picker], outputs=[row, col], api_visibility="private",
                  queue=False).success(**run)
    return tab


def run_event(h: ExploreHandlers, tab: ExploreTab) -> dict[str, Any]:
    """The arguments of the one Explore event (``gr.on(triggers, **run_event(h, tab))``)."""
    named = tab.named
    return dict(fn=tab.outputs.wrap(h.run),
                inputs=[tab.image, tab.model, named["size"], named["block"], tab.row, tab.col, tab.shown],
                outputs=tab.outputs.components, preprocess=False, api_visibility="private",
                trigger_mode="always_last", show_progress_on=[named["summary"]])
