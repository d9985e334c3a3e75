"""NaFlexViT (timm ``naflexvit.py``): a ViT whose learned 2D position table is resampled per image to the patch
grid of that image's own aspect ratio, or factorised into a row table and a column table.

posenc runs it as an image model: ``model(x)`` takes a plain (B, 3, H, W) tensor (H and W any multiples of the
patch), as timm's ``NaFlexVit`` does when given an image instead of patchified sequences with coordinates.

Names follow timm: ``embeds.proj`` (a Linear over flattened patches, each patch flattened as (ph, pw, C)),
``embeds.cls_token``, ``embeds.reg_token``, ``embeds.pos_embed`` (1, H, W, C) or ``embeds.pos_embed_y`` (1, H, C)
and ``embeds.pos_embed_x`` (1, W, C), ``blocks.i.{norm1,attn,ls1,norm2,mlp,ls2}`` (timm's plain ViT block, posenc's
:class:`~posenc.models.vit.Block`), ``norm``, ``attn_pool``, ``fc_norm``, ``head``; timm checkpoints load with no
renaming rule.

Position, for an image whose patch grid is (h, w) (``indexing="ij"``: rows, then columns):

* learned: the (H, W) table is used as stored when (h, w) == (H, W); otherwise ``F.interpolate`` resizes it to
  (h, w) (or, aspect-ratio preserving, to the square (L, L) with L = max(h, w), then keeps its top-left h x w),
  with the config's mode (bicubic; SigLIP-2 and RADIO bilinear), ``antialias`` and ``align_corners``;
* factorized: each 1D table is resized linearly (``align_corners=False``, no antialias) to h rows and w columns
  (or both to L, then cut), and position (i, j) gets ``row[i] + col[j]``.

Prefix tokens (cls, registers) carry no position; they are prepended after the embedding is added.

Token layout: ``[cls][reg0 .. reg{R-1}] patch_0 ... patch_{h*w-1}``, patches row-major over the (h, w) grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posenc.encodings import Size2, to_2tuple
from posenc.models.declare import Architecture
from posenc.models.layers import (
    BlockTrace,
    Inspection,
    PosencModel,
    config_from_dict,
    drop_path_rates,
    global_layout,
    grid_pixels,
    init_weights,
    normalise_config,
    prefix_labels,
)
from posenc.models.vit import AttentionPool, Block, ViTConfig
from posenc.preprocess import Preprocess

_POS_EMBED = ("learned", "factorized", "none")
_INTERP = ("bicubic", "bilinear")
_POOLS = ("avg", "map", "token")


@dataclass(frozen=True)
class NaFlexViTConfig:
    """Everything that defines a NaFlexViT; saved as ``config.json``. Field names are timm's ``NaFlexVitCfg``'s."""

    img_size: tuple[int, int] = (384, 384)  # (H, W) native input; any multiple of the patch runs
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    act_layer: str = field(default="gelu", metadata={"choices": ("gelu", "gelu_tanh")})
    qkv_bias: bool = True
    init_values: float | None = None  # layer scale init; None: no layer scale
    class_token: bool = False
    reg_tokens: int = 0  # register tokens after cls; no position of their own
    pos_embed: str = field(default="learned", metadata={"choices": _POS_EMBED})  # 2D table, row + column tables, none
    pos_embed_grid_size: tuple[int, int] = (16, 16)  # (H, W) of the stored table(s), whatever the input size
    pos_embed_interp_mode: str = field(default="bicubic", metadata={"choices": _INTERP})  # learned table's resize
    pos_embed_ar_preserving: bool = False  # resize to a square of the longer side, then keep the top-left h x w
    pos_embed_antialias: bool = True  # antialias when the learned table shrinks
    pos_embed_align_corners: bool = False  # align_corners of the learned table's resize (RADIO v3: True)
    global_pool: str = field(default="map", metadata={"choices": _POOLS})  # "avg" | "map" (attention pool) | "token"
    fc_norm: bool | None = None  # norm after pooling instead of before; None: True for avg pooling (timm's rule)
    final_norm: bool = True  # a final norm at all (RADIO: none)
    norm_eps: float = field(default=1e-6, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})
    labels: tuple[str, ...] | None = None
    # timm's tags: 384 px, crop_pct 1.0, mean = std = 0.5 (Inception); a checkpoint's pretrained_cfg overrides it
    preprocess: Preprocess = field(
        default_factory=lambda: Preprocess(input_size=(384, 384), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    model_type: str = field(default="posenc_naflexvit", metadata={"choices": ("posenc_naflexvit",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={self.img_size[0]}x{self.img_size[1]}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' or 'map'")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes={self.num_classes}; they must be equal")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Leading tokens that are not patches: cls and registers."""
        return int(self.class_token) + self.reg_tokens

    @property
    def prefix_names(self) -> tuple[str, ...]:
        """A name per prefix token, in token order: "cls", "reg0", ..."""
        return ("cls",) * self.class_token + tuple(f"reg{i}" for i in range(self.reg_tokens))

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The position mechanisms (names declared in :mod:`posenc.mechanisms`) this config builds."""
        if self.pos_embed == "none":
            return ()
        return (self.pos_embed, "aspect_resample")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NaFlexViTConfig:
        return config_from_dict(cls, data)


# ------------------------------------------------------------------------------------------- position (pure)


def resample_table_2d(
    table: Tensor, grid: Size2, *, mode: str, antialias: bool, align_corners: bool, ar_preserving: bool
) -> Tensor:
    """A learned 2D position table as added at a patch grid (timm's NaFlex rule for an image input).

    Args:
        table: (1, H, W, C) stored table.
        grid: (h, w) patch grid of the input.
        mode: ``F.interpolate`` mode ("bicubic" or "bilinear").
        antialias, align_corners: as passed to ``F.interpolate``.
        ar_preserving: resize to (L, L), L = max(h, w), then keep the top-left (h, w).

    Returns:
        (1, h*w, C), row-major; the table itself (reshaped) when (h, w) == (H, W).
    """
    _, th, tw, c = table.shape
    h, w = grid
    if (h, w) == (th, tw):
        return table.reshape(1, th * tw, c)  # 1, h*w, C
    size = (max(h, w), max(h, w)) if ar_preserving else (h, w)
    resized = F.interpolate(
        table.permute(0, 3, 1, 2).float(), size=size, mode=mode, align_corners=align_corners, antialias=antialias
    )  # 1, C, size_h, size_w
    return resized[:, :, :h, :w].flatten(2).transpose(1, 2).to(table.dtype)  # 1, h*w, C


def resample_table_1d(table: Tensor, length: int, keep: int) -> Tensor:
    """One factorised table (rows or columns) resized linearly to ``length`` entries, the first ``keep`` kept.

    Args:
        table: (1, L, C) stored table.

    Returns:
        (1, keep, C).
    """
    if table.shape[1] != length:
        table = F.interpolate(
            table.permute(0, 2, 1).float(), size=length, mode="linear", align_corners=False
        ).permute(0, 2, 1).to(table.dtype)  # 1, length, C
    return table[:, :keep]


def factorized_tables(pos_y: Tensor, pos_x: Tensor, grid: Size2, *, ar_preserving: bool) -> tuple[Tensor, Tensor]:
    """The row and column tables as used at a patch grid.

    Args:
        pos_y: (1, H, C) row table; pos_x: (1, W, C) column table.
        grid: (h, w).
        ar_preserving: resize both to L = max(h, w) entries, then keep h rows and w columns.

    Returns:
        (1, h, C) rows and (1, w, C) columns.
    """
    h, w = grid
    len_y, len_x = (max(h, w), max(h, w)) if ar_preserving else (h, w)
    return resample_table_1d(pos_y, len_y, h), resample_table_1d(pos_x, len_x, w)


def factorized_sum(rows: Tensor, cols: Tensor) -> Tensor:
    """(1, h, C) rows and (1, w, C) columns -> (1, h*w, C) with entry (i, j) = rows[i] + cols[j], row-major."""
    return (rows[:, :, None] + cols[:, None, :]).flatten(1, 2)  # 1, h*w, C


# ------------------------------------------------------------------------------------------- model


class Embeds(nn.Module):
    """timm's ``NaFlexEmbeds`` for image input: flattened patches through a Linear, the tokens and the tables."""

    def __init__(self, config: NaFlexViTConfig) -> None:
        super().__init__()
        dim, p = config.embed_dim, config.patch_size
        self.patch_size = p
        self.proj = nn.Linear(p * p * config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6) if config.class_token else None
        self.reg_token = nn.Parameter(torch.randn(1, config.reg_tokens, dim) * 1e-6) if config.reg_tokens else None
        gh, gw = config.pos_embed_grid_size
        learned, factorized = config.pos_embed == "learned", config.pos_embed == "factorized"
        self.pos_embed = nn.Parameter(torch.randn(1, gh, gw, dim) * 0.02) if learned else None  # 1, H, W, C
        self.pos_embed_y = nn.Parameter(torch.randn(1, gh, dim) * 0.02) if factorized else None  # 1, H, C
        self.pos_embed_x = nn.Parameter(torch.randn(1, gw, dim) * 0.02) if factorized else None  # 1, W, C

    def forward(self, x: Tensor) -> tuple[Tensor, Size2]:
        """(B, C, H, W) -> (B, h*w, D) patch tokens (no position yet) and the grid (h, w)."""
        b, c, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}; "
                             f"resize to a multiple of {p}")
        h, w = height // p, width // p
        x = x.view(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # B, h, w, p, p, C
        return self.proj(x.reshape(b, h * w, p * p * c)), (h, w)  # B, h*w, D


class NaFlexViT(PosencModel):
    """NaFlexViT on plain images: ``model(x)`` gives timm's ``NaFlexVit(x)`` for any size a multiple of the patch.

    ``model.inspect(x)`` also returns the embedding as added (``Inspection.pos_embed``), the same embedding for
    the square grid of the input's longer side (``position["pos_embed_square"]``), and for factorised tables the
    row and column tables as used (``position["pos_embed_rows"]``, ``position["pos_embed_cols"]``).
    """

    architecture = "naflexvit"

    def __init__(self, config: NaFlexViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, NaFlexViTConfig) else NaFlexViTConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        block_config = self.block_config(config)
        self.embeds = Embeds(config)
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(Block(block_config, rate) for rate in rates)
        use_fc_norm = config.global_pool == "avg" if config.fc_norm is None else config.fc_norm
        final = config.final_norm
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if final and not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPool(block_config) if config.global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if final and use_fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)

    @staticmethod
    def block_config(config: NaFlexViTConfig) -> ViTConfig:
        """The ViT config whose blocks and attention pool are NaFlexViT's (timm builds them from the same class)."""
        return ViTConfig(
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim, depth=config.depth,
            num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, act_layer=config.act_layer,
            qkv_bias=config.qkv_bias, init_values=config.init_values, norm_eps=config.norm_eps,
            class_token=config.class_token, global_pool="token" if config.class_token else "avg", num_classes=0,
        )  # fmt: skip

    def position_embedding(self, grid: Size2) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The embedding added at a patch grid, and the tables it came from (for factorised tables).

        Returns:
            (1, h*w, C) or None without position; and ``{"pos_embed_rows": (h, C), "pos_embed_cols": (w, C)}``
            for factorised tables, else ``{}``.
        """
        cfg, e = self.config, self.embeds
        if e.pos_embed is not None:
            return resample_table_2d(
                e.pos_embed, grid, mode=cfg.pos_embed_interp_mode, antialias=cfg.pos_embed_antialias,
                align_corners=cfg.pos_embed_align_corners, ar_preserving=cfg.pos_embed_ar_preserving,
            ), {}  # fmt: skip
        if e.pos_embed_y is not None:
            rows, cols = factorized_tables(e.pos_embed_y, e.pos_embed_x, grid, ar_preserving=cfg.pos_embed_ar_preserving)
            return factorized_sum(rows, cols), {"pos_embed_rows": rows[0], "pos_embed_cols": cols[0]}
        return None, {}

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, dict, list]:
        x, grid = self.embeds(x)  # B, h*w, C
        pos, tables = self.position_embedding(grid) if position else (None, {})
        if pos is not None:
            x = x.add_(pos)  # in place on the projection's own fresh output, as timm adds it (its kernel, add_)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.embeds.cls_token, self.embeds.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)  # B, P + h*w, C
        traces = []
        num_prefix = self.config.num_prefix_tokens
        for block in self.blocks:
            x, trace = block(x, rope=None, num_prefix=num_prefix, grid=grid, need_weights=need_weights)
            traces.append(trace)
        return self._head(x), grid, pos, tables, traces

    def _head(self, x: Tensor) -> Tensor:
        """Final norm, pooling over the patches (or the cls token) and classifier: (B, N, C) -> (B, classes)."""
        x = self.norm(x)
        patches = x[:, self.config.num_prefix_tokens :]  # B, h*w, C
        if self.attn_pool is not None:
            pooled = self.attn_pool(patches)  # B, C
        elif self.config.global_pool == "avg":
            pooled = patches.mean(dim=1)  # B, C
        else:
            pooled = x[:, 0]  # B, C
        return self.head(self.fc_norm(pooled))

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits, or pooled features (B, C) when headless.

        ``position=False`` leaves the position embedding out.
        """
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus the attention of every block and the embedding as added (see :class:`NaFlexViT`)."""
        logits, grid, pos, tables, traces = self._run(x, need_weights=True, position=position)
        extra = dict(tables)
        if pos is not None:
            side = max(grid)
            extra["pos_embed_square"] = self.position_embedding((side, side))[0]  # 1, L*L, C
        cfg = self.config
        layout = global_layout(grid, grid_pixels(grid, cfg.patch_size), prefix_labels(cfg.prefix_names,
                                                                                      cfg.num_prefix_tokens))
        blocks = [BlockTrace(attn=t.attn, attn_no_pos=None, pos_bias=None, mask=None, grid=grid, layout=layout)
                  for t in traces]
        return Inspection(
            logits=logits, grid=grid, num_prefix_tokens=self.config.num_prefix_tokens,
            prefix_names=self.config.prefix_names, pos_embed=pos, pos_embed_prefix=0, rope_angles=None,
            blocks=blocks, position=extra,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

_GAP = dict(init_values=1e-5, global_pool="avg", reg_tokens=4, fc_norm=True)
_SO150M2 = dict(embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5, qkv_bias=False, reg_tokens=1)
_SIGLIP = dict(act_layer="gelu_tanh", global_pool="map", pos_embed_interp_mode="bilinear")
# C-RADIO: a 128x128 table, bilinear, aspect-ratio preserving, no antialias, cls + summary tokens as registers
_RADIO = dict(
    img_size=512, class_token=True, global_pool="token", final_norm=False, pos_embed_grid_size=(128, 128),
    pos_embed_interp_mode="bilinear", pos_embed_ar_preserving=True, pos_embed_antialias=False,
)  # fmt: skip

#: timm architecture name -> the NaFlexViTConfig fields its registration fixes (``img_size``: its tags' input size).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "naflexvit_base_patch16_gap": dict(embed_dim=768, depth=12, num_heads=12, **_GAP),
    "naflexvit_base_patch16_par_gap": dict(embed_dim=768, depth=12, num_heads=12, **_GAP, pos_embed_ar_preserving=True),
    "naflexvit_base_patch16_parfac_gap": dict(
        embed_dim=768, depth=12, num_heads=12, **_GAP, pos_embed_ar_preserving=True, pos_embed="factorized"
    ),
    "naflexvit_base_patch16_map": dict(embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=1),
    "naflexvit_so150m2_patch16_reg1_gap": dict(**_SO150M2, global_pool="avg", fc_norm=True),
    "naflexvit_so150m2_patch16_reg1_map": dict(**_SO150M2, global_pool="map"),
    "naflexvit_base_patch16_siglip": dict(embed_dim=768, depth=12, num_heads=12, **_SIGLIP),
    "naflexvit_so400m_patch16_siglip": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, **_SIGLIP),
    "naflexvit_base_patch16_radio_v3": dict(
        embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=7, pos_embed_align_corners=True, **_RADIO
    ),
    "naflexvit_large_patch16_radio_v3": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=7,
                                             **_RADIO),
    "naflexvit_huge_patch16_radio_v3": dict(embed_dim=1280, depth=32, num_heads=16, reg_tokens=7,
                                            pos_embed_align_corners=True, **_RADIO),
    "naflexvit_giant_patch16_radio_v3": dict(embed_dim=1536, depth=40, num_heads=24, reg_tokens=7, **_RADIO),
    "naflexvit_so400m_patch16_radio_v4": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152,
                                              reg_tokens=9, **_RADIO),
    "naflexvit_huge_patch16_radio_v4": dict(embed_dim=1280, depth=32, num_heads=16, reg_tokens=9, **_RADIO),
}  # fmt: skip

# timm's names are posenc's: no key rule. The stored tables are used as they are at any grid (resampled per image in
# the forward pass, as timm does), so nothing is fitted on load either.
ARCHITECTURE = Architecture(
    model_type="posenc_naflexvit",
    config=NaFlexViTConfig,
    model=NaFlexViT,
    timm_presets=TIMM_PRESETS,
)
