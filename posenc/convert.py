"""Checkpoint converters: timm and transformers Hub layouts to posenc configs and state dicts.

A Hub folder holds a ``config.json`` and the weights. :func:`detect_layout` tells which library wrote
them; :func:`config_from_timm` / :func:`config_from_transformers` turn the config into a
:class:`~posenc.models.ViTConfig` or :class:`~posenc.models.SwinConfig`; :func:`convert_state_dict`
renames the weights by rule (a few regex substitutions plus fusing separate query/key/value into
``qkv``), drops derived buffers and fits position tensors to the config's grid; :func:`check_state_dict`
compares keys and shapes with the model before a strict load.

Supported: timm ``vit_*``, ``deit_*`` (incl. distilled), ``beit_*``/``beitv2_*`` and ``swin_*``
(see :data:`TIMM_FAMILIES`); transformers model types ``vit``, ``deit``, ``beit`` and ``swin``
(classification heads), stored in the Hub layout that ``save_pretrained`` writes
(``vit.encoder.layer.0.attention.attention.query.weight``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from posenc.encodings import num_relative_positions, resample_abs_pos_embed, resize_rel_pos_bias_table
from posenc.labels import id2label_list
from posenc.models import ARCHITECTURES, SwinConfig, ViTConfig
from posenc.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

logger = logging.getLogger(__name__)

Config = ViTConfig | SwinConfig

#: timm architecture families and the sizes posenc rebuilds by name.
TIMM_FAMILIES = {
    "vit": "vit_{tiny,small,base,large}_patch{8,16,32}_{img}",
    "deit": "deit_{tiny,small,base}[_distilled]_patch16_{img}",
    "beit": "beit_{base,large}_patch16_{img}",
    "beitv2": "beitv2_{base,large}_patch16_{img}",
    "swin": "swin_{tiny,small,base,large}_patch4_window{7,12}_{img}",
}
#: transformers ``model_type`` -> the classification architectures posenc converts.
TRANSFORMERS_ARCHITECTURES = {
    "vit": ("ViTForImageClassification",),
    "deit": ("DeiTForImageClassificationWithTeacher",),
    "beit": ("BeitForImageClassification",),
    "swin": ("SwinForImageClassification",),
}

# Facts from timm's model registrations: (embed_dim, depth, heads) for ViT/DeiT/BEiT and
# (embed_dim, depths, heads) for Swin.
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
_SWIN_SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_FAMILY_SIZES = {
    "vit": ("tiny", "small", "base", "large"),
    "deit": ("tiny", "small", "base"),
    "beit": ("base", "large"),
    "beitv2": ("base", "large"),
    "swin": ("tiny", "small", "base", "large"),
}
_TIMM_NAME = re.compile(
    r"^(?P<family>vit|deit|beitv2|beit|swin)_(?P<size>tiny|small|base|large)(?P<distilled>_distilled)?"
    r"_patch(?P<patch>\d+)(?:_window(?P<window>\d+))?_(?P<img>\d+)$"
)
# timm constructor arguments (saved under ``model_args``) that map one-to-one onto config fields.
_TIMM_ARGS = {
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "depths", "num_heads",
    "window_size", "mlp_ratio", "qkv_bias", "global_pool", "class_token", "no_embed_class", "init_values", "fc_norm",
}  # fmt: skip

Rule = tuple[str, str | Callable[[re.Match], str]]
_TIMM_RULES: list[Rule] = [
    (r"\.gamma_([12])$", r".ls\1.gamma"),
    (r"^head\.fc\.", "head."),
]
# Applied in order to every key of the transformers Hub layout; earlier rules shadow later ones.
_TRANSFORMERS_RULES: list[Rule] = [
    (r"^(vit|deit|beit|swin)\.", ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^encoder\.relative_position_bias\.", "rel_pos_bias."),  # BEiT's shared table
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    # transformers merges patches at the end of stage i, posenc at the start of stage i + 1
    (r"^encoder\.layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.attention\.(attention|self)\.(relative_position_bias\.)?relative_position_bias_table$",
     ".attn.relative_position_bias_table"),
    (r"\.attention\.(attention|self)\.(query|key|value)\.", r".attn.\2."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.lambda_([12])$", r".ls\1.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^pooler\.layernorm\.", "fc_norm."),
    (r"^(classifier|cls_classifier)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]  # fmt: skip
# Buffers rebuilt from the config (and BEiT's unused mask token): never loaded.
_DERIVED = ("relative_position_index", "attn_mask", "k_bias", "mask_token")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one posenc can rebuild."""


class CheckpointMismatchError(ValueError):
    """The weights do not fit the model built from the checkpoint's config."""


def _supported() -> str:
    timm = ", ".join(TIMM_FAMILIES.values())
    hf = ", ".join(f"{t} ({'/'.join(a)})" for t, a in TRANSFORMERS_ARCHITECTURES.items())
    return f"supported: timm {timm}; transformers model types {hf}; {', '.join(sorted(ARCHITECTURES))}"


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
    if model_type in TRANSFORMERS_ARCHITECTURES:
        return "transformers"
    raise UnsupportedModelError(
        f"config.json is neither posenc, timm nor a supported transformers model (model_type={model_type!r}); {_supported()}"
    )


# --------------------------------------------------------------------------- configs


def config_from_timm(config: dict[str, Any]) -> Config:
    """A posenc config from a timm Hub ``config.json``; sizes come from the architecture name by rule.

    The name (its ``.tag`` dropped) is parsed as ``{family}_{size}[_distilled]_patch{P}[_window{W}]_{img}``,
    the family's fixed options added, then the recorded ``model_args`` (e.g. ``depth``) applied on top.
    """
    pretrained = config.get("pretrained_cfg") or {}
    name = str(config.get("architecture") or pretrained.get("architecture") or "").split(".")[0]
    match = _TIMM_NAME.match(name)
    if (
        match is None
        or match["size"] not in _FAMILY_SIZES[match["family"]]
        or (match["family"] == "swin") != bool(match["window"])
        or (match["family"] != "deit" and match["distilled"])
    ):
        raise UnsupportedModelError(f"timm architecture {name!r} is not supported; {_supported()}")
    family, size, img = match["family"], match["size"], int(match["img"])
    args: dict[str, Any] = {"img_size": img, "patch_size": int(match["patch"])}
    if family == "swin":
        args["embed_dim"], args["depths"], args["num_heads"] = _SWIN_SIZES[size]
        args["window_size"] = int(match["window"])
    else:
        args["embed_dim"], args["depth"], args["num_heads"] = _VIT_SIZES[size]
        args["distilled"] = bool(match["distilled"])
    if family.startswith("beit"):
        init = 0.1 if (family, size) == ("beit", "base") else 1e-5
        args.update(qkv_bias="qv", pos_embed="none", rel_pos_bias=True, global_pool="avg", init_values=init)
    for key, value in (config.get("model_args") or {}).items():
        args.update(_timm_arg(name, key, value, swin=family == "swin"))
    if "use_rel_pos_bias" in args or "use_shared_rel_pos_bias" in args:
        args["rel_pos_bias"] = args.pop("use_rel_pos_bias", True) or args.pop("use_shared_rel_pos_bias", False)
        args.pop("use_shared_rel_pos_bias", None)
    args["num_classes"] = config.get("num_classes", args.get("num_classes", 1000))  # checked by the config
    if args["num_classes"] == 0:
        raise UnsupportedModelError(f"timm model {name!r} has no classifier head (num_classes=0); pick a fine-tuned tag")
    args["labels"] = _timm_labels(config, args["num_classes"])
    args["preprocess"] = Preprocess.from_timm(pretrained)
    return (SwinConfig if family == "swin" else ViTConfig)(**args)


def _timm_arg(name: str, key: str, value: Any, swin: bool) -> dict[str, Any]:
    """One recorded timm constructor argument as posenc config fields; anything else is refused."""
    fields = {f.name for f in dataclasses.fields(SwinConfig if swin else ViTConfig)}
    if key in _TIMM_ARGS & fields:
        return {key: tuple(value) if isinstance(value, list) else value}
    if key.endswith("drop_rate") or (swin and key == "global_pool" and value == "avg"):
        return {}  # dropout is off at inference; Swin always averages
    if key == "use_abs_pos_emb":
        return {"pos_embed": "learned" if value else "none"}
    if key in ("use_rel_pos_bias", "use_shared_rel_pos_bias"):  # either gives every block a table
        return {key: bool(value)}
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


def config_from_transformers(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> Config:
    """A posenc config from a transformers ``config.json`` and its ``preprocessor_config.json``.

    DeiT rule: DeiT was trained and evaluated with ImageNet mean/std (0.485, 0.456, 0.406) /
    (0.229, 0.224, 0.225), but transformers' ``DeiTImageProcessor`` defaults to 0.5/0.5, so a DeiT
    preprocessor (``model_type`` deit, or a ``DeiT*`` image processor) that omits or contradicts
    the ImageNet statistics is overridden to them, with a warning. Resize and crop are kept.
    """
    model_type = config.get("model_type")
    allowed = TRANSFORMERS_ARCHITECTURES.get(model_type)
    archs = config.get("architectures") or []
    if allowed is None or (archs and not set(archs) & set(allowed)):
        raise UnsupportedModelError(f"transformers {model_type!r} model {archs} is not supported; {_supported()}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError(f"activation {config['hidden_act']!r} is not supported; posenc uses exact GELU")
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) or config.get("num_labels", 2)
    labels = id2label_list(id2label, num_classes) if id2label else None  # None for generic LABEL_i names
    img_size = config.get("image_size", 224)
    common: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3),
        "num_classes": num_classes,
        "qkv_bias": config.get("qkv_bias", True),
        "norm_eps": config.get("layer_norm_eps", 1e-5 if model_type == "swin" else 1e-12),
        "labels": tuple(labels) if labels else None,
        "preprocess": _transformers_preprocess(model_type, preprocessor, img_size),
    }
    if model_type == "swin":
        if config.get("use_absolute_embeddings"):
            raise UnsupportedModelError("Swin with absolute position embeddings is not supported")
        return SwinConfig(
            embed_dim=config["embed_dim"],
            depths=tuple(config["depths"]),
            num_heads=tuple(config["num_heads"]),
            window_size=config.get("window_size", 7),
            mlp_ratio=config.get("mlp_ratio", 4.0),
            **common,
        )
    hidden, intermediate = config["hidden_size"], config.get("intermediate_size", 4 * _size(config, "hidden_size"))
    if not isinstance(intermediate, (int, float)) or isinstance(intermediate, bool):
        raise ValueError(f"intermediate_size must be a positive integer, got {intermediate!r}")
    common.update(
        embed_dim=hidden,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=intermediate / _size(config, "hidden_size"),
        distilled=model_type == "deit",
    )
    if model_type == "beit":
        scale = config.get("layer_scale_init_value", 0.1)
        common.update(
            qkv_bias="qv",
            pos_embed="learned" if config.get("use_absolute_position_embeddings") else "none",
            rel_pos_bias=bool(config.get("use_relative_position_bias") or config.get("use_shared_relative_position_bias")),
            global_pool="avg" if config.get("use_mean_pooling", True) else "token",
            init_values=scale if scale and scale > 0 else None,
        )
    return ViTConfig(**common)


def _size(config: dict[str, Any], key: str) -> int:
    """A size that the converter computes with: a positive integer, or a ValueError naming it."""
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {str(value)[:60]!r}")
    return value


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


def convert_state_dict(layout: str, state_dict: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """A posenc state dict from a ``"timm"``, ``"transformers"`` or ``"posenc"`` one.

    Keys are renamed by rule; separate query/key/value projections are fused into ``qkv``; derived
    buffers are dropped; BEiT's shared relative table is copied into every block; relative tables and
    ``pos_embed`` are resized bicubically when the checkpoint's window or grid differs from the config's.
    """
    if layout == "timm":
        out = _rename(state_dict, _TIMM_RULES)
    elif layout == "transformers":
        out = _fuse_qkv(_rename(state_dict, _TRANSFORMERS_RULES))
    elif layout == "posenc":
        out = dict(state_dict)
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'posenc', 'timm' or 'transformers'")
    out = {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in _DERIVED}
    shared = out.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None and isinstance(config, ViTConfig) and config.rel_pos_bias:
        for i in range(config.depth):
            out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    elif shared is not None:
        out["rel_pos_bias.relative_position_bias_table"] = shared  # reported as unexpected by check_state_dict
    return _fit_positions(out, config)


def _rename(state_dict: dict[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
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


def _square_window(rows: int, cls_token: bool) -> tuple[int, int] | None:
    """The square window whose relative table has ``rows`` rows, or None."""
    side = math.isqrt(rows - (3 if cls_token else 0))
    if side * side != rows - (3 if cls_token else 0) or side % 2 == 0:
        return None
    return ((side + 1) // 2, (side + 1) // 2)


def _fit_positions(state_dict: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Resize relative tables to the config's windows and resample ``pos_embed`` to its grid."""
    out = dict(state_dict)
    cls_token = isinstance(config, ViTConfig) and config.class_token
    for key, table in state_dict.items():
        if not key.endswith("attn.relative_position_bias_table"):
            continue
        if isinstance(config, SwinConfig):
            stage = re.match(r"layers\.(\d+)\.", key)
            if stage is None or int(stage[1]) >= len(config.depths):
                continue
            window = config.stage_geometry()[int(stage[1])][1]
        else:
            window = config.grid
        old = _square_window(table.shape[0], cls_token)
        if table.shape[0] != num_relative_positions(window, cls_token) and old is not None:
            logger.info("resizing %s from window %s to %s", key, old, window)
            out[key] = resize_rel_pos_bias_table(table, window, old, cls_token)  # R', heads
    pos = state_dict.get("pos_embed")
    if pos is not None and isinstance(config, ViTConfig) and pos.ndim == 3:
        prefix = 0 if config.no_embed_class else config.num_prefix_tokens
        side = math.isqrt(pos.shape[1] - prefix)
        if pos.shape[1] != prefix + config.grid[0] * config.grid[1] and side * side == pos.shape[1] - prefix:
            logger.info("resampling pos_embed from %dx%d to %s", side, side, config.grid)
            out["pos_embed"] = resample_abs_pos_embed(pos, config.grid, (side, side), prefix)  # 1, P + h*w, C
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
