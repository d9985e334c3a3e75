"""2D axial rotary embedding (RoPE): queries and keys rotated by angles of the row and the column."""

from __future__ import annotations

from posenc import viz
from posenc.mechanisms import Mechanism, ViewSpec, describe
from posenc.views import OVERLAY_SIDE, Patch, Seen, View, ViewUnavailable


def phase_similarity(seen: Seen, block: int, patch: Patch) -> View:
    """The mean cosine of the angle difference between the clicked patch and every other (angles at this grid).

    The colour scale is fitted to the map's own values: the mean cosine rarely falls far below zero, and a fixed
    -1..1 scale would hide how it falls off.
    """
    if seen.inspection.rope_angles is None:  # no RoPE, or mixed RoPE (angles per block and head, its own views)
        raise ViewUnavailable(f"{seen.name} uses {describe(seen.loaded.model.mechanisms)}, so it has no axial rotary "
                              "embedding; pick a RoPE model (mixed RoPE has its own per-head views)")
    angles = seen.inspection.rope_angles.detach().float().cpu()  # h*w, head_dim/2
    sim = viz.rope_phase_similarity(angles, seen.grid, patch)  # gh, gw
    img = viz.overlay(seen.photo, sim, cmap="viridis", mark=patch,
                      title=f"RoPE similarity to {patch}", colorbar_label="mean cos(angle difference)",
                      min_side=OVERLAY_SIDE)
    return View(img, {"rope_angles": angles.numpy(), "rope_similarity": sim})


MECHANISMS = (
    Mechanism(
        "rope_axial",
        "2D axial rotary embedding (RoPE)",
        "2D axial rotary position embedding applied to queries and keys.",
        "rotary",
        "With RoPE, a query-key score depends on the difference of their rotation angles. The map shows the mean "
        "cosine of that difference between the clicked patch and every other patch at this grid, on a colour scale "
        "fitted to the map. RoPE-ViT and EVA-02 count positions in patches (EVA-02 rescales them to its 16x16 "
        "pre-training grid); DINOv3 places patch centres in [-1, 1], so its angles follow the image, not the grid.",
        {"rope_angles": "Inspection.rope_angles: (h*w, head_dim/2) angles at this grid"},
        (ViewSpec("rope", "RoPE phase similarity", phase_similarity, compare=True),),
    ),
)
