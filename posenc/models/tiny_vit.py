"""TinyViT: a convolutional stem and MBConv stage, then stages of window attention with a bias per absolute offset.

Names follow timm's ``tiny_vit.py``: ``patch_embed.{conv1,conv2}``, ``stages.0.blocks.j.{conv1,conv2,conv3}``
(MBConv), ``stages.i.downsample.{conv1,conv2,conv3}`` (patch merging at the start of stages 1..),
``stages.i.blocks.j.{attn,local_conv,mlp}``, ``head.{norm,fc}``; every convolution is ``{conv,bn}``. Feature
maps are (B, C, H, W) in the convolutional parts and (B, H, W, C) in the attention blocks.

Position: inside each window, attention adds ``attention_biases[h, |dy| * Ww + |dx|]``, one learned value per
head and absolute offset (:func:`posenc.encodings.offset_bias_index`), the same in every window. The window is
fixed, so any input size works: as in timm, a grid that is not a multiple of the window is padded with zero
tokens at the bottom and right (they take part in attention), and cropped afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posenc.encodings import Size2, offset_bias_index, to_2tuple, window_partition, window_reverse
from posenc.models.declare import Architecture
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
    PosencModel,
    config_from_dict,
    drop_path_rates,
    grid_pixels,
    normalise_config,
    windowed_layout,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class TinyViTConfig:
    """Everything that defines a TinyViT; saved as ``config.json``. Per-stage fields take one value per stage."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) of the checkpoint's preprocessing; the model takes any size
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)  # width of each stage
    depths: tuple[int, ...] = (2, 2, 6, 2)  # stage 0: MBConv blocks; later stages: attention blocks
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0's entry is unused (no attention there)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # square attention window per stage (stage 0's unused)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3  # depthwise convolution between attention and MLP
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_tiny_vit"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        stages = len(self.embed_dims)
        for name in ("depths", "num_heads", "window_sizes"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)} must give one value for each of the {stages} stages")
        for i in range(1, stages):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(f"stage {i}: embed_dims[{i}]={self.embed_dims[i]} is not divisible by "
                                 f"num_heads[{i}]={self.num_heads[i]}")  # fmt: skip
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def patch_size(self) -> int:
        """Input pixels per token of the stem's output (two stride-2 convolutions)."""
        return 4

    @property
    def grid(self) -> Size2:
        """(h, w) token grid after the stem at ``img_size``."""
        return (-(-self.img_size[0] // 4), -(-self.img_size[1] // 4))

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """A learned bias per head and absolute offset inside every attention window."""
        return ("offset_bias",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyViTConfig:
        return config_from_dict(cls, data)


class ConvNorm(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d (timm names: ``conv``, ``bn``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions with GELU between: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float, drop_path: float) -> None:
        super().__init__()
        mid = int(dim * expand)
        self.conv1 = ConvNorm(dim, mid)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(mid, mid, 3, 1, 1, groups=mid)
        self.act2 = nn.GELU()
        self.conv3 = ConvNorm(mid, dim)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise stride-2 conv, 1x1 conv: (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvNorm(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm attention inside a square window, with a learned bias per head and absolute offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = (window, window)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))  # heads, Wh*Ww
        self.register_buffer("attention_bias_idxs", offset_bias_index(self.window), persistent=False)  # n, n

    def position_bias(self) -> Tensor:
        """(heads, n, n) bias of every query and key of a window (n = Wh*Ww)."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(
        self, x: Tensor, *, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(B, nW, n, C) -> (B, nW, n, C), plus the attention and the bias when ``need_weights``."""
        b, nw, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, nw, n, self.num_heads, 3 * self.head_dim)  # B, nW, n, heads, 3hd
        q, k, v = qkv.permute(0, 1, 3, 2, 4).split(self.head_dim, dim=-1)  # B, nW, heads, n, hd
        bias = self.position_bias() if position else None  # heads, n, n
        trace = None
        if need_weights:
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # B, nW, heads, n, n
            attn = (logits if bias is None else logits + bias).softmax(dim=-1)
            out = attn @ v  # B, nW, heads, n, hd
            trace = {"attn": attn, "attn_no_pos": None if bias is None else logits.softmax(dim=-1), "bias": bias}
        else:
            q, k, v = (t.reshape(b * nw, self.num_heads, n, self.head_dim) for t in (q, k, v))  # B*nW, heads, n, hd
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B*nW, heads, n, hd
            out = out.view(b, nw, self.num_heads, n, self.head_dim)  # B, nW, heads, n, hd
        out = out.transpose(2, 3).reshape(b, nw, n, c)  # B, nW, n, C
        return self.proj(out), trace


class NormMlp(nn.Module):
    """LayerNorm, then a GELU MLP (timm names: ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyVitBlock(nn.Module):
    """Window attention (residual), a depthwise convolution, then an MLP (residual)."""

    def __init__(self, dim: int, heads: int, window: int, config: TinyViTConfig, drop_path: float) -> None:
        super().__init__()
        self.window = (window, window)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = NormMlp(dim, int(dim * config.mlp_ratio))
        k = config.local_conv_size
        self.local_conv = ConvNorm(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, BlockTrace | None]:
        """(B, H, W, C) -> (B, H, W, C), plus the block's trace (on the padded grid) when ``need_weights``."""
        b, h, w, c = x.shape
        wh, ww = self.window
        pad_h, pad_w = (-h) % wh, (-w) % ww
        y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x  # B, H', W', C: zero tokens appended
        padded = (h + pad_h, w + pad_w)
        y, parts = self.attn(window_partition(y, self.window), need_weights=need_weights, position=position)
        y = window_reverse(y, self.window, padded)[:, :h, :w]  # B, H, W, C
        x = x + self.drop_path(y)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, H, W, C
        x = x + self.drop_path(self.mlp(x))
        if parts is None:
            return x, None
        table = {} if parts["bias"] is None else {"offset_bias_table": self.attn.attention_biases.view(-1, wh, ww)}
        return x, BlockTrace(attn=parts["attn"], attn_no_pos=parts["attn_no_pos"], pos_bias=parts["bias"], mask=None,
                             grid=padded, window=self.window, shift=(0, 0), position=table)  # fmt: skip


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks."""

    def __init__(self, dim: int, depth: int, expand: float, rates: list[float]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MBConv(dim, expand, rates[i]) for i in range(depth)))


class TinyVitStage(nn.Module):
    """Patch merging, then window attention blocks."""

    def __init__(self, stage: int, config: TinyViTConfig, rates: list[float]) -> None:
        super().__init__()
        dim = config.embed_dims[stage]
        self.downsample = PatchMerging(config.embed_dims[stage - 1], dim)
        self.blocks = nn.ModuleList(
            TinyVitBlock(dim, config.num_heads[stage], config.window_sizes[stage], config, rates[j])
            for j in range(config.depths[stage])
        )


class ClassifierHead(nn.Module):
    """Average pool, LayerNorm, linear (timm names: ``norm``, ``fc``)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class TinyViT(PosencModel):
    """TinyViT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's window attention and bias."""

    architecture = "tiny_vit"

    def __init__(self, config: TinyViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, TinyViTConfig) else TinyViTConfig.from_dict(config)
        self._hub_mixin_config = config
        self.patch_embed = PatchEmbed(config.in_chans, config.embed_dims[0])
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        stages: list[nn.Module] = []
        start = 0
        for i, depth in enumerate(config.depths):
            part = rates[start : start + depth]
            if i == 0:
                stages.append(ConvStage(config.embed_dims[0], depth, config.mbconv_expand_ratio, part))
            else:
                stages.append(TinyVitStage(i, config, part))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(config.embed_dims[-1], config.num_classes)

    @property
    def num_blocks(self) -> int:
        """Attention blocks listed by :meth:`inspect` (stage 0's MBConv blocks have no attention)."""
        return sum(self.config.depths[1:])

    def size_step(self) -> Size2:
        """(h, w) every input size must be a multiple of for the windows to tile every stage's grid unpadded.

        The model runs at any size (padding the windows like timm); the app offers only these.
        """
        step = 4
        for stage, window in enumerate(self.config.window_sizes[1:], start=1):
            step = math.lcm(step, 4 * 2**stage * window)
        return (step, step)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the window attention maps one inspection at ``size`` keeps (with and without the bias)."""
        cfg, total = self.config, 0
        for stage in range(1, len(cfg.depths)):
            tokens = -(-size[0] // (4 * 2**stage)) * -(-size[1] // (4 * 2**stage))
            total += cfg.depths[stage] * cfg.num_heads[stage] * tokens * cfg.window_sizes[stage] ** 2
        return total * 4 * 2

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, list[BlockTrace]]:
        x = self.patch_embed(x)  # B, C, h, w
        grid = tuple(x.shape[-2:])
        x = self.stages[0].blocks(x)
        traces = []
        for i, stage in enumerate(self.stages[1:], start=1):
            x = stage.downsample(x).permute(0, 2, 3, 1)  # B, H, W, C
            for block in stage.blocks:
                x, trace = block(x, need_weights, position)
                if trace is not None:  # a merged token stands for the stem token at its 3x3 conv's centre
                    real = tuple(x.shape[1:3])  # the grid before padding to whole windows
                    stride = self.config.patch_size * 2**i
                    layout = windowed_layout(real, trace.window, grid_pixels(real, stride, self.config.patch_size / 2))
                    traces.append(replace(trace, stage=i, layout=layout))
            x = x.permute(0, 3, 1, 2)  # B, C, H, W
        return self.head(x), grid, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves every offset bias out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every attention block's window attention, offset bias and bias table."""
        logits, grid, traces = self._run(x, need_weights=True, position=position)
        return Inspection(logits=logits, grid=grid, num_prefix_tokens=0, pos_embed=None, pos_embed_prefix=0,
                          rope_angles=None, blocks=traces)  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

_DEPTHS = (2, 2, 6, 2)

#: timm architecture name (no pretrained tag) -> the TinyViTConfig fields its registration fixes.
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny_vit_5m_224": dict(embed_dims=(64, 128, 160, 320), depths=_DEPTHS, num_heads=(2, 4, 5, 10),
                            window_sizes=(7, 7, 14, 7), img_size=224),
    "tiny_vit_11m_224": dict(embed_dims=(64, 128, 256, 448), depths=_DEPTHS, num_heads=(2, 4, 8, 14),
                             window_sizes=(7, 7, 14, 7), img_size=224),
    "tiny_vit_21m_224": dict(embed_dims=(96, 192, 384, 576), depths=_DEPTHS, num_heads=(3, 6, 12, 18),
                             window_sizes=(7, 7, 14, 7), img_size=224),
    "tiny_vit_21m_384": dict(embed_dims=(96, 192, 384, 576), depths=_DEPTHS, num_heads=(3, 6, 12, 18),
                             window_sizes=(12, 12, 24, 12), img_size=384),
    "tiny_vit_21m_512": dict(embed_dims=(96, 192, 384, 576), depths=_DEPTHS, num_heads=(3, 6, 12, 18),
                             window_sizes=(16, 16, 32, 16), img_size=512),
}


ARCHITECTURE = Architecture(
    model_type="posenc_tiny_vit",
    config=TinyViTConfig,
    model=TinyViT,
    timm_presets=TIMM_PRESETS,
    derived=("attention_bias_idxs",),  # the offset index is rebuilt from the window
)
