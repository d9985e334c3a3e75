"""Test-wide settings and fixtures.

The Hub is unreachable from the test machines: in-process code runs with ``HF_HUB_OFFLINE=1`` and a
private ``HF_HOME``, set here before anything imports huggingface_hub (it reads them at import time).
Tests of the real download path start their own fake Hub and run the client in a subprocess.
"""

from __future__ import annotations

import os
import tempfile
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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it is present in CI)")
    return SHARED_DATA
