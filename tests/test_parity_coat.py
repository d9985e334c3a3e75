"""CoaT parity: timm ``coat_*`` checkpoints (lite and full; random weights, Hub layout) give timm's probabilities in
posenc, and the inspection gives the CPE and CRPE terms timm computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_model
from timm.models import save_for_hf
from torch.testing import assert_close

from posenc import measure, mechanisms, views
from posenc.convert import UnsupportedModelError, config_from_timm
from posenc.hub import load
from posenc.models import TIMM_PRESETS, CoaTConfig
from tests.test_parity import load_posenc, perturb

TOL = {"atol": 1e-4, "rtol": 1e-4}
#: tiny CoaT: one serial block per stage, 8 heads of 2-4 channels (CRPE windows 3/5/7 over 2/3/3 heads), 64 px (stage
#: grids 16, 8, 4, 2); the full one adds two parallel blocks over scales 2-4.
TINY = {
    "coat_lite_tiny": {"embed_dims": (16, 24, 32, 32), "serial_depths": (1, 1, 1, 2), "img_size": 64},
    "coat_tiny": {"embed_dims": (16, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "parallel_depth": 2, "img_size": 64},
}
NAMES = sorted(TINY)
PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def _timm(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=7, **{**TINY[name], **kwargs})


def _reference(tmp_path, name, **kwargs):
    """A perturbed tiny timm CoaT saved in the timm Hub layout (pytorch_model.bin: timm shares modules, which
    safetensors refuses to write under several names)."""
    torch.manual_seed(0)
    ref = perturb(_timm(name, **kwargs))
    save_for_hf(ref, tmp_path, safe_serialization=False)
    return ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_coat_checkpoint_gives_timm_probabilities(tmp_path, name, global_pool):
    ref = _reference(tmp_path, name, global_pool=global_pool)
    model = load_posenc(tmp_path)
    assert model.mechanisms == ("conv_pos", "conv_rel_pos")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _probs(ref(x))
        assert_close(_probs(model(x)), expected, **TOL)
        assert_close(_probs(model.inspect(x).logits), expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 96), (128, 64)], ids=["64x96", "128x64"])
def test_coat_at_another_size_matches_timm_built_for_it(tmp_path, name, size):
    ref = _reference(tmp_path, name)
    model = load_posenc(tmp_path)
    # timm's CoaT only takes the size it was built for; nothing in it depends on the size, so the same weights load
    other = _timm(name, img_size=size).eval()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_close(_probs(model(x)), _probs(other(x)), **TOL)


def test_checkpoint_keeping_each_shared_module_under_one_name_loads_too(tmp_path):
    ref = _reference(tmp_path, "coat_tiny")
    (tmp_path / "pytorch_model.bin").unlink()
    save_model(ref, str(tmp_path / "model.safetensors"))  # safetensors keeps one name per shared tensor
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(_probs(model(x)), _probs(ref(x)), **TOL)


def test_inspection_gives_timm_cpe_and_crpe_terms(tmp_path):
    ref = _reference(tmp_path, "coat_tiny")
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 96)
    other = _timm("coat_tiny", img_size=(64, 96)).eval()
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
        seen = model.inspect(x)
        tokens = torch.cat([other.cls_token1, other.patch_embed1(x)], dim=1)  # 1, 1 + 16*24, 16
        feat = tokens[:, 1:].transpose(1, 2).reshape(1, 16, 16, 24)
        cpe = other.cpe1.proj(feat)  # 1, 16, 16, 24
        y = other.serial_blocks1[0].norm1(other.cpe1(tokens, (16, 24)))
        attn = other.serial_blocks1[0].factoratt_crpe
        q, k, v = attn.qkv(y).reshape(1, -1, 3, 8, 2).permute(2, 0, 3, 1, 4)  # 1, heads, N, hd each
        crpe = other.crpe1(q, v, size=(16, 24))[:, :, 1:]  # 1, heads, 384, 2
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # 1, heads, 2, 2
    first = seen.blocks[0]
    assert first.grid == (16, 24) and first.stage == 0
    assert_close(first.position["conv_pos"], cpe, **TOL)
    assert_close(first.position["conv_rel_pos"], crpe, **TOL)
    assert_close(first.attn, context, **TOL)  # channels over channels: no token map
    # 4 serial blocks, then 2 parallel blocks x scales 2-4, each with its own CPE and CRPE terms
    assert len(seen.blocks) == model.num_blocks == 4 + 2 * 3
    assert [t.stage for t in seen.blocks] == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert [t.grid for t in seen.blocks[4:7]] == [(8, 12), (4, 6), (2, 3)]
    assert all(set(t.position) == {"conv_pos", "conv_rel_pos"} for t in seen.blocks)
    assert all(t.layout is None and "no token-to-token map" in t.no_layout for t in seen.blocks)


def test_crpe_gives_each_head_group_its_window(tmp_path):
    _reference(tmp_path, "coat_lite_tiny")
    model = load_posenc(tmp_path)
    with torch.no_grad():
        term = model.inspect(torch.zeros(1, 3, 64, 64)).blocks[0].position["conv_rel_pos"][0]  # heads, 256, hd
    norm = term.norm(dim=-1).reshape(8, 16, 16)  # heads, h, w: constant input, so only the zero padding shows
    for heads, window in ((range(2), 3), (range(2, 5), 5), (range(5, 8), 7)):
        band = window // 2 + 1  # the CPE before it reads one row of padding, the head's kernel window // 2 more
        for h in heads:
            inner = norm[h, band:-band, band:-band]
            assert_close(inner, inner.mean().expand_as(inner), atol=1e-4, rtol=1e-3)
            assert (norm[h, band - 1, band:-band] - inner.mean()).abs().max() > 1e-4


def test_coat_without_position_leaves_cpe_and_crpe_out(tmp_path):
    ref = _reference(tmp_path, "coat_tiny")
    model = load_posenc(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        off = model.inspect(x, position=False)
        assert_close(model(x, position=False), off.logits)
        for i in range(1, 5):  # timm with every CPE and CRPE conv zeroed is the model without position
            for conv in [getattr(ref, f"cpe{i}").proj, *getattr(ref, f"crpe{i}").conv_list]:
                conv.weight.zero_()
                conv.bias.zero_()
        assert_close(_probs(off.logits), _probs(ref(x)), **TOL)
        assert not torch.allclose(off.logits, model(x))
    assert all(t.position == {} for t in off.blocks)


def test_every_timm_coat_name_has_a_preset_with_its_sizes():
    names = set(timm.list_models("coat_*"))
    assert names == {n for n, (arch, _) in TIMM_PRESETS.items() if arch.config is CoaTConfig}
    for name in names:
        with torch.device("meta"):  # sizes only
            ref = timm.create_model(name, pretrained=False)
        cfg = config_from_timm({"architecture": f"{name}.in1k", "num_classes": 1000})
        assert cfg.embed_dims == tuple(ref.embed_dims) and cfg.parallel_depth == ref.parallel_depth
        assert cfg.serial_depths == tuple(len(getattr(ref, f"serial_blocks{i}")) for i in range(1, 5))
        assert cfg.mlp_ratios == tuple(getattr(ref, f"serial_blocks{i}")[0].mlp.fc1.out_features / d
                                       for i, d in enumerate(cfg.embed_dims, start=1))
        assert cfg.img_size == tuple(ref.patch_embed1.img_size)


def test_crpe_window_from_timm_model_args_json():
    cfg = config_from_timm({"architecture": "coat_lite_tiny", "num_classes": 10,
                            "model_args": {"crpe_window": {"3": 4, "5": 4}}})
    assert cfg.crpe_window == ((3, 4), (5, 4))
    with pytest.raises(UnsupportedModelError, match="not num_heads=8"):
        config_from_timm({"architecture": "coat_lite_tiny", "num_classes": 10, "model_args": {"crpe_window": {"3": 4}}})


def test_unknown_coat_variant_lists_supported_architectures():
    with pytest.raises(UnsupportedModelError, match=r"(?s)not supported.*coat_lite_tiny"):
        config_from_timm({"architecture": "coat_huge", "num_classes": 1000})


# ------------------------------------------------------------------------------------------------ views and measures


@pytest.fixture(scope="module")
def coat_seen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coat")
    ref = _reference(folder, "coat_tiny")
    return ref, views.inspect_image(load(str(folder)), PHOTO, (64, 96))


def test_cpe_view_draws_this_images_and_a_blank_images_contribution(coat_seen):
    _, seen = coat_seen
    view = mechanisms.get("conv_pos").views[0].draw(seen, 5, (3, 5))  # a parallel block's scale 3
    assert int(view.arrays["conv_pos_block"]) == 5 and view.arrays["block_grid"].tolist() == [4, 6]
    np.testing.assert_allclose(view.arrays["conv_pos_norm"],
                               seen.inspection.blocks[5].position["conv_pos"][0].norm(dim=0).numpy(), atol=1e-6)
    blank = view.arrays["conv_pos_norm_blank"]
    assert blank.shape == (4, 6) and np.isfinite(blank).all()


def test_crpe_view_has_a_map_per_head_for_this_and_a_blank_image(coat_seen):
    ref, seen = coat_seen
    view = mechanisms.get("conv_rel_pos").views[0].draw(seen, 0, (3, 5))
    assert view.arrays["crpe_norm"].shape == view.arrays["crpe_norm_blank"].shape == (8, 16, 24)
    with torch.no_grad():  # the blank image: 0 after normalisation
        other = _timm("coat_tiny", img_size=(64, 96)).eval()
        other.load_state_dict(ref.state_dict())
        tokens = torch.cat([other.cls_token1, other.patch_embed1(torch.zeros(1, 3, 64, 96))], dim=1)
        y = other.serial_blocks1[0].norm1(other.cpe1(tokens, (16, 24)))
        q, _, v = other.serial_blocks1[0].factoratt_crpe.qkv(y).reshape(1, -1, 3, 8, 2).permute(2, 0, 3, 1, 4)
        expected = other.crpe1(q, v, size=(16, 24))[0, :, 1:].norm(dim=-1).reshape(8, 16, 24)
    np.testing.assert_allclose(view.arrays["crpe_norm_blank"], expected.numpy(), atol=1e-4)


def test_conv_views_say_why_without_position(coat_seen):
    _, seen = coat_seen
    off = dataclasses.replace(seen, inspection=seen.loaded.model.inspect(torch.zeros(1, 3, 64, 96), position=False))
    for name in ("conv_pos", "conv_rel_pos"):
        with pytest.raises(views.ViewUnavailable, match="adds no convolutional"):
            mechanisms.get(name).views[0].draw(off, 0, (0, 0))


def test_coat_folder_measurement_reports_every_block_as_without_a_token_map(tmp_path):
    _reference(tmp_path / "model", "coat_lite_tiny")
    loaded = load(str(tmp_path / "model"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        PHOTO.rotate(90 * i).save(images / f"p{i}.png")
    found = measure.measure_folder(loaded, sorted(images.iterdir()), batch=3, sizes=[(64, 64)], seeds=(0,))
    record = found.to_json()
    assert record["images"] == 3 and len(record["mean_attention_distance"]) == 5
    assert all(v is None for heads in record["mean_attention_distance"] for v in heads)


def test_the_blank_image_runs_once_per_request_for_every_convolutional_view(coat_seen, monkeypatch):
    _, seen = coat_seen
    fresh = views.Seen(seen.name, seen.loaded, seen.photo, seen.size, seen.inspection)  # a new request
    runs = []
    inspect = seen.loaded.model.inspect
    monkeypatch.setattr(seen.loaded.model, "inspect", lambda x, **kw: runs.append(x.abs().max()) or inspect(x, **kw))
    drawn = [spec.draw(fresh, 0, (3, 5)) for name in ("conv_pos", "conv_rel_pos") for spec in mechanisms.get(name).views]
    assert len(drawn) == 3 and runs == [0.0]  # one blank (all-zero) input for the three views
    assert dataclasses.replace(fresh, size=fresh.size).derived == {}  # a changed request starts afresh
