"""An atlas across models: every measurement of :func:`posenc.measure.measure_folder` for several models, side by side.

``python -m posenc atlas --models A B C --images DIR --out OUT`` measures each model over the same images and writes

* ``OUT/models/<model>.json``: one model's ``measure_folder(...).to_json()`` record with the key it was measured
  under (model, revision, the images' names, sizes and modification times, the settings); a later run with the same
  key reads it instead of measuring again (it resumes);
* ``OUT/atlas.json``: every record (or the one-line reason a model failed), with the distances also as a fraction
  of the image side;
* ``OUT/atlas.html``: one self-contained page (plots embedded as base64 PNG, no external assets).

Attention distance is compared as a **fraction of the image side** (distance in input pixels / the side of the
model's input, ``sqrt(h * w)`` for a non-square input), so a model at 518 pixels and one at 224 share one scale.
The page renders the records' known keys and skips absent ones, so measurements added to ``measure_folder`` later
(token norms, rollout, accuracy) appear once their keys exist; unknown keys are listed as JSON.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from posenc import distributed
from posenc.distributed import Ranks

#: Bump when the record format or a measurement changes, so cached records are measured again.
CACHE_VERSION = 1
#: Record keys the page draws with a figure of its own (the rest, beyond bookkeeping, are shown as JSON).
DRAWN = ("mean_attention_distance", "position_reliance", "resolution_sweep", "position_decodability")
#: Bookkeeping keys of a record, shown in the models table or not at all.
BOOKKEEPING = ("model", "input_size", "images", "skipped", "mean_attention_distance_unit",
               "mean_attention_distance_notes", "patch_embedding_filters", "seconds", "images_per_second", "plots")


def image_side(size: Sequence[int]) -> float:
    """The side of an (h, w) input in pixels: ``sqrt(h * w)`` (the side itself for a square input)."""
    return math.sqrt(float(size[0]) * float(size[1]))


def distance_fraction(distance: Sequence[Sequence[float | None]], size: Sequence[int]) -> list[list[float | None]]:
    """Per-block, per-head attention distances in input pixels as a fraction of the image side (None stays None)."""
    side = image_side(size)
    return [[None if v is None else v / side for v in heads] for heads in distance]


def cache_key(model: str, revision: str | None, images: Sequence[Path], settings: dict[str, Any]) -> str:
    """A hash of what a model's record depends on: model, revision, each image's name, size and mtime, settings."""
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(images)]
    text = json.dumps({"version": CACHE_VERSION, "model": model, "revision": revision, "images": files,
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def slug(model: str) -> str:
    """A file name for a model source (repo id or folder), unique per source."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("._") or "model"
    return f"{name[-60:]}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def measure_model(model: str, images: Sequence[Path], *, out: Path, revision: str | None = None,
                  size: str | None = None, batch: int = 16, progress: Callable[[int], None] | None = None,
                  root: Path | None = None, ranks: Ranks | None = None) -> dict[str, Any]:
    """One model's entry: ``{"model", "key", "record"}`` (from the cache when the key matches) or ``{"model",
    "error"}`` with the reason in one line. Never raises for a model that cannot be loaded or measured.

    Images are labelled as ``posenc measure`` labels them (:func:`posenc.measure.folder_labels`: class folders
    under ``root``, or an ImageNet synset prefix in the file name), so a labelled folder reports accuracy.
    Under torchrun (``ranks``) each rank measures its shard of the images and only rank 0 writes the cache file."""
    from posenc import measure, views
    from posenc.hub import load

    ranks = ranks or Ranks()
    settings = {"size": size, "batch": batch}
    key = cache_key(model, revision, images, settings)
    path = out / "models" / f"{slug(model)}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}
        if cached.get("key") == key and "record" in cached:
            if progress is not None:
                progress(len(images))
            return {**cached, "cached": True}
    try:
        loaded = load(model, revision=revision)
        chosen = None if size is None else views.parse_size(size, loaded)
        # labelled as `posenc measure` labels them (class folders, a synset prefix in the file name): accuracy too
        labels, info = measure.folder_labels(list(images), loaded.labels, root=root)
        loaded.model.to(ranks.device)
        record = measure.measure_folder(loaded, list(images), size=chosen, batch=batch, progress=progress,
                                        labels=labels if info["labelled"] else None, label_info=info,
                                        ranks=ranks).to_json()  # fmt: skip
    except Exception as error:  # one model's failure must not take the others down
        return {"model": model, "error": _one_line(error)}
    record["model"] = model
    entry = {"model": model, "key": key, "revision": revision, "settings": settings, "record": record}
    if ranks.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry, indent=1) + "\n")
    return {**entry, "cached": False}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------ the page


def _name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def figures(records: dict[str, dict[str, Any]]) -> list[tuple[str, Image.Image, str]]:
    """The atlas's figures (title, image, caption) from measured records keyed by a display name; a figure whose
    key no record has is left out."""
    from posenc import plots

    out: list[tuple[str, Image.Image, str]] = []
    have = {n: r for n, r in records.items() if r.get("mean_attention_distance")}
    if have:
        series = {n: distance_fraction(r["mean_attention_distance"], r["input_size"]) for n, r in have.items()}
        sizes = ", ".join(f"{n} at {r['input_size'][0]}x{r['input_size'][1]}" for n, r in have.items())
        out.append(("Mean attention distance per head", plots.attention_distance(
            series, title="Mean attention distance per head (fraction of the image side)",
            ylabel="distance / image side"),
            f"Unit: attention distance in input pixels divided by the image side (sqrt(h*w)); {sizes}. "
            "ViT paper Fig. 7 right; one colour per model."))
    rel = {n: r["position_reliance"] for n, r in records.items() if isinstance(r.get("position_reliance"), dict)}
    if rel:
        labels, series = _reliance_series(rel)
        out.append(("Position reliance", plots.grouped_bars(labels, series, title="Position reliance",
                                                            ylabel="fraction / probability / cosine"),
                    "Agreement with the original top-1 (classifiers) or feature cosine (headless models) when the "
                    "patches are shuffled and when every position term is removed."))
    sweep = {n: r["resolution_sweep"] for n, r in records.items() if isinstance(r.get("resolution_sweep"), list)}
    if sweep:
        labelled = any(row.get("top1_accuracy") is not None for rows in sweep.values() for row in rows)
        metric = "top1_accuracy" if labelled else "agrees"  # the keys measure_folder writes
        # x: each input side over the model's own (native) side, so models at 32 and at 224 share one axis
        ratio = {n: {round(row["size"][0] / records[n]["input_size"][0], 3): row.get(metric) for row in rows}
                 for n, rows in sweep.items()}
        xs = sorted({x for found in ratio.values() for x in found})
        series = {n: [found.get(x) for x in xs] for n, found in ratio.items()}
        what = "top-1 accuracy (labelled folder)" if labelled else "top-1 = native-size top-1"
        out.append(("Resolution sweep", plots.lines(list(range(len(xs))), series, title=f"Resolution sweep: {what}",
                                                   xlabel="input side / the model's native side", ylabel=what,
                                                   xlabels=[f"{x:.3g}" for x in xs], y_range=(0.0, 1.0)),
                    f"Each model's {what} at the input sizes it offers, against its input side over its native side "
                    "(1 = the size it was trained at); a line joins the sizes it has."))
    dec = {n: r["position_decodability"]["r2"] for n, r in records.items()
           if isinstance(r.get("position_decodability"), dict) and r["position_decodability"].get("r2")}
    if dec:
        out.append(("Position decodability", _per_block(dec, "Position decodability (held-out R², mean of row and column)",
                                                        "R² (1 = position readable)"),
                    "Ridge regression from the tokens after each block to each token's image position; held-out "
                    "images: " + ", ".join(f"{n} {records[n]['position_decodability'].get('held_out_images')}"
                                           for n in dec) + " (no R² without held-out images)."))
    extra = sorted({k for r in records.values() for k in r if k not in DRAWN and k not in BOOKKEEPING})
    for key in extra:
        found = {n: v for n, r in records.items() if (v := _numbers(r.get(key), key)) is not None}
        if found:
            name = next(iter(found.values()))[0]  # the record's first per-block list: "token_norms.high_norm_share"
            out.append((key.replace("_", " ").capitalize(),
                        _per_block({n: v for n, (_, v) in found.items()}, name.replace("_", " "),
                                   name.rsplit(".", 1)[-1].replace("_", " ")),
                        f"Record key '{name}' per block."))
    return out


def _per_block(series: dict[str, list[Any]], title: str, ylabel: str) -> Image.Image:
    from posenc import plots

    depth = max(len(v) for v in series.values())
    padded = {n: [v[b] if b < len(v) and _finite(v[b]) else None for b in range(depth)] for n, v in series.items()}
    return plots.lines(list(range(depth)), padded, title=title, xlabel="block", ylabel=ylabel,
                       xlabels=[str(b) for b in range(depth)])


def _numbers(value: Any, name: str) -> tuple[str, list[Any]] | None:
    """A flat per-block list of numbers inside a record value (a list, or a dict's first such list) with its dotted
    name ("token_norms.high_norm_share"), or None."""
    if isinstance(value, list) and value and all(v is None or _finite(v) for v in value):
        return name, value
    if isinstance(value, dict):
        for k, v in value.items():
            if (found := _numbers(v, f"{name}.{k}")) is not None:
                return found
    return None


def _reliance_series(rel: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, list[float | None]]]:
    labels = ["shuffled\nagree / cos", "no position\nagree / cos", "shuffled\np(orig.)", "no position\np(orig.)"]
    series = {}
    for n, r in rel.items():
        s, p = r.get("shuffle", {}), r.get("no_position", {})
        series[n] = [s.get("top1_agreement", s.get("cosine")), p.get("top1_agreement", p.get("cosine")),
                     s.get("p_original"), p.get("p_original")]
    return labels, series


def _png64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_names(entries: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for e in entries:
        name = _name(e["model"])
        names.append(name if name not in names else e["model"])
    return names


def render_html(entries: Sequence[dict[str, Any]], *, images: int, folder: str) -> str:
    """The self-contained atlas page of the model entries of :func:`measure_model`."""
    names = _display_names(entries)
    records = {n: e["record"] for n, e in zip(names, entries) if "record" in e}
    rows = []
    for n, e in zip(names, entries):
        if "record" in e:
            r = e["record"]
            rows.append(f"<tr><td>{html.escape(n)}</td><td>{html.escape(e['model'])}</td>"
                        f"<td>{r['input_size'][0]}x{r['input_size'][1]}</td><td>{r.get('images')}</td>"
                        f"<td>{r.get('images_per_second', '')}</td>"
                        f"<td>{'cached' if e.get('cached') else 'measured'}</td></tr>")
    failed = [f"<li><b>{html.escape(n)}</b> was not measured: {html.escape(e['error'])}</li>"
              for n, e in zip(names, entries) if "error" in e]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>posenc atlas</title><style>"
        "body{font-family:sans-serif;margin:24px;max-width:1240px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}figure{display:inline-block;margin:8px;vertical-align:top;"
        "max-width:580px}figcaption{font-size:13px;color:#444}.failed{color:#a00}</style></head><body>",
        f"<h1>posenc atlas: {len(records)} model(s) over {images} image(s)</h1>",
        f"<p>Images: {html.escape(folder)}. Each model at its own input size; distances as a fraction of the "
        "image side.</p>",
    ]
    if failed:
        parts.append(f"<ul class='failed'>{''.join(failed)}</ul>")
    if rows:
        parts.append("<table><tr><th>model</th><th>source</th><th>input</th><th>images</th><th>images/s</th>"
                     f"<th>this run</th></tr>{''.join(rows)}</table>")
    for title, image, caption in figures(records) if records else []:
        parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{_png64(image)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    extra = sorted({k for r in records.values() for k in r if k not in DRAWN and k not in BOOKKEEPING})
    for key in extra:
        body = {n: r[key] for n, r in records.items() if key in r}
        parts.append(f"<details><summary>{html.escape(key)}</summary><pre>"
                     f"{html.escape(json.dumps(body, indent=1)[:20000])}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_figures(entries: Sequence[dict[str, Any]], folder: Path) -> None:
    """Every figure of the page as a PNG of its own in ``folder`` (named after its title)."""
    records = {n: e["record"] for n, e in zip(_display_names(entries), entries) if "record" in e}
    folder.mkdir(parents=True, exist_ok=True)
    for title, image, _ in figures(records) if records else []:
        image.save(folder / f"{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')}.png", optimize=True)


def atlas_json(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``atlas.json``: per model its record (with the distance as a fraction of the image side) or its error."""
    models = []
    for e in entries:
        if "record" in e:
            r = e["record"]
            models.append({"model": e["model"], "cached": e.get("cached", False), "record": r,
                           "mean_attention_distance_fraction": distance_fraction(r["mean_attention_distance"],
                                                                                 r["input_size"])})
        else:
            models.append({"model": e["model"], "error": e["error"]})
    return {"distance_fraction_unit": "attention distance in input pixels / image side (sqrt(h*w))",
            "models": models}


# ------------------------------------------------------------------------------------ command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``atlas`` subcommand."""
    parser = subparsers.add_parser(
        "atlas", help="measure several models over one image folder and put them side by side (atlas.html + json)")
    parser.add_argument("--models", nargs="+", required=True, help="Hub repo ids or folders (config.json + weights)")
    parser.add_argument("--images", required=True, help="folder of images (JPEG, PNG, ...); not recursive")
    parser.add_argument("--out", required=True, help="output folder for atlas.html, atlas.json and models/*.json")
    parser.add_argument("--size", default=None, help="input size HxW for every model (default: each checkpoint's own)")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="use the first N images")
    parser.add_argument("--batch", type=_positive_int, default=16, metavar="B", help="images per batch (default 16)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (for every model)")
    distributed.add_device_option(parser)
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Measure (or read from the cache) every model, write the page and the JSON; 0 when a model was measured.

    Under torchrun every rank runs this: each model's images are sharded over the ranks (as ``posenc measure``
    does) and rank 0 alone shows progress and writes the files.
    """
    with distributed.joined(args.device) as ranks:
        return _run(args, ranks)


def _run(args: argparse.Namespace, ranks: Ranks) -> int:
    from tqdm import tqdm

    from posenc.measure import list_images

    try:
        folder = list_images(args.images, args.limit)
    except ValueError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    entries = []
    quiet = not ranks.main  # one set of progress bars, rank 0's
    models = tqdm(args.models, desc="models", unit="model", file=sys.stderr, position=0, dynamic_ncols=True,
                  disable=quiet)  # fmt: skip
    for model in models:
        models.set_postfix_str(_name(model))
        with tqdm(total=len(folder.images), desc=_name(model)[:24], unit="img", file=sys.stderr, position=1,
                  leave=False, dynamic_ncols=True, disable=quiet) as bar:
            entry = measure_model(model, folder.images, out=out, revision=args.revision, size=args.size,
                                  batch=args.batch, progress=bar.update, root=folder.root, ranks=ranks)
        entries.append(entry)
        if "error" in entry and ranks.main:
            tqdm.write(f"{model}: not measured: {entry['error']}", file=sys.stderr)
    models.close()
    done = sum("record" in e for e in entries)
    if not ranks.main:
        return 0 if done else 1
    (out / "atlas.json").write_text(json.dumps(atlas_json(entries), indent=1) + "\n")
    _write_figures(entries, out / "figures")
    (out / "atlas.html").write_text(render_html(entries, images=len(folder.images), folder=str(args.images)))
    cached = sum(bool(e.get("cached")) for e in entries)
    print(f"atlas: {done} of {len(entries)} model(s) measured ({cached} from the cache); wrote {out / 'atlas.html'} "
          f"and {out / 'atlas.json'}", file=sys.stderr)
    return 0 if done else 1
