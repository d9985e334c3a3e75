"""Rollout and token norms on every supported architecture, through each block's token layout (the tiny models of
``tests/test_token_layout.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import posenc
from posenc import views
from posenc.rollout import rollout
from tests.test_token_layout import ARCHITECTURES, saved  # noqa: F401  (saved is a fixture)


def seen_of(saved, name: str) -> views.Seen:  # noqa: F811
    _, folder = saved[name]
    size = ARCHITECTURES[name][2]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    return views.inspect_image(posenc.load(str(folder)), photo, size)


#: architectures without a single token-to-token map (CoaT's factorised attention): no rollout at all
NO_ROLLOUT = {"coat"}


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in NO_ROLLOUT])
def test_rollout_and_token_norms_render_on_every_architecture(saved, name):  # noqa: F811
    seen = seen_of(saved, name)
    patch = (seen.grid[0] - 1, seen.grid[1] // 3)
    full = rollout(seen.inspection)  # every token after the last block
    rows = full.rows[0]
    assert (rows >= -1e-12).all()
    torch.testing.assert_close(rows.sum(-1), torch.ones(len(rows), dtype=torch.float64))
    without = rollout(seen.inspection, no_pos=True)
    assert without.rows.shape == full.rows.shape
    for block in (0, seen.num_blocks - 1):
        view = views.rollout_view(seen, block, patch)
        assert view.arrays["rollout"].shape[-2:] == tuple(full.inputs.grid)
        assert np.isfinite(view.arrays["rollout"]).all() and np.isfinite(view.arrays["rollout_no_pos"]).all()
        if 0 in seen.inspection.blocks[block].outputs().grid:  # CaiT's class attention outputs only cls
            with pytest.raises(views.ViewUnavailable, match="outputs no patch tokens"):
                views.token_norms_view(seen, block, patch)
            continue
        norms = views.token_norms_view(seen, block, patch)
        assert (norms.arrays["token_norms"] > 0).all()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_view_of_the_explore_tab_draws_or_says_why_on_every_block(saved, name):  # noqa: F811
    """What the Explore tab draws beside the mechanisms, on every block: a picture, or ViewUnavailable with a reason
    (never another error, which would refuse the whole request)."""
    seen = seen_of(saved, name)
    patch = (seen.grid[0] - 1, seen.grid[1] // 3)
    drawn: dict[str, int] = {}
    for block in range(seen.num_blocks):
        for make in (views.attention_view, views.prefix_attention_view, views.rollout_view, views.token_norms_view):
            try:
                view = make(seen, block, patch)
            except views.ViewUnavailable as error:
                assert str(error).strip(), make.__name__
                continue
            assert view.image.width > 0
            drawn[make.__name__] = drawn.get(make.__name__, 0) + 1
    if name in NO_ROLLOUT:  # no token map anywhere: only the token norms could draw, and CoaT's blocks are not hooked
        assert "attention_view" not in drawn and "rollout_view" not in drawn
    else:
        assert drawn["rollout_view"] == seen.num_blocks  # from the clicked patch and/or cls on every block
        assert drawn["attention_view"] >= 1


def test_rollout_passes_the_patches_through_class_attention_blocks(saved):  # noqa: F811
    """CaiT's and XCiT's class-attention blocks query only cls; the patch tokens leave them unchanged, so a rollout from a
    patch after the last block equals the one after the last block with patch queries."""
    for name, last_patch_block in (("cait", 1), ("xcit", 1)):
        seen = seen_of(saved, name)
        after = rollout(seen.inspection)
        before = rollout(seen.inspection, block=last_patch_block)
        p = len(after.inputs.prefix)
        torch.testing.assert_close(after.rows[:, p:], before.rows[:, p:] if name == "xcit" else before.rows)
