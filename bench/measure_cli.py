"""Throughput of ``python -m posenc measure`` over the ImageNet sample photos, against timm's plain forward.

The real DeiT-Tiny (``../shared/data/deit_tiny_patch16_224.fb_in1k``) runs over the 250 photos of
``../shared/data/imagenet-samples`` in one process, in this order so that a drift in machine load shows:

1. **timm, plain**: open each photo with PIL, timm's own eval transform, ``model(x)`` in batches.
2. **posenc measure**: the whole command (``posenc.cli.main``): model load, all five measurements, the JSON
   and the PNG plots.
3. **timm, plain** again.
4. On the first ``--same-photos`` photos (one batch by default): the command again, and timm doing the
   forward passes the command makes with nothing measured: per batch one pass at the native size for the
   inspection, one per shuffle seed, one for the position-free model, and one at each other size of the
   resolution sweep (timm's ``dynamic_img_size`` resamples its embedding), each size preprocessed by timm's
   transform.

Figures are images per second. ``measure / timm plain`` is the issue's throughput ratio (target >= 0.8);
``measure / timm same passes`` says what the measurements themselves cost over the model passes they need.
The machine's load average is sampled every 5 s during the run and recorded.

    python -m bench.measure_cli                       # writes bench/results/measure_cli.json
    python -m bench.measure_cli --keep assets/measure # also keeps the command's measures.json and plots
    python -m bench.measure_cli --quick --out /tmp    # 8 photos: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from bench.common import SHARED_DATA, parse_args, write_result
from posenc import measure, views
from posenc.cli import main as posenc_main
from posenc.hub import load

logger = logging.getLogger(__name__)

MODEL = SHARED_DATA / "deit_tiny_patch16_224.fb_in1k"
PHOTOS = SHARED_DATA / "imagenet-samples"
TARGET = 0.8  # measure images/s over timm plain forward images/s (the target)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16, help="images per batch, both sides (default 16)")
    parser.add_argument("--limit", type=int, default=None, help="photos to use (default all 250; --quick: 8)")
    parser.add_argument("--same-photos", type=int, default=16, help="photos for the same-passes comparison")
    parser.add_argument("--keep", type=Path, default=None, help="copy the command's measures.json and plots here")


@contextmanager
def load_sampler(interval_s: float = 5.0) -> Iterator[list[float]]:
    """Sample the 1-minute load average every ``interval_s`` while the block runs."""
    samples = [os.getloadavg()[0]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            samples.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def timm_model() -> torch.nn.Module:
    """The real DeiT-Tiny in timm, resampling its embedding for other input sizes."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    model.load_state_dict(load_file(MODEL / "model.safetensors"), strict=True)
    return model.eval()


def timm_pass(model: torch.nn.Module, photos: list[Path], batch: int,
              passes: list[tuple[Callable[[Image.Image], torch.Tensor], int]]) -> float:
    """Seconds to open the photos and run ``passes`` (transform, repeats) over them in batches."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(photos), batch):
            images = []
            for path in photos[start : start + batch]:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            for transform, repeats in passes:
                x = torch.stack([transform(img) for img in images])  # B, 3, h, w
                for _ in range(repeats):
                    model(x)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the four runs and return the figures."""
    limit = 8 if args.quick and args.limit is None else args.limit
    photos = measure.list_images(PHOTOS, limit).images
    reference = timm_model()
    config = resolve_data_config({}, model=reference)
    plain = create_transform(**config)
    loaded = load(str(MODEL))
    native = views.native_size(loaded)
    sizes = views.input_sizes(loaded)
    same = [(plain, 2 + len(measure.SHUFFLE_SEEDS))] + [
        (create_transform(**{**config, "input_size": (3, *s)}), 1) for s in sizes if s != native
    ]
    out = Path(tempfile.mkdtemp(prefix="posenc-measure-bench-"))
    with load_sampler() as load_avg:
        plain_before = timm_pass(reference, photos, args.batch, [(plain, 1)])
        cli_s = _cli(out, args.batch, limit)
        plain_after = timm_pass(reference, photos, args.batch, [(plain, 1)])
        few = min(args.same_photos, len(photos))
        cli_few_s = _cli(out / "few", args.batch, few)
        same_s = timm_pass(reference, photos[:few], args.batch, same)
    record = json.loads((out / "measures.json").read_text())
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for name in ["measures.json", *record["plots"]]:
            shutil.copy(out / name, args.keep / name)
    shutil.rmtree(out, ignore_errors=True)
    n = len(photos)
    plain_ips = n / ((plain_before + plain_after) / 2)
    figures = {
        "model": "deit_tiny_patch16_224.fb_in1k", "photos": n, "batch": args.batch, "native": list(native),
        "sweep_sizes": [list(s) for s in sizes], "shuffle_seeds": list(measure.SHUFFLE_SEEDS),
        "passes_per_batch": {"native": 2 + len(measure.SHUFFLE_SEEDS), "other_sizes": len(sizes) - 1},
        "timm_plain_s": [plain_before, plain_after], "measure_s": cli_s,
        "same_passes": {"photos": few, "measure_s": cli_few_s, "timm_s": same_s},
        "images_per_s": {"timm_plain": plain_ips, "measure": n / cli_s, "timm_same_passes": few / same_s},
        "ratio_measure_over_timm_plain": (n / cli_s) / plain_ips,
        "ratio_measure_over_timm_same_passes": same_s / cli_few_s,
        "load_average_during": {"min": min(load_avg), "max": max(load_avg), "mean": sum(load_avg) / len(load_avg),
                                "samples": len(load_avg)},
        "target": TARGET,
    }
    logger.info("measure %.2f img/s, timm plain %.2f img/s (ratio %.3f), timm same passes %.2f img/s (ratio %.3f)",
                n / cli_s, plain_ips, figures["ratio_measure_over_timm_plain"], few / same_s,
                figures["ratio_measure_over_timm_same_passes"])
    return figures


def _cli(out: Path, batch: int, limit: int | None) -> float:
    """Seconds of one ``python -m posenc measure`` run, in process."""
    started = time.perf_counter()
    status = posenc_main(["measure", "--model", str(MODEL), "--images", str(PHOTOS), "--out", str(out),
                          "--batch", str(batch)] + (["--limit", str(limit)] if limit else []))
    if status != 0:
        raise SystemExit(f"posenc measure failed with status {status}")
    return time.perf_counter() - started


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=1, warmup=0, extra=_extra)
    if not (MODEL / "model.safetensors").is_file() or not PHOTOS.is_dir():
        raise SystemExit(f"the real DeiT-Tiny ({MODEL}) and the photos ({PHOTOS}) are needed")
    write_result(args.out, "measure_cli", args, run(args))


if __name__ == "__main__":
    main()
