"""Views of the decomposed relative bias (SAM, ViTDet), checked against the attention the model computed and timm."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

import posenc
from posenc import mechanisms, views
from posenc.preprocess import build_transform
from tests.test_parity import perturb

ARGS = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
            neck_chans=16, num_classes=0)


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    """A tiny perturbed timm SAM encoder, its posenc load, and one inspection of a random photo at 80 px."""
    folder = tmp_path_factory.mktemp("sam")
    torch.manual_seed(0)
    ref = perturb(timm.create_model("samvit_base_patch16", pretrained=False, **ARGS))
    save_for_hf(ref, folder, safe_serialization=True)
    loaded = posenc.load(str(folder))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    return ref, loaded, views.inspect_image(loaded, photo, (80, 80))  # 10x10 grid, padded to 12x12 in windows


def _centre(a: np.ndarray) -> np.ndarray:
    """Subtract each head's mean over its finite entries (a softmax is blind to a constant per query)."""
    return a - np.nanmean(a, axis=(-2, -1), keepdims=True)


@pytest.mark.parametrize(("block", "patch"), [(0, (9, 9)), (0, (4, 2)), (1, (3, 7))],
                         ids=["windowed-padded-corner", "windowed", "global"])
def test_query_bias_view_is_the_log_ratio_of_attention_with_and_without_it(sam, block, patch):
    _, _, seen = sam
    bias = mechanisms.get("decomposed").views[0].draw(seen, block, patch).arrays["decomposed_bias"]  # heads, gh, gw
    attn = views.attention_view(seen, block, patch).arrays
    log_ratio = np.log(attn["attention"]) - np.log(attn["attention_no_pos"])  # heads, gh, gw, NaN outside
    assert np.array_equal(np.isnan(bias), np.isnan(log_ratio))
    np.testing.assert_allclose(_centre(bias), _centre(log_ratio), atol=1e-4)
    if block == 0:  # a 3x3 window: at most 9 keys drawn, fewer where it overlaps the padding
        assert np.isfinite(bias[0]).sum() == (1 if patch == (9, 9) else 9)


def test_factor_view_matches_timm_row_and_column_terms(sam):
    ref, _, seen = sam
    x = build_transform(replace(seen.loaded.preprocess, input_size=(80, 80)))(seen.photo)[None]  # 1, 3, 80, 80
    attn = ref.blocks[1].attn
    with torch.no_grad():
        tokens = ref.blocks[0](ref.patch_embed(x) + timm.layers.resample_abs_pos_embed_nhwc(ref.pos_embed, (10, 10)))
        q = attn.qkv(ref.blocks[1].norm1(tokens).reshape(1, 100, 32)).reshape(1, 100, 3, 2, 16)[:, :, 0]  # 1, N, 2, hd
        q = q.permute(0, 2, 1, 3).reshape(2, 100, 16)  # heads, N, hd
        zero = torch.zeros_like(attn.rel_pos_w)
        rows = get_decomposed_rel_pos_bias(q, attn.rel_pos_h, zero, (10, 10), (10, 10))  # heads, N, N
        cols = get_decomposed_rel_pos_bias(q, torch.zeros_like(attn.rel_pos_h), attn.rel_pos_w, (10, 10), (10, 10))
    arrays = mechanisms.get("decomposed").views[1].draw(seen, 1, (3, 7)).arrays
    query = 3 * 10 + 7
    np.testing.assert_allclose(arrays["bias_row_term"], rows[:, query].reshape(2, 10, 10).numpy(), atol=1e-4)
    np.testing.assert_allclose(arrays["bias_column_term"], cols[:, query].reshape(2, 10, 10).numpy(), atol=1e-4)
    assert np.ptp(arrays["bias_row_term"][0], axis=1).max() < 1e-6  # the row term is constant along a row


def test_views_say_the_bias_depends_on_the_image_and_refuse_models_without_it(sam):
    _, loaded, seen = sam
    assert "depends on the image" in mechanisms.get("decomposed").views[0].label
    no_pos = views.Seen(seen.name, loaded, seen.photo, seen.size, loaded.model.inspect(
        torch.zeros(1, 3, 80, 80), position=False))
    with pytest.raises(views.ViewUnavailable, match="no decomposed relative bias"):
        mechanisms.get("decomposed").views[0].draw(no_pos, 0, (0, 0))
    assert "padded to 12x12" in views.describe_block(seen, 0)
