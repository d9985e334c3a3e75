"""EVA-style Vision Transformer with rotary position embedding: RoPE-ViT (axial, mixed), EVA-02, timm SBB, DINOv3.

One model class covers timm's ``eva.py`` family, which combines position mechanisms freely:

* a learned absolute embedding (``use_abs_pos_emb``: EVA-02, the RoPE-ViT ``_ape`` models);
* RoPE on queries and keys (``use_rot_pos_emb``) of one of three kinds (``rope_type``):
  ``"cat"`` axial RoPE from fixed frequencies (RoPE-ViT axial with 'xy' grid indexing, EVA-02 and SBB with
  'ij' indexing and a reference grid), ``"mixed"`` learned 2D frequencies per block and head (RoPE-ViT mixed),
  ``"dinov3"`` axial RoPE over patch centres normalised to [-1, 1] (DINOv3);
* prefix tokens: a cls token and register tokens (``num_reg_tokens``), never rotated.

Module and parameter names follow timm's ``eva.py`` (``cls_token``, ``reg_token``, ``pos_embed``, ``rope.freqs``,
``blocks.i.{norm1,attn,gamma_1,norm2,mlp,gamma_2}``, ``norm``, ``fc_norm``, ``head``), so timm checkpoints load
without renaming; separate ``q_proj``/``k_proj``/``v_proj`` (EVA-02 B/L) are fused into ``attn.qkv`` on load.

Token layout: ``[cls][reg_0 ... reg_{R-1}] patch_0 ... patch_{h*w-1}``, patches row-major over the (h, w) grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from posenc.attention import Attention, AttentionTrace
from posenc.encodings import (
    Size2,
    resample_abs_pos_embed,
    rope_2d_angles,
    rope_centered_angles,
    rope_mixed_angles,
    rope_rotation,
    to_2tuple,
)
from posenc.models.declare import (
    Architecture,
    StateDict,
    TransformersType,
    UnsupportedModelError,
    encoder_fields,
    qkv_rule,
    resample_pos_embed,
)
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
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

ROPE_TYPES = ("cat", "mixed", "dinov3")


@dataclass(frozen=True)
class EvaConfig:
    """Everything that defines an EVA-style ViT; field names are timm's ``Eva`` arguments. Saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the model is built for; any multiple of the patch runs
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0  # MLP hidden width = int(embed_dim * mlp_ratio)
    qkv_bias: bool = True
    attn_type: str = "eva"  # "eva": query and value biases, no key bias; "rope": one qkv bias (RoPE-ViT)
    swiglu_mlp: bool = False  # SwiGLU MLP (EVA-02) instead of GELU
    scale_mlp: bool = False  # LayerNorm inside the MLP before fc2 (EVA-02 B/L "sub-LN")
    init_values: float | None = None  # layer scale init (gamma_1, gamma_2); None: no layer scale
    class_token: bool = True
    num_reg_tokens: int = 0  # register tokens after the cls token
    no_embed_class: bool = False  # the absolute embedding covers patches only
    use_abs_pos_emb: bool = True  # learned absolute embedding
    use_rot_pos_emb: bool = False  # RoPE on queries and keys
    rope_type: str = "cat"  # "cat" (axial, fixed) | "mixed" (learned per block and head) | "dinov3"
    rope_grid_indexing: str = "ij"  # "ij": row angles first; "xy": column first (RoPE-ViT)
    rope_temperature: float = 10000.0  # frequency base (period base for dinov3)
    rope_rotate_half: bool = False  # rotate (i, i + hd/2) pairs (DINOv3) instead of interleaved (2i, 2i+1)
    ref_feat_shape: tuple[int, int] | None = None  # EVA-02: positions rescaled so any grid spans this one
    global_pool: str = "avg"  # "avg" (mean of patch tokens) | "token" (cls)
    use_fc_norm: bool | None = None  # norm after pooling; None: True for avg pooling (timm's rule)
    use_post_transformer_norm: bool | None = None  # norm before pooling; None: when there is no fc_norm
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_eva"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.ref_feat_shape is not None:
            object.__setattr__(self, "ref_feat_shape", to_2tuple(self.ref_feat_shape))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.use_rot_pos_emb and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"RoPE needs head_dim = embed_dim / num_heads divisible by 4, got "
                             f"{self.embed_dim // self.num_heads}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.attn_type not in ("eva", "rope"):
            raise ValueError(f"attn_type must be 'eva' or 'rope', got {self.attn_type!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_grid_indexing not in ("ij", "xy"):
            raise ValueError(f"rope_grid_indexing must be 'ij' or 'xy', got {self.rope_grid_indexing!r}")
        if self.rope_type == "mixed" and self.rope_rotate_half:
            raise ValueError("rope_type='mixed' needs rope_rotate_half=False (interleaved pairs), as in timm")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The position mechanisms (names declared in :mod:`posenc.mechanisms`) this config builds."""
        absolute = ("learned",) if self.use_abs_pos_emb else ()
        if not self.use_rot_pos_emb:
            return absolute
        return absolute + ("rope_mixed" if self.rope_type == "mixed" else "rope_axial",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaConfig:
        return config_from_dict(cls, data)


def init_mixed_freqs(head_dim: int, depth: int, num_heads: int, base: float) -> Tensor:
    """Mixed RoPE's initial frequencies: the axial ladder turned by a random angle per block and head.

    Returns:
        (2, depth, heads, head_dim/2): x then y components; pair ``k < hd/4`` points along the random angle,
        pair ``hd/4 + k`` along the perpendicular, both with magnitude ``base ** (-4k / head_dim)``.
    """
    mag = base ** -(torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim)  # hd/4
    theta = torch.rand(depth, num_heads, 1) * 2 * math.pi  # depth, heads, 1
    fx = torch.cat([mag * torch.cos(theta), mag * torch.cos(theta + math.pi / 2)], dim=-1)  # depth, heads, hd/2
    fy = torch.cat([mag * torch.sin(theta), mag * torch.sin(theta + math.pi / 2)], dim=-1)  # depth, heads, hd/2
    return torch.stack([fx, fy])  # 2, depth, heads, hd/2


class MixedRope(nn.Module):
    """Holds mixed RoPE's learned frequencies under timm's name ``rope.freqs``."""

    def __init__(self, config: EvaConfig) -> None:
        super().__init__()
        self.freqs = nn.Parameter(
            init_mixed_freqs(config.head_dim, config.depth, config.num_heads, config.rope_temperature)
        )  # 2, depth, heads, hd/2

    def xy(self, grid_indexing: str) -> Tensor:
        """(2, depth, heads, hd/2) frequencies along the column (x) then the row (y).

        timm multiplies ``freqs[0]`` with the first coordinate of its grid: the column for 'xy', the row for 'ij'.
        """
        return self.freqs if grid_indexing == "xy" else self.freqs.flip(0)


class GeluMlp(nn.Module):
    """fc1, GELU, optional LayerNorm (``scale_mlp``), fc2 (timm ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, norm: bool, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class GluMlp(nn.Module):
    """SwiGLU with one packed input projection (timm ``GluMlp``, EVA-02 T/S): ``silu(a) * b`` for ``[a, b] = fc1(x)``."""

    def __init__(self, dim: int, hidden: int, norm: bool, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)  # ..., hidden each
        return self.fc2(self.norm(self.act(a) * b))


class SwiGLU(nn.Module):
    """SwiGLU with separate gate and value projections and a sub-LN (timm ``SwiGLU``, EVA-02 B/L)."""

    def __init__(self, dim: int, hidden: int, norm: bool, eps: float) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class EvaBlock(nn.Module):
    """Pre-norm block: x + gamma_1 * attn(norm1(x)), then x + gamma_2 * mlp(norm2(x)) (timm ``EvaBlock``)."""

    def __init__(self, config: EvaConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        qkv_bias: bool | str = config.qkv_bias
        if config.qkv_bias and config.attn_type == "eva":
            qkv_bias = "qv"
        self.attn = Attention(dim, config.num_heads, qkv_bias=qkv_bias, rope_interleaved=not config.rope_rotate_half)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * config.mlp_ratio)
        if config.swiglu_mlp:
            mlp = SwiGLU if config.scale_mlp else GluMlp
        else:
            mlp = GeluMlp
        self.mlp = mlp(dim, hidden, config.scale_mlp, eps)
        ls = config.init_values
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(ls))) if ls is not None else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(ls))) if ls is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: Tensor, *, rotation: Tensor | None, num_prefix: int, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, AttentionTrace | None]:
        """(B, N, C) -> (B, N, C), plus the attention trace when ``need_weights``; ``rotation``: RoPE's cos and sin."""
        y, trace = self.attn(self.norm1(x), rotation=rotation, num_prefix=num_prefix, need_weights=need_weights,
                             position=position)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        return x, trace


class Eva(PosencModel):
    """EVA / EVA-02 / RoPE-ViT / DINOv3 classifier (or feature extractor when headless), see :class:`EvaConfig`.

    ``model(x)`` runs the fast path (SDPA, as timm); ``model.inspect(x)`` also returns every attention map and
    position tensor. Any image size divisible by the patch works: the learned embedding is resampled
    bicubically, the RoPE angles are recomputed for the grid.
    """

    architecture = "eva"

    def __init__(self, config: EvaConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, EvaConfig) else EvaConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.num_reg_tokens, dim)) if config.num_reg_tokens else None
        h, w = config.grid
        if config.use_abs_pos_emb:
            rows = h * w + (0 if config.no_embed_class else config.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.randn(1, rows, dim) * 0.02)  # 1, P + h*w, C
        else:
            self.pos_embed = None
        self.rope = MixedRope(config) if config.use_rot_pos_emb and config.rope_type == "mixed" else None
        if config.use_rot_pos_emb and config.rope_type != "mixed":
            angles = self._fixed_rope(config.grid)  # h*w, hd/2
            self.register_buffer("rope_angles", angles, persistent=False)  # h*w, hd/2
            rotation = rope_rotation(angles, interleaved=not config.rope_rotate_half)  # 2, h*w, hd
            self.register_buffer("rope_cos_sin", rotation, persistent=False)  # 2, h*w, hd: timm's sin/cos buffer
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(EvaBlock(config, rate) for rate in rates)
        fc_norm = config.global_pool == "avg" if config.use_fc_norm is None else config.use_fc_norm
        post_norm = not fc_norm if config.use_post_transformer_norm is None else config.use_post_transformer_norm
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if post_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)

    def _fixed_rope(self, grid: Size2, device: torch.device | None = None) -> Tensor:
        """(h*w, head_dim/2) angles of the fixed (axial or DINOv3) RoPE for a grid."""
        cfg = self.config
        if cfg.rope_type == "dinov3":
            return rope_centered_angles(grid, cfg.head_dim, cfg.rope_temperature, indexing=cfg.rope_grid_indexing,
                                        device=device)
        return rope_2d_angles(grid, cfg.head_dim, cfg.rope_temperature, indexing=cfg.rope_grid_indexing,
                              ref_grid=cfg.ref_feat_shape, device=device)

    def rope_for(self, grid: Size2) -> Tensor | None:
        """RoPE angles for a grid: (h*w, hd/2) for fixed RoPE, (depth, heads, h*w, hd/2) for mixed; None without."""
        cfg = self.config
        if not cfg.use_rot_pos_emb:
            return None
        if self.rope is not None:
            return rope_mixed_angles(self.rope.xy(cfg.rope_grid_indexing), grid)  # depth, heads, h*w, hd/2
        if tuple(grid) == cfg.grid:
            return self.rope_angles
        return self._fixed_rope(grid, self.rope_angles.device)

    def _rope_rotation(self, grid: Size2, angles: Tensor | None) -> Tensor | None:
        """RoPE's cos and sin per channel for :meth:`rope_for`'s angles, computed once per forward pass.

        Returns:
            (2, h*w, hd) for fixed RoPE (the buffer at the native grid), (2, depth, heads, h*w, hd) for mixed; or None.
        """
        if angles is None:
            return None
        if self.rope is None and tuple(grid) == self.config.grid:
            return self.rope_cos_sin
        return rope_rotation(angles, interleaved=not self.config.rope_rotate_half)

    def absolute_embedding(self, grid: Size2) -> tuple[Tensor | None, int]:
        """(1, P + h*w, C) learned embedding resampled to a grid (or None), and its number of prefix rows P."""
        if self.pos_embed is None:
            return None, 0
        prefix = 0 if self.config.no_embed_class else self.config.num_prefix_tokens
        return resample_abs_pos_embed(self.pos_embed, grid, self.config.grid, prefix), prefix

    def _embed(self, x: Tensor, position: bool) -> tuple[Tensor, Size2, Tensor | None, int]:
        """Pixels to tokens with the prefix tokens and the absolute embedding added (left out without ``position``)."""
        x = self.patch_embed(x)  # B, h, w, C
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # B, h*w, C
        pos, pos_prefix = self.absolute_embedding((h, w)) if position else (None, 0)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if pos is not None and pos_prefix == 0:
            x = x + pos
        x = torch.cat(prefix + [x], dim=1)  # B, P + h*w, C
        if pos is not None and pos_prefix:
            x = x + pos
        return x, (h, w), pos, pos_prefix

    def _head(self, x: Tensor) -> Tensor:
        """Final norm, pooling, fc_norm and classifier: (B, N, C) -> (B, num_classes), or (B, C) when headless."""
        x = self.norm(x)
        if self.config.global_pool == "avg":
            pooled = x[:, self.config.num_prefix_tokens :].mean(dim=1)  # B, C
        else:
            pooled = x[:, 0]  # B, C
        return self.head(self.fc_norm(pooled))

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, int,
                                                                            Tensor | None, list]:
        x, grid, pos, pos_prefix = self._embed(x, position)
        rope = self.rope_for(grid) if position else None
        rotation = self._rope_rotation(grid, rope)  # 2, h*w, hd or 2, depth, heads, h*w, hd; or None
        mixed = self.rope is not None
        traces = []
        for i, block in enumerate(self.blocks):
            turn = rotation[:, i] if mixed and rotation is not None else rotation  # 2, heads, h*w, hd or 2, h*w, hd
            x, trace = block(x, rotation=turn, num_prefix=self.config.num_prefix_tokens, need_weights=need_weights,
                             position=position)
            traces.append(trace)
        return self._head(x), grid, pos, pos_prefix, rope, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits, or (B, C) pooled features when headless.

        ``position=False`` leaves every position term out (no absolute embedding, no rotation).
        """
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus the attention and the position tensors of every block (see :class:`Inspection`).

        Fixed RoPE goes to ``Inspection.rope_angles`` (h*w, hd/2); mixed RoPE puts each block's angles in
        ``BlockTrace.position["rope_angles"]`` (heads, h*w, hd/2) and the learned frequencies (x then y) in
        ``Inspection.position["rope_freqs"]`` (2, depth, heads, hd/2).
        """
        logits, grid, pos, pos_prefix, rope, traces = self._run(x, need_weights=True, position=position)
        mixed = self.rope is not None and rope is not None
        cfg = self.config
        names = ("cls",) if cfg.class_token else ()
        layout = global_layout(grid, grid_pixels(grid, cfg.patch_size),
                               names + tuple(f"reg{i}" for i in range(cfg.num_reg_tokens)))
        blocks = [
            BlockTrace(attn=t.attn, attn_no_pos=t.attn_no_pos, pos_bias=None, mask=None, grid=grid,
                       position={"rope_angles": rope[i]} if mixed else {}, layout=layout)
            for i, t in enumerate(traces)
        ]
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=cfg.num_prefix_tokens,
            prefix_names=names + tuple(f"reg{i}" for i in range(cfg.num_reg_tokens)),
            pos_embed=pos,
            pos_embed_prefix=pos_prefix,
            rope_angles=None if mixed else rope,
            blocks=blocks,
            position={"rope_freqs": self.rope.xy(cfg.rope_grid_indexing)} if mixed else {},
        )


# ------------------------------------------------------------------------------------------- timm presets

_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)
# Naver RoPE-ViT: rope attention (one qkv bias), layer scale, cls pooling, 'xy' grid
_NAVER = dict(attn_type="rope", qkv_bias=True, init_values=1e-5, global_pool="token", use_abs_pos_emb=False,
              use_rot_pos_emb=True, rope_grid_indexing="xy", patch_size=16, img_size=224)
_AXIAL = dict(_NAVER, rope_temperature=100.0)
_MIXED = dict(_NAVER, rope_temperature=10.0, rope_type="mixed")
_APE = dict(no_embed_class=True, use_abs_pos_emb=True)
# EVA-02: learned absolute plus axial RoPE on a 16x16 reference grid, SwiGLU, mean pooling
_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
_EVA02_BL = dict(_EVA02, scale_mlp=True)  # timm's qkv_fused=False: q/k/v are fused on load
# timm SBB: a register token instead of cls, layer scale, mean pooling, RoPE only
_SBB = dict(patch_size=16, img_size=256, qkv_bias=True, init_values=1e-5, class_token=False, num_reg_tokens=1,
            use_rot_pos_emb=True, use_abs_pos_emb=False, ref_feat_shape=(16, 16))
# DINOv3: cls + 4 registers, centred RoPE, half-rotation layout, post-norm and mean pooling (timm's default)
_DINOV3 = dict(patch_size=16, img_size=256, init_values=1e-5, rope_type="dinov3", rope_temperature=100.0,
               rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4,
               use_fc_norm=False, norm_eps=1e-5)

#: timm architecture name (no pretrained tag) -> the EvaConfig fields its registration fixes; a checkpoint's
#: recorded ``model_args`` apply on top (see posenc.convert).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "vit_small_patch16_rope_224": {**_S, **_AXIAL},
    "vit_base_patch16_rope_224": {**_B, **_AXIAL},
    "vit_large_patch16_rope_224": {**_L, **_AXIAL},
    "vit_small_patch16_rope_mixed_224": {**_S, **_MIXED},
    "vit_base_patch16_rope_mixed_224": {**_B, **_MIXED},
    "vit_large_patch16_rope_mixed_224": {**_L, **_MIXED},
    "vit_small_patch16_rope_ape_224": {**_S, **_AXIAL, **_APE},
    "vit_base_patch16_rope_ape_224": {**_B, **_AXIAL, **_APE},
    "vit_large_patch16_rope_ape_224": {**_L, **_AXIAL, **_APE},
    "vit_small_patch16_rope_mixed_ape_224": {**_S, **_MIXED, **_APE},
    "vit_base_patch16_rope_mixed_ape_224": {**_B, **_MIXED, **_APE},
    "vit_large_patch16_rope_mixed_ape_224": {**_L, **_MIXED, **_APE},
    "eva02_tiny_patch14_224": {**_EVA02, "img_size": 224, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "eva02_small_patch14_224": {**_EVA02, "img_size": 224, **_S},
    "eva02_base_patch14_224": {**_EVA02_BL, "img_size": 224, **_B},
    "eva02_large_patch14_224": {**_EVA02_BL, "img_size": 224, **_L},
    "eva02_tiny_patch14_336": {**_EVA02, "img_size": 336, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "eva02_small_patch14_336": {**_EVA02, "img_size": 336, **_S},
    "eva02_base_patch14_448": {**_EVA02_BL, "img_size": 448, **_B},
    "eva02_large_patch14_448": {**_EVA02_BL, "img_size": 448, **_L},
    "vit_medium_patch16_rope_reg1_gap_256": {**_SBB, "embed_dim": 512, "depth": 12, "num_heads": 8},
    "vit_mediumd_patch16_rope_reg1_gap_256": {**_SBB, "embed_dim": 512, "depth": 20, "num_heads": 8, "qkv_bias": False},
    "vit_base_patch16_rope_reg1_gap_256": {**_SBB, **_B},
    "vit_small_patch16_dinov3": {**_DINOV3, **_S, "qkv_bias": False},
    "vit_small_patch16_dinov3_qkvb": {**_DINOV3, **_S, "qkv_bias": True},
    "vit_base_patch16_dinov3": {**_DINOV3, **_B, "qkv_bias": False},
    "vit_base_patch16_dinov3_qkvb": {**_DINOV3, **_B, "qkv_bias": True},
    "vit_large_patch16_dinov3": {**_DINOV3, **_L, "qkv_bias": False},
    "vit_large_patch16_dinov3_qkvb": {**_DINOV3, **_L, "qkv_bias": True},
}



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
        **encoder_fields(config),
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


def _fit_positions(state_dict: StateDict, config: EvaConfig) -> StateDict:
    """A learned embedding of another grid resampled to the config's (its prefix rows kept apart)."""
    return resample_pos_embed(state_dict, config.grid, 0 if config.no_embed_class else config.num_prefix_tokens)


ARCHITECTURE = Architecture(
    model_type="posenc_eva",
    config=EvaConfig,
    model=Eva,
    timm_presets=TIMM_PRESETS,
    # EVA-02 B/L keep separate q/k/v projections (no key bias): renamed here, fused into qkv on load
    timm_rules=(qkv_rule(r"\.attn\.(q|k|v)_proj\.", ".attn."),),
    transformers={
        "dinov3_vit": TransformersType(
            ("DINOv3ViTModel", "DINOv3ViTBackbone"),  # headless: model(x) is the normed cls token
            _dinov3_from_transformers,
            (
                (r"^embeddings\.cls_token$", "cls_token"),
                (r"^embeddings\.register_tokens$", "reg_token"),
                (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
                (r"^embeddings\.mask_token$", "mask_token"),  # pre-training only: dropped
                (r"^(model\.)?layer\.(\d+)\.", r"blocks.\2."),
                qkv_rule(r"\.attention\.(q|k|v)_proj\.", ".attn."),
                (r"\.attention\.o_proj\.", ".attn.proj."),
                (r"\.layer_scale([12])\.lambda1$", r".gamma_\1"),
                (r"\.mlp\.up_proj\.", ".mlp.fc1."),
                (r"\.mlp\.down_proj\.", ".mlp.fc2."),
            ),
        ),
    },
    derived=("periods", "mask_token", "k_bias"),  # DINOv3's RoPE periods are recomputed from the config
    fit_positions=_fit_positions,
)
