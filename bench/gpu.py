"""GPU throughput: posenc against timm at batch 256 in bf16, and training throughput of the CIFAR-10 recipe.

Runs on CUDA when there is a GPU and records "no GPU" otherwise (``--device cpu`` runs the same code on
the CPU, which the smoke test uses so the script cannot rot). Inference uses the weights of
:mod:`bench.forward_cpu` (identical in both libraries), bf16 autocast and ``torch.inference_mode()``;
posenc and timm batches are interleaved and timed with the device synchronised. Training runs
:func:`posenc.train.train_epoch` with the recipe's defaults on synthetic CIFAR-sized data already on the device.

    python -m bench.gpu                     # writes bench/results/gpu.json
    python -m bench.gpu --quick --out /tmp  # one iteration of each figure
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import parse_args, ratio, summary, time_pairs, write_result
from bench.forward_cpu import build_pair, max_abs_diff
from posenc.models import build_model
from posenc.train import (
    PRESETS,
    ImageSet,
    Runtime,
    TrainConfig,
    cifar_model,
    lr_factor,
    param_groups,
    train_epoch,
)

logger = logging.getLogger(__name__)

#: the posenc / timm throughput ratio must be at least this (the issue's target)
THROUGHPUT_TARGET = 1.0
INFERENCE_MODELS = ("vit_small", "swin_tiny")


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so that wall time covers the work it queued."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def inference(name: str, batch: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Images per second of posenc and timm on one architecture, interleaved, bf16 autocast."""
    model, reference = build_pair(name)
    model, reference = model.to(device), reference.to(device)
    x = torch.randn(batch, 3, *model.config.img_size, device=device)
    with torch.inference_mode():
        diff = max_abs_diff(model, reference, x[:2])  # fp32: the two compute the same function
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        t_posenc, t_timm = time_pairs(synced(lambda: model(x), device), synced(lambda: reference(x), device),
                                      args.repeats, args.warmup, args.min_seconds)  # fmt: skip
    r = ratio(t_timm, t_posenc)  # time ratio timm / posenc = throughput ratio posenc / timm
    result = {
        "batch": batch,
        "posenc": summary(t_posenc),
        "timm": summary(t_timm),
        "posenc_images_per_s": batch / (summary(t_posenc)["median_ms"] / 1e3),
        "timm_images_per_s": batch / (summary(t_timm)["median_ms"] / 1e3),
        "throughput_ratio": r,
        "met": r["pair_median"] >= THROUGHPUT_TARGET,
        "max_abs_diff_fp32": diff,
    }
    logger.info("%s: posenc %.0f img/s, timm %.0f img/s, ratio %.3f", name, result["posenc_images_per_s"],
                result["timm_images_per_s"], r["pair_median"])  # fmt: skip
    return result


def training(family: str, device: torch.device, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """Training images per second of one CIFAR-10 preset with the recipe's defaults (bf16 autocast on CUDA)."""
    cfg = TrainConfig(data=Path("synthetic"), out=Path("unused"), family=family)
    if args.quick:
        cfg = dataclasses.replace(cfg, batch_size=8)
    model_config = cifar_model(family)
    n = cfg.batch_size * steps
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (n, 3, *model_config.img_size), dtype=torch.uint8, generator=generator),
        torch.randint(0, model_config.num_classes, (n,), generator=generator),
        model_config.labels,
    ).to(device)
    rt = Runtime(device, torch.bfloat16 if device.type == "cuda" else None)
    model = build_model(model_config).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = cfg.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=total, warmup_steps=math.ceil(total / 10), min_ratio=cfg.min_lr_ratio)
    )
    epochs = []
    for epoch in range(args.warmup + args.repeats):
        start = time.perf_counter()
        synced(lambda: train_epoch(model, opt, sched, data, model_config.preprocess, cfg, rt, epoch), device)()
        epochs.append(time.perf_counter() - start)
    timed = epochs[args.warmup :]
    result = {"batch_size": cfg.batch_size, "images_per_epoch": n, "epoch": summary(timed)}
    result["images_per_s"] = n / (result["epoch"]["median_ms"] / 1e3)
    logger.info("train %s: %.0f img/s", family, result["images_per_s"])
    return result


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu only to check the script")
    parser.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    parser.add_argument("--models", nargs="+", choices=INFERENCE_MODELS, default=list(INFERENCE_MODELS))
    parser.add_argument("--families", nargs="+", choices=PRESETS, default=["learned", "windowed"],
                        help="CIFAR-10 presets whose training throughput is measured")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=50, help="optimizer steps per timed epoch")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=20, warmup=3, min_seconds=10.0, extra=_options)
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.warning("no GPU: recording that and nothing else")
        write_result(args.out, "gpu", args, {"status": "no GPU", "targets": {"throughput_ratio": THROUGHPUT_TARGET}})
        return
    device = torch.device(args.device)
    steps = 2 if args.quick else args.train_steps
    write_result(args.out, "gpu", args, {
        "status": "measured" if device.type == "cuda" else "cpu check only",
        "device": str(device),
        "method": "bf16 autocast, torch.inference_mode, interleaved pairs with the device synchronised; "
                  "throughput ratio = posenc images/s over timm images/s (median of per-pair ratios for the target)",
        "targets": {"throughput_ratio": THROUGHPUT_TARGET},
        "inference": {name: inference(name, args.batch_size, device, args) for name in args.models},
        "training": {family: training(family, device, steps, args) for family in args.families},
    })  # fmt: skip


if __name__ == "__main__":
    main()
