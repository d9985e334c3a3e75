"""What every benchmark shares: the environment record, interleaved timing, and JSON output.

Each figure is a median over repeated runs after a warm-up. Comparisons are measured as pairs inside
one process, alternating which side runs first, so that drifts in machine load hit both sides alike;
a comparison reports the median of the per-pair ratios with its 95 % interval and quartiles, and the
ratio of the medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def parse_args(
    description: str,
    *,
    repeats: int,
    warmup: int,
    min_seconds: float = 0.0,
    threads: int = 2,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse the options every benchmark takes, plus those ``extra`` adds; set up logging and the thread count.

    Common options: ``--out``, ``--quick``, ``--repeats``, ``--min-seconds``, ``--warmup``, ``--threads``.
    ``--quick`` is the smoke run of the tests: one timed iteration, no warm-up.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="one iteration, no warm-up: checks that the script runs")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"least timed runs per figure (default {repeats})")
    parser.add_argument("--min-seconds", type=float, default=min_seconds,
                        help=f"keep repeating a figure until it has taken this long (default {min_seconds:g})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default {warmup})")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.min_seconds = 1, 0, 0.0
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.min_seconds < 0:
        parser.error("--repeats and --threads must be at least 1, --warmup and --min-seconds at least 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    return args


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict[str, Any]:
    """Hardware, thread count, versions and a UTC timestamp, recorded with every result."""
    import posenc

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()},
        "threads": threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": _version("timm"),
            "posenc": posenc.__version__,
            "gradio": _version("gradio"),
        },
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summary(samples: list[float]) -> dict[str, float | int]:
    """Median, quartiles and count of timings in seconds, reported in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "p25_ms": q1, "p75_ms": q3, "min_ms": ms[0], "n": len(ms)}


def _enough(count: int, started: float, repeats: int, min_seconds: float, max_repeats: int) -> bool:
    return count >= max_repeats or (count >= repeats and time.perf_counter() - started >= min_seconds)


def time_call(
    fn: Callable[[], Any], repeats: int, warmup: int, min_seconds: float = 0.0, max_repeats: int = 1000
) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls: at least ``repeats`` calls, ``min_seconds`` in all."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    started = time.perf_counter()
    while not _enough(len(out), started, repeats, min_seconds, max_repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def time_pairs(
    a: Callable[[], Any],
    b: Callable[[], Any],
    repeats: int,
    warmup: int,
    min_seconds: float = 0.0,
    max_repeats: int = 1000,
) -> tuple[list[float], list[float]]:
    """Interleaved timings of two calls: pair i runs ``a`` then ``b`` for even i, ``b`` then ``a`` for odd i.

    Runs at least ``repeats`` pairs and keeps going until ``min_seconds`` have passed (at most ``max_repeats``).
    """
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    started = time.perf_counter()
    while not _enough(len(ta), started, repeats, min_seconds, max_repeats):
        for fn, sink in ((a, ta), (b, tb)) if len(ta) % 2 == 0 else ((b, tb), (a, ta)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return ta, tb


def median_ci95(sorted_values: list[float]) -> tuple[float, float]:
    """Approximate distribution-free 95 % interval of the median: the order statistics at ``n/2 -+ 0.98 sqrt(n)``."""
    n = len(sorted_values)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return sorted_values[lo], sorted_values[hi]


def ratio(num: list[float], den: list[float]) -> dict[str, float | int]:
    """``median(num) / median(den)``; the median, quartiles and 95 % interval of the pair ratios ``num[i] / den[i]``."""
    pairs = sorted(x / y for x, y in zip(num, den))
    q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0], pairs[0], pairs[0])
    lo, hi = median_ci95(pairs)
    return {
        "ratio_of_medians": statistics.median(num) / statistics.median(den),
        "pair_median": statistics.median(pairs),
        "pair_p25": q1,
        "pair_p75": q3,
        "pair_median_ci95": [lo, hi],
        "ratio_of_minima": min(num) / min(den),
        "n": len(pairs),
    }


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process in MiB (None where /proc is missing)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to the current one (Linux 4.0+); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`, in MiB."""
    return _status_mb("VmHWM")


def write_result(out_dir: Path, name: str, args: argparse.Namespace, figures: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` with the environment, the run settings and the figures."""
    record = {
        "benchmark": name,
        **environment(args.threads),
        "settings": {
            "repeats": args.repeats, "min_seconds": args.min_seconds, "warmup": args.warmup, "quick": args.quick
        },
        **figures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s", path)
    return path
