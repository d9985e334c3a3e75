"""The model a first visit shows: a real Hub model, fetched in the background at start-up.

On a server that reaches the Hugging Face Hub (a Space), the app fetches :data:`FIRST_MODEL` (DeiT-Tiny,
22 MB) in a background thread as it starts, so no page waits for it. Until it is ready (and always when the
Hub cannot be reached, or the fetch failed) a first visit shows the bundled default model; once it is ready,
first visits show it. The model list says which Hub models are ready on this server and which one is
downloading.

``POSENC_FIRST_MODEL`` chooses the model (a Hub repo id, or any name the app accepts); ``off`` (or ``none``,
``0``, ``false``, empty) turns the fetch off, and first visits then show the bundled default.

The module holds no state: :class:`FirstModel` is created by the app and passed to its handlers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

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
        first: the start-up fetch, if any: its model is "downloading" while it runs, and "ready" only once it is done.
    """
    notes = {}
    for key in hub_models:
        if first is not None and key == first.name and first.state in ("waiting", "downloading"):
            notes[key] = "downloading" if first.state == "downloading" else ""
        elif key not in uncached:
            notes[key] = "ready"
    return {key: note for key, note in notes.items() if note}
