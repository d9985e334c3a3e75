"""LeViT parity: timm ``levit_*`` and transformers ``levit`` checkpoints (random weights, Hub layout) in posenc."""

from __future__ import annotations

import json
import pytest
import timm
import torch
import transformers as hf
from timm.layers import resize_rel_pos_bias_table_levit
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc.convert import UnsupportedModelError, config_from_timm, config_from_transformers
from posenc.encodings import offset_bias_index
from posenc.hub import HubLoadError, load
from tests.test_parity import load_posenc, perturb

TOL = dict(atol=1e-4, rtol=1e-4)
#: two stages (4x4 then 2x2 tokens at 64 px), one block each, narrow
TINY = dict(embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), img_size=64, num_classes=5)


def perturb_all(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and BatchNorm running statistics, so no norm is the identity and no bias is 0."""
    perturb(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    return model.eval()


def _timm(tmp_path, name: str = "levit_128s", **kwargs):
    torch.manual_seed(0)
    ref = perturb_all(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize(("name", "kwargs"), [("levit_128s", {}), ("levit_512", {"embed_dim": (64, 96)})],
                         ids=["distilled_hardswish", "silu_no_distillation"])
def test_timm_levit_gives_timm_probabilities(tmp_path, name, kwargs):
    ref = _timm(tmp_path, name, **kwargs)
    model = load_posenc(tmp_path)
    assert model.config.distilled == hasattr(ref, "head_dist")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(model(x).softmax(-1), expected, **TOL)
        assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_timm_levit_at_another_size_resizes_biases_as_timm_does(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    # timm's way to move these tables to another resolution: a model built for it, each table resized by timm's
    # resize_rel_pos_bias_table_levit (bicubic over the offset grid), as its TinyViT checkpoint filter does
    big = timm.create_model("levit_128s", pretrained=False, **{**TINY, "img_size": 96}).eval()
    target = big.state_dict()
    state = {k: resize_rel_pos_bias_table_levit(v.T, target[k].shape[::-1]).T if "attention_biases" in k else v
             for k, v in ref.state_dict().items()}  # fmt: skip
    big.load_state_dict(state)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), big(x).softmax(-1), **TOL)
        seen = model.inspect(x)
    # stage 0's block, the subsampling attention (6x6 keys, 3x3 queries), stage 1's block
    assert [(t.layout.query_grid, t.layout.key_grid) for t in seen.blocks] == [((6, 6), (6, 6)), ((3, 3), (6, 6)),
                                                                               ((3, 3), (3, 3))]
    assert seen.blocks[0].position["offset_bias_table"].shape == (2, 6, 6)
    assert seen.blocks[1].position["offset_bias_table"].shape == (4, 6, 6)


def test_levit_refuses_sizes_off_the_stem_stride(tmp_path):
    _timm(tmp_path)
    model = load_posenc(tmp_path)
    with pytest.raises(ValueError, match="not a multiple of LeViT's stem stride 16"):
        model(torch.randn(1, 3, 72, 64))


def test_offset_bias_index_matches_timm_for_attention_and_subsampling():
    attn = timm.models.levit.Attention(dim=16, key_dim=4, num_heads=2, resolution=(3, 5))
    assert torch.equal(offset_bias_index((3, 5)), attn.attention_bias_idxs)
    down = timm.models.levit.AttentionDownsample(16, 16, key_dim=4, num_heads=2, resolution=(5, 4))
    assert torch.equal(offset_bias_index((5, 4), stride=2), down.attention_bias_idxs)
    tiny = timm.models.tiny_vit.Attention(dim=16, key_dim=4, num_heads=2, resolution=(4, 4))
    assert torch.equal(offset_bias_index((4, 4)), tiny.attention_bias_idxs)


def test_levit_inspection_gives_timm_bias_and_attention(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        seen = model.inspect(x)
        tokens = ref.stem(x).flatten(2).transpose(1, 2)  # 1, 16, C
        attn = ref.stages[0].blocks[0].attn
        b, n, _ = tokens.shape
        q, k, _ = attn.qkv(tokens).view(b, n, 2, -1).split([8, 8, 16], dim=3)
        logits = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * attn.scale  # 1, heads, 16, 16
        bias = attn.attention_biases[:, attn.attention_bias_idxs]  # heads, 16, 16
    trace = seen.blocks[0]
    assert_close(trace.pos_bias, bias)
    assert_close(trace.attn, (logits + bias).softmax(-1), **TOL)
    assert_close(trace.attn_no_pos, logits.softmax(-1), **TOL)
    assert_close(trace.position["offset_bias_table"], attn.attention_biases.detach().view(2, 4, 4))
    assert torch.equal(trace.pos_bias, trace.pos_bias.transpose(-2, -1))  # symmetric in query and key


def test_levit_without_position_drops_every_bias(tmp_path):
    ref = _timm(tmp_path)
    model = load_posenc(tmp_path)
    for module in ref.modules():
        if hasattr(module, "attention_biases"):
            module.attention_biases.data.zero_()
            module.attention_bias_cache = {}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        off = model.inspect(x, position=False)
    assert all(t.pos_bias is None and t.attn_no_pos is None and not t.position for t in off.blocks)


HF_LEVIT = dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                key_dim=[8, 8, 8], attention_ratio=[2, 2, 2], mlp_ratio=[2, 2, 2], num_labels=5)


@pytest.mark.parametrize("model_cls", [hf.LevitForImageClassificationWithTeacher, hf.LevitForImageClassification])
def test_transformers_levit_gives_transformers_probabilities(tmp_path, model_cls):
    torch.manual_seed(0)
    ref = perturb_all(model_cls(hf.LevitConfig(**HF_LEVIT)))
    ref.save_pretrained(tmp_path)
    model = load(str(tmp_path)).model  # the transformers key rules are chosen by the config's model_type
    assert model.config.distilled == (model_cls is hf.LevitForImageClassificationWithTeacher)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), ref(pixel_values=x).logits.softmax(-1), **TOL)


def test_transformers_levit_resizes_the_shorter_side_by_256_over_224_as_its_processor_does():
    stated = hf.LevitImageProcessor().to_dict()  # shortest_edge 224, crop 224: the processor resizes to 256 first
    pp = config_from_transformers({"model_type": "levit", **HF_LEVIT}, stated).preprocess
    assert (pp.input_size, pp.crop_mode, pp.crop_pct) == ((224, 224), "center", 224 / 256)


def test_transformers_levit_with_another_stem_is_refused():
    with pytest.raises(UnsupportedModelError, match="stem"):
        config_from_transformers({"model_type": "levit", **HF_LEVIT, "patch_size": 8}, None)


def test_levit_architecture_names_give_their_sizes():
    cfg = config_from_timm({"architecture": "levit_256d.untrained", "num_classes": 1000})
    assert (cfg.embed_dim, cfg.key_dim, cfg.depth, cfg.act_layer, cfg.distilled) == (
        (256, 384, 512), (32, 32, 32), (4, 8, 6), "silu", False)
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*levit_128s.*levit_512d"):
        config_from_timm({"architecture": "levit_conv_128s", "num_classes": 1000})


def test_levit_model_args_contradicting_the_weights_name_key_and_shapes(tmp_path):
    _timm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["img_size"] == [64, 64]
    config["model_args"]["img_size"] = [80, 80]  # a 5x5 stage-0 grid: 25 offsets per head instead of 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"(?s)attention_biases \(2, 16\) in the checkpoint vs \(2, 25\)"):
        load(str(tmp_path))
