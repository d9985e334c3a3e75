"""ConViT: a ViT whose first blocks use gated positional self-attention (GPSA), the rest plain attention.

Names follow timm's ``convit.py``: ``patch_embed.proj``, ``pos_embed`` (1, h*w, C: patches only),
``cls_token``, ``blocks.i.{norm1,attn,norm2,mlp}``, ``norm``, ``head``. A GPSA block's attention has ``qk``,
``v``, ``proj``, ``pos_proj`` (Linear 3 -> heads) and ``gating_param`` (heads); a plain block's has
``qkv`` and ``proj``.

GPSA: each head mixes a content attention ``softmax(q k^T / sqrt(d))`` with a positional attention
``softmax(pos_proj([dx, dy, dx^2 + dy^2]))`` over the offsets ``(dy, dx) = key - query`` between patches,
through its gate ``sigmoid(gating_param)``: ``attn = (1 - g) * content + g * positional``, renormalised.
The cls token joins only after the GPSA blocks (at block ``local_up_to_layer``).

Without position (``position=False``) the absolute embedding is left out and every GPSA head uses its
content attention alone (gate 0). Any grid works: the embedding is resampled bicubically and the offsets
are computed for the grid (timm's ConViT assumes a square one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from posenc.attention import Attention
from posenc.encodings import Size2, gpsa_offsets, resample_abs_pos_embed, to_2tuple
from posenc.models.declare import Architecture
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    drop_path_rates,
    global_layout,
    grid_pixels,
    init_weights,
    normalise_config,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class ConViTConfig:
    """Everything that defines a ConViT; saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the model is built for; other sizes resample
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 48  # channels PER HEAD, as timm's ConViT counts it: the width is embed_dim * num_heads
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    local_up_to_layer: int = 10  # blocks before this index use GPSA; the cls token joins at it
    locality_strength: float = 1.0  # only shapes timm's initialisation; kept so timm model_args map one-to-one
    use_pos_embed: bool = True  # learned absolute embedding on the patch tokens
    global_pool: str = "token"  # "token" (cls) | "avg" (mean of patch tokens)
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_convit"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if not 0 <= self.local_up_to_layer <= self.depth:
            raise ValueError(f"local_up_to_layer={self.local_up_to_layer} must lie in 0..depth={self.depth}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def width(self) -> int:
        """Channels C of the tokens: ``embed_dim * num_heads``."""
        return self.embed_dim * self.num_heads

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The learned absolute embedding (when used) and the gated positional attention of the GPSA blocks."""
        return (("learned",) if self.use_pos_embed else ()) + (("gpsa",) if self.local_up_to_layer else ())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConViTConfig:
        return config_from_dict(cls, data)


class GPSA(nn.Module):
    """Gated positional self-attention over the patch tokens (no prefix tokens)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    def positional_attention(self, grid: Size2) -> Tensor:
        """(heads, N, N) attention each head gives by offset alone, for a patch grid."""
        offsets = gpsa_offsets(grid, device=self.pos_proj.weight.device, dtype=self.pos_proj.weight.dtype)  # N, N, 3
        return self.pos_proj(offsets).permute(2, 0, 1).softmax(dim=-1)  # heads, N, N

    def forward(
        self, x: Tensor, grid: Size2, *, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(B, N, C) -> (B, N, C), plus the mixed, content and positional attention and the gates when asked."""
        b, n, c = x.shape
        q, k = self.qk(x).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # B, heads, N, hd
        v = self.v(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B, heads, N, hd
        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # B, heads, N, N
        if position:
            positional = self.positional_attention(grid)  # heads, N, N
            gate = torch.sigmoid(self.gating_param).view(-1, 1, 1)  # heads, 1, 1
            attn = (1.0 - gate) * content + gate * positional  # B, heads, N, N
            attn = attn / attn.sum(dim=-1, keepdim=True)
        else:
            attn = content
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))  # B, N, C
        if not need_weights:
            return out, None
        trace = {"attn": attn, "attn_no_pos": content}
        if position:
            trace.update(gpsa_gate=gate.flatten(), gpsa_pos_attn=positional)
        return out, trace


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); GPSA or plain attention."""

    def __init__(self, config: ConViTConfig, use_gpsa: bool, drop_path: float) -> None:
        super().__init__()
        dim = config.width
        self.use_gpsa = use_gpsa
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        if use_gpsa:
            self.attn = GPSA(dim, config.num_heads, config.qkv_bias)
        else:
            self.attn = Attention(dim, config.num_heads, qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: Size2, need_weights: bool, position: bool) -> tuple[Tensor, BlockTrace | None]:
        """(B, N, C) -> (B, N, C), plus the block's trace when ``need_weights``."""
        if self.use_gpsa:
            y, parts = self.attn(self.norm1(x), grid, need_weights=need_weights, position=position)
            trace = None
            if parts is not None:
                extra = {k: parts[k] for k in ("gpsa_gate", "gpsa_pos_attn") if k in parts}
                trace = BlockTrace(attn=parts["attn"], attn_no_pos=parts["attn_no_pos"] if position else None,
                                   pos_bias=None, mask=None, grid=grid, position=extra)
        else:
            y, t = self.attn(self.norm1(x), need_weights=need_weights)
            trace = None if t is None else BlockTrace(attn=t.attn, attn_no_pos=None, pos_bias=None, mask=None, grid=grid)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, trace


class ConViT(PosencModel):
    """ConViT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's attention and gates."""

    architecture = "convit"

    def __init__(self, config: ConViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, ConViTConfig) else ConViTConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        h, w = config.grid
        self.pos_embed = nn.Parameter(torch.randn(1, h * w, dim) * 0.02) if config.use_pos_embed else None  # 1, h*w, C
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(Block(config, i < config.local_up_to_layer, rate) for i, rate in enumerate(rates))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def absolute_embedding(self, grid: Size2) -> Tensor | None:
        """(1, h*w, C) learned embedding resampled to a patch grid, or None without one."""
        if self.pos_embed is None:
            return None
        return resample_abs_pos_embed(self.pos_embed, grid, self.config.grid, num_prefix=0)

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, list]:
        x = self.patch_embed(x)  # B, h, w, C
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # B, h*w, C
        pos = self.absolute_embedding((h, w)) if position else None
        if pos is not None:
            x = x + pos
        traces = []
        for i, block in enumerate(self.blocks):
            if i == self.config.local_up_to_layer:
                x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # B, 1 + h*w, C
            x, trace = block(x, (h, w), need_weights, position)
            traces.append(trace)
        x = self.norm(x)
        if self.config.global_pool == "avg":
            pooled = x[:, 1:].mean(dim=1)  # B, C
        else:
            pooled = x[:, 0]  # B, C
        return self.head(pooled), (h, w), pos, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` drops the embedding and every GPSA gate."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every block's attention; GPSA blocks also give their gates and positional attention."""
        logits, grid, pos, traces = self._run(x, need_weights=True, position=position)
        pixels = grid_pixels(grid, self.config.patch_size)  # h*w, 2
        local, late = global_layout(grid, pixels), global_layout(grid, pixels, ("cls",))  # cls joins after the GPSA blocks
        traces = [replace(t, layout=local if i < self.config.local_up_to_layer else late) for i, t in enumerate(traces)]
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=1,
            prefix_names=("cls",),
            pos_embed=pos,
            pos_embed_prefix=0,
            rope_angles=None,
            blocks=traces,
        )


# ------------------------------------------------------------------------------------------- timm presets

#: timm architecture name (no pretrained tag) -> the ConViTConfig fields its registration fixes.
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "convit_tiny": {"embed_dim": 48, "num_heads": 4, "local_up_to_layer": 10, "img_size": 224},
    "convit_small": {"embed_dim": 48, "num_heads": 9, "local_up_to_layer": 10, "img_size": 224},
    "convit_base": {"embed_dim": 48, "num_heads": 16, "local_up_to_layer": 10, "img_size": 224},
}


ARCHITECTURE = Architecture(model_type="posenc_convit", config=ConViTConfig, model=ConViT, timm_presets=TIMM_PRESETS)
