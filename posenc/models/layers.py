"""Building blocks shared by the ViT and Swin models, the inspection records, and the Hub mixin base."""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import Tensor, nn

from posenc.encodings import Size2


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided conv, then an optional LayerNorm.

    Returns (B, h, w, C) so both models can take it from there.
    """

    def __init__(
        self, patch_size: int, in_chans: int, embed_dim: int, *, norm: bool = False, eps: float = 1e-5, bias: bool = True
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if norm else nn.Identity()

    def grid(self, image_size: Size2) -> Size2:
        """The (h, w) patch grid of an image, or a ValueError naming the sizes."""
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize to a multiple of {p}")
        return (h // p, w // p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w, C)."""
        self.grid(tuple(x.shape[-2:]))
        x = self.proj(x).permute(0, 2, 3, 1)  # B, h, w, C
        return self.norm(x)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


#: MLP activations by the name configs use (timm's ``act_layer`` names).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


class ClassAttention(nn.Module):
    """The cls token's query over the cls token and every patch: the class attention of CaiT and XCiT (timm's
    ``ClassAttn``: ``q``, ``k``, ``v``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, 1 + h*w, C) -> the cls token's update (B, 1, C), plus its (B, heads, 1, 1 + h*w) attention when asked."""
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, d).transpose(1, 2)  # B, heads, 1, d
        k = self.k(x).reshape(b, n, self.num_heads, d).transpose(1, 2)  # B, heads, N, d
        v = self.v(x).reshape(b, n, self.num_heads, d).transpose(1, 2)  # B, heads, N, d
        attn = None
        if need_weights:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, heads, 1, N
            out = attn @ v  # B, heads, 1, d
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # B, heads, 1, d
        return self.proj(out.transpose(1, 2).reshape(b, 1, c)), attn  # B, 1, C


class Mlp(nn.Module):
    """Two linear layers with an activation between (timm names: fc1, fc2); exact GELU by default.

    ``out_dim`` (default ``dim``) widens the output, as MViTv2's stage-transition MLPs do.
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", *, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT / BEiT ``gamma``)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path_rates(rate: float, count: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``count`` blocks (timm's rule).

    Computed on the CPU, so a model built under ``torch.device("meta")`` (hub's pre-allocation check) gets them too.
    """
    return torch.linspace(0, rate, count, device="cpu").tolist()


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # B, 1, ...
        return x * keep / (1.0 - self.p)


def prefix_labels(names: tuple[str, ...], count: int) -> tuple[str, ...]:
    """A name for each of ``count`` prefix tokens: ``names`` when given, else "cls", "dist", "prefix2", ..."""
    if names:
        return tuple(names)
    return ("cls", "dist", *(f"prefix{i}" for i in range(2, count)))[:count]


def grid_pixels(grid: Size2, stride: float | tuple[float, float], first: float | tuple[float, float] | None = None
                ) -> Tensor:
    """Image positions of a (h, w) token grid, row-major, in input pixels.

    Token (i, j) sits at ``first + (i, j) * stride``. A patch grid has ``first = stride / 2`` (patch centres, the
    default); a grid subsampled from another (every second token) keeps the first token's position and doubles
    the stride; a grid pooled from 2x2 neighbourhoods has its centres again at ``stride / 2``.

    Returns:
        (h*w, 2) float64 (y, x).
    """
    sy, sx = stride if isinstance(stride, tuple) else (stride, stride)
    if first is None:
        first = (sy / 2, sx / 2)
    fy, fx = first if isinstance(first, tuple) else (first, first)
    ys = fy + sy * torch.arange(grid[0], dtype=torch.float64)  # h
    xs = fx + sx * torch.arange(grid[1], dtype=torch.float64)  # w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # h, w
    return torch.stack((yy, xx), dim=-1).reshape(-1, 2)  # h*w, 2


def window_token_index(grid: Size2, window: Size2, shift: Size2 = (0, 0)) -> Tensor:
    """Which grid token each window slot holds, for attention in (shifted, padded) windows.

    The block rolls its (h, w) grid by ``-shift``, pads it at the bottom and right to whole windows and partitions
    it row-major into windows of ``Wh * Ww`` tokens (timm's order: roll, pad, partition).

    Returns:
        (nW, Wh*Ww) long: the row-major index ``r * w + c`` of the token at its place before the roll, -1 for
        padding.
    """
    h, w = grid
    wh, ww = window
    index = torch.arange(h * w).reshape(h, w)  # h, w
    index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(0, 1))  # h, w as the block saw it
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    padded = torch.full((hp, wp), -1, dtype=torch.long)  # Hp, Wp
    padded[:h, :w] = index
    windows = padded.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3)  # nWh, nWw, Wh, Ww
    return windows.reshape(-1, wh * ww)  # nW, Wh*Ww


@dataclass(frozen=True)
class TokenLayout:
    """Where the queries and keys of one block's attention sit on the image.

    The attention's query and key axes index *slots*; ``query_tokens`` / ``key_tokens`` say which token each
    slot holds, as a row of ``query_pixels`` / ``key_pixels``. Tokens are this block's prefix tokens first (their
    pixels NaN), then its patch grid row-major. Global attention is one group whose slots are the tokens in order;
    windowed attention has one group per window (padding slots -1).

    Attributes:
        query_prefix: names of this block's prefix queries ("cls", "reg0", ...); () for none.
        key_prefix: names of this block's prefix keys.
        query_grid: (hq, wq) grid of the patch queries; (0, 0) when the block has none (class attention).
        key_grid: (hk, wk) grid of the patch keys; it differs from the query grid when keys are pooled or queries
            subsampled.
        query_pixels: (Pq + hq*wq, 2) float64 (y, x) image position of each query token in input pixels.
        key_pixels: (Pk + hk*wk, 2) float64 (y, x) of each key token.
        query_tokens: (G, nq) long, the query token of every slot of every group, -1 for padding.
        key_tokens: (G, nk) long, the key token of every key slot.
        window: (Wh, Ww) attention window, for descriptions; None for global attention.
        shift: (sh, sw) cyclic shift of the windows, for descriptions.
        padded: (Hp, Wp) grid padded to whole windows when padding was needed, else None.
        window_axis: the block's attention has a window axis before the heads, (B, nW, heads, n, n); global
            attention is (B, heads, Nq, Nk).
    """

    query_prefix: tuple[str, ...]
    key_prefix: tuple[str, ...]
    query_grid: Size2
    key_grid: Size2
    query_pixels: Tensor
    key_pixels: Tensor
    query_tokens: Tensor
    key_tokens: Tensor
    window: Size2 | None = None
    shift: Size2 = (0, 0)
    padded: Size2 | None = None
    window_axis: bool = False

    @property
    def groups(self) -> int:
        """G: windows, or 1 for global attention."""
        return self.query_tokens.shape[0]

    def grouped(self, per_pair: Tensor) -> Tensor:
        """A per-pair tensor with its group axis: (..., heads, nq, nk) or (..., G, heads, nq, nk) -> (..., G, heads, nq, nk).

        Attention is (B, heads, N, N) for global and (B, nW, heads, n, n) for windowed blocks (``window_axis``); a
        (heads, n, n) tensor (one image's global attention, or a bias shared by every window) is expanded (a view)
        to (G, heads, n, n).

        Raises:
            ValueError: the tensor's last two axes are not this layout's slots.
        """
        nq, nk = self.query_tokens.shape[1], self.key_tokens.shape[1]
        if per_pair.shape[-2:] != (nq, nk):
            raise ValueError(f"per-pair tensor {tuple(per_pair.shape)} does not match the block's {nq} query and "
                             f"{nk} key slots")
        if per_pair.ndim == 3:  # heads, nq, nk: one image's global attention, or a bias shared by every window
            return per_pair.expand(self.groups, *per_pair.shape)  # G, heads, nq, nk
        if not self.window_axis:
            return per_pair.unsqueeze(-4)  # ..., 1, heads, nq, nk
        if per_pair.shape[-4] != self.groups:
            raise ValueError(f"per-pair tensor {tuple(per_pair.shape)} does not have the block's {self.groups} windows")
        return per_pair

    @property
    def query_is_patch(self) -> Tensor:
        """(G, nq) bool: the slot holds a patch query (not a prefix token, not padding)."""
        return self.query_tokens >= len(self.query_prefix)

    @property
    def key_is_patch(self) -> Tensor:
        """(G, nk) bool: the slot holds a patch key."""
        return self.key_tokens >= len(self.key_prefix)

    def query_slot(self, token: int) -> tuple[int, int]:
        """(group, slot) holding query token ``token`` (its first occurrence)."""
        hits = (self.query_tokens == token).nonzero()
        if not len(hits):
            raise ValueError(f"query token {token} is not attended in this block")
        return int(hits[0, 0]), int(hits[0, 1])

    def nearest_query(self, pixel: tuple[float, float]) -> int:
        """The patch query token nearest an image position (y, x) in input pixels."""
        patches = self.query_pixels[len(self.query_prefix):]  # hq*wq, 2
        if not len(patches):
            raise ValueError("this block has no patch queries")
        d = (patches - torch.tensor(pixel, dtype=patches.dtype)).square().sum(-1)  # hq*wq
        return len(self.query_prefix) + int(d.argmin())

    def nearest_key_patch(self, pixel: tuple[float, float]) -> tuple[int, int]:
        """(row, col) on the key grid of the patch key nearest an image position (y, x)."""
        patches = self.key_pixels[len(self.key_prefix):]  # hk*wk, 2
        d = (patches - torch.tensor(pixel, dtype=patches.dtype)).square().sum(-1)  # hk*wk
        t = int(d.argmin())
        return (t // self.key_grid[1], t % self.key_grid[1])

    def describe(self) -> str:
        """What the block attends over, in words ("7x7 windows shifted by 3x3 over the 14x14 grid")."""
        (hq, wq), (hk, wk) = self.query_grid, self.key_grid
        prefix = f" with {', '.join(self.key_prefix)}" if self.key_prefix else ""
        if self.window is not None:
            shift = f"shifted by {self.shift[0]}x{self.shift[1]}" if any(self.shift) else "not shifted"
            if self.padded is not None:
                shift += f", grid padded to {self.padded[0]}x{self.padded[1]}"
            return f"{hk}x{wk} grid, {self.window[0]}x{self.window[1]} windows, {shift}"
        if (hq, wq) == (hk, wk):
            return f"global attention over the {hk}x{wk} grid{prefix}"
        queries = f"{hq}x{wq} queries" if hq * wq else f"queries {', '.join(self.query_prefix)}"
        return f"global attention: {queries} over {hk}x{wk} keys{prefix}"


def global_layout(
    grid: Size2, pixels: Tensor, prefix: tuple[str, ...] = (), *, query_grid: Size2 | None = None,
    query_pixels: Tensor | None = None, query_prefix: tuple[str, ...] | None = None,
) -> TokenLayout:
    """Every query attends to every key: prefix tokens first, then the patch grid row-major.

    Args:
        grid: (h, w) key grid; pixels: (h*w, 2) its positions (:func:`grid_pixels`); prefix: names of the prefix
            tokens. The queries are the same unless ``query_grid`` / ``query_pixels`` / ``query_prefix`` say
            otherwise (subsampled queries, class attention).
    """
    query_grid = tuple(grid) if query_grid is None else tuple(query_grid)
    query_pixels = pixels if query_pixels is None else query_pixels
    query_prefix = tuple(prefix) if query_prefix is None else tuple(query_prefix)
    nan = torch.full((1, 2), math.nan, dtype=torch.float64)
    q_pix = torch.cat([nan.expand(len(query_prefix), 2), query_pixels.double()])  # Pq + hq*wq, 2
    k_pix = torch.cat([nan.expand(len(prefix), 2), pixels.double()])  # Pk + hk*wk, 2
    return TokenLayout(
        query_prefix=query_prefix, key_prefix=tuple(prefix), query_grid=query_grid, key_grid=tuple(grid),
        query_pixels=q_pix, key_pixels=k_pix, query_tokens=torch.arange(len(q_pix))[None],  # 1, nq
        key_tokens=torch.arange(len(k_pix))[None])  # fmt: skip


def windowed_layout(grid: Size2, window: Size2, pixels: Tensor, shift: Size2 = (0, 0)) -> TokenLayout:
    """Attention inside (shifted, padded) windows of a patch grid without prefix tokens (:func:`window_token_index`)."""
    index = window_token_index(grid, window, shift)  # nW, Wh*Ww
    padded = (-(-grid[0] // window[0]) * window[0], -(-grid[1] // window[1]) * window[1])
    return TokenLayout(
        query_prefix=(), key_prefix=(), query_grid=tuple(grid), key_grid=tuple(grid), query_pixels=pixels.double(),
        key_pixels=pixels.double(), query_tokens=index, key_tokens=index, window=tuple(window), shift=tuple(shift),
        padded=None if padded == tuple(grid) else padded, window_axis=True)  # fmt: skip


#: What a block without a token layout says, unless its model says more.
NO_LAYOUT = "this block's inspection does not say where its queries and keys sit"


@dataclass(frozen=True)
class OutputTokens:
    """Where the tokens a block outputs sit: its prefix tokens first, then a patch grid row-major.

    Most blocks output their queries (:meth:`BlockTrace.outputs` reads them from the layout); a block whose
    attention is not between tokens (XCiT's channel attention) or whose patches only pass through (XCiT's class
    attention) says so with its own.

    Attributes:
        prefix: names of the prefix tokens the block outputs; grid: (h, w) of its patch tokens, (0, 0) for none.
        pixels: (P + h*w, 2) float64 (y, x) image position of each output token in input pixels (NaN for prefix).
    """

    prefix: tuple[str, ...]
    grid: Size2
    pixels: Tensor

    @classmethod
    def on_grid(cls, grid: Size2, pixels: Tensor, prefix: tuple[str, ...] = ()) -> OutputTokens:
        """Prefix tokens, then the (h, w) grid at ``pixels`` (h*w, 2) (:func:`grid_pixels`)."""
        nan = torch.full((len(prefix), 2), math.nan, dtype=torch.float64)  # P, 2
        return cls(tuple(prefix), tuple(grid), torch.cat([nan, pixels.double()]))  # P + h*w, 2

    @property
    def patch_pixels(self) -> Tensor:
        """(h*w, 2) image positions of the patch tokens."""
        return self.pixels[len(self.prefix):]

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """A block's output as (B, P, C) prefix tokens and (B, h*w, C) patch tokens.

        Args:
            tokens: (B, P + h*w, C), or (B, h, w, C) for a block without prefix tokens that keeps its grid.

        Raises:
            ValueError: the block outputs no patch tokens, or ``tokens`` is not its prefix + grid.
        """
        p, (h, w) = len(self.prefix), self.grid
        if h * w == 0:  # CaiT's class attention: only the prefix tokens leave the block
            raise ValueError(f"the block outputs no patch tokens (only {', '.join(self.prefix)})")
        if tokens.ndim == 4 and not p and tuple(tokens.shape[1:3]) == (h, w):
            return tokens[:, :0, 0], tokens.reshape(tokens.shape[0], h * w, tokens.shape[-1])  # B, 0, C / B, h*w, C
        if tokens.ndim != 3 or tokens.shape[1] != p + h * w:
            raise ValueError(f"block output {tuple(tokens.shape)} is not {p} prefix + {h}x{w} patch tokens")
        return tokens[:, :p], tokens[:, p:]  # B, P, C / B, h*w, C


@dataclass(frozen=True)
class BlockTrace:
    """Tensors one transformer block used, from an inspection call.

    Attributes:
        attn: (B, heads, Nq, Nk) for global attention; (B, nW, heads, n, n) for windows (see ``layout``).
        attn_no_pos: same shape, the attention with the position term left out, or None.
        pos_bias: (heads, Nq, Nk) relative bias added to the logits (shared by every window), or None.
        mask: (nW, n, n) shifted-window mask, or None.
        grid: (h, w) token grid of the block's stage.
        window: (Wh, Ww) attention window (Swin) or None for global attention.
        shift: (sh, sw) cyclic shift (Swin) or None.
        stage: stage index (0 for ViT).
        position: further position tensors this block used, keyed by the names its mechanisms declare in
            :mod:`posenc.mechanisms` (e.g. a Swin V2 block's computed bias table); empty for most models.
        layout: where this block's query and key tokens sit (:class:`TokenLayout`); None for a block whose
            attention is not between tokens, with ``no_layout`` saying why.
        no_layout: one line, why there is no layout.
        output: where the block's output tokens sit when they are not its queries (:meth:`outputs`), else None.
    """

    attn: Tensor
    attn_no_pos: Tensor | None
    pos_bias: Tensor | None
    mask: Tensor | None
    grid: Size2
    window: Size2 | None = None
    shift: Size2 | None = None
    stage: int = 0
    position: dict[str, Tensor] = field(default_factory=dict)
    layout: TokenLayout | None = None
    no_layout: str = NO_LAYOUT
    output: OutputTokens | None = None

    def tokens(self) -> TokenLayout:
        """The block's :class:`TokenLayout`, or :class:`NoTokenLayout` saying why it has none."""
        if self.layout is None:
            raise NoTokenLayout(self.no_layout)
        return self.layout

    def outputs(self) -> OutputTokens:
        """Where the block's output tokens sit: ``output`` when the block says, else its queries (the layout's
        query prefix and grid); :class:`NoTokenLayout` when it says neither."""
        if self.output is not None:
            return self.output
        layout = self.tokens()
        return OutputTokens(layout.query_prefix, layout.query_grid, layout.query_pixels)


class NoTokenLayout(ValueError):
    """A block whose attention is not between image tokens (e.g. channel attention): the message says so."""


@dataclass(frozen=True)
class Inspection:
    """The logits of one forward pass and every position tensor it used.

    Attributes:
        logits: (B, num_classes); for a headless model (no classifier) the pooled features (B, C).
        grid: (h, w) patch grid of the input.
        num_prefix_tokens: leading non-patch tokens (cls, distillation, registers).
        pos_embed: (1, pos_embed_prefix + h*w, C) absolute embedding actually added, after resampling; or None.
        pos_embed_prefix: leading rows of ``pos_embed`` that are not patches.
        rope_angles: (h*w, head_dim/2) RoPE angles, or None.
        blocks: one :class:`BlockTrace` per block, in order.
        prefix_names: a name per prefix token, in token order ("cls", "dist", "reg0", ...); empty means
            unnamed (see :attr:`prefix_labels`).
        position: further model-level position tensors, keyed by the names the model's mechanisms declare
            in :mod:`posenc.mechanisms`.
    """

    logits: Tensor
    grid: Size2
    num_prefix_tokens: int
    pos_embed: Tensor | None
    pos_embed_prefix: int
    rope_angles: Tensor | None
    blocks: list[BlockTrace]
    prefix_names: tuple[str, ...] = ()
    position: dict[str, Tensor] = field(default_factory=dict)

    @property
    def prefix_labels(self) -> tuple[str, ...]:
        """A name for every prefix token: :attr:`prefix_names`, or "cls", "dist", ... when unnamed."""
        return prefix_labels(self.prefix_names, self.num_prefix_tokens)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a JSON dict, ignoring unknown keys (e.g. ones the Hub adds)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


#: Bounds of config numbers that declare none in ``dataclasses.field(metadata=...)``: integers are sizes and
#: counts in [1, 2**16], floats are finite and in [0, 1e6]; either range is widened to hold the field's default
#: (so a count that defaults to 0 may be 0).
INT_RANGE = (1, 2**16)
FLOAT_RANGE = (0.0, 1e6)
#: Longest sequence a tuple field may hold (e.g. class labels).
MAX_ITEMS = 2**16


def normalise_config(config: Any, prefix: str = "") -> None:
    """Validate every field of a config from its annotation, turning JSON lists into tuples, in ``__post_init__``.

    The rules come from each field's type and its optional ``metadata`` (``min``, ``max``, ``choices``, ``min_items``), so a
    new config dataclass is covered by calling this first in its ``__post_init__``:

    - ``int``: an integer (not a bool, float or string) in [min, max] (default :data:`INT_RANGE`);
    - ``float``: a finite number in [min, max] (default :data:`FLOAT_RANGE`);
    - ``bool``: true or false; ``str``: a string, one of ``choices`` when declared;
    - ``tuple[T, T]``: exactly that many items (a single number is repeated), each checked as T;
      ``tuple[T, ...]``: ``min_items`` (default 0) to :data:`MAX_ITEMS` items; ``X | None``: None or an X;
      ``X | Y``: either; ``Literal[...]``: one of the listed values;
    - a dataclass field (e.g. :class:`~posenc.preprocess.Preprocess`): built from a JSON dict, then checked the same way.

    Raises:
        ValueError: naming the field, the value and the rule it breaks.
    """
    hints = _field_types(type(config))
    for f in fields(config):
        if f.name not in hints:
            continue
        value = _checked(prefix + f.name, getattr(config, f.name), hints[f.name], f)
        object.__setattr__(config, f.name, value)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's resolved field annotations (its module's names, so string annotations work)."""
    return typing.get_type_hints(cls)


def _checked(name: str, value: Any, tp: Any, f: Field) -> Any:
    """``value`` checked against the annotation ``tp`` and the field's metadata, normalised (lists to tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _checked(name, value, alt, f)
            except ValueError as error:
                problems.append(str(error))
        raise ValueError(" or ".join(problems) if len(problems) > 1 else problems[0])
    if origin is tuple:
        return _checked_tuple(name, value, args, f)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in args)}, got {_short(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_short(value)}")
        return value
    if tp is int:
        low, high = _bounds(f, INT_RANGE)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {_short(value)}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {_short(value)}")
        return value
    if tp is float:
        low, high = _bounds(f, FLOAT_RANGE)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {_short(value)}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond the float range
            finite = False
        if not (finite and low <= value <= high):
            raise ValueError(f"{name} must be a finite number from {low} to {high}, got {_short(value)}")
        return float(value)
    if tp is str:
        choices = f.metadata.get("choices")
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string{_one_of(choices)}, got {_short(value)}")
        if choices is not None and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {_short(value)}")
        return value
    if isinstance(tp, type) and is_dataclass(tp):
        if isinstance(value, dict):
            value = tp.from_dict(value) if hasattr(tp, "from_dict") else tp(**value)
        if not isinstance(value, tp):
            raise ValueError(f"{name} must be a {tp.__name__} (a JSON object), got {_short(value)}")
        normalise_config(value, prefix=f"{name}.")
        return value
    return value


def _checked_tuple(name: str, value: Any, args: tuple[Any, ...], f: Field) -> tuple[Any, ...]:
    """A tuple field: ``tuple[T, ...]`` (1 to MAX_ITEMS items) or ``tuple[T1, T2]`` (exactly that many)."""
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not isinstance(value, (list, tuple)):
        if variadic or isinstance(value, (str, bytes, dict)) or value is None or len(set(args)) != 1:
            raise ValueError(f"{name} must be a list{'' if variadic else f' of {len(args)} items'}, got {_short(value)}")
        value = (value,) * len(args)  # a single number for a square size
    if variadic:
        low = f.metadata.get("min_items", 0)
        if not low <= len(value) <= MAX_ITEMS:
            raise ValueError(f"{name} must be a list of {low} to {MAX_ITEMS} items, got {len(value)} items")
        args = (args[0],) * len(value)
    elif len(value) != len(args):
        raise ValueError(f"{name} must be a list of {len(args)} items, got {_short(list(value))}")
    return tuple(_checked(f"{name}[{i}]", v, t, f) for i, (v, t) in enumerate(zip(value, args)))


def _bounds(f: Field, default: tuple[Any, Any]) -> tuple[Any, Any]:
    """A number field's [min, max]: its metadata, else ``default`` widened to include the field's own default."""
    low, high = default
    own = f.default if isinstance(f.default, tuple) else (f.default,)  # a tuple field's items share its bounds
    for value in own:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            low, high = min(low, value), max(high, value)
    return f.metadata.get("min", low), f.metadata.get("max", high)


def _one_of(choices: Any) -> str:
    return f" (one of {', '.join(repr(c) for c in choices)})" if choices else ""


def _short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def init_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A posenc **{{ architecture }}** model. Position: {{ position }}

| | |
|---|---|
| position mechanisms | {{ mechanisms }} |
| architecture | {{ architecture }} |
| parameters | {{ params }} |
| input size | {{ input_size }} |
| classes | {{ num_classes }} |

{{ training }}

## Use

```python
import posenc
loaded = posenc.load("{{ repo_hint }}")
print(loaded.predict("photo.jpg", top_k=5))
```

Inspect the position tensors with `loaded.model.inspect(pixels)`; see the posenc README.
"""

class PosencModel(nn.Module, PyTorchModelHubMixin, library_name="posenc", pipeline_tag="image-classification",
                  tags=["vision", "position-encoding"], model_card_template=CARD_TEMPLATE):
    """Hub save/load for posenc models: ``config.json`` + ``model.safetensors`` + a generated model card.

    Loading is strict by default: every key and shape must match.
    """

    architecture: ClassVar[str] = ""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """Names of the position mechanisms this model uses, as declared in :mod:`posenc.mechanisms`; () for none.

        Every config says which it builds (its ``mechanisms`` property), so tables can list them without a model.
        """
        return self.config.mechanisms

    @property
    def headless(self) -> bool:
        """True when the model has no classifier (``num_classes == 0``): ``model(x)`` returns pooled features."""
        return self.config.num_classes == 0

    # Sizes and costs the app plans with. The defaults fit a plain ViT (global attention over the patch grid plus
    # prefix tokens); a model whose rule differs overrides them (Swin, LeViT, TinyViT...).

    def size_step(self) -> Size2:
        """(h, w) that every input size must be a multiple of: the patch by default."""
        return (self.config.patch_size, self.config.patch_size)

    def fits(self, size: Size2) -> bool:
        """Whether the model takes an (h, w) input without padding: a multiple of :meth:`size_step` by default."""
        step = self.size_step()
        return size[0] % step[0] == 0 and size[1] % step[1] == 0

    @property
    def num_blocks(self) -> int:
        """Attention blocks listed by :meth:`inspect`, without running the model."""
        return self.config.depth

    def trace_bytes(self, size: Size2) -> int:
        """Bytes of the attention maps one inspection at ``size`` keeps (float32, with a position-free copy)."""
        cfg = self.config
        n = (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size) + cfg.num_prefix_tokens
        copies = 1 if set(self.mechanisms) <= {"learned", "sincos"} else 2  # absolute ones leave attention as is
        return self.num_blocks * cfg.num_heads * n * n * 4 * copies

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        return super()._from_pretrained(strict=strict, **kwargs)

    def num_params(self) -> int:
        """Number of learned parameters."""
        return sum(p.numel() for p in self.parameters())

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """A model card naming the position mechanisms; ``training=`` adds the recipe and measured accuracy.

        ``position=`` is the sentence describing them (one layer up, :func:`posenc.mechanisms.card_position` gives
        their titles and descriptions); without it the card names the mechanisms only.
        """
        names = " + ".join(self.mechanisms) or "none"
        card_kwargs = {
            "title": kwargs.pop("title", f"posenc {self.architecture} ({names})"),
            "position": kwargs.pop("position", f"{names}."),
            "mechanisms": ", ".join(self.mechanisms) or "none (permutation-equivariant over patches)",
            "architecture": self.architecture,
            "params": f"{self.num_params():,}",
            "input_size": "x".join(str(s) for s in self.config.img_size),
            "num_classes": self.config.num_classes,
            "training": kwargs.pop("training", ""),
            "repo_hint": kwargs.pop("repo_hint", "path/or/repo-id"),
        }
        return super().generate_model_card(*args, **card_kwargs, **kwargs)
