"""RoPE views: axial phase similarity on a fitted scale, and mixed RoPE's frequencies and per-head similarity."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from posenc import mechanisms, viz
from posenc.hub import LoadedModel
from posenc.models import Eva, EvaConfig
from posenc.preprocess import Preprocess
from posenc.mechanisms.rope_axial import phase_similarity
from posenc.views import OVERLAY_SIDE, Seen, ViewUnavailable

GRID = (5, 3)  # non-square: a transposed grid would put values on the wrong patches


def _seen(**fields) -> Seen:
    torch.manual_seed(0)
    cfg = EvaConfig(img_size=(GRID[0] * 8, GRID[1] * 8), patch_size=8, num_classes=3, embed_dim=32, depth=2,
                    num_heads=2, use_rot_pos_emb=True, rope_grid_indexing="xy", **fields)
    model = Eva(cfg).eval()
    with torch.no_grad():
        if model.rope is not None:
            model.rope.freqs.mul_(torch.linspace(0.5, 1.5, 8))  # magnitudes differ per pair
        inspection = model.inspect(torch.randn(1, 3, *cfg.img_size))
    loaded = LoadedModel(model=model, preprocess=Preprocess(), labels=["a", "b", "c"], source="tiny", layout="posenc",
                         num_params=model.num_params())
    photo = Image.new("RGB", (cfg.img_size[1], cfg.img_size[0]), (0, 0, 0))
    return Seen("tiny", loaded, photo, cfg.img_size, inspection)


def _phase_similarity(angle_of, patch: tuple[int, int]) -> np.ndarray:
    """Mean cos of the angle difference, written here with explicit loops: angle_of(row, col) -> (pairs,)."""
    q = angle_of(*patch)
    out = np.zeros(GRID)
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            out[r, c] = np.mean(np.cos(q - angle_of(r, c)))
    return out


def test_axial_rope_similarity_uses_xy_angles_and_a_scale_fitted_to_its_values():
    seen = _seen(rope_temperature=100.0)
    patch = (4, 1)
    view = phase_similarity(seen, 0, patch)
    freqs = 100.0 ** -(np.arange(4) / 4)  # hd/4 frequencies
    expected = _phase_similarity(lambda r, c: np.concatenate([c * freqs, r * freqs]), patch)  # 'xy': column first
    np.testing.assert_allclose(view.arrays["rope_similarity"], expected, atol=1e-5)
    sim = view.arrays["rope_similarity"]
    assert sim.min() > -0.9  # a fixed -1..1 scale would leave most of the colour range unused
    kwargs = dict(cmap="viridis", mark=patch, title=f"RoPE similarity to {patch}",
                  colorbar_label="mean cos(angle difference)", min_side=OVERLAY_SIDE)
    fitted = viz.overlay(seen.photo, sim, vmin=float(sim.min()), vmax=float(sim.max()), **kwargs)
    fixed = viz.overlay(seen.photo, sim, vmin=-1.0, vmax=1.0, **kwargs)
    assert view.image.size == fitted.size
    assert np.array_equal(np.asarray(view.image), np.asarray(fitted))
    assert not np.array_equal(np.asarray(view.image), np.asarray(fixed))


def test_axial_view_is_unavailable_for_mixed_rope():
    with pytest.raises(ViewUnavailable, match="so it has no axial rotary embedding"):
        phase_similarity(_seen(rope_type="mixed", rope_temperature=10.0), 0, (0, 0))


@pytest.mark.parametrize("block", [0, 1])
def test_mixed_rope_similarity_is_per_head_from_the_blocks_learned_frequencies(block):
    seen = _seen(rope_type="mixed", rope_temperature=10.0)
    patch = (1, 2)
    view = mechanisms.get("rope_mixed").views[1].draw(seen, block, patch)
    freqs = seen.loaded.model.rope.freqs.detach().numpy()  # 2, depth, heads, hd/2 (timm: [0] x, [1] y for 'xy')
    sims = view.arrays["rope_similarity"]
    assert sims.shape == (2, *GRID)
    for h in range(2):
        fx, fy = freqs[0, block, h], freqs[1, block, h]
        expected = _phase_similarity(lambda r, c: c * fx + r * fy, patch)
        np.testing.assert_allclose(sims[h], expected, atol=1e-5)
    assert np.abs(sims[0] - sims[1]).max() > 1e-3  # heads differ
    assert view.image.size[0] > 0


def test_mixed_rope_frequency_view_draws_each_heads_vectors_in_image_orientation():
    seen = _seen(rope_type="mixed", rope_temperature=10.0)
    view = mechanisms.get("rope_mixed").views[0].draw(seen, 1, (0, 0))
    freqs = seen.loaded.model.rope.freqs.detach()
    expected = torch.stack([freqs[0, 1], freqs[1, 1]], dim=-1).numpy()  # heads, hd/2, (f_x, f_y)
    np.testing.assert_allclose(view.arrays["rope_freqs_xy"], expected, atol=1e-6)


def test_frequency_planes_put_each_arrow_tip_where_its_vector_points_in_its_magnitude_colour():
    f = np.array([[[0.3, 0.0], [0.0, -0.1]], [[-0.2, 0.2], [0.05, 0.05]]])  # heads 2, pairs 2, (x, y)
    sheet = viz.frequency_planes(f, side=200)
    assert sheet.vmin == 0.0 and sheet.vmax == pytest.approx(0.3)
    norm = matplotlib.colors.Normalize(0.0, 0.3)
    centre, radius, reach = 100, 90, 0.3
    for h, k in [(0, 0), (1, 0), (0, 1)]:
        x0, y0, _, _ = sheet.panels[h].box
        fx, fy = f[h, k]
        tip = (round(x0 + centre + fx / reach * radius), round(y0 + centre + fy / reach * radius))  # y down
        colour = tuple(int(v) for v in viz.colorize(np.array([math.hypot(fx, fy)]), "viridis", norm)[0])
        assert sheet.image.getpixel(tip) == colour


def test_head_map_overlays_fit_one_scale_to_all_heads():
    maps = np.stack([np.linspace(0.2, 0.9, 15).reshape(GRID), np.linspace(-0.3, 0.5, 15).reshape(GRID)])
    sheet = viz.head_map_overlays(None, maps, (2, 1), title="t", colorbar_label="c")
    assert (sheet.vmin, sheet.vmax) == pytest.approx((-0.3, 0.9))
    assert len(sheet.panels) == 2
