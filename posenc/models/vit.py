"""Vision Transformer with pluggable position encoding: ViT, DeiT (distilled), DeiT III, BEiT, CLIP, SigLIP, DINOv2,
register models, FlexiViT, sin-cos, none, 2D RoPE.

Module and parameter names follow timm's ``vision_transformer.py`` (``cls_token``, ``pos_embed``,
``dist_token``, ``patch_embed.proj``, ``blocks.i.{norm1,attn,ls1,norm2,mlp,ls2}``, ``norm``, ``fc_norm``,
``head``, ``head_dist``, ``reg_token``, ``norm_pre``, ``attn_pool``), so timm checkpoints load with a handful of
renaming rules.

Token layout: ``[cls][dist][reg0 .. reg{R-1}] patch_0 ... patch_{h*w-1}``, patches row-major over the (h, w) grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from posenc.attention import Attention, AttentionTrace
from posenc.encodings import Size2, resample_abs_pos_embed, rope_2d_angles, sincos_2d, to_2tuple
from posenc.models.declare import (
    TIMM_RULES,
    TRANSFORMERS_NEXT_LAYOUT,
    TRANSFORMERS_RULES,
    Architecture,
    StateDict,
    TransformersType,
    UnsupportedModelError,
    encoder_fields,
    fit_relative_tables,
    resample_pos_embed,
)
from posenc.models.layers import (
    ACTIVATIONS,
    BlockTrace,
    DropPath,
    Inspection,
    LayerScale,
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    drop_path_rates,
    global_layout,
    grid_pixels,
    init_weights,
    prefix_labels,
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
    act_layer: str = "gelu"  # MLP activation: "gelu" (exact) | "gelu_tanh" (SigLIP) | "quick_gelu" (OpenAI CLIP)
    qkv_bias: bool | str = field(default=True, metadata={"choices": ("qv",)})  # "qv": BEiT's q and v biases, no k bias
    pos_embed: str = field(default="learned", metadata={"choices": ("learned", "sincos", "none")})  # absolute embedding
    pos_embed_interp: str = "bicubic"  # how a learned embedding is resampled to another grid (F.interpolate mode)
    pos_embed_antialias: bool = True  # antialias when resampling (timm: True; transformers DINOv2/SigLIP: False)
    rel_pos_bias: bool = False  # BEiT global relative position bias in every block
    rope: bool = False  # 2D axial RoPE on queries and keys
    rope_base: float = field(default=100.0, metadata={"min": 1.0})
    class_token: bool = True
    no_embed_class: bool = False  # learned embedding covers patches only (timm's no_embed_class)
    distilled: bool = False  # DeiT distillation token and head
    reg_tokens: int = 0  # register tokens after cls/dist (DINOv2 reg4, timm *_reg4_gap); no position of their own
    pre_norm: bool = False  # CLIP: LayerNorm ``norm_pre`` before the blocks, patch projection without bias
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg", "map", "token_avg")})  # "token" (cls) | "avg" (mean of patches) | "map" (attention pool, SigLIP)
    # | "token_avg" (cls concatenated with the mean of patches: transformers' DINOv2 classifier)
    fc_norm: bool | None = None  # norm after pooling; None: True for avg pooling (timm's rule)
    init_values: float | None = None  # layer scale init; None: no layer scale
    norm_eps: float = field(default=1e-6, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})
    # attention (then MLP) branches per block, summed: timm's ParallelThingsBlock (the 18x2 models: 2); 1: sequential
    parallel: int = field(default=1, metadata={"max": 16})
    # timm's ParallelScalingBlock (ViT-22B style, vit_pwee): attention and MLP side by side from one norm and one fused
    # input projection, summed and layer-scaled once
    parallel_scaling: bool = False
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = field(default="posenc_vit", metadata={"choices": ("posenc_vit",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos' or 'none', got {self.pos_embed!r}")
        if self.global_pool not in ("token", "avg", "map", "token_avg"):
            raise ValueError(f"global_pool must be 'token', 'avg', 'map' or 'token_avg', got {self.global_pool!r}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            raise ValueError(f"global_pool={self.global_pool!r} needs class_token=True; use global_pool='avg'")
        if self.act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {self.act_layer!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={self.img_size[0]}x{self.img_size[1]}")
        if self.num_classes < 0 or self.reg_tokens < 0:
            raise ValueError(f"num_classes={self.num_classes} and reg_tokens={self.reg_tokens} must be >= 0")
        if self.rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head width (embed_dim / num_heads) divisible by 4, got {self.embed_dim // self.num_heads}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"the 2D sin-cos embedding needs embed_dim divisible by 4, got {self.embed_dim}")
        if self.distilled and not self.class_token:
            raise ValueError("a distillation token needs class_token=True")
        if self.parallel > 1 and self.rel_pos_bias:
            raise ValueError("parallel blocks with a relative position bias are not supported; use parallel=1")
        if self.parallel_scaling and (self.parallel > 1 or self.rel_pos_bias or self.rope):
            raise ValueError("parallel_scaling blocks take neither parallel > 1, a relative position bias nor RoPE")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes={self.num_classes}; they must be equal")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Leading tokens that are not patches: cls, dist and registers."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def prefix_names(self) -> tuple[str, ...]:
        """A name per prefix token, in token order: "cls", "dist", "reg0", ..."""
        names = ("cls",) * self.class_token + ("dist",) * self.distilled
        return names + tuple(f"reg{i}" for i in range(self.reg_tokens))

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The position mechanisms (names declared in :mod:`posenc.mechanisms`) this config builds."""
        absolute = () if self.pos_embed == "none" else (self.pos_embed,)
        return absolute + (("rel_table",) if self.rel_pos_bias else ()) + (("rope_axial",) if self.rope else ())

    def size_step(self) -> Size2:
        """(h, w) that every input size is a multiple of: the patch."""
        return (self.patch_size, self.patch_size)

    def fits(self, size: Size2) -> bool:
        """Whether the model takes an (h, w) input: a multiple of the patch."""
        return size[0] % self.patch_size == 0 and size[1] % self.patch_size == 0

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
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.act_layer)
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


class ParallelBlock(nn.Module):
    """timm's ParallelThingsBlock: x + sum_j ls(attn_j(norm_j(x))), then x + sum_j ls(mlp_j(norm_j(x))).

    Branch j's modules are ``attns.j.{norm,attn,ls}`` and ``ffns.j.{norm,mlp,ls}``, timm's names. The trace holds the
    branches' heads side by side: attention (B, parallel*heads, N, N), branch j's heads at j*heads .. (j+1)*heads - 1,
    so every view and measurement reads it as one block with more heads.
    """

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim

        def scale() -> nn.Module:
            return LayerScale(dim, config.init_values) if config.init_values else nn.Identity()

        self.attns = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim, eps=config.norm_eps),
                           "attn": Attention(dim, config.num_heads, qkv_bias=config.qkv_bias), "ls": scale()})
            for _ in range(config.parallel)
        )  # fmt: skip
        self.ffns = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim, eps=config.norm_eps),
                           "mlp": Mlp(dim, int(dim * config.mlp_ratio), config.act_layer), "ls": scale()})
            for _ in range(config.parallel)
        )  # fmt: skip
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def attn(self) -> nn.ModuleList:
        """The attention branches: with :attr:`mlp`, what marks this module as a transformer block (measure's hooks)."""
        return self.attns

    @property
    def mlp(self) -> nn.ModuleList:
        """The MLP branches."""
        return self.ffns

    def forward(
        self, x: Tensor, *, rope: Tensor | None, num_prefix: int, grid: Size2, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, AttentionTrace | None]:
        """(B, N, C) -> (B, N, C), plus the branches' traces joined along the heads when ``need_weights``."""
        outs, traces = [], []
        for branch in self.attns:
            y, trace = branch["attn"](branch["norm"](x), rope=rope, num_prefix=num_prefix, grid=grid,
                                      need_weights=need_weights, position=position)
            outs.append(self.drop_path(branch["ls"](y)))
            traces.append(trace)
        x = x + torch.stack(outs).sum(dim=0)
        x = x + torch.stack([self.drop_path(f["ls"](f["mlp"](f["norm"](x)))) for f in self.ffns]).sum(dim=0)
        if not need_weights:
            return x, None
        no_pos = [t.attn_no_pos for t in traces]
        return x, AttentionTrace(
            attn=torch.cat([t.attn for t in traces], dim=-3),  # B, parallel*heads, N, N
            attn_no_pos=None if None in no_pos else torch.cat(no_pos, dim=-3),  # B, parallel*heads, N, N
            pos_bias=None,  # relative bias tables are refused with parallel blocks (see ViTConfig)
        )


class ParallelScalingBlock(nn.Module):
    """timm's ParallelScalingBlock: x + ls(attn_out_proj(attention) + mlp_out_proj(act(fc1))), one norm, one ``in_proj``.

    ``in_proj`` (C -> hidden + 3C) gives the MLP's first layer and q, k, v at once (the MLP's bias is ``mlp_bias``
    when ``in_proj`` has none). Names are timm's: ``in_norm``, ``in_proj``, ``mlp_bias``, ``attn_out_proj``,
    ``mlp_out_proj``, ``ls``.
    """

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim, self.num_heads = config.embed_dim, config.num_heads
        self.scale = (dim // config.num_heads) ** -0.5
        hidden = int(dim * config.mlp_ratio)
        self.split = [hidden, dim, dim, dim]
        self.in_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=config.qkv_bias is True)
        self.mlp_bias = None if config.qkv_bias is True else nn.Parameter(torch.zeros(hidden))
        self.mlp_act = ACTIVATIONS[config.act_layer]()
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_out_proj = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def attn(self) -> nn.Linear:
        """The attention's output projection: with :attr:`mlp`, what marks this module as a transformer block."""
        return self.attn_out_proj

    @property
    def mlp(self) -> nn.Linear:
        """The MLP's output projection."""
        return self.mlp_out_proj

    def forward(
        self, x: Tensor, *, rope: Tensor | None, num_prefix: int, grid: Size2, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, AttentionTrace | None]:
        """(B, N, C) -> (B, N, C), plus the attention trace when ``need_weights`` (no relative bias or RoPE here)."""
        hidden, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.split, dim=-1)  # B, N, hidden | C | C | C
        if self.mlp_bias is not None:
            hidden = hidden + self.mlp_bias
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.num_heads) for t in (q, k, v))  # B, heads, N, hd
        if need_weights:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, heads, N, N
            out, trace = attn @ v, AttentionTrace(attn=attn, attn_no_pos=None, pos_bias=None)
        else:
            out, trace = F.scaled_dot_product_attention(q, k, v), None  # B, heads, N, hd
        out = self.attn_out_proj(rearrange(out, "b h n d -> b n (h d)")) + self.mlp_out_proj(self.mlp_act(hidden))
        return x + self.drop_path(self.ls(out)), trace


class AttentionPool(nn.Module):
    """Multihead attention pooling (SigLIP's MAP head): one learned query attends over the tokens, then an MLP.

    Names follow timm's ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)  # 1, 1, C
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.act_layer)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, C) pooled."""
        q = rearrange(self.q(self.latent), "1 n (h d) -> 1 h n d", h=self.num_heads)  # 1, heads, 1, hd
        k, v = rearrange(self.kv(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)  # B, heads, N, hd
        out = F.scaled_dot_product_attention(q.expand(x.shape[0], -1, -1, -1), k, v)  # B, heads, 1, hd
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # B, 1, C
        return (out + self.mlp(self.norm(out)))[:, 0]  # B, C


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
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim, bias=not config.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
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
        self.norm_pre = nn.LayerNorm(dim, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        block = ParallelScalingBlock if config.parallel_scaling else ParallelBlock if config.parallel > 1 else Block
        self.blocks = nn.ModuleList(block(config, rate) for rate in rates)
        use_fc_norm = config.global_pool == "avg" if config.fc_norm is None else config.fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn_pool = AttentionPool(config) if config.global_pool == "map" else None
        pooled = 2 * dim if config.global_pool == "token_avg" else dim
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(pooled, config.num_classes) if config.num_classes else nn.Identity()
        self.head_dist = nn.Linear(dim, config.num_classes) if config.distilled and config.num_classes else None
        self.apply(init_weights)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of one inspection's maps at ``size``: a parallel block keeps every branch's heads."""
        return super().trace_bytes(size) * self.config.parallel

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
        pos = resample_abs_pos_embed(
            self.pos_embed, grid, cfg.grid, prefix, cfg.pos_embed_interp, cfg.pos_embed_antialias
        )  # 1, P + h*w, C
        return pos, prefix

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
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        prefix = [t.expand(b, -1, -1) for t in tokens if t is not None]  # B, 1 or R, C each
        if pos is not None and pos_prefix == 0:
            x = x + pos
        x = torch.cat(prefix + [x], dim=1)  # B, P + h*w, C
        if pos is not None and pos_prefix:
            x = x + pos
        return self.norm_pre(x), (h, w), pos, pos_prefix

    def _head(self, x: Tensor) -> Tensor:
        """Final norm, pooling and classifier: (B, N, C) -> (B, num_classes), or pooled (B, C) when headless."""
        x = self.norm(x)
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        if self.config.distilled:  # headless DeiT: both tokens' features, averaged like the logits would be
            return (x[:, 0] + x[:, 1]) / 2
        patches = x[:, self.config.num_prefix_tokens :]  # B, h*w, C
        pool = self.config.global_pool
        if pool == "avg":
            pooled = patches.mean(dim=1)  # B, C
        elif pool == "map":
            pooled = self.attn_pool(patches)  # B, C
        elif pool == "token_avg":
            pooled = torch.cat([x[:, 0], patches.mean(dim=1)], dim=-1)  # B, 2C
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
        """(B, 3, H, W) -> (B, num_classes) logits, or pooled features (B, C) when headless (``num_classes == 0``).

        ``position=False`` leaves every position term out.
        """
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus the attention and the position tensors of every block (see :class:`Inspection`)."""
        logits, grid, pos, pos_prefix, rope, traces = self._run(x, need_weights=True, position=position)
        cfg = self.config
        layout = global_layout(grid, grid_pixels(grid, cfg.patch_size),
                               prefix_labels(cfg.prefix_names, cfg.num_prefix_tokens))
        blocks = [
            BlockTrace(attn=t.attn, attn_no_pos=t.attn_no_pos, pos_bias=t.pos_bias, mask=None, grid=grid, layout=layout)
            for t in traces
        ]
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=self.config.num_prefix_tokens,
            prefix_names=self.config.prefix_names,
            pos_embed=pos,
            pos_embed_prefix=pos_prefix,
            rope_angles=rope,
            blocks=blocks,
        )


# ------------------------------------------------------------------------------------------- timm presets

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_BEIT = dict(qkv_bias="qv", pos_embed="none", rel_pos_bias=True, global_pool="avg")
# The newer kinds of timm's vision_transformer.py / deit.py registrations (img_size: the default tag's input size).
# Left out: SwiGLU (giant DINOv2), differential attention (dwee, dpwee, dlittle), parallel blocks with RMS norm and qk
# norm (*_xp_*), and the two so400m patch-14 models at 384 px, whose size is not a multiple of the patch (timm drops
# the remainder, posenc refuses).
_DEIT3 = dict(no_embed_class=True, init_values=1e-6)  # no cls entry in pos_embed, layer scale
_CLIP = dict(pre_norm=True, norm_eps=1e-5)  # norm_pre, patch projection without bias
_FLEXI = dict(no_embed_class=True)
_DINOV2 = dict(init_values=1e-5)  # headless checkpoints, 518 px
_DINOV2_REG = dict(init_values=1e-5, reg_tokens=4, no_embed_class=True)  # cls position folded into cls_token
_SIGLIP = dict(class_token=False, global_pool="map")  # attention-pool head
_SIGLIP_GAP = dict(class_token=False, global_pool="avg", fc_norm=False)
_GAP = dict(class_token=False, global_pool="avg")  # timm's sbb register models


def _arch(patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int, **fields: Any) -> dict[str, Any]:
    """One preset: patch, width, depth, heads and input side, plus the fields of its kind."""
    size = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, img_size=img_size)
    return {**size, **fields}

#: timm architecture name (no pretrained tag) -> the ViTConfig fields its registration fixes, as in timm's own
#: registry; the ``model_args`` recorded in a checkpoint's config.json apply on top (see posenc.convert).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {**_TINY, "patch_size": 16, "img_size": 224},
    "vit_tiny_patch16_384": {**_TINY, "patch_size": 16, "img_size": 384},
    "vit_small_patch8_224": {**_SMALL, "patch_size": 8, "img_size": 224},
    "vit_small_patch16_224": {**_SMALL, "patch_size": 16, "img_size": 224},
    "vit_small_patch16_384": {**_SMALL, "patch_size": 16, "img_size": 384},
    "vit_small_patch32_224": {**_SMALL, "patch_size": 32, "img_size": 224},
    "vit_small_patch32_384": {**_SMALL, "patch_size": 32, "img_size": 384},
    "vit_base_patch8_224": {**_BASE, "patch_size": 8, "img_size": 224},
    "vit_base_patch16_224": {**_BASE, "patch_size": 16, "img_size": 224},
    "vit_base_patch16_384": {**_BASE, "patch_size": 16, "img_size": 384},
    "vit_base_patch32_224": {**_BASE, "patch_size": 32, "img_size": 224},
    "vit_base_patch32_384": {**_BASE, "patch_size": 32, "img_size": 384},
    "vit_large_patch14_224": {**_LARGE, "patch_size": 14, "img_size": 224},
    "vit_large_patch16_224": {**_LARGE, "patch_size": 16, "img_size": 224},
    "vit_large_patch16_384": {**_LARGE, "patch_size": 16, "img_size": 384},
    "vit_large_patch32_224": {**_LARGE, "patch_size": 32, "img_size": 224},
    "vit_large_patch32_384": {**_LARGE, "patch_size": 32, "img_size": 384},
    # parallel blocks (timm's ParallelThingsBlock): two attention branches summed, then two MLP branches summed
    "vit_small_patch16_18x2_224": _arch(16, 384, 18, 6, 224, init_values=1e-5, parallel=2),
    "vit_base_patch16_18x2_224": _arch(16, 768, 18, 12, 224, init_values=1e-5, parallel=2),
    "deit_tiny_patch16_224": {**_TINY, "patch_size": 16, "img_size": 224},
    "deit_small_patch16_224": {**_SMALL, "patch_size": 16, "img_size": 224},
    "deit_base_patch16_224": {**_BASE, "patch_size": 16, "img_size": 224},
    "deit_base_patch16_384": {**_BASE, "patch_size": 16, "img_size": 384},
    "deit_tiny_distilled_patch16_224": {**_TINY, "patch_size": 16, "img_size": 224, "distilled": True},
    "deit_small_distilled_patch16_224": {**_SMALL, "patch_size": 16, "img_size": 224, "distilled": True},
    "deit_base_distilled_patch16_224": {**_BASE, "patch_size": 16, "img_size": 224, "distilled": True},
    "deit_base_distilled_patch16_384": {**_BASE, "patch_size": 16, "img_size": 384, "distilled": True},
    "beit_base_patch16_224": {**_BASE, **_BEIT, "patch_size": 16, "img_size": 224, "init_values": 0.1},
    "beit_base_patch16_384": {**_BASE, **_BEIT, "patch_size": 16, "img_size": 384, "init_values": 0.1},
    "beit_large_patch16_224": {**_LARGE, **_BEIT, "patch_size": 16, "img_size": 224, "init_values": 1e-5},
    "beit_large_patch16_384": {**_LARGE, **_BEIT, "patch_size": 16, "img_size": 384, "init_values": 1e-5},
    "beit_large_patch16_512": {**_LARGE, **_BEIT, "patch_size": 16, "img_size": 512, "init_values": 1e-5},
    "beitv2_base_patch16_224": {**_BASE, **_BEIT, "patch_size": 16, "img_size": 224, "init_values": 1e-5},
    "beitv2_large_patch16_224": {**_LARGE, **_BEIT, "patch_size": 16, "img_size": 224, "init_values": 1e-5},
    "deit3_small_patch16_224": _arch(16, 384, 12, 6, 224, **_DEIT3),
    "deit3_small_patch16_384": _arch(16, 384, 12, 6, 384, **_DEIT3),
    "deit3_medium_patch16_224": _arch(16, 512, 12, 8, 224, **_DEIT3),
    "deit3_base_patch16_224": _arch(16, 768, 12, 12, 224, **_DEIT3),
    "deit3_base_patch16_384": _arch(16, 768, 12, 12, 384, **_DEIT3),
    "deit3_large_patch16_224": _arch(16, 1024, 24, 16, 224, **_DEIT3),
    "deit3_large_patch16_384": _arch(16, 1024, 24, 16, 384, **_DEIT3),
    "deit3_huge_patch14_224": _arch(14, 1280, 32, 16, 224, **_DEIT3),
    "vit_xsmall_patch16_clip_224": _arch(16, 256, 10, 4, 224, **_CLIP),
    "vit_medium_patch32_clip_224": _arch(32, 512, 12, 8, 224, **_CLIP),
    "vit_medium_patch16_clip_224": _arch(16, 512, 12, 8, 224, **_CLIP),
    "vit_betwixt_patch32_clip_224": _arch(32, 640, 12, 10, 224, **_CLIP),
    "vit_base_patch32_clip_224": _arch(32, 768, 12, 12, 224, **_CLIP),
    "vit_base_patch32_clip_256": _arch(32, 768, 12, 12, 256, **_CLIP),
    "vit_base_patch32_clip_384": _arch(32, 768, 12, 12, 384, **_CLIP),
    "vit_base_patch32_clip_448": _arch(32, 768, 12, 12, 448, **_CLIP),
    "vit_base_patch16_clip_224": _arch(16, 768, 12, 12, 224, **_CLIP),
    "vit_base_patch16_clip_384": _arch(16, 768, 12, 12, 384, **_CLIP),
    "vit_base_patch16_plus_clip_240": _arch(16, 896, 12, 14, 240, **_CLIP),
    "vit_large_patch14_clip_224": _arch(14, 1024, 24, 16, 224, **_CLIP),
    "vit_large_patch14_clip_336": _arch(14, 1024, 24, 16, 336, **_CLIP),
    "vit_huge_patch14_clip_224": _arch(14, 1280, 32, 16, 224, **_CLIP),
    "vit_huge_patch14_clip_336": _arch(14, 1280, 32, 16, 336, **_CLIP),
    "vit_huge_patch14_clip_378": _arch(14, 1280, 32, 16, 378, **_CLIP),
    "vit_giant_patch14_clip_224": _arch(14, 1408, 40, 16, 224, **_CLIP, mlp_ratio=48 / 11),
    "vit_gigantic_patch14_clip_224": _arch(14, 1664, 48, 16, 224, **_CLIP, mlp_ratio=64 / 13),
    "vit_gigantic_patch14_clip_378": _arch(14, 1664, 48, 16, 378, **_CLIP, mlp_ratio=64 / 13),
    "vit_base_patch32_clip_quickgelu_224": _arch(32, 768, 12, 12, 224, **_CLIP, act_layer="quick_gelu"),
    "vit_base_patch16_clip_quickgelu_224": _arch(16, 768, 12, 12, 224, **_CLIP, act_layer="quick_gelu"),
    "vit_large_patch14_clip_quickgelu_224": _arch(14, 1024, 24, 16, 224, **_CLIP, act_layer="quick_gelu"),
    "vit_large_patch14_clip_quickgelu_336": _arch(14, 1024, 24, 16, 336, **_CLIP, act_layer="quick_gelu"),
    "vit_huge_patch14_clip_quickgelu_224": _arch(14, 1280, 32, 16, 224, **_CLIP, act_layer="quick_gelu"),
    "vit_huge_patch14_clip_quickgelu_378": _arch(14, 1280, 32, 16, 378, **_CLIP, act_layer="quick_gelu"),
    "vit_gigantic_patch14_clip_quickgelu_224": _arch(
        14, 1664, 48, 16, 224, **_CLIP, mlp_ratio=64 / 13, act_layer="quick_gelu"
    ),
    "flexivit_small": _arch(16, 384, 12, 6, 240, **_FLEXI),
    "flexivit_base": _arch(16, 768, 12, 12, 240, **_FLEXI),
    "flexivit_large": _arch(16, 1024, 24, 16, 240, **_FLEXI),
    "vit_small_patch14_dinov2": _arch(14, 384, 12, 6, 518, **_DINOV2),
    "vit_base_patch14_dinov2": _arch(14, 768, 12, 12, 518, **_DINOV2),
    "vit_large_patch14_dinov2": _arch(14, 1024, 24, 16, 518, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": _arch(14, 384, 12, 6, 518, **_DINOV2_REG),
    "vit_base_patch14_reg4_dinov2": _arch(14, 768, 12, 12, 518, **_DINOV2_REG),
    "vit_large_patch14_reg4_dinov2": _arch(14, 1024, 24, 16, 518, **_DINOV2_REG),
    "vit_base_patch32_siglip_256": _arch(32, 768, 12, 12, 256, **_SIGLIP, act_layer="gelu_tanh"),
    "vit_base_patch16_siglip_224": _arch(16, 768, 12, 12, 224, **_SIGLIP),
    "vit_base_patch16_siglip_256": _arch(16, 768, 12, 12, 256, **_SIGLIP),
    "vit_base_patch16_siglip_384": _arch(16, 768, 12, 12, 384, **_SIGLIP),
    "vit_base_patch16_siglip_512": _arch(16, 768, 12, 12, 512, **_SIGLIP),
    "vit_large_patch16_siglip_256": _arch(16, 1024, 24, 16, 256, **_SIGLIP),
    "vit_large_patch16_siglip_384": _arch(16, 1024, 24, 16, 384, **_SIGLIP),
    "vit_large_patch16_siglip_512": _arch(16, 1024, 24, 16, 512, **_SIGLIP, act_layer="gelu_tanh"),
    "vit_so400m_patch14_siglip_224": _arch(14, 1152, 27, 16, 224, **_SIGLIP, mlp_ratio=3.7362),
    "vit_so400m_patch14_siglip_378": _arch(14, 1152, 27, 16, 378, **_SIGLIP, mlp_ratio=3.7362),
    "vit_so400m_patch16_siglip_256": _arch(16, 1152, 27, 16, 256, **_SIGLIP, mlp_ratio=3.7362, act_layer="gelu_tanh"),
    "vit_so400m_patch16_siglip_384": _arch(16, 1152, 27, 16, 384, **_SIGLIP, mlp_ratio=3.7362, act_layer="gelu_tanh"),
    "vit_so400m_patch16_siglip_512": _arch(16, 1152, 27, 16, 512, **_SIGLIP, mlp_ratio=3.7362, act_layer="gelu_tanh"),
    "vit_giantopt_patch16_siglip_256": _arch(16, 1536, 40, 16, 256, **_SIGLIP, act_layer="gelu_tanh"),
    "vit_giantopt_patch16_siglip_384": _arch(16, 1536, 40, 16, 384, **_SIGLIP, act_layer="gelu_tanh"),
    "vit_base_patch32_siglip_gap_256": _arch(32, 768, 12, 12, 256, **_SIGLIP_GAP, act_layer="gelu_tanh"),
    "vit_base_patch16_siglip_gap_224": _arch(16, 768, 12, 12, 224, **_SIGLIP_GAP),
    "vit_base_patch16_siglip_gap_256": _arch(16, 768, 12, 12, 256, **_SIGLIP_GAP),
    "vit_base_patch16_siglip_gap_384": _arch(16, 768, 12, 12, 384, **_SIGLIP_GAP),
    "vit_base_patch16_siglip_gap_512": _arch(16, 768, 12, 12, 512, **_SIGLIP_GAP),
    "vit_large_patch16_siglip_gap_256": _arch(16, 1024, 24, 16, 256, **_SIGLIP_GAP),
    "vit_large_patch16_siglip_gap_384": _arch(16, 1024, 24, 16, 384, **_SIGLIP_GAP),
    "vit_large_patch16_siglip_gap_512": _arch(16, 1024, 24, 16, 512, **_SIGLIP_GAP, act_layer="gelu_tanh"),
    "vit_so400m_patch14_siglip_gap_224": _arch(14, 1152, 27, 16, 224, **_SIGLIP_GAP, mlp_ratio=3.7362),
    "vit_so400m_patch14_siglip_gap_378": _arch(14, 1152, 27, 16, 378, **_SIGLIP_GAP, mlp_ratio=3.7362),
    "vit_so400m_patch14_siglip_gap_448": _arch(14, 1152, 27, 16, 448, **_SIGLIP_GAP, mlp_ratio=3.7362),
    "vit_so400m_patch14_siglip_gap_896": _arch(14, 1152, 27, 16, 896, **_SIGLIP_GAP, mlp_ratio=3.7362),
    "vit_so400m_patch16_siglip_gap_256": _arch(
        16, 1152, 27, 16, 256, **_SIGLIP_GAP, mlp_ratio=3.7362, act_layer="gelu_tanh"
    ),
    "vit_so400m_patch16_siglip_gap_384": _arch(
        16, 1152, 27, 16, 384, **_SIGLIP_GAP, mlp_ratio=3.7362, act_layer="gelu_tanh"
    ),
    "vit_so400m_patch16_siglip_gap_512": _arch(
        16, 1152, 27, 16, 512, **_SIGLIP_GAP, mlp_ratio=3.7362, act_layer="gelu_tanh"
    ),
    "vit_giantopt_patch16_siglip_gap_256": _arch(16, 1536, 40, 16, 256, **_SIGLIP_GAP, act_layer="gelu_tanh"),
    "vit_giantopt_patch16_siglip_gap_384": _arch(16, 1536, 40, 16, 384, **_SIGLIP_GAP, act_layer="gelu_tanh"),
    "vit_wee_patch16_reg1_gap_256": _arch(
        16, 256, 14, 4, 256, **_GAP, init_values=1e-05, mlp_ratio=5, no_embed_class=True, reg_tokens=1
    ),
    "vit_little_patch16_reg1_gap_256": _arch(
        16, 320, 14, 5, 256, **_GAP, init_values=1e-05, mlp_ratio=5.6, no_embed_class=True, reg_tokens=1
    ),
    "vit_little_patch16_reg4_gap_256": _arch(
        16, 320, 14, 5, 256, **_GAP, init_values=1e-05, mlp_ratio=5.6, no_embed_class=True, reg_tokens=4
    ),
    "vit_medium_patch16_reg1_gap_256": _arch(
        16, 512, 12, 8, 256, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=1
    ),
    "vit_medium_patch16_reg4_gap_256": _arch(
        16, 512, 12, 8, 256, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=4
    ),
    "vit_mediumd_patch16_reg4_gap_256": _arch(
        16, 512, 20, 8, 256, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=4
    ),
    "vit_mediumd_patch16_reg4_gap_384": _arch(
        16, 512, 20, 8, 384, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=4
    ),
    "vit_pwee_patch16_reg1_gap_256": _arch(
        16, 256, 16, 4, 256, **_GAP, init_values=1e-05, mlp_ratio=5, no_embed_class=True, reg_tokens=1, parallel_scaling=True
    ),
    "vit_betwixt_patch16_reg1_gap_256": _arch(
        16, 640, 12, 10, 256, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=1
    ),
    "vit_betwixt_patch16_reg4_gap_256": _arch(
        16, 640, 12, 10, 256, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=4
    ),
    "vit_betwixt_patch16_reg4_gap_384": _arch(
        16, 640, 12, 10, 384, **_GAP, init_values=1e-05, no_embed_class=True, reg_tokens=4
    ),
    "vit_base_patch16_reg4_gap_256": _arch(16, 768, 12, 12, 256, **_GAP, no_embed_class=True, reg_tokens=4),
    "vit_so150m_patch16_reg4_gap_256": _arch(
        16, 896, 18, 14, 256, **_GAP, mlp_ratio=2.572, reg_tokens=4, fc_norm=False
    ),
    "vit_so150m_patch16_reg4_gap_384": _arch(
        16, 896, 18, 14, 384, **_GAP, mlp_ratio=2.572, reg_tokens=4, fc_norm=False
    ),
    "vit_so150m2_patch16_reg1_gap_256": _arch(
        16, 832, 21, 13, 256, **_GAP, mlp_ratio=34 / 13, init_values=1e-05, qkv_bias=False, reg_tokens=1
    ),
    "vit_so150m2_patch16_reg1_gap_384": _arch(
        16, 832, 21, 13, 384, **_GAP, mlp_ratio=34 / 13, init_values=1e-05, qkv_bias=False, reg_tokens=1
    ),
    "vit_so150m2_patch16_reg1_gap_448": _arch(
        16, 832, 21, 13, 448, **_GAP, mlp_ratio=34 / 13, init_values=1e-05, qkv_bias=False, reg_tokens=1
    ),
}


# ------------------------------------------------------------------------------------------- transformers configs


def _vit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, **encoder_fields(config))


def _deit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, **encoder_fields(config), distilled=True)


def _beit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    scale = config.get("layer_scale_init_value", 0.1)
    return ViTConfig(
        **{**common, "qkv_bias": "qv"},
        **encoder_fields(config),
        pos_embed="learned" if config.get("use_absolute_position_embeddings") else "none",
        rel_pos_bias=bool(config.get("use_relative_position_bias") or config.get("use_shared_relative_position_bias")),
        global_pool="avg" if config.get("use_mean_pooling", True) else "token",
        init_values=scale if scale and scale > 0 else None,
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
        **{**encoder_fields(config), "mlp_ratio": float(config.get("mlp_ratio", 4))},
        init_values=scale,
        reg_tokens=registers,
        no_embed_class=registers > 0,  # the cls position is folded into cls_token (see _fix_transformers_layout)
        global_pool="token_avg" if common["num_classes"] else "token",
        fc_norm=False,
        pos_embed_antialias=registers > 0,
    )


def _ijepa_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """I-JEPA: no cls token, the classifier averages every token after the final norm."""
    return ViTConfig(**common, **encoder_fields(config), class_token=False, global_pool="avg", fc_norm=False,
                     pos_embed_antialias=False)


def _vit_msn_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> ViTConfig:
    """ViT-MSN: a ViT whose classifier reads the cls token."""
    return ViTConfig(**common, **encoder_fields(config), pos_embed_antialias=False)


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
        **encoder_fields({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, **vision}),
        act_layer=acts[act], class_token=False, global_pool="avg", fc_norm=False, pos_embed_antialias=False,
    )  # fmt: skip


def _fix_transformers_layout(state_dict: StateDict, config: ViTConfig) -> StateDict:
    """Bring tensors whose layout differs from timm's to it (shapes only; values and results unchanged).

    * ``pos_embed`` stored as an embedding table (N, C) (SigLIP) becomes (1, N, C).
    * A ``pos_embed`` with a cls row for a model whose registers carry no position (transformers'
      DINOv2 with registers adds the cls position, then inserts the registers): the cls row is folded into
      ``cls_token``, as timm stores it, since the cls row is never resampled.
    """
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is None:
        return out
    if pos.ndim == 2:
        out["pos_embed"] = pos = pos[None]  # 1, N, C
    patches = config.grid[0] * config.grid[1]
    cls = out.get("cls_token")
    if config.no_embed_class and config.class_token and cls is not None and pos.shape[1] == patches + 1:
        out["cls_token"] = cls + pos[:, :1]  # 1, 1, C
        out["pos_embed"] = pos[:, 1:]  # 1, h*w, C
    return out


def _fit_positions(state_dict: StateDict, config: ViTConfig) -> StateDict:
    """BEiT's shared relative table copied into every block, tables resized to the grid, ``pos_embed`` resampled.

    A shared table for a config without relative bias is left in place, so the state-dict check reports it.
    """
    out = dict(state_dict)
    shared = out.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None and config.rel_pos_bias:
        for i in range(config.depth):
            out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    elif shared is not None:
        out["rel_pos_bias.relative_position_bias_table"] = shared
    out = fit_relative_tables(out, lambda key: config.grid, config.class_token)
    return resample_pos_embed(out, config.grid, 0 if config.no_embed_class else config.num_prefix_tokens)


def _use_rel_pos_bias(value: Any, model_args: Any) -> dict[str, Any]:
    """timm BEiT's ``use_rel_pos_bias`` / ``use_shared_rel_pos_bias``: either gives every block a table."""
    return {"rel_pos_bias": bool(model_args.get("use_rel_pos_bias", True) or model_args.get("use_shared_rel_pos_bias"))}


def _hf(architectures: tuple[str, ...], build: Any, rules: Any, headless: tuple[str, ...] = ()) -> TransformersType:
    return TransformersType(architectures, build, rules, headless, fix_layout=_fix_transformers_layout)


_LAYER_SCALE = (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma")

ARCHITECTURE = Architecture(
    model_type="posenc_vit",
    config=ViTConfig,
    model=VisionTransformer,
    timm_presets=TIMM_PRESETS,
    timm_rules=TIMM_RULES,
    timm_args={
        "use_abs_pos_emb": lambda value, model_args: {"pos_embed": "learned" if value else "none"},
        "use_rel_pos_bias": _use_rel_pos_bias,
        "use_shared_rel_pos_bias": _use_rel_pos_bias,
    },
    transformers={
        "vit": _hf(("ViTForImageClassification",), _vit_from_transformers, TRANSFORMERS_RULES),
        "deit": _hf(("DeiTForImageClassificationWithTeacher",), _deit_from_transformers, TRANSFORMERS_RULES),
        "beit": _hf(("BeitForImageClassification",), _beit_from_transformers, TRANSFORMERS_RULES),
        "dinov2": _hf(
            ("Dinov2ForImageClassification", "Dinov2Model"), _dinov2_from_transformers,
            ((r"^dinov2\.", ""), _LAYER_SCALE, *TRANSFORMERS_RULES), headless=("Dinov2Model",),
        ),
        "dinov2_with_registers": _hf(
            ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"), _dinov2_from_transformers,
            ((r"^dinov2_with_registers\.", ""), (r"^embeddings\.register_tokens$", "reg_token"), _LAYER_SCALE,
             *TRANSFORMERS_RULES),
            headless=("Dinov2WithRegistersModel",),
        ),
        "ijepa": _hf(("IJepaForImageClassification",), _ijepa_from_transformers,
                     ((r"^ijepa\.layers\.", "blocks."), (r"^ijepa\.", ""), *TRANSFORMERS_RULES)),
        "vit_msn": _hf(("ViTMSNForImageClassification",), _vit_msn_from_transformers,
                       ((r"^vit\.layers\.", "blocks."), *TRANSFORMERS_RULES)),
        "siglip": _hf(("SiglipForImageClassification",), _siglip_from_transformers, (
            (r"^vision_model\.head\.", "unused_map_head."),  # the classifier averages tokens; its MAP head is unused
            (r"^vision_model\.embeddings\.patch_embedding\.", "patch_embed.proj."),
            (r"^vision_model\.embeddings\.position_embedding\.weight$", "pos_embed"),
            (r"^vision_model\.encoder\.layers\.(\d+)\.", r"blocks.\1."),
            (r"\.layer_norm([12])\.", r".norm\1."),
            (r"^vision_model\.post_layernorm\.", "norm."),
            *TRANSFORMERS_RULES,
        )),
        # BEiT's architecture under another name
        "data2vec-vision": _hf(("Data2VecVisionForImageClassification",), _beit_from_transformers,
                               ((r"^data2vec_vision\.", ""), *TRANSFORMERS_NEXT_LAYOUT, *TRANSFORMERS_RULES)),
    },
    derived=("relative_position_index", "k_bias", "mask_token"),  # BEiT's key bias is zero; mask tokens pre-train
    fit_positions=_fit_positions,
)  # fmt: skip
