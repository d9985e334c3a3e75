"""Token norms against the block outputs of timm's own model, for a ViT with registers."""

from __future__ import annotations

import numpy as np
import timm
import torch
from timm.models import save_for_hf
from torch.testing import assert_close

import posenc
from posenc.measure import Decodability
from posenc.norms import (
    HIGH_NORM_FACTOR,
    HIGH_NORM_RULE,
    NormStats,
    inspect_with_outputs,
    norms_summary,
)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def test_token_norms_equal_timm_block_output_norms_with_registers(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, embed_dim=64,
                                    num_heads=2, img_size=70))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    x = torch.randn(2, 3, 70, 70)
    outs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _a, out: outs.append(out)) for blk in ref.blocks]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    _, found = inspect_with_outputs(loaded.model, x)
    assert len(found) == len(outs) == 2
    for block, out in zip(found, outs):
        norms = out.double().norm(dim=-1)  # B, 1 + 4 + 25
        assert block.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
        assert_close(torch.from_numpy(block.prefix).double(), norms[:, :5], atol=1e-3, rtol=1e-4)
        patches = norms[:, 5:].reshape(2, 5, 5)  # B, h, w row-major
        assert_close(torch.from_numpy(block.patches).double(), patches, atol=1e-3, rtol=1e-4)
        threshold = HIGH_NORM_FACTOR * norms[:, 5:].median(dim=-1).values
        assert_close(torch.from_numpy(block.threshold).double(), threshold, atol=1e-3, rtol=1e-4)
        assert np.array_equal(block.high, (patches > threshold[:, None, None]).numpy())
    summary = norms_summary(found)
    assert summary["rule"] == HIGH_NORM_RULE and len(summary["blocks"]) == 2
    expected = outs[1].double().norm(dim=-1)[:, 0].mean()
    assert abs(summary["blocks"][1]["prefix_norm"]["cls"] - float(expected)) < 1e-3


def test_norm_stats_count_high_tokens_and_score_both_groups(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, embed_dim=32,
                                    num_heads=2, img_size=70))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    stats = NormStats(Decodability(), Decodability())
    from posenc.norms import block_outputs
    for seed in range(3):
        x = torch.randn(5, 3, 70, 70, generator=torch.Generator().manual_seed(seed))
        x[:, :, :14, :14] *= 40  # one loud corner patch per image
        with torch.inference_mode(), block_outputs(loaded.model) as outs:
            seen = loaded.model.inspect(x)
        stats.add(outs, seen, [False, False, False, False, True])
    record = stats.to_json()
    assert stats.total == [3 * 5 * 25] * 2
    assert record["high_norm_tokens"][0] >= 15  # the loud corner in every image
    assert 0 < record["high_norm_share"][0] < 1
    assert record["decodability_r2_normal"][0] is not None
    assert set(record["mean_prefix_norm"][0]) == {"cls", "reg0", "reg1", "reg2", "reg3"}


def test_token_norms_view_shows_the_chosen_block_and_states_the_rule(tmp_path):
    from PIL import Image

    from posenc import views
    from posenc.norms import HIGH_NORM_RULE

    ref = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, embed_dim=32,
                                    num_heads=2, img_size=70))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (70, 70), (120, 60, 30)).save(photo)
    seen = views.inspect_image(loaded, photo)
    view = views.token_norms_view(seen, 1, (0, 0))
    assert view.arrays["token_norms"].shape == (5, 5)
    assert list(view.arrays["token_norms_prefix_names"]) == ["cls", "reg0", "reg1", "reg2", "reg3"]
    np.testing.assert_allclose(view.arrays["token_norms"], seen.norms[1].patches[0])
    assert "median" in HIGH_NORM_RULE
