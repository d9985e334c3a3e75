"""Test-wide settings and fixtures.

The Hub is unreachable from the test machines: in-process code runs with ``HF_HUB_OFFLINE=1`` and a
private ``HF_HOME``, set here before anything imports huggingface_hub (it reads them at import time).
Tests of the real download path start their own fake Hub and run the client in a subprocess.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="posenc-test-hf-"))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CHECKPOINTS = ROOT / "checkpoints"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def rss_mb() -> float:
    """Resident memory of this process (an in-process server included), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


@contextmanager
def sampled_rss_mb(interval_s: float = 0.02) -> Iterator[list[float]]:
    """Sample :func:`rss_mb` every ``interval_s`` while the block runs; the list holds the samples, first one before."""
    samples = [rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            samples.append(rss_mb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it is present in CI)")
    return SHARED_DATA


@pytest.fixture
def noise_photos(tmp_path: Path) -> list[Path]:
    """Six 40x48 PNGs of seeded random pixels: a folder measurement's smallest honest input (some held out)."""
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(6):
        path = tmp_path / f"noise{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
