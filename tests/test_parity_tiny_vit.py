"""TinyViT parity: timm ``tiny_vit_*`` checkpoints (random weights, Hub layout) give timm's probabilities in posenc."""

from __future__ import annotations

import json
import pytest
import timm
import torch
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.hub import HubLoadError, load
from tests.test_parity import load_posenc
from tests.test_parity_levit import perturb_all

TOL = dict(atol=1e-4, rtol=1e-4)
#: three stages: MBConv at 16x16 tokens (64 px), then 4x4 windows over 8x8 and 4x4 grids
TINY = dict(embed_dims=(16, 32, 48), depths=(1, 2, 1), num_heads=(1, 2, 3), window_sizes=(4, 4, 4), num_classes=5)


def _timm(tmp_path, **kwargs):
    torch.manual_seed(0)
    ref = perturb_all(timm.create_model("tiny_vit_5m_224", pretrained=False, **{**TINY, **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("size", [(64, 64), (80, 96)], ids=["windows_tile_the_grid", "padded_windows"])
def test_tiny_vit_gives_timm_probabilities(tmp_path, size):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_tiny_vit_inspection_gives_window_attention_and_offset_bias(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 80, 96))
    first, last = seen.blocks[0], seen.blocks[-1]
    # 80x96 px: stage 1 is 10x12 tokens, padded to 12x12 for 4x4 windows; stage 2 is 5x6, padded to 8x8
    assert (first.grid, first.window, first.attn.shape) == ((12, 12), (4, 4), (1, 9, 2, 16, 16))
    assert (last.grid, last.attn.shape, last.stage) == ((8, 8), (1, 4, 3, 16, 16), 2)
    attn = ref.stages[1].blocks[0].attn
    assert_close(first.pos_bias, attn.attention_biases[:, attn.attention_bias_idxs].detach())
    assert_close(first.position["offset_bias_table"], attn.attention_biases.detach().view(2, 4, 4))
    assert_close(first.attn.sum(-1), torch.ones(1, 9, 2, 16))


def test_tiny_vit_without_position_equals_timm_with_zero_biases(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    for module in ref.modules():
        if hasattr(module, "attention_biases"):
            module.attention_biases.data.zero_()
            module.attention_bias_cache = {}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        assert all(t.pos_bias is None and not t.position for t in model.inspect(x, position=False).blocks)


def test_tiny_vit_architecture_names_give_their_windows():
    cfg = config_from_timm({"architecture": "tiny_vit_21m_384.dist_in22k_ft_in1k", "num_classes": 1000})
    assert (cfg.window_sizes, cfg.embed_dims, cfg.img_size) == ((12, 12, 24, 12), (96, 192, 384, 576), (384, 384))
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*tiny_vit_11m_224.*tiny_vit_5m_224"):
        config_from_timm({"architecture": "tiny_vit_1m_224", "num_classes": 1000})


def test_tiny_vit_window_contradicting_the_weights_names_key_and_shapes(tmp_path):
    _timm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["window_sizes"] = [4, 5, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"(?s)attention_biases \(2, 16\) in the checkpoint vs \(2, 25\)"):
        load(str(tmp_path))
