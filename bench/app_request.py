"""End-to-end app request latency: what one Explore-tab request of the app costs, stage by stage.

A request is the Explore tab's handler (:meth:`posenc.app.explore.ExploreHandlers.run`) with the model already in
the app's cache: read and preprocess the image, one inspection forward pass (with the block outputs for the token
norms), every view the tab draws (each mechanism's, the attention, the prefix shares, the rollout, the token
norms), the ``.npz`` export and the PNG files it hands Gradio (also the user's downloads). Each stage is timed on
its own in the order the handler runs them, and the whole handler call is timed as the request; the ``/analyse``
endpoint (the mechanism views and the attention only) is timed beside it as ``api_analyse``.

Two sets of models:

* the bundled CIFAR-10 checkpoints in ``checkpoints/`` (or, while there are none, freshly built models of the
  same presets saved with ``save_pretrained``: timing does not depend on the weights) and the real DeiT-Tiny at
  224 from ``../shared/data``;
* one curated model of every architecture the app serves (:data:`ARCHITECTURE_MODELS`), each built by timm with
  random weights of the real size and saved in the timm Hub layout, so it loads, converts and preprocesses as the
  Hub checkpoint does, and runs at the app's default size for it. Its views are timed one by one.

    python -m bench.app_request                     # writes bench/results/app_request.json
    python -m bench.app_request --quick --out /tmp  # one iteration of each figure
    python -m bench.app_request --families --deit none --architectures levit_128s sam_base --name app_request_few
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf

from bench.common import ROOT, SHARED_DATA, parse_args, summary, time_call, write_result
from posenc import mechanisms, views, viz
from posenc.hub import LoadedModel, load
from posenc.models import build_model
from posenc.preprocess import build_transform, load_image
from posenc.registry import bundled_models
from posenc.train import PRESETS, cifar_model
from posenc.app import Catalog, Handlers, HubStatus, ModelCache

logger = logging.getLogger(__name__)

DEIT_TINY = SHARED_DATA / "deit_tiny_patch16_224.fb_in1k"
IMAGE = ROOT / "assets" / "examples" / "airplane.png"  # the app's first example
#: a bundled model's whole request must take less than this (the issue's target)
REQUEST_TARGET_MS = 150.0
#: drawing every view may take at most this fraction of DeiT-Tiny's forward pass (the issue's target)
VIEWS_TARGET = 0.5
#: One curated model of every architecture the app serves: row name -> (timm name with the curated tag, the
#: curated Hub repo it stands for). Built with random weights of the real size at the tag's input size.
ARCHITECTURE_MODELS: dict[str, tuple[str, str]] = {
    "deit_tiny": ("deit_tiny_patch16_224.fb_in1k", "timm/deit_tiny_patch16_224.fb_in1k"),
    "clip_base": ("vit_base_patch16_clip_224.openai_ft_in1k", "timm/vit_base_patch16_clip_224.openai_ft_in1k"),
    "dinov2_reg4_small": ("vit_small_patch14_reg4_dinov2.lvd142m", "timm/vit_small_patch14_reg4_dinov2.lvd142m"),
    "beit_base": ("beit_base_patch16_224.in22k_ft_in22k_in1k", "timm/beit_base_patch16_224.in22k_ft_in22k_in1k"),
    "swin_tiny": ("swin_tiny_patch4_window7_224.ms_in1k", "timm/swin_tiny_patch4_window7_224.ms_in1k"),
    "swinv2_tiny": ("swinv2_tiny_window8_256.ms_in1k", "timm/swinv2_tiny_window8_256.ms_in1k"),
    "sam_base": ("samvit_base_patch16.sa1b", "timm/samvit_base_patch16.sa1b"),
    "convit_tiny": ("convit_tiny.fb_in1k", "timm/convit_tiny.fb_in1k"),
    "eva02_tiny": ("eva02_tiny_patch14_224.mim_in22k", "timm/eva02_tiny_patch14_224.mim_in22k"),
    "rope_mixed_small": ("vit_small_patch16_rope_mixed_224.naver_in1k", "timm/vit_small_patch16_rope_mixed_224.naver_in1k"),
    "dinov3_small": ("vit_small_patch16_dinov3.lvd1689m", "timm/vit_small_patch16_dinov3.lvd1689m"),
    "levit_128s": ("levit_128s.fb_dist_in1k", "timm/levit_128s.fb_dist_in1k"),
    "tiny_vit_5m": ("tiny_vit_5m_224.in1k", "timm/tiny_vit_5m_224.in1k"),
    "twins_svt_small": ("twins_svt_small.in1k", "timm/twins_svt_small.in1k"),
    "coat_tiny": ("coat_tiny.in1k", "timm/coat_tiny.in1k"),
    "xcit_nano": ("xcit_nano_12_p16_224.fb_dist_in1k", "timm/xcit_nano_12_p16_224.fb_dist_in1k"),
    "mvitv2_tiny": ("mvitv2_tiny.fb_in1k", "timm/mvitv2_tiny.fb_in1k"),
    "cait_xxs24": ("cait_xxs24_224.fb_dist_in1k", "timm/cait_xxs24_224.fb_dist_in1k"),
    "vit_pwee": ("vit_pwee_patch16_reg1_gap_256.sbb_in1k", "timm/vit_pwee_patch16_reg1_gap_256.sbb_in1k"),
    "naflexvit_base": ("naflexvit_base_patch16_parfac_gap.e300_s576_in1k",
                       "timm/naflexvit_base_patch16_parfac_gap.e300_s576_in1k"),
}  # fmt: skip
#: a curated model's whole request must take less than this: 1 s for the ViT-S class and smaller, 2 s for the
#: ViT-B class and SAM (models above :data:`LARGE_PARAMS` parameters)
ARCHITECTURE_REQUEST_TARGET_MS = {"small": 1000.0, "large": 2000.0}
LARGE_PARAMS = 50_000_000


def stand_in_models(folder: Path, families: list[str]) -> dict[str, Path]:
    """Random-weight models of the bundled CIFAR-10 presets, saved with ``save_pretrained`` as ``cifar10-<family>``."""
    paths = {}
    for family in families:
        path = folder / f"cifar10-{family}"
        build_model(cifar_model(family)).save_pretrained(path)
        paths[path.name] = path
    return paths


def model_folders(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """The bundled CIFAR-10 models (stand-ins for the missing presets) and DeiT-Tiny when present."""
    bundled = {Path(e.source).name: Path(e.source) for e in bundled_models(args.checkpoints)}
    bundled = {name: path for name, path in bundled.items() if name.split("-", 1)[-1] in args.families}
    missing = [f for f in args.families if f"cifar10-{f}" not in bundled]
    folders = {**bundled, **stand_in_models(tmp / "stand-ins", missing)}
    if args.deit.is_dir():
        folders["deit_tiny_224"] = args.deit
    else:
        logger.warning("no DeiT-Tiny folder at %s: its figures are left out", args.deit)
    return folders


def architecture_folders(names: list[str], tmp: Path) -> dict[str, Path]:
    """Each named model of :data:`ARCHITECTURE_MODELS`, built by timm with random weights, in the timm Hub layout."""
    folders = {}
    for name in names:
        timm_name, _ = ARCHITECTURE_MODELS[name]
        torch.manual_seed(0)
        reference = timm.create_model(timm_name, pretrained=False)  # the tag's input size, classes and head
        path = tmp / "architectures" / name
        shared = len({t.data_ptr() for t in reference.state_dict().values()}) < len(reference.state_dict())
        # timm's CoaT lists a stage's shared CPE / CRPE under every block, which safetensors refuses to write
        save_for_hf(reference, str(path), safe_serialization=not shared)
        del reference
        folders[name] = path
    return folders


def _no_progress(*_: Any, **__: Any) -> None:
    """Stands in for ``gr.Progress`` outside a Gradio event."""


def _timed(times: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    return out


def stage_timings(loaded: LoadedModel, image: Path, export_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """One request's stages in the handler's order, each timed on its own, and each view's share (seconds).

    The request runs at the app's default size for the model and draws what the Explore tab draws: the patch
    picker, the top-5, every view of every mechanism the model uses (block 0, the default patch), the attention,
    the prefix shares, the rollout and the token norms (a view the block cannot have is timed as its refusal).

    Returns:
        stage -> seconds (``views`` is the sum of the views), and view -> seconds (``mechanism/view`` keys, plus
        ``patch_picker``, ``predictions``, ``attention``, ``prefix_attention``, ``rollout``, ``token_norms``).
    """
    times: dict[str, float] = {}
    drawing: dict[str, float] = {}
    size = views.parse_size(None, loaded)  # what the app runs when no size is asked for
    pp = replace(loaded.preprocess, input_size=size)
    pixels = _timed(times, "preprocess", lambda: build_transform(pp)(load_image(image)))  # 3, h, w
    with torch.inference_mode():
        _timed(times, "forward_inspect", lambda: loaded.model.inspect(pixels[None]))
        _timed(times, "forward_fast", lambda: loaded.model(pixels[None]))  # not part of a request: the reference
    seen = views.inspect_image(loaded, image, size)  # the request's own record (preprocess + forward, timed above)
    patch, block = views.default_patch(seen.grid), 0
    picker = _timed(drawing, "patch_picker", lambda: views.patch_picker(seen, patch))
    _timed(drawing, "predictions", lambda: views.predictions(seen))
    drawn = []
    for mechanism in mechanisms.of(loaded.model.mechanisms):
        for spec in mechanism.views:
            view, _ = _timed(drawing, f"{mechanism.name}/{spec.key}",
                             lambda: views.try_view(lambda: spec.draw(seen, block, patch)))  # fmt: skip
            drawn.append(view)
    for name, make in (("attention", views.attention_view), ("prefix_attention", views.prefix_attention_view),
                       ("rollout", views.rollout_view), ("token_norms", views.token_norms_view)):
        view, _ = _timed(drawing, name, lambda: views.try_view(lambda: make(seen, block, patch)))  # None: no such map
        drawn.append(view)
    times["views"] = sum(drawing.values())
    _timed(times, "export_npz", lambda: views.save_npz(export_dir / "request.npz", seen, patch, block, drawn))
    images = [picker] + [v.image for v in drawn if v is not None]
    _timed(times, "png_encode", lambda: [viz.save_png(img, export_dir / f"view{i}.png") for i, img in enumerate(images)])
    return times, drawing


def bench_model(name: str, folder: Path, image: Path, args: argparse.Namespace, export_dir: Path) -> dict[str, Any]:
    """Stage medians and the whole request of one model, with the model already cached (as in the app)."""
    source = str(folder.resolve())
    catalog = Catalog.build(folder.parent, (), [folder])
    cache = ModelCache(load, size=1)
    handlers = Handlers(cache=cache, catalog=catalog, hub=HubStatus(lambda: False))

    def request() -> None:  # the Explore tab's handler: every view as PNG (its downloads), paths for Gradio
        out = handlers.explore.run(str(image), source, None, 0, None, None, None, progress=_no_progress)
        if "picker" not in out:  # a refused request returns only its message
            raise RuntimeError(f"{name}: the Explore tab refused the request: {out['status'].value}")

    def analyse() -> None:  # the /analyse endpoint: every mechanism view and the attention, no rollout or norms
        handlers.api.analyse(str(image), source, None, 0, None, None, progress=_no_progress)

    request()  # loads the model into the cache under its public name, as the app does (untimed)
    loaded = cache.get(cache.sources()[-1])

    stages: dict[str, list[float]] = {}
    drawing: dict[str, list[float]] = {}
    for _ in range(args.warmup):
        stage_timings(loaded, image, export_dir)
    started = time.perf_counter()
    while True:
        times, per_view = stage_timings(loaded, image, export_dir)
        for stage, seconds in times.items():
            stages.setdefault(stage, []).append(seconds)
        for view, seconds in per_view.items():
            drawing.setdefault(view, []).append(seconds)
        n = len(stages["preprocess"])
        if n >= args.repeats and time.perf_counter() - started >= args.min_seconds:
            break
    request_times = time_call(request, args.repeats, args.warmup, args.min_seconds)
    analyse_times = time_call(analyse, args.repeats, args.warmup, args.min_seconds)
    medians = {stage: statistics.median(t) * 1e3 for stage, t in stages.items()}
    result = {
        "source": source,
        "mechanisms": list(loaded.model.mechanisms),
        "input_size": list(views.parse_size(None, loaded)),
        "native_size": list(loaded.preprocess.input_size),
        "params": loaded.num_params,
        "headless": loaded.headless,
        "stages": {stage: summary(t) for stage, t in stages.items()},
        "views": {view: summary(t) for view, t in drawing.items()},
        "views_ms": medians["views"],
        "views_over_forward_inspect": medians["views"] / medians["forward_inspect"],
        "views_over_forward_fast": medians["views"] / medians["forward_fast"],
        "request": summary(request_times),
        "api_analyse": summary(analyse_times),
    }
    logger.info(
        "%s: request %.1f ms (forward %.1f ms, views %.1f ms, png %.1f ms)",
        name, result["request"]["median_ms"], medians["forward_inspect"], medians["views"], medians["png_encode"],
    )  # fmt: skip
    return result


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="bundled checkpoints folder")
    parser.add_argument("--deit", type=Path, default=DEIT_TINY, help="DeiT-Tiny folder in timm Hub layout")
    parser.add_argument("--image", type=Path, default=IMAGE, help="the image of every request")
    parser.add_argument("--families", nargs="*", choices=PRESETS, default=list(PRESETS),
                        help="CIFAR-10 presets to time (bundled folder cifar10-<family>, else a stand-in)")  # fmt: skip
    parser.add_argument("--architectures", nargs="*", choices=list(ARCHITECTURE_MODELS),
                        default=list(ARCHITECTURE_MODELS),
                        help="curated models to time, one per architecture (random weights of the real size)")  # fmt: skip
    parser.add_argument("--name", default="app_request", help="result file name (bench/results/<name>.json)")


def request_target_ms(params: int) -> float:
    """The request budget of a curated model: :data:`ARCHITECTURE_REQUEST_TARGET_MS` by its size class."""
    return ARCHITECTURE_REQUEST_TARGET_MS["large" if params > LARGE_PARAMS else "small"]


def write(args: argparse.Namespace, models: dict[str, Any], architectures: dict[str, Any]) -> None:
    """Write the result file with the models measured so far."""
    cifar_requests = {n: m["request"]["median_ms"] for n, m in models.items() if n.startswith("cifar10-")}
    deit = models.get("deit_tiny_224")
    write_result(args.out, args.name, args, {
        "method": "stages timed one by one in the handler's order; 'request' is Handlers.analyse with the model "
                  "cached, which writes every view as PNG; medians over repeated requests; 'architectures': one "
                  "curated model per architecture, built by timm with random weights (pretrained=False) and saved "
                  "in the timm Hub layout, at the app's default size",
        "image": str(args.image.relative_to(ROOT) if args.image.is_relative_to(ROOT) else args.image),
        "targets": {"request_ms": REQUEST_TARGET_MS, "views_over_forward": VIEWS_TARGET,
                    "architecture_request_ms": ARCHITECTURE_REQUEST_TARGET_MS, "large_params": LARGE_PARAMS},
        "met": {
            "request_under_target": {n: ms < REQUEST_TARGET_MS for n, ms in cifar_requests.items()},
            "views_over_forward": None if deit is None else deit["views_over_forward_inspect"] <= VIEWS_TARGET,
            "architecture_request_under_target": {n: a["request_met"] for n, a in architectures.items()},
            "architecture_views_over_forward": {n: a["views_met"] for n, a in architectures.items()},
        },
        "models": models,
        "architectures": architectures,
    })  # fmt: skip


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=10, warmup=2, min_seconds=20.0, extra=_options)
    if not args.name.startswith("app_request"):
        raise SystemExit("--name must start with 'app_request' (the report finds it so)")
    models: dict[str, Any] = {}
    architectures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="posenc-bench-") as tmp:
        tmp = Path(tmp)
        for name, folder in sorted(model_folders(args, tmp).items()):  # the CIFAR-10 models, then DeiT-Tiny
            bundled = name.startswith("cifar10-") and not folder.is_relative_to(tmp)  # stand-ins are written to tmp
            models[name] = {"bundled": bundled, **bench_model(name, folder, args.image, args, tmp)}
        for name in args.architectures:  # one at a time: the folder is written, timed and deleted
            folder = architecture_folders([name], tmp)[name]
            row = bench_model(name, folder, args.image, args, tmp)
            timm_name, curated = ARCHITECTURE_MODELS[name]
            target = request_target_ms(row["params"])
            architectures[name] = {"timm_name": timm_name, "stands_for": curated, **row, "request_target_ms": target,
                                   "request_met": row["request"]["median_ms"] < target,
                                   "views_met": row["views_over_forward_inspect"] <= VIEWS_TARGET}  # fmt: skip
            shutil.rmtree(folder)
            write(args, models, architectures)  # after every model, so a long session keeps what it has measured
    write(args, models, architectures)


if __name__ == "__main__":
    main()
