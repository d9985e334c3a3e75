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


@pytest.mark.parametrize("name", list(ARCHITECTURES))
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
        norms = views.token_norms_view(seen, block, patch)
        assert (norms.arrays["token_norms"] > 0).all()
