"""Twins (PCPVT and SVT): a four-stage pyramid whose only position is CPVT's position encoding generator (PEG).

Names follow timm's ``twins.py``: ``patch_embeds.i.{proj,norm}`` (a strided conv and a LayerNorm per stage: 4 pixels
for stage 0, then 2x2 token merging), ``blocks.i.j.{norm1,attn,norm2,mlp.{fc1,fc2}}``, ``pos_block.i.proj.0`` (the
PEG of stage i), ``norm``, ``head``. Two attentions:

* **global sub-sampled attention** (GSA; every PCPVT block, the odd SVT blocks): queries from every token, keys and
  values from the stage grid reduced by ``sr`` (a conv with kernel = stride = ``sr_ratio``, then ``norm``), so the
  key grid is (h // sr, w // sr), not the query grid (``attn``: (B, heads, h*w, hk*wk)). Stage 3 (``sr_ratio`` 1)
  attends over the whole grid.
* **locally-grouped attention** (LSA; the even SVT blocks): attention inside non-overlapping ``ws`` x ``ws``
  windows, the grid zero-padded at the bottom and right to whole windows after ``norm1``; padded tokens are not
  masked (``attn``: (B, nW, heads, ws*ws, ws*ws), as Swin's).

Position: after the first block of every stage, ``x = conv(x) + x`` with a depthwise 3x3 conv and zero padding
(:class:`PosConv`). Its contribution ``conv(x)`` depends on the tokens, and at the border it sees zeros: that is
where the model reads where a token lies. An inspection gives it on the trace of the stage's first block,
``position["conv_pos"]`` (B, C, h, w); ``position=False`` leaves every PEG out. There is no other position
encoding, so any size a multiple of 32 (the patch times the three 2x2 mergings) runs as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from posenc.attention import Attention
from posenc.encodings import (
    Size2,
    pad_to_window,
    padded_grid,
    to_2tuple,
    window_partition,
    window_reverse,
)
from posenc.models.declare import Architecture
from posenc.models.layers import (
    BlockTrace,
    DropPath,
    Inspection,
    Mlp,
    PatchEmbed,
    PosencModel,
    TokenLayout,
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
class TwinsConfig:
    """Everything that defines a Twins model; saved as ``config.json``. Per-stage fields take one value per stage."""

    img_size: tuple[int, int] = (224, 224)  # (H, W) of the checkpoint's preprocessing; nothing is sized by it
    patch_size: int = 4  # pixels per token of stage 0; later stages merge 2x2 tokens
    in_chans: int = 3
    num_classes: int = field(default=1000, metadata={"min": 0})  # 0: headless, the model returns pooled features
    embed_dims: tuple[int, ...] = (64, 128, 256, 512)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # key/value reduction of the global sub-sampled attention per stage
    wss: tuple[int, ...] | None = None  # SVT: window side of the locally-grouped blocks per stage; None: PCPVT
    global_pool: str = field(default="avg", metadata={"choices": ("avg",)})
    norm_eps: float = 1e-6  # blocks and the final norm (the patch embeddings' norms use 1e-5, as timm)
    drop_path_rate: float = 0.0
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    model_type: str = "posenc_twins"

    def __post_init__(self) -> None:
        normalise_config(self)
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        stages = len(self.embed_dims)
        for name in ("num_heads", "mlp_ratios", "depths", "sr_ratios") + (("wss",) if self.wss is not None else ()):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)} must give one value for each of the {stages} stages")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed_dims {dim} is not divisible by {heads} heads")
        if self.wss is not None and min(self.wss) < 2:
            raise ValueError(f"wss={self.wss}: windows must be at least 2 tokens wide")
        step = self.size_step
        if self.img_size[0] % step or self.img_size[1] % step:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {step} (patch {self.patch_size} "
                             f"times 2 per later stage)")  # fmt: skip
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def size_step(self) -> int:
        """Input sides must be multiples of this: the patch times 2 for every later stage."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def grid(self) -> Size2:
        """(h, w) token grid of stage 0 at ``img_size``."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """CPVT's position encoding generator: a depthwise conv after the first block of each stage."""
        return ("conv_pos",)

    def window(self, stage: int, block: int) -> int | None:
        """Window side of a locally-grouped block, or None for a global sub-sampled one (odd SVT blocks, all PCPVT)."""
        return None if self.wss is None or block % 2 else self.wss[stage]

    def stage_grids(self, grid: Size2 | None = None) -> list[Size2]:
        """Each stage's token grid for a stage-0 grid (default the native one)."""
        h, w = grid or self.grid
        return [(h // 2**i, w // 2**i) for i in range(len(self.depths))]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinsConfig:
        return config_from_dict(cls, data)


class GlobalSubSampleAttn(nn.Module):
    """Every token queries keys and values taken from the grid reduced by ``sr`` (timm names: q, kv, sr, norm, proj)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = self.norm = None

    def key_grid(self, grid: Size2) -> Size2:
        """(hk, wk) grid of the keys for a (h, w) query grid."""
        return (grid[0] // self.sr_ratio, grid[1] // self.sr_ratio)

    def forward(self, x: Tensor, grid: Size2, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """(B, h*w, C) -> (B, h*w, C), plus the (B, heads, h*w, hk*wk) attention when ``need_weights``."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)  # B, heads, N, hd
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(b, c, *grid))  # B, C, hk, wk
            x = self.norm(x.flatten(2).transpose(1, 2))  # B, hk*wk, C
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # B, heads, Nk, hd
        attn = None
        if need_weights:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, heads, N, Nk
            out = attn @ v  # B, heads, N, hd
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # B, heads, N, hd
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), attn  # B, N, C


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); locally-grouped (``ws``) or global sub-sampled."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, sr_ratio: int, ws: int | None, eps: float,
                 drop_path: float) -> None:  # fmt: skip
        super().__init__()
        self.ws = ws
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = GlobalSubSampleAttn(dim, heads, sr_ratio) if ws is None else Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _local(self, x: Tensor, grid: Size2, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Attention inside ws x ws windows of the zero-padded grid: (B, h*w, C) -> (B, h*w, C)."""
        b, n, c = x.shape
        window = (self.ws, self.ws)
        padded = padded_grid(grid, window)
        y = pad_to_window(x.reshape(b, *grid, c), window)  # B, Hp, Wp, C
        y, trace = self.attn(window_partition(y, window), need_weights=need_weights)  # B, nW, ws*ws, C
        y = window_reverse(y, window, padded)[:, : grid[0], : grid[1]]  # B, h, w, C
        return y.reshape(b, n, c), None if trace is None else trace.attn  # B, h*w, C

    def forward(self, x: Tensor, grid: Size2, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """(B, h*w, C) -> (B, h*w, C), plus the attention when ``need_weights``."""
        if self.ws is None:
            y, attn = self.attn(self.norm1(x), grid, need_weights)
        else:
            y, attn = self._local(self.norm1(x), grid, need_weights)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn


class PosConv(nn.Module):
    """CPVT's position encoding generator: a depthwise 3x3 conv with zero padding (timm name ``proj.0``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))

    def forward(self, x: Tensor, grid: Size2) -> tuple[Tensor, Tensor]:
        """(B, h*w, C) -> the tokens plus the conv's output, and that contribution alone as (B, C, h, w)."""
        b, _, c = x.shape
        delta = self.proj(x.transpose(1, 2).reshape(b, c, *grid))  # B, C, h, w
        return x + delta.flatten(2).transpose(1, 2), delta  # B, h*w, C


class Twins(PosencModel):
    """Twins classifier; ``model(x)`` gives logits, ``model.inspect(x)`` also every block's attention and each PEG."""

    architecture = "twins"

    def __init__(self, config: TwinsConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config = config if isinstance(config, TwinsConfig) else TwinsConfig.from_dict(config)
        self._hub_mixin_config = config
        dims = config.embed_dims
        self.patch_embeds = nn.ModuleList(
            PatchEmbed(config.patch_size if i == 0 else 2, config.in_chans if i == 0 else dims[i - 1], dim, norm=True)
            for i, dim in enumerate(dims)
        )  # fmt: skip
        rates = iter(drop_path_rates(config.drop_path_rate, sum(config.depths)))
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                Block(dims[i], config.num_heads[i], config.mlp_ratios[i], config.sr_ratios[i], config.window(i, j),
                      config.norm_eps, next(rates))
                for j in range(depth)
            )
            for i, depth in enumerate(config.depths)
        )  # fmt: skip
        self.pos_block = nn.ModuleList(PosConv(dim) for dim in dims)
        self.norm = nn.LayerNorm(dims[-1], eps=config.norm_eps)
        self.head = nn.Linear(dims[-1], config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)

    @property
    def num_blocks(self) -> int:
        return sum(self.config.depths)

    def size_step(self) -> Size2:
        """(h, w) every input size must be a multiple of: the patch times 2 for every later stage."""
        return (self.config.size_step, self.config.size_step)

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the attention maps one inspection at ``size`` keeps (float32; no position-free copy)."""
        cfg = self.config
        grids = cfg.stage_grids((size[0] // cfg.patch_size, size[1] // cfg.patch_size))
        total = 0
        for i, (h, w) in enumerate(grids):
            for j in range(cfg.depths[i]):
                ws = cfg.window(i, j)
                if ws is None:
                    keys = (h // cfg.sr_ratios[i]) * (w // cfg.sr_ratios[i])
                    total += cfg.num_heads[i] * h * w * keys * 4
                else:
                    hp, wp = padded_grid((h, w), (ws, ws))
                    total += cfg.num_heads[i] * hp * wp * ws * ws * 4
        return total

    def _run(self, x: Tensor, need_weights: bool, position: bool) -> tuple[Tensor, Size2, list[BlockTrace]]:
        step = self.config.size_step
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {step} (Twins' patch "
                             f"times its three 2x2 mergings); resize to a multiple of {step}")  # fmt: skip
        traces: list[BlockTrace] = []
        first_grid: Size2 = (0, 0)
        for stage, (embed, blocks, peg) in enumerate(zip(self.patch_embeds, self.blocks, self.pos_block)):
            x = embed(x)  # B, h, w, C
            b, h, w, c = x.shape
            grid = (h, w)
            first_grid = first_grid if stage else grid
            x = x.reshape(b, h * w, c)  # B, h*w, C
            for j, block in enumerate(blocks):
                x, attn = block(x, grid, need_weights)
                delta = None
                if j == 0 and position:
                    x, delta = peg(x, grid)  # PEG after the stage's first block
                if need_weights:
                    ws = block.ws
                    traces.append(BlockTrace(
                        attn=attn, attn_no_pos=None, pos_bias=None, mask=None, grid=grid, stage=stage,
                        window=None if ws is None else (ws, ws), shift=None if ws is None else (0, 0),
                        position={} if delta is None else {"conv_pos": delta}, layout=self._layout(block, grid, stage),
                    ))  # fmt: skip
            if stage < len(self.blocks) - 1:
                x = x.transpose(1, 2).reshape(b, c, h, w)  # B, C, h, w
        pooled = self.norm(x).mean(dim=1)  # B, C
        return self.head(pooled), first_grid, traces

    def _layout(self, block: Block, grid: Size2, stage: int) -> TokenLayout:
        """Where a block's queries and keys sit: windows of the stage grid, or every token over the reduced key grid
        (each key at the centre of the sr x sr tokens its conv pooled)."""
        stride = self.config.patch_size * 2**stage  # input pixels per token of this stage
        pixels = grid_pixels(grid, stride)  # h*w, 2
        if block.ws is not None:
            return windowed_layout(grid, (block.ws, block.ws), pixels)
        sr = block.attn.sr_ratio
        if sr == 1:
            return global_layout(grid, pixels)
        keys = block.attn.key_grid(grid)
        return global_layout(keys, grid_pixels(keys, stride * sr), query_grid=grid, query_pixels=pixels)

    def forward(self, x: Tensor, *, position: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits; ``position=False`` leaves every PEG out."""
        return self._run(x, need_weights=False, position=position)[0]

    def inspect(self, x: Tensor, *, position: bool = True) -> Inspection:
        """Logits plus every block's attention; a stage's first block also gives its PEG's contribution.

        A global sub-sampled block's ``attn`` is (B, heads, h*w, hk*wk): its keys lie on the reduced grid.
        """
        logits, grid, traces = self._run(x, need_weights=True, position=position)
        return Inspection(logits=logits, grid=grid, num_prefix_tokens=0, pos_embed=None, pos_embed_prefix=0,
                          rope_angles=None, blocks=traces)  # fmt: skip


# ------------------------------------------------------------------------------------------- timm presets

_PCPVT = {"patch_size": 4, "embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "mlp_ratios": (8, 8, 4, 4),
          "sr_ratios": (8, 4, 2, 1), "img_size": 224}  # fmt: skip
_SVT = {"patch_size": 4, "mlp_ratios": (4, 4, 4, 4), "wss": (7, 7, 7, 7), "sr_ratios": (8, 4, 2, 1), "img_size": 224}

#: timm architecture name (no pretrained tag) -> the TwinsConfig fields its registration fixes.
TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "twins_pcpvt_small": {**_PCPVT, "depths": (3, 4, 6, 3)},
    "twins_pcpvt_base": {**_PCPVT, "depths": (3, 4, 18, 3)},
    "twins_pcpvt_large": {**_PCPVT, "depths": (3, 8, 27, 3)},
    "twins_svt_small": {**_SVT, "embed_dims": (64, 128, 256, 512), "num_heads": (2, 4, 8, 16), "depths": (2, 2, 10, 4)},
    "twins_svt_base": {**_SVT, "embed_dims": (96, 192, 384, 768), "num_heads": (3, 6, 12, 24), "depths": (2, 2, 18, 2)},
    "twins_svt_large": {**_SVT, "embed_dims": (128, 256, 512, 1024), "num_heads": (4, 8, 16, 32),
                        "depths": (2, 2, 18, 2)},
}

ARCHITECTURE = Architecture(model_type="posenc_twins", config=TwinsConfig, model=Twins, timm_presets=TIMM_PRESETS)
