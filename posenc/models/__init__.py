"""posenc's models: a ViT with pluggable position encoding and a Swin with windowed relative bias."""

from __future__ import annotations

from typing import Any

from posenc.models.layers import FAMILIES, BlockTrace, Inspection, PosencModel
from posenc.models.swin import SwinConfig, SwinTransformer
from posenc.models.vit import ViTConfig, VisionTransformer

#: config ``model_type`` -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, type[PosencModel]]] = {
    "posenc_vit": (ViTConfig, VisionTransformer),
    "posenc_swin": (SwinConfig, SwinTransformer),
}


def build_model(config: ViTConfig | SwinConfig | dict[str, Any]) -> PosencModel:
    """A freshly initialised model from a config object or a ``config.json`` dict (dispatch on ``model_type``)."""
    if not isinstance(config, dict):
        return ARCHITECTURES[config.model_type][1](config)
    model_type = config.get("model_type", "posenc_vit")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown posenc model_type {model_type!r}; expected one of {sorted(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[model_type]
    return model_cls(config_cls.from_dict(config))


__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "BlockTrace",
    "Inspection",
    "PosencModel",
    "SwinConfig",
    "SwinTransformer",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
]
