"""The page: :func:`create_demo` puts the state, the tabs and the API together into one ``gr.Blocks``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from posenc.app.api import ApiHandlers, wire_api
from posenc.app.common import RequestFiles
from posenc.app.compare import CompareHandlers, compare_tab
from posenc.app.explore import ExploreHandlers, explore_tab, run_event
from posenc.app.measure import MeasureHandlers, measure_tab
from posenc.app.state import Catalog, FirstModel, HubStatus, ModelCache, Models, probe_hub
from posenc.hub import LoadedModel, load
from posenc.registry import ModelEntry

#: ``demo.queue(**QUEUE_OPTIONS)``: two inferences at a time (CPU), at most 64 waiting.
QUEUE_OPTIONS: dict[str, Any] = {"default_concurrency_limit": 2, "max_size": 64}
MAX_FILE_SIZE = "20mb"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CSS = """
#patch-picker img, #picker-a img { cursor: crosshair; }
.posenc-view .image-container { padding-top: 2.4em; }
.posenc-wide .image-container { overflow-x: auto; }
.posenc-wide .image-container > button { width: max-content !important; min-width: 100%; max-width: none; }
.posenc-wide .image-frame { width: max-content; max-width: none; }
.posenc-wide .image-frame img { max-width: none !important; max-height: none !important; width: auto !important;
                                 height: auto !important; }
#status { border-left: 4px solid #d97706; padding-left: 0.6em; }
"""

INTRO = """# posenc: how Vision Transformers encode position
Pick a model, upload an image and **click a patch** on the model's input: the views show the position tensors
the model used for that image (absolute embeddings, relative position bias, RoPE), and the attention with and
without the position term."""


class Handlers:
    """Every handler of the app, by tab, over one model state and one folder of request files.

    Attributes:
        models: the catalogue, the model cache and the Hub status (:class:`~posenc.app.state.Models`).
        files: the folder of downloadable files (:class:`~posenc.app.common.RequestFiles`).
        explore, compare, measure, api: the handlers of the Explore, Compare and Measure tabs and of the
            Explore views' named endpoints.
    """

    def __init__(self, *, cache: ModelCache, catalog: Catalog, hub: HubStatus, examples: Sequence[str] = (),
                 first_model: FirstModel | None = None) -> None:
        self.models = Models(cache=cache, catalog=catalog, hub=hub, first_model=first_model)
        self.files = RequestFiles()
        self.explore = ExploreHandlers(self.models, self.files, examples)
        self.compare = CompareHandlers(self.models, self.files)
        self.measure = MeasureHandlers(self.models.load, self.files)
        self.api = ApiHandlers(self.models, self.files)

    @property
    def cache(self) -> ModelCache:
        return self.models.cache

    @property
    def catalog(self) -> Catalog:
        return self.models.catalog

    def close(self) -> None:
        """Delete this app's folder of downloadable files (also done at interpreter exit)."""
        self.files.close()


def example_images(examples_dir: str | Path | None) -> list[str]:
    """The example images in ``examples_dir``, sorted by name (none when the folder is missing)."""
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    return [str(p.resolve()) for p in sorted(Path(examples_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def launch_options(examples_dir: str | Path | None = None) -> dict[str, Any]:
    """``demo.launch`` arguments: no share link, an upload limit, only the example images served from disk."""
    return {"share": False, "max_file_size": MAX_FILE_SIZE, "allowed_paths": example_images(examples_dir), "css": CSS}


def create_demo(
    *,
    checkpoints_dir: str | Path,
    registry: Sequence[ModelEntry] = (),
    cache_size: int = 4,
    examples_dir: str | Path | None = None,
    extra_models: Sequence[str | Path] = (),
    loader: Callable[[str], LoadedModel] | None = None,
    hub_probe: Callable[[], bool] = probe_hub,
    first_model: str | None = None,
) -> gr.Blocks:
    """Build the app. Nothing is loaded until a page or an API call asks for a model.

    Args:
        checkpoints_dir: folder of the bundled checkpoints (one posenc Hub-layout folder per model).
        registry: curated Hub models to list (e.g. :data:`posenc.registry.HUB_MODELS`).
        cache_size: loaded models kept in memory (LRU).
        examples_dir: folder of example images; the first one is shown on a first visit.
        extra_models: further local model folders to list (e.g. a downloaded DeiT-Tiny), under their folder names.
        loader: source -> loaded model; default :func:`posenc.hub.load` (cache only while the Hub is unreachable).
        hub_probe: returns whether the Hub is reachable; run once in a background thread.
        first_model: a model to fetch in the background at start-up when the Hub is reachable; first visits show it
            once it is ready (:class:`~posenc.app.state.FirstModel`). None: first visits show the bundled default.

    Returns:
        The ``gr.Blocks``; call ``demo.queue(**QUEUE_OPTIONS).launch(**launch_options(examples_dir))``.
        ``demo.posenc_handlers`` holds the :class:`Handlers` (``close()`` removes the download folder).
    """
    catalog = Catalog.build(checkpoints_dir, registry, extra_models)
    hub = HubStatus(hub_probe)
    hub.start()
    if loader is None:
        loader = lambda source: load(source, local_files_only=hub.online() is False)  # noqa: E731
    cache = ModelCache(loader, size=cache_size)

    def fetch_first(name: str) -> LoadedModel:
        key, source = catalog.resolve(name)
        return cache.get(key, source=source)

    first = None if first_model is None else FirstModel(first_model, fetch=fetch_first, online=lambda s: hub.online(s))
    h = Handlers(cache=cache, catalog=catalog, hub=hub, examples=example_images(examples_dir), first_model=first)
    if first is not None:
        first.start()
    default_model = catalog.default()

    with gr.Blocks(title="posenc: how Vision Transformers encode position", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        banner = gr.Markdown(visible=False, elem_id="hub-banner")
        explore = explore_tab(h.explore, choices=catalog.choices(), default_model=default_model)
        compare = compare_tab(h.compare, explore_model=explore.model, image=explore.image, row=explore.row,
                              col=explore.col, shown=explore.shown, default_model=default_model,
                              second_model=catalog.second(default_model))
        measure_tab(h.measure, image=explore.image, model=explore.model)
        wire_api(h.api, h.compare, explore=explore, compare_tab=compare)
        demo.load(h.explore.first_visit, outputs=[banner, explore.model, compare.model_a, compare.model_b,
                                                  explore.image, explore.gallery], api_visibility="private"
                  ).then(**run_event(h.explore, explore))
    demo.posenc_handlers = h  # for tests and app.py: h.close() removes the download folder
    return demo
