"""Checkpoint converters: timm and transformers Hub layouts to posenc configs and state dicts.

A Hub folder holds a ``config.json`` and the weights. :func:`detect_layout` tells which library wrote
them; :func:`config_from_timm` / :func:`config_from_transformers` turn the config into the config of a posenc
architecture; :func:`convert_state_dict` renames the weights by rule (a few regex substitutions plus fusing
separate query/key/value into ``qkv``), drops derived buffers and fits position tensors to the config;
:func:`check_state_dict` compares keys and shapes with the model before a strict load.

This module is generic: what it knows of each architecture (timm presets and key rules, transformers model types
with their builders and key rules, derived buffers, how position tensors are fitted) comes from the declarations
collected in :mod:`posenc.models` (:data:`~posenc.models.ARCHITECTURES`, :data:`~posenc.models.TIMM_PRESETS`,
:data:`~posenc.models.TRANSFORMERS_TYPES`). It reads for every transformers image model the fields they share
(size, classes, labels, preprocessing, with the DeiT mean/std rule). :func:`supported_table` renders the
declarations for the README.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posenc.labels import id2label_list
from posenc.models import ARCHITECTURES, TIMM_PRESETS, TRANSFORMERS_TYPES
from posenc.models.declare import Architecture, Rule, UnsupportedModelError
from posenc.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

logger = logging.getLogger(__name__)

# timm constructor arguments (``model_args``) that no posenc model needs: posenc models run at any size a multiple
# of their step, and always fuse q/k/v (split ones are fused on load). Others are the declarations' ``timm_args``.
_TIMM_ARGS_IGNORED = ("dynamic_img_size", "qkv_fused")

__all__ = [
    "CheckpointMismatchError",
    "UnsupportedModelError",
    "check_state_dict",
    "config_from_timm",
    "config_from_transformers",
    "convert_state_dict",
    "detect_layout",
    "supported_table",
    "write_supported_table",
]


class CheckpointMismatchError(ValueError):
    """The weights do not fit the model built from the checkpoint's config."""


def _supported() -> str:
    timm = ", ".join(sorted(TIMM_PRESETS))
    hf = ", ".join(f"{t} ({'/'.join(hf.architectures)})" for t, (_, hf) in TRANSFORMERS_TYPES.items())
    return f"supported: timm architectures {timm}; transformers model types {hf}; {', '.join(ARCHITECTURES)}"


def supported_table() -> str:
    """The README's table of supported architectures, rendered from the declarations in :mod:`posenc.models`.

    Returns:
        Markdown: one row per posenc architecture with its position mechanisms, the timm architecture names
        and the transformers model types it loads.
    """
    rows = []
    for model_type, arch in ARCHITECTURES.items():
        names = sorted(arch.timm_presets)
        mechanisms = sorted({m for name in names for m in arch.config(**arch.timm_presets[name]).mechanisms})
        timm = ", ".join(f"`{n}`" for n in names) or "-"
        types = ", ".join(f"`{t}`" for t in sorted(arch.transformers)) or "-"
        rows.append(f"| `{model_type}` ({arch.model.__name__}) | {', '.join(mechanisms) or '-'} | {timm} | {types} |")
    header = "| posenc model | position mechanisms | timm architectures | transformers model types |\n|---|---|---|---|\n"
    return header + "\n".join(rows) + "\n"


def detect_layout(config: dict[str, Any]) -> str:
    """Which library wrote a Hub ``config.json``: ``"posenc"``, ``"timm"`` or ``"transformers"``.

    Raises:
        UnsupportedModelError: for any other config, listing what is supported.
    """
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in ARCHITECTURES:
        return "posenc"
    if "architecture" in config or "pretrained_cfg" in config:
        return "timm"
    if isinstance(model_type, str) and model_type in TRANSFORMERS_TYPES:
        return "transformers"
    raise UnsupportedModelError(
        f"config.json is neither posenc, timm nor a supported transformers model (model_type={model_type!r}); {_supported()}"
    )


# --------------------------------------------------------------------------- configs


def config_from_timm(config: dict[str, Any]) -> Any:
    """A posenc config from a timm Hub ``config.json``: the architecture's preset, then its ``model_args``.

    The architecture name (its ``.tag`` dropped) is looked up in :data:`posenc.models.TIMM_PRESETS`, the table
    of the config fields each timm registration fixes (as timm's own registry rebuilds a model), and the
    recorded ``model_args`` (e.g. ``depth``) are applied on top. Names are never parsed.
    """
    pretrained = config.get("pretrained_cfg") or {}
    name = str(config.get("architecture") or pretrained.get("architecture") or "").split(".")[0]
    if name not in TIMM_PRESETS:
        raise UnsupportedModelError(f"timm architecture {name!r} is not supported; {_supported()}")
    arch, preset = TIMM_PRESETS[name]
    args: dict[str, Any] = dict(preset)
    model_args = config.get("model_args") or {}
    for key, value in model_args.items():
        args.update(_timm_arg(name, key, value, arch, model_args))
    args["num_classes"] = config.get("num_classes", args.get("num_classes", 1000))  # 0: headless; the config checks it
    input_size = pretrained.get("input_size")
    if "img_size" in args and "img_size" not in (config.get("model_args") or {}) and input_size and pretrained.get(
        "fixed_input_size"
    ):
        args["img_size"] = tuple(input_size[-2:])  # as timm's builder does: the tag's own input size
    args["labels"] = _timm_labels(config, args["num_classes"])
    args["preprocess"] = Preprocess.from_timm(pretrained)
    try:
        return arch.config(**args)
    except ValueError as error:  # a recorded model_arg posenc has no equivalent for (e.g. act_layer='relu')
        raise UnsupportedModelError(f"timm model {name!r} cannot be rebuilt: {error}") from error


def _timm_arg(name: str, key: str, value: Any, arch: Architecture, model_args: dict[str, Any]) -> dict[str, Any]:
    """One recorded timm constructor argument as posenc config fields (see ``Architecture.timm_args``); anything
    posenc cannot rebuild is refused."""
    fields = {f.name for f in dataclasses.fields(arch.config)}
    if key in fields:
        return {key: tuple(value) if isinstance(value, list) else value}
    if key.endswith("drop_rate") or (key == "global_pool" and value == "avg" and "global_pool" not in fields):
        return {}  # dropout is off at inference; a model without the field always averages (Swin)
    if key in _TIMM_ARGS_IGNORED:
        return {}
    if key in arch.timm_args:
        return arch.timm_args[key](value, model_args)
    raise UnsupportedModelError(f"timm model {name!r} was built with {key}={value!r}, which posenc does not support")


def _timm_labels(config: dict[str, Any], num_classes: int) -> tuple[str, ...] | None:
    """Class names from ``label_names`` (list or id->name dict), with ``label_descriptions`` when given."""
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if not names:
        return None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    descriptions = config.get("label_descriptions") or {}
    labels = tuple(str(descriptions.get(n, n)) for n in names)
    if len(labels) != num_classes:
        logger.warning("ignoring %d label names for %d classes", len(labels), num_classes)
        return None
    return labels


def config_from_transformers(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> Any:
    """A posenc config from a transformers ``config.json`` and its ``preprocessor_config.json``.

    The fields every image model shares (size, classes, labels, preprocessing) are read here; the
    ``model_type``'s builder (``TransformersType.build`` of its declaration) reads the rest.

    DeiT rule: DeiT was trained and evaluated with ImageNet mean/std (0.485, 0.456, 0.406) /
    (0.229, 0.224, 0.225), but transformers' ``DeiTImageProcessor`` defaults to 0.5/0.5, so a DeiT
    preprocessor (``model_type`` deit, or a ``DeiT*`` image processor) that omits or contradicts
    the ImageNet statistics is overridden to them, with a warning. Resize and crop are kept.
    """
    model_type = config.get("model_type")
    hf = TRANSFORMERS_TYPES[model_type][1] if isinstance(model_type, str) and model_type in TRANSFORMERS_TYPES else None
    archs = config.get("architectures") or []
    if hf is None or (archs and not set(archs) & set(hf.architectures)):
        raise UnsupportedModelError(f"transformers {model_type!r} model {archs} is not supported; {_supported()}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError(f"activation {config['hidden_act']!r} is not supported; posenc uses exact GELU")
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) or config.get("num_labels", 2)
    if archs and set(archs) <= set(hf.headless):
        num_classes, id2label = 0, {}  # a base model: no classifier
    labels = id2label_list(id2label, num_classes) if id2label else None  # None for generic LABEL_i names
    img_size = config.get("image_size", 224)
    common: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3),
        "num_classes": num_classes,
        "qkv_bias": config.get("qkv_bias", True),
        "norm_eps": config.get("layer_norm_eps", 1e-12),
        "labels": tuple(labels) if labels else None,
        "preprocess": _transformers_preprocess(model_type, preprocessor, img_size),
    }
    return hf.build(config, common)


def _transformers_preprocess(model_type: str, preprocessor: dict[str, Any] | None, img_size: Any) -> Preprocess:
    """``Preprocess`` from a preprocessor config, with the DeiT mean/std rule (see :func:`config_from_transformers`).

    Without a preprocessor config, transformers' ViT processor defaults apply at the model's image size.
    """
    if preprocessor is None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        logger.warning("no preprocessor_config.json; resizing to %dx%d with mean = std = 0.5", h, w)
        preprocessor = {"size": {"height": h, "width": w}}
    pp = Preprocess.from_transformers(preprocessor)
    processor = str(preprocessor.get("image_processor_type") or preprocessor.get("feature_extractor_type"))
    if model_type != "deit" and not processor.startswith("DeiT"):
        return pp
    if not (_close(pp.mean, IMAGENET_MEAN) and _close(pp.std, IMAGENET_STD)):
        logger.warning(
            "DeiT preprocessor says mean=%s std=%s but DeiT was trained with ImageNet mean/std; using %s / %s",
            tuple(pp.mean), tuple(pp.std), IMAGENET_MEAN, IMAGENET_STD,
        )  # fmt: skip
        pp = dataclasses.replace(pp, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return pp


def _close(a: Any, b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - y) < 1e-3 for x, y in zip(a, b))


# --------------------------------------------------------------------------- state dicts


def convert_state_dict(
    layout: str, state_dict: dict[str, Tensor], config: Any, *, model_type: str | None = None
) -> dict[str, Tensor]:
    """A posenc state dict from a ``"timm"``, ``"transformers"`` or ``"posenc"`` one.

    Everything specific to an architecture comes from its declaration (``ARCHITECTURES[config.model_type]``):
    keys are renamed by its rules (timm: ``timm_rules``; transformers: the ``rules`` of ``model_type``), separate
    query/key/value projections are fused into ``qkv``, the buffers it derives from its config are dropped,
    tensors stored in another layout are brought to posenc's (the transformers type's ``fix_layout``), and its
    ``fit_positions`` fits position tensors to the config (tables resized to its windows, ``pos_embed``
    resampled to its grid).

    Args:
        config: the posenc config the weights are for.
        model_type: the transformers ``model_type`` of the checkpoint's config.json (transformers layout); None
            means the first one the architecture declares.
    """
    arch = ARCHITECTURES[config.model_type]
    fix_layout = None
    if layout == "timm":
        out = _fuse_qkv(_rename(state_dict, arch.timm_rules))
    elif layout == "transformers":
        model_type = model_type or next(iter(arch.transformers), None)
        if model_type not in arch.transformers:
            raise UnsupportedModelError(f"{config.model_type} does not load transformers model_type {model_type!r}")
        hf = arch.transformers[model_type]
        out = _fuse_qkv(_rename(state_dict, hf.rules(config) if callable(hf.rules) else hf.rules))
        fix_layout = hf.fix_layout
    elif layout == "posenc":
        out = dict(state_dict)
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'posenc', 'timm' or 'transformers'")
    out = {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in arch.derived and not k.startswith("unused_")}
    if fix_layout is not None:
        out = fix_layout(out, config)
    return arch.fit_positions(out, config) if arch.fit_positions is not None else out


def _rename(state_dict: dict[str, Tensor], rules: Sequence[Rule]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _fuse_qkv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack ``attn.{query,key,value}`` into ``attn.qkv``; BEiT (no key bias) gets ``q_bias``/``v_bias``."""
    out = {k: v for k, v in state_dict.items() if not re.search(r"\.attn\.(query|key|value)\.", k)}
    for prefix in sorted({k[: -len("query.weight")] for k in state_dict if k.endswith(".attn.query.weight")}):
        parts = {name: state_dict.get(f"{prefix}{name}.weight") for name in ("query", "key", "value")}
        if any(w is None for w in parts.values()):
            raise CheckpointMismatchError(f"{prefix[:-1]} lacks one of query/key/value weights; the checkpoint is incomplete")
        out[f"{prefix}qkv.weight"] = torch.cat(list(parts.values()), dim=0)  # 3C, C
        q, k, v = (state_dict.get(f"{prefix}{name}.bias") for name in ("query", "key", "value"))
        if k is not None and q is not None and v is not None:
            out[f"{prefix}qkv.bias"] = torch.cat([q, k, v], dim=0)  # 3C
        elif q is not None and v is not None:
            out[f"{prefix}q_bias"], out[f"{prefix}v_bias"] = q, v
    return out


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` has exactly the model's keys and shapes.

    Args:
        model: the posenc model built from the checkpoint's config.
        state_dict: the converted weights.
        source: the repo id or folder, named in the message.
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    problems = [
        f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    raise CheckpointMismatchError(
        f"{source}: the weights do not fit the model built from its config ({'; '.join(problems)}). "
        "The config does not match the weights: check the repo's config.json (architecture, sizes, "
        "num_classes) or load another revision."
    )


def write_supported_table(readme: str | Path) -> None:
    """Replace the README's table between ``<!-- supported:start -->`` and ``<!-- supported:end -->``."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- supported:start -->\n", "<!-- supported:end -->"
    head, rest = text.split(start, 1)
    path.write_text(head + start + supported_table() + rest[rest.index(end):], encoding="utf-8")


if __name__ == "__main__":
    import sys

    write_supported_table(sys.argv[1] if len(sys.argv) > 1 else "README.md")

