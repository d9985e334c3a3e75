"""The continuous-position-bias mechanism: the tensors a Swin V2 inspection returns and the views drawn from them,
checked against the block's own MLP evaluated independently, at the native size and at a size that shrinks windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_parity import perturb
from torch.testing import assert_close

from posenc import mechanisms, views
from posenc.hub import LoadedModel
from posenc.models import SwinV2Config, build_model
from posenc.preprocess import Preprocess

# stage grids at 64 px: 16, 8; window 8 (pretrained 6 in stage 0); at 32 px: 8, 4 -> the last stage's window shrinks to 4
CFG = SwinV2Config(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=8, num_classes=3,
                   pretrained_window_sizes=(6, 0), preprocess=Preprocess(input_size=(64, 64)))  # fmt: skip


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    model = perturb(build_model(CFG))
    return LoadedModel(model, CFG.preprocess, ["a", "b", "c"], "tiny-swinv2", "posenc", model.num_params())


def _seen(loaded: LoadedModel, size: tuple[int, int]) -> views.Seen:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    return views.inspect_image(loaded, image, size=size)


def _mlp_table(attn, window, normaliser) -> torch.Tensor:
    """The bias table for a window, computed here from the block's MLP weights: (2Wh-1, 2Ww-1, heads)."""
    rows = []
    for dy in range(-(window[0] - 1), window[0]):
        for dx in range(-(window[1] - 1), window[1]):
            t = [d / max(n - 1, 1) * 8 for d, n in zip((dy, dx), normaliser)]
            rows.append([math.copysign(math.log2(1 + abs(v)) / 3, v) for v in t])
    hidden = torch.relu(torch.tensor(rows) @ attn.cpb_mlp[0].weight.T + attn.cpb_mlp[0].bias)
    return (16 * torch.sigmoid(hidden @ attn.cpb_mlp[2].weight.T)).reshape(2 * window[0] - 1, 2 * window[1] - 1, -1)



def _attentions(seen: views.Seen) -> list:
    """Every block's attention module of the Swin V2, stage by stage."""
    return [block.attn for layer in seen.loaded.model.layers for block in layer.blocks]

@pytest.mark.parametrize(("size", "block", "window", "normaliser"), [
    ((64, 64), 0, (8, 8), (6, 6)),  # pretrained window 6 normalises
    ((64, 64), 2, (8, 8), (8, 8)),  # no pretrained window: the window itself
    ((32, 32), 2, (4, 4), (4, 4)),  # at 32 px the 4x4 grid shrinks the window: the table is recomputed for 4x4
])  # fmt: skip
def test_bias_table_view_shows_the_mlp_table_for_the_window_in_use(loaded, size, block, window, normaliser):
    seen = _seen(loaded, size)
    attn = _attentions(seen)[block]
    view = mechanisms.get("cpb").views[0].draw(seen, block, (1, 1))
    with torch.no_grad():
        expected = _mlp_table(attn, window, normaliser)
    assert tuple(view.arrays["cpb_window"]) == window
    assert_close(torch.from_numpy(view.arrays["cpb_table"]), expected, atol=1e-5, rtol=1e-5)
    # the bias added to the logits is that table gathered by offset: query (0, 0) to key (1, 2) is offset (-1, -2)
    bias = seen.inspection.blocks[block].pos_bias  # heads, N, N
    assert_close(bias[:, 0, 1 * window[1] + 2], expected[window[0] - 2, window[1] - 3], atol=1e-5, rtol=1e-5)
    assert view.image.width > 100


def test_extrapolation_view_covers_twice_the_span_and_agrees_inside_the_window(loaded):
    seen = _seen(loaded, (64, 64))
    arrays = mechanisms.get("cpb").views[1].draw(seen, 0, (0, 0)).arrays
    wide, table = torch.from_numpy(arrays["cpb_wide"]), seen.inspection.blocks[0].position["cpb_table"]
    assert tuple(arrays["cpb_wide_span"]) == (16, 16) and wide.shape == (31, 31, 2)
    assert_close(wide[8:23, 8:23], table, atol=1e-5, rtol=1e-5)  # the window's offsets, inside the wider span
    with torch.no_grad():
        far = _mlp_table(_attentions(seen)[0], (16, 16), (6, 6))
    assert_close(wide, far, atol=1e-5, rtol=1e-5)


def test_temperature_view_is_exp_of_the_clamped_logit_scale(loaded):
    seen = _seen(loaded, (64, 64))
    attn = _attentions(seen)[3]
    with torch.no_grad():
        attn.logit_scale[0] = 6.0  # above log(100): clamped
        seen = _seen(loaded, (64, 64))
    values = mechanisms.get("cpb").views[2].draw(seen, 3, (0, 0)).arrays["cpb_temperature"]
    expected = attn.logit_scale.detach().reshape(-1).clamp(max=math.log(100)).exp()
    assert values[0] == pytest.approx(100.0, rel=1e-5)
    assert_close(torch.from_numpy(values), expected)


def test_query_bias_view_places_the_bias_of_the_clicked_query_on_its_window(loaded):
    seen = _seen(loaded, (64, 64))
    view = mechanisms.get("cpb").views[3].draw(seen, 0, (3, 5))  # block 0: unshifted 8x8 windows on the 16x16 grid
    rows = view.arrays["query_bias"]  # heads, 16, 16
    table = seen.inspection.blocks[0].position["cpb_table"]  # 15, 15, heads
    assert np.isnan(rows[:, 8:, :]).all() and np.isnan(rows[:, :, 8:]).all()  # other windows are not attended
    for key in [(0, 0), (7, 7), (3, 5)]:
        dy, dx = 3 - key[0], 5 - key[1]
        assert_close(torch.from_numpy(rows[:, key[0], key[1]]), table[dy + 7, dx + 7], atol=1e-5, rtol=1e-5)


def test_cpb_views_say_why_a_model_without_a_continuous_bias_has_none(loaded):
    seen = _seen(loaded, (64, 64))
    plain = views.Seen(seen.name, seen.loaded, seen.photo, seen.size, loaded.model.inspect(
        loaded.pixels(seen.photo), position=False))  # fmt: skip
    with pytest.raises(views.ViewUnavailable, match="no continuous position bias"):
        mechanisms.get("cpb").views[0].draw(plain, 0, (0, 0))


def test_offered_sizes_are_those_whose_stage_grids_the_windows_tile(loaded):
    # 32: grids 8, 4 (window shrinks to 4); 48: grid 12 is no multiple of the 8x8 window; 128: grids 32, 16
    assert views.size_step(loaded) == (8, 8)
    assert views.input_sizes(loaded) == [(32, 32), (64, 64), (128, 128)]
    assert views.parse_size("128x32", loaded) == (128, 32)
    with pytest.raises(ValueError, match=r"96x96 does not fit this model.*sizes that work: 32x32, 64x64, 128x128"):
        views.parse_size("96x96", loaded)
