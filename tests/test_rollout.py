"""Attention rollout against an independent computation from timm's own attention maps (fused attention off)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from timm.models import save_for_hf
from torch.testing import assert_close

import posenc
from posenc.rollout import (
    block_tokens,
    block_transfer,
    input_tokens,
    needs_position_free_run,
    rollout,
    rollout_pair,
    rollout_summary,
    token_map,
)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def timm_maps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax output, caught on timm's ``attn_drop`` with fused attention switched off."""
    maps: list[torch.Tensor] = []
    handles = []
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "attn_drop"):
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda _m, _a, out: maps.append(out.double())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return maps


def step(attn: torch.Tensor) -> torch.Tensor:
    """(N, N) head-averaged attention -> (A + I) / rowsum."""
    a = attn + torch.eye(len(attn), dtype=attn.dtype)
    return a / a.sum(-1, keepdim=True)


def test_rollout_matches_timm_attention_for_deit(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    x = torch.randn(1, 3, 224, 224)
    expected = torch.eye(197, dtype=torch.float64)
    for attn in timm_maps(ref, x):
        expected = step(attn[0].mean(0)) @ expected  # forward product: A_L ... A_1
    with torch.no_grad():
        seen = loaded.model.inspect(x)
    found = rollout(seen)
    assert found.rows.shape == (1, 197, 197)
    assert_close(found.rows[0], expected, atol=1e-5, rtol=1e-4)
    # from cls only (a selected row), and the rows sum to 1
    cls = rollout(seen, select=torch.eye(197)[:1])
    assert_close(cls.rows[0, 0], expected[0], atol=1e-5, rtol=1e-4)
    assert_close(found.rows.sum(-1), torch.ones(1, 197, dtype=torch.float64))
    # an absolute-embedding model has no position term in its blocks: "without" is the model run without position
    assert needs_position_free_run(seen)
    with torch.no_grad():
        free = rollout(loaded.model.inspect(x, position=False))
    summary = rollout_summary(found, free, ("cls", "dist")[:1] + tuple(f"t{i}" for i in range(196)))
    assert 0 < summary["starts"]["cls"]["total_variation"] < 1
    paired_with, paired_without, rule = rollout_pair(loaded.model, x, seen)
    assert_close(paired_with.rows, found.rows)
    assert_close(paired_without.rows, free.rows)
    assert "position=False" in rule


def test_rollout_matches_timm_attention_for_shifted_window_swin(tmp_path):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2, 2, 2),
                                    embed_dim=16, num_heads=(1, 2, 2, 2), window_size=4, img_size=128))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    x = torch.randn(1, 3, 128, 128)
    maps = timm_maps(ref, x)
    blocks = [blk for layer in ref.layers for blk in layer.blocks]
    assert len(maps) == len(blocks) == 8
    # independent: each window's map scattered to the full grid after timm's roll and partition, patch merging as the
    # mean over each 2x2 neighbourhood, multiplied backwards from the last stage's 4x4 tokens
    rows = torch.eye(16, dtype=torch.float64)
    side = 4
    for b in range(7, -1, -1):
        blk, attn = blocks[b], maps[b]  # nW, heads, n, n
        side = blk.input_resolution[0] if hasattr(blk, "input_resolution") else side
        sh = blk.shift_size[0] if isinstance(blk.shift_size, tuple) else blk.shift_size
        ws = blk.window_size[0] if isinstance(blk.window_size, tuple) else blk.window_size
        ids = torch.roll(torch.arange(side * side).reshape(side, side), (-sh, -sh), (0, 1))  # as the block sees it
        ids = ids.reshape(side // ws, ws, side // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)  # nW, n
        full = torch.zeros(side * side, side * side, dtype=torch.float64)
        for w, tok in enumerate(ids):
            full[tok[:, None], tok[None, :]] = attn[w].mean(0)
        rows = rows @ step(full)
        if b in (2, 4, 6):  # the stage starts with a 2x2 patch merging from a grid twice the side
            merge = torch.zeros(side * side, 4 * side * side, dtype=torch.float64)
            for i in range(side):
                for j in range(side):
                    for di in range(2):
                        for dj in range(2):
                            merge[i * side + j, (2 * i + di) * 2 * side + 2 * j + dj] = 0.25
            rows = rows @ merge
            side *= 2
    with torch.no_grad():
        seen = loaded.model.inspect(x)
    assert any(any(t.shift or ()) for t in seen.blocks)
    found = rollout(seen)
    assert found.rows.shape == (1, 16, 1024)
    assert_close(found.rows[0], rows, atol=1e-5, rtol=1e-4)
    # the relative bias is a position term in every block: "without position" uses attn_no_pos and differs
    assert not needs_position_free_run(seen)
    without = rollout(seen, no_pos=True)
    assert (found.rows - without.rows).abs().max() > 1e-4
    assert [t.grid for t in block_tokens(seen)][-1] == (4, 4)


def test_token_map_subsamples_exact_positions_and_merges_cells():
    old = torch.tensor([[0.5, 0.5], [0.5, 1.5], [1.5, 0.5], [1.5, 1.5]], dtype=torch.float64)
    merged = token_map(torch.tensor([[1.0, 1.0]]), old)
    assert_close(merged, torch.full((1, 4), 0.25, dtype=torch.float64))
    picked = token_map(old[[0, 3]], old)
    assert_close(picked, torch.eye(4, dtype=torch.float64)[[0, 3]])


def test_rollout_rejects_a_block_out_of_range(tmp_path):
    ref = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    with torch.no_grad():
        seen = loaded.model.inspect(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="out of range"):
        rollout(seen, block=5)


def test_block_transfer_rows_sum_to_one_and_pass_untouched_prefix_rows(tmp_path):
    ref = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    with torch.no_grad():
        seen = loaded.model.inspect(torch.randn(1, 3, 224, 224))
    tokens = block_tokens(seen)
    transfer = block_transfer(seen.blocks[0], seen.blocks[0].attn, input_tokens(seen), tokens[0])
    assert_close(transfer.sum(-1), torch.ones(1, 197, dtype=torch.float64))
    # a block whose layout has no prefix queries leaves the cls row as it was
    layout = seen.blocks[0].layout
    bare = dataclasses.replace(layout, query_prefix=(), key_prefix=(), query_pixels=layout.query_pixels[1:],
                               key_pixels=layout.key_pixels[1:], query_tokens=torch.arange(196)[None],
                               key_tokens=torch.arange(196)[None])
    trace = dataclasses.replace(seen.blocks[0], layout=bare)
    passed = block_transfer(trace, seen.blocks[0].attn[..., 1:, 1:], input_tokens(seen), tokens[0])
    assert_close(passed[0, 0], torch.eye(197, dtype=torch.float64)[0])


def test_rollout_view_draws_the_rows_of_the_clicked_patch_and_cls(tmp_path):
    from PIL import Image

    from posenc import views

    ref = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2))
    save_for_hf(ref, tmp_path, safe_serialization=True)
    loaded = posenc.load(str(tmp_path))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (224, 224), (120, 60, 30)).save(photo)
    seen = views.inspect_image(loaded, photo)
    view = views.rollout_view(seen, 1, (3, 4))
    assert list(view.arrays["rollout_starts"]) == ["patch (3, 4)", "cls"]
    expected = rollout(seen.inspection, select=torch.eye(197)[[1 + 3 * 14 + 4, 0]]).on_grid()[0][0]  # R, 14, 14
    np.testing.assert_allclose(view.arrays["rollout"], expected, atol=1e-6)
    with torch.inference_mode():
        free = loaded.model.inspect(seen.pixels, position=False)
    expected = rollout(free, select=torch.eye(197)[[1 + 3 * 14 + 4, 0]]).on_grid()[0][0]
    np.testing.assert_allclose(view.arrays["rollout_no_pos"], expected, atol=1e-6)
    assert view.image.width > 600


def test_folder_rollout_record_equals_rollout_pair_on_the_same_batch(tmp_path):
    """measure_folder's "rollout" record: per image, the total variation between the rollouts with and without
    position from the final tokens, as rollout_pair computes it directly on the same preprocessed images."""
    import math
    from dataclasses import replace
    from pathlib import Path

    from PIL import Image

    from posenc import measure
    from posenc.preprocess import build_transform
    from posenc.rollout import rollout_pair

    loaded = posenc.load(str(Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10-rope"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    # 28x28: 7x7 patches + cls = 50 final tokens, all of them starts (at most ROLLOUT_STARTS are)
    found = measure.measure_folder(loaded, paths, size=(28, 28), batch=3, sizes=[(28, 28)], seeds=(0,), rope_scales=())
    transform = build_transform(replace(loaded.preprocess, input_size=(28, 28)))
    x = torch.stack([transform(posenc.preprocess.load_image(p)) for p in paths])
    with torch.inference_mode():
        seen = loaded.model.inspect(x)
        a, b, _ = rollout_pair(loaded.model, x, seen)
    assert a.rows.shape[1] == 50 <= measure.ROLLOUT_STARTS
    tv = 0.5 * (a.rows - b.rows).abs().sum(-1).mean(-1)  # B
    record = found.to_json()["rollout"]
    assert 0 < record["total_variation"] < 1
    assert math.isclose(record["total_variation"], float(tv.mean()), rel_tol=1e-4, abs_tol=1e-5)  # the record is rounded to 5 digits
    assert math.isclose(record["prefix_share"], float(a.rows[..., :1].sum(-1).mean()), rel_tol=1e-4, abs_tol=1e-5)  # the record is rounded to 5 digits
    assert math.isclose(record["prefix_share_no_pos"], float(b.rows[..., :1].sum(-1).mean()), rel_tol=1e-4, abs_tol=1e-5)  # the record is rounded to 5 digits
