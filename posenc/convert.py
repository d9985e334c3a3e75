"""Checkpoint converters: timm and transformers Hub layouts to posenc configs and state dicts.

A Hub folder holds a ``config.json`` and the weights. :func:`detect_layout` tells which library wrote
them; :func:`config_from_timm` / :func:`config_from_transformers` turn the config into a
:class:`~posenc.models.ViTConfig` or :class:`~posenc.models.SwinConfig`; :func:`convert_state_dict`
renames the weights by rule (a few regex substitutions plus fusing separate query/key/value into
``qkv``), drops derived buffers and fits position tensors to the config's grid; :func:`check_state_dict`
compares keys and shapes with the model before a strict load.

Supported: the timm architectures of :data:`posenc.models.TIMM_PRESETS` (a table keyed by the architecture
name, as timm's registry is) and the transformers model types of :data:`TRANSFORMERS_ARCHITECTURES`
(classification heads), stored in the Hub layout that ``save_pretrained`` writes
(``vit.encoder.layer.0.attention.attention.query.weight``, ...). :func:`supported_table` renders both for the
README.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posenc.encodings import num_relative_positions, resample_abs_pos_embed, resize_rel_pos_bias_table
from posenc.labels import id2label_list
from posenc.models import naflexvit
from posenc.models import (
    ARCHITECTURES,
    TIMM_PRESETS,
    ConViTConfig,
    EvaConfig,
    LeViTConfig,
    NaFlexViTConfig,
    SamConfig,
    SwinConfig,
    SwinV2Config,
    TinyViTConfig,
    ViTConfig,
)
from posenc.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

logger = logging.getLogger(__name__)

Config = ViTConfig | SwinConfig | SamConfig | EvaConfig | SwinV2Config

#: transformers ``model_type`` -> the classification architectures posenc converts.
TRANSFORMERS_ARCHITECTURES = {
    "vit": ("ViTForImageClassification",),
    "deit": ("DeiTForImageClassificationWithTeacher",),
    "beit": ("BeitForImageClassification",),
    "swin": ("SwinForImageClassification",),
    "vitdet": ("VitDetBackbone", "VitDetModel"),  # headless backbones
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"),
    "ijepa": ("IJepaForImageClassification",),
    "vit_msn": ("ViTMSNForImageClassification",),
    "siglip": ("SiglipForImageClassification",),
    "swinv2": ("Swinv2ForImageClassification",),
    "data2vec-vision": ("Data2VecVisionForImageClassification",),
    "levit": ("LevitForImageClassification", "LevitForImageClassificationWithTeacher"),
    "dinov3_vit": ("DINOv3ViTModel", "DINOv3ViTBackbone"),  # headless: model(x) is the normed cls token
}
#: Base-model architectures of that table: no classifier, ``model(x)`` returns the pooled features they return.
_HEADLESS_ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel")
# timm constructor arguments (``model_args``) named differently from the posenc config field they set.
_TIMM_ARG_RULES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "use_abs_pos_emb": lambda value: {"pos_embed": "learned" if value else "none"},
    # either gives every BEiT block a table; resolved in config_from_timm
    "use_rel_pos_bias": lambda value: {"use_rel_pos_bias": bool(value)},
    "use_shared_rel_pos_bias": lambda value: {"use_shared_rel_pos_bias": bool(value)},
    # posenc models run at any size a multiple of the patch, and always fuse q/k/v (split ones are fused on load)
    "dynamic_img_size": lambda value: {},
    "qkv_fused": lambda value: {},
}

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
    # the layout transformers is moving to: q_proj/k_proj/v_proj/o_proj on the attention module itself
    (r"\.(attention|self_attn)\.([qkv])_proj\.", lambda m: f".attn.{dict(q='query', k='key', v='value')[m[2]]}."),
    (r"\.(attention|self_attn)\.(o_proj|out_proj)\.", ".attn.proj."),
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
# The attention layout transformers is moving to (``attention.{q,k,v,o}_proj``, Swin's table under
# ``attention.relative_position_bias``), spelled back as today's layout so the rules below apply to both.
_TRANSFORMERS_NEXT_LAYOUT: list[Rule] = [
    (r"\.attention\.(?:attention\.|self\.)?([qkv])_proj\.",
     lambda m: f".attention.self.{dict(q='query', k='key', v='value')[m[1]]}."),
    (r"\.attention\.(?:attention\.|self\.)?o_proj\.", ".attention.output.dense."),
    (r"(\.\d+)\.attention\.relative_position_bias\.relative_position_bias_table$",
     r"\1.attention.self.relative_position_bias_table"),
]  # fmt: skip
#: Key rules of the timm layout per posenc config class, for classes whose names differ from ViT's; and of the
#: transformers layout per ``model_type``. A new family adds its row.
#: The transformers rules may also be a function of the posenc config, for layouts whose renaming depends on
#: its sizes (LeViT numbers a stage's attention and MLP layers, and the subsampling after them, in one list).
_TIMM_RULES_FOR: dict[type, list[Rule]] = {
    # EVA-02 B/L keep separate q/k/v projections (no key bias): renamed here, fused into qkv by _fuse_qkv
    EvaConfig: [(r"\.attn\.(q|k|v)_proj\.", lambda m: f".attn.{dict(q='query', k='key', v='value')[m[1]]}.")],
    # swinv2_cr spells the stages and the bias MLP differently from swinv2
    SwinV2Config: [*_TIMM_RULES, (r"^stages\.", "layers."), (r"\.attn\.meta_mlp\.fc1\.", ".attn.cpb_mlp.0."),
                   (r"\.attn\.meta_mlp\.fc2\.", ".attn.cpb_mlp.2.")],
    ConViTConfig: [],
    LeViTConfig: [],
    TinyViTConfig: [],
    NaFlexViTConfig: naflexvit.TIMM_RULES,
}  # fmt: skip
_TRANSFORMERS_RULES_FOR: dict[str, list[Rule] | Callable[[Any], list[Rule]]] = {
    "vitdet": [
        (r"^embeddings\.projection\.", "patch_embed.proj."),
        (r"^embeddings\.position_embeddings$", "pos_embed"),  # (1, 1 + h*w, C): reshaped in _fit_positions
        (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
        (r"\.attention\.(q|k|v)_proj\.", lambda m: f".attn.{dict(q='query', k='key', v='value')[m[1]]}."),
        (r"\.attention\.(o_proj|proj)\.", ".attn.proj."),
        (r"\.attention\.", ".attn."),
    ],
    "dinov2": [(r"^dinov2\.", ""), (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"), *_TRANSFORMERS_RULES],
    "dinov2_with_registers": [
        (r"^dinov2_with_registers\.", ""),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
        *_TRANSFORMERS_RULES,
    ],
    "ijepa": [(r"^ijepa\.layers\.", "blocks."), (r"^ijepa\.", ""), *_TRANSFORMERS_RULES],
    "vit_msn": [(r"^vit\.layers\.", "blocks."), *_TRANSFORMERS_RULES],
    "siglip": [
        (r"^vision_model\.head\.", "unused_map_head."),  # the classifier averages tokens; its MAP head is unused
        (r"^vision_model\.embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^vision_model\.embeddings\.position_embedding\.weight$", "pos_embed"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.", r"blocks.\1."),
        (r"\.layer_norm([12])\.", r".norm\1."),
        (r"^vision_model\.post_layernorm\.", "norm."),
        *_TRANSFORMERS_RULES,
    ],
    "swinv2": [
        (r"^swinv2\.", ""),
        *_TRANSFORMERS_NEXT_LAYOUT,
        (r"\.attention\.(?:self\.)?continuous_position_bias_mlp\.", ".attn.cpb_mlp."),
        (r"\.attention\.(?:self\.)?logit_scale$", ".attn.logit_scale"),
        *_TRANSFORMERS_RULES,
    ],
    "data2vec-vision": [(r"^data2vec_vision\.", ""), *_TRANSFORMERS_NEXT_LAYOUT, *_TRANSFORMERS_RULES],
    "dinov3_vit": [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (r"^embeddings\.mask_token$", "mask_token"),  # pre-training only: dropped
        (r"^(model\.)?layer\.(\d+)\.", r"blocks.\2."),
        (r"\.attention\.(q|k|v)_proj\.", lambda m: f".attn.{dict(q='query', k='key', v='value')[m[1]]}."),
        (r"\.attention\.o_proj\.", ".attn.proj."),
        (r"\.layer_scale([12])\.lambda1$", r".gamma_\1"),
        (r"\.mlp\.up_proj\.", ".mlp.fc1."),
        (r"\.mlp\.down_proj\.", ".mlp.fc2."),
    ],
}
# Buffers rebuilt from the config (DINOv3's RoPE periods, Swin V2's coordinate tables, LeViT's bias index;
# BEiT's unused mask token): never loaded.
_DERIVED = (
    "relative_position_index", "attn_mask", "k_bias", "mask_token", "periods", "relative_coords_table",
    "relative_coordinates_log", "attention_bias_idxs",
)  # fmt: skip


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one posenc can rebuild."""


class CheckpointMismatchError(ValueError):
    """The weights do not fit the model built from the checkpoint's config."""


def _supported() -> str:
    timm = ", ".join(sorted(TIMM_PRESETS))
    hf = ", ".join(f"{t} ({'/'.join(a)})" for t, a in TRANSFORMERS_ARCHITECTURES.items())
    return f"supported: timm architectures {timm}; transformers model types {hf}; {', '.join(ARCHITECTURES)}"


def supported_table() -> str:
    """The README's table of supported architectures, rendered from :data:`TIMM_PRESETS` and the transformers table.

    Returns:
        Markdown: one row per posenc model class with its position mechanisms, the timm architecture names
        and the transformers model types it loads.
    """
    rows = []
    for model_type, (config_cls, model_cls) in ARCHITECTURES.items():
        names = sorted(name for name, (cls, _) in TIMM_PRESETS.items() if cls is config_cls)
        mechanisms = sorted({m for name in names for m in config_cls(**TIMM_PRESETS[name][1]).mechanisms})
        types = sorted(t for t, cls in _TRANSFORMERS_CONFIG.items() if cls is config_cls)
        timm = ", ".join(f"`{n}`" for n in names) or "-"
        rows.append(f"| `{model_type}` ({model_cls.__name__}) | {', '.join(mechanisms) or '-'} | {timm} | "
                    f"{', '.join(f'`{t}`' for t in types) or '-'} |")
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
    if model_type in TRANSFORMERS_ARCHITECTURES:
        return "transformers"
    raise UnsupportedModelError(
        f"config.json is neither posenc, timm nor a supported transformers model (model_type={model_type!r}); {_supported()}"
    )


# --------------------------------------------------------------------------- configs


def config_from_timm(config: dict[str, Any]) -> Config:
    """A posenc config from a timm Hub ``config.json``: the architecture's preset, then its ``model_args``.

    The architecture name (its ``.tag`` dropped) is looked up in :data:`posenc.models.TIMM_PRESETS`, the table
    of the config fields each timm registration fixes (as timm's own registry rebuilds a model), and the
    recorded ``model_args`` (e.g. ``depth``) are applied on top. Names are never parsed.
    """
    pretrained = config.get("pretrained_cfg") or {}
    name = str(config.get("architecture") or pretrained.get("architecture") or "").split(".")[0]
    if name not in TIMM_PRESETS:
        raise UnsupportedModelError(f"timm architecture {name!r} is not supported; {_supported()}")
    config_cls, preset = TIMM_PRESETS[name]
    args: dict[str, Any] = dict(preset)
    for key, value in (config.get("model_args") or {}).items():
        args.update(_timm_arg(name, key, value, config_cls))
    if "use_rel_pos_bias" in args or "use_shared_rel_pos_bias" in args:
        args["rel_pos_bias"] = args.pop("use_rel_pos_bias", True) or args.pop("use_shared_rel_pos_bias", False)
        args.pop("use_shared_rel_pos_bias", None)
    args["num_classes"] = config.get("num_classes", args.get("num_classes", 1000))  # 0: headless; the config checks it
    input_size = pretrained.get("input_size")
    if "img_size" in args and "img_size" not in (config.get("model_args") or {}) and input_size and pretrained.get(
        "fixed_input_size"
    ):
        args["img_size"] = tuple(input_size[-2:])  # as timm's builder does: the tag's own input size
    args["labels"] = _timm_labels(config, args["num_classes"])
    args["preprocess"] = Preprocess.from_timm(pretrained)
    try:
        return config_cls(**args)
    except ValueError as error:  # a recorded model_arg posenc has no equivalent for (e.g. act_layer='relu')
        raise UnsupportedModelError(f"timm model {name!r} cannot be rebuilt: {error}") from error


def _timm_arg(name: str, key: str, value: Any, config_cls: type) -> dict[str, Any]:
    """One recorded timm constructor argument as posenc config fields; anything else is refused."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if key in fields:
        return {key: tuple(value) if isinstance(value, list) else value}
    if key.endswith("drop_rate") or (key == "global_pool" and value == "avg" and "global_pool" not in fields):
        return {}  # dropout is off at inference; a model without the field always averages (Swin)
    if key in _TIMM_ARG_RULES:
        return _TIMM_ARG_RULES[key](value)
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

    The fields every image model shares (size, classes, labels, preprocessing) are read here; the
    ``model_type``'s builder in :data:`_TRANSFORMERS_BUILDERS` reads the rest.

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
    if archs and set(archs) <= set(_HEADLESS_ARCHITECTURES):
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
    return _TRANSFORMERS_BUILDERS[model_type](config, common)


def _swin_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SwinConfig:
    if config.get("use_absolute_embeddings"):
        raise UnsupportedModelError("Swin with absolute position embeddings is not supported")
    return SwinConfig(
        embed_dim=config["embed_dim"],
        depths=tuple(config["depths"]),
        num_heads=tuple(config["num_heads"]),
        window_size=config.get("window_size", 7),
        mlp_ratio=config.get("mlp_ratio", 4.0),
        **{**common, "norm_eps": config.get("layer_norm_eps", 1e-5)},
    )


def _swinv2_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SwinV2Config:
    if config.get("use_absolute_embeddings"):
        raise UnsupportedModelError("Swin V2 with absolute position embeddings is not supported")
    depths = tuple(config["depths"])
    return SwinV2Config(
        embed_dim=config["embed_dim"],
        depths=depths,
        num_heads=tuple(config["num_heads"]),
        window_size=config.get("window_size", 7),
        pretrained_window_sizes=tuple(config.get("pretrained_window_sizes") or (0,) * len(depths)),
        mlp_ratio=config.get("mlp_ratio", 4.0),
        **{**common, "norm_eps": config.get("layer_norm_eps", 1e-5), "qkv_bias": "qv" if common["qkv_bias"] else False},
    )


def _vit_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Width, depth, heads and MLP ratio of a transformers ViT-style encoder config (sizes checked before use)."""
    hidden = _size(config, "hidden_size")
    intermediate = config.get("intermediate_size", 4 * hidden)
    if not isinstance(intermediate, (int, float)) or isinstance(intermediate, bool):
        raise ValueError(f"intermediate_size must be a positive integer, got {intermediate!r}")
    return {
        "embed_dim": hidden,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": intermediate / hidden,
    }


def _vit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, **_vit_fields(config))


def _deit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, **_vit_fields(config), distilled=True)


def _beit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    scale = config.get("layer_scale_init_value", 0.1)
    return ViTConfig(
        **{**common, "qkv_bias": "qv"},
        **_vit_fields(config),
        pos_embed="learned" if config.get("use_absolute_position_embeddings") else "none",
        rel_pos_bias=bool(config.get("use_relative_position_bias") or config.get("use_shared_relative_position_bias")),
        global_pool="avg" if config.get("use_mean_pooling", True) else "token",
        init_values=scale if scale and scale > 0 else None,
    )


def _vitdet_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SamConfig:
    """ViTDet's backbone: SAM's encoder without a neck, its embedding learned at ``pretrain_image_size``."""
    if config.get("residual_block_indices"):
        raise UnsupportedModelError(
            f"ViTDet with residual conv blocks {config['residual_block_indices']} is not supported; pick one without")
    windowed = set(config.get("window_block_indices") or ())
    depth = config["num_hidden_layers"]
    hidden = config["hidden_size"]
    return SamConfig(
        **{**common, "num_classes": 0, "labels": None, "norm_eps": config.get("layer_norm_eps", 1e-6)},
        embed_dim=hidden,
        depth=depth,
        num_heads=config["num_attention_heads"],
        mlp_ratio=config.get("mlp_ratio", 4),
        use_abs_pos=config.get("use_absolute_position_embeddings", True),
        use_rel_pos=config.get("use_relative_position_embeddings", False),
        window_size=config.get("window_size", 0) if windowed else 0,
        global_attn_indexes=tuple(i for i in range(depth) if i not in windowed),
        pretrain_img_size=config.get("pretrain_image_size", 224),
        pos_embed_antialias=False,
        neck=False,
    )


def _dinov2_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """DINOv2 (with or without registers): layer scale; the classifier reads the cls token and the patch mean.

    The base model returns the normed cls token. transformers resamples the embedding bicubically, with
    antialiasing only for the version with registers.
    """
    if config.get("use_swiglu_ffn"):
        raise UnsupportedModelError("DINOv2 with a SwiGLU MLP (giant) is not supported")
    registers = int(config.get("num_register_tokens", 0)) if config.get("model_type") == "dinov2_with_registers" else 0
    scale = config.get("layerscale_value", 1.0)
    return ViTConfig(
        **common,
        **{**_vit_fields(config), "mlp_ratio": float(config.get("mlp_ratio", 4))},
        init_values=scale,
        reg_tokens=registers,
        no_embed_class=registers > 0,  # the cls position is folded into cls_token (see convert_state_dict)
        global_pool="token_avg" if common["num_classes"] else "token",
        fc_norm=False,
        pos_embed_antialias=registers > 0,
    )


def _ijepa_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """I-JEPA: no cls token, the classifier averages every token after the final norm."""
    return ViTConfig(**common, **_vit_fields(config), class_token=False, global_pool="avg", fc_norm=False,
                     pos_embed_antialias=False)


def _vit_msn_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """ViT-MSN: a ViT whose classifier reads the cls token."""
    return ViTConfig(**common, **_vit_fields(config), pos_embed_antialias=False)


def _siglip_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """SigLIP's vision tower as a classifier: no cls token, tanh GELU, the mean of every token after the final norm."""
    vision = config.get("vision_config") or {}
    acts = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in acts:
        raise UnsupportedModelError(f"SigLIP activation {act!r} is not supported; posenc supports {sorted(acts)}")
    size = vision.get("image_size", 224)
    return ViTConfig(
        **{**common, "img_size": size, "patch_size": vision.get("patch_size", 16),
           "in_chans": vision.get("num_channels", 3), "norm_eps": vision.get("layer_norm_eps", 1e-6)},
        **_vit_fields({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, **vision}),
        act_layer=acts[act], class_token=False, global_pool="avg", fc_norm=False, pos_embed_antialias=False,
    )  # fmt: skip



def _levit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> LeViTConfig:
    stem = (config.get("kernel_size", 3), config.get("stride", 2), config.get("padding", 1), config.get("patch_size", 16))
    if stem != (3, 2, 1, 16):
        raise UnsupportedModelError(f"LeViT stem (kernel, stride, padding, patch) {stem} is not supported; posenc "
                                    "rebuilds the 16-pixel stem of four 3x3 stride-2 convolutions")  # fmt: skip
    keep = ("img_size", "in_chans", "num_classes", "labels")
    pp = common["preprocess"]
    if pp.crop_mode == "center":  # LevitImageProcessor resizes the shorter side to int(256 / 224 * shortest_edge)
        shortest = round(pp.input_size[0] / pp.crop_pct)
        pp = dataclasses.replace(pp, crop_pct=pp.input_size[0] / int(256 / 224 * shortest))
    return LeViTConfig(
        preprocess=pp,
        embed_dim=tuple(config["hidden_sizes"]),
        key_dim=tuple(config["key_dim"]),
        depth=tuple(config["depths"]),
        num_heads=tuple(config["num_attention_heads"]),
        attn_ratio=tuple(float(r) for r in config["attention_ratio"]),
        mlp_ratio=tuple(float(r) for r in config["mlp_ratio"]),
        distilled="LevitForImageClassificationWithTeacher" in (config.get("architectures") or []),
        **{k: common[k] for k in keep},
    )


def _levit_transformers_rules(config: LeViTConfig) -> list[Rule]:
    """transformers LeViT keys to timm's: stage s's layers 2j and 2j+1 are block j's attention and MLP, layer
    2*depth (the subsampling attention) and 2*depth+1 (its MLP) start stage s + 1 in timm."""

    def layer(m: re.Match) -> str:
        s, i = int(m[1]), int(m[2])
        d = config.depth[s]
        if i < 2 * d:
            return f"stages.{s}.blocks.{i // 2}.{'mlp' if i % 2 else 'attn'}."
        return f"stages.{s + 1}.downsample.{'mlp' if i > 2 * d else 'attn_downsample'}."

    return [
        (r"^levit\.patch_embeddings\.embedding_layer_(\d)\.convolution\.", r"stem.conv\1.linear."),
        (r"^levit\.patch_embeddings\.embedding_layer_(\d)\.batch_norm\.", r"stem.conv\1.bn."),
        (r"^levit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(module\.)?", layer),
        (r"\.queries_keys_values\.", ".qkv."),
        (r"\.keys_values\.", ".kv."),
        (r"\.queries\.", ".q.ln."),
        (r"\.projection\.", ".proj.ln."),
        (r"\.linear_up\.", ".ln1."),
        (r"\.linear_down\.", ".ln2."),
        (r"^classifier_distill\.", "head_dist."),
        (r"^classifier\.", "head."),
        (r"\.batch_norm\.", ".bn."),
    ]


_TRANSFORMERS_RULES_FOR["levit"] = _levit_transformers_rules



def _dinov3_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> EvaConfig:
    """DINOv3 as a backbone: cls + register tokens, centred RoPE, post-norm, cls pooling, no classifier."""
    for flag in ("use_gated_mlp",):
        if config.get(flag):
            raise UnsupportedModelError(f"DINOv3 with {flag}=True is not supported; pick a DINOv3 ViT-S/B/L")
    if not (config.get("mlp_bias", True) and config.get("proj_bias", True)):
        raise UnsupportedModelError("DINOv3 without MLP or output projection biases is not supported")
    biases = (config.get("query_bias", True), config.get("key_bias", False), config.get("value_bias", True))
    if biases[1] and not all(biases) or biases[0] != biases[2]:
        raise UnsupportedModelError(f"DINOv3 with query/key/value biases {biases} is not supported")
    scale = config.get("layerscale_value", 1.0)
    return EvaConfig(
        **{**common, "num_classes": 0, "labels": None, "norm_eps": config.get("layer_norm_eps", 1e-5),
           "qkv_bias": bool(biases[0])},
        **_vit_fields(config),
        attn_type="rope" if biases[1] else "eva",  # "rope": one bias for q, k and v; "eva": no key bias
        init_values=scale,
        num_reg_tokens=config.get("num_register_tokens", 0),
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=config.get("rope_theta", 100.0),
        rope_rotate_half=True,
        global_pool="token",
        use_fc_norm=False,
    )


#: transformers ``model_type`` -> the function that reads the rest of its config.
_TRANSFORMERS_BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Config]] = {
    "vit": _vit_from_transformers,
    "deit": _deit_from_transformers,
    "beit": _beit_from_transformers,
    "swin": _swin_from_transformers,
    "dinov2": _dinov2_from_transformers,
    "dinov2_with_registers": _dinov2_from_transformers,
    "ijepa": _ijepa_from_transformers,
    "vit_msn": _vit_msn_from_transformers,
    "siglip": _siglip_from_transformers,
    "vitdet": _vitdet_from_transformers,
    "swinv2": _swinv2_from_transformers,
    "data2vec-vision": _beit_from_transformers,  # BEiT's architecture under another name
    "levit": _levit_from_transformers,
    "dinov3_vit": _dinov3_from_transformers,
}
#: transformers ``model_type`` -> the posenc config class it becomes (for the README table).
_TRANSFORMERS_CONFIG = {
    "vit": ViTConfig, "deit": ViTConfig, "beit": ViTConfig, "swin": SwinConfig, "dinov2": ViTConfig,
    "dinov2_with_registers": ViTConfig, "ijepa": ViTConfig, "vit_msn": ViTConfig, "siglip": ViTConfig,
    "vitdet": SamConfig, "swinv2": SwinV2Config, "data2vec-vision": ViTConfig, "levit": LeViTConfig,
    "dinov3_vit": EvaConfig,
}  # fmt: skip


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


def convert_state_dict(
    layout: str, state_dict: dict[str, Tensor], config: Config, *, model_type: str | None = None
) -> dict[str, Tensor]:
    """A posenc state dict from a ``"timm"``, ``"transformers"`` or ``"posenc"`` one.

    Keys are renamed by rule (timm: the rules of the config's class in :data:`_TIMM_RULES_FOR`; transformers:
    those of ``model_type`` in :data:`_TRANSFORMERS_RULES_FOR`; both default to the ViT/Swin rules); separate
    query/key/value projections are fused into ``qkv``; derived buffers are dropped; BEiT's shared relative
    table is copied into every block; relative tables and ``pos_embed`` are resized bicubically when the
    checkpoint's window or grid differs from the config's.

    Args:
        model_type: the transformers ``model_type`` of the checkpoint's config.json (transformers layout).
    """
    if layout == "timm":
        out = _fuse_qkv(_rename(state_dict, _TIMM_RULES_FOR.get(type(config), _TIMM_RULES)))
    elif layout == "transformers":
        rules = _TRANSFORMERS_RULES_FOR.get(model_type, _TRANSFORMERS_RULES)
        out = _fuse_qkv(_rename(state_dict, rules(config) if callable(rules) else rules))
    elif layout == "posenc":
        out = dict(state_dict)
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'posenc', 'timm' or 'transformers'")
    out = {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in _DERIVED and not k.startswith("unused_")}
    if layout == "transformers":
        out = _fix_layout(out, config)
    shared = out.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None and isinstance(config, ViTConfig) and config.rel_pos_bias:
        for i in range(config.depth):
            out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    elif shared is not None:
        out["rel_pos_bias.relative_position_bias_table"] = shared  # reported as unexpected by check_state_dict
    return _fit_positions(out, config)


def _fix_layout(state_dict: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Bring tensors whose layout differs from timm's to it (shapes only; values and results unchanged).

    * ``pos_embed`` stored as an embedding table (N, C) (SigLIP) becomes (1, N, C).
    * A ``pos_embed`` with a cls row for a model whose registers carry no position (transformers'
      DINOv2 with registers adds the cls position, then inserts the registers): the cls row is folded into
      ``cls_token``, as timm stores it, since the cls row is never resampled.
    """
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is None or not isinstance(config, ViTConfig):
        return out
    if pos.ndim == 2:
        out["pos_embed"] = pos = pos[None]  # 1, N, C
    patches = config.grid[0] * config.grid[1]
    cls = out.get("cls_token")
    if config.no_embed_class and config.class_token and cls is not None and pos.shape[1] == patches + 1:
        out["cls_token"] = cls + pos[:, :1]  # 1, 1, C
        out["pos_embed"] = pos[:, 1:]  # 1, h*w, C
    return out


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
    if pos is not None and isinstance(config, (ViTConfig, EvaConfig)) and pos.ndim == 3:
        prefix = 0 if config.no_embed_class else config.num_prefix_tokens
        side = math.isqrt(pos.shape[1] - prefix)
        if pos.shape[1] != prefix + config.grid[0] * config.grid[1] and side * side == pos.shape[1] - prefix:
            logger.info("resampling pos_embed from %dx%d to %s", side, side, config.grid)
            out["pos_embed"] = resample_abs_pos_embed(pos, config.grid, (side, side), prefix)  # 1, P + h*w, C
    if pos is not None and isinstance(config, SamConfig) and pos.ndim == 3:
        h, w = config.pos_embed_grid
        if pos.shape[1] >= h * w:  # a flat (1, P + h*w, C) embedding (ViTDet keeps an unused cls row first)
            out["pos_embed"] = pos[:, pos.shape[1] - h * w :].reshape(1, h, w, pos.shape[-1])  # 1, h, w, C
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

