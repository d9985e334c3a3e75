"""Mutation check: apply curated, plausible bugs to posenc one at a time and run the fast tests that guard them.

Run before resolving a change to encodings, attention, views or conversion (not part of CI)::

    python tools/mutants.py            # every mutant, about 15 minutes on 2 cores
    python tools/mutants.py -k rope    # the mutants whose name contains "rope"

Each mutant is applied to a copy of the checkout in a temporary folder (the working tree is never edited);
the copy has no ``../shared/data``, so real-data tests skip and only synthetic tests can kill a mutant.
The score is killed / total; survivors are listed with their names, for a reason or a new test.

Why curated mutants and not mutmut: mutmut (3.x) mutates every operator and constant of a module and runs
the tests once per mutant; over these four modules that is well over a thousand mutants, and one pytest
start with torch costs about five seconds here, so a full run takes hours on 2 cores. A short list of the
bugs that matter for position encodings (axis order, sign, interpolation mode, index offsets, key mapping)
runs in minutes and names each bug in words.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: the fast tests that guard this code


ENC = ("tests/test_encodings.py", "tests/test_views_values.py", "tests/test_models.py")
ATT = ("tests/test_models.py", "tests/test_views_values.py", "tests/test_encodings.py",
       "tests/test_parity.py::test_timm_checkpoint_gives_reference_logits")
VIEWS = ("tests/test_views_values.py", "tests/test_viz.py")
CONV = ("tests/test_parity.py", "tests/test_hub.py")

MUTANTS = (
    # encodings
    Mutant("resample transposes a non-square grid", "posenc/encodings.py",
           "patches.reshape(1, old_grid[0], old_grid[1], c)", "patches.reshape(1, old_grid[1], old_grid[0], c)", ENC),
    Mutant("resample without antialias", "posenc/encodings.py",
           'antialias = interpolation != "nearest" if antialias is None', "antialias = False if antialias is None", ENC),
    Mutant("rope rotates the other way", "posenc/encodings.py",
           "torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)",
           "torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)", ENC),
    Mutant("rope rows and columns swapped", "posenc/encodings.py",
           "ang_x = xs.reshape(-1, 1) * freqs  # h*w, hd/4\n    return torch.cat([ang_y, ang_x] if",
           "ang_x = xs.reshape(-1, 1) * freqs  # h*w, hd/4\n    return torch.cat([ang_x, ang_y] if", ENC),
    Mutant("rope frequencies off by one", "posenc/encodings.py",
           "/ (head_dim // 4))  # hd/4", "/ (head_dim // 4 - 1))  # hd/4", ENC),
    Mutant("relative table resized bilinearly", "posenc/encodings.py",
           'mode="bicubic", align_corners=False', 'mode="bilinear", align_corners=False', ENC),
    Mutant("relative index row stride", "posenc/encodings.py",
           "rel[..., 0] *= 2 * ww - 1", "rel[..., 0] *= 2 * wh - 1", ENC),
    Mutant("relative index key minus query", "posenc/encodings.py",
           "rel = (flat[:, :, None] - flat[:, None, :])", "rel = (flat[:, None, :] - flat[:, :, None])", ENC),
    Mutant("relative bias transposed", "posenc/encodings.py",
           ".reshape(nq, nq, -1).permute(2, 0, 1)", ".reshape(nq, nq, -1).permute(2, 1, 0)", ENC),
    Mutant("cls rows swapped", "posenc/encodings.py",
           "full[0, :] = n - 3  # cls -> token", "full[0, :] = n - 2  # cls -> token", ENC),
    Mutant("sincos halves swapped", "posenc/encodings.py",
           "torch.cat([emb_x, emb_y], dim=1)", "torch.cat([emb_y, emb_x], dim=1)", ENC),
    Mutant("shift regions off by one", "posenc/encodings.py",
           "((0, size - win), (size - win, size - sh), (size - sh, size))",
           "((0, size - win + 1), (size - win + 1, size - sh), (size - sh, size))", ENC),
    Mutant("window partition order", "posenc/encodings.py",
           "return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // wh) * (w // ww), wh * ww, c)",
           "return x.permute(0, 3, 1, 2, 4, 5).reshape(b, (h // wh) * (w // ww), wh * ww, c)", ENC),
    # attention
    Mutant("attention scale inverted", "posenc/attention.py", "self.scale = self.head_dim**-0.5",
           "self.scale = self.head_dim**0.5", ATT),
    Mutant("attention without position keeps the bias", "posenc/attention.py",
           "attn_no_pos = logits.softmax(dim=-1)", "attn_no_pos = (logits + pos).softmax(dim=-1)", ATT),
    Mutant("rope applied to queries only", "posenc/attention.py",
           "k = apply_rope(k, rope, num_prefix, interleaved=self.rope_interleaved)", "k = k", ATT),
    Mutant("BEiT key bias in the value slot", "posenc/attention.py",
           "torch.cat([self.q_bias, self.k_bias, self.v_bias])", "torch.cat([self.q_bias, self.v_bias, self.k_bias])", ATT),
    Mutant("fast path drops the mask", "posenc/attention.py",
           "bias = pos if mask is None else (mask if pos is None else pos + mask)", "bias = pos", ATT),
    # views
    Mutant("outline at (col, row)", "posenc/views.py",
           "alpha=0.12, mark=patch,", "alpha=0.12, mark=patch[::-1],", VIEWS),
    Mutant("Swin table resized to the stage grid", "posenc/views.py",
           "if trace.window is None and tuple(trace.grid) != tuple(window):", "if tuple(trace.grid) != tuple(window):",
           VIEWS),
    Mutant("query row at (col, row)", "posenc/views.py",
           "q = prefix + row * gw + col", "q = prefix + col * gw + row", VIEWS),
    Mutant("stage patch not mapped", "posenc/views.py",
           "return tuple(p * g // g0 for p, g, g0 in zip(patch, trace.grid, seen.grid))", "return tuple(patch)", VIEWS),
    Mutant("rope view without angles at this grid", "posenc/views.py",
           "sim = viz.rope_phase_similarity(angles, seen.grid, patch)",
           "sim = viz.rope_phase_similarity(angles, seen.grid, patch[::-1] if seen.grid[0] <= seen.grid[1] else patch)",
           VIEWS),
    # conversion
    Mutant("q/k/v fused in the wrong order", "posenc/convert.py",
           'for name in ("query", "key", "value")}', 'for name in ("key", "query", "value")}', CONV),
    Mutant("norm1/norm2 swapped", "posenc/models/declare.py",
           r'(r"\.layernorm_before\.", ".norm1."),', r'(r"\.layernorm_before\.", ".norm2."),', CONV),
    Mutant("Swin merging not moved to the next stage", "posenc/models/declare.py",
           'f"layers.{int(m[1]) + 1}.downsample."', 'f"layers.{int(m[1])}.downsample."', CONV),
    Mutant("pos_embed resampled with the prefix rows", "posenc/models/vit.py",
           "resample_pos_embed(out, config.grid, 0 if config.no_embed_class else config.num_prefix_tokens)",
           "resample_pos_embed(out, config.grid, 0)", CONV),
    Mutant("shape check skipped", "posenc/convert.py",
           "if k in state_dict and state_dict[k].shape != v.shape", "if k in state_dict and False", CONV),
    Mutant("BEiT shared table not copied", "posenc/models/vit.py",
           'out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)', "pass", CONV),
)


def _copy_checkout(dest: Path) -> None:
    for name in ("posenc", "tests", "bench", "pyproject.toml", "assets"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run(mutant: Mutant, work: Path, timeout: float) -> tuple[str, float]:
    """'killed', 'survived' or 'timeout' for one mutant, and the seconds its tests took."""
    target = work / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: its text occurs {original.count(mutant.old)} times in {mutant.path}")
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *mutant.tests],
            cwd=work, capture_output=True, text=True, timeout=timeout,
        )
        outcome = "survived" if result.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        outcome = "timeout"
    finally:
        target.write_text(original)
    return outcome, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only mutants whose name contains this text")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant before it counts as killed")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    with tempfile.TemporaryDirectory(prefix="posenc-mutants-") as tmp:
        work = Path(tmp) / "checkout"
        work.mkdir()
        _copy_checkout(work)
        survivors, start = [], time.perf_counter()
        for mutant in chosen:
            outcome, seconds = run(mutant, work, args.timeout)
            print(f"{outcome:9} {seconds:6.1f}s  {mutant.path}: {mutant.name}", flush=True)
            if outcome == "survived":
                survivors.append(mutant)
    killed = len(chosen) - len(survivors)
    print(f"score {killed}/{len(chosen)} killed in {time.perf_counter() - start:.0f}s; "
          f"survivors: {', '.join(m.name for m in survivors) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
