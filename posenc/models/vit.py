"""Vision Transformer with pluggable position encoding: ViT, DeiT (distilled), BEiT, sin-cos, none, 2D RoPE.

Module and parameter names follow timm's ``vision_transformer.py`` (``cls_token``, ``pos_embed``,
``dist_token``, ``patch_embed.proj``, ``blocks.i.{norm1,attn,ls1,norm2,mlp,ls2}``, ``norm``, ``fc_norm``,
``head``, ``head_dist``), so timm checkpoints load with a handful of renaming rules.

Token layout: ``[cls][dist] patch_0 ... patch_{h*w-1}``, patches row-major over the (h, w) grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from posenc.attention import Attention, AttentionTrace
from posenc.encodings import Size2, resample_abs_pos_embed, rope_2d_angles, sincos_2d, to_2tuple
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
    LayerScale,
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    init_weights,
    normalise_config,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT; saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the model is built for; other sizes resample
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool | str = field(default=True, metadata={"choices": ("qv",)})  # "qv": BEiT's q and v biases, no k bias
    pos_embed: str = field(default="learned", metadata={"choices": ("learned", "sincos", "none")})  # absolute embedding
    rel_pos_bias: bool = False  # BEiT global relative position bias in every block
    rope: bool = False  # 2D axial RoPE on queries and keys
    rope_base: float = field(default=100.0, metadata={"min": 1.0})
    class_token: bool = True
    no_embed_class: bool = False  # learned embedding covers patches only (timm's no_embed_class)
    distilled: bool = False  # DeiT distillation token and head
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg")})  # cls token or mean of patches
    fc_norm: bool | None = None  # norm after pooling; None: True for avg pooling (timm's rule)
    init_values: float | None = None  # layer scale init; None: no layer scale
    norm_eps: float = field(default=1e-6, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = field(default="posenc_vit", metadata={"choices": ("posenc_vit",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head width (embed_dim / num_heads) divisible by 4, got {self.embed_dim // self.num_heads}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"the 2D sin-cos embedding needs embed_dim divisible by 4, got {self.embed_dim}")
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={h}x{w}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if self.distilled and not self.class_token:
            raise ValueError("a distillation token needs class_token=True")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes={self.num_classes}; they must be equal")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)

    @property
    def position_encoding(self) -> str:
        """The family name: none, learned, sincos, relative or rope."""
        if self.rel_pos_bias:
            return "relative"
        if self.rope:
            return "rope"
        return self.pos_embed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        return config_from_dict(cls, data)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each optionally layer-scaled."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(
            dim,
            config.num_heads,
            qkv_bias=config.qkv_bias,
            rel_pos_window=config.grid if config.rel_pos_bias else None,
            rel_pos_cls=config.class_token,
        )
        self.ls1 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.ls2 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: Tensor, *, rope: Tensor | None, num_prefix: int, grid: Size2, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, AttentionTrace | None]:
        """(B, N, C) -> (B, N, C), plus the attention trace when ``need_weights``."""
        y, trace = self.attn(
            self.norm1(x), rope=rope, num_prefix=num_prefix, grid=grid, need_weights=need_weights, position=position
        )
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, trace


class VisionTransformer(PosencModel):
    """ViT / DeiT / BEiT classifier with the position encoding chosen by :class:`ViTConfig`.

    ``model(x)`` returns logits through the fast attention path; ``model.inspect(x)`` also returns every
    position tensor used. Any image size divisible by the patch works: learned embeddings are resampled
    bicubically, sin-cos and RoPE are recomputed, relative tables are resized.
    """

    architecture = "vit"

    def __init__(self, config: ViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, ViTConfig) else ViTConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.distilled else None
        h, w = config.grid
        if config.pos_embed == "learned":
            rows = h * w + (0 if config.no_embed_class else config.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.randn(1, rows, dim) * 0.02)  # 1, P + h*w, C
        else:
            self.pos_embed = None
        if config.pos_embed == "sincos":
            self.register_buffer("sincos_embed", sincos_2d(config.grid, dim)[None], persistent=False)  # 1, h*w, C
        if config.rope:
            self.register_buffer(
                "rope_angles", rope_2d_angles(config.grid, dim // config.num_heads, config.rope_base), persistent=False
            )  # h*w, hd/2
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        use_fc_norm = config.global_pool == "avg" if config.fc_norm is None else config.fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes)
        self.head_dist = nn.Linear(dim, config.num_classes) if config.distilled else None
        self.apply(init_weights)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)

    @property
    def position_encoding(self) -> str:
        return self.config.position_encoding

    @property
    def mechanisms(self) -> tuple[str, ...]:
        cfg = self.config
        absolute = () if cfg.pos_embed == "none" else (cfg.pos_embed,)
        return absolute + (("rel_table",) if cfg.rel_pos_bias else ()) + (("rope_axial",) if cfg.rope else ())

    def absolute_embedding(self, grid: Size2) -> tuple[Tensor | None, int]:
        """The absolute embedding for a patch grid and its number of prefix rows.

        Returns:
            (1, P + h*w, C) or None, and P (the cls/dist rows it carries).
        """
        cfg = self.config
        if cfg.pos_embed == "sincos":
            if tuple(grid) == cfg.grid:
                return self.sincos_embed, 0
            return sincos_2d(grid, cfg.embed_dim, device=self.patch_embed.proj.weight.device)[None], 0  # 1, h*w, C
        if self.pos_embed is None:
            return None, 0
        prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        return resample_abs_pos_embed(self.pos_embed, grid, cfg.grid, prefix), prefix

    def rope_for(self, grid: Size2) -> Tensor | None:
        """(h*w, head_dim/2) RoPE angles for a grid, or None without RoPE."""
        if not self.config.rope:
            return None
        if tuple(grid) == self.config.grid:
            return self.rope_angles
        head_dim = self.config.embed_dim // self.config.num_heads
        return rope_2d_angles(grid, head_dim, self.config.rope_base, device=self.rope_angles.device)

    def _embed(self, x: Tensor, position: bool = True) -> tuple[Tensor, Size2, Tensor | None, int]:
        """Pixels to tokens with the prefix tokens and the absolute embedding added (left out without ``position``)."""
        x = self.patch_embed(x)  # B, h, w, C
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # B, h*w, C
        pos, pos_prefix = self.absolute_embedding((h, w)) if position else (None, 0)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if pos is not None and pos_prefix == 0:
            x = x + pos
        x = torch.cat(prefix + [x], dim=1)  # B, P + h*w, C
        if pos is not None and pos_prefix:
            x = x + pos
        return x, (h, w), pos, pos_prefix

    def _head(self, x: Tensor) -> Tensor:
        """Final norm, pooling and classifier: (B, N, C) -> (B, num_classes)."""
        x = self.norm(x)
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        if self.config.global_pool == "avg":
            pooled = x[:, self.config.num_prefix_tokens :].mean(dim=1)  # B, C
        else:
            pooled = x[:, 0]  # B, C
        return self.head(self.fc_norm(pooled))

    def _run(
        self, x: Tensor, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, Size2, Tensor | None, int, Tensor | None, list]:
        x, grid, pos, pos_prefix = self._embed(x, position)
        rope = self.rope_for(grid) if position else None
        traces = []
        for block in self.blocks:
            x, trace = block(x, rope=rope, num_prefix=self.config.num_prefix_tokens, grid=grid,
                             need_weights=need_weights, position=position)
            traces.append(trace)
        return self._head(x), grid, pos, pos_prefix, rope, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves every position term out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus the attention and the position tensors of every block (see :class:`Inspection`)."""
        logits, grid, pos, pos_prefix, rope, traces = self._run(x, need_weights=True, position=position)
        blocks = [
            BlockTrace(attn=t.attn, attn_no_pos=t.attn_no_pos, pos_bias=t.pos_bias, mask=None, grid=grid)
            for t in traces
        ]
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=self.config.num_prefix_tokens,
            prefix_names=("cls", "dist")[: self.config.num_prefix_tokens],
            pos_embed=pos,
            pos_embed_prefix=pos_prefix,
            rope_angles=rope,
            blocks=blocks,
        )
