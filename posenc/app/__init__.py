"""The posenc Gradio app: :func:`create_demo` builds the ``gr.Blocks``; ``app.py`` launches it.

The app gets its dependencies as arguments (where the bundled checkpoints are, the curated Hub models,
the model cache size, a loader), loads models lazily into a bounded thread-safe LRU cache (the only
state shared between requests) and draws every view with :mod:`posenc.views` and the views declared in
:mod:`posenc.mechanisms`.

Modules, each importing only those above it:

* :mod:`~posenc.app.state`: the model cache, the Hub status, the catalogue of listed models, the model
  fetched at start-up for first visits (:class:`~posenc.app.state.FirstModel`), and
  :class:`~posenc.app.state.Models`, through which every tab loads a model.
* :mod:`~posenc.app.common`: what the tabs share: one user-error mapping, one request-file store, one block
  parser, one summary line, the mechanism views of a request, output components.
* :mod:`~posenc.app.explore`, :mod:`~posenc.app.compare`, :mod:`~posenc.app.measure`: one per tab, each
  with its handlers and its layout.
* :mod:`~posenc.app.api`: the named endpoints of the Explore views.
* :mod:`~posenc.app.demo`: :func:`create_demo`, which puts them together.

* **Public names.** Every model has one public name, used in the page, the API, the ``.npz`` and the CLI:
  a bundled or extra local model its folder name (``cifar10-rope``), a Hub model its repo id. Server
  paths never reach a page or an API answer; :meth:`Catalog.resolve` turns any accepted spelling into
  the public name and the place to load from.
* **Mechanism views.** The view tabs are built from :data:`posenc.mechanisms.MECHANISMS`: one tab per
  kind, one group per mechanism with its help and its ``ViewSpec`` pictures, shown only for the
  mechanisms the model lists. Adding a mechanism module adds its pictures and its ``/view`` choices.
"""

from posenc.app.common import EXPORT_MAX_AGE_S, EXPORT_MAX_FOLDERS, KIND_TITLES
from posenc.app.demo import MAX_FILE_SIZE, QUEUE_OPTIONS, Handlers, create_demo, example_images, launch_options
from posenc.app.state import (
    FIRST_MODEL,
    Catalog,
    FirstModel,
    HubStatus,
    ModelCache,
    Models,
    first_model_from_env,
    probe_hub,
)

__all__ = [
    "FIRST_MODEL",
    "EXPORT_MAX_AGE_S",
    "EXPORT_MAX_FOLDERS",
    "KIND_TITLES",
    "MAX_FILE_SIZE",
    "QUEUE_OPTIONS",
    "Catalog",
    "FirstModel",
    "Handlers",
    "HubStatus",
    "ModelCache",
    "Models",
    "create_demo",
    "example_images",
    "first_model_from_env",
    "launch_options",
    "probe_hub",
]
