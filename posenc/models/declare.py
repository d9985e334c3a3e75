"""How an architecture is declared: everything posenc knows about one model module, in one value.

Each ``posenc/models/<arch>.py`` ends with ``ARCHITECTURE = Architecture(...)``: its config and model classes,
the timm architectures it rebuilds (presets, keyed by timm's own names, which are never parsed) and how their
keys and recorded constructor arguments map to posenc's, the transformers ``model_type`` values it loads (each
with the function that reads its ``config.json`` and its key rules), the buffers it derives from the config,
and how position tensors of a checkpoint are fitted to the config (resized tables, a resampled ``pos_embed``).

:mod:`posenc.models` collects the declarations of the modules it lists; :mod:`posenc.convert` and
:mod:`posenc.registry` read them and name no architecture. Adding an architecture is one module that ends with
its declaration, plus its name in :data:`posenc.models.MODULES` (see the README, "Adding an architecture").

This module also holds what several declarations share: rule lists of common Hub layouts and the helpers that
fit position tensors.

Example, for a plain ViT-shaped model (``MyConfig``/``MyModel`` defined above in its module)::

    ARCHITECTURE = Architecture(
        model_type="posenc_mine",
        config=MyConfig,
        model=MyModel,
        timm_presets={"mine_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6)},
        timm_rules=TIMM_RULES,
        derived=("relative_position_index",),
        fit_positions=lambda state_dict, config: resample_pos_embed(state_dict, config.grid, config.num_prefix_tokens),
    )
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from posenc.encodings import Size2, num_relative_positions, resample_abs_pos_embed, resize_rel_pos_bias_table

logger = logging.getLogger(__name__)

#: One key-renaming rule: ``re.sub(pattern, replacement, key)``; rules apply in order, to every key.
Rule = tuple[str, str | Callable[[re.Match], str]]
#: Key rules, or a function of the posenc config giving them (for layouts whose names depend on its sizes).
Rules = Sequence[Rule] | Callable[[Any], Sequence[Rule]]
#: A state dict of tensors, by key.
StateDict = dict[str, Tensor]


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, or one of its options, is not one posenc can rebuild."""


@dataclass(frozen=True)
class TransformersType:
    """One transformers ``model_type`` an architecture loads.

    Attributes:
        architectures: the ``architectures`` classes of config.json that are accepted (classifiers, or base
            models / backbones listed in ``headless``).
        build: ``(config.json, common) -> posenc config``. ``common`` holds the fields :mod:`posenc.convert`
            reads for every image model (``img_size``, ``patch_size``, ``in_chans``, ``num_classes``,
            ``qkv_bias``, ``norm_eps``, ``labels``, ``preprocess``); the builder reads the rest and raises
            :class:`UnsupportedModelError` for options posenc cannot rebuild.
        rules: key rules from the transformers Hub layout to posenc's (after them, separate
            ``attn.{query,key,value}`` are fused into ``attn.qkv``).
        headless: which of ``architectures`` are base models without a classifier (loaded with
            ``num_classes = 0``; ``model(x)`` returns the pooled features they return).
        fix_layout: ``(state_dict, config) -> state_dict`` after renaming, for tensors whose layout (not name)
            differs from posenc's; None when none does.
    """

    architectures: tuple[str, ...]
    build: Callable[[dict[str, Any], dict[str, Any]], Any]
    rules: Rules
    headless: tuple[str, ...] = ()
    fix_layout: Callable[[StateDict, Any], StateDict] | None = None


@dataclass(frozen=True)
class Architecture:
    """Everything posenc knows about one architecture; each model module ends with one, ``ARCHITECTURE``.

    Attributes:
        model_type: the ``model_type`` of posenc's own config.json ("posenc_vit").
        config: the frozen config dataclass (with ``from_dict`` and ``mechanisms``).
        model: the :class:`~posenc.models.layers.PosencModel` subclass built from it.
        timm_presets: timm architecture name (no pretrained tag) -> the config fields its registration fixes;
            a checkpoint's recorded ``model_args`` apply on top.
        timm_rules: key rules from timm's state dict to posenc's.
        timm_args: recorded timm constructor argument whose name is not a config field -> ``(value,
            model_args) -> config fields``; any other unknown argument is refused.
        transformers: transformers ``model_type`` -> how to load it.
        derived: leaf names of buffers rebuilt from the config (indices, masks, coordinate tables): dropped
            from a checkpoint, never loaded.
        fit_positions: ``(state_dict, config) -> state_dict``, fitting a checkpoint's position tensors to the
            config (tables resized to its windows, ``pos_embed`` resampled to its grid); None when nothing needs
            fitting.
    """

    model_type: str
    config: type
    model: type
    timm_presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    timm_rules: Sequence[Rule] = ()
    timm_args: Mapping[str, Callable[[Any, Mapping[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    transformers: Mapping[str, TransformersType] = field(default_factory=dict)
    derived: tuple[str, ...] = ()
    fit_positions: Callable[[StateDict, Any], StateDict] | None = None

    def __post_init__(self) -> None:
        if self.config.__dataclass_fields__["model_type"].default != self.model_type:
            raise ValueError(f"{self.config.__name__}.model_type must default to {self.model_type!r}")


# --------------------------------------------------------------------------- rules several layouts share

_QKV = {"q": "query", "k": "key", "v": "value"}


def qkv_rule(pattern: str, prefix: str, group: int = 1) -> Rule:
    """A rule spelling separate q/k/v projections as ``{prefix}query.`` / ``key.`` / ``value.``.

    Args:
        pattern: a regex whose ``group`` captures "q", "k" or "v".
        prefix: what the match becomes, before the projection's name (".attn.").
    """
    return (pattern, lambda m: f"{prefix}{_QKV[m[group]]}.")


#: timm's layer-scale and head spellings that ViT-style timm models share (``gamma_1``, ``head.fc``).
TIMM_RULES: tuple[Rule, ...] = (
    (r"\.gamma_([12])$", r".ls\1.gamma"),
    (r"^head\.fc\.", "head."),
)
#: The Hub layout transformers' ViT, DeiT, BEiT and Swin share (``vit.encoder.layer.0.attention.attention.query``);
#: earlier rules shadow later ones.
TRANSFORMERS_RULES: tuple[Rule, ...] = (
    (r"^(vit|deit|beit|swin)\.", ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^encoder\.relative_position_bias\.", "rel_pos_bias."),  # BEiT's shared table
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    # transformers merges patches at the end of stage i, posenc at the start of stage i + 1
    (r"^encoder\.layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.attention\.(attention|self)\.(relative_position_bias\.)?relative_position_bias_table$",
     ".attn.relative_position_bias_table"),
    (r"\.attention\.(attention|self)\.(query|key|value)\.", r".attn.\2."),
    # the layout transformers is moving to: q_proj/k_proj/v_proj/o_proj on the attention module itself
    qkv_rule(r"\.(attention|self_attn)\.([qkv])_proj\.", ".attn.", group=2),
    (r"\.(attention|self_attn)\.(o_proj|out_proj)\.", ".attn.proj."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.lambda_([12])$", r".ls\1.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^pooler\.layernorm\.", "fc_norm."),
    (r"^(classifier|cls_classifier)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
)  # fmt: skip
#: The attention layout transformers is moving to (``attention.{q,k,v,o}_proj``, Swin's table under
#: ``attention.relative_position_bias``), spelled back as today's so :data:`TRANSFORMERS_RULES` apply to both.
TRANSFORMERS_NEXT_LAYOUT: tuple[Rule, ...] = (
    qkv_rule(r"\.attention\.(?:attention\.|self\.)?([qkv])_proj\.", ".attention.self."),
    (r"\.attention\.(?:attention\.|self\.)?o_proj\.", ".attention.output.dense."),
    (r"(\.\d+)\.attention\.relative_position_bias\.relative_position_bias_table$",
     r"\1.attention.self.relative_position_bias_table"),
)  # fmt: skip


# --------------------------------------------------------------------------- transformers config fields


def positive_int(config: dict[str, Any], key: str) -> int:
    """A size of a transformers config that a builder computes with: a positive integer, or a ValueError naming it."""
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {str(value)[:60]!r}")
    return value


def encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Width, depth, heads and MLP ratio of a transformers ViT-style encoder config (sizes checked before use)."""
    hidden = positive_int(config, "hidden_size")
    intermediate = config.get("intermediate_size", 4 * hidden)
    if not isinstance(intermediate, (int, float)) or isinstance(intermediate, bool):
        raise ValueError(f"intermediate_size must be a positive integer, got {intermediate!r}")
    return {
        "embed_dim": hidden,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": intermediate / hidden,
    }


# --------------------------------------------------------------------------- fitting position tensors


def _square_window(rows: int, cls_token: bool) -> Size2 | None:
    """The square window whose relative table has ``rows`` rows, or None."""
    side = math.isqrt(rows - (3 if cls_token else 0))
    if side * side != rows - (3 if cls_token else 0) or side % 2 == 0:
        return None
    return ((side + 1) // 2, (side + 1) // 2)


def fit_relative_tables(state_dict: StateDict, window_of: Callable[[str], Size2 | None], cls_token: bool) -> StateDict:
    """Resize every ``attn.relative_position_bias_table`` bicubically to the window it serves in the config.

    Args:
        window_of: table key -> the config's window for it, or None to leave the table as it is.
        cls_token: the tables carry BEiT's three cls entries.

    Returns:
        A new dict; tables of a square window of another size are resized (R', heads), others kept.
    """
    out = dict(state_dict)
    for key, table in state_dict.items():
        if not key.endswith("attn.relative_position_bias_table"):
            continue
        window = window_of(key)
        if window is None:
            continue
        old = _square_window(table.shape[0], cls_token)
        if table.shape[0] != num_relative_positions(window, cls_token) and old is not None:
            logger.info("resizing %s from window %s to %s", key, old, window)
            out[key] = resize_rel_pos_bias_table(table, window, old, cls_token)  # R', heads
    return out


def resample_pos_embed(state_dict: StateDict, grid: Size2, num_prefix: int) -> StateDict:
    """Resample a square (1, P + s*s, C) ``pos_embed`` bicubically to ``grid``, its ``num_prefix`` rows kept apart.

    Returns:
        A new dict; an embedding of another layout, or already on ``grid``, is kept.
    """
    out = dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return out
    side = math.isqrt(pos.shape[1] - num_prefix)
    if pos.shape[1] != num_prefix + grid[0] * grid[1] and side * side == pos.shape[1] - num_prefix:
        logger.info("resampling pos_embed from %dx%d to %s", side, side, grid)
        out["pos_embed"] = resample_abs_pos_embed(pos, grid, (side, side), num_prefix)  # 1, P + h*w, C
    return out
