"""CaiT (Class-Attention in Image Transformers): talking-heads self-attention over the patches, then class attention.

Names follow timm's ``cait.py``: ``patch_embed.proj``, ``pos_embed`` (1, h*w, C: patches only, no cls entry),
``cls_token``, ``blocks.i.{norm1,attn,norm2,mlp}`` with ``attn.{qkv,proj,proj_l,proj_w}``,
``blocks_token_only.j.{norm1,attn,norm2,mlp}`` with ``attn.{q,k,v,proj}``, ``norm``, ``head``. timm's layer
scales ``gamma_1``/``gamma_2`` are ``ls1.gamma``/``ls2.gamma`` here (the shared ``declare.TIMM_RULES`` rename them).

* Self-attention blocks (``blocks``) see the patch tokens only. Talking heads: the logits are mixed across heads
  by ``proj_l`` (a Linear over the head axis) before the softmax, and the probabilities by ``proj_w`` after it.
* The cls token enters late: each class-attention block (``blocks_token_only``) updates it alone, its single
  query attending over [cls, patches] (keys and values normed with the patches, which stay unchanged).

Inspection: ``blocks`` lists the ``depth`` self-attention blocks, then the ``depth_token_only`` class-attention
blocks, attention (B, heads, 1, 1 + h*w) with key 0 the cls token. A self-attention block's ``attn`` is its
(B, heads, h*w, h*w) attention distributions: the softmax of the talking logits (after ``proj_l``), each row summing
to 1. The maps applied to the values are ``mix_heads(attn, proj_w)``: mixtures of those rows across heads plus
``proj_w``'s bias on every key, which are no distributions (rows sum to ``sum(W[g]) + N * b[g]`` and may be
negative), so the views and the mean attention distance read the distributions. ``num_prefix_tokens`` is 0: no prefix token takes part in the self-attention blocks. Each trace's
``layout`` says where its tokens sit: a self-attention block's is global over the patch grid without prefix
tokens; a class-attention block's has the cls token as its one query (no patch queries, query grid (0, 0)) and
the cls token then the patch grid as keys.

Position: only the learned absolute embedding, resampled bicubically for other grids (timm's CaiT runs at its
built size only). Without position (``position=False``) the embedding is left out; every map is then the model's
own attention on position-free tokens, so traces carry no separate ``attn_no_pos`` (as for other absolute models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from posenc.encodings import Size2, resample_abs_pos_embed, to_2tuple
from posenc.models.declare import TIMM_RULES, Architecture
from posenc.models.layers import (
    BlockTrace,
    ClassAttention,
    DropPath,
    Inspection,
    LayerScale,
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    global_layout,
    grid_pixels,
    init_weights,
    normalise_config,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class CaiTConfig:
    """Everything that defines a CaiT; saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the model is built for; other sizes resample the embedding
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 768
    depth: int = 12  # talking-heads self-attention blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float = 1e-4  # layer scale init of every block
    depth_token_only: int = field(default=2, metadata={"min": 0})  # class-attention blocks
    mlp_ratio_token_only: float = 4.0
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg")})  # cls | mean of patches
    norm_eps: float = field(default=1e-6, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})  # timm's CaiT: the same rate in every block
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = field(default="posenc_cait", metadata={"choices": ("posenc_cait",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={self.img_size[0]}x{self.img_size[1]}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes={self.num_classes}; they must be equal")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens in the self-attention blocks: none (the cls token joins in the class-attention blocks)."""
        return 0

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The learned absolute embedding (patches only) and the late cls token's class attention."""
        return ("learned", "class_attention") if self.depth_token_only else ("learned",)

    def size_step(self) -> Size2:
        """(h, w) that every input size is a multiple of: the patch."""
        return (self.patch_size, self.patch_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaiTConfig:
        return config_from_dict(cls, data)


def mix_heads(x: Tensor, proj: nn.Linear) -> Tensor:
    """Talking heads: (B, heads, Nq, Nk) maps mixed across the head axis by a Linear(heads -> heads)."""
    return proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # B, heads, Nq, Nk


class TalkingHeadAttention(nn.Module):
    """Self-attention whose heads talk: ``proj_l`` mixes the logits across heads, ``proj_w`` the probabilities."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, N, C) -> (B, N, C), plus the (B, heads, N, N) softmax of the talking logits when ``need_weights``."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # B, heads, N, hd
        logits = mix_heads((q * self.scale) @ k.transpose(-2, -1), self.proj_l)  # B, heads, N, N
        probs = logits.softmax(dim=-1)  # B, heads, N, N
        out = self.proj(rearrange(mix_heads(probs, self.proj_w) @ v, "b h n d -> b n (h d)"))  # B, N, C
        return out, (probs if need_weights else None)


class Block(nn.Module):
    """Layer-scaled pre-norm block over the patches: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: CaiTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = TalkingHeadAttention(dim, config.num_heads, config.qkv_bias)
        self.ls1 = LayerScale(dim, config.init_values)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.ls2 = LayerScale(dim, config.init_values)
        self.drop_path = DropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """(B, N, C) -> (B, N, C), plus the attention distributions when ``need_weights``."""
        y, attn = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class ClassAttentionBlock(nn.Module):
    """Updates the cls token alone: cls + ls1(attn(norm1([cls, x]))), then cls + ls2(mlp(norm2(cls)))."""

    def __init__(self, config: CaiTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = ClassAttention(dim, config.num_heads, config.qkv_bias)
        self.ls1 = LayerScale(dim, config.init_values)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio_token_only))
        self.ls2 = LayerScale(dim, config.init_values)

    def forward(self, x: Tensor, cls: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Patches (B, N, C) and cls (B, 1, C) -> the new cls (B, 1, C), plus its attention when ``need_weights``."""
        y, attn = self.attn(self.norm1(torch.cat([cls, x], dim=1)), need_weights)  # B, 1, C
        cls = cls + self.ls1(y)
        cls = cls + self.ls2(self.mlp(self.norm2(cls)))
        return cls, attn


class CaiT(PosencModel):
    """CaiT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's attention."""

    architecture = "cait"

    def __init__(self, config: CaiTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, CaiTConfig) else CaiTConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        h, w = config.grid
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w, dim))  # 1, h*w, C: no cls entry
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.blocks_token_only = nn.ModuleList(ClassAttentionBlock(config) for _ in range(config.depth_token_only))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_blocks(self) -> int:
        """Self-attention blocks, then class-attention blocks, as :meth:`inspect` lists them."""
        return self.config.depth + self.config.depth_token_only

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of one inspection's maps at ``size`` (float32): (h*w)^2 per self-attention head, 1 + h*w per class one."""
        cfg = self.config
        n = (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size)
        return cfg.num_heads * 4 * (cfg.depth * n * n + cfg.depth_token_only * (1 + n))

    def absolute_embedding(self, grid: Size2) -> Tensor:
        """(1, h*w, C) learned embedding resampled (bicubic, antialiased) to a patch grid."""
        return resample_abs_pos_embed(self.pos_embed, grid, self.config.grid, num_prefix=0)

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, list]:
        x = self.patch_embed(x)  # B, h, w, C
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # B, h*w, C
        pos = self.absolute_embedding((h, w)) if position else None
        if pos is not None:
            x = x + pos
        maps = []
        for block in self.blocks:
            x, attn = block(x, need_weights)
            maps.append(attn)
        cls = self.cls_token.expand(b, -1, -1)  # B, 1, C
        for block in self.blocks_token_only:
            cls, attn = block(x, cls, need_weights)
            maps.append(attn)
        x = self.norm(torch.cat([cls, x], dim=1))  # B, 1 + h*w, C
        pooled = x[:, 1:].mean(dim=1) if self.config.global_pool == "avg" else x[:, 0]  # B, C
        return self.head(pooled), (h, w), pos, maps

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves the embedding out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every block's attention: self-attention blocks, then class-attention blocks (see the module)."""
        logits, grid, pos, maps = self._run(x, need_weights=True, position=position)
        pixels = grid_pixels(grid, self.config.patch_size)  # h*w, 2
        patches = global_layout(grid, pixels)  # talking heads: the patches attend to each other, no prefix token
        # class attention: the cls token is the one query, its keys are the cls token and the patches
        late = global_layout(grid, pixels, ("cls",), query_grid=(0, 0), query_pixels=pixels[:0], query_prefix=("cls",))
        blocks = [
            BlockTrace(attn=attn, attn_no_pos=None, pos_bias=None, mask=None, grid=grid,
                       layout=patches if i < self.config.depth else late)
            for i, attn in enumerate(maps)
        ]  # fmt: skip
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=0,
            prefix_names=(),
            pos_embed=pos,
            pos_embed_prefix=0,
            rope_angles=None,
            blocks=blocks,
        )


# ------------------------------------------------------------------------------------------- timm presets


def _arch(embed_dim: int, depth: int, num_heads: int, init_values: float, img_size: int) -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, init_values=init_values,
                img_size=img_size)


#: timm architecture name (no pretrained tag) -> the CaiTConfig fields its registration fixes (timm 1.0.31).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "cait_xxs24_224": _arch(192, 24, 4, 1e-5, 224),
    "cait_xxs24_384": _arch(192, 24, 4, 1e-5, 384),
    "cait_xxs36_224": _arch(192, 36, 4, 1e-5, 224),
    "cait_xxs36_384": _arch(192, 36, 4, 1e-5, 384),
    "cait_xs24_384": _arch(288, 24, 6, 1e-5, 384),
    "cait_s24_224": _arch(384, 24, 8, 1e-5, 224),
    "cait_s24_384": _arch(384, 24, 8, 1e-5, 384),
    "cait_s36_384": _arch(384, 36, 8, 1e-6, 384),
    "cait_m36_384": _arch(768, 36, 16, 1e-6, 384),
    "cait_m48_448": _arch(768, 48, 16, 1e-6, 448),
}


ARCHITECTURE = Architecture(
    model_type="posenc_cait", config=CaiTConfig, model=CaiT, timm_presets=TIMM_PRESETS,
    timm_rules=TIMM_RULES,  # timm's gamma_1/gamma_2 layer scales are ls1.gamma/ls2.gamma here
)
