"""posenc: see how Vision Transformers encode position.

The public API::

    import posenc
    loaded = posenc.load("timm/deit_tiny_patch16_224.fb_in1k")   # or a local folder, or checkpoints/cifar10-rope
    loaded.predict("photo.jpg", top_k=5)
    seen = loaded.model.inspect(loaded.pixels("photo.jpg"))     # logits + every position tensor used

Models can also be built directly (``posenc.ViTConfig`` / ``posenc.SwinConfig`` -> ``posenc.build_model``)
and saved with ``save_pretrained`` / ``push_to_hub``. The pure position-encoding functions live in
:mod:`posenc.encodings`, the views in :mod:`posenc.viz`.
"""

from __future__ import annotations

from typing import Any

from posenc.models import (
    BlockTrace,
    Inspection,
    SwinConfig,
    SwinTransformer,
    SwinTransformerV2,
    SwinV2Config,
    ViTConfig,
    VisionTransformer,
    build_model,
)

__version__ = "0.1.0"

# Loading pulls in huggingface_hub and the converters; resolve it on first use so ``import posenc`` stays light.
_LAZY = {
    "load": "posenc.hub",
    "LoadedModel": "posenc.hub",
    "HubLoadError": "posenc.hub",
    "Prediction": "posenc.hub",
    "is_safe_source": "posenc.hub",
    "Preprocess": "posenc.preprocess",
    "load_image": "posenc.preprocess",
    "ImageError": "posenc.preprocess",
    "HUB_MODELS": "posenc.registry",
    "ModelEntry": "posenc.registry",
    "bundled_models": "posenc.registry",
    "CIFAR10_LABELS": "posenc.labels",
    "imagenet_labels": "posenc.labels",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'posenc' has no attribute {name!r}")


__all__ = [
    "CIFAR10_LABELS",
    "HUB_MODELS",
    "ImageError",
    "ModelEntry",
    "Prediction",
    "bundled_models",
    "imagenet_labels",
    "is_safe_source",
    "load_image",
    "BlockTrace",
    "HubLoadError",
    "Inspection",
    "LoadedModel",
    "Preprocess",
    "SwinConfig",
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinV2Config",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "load",
]
