"""What every tab of the app shares: one user-error mapping, one request-file store, one block parser,
one summary line, the mechanism views of a request, and the output components and their wiring.

* **Errors.** :func:`user_message` is the one place that turns an exception into words for the user;
  :func:`user_errors` raises them as ``gr.Error`` (the API endpoints), and the page events show them in
  place (Explore's status line, Compare's, each Measure plot's note).
* **Files.** :class:`RequestFiles` is the one folder of downloadable files of an app run: one sub-folder per
  request, at most :data:`EXPORT_MAX_FOLDERS` of them, none older than :data:`EXPORT_MAX_AGE_S`, removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from posenc import mechanisms, views, viz
from posenc.hub import HubLoadError
from posenc.mechanisms import MECHANISMS, Mechanism, ViewSpec
from posenc.preprocess import ImageError

logger = logging.getLogger(__name__)

EXPORT_MAX_AGE_S = 15 * 60  # request folders older than this are deleted (Gradio keeps its own copy)
EXPORT_MAX_FOLDERS = 64  # and at most this many are kept, newest first
#: The errors a user can cause (their message is shown as it is); anything else is logged as a bug.
USER_ERRORS = (ImageError, HubLoadError, ValueError, MemoryError)
#: Tab titles of the mechanism kinds, in :data:`posenc.mechanisms.KINDS` order.
KIND_TITLES = {"absolute": "Absolute position", "relative": "Relative position", "rotary": "Rotary",
               "convolutional": "Convolutional"}
OUT_OF_MEMORY = "The server ran out of memory for this request; try a smaller input size or image."


# --------------------------------------------------------------------------------------------------- errors


def user_message(error: BaseException) -> str:
    """What to tell the user about an error, in the app's words (one sentence or two, no trailing space).

    Errors the user can cause (:data:`USER_ERRORS`) say what was wrong; any other error is logged with its
    traceback and named, with the advice to try again.
    """
    if isinstance(error, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(error, HubLoadError) and error.reason == "offline":
        return (f"{error.source} is not stored on this server and the Hugging Face Hub cannot be reached from it, "
                "so it cannot be loaded now; pick a model this server stores (a bundled one or a local folder), or try "
                "again later")
    if isinstance(error, USER_ERRORS):
        return " ".join(str(error).split())
    logger.error("unexpected error", exc_info=error)
    return (f"Something went wrong ({type(error).__name__}: {error}). The app keeps running: try again, "
            "or another image or model.")


def sentence(message: str) -> str:
    """A message on one line, starting with a capital, ending with a full stop."""
    message = " ".join(message.split())
    if not message:
        return message
    if message.split()[0].isalpha():  # a word, not a repo id or a folder the user typed ("nonsense/model")
        message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error of ``fn`` into ``gr.Error`` with :func:`user_message` (an API endpoint's answer)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise gr.Error(user_message(error), print_exception=False) from error

    return wrapper


# --------------------------------------------------------------------------------------------------- request files


@dataclass(frozen=True)
class Downloads:
    """Where one request writes its downloadable files, each named after the view it holds."""

    folder: Path
    stem: str

    def png(self, what: str, image: Image.Image | None) -> str | None:
        """Save a view as ``<stem>_<what>.png``; None passes through."""
        if image is None:
            return None
        return str(viz.save_png(image, self.folder / f"{self.stem}_{what}.png"))

    def npz(self, seen: views.Seen, patch: views.Patch, block: int, parts: Iterable[views.View | None]) -> str:
        """The raw tensors behind the views as ``<stem>.npz``."""
        return str(views.save_npz(self.folder / f"{self.stem}.npz", seen, patch, block, parts))


class RequestFiles:
    """The app's one folder of downloadable files: a sub-folder per request, bounded, removed at exit.

    The folder is made on the first request. Each new request deletes the folders older than
    :data:`EXPORT_MAX_AGE_S` and all but the :data:`EXPORT_MAX_FOLDERS` newest.
    """

    def __init__(self, prefix: str = "posenc-app-") -> None:
        self._prefix = prefix
        self._root: Path | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> Path | None:
        """The folder of this app run's files; None before the first request or after :meth:`close`."""
        return self._root

    def folder(self) -> Path:
        """A fresh, empty folder for one request's files."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix=self._prefix))
                atexit.register(shutil.rmtree, self._root, ignore_errors=True)
            folders = sorted(self._root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            cutoff = time.time() - EXPORT_MAX_AGE_S
            for n, old in enumerate(folders):
                if n >= EXPORT_MAX_FOLDERS - 1 or old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            folder = self._root / uuid.uuid4().hex
            folder.mkdir()
        return folder

    def downloads(self, seen: views.Seen, patch: views.Patch, block: int) -> Downloads:
        """A fresh folder for one request's views, its files named after the model, size, patch and block."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in seen.name)[-60:]
        where = f"{views.format_size(seen.size)}_patch{patch[0]}-{patch[1]}_block{block}"
        return Downloads(self.folder(), f"posenc_{safe}_{where}")

    def close(self) -> None:
        """Delete the folder now (it is also deleted at interpreter exit)."""
        with self._lock:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None


# --------------------------------------------------------------------------------------------------- requests


def image_path(image: Any) -> str:
    """The local path of an image input (a FileData dict when the event does not preprocess, or a path)."""
    path = image.get("path") if isinstance(image, dict) else image
    if not path:
        raise ValueError("Upload an image first (PNG or JPEG), or pick one of the examples.")
    return str(path)


def block_number(block: Any, depth: int) -> int:
    """The block a user asked for, of ``depth`` blocks: "first", "middle", "last" or a number.

    None or an empty text is block 0; a number past the last block means the last, below 0 means 0.

    Raises:
        ValueError: the block is neither a position nor a whole number.
    """
    if block is None or (isinstance(block, str) and not block.strip()):
        return 0
    positions = {"first": 0, "middle": (depth - 1) // 2, "last": depth - 1}
    if isinstance(block, str) and block.strip().lower() in positions:
        return positions[block.strip().lower()]
    try:
        number = float(block)
    except (TypeError, ValueError):
        raise ValueError(f"block {block!r} is not 'first', 'middle', 'last' or a block number") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ValueError(f"block {block} is not a whole number; blocks are numbered 0..{depth - 1}")
    return min(max(int(number), 0), depth - 1)


def summary_line(seen: views.Seen, patch: views.Patch, block: int) -> str:
    """Markdown: the model, its input size and grid, the patch and the block of a request."""
    return (f"**{seen.name}** at {views.format_size(seen.size)} ({seen.grid[0]}x{seen.grid[1]} patches) · "
            f"patch **{patch}** · {views.describe_block(seen, block)}")


def predictions(seen: views.Seen) -> dict[str, float] | str:
    """The top-5 as {label: probability}, or for a headless model (it returns features) the words saying so."""
    if seen.loaded.model.headless:
        return views.NO_CLASSIFIER
    return views.predictions(seen)


def pick_patch(grid: Any, picker: str | None, evt: gr.SelectData) -> tuple[int, int]:
    """The patch under a click on a patch picker (``grid``: the grid, or the Explore tab's ``shown``).

    Raises:
        gr.Error: nothing to click on yet.
    """
    if isinstance(grid, dict):
        grid = grid.get("grid")
    if not grid or not picker:
        raise gr.Error("Wait for the model's input to appear, then click a patch on it.", print_exception=False)
    with Image.open(picker) as img:
        size = img.size  # w, h
    return viz.patch_at(evt.index, size, tuple(grid))


# --------------------------------------------------------------------------------------------------- mechanism views


def view_key(mechanism: Mechanism, spec: ViewSpec) -> str:
    """The ``/view`` endpoint's name of a view: "learned/similarity_grid"."""
    return f"{mechanism.name}/{spec.key}"


def views_of(kind: str | None = None) -> list[tuple[Mechanism, ViewSpec]]:
    """Every (mechanism, view) pair of the registry, of one kind or all, in display order."""
    return [(m, spec) for m in MECHANISMS.values() if kind in (None, m.kind) for spec in m.views]


def no_mechanism_of(seen: views.Seen, kind: str) -> str:
    """The note for a model without a mechanism of ``kind``: it names the model's mechanisms by their titles."""
    return (f"{seen.name} has no {KIND_TITLES[kind].lower()} mechanism; its mechanisms: "
            f"{mechanisms.describe(seen.loaded.model.mechanisms)}.")


@dataclass(frozen=True)
class Drawn:
    """The mechanism views of one request.

    Attributes:
        images: view key -> picture, for every view of the registry (None where the model lacks the
            mechanism or the view does not apply).
        notes: kind -> the lines shown in place of the kind's pictures (a view that does not apply, a kind
            the model has no mechanism of); kinds without a note are left out.
        drawn: the drawn views, for the ``.npz``.
    """

    images: dict[str, Image.Image | None]
    notes: dict[str, list[str]]
    drawn: list[views.View]


def draw_mechanisms(seen: views.Seen, block: int, patch: views.Patch) -> Drawn:
    """Every view of the model's mechanisms; a view that cannot be drawn becomes a note of its kind."""
    used = {m.name for m in mechanisms.of(seen.loaded.model.mechanisms)}
    images: dict[str, Image.Image | None] = {}
    notes: dict[str, list[str]] = {}
    drawn: list[views.View] = []
    for m, spec in views_of():
        image = None
        if m.name in used:
            try:
                view = spec.draw(seen, block, patch)
                drawn.append(view)
                image = view.image
            except ValueError as error:
                notes.setdefault(m.kind, []).append(f"{spec.label}: {error}")
        images[view_key(m, spec)] = image
    for kind in mechanisms.KINDS:
        if any(m.kind == kind for m in MECHANISMS.values()) and not any(MECHANISMS[n].kind == kind for n in used):
            notes[kind] = [no_mechanism_of(seen, kind)]
    return Drawn(images, notes, drawn)


# --------------------------------------------------------------------------------------------------- components


def view_image(label: str, **kwargs: Any) -> gr.Image:
    """An output image for a view: lossless PNG, download and full-screen buttons above the picture's own title."""
    classes = ["posenc-view", *kwargs.pop("elem_classes", [])]
    return gr.Image(label=label, show_label=False, format="png", interactive=False, buttons=["download", "fullscreen"],
                    elem_classes=classes, **kwargs)


class Outputs:
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
        """``fn`` returning the tuple of these outputs instead of a dict."""

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            return self.tuple(fn(*args, **kwargs))

        return run


def choices_of(model: Any) -> Sequence[Any]:
    """The choices of a dropdown (for a second dropdown listing the same models)."""
    return getattr(model, "choices", None) or []
