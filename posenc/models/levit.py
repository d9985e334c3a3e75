"""LeViT: a convolutional stem, then stages of attention with a learned bias per absolute offset.

Names follow timm's ``levit.py`` (the linear, not the ``_conv``, variants): ``stem.conv{i}.{linear,bn}``,
``stages.i.downsample.{attn_downsample,mlp}`` (attention subsampling at the start of stages 1..),
``stages.i.blocks.j.{attn,mlp}``, ``head.{bn,linear}``, ``head_dist.{bn,linear}``. Every linear layer is followed
by a BatchNorm (``{linear,bn}``), as in timm; BatchNorms run on their running statistics at inference.

Position: every attention adds ``attention_biases[h, |dy| * w + |dx|]`` to its logits, one learned value per
head and absolute offset between query and key on the stage grid (:func:`posenc.encodings.offset_bias_index`),
so the bias is symmetric in both axes. The attention-subsampling layers' queries sit on every second row and
column of their key grid.

At another input size the stage grids change, and with them the offsets a table must cover. posenc resizes
each (heads, h, w) table bicubically (with antialiasing) to the new stage grid, as timm resizes these tables
when it loads a checkpoint into a model of another size (``resize_rel_pos_bias_table_levit``), and rebuilds the
index. Sizes must be multiples of the stem's stride (16, or 8 for the ``_s8`` stems).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from posenc.encodings import Size2, offset_bias_index, resample_abs_pos_embed, to_2tuple
from posenc.models.declare import Architecture, Rule, TransformersType, UnsupportedModelError
from posenc.models.layers import (
    BlockTrace,
    Inspection,
    PosencModel,
    config_from_dict,
    global_layout,
    grid_pixels,
    normalise_config,
)
from posenc.preprocess import Preprocess

_ACTIVATIONS = {"hard_swish": nn.Hardswish, "silu": nn.SiLU}
_STEM_STRIDES = {"s16": 16, "s8": 8}


@dataclass(frozen=True)
class LeViTConfig:
    """Everything that defines a LeViT; saved as ``config.json``. Per-stage fields take one value per stage."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) the biases were trained for
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dim: tuple[int, ...] = (128, 256, 384)  # width of each stage
    key_dim: tuple[int, ...] = (16, 16, 16)  # query/key channels per head, per stage (subsampling uses stage 0's)
    depth: tuple[int, ...] = (2, 3, 4)  # attention blocks per stage
    num_heads: tuple[int, ...] = (4, 6, 8)
    attn_ratio: tuple[float, ...] = ()  # value channels per head = attn_ratio * key_dim; () is 2.0 in every stage
    mlp_ratio: tuple[float, ...] = ()  # () is 2.0 in every stage
    stem_type: str = "s16"  # "s16": four stride-2 convs; "s8": three
    act_layer: str = "hard_swish"  # "hard_swish" | "silu"
    distilled: bool = True  # a distillation head whose logits are averaged with the class head's
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_levit"

    def __post_init__(self) -> None:
        stages = len(self.embed_dim) if isinstance(self.embed_dim, (list, tuple)) else 1
        for name in ("key_dim", "num_heads", "attn_ratio", "mlp_ratio", "depth", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # timm takes one value for all stages
                object.__setattr__(self, name, (value,) * stages)
        for name in ("attn_ratio", "mlp_ratio"):
            if not getattr(self, name):
                object.__setattr__(self, name, (2.0,) * stages)
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        for name in ("key_dim", "num_heads", "attn_ratio", "mlp_ratio", "depth"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)} must give one value for each of the {stages} stages")
        if self.stem_type not in _STEM_STRIDES:
            raise ValueError(f"stem_type must be one of {sorted(_STEM_STRIDES)}, got {self.stem_type!r}")
        if self.act_layer not in _ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(_ACTIVATIONS)}, got {self.act_layer!r}")
        stride = self.patch_size
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ValueError(f"img_size {self.img_size} must be a multiple of the stem stride {stride}")
        for i in range(1, stages):
            if self.embed_dim[i - 1] % self.key_dim[0]:
                raise ValueError(f"embed_dim[{i - 1}]={self.embed_dim[i - 1]} is not divisible by key_dim[0]="
                                 f"{self.key_dim[0]} (the subsampling attention's heads)")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def patch_size(self) -> int:
        """The stem's total stride: input pixels per token of stage 0."""
        return _STEM_STRIDES[self.stem_type]

    @property
    def grid(self) -> Size2:
        """(h, w) token grid of stage 0 at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """A learned bias per head and absolute offset in every attention."""
        return ("offset_bias",)

    def stage_grids(self, grid: Size2 | None = None) -> list[Size2]:
        """Each stage's token grid for a stage-0 grid (default the native one): halved, rounded up, per stage."""
        h, w = grid or self.grid
        out = []
        for i in range(len(self.depth)):
            if i:
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            out.append((h, w))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeViTConfig:
        return config_from_dict(cls, data)


class ConvNorm(nn.Module):
    """Conv2d without bias, then BatchNorm2d (timm names: ``linear``, ``bn``)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """Linear without bias, then BatchNorm1d over the channels of every token (timm names: ``linear``, ``bn``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C')."""
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)  # B*N, C' -> B, N, C'


class NormLinear(nn.Module):
    """BatchNorm1d, then a linear classifier (timm names: ``bn``, ``linear``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.bn(x))


class Subsample(nn.Module):
    """Every second token of every second row of a (B, h*w, C) token grid."""

    def forward(self, x: Tensor, grid: Size2) -> Tensor:
        b, _, c = x.shape
        return x.view(b, grid[0], grid[1], c)[:, ::2, ::2].reshape(b, -1, c)  # B, h'*w', C


class _SubsampleQuery(nn.Module):
    """Queries of the subsampling attention: subsample, then project (timm names: ``down``, ``ln``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.down = Subsample()
        self.ln = LinearNorm(in_dim, out_dim)

    def forward(self, x: Tensor, grid: Size2) -> Tensor:
        return self.ln(self.down(x, grid))


class _Projection(nn.Module):
    """Activation, then a LinearNorm (timm names: ``act``, ``ln``)."""

    def __init__(self, in_dim: int, out_dim: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.act = act()
        self.ln = LinearNorm(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.act(x))


class OffsetBiasAttention(nn.Module):
    """Attention with one learned bias per head and absolute offset; ``stride`` 2 subsamples the queries.

    ``attention_biases`` is (heads, h*w) for the stage grid ``resolution`` it was trained at.
    """

    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: Size2,
        act: type[nn.Module], *, stride: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.key_dim, self.stride = num_heads, key_dim, stride
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = tuple(resolution)
        if stride == 1:
            self.qkv = LinearNorm(in_dim, num_heads * (2 * key_dim + self.val_dim))
        else:
            self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.val_dim))
            self.q = _SubsampleQuery(in_dim, num_heads * key_dim)
        self.proj = _Projection(num_heads * self.val_dim, out_dim, act)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.resolution[0] * self.resolution[1]))
        self.register_buffer("attention_bias_idxs", offset_bias_index(self.resolution, stride), persistent=False)

    def bias_table(self, grid: Size2) -> Tensor:
        """(heads, h, w) bias by absolute offset (|dy|, |dx|) for a key grid; resized bicubically off the trained one."""
        table = self.attention_biases
        if tuple(grid) != self.resolution:
            table = resample_abs_pos_embed(table.T[None], grid, self.resolution, num_prefix=0)[0].T  # heads, h*w
        return table.reshape(self.num_heads, grid[0], grid[1])  # heads, h, w

    def position_bias(self, grid: Size2) -> tuple[Tensor, Tensor]:
        """The (heads, Nq, Nk) bias added to the logits for a key grid, and the (heads, h, w) table it came from."""
        table = self.bias_table(grid)  # heads, h, w
        if tuple(grid) == self.resolution:
            index = self.attention_bias_idxs
        else:
            index = offset_bias_index(grid, self.stride, device=table.device)  # Nq, Nk
        # index_select on the flattened index: the same values as table[:, index], a fraction of aten::index's time
        bias = table.flatten(1).index_select(1, index.flatten()).view(self.num_heads, *index.shape)  # heads, Nq, Nk
        return bias, table

    def forward(
        self, x: Tensor, grid: Size2, *, need_weights: bool = False, position: bool = True
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(B, h*w, C) -> (B, Nq, C'), plus the attention, the bias and its table when ``need_weights``."""
        b, n, _ = x.shape
        if self.stride == 1:
            q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split(
                [self.key_dim, self.key_dim, self.val_dim], dim=3)  # B, N, heads, d each
        else:
            k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
            q = self.q(x, grid).view(b, -1, self.num_heads, self.key_dim)  # B, Nq, heads, kd
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B, heads, N, d
        bias, table = self.position_bias(grid) if position else (None, None)  # heads, Nq, Nk
        # timm's own ops (SDPA would fall back to its unfused math kernel: values are wider than keys)
        logits = (q @ k.transpose(-2, -1)) * self.key_dim**-0.5  # B, heads, Nq, Nk
        attn = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = attn @ v  # B, heads, Nq, vd
        trace = None
        if need_weights:
            trace = {"attn": attn, "attn_no_pos": None if bias is None else logits.softmax(dim=-1), "bias": bias,
                     "table": table}  # fmt: skip
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)  # B, Nq, heads*vd
        return self.proj(out), trace


class LevitMlp(nn.Module):
    """LinearNorm, activation, LinearNorm (timm names: ``ln1``, ``ln2``)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = act()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitDownsample(nn.Module):
    """Attention subsampling (queries on every second row and column), then a residual MLP."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, resolution: Size2, act: type[nn.Module]) -> None:
        super().__init__()
        self.attn_downsample = OffsetBiasAttention(
            in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, resolution, act, stride=2
        )
        self.mlp = LevitMlp(out_dim, out_dim * 2, act)

    def forward(self, x: Tensor, grid: Size2, position: bool, need_weights: bool = False
                ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(B, h*w, C) -> (B, h'*w', C'), plus the subsampling attention's tensors when ``need_weights``."""
        x, parts = self.attn_downsample(x, grid, need_weights=need_weights, position=position)
        return x + self.mlp(x), parts


class LevitBlock(nn.Module):
    """Residual attention with offset biases, then a residual MLP."""

    def __init__(self, dim: int, key_dim: int, heads: int, attn_ratio: float, mlp_ratio: float, resolution: Size2,
                 act: type[nn.Module]) -> None:  # fmt: skip
        super().__init__()
        self.attn = OffsetBiasAttention(dim, dim, key_dim, heads, attn_ratio, resolution, act)
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor, grid: Size2, need_weights: bool, position: bool) -> tuple[Tensor, BlockTrace | None]:
        """(B, h*w, C) -> (B, h*w, C), plus the block's trace when ``need_weights``."""
        y, parts = self.attn(x, grid, need_weights=need_weights, position=position)
        x = x + y
        x = x + self.mlp(x)
        if parts is None:
            return x, None
        position_tensors = {} if parts["table"] is None else {"offset_bias_table": parts["table"]}
        return x, BlockTrace(attn=parts["attn"], attn_no_pos=parts["attn_no_pos"], pos_bias=parts["bias"], mask=None,
                             grid=tuple(grid), position=position_tensors)  # fmt: skip


class LevitStage(nn.Module):
    """Optional attention subsampling (stages 1..), then ``depth`` attention blocks."""

    def __init__(self, stage: int, config: LeViTConfig) -> None:
        super().__init__()
        act = _ACTIVATIONS[config.act_layer]
        grids = config.stage_grids()
        dim = config.embed_dim[stage]
        if stage:
            self.downsample = LevitDownsample(config.embed_dim[stage - 1], dim, config.key_dim[0], grids[stage - 1], act)
        else:
            self.downsample = None
        self.blocks = nn.ModuleList(
            LevitBlock(dim, config.key_dim[stage], config.num_heads[stage], config.attn_ratio[stage],
                       config.mlp_ratio[stage], grids[stage], act)
            for _ in range(config.depth[stage])
        )  # fmt: skip


class LeViT(PosencModel):
    """LeViT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's attention and offset bias."""

    architecture = "levit"

    def __init__(self, config: LeViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, LeViTConfig) else LeViTConfig.from_dict(config)
        self._hub_mixin_config = config
        act = _ACTIVATIONS[config.act_layer]
        width = config.embed_dim[0]
        chans = [config.in_chans] + [width // 2**k for k in range(config.patch_size.bit_length() - 2, -1, -1)]
        stem: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]), start=1):  # s16: C/8, C/4, C/2, C
            stem.append((f"conv{i}", ConvNorm(a, b)))
            if i < len(chans) - 1:
                stem.append((f"act{i}", act()))
        self.stem = nn.Sequential(OrderedDict(stem))
        self.stages = nn.ModuleList(LevitStage(i, config) for i in range(len(config.depth)))
        self.head = NormLinear(config.embed_dim[-1], config.num_classes) if config.num_classes else nn.Identity()
        if config.distilled and config.num_classes:
            self.head_dist = NormLinear(config.embed_dim[-1], config.num_classes)
        else:
            self.head_dist = None

    @property
    def num_blocks(self) -> int:
        """Attentions listed by :meth:`inspect`: every block's and the subsampling attention between stages."""
        return sum(self.config.depth) + len(self.config.depth) - 1

    def size_step(self) -> Size2:
        """(h, w) every input size must be a multiple of: the stem's stride."""
        return (self.config.patch_size, self.config.patch_size)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the attention maps one inspection at ``size`` keeps (with and without the bias, float32)."""
        cfg = self.config
        grids = cfg.stage_grids((size[0] // cfg.patch_size, size[1] // cfg.patch_size))
        tokens = [g[0] * g[1] for g in grids]
        blocks = sum(d * h * n**2 for d, h, n in zip(cfg.depth, cfg.num_heads, tokens))
        subsampling = sum(cfg.embed_dim[i] // cfg.key_dim[0] * tokens[i] * tokens[i + 1] for i in range(len(grids) - 1))
        return (blocks + subsampling) * 4 * 2

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, list[BlockTrace]]:
        h, w = x.shape[-2:]
        s = self.config.patch_size
        if h % s or w % s:
            raise ValueError(f"image size {h}x{w} is not a multiple of LeViT's stem stride {s}; resize to a multiple of {s}")
        x = self.stem(x)  # B, C, h, w
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # B, h*w, C
        traces = []
        stage_grid = grid
        stride, first = s, s / 2  # each stage token stands for the stem patch it was subsampled from
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x, parts = stage.downsample(x, stage_grid, position, need_weights)
                query_grid = ((stage_grid[0] - 1) // 2 + 1, (stage_grid[1] - 1) // 2 + 1)
                stride *= 2
                if parts is not None:  # queries on every second row and column of the key grid
                    layout = global_layout(stage_grid, grid_pixels(stage_grid, stride // 2, first), query_grid=query_grid,
                                           query_pixels=grid_pixels(query_grid, stride, first))
                    table = {} if parts["table"] is None else {"offset_bias_table": parts["table"]}
                    traces.append(BlockTrace(attn=parts["attn"], attn_no_pos=parts["attn_no_pos"], pos_bias=parts["bias"],
                                             mask=None, grid=stage_grid, stage=i, position=table, layout=layout))
                stage_grid = query_grid
            layout = global_layout(stage_grid, grid_pixels(stage_grid, stride, first)) if need_weights else None
            for block in stage.blocks:
                x, trace = block(x, stage_grid, need_weights, position)
                if trace is not None:
                    traces.append(replace(trace, stage=i, layout=layout))
        pooled = x.mean(dim=1)  # B, C
        logits = self.head(pooled)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(pooled)) / 2
        return logits, grid, traces

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves every offset bias out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every attention block's attention, offset bias and bias table (see module docstring)."""
        logits, grid, traces = self._run(x, need_weights=True, position=position)
        return Inspection(logits=logits, grid=grid, num_prefix_tokens=0, pos_embed=None, pos_embed_prefix=0,
                          rope_angles=None, blocks=traces)  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

_S16 = dict(stem_type="s16", act_layer="hard_swish", img_size=224)


def _preset(embed_dim: tuple[int, ...], key_dim: int, heads: tuple[int, ...], depth: tuple[int, ...], **kw: Any) -> dict:
    return {**_S16, "embed_dim": embed_dim, "key_dim": key_dim, "num_heads": heads, "depth": depth, **kw}


#: timm architecture name (no pretrained tag) -> the LeViTConfig fields its registration fixes (linear variants).
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "levit_128s": _preset((128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "levit_128": _preset((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "levit_192": _preset((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "levit_256": _preset((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "levit_384": _preset((384, 512, 768), 32, (6, 9, 12), (4, 4, 4)),
    "levit_384_s8": _preset((384, 512, 768), 32, (6, 9, 12), (4, 4, 4), act_layer="silu", stem_type="s8"),
    "levit_512_s8": _preset((512, 640, 896), 64, (8, 10, 14), (4, 4, 4), act_layer="silu", stem_type="s8",
                            distilled=False),
    "levit_512": _preset((512, 768, 1024), 64, (8, 12, 16), (4, 4, 4), act_layer="silu", distilled=False),
    "levit_256d": _preset((256, 384, 512), 32, (4, 6, 8), (4, 8, 6), act_layer="silu", distilled=False),
    "levit_512d": _preset((512, 640, 768), 64, (8, 10, 12), (4, 8, 6), act_layer="silu", distilled=False),
}



def _levit_from_transformers(config: dict[str, Any], common: dict[str, Any]) -> LeViTConfig:
    stem = (config.get("kernel_size", 3), config.get("stride", 2), config.get("padding", 1), config.get("patch_size", 16))
    if stem != (3, 2, 1, 16):
        raise UnsupportedModelError(f"LeViT stem (kernel, stride, padding, patch) {stem} is not supported; posenc "
                                    "rebuilds the 16-pixel stem of four 3x3 stride-2 convolutions")  # fmt: skip
    keep = ("img_size", "in_chans", "num_classes", "labels")
    pp = common["preprocess"]
    if pp.crop_mode == "center":  # LevitImageProcessor resizes the shorter side to int(256 / 224 * shortest_edge)
        shortest = round(pp.input_size[0] / pp.crop_pct)
        pp = replace(pp, crop_pct=pp.input_size[0] / int(256 / 224 * shortest))
    return LeViTConfig(
        preprocess=pp,
        embed_dim=tuple(config["hidden_sizes"]),
        key_dim=tuple(config["key_dim"]),
        depth=tuple(config["depths"]),
        num_heads=tuple(config["num_attention_heads"]),
        attn_ratio=tuple(float(r) for r in config["attention_ratio"]),
        mlp_ratio=tuple(float(r) for r in config["mlp_ratio"]),
        distilled="LevitForImageClassificationWithTeacher" in (config.get("architectures") or []),
        **{k: common[k] for k in keep},
    )


def _levit_transformers_rules(config: LeViTConfig) -> list[Rule]:
    """transformers LeViT keys to timm's: stage s's layers 2j and 2j+1 are block j's attention and MLP, layer
    2*depth (the subsampling attention) and 2*depth+1 (its MLP) start stage s + 1 in timm."""

    def layer(m: re.Match) -> str:
        s, i = int(m[1]), int(m[2])
        d = config.depth[s]
        if i < 2 * d:
            return f"stages.{s}.blocks.{i // 2}.{'mlp' if i % 2 else 'attn'}."
        return f"stages.{s + 1}.downsample.{'mlp' if i > 2 * d else 'attn_downsample'}."

    return [
        (r"^levit\.patch_embeddings\.embedding_layer_(\d)\.convolution\.", r"stem.conv\1.linear."),
        (r"^levit\.patch_embeddings\.embedding_layer_(\d)\.batch_norm\.", r"stem.conv\1.bn."),
        (r"^levit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(module\.)?", layer),
        (r"\.queries_keys_values\.", ".qkv."),
        (r"\.keys_values\.", ".kv."),
        (r"\.queries\.", ".q.ln."),
        (r"\.projection\.", ".proj.ln."),
        (r"\.linear_up\.", ".ln1."),
        (r"\.linear_down\.", ".ln2."),
        (r"^classifier_distill\.", "head_dist."),
        (r"^classifier\.", "head."),
        (r"\.batch_norm\.", ".bn."),
    ]


ARCHITECTURE = Architecture(
    model_type="posenc_levit",
    config=LeViTConfig,
    model=LeViT,
    timm_presets=TIMM_PRESETS,
    transformers={
        "levit": TransformersType(
            ("LevitForImageClassification", "LevitForImageClassificationWithTeacher"),
            _levit_from_transformers,
            _levit_transformers_rules,  # the layer numbering depends on the stage depths
        ),
    },
    derived=("attention_bias_idxs",),  # the offset index is rebuilt for the grid in use
)
