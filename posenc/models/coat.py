"""CoaT (lite and full): four serial stages of conv-attentional blocks, then (full CoaT) parallel blocks over scales 2-4.

Names follow timm's ``coat.py``: ``patch_embed{1..4}.{proj,norm}`` (4 pixels, then 2x2 token merging),
``cls_token{1..4}`` (a cls token per stage), ``cpe{1..4}.proj``, ``crpe{1..4}.conv_list.i``,
``serial_blocks{1..4}.j.{norm1,factoratt_crpe.{qkv,proj},norm2,mlp.{fc1,fc2}}``,
``parallel_blocks.j.{norm12..14,factoratt_crpe2..4,norm22..24,mlp2}``, ``norm2``/``norm3`` (full), ``norm4``,
``aggregate`` (full: a 1x1 Conv1d over the three scales' pooled tokens), ``head``. timm registers a stage's ``cpe``
and ``crpe`` inside every block that shares them, and the parallel blocks' one MLP as ``mlp2``, ``mlp3`` and ``mlp4``;
posenc keeps each once, under the first name (:data:`TIMM_RULES` folds the others onto it).

Attention is **factorised**: ``q @ (softmax_over_tokens(k)^T @ v) * scale``. Keys are normalised over the tokens and
folded with the values into a (head_dim, head_dim) context per head, so no (N, N) token map exists; an inspection's
``attn`` is that context, (B, heads, head_dim, head_dim), channels over channels (as XCiT's channel attention).

Position, both from depthwise convolutions with zero padding (:mod:`posenc.mechanisms.conv_pos`):

* **CPE** (``cpe``): before every block, the patch tokens get ``conv(x)`` added (3x3, the cls token untouched);
  ``position["conv_pos"]`` is that contribution, (B, C, h, w).
* **CRPE** (``crpe``): inside the attention, ``q * conv(v)`` is added to its output, the convolution depthwise over
  each head's values with a window per head group (3x3 for 2 heads, 5x5 for 3, 7x7 for 3 by default);
  ``position["conv_rel_pos"]`` is that term for the patch tokens, (B, heads, h*w, head_dim).

``position=False`` leaves both out. Nothing is sized by the input: any size a multiple of 32 runs (the parallel
blocks' 2x and 4x resampling between scales needs exact halvings).
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
    Mlp,
    PatchEmbed,
    PosencModel,
    config_from_dict,
    init_weights,
    normalise_config,
)
from posenc.preprocess import Preprocess


@dataclass(frozen=True)
class CoaTConfig:
    """Everything that defines a CoaT; saved as ``config.json``. Per-stage fields take one value for each of 4 stages."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) of the checkpoint's preprocessing; nothing is sized by it
    patch_size: int = 4  # pixels per token of stage 1; later stages merge 2x2 tokens
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    serial_depths: tuple[int, ...] = (3, 4, 6, 3)
    parallel_depth: int = field(default=0, metadata={"min": 0})  # full CoaT: parallel blocks over scales 2-4
    num_heads: int = 8
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    qkv_bias: bool = True
    # CRPE kernels: (window, heads) pairs, the heads taking that window in order; timm's dict {3: 2, 5: 3, 7: 3}
    crpe_window: tuple[tuple[int, int], ...] = ((3, 2), (5, 3), (7, 3))
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg")})
    norm_eps: float = 1e-6  # blocks and the final norms (the patch embeddings' norms use 1e-5, as timm)
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_coat"

    def __post_init__(self) -> None:
        if isinstance(self.crpe_window, dict):  # timm's form; JSON makes its keys strings
            object.__setattr__(self, "crpe_window", tuple((int(k), v) for k, v in self.crpe_window.items()))
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        for name in ("embed_dims", "serial_depths", "mlp_ratios"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name}={getattr(self, name)} must give one value for each of CoaT's 4 stages")
        for dim in self.embed_dims:
            if dim % self.num_heads:
                raise ValueError(f"embed_dims {dim} is not divisible by num_heads={self.num_heads}")
        if sum(heads for _, heads in self.crpe_window) != self.num_heads:
            raise ValueError(f"crpe_window {self.crpe_window} gives kernels to "
                             f"{sum(h for _, h in self.crpe_window)} heads, not num_heads={self.num_heads}")
        if any(window % 2 == 0 for window, _ in self.crpe_window):
            raise ValueError(f"crpe_window {self.crpe_window}: windows must be odd")
        if self.parallel_depth and not (len(set(self.embed_dims[1:])) == 1 and len(set(self.mlp_ratios[1:])) == 1):
            raise ValueError("parallel blocks need embed_dims and mlp_ratios equal over stages 2-4, got "
                             f"{self.embed_dims} and {self.mlp_ratios}")  # fmt: skip
        step = self.size_step
        if self.img_size[0] % step or self.img_size[1] % step:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {step}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def size_step(self) -> int:
        """Input sides must be multiples of this: the patch times 2 for each of the 3 later stages."""
        return self.patch_size * 8

    @property
    def grid(self) -> Size2:
        """(h, w) token grid of stage 1 at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def depth(self) -> int:
        """Entries of an inspection: the serial blocks, then each parallel block once per scale 2-4."""
        return sum(self.serial_depths) + 3 * self.parallel_depth

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The convolutional position encoding on the tokens and the convolutional relative one on the values."""
        return ("conv_pos", "conv_rel_pos")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoaTConfig:
        return config_from_dict(cls, data)


#: Why a CoaT block has no token layout (its ``BlockTrace.no_layout``).
NO_TOKEN_MAP = ("CoaT's factorised attention has no token-to-token map: keys are normalised over the tokens and folded "
                "with the values into a head_dim x head_dim context per head (channels over channels)")


class ConvPosEnc(nn.Module):
    """CoaT's CPE: a depthwise conv with zero padding adds conv(x) to the patch tokens (timm name ``proj``)."""

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: Tensor, grid: Size2) -> tuple[Tensor, Tensor]:
        """(B, 1 + h*w, C) -> the same tokens with the conv added to the patches, and the conv alone (B, C, h, w)."""
        b, _, c = x.shape
        feat = x[:, 1:].transpose(1, 2).reshape(b, c, *grid)  # B, C, h, w
        delta = self.proj(feat)  # B, C, h, w
        return torch.cat([x[:, :1], (delta + feat).flatten(2).transpose(1, 2)], dim=1), delta  # B, 1 + h*w, C


class ConvRelPosEnc(nn.Module):
    """CoaT's CRPE: ``q * conv(v)``, one depthwise conv per head group (timm name ``conv_list``)."""

    def __init__(self, head_dim: int, windows: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.splits = [heads * head_dim for _, heads in windows]
        self.conv_list = nn.ModuleList(
            nn.Conv2d(chs, chs, window, padding=window // 2, groups=chs) for (window, _), chs in zip(windows, self.splits)
        )  # fmt: skip

    def forward(self, q: Tensor, v: Tensor, grid: Size2) -> Tensor:
        """(B, heads, 1 + h*w, hd) queries and values -> (B, heads, h*w, hd) term of the patch tokens."""
        b, heads, _, hd = q.shape
        v_img = v[:, :, 1:].transpose(-1, -2).reshape(b, heads * hd, *grid)  # B, heads*hd, h, w
        parts = [conv(part) for conv, part in zip(self.conv_list, torch.split(v_img, self.splits, dim=1))]
        conv_v = torch.cat(parts, dim=1).reshape(b, heads, hd, -1).transpose(-1, -2)  # B, heads, h*w, hd
        return q[:, :, 1:] * conv_v


class FactorAttnConvRelPosEnc(nn.Module):
    """Factorised attention plus the CRPE term (timm names: qkv, proj; the stage's CRPE is passed in)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: Size2, crpe: ConvRelPosEnc | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, 1 + h*w, C) -> (B, 1 + h*w, C), the (B, heads, hd, hd) context and the CRPE term (None without)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # B, heads, N, hd each
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # B, heads, hd, hd: keys normalised over the tokens
        out = self.scale * (q @ context)  # B, heads, N, hd
        term = None
        if crpe is not None:
            term = crpe(q, v, grid)  # B, heads, h*w, hd
            out = out + F.pad(term, (0, 0, 1, 0))  # the cls token gets no term
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), context, term  # B, N, C


class SerialBlock(nn.Module):
    """CPE, then x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, grid: Size2, cpe: ConvPosEnc | None, crpe: ConvRelPosEnc | None
                ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """(B, 1 + h*w, C) -> (B, 1 + h*w, C) and the block's tensors (context, CPE and CRPE terms)."""
        parts = {}
        if cpe is not None:
            x, parts["conv_pos"] = cpe(x, grid)
        y, parts["context"], term = self.factoratt_crpe(self.norm1(x), grid, crpe)
        if term is not None:
            parts["conv_rel_pos"] = term
        x = x + y
        return x + self.mlp(self.norm2(x)), parts


def _resample(x: Tensor, grid: Size2, factor: float) -> Tensor:
    """Bilinear resampling of the patch tokens by ``factor``, the cls token kept: (B, 1 + h*w, C) -> (B, 1 + h'*w', C)."""
    b, _, c = x.shape
    img = x[:, 1:].transpose(1, 2).reshape(b, c, *grid)  # B, C, h, w
    img = F.interpolate(img, scale_factor=factor, recompute_scale_factor=False, mode="bilinear", align_corners=False)
    return torch.cat([x[:, :1], img.reshape(b, c, -1).transpose(1, 2)], dim=1)  # B, 1 + h'*w', C


class ParallelBlock(nn.Module):
    """Scales 2-4 attend each on its own grid, then mix: each adds the others' attention outputs resampled to its grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        for s in (2, 3, 4):
            self.add_module(f"norm1{s}", nn.LayerNorm(dim, eps=eps))
            self.add_module(f"factoratt_crpe{s}", FactorAttnConvRelPosEnc(dim, num_heads, qkv_bias))
            self.add_module(f"norm2{s}", nn.LayerNorm(dim, eps=eps))
        self.mlp2 = Mlp(dim, int(dim * mlp_ratio))  # one MLP for the three scales (timm: mlp2 = mlp3 = mlp4)

    def forward(self, xs: list[Tensor], grids: list[Size2], crpes: list[ConvRelPosEnc | None]
                ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:  # fmt: skip
        """Scales 2-4 (B, 1 + h_s*w_s, C) -> the same, and each scale's tensors (context, CRPE term)."""
        cur, parts = [], []
        for s, x, grid, crpe in zip((2, 3, 4), xs, grids, crpes):
            y, context, term = getattr(self, f"factoratt_crpe{s}")(getattr(self, f"norm1{s}")(x), grid, crpe)
            cur.append(y)
            parts.append({"context": context} | ({} if term is None else {"conv_rel_pos": term}))
        c2, c3, c4 = cur
        g2, g3, g4 = grids
        mixed = [
            c2 + _resample(c3, g3, 2.0) + _resample(c4, g4, 4.0),
            c3 + _resample(c4, g4, 2.0) + _resample(c2, g2, 0.5),
            c4 + _resample(c3, g3, 0.5) + _resample(c2, g2, 0.25),
        ]
        out = []
        for s, x, y in zip((2, 3, 4), xs, mixed):
            x = x + y
            out.append(x + self.mlp2(getattr(self, f"norm2{s}")(x)))
        return out, parts


class CoaT(PosencModel):
    """CoaT classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's context and position terms."""

    architecture = "coat"

    def __init__(self, config: CoaTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, CoaTConfig) else CoaTConfig.from_dict(config)
        self._hub_mixin_config = config
        dims, heads = config.embed_dims, config.num_heads
        for i, dim in enumerate(dims, start=1):
            self.add_module(f"patch_embed{i}", PatchEmbed(config.patch_size if i == 1 else 2,
                                                          config.in_chans if i == 1 else dims[i - 2], dim, norm=True))
            self.register_parameter(f"cls_token{i}", nn.Parameter(torch.zeros(1, 1, dim)))
            self.add_module(f"cpe{i}", ConvPosEnc(dim))
            self.add_module(f"crpe{i}", ConvRelPosEnc(dim // heads, config.crpe_window))
            self.add_module(f"serial_blocks{i}", nn.ModuleList(
                SerialBlock(dim, heads, config.mlp_ratios[i - 1], config.qkv_bias, config.norm_eps)
                for _ in range(config.serial_depths[i - 1])))  # fmt: skip
        full = config.parallel_depth > 0
        self.parallel_blocks = nn.ModuleList(
            ParallelBlock(dims[1], heads, config.mlp_ratios[1], config.qkv_bias, config.norm_eps)
            for _ in range(config.parallel_depth)
        ) if full else None  # fmt: skip
        self.norm2 = nn.LayerNorm(dims[1], eps=config.norm_eps) if full else None
        self.norm3 = nn.LayerNorm(dims[2], eps=config.norm_eps) if full else None
        self.norm4 = nn.LayerNorm(dims[3], eps=config.norm_eps)
        self.aggregate = nn.Conv1d(3, 1, kernel_size=1) if full else None
        self.head = nn.Linear(dims[3], config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        for i in range(1, 5):
            nn.init.trunc_normal_(getattr(self, f"cls_token{i}"), std=0.02)

    @property
    def num_blocks(self) -> int:
        return self.config.depth

    def size_step(self) -> Size2:
        """(h, w) every input size must be a multiple of: the patch times 8."""
        return (self.config.size_step, self.config.size_step)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes one inspection at ``size`` keeps (float32): contexts, CPE and CRPE terms (no token maps)."""
        cfg = self.config
        h, w = size[0] // cfg.patch_size, size[1] // cfg.patch_size
        total = 0
        for i, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.serial_depths)):
            tokens = (h >> i) * (w >> i)
            total += depth * (dim * dim // cfg.num_heads + 2 * dim * tokens) * 4
        for i in (1, 2, 3):
            tokens = (h >> i) * (w >> i)
            total += cfg.parallel_depth * (cfg.embed_dims[i] ** 2 // cfg.num_heads + 2 * cfg.embed_dims[i] * tokens) * 4
        return total

    def _stage(self, i: int, x: Tensor) -> tuple[Tensor, Size2]:
        """Stage i's patch embedding and cls token: (B, C, H, W) image or map -> (B, 1 + h*w, C)."""
        x = getattr(self, f"patch_embed{i}")(x)  # B, h, w, C
        b, h, w, c = x.shape
        cls = getattr(self, f"cls_token{i}").expand(b, -1, -1)  # B, 1, C
        return torch.cat([cls, x.reshape(b, h * w, c)], dim=1), (h, w)  # B, 1 + h*w, C

    def _run(self, x: Tensor, position: bool) -> tuple[Tensor, Size2, list[BlockTrace]]:
        step = self.config.size_step
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {step} (CoaT's patch "
                             f"times its three 2x2 mergings); resize to a multiple of {step}")  # fmt: skip
        traces: list[BlockTrace] = []
        tokens, grids = [], []
        feat = x
        for i in range(1, 5):
            t, grid = self._stage(i, feat)
            cpe = getattr(self, f"cpe{i}") if position else None
            crpe = getattr(self, f"crpe{i}") if position else None
            for block in getattr(self, f"serial_blocks{i}"):
                t, parts = block(t, grid, cpe, crpe)
                traces.append(self._trace(parts, grid, i - 1))
            tokens.append(t)
            grids.append(grid)
            b, _, c = t.shape
            feat = t[:, 1:].transpose(1, 2).reshape(b, c, *grid)  # B, C, h, w
        if self.parallel_blocks is None:
            out = self.norm4(tokens[3])  # B, 1 + h*w, C
            pooled = out[:, 1:].mean(dim=1) if self.config.global_pool == "avg" else out[:, 0]  # B, C
            return self.head(pooled), grids[0], traces
        xs = tokens[1:]
        for block in self.parallel_blocks:
            deltas = [None, None, None]
            if position:
                for j, s in enumerate((2, 3, 4)):
                    xs[j], deltas[j] = getattr(self, f"cpe{s}")(xs[j], grids[s - 1])
            crpes = [getattr(self, f"crpe{s}") if position else None for s in (2, 3, 4)]
            xs, parts = block(xs, grids[1:], crpes)
            for j in range(3):
                extra = {} if deltas[j] is None else {"conv_pos": deltas[j]}
                traces.append(self._trace(parts[j] | extra, grids[j + 1], j + 1))
        outs = [norm(x) for norm, x in zip((self.norm2, self.norm3, self.norm4), xs)]
        if self.config.global_pool == "avg":
            pooled = torch.stack([o[:, 1:].mean(dim=1) for o in outs], dim=1)  # B, 3, C
        else:
            pooled = torch.stack([o[:, 0] for o in outs], dim=1)  # B, 3, C
        return self.head(self.aggregate(pooled).squeeze(1)), grids[0], traces

    @staticmethod
    def _trace(parts: dict[str, Tensor], grid: Size2, stage: int) -> BlockTrace:
        """A block's record: its (B, heads, hd, hd) context as ``attn`` (no token map) and its position terms."""
        position = {k: parts[k] for k in ("conv_pos", "conv_rel_pos") if k in parts}
        return BlockTrace(attn=parts["context"], attn_no_pos=None, pos_bias=None, mask=None, grid=tuple(grid),
                          stage=stage, position=position, layout=None, no_layout=NO_TOKEN_MAP)  # fmt: skip

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves every CPE and CRPE out."""
        return self._run(x, position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus, per serial block and per parallel block and scale, the factorised attention's context
        ``attn`` (B, heads, hd, hd): channels over channels, no token map) and the CPE and CRPE terms."""
        logits, grid, traces = self._run(x, position)
        return Inspection(logits=logits, grid=grid, num_prefix_tokens=1, prefix_names=("cls",), pos_embed=None,
                          pos_embed_prefix=0, rope_angles=None, blocks=traces)  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

_LITE = {"patch_size": 4, "serial_depths": (2, 2, 2, 2), "mlp_ratios": (8, 8, 4, 4), "img_size": 224}
_FULL = {"patch_size": 4, "serial_depths": (2, 2, 2, 2), "parallel_depth": 6, "img_size": 224}

#: timm architecture name (no pretrained tag) -> the CoaTConfig fields its registration fixes.
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "coat_tiny": {**_FULL, "embed_dims": (152, 152, 152, 152)},
    "coat_mini": {**_FULL, "embed_dims": (152, 216, 216, 216)},
    "coat_small": {**_FULL, "embed_dims": (152, 320, 320, 320)},
    "coat_lite_tiny": {**_LITE, "embed_dims": (64, 128, 256, 320)},
    "coat_lite_mini": {**_LITE, "embed_dims": (64, 128, 320, 512)},
    "coat_lite_small": {**_LITE, "embed_dims": (64, 128, 320, 512), "serial_depths": (3, 4, 6, 3)},
    "coat_lite_medium": {"patch_size": 4, "embed_dims": (128, 256, 320, 512), "serial_depths": (3, 6, 10, 8),
                         "img_size": 224},
    "coat_lite_medium_384": {"patch_size": 4, "embed_dims": (128, 256, 320, 512), "serial_depths": (3, 6, 10, 8),
                             "img_size": 384},
}
#: Key rules from timm's layout: a stage's shared CPE / CRPE and the parallel blocks' shared MLP, which timm lists
#: under every module that holds them, kept once under their first name (whichever names a checkpoint kept).
TIMM_RULES: list[tuple[str, str]] = [
    (r"^serial_blocks(\d)\.\d+\.cpe\.", r"cpe\1."),
    (r"^serial_blocks(\d)\.\d+\.factoratt_crpe\.crpe\.", r"crpe\1."),
    (r"^parallel_blocks\.\d+\.factoratt_crpe(\d)\.crpe\.", r"crpe\1."),
    (r"^(parallel_blocks\.\d+)\.mlp[34]\.", r"\1.mlp2."),
]

ARCHITECTURE = Architecture(model_type="posenc_coat", config=CoaTConfig, model=CoaT, timm_presets=TIMM_PRESETS, timm_rules=TIMM_RULES)
