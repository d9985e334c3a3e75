"""2D axial rotary embedding (RoPE): queries and keys rotated by angles of the row and the column."""

from __future__ import annotations

from posenc import views
from posenc.mechanisms import Mechanism, ViewSpec
from posenc.views import Patch, Seen, View


def phase_similarity(seen: Seen, block: int, patch: Patch) -> View:
    """The mean cosine of the angle difference between the clicked patch and every other."""
    return views.rope_view(seen, patch)


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
