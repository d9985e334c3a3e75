"""Swin V2 parity: timm ``swinv2_*`` (with and without a pretrained window), ``swinv2_cr_*``, transformers ``swinv2`` and
``data2vec-vision`` checkpoints, saved in their Hub layouts, give the reference probabilities in posenc, at the native
size and at another size; plus the continuous-position-bias coordinates and the messages for bad checkpoints.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import transformers as hf
from safetensors.torch import load_file, save_file
from test_parity import perturb
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc.convert import UnsupportedModelError, config_from_timm, convert_state_dict, supported_table
from posenc.encodings import cpb_coords
from posenc.hub import HubLoadError, load
from posenc.models import SwinV2Config, build_model

TOL = dict(atol=1e-4, rtol=1e-4)
# tiny widths and one block per stage keep every case well under a second
_SMALL = dict(embed_dim=16, num_heads=(1, 2, 2, 4))
TIMM_CASES = {
    # native 128: stage grids 32, 16, 8, 4 with window 8 (4 in the last stage); at 64 two stages shrink their windows
    "swinv2": ("swinv2_tiny_window8_256", dict(_SMALL, depths=(2, 2, 1, 1), img_size=128), (64, 64)),
    # fine-tuned from window 12 (6 in the last stage): offsets normalised by the pretrained window
    "swinv2_pretrained_window": (
        "swinv2_base_window12to16_192to256", dict(_SMALL, depths=(2, 1, 1, 1), img_size=128), (64, 64)
    ),
    # natural-log offsets, bias as is, extra stage norms; a larger input keeps the window and adds windows
    "swinv2_cr": ("swinv2_cr_tiny_ns_224", dict(_SMALL, depths=(2, 2, 1, 1), img_size=128, window_size=4), (256, 256)),
}


def _timm_at(name: str, kwargs: dict, size: tuple[int, int], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The timm model built at ``size`` with the same windows (as ``create_model(img_size=...)`` builds it)."""
    window = config_from_timm({"architecture": name, "model_args": kwargs}).window_size
    ref = timm.create_model(name, pretrained=False, **{**kwargs, "img_size": size, "window_size": window})
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_swinv2_checkpoint_gives_reference_probabilities_at_two_sizes(tmp_path, case):
    name, kwargs, other = TIMM_CASES[case]
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **kwargs))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load(str(tmp_path)).model
    for size in (model.config.img_size, other):
        reference = ref if size == model.config.img_size else _timm_at(name, kwargs, size, ref.state_dict())
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = reference(x).softmax(-1)
            assert_close(model(x).softmax(-1), expected, **TOL)
            assert_close(model.inspect(x).logits.softmax(-1), expected, **TOL)


def test_pretrained_window_normalises_the_offsets(tmp_path):
    name, kwargs, _ = TIMM_CASES["swinv2_pretrained_window"]
    ref = timm.create_model(name, pretrained=False, **kwargs)
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = load(str(tmp_path)).model
    assert model.config.pretrained_window_sizes == (12, 12, 12, 6)
    for stage in range(4):
        theirs, ours = ref.layers[stage].blocks[0].attn, model.layers[stage].blocks[0].attn
        assert ours.window == tuple(theirs.window_size) and ours.pretrained_window == tuple(theirs.pretrained_window_size)
        assert_close(ours.relative_coords_table, theirs.relative_coords_table[0])


@pytest.mark.parametrize(("span", "normaliser"), [((3, 2), (3, 2)), ((4, 4), (12, 12)), ((5, 3), None)])
def test_cpb_coords_are_signed_logs_of_the_scaled_offsets(span, normaliser):
    coords = cpb_coords(span, normaliser=normaliser)
    assert coords.shape == (2 * span[0] - 1, 2 * span[1] - 1, 2)
    for i, dy in enumerate(range(-(span[0] - 1), span[0])):
        for j, dx in enumerate(range(-(span[1] - 1), span[1])):
            for axis, d in enumerate((dy, dx)):
                if normaliser is None:
                    want = math.copysign(math.log(1 + abs(d)), d)
                else:
                    t = d / max(normaliser[axis] - 1, 1) * 8
                    want = math.copysign(math.log2(1 + abs(t)) / 3, t)
                assert coords[i, j, axis].item() == pytest.approx(want, abs=1e-6)


def test_position_false_keeps_the_cosine_attention_and_drops_only_the_bias():
    torch.manual_seed(0)
    model = perturb(build_model(SwinV2Config(img_size=64, embed_dim=16, depths=(2, 1), num_heads=(2, 2), window_size=4,
                                             pretrained_window_sizes=(0, 0), num_classes=5)))  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        seen, plain = model.inspect(x), model.inspect(x, position=False)
        assert_close(model(x, position=False), plain.logits, **TOL)
    assert not torch.allclose(seen.logits, plain.logits, atol=1e-3)
    assert plain.blocks[0].pos_bias is None and "cpb_table" not in plain.blocks[0].position
    # without the bias, the inspection's attention equals the full call's attention with its position term left out
    assert_close(plain.blocks[0].attn, seen.blocks[0].attn_no_pos, **TOL)


HF_SWINV2 = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=32, patch_size=2, window_size=4, num_labels=5)
HF_BEIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_labels=5)  # fmt: skip
HF_CASES = {
    "swinv2": (hf.Swinv2ForImageClassification, hf.Swinv2Config(**HF_SWINV2)),
    "swinv2_pretrained_window": (
        hf.Swinv2ForImageClassification, hf.Swinv2Config(**HF_SWINV2, pretrained_window_sizes=[3, 2])
    ),
    "data2vec_vision": (
        hf.Data2VecVisionForImageClassification, hf.Data2VecVisionConfig(**HF_BEIT, use_relative_position_bias=True)
    ),
    "data2vec_vision_shared_bias_token_pool": (
        hf.Data2VecVisionForImageClassification,
        hf.Data2VecVisionConfig(**HF_BEIT, use_shared_relative_position_bias=True, use_mean_pooling=False),
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_checkpoint_gives_reference_probabilities(tmp_path, case):
    model_cls, config = HF_CASES[case]
    torch.manual_seed(0)
    ref = perturb(model_cls(config))
    ref.save_pretrained(tmp_path)
    model = load(str(tmp_path)).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), ref(pixel_values=x).logits.softmax(-1), **TOL)


def test_transformers_swinv2_at_another_size(tmp_path):
    """At 64 px the stage grids (32, 16) stay multiples of the window 4, so transformers keeps its windows."""
    torch.manual_seed(0)
    ref = perturb(hf.Swinv2ForImageClassification(hf.Swinv2Config(**HF_SWINV2)))
    ref.save_pretrained(tmp_path)
    model = load(str(tmp_path)).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), ref(pixel_values=x).logits.softmax(-1), **TOL)


def _next_layout(key: str) -> str:
    """A key of today's transformers layout as the q_proj/k_proj/v_proj/o_proj layout spells it."""
    for old, new in (("attention.self.query", "attention.q_proj"), ("attention.self.key", "attention.k_proj"),
                     ("attention.self.value", "attention.v_proj"), ("attention.attention.query", "attention.q_proj"),
                     ("attention.attention.key", "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
                     ("attention.output.dense", "attention.o_proj"),
                     ("attention.attention.relative_position_bias.", "attention.relative_position_bias."),
                     ("attention.self.continuous_position_bias_mlp", "attention.continuous_position_bias_mlp"),
                     ("attention.self.logit_scale", "attention.logit_scale")):  # fmt: skip
        key = key.replace(old, new)
    return key


@pytest.mark.parametrize("case", ["swinv2", "data2vec_vision"])
def test_transformers_q_proj_layout_loads_like_todays(tmp_path, case):
    model_cls, config = HF_CASES[case]
    torch.manual_seed(0)
    ref = perturb(model_cls(config))
    ref.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {_next_layout(k): v for k, v in weights.items()}
    assert any(".q_proj." in k for k in renamed) and renamed.keys() != weights.keys()
    save_file(renamed, tmp_path / "model.safetensors")
    model = load(str(tmp_path)).model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x).softmax(-1), ref(pixel_values=x).logits.softmax(-1), **TOL)


def test_pretrained_windows_that_do_not_fit_the_stages_are_named(tmp_path):
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **TIMM_CASES["swinv2"][1])
    save_for_hf(ref, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["pretrained_window_sizes"] = [12, 12, 6]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"pretrained_window_sizes \(12, 12, 6\) has 3 entries for 4 stages"):
        load(str(tmp_path))


def test_model_args_contradicting_the_weights_name_the_key_and_shapes(tmp_path):
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **TIMM_CASES["swinv2"][1])
    save_for_hf(ref, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["num_heads"] = [2, 2, 2, 4]  # stage 0 has 1 head in the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match=r"layers\.0\.blocks\.0\.attn\.cpb_mlp\.2\.weight \(1, 512\) in the checkpoint "
                                           r"vs \(2, 512\) in the model"):  # fmt: skip
        load(str(tmp_path))


def test_headless_swinv2_returns_pooled_features():
    torch.manual_seed(0)
    cfg = SwinV2Config(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
                       pretrained_window_sizes=(0, 0), num_classes=0)  # fmt: skip
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model(x)
        stage_out = model.layers[1].blocks[0](model.layers[1].downsample(model.layers[0].blocks[0](
            model.patch_embed(x), False)[0]), False)[0]  # fmt: skip
    assert features.shape == (2, 32)
    assert_close(features, model.norm(stage_out).mean(dim=(1, 2)))


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256.ms_in1k", "swinv2_cr_small_ns_224.sw_in1k"])
def test_swinv2_names_are_in_the_supported_list(name):
    config = config_from_timm({"architecture": name, "num_classes": 1000})
    assert isinstance(config, SwinV2Config)
    assert f"`{name.split('.')[0]}`" in supported_table()


def test_unsupported_architecture_message_names_the_swinv2_family():
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*swinv2_cr_tiny_224.*swinv2_tiny_window8_256"):
        config_from_timm({"architecture": "swinv3_tiny", "num_classes": 1000})


def test_cr_weights_are_renamed_to_the_swinv2_layout():
    ref = timm.create_model("swinv2_cr_tiny_224", pretrained=False, **TIMM_CASES["swinv2_cr"][1])
    cfg = config_from_timm({"architecture": "swinv2_cr_tiny_224", "model_args": TIMM_CASES["swinv2_cr"][1]})
    state = convert_state_dict("timm", ref.state_dict(), cfg)
    assert_close(state["layers.1.blocks.0.attn.cpb_mlp.2.bias"], ref.state_dict()["stages.1.blocks.0.attn.meta_mlp.fc2.bias"])
    assert set(state) == set(build_model(cfg).state_dict())


def test_posenc_swinv2_checkpoint_round_trips_through_load(tmp_path):
    torch.manual_seed(0)
    cfg = SwinV2Config(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=3,
                       pretrained_window_sizes=(3, 0), cpb_hidden=32)  # fmt: skip
    ref = perturb(build_model(cfg))
    ref.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    assert loaded.model.config == cfg and loaded.model.mechanisms == ("cpb",)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded.model(x), ref(x), **TOL)


def test_input_size_a_window_cannot_tile_names_sizes_that_work():
    model = build_model(SwinV2Config(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1)))  # 256, window 8
    with pytest.raises(ValueError, match=r"384x256 does not fit.*heights that work near 384: 64, 128, 256, 512"):
        model(torch.randn(1, 3, 384, 256))
