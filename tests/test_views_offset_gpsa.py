"""Views of ConViT's gated positional attention and of LeViT / TinyViT offset biases, against independent values."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from posenc import mechanisms, views
from posenc.hub import load
from posenc.mechanisms.absolute import similarity_to_patch
from tests.test_parity import perturb

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def convit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convit")
    torch.manual_seed(0)
    ref = perturb(timm.create_model("convit_tiny", pretrained=False, num_classes=5, depth=3, local_up_to_layer=2,
                                    embed_dim=8, num_heads=4, img_size=64))  # fmt: skip
    save_for_hf(ref, folder, safe_serialization=True)
    return ref, views.inspect_image(load(str(folder)), PHOTO)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(("block", "patch"), [(0, (1, 2)), (1, (3, 0))])
def test_gpsa_positional_attention_view_is_the_softmax_of_pos_proj_over_offsets(convit, block, patch):
    ref, seen = convit
    view = mechanisms.get("gpsa").views[1].draw(seen, block, patch)
    w = ref.blocks[block].attn.pos_proj.weight.detach().double().numpy()  # heads, 3
    b = ref.blocks[block].attn.pos_proj.bias.detach().double().numpy()  # heads
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    dx, dy = (cols - patch[1]).ravel(), (rows - patch[0]).ravel()  # key minus query
    logits = np.stack([dx, dy, dx**2 + dy**2], axis=-1) @ w.T + b  # 16, heads
    expected = _softmax(logits.T).reshape(4, 4, 4)  # heads, 4, 4
    np.testing.assert_allclose(view.arrays["gpsa_pos_attention"], expected, atol=1e-5)
    gate = 1 / (1 + np.exp(-ref.blocks[block].attn.gating_param.detach().numpy()))
    np.testing.assert_allclose(view.arrays["gpsa_gate"], gate, atol=1e-6)
    assert view.image.size[0] > 200


def test_gpsa_gate_table_has_a_row_per_gpsa_block(convit):
    ref, seen = convit
    view = mechanisms.get("gpsa").views[0].draw(seen, 1, (0, 0))
    expected = torch.sigmoid(torch.stack([ref.blocks[i].attn.gating_param for i in (0, 1)])).detach().numpy()
    np.testing.assert_allclose(view.arrays["gpsa_gates"], expected, atol=1e-6)
    assert view.arrays["gpsa_blocks"].tolist() == [0, 1]


def test_gpsa_views_refuse_plain_attention_blocks(convit):
    _, seen = convit
    with pytest.raises(views.ViewUnavailable, match="block 2 .* plain attention block; its GPSA blocks are 0..1"):
        mechanisms.get("gpsa").views[1].draw(seen, 2, (0, 0))


def test_convit_absolute_and_attention_views_use_its_patch_embedding_and_gpsa_attention(convit):
    ref, seen = convit
    similarity = similarity_to_patch(seen, 0, (0, 0))
    pos = ref.pos_embed[0].detach()  # 16, C: patches only
    expected = torch.nn.functional.cosine_similarity(pos[0:1], pos, dim=-1).reshape(4, 4).numpy()
    np.testing.assert_allclose(similarity.arrays["pos_similarity_to_patch"], expected, atol=1e-5)
    attention = views.attention_view(seen, 0, (2, 1))
    trace = seen.inspection.blocks[0]
    np.testing.assert_allclose(attention.arrays["attention"], trace.attn[0, :, 9].reshape(4, 4, 4).numpy(), atol=1e-6)
    np.testing.assert_allclose(attention.arrays["attention_no_pos"], trace.attn_no_pos[0, :, 9].reshape(4, 4, 4).numpy(),
                               atol=1e-6)


@pytest.fixture(scope="module")
def levit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("levit")
    torch.manual_seed(0)
    ref = perturb(timm.create_model("levit_128s", pretrained=False, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3),
                                    depth=(1, 1), img_size=64, num_classes=5))  # fmt: skip
    save_for_hf(ref, folder, safe_serialization=True)
    return ref, views.inspect_image(load(str(folder)), PHOTO)


@pytest.mark.parametrize(("block", "stage", "patch", "stage_patch"), [(0, 0, (1, 3), (1, 3)), (2, 1, (3, 2), (1, 1))])
def test_offset_query_bias_view_looks_up_the_table_by_absolute_offset(levit, block, stage, patch, stage_patch):
    ref, seen = levit  # inspection blocks: stage 0's block, the subsampling attention, stage 1's block
    view = mechanisms.get("offset_bias").views[1].draw(seen, block, patch)
    table = ref.stages[stage].blocks[0].attn.attention_biases.detach().numpy()  # heads, h*w
    side = 4 >> stage
    r, c = stage_patch
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    expected = table[:, (np.abs(rows - r) * side + np.abs(cols - c)).ravel()].reshape(-1, side, side)
    np.testing.assert_allclose(view.arrays["query_bias"], expected, atol=1e-6)
    assert view.arrays["block_patch"].tolist() == list(stage_patch)


def test_subsampling_attention_has_queries_on_their_own_grid_and_keys_on_the_stage_grid(levit):
    ref, seen = levit
    trace = seen.inspection.blocks[1]
    assert trace.layout.query_grid == (2, 2) and trace.layout.key_grid == (4, 4)
    # patch (3, 2) of the 4x4 stem grid is centred at pixel (56, 40); the nearest query (1, 1) was sampled from key
    # (2, 2), at pixel (40, 40)
    view = mechanisms.get("offset_bias").views[1].draw(seen, 1, (3, 2))
    assert view.arrays["block_patch"].tolist() == [2, 2]
    table = ref.stages[1].downsample.attn_downsample.attention_biases.detach().numpy()  # heads, 16
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    expected = table[:, (np.abs(rows - 2) * 4 + np.abs(cols - 2)).ravel()].reshape(-1, 4, 4)
    np.testing.assert_allclose(view.arrays["query_bias"], expected, atol=1e-6)
    attention = views.attention_view(seen, 1, (3, 2))
    assert attention.arrays["attention"].shape == (4, 4, 4)  # heads, key grid
    np.testing.assert_allclose(attention.arrays["attention"].sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_offset_bias_table_view_is_mirrored_about_zero_offset(levit):
    ref, seen = levit
    view = mechanisms.get("offset_bias").views[0].draw(seen, 0, (0, 0))
    table = ref.stages[0].blocks[0].attn.attention_biases.detach().numpy().reshape(2, 4, 4)
    np.testing.assert_allclose(view.arrays["offset_bias_table"], table, atol=1e-6)
    from posenc.mechanisms.offset_bias import signed_offset_table

    full = signed_offset_table(torch.from_numpy(table)).T.reshape(2, 7, 7).numpy()
    np.testing.assert_allclose(full, full[:, ::-1, :])
    np.testing.assert_allclose(full, full[:, :, ::-1])
    assert full[1, 3 - 2, 3 + 1] == table[1, 2, 1]  # (dy, dx) = (-2, +1) reads entry (|dy|, |dx|) = (2, 1)


def test_tiny_vit_query_bias_view_covers_the_clicked_patch_window_only(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("tiny_vit_5m_224", pretrained=False, embed_dims=(16, 32, 48), depths=(1, 1, 1),
                                    num_heads=(1, 2, 3), window_sizes=(4, 4, 4), num_classes=5))  # fmt: skip
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = load(str(tmp_path))
    seen = views.inspect_image(loaded, PHOTO, size=(64, 64))
    view = mechanisms.get("offset_bias").views[1].draw(seen, 0, (11, 5))  # stem grid 16x16 -> stage grid 8x8
    assert view.arrays["block_patch"].tolist() == [5, 2]
    table = ref.stages[1].blocks[0].attn.attention_biases.detach().numpy().reshape(2, 4, 4)
    got = view.arrays["query_bias"]  # heads, 8, 8
    for r in range(8):
        for c in range(8):
            if (r // 4, c // 4) == (1, 0):  # the window holding (5, 2)
                np.testing.assert_allclose(got[:, r, c], table[:, abs(r - 5), abs(c - 2)], atol=1e-6)
            else:
                assert np.isnan(got[:, r, c]).all()
    assert views.size_step(loaded) == (64, 64) and views.num_blocks(loaded) == 2
