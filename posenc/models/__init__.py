"""posenc's models, one module per architecture, each ending with its :class:`~posenc.models.declare.Architecture`.

The declarations of the modules in :data:`MODULES` are collected into :data:`ARCHITECTURES` (by posenc
``model_type``), :data:`TIMM_PRESETS` (by timm architecture name) and :data:`TRANSFORMERS_TYPES` (by transformers
``model_type``); the converters and the registry read these tables and name no architecture.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from posenc.models.cait import CaiT, CaiTConfig
from posenc.models.coat import CoaT, CoaTConfig
from posenc.models.convit import ConViT, ConViTConfig
from posenc.models.declare import Architecture, TransformersType
from posenc.models.eva import Eva, EvaConfig
from posenc.models.levit import LeViT, LeViTConfig
from posenc.models.layers import BlockTrace, Inspection, NoTokenLayout, OutputTokens, PosencModel, TokenLayout
from posenc.models.naflexvit import NaFlexViT, NaFlexViTConfig
from posenc.models.mvitv2 import MViTv2, MViTv2Config
from posenc.models.sam import SamConfig, SamViT
from posenc.models.swin import SwinConfig, SwinTransformer
from posenc.models.swin_v2 import SwinTransformerV2, SwinV2Config
from posenc.models.tiny_vit import TinyViT, TinyViTConfig
from posenc.models.twins import Twins, TwinsConfig
from posenc.models.vit import ViTConfig, VisionTransformer
from posenc.models.xcit import XCiT, XCiTConfig

#: Model modules of this package, each ending with its ``ARCHITECTURE`` declaration, in the order tables list them.
MODULES = ("vit", "swin", "sam", "convit", "eva", "swin_v2", "levit", "tiny_vit", "twins", "coat", "xcit", "mvitv2",
           "cait", "naflexvit")


def _collect() -> dict[str, Architecture]:
    found: dict[str, Architecture] = {}
    for module in MODULES:
        declared = importlib.import_module(f"{__name__}.{module}").ARCHITECTURE
        if declared.model_type in found:
            raise ValueError(f"model_type {declared.model_type!r} is declared twice")
        found[declared.model_type] = declared
    return found


def _by_name(table: str) -> dict[str, tuple[Architecture, Any]]:
    found: dict[str, tuple[Architecture, Any]] = {}
    for arch in ARCHITECTURES.values():
        for name, value in getattr(arch, table).items():
            if name in found:
                raise ValueError(f"{name!r} is declared by both {found[name][0].model_type} and {arch.model_type}")
            found[name] = (arch, value)
    return found


#: posenc config ``model_type`` -> its declaration, in :data:`MODULES` order.
ARCHITECTURES: dict[str, Architecture] = _collect()
#: timm architecture name -> (the declaration that rebuilds it, the config fields its registration fixes).
TIMM_PRESETS: dict[str, tuple[Architecture, Mapping[str, Any]]] = _by_name("timm_presets")
#: transformers ``model_type`` -> (the declaration that loads it, how).
TRANSFORMERS_TYPES: dict[str, tuple[Architecture, TransformersType]] = _by_name("transformers")


def build_model(config: Any) -> PosencModel:
    """A freshly initialised model from a config object or a ``config.json`` dict (dispatch on ``model_type``)."""
    if not isinstance(config, dict):
        return ARCHITECTURES[config.model_type].model(config)
    model_type = config.get("model_type", "posenc_vit")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown posenc model_type {model_type!r}; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    return arch.model(arch.config.from_dict(config))


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BlockTrace",
    "CaiT",
    "CaiTConfig",
    "CoaT",
    "CoaTConfig",
    "ConViT",
    "ConViTConfig",
    "Eva",
    "EvaConfig",
    "LeViT",
    "LeViTConfig",
    "Inspection",
    "MViTv2",
    "MViTv2Config",
    "NaFlexViT",
    "NaFlexViTConfig",
    "NoTokenLayout",
    "OutputTokens",
    "PosencModel",
    "SamConfig",
    "SamViT",
    "SwinConfig",
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinV2Config",
    "MODULES",
    "TIMM_PRESETS",
    "TRANSFORMERS_TYPES",
    "TransformersType",
    "TinyViT",
    "TinyViTConfig",
    "TokenLayout",
    "Twins",
    "TwinsConfig",
    "ViTConfig",
    "VisionTransformer",
    "XCiT",
    "XCiTConfig",
    "build_model",
]
