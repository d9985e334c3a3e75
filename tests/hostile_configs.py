"""Hostile config.json edits and a worker that loads each under a memory limit (run by tests/test_hostile_config.py).

``python tests/hostile_configs.py CASES.json`` reads a list of ``{"folder", "edits"}`` cases, sets an address-space
limit, loads each edited folder with :func:`posenc.load` and prints one JSON line per case: what happened, the
seconds it took and the largest rise in resident memory while it ran.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The values tried in every numeric field (and in every item of a list field).
HOSTILE_VALUES: tuple[Any, ...] = (0, -1, 10**12, "x", math.nan)
#: Address space the worker may add to what it holds after imports (a regression fails instead of the machine).
HEADROOM_BYTES = 2 * 2**30


def numeric_paths(config: dict[str, Any], skip: frozenset[str] = frozenset()) -> list[tuple[str, ...]]:
    """Key paths of every number and list of numbers in a JSON config (nested objects included)."""
    paths = []
    for key, value in config.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            paths += [(key, *p) for p in numeric_paths(value, skip)]
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)) or (
            isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            paths.append((key,))
    return paths


def edits_for(config: dict[str, Any], path: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(label, new value) for one field: each hostile value, per item for lists, and a list of the wrong length."""
    current = config
    for key in path:
        current = current[key]
    if isinstance(current, list):
        out = [(repr(v), [v] * len(current)) for v in HOSTILE_VALUES if not isinstance(v, str)]
        return out + [("'x'", "x"), ("one item too many", [*current, current[-1]])]
    return [(repr(v), v) for v in HOSTILE_VALUES]


def edited(config: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmSize line")


def run_cases(cases: list[dict[str, Any]]) -> None:
    """Load every case's edited folder and print one JSON result line per case."""
    import threading

    import posenc
    from posenc.hub import HubLoadError

    posenc.load(cases[0]["folder"])  # warm up: imports and first-use allocations are not the edit's cost
    limit = _vm_size() + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    work = Path(tempfile.mkdtemp(prefix="posenc-hostile-"))
    for i, case in enumerate(cases):
        folder = work / str(i)
        folder.mkdir()
        for item in Path(case["folder"]).iterdir():
            (folder / item.name).symlink_to(item.resolve())
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(case["config"]))
        before, peak, done = _rss_mb(), [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], _rss_mb())

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        try:
            posenc.load(str(folder))
            outcome, message = "loaded", ""
        except HubLoadError as error:
            outcome, message = f"HubLoadError:{error.reason}", str(error)
        except BaseException as error:  # noqa: BLE001 - the test reports whatever escaped
            outcome, message = type(error).__name__, str(error)[:300]
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        grew = max(peak[0], _rss_mb()) - before
        print(json.dumps({"case": case["label"], "outcome": outcome, "message": message, "seconds": seconds, "rss_growth_mb": grew}), flush=True)
        shutil.rmtree(folder)


if __name__ == "__main__":
    run_cases(json.loads(Path(sys.argv[1]).read_text()))
