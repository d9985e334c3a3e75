"""The arrays and pictures of ``posenc.views`` against independent computations from the model's weights.

Tiny random-weight models (every parameter perturbed), a non-square 4x6 patch grid for the ViTs and a
non-symmetric clicked patch, so a transposed grid or a swapped (row, col) shows.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from posenc import views
from posenc.mechanisms import absolute, rel_table, rope_axial
from posenc.hub import LoadedModel
from posenc.models import SwinConfig, ViTConfig, build_model
from posenc.preprocess import Preprocess

PATCH = (1, 3)  # row 1, column 3 of a 4x6 grid: a swap gives (3, 1), another valid but different patch
FAMILY_CONFIGS = {
    "none": dict(pos_embed="none"),
    "learned": dict(pos_embed="learned"),
    "sincos": dict(pos_embed="sincos"),
    "relative": dict(pos_embed="none", rel_pos_bias=True, global_pool="avg", qkv_bias="qv", init_values=0.1),
    "rope": dict(pos_embed="none", rope=True),
}


def _perturbed(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _loaded(config) -> LoadedModel:
    model = _perturbed(config)
    return LoadedModel(model=model, preprocess=config.preprocess, labels=[str(i) for i in range(config.num_classes)],
                       source="test", layout="posenc", num_params=model.num_params())


def _photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


def _vit(family: str, img_size=(32, 48)) -> LoadedModel:
    return _loaded(ViTConfig(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                             preprocess=Preprocess(input_size=img_size, crop_pct=1.0), **FAMILY_CONFIGS[family]))


@functools.cache
def _seen(family: str) -> views.Seen:
    """One inspection of the 32x48 photo by the family's tiny ViT (4x6 grid), shared by the tests."""
    return views.inspect_image(_vit(family), _photo((32, 48)))


@pytest.fixture(scope="module")
def swin_seen() -> views.Seen:
    config = SwinConfig(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                        num_classes=4, preprocess=Preprocess(input_size=(64, 64), crop_pct=1.0))
    return views.inspect_image(_loaded(config), _photo((64, 64)))


# ------------------------------------------------------------------------------------------- an independent ViT


def _angles(grid, head_dim, base):
    """Axial RoPE angles, written out: row frequencies then column frequencies."""
    q = head_dim // 4
    freqs = [base ** (-k / q) for k in range(q)]
    return torch.tensor([[r * f for f in freqs] + [c * f for f in freqs] for r in range(grid[0]) for c in range(grid[1])])


def _rotate(x, angles):
    """RoPE as complex multiplication of the pairs (x[i], x[i + d/2])."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def _offset_row(dy: int, dx: int, window) -> int:
    return (dy + window[0] - 1) * (2 * window[1] - 1) + dx + window[1] - 1


def _bias(table, grid, cls: bool):
    """(heads, N, N) BEiT bias by looping over every query/key pair."""
    n, rows = grid[0] * grid[1], table.shape[0]
    p = int(cls)
    bias = torch.zeros(table.shape[1], n + p, n + p)
    for i in range(n + p):
        for j in range(n + p):
            if cls and i == 0 and j == 0:
                row = rows - 1
            elif cls and i == 0:
                row = rows - 3
            elif cls and j == 0:
                row = rows - 2
            else:
                (qi, qj), (ki, kj) = divmod(i - p, grid[1]), divmod(j - p, grid[1])
                row = _offset_row(qi - ki, qj - kj, grid)
            bias[:, i, j] = table[row]
    return bias


def _relative(seen: views.Seen, block: int, patch):
    return rel_table.bias_table(seen, block, patch), rel_table.query_bias(seen, block, patch)


def _reference_attention(seen: views.Seen, block: int):
    """Softmax attention of one block from its weights and its recorded input: with and without position."""
    model = seen.loaded.model
    attn, cfg = model.blocks[block].attn, model.config
    inputs = []
    handle = attn.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    views.inspect_image(seen.loaded, _photo(seen.size))  # the same pixels again, to record the block's input
    handle.remove()
    x = inputs[0][0].detach().double()  # N, C
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    weight = attn.qkv.weight.detach().double()
    if cfg.qkv_bias == "qv":
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]).detach().double()
    else:
        bias = attn.qkv.bias.detach().double()
    q, k, _ = (x @ weight.T + bias).view(len(x), 3, heads, head_dim).permute(1, 2, 0, 3)  # 3 x (heads, N, hd)
    plain = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
    p = cfg.num_prefix_tokens
    if cfg.rope:
        angles = _angles(seen.grid, head_dim, cfg.rope_base).double()
        q = torch.cat([q[:, :p], _rotate(q[:, p:], angles)], dim=1)
        k = torch.cat([k[:, :p], _rotate(k[:, p:], angles)], dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if cfg.rel_pos_bias:
        logits = logits + _bias(attn.relative_position_bias_table.detach().double(), seen.grid, cfg.class_token)
    return logits.softmax(-1), plain


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_attention_view_equals_softmax_attention_from_the_weights(family):
    vit_seen = _seen(family)
    block = 1
    view = views.attention_view(vit_seen, block, PATCH)
    attn, plain = _reference_attention(vit_seen, block)
    p = vit_seen.loaded.model.config.num_prefix_tokens
    q = p + PATCH[0] * 6 + PATCH[1]
    np.testing.assert_allclose(view.arrays["attention"], attn[:, q, p:].reshape(2, 4, 6).numpy(), atol=1e-5)
    np.testing.assert_allclose(view.arrays["attention_to_prefix"], attn[:, q, :p].numpy(), atol=1e-5)
    has_position_term = family in ("relative", "rope")
    assert ("attention_no_pos" in view.arrays) == has_position_term
    if has_position_term:
        np.testing.assert_allclose(view.arrays["attention_no_pos"], plain[:, q, p:].reshape(2, 4, 6).numpy(), atol=1e-5)
        assert not np.allclose(view.arrays["attention"], view.arrays["attention_no_pos"], atol=1e-3)


def test_swin_attention_view_maps_each_key_of_the_shifted_window_to_its_image_patch(swin_seen):
    block = 3  # stage 1: 8x8 grid, 4x4 windows, shifted by 2
    trace = swin_seen.inspection.blocks[block]
    assert trace.grid == (8, 8) and trace.window == (4, 4) and trace.shift == (2, 2)
    patch = (5, 1)  # input grid 16x16 -> (2, 0) on the stage grid
    view = views.attention_view(swin_seen, block, patch)
    r, c = 2, 0
    i, j = (r - 2) % 8, (c - 2) % 8  # shifted frame: (0, 6)
    window, query = (i // 4) * 2 + j // 4, (i % 4) * 4 + j % 4
    expected = np.full((4, 8, 8), np.nan, dtype=np.float32)
    region = lambda a: 0 if a < 4 else (1 if a < 6 else 2)  # noqa: E731 - shift regions of one axis
    for key in range(16):
        ki, kj = (i // 4) * 4 + key // 4, (j // 4) * 4 + key % 4
        if (region(ki), region(kj)) == (region(i), region(j)):
            expected[:, (ki + 2) % 8, (kj + 2) % 8] = trace.attn[0, window, :, query, key].numpy()
    np.testing.assert_allclose(view.arrays["attention"], expected, atol=1e-6)
    assert np.isnan(view.arrays["attention"]).sum() > 4 * 48, "keys of other windows and shift regions are blank"


# ------------------------------------------------------------------------------------------- relative bias


def test_relative_view_exports_the_table_and_the_query_bias_beit_used():
    vit_seen = _seen("relative")
    block = 1
    table_view, query_view = _relative(vit_seen, block, PATCH)
    table = vit_seen.loaded.model.blocks[block].attn.relative_position_bias_table.detach()
    np.testing.assert_array_equal(table_view.arrays["bias_table"], table.numpy())
    np.testing.assert_array_equal(table_view.arrays["bias_window"], [4, 6])
    expected = np.array([[[table[_offset_row(PATCH[0] - kr, PATCH[1] - kc, (4, 6)), h] for kc in range(6)]
                          for kr in range(4)] for h in range(2)])
    np.testing.assert_allclose(query_view.arrays["query_bias"], expected, atol=1e-6)
    np.testing.assert_allclose(query_view.arrays["query_bias_to_prefix"][:, 0], table[-2].numpy(), atol=1e-6)


def test_beit_view_at_another_size_exports_the_table_resized_like_timm():
    pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
    loaded = _vit("relative", img_size=(32, 32))
    seen = views.inspect_image(loaded, _photo((48, 48)), (48, 48))
    table_view = rel_table.bias_table(seen, 0, (1, 4))
    trained = loaded.model.blocks[0].attn.relative_position_bias_table.detach()  # 4x4 window: 52 rows
    expected = pos_embed_rel.resize_rel_pos_bias_table_simple(trained, (6, 6), (11 * 11 + 3, 2))
    np.testing.assert_allclose(table_view.arrays["bias_table"], expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(table_view.arrays["bias_window"], [6, 6])


@pytest.mark.parametrize("block", [0, 3])
def test_swin_relative_view_exports_the_window_table_the_block_used_not_the_stage_grid(swin_seen, block):
    table_view, query_view = _relative(swin_seen, block, (5, 1))
    attn = swin_seen.loaded.model.layers[block // 2].blocks[block % 2].attn
    np.testing.assert_array_equal(table_view.arrays["bias_table"], attn.relative_position_bias_table.detach().numpy())
    np.testing.assert_array_equal(table_view.arrays["bias_window"], [4, 4])
    trace = swin_seen.inspection.blocks[block]
    stage_patch = tuple(query_view.arrays["block_patch"])
    keys = views.viz.swin_window_keys(stage_patch, trace.grid, trace.window, trace.shift)
    bias = query_view.arrays["query_bias"]  # heads, H, W
    table = attn.relative_position_bias_table.detach()
    qi, qj = divmod(keys.query_index, 4)
    for key, (kr, kc) in enumerate(keys.keys.tolist()):
        if not keys.masked[key]:
            ki, kj = divmod(key, 4)
            np.testing.assert_allclose(bias[:, kr, kc], table[_offset_row(qi - ki, qj - kj, (4, 4))].numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------- absolute and RoPE


@pytest.mark.parametrize("family", ["learned", "sincos"])
def test_position_embedding_views_equal_numpy_cosine_and_pca(family):
    vit_seen = _seen(family)
    tiles, clicked, pca = (f(vit_seen, 0, PATCH) for f in (absolute.similarity_grid, absolute.similarity_to_patch, absolute.pca))
    pos = tiles.arrays["pos_embed"].astype(np.float64)  # 24, C
    model = vit_seen.loaded.model
    if family == "learned":
        np.testing.assert_allclose(pos, model.pos_embed[0, 1:].detach().numpy(), atol=1e-6)
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    np.testing.assert_allclose(tiles.arrays["pos_similarity"], unit @ unit.T, atol=1e-5)
    np.testing.assert_allclose(clicked.arrays["pos_similarity_to_patch"], (unit @ unit[PATCH[0] * 6 + PATCH[1]]).reshape(4, 6),
                               atol=1e-5)
    if family == "sincos":
        return  # sin-cos has tied components (symmetric rows and columns), so its PCA axes are not unique
    centred = pos - pos.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:3].T  # 24, 3
    scores *= np.sign(scores[np.abs(scores).argmax(axis=0), range(3)])
    rgb = (scores - scores.min(axis=0)) / (scores.max(axis=0) - scores.min(axis=0))
    np.testing.assert_allclose(pca.arrays["pos_pca_rgb"], rgb.reshape(4, 6, 3), atol=1e-4)


def test_rope_view_is_the_mean_cosine_of_angle_differences_from_the_clicked_patch():
    vit_seen = _seen("rope")
    view = rope_axial.phase_similarity(vit_seen, 0, PATCH)
    angles = _angles((4, 6), 16, 100.0).double()
    np.testing.assert_allclose(view.arrays["rope_angles"], angles.numpy(), atol=1e-6)
    expected = torch.cos(angles[PATCH[0] * 6 + PATCH[1]] - angles).mean(-1).reshape(4, 6)
    np.testing.assert_allclose(view.arrays["rope_similarity"], expected.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------- the patch picker


def test_patch_picker_outlines_the_clicked_row_and_column():
    vit_seen = _seen("none")
    img = np.asarray(views.patch_picker(vit_seen, PATCH).convert("RGB")).astype(int)
    h, w = img.shape[:2]
    assert w / h == pytest.approx(6 / 4, rel=0.02)
    white = np.argwhere((img == 255).all(axis=-1))  # (y, x) of the outline's white pixels
    cell_h, cell_w = h / 4, w / 6
    y0, x0 = white.min(axis=0)
    y1, x1 = white.max(axis=0)
    assert abs(y0 - PATCH[0] * cell_h) <= 1 and abs(y1 - (PATCH[0] + 1) * cell_h) <= 2
    assert abs(x0 - PATCH[1] * cell_w) <= 1 and abs(x1 - (PATCH[1] + 1) * cell_w) <= 2


def test_size_rule_names_the_largest_square_that_fits_past_a_gap() -> None:
    from types import SimpleNamespace

    # a Swin V2-like model: step 32, native 256, takes 128, 256 and 512 but not the multiples between
    model = SimpleNamespace(size_step=lambda: (32, 32), fits=lambda size: size[0] == size[1] in (128, 256, 512),
                            trace_bytes=lambda size: 0)
    loaded = SimpleNamespace(model=model, preprocess=SimpleNamespace(input_size=(256, 256)))
    assert views.max_square_size(loaded) == 512
    assert "up to 512x512" in views.size_rule(loaded)


def test_a_model_too_large_at_every_offered_size_runs_at_the_largest_square_that_fits() -> None:
    from types import SimpleNamespace

    # SAM-B's encoder: native 1024x1024, and even 512x512 needs more than MAX_TRACE_BYTES of attention maps
    model = SimpleNamespace(size_step=lambda: (16, 16), fits=lambda size: True,
                            trace_bytes=lambda size: 0 if max(size) <= 448 else views.MAX_TRACE_BYTES + 1)
    loaded = SimpleNamespace(model=model, preprocess=SimpleNamespace(input_size=(1024, 1024)))
    assert views.input_sizes(loaded) == [(448, 448)]
    assert views.default_size(loaded) == (448, 448)
    assert views.parse_size("448x448", loaded) == (448, 448)  # the next request at the shown size is accepted
