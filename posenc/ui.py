"""The posenc Gradio app: :func:`create_demo` builds the ``gr.Blocks``; ``app.py`` launches it.

The app gets its dependencies as arguments (where the bundled checkpoints are, the curated Hub models,
the model cache size, a loader), loads models lazily into a bounded thread-safe LRU cache (the only
state shared between requests) and draws every view with :mod:`posenc.views` and the views declared in
:mod:`posenc.mechanisms`.

* **Public names.** Every model has one public name, used in the page, the API, the ``.npz`` and the CLI:
  a bundled or extra local model its folder name (``cifar10-rope``), a Hub model its repo id. Server
  paths never reach a page or an API answer; :meth:`Catalog.resolve` turns any accepted spelling into
  the public name and the place to load from.
* **One path.** Every page event of the Explore tab (first visit, model picked, typed or loaded from the
  repo field, size, block, patch, image) runs :meth:`Handlers.explore`, which syncs the controls and
  draws the views, or refuses with one message and puts the controls back to what the pictures show.
* **Mechanism views.** The view tabs are built from :data:`posenc.mechanisms.MECHANISMS`: one tab per
  kind, one group per mechanism with its help and its ``ViewSpec`` pictures, shown only for the
  mechanisms the model lists. Adding a mechanism module adds its pictures and its ``/view`` choices.

Named API endpoints (see ``Use via API`` in the page footer): ``/predict``, ``/position_embedding``,
``/relative_bias``, ``/rope``, ``/attention``, ``/view`` (any mechanism's view by key), ``/compare`` and
``/analyse`` (every view plus the ``.npz``). They raise ``gr.Error`` with the user's message.
"""

from __future__ import annotations

import atexit
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from PIL import Image

from posenc import mechanisms, views, viz
from posenc.hub import HubLoadError, LoadedModel, is_safe_source, load
from posenc.mechanisms import MECHANISMS, Mechanism, ViewSpec
from posenc.preprocess import ImageError
from posenc.registry import ModelEntry, bundled_models

logger = logging.getLogger(__name__)

#: ``demo.queue(**QUEUE_OPTIONS)``: two inferences at a time (CPU), at most 64 waiting.
QUEUE_OPTIONS: dict[str, Any] = {"default_concurrency_limit": 2, "max_size": 64}
MAX_FILE_SIZE = "20mb"
DEFAULT_MODEL = "cifar10-learned"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
EXPORT_MAX_AGE_S = 15 * 60  # request folders older than this are deleted (Gradio keeps its own copy)
EXPORT_MAX_FOLDERS = 64  # and at most this many are kept, newest first
_HUB_FAILURES = ("offline", "network")
#: Tab titles of the mechanism kinds, in :data:`posenc.mechanisms.KINDS` order.
KIND_TITLES = {"absolute": "Absolute position", "relative": "Relative position", "rotary": "Rotary",
               "convolutional": "Convolutional"}
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
ATTENTION_HELP = (
    "Attention from the clicked patch in the chosen block, one panel per head, each scaled to its own maximum. "
    "For models with a relative bias or RoPE the second row leaves the position term out. Below, for models with "
    "prefix tokens (cls, registers), the share of attention each head gives them and the patches, block by block."
)


# --------------------------------------------------------------------------------------------------- model cache


class ModelCache:
    """A bounded, thread-safe LRU cache of loaded models keyed by public name; it holds models only.

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
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    def _lookup(self, key: str) -> LoadedModel | None:
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
            return loaded

    def get(self, key: str, on_load: Callable[[str], None] | None = None, *, source: str | None = None
            ) -> LoadedModel:
        """The model cached as ``key``, loaded from ``source`` (default ``key``) on a miss.

        ``on_load(key)`` is called before a load (e.g. for progress).
        """
        loaded = self._lookup(key)
        if loaded is not None:
            return loaded
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            loaded = self._lookup(key)
            if loaded is not None:
                return loaded
            try:
                if on_load is not None:
                    on_load(key)
                loaded = self._loader(source or key)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._models[key] = loaded
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
class Listed:
    """One model of the picker.

    Attributes:
        key: the public name: the folder name of a bundled or local model, the repo id of a Hub model.
        entry: what the registry knows about it.
        kind: "bundled", "local folder" or "Hub".
    """

    key: str
    entry: ModelEntry
    kind: str


@dataclass(frozen=True)
class Catalog:
    """The models the picker lists: bundled checkpoints, extra local folders, curated Hub models.

    Attributes:
        bundled: the project's own checkpoints (always loadable).
        local: extra local model folders given to the app.
        hub: curated Hub models.
        checkpoints_dir: the folder of the bundled checkpoints; other folders inside it may be loaded by name.
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
        return cls(tuple(bundled_models(checkpoints_dir)), local, tuple(registry), Path(checkpoints_dir).resolve())

    @functools.cached_property
    def listed(self) -> tuple[Listed, ...]:
        """Every listed model under its public name (a local folder named like an earlier one gets a suffix)."""
        out: list[Listed] = []
        for kind, entries in (("bundled", self.bundled), ("local folder", self.local), ("Hub", self.hub)):
            for entry in entries:
                key = entry.source if kind == "Hub" else entry.name
                taken = {item.key for item in out}
                n = 2
                while key in taken:
                    key, n = f"{entry.name}-{n}", n + 1
                out.append(Listed(key, entry, kind))
        return tuple(out)

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return self.bundled + self.local + self.hub

    def get(self, key: str) -> Listed | None:
        """The listed model with this public name."""
        return next((item for item in self.listed if item.key == key), None)

    def resolve(self, text: str | None) -> tuple[str, str]:
        """The public name and the source to load for what a user typed or picked.

        Accepted: a listed public name, a listed folder by its path (absolute, or relative to the working
        directory or to the project), a folder inside the checkpoints folder by its name or path, and a Hub
        repo id ``org/name``.

        Raises:
            ValueError: nothing to load, or a name this app may not load (the message says what is accepted).
        """
        text = (text or "").strip()
        if not text:
            raise ValueError("Pick a model first.")
        listed = self.get(text)
        if listed is not None:
            return listed.key, listed.entry.source
        folder = self._folder(text)
        if folder is not None:
            for item in self.listed:
                if item.kind != "Hub" and Path(item.entry.source).resolve() == folder:
                    return item.key, item.entry.source
            if is_safe_source(str(folder), [self.checkpoints_dir]):
                return folder.relative_to(self.checkpoints_dir).as_posix(), str(folder)
        elif "/" in text and is_safe_source(text, []):
            return text, text
        raise ValueError(
            f"{text!r} is not a model this app may load: pick one from the list, or give a Hub repo id such as "
            "'timm/deit_tiny_patch16_224.fb_in1k'"
        )

    def _folder(self, text: str) -> Path | None:
        """The existing folder ``text`` names (no ``..``): as given, inside the checkpoints, or in the project."""
        if text.startswith("~") or "://" in text or ".." in Path(text).parts:
            return None
        path = Path(text)
        try:
            bases = [Path.cwd(), self.checkpoints_dir, self.checkpoints_dir.parent]
            for candidate in ([path] if path.is_absolute() else [base / path for base in bases]):
                if candidate.is_dir():
                    return candidate.resolve()
        except (OSError, ValueError):
            return None
        return None

    def kind(self, key: str) -> str:
        """"bundled", "local folder", "Hub" (curated) or "custom"."""
        listed = self.get(key)
        return listed.kind if listed is not None else "custom"

    def allowed(self, text: str) -> bool:
        """Whether the app may load ``text`` (see :meth:`resolve`)."""
        try:
            self.resolve(text)
        except ValueError:
            return False
        return True

    def choices(self, unavailable: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(label, public name) pairs for the dropdowns; models in ``unavailable`` are marked so."""
        unavailable = set(unavailable)
        return [(self.label(item, item.key in unavailable), item.key) for item in self.listed]

    @staticmethod
    def label(item: Listed, unavailable: bool = False) -> str:
        """"cifar10-rope · rope · 0.8M · CIFAR-10 71.3% · bundled" (shortened to stay readable in a dropdown)."""
        entry = item.entry
        parts = [entry.name]
        if entry.family:
            parts.append(entry.family)
        if entry.num_params:
            parts.append(f"{entry.num_params / 1e6:.1f}M")
        if entry.accuracy is not None:
            parts.append(f"{entry.dataset} {entry.accuracy:.1f}%")
        parts.append(f"{item.kind}: unavailable offline" if unavailable else item.kind)
        return " \u00b7 ".join(parts)

    def default(self, prefer: str = DEFAULT_MODEL) -> str | None:
        """The model shown on a first visit: ``prefer`` among the bundled ones, else the first listed."""
        named = [item.key for item in self.listed if item.key == prefer and item.kind == "bundled"]
        first = named or [item.key for item in self.listed[:1]]
        return first[0] if first else None

    def second(self, first: str | None) -> str | None:
        """Another model for the Compare tab (a relative-bias one when bundled)."""
        ordered = sorted(self.listed, key=lambda item: item.entry.family not in ("windowed", "relative"))
        return next((item.key for item in ordered if item.key != first), first)

    def uncached_hub(self) -> list[str]:
        """Listed Hub models with no ``config.json`` in the local Hub cache (they cannot load offline)."""
        missing = []
        for item in self.listed:
            if item.kind == "Hub" and not isinstance(try_to_load_from_cache(item.key, "config.json"), str):
                missing.append(item.key)
        return missing


# --------------------------------------------------------------------------------------------------- handlers


def _message(error: Exception) -> str:
    """What to tell the user about an error they can cause, in the app's words."""
    if isinstance(error, HubLoadError) and error.reason == "offline":
        return (f"{error.source} is not stored on this server and the Hugging Face Hub cannot be reached from it, "
                "so it cannot be loaded now; pick a bundled model, or try again later")
    return str(error)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into ``gr.Error`` with their message; log anything else."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImageError, HubLoadError, ValueError) as error:
            raise gr.Error(_message(error), print_exception=False) from error
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


def _views_of(kind: str | None = None) -> list[tuple[Mechanism, ViewSpec]]:
    """Every (mechanism, view) pair of the registry, of one kind or all, in display order."""
    return [(m, spec) for m in MECHANISMS.values() if kind in (None, m.kind) for spec in m.views]


def _compare_mechanisms() -> list[Mechanism]:
    """The mechanisms that have a view for the Compare tab."""
    return [m for m in MECHANISMS.values() if any(spec.compare for spec in m.views)]


def view_key(mechanism: Mechanism, spec: ViewSpec) -> str:
    """The ``/view`` endpoint's name of a view: "learned/similarity_grid"."""
    return f"{mechanism.name}/{spec.key}"


def _clamp_block(seen: views.Seen, block: Any) -> int:
    """A block by position ("first", "middle", "last") or index; an index out of range is clamped to the nearest block.

    Raises:
        ValueError: the block is neither a position nor a whole number.
    """
    if block is None or (isinstance(block, str) and not block.strip()):
        return 0
    if isinstance(block, str) and block.strip().lower() in ("first", "middle", "last"):
        return views.pick_block(seen, block)
    try:
        number = float(block)
    except (TypeError, ValueError):
        raise ValueError(f"block {block!r} is not 'first', 'middle', 'last' or a block number") from None
    if number != int(number):
        raise ValueError(f"block {block} is not a whole number; blocks are numbered 0..{seen.num_blocks - 1}")
    return min(max(int(number), 0), seen.num_blocks - 1)


def _predictions(seen: views.Seen) -> dict[str, float] | str:
    """The top-5 as {label: probability}, or for a headless model (it returns features) the words saying so."""
    if seen.loaded.model.headless:
        return views.NO_CLASSIFIER
    return views.predictions(seen)


class Handlers:
    """The app's event handlers; each is a small method, and the model cache is the only shared state.

    Args:
        cache: the loaded-model cache, keyed by public name.
        catalog: the listed models and which sources are allowed.
        hub: the Hub reachability status.
        examples: the example images a visitor may pick by number.
    """

    def __init__(self, *, cache: ModelCache, catalog: Catalog, hub: HubStatus, examples: Sequence[str] = ()) -> None:
        self.cache = cache
        self.catalog = catalog
        self.hub = hub
        self.examples = list(examples)
        self._export_dir: Path | None = None
        self._export_lock = threading.Lock()

    # ---------------------------------------------------------------- helpers

    def _load(self, model: str | None, progress: Callable[..., Any]) -> tuple[str, LoadedModel]:
        """The public name and the loaded model (its ``source`` is the public name); refused names raise."""
        key, source = self.catalog.resolve(model)
        try:
            loaded = self.cache.get(key, on_load=lambda k: progress(0.05, desc=f"Loading {k}"), source=source)
        except HubLoadError as error:
            if error.reason in _HUB_FAILURES:
                self.hub.recheck()  # downloads stop only while the Hub itself does not answer
            if source != key:  # say the public name, never the server path
                raise HubLoadError(str(error).replace(source, key), source=key, reason=error.reason) from None
            raise
        if loaded.source != key:
            loaded = replace(loaded, source=key)
        return key, loaded

    def _see(self, image: Any, model: str | None, size: Any, progress: Callable[..., Any]) -> views.Seen:
        path = _image_path(image)
        key, loaded = self._load(model, progress)
        input_size = views.parse_size(size, loaded)
        progress(0.3, desc=f"Running {key} at {views.format_size(input_size)}")
        return views.inspect_image(loaded, path, input_size, name=key)

    def _downloads(self, seen: views.Seen, patch: views.Patch, block: int) -> _Downloads:
        """A fresh folder for one request's files; the oldest are deleted past 15 minutes or 64 folders."""
        with self._export_lock:
            if self._export_dir is None:
                self._export_dir = Path(tempfile.mkdtemp(prefix="posenc-app-"))
                atexit.register(shutil.rmtree, self._export_dir, ignore_errors=True)
            folders = sorted(self._export_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            cutoff = time.time() - EXPORT_MAX_AGE_S
            for n, old in enumerate(folders):
                if n >= EXPORT_MAX_FOLDERS - 1 or old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            folder = self._export_dir / uuid.uuid4().hex
            folder.mkdir()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in seen.name)[-60:]
        where = f"{views.format_size(seen.size)}_patch{patch[0]}-{patch[1]}_block{block}"
        return _Downloads(folder, f"posenc_{safe}_{where}")

    def close(self) -> None:
        """Delete this app's folder of downloadable files (also done at interpreter exit)."""
        with self._export_lock:
            if self._export_dir is not None:
                shutil.rmtree(self._export_dir, ignore_errors=True)
                self._export_dir = None

    def info(self, key: str, loaded: LoadedModel) -> str:
        """Markdown about a model: its position mechanisms, architecture, parameters, accuracy, public name."""
        listed = self.catalog.get(key)
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
            f"**{key}** ({self.catalog.kind(key)}) · position: **{mechanisms.describe(loaded.model.mechanisms)}**: "
            f"{position}.\n\n"
            f"{type(loaded.model).__name__} · {loaded.num_params:,} parameters{accuracy}{head} · "
            f"input {views.format_size(size)}, patch {cfg.patch_size}, grid {grid[0]}x{grid[1]}"
        )

    # ---------------------------------------------------------------- page start

    def first_visit(self) -> tuple[Any, ...]:
        """The Hub banner, the model lists (uncached Hub models marked while offline) and the first example."""
        offline = self.hub.online(wait=4.0) is False
        unavailable = self.catalog.uncached_hub() if offline else []
        banner = gr.Markdown(visible=False)
        if offline:
            banner = gr.Markdown(
                "**Hub models are unavailable**: the Hugging Face Hub cannot be reached from this server. "
                "The bundled CIFAR-10 models work; Hub models load only if this server already stored them "
                "(the others are marked *unavailable offline* in the list).", visible=True)
        choices = self.catalog.choices(unavailable)
        first = self.examples[0] if self.examples else None
        return (banner, gr.Dropdown(choices=choices), gr.Dropdown(choices=choices), gr.Dropdown(choices=choices),
                first, [(p, Path(p).stem.replace("_", " ")) for p in self.examples])

    def banner(self) -> Any:
        """A visible notice when the Hub cannot be reached (waits briefly for the start-up probe)."""
        return self.first_visit()[0]

    def pick_example(self, evt: gr.SelectData) -> str:
        """The example image clicked in the gallery."""
        return self.examples[evt.index]

    @_user_errors
    def use_custom(self, repo_id: str) -> Any:
        """Select the model typed into the repo field, under its public name."""
        if not self.catalog.allowed(repo_id):
            raise ValueError(
                f"{(repo_id or '').strip()!r} is not a Hub repo id (org/name, e.g. "
                "'timm/deit_tiny_patch16_224.fb_in1k') or a listed model; server paths are not accepted"
            )
        return gr.Dropdown(value=self.catalog.resolve(repo_id)[0], allow_custom_value=True)

    @_user_errors
    def pick_patch(self, grid: Any, picker: str | None, evt: gr.SelectData) -> tuple[int, int]:
        """The patch under a click on the patch picker (``grid``: the grid, or the Explore tab's ``shown``)."""
        if isinstance(grid, dict):
            grid = grid.get("grid")
        if not grid or not picker:
            raise ValueError("Wait for the model's input to appear, then click a patch on it.")
        with Image.open(picker) as img:
            size = img.size  # w, h
        return viz.patch_at(evt.index, size, tuple(grid))

    def carry_patch(
        self, model_a: str, row: Any, col: Any, shown: Any, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, Any]:
        """The Explore tab's patch on model A's grid (same relative place), for the Compare tab."""
        try:
            grid = tuple((shown or {})["grid"])
            _, loaded = self._load(model_a, progress)
            grid_a = views.input_grid(loaded, views.native_size(loaded))
            return views.map_patch(views.check_patch(row, col, grid), grid, grid_a)
        except (KeyError, TypeError, ValueError, HubLoadError):
            return None, None

    @staticmethod
    def clear_patch() -> tuple[None, None]:
        """Forget the Compare tab's patch (model A changed): the centre is used."""
        return None, None

    # ---------------------------------------------------------------- the Explore tab (page)

    def explore_repo(self, repo: str, image: Any, size: Any, block: Any, row: Any, col: Any, shown: Any,
                     progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """:meth:`explore` for the model typed into the repo field."""
        return self.explore(image, repo, size, block, row, col, shown, progress=progress)

    def explore(self, image: Any, model: str, size: Any, block: Any, row: Any, col: Any, shown: Any,
                progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """Every page event of the Explore tab: sync the controls to the model and draw its views, or refuse.

        Args:
            image, model, size, block, row, col: the controls as the page holds them.
            shown: what the pictures show (``None`` before the first result): model, size, block, patch, grid.

        Returns:
            Output name -> value (see :func:`create_demo`); names left out keep their value. A refused request
            returns its message, puts the controls back to ``shown`` and keeps the pictures, marked as the
            previous request's.
        """
        shown = dict(shown or {})
        try:
            return self._explore(image, model, size, block, row, col, shown, progress)
        except (ImageError, HubLoadError, ValueError, MemoryError) as error:
            message = _message(error) if not isinstance(error, MemoryError) else (
                "the server ran out of memory for this request; try a smaller input size or image")
            return self._refused(message, shown)
        except Exception as error:  # the page must never be left half-updated
            logger.exception("unexpected error in explore")
            return self._refused(f"something went wrong ({type(error).__name__}: {error}); try again, or another "
                                 "image or model", shown)

    def _refused(self, message: str, shown: dict[str, Any]) -> dict[str, Any]:
        """The one message of a refused request; the controls go back to what the pictures show."""
        message = " ".join(message.split())
        message = message[0].upper() + message[1:]
        if not shown:
            return {"status": gr.Markdown(f"**Not run.** {message}", visible=True)}
        return {
            "status": gr.Markdown(f"**Not run.** {message}  \nThe pictures below still show the previous request: "
                                  f"{shown['summary']}.", visible=True),
            "summary": f"*Previous request:* {shown['summary']}",
            "model": gr.Dropdown(value=shown["model"], allow_custom_value=True),
            "size": gr.Dropdown(value=shown["size"], allow_custom_value=True),
            "block": gr.Slider(value=shown["block"]),
            "row": shown["patch"][0],
            "col": shown["patch"][1],
        }

    def _explore(self, image: Any, model: str, size: Any, block: Any, row: Any, col: Any, shown: dict[str, Any],
                 progress: Callable[..., Any]) -> dict[str, Any]:
        if image is None:
            raise ValueError("Upload an image or pick one of the examples.")
        path = _image_path(image)
        key, loaded = self._load(model, progress)
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
        b = min(max(int(block or 0), 0), depth - 1)
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
        out = self._mechanism_outputs(seen, b, patch)
        attention = views.attention_view(seen, b, patch)
        prefix, _ = views.try_view(lambda: views.prefix_attention_view(seen, b, patch))  # None without prefix keys
        files = self._downloads(seen, patch, b)
        out["npz"] = files.npz(seen, patch, b, [*out.pop("_views"), attention, prefix])
        for name in [n for n in out if n.startswith("view:")]:
            out[name] = files.png(name.split(":", 1)[1].replace("/", "_"), out[name])
        summary = (f"**{key}** at {views.format_size(seen.size)} ({seen.grid[0]}x{seen.grid[1]} patches) · "
                   f"patch **{patch}** · {views.describe_block(seen, b)}")
        native = views.native_size(loaded)
        sizes = [(views.format_size(s) + (" (native)" if s == native else ""), views.format_size(s))
                 for s in views.input_sizes(loaded)]
        if input_size not in views.input_sizes(loaded):
            sizes.append((views.format_size(input_size), views.format_size(input_size)))
        shown = {"model": key, "size": views.format_size(input_size), "block": b, "patch": list(patch),
                 "grid": list(grid), "summary": summary, "request": request}
        return out | {
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
            "label": _predictions(seen),
            "attention": files.png("attention", attention.image),
            "prefix_attention": gr.Image(files.png("prefix_attention", prefix.image if prefix else None), visible=bool(prefix)),
        }

    def _mechanism_outputs(self, seen: views.Seen, block: int, patch: views.Patch) -> dict[str, Any]:
        """Each kind's note, each mechanism's group (shown when the model uses it) and its views' images.

        Returns:
            name -> value, plus "_views": the drawn :class:`~posenc.views.View` objects for the ``.npz``.
        """
        used = {m.name for m in mechanisms.of(seen.loaded.model.mechanisms)}
        out: dict[str, Any] = {"_views": []}
        notes: dict[str, list[str]] = {}
        for m in MECHANISMS.values():
            out[f"group:{m.name}"] = gr.Group(visible=m.name in used)
            for spec in m.views:
                image = None
                if m.name in used:
                    try:
                        drawn = spec.draw(seen, block, patch)
                        out["_views"].append(drawn)
                        image = drawn.image
                    except ValueError as error:
                        notes.setdefault(m.kind, []).append(f"{spec.label}: {error}")
                out[f"view:{view_key(m, spec)}"] = image
        for kind in mechanisms.KINDS:
            if not any(m.kind == kind for m in MECHANISMS.values()):
                continue
            if not any(MECHANISMS[name].kind == kind for name in used):
                title = KIND_TITLES[kind].lower()
                notes[kind] = [f"{seen.name} has no {title} mechanism; its mechanisms: "
                               f"{mechanisms.describe(seen.loaded.model.mechanisms)}."]
            out[f"note:{kind}"] = gr.Markdown("\n\n".join(notes.get(kind, [])), visible=kind in notes)
        return out

    # ---------------------------------------------------------------- the Compare tab

    def _compare_seen(self, image: Any, model_a: str, model_b: str, block: Any, row: Any, col: Any,
                      progress: Callable[..., Any]) -> list[tuple[views.Seen, views.Patch, int]]:
        """Both models' inspections, patches (B's at A's relative place) and blocks (clamped to each depth)."""
        if image is None:
            raise ValueError("Upload an image in the Explore tab first, or pick one of the examples.")
        seen_a = self._see(image, model_a, None, progress)
        seen_b = self._see(image, model_b, None, progress)
        patch_a = views.check_patch(row, col, seen_a.grid)
        patch_b = views.map_patch(patch_a, seen_a.grid, seen_b.grid)
        return [(seen, patch, _clamp_block(seen, block)) for seen, patch in ((seen_a, patch_a), (seen_b, patch_b))]

    @staticmethod
    def _compare_line(seen: views.Seen, patch: views.Patch, block: int) -> str:
        return (f"**{seen.name}** ({mechanisms.describe(seen.loaded.model.mechanisms)}): patch {patch} of "
                f"{seen.grid[0]}x{seen.grid[1]}, {views.describe_block(seen, block)}")

    def compare_page(self, image: Any, model_a: str, model_b: str, block: Any, row: Any, col: Any,
                     progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """The Compare tab: every compare view of each model's mechanisms; a refusal keeps the last result."""
        try:
            pairs = self._compare_seen(image, model_a, model_b, block, row, col, progress)
            progress(0.6, desc="Drawing the views")
            (seen_a, patch_a, _), _ = pairs
            out: dict[str, Any] = {
                "picker_a": self._downloads(seen_a, patch_a, 0).png("input", views.patch_picker(seen_a, patch_a)),
                "summary": "  \n".join(self._compare_line(*pair) for pair in pairs),
                "grid_a": list(seen_a.grid), "status": gr.Markdown(visible=False),
                "row": patch_a[0], "col": patch_a[1],
            }
            for side, (seen, patch, b) in zip("ab", pairs):
                files = self._downloads(seen, patch, b)
                used = {m.name for m in mechanisms.of(seen.loaded.model.mechanisms)}
                for m in _compare_mechanisms():
                    spec = next(s for s in m.views if s.compare)
                    image_path = files.png(view_key(m, spec).replace("/", "_"),
                                           spec.draw(seen, b, patch).image) if m.name in used else None
                    out[f"{side}:{m.name}"] = gr.Image(value=image_path, visible=m.name in used)
                out[f"{side}:label"] = _predictions(seen)
                out[f"{side}:attention"] = files.png("attention", views.attention_view(seen, b, patch).image)
            return out
        except (ImageError, HubLoadError, ValueError, MemoryError) as error:
            message = " ".join(_message(error).split()) if not isinstance(error, MemoryError) else "out of memory"
            return {"status": gr.Markdown(f"**Not run.** {message}. The pictures below are those of the previous "
                                          "comparison.", visible=True)}

    @_user_errors
    def compare(
        self, image: Any, model_a: str, model_b: str, block: Any = "first", row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """Two models side by side at their native sizes, on the same image and the same patch.

        ``row``/``col`` are on model A's grid (None: the centre); model B gets the patch at the same relative place.
        ``block`` is "first", "middle", "last" or an index (clamped to each model's blocks, as everywhere).

        Returns:
            model A's patch picker, then for A and B: top-5, position view (the compare view of the model's
            first mechanism that has one; see ``/view`` for the others), attention; a summary.
        """
        pairs = self._compare_seen(image, model_a, model_b, block, row, col, progress)
        progress(0.6, desc="Drawing the views")
        (seen_a, patch_a, _), _ = pairs
        outputs: list[Any] = [self._downloads(seen_a, patch_a, 0).png("input", views.patch_picker(seen_a, patch_a))]
        for seen, patch, b in pairs:
            files = self._downloads(seen, patch, b)
            specs = [s for m in mechanisms.of(seen.loaded.model.mechanisms) for s in m.views if s.compare]
            position = specs[0].draw(seen, b, patch).image if specs else None
            outputs += [_predictions(seen), files.png("position", position),
                        files.png("attention", views.attention_view(seen, b, patch).image)]
        return (*outputs, "  \n".join(self._compare_line(*pair) for pair in pairs))

    # ---------------------------------------------------------------- API endpoints

    @_user_errors
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
        b = _clamp_block(seen, block)
        progress(0.6, desc="Drawing the views")
        out = self._mechanism_outputs(seen, b, patch)
        attention = views.attention_view(seen, b, patch)
        files = self._downloads(seen, patch, b)
        npz = files.npz(seen, patch, b, [*out["_views"], attention])
        images = [files.png(view_key(m, s).replace("/", "_"), out[f"view:{view_key(m, s)}"]) for m, s in _views_of()]
        summary = (f"**{seen.name}** at {views.format_size(seen.size)} ({seen.grid[0]}x{seen.grid[1]} patches) · "
                   f"patch **{patch}** · {views.describe_block(seen, b)}")
        return (files.png("input", views.patch_picker(seen, patch)), _predictions(seen), *images,
                files.png("attention", attention.image), npz, summary)

    @_user_errors
    def view(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        view: str = "", progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """One view of one position mechanism, by its key ("learned/similarity_grid"), as a PNG."""
        known = {view_key(m, s): (m, s) for m, s in _views_of()}
        if view not in known:
            raise ValueError(f"view {view!r} does not exist; the views are: {', '.join(known)}")
        mechanism, spec = known[view]
        seen = self._see(image, model, size, progress)
        if mechanism.name not in seen.loaded.model.mechanisms:
            raise ValueError(f"{seen.name} does not use a {mechanism.title}, so it has no {spec.label.lower()} "
                             f"view; its mechanisms: {mechanisms.describe(seen.loaded.model.mechanisms)}")
        patch = views.check_patch(row, col, seen.grid)
        b = _clamp_block(seen, block)
        return self._downloads(seen, patch, b).png(view.replace("/", "_"), spec.draw(seen, b, patch).image)

    @_user_errors
    def predict(
        self, image: Any, model: str, size: Any = None, progress: gr.Progress = gr.Progress()
    ) -> dict[str, float] | str:
        """Top-5 classes of the image as {label: probability} (:data:`posenc.views.NO_CLASSIFIER` for a model without one)."""
        return _predictions(self._see(image, model, size, progress))

    @_user_errors
    def position_embedding(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str | None, ...]:
        """Absolute embedding views: the similarity grid, the clicked patch's similarity and the PCA, as PNGs."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        files = self._downloads(seen, patch, 0)
        drawn = [k.view for k in mechanisms.kind_views(seen, "absolute", 0, patch)][:3]
        return tuple(files.pngs(("similarity_grid", "similarity", "pca"), drawn))

    @_user_errors
    def relative_bias(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str | None, ...]:
        """Relative bias views of a block: the table of every head, and the clicked query's bias on the photo."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        b = _clamp_block(seen, block)
        files = self._downloads(seen, patch, b)
        drawn = mechanisms.kind_views(seen, "relative", b, patch)
        table = next((k.view for k in drawn if k.view is not None), None)
        compare = {f"{m.name}/{v.key}" for m in mechanisms.of(seen.loaded.model.mechanisms) for v in m.views if v.compare}
        query = next((k.view for k in drawn if k.key in compare and k.view is not None), None)
        return tuple(files.pngs(("bias_table", "query_bias"), (table, query)))

    @_user_errors
    def rope(
        self, image: Any, model: str, size: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """RoPE relative-phase similarity between the clicked patch and every other."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        drawn = mechanisms.kind_views(seen, "rotary", 0, patch)
        view = next((k.view for k in drawn if k.view is not None), None)
        if view is None:
            raise views.ViewUnavailable(drawn[0].note)
        return self._downloads(seen, patch, 0).png("rope", view.image)

    @_user_errors
    def attention(
        self, image: Any, model: str, size: Any = None, block: Any = None, row: Any = None, col: Any = None,
        progress: gr.Progress = gr.Progress(),
    ) -> str | None:
        """Every head's attention from the clicked patch in a block, and without the position term if any."""
        seen = self._see(image, model, size, progress)
        patch = views.check_patch(row, col, seen.grid)
        b = _clamp_block(seen, block)
        return self._downloads(seen, patch, b).png("attention", views.attention_view(seen, b, patch).image)


def _image_key(image: Any, path: str) -> str:
    """What identifies the image of a request (Gradio gives each upload its own cached path)."""
    return path if not isinstance(image, dict) else str(image.get("path") or image.get("url") or path)


# --------------------------------------------------------------------------------------------------- the Blocks


def _view_image(label: str, **kwargs: Any) -> gr.Image:
    """An output image for a view: lossless PNG, download and full-screen buttons above the picture's own title."""
    classes = ["posenc-view", *kwargs.pop("elem_classes", [])]
    return gr.Image(label=label, show_label=False, format="png", interactive=False, buttons=["download", "fullscreen"],
                    elem_classes=classes, **kwargs)


def example_images(examples_dir: str | Path | None) -> list[str]:
    """The example images in ``examples_dir``, sorted by name (none when the folder is missing)."""
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    return [str(p.resolve()) for p in sorted(Path(examples_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def launch_options(examples_dir: str | Path | None = None) -> dict[str, Any]:
    """``demo.launch`` arguments: no share link, an upload limit, only the example images served from disk."""
    return {"share": False, "max_file_size": MAX_FILE_SIZE, "allowed_paths": example_images(examples_dir), "css": CSS}


class _Outputs:
    """Named output components of one event; a handler's dict becomes the tuple Gradio expects."""

    def __init__(self, named: dict[str, gr.components.Component | gr.blocks.BlockContext]) -> None:
        self.names = list(named)
        self.components = list(named.values())

    def tuple(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """Values in output order; a name the handler left out keeps its component's value."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise KeyError(f"handler returned unknown outputs {sorted(unknown)}")
        return tuple(values[name] if name in values else gr.skip() for name in self.names)

    def wrap(self, fn: Callable[..., dict[str, Any]]) -> Callable[..., tuple[Any, ...]]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            return self.tuple(fn(*args, **kwargs))

        return run


def _mechanism_tabs() -> dict[str, Any]:
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
                                image = _view_image(spec.label, elem_id=f"view-{m.name}-{spec.key}",
                                                    elem_classes=["posenc-wide"] if len(row_specs) == 1 else [])
                                named[f"view:{view_key(m, spec)}"] = image
                named[f"group:{m.name}"] = group
    return named


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
        extra_models: further local model folders to list (e.g. a downloaded DeiT-Tiny), under their folder names.
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
    examples = example_images(examples_dir)
    h = Handlers(cache=ModelCache(loader, size=cache_size), catalog=catalog, hub=hub, examples=examples)
    default_model = catalog.default()
    choices = catalog.choices()
    view_keys = [view_key(m, s) for m, s in _views_of()]

    with gr.Blocks(title="posenc: how Vision Transformers encode position", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        banner = gr.Markdown(visible=False, elem_id="hub-banner")
        shown = gr.State(None)
        grid_a_state = gr.State(None)
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
                                         interactive=False, elem_id="examples", visible=bool(examples))
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
                        mechanism_named = _mechanism_tabs()
                        with gr.Tab("Attention", id="attention-tab"):
                            gr.Markdown(ATTENTION_HELP)
                            attention = _view_image("Attention per head", elem_id="attention",
                                                    elem_classes=["posenc-wide"])
                            prefix_attention = _view_image("Attention to prefix tokens", elem_id="prefix-attention",
                                                           elem_classes=["posenc-wide"], visible=False)
                    npz = gr.File(label="Raw tensors behind the views (.npz)", elem_id="npz")

        with gr.Tab("Compare", id="compare") as compare_tab:
            gr.Markdown("Two models on the image of the Explore tab and the same patch: click a patch on model A's "
                        "input; model B uses the patch at the same place. Both run at their native sizes; a block "
                        "number past a model's last block means its last block.")
            with gr.Row():
                model_a = gr.Dropdown(choices, value=default_model, label="Model A", allow_custom_value=True,
                                      elem_id="model-a", min_width=360)
                model_b = gr.Dropdown(choices, value=catalog.second(default_model), label="Model B",
                                      allow_custom_value=True, elem_id="model-b", min_width=360)
            with gr.Row():
                block_c = gr.Radio(["first", "middle", "last"], value="first", label="Block", scale=3)
                compare_button = gr.Button("Compare", variant="primary", scale=1)
            compare_status = gr.Markdown(visible=False, elem_id="compare-status")
            with gr.Row():
                picker_a = gr.Image(label="Click a patch (model A's input)", type="filepath", image_mode=None,
                                    format="png", interactive=False, elem_id="picker-a")
                with gr.Column():
                    compare_summary = gr.Markdown(elem_id="compare-summary")
                    row_c = gr.Number(label="Patch row (model A)", precision=0, minimum=0)
                    col_c = gr.Number(label="Patch column (model A)", precision=0, minimum=0)
            compare_named: dict[str, Any] = {}
            with gr.Row():
                for side in "ab":
                    with gr.Column():
                        compare_named[f"{side}:label"] = gr.Label(num_top_classes=5, label=f"Model {side.upper()}: top-5")
                        for m in _compare_mechanisms():
                            compare_named[f"{side}:{m.name}"] = _view_image(
                                f"Model {side.upper()}: {m.title}", visible=False, elem_id=f"compare-{side}-{m.name}",
                                elem_classes=["posenc-wide"])
                        compare_named[f"{side}:attention"] = _view_image(
                            f"Model {side.upper()}: attention", elem_id=f"compare-{side}-attention",
                            elem_classes=["posenc-wide"])

        from posenc.ui_measure import measure_tab  # imports this module: built here, not at import time

        measure_tab(load=h._load, image=image, model=model)
        with gr.Row(visible=False):
            api_button = gr.Button("API")  # carries the API-only endpoints; never shown
            api_size = gr.Textbox(label="size", value=None)
            api_block = gr.Number(label="block", value=None, precision=0)
            api_view = gr.Dropdown(view_keys, value=view_keys[0] if view_keys else None, label="view")
            api_views = [_view_image(f"view {key}") for key in view_keys]
            api_sides = [(gr.Label(label=f"model {side}: top-5"), _view_image(f"model {side}: position view"),
                          _view_image(f"model {side}: attention")) for side in "AB"]
            api_absolute = [_view_image(name) for name in ("similarity grid", "similarity to the patch", "PCA")]
            api_relative = [_view_image(name) for name in ("bias table", "query bias")]
            api_one = _view_image("view")

        explore = _Outputs({
            "status": status, "summary": summary, "info": info, "model": model, "size": size, "block": block,
            "row": row, "col": col, "shown": shown, "picker": picker, "label": label, "attention": attention,
            "prefix_attention": prefix_attention, "npz": npz, **mechanism_named,
        })
        run = dict(fn=explore.wrap(h.explore), inputs=[image, model, size, block, row, col, shown],
                   outputs=explore.components, preprocess=False, api_visibility="private", trigger_mode="always_last",
                   show_progress_on=[summary])
        compare_out = _Outputs({"picker_a": picker_a, "summary": compare_summary, "grid_a": grid_a_state,
                                "status": compare_status, "row": row_c, "col": col_c, **compare_named})
        run_compare = dict(fn=compare_out.wrap(h.compare_page), inputs=[image, model_a, model_b, block_c, row_c, col_c],
                           outputs=compare_out.components, preprocess=False, api_visibility="private",
                           trigger_mode="always_last", show_progress_on=[compare_summary])

        demo.load(h.first_visit, outputs=[banner, model, model_a, model_b, image, gallery], api_visibility="private"
                  ).then(**run)
        gr.on([model.input, size.input, block.input, block.release, row.submit, col.submit, image.upload], **run)
        gr.on([repo.submit, load_button.click], **{**run, "fn": explore.wrap(h.explore_repo),
                                                   "inputs": [repo, image, size, block, row, col, shown]})
        gallery.select(h.pick_example, outputs=image, api_visibility="private", queue=False).then(**run)
        picker.select(h.pick_patch, inputs=[shown, picker], outputs=[row, col], api_visibility="private",
                      queue=False).success(**run)

        compare_button.click(**run_compare)
        model_a.input(h.clear_patch, outputs=[row_c, col_c], api_visibility="private", queue=False).then(**run_compare)
        gr.on([model_b.input, block_c.input], **run_compare)
        picker_a.select(h.pick_patch, inputs=[grid_a_state, picker_a], outputs=[row_c, col_c],
                        api_visibility="private", queue=False).success(**run_compare)
        compare_tab.select(h.carry_patch, inputs=[model_a, row, col, shown], outputs=[row_c, col_c],
                           api_visibility="private").then(**run_compare)

        size_doc = ("size: 'HxW' in pixels, or None for the model's native size. Any size works whose height and width "
                    "are multiples of the model's patch (for Swin: of patch x 2^stage x window at every stage), each "
                    f"side at most {views.MAX_SIZE_FACTOR} times the native side, with at most "
                    f"{views.MAX_TRACE_BYTES >> 20} MB of attention maps; a refused size's message states the "
                    "model's rule.")
        common = ("model: a public model name (a bundled model such as 'cifar10-rope', or a Hub repo id 'org/name'). "
                  f"{size_doc} block: a block number; past the last block means the last, below 0 means 0. row, col: "
                  "the patch on the input grid (None, None: the centre).")

        def api(fn: Callable[..., Any], inputs: list[Any], outputs: Any, name: str, what: str) -> None:
            api_button.click(fn, inputs=inputs, outputs=outputs, api_name=name, preprocess=False,
                             api_description=f"{what} {common}")

        api(h.predict, [image, model, api_size], label, "predict", "Top-5 classes of the image.")
        api(h.position_embedding, [image, model, api_size, row, col], api_absolute,
            "position_embedding", "Absolute embedding views: similarity grid, similarity to the patch, PCA.")
        api(h.relative_bias, [image, model, api_size, api_block, row, col], api_relative,
            "relative_bias", "Relative bias views of a block: the table per head and the clicked query's bias.")
        api(h.rope, [image, model, api_size, row, col], api_one, "rope",
            "RoPE phase similarity to the patch.")
        api(h.attention, [image, model, api_size, api_block, row, col], attention, "attention",
            "Every head's attention from the patch in a block, with and without the position term.")
        api(h.view, [image, model, api_size, api_block, row, col, api_view], api_one, "view",
            "One view of a position mechanism, by key (mechanism/view), e.g. "
            f"{', '.join(view_keys[:3])}; the model must use that mechanism.")
        api(h.analyse, [image, model, api_size, api_block, row, col],
            [picker, label, *api_views, attention, npz, summary], "analyse",
            "Every view at once: picker, top-5, one image per view key in this order: "
            f"{', '.join(view_keys)} (None where the model lacks the mechanism), attention, the .npz, a summary "
            "(the .npz and the summary are always the last two).")
        api_button.click(h.compare, inputs=[image, model_a, model_b, block_c, row_c, col_c],
                         outputs=[picker_a, *api_sides[0], *api_sides[1], compare_summary], api_name="compare",
                         preprocess=False,
                         api_description="Two models side by side on one image and patch. block: 'first', 'middle', "
                         "'last' or a number (past a model's last block means its last). Returns A's patch picker, "
                         "then for A and B: top-5, the compare view of the model's first mechanism, attention; a "
                         "summary.")
    demo.posenc_handlers = h  # for tests and app.py: h.close() removes the download folder
    return demo
