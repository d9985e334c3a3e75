"""Registers and headless models in the views: the prefix-attention view and what a model without classifier shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import posenc
from posenc import mechanisms, views
from posenc.models import ViTConfig, build_model
from posenc.preprocess import Preprocess


def _folder(tmp_path: Path, **fields: object) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                       preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0), **fields)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # peaked, uneven attention
    model.save_pretrained(tmp_path)
    return tmp_path


def _seen(folder: Path) -> views.Seen:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    return views.inspect_image(posenc.load(str(folder)), photo)


@pytest.mark.parametrize(
    ("fields", "groups", "prefix"),
    [
        (dict(reg_tokens=4, no_embed_class=True, num_classes=0), ("cls", "registers", "patches"), 5),
        (dict(reg_tokens=1, class_token=False, global_pool="avg", num_classes=3), ("registers", "patches"), 1),
        (dict(distilled=True, num_classes=3), ("cls", "dist", "patches"), 2),
    ],
)
def test_prefix_attention_shares_match_the_attention_summed_by_group(tmp_path, fields, groups, prefix):
    seen = _seen(_folder(tmp_path, **fields))
    view = views.prefix_attention_view(seen, 1, (0, 0))
    shares = view.arrays["prefix_attention_share"]
    assert tuple(view.arrays["prefix_attention_groups"]) == groups
    assert shares.shape == (3, 2, len(groups))
    names = seen.inspection.prefix_labels
    for b, trace in enumerate(seen.inspection.blocks):
        attn = trace.attn[0].double().numpy()  # heads, N, N
        queries = attn[:, prefix:, :]  # heads, patches, N
        for g, group in enumerate(groups):
            if group == "patches":
                keys = range(prefix, attn.shape[-1])
            elif group == "registers":
                keys = [i for i, n in enumerate(names) if n.startswith("reg")]
            else:
                keys = [names.index(group)]
            expected = queries[:, :, list(keys)].sum(axis=-1).mean(axis=-1)  # heads
            np.testing.assert_allclose(shares[b, :, g], expected, atol=1e-6)
    np.testing.assert_allclose(shares.sum(axis=-1), 1.0, atol=1e-5)
    assert shares[..., :-1].max() > 0.05  # prefix tokens do get attention in these random models
    assert view.image.mode == "RGB" and view.image.width > 200


def test_prefix_view_is_unavailable_without_prefix_tokens(tmp_path):
    seen = _seen(_folder(tmp_path, class_token=False, global_pool="avg", num_classes=3))
    with pytest.raises(views.ViewUnavailable, match="no cls token or registers"):
        views.prefix_attention_view(seen, 0, (0, 0))


def test_register_names_come_after_cls(tmp_path):
    seen = _seen(_folder(tmp_path, reg_tokens=4, no_embed_class=True, num_classes=0))
    assert seen.inspection.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
    assert seen.inspection.pos_embed.shape == (1, 16, 32) and seen.inspection.pos_embed_prefix == 0


def test_headless_model_says_it_has_no_classifier_and_every_view_still_draws(tmp_path):
    folder = _folder(tmp_path, reg_tokens=4, no_embed_class=True, num_classes=0)
    loaded = posenc.load(str(folder))
    assert loaded.headless and loaded.labels == []
    photo = Image.new("RGB", (32, 32), (120, 30, 200))
    assert loaded.predict(photo) == []
    seen = views.inspect_image(loaded, photo)
    assert seen.inspection.logits.shape == (1, 32)  # the pooled (normed cls) features
    assert views.predictions(seen) == {views.NO_CLASSIFIER: 0.0}
    drawn = [*(k.view for k in mechanisms.kind_views(seen, "absolute", 2, (1, 2))), views.attention_view(seen, 2, (1, 2)),
             views.prefix_attention_view(seen, 2, (1, 2))]
    assert all(v.image.width > 0 for v in drawn)
    npz = np.load(views.save_npz(tmp_path / "out.npz", seen, (1, 2), 2, drawn))
    np.testing.assert_allclose(npz["features"], seen.inspection.logits[0].numpy())
    assert "probabilities" not in npz and npz["prefix_attention_share"].shape == (3, 2, 3)


def test_cli_predict_says_a_headless_model_has_no_classifier(tmp_path, capsys):
    from posenc.cli import main

    folder = _folder(tmp_path / "m", num_classes=0)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    assert main(["predict", "--model", str(folder), str(image)]) == 0
    assert "no classifier head" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "size"), [("vit_small_patch14_reg4_dinov2", 56), ("vit_base_patch16_siglip_224", 64)])
def test_app_analyses_a_headless_timm_checkpoint_without_failing(tmp_path, name, size):
    import timm
    from timm.models import save_for_hf

    from posenc.app import Catalog, Handlers, HubStatus, ModelCache

    folder = tmp_path / name
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, embed_dim=32, depth=2, num_heads=2)
    save_for_hf(ref, folder, safe_serialization=True)
    handlers = Handlers(cache=ModelCache(posenc.load), catalog=Catalog.build(tmp_path / "none", [], [folder]),
                        hub=HubStatus(lambda: False))
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(image)
    out = handlers.api.analyse(str(image), str(folder.resolve()), None, 1, 1, 2, progress=lambda *a, **k: None)
    assert out[1] == views.NO_CLASSIFIER  # the label shows the words, not a 0 % class
    assert out[-3] is not None and out[-2] is not None  # the attention picture and the .npz
