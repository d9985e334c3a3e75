"""posenc's models: a ViT with pluggable position encoding, a Swin with windowed relative bias, and Swin V2."""

from __future__ import annotations

from typing import Any

from posenc.models import convit, eva, levit, naflexvit, sam, swin, swin_v2, tiny_vit, vit
from posenc.models.convit import ConViT, ConViTConfig
from posenc.models.eva import Eva, EvaConfig
from posenc.models.levit import LeViT, LeViTConfig
from posenc.models.naflexvit import NaFlexViT, NaFlexViTConfig
from posenc.models.layers import FAMILIES, BlockTrace, Inspection, PosencModel
from posenc.models.sam import SamConfig, SamViT
from posenc.models.swin import SwinConfig, SwinTransformer
from posenc.models.swin_v2 import SwinTransformerV2, SwinV2Config
from posenc.models.tiny_vit import TinyViT, TinyViTConfig
from posenc.models.vit import ViTConfig, VisionTransformer

#: config ``model_type`` -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, type[PosencModel]]] = {
    "posenc_vit": (ViTConfig, VisionTransformer),
    "posenc_swin": (SwinConfig, SwinTransformer),
    "posenc_sam": (SamConfig, SamViT),
    "posenc_convit": (ConViTConfig, ConViT),
    "posenc_eva": (EvaConfig, Eva),
    "posenc_swinv2": (SwinV2Config, SwinTransformerV2),
    "posenc_levit": (LeViTConfig, LeViT),
    "posenc_tiny_vit": (TinyViTConfig, TinyViT),
    "posenc_naflexvit": (NaFlexViTConfig, NaFlexViT),
}

#: timm architecture name -> (config class, the config fields its registration fixes). Each model module keeps
#: its own ``TIMM_PRESETS`` table; a new module adds one line here.
TIMM_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    **{name: (ViTConfig, args) for name, args in vit.TIMM_PRESETS.items()},
    **{name: (SwinConfig, args) for name, args in swin.TIMM_PRESETS.items()},
    **{name: (SamConfig, args) for name, args in sam.TIMM_PRESETS.items()},
    **{name: (ConViTConfig, args) for name, args in convit.TIMM_PRESETS.items()},
    **{name: (EvaConfig, args) for name, args in eva.TIMM_PRESETS.items()},
    **{name: (SwinV2Config, args) for name, args in swin_v2.TIMM_PRESETS.items()},
    **{name: (LeViTConfig, args) for name, args in levit.TIMM_PRESETS.items()},
    **{name: (TinyViTConfig, args) for name, args in tiny_vit.TIMM_PRESETS.items()},
    **{name: (NaFlexViTConfig, args) for name, args in naflexvit.TIMM_PRESETS.items()},
}


def build_model(config: Any) -> PosencModel:
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
    "ConViT",
    "ConViTConfig",
    "Eva",
    "EvaConfig",
    "LeViT",
    "LeViTConfig",
    "Inspection",
    "NaFlexViT",
    "NaFlexViTConfig",
    "PosencModel",
    "SamConfig",
    "SamViT",
    "SwinConfig",
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinV2Config",
    "TIMM_PRESETS",
    "TinyViT",
    "TinyViTConfig",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
]
