"""The app's state: the loaded-model cache, the Hub's reachability, the catalogue of listed models, and the
model fetched at start-up for first visits.

These are the only things the app shares between requests. :class:`Models` puts them together: every tab
loads a model through :meth:`Models.load`, which resolves what a user typed or picked to a public name
(:meth:`Catalog.resolve`), loads it once into the cache and, after a failed download, asks the Hub again.

Nothing here builds a page or talks to Gradio; the tabs (:mod:`posenc.app.explore`, :mod:`~posenc.app.compare`,
:mod:`~posenc.app.measure`) and the API (:mod:`posenc.app.api`) get a :class:`Models` passed in.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from posenc import mechanisms, views
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
            ModelEntry(Path(p).name, str(Path(p).resolve()), "", (), None, None, "")
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

    def choices(self, unavailable: Iterable[str] = (), notes: Mapping[str, str] | None = None
                ) -> list[tuple[str, str]]:
        """(label, public name) pairs for the dropdowns; models in ``unavailable`` are marked so, others by ``notes``
        (e.g. "ready", see :func:`ready_notes`)."""
        unavailable = set(unavailable)
        return [(self.label(item, item.key in unavailable, (notes or {}).get(item.key, "")), item.key)
                for item in self.listed]

    @staticmethod
    def label(item: Listed, unavailable: bool = False, note: str = "") -> str:
        """"cifar10-rope · 2D axial rotary embedding (RoPE) · 0.8M · CIFAR-10 71.3% · bundled": the mechanisms by
        their titles."""
        entry = item.entry
        parts = [entry.name]
        if entry.mechanisms:
            parts.append(mechanisms.describe(entry.mechanisms))
        if entry.num_params:
            parts.append(f"{entry.num_params / 1e6:.1f}M")
        if entry.accuracy is not None:
            parts.append(f"{entry.dataset} {entry.accuracy:.1f}%")
        parts.append(f"{item.kind}: unavailable offline" if unavailable else f"{item.kind}: {note}" if note else item.kind)
        return " \u00b7 ".join(parts)

    def default(self, prefer: str = DEFAULT_MODEL) -> str | None:
        """The model shown on a first visit: ``prefer`` among the bundled ones, else the first listed."""
        named = [item.key for item in self.listed if item.key == prefer and item.kind == "bundled"]
        first = named or [item.key for item in self.listed[:1]]
        return first[0] if first else None

    def second(self, first: str | None) -> str | None:
        """Another model for the Compare tab (one with a relative mechanism when there is one)."""
        ordered = sorted(self.listed, key=lambda item: not any(
            m.kind == "relative" for m in mechanisms.of(item.entry.mechanisms)))
        return next((item.key for item in ordered if item.key != first), first)

    def uncached_hub(self) -> list[str]:
        """Listed Hub models with no ``config.json`` in the local Hub cache (they cannot load offline)."""
        missing = []
        for item in self.listed:
            if item.kind == "Hub" and not isinstance(try_to_load_from_cache(item.key, "config.json"), str):
                missing.append(item.key)
        return missing




# --------------------------------------------------------------------------------------------------- first model
#
# On a server that reaches the Hugging Face Hub (a Space), the app fetches FIRST_MODEL (DeiT-Tiny, 22 MB) in a
# background thread as it starts, so no page waits for it. Until it is ready (and always when the Hub cannot be
# reached, or the fetch failed) a first visit shows the bundled default model; once it is ready, first visits show
# it. The model list says which Hub models are ready on this server and which one is downloading.
# POSENC_FIRST_MODEL chooses the model (a Hub repo id, or any name the app accepts); "off" (or "none", "0",
# "false", empty) turns the fetch off.

FIRST_MODEL = "timm/deit_tiny_patch16_224.fb_in1k"
"""The model first visits show once it is ready, unless ``POSENC_FIRST_MODEL`` says otherwise."""

ENV_VAR = "POSENC_FIRST_MODEL"
OFF_VALUES = ("", "off", "none", "0", "false", "no")
PROBE_WAIT_S = 30.0
"""How long the fetch waits for the start-up Hub probe before giving up on the Hub."""


def first_model_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The model to fetch at start-up: ``POSENC_FIRST_MODEL``, :data:`FIRST_MODEL` when unset, None when off."""
    value = environ.get(ENV_VAR)
    if value is None:
        return FIRST_MODEL
    value = value.strip()
    return None if value.lower() in OFF_VALUES else value


class FirstModel:
    """Fetches one model in a background thread, once the Hub is known to be reachable.

    ``state`` is one of:

    * ``"waiting"``: started, waiting for the Hub probe;
    * ``"downloading"``: the Hub answered and the fetch runs;
    * ``"ready"``: fetched: first visits show it;
    * ``"offline"``: the Hub cannot be reached: nothing is fetched;
    * ``"failed"``: the fetch raised (logged); first visits stay on the bundled model.

    Args:
        name: the model to fetch (its public name, e.g. a Hub repo id).
        fetch: name -> anything; downloads and loads the model (e.g. into the app's model cache).
        online: wait seconds -> whether the Hub is reachable (None when still unknown).
        probe_wait: seconds to wait for ``online`` to know.
    """

    def __init__(self, name: str, *, fetch: Callable[[str], Any], online: Callable[[float], bool | None],
                 probe_wait: float = PROBE_WAIT_S) -> None:
        self.name = name
        self._fetch = fetch
        self._online = online
        self._probe_wait = probe_wait
        self._state = "waiting"
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        """See the class docstring."""
        with self._lock:
            return self._state

    def start(self) -> None:
        """Start the background fetch (once); returns at once."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="posenc-first-model", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the fetch has finished one way or another; whether it has."""
        return self._done.wait(timeout)

    def pick(self, fallback: str | None) -> str | None:
        """The model a first visit shows now: this one when ready, else ``fallback``."""
        return self.name if self.state == "ready" else fallback

    def _set(self, state: str) -> None:
        with self._lock:
            self._state = state

    def _run(self) -> None:
        try:
            if not self._online(self._probe_wait):
                self._set("offline")
                logger.info("first model %s: the Hub cannot be reached, first visits show the bundled model", self.name)
                return
            self._set("downloading")
            logger.info("first model %s: fetching in the background", self.name)
            self._fetch(self.name)
            self._set("ready")
            logger.info("first model %s: ready, first visits show it", self.name)
        except Exception:  # a failed fetch must never take the app down
            self._set("failed")
            logger.exception("first model %s: the fetch failed, first visits stay on the bundled model", self.name)
        finally:
            self._done.set()


def ready_notes(hub_models: Iterable[str], uncached: Collection[str], first: FirstModel | None) -> dict[str, str]:
    """What the model list adds after "Hub" for each Hub model: "ready" or "downloading" (nothing otherwise).

    Args:
        hub_models: the listed Hub models' public names.
        uncached: those with nothing stored on this server.
        first: the start-up fetch, if any: its model is "downloading" while the fetch runs.
    """
    notes = {}
    for key in hub_models:
        if first is not None and key == first.name and first.state == "downloading":
            notes[key] = "downloading"  # its config.json may be stored already, its weights not yet
        elif key not in uncached:
            notes[key] = "ready"
    return notes


# --------------------------------------------------------------------------------------------------- models


class Models:
    """What every tab loads models through: the catalogue, the model cache and the Hub status together.

    Args:
        cache: the loaded-model cache, keyed by public name.
        catalog: the listed models and which sources are allowed.
        hub: the Hub reachability status.
        first_model: the model fetched at start-up for first visits (None: first visits show the bundled default).
    """

    def __init__(self, *, cache: ModelCache, catalog: Catalog, hub: HubStatus,
                 first_model: FirstModel | None = None) -> None:
        self.cache = cache
        self.catalog = catalog
        self.hub = hub
        self.first_model = first_model

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
