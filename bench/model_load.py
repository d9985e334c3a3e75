"""Model load: time from a warm cache, peak resident memory, and memory while the app's cache turns over.

* Load time: :func:`posenc.load` on a local folder whose files were read once before (warm page cache),
  which is what a cached Hub download is; median over repeats.
* Peak memory: the peak resident set while loading a model, set against the resident set right before
  (the peak is reset first through ``/proc/self/clear_refs``; Linux only).
* Cache turnover: ten models are loaded in turn through the app's :class:`posenc.app.ModelCache` (bounded
  LRU), twice round; the resident set after every load shows whether memory grows beyond what the cache
  holds.

Models: the bundled CIFAR-10 checkpoints (or freshly saved stand-ins of the same presets) and the real
DeiT-Tiny from ``../shared/data`` (timm layout, so its load includes the conversion).

    python -m bench.model_load                     # writes bench/results/model_load.json
    python -m bench.model_load --quick --out /tmp  # one iteration of each figure
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from bench.app_request import DEIT_TINY, model_folders
from bench.common import ROOT, parse_args, peak_rss_mb, reset_peak_rss, rss_mb, summary, time_call, write_result
from posenc.hub import load
from posenc.train import PRESETS
from posenc.app import ModelCache

logger = logging.getLogger(__name__)

#: models the app keeps loaded by default (``POSENC_CACHE_SIZE``)
CACHE_SIZE = 4
#: models loaded in turn through the cache, per round
TURNOVER = 10


def measure_peak(source: str) -> dict[str, float | None]:
    """Resident memory right before loading ``source``, its peak while loading, and after (MiB; None off Linux)."""
    before = rss_mb()
    if not reset_peak_rss():
        return {"rss_before_mb": before, "peak_rss_mb": None, "rss_after_mb": None, "peak_over_before_mb": None}
    loaded = load(source)
    peak, after = peak_rss_mb(), rss_mb()
    del loaded
    return {"rss_before_mb": before, "peak_rss_mb": peak, "rss_after_mb": after, "peak_over_before_mb": peak - before}


def weights_mb(folder: Path) -> float:
    """Size of the weight files in a model folder, in MiB."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) / 2**20


def turnover_sources(folders: dict[str, Path], tmp: Path) -> list[str]:
    """Ten distinct sources for the cache: every model folder, topped up with linked copies of the largest."""
    sources = [str(p.resolve()) for p in folders.values()][:TURNOVER]
    largest = max(folders.values(), key=weights_mb)
    for i in range(TURNOVER - len(sources)):
        copy = tmp / "copies" / f"{largest.name}-{i}"
        copy.mkdir(parents=True)
        for f in largest.iterdir():
            (copy / f.name).symlink_to(f.resolve())
        sources.append(str(copy))
    return sources


def cache_turnover(sources: list[str], rounds: int) -> dict[str, Any]:
    """Resident memory after each load of ``sources`` in turn through a :class:`ModelCache` of the app's size."""
    cache = ModelCache(load, size=CACHE_SIZE)
    start = rss_mb()
    after: list[float] = []
    for _ in range(rounds):
        for source in sources:
            cache.get(source)
            after.append(rss_mb())
    ends = [after[(r + 1) * len(sources) - 1] for r in range(rounds)]
    return {
        "cache_size": CACHE_SIZE,
        "models": len(sources),
        "rounds": rounds,
        "rss_start_mb": start,
        "rss_after_each_load_mb": after,
        "rss_end_of_round_mb": ends,
        "growth_last_round_mb": ends[-1] - ends[0] if rounds > 1 else None,
    }


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="bundled checkpoints folder")
    parser.add_argument("--deit", type=Path, default=DEIT_TINY, help="DeiT-Tiny folder in timm Hub layout")
    parser.add_argument("--families", nargs="+", choices=PRESETS, default=list(PRESETS),
                        help="CIFAR-10 presets to load (bundled folder cifar10-<family>, else a stand-in)")  # fmt: skip


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=10, warmup=1, min_seconds=5.0, extra=_options)
    with tempfile.TemporaryDirectory(prefix="posenc-bench-") as tmp:
        tmp = Path(tmp)
        folders = model_folders(args, tmp)
        models: dict[str, Any] = {}
        for name, folder in sorted(folders.items()):
            source = str(folder.resolve())
            memory = measure_peak(source)  # the model's first load in this process; it also warms the page cache
            times = time_call(lambda: load(source), args.repeats, args.warmup, args.min_seconds)
            models[name] = {"weights_mb": weights_mb(folder), "load": summary(times), **memory}
            logger.info("%s: load %.1f ms, peak over before %s MiB", name, models[name]["load"]["median_ms"],
                        memory["peak_over_before_mb"])  # fmt: skip
        turnover = cache_turnover(turnover_sources(folders, tmp), rounds=2 if args.quick else 3)
    largest = max(m["weights_mb"] for m in models.values())
    growth = turnover["growth_last_round_mb"]
    write_result(args.out, "model_load", args, {
        "method": "posenc.load on local Hub-layout folders with a warm page cache; peak resident memory while "
                  "loading, against the resident memory right before; cache turnover: ten models in turn through "
                  f"posenc.app.ModelCache (size {CACHE_SIZE}), repeated rounds, resident memory after each load; "
                  "met when the last round ends at most one model's weights above the first",
        "models": models,
        "cache_turnover": turnover,
        "met": {"no_growth_beyond_cache": None if growth is None else growth <= largest},
    })  # fmt: skip


if __name__ == "__main__":
    main()
