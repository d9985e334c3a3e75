"""ConViT parity: timm ``convit_*`` checkpoints (random weights, Hub layout) give timm's probabilities in posenc."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed as timm_resample
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc.convert import CheckpointMismatchError, UnsupportedModelError, config_from_timm
from posenc.encodings import gpsa_offsets
from posenc.hub import HubLoadError, load
from tests.test_parity import load_posenc, perturb

TOL = dict(atol=1e-4, rtol=1e-4)
#: tiny ConViT: 2 GPSA blocks then 1 plain block, 4 heads of 8 channels, 64 px at patch 16 (a 4x4 grid)
TINY = dict(depth=3, local_up_to_layer=2, embed_dim=8, num_heads=4, img_size=64)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def _reference(tmp_path, **kwargs):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("convit_tiny", pretrained=False, num_classes=7, **{**TINY, **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_convit_checkpoint_gives_timm_probabilities(tmp_path, global_pool):
    ref = _reference(tmp_path, global_pool=global_pool)
    model = load_posenc(tmp_path)
    assert model.config.width == 32 and model.mechanisms == ("learned", "gpsa")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(_probs(model(x)), _probs(ref(x)), **TOL)
        assert_close(_probs(model.inspect(x).logits), _probs(ref(x)), **TOL)


def test_convit_at_another_size_matches_timm_built_for_it(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    # timm's way: a model built at 96 px with the checkpoint's embedding resampled by timm's own function
    big = timm.create_model("convit_tiny", pretrained=False, num_classes=7, **{**TINY, "img_size": 96}).eval()
    state = dict(ref.state_dict())
    state["pos_embed"] = timm_resample(state["pos_embed"], (6, 6), (4, 4), num_prefix_tokens=0)
    big.load_state_dict(state)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert_close(_probs(model(x)), _probs(big(x)), **TOL)


def test_gpsa_inspection_gives_timm_attention_gate_and_positional_attention(tmp_path):
    ref = _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        seen = model.inspect(x)
        ref(x)  # timm computes its offsets (rel_indices) in the first forward pass
        tokens = ref.patch_embed(x) + ref.pos_embed  # 1, 16, C
        gpsa = ref.blocks[0].attn
        expected = gpsa.get_attention(ref.blocks[0].norm1(tokens))  # 1, heads, 16, 16
    trace = seen.blocks[0]
    assert_close(trace.attn, expected, **TOL)
    assert_close(trace.position["gpsa_gate"], torch.sigmoid(gpsa.gating_param).detach(), **TOL)
    assert_close(trace.position["gpsa_pos_attn"], gpsa.pos_proj(gpsa.rel_indices[0]).permute(2, 0, 1).softmax(-1), **TOL)
    # the mixed attention is the gate's blend of content and positional attention
    g = trace.position["gpsa_gate"].view(-1, 1, 1)
    assert_close(trace.attn[0], (1 - g) * trace.attn_no_pos[0] + g * trace.position["gpsa_pos_attn"], **TOL)
    assert seen.blocks[2].attn.shape == (1, 4, 17, 17)  # the plain block sees the cls token


def test_gpsa_offsets_match_timm_rel_indices():
    gpsa = timm.models.convit.GPSA(dim=8, num_heads=2)
    assert_close(gpsa_offsets((5, 5)), gpsa.get_rel_indices(25)[0])
    off = gpsa_offsets((2, 3))  # non-square: token 1 is (row 0, col 1), token 5 is (row 1, col 2)
    assert off[1, 5].tolist() == [1.0, 1.0, 2.0] and off[5, 0].tolist() == [-2.0, -1.0, 5.0]


def test_convit_without_position_uses_content_attention_only(tmp_path):
    _reference(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        on = model.inspect(x)
        assert_close(model(x, position=False), off.logits)
    assert off.pos_embed is None and "gpsa_gate" not in off.blocks[0].position
    assert not torch.allclose(off.logits, on.logits)
    for trace in off.blocks[:2]:
        assert_close(trace.attn.sum(-1), torch.ones(trace.attn.shape[:-1]))


def test_convit_architecture_names_give_their_sizes():
    cfg = config_from_timm({"architecture": "convit_small.fb_in1k", "num_classes": 1000})
    assert (cfg.width, cfg.num_heads, cfg.depth, cfg.local_up_to_layer) == (432, 9, 12, 10)


def test_convit_model_args_contradicting_the_weights_name_key_and_shapes(tmp_path):
    _reference(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"num_heads": 4' in config and '"embed_dim": 8' in config
    config = config.replace('"num_heads": 4', '"num_heads": 2').replace('"embed_dim": 8', '"embed_dim": 16')  # same width
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(HubLoadError, match=r"(?s)pos_proj\.weight \(4, 3\) in the checkpoint vs \(2, 3\)"):
        load(str(tmp_path))


def test_unknown_convit_variant_lists_supported_architectures():
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*convit_base.*convit_tiny"):
        config_from_timm({"architecture": "convit_huge", "num_classes": 1000})
    assert issubclass(CheckpointMismatchError, ValueError)
