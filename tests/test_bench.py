"""Smoke runs of the benchmarks in ``bench/``: each script runs one iteration and writes well-formed JSON.

Timing is never asserted here; the figures live in ``bench/results/`` and the README.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.common import RESULTS
from bench.report import END, START, render, write_between_markers
from conftest import ROOT

ENVIRONMENT_KEYS = {"benchmark", "timestamp", "hardware", "threads", "versions", "settings"}
HEADINGS = {
    "forward_cpu": "| deit_tiny | 2 |",
    "app_request": "| levit_128s | `timm/levit_128s.fb_dist_in1k` | offset_bias | 7.8M |",
    "model_load": "models in turn through the app's cache",
    "gpu": "| swin_tiny | 2 |",
}

# (module, extra arguments kept small so the smoke run takes seconds, a check of the figures it wrote)
CASES = [
    (
        "forward_cpu",
        ["--models", "deit_tiny", "swin_tiny", "--batch-sizes", "2"],
        lambda r: [row["batch"] for m in r["models"].values() for row in m["forward"]] == [2, 2]
        and all(m["inspect"]["ratio"]["n"] == 1 for m in r["models"].values())
        and all(m["forward"][0]["control_timm_timm"]["n"] == 1 for m in r["models"].values())
        and r["runs"] == 1 and all(len(m["forward"][0]["runs"]) == 1 for m in r["models"].values())
        # DeiT runs exactly timm's operators; Swin folds windows into heads for the fused kernel, so it does not
        and r["models"]["deit_tiny"]["forward"][0]["same_kernels"] is True
        and "aten::_scaled_dot_product_flash_attention_for_cpu" in r["models"]["swin_tiny"]["forward"][0][
            "kernel_differences"],
    ),
    (
        "app_request",
        ["--families", "learned", "windowed", "--architectures", "levit_128s"],
        lambda r: {"cifar10-learned", "cifar10-windowed"} <= r["models"].keys()
        and all(m["request"]["median_ms"] > 0 and "attention" in m["views"] for m in r["models"].values())
        # the curated rows: the real model sizes, every view of each mechanism timed, a budget by size class
        and list(r["architectures"]) == ["levit_128s"]
        and r["architectures"]["levit_128s"]["params"] == 7_777_058
        and r["architectures"]["levit_128s"]["input_size"] == [224, 224]
        and {"forward_inspect", "views", "png_encode"} <= r["architectures"]["levit_128s"]["stages"].keys()
        and {"offset_bias/offset_bias_table", "attention"} <= r["architectures"]["levit_128s"]["views"].keys()
        and r["architectures"]["levit_128s"]["request_target_ms"] == 1000.0,
    ),
    (
        "model_load",
        ["--families", "learned", "windowed"],
        lambda r: len(r["cache_turnover"]["rss_after_each_load_mb"]) == 2 * r["cache_turnover"]["models"]
        and all(m["load"]["n"] == 1 for m in r["models"].values()),
    ),
    (
        "gpu",
        ["--device", "cpu", "--batch-size", "2", "--models", "swin_tiny", "--families", "windowed"],
        lambda r: r["inference"]["swin_tiny"]["batch"] == 2 and r["training"]["windowed"]["images_per_s"] > 0,
    ),
]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(("name", "args", "check"), CASES, ids=[c[0] for c in CASES])
def test_benchmark_quick_run_writes_its_json(tmp_path, name, args, check):
    done = run_module(f"bench.{name}", "--quick", "--out", str(tmp_path), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert ENVIRONMENT_KEYS <= record.keys()
    assert record["benchmark"] == name and record["settings"]["quick"] is True
    assert record["threads"] == 2 and record["hardware"]["cores"] >= 1
    assert {"python", "torch", "timm", "posenc"} <= record["versions"].keys()
    assert check(record)
    assert HEADINGS[name] in render(tmp_path)


def test_forward_runs_keep_the_median_run_and_list_every_run():
    from bench.forward_cpu import median_run

    def run(ratio, control, load):
        row = {"batch": 1, "ratio": {"pair_median": ratio}, "control_timm_timm": {"pair_median": control},
               "load_average_1min": load, "same_kernels": True}
        return {"timm_name": "x", "forward": [row], "inspect": {"ratio": {"pair_median": ratio + 1}}}

    combined = median_run([run(1.20, 1.01, 9.0), run(0.90, 0.99, 3.0), run(1.00, 1.00, 5.0)])
    assert combined["forward"][0]["ratio"]["pair_median"] == 1.00
    assert combined["forward"][0]["load_average_1min"] == 5.0
    assert [r["ratio"] for r in combined["forward"][0]["runs"]] == [1.20, 0.90, 1.00]  # in the order they ran
    assert [r["control"] for r in combined["forward"][0]["runs"]] == [1.01, 0.99, 1.00]
    assert combined["inspect"]["ratio"]["pair_median"] == 2.00


def test_gpu_benchmark_records_no_gpu_without_cuda(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script measures instead")
    done = run_module("bench.gpu", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "gpu.json").read_text())["status"] == "no GPU"


def test_report_replaces_only_the_text_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")
    write_between_markers(readme, "| new | table |\n")
    assert readme.read_text() == f"# title\n\n{START}\n| new | table |\n{END}\n\nafter\n"


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        write_between_markers(readme, "table")
    assert readme.read_text() == "# title\n"


def test_readme_tables_are_rendered_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme
    tables = readme.split(START, 1)[1].split(END, 1)[0]
    assert tables.strip() == render(RESULTS).strip(), "run `python -m bench.report --write README.md`"
    assert "#### Reliability: load and memory" in tables


@pytest.mark.slow
def test_measure_benchmark_quick_run_writes_its_json(tmp_path, shared_data):
    done = run_module("bench.measure_cli", "--quick", "--out", str(tmp_path), "--limit", "2", "--same-photos", "1",
                      "--batch", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "measure_cli.json").read_text())
    assert ENVIRONMENT_KEYS <= record.keys() and record["photos"] == 2 and record["same_passes"]["photos"] == 1
    assert record["images_per_s"]["measure"] > 0 and record["load_average_during"]["samples"] >= 1
    assert "python -m posenc measure" in render(tmp_path)
