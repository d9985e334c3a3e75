"""Multi-head self-attention with optional relative position bias, RoPE and an additive mask.

One module serves ViT, DeiT, BEiT and Swin. Parameter names follow timm (``qkv``, ``proj``,
``q_bias``/``v_bias``, ``relative_position_bias_table``) so checkpoints map by rule.

Two paths give the same output:

* the fast path (default) calls :func:`torch.nn.functional.scaled_dot_product_attention` with the
  position bias and mask folded into ``attn_mask``;
* the inspection path (``need_weights=True``) computes the logits by hand and returns an
  :class:`AttentionTrace` with the probabilities and the position term of *this* call. Nothing is
  stored on the module, so concurrent calls never see each other's maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from posenc.encodings import (
    Size2,
    gather_relative_bias,
    num_relative_positions,
    relative_position_index,
    resize_rel_pos_bias_table,
    rope_rotation,
    rotate,
)


@dataclass(frozen=True)
class AttentionTrace:
    """What one attention call computed.

    Attributes:
        attn: (..., heads, N, N) attention probabilities.
        attn_no_pos: (..., heads, N, N) probabilities with the position term left out (the relative bias
            dropped, or RoPE's rotation undone); None when the call had no position term.
        pos_bias: (heads, N, N) relative position bias added to the logits, or None.
    """

    attn: Tensor
    attn_no_pos: Tensor | None
    pos_bias: Tensor | None


class Attention(nn.Module):
    """Self-attention over the last two dims of ``x`` (tokens, channels).

    Args:
        dim: channels C.
        num_heads: heads; ``C`` must divide evenly.
        qkv_bias: True for one fused bias; ``"qv"`` for BEiT's separate query and value biases (no key bias).
        rel_pos_window: (Wh, Ww) to learn a relative position bias table for that window.
        rel_pos_cls: the table has BEiT's three extra cls entries (token 0 is the cls token).
        rope_interleaved: RoPE rotates channel pairs (2i, 2i+1) (timm's EVA layout) instead of (i, i + head_dim/2).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool | str = True,
        rel_pos_window: Size2 | None = None,
        rel_pos_cls: bool = False,
        rope_interleaved: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_window = tuple(rel_pos_window) if rel_pos_window is not None else None
        self.rel_pos_cls = rel_pos_cls
        self.rope_interleaved = rope_interleaved
        if self.rel_pos_window is not None:
            rows = num_relative_positions(self.rel_pos_window, rel_pos_cls)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))  # R, heads
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer(
                "relative_position_index", relative_position_index(self.rel_pos_window, rel_pos_cls), persistent=False
            )
        else:
            self.relative_position_bias_table = None

    def position_bias(self, grid: Size2 | None = None) -> Tensor | None:
        """The relative position bias for a token grid (heads, N, N), or None without a table.

        For a grid other than the table's window, the table is resized bicubically and the index
        rebuilt for that grid; nothing is cached.
        """
        if self.relative_position_bias_table is None:
            return None
        if grid is None or tuple(grid) == self.rel_pos_window:
            return gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)
        table = resize_rel_pos_bias_table(self.relative_position_bias_table, grid, self.rel_pos_window, self.rel_pos_cls)
        index = relative_position_index(grid, self.rel_pos_cls, device=table.device)
        return gather_relative_bias(table, index)  # heads, N, N

    def _qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, self.k_bias, self.v_bias])  # 3C

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        rope: Tensor | None = None,
        rotation: Tensor | None = None,
        num_prefix: int = 0,
        grid: Size2 | None = None,
        need_weights: bool = False,
        position: bool = True,
    ) -> tuple[Tensor, AttentionTrace | None]:
        """Attend over tokens.

        Args:
            x: (..., N, C) tokens; leading dims are batch-like (Swin passes (B, nW, N, C)).
            mask: additive mask broadcastable to (..., N, N), e.g. Swin's (nW, N, N) shift mask.
            rope: (N - num_prefix, head_dim/2) RoPE angles, or (heads, N - num_prefix, head_dim/2) per head; or None.
            rotation: the same RoPE as :func:`~posenc.encodings.rope_rotation` of the angles (in this module's
                ``rope_interleaved`` layout), (2, [heads,] N - num_prefix, head_dim): a model that computes it once
                per forward pass passes this instead of ``rope``.
            num_prefix: leading tokens that RoPE leaves unrotated.
            grid: (h, w) token grid for the relative bias when it differs from the table's window.
            need_weights: take the inspection path and return an :class:`AttentionTrace`.
            position: False leaves the relative bias and the RoPE rotation out (the mask stays).

        Returns:
            (..., N, C) output and the trace (None on the fast path).
        """
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())  # ..., N, 3C
        q, k, v = rearrange(qkv, "... n (three h d) -> three ... h n d", three=3, h=self.num_heads)  # ..., heads, N, hd
        q_raw, k_raw = q, k
        if rope is not None and rotation is not None:
            raise ValueError("pass RoPE either as angles (rope) or as their rotation (rotation), not both")
        if not position:
            rope = rotation = None
        if rope is not None:
            rotation = rope_rotation(rope, interleaved=self.rope_interleaved)  # 2, ..., N', hd
        if rotation is not None:
            q = rotate(q, rotation, num_prefix, interleaved=self.rope_interleaved)
            k = rotate(k, rotation, num_prefix, interleaved=self.rope_interleaved)
        pos = self.position_bias(grid) if position else None  # heads, N, N or None
        mask = mask[..., None, :, :] if mask is not None else None  # ..., 1, N, N
        if need_weights:
            out, trace = self._inspect(q, k, v, pos, mask, (q_raw, k_raw) if rotation is not None else None)
        else:
            out, trace = self._fast(q, k, v, pos, mask), None  # ..., heads, N, hd
        out = rearrange(out, "... h n d -> ... n (h d)")  # ..., N, C
        return self.proj(out), trace

    def _fast(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor | None, mask: Tensor | None) -> Tensor:
        """SDPA with the position bias and the mask folded into one additive ``attn_mask``.

        The fused CPU kernel takes only 4D (B, heads, N, hd) inputs with a 4D mask, and anything else
        falls back to a much slower unfused path. So extra leading dims (Swin's windows) are folded into
        the heads, where the per-window mask lines up without being copied for every image.

        Args:
            q, k, v: (B, ..., heads, N, head_dim).
            pos: (heads, N, N) relative bias or None.
            mask: additive mask broadcastable to (B, ..., 1, N, N), or None.

        Returns:
            (B, ..., heads, N, head_dim).
        """
        shape, n = q.shape, q.shape[-2]
        lead = shape[:-3]  # (B,) or (B, nW)
        q, k, v = (t.reshape(lead[0], -1, n, t.shape[-1]) for t in (q, k, v))  # B, nW*heads, N, hd
        bias = pos if mask is None else (mask if pos is None else pos + mask)  # ..., heads, N, N
        if bias is not None:
            batch = bias.shape[0] if bias.ndim == len(shape) else 1
            bias = bias.to(q.dtype).expand(batch, *lead[1:], self.num_heads, n, n)  # B or 1, ..., heads, N, N
            bias = bias.reshape(batch, -1, n, n)  # B or 1, nW*heads, N, N
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).reshape(shape)  # B, ..., heads, N, hd

    def _inspect(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: Tensor | None,
        mask: Tensor | None,
        unrotated: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, AttentionTrace]:
        """The readable path: explicit logits, softmax, and the same softmax without the position term."""
        logits = (q * self.scale) @ k.transpose(-2, -1)  # ..., heads, N, N
        if mask is not None:
            logits = logits + mask
        attn = (logits if pos is None else logits + pos).softmax(dim=-1)  # ..., heads, N, N
        attn_no_pos = None
        if pos is not None:
            attn_no_pos = logits.softmax(dim=-1)
        elif unrotated is not None:
            q0, k0 = unrotated
            logits0 = (q0 * self.scale) @ k0.transpose(-2, -1)  # ..., heads, N, N
            attn_no_pos = (logits0 if mask is None else logits0 + mask).softmax(dim=-1)
        return attn @ v, AttentionTrace(attn=attn, attn_no_pos=attn_no_pos, pos_bias=pos)
