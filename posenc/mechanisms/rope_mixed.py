"""Mixed RoPE (RoPE-ViT): learned 2D frequencies per block and head, so each head rotates along its own directions."""

from __future__ import annotations

import numpy as np

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View, ViewUnavailable


def _freqs(seen: Seen, block: int) -> np.ndarray:
    """(heads, head_dim/2, 2) frequency vectors (f_x, f_y) of one block."""
    freqs = seen.inspection.position.get("rope_freqs")
    if freqs is None:
        raise ViewUnavailable(f"{seen.name} has no learned RoPE frequencies; pick a mixed-RoPE model (RoPE-ViT mixed)")
    return freqs[:, block].detach().float().permute(1, 2, 0).cpu().numpy()  # heads, hd/2, 2


def frequencies(seen: Seen, block: int, patch: Patch) -> View:
    """Every head's learned frequencies in the chosen block, as arrows in the 2D frequency plane."""
    f = _freqs(seen, block)
    sheet = viz.frequency_planes(f, title=f"{seen.name}: learned RoPE frequencies, block {block}")
    return View(sheet.image, {"rope_freqs_xy": f})


def phase_similarity_per_head(seen: Seen, block: int, patch: Patch) -> View:
    """Per head: the mean cosine of the angle difference between the clicked patch and every other, in this block."""
    angles = seen.inspection.blocks[block].position.get("rope_angles")
    if angles is None:
        raise ViewUnavailable(f"{seen.name} has no per-head RoPE angles; pick a mixed-RoPE model (RoPE-ViT mixed)")
    angles = angles.detach().float().cpu()  # heads, h*w, hd/2
    sims = np.stack([viz.rope_phase_similarity(a, seen.grid, patch) for a in angles])  # heads, gh, gw
    sheet = viz.head_map_overlays(seen.photo, sims, patch, title=f"{seen.name}: RoPE similarity to {patch}, "
                                  f"block {block}", colorbar_label="mean cos(angle difference)")
    return View(sheet.image, {"rope_angles": angles.numpy(), "rope_similarity": sims})


MECHANISMS = (
    Mechanism(
        "rope_mixed",
        "mixed 2D RoPE (learned frequencies)",
        "2D rotary position embedding with learned frequencies per block and head (RoPE-Mixed).",
        "rotary",
        "Each head of each block rotates its queries and keys with its own learned 2D frequencies, so a query-key "
        "score depends on their offset along directions the head chose. Top: the chosen block's frequencies per "
        "head, one arrow per rotated channel pair, pointing where the phase grows on the image (x right, y down). "
        "Below: per head, the mean cosine of the angle difference between the clicked patch and every other.",
        {
            "rope_freqs": "Inspection.position: (2, depth, heads, head_dim/2) learned frequencies, x then y",
            "rope_angles": "BlockTrace.position: (heads, h*w, head_dim/2) angles the block used at this grid",
        },
        (
            ViewSpec("rope_frequencies", "Learned frequencies per head", frequencies, per_block=True),
            ViewSpec("rope_head_similarity", "RoPE similarity per head", phase_similarity_per_head, per_block=True,
                     compare=True),
        ),
    ),
)
