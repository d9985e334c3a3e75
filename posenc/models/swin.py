"""Swin Transformer: hierarchical stages of (shifted) window attention with a relative bias table per block.

Names follow timm's ``swin_transformer.py``: ``patch_embed.{proj,norm}``,
``layers.i.downsample.{norm,reduction}`` (patch merging at the start of stages 1..),
``layers.i.blocks.j.{norm1,attn,norm2,mlp}``, ``norm``, ``head``. Feature maps are (B, H, W, C).

Within a stage, odd blocks cyclically shift the grid by half a window before partitioning, and mask
attention between tokens that were not neighbours before the shift. As in the reference, a stage whose
grid is no larger than the window uses the whole grid as its window and does not shift.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from posenc.attention import Attention
from posenc.encodings import (
    Size2,
    check_window_divides,
    shifted_window_mask,
    to_2tuple,
    window_partition,
    window_reverse,
)
from posenc.models.declare import (
    TIMM_RULES,
    TRANSFORMERS_RULES,
    Architecture,
    StateDict,
    TransformersType,
    UnsupportedModelError,
    fit_relative_tables,
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
    grid_pixels,
    init_weights,
    normalise_config,
    windowed_layout,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class SwinConfig:
    """Everything that defines a Swin model; saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 96  # width of stage 0; doubles at every patch merging
    depths: tuple[int, ...] = field(default=(2, 2, 6, 2), metadata={"min_items": 1})  # blocks per stage
    num_heads: tuple[int, ...] = field(default=(3, 6, 12, 24), metadata={"min_items": 1})
    window_size: tuple[int, int] = (7, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = field(default=1e-5, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = field(default="posenc_swin", metadata={"choices": ("posenc_swin",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        object.__setattr__(self, "window_size", to_2tuple(self.window_size))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths has {len(self.depths)} stages but num_heads has {len(self.num_heads)}; give one head count per stage")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes={self.num_classes}; they must be equal")
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={h}x{w}")
        for stage, (heads, dim) in enumerate(zip(self.num_heads, self.stage_dims)):
            if dim % heads:
                raise ValueError(f"stage {stage}: num_heads[{stage}]={heads} must divide its width {dim}")
        for stage, (grid, window, _) in enumerate(self.stage_geometry()):
            if stage and (grid[0] < 1 or grid[1] < 1 or (grid[0] * 2, grid[1] * 2) != prev):
                raise ValueError(f"stage {stage}: patch merging needs an even grid, got {prev[0]}x{prev[1]}; "
                                 "use an img_size / patch_size divisible by 2 ** (len(depths) - 1)")
            prev = grid
            if grid[0] % window[0] or grid[1] % window[1]:
                raise ValueError(f"stage {stage}: window {window} does not divide the {grid[0]}x{grid[1]} grid")

    @property
    def grid(self) -> Size2:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The position mechanisms this config builds: a learned relative table in every window."""
        return ("rel_table",)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Width of every stage: ``embed_dim`` doubled at each patch merging."""
        return tuple(self.embed_dim * 2**stage for stage in range(len(self.depths)))

    def stage_geometry(self) -> list[tuple[Size2, Size2, Size2]]:
        """Per stage at ``img_size``: its grid, its window, and the shift of its odd blocks."""
        out = []
        h, w = self.grid
        for stage in range(len(self.depths)):
            if stage:
                h, w = h // 2, w // 2
            window = (min(h, self.window_size[0]), min(w, self.window_size[1]))
            shift = tuple(0 if g <= win else win // 2 for g, win in zip((h, w), window))
            out.append(((h, w), window, shift))
        return out

    def size_step(self) -> Size2:
        """(h, w) that every input size is a multiple of: each stage grid must be a multiple of its window."""
        return windowed_size_step(self.patch_size, self.stage_geometry())

    def fits(self, size: Size2) -> bool:
        """Whether the model takes an (h, w) input: a multiple of :meth:`size_step`."""
        step = self.size_step()
        return size[0] % step[0] == 0 and size[1] % step[1] == 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwinConfig:
        return config_from_dict(cls, data)


def windowed_trace_bytes(config: Any, size: Size2) -> int:
    """Bytes of the window attention maps of a hierarchical windowed model at ``size`` (float32, two copies).

    Args:
        config: a Swin or Swin V2 config (``patch_size``, ``depths``, ``num_heads``, ``stage_geometry()``).
    """
    total, (h, w) = 0, (size[0] // config.patch_size, size[1] // config.patch_size)
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        window = config.stage_geometry()[stage][1]
        total += depth * heads * (h >> stage) * (w >> stage) * window[0] * window[1]
    return total * 4 * 2


def windowed_size_step(patch_size: int, geometry: list[tuple[Size2, Size2, Size2]]) -> Size2:
    """(h, w) step of the input sizes a hierarchical windowed model takes: lcm over stages s of ``patch * 2**s * window_s``.

    Args:
        geometry: per stage (grid, window, shift), as ``stage_geometry()`` gives it.
    """
    step_h = step_w = patch_size
    for stage, (_, window, _) in enumerate(geometry):
        step_h = math.lcm(step_h, patch_size * 2**stage * window[0])
        step_w = math.lcm(step_w, patch_size * 2**stage * window[1])
    return (step_h, step_w)


class SwinBlock(nn.Module):
    """Window attention (shifted when ``shift`` is non-zero) and an MLP, both pre-norm residual."""

    def __init__(self, dim: int, heads: int, grid: Size2, window: Size2, shift: Size2, config: SwinConfig, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=config.qkv_bias, rel_pos_window=window)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.grid = grid
        mask = shifted_window_mask(grid, window, shift) if any(shift) else None  # nW, Wh*Ww, Wh*Ww
        self.register_buffer("attn_mask", mask, persistent=False)

    def mask_for(self, grid: Size2, device: torch.device) -> Tensor | None:
        """The shift mask for a grid (the buffer at the built size, computed for others)."""
        if not any(self.shift):
            return None
        if tuple(grid) == self.grid:
            return self.attn_mask
        return shifted_window_mask(grid, self.window, self.shift, device=device)

    def forward(self, x: Tensor, need_weights: bool, position: bool = True) -> tuple[Tensor, BlockTrace | None]:
        """(B, H, W, C) -> (B, H, W, C), plus a trace when ``need_weights``; ``position=False`` drops the bias."""
        b, h, w, c = x.shape
        check_window_divides((h, w), self.window)
        shortcut = x
        x = self.norm1(x)
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = window_partition(x, self.window)  # B, nW, Wh*Ww, C
        mask = self.mask_for((h, w), x.device)  # nW, Wh*Ww, Wh*Ww
        y, trace = self.attn(windows, mask=mask, need_weights=need_weights, position=position)  # B, nW, Wh*Ww, C
        x = window_reverse(y, self.window, (h, w))  # B, H, W, C
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if trace is None:
            return x, None
        return x, BlockTrace(
            attn=trace.attn,
            attn_no_pos=trace.attn_no_pos,
            pos_bias=trace.pos_bias,
            mask=mask,
            grid=(h, w),
            window=self.window,
            shift=self.shift,
        )


class PatchMerging(nn.Module):
    """Halve the grid and double the width: concatenate each 2x2 neighbourhood, norm, project.

    ``norm_after`` (Swin V2) projects first and normalises the 2C result.
    """

    def __init__(self, dim: int, eps: float, *, norm_after: bool = False) -> None:
        super().__init__()
        self.norm_after = norm_after
        self.norm = nn.LayerNorm(2 * dim if norm_after else 4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"patch merging needs an even grid, got {h}x{w}; pick another image size")
        # channel order (dx, dy, c) matches the reference's [x00, x10, x01, x11] concatenation
        x = rearrange(x, "b (h dy) (w dx) c -> b h w (dx dy c)", dy=2, dx=2)  # B, H/2, W/2, 4C
        if self.norm_after:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, stage: int, dim: int, config: SwinConfig, rates: list[float]) -> None:
        super().__init__()
        grid, window, shift = config.stage_geometry()[stage]
        self.downsample = PatchMerging(dim // 2, config.norm_eps) if stage else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, config.num_heads[stage], grid, window, shift if j % 2 else (0, 0), config, rates[j])
            for j in range(config.depths[stage])
        )


class WindowedStages:
    """What Swin and Swin V2 share: sizes and costs from the config's stage geometry, and the run over the stages
    (``patch_embed``, ``layers`` of ``downsample`` + ``blocks``, ``norm``, ``head``)."""

    config: Any
    patch_embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    @property
    def num_blocks(self) -> int:
        return sum(self.config.depths)

    def size_step(self) -> Size2:
        return tuple(self.config.size_step())

    def fits(self, size: Size2) -> bool:
        return self.config.fits(size)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the window attention maps one inspection at ``size`` keeps (with and without the bias)."""
        return windowed_trace_bytes(self.config, size)

    def _check_input(self, x: Tensor) -> None:
        """Raise a ValueError naming the sizes that work for an input the model cannot take (the blocks check too)."""

    def _run(self, x: Tensor, need_weights: bool, position: bool = True) -> tuple[Tensor, Size2, list[BlockTrace]]:
        self._check_input(x)
        x = self.patch_embed(x)  # B, h, w, C
        grid = tuple(x.shape[1:3])
        traces = []
        for stage, layer in enumerate(self.layers):
            x = layer.downsample(x)  # B, H, W, C
            for block in layer.blocks:
                x, trace = block(x, need_weights, position)
                if trace is not None:
                    stride = self.config.patch_size * 2**stage  # patch merging pools 2x2 tokens per stage
                    layout = windowed_layout(trace.grid, trace.window, grid_pixels(trace.grid, stride), trace.shift)
                    traces.append(replace(trace, stage=stage, layout=layout))
        x = self.norm(x).mean(dim=(1, 2))  # B, C
        return self.head(x), grid, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits (pooled features when headless); ``position=False`` drops every bias."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus, per block, the window attention, the relative bias (and what computed it), and the geometry."""
        logits, grid, traces = self._run(x, need_weights=True, position=position)
        return Inspection(
            logits=logits, grid=grid, num_prefix_tokens=0, pos_embed=None, pos_embed_prefix=0, rope_angles=None, blocks=traces
        )


class SwinTransformer(WindowedStages, PosencModel):
    """Swin classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's window attention and bias."""

    architecture = "swin"

    def __init__(self, config: SwinConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, SwinConfig) else SwinConfig.from_dict(config)
        self._hub_mixin_config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, norm=True, eps=config.norm_eps)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        stages, start = [], 0
        for stage, depth in enumerate(config.depths):
            stages.append(SwinStage(stage, config.embed_dim * 2**stage, config, rates[start : start + depth]))
            start += depth
        self.layers = nn.ModuleList(stages)
        self.num_features = config.embed_dim * 2 ** (len(config.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=config.norm_eps)
        self.head = nn.Linear(self.num_features, config.num_classes)
        self.apply(init_weights)



# ------------------------------------------------------------------------------------------- timm presets

#: Widths, depths and heads of the Swin sizes, shared with Swin V2 (timm registers the same ones).
SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
SWIN_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

#: timm architecture name (no pretrained tag) -> the SwinConfig fields its registration fixes; the checkpoint's
#: ``model_args`` apply on top (see posenc.convert).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": {**SWIN_T, "window_size": 7, "img_size": 224},
    "swin_small_patch4_window7_224": {**SWIN_S, "window_size": 7, "img_size": 224},
    "swin_base_patch4_window7_224": {**SWIN_B, "window_size": 7, "img_size": 224},
    "swin_base_patch4_window12_384": {**SWIN_B, "window_size": 12, "img_size": 384},
    "swin_large_patch4_window7_224": {**SWIN_L, "window_size": 7, "img_size": 224},
    "swin_large_patch4_window12_384": {**SWIN_L, "window_size": 12, "img_size": 384},
}



def _swin_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SwinConfig:
    if config.get("use_absolute_embeddings"):
        raise UnsupportedModelError("Swin with absolute position embeddings is not supported")
    return SwinConfig(
        embed_dim=config["embed_dim"],
        depths=tuple(config["depths"]),
        num_heads=tuple(config["num_heads"]),
        window_size=config.get("window_size", 7),
        mlp_ratio=config.get("mlp_ratio", 4.0),
        **{**common, "norm_eps": config.get("layer_norm_eps", 1e-5)},
    )


def _fit_positions(state_dict: StateDict, config: SwinConfig) -> StateDict:
    """Every stage's relative tables resized to that stage's window (which shrinks to a smaller stage grid)."""
    windows = [window for _, window, _ in config.stage_geometry()]

    def window_of(key: str) -> Size2 | None:
        stage = re.match(r"layers\.(\d+)\.", key)
        return windows[int(stage[1])] if stage is not None and int(stage[1]) < len(windows) else None

    return fit_relative_tables(state_dict, window_of, cls_token=False)


ARCHITECTURE = Architecture(
    model_type="posenc_swin",
    config=SwinConfig,
    model=SwinTransformer,
    timm_presets=TIMM_PRESETS,
    timm_rules=TIMM_RULES,
    transformers={
        "swin": TransformersType(("SwinForImageClassification",), _swin_from_transformers, TRANSFORMERS_RULES),
    },
    derived=("relative_position_index", "attn_mask", "mask_token"),
    fit_positions=_fit_positions,
)
