"""Render the benchmark results in ``bench/results/*.json`` as the README's Markdown tables.

    python -m bench.report                    # print the tables
    python -m bench.report --write README.md  # replace the text between the two markers below in README.md

The README keeps the tables between ``<!-- bench:start -->`` and ``<!-- bench:end -->``, so they always
match the JSON files they were rendered from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def _ratio(r: dict[str, Any]) -> str:
    """Median of the per-pair ratios, its 95 % interval, the pairs' quartiles, and the ratio of the medians."""
    ci = r.get("pair_median_ci95")
    interval = f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return (f"**{r['pair_median']:.3f}**{interval}; pairs IQR {r['pair_p25']:.2f}-{r['pair_p75']:.2f}; "
            f"medians {r['ratio_of_medians']:.3f}")  # fmt: skip


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def environment(record: dict[str, Any]) -> str:
    """One line: hardware, threads, versions, date and the machine's load while it ran."""
    hw, v = record["hardware"], record["versions"]
    load = record.get("load_average")
    busy = f", load average {load[0]:.1f}" if load else ""
    gpu = f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    quick = " **(quick smoke run: not a measurement)**" if record["settings"].get("quick") else ""
    when = record["timestamp"][:16].replace("T", " ")
    return (
        f"*{hw['cpu']} ({hw['cores']} cores{gpu}), {record['threads']} threads, Python {v['python']}, "
        f"torch {v['torch']}, timm {v['timm']}, posenc {v['posenc']}; {when} UTC{busy}.*{quick}"
    )


def _section(title: str, record: dict[str, Any]) -> list[str]:
    """A benchmark's heading and the line saying where and when it ran."""
    return [f"#### {title}", "", environment(record), ""]


def _ratio_short(r: dict[str, Any]) -> str:
    """Median of the per-pair ratios with its 95 % interval."""
    ci = r.get("pair_median_ci95")
    return f"{r['pair_median']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _runs(row: dict[str, Any]) -> str:
    """Every run's posenc / timm ratio with its A/A ratio and the 1-minute load average, in the order they ran."""
    return "; ".join(f"{r['ratio']:.3f} (A/A {r['control']:.3f}, load {r['load_average_1min']:.1f})"
                     for r in row["runs"])  # fmt: skip


def forward_cpu(record: dict[str, Any]) -> list[str]:
    runs = record.get("runs", 1)
    title = "Forward latency on the CPU: posenc fast path vs timm"
    if record["benchmark"] != "forward_cpu":
        title += f" ({', '.join(record['models'])}; `--name {record['benchmark']}`)"
    lines = [
        *_section(title, record),
        "Ratios are medians of per-pair ratios with their 95 % interval. **A/A** times timm against an identical "
        "copy of itself the same way: the noise floor of the moment. **Same kernels**: each forward calls the same "
        "aten operators the same number of times (torch.profiler).",
        "",
        "| model | batch | posenc ms | timm ms | posenc / timm | A/A: timm / timm | same kernels | target | met |",
        "|---|---:|---:|---:|---|---|---|---:|---|",
    ]
    if runs > 1:
        lines[-4] += (f" {runs} runs, the models taking turns; each row is the run with the median ratio, and the "
                      "table below it lists every run.")
    allocator = record.get("allocator", {}).get("mode")
    lines[-4] += (" glibc's mmap and trim thresholds fixed (`--allocator steady`), so no forward faults its "
                  "activations in again." if allocator == "steady" else
                  " glibc's allocator as it comes (its page faults move batch-16 ratios by up to 10 %).")
    for name, m in record["models"].items():
        for row in m["forward"]:
            posenc, timm = _ms(row["posenc"]["median_ms"]), _ms(row["timm"]["median_ms"])
            control = row.get("control_timm_timm")
            kernels = row.get("same_kernels")
            cells = [
                name, str(row["batch"]), posenc, timm, f"**{_ratio_short(row['ratio'])}**",
                _ratio_short(control) if control else "-",
                "-" if kernels is None else ("yes" if kernels else "no (" + ", ".join(
                    f"{k.removeprefix('aten::')} {a}/{b}" for k, (a, b) in list(row["kernel_differences"].items())[:4]
                ) + ")"),
                str(row["target"] or "-"), _met(row["met"]),
            ]  # fmt: skip
            lines.append(f"| {' | '.join(cells)} |")
    lines += ["", "| model | batch | inspection ms | fast ms | inspection / fast |", "|---|---:|---:|---:|---|"]
    for name, m in record["models"].items():
        i = m["inspect"]
        inspect, fast = _ms(i["inspect"]["median_ms"]), _ms(i["fast"]["median_ms"])
        lines.append(f"| {name} | {i['batch']} | {inspect} | {fast} | {_ratio_short(i['ratio'])} |")
    if runs > 1:
        lines += ["", "| model | batch | every run: posenc / timm (A/A, 1-minute load average) |", "|---|---:|---|"]
        lines += [f"| {name} | {row['batch']} | {_runs(row)} |" for name, m in record["models"].items()
                  for row in m["forward"]]  # fmt: skip
    return lines


def _slowest_views(m: dict[str, Any], count: int = 2) -> str:
    """The ``count`` most expensive views of a model row, with their medians in ms."""
    ranked = sorted(m["views"].items(), key=lambda kv: -kv[1]["median_ms"])[:count]
    return ", ".join(f"{k} {_ms(v['median_ms'])}" for k, v in ranked)


def app_request(record: dict[str, Any]) -> list[str]:
    title = "End-to-end app request (Explore tab, model cached)"
    if record["benchmark"] != "app_request":
        title += f" (`--name {record['benchmark']}`)"
    lines = _section(title, record)
    if record["models"]:
        lines += [
            "| model | input | preprocess | forward (inspect) | views | npz | PNG encode | request ms | views / forward |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for name, m in record["models"].items():
        s = {k: v["median_ms"] for k, v in m["stages"].items()}
        label = name if m["bundled"] or name.startswith("deit") else f"{name} (stand-in)"
        cells = [
            label, "x".join(map(str, m["input_size"])), _ms(s["preprocess"]), _ms(s["forward_inspect"]),
            _ms(m["views_ms"]), _ms(s["export_npz"]), _ms(s["png_encode"]), _ms(m["request"]["median_ms"]),
            f"{m['views_over_forward_inspect']:.2f}",
        ]  # fmt: skip
        lines.append(f"| {' | '.join(cells)} |")
    deit = record["models"].get("deit_tiny_224")
    if deit is not None:
        per_view = ", ".join(f"{v} {_ms(t['median_ms'])}" for v, t in deit["views"].items())
        fast = _ms(deit["stages"]["forward_fast"]["median_ms"])
        lines += ["", f"DeiT-Tiny views (ms): {per_view}; fast-path forward {fast} ms "
                      f"(views / fast forward {deit['views_over_forward_fast']:.2f})."]
    architectures = record.get("architectures")
    if architectures:
        lines += [""] if record["models"] else []
        lines += [
            "One curated model of every architecture, built by timm with random weights of the real size "
            "(`pretrained=False`), loaded from the timm Hub layout and run at the app's default size; block 0, "
            "the default patch. Budget: 1 s for the ViT-S class and smaller, 2 s for the ViT-B class and SAM.",
            "",
            "| model | stands for | mechanisms | parameters | input | forward (inspect) | views | PNG encode | "
            "request ms | budget | views / forward | costliest views (ms) |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, m in architectures.items():
            s = {k: v["median_ms"] for k, v in m["stages"].items()}
            request = f"{_ms(m['request']['median_ms'])}" + ("" if m["request_met"] else " **(over)**")
            ratio = f"{m['views_over_forward_inspect']:.2f}" + ("" if m["views_met"] else " **(over)**")
            size = "x".join(map(str, m["input_size"]))
            if m["input_size"] != m["native_size"]:
                size += f" (native {'x'.join(map(str, m['native_size']))})"
            cells = [
                name, f"`{m['stands_for']}`", " + ".join(m["mechanisms"]) or "none", f"{m['params'] / 1e6:.1f}M",
                size, _ms(s["forward_inspect"]), _ms(m["views_ms"]), _ms(s["png_encode"]), request,
                f"{m['request_target_ms'] / 1000:.0f} s", ratio, _slowest_views(m),
            ]  # fmt: skip
            lines.append(f"| {' | '.join(cells)} |")
    return lines


def model_load(record: dict[str, Any]) -> list[str]:
    lines = [
        *_section("Model load (warm cache) and memory", record),
        "| model | weights MiB | load ms | peak RSS over before, MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, m in record["models"].items():
        load, peak = _ms(m["load"]["median_ms"]), _ms(m["peak_over_before_mb"])
        lines.append(f"| {name} | {m['weights_mb']:.1f} | {load} | {peak} |")
    t = record["cache_turnover"]
    ends = ", ".join(f"{v:.0f}" for v in t["rss_end_of_round_mb"])
    lines += [
        "",
        f"{t['models']} models in turn through the app's cache (size {t['cache_size']}), {t['rounds']} rounds: "
        f"resident MiB at the end of each round {ends} (start {t['rss_start_mb']:.0f}); growth after the first "
        f"round {_ms(t['growth_last_round_mb'])} MiB.",
    ]
    return lines


def gpu(record: dict[str, Any]) -> list[str]:
    lines = _section("GPU", record)
    if record["status"] == "no GPU":
        return lines + ["Not measured: no GPU on the machine that ran it."]
    if record["status"] != "measured":
        lines += [f"**{record['status']}**", ""]
    lines += [
        "| model | batch | posenc img/s | timm img/s | posenc / timm throughput | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, m in record["inference"].items():
        lines.append(f"| {name} | {m['batch']} | {m['posenc_images_per_s']:.0f} | {m['timm_images_per_s']:.0f} | "
                     f"{_ratio(m['throughput_ratio'])} | {_met(m['met'])} |")  # fmt: skip
    lines += ["", "| CIFAR-10 preset | batch | training img/s |", "|---|---:|---:|"]
    for family, t in record["training"].items():
        lines.append(f"| {family} | {t['batch_size']} | {t['images_per_s']:.0f} |")
    return lines


def targets(records: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's speed targets against the figures that decide them (the worst case where there are several)."""
    rows = []
    for forward in (r for name, r in records.items() if name.startswith("forward_cpu")):
        which = "" if forward["benchmark"] == "forward_cpu" else f" (`{forward['benchmark']}`)"
        for key, goal in forward["targets"].items():
            batch = int(key.split("_")[1])
            found = [(row["ratio"]["pair_median"], name, row) for name, m in forward["models"].items()
                     for row in m["forward"] if row["batch"] == batch]  # fmt: skip
            if found:
                worst, name, row = max(found, key=lambda f: f[0])
                control = row.get("control_timm_timm")
                noise = f"; A/A {control['pair_median']:.3f}" if control else ""
                kernels = "; same kernels" if row.get("same_kernels") else ""
                rows.append((f"posenc / timm forward, batch {batch}{which}", f"<= {goal}",
                             f"{worst:.3f} (worst: {name}{noise}{kernels})", _met(worst <= goal)))  # fmt: skip
    apps = [r for name, r in records.items() if name.startswith("app_request")]
    architectures = {n: m for r in apps for n, m in (r.get("architectures") or {}).items()}
    app = records.get("app_request")
    if app is not None:
        deit = app["models"].get("deit_tiny_224")
        goal = app["targets"]["views_over_forward"]
        if deit is not None:
            value = deit["views_over_forward_inspect"]
            name = "drawing all views / forward, DeiT-Tiny 224"
            rows.append((name, f"<= {goal}", f"{value:.2f}", _met(value <= goal)))
        if architectures:  # from every app_request*.json
            over = [n for n, m in architectures.items() if not m["views_met"]]
            value, name = max((m["views_over_forward_inspect"], n) for n, m in architectures.items())
            rows.append(("drawing all views / forward, one curated model per architecture", f"<= {goal}",
                         f"worst {value:.2f} ({name}); over: {', '.join(over) or 'none'}",
                         _met(not over)))  # fmt: skip
            over = [n for n, m in architectures.items() if not m["request_met"]]
            value, name = max((m["request"]["median_ms"] / m["request_target_ms"], n) for n, m in architectures.items())
            rows.append(("curated model request, 2 threads", "< 1 s (ViT-S class), < 2 s (ViT-B class, SAM)",
                         f"worst {value:.2f} of its budget ({name}); over: {', '.join(over) or 'none'}",
                         _met(not over)))  # fmt: skip
        requests = [(m["request"]["median_ms"], n) for n, m in app["models"].items() if n.startswith("cifar10-")]
        if requests:
            goal = app["targets"]["request_ms"]
            best, worst = min(requests), max(requests)
            measured = f"{_ms(best[0])} ({best[1]}) to {_ms(worst[0])} ({worst[1]})"
            rows.append(("bundled model request, 2 threads", f"< {goal:.0f} ms", measured, _met(worst[0] < goal)))
    gpu_record = records.get("gpu")
    if gpu_record is not None:
        goal = gpu_record["targets"]["throughput_ratio"]
        if gpu_record["status"] != "measured":
            rows.append(("GPU throughput / timm", f">= {goal}", f"not measured ({gpu_record['status']})", "-"))
        else:
            worst, name = min((m["throughput_ratio"]["pair_median"], n) for n, m in gpu_record["inference"].items())
            rows.append(("GPU throughput / timm", f">= {goal}", f"{worst:.3f} ({name})", _met(worst >= goal)))
    folder = records.get("measure_cli")
    if folder is not None:
        value, goal = folder["ratio_measure_over_timm_plain"], folder["target"]
        rows.append(("`posenc measure` / timm plain forward, images/s", f">= {goal}",
                     f"{value:.3f} (same passes as timm: {folder['ratio_measure_over_timm_same_passes']:.3f})",
                     _met(value >= goal)))
    lines = ["#### Speed targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def reliability(record: dict[str, Any]) -> list[str]:
    load, mem = record["load"], record["memory"]
    lines = [
        *_section("Reliability: load and memory", record),
        f"One `python app.py` process on 127.0.0.1 ({record['checkpoints']} checkpoints), driven through "
        "gradio_client.",
        "",
        "| measure | what was sent | result |",
        "|---|---|---|",
        f"| load | {load['clients']} concurrent clients, {load['requests']} requests ({load['distinct_requests']} "
        f"distinct images, models, endpoints, blocks and patches) | **{load['errors']} errors**, "
        f"{load['mismatches']} responses differing from the same request made alone; latency p50 "
        f"{_ms(load['p50_ms'])} ms, p95 {_ms(load['p95_ms'])} ms (each request alone: p50 {_ms(load['alone_p50_ms'])} "
        f"ms, p95 {_ms(load['alone_p95_ms'])} ms); {load['requests_per_s']:.1f} requests/s |",
        f"| memory | {mem['requests']} requests cycling through {mem['models']} models, cache of "
        f"{mem['cache_size']} | **{mem['errors']} errors**; resident memory {mem['rss_after_warmup_mb']:.0f} MiB after "
        f"{mem['warmup_requests']} warm-up requests, {mem['rss_end_mb']:.0f} MiB at the end "
        f"(**{mem['rss_growth_pct']:+.1f} %**, peak {mem['rss_peak_after_warmup_mb']:.0f} MiB); {mem['evictions']} "
        f"evictions, least recently used first: {'yes' if mem['eviction_order_is_lru'] else '**no**'} |",
    ]
    return lines


def measure_cli(record: dict[str, Any]) -> list[str]:
    """``python -m posenc measure`` over the ImageNet photos against timm's forward."""
    ips, load, same = record["images_per_s"], record["load_average_during"], record["same_passes"]
    sizes = ", ".join(f"{h}x{w}" for h, w in record["sweep_sizes"] if [h, w] != record["native"])
    plain = record["timm_plain_s"]
    return [
        *_section("Measuring a folder: `python -m posenc measure` against timm's forward", record),
        f"Real DeiT-Tiny over {record['photos']} ImageNet photos, batch {record['batch']}; 1-minute load average "
        f"during the run {load['min']:.1f} to {load['max']:.1f} (mean {load['mean']:.1f}) on {record['threads']} "
        "threads, so every figure below is slowed by other work on the machine. Per batch the command makes "
        f"{record['passes_per_batch']['native']} passes at the native size (inspection, "
        f"{len(record['shuffle_seeds'])} shuffles, no position) and one at each other size of the sweep ({sizes}).",
        "",
        "| run | photos | seconds | images/s | measure / this |",
        "|---|---:|---:|---:|---|",
        f"| timm plain forward (PIL + timm transform + `model(x)`), before / after | {record['photos']} | "
        f"{plain[0]:.1f} / {plain[1]:.1f} | {ips['timm_plain']:.2f} | "
        f"**{record['ratio_measure_over_timm_plain']:.3f}** (target {record['target']}) |",
        f"| `python -m posenc measure`, all five measurements, JSON and plots | {record['photos']} | "
        f"{record['measure_s']:.1f} | {ips['measure']:.2f} | - |",
        f"| timm making the command's forward passes, nothing measured | {same['photos']} | {same['timm_s']:.1f} | "
        f"{ips['timm_same_passes']:.2f} | **{record['ratio_measure_over_timm_same_passes']:.3f}** "
        f"(command on the same photos: {same['measure_s']:.1f} s) |",
    ]


RENDERERS = {
    "forward_cpu": forward_cpu, "app_request": app_request, "model_load": model_load, "gpu": gpu,
    "reliability": reliability, "measure_cli": measure_cli,
}


def _renderer(name: str) -> Any:
    """The renderer of a result file: by its name, or by the benchmark it was saved from with ``--name``."""
    return next(fn for base, fn in RENDERERS.items() if name == base or name.startswith(f"{base}_"))


def render(results: Path) -> str:
    """The Markdown of every result file present in ``results``: the targets first, then each benchmark."""
    names = [n for n in RENDERERS if (results / f"{n}.json").is_file()]
    for base in ("forward_cpu", "app_request"):  # further runs saved with ``--name``, after the main one
        extra = sorted(p.stem for p in results.glob(f"{base}_*.json"))
        at = names.index(base) + 1 if base in names else len(names)
        names[at:at] = extra
    records = {name: json.loads((results / f"{name}.json").read_text()) for name in names}
    if not records:
        raise SystemExit(f"no benchmark results in {results}; run e.g. `python -m bench.forward_cpu` first")
    parts = [targets(records)] + [_renderer(name)(record) for name, record in records.items()]
    return "\n\n".join("\n".join(lines) for lines in parts) + "\n"


def write_between_markers(readme: Path, text: str) -> None:
    """Replace the text between :data:`START` and :data:`END` in ``readme``."""
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} lacks the markers {START} and {END}; add them where the tables belong")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    parser.add_argument("--write", type=Path, help="a README to update between the bench markers")
    args = parser.parse_args()
    text = render(args.results)
    if args.write is None:
        sys.stdout.write(text)
    else:
        write_between_markers(args.write, text)


if __name__ == "__main__":
    main()
