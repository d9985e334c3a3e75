"""SAM's image encoder and ViTDet: a plain ViT with windowed and global blocks and a decomposed relative bias.

Names follow timm's ``vision_transformer_sam.py``: ``patch_embed.proj``, ``pos_embed`` (1, h, w, C),
``blocks.i.{norm1,attn.{qkv,proj,rel_pos_h,rel_pos_w},norm2,mlp.{fc1,fc2}}``, ``neck.{0,1,2,3}``, ``head``.
Tokens stay a (B, h, w, C) map throughout; there are no prefix tokens.

Position enters twice:

* a learned absolute embedding (1, h, w, C) added once, resampled bicubically at other grids;
* in every block a *decomposed* relative bias that depends on the query's content:
  ``bias[q, k] = q . R_h[row(q) - row(k)] + q . R_w[col(q) - col(k)]`` with one table per axis,
  ``rel_pos_h`` (2*size - 1, head_dim) and ``rel_pos_w``. Global blocks learn tables for the whole grid
  and resize them linearly at other grids; windowed blocks learn them for the window.

Windowed blocks zero-pad the grid at the bottom and right to a multiple of the window (after ``norm1``) and do
not mask the padding: queries attend to the padded tokens too, exactly as SAM and ViTDet do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from posenc.encodings import (
    Size2,
    decomposed_rel_pos,
    decomposed_rel_pos_bias,
    decomposed_rel_pos_factors,
    pad_to_window,
    padded_grid,
    resample_abs_pos_embed,
    to_2tuple,
    window_partition,
    window_reverse,
)
from posenc.models.declare import (
    TIMM_RULES,
    Architecture,
    StateDict,
    TransformersType,
    UnsupportedModelError,
    qkv_rule,
)
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
    windowed_layout,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class SamConfig:
    """Everything that defines a SAM image encoder or a ViTDet backbone; saved as ``config.json``."""

    img_size: tuple[int, int] = (1024, 1024)  # (H, W) the global blocks' tables are learned for
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 0  # 0: headless, ``model(x)`` returns the pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True  # learned absolute embedding (1, h, w, C)
    use_rel_pos: bool = True  # decomposed relative bias in every block
    window_size: int = field(default=14, metadata={"min": 0})  # side of the windows; 0: every block is global
    # blocks that attend over the whole grid (block indexes from 0; empty when every block is windowed)
    global_attn_indexes: tuple[int, ...] | tuple[()] = field(default=(2, 5, 8, 11), metadata={"min": 0})
    pretrain_img_size: tuple[int, int] | None = None  # size pos_embed was learned at (ViTDet); None: img_size
    pos_embed_antialias: bool = True  # timm resamples pos_embed with antialiasing, transformers' ViTDet without
    neck: bool = True  # False: no neck at all (ViTDet's backbone ends at its last block)
    neck_chans: int | None = 256  # width of SAM's conv neck; None: a channel LayerNorm instead (timm's rule)
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_sam"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.pretrain_img_size is not None:
            object.__setattr__(self, "pretrain_img_size", to_2tuple(self.pretrain_img_size))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("img_size", "pretrain_img_size"):
            size = getattr(self, name)
            if size is not None and (size[0] % self.patch_size or size[1] % self.patch_size):
                raise ValueError(f"{name} {size} is not a multiple of patch_size {self.patch_size}")
        if self.window_size < 0:
            raise ValueError(f"window_size must be 0 (global attention) or positive, got {self.window_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are not blocks of a depth-{self.depth} model")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def pos_embed_grid(self) -> Size2:
        """(h, w) grid the absolute embedding was learned at."""
        size = self.pretrain_img_size or self.img_size
        return (size[0] // self.patch_size, size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """A learned absolute embedding and the decomposed relative bias, as configured."""
        return (("learned",) if self.use_abs_pos else ()) + (("decomposed",) if self.use_rel_pos else ())

    def block_window(self, index: int) -> int:
        """The window side of block ``index``: 0 for a global block."""
        return 0 if index in self.global_attn_indexes else self.window_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        return config_from_dict(cls, data)


class DecomposedAttention(nn.Module):
    """Self-attention over a (B, h, w, C) map with SAM's decomposed relative bias (timm names).

    Args:
        dim: channels C.
        num_heads: heads.
        qkv_bias: bias on the fused query/key/value projection.
        rel_size: (h, w) the relative tables are learned for, or None for no relative bias.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, rel_size: Size2 | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_size is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size[0] - 1, self.head_dim))  # 2h-1, hd
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size[1] - 1, self.head_dim))  # 2w-1, hd
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def forward(
        self, x: Tensor, *, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Attend within each (h, w) map.

        Args:
            x: (B, h, w, C); windowed blocks pass (B*nW, Wh, Ww, C).
            need_weights: take the readable path and return the attention and the bias factors.
            position: False leaves the relative bias out.

        Returns:
            (B, h, w, C) and, with ``need_weights``, ``attn``, ``attn_no_pos`` (B, heads, N, N) and the bias
            factors ``rel_h`` (B, heads, N, h), ``rel_w`` (B, heads, N, w) with the tables used
            ``rel_pos_h`` (h, h, hd), ``rel_pos_w`` (w, w, hd); None otherwise.
        """
        b, h, w, _ = x.shape
        qkv = self.qkv(x.reshape(b, h * w, -1))  # B, N, 3C
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # B, heads, N, hd
        bias = factors = None
        if position and self.rel_pos_h is not None:
            rel_h = decomposed_rel_pos(h, h, self.rel_pos_h)  # h, h, hd
            rel_w = decomposed_rel_pos(w, w, self.rel_pos_w)  # w, w, hd
            factor_h, factor_w = decomposed_rel_pos_factors(q, rel_h, rel_w, (h, w))  # B, heads, N, h / w
            bias = decomposed_rel_pos_bias(factor_h, factor_w)  # B, heads, N, N
            factors = {"rel_h": factor_h, "rel_w": factor_w, "rel_pos_h": rel_h, "rel_pos_w": rel_w}
        trace = None
        if need_weights:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # B, heads, N, N
            attn = (logits if bias is None else logits + bias).softmax(dim=-1)  # B, heads, N, N
            trace = {"attn": attn, "attn_no_pos": None if bias is None else logits.softmax(dim=-1), **(factors or {})}
            out = attn @ v  # B, heads, N, hd
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B, heads, N, hd
        out = rearrange(out, "b h n d -> b n (h d)")  # B, N, C
        return self.proj(out).reshape(b, h, w, -1), trace  # B, h, w, C


class SamBlock(nn.Module):
    """Pre-norm block; a windowed one pads the map to whole windows, attends per window and crops back."""

    def __init__(self, config: SamConfig, index: int, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.window = config.block_window(index)
        rel_size = (self.window, self.window) if self.window else config.grid
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = DecomposedAttention(
            dim, config.num_heads, qkv_bias=config.qkv_bias, rel_size=rel_size if config.use_rel_pos else None
        )
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, need_weights: bool, position: bool = True) -> tuple[Tensor, BlockTrace | None]:
        """(B, h, w, C) -> (B, h, w, C), plus a trace when ``need_weights``."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window:
            window = (self.window, self.window)
            y = pad_to_window(y, window)  # B, Hp, Wp, C
            hp, wp = y.shape[1:3]
            y = window_partition(y, window).reshape(-1, *window, c)  # B*nW, Wh, Ww, C
        y, trace = self.attn(y, need_weights=need_weights, position=position)  # B*nW or B, Wh or h, Ww or w, C
        if self.window:
            y = window_reverse(y.reshape(b, -1, self.window * self.window, c), window, (hp, wp))  # B, Hp, Wp, C
            y = y[:, :h, :w]  # B, h, w, C
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if trace is None:
            return x, None
        if self.window:  # windows on their own axis: (B, nW, heads, ...), as for Swin
            trace = {k: v.reshape(b, -1, *v.shape[1:]) if v is not None and v.ndim == 4 else v  # B, nW, heads, ...
                     for k, v in trace.items()}
        position_tensors = {k: trace[k] for k in ("rel_h", "rel_w", "rel_pos_h", "rel_pos_w") if k in trace}
        return x, BlockTrace(
            attn=trace["attn"],
            attn_no_pos=trace["attn_no_pos"],
            pos_bias=None,
            mask=None,
            grid=(h, w),
            window=(self.window, self.window) if self.window else None,
            shift=(0, 0) if self.window else None,
            position=position_tensors,
        )


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        return super().forward(x).permute(0, 3, 1, 2)  # B, C, H, W


class SamViT(PosencModel):
    """SAM image encoder / ViTDet backbone; ``model(x)`` gives logits, or the pooled features when headless."""

    architecture = "sam"

    def __init__(self, config: SamConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, SamConfig) else SamConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        if config.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.randn(1, *config.pos_embed_grid, dim) * 0.02)  # 1, h, w, C
        else:
            self.pos_embed = None
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(SamBlock(config, i, rate) for i, rate in enumerate(rates))
        self.num_features = dim
        if not config.neck:
            self.neck = nn.Identity()
        elif config.neck_chans:
            chans = config.neck_chans
            self.neck = nn.Sequential(
                nn.Conv2d(dim, chans, kernel_size=1, bias=False),
                LayerNorm2d(chans, eps=1e-6),
                nn.Conv2d(chans, chans, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(chans, eps=1e-6),
            )
            self.num_features = chans
        else:
            self.neck = LayerNorm2d(dim, eps=1e-6)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else None
        self.apply(init_weights)
        for block in self.blocks:
            for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                if table is not None:
                    nn.init.trunc_normal_(table, std=0.02)

    def absolute_embedding(self, grid: Size2) -> Tensor | None:
        """(1, h, w, C) absolute embedding for a patch grid (resampled bicubically), or None."""
        if self.pos_embed is None:
            return None
        if tuple(grid) == self.config.pos_embed_grid:
            return self.pos_embed
        flat = self.pos_embed.flatten(1, 2)  # 1, h0*w0, C
        flat = resample_abs_pos_embed(flat, grid, self.config.pos_embed_grid, 0,
                                      antialias=self.config.pos_embed_antialias)  # 1, h*w, C
        return flat.reshape(1, *grid, -1)  # 1, h, w, C

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the attention maps one inspection at ``size`` keeps: global blocks over the grid, windowed ones
        over the padded windows (float32, twice with the bias-free copy)."""
        cfg = self.config
        grid = (size[0] // cfg.patch_size, size[1] // cfg.patch_size)
        entries = 0
        for i in range(cfg.depth):
            window = cfg.block_window(i)
            if window:
                hp, wp = padded_grid(grid, (window, window))
                entries += (hp // window) * (wp // window) * window**4  # nW * n * n
            else:
                entries += (grid[0] * grid[1]) ** 2  # N * N
        return entries * cfg.num_heads * 4 * (2 if cfg.use_rel_pos else 1)

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, list]:
        x = self.patch_embed(x)  # B, h, w, C
        grid = tuple(x.shape[1:3])
        pos = self.absolute_embedding(grid) if position else None  # 1, h, w, C
        if pos is not None:
            x = x + pos
        traces = []
        for block in self.blocks:
            x, trace = block(x, need_weights, position)
            traces.append(trace)
        x = self.neck(x.permute(0, 3, 1, 2))  # B, C', h, w
        x = x.mean(dim=(2, 3))  # B, C'
        return (x if self.head is None else self.head(x)), grid, pos, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits, or (B, C') pooled features when headless."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits (or features) plus every block's attention, its bias factors and the absolute embedding as added."""
        logits, grid, pos, traces = self._run(x, need_weights=True, position=position)
        pixels = grid_pixels(grid, self.config.patch_size)  # h*w, 2
        whole = global_layout(grid, pixels)
        blocks = [replace(t, layout=windowed_layout(grid, t.window, pixels) if t.window else whole) for t in traces]
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=0,
            pos_embed=None if pos is None else pos.flatten(1, 2),  # 1, h*w, C
            pos_embed_prefix=0,
            rope_angles=None,
            blocks=blocks,
        )


# ------------------------------------------------------------------------------------------- timm presets

_SAM = dict(patch_size=16, img_size=1024, window_size=14, use_rel_pos=True, num_classes=0)

#: timm architecture name (no pretrained tag) -> the SamConfig fields its registration fixes; the checkpoint's
#: ``model_args`` apply on top (see posenc.convert).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "samvit_base_patch16": {
        **_SAM, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "samvit_large_patch16": {
        **_SAM, "embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "samvit_huge_patch16": {
        **_SAM, "embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "samvit_base_patch16_224": {
        **_SAM, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11), "img_size": 224,
        "use_abs_pos": False, "neck_chans": None, "num_classes": 1000},
}  # fmt: skip


def _vitdet_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SamConfig:
    """ViTDet's backbone: SAM's encoder without a neck, its embedding learned at ``pretrain_image_size``."""
    if config.get("residual_block_indices"):
        raise UnsupportedModelError(
            f"ViTDet with residual conv blocks {config['residual_block_indices']} is not supported; pick one without")
    windowed = set(config.get("window_block_indices") or ())
    depth = config["num_hidden_layers"]
    hidden = config["hidden_size"]
    return SamConfig(
        **{**common, "num_classes": 0, "labels": None, "norm_eps": config.get("layer_norm_eps", 1e-6)},
        embed_dim=hidden,
        depth=depth,
        num_heads=config["num_attention_heads"],
        mlp_ratio=config.get("mlp_ratio", 4),
        use_abs_pos=config.get("use_absolute_position_embeddings", True),
        use_rel_pos=config.get("use_relative_position_embeddings", False),
        window_size=config.get("window_size", 0) if windowed else 0,
        global_attn_indexes=tuple(i for i in range(depth) if i not in windowed),
        pretrain_img_size=config.get("pretrain_image_size", 224),
        pos_embed_antialias=False,
        neck=False,
    )


def _fit_positions(state_dict: StateDict, config: SamConfig) -> StateDict:
    """A flat (1, P + h*w, C) ``pos_embed`` (ViTDet keeps an unused cls row first) as SAM's (1, h, w, C)."""
    out = dict(state_dict)
    pos = state_dict.get("pos_embed")
    h, w = config.pos_embed_grid
    if pos is not None and pos.ndim == 3 and pos.shape[1] >= h * w:
        out["pos_embed"] = pos[:, pos.shape[1] - h * w :].reshape(1, h, w, pos.shape[-1])  # 1, h, w, C
    return out


ARCHITECTURE = Architecture(
    model_type="posenc_sam",
    config=SamConfig,
    model=SamViT,
    timm_presets=TIMM_PRESETS,
    timm_rules=TIMM_RULES,
    transformers={
        "vitdet": TransformersType(
            ("VitDetBackbone", "VitDetModel"),  # headless backbones (the builder sets num_classes = 0)
            _vitdet_from_transformers,
            (
                (r"^embeddings\.projection\.", "patch_embed.proj."),
                (r"^embeddings\.position_embeddings$", "pos_embed"),  # (1, 1 + h*w, C): reshaped by _fit_positions
                (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
                qkv_rule(r"\.attention\.(q|k|v)_proj\.", ".attn."),
                (r"\.attention\.(o_proj|proj)\.", ".attn.proj."),
                (r"\.attention\.", ".attn."),
            ),
        ),
    },
    fit_positions=_fit_positions,
)
