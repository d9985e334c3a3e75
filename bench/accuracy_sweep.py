"""Top-1 / top-5 accuracy of a classifier at several input sizes over a labelled folder (the CPVT table's form).

``python -m bench.accuracy_sweep --model ../shared/data/deit_tiny_patch16_224.fb_in1k
--images ../shared/data/imagenet-samples --sizes 224,384,448,512 --out /tmp/accuracy.json``

Only the resolution sweep of :mod:`posenc.measure` (:func:`~posenc.measure.resolution_sweep` with labels from
:func:`~posenc.measure.folder_labels`), without the other measurements, so a CPU run stays short; under torchrun
each rank takes a shard and the sums are reduced (:mod:`posenc.distributed`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import posenc
from posenc import distributed, measure
from posenc.preprocess import build_transform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--sizes", default="224,384,448,512")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    ranks = distributed.join()
    loaded = posenc.load(args.model)
    loaded.model.to(ranks.device)
    folder = measure.list_images(args.images)
    labels, info = measure.folder_labels(folder.images, loaded.labels, root=folder.root)
    sizes = [(int(s), int(s)) for s in args.sizes.split(",")]
    native = sizes[0]
    transforms = {s: build_transform(replace(loaded.preprocess, input_size=s)) for s in sizes}
    mine = [i for i in ranks.shard(len(folder.images)) if labels[i] >= 0]
    sums: dict[str, float | int] = {}
    started = time.perf_counter()
    for start in range(0, len(mine), args.batch):
        chunk = mine[start : start + args.batch]
        imgs = [posenc.preprocess.load_image(folder.images[i]) for i in chunk]
        inputs = {s: torch.stack([transforms[s](img) for img in imgs]).to(ranks.device) for s in sizes}
        with torch.inference_mode():
            found = measure.resolution_sweep(loaded.model, inputs, native, labels=torch.tensor([labels[i] for i in chunk]))
        for s, row in found.items():
            for k in ("top1_accuracy", "top5_accuracy", "agrees"):
                sums[f"{s[0]}/{k}"] = sums.get(f"{s[0]}/{k}", 0.0) + float(row[k].sum())
        sums["n"] = sums.get("n", 0) + len(chunk)
        if ranks.main:
            print(f"{start + len(chunk)}/{len(mine)} {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    total = distributed.all_sum(sums, ranks)
    rows = [{"size": s[0], **{k: total[f"{s[0]}/{k}"] / total["n"] for k in ("top1_accuracy", "top5_accuracy", "agrees")}}
            for s in sizes]
    if ranks.main:
        record = {"model": args.model, "images": total["n"], "labels": info, "rows": rows,
                  "seconds": time.perf_counter() - started, "processes": ranks.world_size}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record, indent=1))
    distributed.leave()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
