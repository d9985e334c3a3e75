"""Reliability under load and memory pressure: the measured figures of the README's reliability table.

Both measurements drive one ``python app.py`` process on 127.0.0.1 through gradio_client, as users would,
with the bundled CIFAR-10 checkpoints (or random-weight stand-ins of the same presets while they are absent:
reliability does not depend on the weights).

* **load**: 8 concurrent clients (one ``gradio_client.Client`` each) send 200 requests in all, spread over
  different images, models, endpoints, blocks and clicked patches. Every distinct request is first made
  alone; each concurrent response must equal it. Reported: errors, mismatches, p50 and p95 latency.
* **memory**: 1,000 sequential requests cycle through all six models while the app's cache holds three.
  Reported: the app process's resident memory (``VmRSS`` of ``/proc/<pid>/status``) after a warm-up and at
  the end, and whether the cache dropped models in least-recently-used order (from the app's log, checked
  against a simulated LRU and shown to differ from FIFO).

    python -m bench.reliability                      # full counts; writes bench/results/reliability.json
    python -m bench.reliability --quick --out /tmp   # small counts: checks that the script runs

``tests/test_reliability.py`` runs the same functions with smaller counts (see its docstrings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, parse_args, write_result
from posenc.models import build_model
from posenc.train import PRESETS, cifar_model

logger = logging.getLogger(__name__)

FAMILY_VIEW = {  # family -> (endpoint of its position view, whether it takes the block)
    "none": ("/predict", False),
    "learned": ("/position_embedding", False),
    "sincos": ("/position_embedding", False),
    "relative": ("/relative_bias", True),
    "windowed": ("/relative_bias", True),
    "rope": ("/rope", False),
}
GRID = 8  # the CIFAR-10 presets see 32x32 inputs as an 8x8 patch grid
MIN_DEPTH = 6  # blocks 0..5 exist in every preset
DROPPED = "model cache: dropped "  # posenc.app.ModelCache's log line for an eviction


# --------------------------------------------------------------------------------------------- models and images


def bundled_or_stand_ins(folder: Path, checkpoints: Path = ROOT / "checkpoints") -> Path:
    """The bundled checkpoints when every family has its weights, else random-weight stand-ins written to ``folder``."""
    if all((checkpoints / f"cifar10-{f}" / "model.safetensors").is_file() for f in PRESETS):
        return checkpoints
    for seed, family in enumerate(PRESETS):
        target = folder / f"cifar10-{family}"
        if not (target / "model.safetensors").is_file():
            torch.manual_seed(seed)
            build_model(cifar_model(family)).save_pretrained(target)
            (target / "metrics.json").write_text(json.dumps({"accuracy": 0.1, "dataset": "cifar10-jpeg.zip"}))
    logger.info("bundled checkpoints incomplete: using random-weight stand-ins in %s", folder)
    return folder


def sample_images(folder: Path, count: int = 8) -> list[Path]:
    """``count`` distinct PNGs of different sizes and aspect ratios (seeded noise over a gradient)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        w, h = 40 + 24 * (i % 4), 36 + 20 * (i % 3)
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]  # 1, w, 1
        pixels = np.clip(ramp * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 40, (h, w, 3)), 0, 255)  # h, w, 3
        path = folder / f"image{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- the app process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppProcess:
    """``python app.py`` running on 127.0.0.1, with its merged stdout/stderr collected line by line."""

    process: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    def rss_mb(self) -> float:
        """Resident memory of the app process (``VmRSS`` of ``/proc/<pid>/status``) in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"/proc/{self.process.pid}/status has no VmRSS line")

    def dropped(self) -> list[str]:
        """Sources the app's model cache dropped, in order (parsed from its log)."""
        return [line.split(DROPPED, 1)[1].strip() for line in list(self.lines) if DROPPED in line]

    def wait_for_drops(self, count: int, timeout: float = 10.0) -> list[str]:
        """The drop log once it has at least ``count`` entries and has been still for half a second.

        The app writes each line before it answers, but the lines reach this process a little later.
        """
        deadline = time.monotonic() + timeout
        seen, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = len(self.dropped())
            if now != seen:
                seen, still_since = now, time.monotonic()
            elif now >= count and time.monotonic() - still_since >= 0.5:
                break
            time.sleep(0.05)
        return self.dropped()

    def close(self) -> None:
        """Stop the app (terminate, then kill after 20 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start_app(checkpoints: Path, *, cache_size: int, work_dir: Path, timeout: float = 240.0) -> AppProcess:
    """Start ``python app.py`` on a free port of 127.0.0.1, offline, and wait until it serves its page.

    Args:
        checkpoints: the bundled checkpoints folder (``POSENC_CHECKPOINTS``).
        cache_size: models the app keeps loaded (``POSENC_CACHE_SIZE``).
        work_dir: holds the app's Hub cache and Gradio's temporary files.
        timeout: seconds to wait for the page.
    """
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(work_dir / "gradio"),
        "POSENC_CHECKPOINTS": str(checkpoints),
        "POSENC_CACHE_SIZE": str(cache_size),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work_dir / "hf"),
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    app = AppProcess(process, f"http://127.0.0.1:{port}/")

    def drain() -> None:
        for line in process.stdout:
            app.lines.append(line.rstrip("\n"))

    threading.Thread(target=drain, name="posenc-app-log", daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(app.url, timeout=5) as response:
                if response.status == 200:
                    return app
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            app.close()
            tail = "\n".join(app.lines[-30:])
            raise RuntimeError(f"app.py did not serve {app.url} within {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """One API call: the endpoint, the image and the arguments after it."""

    endpoint: str
    image: Path
    args: tuple[Any, ...]


def request_mix(images: Sequence[Path], sources: dict[str, str], count: int) -> list[Request]:
    """``count`` distinct requests: every image, model and endpoint, with varying blocks and clicked patches.

    Request i uses image i, the family i (mod 6) and, in turn, the attention view, the family's position view
    and the top-5; the patch walks the 8x8 grid and the block the first six blocks.
    """
    families = list(sources)
    out = []
    for i in range(count):
        family = families[i % len(families)]
        model, image = sources[family], images[i % len(images)]
        row, col, block = (3 * i) % GRID, (5 * i + i // GRID) % GRID, (i // 2) % MIN_DEPTH
        view, takes_block = FAMILY_VIEW[family]
        kind = (i // len(families)) % 3
        if kind == 0:
            out.append(Request("/attention", image, (model, None, block, row, col)))
        elif kind == 1 and view != "/predict":
            out.append(Request(view, image, (model, None, block, row, col) if takes_block else (model, None, row, col)))
        else:
            out.append(Request("/predict", image, (model, None)))
    return out


def fingerprint(result: Any) -> str:
    """A digest of a response: files by content (each file is deleted once read), everything else as JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in sorted(value.items())}
        if isinstance(value, str) and os.path.isfile(value):
            path = Path(value)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            path.unlink(missing_ok=True)
            return f"file:{path.suffix}:{digest}"
        return value

    return hashlib.sha256(json.dumps(plain(result), sort_keys=True, default=repr).encode()).hexdigest()


def call(client: Any, request: Request) -> Any:
    """Make one request with a gradio_client ``Client``."""
    from gradio_client import handle_file

    return client.predict(handle_file(str(request.image)), *request.args, api_name=request.endpoint)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _clients(url: str, count: int, download_dir: Path) -> list[Any]:
    from gradio_client import Client

    return [Client(url, verbose=False, download_files=str(download_dir / f"client{i}")) for i in range(count)]


# --------------------------------------------------------------------------------------------- load


def run_load(url: str, requests: Sequence[Request], *, total: int, clients: int, download_dir: Path) -> dict[str, Any]:
    """Each distinct request alone, then ``total`` requests from ``clients`` concurrent clients; compare and time.

    The concurrent requests cycle through ``requests`` in a shuffled (seeded) order; each client takes the
    next one as soon as its previous answer arrives.

    Returns:
        Counts (requests, errors, mismatches), latency percentiles in ms of the concurrent phase and of the
        requests made alone, wall time, throughput, and the first few errors.
    """
    pool = _clients(url, clients, download_dir)
    alone: list[str] = []
    alone_ms: list[float] = []
    for request in requests:
        started = time.perf_counter()
        alone.append(fingerprint(call(pool[0], request)))
        alone_ms.append((time.perf_counter() - started) * 1e3)
    order = [i % len(requests) for i in range(total)]
    random.Random(0).shuffle(order)
    feed: Iterator[int] = iter(order)
    feed_lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[int] = []

    def worker(client: Any) -> None:
        while True:
            with feed_lock:
                index = next(feed, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                got = fingerprint(call(client, requests[index]))
            except Exception as error:  # every failure counts; the run goes on
                errors.append(f"{requests[index].endpoint}: {type(error).__name__}: {error}")
                continue
            latencies.append((time.perf_counter() - started) * 1e3)
            if got != alone[index]:
                mismatches.append(index)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        list(executor.map(worker, pool))
    wall = time.perf_counter() - started
    for client in pool:
        client.close()
    result = {
        "clients": clients,
        "distinct_requests": len(requests),
        "requests": total,
        "completed": len(latencies),
        "errors": len(errors),
        "mismatches": len(mismatches),
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p95_ms": percentile(latencies, 95) if latencies else None,
        "max_ms": max(latencies, default=None),
        "alone_p50_ms": percentile(alone_ms, 50),
        "alone_p95_ms": percentile(alone_ms, 95),
        "wall_s": wall,
        "requests_per_s": total / wall,
        "endpoints": dict(sorted(Counter(requests[i].endpoint for i in order).items())),
        "first_errors": errors[:5],
    }
    logger.info("load: %d requests from %d clients, %d errors, %d mismatches, p50 %.0f ms, p95 %.0f ms",
                total, clients, len(errors), len(mismatches), result["p50_ms"] or -1, result["p95_ms"] or -1)
    return result


# --------------------------------------------------------------------------------------------- memory


def model_sequence(models: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``count`` model choices with some locality: mostly one of the last few used, sometimes any model.

    Every model appears in the first ``len(models)`` choices, so the warm-up loads them all.
    """
    rng = random.Random(seed)
    sequence = list(models)
    while len(sequence) < count:
        recent = list(OrderedDict.fromkeys(reversed(sequence)))[:3]
        sequence.append(rng.choice(recent) if rng.random() < 0.5 else rng.choice(list(models)))
    return sequence[:count]


def simulate_drops(sequence: Sequence[str], size: int, *, lru: bool = True) -> list[tuple[int, str]]:
    """What an LRU (or, with ``lru=False``, a FIFO) cache of ``size`` drops for ``sequence``, starting empty.

    Returns:
        (index of the request that caused the drop, dropped model), in order.
    """
    cache: OrderedDict[str, None] = OrderedDict()
    dropped = []
    for i, model in enumerate(sequence):
        if model in cache:
            if lru:
                cache.move_to_end(model)
            continue
        cache[model] = None
        if len(cache) > size:
            dropped.append((i, cache.popitem(last=False)[0]))
    return dropped


def _names(sources: list[str]) -> list[str]:
    """Folders as the app names them (the cache logs public names: a folder's name, a repo id as is)."""
    return [Path(s).name for s in sources]


def run_memory(
    app: AppProcess,
    sources: Sequence[str],
    images: Sequence[Path],
    *,
    total: int,
    cache_size: int,
    warmup: int,
    download_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``total`` sequential requests cycling through ``sources`` (more than the cache holds); RSS and evictions.

    Requests alternate between the top-5, the attention view and the Explore tab's full analysis. RSS is read
    from /proc after every request. The growth compares the median of the last 20 readings with the median of
    the 20 readings after ``warmup`` requests.

    Returns:
        RSS figures in MiB, the growth in percent, the drop log and whether it matches LRU (and not FIFO).
    """
    if total < warmup + 40:
        raise ValueError(f"total={total} must exceed warmup={warmup} by at least 40 requests (two RSS windows)")
    (client,) = _clients(app.url, 1, download_dir)
    sequence = model_sequence(sources, total)
    drops_before = len(app.dropped())
    rss: list[float] = [app.rss_mb()]
    errors: list[str] = []
    started = time.perf_counter()
    for i, model in enumerate(sequence):
        image = images[i % len(images)]
        request = [
            Request("/predict", image, (model, None)),
            Request("/attention", image, (model, None, i % MIN_DEPTH, i % GRID, (i // GRID) % GRID)),
            Request("/analyse", image, (model, None, i % MIN_DEPTH, (i // GRID) % GRID, i % GRID)),
        ][i % 3]
        try:
            fingerprint(call(client, request))
        except Exception as error:  # counted and reported; the run goes on
            errors.append(f"{request.endpoint} {model}: {type(error).__name__}: {error}")
        rss.append(app.rss_mb())
        if progress is not None:
            progress(i + 1)
    wall = time.perf_counter() - started
    client.close()
    # Once every model has been asked for in turn, the cache holds the last `cache_size` of them whatever it
    # held before (the app may have served other requests), so from there on the drops are determined.
    expected = [m for i, m in simulate_drops(sequence, cache_size) if i >= len(sources)]
    fifo = [m for i, m in simulate_drops(sequence, cache_size, lru=False) if i >= len(sources)]
    dropped = app.wait_for_drops(drops_before + len(sources) - cache_size + len(expected))[drops_before:]
    after_warmup = statistics.median(rss[warmup : warmup + 20])
    end = statistics.median(rss[-20:])
    result = {
        "requests": total,
        "models": len(sources),
        "cache_size": cache_size,
        "warmup_requests": warmup,
        "errors": len(errors),
        "first_errors": errors[:5],
        "rss_start_mb": rss[0],
        "rss_after_warmup_mb": after_warmup,
        "rss_end_mb": end,
        "rss_peak_after_warmup_mb": max(rss[warmup:]),
        "rss_growth_pct": 100.0 * (end - after_warmup) / after_warmup,
        "rss_samples_mb": [round(x, 1) for x in rss[:: max(1, total // 100)]],
        "evictions": len(dropped),
        "evictions_after_first_cycle": len(expected),
        "eviction_order_is_lru": (len(dropped) >= len(expected)
                                  and _names(dropped[len(dropped) - len(expected):]) == _names(expected)),
        "eviction_order_differs_from_fifo": expected != fifo,
        "first_evictions": [Path(s).name for s in dropped[:8]],
        "wall_s": wall,
    }
    logger.info("memory: %d requests, RSS %.0f -> %.0f MiB after warm-up (%+.1f %%), %d evictions, LRU order %s",
                total, after_warmup, end, result["rss_growth_pct"], len(dropped), result["eviction_order_is_lru"])
    return result


# --------------------------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    """The load and memory rows of the README's reliability table, from a ``reliability.json`` record."""
    load, memory = result["load"], result["memory"]
    return "\n".join([
        f"| load | {load['clients']} concurrent clients, {load['requests']} requests "
        f"({load['distinct_requests']} distinct) | {load['errors']} errors, {load['mismatches']} responses differing "
        f"from the same request made alone; p50 {load['p50_ms']:.0f} ms, p95 {load['p95_ms']:.0f} ms "
        f"(alone: p50 {load['alone_p50_ms']:.0f} ms) | `python -m bench.reliability` |",
        f"| memory | {memory['requests']} requests over {memory['models']} models, cache of {memory['cache_size']} "
        f"| RSS {memory['rss_after_warmup_mb']:.0f} MiB after {memory['warmup_requests']} warm-up requests, "
        f"{memory['rss_end_mb']:.0f} MiB at the end ({memory['rss_growth_pct']:+.1f} %); {memory['evictions']} "
        f"evictions, in LRU order: {'yes' if memory['eviction_order_is_lru'] else 'no'} | `python -m bench.reliability` |",
    ])  # fmt: skip


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200, help="load: requests in all (default 200)")
    parser.add_argument("--distinct", type=int, default=40, help="load: distinct requests (default 40)")
    parser.add_argument("--clients", type=int, default=8, help="load: concurrent clients (default 8)")
    parser.add_argument("--memory-requests", type=int, default=1000, help="memory: requests (default 1000)")
    parser.add_argument("--warmup-requests", type=int, default=100, help="memory: warm-up requests (default 100)")
    parser.add_argument("--cache-size", type=int, default=3, help="models the app keeps loaded (default 3)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=1, warmup=0, extra=_options)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    if args.quick:
        args.requests, args.distinct, args.memory_requests, args.warmup_requests = 16, 8, 60, 12
    with tempfile.TemporaryDirectory(prefix="posenc-reliability-") as tmp:
        tmp = Path(tmp)
        checkpoints = bundled_or_stand_ins(tmp / "stand-ins")
        sources = {f: str(checkpoints / f"cifar10-{f}") for f in PRESETS}
        images = sample_images(tmp / "images")
        app = start_app(checkpoints, cache_size=args.cache_size, work_dir=tmp)
        try:
            load = run_load(app.url, request_mix(images, sources, args.distinct), total=args.requests,
                            clients=args.clients, download_dir=tmp / "downloads")
            memory = run_memory(app, list(sources.values()), images, total=args.memory_requests,
                                cache_size=args.cache_size, warmup=args.warmup_requests,
                                download_dir=tmp / "downloads",
                                progress=lambda n: n % 100 == 0 and logger.info("memory: %d requests", n))
        finally:
            app.close()
    record = {
        "method": "one `python app.py` process on 127.0.0.1 driven through gradio_client; RSS from /proc/<pid>/status",
        "checkpoints": "bundled" if checkpoints == ROOT / "checkpoints" else "random-weight stand-ins",
        "load": load,
        "memory": memory,
    }
    record["markdown"] = markdown(record)
    write_result(args.out, "reliability", args, record)


if __name__ == "__main__":
    main()
