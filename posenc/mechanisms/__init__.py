"""Position mechanisms: each is declared once, here, with its tensors and the views that apply to it.

A model is a set of position mechanisms (``model.mechanisms``, a tuple of names): EVA-02 has a learned
absolute embedding *and* RoPE, Swin a windowed relative table, a model with no mechanism is
permutation-equivariant. Each mechanism is one module of this package that defines ``MECHANISM``, a
:class:`Mechanism` giving

* its ``name`` (what ``model.mechanisms`` says), a human ``title`` and a one-line ``description``;
* its ``kind``: "absolute", "relative" or "rotary" (or "convolutional"), which groups its views in the app;
* the ``tensors`` it puts into an inspection: the key in ``Inspection.position`` / ``BlockTrace.position``
  (or the named :class:`~posenc.models.Inspection` field) with its shape;
* its ``views``: functions ``(seen, block, patch) -> View`` that draw those tensors.

Adding a mechanism means adding a module here and its name to :data:`MODULES`; views, the app, the
registry and the converters loop over :data:`MECHANISMS` and need no new branch.

Layering: this package sits beside :mod:`posenc.views` (it draws through :mod:`posenc.viz`); models name
their mechanisms by string and never import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from posenc.views import Patch, Seen, View, ViewUnavailable

#: Mechanism modules of this package, in the order their views are shown.
MODULES = ("absolute", "naflex", "fourier", "class_attention", "rel_table", "cpb", "decomposed", "offset_bias",
           "rope_axial", "rope_mixed", "gpsa", "conv_pos")
#: The groups views are shown in, in order; a mechanism's ``kind`` is one of these.
KINDS = ("absolute", "relative", "rotary", "convolutional")
#: What a mechanism of each kind is, in words, for messages.
KIND_WORDS = {
    "absolute": "absolute position embedding",
    "relative": "relative position bias",
    "rotary": "rotary position embedding",
    "convolutional": "convolutional position encoding",
}


@dataclass(frozen=True)
class ViewSpec:
    """One view of a mechanism.

    Attributes:
        key: short name, used for the PNG file, the API and the ``.npz`` ("similarity_grid").
        label: the picture's label in the app.
        draw: ``(seen, block, patch) -> View``; raises ``ValueError`` for input it cannot draw.
        per_block: whether the picture depends on the chosen block.
        compare: the mechanism's main per-patch view, shown side by side in the Compare tab.
    """

    key: str
    label: str
    draw: Callable[[Seen, int, Patch], View]
    per_block: bool = False
    compare: bool = False


@dataclass(frozen=True)
class Mechanism:
    """A position mechanism: its name, what it puts into an inspection, and the views that apply to it.

    Attributes:
        name: as listed by ``model.mechanisms`` ("learned", "rel_table", "rope_axial", ...).
        title: human name ("learned absolute embedding").
        description: one sentence for model cards and the app's info card.
        kind: one of :data:`KINDS`.
        help: what the views show, for the app.
        tensors: inspection key -> shape and meaning, e.g. ``{"pos_embed": "(1, P + h*w, C) as added"}``.
        views: the views, in display order.
    """

    name: str
    title: str
    description: str
    kind: str
    help: str
    tensors: dict[str, str]
    views: tuple[ViewSpec, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mechanism {self.name!r}: kind {self.kind!r} is not one of {KINDS}")


def _collect() -> dict[str, Mechanism]:
    found = {}
    for module in MODULES:
        declared = importlib.import_module(f"{__name__}.{module}").MECHANISMS
        for mechanism in declared:
            if mechanism.name in found:
                raise ValueError(f"mechanism {mechanism.name!r} is declared twice")
            found[mechanism.name] = mechanism
    return found




def get(name: str) -> Mechanism:
    """The mechanism called ``name``; a ``KeyError`` names the known ones."""
    try:
        return MECHANISMS[name]
    except KeyError:
        raise KeyError(f"unknown position mechanism {name!r}; known: {', '.join(MECHANISMS)}") from None


def of(names: tuple[str, ...]) -> tuple[Mechanism, ...]:
    """The mechanisms a model lists (``model.mechanisms``), in display order."""
    for name in names:
        get(name)  # unknown names raise
    return tuple(m for m in MECHANISMS.values() if m.name in names)


def describe(names: tuple[str, ...]) -> str:
    """"learned absolute embedding + 2D axial RoPE", or "no position encoding"."""
    return " + ".join(m.title for m in of(names)) or "no position encoding"


def card_position(names: tuple[str, ...]) -> str:
    """A model card's sentence on position: the title and description of every mechanism in ``names``."""
    return " ".join(f"{m.title}: {m.description}" for m in of(names)) or "none; the encoder is permutation-equivariant."


@dataclass(frozen=True)
class KindView:
    """One drawn view of :func:`kind_views`.

    Attributes:
        key: ``"mechanism/view"``, as ``/view`` names it ("cpb/cpb_table").
        label: the view's label in the app.
        view: the picture and its arrays, or None where the view does not apply to this block.
        note: why it does not apply (the :class:`~posenc.views.ViewUnavailable` message), else "".
    """

    key: str
    label: str
    view: View | None
    note: str = ""


def kind_refusal(name: str, names: tuple[str, ...], kind: str) -> str:
    """Why a model has no views of a kind, naming its mechanisms by their titles."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return f"{name} uses {describe(names)}, so it has no {KIND_WORDS[kind]}"


def kind_views(seen: Seen, kind: str, block: int, patch: Patch) -> tuple[KindView, ...]:
    """Every view of the model's mechanisms of one kind ("absolute", "relative", "rotary"), for one block and patch.

    Each view is drawn once; a view that does not apply to the chosen block (a GPSA view of a plain block) gives a
    :class:`KindView` with its note instead of a picture.

    Raises:
        ViewUnavailable: the model has no mechanism of that kind (:func:`kind_refusal` says which it has).
    """
    names = seen.loaded.model.mechanisms
    used = [m for m in of(names) if m.kind == kind]
    if not used:
        raise ViewUnavailable(kind_refusal(seen.name, names, kind))
    drawn = []
    for mechanism in used:
        for spec in mechanism.views:
            key = f"{mechanism.name}/{spec.key}"
            try:
                drawn.append(KindView(key, spec.label, spec.draw(seen, block, patch)))
            except ViewUnavailable as error:
                drawn.append(KindView(key, spec.label, None, str(error)))
    return tuple(drawn)


#: Every mechanism by name, in display order.
MECHANISMS: dict[str, Mechanism] = _collect()
