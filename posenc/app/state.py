"""The app's state: the loaded-model cache, the Hub's reachability and the catalogue of listed models.

These are the only things the app shares between requests. :class:`Models` puts them together: every tab
loads a model through :meth:`Models.load`, which resolves what a user typed or picked to a public name
(:meth:`Catalog.resolve`), loads it once into the cache and, after a failed download, asks the Hub again.

Nothing here builds a page or talks to Gradio; the tabs (:mod:`posenc.app.explore`, :mod:`~posenc.app.compare`,
:mod:`~posenc.app.measure`) and the API (:mod:`posenc.app.api`) get a :class:`Models` passed in.
"""

from __future__ import annotations

import functools
import logging
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from posenc import views
from posenc.hub import HubLoadError, LoadedModel, is_safe_source
from posenc.registry import ModelEntry, bundled_models

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "cifar10-learned"
#: :class:`~posenc.hub.HubLoadError` reasons that may mean the Hub itself is down (probe it again).
HUB_FAILURES = ("offline", "network")


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




# --------------------------------------------------------------------------------------------------- models


class Models:
    """What every tab loads models through: the catalogue, the model cache and the Hub status together.

    Args:
        cache: the loaded-model cache, keyed by public name.
        catalog: the listed models and which sources are allowed.
        hub: the Hub reachability status.
    """

    def __init__(self, *, cache: ModelCache, catalog: Catalog, hub: HubStatus) -> None:
        self.cache = cache
        self.catalog = catalog
        self.hub = hub

    def load(self, model: str | None, progress: Callable[..., object]) -> tuple[str, LoadedModel]:
        """The public name and the loaded model (its ``source`` is the public name); refused names raise.

        Raises:
            ValueError: a name this app may not load.
            HubLoadError: the model cannot be loaded; the message names the public name, never a server path.
        """
        key, source = self.catalog.resolve(model)
        try:
            loaded = self.cache.get(key, on_load=lambda k: progress(0.05, desc=f"Loading {k}"), source=source)
        except HubLoadError as error:
            if error.reason in HUB_FAILURES:
                self.hub.recheck()  # downloads stop only while the Hub itself does not answer
            if source != key:  # say the public name, never the server path
                raise HubLoadError(str(error).replace(source, key), source=key, reason=error.reason) from None
            raise
        if loaded.source != key:
            loaded = replace(loaded, source=key)
        return key, loaded

    def see(self, path: str, model: str | None, size: object, progress: Callable[..., object]) -> views.Seen:
        """Load ``model`` and inspect the image at ``path`` at ``size`` ("HxW"; None: the native size)."""
        key, loaded = self.load(model, progress)
        input_size = views.parse_size(size, loaded)
        progress(0.3, desc=f"Running {key} at {views.format_size(input_size)}")
        return views.inspect_image(loaded, path, input_size, name=key)
