"""Building blocks shared by the ViT and Swin models, the inspection records, and the Hub mixin base."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import Tensor, nn

from posenc.encodings import Size2
from posenc.preprocess import Preprocess

#: Position-encoding families, as named in configs, the registry and the app.
FAMILIES = ("none", "learned", "sincos", "relative", "windowed", "rope")


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided conv, then an optional LayerNorm.

    Returns (B, h, w, C) so both models can take it from there.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if norm else nn.Identity()

    def grid(self, image_size: Size2) -> Size2:
        """The (h, w) patch grid of an image, or a ValueError naming the sizes."""
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize to a multiple of {p}")
        return (h // p, w // p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w, C)."""
        self.grid(tuple(x.shape[-2:]))
        x = self.proj(x).permute(0, 2, 3, 1)  # B, h, w, C
        return self.norm(x)


class Mlp(nn.Module):
    """Two linear layers with GELU between (timm names: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT / BEiT ``gamma``)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # B, 1, ...
        return x * keep / (1.0 - self.p)


@dataclass(frozen=True)
class BlockTrace:
    """Tensors one transformer block used, from an inspection call.

    Attributes:
        attn: (B, heads, N, N) for ViT; (B, nW, heads, Wh*Ww, Wh*Ww) for Swin.
        attn_no_pos: same shape, the attention with the position term left out, or None.
        pos_bias: (heads, N, N) relative bias added to the logits, or None.
        mask: (nW, Wh*Ww, Wh*Ww) shifted-window mask, or None.
        grid: (h, w) token grid of the block's stage.
        window: (Wh, Ww) attention window (Swin) or None for global attention.
        shift: (sh, sw) cyclic shift (Swin) or None.
        stage: stage index (0 for ViT).
        position: further position tensors this block used, keyed by the names its mechanisms declare in
            :mod:`posenc.mechanisms` (e.g. a Swin V2 block's computed bias table); empty for most models.
    """

    attn: Tensor
    attn_no_pos: Tensor | None
    pos_bias: Tensor | None
    mask: Tensor | None
    grid: Size2
    window: Size2 | None = None
    shift: Size2 | None = None
    stage: int = 0
    position: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Inspection:
    """The logits of one forward pass and every position tensor it used.

    Attributes:
        logits: (B, num_classes); for a headless model (no classifier) the pooled features (B, C).
        grid: (h, w) patch grid of the input.
        num_prefix_tokens: leading non-patch tokens (cls, distillation, registers).
        pos_embed: (1, pos_embed_prefix + h*w, C) absolute embedding actually added, after resampling; or None.
        pos_embed_prefix: leading rows of ``pos_embed`` that are not patches.
        rope_angles: (h*w, head_dim/2) RoPE angles, or None.
        blocks: one :class:`BlockTrace` per block, in order.
        prefix_names: a name per prefix token, in token order ("cls", "dist", "reg0", ...); empty means
            unnamed (see :attr:`prefix_labels`).
        position: further model-level position tensors, keyed by the names the model's mechanisms declare
            in :mod:`posenc.mechanisms`.
    """

    logits: Tensor
    grid: Size2
    num_prefix_tokens: int
    pos_embed: Tensor | None
    pos_embed_prefix: int
    rope_angles: Tensor | None
    blocks: list[BlockTrace]
    prefix_names: tuple[str, ...] = ()
    position: dict[str, Tensor] = field(default_factory=dict)

    @property
    def prefix_labels(self) -> tuple[str, ...]:
        """A name for every prefix token: :attr:`prefix_names`, or "cls", "dist", ... when unnamed."""
        if self.prefix_names:
            return self.prefix_names
        return ("cls", "dist", *(f"prefix{i}" for i in range(2, self.num_prefix_tokens)))[: self.num_prefix_tokens]


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a JSON dict, ignoring unknown keys (e.g. ones the Hub adds)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def normalise_config(config: Any) -> None:
    """Turn JSON lists back into tuples and a preprocess dict into :class:`Preprocess`, in ``__post_init__``."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
    if isinstance(getattr(config, "preprocess", None), dict):
        object.__setattr__(config, "preprocess", Preprocess.from_dict(config.preprocess))


def init_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A posenc **{{ family }}** model: {{ description }}

| | |
|---|---|
| position encoding | {{ family }} |
| architecture | {{ architecture }} |
| parameters | {{ params }} |
| input size | {{ input_size }} |
| classes | {{ num_classes }} |

{{ training }}

## Use

```python
import posenc
loaded = posenc.load("{{ repo_hint }}")
print(loaded.predict("photo.jpg", top_k=5))
```

Inspect the position tensors with `loaded.model.inspect(pixels)`; see the posenc README.
"""

DESCRIPTIONS = {
    "none": "no position information at all; the encoder is permutation-equivariant over patches.",
    "learned": "a learned absolute embedding added to the patch tokens.",
    "sincos": "a fixed 2D sin-cos absolute embedding (MAE convention).",
    "relative": "a BEiT-style learned relative position bias over the whole patch grid, with cls entries.",
    "windowed": "a Swin-style learned relative position bias inside (shifted) local windows.",
    "rope": "2D axial rotary position embedding applied to queries and keys.",
    "offset": "a learned attention bias per head and absolute offset (|dy|, |dx|) between query and key (LeViT, TinyViT).",
    "gpsa": "gated positional self-attention: each head mixes attention by offset with content attention (ConViT).",
}


class PosencModel(nn.Module, PyTorchModelHubMixin, library_name="posenc", pipeline_tag="image-classification",
                  tags=["vision", "position-encoding"], model_card_template=CARD_TEMPLATE):
    """Hub save/load for posenc models: ``config.json`` + ``model.safetensors`` + a generated model card.

    Loading is strict by default: every key and shape must match.
    """

    architecture: ClassVar[str] = ""

    @property
    def position_encoding(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """Names of the position mechanisms this model uses, as declared in :mod:`posenc.mechanisms`; () for none.

        Every config says which it builds (its ``mechanisms`` property), so tables can list them without a model.
        """
        return self.config.mechanisms

    @property
    def headless(self) -> bool:
        """True when the model has no classifier (``num_classes == 0``): ``model(x)`` returns pooled features."""
        return self.config.num_classes == 0

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        return super()._from_pretrained(strict=strict, **kwargs)

    def num_params(self) -> int:
        """Number of learned parameters."""
        return sum(p.numel() for p in self.parameters())

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """A model card naming the position encoding; ``training=`` adds the recipe and measured accuracy."""
        family = self.position_encoding
        card_kwargs = {
            "title": kwargs.pop("title", f"posenc {self.architecture} ({family})"),
            "family": family,
            "description": DESCRIPTIONS.get(family, ""),
            "architecture": self.architecture,
            "params": f"{self.num_params():,}",
            "input_size": "x".join(str(s) for s in self.config.img_size),
            "num_classes": self.config.num_classes,
            "training": kwargs.pop("training", ""),
            "repo_hint": kwargs.pop("repo_hint", "path/or/repo-id"),
        }
        return super().generate_model_card(*args, **card_kwargs, **kwargs)
