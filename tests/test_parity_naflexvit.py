"""NaFlexViT parity: timm ``naflexvit_*`` checkpoints (random weights, Hub layout) give timm's probabilities in posenc
on a plain image tensor, at the native size and at non-square sizes; the embedding as added is timm's."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from torch.testing import assert_close

import posenc
from posenc import views
from posenc.convert import config_from_timm
from posenc.mechanisms import naflex
from posenc.models import NaFlexViT, NaFlexViTConfig, build_model
from tests.test_parity import perturb

TOL = dict(atol=1e-4, rtol=1e-4)
#: 32 px at patch 8 is a 4x4 grid, the table's own: the native size uses the table as stored
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, pos_embed_grid_size=(4, 4), num_classes=5)
#: one tiny build per kind: 2D bicubic (antialiased), aspect-preserving 2D, factorised, SigLIP-2 (bilinear, MAP
#: head), C-RADIO (cls token, bilinear with align_corners, no antialias, aspect-preserving, no final norm)
KINDS = {
    "gap": "naflexvit_base_patch16_gap",
    "par": "naflexvit_base_patch16_par_gap",
    "parfac": "naflexvit_base_patch16_parfac_gap",
    "siglip": "naflexvit_base_patch16_siglip",
    "radio": "naflexvit_base_patch16_radio_v3",
}
#: native square, and a taller one (rows upsampled, columns shrunk: antialias matters)
SIZES = [(32, 32), (48, 24)]


def _timm(folder, name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    save_for_hf(ref, folder, safe_serialization=True)
    return ref


def _added(ref: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The embedding timm adds at a grid: its own method applied to zeros. (1, h*w, C)"""
    zeros = torch.zeros(1, grid[0] * grid[1], TINY["embed_dim"])
    if ref.embeds.pos_embed_type == "factorized":
        ref.embeds._apply_factorized_pos_embed(zeros, grid_size=list(grid))
    else:
        ref.embeds._apply_learned_pos_embed(zeros, grid_size=list(grid))
    return zeros


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_naflexvit_gives_timm_probabilities_on_a_plain_image(tmp_path, kind, size):
    ref = _timm(tmp_path, KINDS[kind])
    loaded = posenc.load(str(tmp_path))
    assert isinstance(loaded.model, NaFlexViT) and loaded.model.config.img_size == (32, 32)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref(x).softmax(-1)
        assert_close(loaded.model(x).softmax(-1), expected, **TOL)
        assert_close(loaded.model.inspect(x).logits.softmax(-1), expected, **TOL)


@pytest.mark.parametrize("kind", ["gap", "par", "parfac", "radio"])
def test_naflexvit_inspection_gives_timm_embedding_as_added_and_at_the_square_grid(tmp_path, kind):
    ref = _timm(tmp_path, KINDS[kind])
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 48, 24))  # a 6x3 grid
        assert seen.grid == (6, 3) and seen.pos_embed_prefix == 0
        assert_close(seen.pos_embed, _added(ref, (6, 3)), **TOL)
        assert_close(seen.position["pos_embed_square"], _added(ref, (6, 6)), **TOL)
    n = model.config.num_prefix_tokens + 18
    assert all(b.attn.shape == (1, 2, n, n) for b in seen.blocks)
    assert_close(seen.blocks[0].attn.sum(-1), torch.ones(1, 2, n))


def test_naflexvit_factorised_tables_are_timm_rows_and_columns(tmp_path):
    ref = _timm(tmp_path, KINDS["parfac"])
    model = posenc.load(str(tmp_path)).model
    with torch.no_grad():
        seen = model.inspect(torch.randn(1, 3, 48, 24))
    rows, cols = seen.position["pos_embed_rows"], seen.position["pos_embed_cols"]
    assert (rows.shape, cols.shape) == ((6, 32), (3, 32))
    # aspect-preserving: both tables resized to 6 entries; the columns keep the first 3
    both = torch.nn.functional.interpolate(ref.embeds.pos_embed_x.detach().permute(0, 2, 1), size=6, mode="linear")
    assert_close(cols, both[0].T[:3])
    assert_close(seen.pos_embed[0].view(6, 3, 32), rows[:, None] + cols[None, :])


def test_naflexvit_without_position_equals_timm_with_zero_tables(tmp_path):
    ref = _timm(tmp_path, KINDS["gap"])
    model = posenc.load(str(tmp_path)).model
    ref.embeds.pos_embed.data.zero_()
    x = torch.randn(1, 3, 48, 24)
    with torch.no_grad():
        assert_close(model(x, position=False), ref(x), **TOL)
        assert model.inspect(x, position=False).pos_embed is None


def test_naflexvit_presets_cover_every_timm_name_with_timm_parameter_counts():
    names = timm.list_models("naflexvit_*")
    assert set(names) <= set(posenc.models.TIMM_PRESETS)
    for name in names:
        config = config_from_timm({"architecture": f"{name}.tag", "num_classes": 1000})
        with torch.device("meta"):
            ours = sum(p.numel() for p in build_model(config).parameters())
            theirs = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=1000).parameters())
        assert ours == theirs, name


def test_naflexvit_radio_preset_resamples_like_radio():
    config = config_from_timm({"architecture": "naflexvit_base_patch16_radio_v3.c_radio", "num_classes": 0})
    assert (config.pos_embed_grid_size, config.pos_embed_interp_mode, config.pos_embed_align_corners) == (
        (128, 128), "bilinear", True)
    assert config.pos_embed_ar_preserving and not config.pos_embed_antialias
    assert config.mechanisms == ("learned", "aspect_resample") and config.num_prefix_tokens == 8


def _seen(tmp_path, kind: str, size: tuple[int, int]) -> views.Seen:
    _timm(tmp_path, KINDS[kind])
    loaded = posenc.load(str(tmp_path))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    return views.inspect_image(loaded, photo, size)


@pytest.mark.parametrize(("kind", "crop"), [("par", True), ("gap", False)], ids=["aspect_preserving", "squeezed"])
def test_aspect_view_shows_the_crop_of_the_square_grid_only_when_aspect_preserving(tmp_path, kind, crop):
    seen = _seen(tmp_path, kind, (48, 24))
    view = naflex.square_vs_aspect(seen, 0, (5, 2))
    here, square = view.arrays["pos_embed"], view.arrays["pos_embed_square"]
    assert (here.shape, square.shape) == ((18, 32), (36, 32))
    top_left = square.reshape(6, 6, 32)[:, :3].reshape(18, 32)
    assert np.allclose(here, top_left, atol=1e-5) is crop
    assert view.arrays["similarity_to_square"].shape == (6, 6)
    assert bool(np.isclose(view.arrays["similarity_to_square"][5, 2], 1.0, atol=1e-5)) is crop
    assert view.image.height > view.image.width  # two rows: the pair, then the similarity (fits the app column)


def test_rows_columns_view_draws_the_factorised_tables(tmp_path):
    seen = _seen(tmp_path, "parfac", (48, 24))
    view = naflex.rows_and_columns(seen, 0, (0, 0))
    rows, cols = view.arrays["row_similarity"], view.arrays["column_similarity"]
    assert np.allclose(np.diag(rows), 1.0, atol=1e-5) and np.isnan(cols[3:]).all() and not np.isnan(cols[:3, :3]).any()
    with pytest.raises(views.ViewUnavailable, match="factorised row table"):
        naflex.rows_and_columns(_seen(tmp_path / "gap", "gap", (32, 32)), 0, (0, 0))


def test_naflexvit_config_refuses_token_pooling_without_cls():
    with pytest.raises(ValueError, match="class_token"):
        NaFlexViTConfig(global_pool="token")


@pytest.mark.parametrize("arg", [{"rope_type": "axial"}, {"embed_proj_type": "conv"}, {"dynamic_img_pad": True}])
def test_naflexvit_options_posenc_does_not_build_are_refused_by_name(arg):
    from posenc.convert import UnsupportedModelError

    key = next(iter(arg))
    with pytest.raises(UnsupportedModelError, match=rf"naflexvit_base_patch16_gap.*{key}"):
        config_from_timm({"architecture": "naflexvit_base_patch16_gap.e300_s576_in1k", "model_args": arg})


@pytest.mark.parametrize("pos_embed", ["learned", "factorized"])
def test_naflexvit_folder_measurement_runs_at_a_non_square_size(tmp_path, pos_embed):
    import math

    from posenc import measure
    from posenc.preprocess import Preprocess

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = NaFlexViTConfig(**{**TINY, "reg_tokens": 1, "global_pool": "avg", "pos_embed": pos_embed},
                             preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0))
    torch.manual_seed(0)
    build_model(config).save_pretrained(tmp_path / "model")
    loaded = posenc.load(str(tmp_path / "model"))
    record = measure.measure_folder(loaded, sorted(images.iterdir()), batch=2, sizes=[(32, 48)], seeds=(0,)).to_json()
    measured = [v for heads in record["mean_attention_distance"] for v in heads if v is not None]
    assert record["images"] == 4 and measured and all(0 < v < 48 * math.sqrt(2) for v in measured)
