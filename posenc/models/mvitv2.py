"""MViTv2: a multiscale ViT whose attention pools its queries, keys and values, with a decomposed relative bias.

Names follow timm's ``mvitv2.py`` (``MultiScaleAttention``, not the ``pool_first`` variant): ``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``stages.i.blocks.j.{norm1,shortcut_proj_attn,attn.{qkv,pool_q,norm_q,pool_k,norm_k,
pool_v,norm_v,rel_pos_h,rel_pos_w,proj},norm2,shortcut_proj_mlp,mlp.{fc1,fc2}}``, ``norm``, ``head`` (timm's
``head.fc``). Config fields carry the names of timm's ``MultiScaleVitCfg``. Grids are ``(h, w)``, row-major.

Each attention pools its queries and its keys/values with strided depthwise 3x3 convolutions (``mode="conv"``,
then a LayerNorm over each head's channels; ``"max"``/``"avg"`` pool without weights), so the query grid and the
key grid differ: in ``mvitv2_tiny`` at 224 px stage 0 has 56x56 queries and 14x14 keys. The first block of a
stage strides its queries by ``stride_q`` (the stage transition), every block strides its keys by
``stride_kv``. With ``residual_pooling`` the pooled queries are added to the attention's output.

Position: ``use_abs_pos`` (off in every timm preset) adds a learned embedding once; otherwise position enters
only through the attention's *decomposed* relative bias, which depends on the query's content:
``bias[q, k] = q . R_h[idx_h(row(q), row(k))] + q . R_w[idx_w(col(q), col(k))]`` with one table of offset
embeddings per axis and block, ``rel_pos_h`` / ``rel_pos_w`` (2 * max(q, k) - 1, head_dim). When the query and
key grids differ, the coarser axis is stretched to the finer one before the offset is taken, so offsets count
tokens of the finer grid (:func:`posenc.encodings.decomposed_rel_pos`, the rule SAM inherited from MViTv2).
The cls token (``use_cls_token``) gets no bias. The zero-padded pooling convolutions and the 7x7 patch
convolution leak position too, as any zero-padded convolution does; posenc does not draw that.

Sizes: every input side must be a multiple of :meth:`MViTv2Config.size_step` (32 for the timm presets), so each
pooled grid divides exactly. At another size than ``img_size`` each table is resized linearly to the offsets the
new grids need, as timm's ``checkpoint_filter_fn`` resizes them when a checkpoint is loaded into a model built
for another size; timm itself asserts a square size (``fixed_input_size``) and cannot build a non-square model,
posenc resizes the row and column tables separately, so non-square inputs work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posenc.encodings import (
    Size2,
    decomposed_rel_pos,
    decomposed_rel_pos_bias,
    decomposed_rel_pos_factors,
    resample_abs_pos_embed,
    resize_rel_pos,
    to_2tuple,
)
from posenc.models.declare import TIMM_RULES, Architecture, StateDict, resample_pos_embed
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
    Mlp,
    PosencModel,
    TokenLayout,
    config_from_dict,
    drop_path_rates,
    global_layout,
    grid_pixels,
    normalise_config,
)
from posenc.preprocess import Preprocess


class BlockPlan(NamedTuple):
    """What one block of the model is: its stage, widths, heads and pooling strides."""

    stage: int
    dim: int  # input channels
    dim_out: int  # output channels
    attn_dim: int  # channels of the attention (dim_out with expand_attn, else dim)
    num_heads: int
    stride_q: Size2
    stride_kv: Size2


class BlockGrids(NamedTuple):
    """The token grids of one block: its input, its pooled queries (= its output) and its pooled keys/values."""

    input: Size2
    query: Size2
    key: Size2
    query_stride: Size2  # input pixels between neighbouring queries
    key_stride: Size2  # input pixels between neighbouring keys


@dataclass(frozen=True)
class MViTv2Config:
    """Everything that defines an MViTv2; saved as ``config.json``. Field names are timm's ``MultiScaleVitCfg``'s."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the relative tables are learned for
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    depths: tuple[int, ...] = (2, 3, 16, 3)  # blocks per stage
    embed_dim: tuple[int, ...] = (96, 192, 384, 768)  # width per stage; one number is doubled at every stage (timm)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)  # heads per stage; one number is doubled at every stage (timm)
    mlp_ratio: float = 4.0
    pool_first: bool = False  # timm's MultiScaleAttentionPoolFirst (pool before projecting): not supported
    expand_attn: bool = True  # widen in the attention of a stage's first block (False: in its last block's MLP)
    qkv_bias: bool = True
    use_cls_token: bool = False
    use_abs_pos: bool = False  # a learned absolute embedding (1, [1 +] h*w, C) added once
    residual_pooling: bool = True  # add the pooled queries to the attention's output
    mode: str = field(default="conv", metadata={"choices": ("conv", "max", "avg")})  # how q, k, v are pooled
    kernel_qkv: tuple[int, int] = (3, 3)  # pooling kernel
    stride_q: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (2, 2), (2, 2))  # query stride of each stage's 1st block
    stride_kv: tuple[tuple[int, int], ...] = ()  # key/value stride per stage; () derives it from stride_kv_adaptive
    stride_kv_adaptive: tuple[int, int] | None = (4, 4)  # stage 0's key stride, divided by each query stride after
    patch_kernel: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = field(default=(3, 3), metadata={"min": 0})
    rel_pos_type: str = field(default="spatial", metadata={"choices": ("spatial", "none")})  # "none": no bias
    norm_eps: float = 1e-6
    global_pool: str | None = field(default=None, metadata={"choices": ("avg", "token")})  # None: token with cls
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_mvitv2"

    def __post_init__(self) -> None:
        stages = len(self.depths) if isinstance(self.depths, (list, tuple)) else 1
        for name in ("embed_dim", "num_heads"):  # timm's shorthand: one number, doubled at every stage
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**16:
                object.__setattr__(self, name, tuple(value * 2**i for i in range(stages)))
        normalise_config(self)
        if not self.stride_kv and self.stride_kv_adaptive is not None:
            object.__setattr__(self, "stride_kv", _adaptive_kv_strides(self.stride_q, self.stride_kv_adaptive))
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        for name in ("embed_dim", "num_heads", "stride_q", "stride_kv"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)} must give one value for each of the {stages} stages")
        if self.pool_first:
            raise ValueError("pool_first=True (timm's MultiScaleAttentionPoolFirst) is not supported; no timm "
                             "MViTv2 preset uses it")
        if self.patch_stride[0] != self.patch_stride[1]:
            raise ValueError(f"patch_stride {self.patch_stride} must be square")
        for plan in self.blocks():
            if plan.attn_dim % plan.num_heads:
                raise ValueError(
                    f"stage {plan.stage}: width {plan.attn_dim} is not divisible by {plan.num_heads} heads")
        step = self.size_step
        if self.img_size[0] % step or self.img_size[1] % step:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {step} (patch stride x pooling strides)")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def patch_size(self) -> int:
        """Input pixels per token of stage 0 (the patch convolution's stride)."""
        return self.patch_stride[0]

    @property
    def grid(self) -> Size2:
        """(h, w) token grid of stage 0 at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.use_cls_token)

    @property
    def pool(self) -> str:
        """How the head pools the tokens: timm's default is the cls token when there is one, else the mean."""
        return self.global_pool or ("token" if self.use_cls_token else "avg")

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The learned absolute embedding (if used) and the decomposed relative bias (if used)."""
        return (("learned",) if self.use_abs_pos else ()) + (("decomposed",) if self.rel_pos_type == "spatial" else ())

    @property
    def size_step(self) -> int:
        """Every input side is a multiple of this, so every query and key grid divides exactly (32 for timm's)."""
        steps = []
        for axis in (0, 1):
            step = stride = self.patch_size  # stride: input pixels per token of the grid a stage starts from
            for sq, skv, depth in zip(self.stride_q, self.stride_kv, self.depths):
                step = math.lcm(step, stride * sq[axis], stride * skv[axis])  # the stage's first block
                stride *= sq[axis]
                if depth > 1:
                    step = math.lcm(step, stride * skv[axis])  # its other blocks
            steps.append(step)
        return math.lcm(*steps)

    def blocks(self) -> list[BlockPlan]:
        """One :class:`BlockPlan` per block, in order (timm's ``MultiScaleVitStage`` widths and strides)."""
        plans = []
        dim = self.embed_dim[0]
        last = len(self.depths) - 1
        for i, depth in enumerate(self.depths):
            out = self.embed_dim[i] if self.expand_attn else self.embed_dim[min(i + 1, last)]
            outs = (out,) * depth if self.expand_attn else (dim,) * (depth - 1) + (out,)
            for j in range(depth):
                attn_dim = outs[j] if self.expand_attn else dim
                stride_q = tuple(self.stride_q[i]) if j == 0 else (1, 1)
                stride_kv = tuple(self.stride_kv[i])
                plans.append(BlockPlan(i, dim, outs[j], attn_dim, self.num_heads[i], stride_q, stride_kv))
                dim = outs[j]
        return plans

    def block_grids(self, grid: Size2 | None = None) -> list[BlockGrids]:
        """Each block's grids and where their tokens sit, for a stage-0 grid (default the native one).

        A stage-0 token (i, j) sits at the centre of its stride cell, ``(i + 0.5) * patch_size`` pixels (the
        patch convention of every posenc model); a pooled token at the centre of the window it pools (a 3x3 window
        with padding 1 is centred on input token ``stride * t``), so token t of any grid is at
        ``patch_size / 2 + t * token_stride`` pixels.
        """
        grid = tuple(grid or self.grid)
        stride = (self.patch_size, self.patch_size)  # input pixels per token of ``grid``
        out = []
        for plan in self.blocks():
            q = _pooled(grid, self.kernel_qkv, plan.stride_q)
            k = _pooled(grid, self.kernel_qkv, plan.stride_kv)
            q_stride = (stride[0] * plan.stride_q[0], stride[1] * plan.stride_q[1])
            k_stride = (stride[0] * plan.stride_kv[0], stride[1] * plan.stride_kv[1])
            out.append(BlockGrids(grid, q, k, q_stride, k_stride))
            grid, stride = q, q_stride
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MViTv2Config:
        return config_from_dict(cls, data)


def _adaptive_kv_strides(stride_q: Any, adaptive: Any) -> tuple[tuple[int, int], ...]:
    """timm's rule: stage 0 pools keys by ``adaptive``; each query stride after divides it (at least 1)."""
    current, out = list(adaptive), []
    for s in stride_q:
        if min(s) > 1:
            current = [max(c // d, 1) for c, d in zip(current, s)]
        out.append(tuple(current))
    return tuple(out)


def _pooled(grid: Size2, kernel: Size2, stride: Size2) -> Size2:
    """The grid a pooling of ``kernel`` and ``stride`` (padding kernel // 2) leaves; unchanged when it is skipped."""
    if kernel[0] * kernel[1] == 1 and stride[0] * stride[1] == 1:
        return tuple(grid)
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride))


def _pool_layer(mode: str, channels: int, kernel: Size2, stride: Size2) -> nn.Module | None:
    """A pooling of one head's channels (depthwise conv, max or average), or None where timm skips it."""
    if kernel[0] * kernel[1] == 1 and stride[0] * stride[1] == 1:
        return None
    padding = (kernel[0] // 2, kernel[1] // 2)
    if mode == "conv":
        return nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False)
    return (nn.MaxPool2d if mode == "max" else nn.AvgPool2d)(kernel, stride, padding)


class PoolingAttention(nn.Module):
    """Multiscale attention: queries and keys/values pooled per head, a decomposed relative bias (timm names).

    Args:
        dim, dim_out: input and output channels.
        num_heads: heads; each pools its ``dim_out // num_heads`` channels alone.
        rel_size: (rows, cols) of the relative tables, or None for no relative bias.
    """

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, *, config: MViTv2Config, stride_q: Size2, stride_kv: Size2,
        rel_size: Size2 | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // num_heads
        self.prefix = config.num_prefix_tokens
        self.residual_pooling = config.residual_pooling
        self.qkv = nn.Linear(dim, dim_out * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        kernel = tuple(config.kernel_qkv)
        self.pool_q = _pool_layer(config.mode, self.head_dim, kernel, stride_q)
        self.pool_k = _pool_layer(config.mode, self.head_dim, kernel, stride_kv)
        self.pool_v = _pool_layer(config.mode, self.head_dim, kernel, stride_kv)

        def norm(pool: nn.Module | None) -> nn.Module | None:  # convolutions are followed by a LayerNorm per head
            conv = config.mode == "conv" and pool is not None
            return nn.LayerNorm(self.head_dim, eps=config.norm_eps) if conv else None

        self.norm_q, self.norm_k, self.norm_v = norm(self.pool_q), norm(self.pool_k), norm(self.pool_v)
        if rel_size is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(rel_size[0], self.head_dim))  # 2*max(qh, kh)-1, hd
            self.rel_pos_w = nn.Parameter(torch.zeros(rel_size[1], self.head_dim))  # 2*max(qw, kw)-1, hd
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def _pool(self, x: Tensor, grid: Size2, pool: nn.Module | None, norm: nn.Module | None) -> tuple[Tensor, Size2]:
        """(B, heads, P + h*w, hd) -> (B, heads, P + h'*w', hd) and (h', w'); prefix tokens pass unpooled."""
        if pool is not None:
            prefix, x = x[:, :, : self.prefix], x[:, :, self.prefix :]
            b = x.shape[0]
            x = x.reshape(-1, grid[0], grid[1], self.head_dim).permute(0, 3, 1, 2).contiguous()  # B*heads, hd, h, w
            x = pool(x)  # B*heads, hd, h', w'
            grid = tuple(x.shape[-2:])
            x = x.reshape(b, self.num_heads, self.head_dim, -1).transpose(2, 3)  # B, heads, h'*w', hd
            if self.prefix:
                x = torch.cat((prefix, x), dim=2)  # B, heads, P + h'*w', hd
        if norm is not None:
            x = norm(x)
        return x, grid

    def position_bias(self, q: Tensor, q_grid: Size2, k_grid: Size2) -> tuple[Tensor, dict[str, Tensor]]:
        """The decomposed bias for pooled queries ``q`` (B, heads, P + Nq, hd) over the pooled key grid.

        Returns:
            (B, heads, P + Nq, P + Nk) bias (0 in the prefix rows and columns), and its factors ``rel_h``
            (B, heads, Nq, kh), ``rel_w`` (B, heads, Nq, kw) with the embeddings used ``rel_pos_h`` (qh, kh, hd),
            ``rel_pos_w`` (qw, kw, hd).
        """
        rel_h = decomposed_rel_pos(q_grid[0], k_grid[0], self.rel_pos_h)  # qh, kh, hd
        rel_w = decomposed_rel_pos(q_grid[1], k_grid[1], self.rel_pos_w)  # qw, kw, hd
        q = q[:, :, self.prefix :]  # B, heads, Nq, hd
        factor_h, factor_w = decomposed_rel_pos_factors(q, rel_h, rel_w, q_grid)  # B, heads, Nq, kh / kw
        bias = decomposed_rel_pos_bias(factor_h, factor_w)  # B, heads, Nq, Nk
        if self.prefix:
            bias = F.pad(bias, (self.prefix, 0, self.prefix, 0))  # B, heads, P + Nq, P + Nk
        return bias, {"rel_h": factor_h, "rel_w": factor_w, "rel_pos_h": rel_h, "rel_pos_w": rel_w}

    def forward(
        self, x: Tensor, grid: Size2, *, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, Size2, Size2, dict[str, Any] | None]:
        """(B, P + h*w, C) on ``grid`` -> (B, P + Nq, C_out), the query grid, the key grid, and a trace.

        With ``need_weights`` the trace holds ``attn`` and ``attn_no_pos`` (B, heads, P + Nq, P + Nk) and the
        bias factors of :meth:`position_bias`; None otherwise. ``position=False`` leaves the bias out.
        """
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3, B, heads, N, hd
        q, k, v = qkv.unbind(0)  # B, heads, N, hd each
        q, q_grid = self._pool(q, grid, self.pool_q, self.norm_q)  # B, heads, P + Nq, hd
        k, k_grid = self._pool(k, grid, self.pool_k, self.norm_k)  # B, heads, P + Nk, hd
        v, _ = self._pool(v, grid, self.pool_v, self.norm_v)  # B, heads, P + Nk, hd
        bias = factors = None
        if position and self.rel_pos_h is not None:
            bias, factors = self.position_bias(q, q_grid, k_grid)  # B, heads, P + Nq, P + Nk
        trace = None
        if need_weights:
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # B, heads, P + Nq, P + Nk
            attn = (logits if bias is None else logits + bias).softmax(dim=-1)
            trace = {"attn": attn, "attn_no_pos": None if bias is None else logits.softmax(dim=-1), **(factors or {})}
            out = attn @ v  # B, heads, P + Nq, hd
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B, heads, P + Nq, hd
        if self.residual_pooling:
            out = out + q
        out = out.transpose(1, 2).reshape(b, -1, self.dim_out)  # B, P + Nq, C_out
        return self.proj(out), q_grid, k_grid, trace


class MultiScaleBlock(nn.Module):
    """Pre-norm block; the shortcut is projected when the width changes and max-pooled when the queries stride."""

    def __init__(self, config: MViTv2Config, plan: BlockPlan, rel_size: Size2 | None, drop_path: float) -> None:
        super().__init__()
        self.prefix = config.num_prefix_tokens
        widen = plan.dim != plan.dim_out
        self.norm1 = nn.LayerNorm(plan.dim, eps=config.norm_eps)
        self.shortcut_proj_attn = nn.Linear(plan.dim, plan.dim_out) if widen and config.expand_attn else None
        if plan.stride_q[0] * plan.stride_q[1] > 1:
            kernel = tuple(s + 1 if s > 1 else s for s in plan.stride_q)
            self.shortcut_pool_attn = nn.MaxPool2d(kernel, plan.stride_q, tuple(k // 2 for k in kernel))
        else:
            self.shortcut_pool_attn = None
        self.attn = PoolingAttention(plan.dim, plan.attn_dim, plan.num_heads, config=config, stride_q=plan.stride_q,
                                     stride_kv=plan.stride_kv, rel_size=rel_size)  # fmt: skip
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(plan.attn_dim, eps=config.norm_eps)
        self.shortcut_proj_mlp = nn.Linear(plan.dim, plan.dim_out) if widen and not config.expand_attn else None
        self.mlp = Mlp(plan.attn_dim, int(plan.attn_dim * config.mlp_ratio), out_dim=plan.dim_out)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _shortcut_pool(self, x: Tensor, grid: Size2) -> Tensor:
        """Max-pool the patch tokens of (B, P + h*w, C) as the queries are strided; prefix tokens pass."""
        if self.shortcut_pool_attn is None:
            return x
        prefix, x = x[:, : self.prefix], x[:, self.prefix :]
        b, _, c = x.shape
        x = x.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2).contiguous()  # B, C, h, w
        x = self.shortcut_pool_attn(x).reshape(b, c, -1).transpose(1, 2)  # B, h'*w', C
        return torch.cat((prefix, x), dim=1) if self.prefix else x

    def forward(
        self, x: Tensor, grid: Size2, need_weights: bool, position: bool = True
    ) -> tuple[Tensor, Size2, Size2, dict[str, Any] | None]:
        """(B, P + h*w, C) -> (B, P + h'*w', C_out), the query (output) grid, the key grid, and the attention trace."""
        y = self.norm1(x)
        # as timm (and the original): without a projection the shortcut is the un-normalised input
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(y)
        shortcut = self._shortcut_pool(shortcut, grid)
        y, q_grid, k_grid, trace = self.attn(y, grid, need_weights=need_weights, position=position)
        x = shortcut + self.drop_path1(y)
        y = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(y)
        return shortcut + self.drop_path2(self.mlp(y)), q_grid, k_grid, trace


class PatchEmbed(nn.Module):
    """The overlapping patch convolution (7x7, stride 4, padding 3 in every timm preset); timm name ``proj``."""

    def __init__(self, config: MViTv2Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim[0], tuple(config.patch_kernel),
                              stride=tuple(config.patch_stride), padding=tuple(config.patch_padding))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w)."""
        return self.proj(x)


class MViTv2(PosencModel):
    """MViTv2 (timm ``mvitv2_*``); ``model(x)`` gives logits, ``model.inspect(x)`` every block's attention and bias."""

    architecture = "mvitv2"

    def __init__(self, config: MViTv2Config | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, MViTv2Config) else MViTv2Config.from_dict(config)
        self._hub_mixin_config = config
        dim = config.embed_dim[0]
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_cls_token else None
        if config.use_abs_pos:
            tokens = config.num_prefix_tokens + config.grid[0] * config.grid[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))  # 1, P + h*w, C
        else:
            self.pos_embed = None
        plans, grids = config.blocks(), config.block_grids()
        rates = drop_path_rates(config.drop_path_rate, len(plans))
        blocks = []
        for plan, (_, q, k, _, _), rate in zip(plans, grids, rates):
            rel_size = (2 * max(q[0], k[0]) - 1, 2 * max(q[1], k[1]) - 1) if config.rel_pos_type == "spatial" else None
            blocks.append(MultiScaleBlock(config, plan, rel_size, rate))
        self.stages = nn.ModuleList()
        for i in range(len(config.depths)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(b for b, p in zip(blocks, plans) if p.stage == i)
            self.stages.append(stage)
        self.num_features = plans[-1].dim_out
        self.norm = nn.LayerNorm(self.num_features, eps=config.norm_eps)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's init: truncated normal (std 0.02) for linear weights, tables, cls token and embedding; zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")) or name in ("cls_token", "pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def num_blocks(self) -> int:
        return sum(self.config.depths)

    def size_step(self) -> Size2:
        """(h, w) every input size must be a multiple of: patch stride times the pooling strides."""
        return (self.config.size_step, self.config.size_step)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the attention maps one inspection at ``size`` keeps (float32, with the bias-free copy)."""
        cfg = self.config
        grids = cfg.block_grids((size[0] // cfg.patch_size, size[1] // cfg.patch_size))
        p = cfg.num_prefix_tokens
        copies = 2 if cfg.rel_pos_type == "spatial" else 1
        return sum(plan.num_heads * (p + g.query[0] * g.query[1]) * (p + g.key[0] * g.key[1]) * 4 * copies
                   for plan, g in zip(cfg.blocks(), grids))  # fmt: skip

    def absolute_embedding(self, grid: Size2) -> Tensor | None:
        """(1, P + h*w, C) absolute embedding for a stage-0 grid (resampled bicubically), or None."""
        if self.pos_embed is None:
            return None
        return resample_abs_pos_embed(self.pos_embed, grid, self.config.grid, self.config.num_prefix_tokens)

    def token_layout(self, grids: BlockGrids) -> TokenLayout:
        """Where a block's queries and pooled keys sit (see :meth:`MViTv2Config.block_grids`); cls first, if any."""
        first = self.config.patch_size / 2
        prefix = ("cls",) * self.config.num_prefix_tokens
        return global_layout(grids.key, grid_pixels(grids.key, grids.key_stride, first), prefix,
                             query_grid=grids.query, query_pixels=grid_pixels(grids.query, grids.query_stride, first))

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, Tensor | None, list]:
        h, w = x.shape[-2:]
        step = self.config.size_step
        if h % step or w % step:
            raise ValueError(f"image size {h}x{w} is not a multiple of {step}, which this MViTv2's patch and pooling "
                             f"strides need; resize to a multiple of {step}")  # fmt: skip
        x = self.patch_embed(x)  # B, C, h, w
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # B, h*w, C
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # B, 1 + h*w, C
        pos = self.absolute_embedding(grid) if position else None  # 1, P + h*w, C
        if pos is not None:
            x = x + pos
        traces = []
        block_grid = grid
        geometry = iter(self.config.block_grids(grid))
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x, q_grid, k_grid, trace = block(x, block_grid, need_weights, position)
                block_grid = q_grid
                grids = next(geometry)
                if trace is not None:
                    position_tensors = {k: trace[k] for k in ("rel_h", "rel_w", "rel_pos_h", "rel_pos_w") if k in trace}
                    traces.append(BlockTrace(attn=trace["attn"], attn_no_pos=trace["attn_no_pos"], pos_bias=None,
                                             mask=None, grid=q_grid, stage=i, position=position_tensors,
                                             layout=self.token_layout(grids)))  # fmt: skip
        x = self.norm(x)
        p = self.config.num_prefix_tokens
        pooled = x[:, p:].mean(dim=1) if self.config.pool == "avg" else x[:, 0]  # B, C
        return self.head(pooled), grid, pos, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves out the bias and the embedding."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every block's attention over its pooled keys and the two factors of its decomposed bias.

        ``blocks[i].grid`` is the block's query grid; ``blocks[i].layout`` says where its queries and pooled keys
        sit (``key_grid``, input pixels of each token).
        """
        logits, grid, pos, traces = self._run(x, need_weights=True, position=position)
        p = self.config.num_prefix_tokens
        return Inspection(logits=logits, grid=grid, num_prefix_tokens=p, pos_embed=pos, pos_embed_prefix=p,
                          rope_angles=None, blocks=traces, prefix_names=("cls",) * p)  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

#: timm architecture name (no pretrained tag) -> the MViTv2Config fields its registration fixes (timm's
#: ``model_cfgs``; every other field is ``MultiScaleVitCfg``'s default, which this config shares).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "mvitv2_tiny": dict(depths=(1, 2, 5, 2)),
    "mvitv2_small": dict(depths=(1, 2, 11, 2)),
    "mvitv2_base": dict(depths=(2, 3, 16, 3)),
    "mvitv2_large": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, expand_attn=False),
    "mvitv2_small_cls": dict(depths=(1, 2, 11, 2), use_cls_token=True),
    "mvitv2_base_cls": dict(depths=(2, 3, 16, 3), use_cls_token=True),
    "mvitv2_large_cls": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, use_cls_token=True),
    "mvitv2_huge_cls": dict(depths=(4, 8, 60, 8), embed_dim=192, num_heads=3, use_cls_token=True),
}


def fit_positions(state_dict: StateDict, config: MViTv2Config) -> StateDict:
    """Fit a checkpoint's tables to the config's grids: each ``rel_pos_h`` / ``rel_pos_w`` of another length is
    resized linearly (timm's ``checkpoint_filter_fn`` rule), a square ``pos_embed`` resampled bicubically."""
    out = resample_pos_embed(state_dict, config.grid, config.num_prefix_tokens)
    blocks = [(i, j) for i, depth in enumerate(config.depths) for j in range(depth)]
    for (i, j), grids in zip(blocks, config.block_grids()):
        for axis, name in enumerate(("rel_pos_h", "rel_pos_w")):
            key = f"stages.{i}.blocks.{j}.attn.{name}"
            length = 2 * max(grids.query[axis], grids.key[axis]) - 1
            if key in out and out[key].ndim == 2 and out[key].shape[0] != length:
                out[key] = resize_rel_pos(out[key], length)  # length, hd
    return out


ARCHITECTURE = Architecture(
    model_type="posenc_mvitv2",
    config=MViTv2Config,
    model=MViTv2,
    timm_presets=TIMM_PRESETS,
    timm_rules=TIMM_RULES,  # head.fc -> head; every other name is timm's
    fit_positions=fit_positions,
)
