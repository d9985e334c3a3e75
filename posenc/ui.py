"""The posenc Gradio app: :func:`create_demo` builds the ``gr.Blocks``; ``app.py`` launches it.

The app gets its dependencies as arguments (where the bundled checkpoints are, the curated Hub models,
the model cache size, a loader), loads models lazily into a bounded thread-safe LRU cache (the only
state shared between requests) and draws every view with :mod:`posenc.views`. Handlers are the small
methods of :class:`Handlers`; known errors reach the user as ``gr.Error`` with the message of the
:class:`~posenc.preprocess.ImageError`, :class:`~posenc.hub.HubLoadError` or ``ValueError`` behind it.

Named API endpoints (see ``Use via API`` in the page footer): ``/predict``, ``/position_embedding``,
``/relative_bias``, ``/rope``, ``/attention``, ``/compare`` and ``/analyse`` (every view plus the ``.npz``).
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from huggingface_hub import constants as hf_constants
from PIL import Image

from posenc import views, viz
from posenc.hub import HubLoadError, LoadedModel, is_safe_source, load
from posenc.models.layers import DESCRIPTIONS
from posenc.preprocess import ImageError
from posenc.registry import ModelEntry, bundled_models

logger = logging.getLogger(__name__)

#: ``demo.queue(**QUEUE_OPTIONS)``: two inferences at a time (CPU), at most 64 waiting.
QUEUE_OPTIONS: dict[str, Any] = {"default_concurrency_limit": 2, "max_size": 64}
MAX_FILE_SIZE = "20mb"
DEFAULT_MODEL = "cifar10-learned"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_EXPORT_MAX_AGE_S = 15 * 60  # raw-tensor files older than this are deleted (Gradio keeps its own copy)
_HUB_FAILURES = ("offline", "network")
_ABSOLUTE_VIEWS = ("similarity_grid", "similarity", "pca")  # file names of the absolute views, in order
_RELATIVE_VIEWS = ("bias_table", "query_bias")
CSS = "#patch-picker img, #picker-a img { cursor: crosshair; }"

INTRO = """# posenc: how Vision Transformers encode position
Pick a model, upload an image and **click a patch** on the model's input: the views show the position tensors
the model used for that image: absolute embeddings (ViT, DeiT), relative position bias (BEiT, Swin) or RoPE,
and the attention with and without the position term."""
HELP = {
    "absolute": "Tile (i, j) shows how similar the position embedding of patch (i, j) is to every patch's "
    "embedding (ViT paper, Fig. 7). Below: the clicked patch's similarity on the photo, and the embeddings' "
    "top three principal components as RGB. At another input size these are the resampled embeddings.",
    "relative": "The learned bias added to the attention logits, by offset (query minus key), for every head of "
    "the chosen block; the outlined cell is offset 0. Below: the bias the clicked patch adds to every key it can "
    "attend to. In Swin that is the (shifted) window holding the patch on the block's stage grid; keys from "
    "another shift region are masked (dimmed).",
    "rope": "With RoPE, a query-key score depends on the difference of their rotation angles. The map shows the "
    "mean cosine of that difference between the clicked patch and every other patch at this grid.",
    "attention": "Attention from the clicked patch in the chosen block, one panel per head, each scaled to its own "
    "maximum. For relative-bias and RoPE models the second row leaves the position term out.",
}


# --------------------------------------------------------------------------------------------------- model cache


class ModelCache:
    """A bounded, thread-safe LRU cache of loaded models keyed by source; it holds models only.

    Two requests for the same model that is not cached yet load it once: the second waits for the first.

    Args:
        loader: source -> loaded model (e.g. :func:`posenc.hub.load`).
        size: how many models to keep; the least recently used is dropped beyond it.
    """

    def __init__(self, loader: Callable[[str], LoadedModel], size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"the model cache must hold at least one model, got size {size}")
        self._loader = loader
        self._size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def sources(self) -> list[str]:
        """Cached sources, least recently used first."""
        with self._lock:
            return list(self._models)

    def _lookup(self, source: str) -> LoadedModel | None:
        with self._lock:
            loaded = self._models.get(source)
            if loaded is not None:
                self._models.move_to_end(source)
            return loaded

    def get(self, source: str, on_load: Callable[[str], None] | None = None) -> LoadedModel:
        """The model for ``source``, loaded on a miss (``on_load(source)`` is called first, e.g. for progress)."""
        loaded = self._lookup(source)
        if loaded is not None:
            return loaded
        with self._lock:
            key_lock = self._loading.setdefault(source, threading.Lock())
        with key_lock:
            loaded = self._lookup(source)
            if loaded is not None:
                return loaded
            try:
                if on_load is not None:
                    on_load(source)
                loaded = self._loader(source)
            finally:
                with self._lock:
                    self._loading.pop(source, None)
            with self._lock:
                self._models[source] = loaded
                while len(self._models) > self._size:
                    dropped, _ = self._models.popitem(last=False)
                    logger.info("model cache: dropped %s", dropped)
        return loaded


# --------------------------------------------------------------------------------------------------- Hub status


def probe_hub(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (False when HF_HUB_OFFLINE is set)."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    request = urllib.request.Request(f"{hf_constants.ENDPOINT}/api/models?limit=1", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


class HubStatus:
    """Whether Hub models can be downloaded, probed at start-up and again after each failed download.

    The start-up probe runs in a background thread and never blocks start-up. Probing again after a failure
    tells a Hub that is down (downloads stop, cached models still load) from one repo's fault (downloads go on),
    and lets a Hub that answers again be used again.
    """

    def __init__(self, probe: Callable[[], bool]) -> None:
        self._probe = probe
        self._online: bool | None = None
        self._known = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the probe (once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self.recheck, name="posenc-hub-probe", daemon=True).start()

    def recheck(self) -> bool:
        """Probe now, in this thread, and record the answer (after a failed download: the Hub, or just that repo?)."""
        try:
            online = bool(self._probe())
        except Exception:  # a probe must never take the app down
            logger.exception("the Hub probe failed")
            online = False
        with self._lock:
            self._online = online
        self._known.set()
        logger.info("Hugging Face Hub %s", "reachable" if online else "unreachable: serving bundled models only")
        return online

    def online(self, wait: float = 0.0) -> bool | None:
        """True or False once known (waiting up to ``wait`` seconds), else None."""
        self._known.wait(wait)
        with self._lock:
            return self._online


# --------------------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Catalog:
    """The models the picker lists: bundled checkpoints, extra local folders, curated Hub models.

    Attributes:
        bundled: the project's own checkpoints (always loadable).
        local: extra local model folders given to the app.
        hub: curated Hub models.
        checkpoints_dir: the folder of the bundled checkpoints; other folders inside it may be loaded by path.
    """

    bundled: tuple[ModelEntry, ...]
    local: tuple[ModelEntry, ...]
    hub: tuple[ModelEntry, ...]
    checkpoints_dir: Path

    @classmethod
    def build(
        cls, checkpoints_dir: str | Path, registry: Iterable[ModelEntry], extra_models: Iterable[str | Path]
    ) -> Catalog:
        """List the bundled models found in ``checkpoints_dir``, the extra folders and the registry."""
        local = tuple(
            ModelEntry(Path(p).name, str(Path(p).resolve()), "", "", None, None, "")
            for p in extra_models
            if Path(p).is_dir()
        )
        return cls(tuple(bundled_models(checkpoints_dir)), local, tuple(registry), Path(checkpoints_dir))

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return self.bundled + self.local + self.hub

    def find(self, source: str) -> ModelEntry | None:
        """The listed entry for ``source``; a local folder also matches by its resolved path (symlinks, ``./``)."""
        entry = next((e for e in self.entries if e.source == source), None)
        if entry is None and source and Path(source).is_dir():
            resolved = str(Path(source).resolve())
            entry = next((e for e in self.local + self.bundled if e.source == resolved), None)
        return entry

    def kind(self, source: str) -> str:
        """"bundled", "local folder", "Hub" (curated) or "custom"."""
        for kind, entries in (("bundled", self.bundled), ("local folder", self.local), ("Hub", self.hub)):
            if any(e.source == source for e in entries):
                return kind
        return "custom"

    def allowed(self, source: str) -> bool:
        """Whether the app may load ``source``: a listed model, a Hub repo id or a folder inside the checkpoints."""
        return self.find(source) is not None or is_safe_source(source, [self.checkpoints_dir])

    def choices(self) -> list[tuple[str, str]]:
        """(label, source) pairs for the dropdowns."""
        return [(self.label(e), e.source) for e in self.entries]

    def label(self, entry: ModelEntry) -> str:
        parts = [entry.name]
        if entry.family:
            parts.append(entry.family)
        if entry.num_params:
            parts.append(f"{entry.num_params / 1e6:.1f}M params")
        if entry.accuracy is not None:
            parts.append(f"{entry.dataset} {entry.accuracy:.1f}%")
        parts.append({"bundled": "bundled", "local folder": "local folder", "Hub": "Hub"}[self.kind(entry.source)])
        return " \u00b7 ".join(parts)

    def default(self, prefer: str = DEFAULT_MODEL) -> str | None:
        """The model shown on a first visit: ``prefer`` among the bundled ones, else the first listed."""
        named = [e for e in self.bundled if e.name == prefer]
        first = named or list(self.entries[:1])
        return first[0].source if first else None

    def second(self, first: str | None) -> str | None:
        """Another model for the Compare tab (a relative-bias one when bundled)."""
        ordered = sorted(self.entries, key=lambda e: e.family not in ("windowed", "relative"))
        return next((e.source for e in ordered if e.source != first), first)


# --------------------------------------------------------------------------------------------------- handlers


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into ``gr.Error`` with their message; log anything else."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImageError, HubLoadError, ValueError) as error:
            raise gr.Error(str(error), print_exception=False) from error
        except MemoryError as error:
            raise gr.Error(
                "The server ran out of memory for this request; try a smaller input size or image."
            ) from error
        except Exception as error:
            logger.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"Something went wrong ({type(error).__name__}: {error}). The app keeps running: try again, "
                "or another image or model."
            ) from error

    return wrapper


@dataclass(frozen=True)
class _Downloads:
    """Where one request writes its downloadable files, each named after the view it holds."""

    folder: Path
    stem: str

    def png(self, what: str, image: Image.Image | None) -> str | None:
        """Save a view as ``<stem>_<what>.png``; None passes through."""
        if image is None:
            return None
        return str(viz.save_png(image, self.folder / f"{self.stem}_{what}.png"))

    def pngs(self, names: Sequence[str], parts: Sequence[views.View] | None) -> list[str | None]:
        """Save several views under ``names``; None gives one None per name (a view that does not apply)."""
        if parts is None:
            return [None] * len(names)
        return [self.png(name, view.image) for name, view in zip(names, parts)]

    def npz(self, seen: views.Seen, patch: views.Patch, block: int, parts: Iterable[views.View | None]) -> str:
        """The raw tensors behind the views as ``<stem>.npz``."""
        return str(views.save_npz(self.folder / f"{self.stem}.npz", seen, patch, block, parts))


def _image_path(image: Any) -> str:
    """The local path of an image input (a FileData dict when the event does not preprocess, or a path)."""
    path = image.get("path") if isinstance(image, dict) else image
    if not path:
        raise ValueError("Upload an image first (PNG or JPEG), or pick one of the examples.")
    return str(path)


class Handlers:
    """The app's event handlers; each is a small method, and the model cache is the only shared state.

    Args:
        cache: the loaded-model cache.
        catalog: the listed models and which sources are allowed.
        hub: the Hub reachability status.
    """

    def __init__(self, *, cache: ModelCache, catalog: Catalog, hub: HubStatus) -> None:
        self.cache = cache
        self.catalog = catalog
        self.hub = hub
        self._export_dir: Path | None = None
        self._export_lock = threading.Lock()

    # ---------------------------------------------------------------- helpers

    def _load(self, source: str | None, progress: Callable[..., Any]) -> tuple[str, LoadedModel]:
        """The display name and the loaded model; sources outside the catalogue rules are refused."""
        source = (source or "").strip()
        if not source:
            raise ValueError("Pick a model first.")
        if not self.catalog.allowed(source):
            raise ValueError(
                f"{source!r} is not a model this app may load: give a Hub repo id such as "
                "'timm/deit_tiny_patch16_224.fb_in1k', or pick a bundled model from the list"
            )
        entry = self.catalog.find(source)
        name = entry.name if entry else source
        try:
            loaded = self.cache.get(source, on_load=lambda s: progress(0.05, desc=f"Loading {name}"))
        except HubLoadError as error:
            if error.reason in _HUB_FAILURES:
                self.hub.recheck()  # downloads stop only while the Hub itself does not answer
            raise
        return name, loaded

    def _see(self, image: Any, source: str | None, size: Any, progress: Callable[..., Any]) -> views.Seen:
        path = _image_path(image)
        name, loaded = self._load(source, progress)
        input_size = views.parse_size(size, loaded)
        progress(0.3, desc=f"Running {name} at {views.format_size(input_size)}")
        return views.inspect_image(loaded, path, input_size, name=name)

    def _downloads(self, seen: views.Seen, patch: views.Patch, block: int) -> _Downloads:
        """A fresh folder for one request's files; folders older than 15 minutes are deleted (Gradio keeps copies)."""
        with self._export_lock:
            if self._export_dir is None:
                self._export_dir = Path(tempfile.mkdtemp(prefix="posenc-app-"))
            cutoff = time.time() - _EXPORT_MAX_AGE_S
            for old in self._export_dir.iterdir():
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            folder = self._export_dir / uuid.uuid4().hex
            folder.mkdir()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in seen.name)[-60:]
        where = f"{views.format_size(seen.size)}_patch{patch[0]}-{patch[1]}_block{block}"
        return _Downloads(folder, f"posenc_{safe}_{where}")

    def info(self, name: str, loaded: LoadedModel) -> str:
        """Markdown about a model: position encoding, architecture, parameters, accuracy, source."""
        entry = self.catalog.find(loaded.source)
        cfg = loaded.model.config
        accuracy = ""
        if entry is not None and entry.accuracy is not None:
            accuracy = f" · top-1 **{entry.accuracy:.1f}%** on {entry.dataset}"
        size = views.native_size(loaded)
        grid = views.input_grid(loaded, size)
        return (
            f"**{name}** ({self.catalog.kind(loaded.source)}) · position encoding **{loaded.family}**: "
            f"{DESCRIPTIONS.get(loaded.family, '')}\n\n"
            f"{type(loaded.model).__name__} · {loaded.num_params:,} parameters{accuracy} · "
            f"input {views.format_size(size)}, patch {cfg.patch_size}, grid {grid[0]}x{grid[1]} · "
            f"source `{loaded.source}`"
        )

    # ---------------------------------------------------------------- UI-only handlers

    def banner(self) -> Any:
        """A visible notice when the Hub cannot be reached (waits briefly for the start-up probe)."""
        if self.hub.online(wait=4.0) is False:
            text = (
                "**Hub models are unavailable**: the Hugging Face Hub cannot be reached from this server. "
                "The bundled CIFAR-10 models work; Hub models load only if they are already in the local cache."
            )
            return gr.Markdown(text, visible=True)
        return gr.Markdown("", visible=False)

    @_user_errors
    def use_custom(self, repo_id: str) -> Any:
        """Select the model typed into the repo field (a Hub repo id or a folder inside the checkpoints)."""
        repo_id = (repo_id or "").strip()
        if not self.catalog.allowed(repo_id):
            raise ValueError(
                f"{repo_id!r} is not a Hub repo id (org/name, e.g. 'timm/deit_tiny_patch16_224.fb_in1k'); "
                "server paths are not accepted"
            )
        return gr.Dropdown(value=repo_id)

    @_user_errors
    def sync_controls(
        self, model: str, size: Any, block: Any, row: Any, col: Any, grid: Any, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, ...]:
        """After a model or size change: the model's info, its sizes and blocks, and the patch moved to the new grid."""
        name, loaded = self._load(model, progress)
        try:
            input_size = views.parse_size(size, loaded)
        except ValueError:
            input_size = views.native_size(loaded)
        new_grid = views.input_grid(loaded, input_size)
        try:
            patch = views.map_patch(views.check_patch(row, col, tuple(grid)), tuple(grid), new_grid)
        except (TypeError, ValueError):
            patch = views.default_patch(new_grid)
        depth = views.num_blocks(loaded)
        native = views.native_size(loaded)
        choices = [
            (views.format_size(s) + (" (native)" if s == native else ""), views.format_size(s))
            for s in views.input_sizes(loaded)
        ]
        return (
            self.info(name, loaded),
            gr.Dropdown(choices=choices, value=views.format_size(input_size)),
            gr.Slider(minimum=0, maximum=max(depth - 1, 0), value=min(int(block or 0), depth - 1), step=1,
                      label=f"Block (0-{depth - 1})"),
            patch[0],
            patch[1],
            list(new_grid),
        )

    @_user_errors
    def pick_patch(self, grid: list | None, picker: str | None, evt: gr.SelectData) -> tuple[int, int]:
        """The patch under a click on the patch picker."""
        if not grid or not picker:
            raise ValueError("Wait for the model's input to appear, then click a patch on it.")
        with Image.open(picker) as img:
            size = img.size  # w, h
        return viz.patch_at(evt.index, size, tuple(grid))

    def carry_patch(
        self, model_a: str, row: Any, col: Any, grid: Any, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, Any]:
        """The Explore tab's patch on model A's grid (same relative place), for the Compare tab."""
        try:
            _, loaded = self._load(model_a, progress)
            grid_a = views.input_grid(loaded, views.native_size(loaded))
            return views.map_patch(views.check_patch(row, col, tuple(grid)), tuple(grid), grid_a)
        except (TypeError, ValueError, HubLoadError):
            return None, None

    @staticmethod
    def clear_patch() -> tuple[None, None]:
        """Forget the Compare tab's patch (model A changed): the centre is used."""
        return None, None

    @_user_errors
    def analyse(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """Every view of the Explore tab from one inspection, plus the raw tensors as ``.npz``.

        Returns:
            picker, top-5, absolute note + 3 images, relative note + 2 images, RoPE note + image, attention image,
            npz path, summary.
        """
        if image is None:
            return (None, None, "", None, None, None, "", None, None, "", None, None, None,
                    "Upload an image or pick an example.")
        started = time.perf_counter()
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        block = views.check_block(seen, block)
        progress(0.6, desc="Drawing the views")
        absolute, abs_note = views.try_view(lambda: views.absolute_views(seen, patch))
        relative, rel_note = views.try_view(lambda: views.relative_views(seen, block, patch))
        rope, rope_note = views.try_view(lambda: views.rope_view(seen, patch))
        attention = views.attention_view(seen, block, patch)
        files = self._downloads(seen, patch, block)
        npz = files.npz(seen, patch, block, [*(absolute or ()), *(relative or ()), rope, attention])
        logger.info("analyse: %s at %s, patch %s, block %d in %.2fs", seen.name, views.format_size(seen.size), patch,
                    block, time.perf_counter() - started)
        summary = (
            f"**{seen.name}** at {views.format_size(seen.size)} ({seen.grid[0]}x{seen.grid[1]} patches) · "
            f"patch **{patch}** · {views.describe_block(seen, block)}"
        )
        return (
            files.png("input", views.patch_picker(seen, patch)), views.predictions(seen),
            abs_note, *files.pngs(_ABSOLUTE_VIEWS, absolute),
            rel_note, *files.pngs(_RELATIVE_VIEWS, relative),
            rope_note, files.png("rope", rope.image if rope else None),
            files.png("attention", attention.image), npz, summary,
        )

    # ---------------------------------------------------------------- API endpoints

    @_user_errors
    def predict(
        self, image: Any, model: str, size: Any = None, progress: gr.Progress = gr.Progress()
    ) -> dict[str, float]:
        """Top-5 classes of the image as {label: probability}."""
        return views.predictions(self._see(image, model, size, progress))

    @_user_errors
    def position_embedding(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Image.Image, Image.Image, Image.Image]:
        """Absolute embedding views: the similarity grid, the clicked patch's similarity and the PCA, as PNGs."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        files = self._downloads(seen, patch, 0)
        parts = views.absolute_views(seen, patch)
        return tuple(files.pngs(_ABSOLUTE_VIEWS, parts))

    @_user_errors
    def relative_bias(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Image.Image, Image.Image]:
        """Relative bias views of a block: the table of every head, and the clicked query's bias on the photo."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        block = views.check_block(seen, block)
        files = self._downloads(seen, patch, block)
        parts = views.relative_views(seen, block, patch)
        return tuple(files.pngs(_RELATIVE_VIEWS, parts))

    @_user_errors
    def rope(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> Image.Image:
        """RoPE relative-phase similarity between the clicked patch and every other."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        return self._downloads(seen, patch, 0).png("rope", views.rope_view(seen, patch).image)

    @_user_errors
    def attention(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> Image.Image:
        """Every head's attention from the clicked patch in a block, and without the position term if any."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        block = views.check_block(seen, block)
        return self._downloads(seen, patch, block).png("attention", views.attention_view(seen, block, patch).image)

    @_user_errors
    def compare(
        self, image: Any, model_a: str, model_b: str, block: Any = "first", row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """Two models side by side at their native sizes, on the same image and the same patch.

        ``row``/``col`` are on model A's grid (None: the centre); model B gets the patch at the same relative place.
        ``block`` is "first", "middle", "last" or an index (clamped to each model's depth).

        Returns:
            model A's patch picker, then for A and B: top-5, position view, attention; a summary; A's grid (state).
        """
        if image is None:
            raise ValueError("Upload an image in the Explore tab first, or pick one of the examples.")
        seen_a = self._see(image, model_a, None, progress)
        seen_b = self._see(image, model_b, None, progress)
        patch_a = views.check_patch(row, col, seen_a.grid)
        patch_b = views.map_patch(patch_a, seen_a.grid, seen_b.grid)
        progress(0.6, desc="Drawing the views")
        outputs: list[Any] = [self._downloads(seen_a, patch_a, 0).png("input", views.patch_picker(seen_a, patch_a))]
        lines = []
        for seen, patch in ((seen_a, patch_a), (seen_b, patch_b)):
            which = block if isinstance(block, str) else min(int(block or 0), seen.num_blocks - 1)
            b = views.pick_block(seen, which)
            files = self._downloads(seen, patch, b)
            position = views.position_view(seen, b, patch)
            outputs += [views.predictions(seen), files.png("position", position.image if position else None),
                        files.png("attention", views.attention_view(seen, b, patch).image)]
            lines.append(f"**{seen.name}** ({seen.family}): patch {patch} of {seen.grid[0]}x{seen.grid[1]}, "
                         f"{views.describe_block(seen, b)}")
        return (*outputs, "  \n".join(lines), list(seen_a.grid))


# --------------------------------------------------------------------------------------------------- the Blocks


def _view_image(label: str, **kwargs: Any) -> gr.Image:
    """An output image for a view: lossless PNG with download and full-screen buttons; the view draws its own title."""
    return gr.Image(label=label, show_label=False, format="png", interactive=False, buttons=["download", "fullscreen"],
                    **kwargs)


def example_images(examples_dir: str | Path | None) -> list[str]:
    """The example images in ``examples_dir``, sorted by name (none when the folder is missing)."""
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    return [str(p) for p in sorted(Path(examples_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def launch_options(examples_dir: str | Path | None = None) -> dict[str, Any]:
    """``demo.launch`` arguments: no share link, an upload limit, only the examples folder served from disk."""
    allowed = [str(Path(examples_dir).resolve())] if examples_dir is not None else []
    return {"share": False, "max_file_size": MAX_FILE_SIZE, "allowed_paths": allowed, "css": CSS}


def create_demo(
    *,
    checkpoints_dir: str | Path,
    registry: Sequence[ModelEntry] = (),
    cache_size: int = 4,
    examples_dir: str | Path | None = None,
    extra_models: Sequence[str | Path] = (),
    loader: Callable[[str], LoadedModel] | None = None,
    hub_probe: Callable[[], bool] = probe_hub,
) -> gr.Blocks:
    """Build the app. Nothing is loaded until a page or an API call asks for a model.

    Args:
        checkpoints_dir: folder of the bundled checkpoints (one posenc Hub-layout folder per model).
        registry: curated Hub models to list (e.g. :data:`posenc.registry.HUB_MODELS`).
        cache_size: loaded models kept in memory (LRU).
        examples_dir: folder of example images; the first one is shown on a first visit.
        extra_models: further local model folders to list (e.g. a downloaded DeiT-Tiny).
        loader: source -> loaded model; default :func:`posenc.hub.load` (cache only while the Hub is unreachable).
        hub_probe: returns whether the Hub is reachable; run once in a background thread.

    Returns:
        The ``gr.Blocks``; call ``demo.queue(**QUEUE_OPTIONS).launch(**launch_options(examples_dir))``.
    """
    catalog = Catalog.build(checkpoints_dir, registry, extra_models)
    hub = HubStatus(hub_probe)
    hub.start()
    if loader is None:
        loader = lambda source: load(source, local_files_only=hub.online() is False)  # noqa: E731
    h = Handlers(cache=ModelCache(loader, size=cache_size), catalog=catalog, hub=hub)
    examples = example_images(examples_dir)
    default_model = catalog.default()
    choices = catalog.choices()

    with gr.Blocks(title="posenc: how Vision Transformers encode position", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        banner = gr.Markdown(visible=False, elem_id="hub-banner")
        grid_state = gr.State(None)
        grid_a_state = gr.State(None)
        with gr.Tab("Explore", id="explore"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    model = gr.Dropdown(choices, value=default_model, label="Model", allow_custom_value=True,
                                        elem_id="model")
                    with gr.Row():
                        repo = gr.Textbox(label="Or any Hub repo id", placeholder="timm/deit_tiny_patch16_224.fb_in1k",
                                          scale=3, elem_id="repo")
                        load_button = gr.Button("Load", scale=1, min_width=80)
                    info = gr.Markdown(elem_id="model-info")
                    image = gr.Image(value=examples[0] if examples else None, type="filepath", image_mode=None,
                                     label="Image", sources=["upload", "clipboard"], height=280, elem_id="image")
                    gallery = gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Examples",
                                          cache_examples=False, api_visibility="private") if examples else None
                    with gr.Row():
                        size = gr.Dropdown(label="Input size (h x w)", choices=[], allow_custom_value=True,
                                           elem_id="size")
                        block = gr.Slider(0, 1, value=0, step=1, label="Block", elem_id="block")
                    with gr.Row():
                        row = gr.Number(label="Patch row", precision=0, minimum=0, elem_id="row")
                        col = gr.Number(label="Patch column", precision=0, minimum=0, elem_id="col")
                with gr.Column(scale=3):
                    summary = gr.Markdown(label="summary", elem_id="summary")
                    with gr.Row():
                        picker = gr.Image(label="Click a patch", type="filepath", image_mode=None, format="png",
                                          interactive=False, elem_id="patch-picker")
                        label = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="label")
                    with gr.Tabs():
                        with gr.Tab("Absolute position"):
                            gr.Markdown(HELP["absolute"])
                            abs_note = gr.Markdown(label="absolute note")
                            abs_grid = _view_image("Similarity of position embeddings", elem_id="abs-grid")
                            with gr.Row():
                                abs_patch = _view_image("Similarity to the clicked patch", elem_id="abs-patch")
                                abs_pca = _view_image("PCA of the embeddings", elem_id="abs-pca")
                        with gr.Tab("Relative bias"):
                            gr.Markdown(HELP["relative"])
                            rel_note = gr.Markdown(label="relative note")
                            rel_table = _view_image("Bias table per head", elem_id="rel-table")
                            rel_query = _view_image("Bias of the clicked query", elem_id="rel-query")
                        with gr.Tab("RoPE"):
                            gr.Markdown(HELP["rope"])
                            rope_note = gr.Markdown(label="rope note")
                            rope_image = _view_image("RoPE phase similarity", elem_id="rope")
                        with gr.Tab("Attention"):
                            gr.Markdown(HELP["attention"])
                            attention = _view_image("Attention per head", elem_id="attention")
                    npz = gr.File(label="Raw tensors behind the views (.npz)", elem_id="npz")

        with gr.Tab("Compare", id="compare") as compare_tab:
            gr.Markdown("Two models on the image of the Explore tab and the same patch: click a patch on model A's "
                        "input; model B uses the patch at the same place. Both run at their native sizes.")
            with gr.Row():
                model_a = gr.Dropdown(choices, value=default_model, label="Model A", allow_custom_value=True)
                model_b = gr.Dropdown(choices, value=catalog.second(default_model), label="Model B",
                                      allow_custom_value=True)
                block_c = gr.Radio(["first", "middle", "last"], value="first", label="Block")
                compare_button = gr.Button("Compare", variant="primary")
            with gr.Row():
                picker_a = gr.Image(label="Click a patch (model A's input)", type="filepath", image_mode=None,
                                    format="png", interactive=False, elem_id="picker-a")
                with gr.Column():
                    compare_summary = gr.Markdown(label="compare summary")
                    row_c = gr.Number(label="Patch row (model A)", precision=0, minimum=0)
                    col_c = gr.Number(label="Patch column (model A)", precision=0, minimum=0)
            with gr.Row():
                with gr.Column():
                    label_a = gr.Label(num_top_classes=5, label="Model A: top-5")
                    position_a = _view_image("Model A: position view")
                    attention_a = _view_image("Model A: attention")
                with gr.Column():
                    label_b = gr.Label(num_top_classes=5, label="Model B: top-5")
                    position_b = _view_image("Model B: position view")
                    attention_b = _view_image("Model B: attention")

        from posenc.ui_measure import measure_tab  # imports this module: built here, not at import time

        measure_tab(load=h._load, image=image, model=model)
        with gr.Row(visible=False):
            api_button = gr.Button("API")  # carries the API-only endpoints; never shown

        explore_in = [image, model, size, block, row, col]
        explore_out = [picker, label, abs_note, abs_grid, abs_patch, abs_pca, rel_note, rel_table, rel_query,
                       rope_note, rope_image, attention, npz, summary]
        sync = dict(fn=h.sync_controls, inputs=[model, size, block, row, col, grid_state],
                    outputs=[info, size, block, row, col, grid_state], api_visibility="private",
                    trigger_mode="always_last")
        run = dict(fn=h.analyse, inputs=explore_in, outputs=explore_out, preprocess=False, api_name="analyse",
                   trigger_mode="always_last")
        compare_in = [image, model_a, model_b, block_c, row_c, col_c]
        compare_out = [picker_a, label_a, position_a, attention_a, label_b, position_b, attention_b,
                       compare_summary, grid_a_state]
        run_compare = dict(fn=h.compare, inputs=compare_in, outputs=compare_out, preprocess=False,
                           trigger_mode="always_last")

        private_run = {**run, "api_visibility": "private", "api_name": None}
        demo.load(h.banner, outputs=banner, queue=False, api_visibility="private")
        demo.load(**sync).success(**run)
        gr.on([model.select, size.select], **sync).success(**private_run)
        gr.on([repo.submit, load_button.click], h.use_custom, inputs=repo, outputs=model,
              api_visibility="private").success(**sync).success(**private_run)
        gr.on([image.upload, block.release, row.submit, col.submit], **private_run)
        if gallery is not None:
            gallery.load_input_event.then(**private_run)
        picker.select(h.pick_patch, inputs=[grid_state, picker], outputs=[row, col], api_visibility="private",
                      queue=False).success(**private_run)

        compare_button.click(**run_compare, api_name="compare")
        private_compare = {**run_compare, "api_visibility": "private"}
        model_a.select(h.clear_patch, outputs=[row_c, col_c], api_visibility="private", queue=False).then(
            **private_compare)
        gr.on([model_b.select, block_c.select], **private_compare)
        picker_a.select(h.pick_patch, inputs=[grid_a_state, picker_a], outputs=[row_c, col_c],
                        api_visibility="private", queue=False).success(**private_compare)
        compare_tab.select(h.carry_patch, inputs=[model_a, row, col, grid_state], outputs=[row_c, col_c],
                           api_visibility="private").then(**private_compare)

        api_button.click(h.predict, inputs=[image, model, size], outputs=label, api_name="predict", preprocess=False)
        api_button.click(h.position_embedding, inputs=[image, model, size, row, col],
                         outputs=[abs_grid, abs_patch, abs_pca], api_name="position_embedding", preprocess=False)
        api_button.click(h.relative_bias, inputs=[image, model, size, block, row, col],
                         outputs=[rel_table, rel_query], api_name="relative_bias", preprocess=False)
        api_button.click(h.rope, inputs=[image, model, size, row, col], outputs=rope_image, api_name="rope",
                         preprocess=False)
        api_button.click(h.attention, inputs=[image, model, size, block, row, col], outputs=attention,
                         api_name="attention", preprocess=False)
    return demo
