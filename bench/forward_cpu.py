"""Forward latency on the CPU: posenc's fast path against timm, and the inspection path against the fast path.

Both libraries get identical random weights (timm's state dict through :func:`posenc.convert.convert_state_dict`),
checked to give the same logits before anything is timed. posenc and timm calls are interleaved in one
process under ``torch.inference_mode()`` with the same thread count; see :mod:`bench.common`.

Two controls say how far a ratio can be trusted:

- **A/A**: timm against a second, identical timm instance, timed the same way. Its ratio should be 1; how far
  it strays is the noise floor of this machine at that moment (a few per cent on a shared 2-core VM).
- **Kernels**: the aten operators each forward pass calls, counted with ``torch.profiler``. When posenc calls
  exactly timm's operators the same number of times, a ratio within the A/A noise is a tie.

The allocator: by default (``--allocator steady``) the command runs itself again with glibc's mmap and trim
thresholds fixed (:data:`STEADY_ALLOCATOR`). With glibc's dynamic thresholds a batch-16 forward can take tens of
thousands of page faults, more in one library's forwards than the other's by chance, which moves a ratio by up
to 10 % although both run the same kernels; ``--allocator default`` measures with the allocator as it comes.

On a shared machine one run can land in a busy minute; ``--runs N`` repeats every figure N times (the models
taking turns) and reports the run with the median ratio, with every run's ratio, A/A and load average beside it.

    python -m bench.forward_cpu                     # writes bench/results/forward_cpu.json
    python -m bench.forward_cpu --quick --out /tmp  # one iteration of each figure
    python -m bench.forward_cpu --models eva02_tiny levit_128s --runs 3 --name forward_cpu_eva_levit
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections import Counter
from typing import Any

import timm
import torch

from bench.common import parse_args, ratio, summary, time_pairs, write_result
from posenc.convert import check_state_dict, convert_state_dict
from posenc.models import (
    CaiTConfig,
    CoaTConfig,
    EvaConfig,
    LeViTConfig,
    MViTv2Config,
    NaFlexViTConfig,
    PosencModel,
    SamConfig,
    SwinConfig,
    SwinV2Config,
    TwinsConfig,
    ViTConfig,
    XCiTConfig,
    build_model,
    cait,
    coat,
    twins,
    vit,
)
from posenc.models.eva import TIMM_PRESETS as EVA_PRESETS
from posenc.models.xcit import TIMM_PRESETS as XCIT_PRESETS
from posenc.models.mvitv2 import TIMM_PRESETS as MVITV2_PRESETS
from posenc.models.naflexvit import TIMM_PRESETS as NAFLEX_PRESETS

logger = logging.getLogger(__name__)

#: benchmark name -> (timm model name, the posenc config of the same architecture)
MODELS: dict[str, tuple[str, ViTConfig | SwinConfig | SwinV2Config | SamConfig | EvaConfig | LeViTConfig | XCiTConfig
                         | MViTv2Config | CaiTConfig | NaFlexViTConfig]] = {
    "deit_tiny": ("deit_tiny_patch16_224", ViTConfig()),
    "vit_small": ("vit_small_patch16_224", ViTConfig(embed_dim=384, num_heads=6)),
    "swin_tiny": ("swin_tiny_patch4_window7_224", SwinConfig()),
    "swinv2_tiny": ("swinv2_tiny_window8_256", SwinV2Config()),  # the defaults are swinv2_tiny_window8_256
    "beit_base": (
        "beit_base_patch16_224",
        ViTConfig(embed_dim=768, num_heads=12, qkv_bias="qv", pos_embed="none", rel_pos_bias=True,
                  global_pool="avg", init_values=0.1),
    ),  # fmt: skip
    # one of each newer absolute kind, with the fields timm's registration fixes (posenc's TIMM_PRESETS)
    "deit3_small": ("deit3_small_patch16_224", ViTConfig(**vit.TIMM_PRESETS["deit3_small_patch16_224"])),
    "clip_base": ("vit_base_patch16_clip_224", ViTConfig(**vit.TIMM_PRESETS["vit_base_patch16_clip_224"])),
    "siglip_base": ("vit_base_patch16_siglip_224",
                    ViTConfig(**vit.TIMM_PRESETS["vit_base_patch16_siglip_224"], num_classes=0)),
    "reg4_gap_medium": ("vit_medium_patch16_reg4_gap_256", ViTConfig(**vit.TIMM_PRESETS["vit_medium_patch16_reg4_gap_256"])),
    "dinov2_reg4_small": ("vit_small_patch14_reg4_dinov2",
                          ViTConfig(**vit.TIMM_PRESETS["vit_small_patch14_reg4_dinov2"], num_classes=0)),
    # SAM's encoder shrunk to run on a CPU: 16x16 grid, 7x7 windows (padded to 21x21), two global blocks, conv neck
    "sam_tiny": ("samvit_base_patch16", SamConfig(img_size=256, embed_dim=192, depth=4, num_heads=3, window_size=7,
                                                  global_attn_indexes=(1, 3), neck_chans=64)),
    # one of each RoPE kind of timm's eva.py; EVA-02 mim and DINOv3 are headless as timm builds them by default
    "rope_mixed_small": ("vit_small_patch16_rope_mixed_224", EvaConfig(**EVA_PRESETS["vit_small_patch16_rope_mixed_224"])),
    "eva02_tiny": ("eva02_tiny_patch14_224", EvaConfig(**EVA_PRESETS["eva02_tiny_patch14_224"], num_classes=0)),
    "dinov3_small": ("vit_small_patch16_dinov3", EvaConfig(**EVA_PRESETS["vit_small_patch16_dinov3"], num_classes=0)),
    "levit_128s": ("levit_128s", LeViTConfig()),  # attention bias by absolute offset; timm caches the gathered bias
    # convolutional position: Twins' PEG (windowed and sub-sampled attention), CoaT's CPE and CRPE (factorised)
    "twins_svt_small": ("twins_svt_small", TwinsConfig(**twins.TIMM_PRESETS["twins_svt_small"])),
    "coat_tiny": ("coat_tiny", CoaTConfig(**coat.TIMM_PRESETS["coat_tiny"])),
    "xcit_nano": ("xcit_nano_12_p16_224", XCiTConfig(**XCIT_PRESETS["xcit_nano_12_p16_224"])),  # Fourier embedding
    # pooling attention with the decomposed bias on the pooled key grid (56x56 queries over 14x14 keys in stage 0)
    "mvitv2_tiny": ("mvitv2_tiny", MViTv2Config(**MVITV2_PRESETS["mvitv2_tiny"])),
    "cait_xxs24": ("cait_xxs24_224", CaiTConfig(**cait.TIMM_PRESETS["cait_xxs24_224"])),  # talking heads, class attention
    "vit_small_18x2": ("vit_small_patch16_18x2_224", ViTConfig(**vit.TIMM_PRESETS["vit_small_patch16_18x2_224"])),
    # NaFlexViT on a plain image at 224 px: its 16x16 aspect-preserving table is resampled to 14x14 in every forward
    "naflexvit_par_base": ("naflexvit_base_patch16_par_gap",
                           NaFlexViTConfig(**NAFLEX_PRESETS["naflexvit_base_patch16_par_gap"], img_size=224)),
}
#: timm constructor arguments of the benchmark models that are not their registration's (shrunk models)
TIMM_KWARGS: dict[str, dict[str, Any]] = {
    "sam_tiny": dict(img_size=256, embed_dim=192, depth=4, num_heads=3, window_size=7, global_attn_indexes=(1, 3),
                     neck_chans=64, num_classes=0),
}
#: the largest posenc / timm forward ratio allowed at each batch size (the issue's speed targets)
TARGETS = {1: 1.05, 16: 1.0}
#: logits must agree this closely, or the two models are not the same computation
PARITY_ATOL = 1e-3


def build_pair(name: str) -> tuple[PosencModel, torch.nn.Module]:
    """A timm model with random weights and the posenc model loaded with the same weights, both in eval mode."""
    timm_name, config = MODELS[name]
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, **{"num_classes": config.num_classes, **TIMM_KWARGS.get(name, {})}).eval()
    model = build_model(config).eval()
    state = convert_state_dict("timm", reference.state_dict(), config)
    check_state_dict(model, state, timm_name)
    model.load_state_dict(state, strict=True)
    return model, reference


def max_abs_diff(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest logit difference between the two models on ``x``; raises when they disagree."""
    diff = (model(x) - reference(x)).abs().max().item()
    if diff > PARITY_ATOL:
        raise RuntimeError(
            f"posenc and timm logits differ by {diff:.2e}: the weights do not map, so the timings would mean nothing"
        )
    return diff


def kernel_counts(model: torch.nn.Module, x: torch.Tensor) -> Counter[str]:
    """How often one forward pass calls each aten operator that does work (views, allocations and no-ops left out)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    skip = ("view", "reshape", "as_strided", "transpose", "permute", "unsqueeze", "squeeze", "expand", "t",
            "select", "slice", "split", "chunk", "narrow", "unbind", "flatten", "empty", "empty_like",
            "empty_strided", "detach", "alias", "_unsafe_view", "contiguous", "lift", "resolve_conj", "resolve_neg",
            "dropout", "to", "type_as")  # eval-mode dropout returns its input; a real conversion shows as _to_copy
    counts: Counter[str] = Counter()
    for event in prof.events():
        name = event.name
        if name.startswith("aten::") and name[6:] not in skip and not name.startswith("aten::_reshape"):
            counts[name] += 1
    return counts


def kernel_diff(ours: Counter[str], theirs: Counter[str]) -> dict[str, list[int]]:
    """Operators whose call counts differ: name -> [posenc, timm]."""
    return {k: [ours[k], theirs[k]] for k in sorted(set(ours) | set(theirs)) if ours[k] != theirs[k]}


def bench_model(name: str, batch_sizes: list[int], inspect_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """All figures of one architecture: posenc vs timm per batch size, then inspection vs fast path."""
    model, reference = build_pair(name)
    twin = copy.deepcopy(reference)  # the A/A control: the same model, a second copy of its weights
    size = model.config.img_size
    rows: dict[str, Any] = {"timm_name": MODELS[name][0], "params": model.num_params(), "forward": [], "inspect": None}
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, *size)
            diff = max_abs_diff(model, reference, x)
            t_posenc, t_timm = time_pairs(
                lambda: model(x), lambda: reference(x), args.repeats, args.warmup, args.min_seconds
            )
            r = ratio(t_posenc, t_timm)
            t_a, t_b = time_pairs(lambda: reference(x), lambda: twin(x), args.repeats, args.warmup, args.min_seconds)
            control = ratio(t_a, t_b)
            kernels = kernel_diff(kernel_counts(model, x), kernel_counts(reference, x))
            target = TARGETS.get(batch)
            rows["forward"].append({
                "batch": batch,
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "posenc": summary(t_posenc),
                "timm": summary(t_timm),
                "ratio": r,
                "target": target,
                "met": None if target is None else r["pair_median"] <= target,
                "max_abs_diff": diff,
                "control_timm_timm": control,
                "same_kernels": not kernels,
                "kernel_differences": kernels,
            })  # fmt: skip
            logger.info("%s batch %d: posenc/timm %.3f (pairs %.3f [%.3f, %.3f]); timm/timm %.3f; same kernels %s",
                        name, batch, r["ratio_of_medians"], r["pair_median"], r["pair_p25"], r["pair_p75"],
                        control["pair_median"], not kernels)  # fmt: skip
        x = torch.randn(inspect_batch, 3, *size)
        t_inspect, t_fast = time_pairs(
            lambda: model.inspect(x), lambda: model(x), args.repeats, args.warmup, args.min_seconds
        )
        rows["inspect"] = {
            "batch": inspect_batch,
            "inspect": summary(t_inspect),
            "fast": summary(t_fast),
            "ratio": ratio(t_inspect, t_fast),
        }
        logger.info("%s inspect/fast at batch %d: %.2f", name, inspect_batch, rows["inspect"]["ratio"]["pair_median"])
    return rows


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's figures from several runs: per batch, the row of the run with the median ratio, plus every run.

    Each forward row gains ``runs``: the pair-median ratio, the A/A ratio, the load average and the kernel check
    of every run, in the order they ran.
    """
    out = {**runs[0], "forward": [], "inspect": sorted(
        (r["inspect"] for r in runs), key=lambda i: i["ratio"]["pair_median"])[len(runs) // 2]}
    for rows in zip(*(r["forward"] for r in runs)):
        chosen = sorted(rows, key=lambda row: row["ratio"]["pair_median"])[len(rows) // 2]
        each = [{"ratio": row["ratio"]["pair_median"], "control": row["control_timm_timm"]["pair_median"],
                 "load_average_1min": row["load_average_1min"], "same_kernels": row["same_kernels"]} for row in rows]
        out["forward"].append({**chosen, "runs": each})
    return out


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="what to time")
    parser.add_argument("--runs", type=int, default=1, help="repeat every figure this many times (report the median)")
    parser.add_argument("--name", default="forward_cpu", help="result file name (bench/results/<name>.json)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="batches of the timm comparison")
    parser.add_argument("--inspect-batch", type=int, default=1, help="batch of the inspection figure (the app's)")
    parser.add_argument("--allocator", choices=("steady", "default"), default="steady",
                        help="steady (default): run with glibc's mmap and trim thresholds fixed (STEADY_ALLOCATOR), so "
                             "large activations are not handed back to the system and faulted in again on every "
                             "forward; default: the allocator as it comes")


def write_runs(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], done: int) -> None:
    """Write the result file with the ``done`` runs measured so far."""
    models = {name: median_run(figures) for name, figures in runs.items()}
    write_result(args.out, args.name, args, {
        "method": "interleaved pairs (posenc, timm alternate which runs first), torch.inference_mode, random input; "
                  "a target is met when the median of the per-pair ratios is at most the target; "
                  "control_timm_timm times timm against an identical copy the same way (the noise floor); "
                  "same_kernels compares the aten operators each forward calls (torch.profiler); "
                  "with several runs, each row is the run with the median ratio and 'runs' lists them all",
        "runs": done,
        "allocator": {"mode": args.allocator,
                      "environment": {k: os.environ.get(k) for k in STEADY_ALLOCATOR}},
        "targets": {f"batch_{b}": t for b, t in TARGETS.items()},
        "models": models,
    })  # fmt: skip


#: glibc settings of ``--allocator steady``: with its default dynamic thresholds glibc returns large blocks to the
#: system and maps them again, so a batch-16 forward takes 2,000 to 40,000 page faults, and which library a run
#: happens to fault more in swings the ratio by up to 10 % (the same for both: it is not either library's code).
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=20, warmup=3, min_seconds=40.0, extra=_options)
    if args.allocator == "steady" and any(os.environ.get(k) != v for k, v in STEADY_ALLOCATOR.items()):
        os.environ.update(STEADY_ALLOCATOR)  # glibc reads them at start-up: run this command again with them
        os.execv(sys.executable, [sys.executable, "-m", "bench.forward_cpu", *sys.argv[1:]])
    if args.runs < 1 or not args.name.startswith("forward_cpu"):
        raise SystemExit("--runs must be at least 1 and --name start with 'forward_cpu' (the report finds it so)")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.models}
    for run in range(args.runs):  # the models take turns, so a busy minute does not fall on one model's every run
        for name in args.models:
            logger.info("run %d of %d: %s", run + 1, args.runs, name)
            runs[name].append(bench_model(name, args.batch_sizes, args.inspect_batch, args))
        write_runs(args, runs, run + 1)  # after every run, so a long session keeps what it has measured


if __name__ == "__main__":
    main()
