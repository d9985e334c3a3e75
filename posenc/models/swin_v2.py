"""Swin Transformer V2: (shifted) window attention with cosine similarity and a continuous position bias.

Two timm families share this module, told apart by config fields, not by name:

* ``swinv2_*`` (timm ``swin_transformer_v2.py``, transformers ``swinv2``): the bias of a window is a small MLP
  (``cpb_mlp``: Linear(2, 512), ReLU, Linear(512, heads) without bias) evaluated on log-spaced offsets normalised by
  the pretrained window (:func:`~posenc.encodings.cpb_coords`), squashed to ``16 * sigmoid``; patch merging projects,
  then normalises; a final ``norm`` before pooling.
* ``swinv2_cr_*`` (timm ``swin_transformer_v2_cr.py``): the MLP (hidden 384, output bias) reads the natural log of
  the raw offsets and its output is the bias as is; patch merging normalises, then projects; an extra ``norm3`` on
  the main branch ends the last stage (and others, with ``extra_norm_stage`` / ``extra_norm_period``); one fused
  ``qkv`` bias; ``logit_scale`` is (heads,) instead of (heads, 1, 1).

Both: attention logits are ``cos(q, k) * exp(min(logit_scale, log 100))`` per head plus the bias; blocks are
res-post-norm (``x + norm1(attn(x))``). Names follow timm's ``swin_transformer_v2.py`` (``layers.i.blocks.j.attn.
{qkv, q_bias, v_bias, logit_scale, cpb_mlp.0, cpb_mlp.2, proj}``); the converter renames the CR spelling.

The window of each stage is fixed by the config and shrinks to the stage grid when the grid is smaller (as both
references build it); at another input size the coordinate table, the index and the shift mask are recomputed for
the window that size gives, so the MLP's bias is evaluated afresh. Feature maps are (B, H, W, C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from posenc.attention import Attention
from posenc.encodings import (
    Size2,
    check_window_divides,
    cpb_coords,
    gather_relative_bias,
    relative_position_index,
    shifted_window_mask,
    to_2tuple,
    window_partition,
    window_reverse,
)
from posenc.models.declare import (
    TIMM_RULES,
    TRANSFORMERS_NEXT_LAYOUT,
    TRANSFORMERS_RULES,
    Architecture,
    TransformersType,
    UnsupportedModelError,
)
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    drop_path_rates,
    init_weights,
    normalise_config,
)
from posenc.models.swin import SWIN_B, SWIN_L, SWIN_S, SWIN_T, PatchMerging, WindowedStages
from posenc.preprocess import Preprocess

#: Upper clamp of ``logit_scale``: the cosine-attention temperature never exceeds 100.
MAX_LOGIT_SCALE = math.log(100.0)
#: Continuous-position-bias styles: "log2" (Swin V2), "ln" (timm swinv2_cr).
CPB_STYLES = ("log2", "ln")


@dataclass(frozen=True)
class SwinV2Config:
    """Everything that defines a Swin V2 model; saved as ``config.json``."""

    img_size: tuple[int, int] = (256, 256)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 96  # width of stage 0; doubles at every patch merging
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[int, int] = (8, 8)
    # per stage; 0: normalise offsets by the window itself
    pretrained_window_sizes: tuple[int, ...] = field(default=(0, 0, 0, 0), metadata={"min": 0})
    mlp_ratio: float = 4.0
    qkv_bias: bool | str = "qv"  # "qv": query and value biases, no key bias (Swin V2); True: one fused bias (CR)
    # "log2": Swin V2 coordinates and 16*sigmoid; "ln": swinv2_cr, bias used as is
    cpb_style: str = field(default="log2", metadata={"choices": CPB_STYLES})
    cpb_hidden: int = 512  # width of the continuous-position-bias MLP (384 for swinv2_cr)
    merge_norm_after: bool = True  # patch merging projects, then normalises (Swin V2); False: norm first (CR)
    final_norm: bool = True  # a LayerNorm before pooling (Swin V2); False: the last block's norm3 (CR)
    extra_norm_stage: bool = False  # CR: every stage ends with a main-branch norm3
    extra_norm_period: int = 0  # CR: a main-branch norm3 every this many blocks (0: none)
    norm_eps: float = field(default=1e-5, metadata={"max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"max": 0.99})
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = field(default="posenc_swinv2", metadata={"choices": ("posenc_swinv2",)})

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        object.__setattr__(self, "window_size", to_2tuple(self.window_size))
        stages = len(self.depths)
        if len(self.num_heads) != stages:
            raise ValueError(f"{stages} stage depths but {len(self.num_heads)} head counts (num_heads)")
        if not any(self.pretrained_window_sizes):  # timm's and transformers' default (0, 0, 0, 0) for any depth
            object.__setattr__(self, "pretrained_window_sizes", (0,) * stages)
        if len(self.pretrained_window_sizes) != stages:
            raise ValueError(
                f"pretrained_window_sizes {self.pretrained_window_sizes} has {len(self.pretrained_window_sizes)} "
                f"entries for {stages} stages; give one pretrained window per stage (0 for none)"
            )
        if any(w < 0 for w in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes {self.pretrained_window_sizes} must be >= 0")
        if self.cpb_style not in CPB_STYLES:
            raise ValueError(f"cpb_style {self.cpb_style!r} is not one of {CPB_STYLES}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if width % heads:
                raise ValueError(f"stage {stage}: num_heads {heads} does not divide its width {width}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        for stage, (grid, window, _) in enumerate(self.stage_geometry()):
            if grid[0] % window[0] or grid[1] % window[1]:
                raise ValueError(f"stage {stage}: window {window} does not divide the {grid[0]}x{grid[1]} grid")

    @property
    def grid(self) -> Size2:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The position mechanisms this config builds: a continuous position bias in every window."""
        return ("cpb",)

    def stage_geometry(self, grid: Size2 | None = None) -> list[tuple[Size2, Size2, Size2]]:
        """Per stage at the patch ``grid`` (default: at ``img_size``): its grid, its window, the shift of odd blocks."""
        out = []
        h, w = grid or self.grid
        for stage in range(len(self.depths)):
            if stage:
                h, w = h // 2, w // 2
            window = (min(h, self.window_size[0]), min(w, self.window_size[1]))
            shift = tuple(0 if g <= win else win // 2 for g, win in zip((h, w), window))
            out.append(((h, w), window, shift))
        return out

    def size_step(self) -> Size2:
        """(h, w) that every input size is a multiple of: the patch times the halvings of the grid over the stages.

        Not every multiple fits (see :meth:`fits`): windows shrink with a smaller grid, so the sizes a model takes
        are not one lattice.
        """
        step = self.patch_size * 2 ** (len(self.depths) - 1)
        return (step, step)

    def fits(self, size: Size2) -> bool:
        """Whether the model takes an (h, w) input: every stage grid at that size a multiple of its window."""
        step = self.size_step()
        if size[0] % step[0] or size[1] % step[1]:
            return False
        geometry = self.stage_geometry((size[0] // self.patch_size, size[1] // self.patch_size))
        return all(g % win == 0 for grid, window, _ in geometry for g, win in zip(grid, window))

    def check_size(self, size: Size2) -> None:
        """Raise a ValueError naming nearby heights and widths that fit when the model cannot take an (h, w) input."""
        if self.fits(size):
            return
        step = self.size_step()
        near = []
        for axis, side in enumerate(size):
            probe = lambda s: self.fits(tuple(s if a == axis else self.img_size[a] for a in range(2)))  # noqa: E731
            sides = [k * step[axis] for k in range(1, 4 * max(side, self.img_size[axis]) // step[axis] + 2)]
            near.append(sorted(sorted((s for s in sides if probe(s)), key=lambda s: abs(s - side))[:4]))
        raise ValueError(
            f"input size {size[0]}x{size[1]} does not fit this Swin V2: every stage grid must be a multiple of its "
            f"window (windows {self.window_size} shrink to smaller grids); heights that work near {size[0]}: "
            f"{', '.join(map(str, near[0]))}; widths near {size[1]}: {', '.join(map(str, near[1]))}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwinV2Config:
        return config_from_dict(cls, data)


class CpbAttention(Attention):
    """Cosine window attention whose bias a small MLP computes from log-spaced offsets (timm names).

    Args:
        dim, num_heads: channels and heads.
        window: (Wh, Ww) window at the built size.
        pretrained_window: (Ph, Pw) window the offsets are normalised by; (0, 0) for the window itself.
        config: the model config (qkv bias, MLP width, style).
    """

    def __init__(self, dim: int, num_heads: int, window: Size2, pretrained_window: Size2, config: SwinV2Config) -> None:
        super().__init__(dim, num_heads, qkv_bias=config.qkv_bias)
        self.scale = 1.0  # queries carry the per-head temperature instead
        self.window, self.pretrained_window = tuple(window), tuple(pretrained_window)
        self.sigmoid_bias = config.cpb_style == "log2"
        shape = (num_heads, 1, 1) if self.sigmoid_bias else (num_heads,)
        self.logit_scale = nn.Parameter(torch.full(shape, math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, config.cpb_hidden), nn.ReLU(), nn.Linear(config.cpb_hidden, num_heads, bias=not self.sigmoid_bias)
        )
        self.register_buffer("relative_coords_table", self.coords(self.window, self.window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def coords(self, span: Size2, window: Size2) -> Tensor:
        """(2Sh-1, 2Sw-1, 2) MLP inputs for offsets up to ``span``, normalised as for ``window``.

        Swin V2 divides the offsets by the pretrained window when there is one, else by the window in use.
        """
        if not self.sigmoid_bias:
            return cpb_coords(span)
        return cpb_coords(span, normaliser=self.pretrained_window if self.pretrained_window[0] > 0 else window)

    def bias_of(self, coords: Tensor) -> Tensor:
        """The bias the MLP gives for coordinates (..., 2) -> (..., heads); ``16 * sigmoid`` in Swin V2."""
        bias = self.cpb_mlp(coords)
        return 16 * torch.sigmoid(bias) if self.sigmoid_bias else bias

    def temperature(self) -> Tensor:
        """(heads,) ``exp(min(logit_scale, log 100))``: what each head multiplies its cosine similarities by."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(-1)

    def bias_table(self, window: Size2) -> tuple[Tensor, Tensor]:
        """The (2Wh-1)(2Ww-1) x heads bias table for a window and its index (N, N), buffers at the built window."""
        if tuple(window) == self.window:
            coords, index = self.relative_coords_table, self.relative_position_index
        else:
            coords = self.coords(window, window).to(self.logit_scale.device)
            index = relative_position_index(window, device=self.logit_scale.device)
        table = self.bias_of(coords.to(self.logit_scale.dtype)).reshape(-1, self.num_heads)  # R, heads
        return table, index

    def _fast(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor | None, mask: Tensor | None) -> Tensor:
        """timm's ops for cosine attention (it does not use SDPA here): logits, bias, mask, softmax, values.

        Args:
            q: (B, nW, heads, N, hd) unit queries times the temperature; k: unit keys; v: values.
            pos: (heads, N, N) bias or None; mask: (nW, 1, N, N) or None.
        """
        logits = q @ k.transpose(-2, -1)  # B, nW, heads, N, N
        if pos is not None:
            logits = logits + pos
        if mask is not None:
            logits = logits + mask
        return logits.softmax(dim=-1) @ v  # B, nW, heads, N, hd

    def forward(  # type: ignore[override]
        self, x: Tensor, *, window: Size2, mask: Tensor | None = None, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, Any, Tensor | None]:
        """(B, nW, Wh*Ww, C) windows -> the same shape, the trace (inspection path) and the bias table used (or None)."""
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())  # B, nW, N, 3C
        q, k, v = rearrange(qkv, "... n (three h d) -> three ... h n d", three=3, h=self.num_heads)  # B, nW, heads, N, hd
        q = F.normalize(q, dim=-1) * self.temperature()[:, None, None]  # cosine logits times the temperature
        k = F.normalize(k, dim=-1)
        table = pos = None
        if position:
            table, index = self.bias_table(window)  # R, heads; N, N
            pos = gather_relative_bias(table, index)  # heads, N, N
        mask = mask[..., None, :, :] if mask is not None else None  # nW, 1, N, N
        if need_weights:
            out, trace = self._inspect(q, k, v, pos, mask, None)
        else:
            out, trace = self._fast(q, k, v, pos, mask), None  # B, nW, heads, N, hd
        out = rearrange(out, "... h n d -> ... n (h d)")  # B, nW, N, C
        return self.proj(out), trace, table


class SwinV2Block(nn.Module):
    """Res-post-norm block: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``, then an optional ``norm3``."""

    def __init__(
        self, dim: int, heads: int, grid: Size2, window: Size2, shifted: bool, pretrained_window: Size2,
        config: SwinV2Config, drop_path: float, extra_norm: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.grid, self.window_size, self.shifted = tuple(grid), tuple(config.window_size), shifted
        self.attn = CpbAttention(dim, heads, window, pretrained_window, config)
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps) if extra_norm else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        _, shift = self.geometry(self.grid)
        mask = shifted_window_mask(self.grid, window, shift) if any(shift) else None  # nW, Wh*Ww, Wh*Ww
        self.register_buffer("attn_mask", mask, persistent=False)

    def geometry(self, grid: Size2) -> tuple[Size2, Size2]:
        """The window and shift on a grid: the config window, shrunk to a smaller grid (which is then not shifted)."""
        window = (min(grid[0], self.window_size[0]), min(grid[1], self.window_size[1]))
        if not self.shifted:
            return window, (0, 0)
        return window, tuple(0 if g <= win else win // 2 for g, win in zip(grid, window))

    def forward(self, x: Tensor, need_weights: bool, position: bool = True) -> tuple[Tensor, BlockTrace | None]:
        """(B, H, W, C) -> (B, H, W, C), plus a trace when ``need_weights``; ``position=False`` drops the bias."""
        b, h, w, c = x.shape
        window, shift = self.geometry((h, w))
        check_window_divides((h, w), window)
        shifted = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else x
        windows = window_partition(shifted, window)  # B, nW, Wh*Ww, C
        mask = None
        if any(shift):
            same = (h, w) == self.grid and self.attn_mask is not None
            mask = self.attn_mask if same else shifted_window_mask((h, w), window, shift, device=x.device)  # nW, N, N
        y, trace, table = self.attn(windows, window=window, mask=mask, need_weights=need_weights, position=position)
        y = window_reverse(y, window, (h, w))  # B, H, W, C
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2))
        x = x + self.drop_path(self.norm1(y))
        x = self.norm3(x + self.drop_path(self.norm2(self.mlp(x))))
        if trace is None:
            return x, None
        position_tensors = {"cpb_temperature": self.attn.temperature().detach()}
        if table is not None:
            position_tensors.update(self._cpb_tensors(table, window))
        return x, BlockTrace(
            attn=trace.attn, attn_no_pos=trace.attn_no_pos, pos_bias=trace.pos_bias, mask=mask, grid=(h, w),
            window=window, shift=shift, position=position_tensors,
        )  # fmt: skip

    def _cpb_tensors(self, table: Tensor, window: Size2) -> dict[str, Tensor]:
        """The bias table used, its MLP inputs, and the MLP over twice the span (the extrapolation view)."""
        trained = self.attn.window  # the window the checkpoint's block was built (and trained) at
        span = (2 * max(window[0], trained[0]), 2 * max(window[1], trained[1]))
        wide_coords = self.attn.coords(span, window).to(table.device, table.dtype)  # 2Sh-1, 2Sw-1, 2
        return {
            "cpb_table": table.detach().reshape(2 * window[0] - 1, 2 * window[1] - 1, -1),  # 2Wh-1, 2Ww-1, heads
            "cpb_coords": self.attn.coords(window, window),  # 2Wh-1, 2Ww-1, 2
            "cpb_wide": self.attn.bias_of(wide_coords).detach(),  # 2Sh-1, 2Sw-1, heads
            "cpb_trained_window": torch.tensor(trained),
        }


class SwinV2Stage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, stage: int, dim: int, config: SwinV2Config, rates: list[float]) -> None:
        super().__init__()
        grid, window, _ = config.stage_geometry()[stage]
        pretrained = to_2tuple(config.pretrained_window_sizes[stage])
        self.downsample = PatchMerging(dim // 2, config.norm_eps, norm_after=config.merge_norm_after) if stage else nn.Identity()
        depth, last = config.depths[stage], stage == len(config.depths) - 1
        ends = config.extra_norm_stage or (last and not config.final_norm)

        def extra(j: int) -> bool:
            periodic = config.extra_norm_period > 0 and (j + 1) % config.extra_norm_period == 0
            return periodic or (ends and j + 1 == depth)

        self.blocks = nn.ModuleList(
            SwinV2Block(dim, config.num_heads[stage], grid, window, j % 2 == 1, pretrained, config, rates[j], extra(j))
            for j in range(depth)
        )


class SwinTransformerV2(WindowedStages, PosencModel):
    """Swin V2 classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's attention and bias."""

    architecture = "swinv2"

    def __init__(self, config: SwinV2Config | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, SwinV2Config) else SwinV2Config.from_dict(config)
        self._hub_mixin_config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, norm=True, eps=config.norm_eps)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        stages, start = [], 0
        for stage, depth in enumerate(config.depths):
            stages.append(SwinV2Stage(stage, config.embed_dim * 2**stage, config, rates[start : start + depth]))
            start += depth
        self.layers = nn.ModuleList(stages)
        self.num_features = config.embed_dim * 2 ** (len(config.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=config.norm_eps) if config.final_norm else nn.Identity()
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)

    def _check_input(self, x: Tensor) -> None:
        self.patch_embed.grid(tuple(x.shape[-2:]))  # a size the patch does not divide: its own message
        self.config.check_size(tuple(x.shape[-2:]))


# ------------------------------------------------------------------------------------------- timm presets

_FT = dict(pretrained_window_sizes=(12, 12, 12, 6))  # fine-tuned from window 12 at 192 px
# swinv2_cr: natural-log offsets, bias as is, norm-first merging, norm3 ends the last stage; window = grid / 8
_CR = dict(qkv_bias=True, cpb_style="ln", cpb_hidden=384, merge_norm_after=False, final_norm=False)
_CR_NS = dict(_CR, extra_norm_stage=True)
_CR_H = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6)
_CR_G = dict(embed_dim=512, depths=(2, 2, 42, 2), num_heads=(16, 32, 64, 128), extra_norm_period=6)

#: timm architecture name (no pretrained tag) -> the SwinV2Config fields its registration fixes; the checkpoint's
#: ``model_args`` apply on top (see posenc.convert).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "swinv2_tiny_window8_256": {**SWIN_T, "window_size": 8, "img_size": 256},
    "swinv2_tiny_window16_256": {**SWIN_T, "window_size": 16, "img_size": 256},
    "swinv2_small_window8_256": {**SWIN_S, "window_size": 8, "img_size": 256},
    "swinv2_small_window16_256": {**SWIN_S, "window_size": 16, "img_size": 256},
    "swinv2_base_window8_256": {**SWIN_B, "window_size": 8, "img_size": 256},
    "swinv2_base_window16_256": {**SWIN_B, "window_size": 16, "img_size": 256},
    "swinv2_base_window12_192": {**SWIN_B, "window_size": 12, "img_size": 192},
    "swinv2_base_window12to16_192to256": {**SWIN_B, **_FT, "window_size": 16, "img_size": 256},
    "swinv2_base_window12to24_192to384": {**SWIN_B, **_FT, "window_size": 24, "img_size": 384},
    "swinv2_large_window12_192": {**SWIN_L, "window_size": 12, "img_size": 192},
    "swinv2_large_window12to16_192to256": {**SWIN_L, **_FT, "window_size": 16, "img_size": 256},
    "swinv2_large_window12to24_192to384": {**SWIN_L, **_FT, "window_size": 24, "img_size": 384},
    "swinv2_cr_tiny_224": {**_CR, **SWIN_T, "window_size": 7, "img_size": 224},
    "swinv2_cr_tiny_384": {**_CR, **SWIN_T, "window_size": 12, "img_size": 384},
    "swinv2_cr_tiny_ns_224": {**_CR_NS, **SWIN_T, "window_size": 7, "img_size": 224},
    "swinv2_cr_small_224": {**_CR, **SWIN_S, "window_size": 7, "img_size": 224},
    "swinv2_cr_small_384": {**_CR, **SWIN_S, "window_size": 12, "img_size": 384},
    "swinv2_cr_small_ns_224": {**_CR_NS, **SWIN_S, "window_size": 7, "img_size": 224},
    "swinv2_cr_small_ns_256": {**_CR_NS, **SWIN_S, "window_size": 8, "img_size": 256},
    "swinv2_cr_base_224": {**_CR, **SWIN_B, "window_size": 7, "img_size": 224},
    "swinv2_cr_base_384": {**_CR, **SWIN_B, "window_size": 12, "img_size": 384},
    "swinv2_cr_base_ns_224": {**_CR_NS, **SWIN_B, "window_size": 7, "img_size": 224},
    "swinv2_cr_large_224": {**_CR, **SWIN_L, "window_size": 7, "img_size": 224},
    "swinv2_cr_large_384": {**_CR, **SWIN_L, "window_size": 12, "img_size": 384},
    "swinv2_cr_huge_224": {**_CR, **_CR_H, "num_heads": (8, 16, 32, 64), "window_size": 7, "img_size": 224},
    "swinv2_cr_huge_384": {**_CR, **_CR_H, "window_size": 12, "img_size": 384},
    "swinv2_cr_giant_224": {**_CR, **_CR_G, "window_size": 7, "img_size": 224},
    "swinv2_cr_giant_384": {**_CR, **_CR_G, "window_size": 12, "img_size": 384},
}


def _swinv2_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> SwinV2Config:
    if config.get("use_absolute_embeddings"):
        raise UnsupportedModelError("Swin V2 with absolute position embeddings is not supported")
    depths = tuple(config["depths"])
    return SwinV2Config(
        embed_dim=config["embed_dim"],
        depths=depths,
        num_heads=tuple(config["num_heads"]),
        window_size=config.get("window_size", 7),
        pretrained_window_sizes=tuple(config.get("pretrained_window_sizes") or (0,) * len(depths)),
        mlp_ratio=config.get("mlp_ratio", 4.0),
        **{**common, "norm_eps": config.get("layer_norm_eps", 1e-5), "qkv_bias": "qv" if common["qkv_bias"] else False},
    )


ARCHITECTURE = Architecture(
    model_type="posenc_swinv2",
    config=SwinV2Config,
    model=SwinTransformerV2,
    timm_presets=TIMM_PRESETS,
    # swinv2_cr spells the stages and the bias MLP differently from swinv2
    timm_rules=(*TIMM_RULES, (r"^stages\.", "layers."), (r"\.attn\.meta_mlp\.fc1\.", ".attn.cpb_mlp.0."),
                (r"\.attn\.meta_mlp\.fc2\.", ".attn.cpb_mlp.2.")),
    transformers={
        "swinv2": TransformersType(("Swinv2ForImageClassification",), _swinv2_from_transformers, (
            (r"^swinv2\.", ""),
            *TRANSFORMERS_NEXT_LAYOUT,
            (r"\.attention\.(?:self\.)?continuous_position_bias_mlp\.", ".attn.cpb_mlp."),
            (r"\.attention\.(?:self\.)?logit_scale$", ".attn.logit_scale"),
            *TRANSFORMERS_RULES,
        )),
    },
    # coordinate tables and indices are rebuilt for the window in use
    derived=("relative_position_index", "attn_mask", "mask_token", "relative_coords_table", "relative_coordinates_log"),
)  # fmt: skip
