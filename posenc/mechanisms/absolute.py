"""Absolute position embeddings added to the patch tokens once: learned (ViT, DeiT) and fixed 2D sin-cos (MAE)."""

from __future__ import annotations

from posenc import views
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View


def similarity_grid(seen: Seen, block: int, patch: Patch) -> View:
    """The ViT-paper similarity grid: one tile per patch, its embedding's cosine similarity to every other."""
    return views.absolute_views(seen, patch)[0]


def similarity_to_patch(seen: Seen, block: int, patch: Patch) -> View:
    """The clicked patch's embedding similarity to every patch, on the photo."""
    return views.absolute_views(seen, patch)[1]


def pca(seen: Seen, block: int, patch: Patch) -> View:
    """The embeddings' top three principal components as RGB, on the photo."""
    return views.absolute_views(seen, patch)[2]


_TENSORS = {"pos_embed": "Inspection.pos_embed: (1, P + h*w, C) as added at this input size (resampled)"}
_VIEWS = (
    ViewSpec("similarity_grid", "Similarity of position embeddings", similarity_grid),
    ViewSpec("similarity", "Similarity to the clicked patch", similarity_to_patch, compare=True),
    ViewSpec("pca", "PCA of the embeddings", pca),
)
_HELP = (
    "Tile (i, j) shows how similar the position embedding of patch (i, j) is to every patch's embedding (ViT paper, "
    "Fig. 7). Below: the clicked patch's similarity on the photo, and the embeddings' top three principal components "
    "as RGB. At another input size these are the embeddings as resampled for it."
)

MECHANISMS = (
    Mechanism("learned", "learned absolute embedding", "a learned absolute embedding added to the patch tokens.",
              "absolute", _HELP, _TENSORS, _VIEWS),
    Mechanism("sincos", "fixed 2D sin-cos embedding", "a fixed 2D sin-cos absolute embedding (MAE convention).",
              "absolute", _HELP, _TENSORS, _VIEWS),
)
