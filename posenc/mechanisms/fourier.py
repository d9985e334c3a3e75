"""XCiT's Fourier position embedding: fixed sin/cos features of each patch's normalised (y, x) coordinates through a
learned 1x1 conv, added to the patch tokens once.

The embedding as added is an absolute embedding without prefix rows (``Inspection.pos_embed``), so it gets the
learned embedding's views (the same functions, :mod:`posenc.mechanisms.absolute`); one more shows the fixed features
before the learned projection, which tells what the projection made of them.
"""

from __future__ import annotations

import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.mechanisms.absolute import pca, similarity_grid, similarity_to_patch
from posenc.views import OVERLAY_SIDE, Patch, Seen, View, ViewUnavailable


def feature_similarity(seen: Seen, block: int, patch: Patch) -> View:
    """The clicked patch's raw Fourier features (before the 1x1 conv): cosine similarity to every patch's, on the photo."""
    feats = seen.inspection.position.get("fourier_features")
    if feats is None:
        raise ViewUnavailable(f"{seen.name} added no Fourier features in this inspection (position left out?)")
    feats = feats.detach().float().cpu()  # h*w, 2*fd
    with torch.inference_mode():
        sim = viz.similarity_map(feats, seen.grid, patch)  # gh, gw
    img = viz.overlay(seen.photo, sim, vmax=1.0, mark=patch,
                      title=f"Fourier features of patch {patch}, before the 1x1 conv",
                      colorbar_label="cosine similarity of the fixed features", min_side=OVERLAY_SIDE)  # fmt: skip
    return View(img, {"fourier_features": feats.numpy(), "fourier_feature_similarity": sim})


MECHANISMS = (
    Mechanism(
        "fourier",
        "Fourier position embedding (XCiT)",
        "sin/cos features of each patch's normalised coordinates through a learned 1x1 conv, added to the patch tokens.",
        "absolute",
        "XCiT adds one position term, after its convolutional patch embedding: each patch's row and column, scaled "
        "to (0, 2\u03c0] over the grid, go through 16 sin/cos frequency pairs each, and a learned 1x1 conv maps those "
        "64 fixed features to the token width. Tile (i, j) of the grid shows how similar the embedding of patch (i, j) "
        "is to every patch's (ViT paper, Fig. 7). Below: the clicked patch's similarity on the photo, the top three "
        "principal components as RGB, and the similarity of the fixed features before the learned conv. The "
        "coordinates are normalised, so at another input size the grid is recomputed, not resampled: the corners "
        "keep their phase. 'Without position' leaves the whole term out.",
        {
            "pos_embed": "Inspection.pos_embed: (1, h*w, C) the token_projection output for this grid, as added",
            "fourier_features": "Inspection.position: (h*w, 64) the fixed sin/cos features, y's 32 first",
        },
        (
            ViewSpec("similarity_grid", "Similarity of Fourier embeddings", similarity_grid),
            ViewSpec("similarity", "Similarity to the clicked patch", similarity_to_patch, compare=True),
            ViewSpec("pca", "PCA of the embeddings", pca),
            ViewSpec("feature_similarity", "Fixed features before the 1x1 conv", feature_similarity),
        ),
    ),
)
