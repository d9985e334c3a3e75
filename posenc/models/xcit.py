"""XCiT: cross-covariance attention over channels, local patch interaction, then class-attention layers.

Names follow timm's ``xcit.py``: ``patch_embed.proj`` (3x3 stride-2 convs, each ``{0: Conv2d, 1: BatchNorm2d}``, with
GELUs between), ``pos_embed.token_projection`` (Conv2d 64 -> C, 1x1), ``cls_token``, ``blocks.i.{norm1, attn, norm3,
local_mp, norm2, mlp, gamma1, gamma3, gamma2}``, ``cls_attn_blocks.i.{norm1, attn.{q, k, v, proj}, norm2, mlp, gamma1,
gamma2}``, ``norm``, ``head``.

Position: the only position term is added once, after the convolutional patch embedding. Each patch (r, c) of an
(h, w) grid gets Fourier features of its normalised coordinates (:func:`fourier_features`): y = 2π (r + 1) / h and
x = 2π (c + 1) / w, each through 16 frequencies ``temperature ** (2k / 32)`` as interleaved (sin, cos) pairs, y's 32
features first. A learned 1x1 conv (``pos_embed.token_projection``) maps those 64 features to the width C. The features
depend on the grid only through the normalised coordinates, so any grid works without resampling: the corners always
sit at the same phase.

Attention: an XCA block (:class:`XCA`) attends channel to channel, per head a (C/heads) x (C/heads) map from the
cross-covariance of L2-normalised queries and keys over all tokens, scaled by a learned ``temperature``; there is
no token-to-token attention map. Tokens meet only through the depthwise 3x3 convs of the local patch interaction
(:class:`LPI`, zero padded) and through that channel mixing. The class-attention blocks that follow
(:class:`ClassAttentionBlock`) let a cls token, prepended there, attend to itself and every patch; the patches only
pass through them.

Without position (``position=False``) the Fourier term is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posenc.encodings import Size2, to_2tuple
from posenc.models.declare import Architecture
from posenc.models.layers import (
    BlockTrace,
    ClassAttention,
    DropPath,
    Inspection,
    Mlp,
    OutputTokens,
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
class XCiTConfig:
    """Everything that defines an XCiT; saved as ``config.json``."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) of the checkpoint's preprocessing; any multiple of the patch runs
    patch_size: int = field(default=16, metadata={"min": 8, "max": 16})  # 16: four stride-2 convs, 8: three
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: int = 128  # C (xcit_nano)
    depth: int = 12  # XCA blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    cls_attn_layers: int = field(default=2, metadata={"min": 0})  # class-attention blocks after the XCA blocks
    use_pos_embed: bool = True  # the Fourier position term
    fourier_dim: int = field(default=32, metadata={"min": 2, "max": 1024})  # features per axis (timm's hidden_dim)
    fourier_temperature: float = field(default=10000.0, metadata={"min": 1.0})  # the frequencies' base
    eta: float = 1.0  # layer-scale initial value; only shapes a fresh model (kept so timm model_args map one-to-one)
    tokens_norm: bool = False  # class attention normalises every token (True) or only the cls token after attention
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg")})
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_xcit"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.patch_size not in _STEM_CONVS:
            raise ValueError(f"patch_size must be 8 or 16 (the convolutional patch embedding), got {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.embed_dim % 8:
            raise ValueError(f"embed_dim={self.embed_dim} must be a multiple of 8 (the patch embedding's widths)")
        if self.fourier_dim % 2:
            raise ValueError(f"fourier_dim={self.fourier_dim} must be even (sin/cos pairs)")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.global_pool == "token" and not self.cls_attn_layers:
            raise ValueError("global_pool='token' needs class-attention layers (cls_attn_layers >= 1); use 'avg'")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def grid(self) -> Size2:
        """(h, w) patch grid at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """The cls token, which joins in the class-attention blocks."""
        return 1

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The Fourier embedding, when used."""
        return ("fourier",) if self.use_pos_embed else ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XCiTConfig:
        return config_from_dict(cls, data)


#: Why an XCA block's inspection has no token layout.
XCA_NO_LAYOUT = "cross-covariance attention: channels attend to channels, no token map"

#: patch size -> the stride-2 convs of the patch embedding, as (output width / C) per conv
_STEM_CONVS = {16: (8, 4, 2, 1), 8: (4, 2, 1)}


def fourier_features(grid: Size2, dim: int = 32, temperature: float = 10000.0, *, device: Any = None) -> Tensor:
    """XCiT's Fourier features of a patch grid's normalised coordinates (float32).

    Patch (r, c) has y = 2π (r + 1) / (h + 1e-6) and x = 2π (c + 1) / (w + 1e-6); feature 2k and 2k+1 of an axis are
    sin and cos of the coordinate divided by ``temperature ** (2k / dim)``. The y features come first.

    Args:
        grid: (h, w) patch grid.
        dim: features per axis (even).
        temperature: the frequencies' base.

    Returns:
        (h*w, 2 * dim), row-major over the grid.
    """
    h, w = grid
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + 1e-6) * (2 * math.pi)  # h
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + 1e-6) * (2 * math.pi)  # w
    steps = torch.arange(dim, device=device, dtype=torch.float32)
    freqs = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / dim)  # dim: pairs share a frequency

    def axis(coord: Tensor) -> Tensor:
        phase = coord[:, None] / freqs  # n, dim
        return torch.stack([phase[:, 0::2].sin(), phase[:, 1::2].cos()], dim=-1).flatten(1)  # n, dim (sin, cos pairs)

    fy = axis(y)[:, None, :].expand(h, w, dim)  # h, w, dim
    fx = axis(x)[None, :, :].expand(h, w, dim)  # h, w, dim
    return torch.cat([fy, fx], dim=-1).reshape(h * w, 2 * dim)  # h*w, 2*dim


class FourierPosEmbed(nn.Module):
    """The Fourier features of the grid through a learned 1x1 conv (timm name: ``token_projection``)."""

    def __init__(self, dim: int, fourier_dim: int, temperature: float) -> None:
        super().__init__()
        self.fourier_dim = fourier_dim
        self.temperature = temperature
        self.token_projection = nn.Conv2d(2 * fourier_dim, dim, kernel_size=1)

    def forward(self, grid: Size2) -> tuple[Tensor, Tensor]:
        """The (1, h*w, C) embedding added to the patch tokens, and the (h*w, 2 * fourier_dim) features it came from."""
        weight = self.token_projection.weight  # C, 2*fd, 1, 1
        feats = fourier_features(grid, self.fourier_dim, self.temperature, device=weight.device)  # h*w, 2*fd
        pos = F.linear(feats.to(weight.dtype), weight.flatten(1), self.token_projection.bias)  # h*w, C
        return pos[None], feats  # 1, h*w, C


def _conv_bn(in_chs: int, out_chs: int) -> nn.Sequential:
    """3x3 stride-2 conv without bias, then BatchNorm (timm's ``conv3x3``: keys ``0`` and ``1``)."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_chs))


class ConvPatchEmbed(nn.Module):
    """Stride-2 3x3 conv + BatchNorm stages with GELUs between: 16 (or 8) pixels per token."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        chans = [in_chans] + [dim // f for f in _STEM_CONVS[patch_size]]
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(_conv_bn(a, b))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w); H and W must be multiples of the patch."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize to a multiple of {p}")
        return self.proj(x)


class XCA(nn.Module):
    """Cross-covariance attention: per head, channels attend to channels (timm names: ``qkv``, ``temperature``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))  # heads, 1, 1
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, N, C) -> (B, N, C), plus the (B, heads, C/heads, C/heads) channel attention when ``need_weights``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)  # 3, B, heads, d, N
        q, k, v = qkv.unbind(0)  # B, heads, d, N
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        # explicit on both paths, as timm's default: SDPA takes the N-wide rows for its head dim and falls back to its
        # slower math kernel
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # B, heads, d, d
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)  # B, heads, d, N -> B, N, C
        return self.proj(out), attn if need_weights else None


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv, GELU, BatchNorm, depthwise 3x3 conv (zero padded)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, grid: Size2) -> Tensor:
        """(B, h*w, C) -> (B, h*w, C)."""
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # B, C, h, w
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)  # B, h*w, C


class XCABlock(nn.Module):
    """x + g1 * XCA(norm1(x)), then x + g3 * LPI(norm3(x)), then x + g2 * MLP(norm2(x)) (timm's order)."""

    def __init__(self, config: XCiTConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = XCA(dim, config.num_heads, config.qkv_bias)
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.local_mp = LPI(dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), config.eta))
        self.gamma3 = nn.Parameter(torch.full((dim,), config.eta))
        self.gamma2 = nn.Parameter(torch.full((dim,), config.eta))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: Size2, need_weights: bool) -> tuple[Tensor, BlockTrace | None]:
        """(B, h*w, C) -> (B, h*w, C), plus the block's trace (its channel attention) when ``need_weights``."""
        y, attn = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.gamma1 * y)
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), grid))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        if attn is None:
            return x, None
        return x, BlockTrace(attn=attn, attn_no_pos=None, pos_bias=None, mask=None, grid=tuple(grid), layout=None,
                             no_layout=XCA_NO_LAYOUT)  # fmt: skip


class ClassAttentionBlock(nn.Module):
    """The cls token attends to cls + patches and goes through the MLP; the patches only pass through.

    As in timm and the official code, a patch leaves as ``2 * (p + gamma1 * norm1(p))`` (normalised by ``norm2`` first
    when ``tokens_norm``): the MLP's residual adds the patches to themselves. Only average pooling sees that.
    """

    def __init__(self, config: XCiTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.tokens_norm = config.tokens_norm
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = ClassAttention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), config.eta))
        self.gamma2 = nn.Parameter(torch.full((dim,), config.eta))

    def forward(self, x: Tensor, grid: Size2, need_weights: bool) -> tuple[Tensor, BlockTrace | None]:
        """(B, 1 + h*w, C) -> (B, 1 + h*w, C), plus the block's trace (the cls query's attention) when asked."""
        normed = self.norm1(x)
        cls, attn = self.attn(normed, need_weights)  # B, 1, C
        x = x + self.gamma1 * torch.cat([cls, normed[:, 1:]], dim=1)  # B, 1 + h*w, C: patches add their own norm
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)  # B, 1 + h*w, C
        x = x + torch.cat([self.gamma2 * self.mlp(x[:, :1]), x[:, 1:]], dim=1)  # B, 1 + h*w, C: patches doubled
        if attn is None:
            return x, None
        return x, BlockTrace(attn=attn, attn_no_pos=None, pos_bias=None, mask=None, grid=tuple(grid))


class XCiT(PosencModel):
    """XCiT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also the Fourier embedding and every block's map."""

    architecture = "xcit"

    def __init__(self, config: XCiTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, XCiTConfig) else XCiTConfig.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim
        self.patch_embed = ConvPatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = (FourierPosEmbed(dim, config.fourier_dim, config.fourier_temperature)
                          if config.use_pos_embed else None)  # fmt: skip
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(XCABlock(config, rate) for rate in rates)
        self.cls_attn_blocks = nn.ModuleList(ClassAttentionBlock(config) for _ in range(config.cls_attn_layers))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_blocks(self) -> int:
        """XCA blocks, then class-attention blocks, as :meth:`inspect` lists them."""
        return self.config.depth + self.config.cls_attn_layers

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the maps one inspection at ``size`` keeps (float32): channel maps, then the cls query's rows."""
        cfg = self.config
        d = cfg.embed_dim // cfg.num_heads
        n = 1 + (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size)
        return (cfg.depth * d * d + cfg.cls_attn_layers * n) * cfg.num_heads * 4

    def _run(
        self, x: Tensor, need_weights: bool, position: bool
    ) -> tuple[Tensor, Size2, Tensor | None, Tensor | None, list[BlockTrace]]:
        x = self.patch_embed(x)  # B, C, h, w
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B, h*w, C
        pos = feats = None
        if position and self.pos_embed is not None:
            pos, feats = self.pos_embed((h, w))  # 1, h*w, C
            x = x + pos
        traces = []
        for block in self.blocks:
            x, trace = block(x, (h, w), need_weights)
            traces.append(trace)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # B, 1 + h*w, C
        for block in self.cls_attn_blocks:
            x, trace = block(x, (h, w), need_weights)
            traces.append(trace)
        x = self.norm(x)
        pooled = x[:, 1:].mean(dim=1) if self.config.global_pool == "avg" else x[:, 0]  # B, C
        return self.head(pooled), (h, w), pos, feats, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves the Fourier term out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits, the Fourier embedding as added, every XCA block's channel attention and every class attention.

        ``blocks`` lists the XCA blocks (``attn``: (B, heads, C/heads, C/heads), channels over channels: ``layout`` None,
        ``no_layout`` says so), then the class-attention blocks (``attn``: (B, heads, 1, 1 + h*w), the cls query over
        cls + patches: a layout with the cls token as the only query). Every block's ``output`` places the tokens it
        outputs (the patch grid; cls + the patch grid), so token norms and decodability read them.
        """
        logits, grid, pos, feats, traces = self._run(x, need_weights=True, position=position)
        pixels = grid_pixels(grid, self.config.patch_size)  # h*w, 2
        cls_query = global_layout(grid, pixels, ("cls",), query_grid=(0, 0), query_pixels=pixels[:0],
                                  query_prefix=("cls",))  # one cls query over cls + patches  # fmt: skip
        patches = OutputTokens.on_grid(grid, pixels)  # what an XCA block outputs: its patch grid
        with_cls = OutputTokens.on_grid(grid, pixels, ("cls",))  # a class-attention block: cls, patches passed on
        traces = ([replace(t, output=patches) for t in traces[: self.config.depth]]
                  + [replace(t, layout=cls_query, output=with_cls) for t in traces[self.config.depth :]])
        return Inspection(
            logits=logits,
            grid=grid,
            num_prefix_tokens=1,
            prefix_names=("cls",),
            pos_embed=pos,
            pos_embed_prefix=0,
            rope_angles=None,
            blocks=traces,
            position={} if feats is None else {"fourier_features": feats},
        )


# ------------------------------------------------------------------------------------------- timm presets and keys


def _preset(patch: int, dim: int, depth: int, heads: int, eta: float, tokens_norm: bool, img: int) -> dict[str, Any]:
    return {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads, "eta": eta,
            "tokens_norm": tokens_norm, "img_size": img}  # fmt: skip


#: timm architecture name (no pretrained tag) -> the XCiTConfig fields its registration (and its tags' input size) fixes.
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    f"xcit_{size}_{depth}_p{patch}_{img}": _preset(patch, dim, depth, heads, eta, size != "nano", img)
    for size, depth, dim, heads, eta in (
        ("nano", 12, 128, 4, 1.0), ("tiny", 12, 192, 4, 1.0), ("tiny", 24, 192, 4, 1e-5), ("small", 12, 384, 8, 1.0),
        ("small", 24, 384, 8, 1e-5), ("medium", 24, 512, 8, 1e-5), ("large", 24, 768, 16, 1e-5),
    )
    for patch in (16, 8)
    for img in (224, 384)
}  # fmt: skip


# timm's names are the module names above (its gamma1..gamma3 are not ViT's gamma_1/gamma_2): no key rules; the
# Fourier embedding is computed, so nothing needs fitting to another grid.
ARCHITECTURE = Architecture(model_type="posenc_xcit", config=XCiTConfig, model=XCiT, timm_presets=TIMM_PRESETS)
