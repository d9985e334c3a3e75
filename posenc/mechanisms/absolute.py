"""Absolute position embeddings added to the patch tokens once: learned (ViT, DeiT) and fixed 2D sin-cos (MAE).

Each view computes only the tensors it draws, from the embedding as resampled for this input size.
"""

from __future__ import annotations

import torch

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec, describe
from posenc.views import OVERLAY_SIDE, Patch, Seen, View, ViewUnavailable


def patch_embedding(seen: Seen) -> torch.Tensor:
    """(h*w, C) patch rows of the absolute embedding as added at this input size, or ViewUnavailable."""
    insp = seen.inspection
    if insp.pos_embed is None:
        raise ViewUnavailable(f"{seen.name} uses {describe(seen.loaded.model.mechanisms)}, so it has no absolute "
                              "position embedding; pick a model with a learned or sin-cos one (ViT, DeiT, EVA-02)")
    return insp.pos_embed[0, insp.pos_embed_prefix :].detach().float().cpu()  # h*w, C


def similarity_grid(seen: Seen, block: int, patch: Patch) -> View:
    """The ViT-paper similarity grid: one tile per patch, its embedding's cosine similarity to every other."""
    pos = patch_embedding(seen)  # h*w, C
    grid = seen.grid
    with torch.inference_mode():
        sims = viz.cosine_similarity_matrix(pos, grid)  # N, N
        tiles = viz.pos_embed_similarity_grid(pos, grid, similarity=sims,
                                              title=f"{seen.name}: position embedding similarity "
                                                    f"({grid[0]}x{grid[1]} grid)")  # fmt: skip
    return View(tiles.image, {"pos_embed": pos.numpy(), "pos_similarity": sims})


def similarity_to_patch(seen: Seen, block: int, patch: Patch) -> View:
    """The clicked patch's embedding similarity to every patch, on the photo."""
    pos = patch_embedding(seen)  # h*w, C
    with torch.inference_mode():
        sim = viz.similarity_map(pos, seen.grid, patch)  # gh, gw
    img = viz.overlay(seen.photo, sim, vmax=1.0, mark=patch, title=f"Similarity to patch {patch}",
                      colorbar_label="cosine similarity of position embeddings", min_side=OVERLAY_SIDE)
    return View(img, {"pos_similarity_to_patch": sim})


def pca(seen: Seen, block: int, patch: Patch) -> View:
    """The embeddings' top three principal components as RGB, on the photo."""
    pos = patch_embedding(seen)  # h*w, C
    with torch.inference_mode():
        rgb = viz.pos_embed_pca_rgb(pos, seen.grid)  # gh, gw, 3
    img = viz.overlay(seen.photo, rgb, alpha=0.75, title="Embedding PCA as RGB", min_side=OVERLAY_SIDE)
    return View(img, {"pos_pca_rgb": rgb})


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
