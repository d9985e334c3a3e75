"""The models the app lists: a curated table of Hub checkpoints and the project's own ``checkpoints/``.

Entries only describe models; nothing is downloaded here (see :func:`posenc.hub.load`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from posenc.models import ARCHITECTURES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One model the app can load.

    Attributes:
        name: short display name.
        source: Hub repo id or local folder, as passed to :func:`posenc.hub.load`.
        architecture: the model's architecture ("vit", "deit", "beit", "swin", "swinv2", "sam", "convit", "levit", "eva", ...).
        mechanisms: the position mechanisms it uses (names declared in :mod:`posenc.mechanisms`, as
            ``model.mechanisms`` lists them); () for none.
        num_params: learned parameters, or None when unknown.
        accuracy: top-1 accuracy in percent on ``dataset``, or None when unknown.
        dataset: what ``accuracy`` was measured on ("ImageNet-1k", "CIFAR-10"); "" without one.
        headless: the checkpoint has no classifier (DINOv2, SigLIP towers): no top-1, it returns features.
    """

    name: str
    source: str
    architecture: str
    mechanisms: tuple[str, ...]
    num_params: int | None
    accuracy: float | None
    dataset: str
    headless: bool = False


#: The curated Hub models, in display order.
# Top-1 figures are timm's own ImageNet-1k validation results, results/results-imagenet.csv in
# github.com/huggingface/pytorch-image-models (the table behind the model cards' "Model Comparison").
# The two transformers-layout repos hold the same weights as a timm tag, whose figure is used:
# google/vit-base-patch16-224 is the original JAX ViT-B/16 (timm vit_base_patch16_224.orig_in21k_ft_in1k),
# microsoft/swin-tiny-patch4-window7-224 is Swin-T (timm swin_tiny_patch4_window7_224.ms_in1k; the paper says 81.2).
# Parameter counts are exact, counted from the built models (timm 1.0.31 and transformers agree).
HUB_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        "DeiT-Tiny", "timm/deit_tiny_patch16_224.fb_in1k", "deit", ("learned",), 5_717_416, 72.172, "ImageNet-1k",
    ),
    ModelEntry(
        "DeiT-Small distilled", "timm/deit_small_distilled_patch16_224.fb_in1k", "deit", ("learned",), 22_436_432,
        81.218, "ImageNet-1k",
    ),
    ModelEntry(
        "ViT-S/16 AugReg", "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "vit", ("learned",), 22_050_664, 81.384,
        "ImageNet-1k",
    ),
    ModelEntry(
        "ViT-B/16 (Google)", "google/vit-base-patch16-224", "vit", ("learned",), 86_567_656, 81.786, "ImageNet-1k",
    ),
    ModelEntry(
        "BEiT-B/16", "timm/beit_base_patch16_224.in22k_ft_in22k_in1k", "beit", ("rel_table",), 86_530_984, 85.212,
        "ImageNet-1k",
    ),
    ModelEntry(
        "Swin-T", "timm/swin_tiny_patch4_window7_224.ms_in1k", "swin", ("rel_table",), 28_288_354, 81.376,
        "ImageNet-1k",
    ),
    ModelEntry(
        "Swin-T (Microsoft)", "microsoft/swin-tiny-patch4-window7-224", "swin", ("rel_table",), 28_288_354, 81.376,
        "ImageNet-1k",
    ),
    # Swin V2 (continuous position bias). Top-1 from timm's results-imagenet.csv; data2vec-vision has no timm row
    # (not a timm model), so no figure; its count is the transformers build of the repo's config (BEiT-B shape,
    # a relative table per block), as posenc loads it.
    ModelEntry(
        "Swin V2-T", "timm/swinv2_tiny_window8_256.ms_in1k", "swinv2", ("cpb",), 28_347_154, 81.820, "ImageNet-1k",
    ),
    ModelEntry(
        "Swin V2-T CR", "timm/swinv2_cr_tiny_ns_224.sw_in1k", "swinv2", ("cpb",), 28_333_468, 81.802, "ImageNet-1k",
    ),
    ModelEntry(
        "data2vec-vision B/16", "facebook/data2vec-vision-base-ft1k", "data2vec-vision", ("rel_table",), 86_530_984,
        None, "ImageNet-1k",
    ),
    # SAM's ViT-B image encoder: headless (no classifier, so no top-1; model(x) gives the neck's pooled 256 features),
    # 1024 px native. No standalone transformers ViTDet checkpoint was found on the Hub, so none is listed.
    ModelEntry(
        "SAM ViT-B encoder (headless)", "timm/samvit_base_patch16.sa1b", "sam", ("learned", "decomposed"), 89_670_912,
        None, "SA-1B", headless=True,
    ),
    # Position by offset. The stored copy of timm's results table has no tiny_vit rows, so TinyViT's top-1 is None.
    ModelEntry(
        "ConViT-Ti", "timm/convit_tiny.fb_in1k", "convit", ("learned", "gpsa"), 5_710_512, 73.112, "ImageNet-1k",
    ),
    ModelEntry(
        "LeViT-128S", "timm/levit_128s.fb_dist_in1k", "levit", ("offset_bias",), 7_777_058, 76.526, "ImageNet-1k",
    ),
    ModelEntry("TinyViT-5M", "timm/tiny_vit_5m_224.in1k", "tiny_vit", ("offset_bias",), 5_392_764, None, "ImageNet-1k"),
    # Convolutional position (zero padding read by depthwise convs). Top-1 from timm's results-imagenet.csv.
    ModelEntry("Twins-SVT-S", "timm/twins_svt_small.in1k", "twins", ("conv_pos",), 24_060_776, 81.678, "ImageNet-1k"),
    ModelEntry("CoaT-Ti", "timm/coat_tiny.in1k", "coat", ("conv_pos", "conv_rel_pos"), 5_498_540, 78.426,
               "ImageNet-1k"),
    # Fourier position embedding and channel (cross-covariance) attention; the tag trained with distillation (72.310,
    # the plain fb_in1k one has 69.962), same weights' shapes, no extra head
    ModelEntry("XCiT-Nano/16", "timm/xcit_nano_12_p16_224.fb_dist_in1k", "xcit", ("fourier",), 3_053_224, 72.310,
               "ImageNet-1k"),
    # Pooling attention with a decomposed relative bias on the pooled key grid (results-imagenet.csv: 82.410).
    ModelEntry(
        "MViTv2-T", "timm/mvitv2_tiny.fb_in1k", "mvitv2", ("decomposed",), 24_173_320, 82.410, "ImageNet-1k",
    ),
    # CaiT: a learned embedding without a cls entry; the cls token joins late, in class-attention blocks. Top-1 and
    # parameters from timm's results-imagenet.csv (11.96 M, matching the count of the built model). timm publishes no
    # weights for the 18x2 parallel-block ViTs.
    ModelEntry(
        "CaiT-XXS24", "timm/cait_xxs24_224.fb_dist_in1k", "cait", ("learned", "class_attention"), 11_956_264, 78.384,
        "ImageNet-1k",
    ),
    # The parallel-block kind with weights: timm's SBB ViT-pwee (ParallelScalingBlock, one register, average pooling).
    # Like the other sbb register models it has no row in the indexed results-imagenet.csv, so no top-1.
    ModelEntry(
        "ViT-pwee/16 parallel blocks reg1 GAP (timm SBB)", "timm/vit_pwee_patch16_reg1_gap_256.sbb_in1k", "vit",
        ("learned",), 15_253_480, None, "ImageNet-1k",
    ),
    # Today's absolute-embedding ViTs (parameters counted from timm 1.0.31 builds, pretrained=False). Headless ones
    # have no top-1. results-imagenet.csv as indexed has no row for the sbb register models (timm's README gives
    # 84.930 for this one, but not that table), so its figure is left out.
    ModelEntry(
        "DeiT III-S", "timm/deit3_small_patch16_224.fb_in1k", "deit", ("learned",), 22_059_496, 81.370, "ImageNet-1k",
    ),
    ModelEntry(
        "CLIP ViT-B/16 (OpenAI, fine-tuned)", "timm/vit_base_patch16_clip_224.openai_ft_in1k", "vit", ("learned",),
        86_568_424, 85.292, "ImageNet-1k",
    ),
    ModelEntry(
        "ViT-M/16 4 registers, avg pool", "timm/vit_medium_patch16_reg4_gap_256.sbb_in12k_ft_in1k", "vit", ("learned",),
        38_881_768, None, "",
    ),
    ModelEntry(
        "DINOv2-S/14 4 registers (headless)", "timm/vit_small_patch14_reg4_dinov2.lvd142m", "vit", ("learned",),
        22_057_344, None, "", headless=True,
    ),
    ModelEntry(
        "SigLIP ViT-B/16 (headless)", "timm/vit_base_patch16_siglip_224.webli", "vit", ("learned",), 92_884_224, None,
        "", headless=True,
    ),
    # RoPE models of timm's eva.py. The copy of results-imagenet.csv searched for this list predates them, so their
    # top-1 is None (Naver's model cards give 81.23 for axial and 81.216 for mixed ViT-S); EVA-02 mim_in22k and
    # DINOv3 lvd1689m are headless (no classifier, no top-1).
    ModelEntry(
        "RoPE-ViT-S axial (Naver)", "timm/vit_small_patch16_rope_224.naver_in1k", "eva", ("rope_axial",), 21_984_232,
        None, "ImageNet-1k",
    ),
    ModelEntry(
        "RoPE-ViT-S mixed (Naver)", "timm/vit_small_patch16_rope_mixed_224.naver_in1k", "eva", ("rope_mixed",),
        21_988_840, None, "ImageNet-1k",
    ),
    ModelEntry(
        "ViT-M/16 RoPE reg1 GAP (timm SBB)", "timm/vit_medium_patch16_rope_reg1_gap_256.sbb_in1k", "eva",
        ("rope_axial",), 38_743_016, None, "ImageNet-1k",
    ),
    ModelEntry(
        "EVA-02-Ti/14 MIM (headless)", "timm/eva02_tiny_patch14_224.mim_in22k", "eva", ("learned", "rope_axial"),
        5_502_144, None, "ImageNet-22k", headless=True,
    ),
    ModelEntry(
        "DINOv3 ViT-S/16 (headless)", "timm/vit_small_patch16_dinov3.lvd1689m", "eva", ("rope_axial",), 21_586_944,
        None, "LVD-1689M", headless=True,
    ),
    # NaFlexViT with a factorised (row + column), aspect-preserving embedding: the smallest NaFlex classifier (all three
    # are ViT-B). The stored copy of results-imagenet.csv has no naflexvit rows; timm's notes give 83.63 measured the
    # NaFlex way (native aspect ratio, 576 patches), not on the 384x384 squares posenc feeds it, so it is left out.
    ModelEntry(
        "NaFlexViT-B/16 factorised, aspect-preserving", "timm/naflexvit_base_patch16_parfac_gap.e300_s576_in1k",
        "naflexvit", ("factorized", "aspect_resample"), 86_461_672, None, "ImageNet-1k",
    ),
)

def checkpoints_dir() -> Path:
    """The bundled checkpoints folder: ``POSENC_CHECKPOINTS``, else ``checkpoints/`` of this repository.

    Found from this file, not the working directory, so the app and the CLI work from anywhere.
    """
    return Path(os.environ.get("POSENC_CHECKPOINTS") or Path(__file__).resolve().parents[1] / "checkpoints")


def bundled_source(name: str, root: str | Path | None = None) -> str:
    """The folder of the bundled model called ``name`` ("cifar10-rope"), else ``name`` unchanged.

    Public names are the folder names inside the checkpoints folder (``root``, default :func:`checkpoints_dir`);
    an existing path or a Hub repo id passes through.
    """
    if Path(name).is_dir() or "/" in name or "\\" in name or name in ("", ".", ".."):
        return name
    folder = Path(root) if root is not None else checkpoints_dir()
    candidate = folder / name
    return str(candidate) if (candidate / "config.json").is_file() else name


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None (with a warning) when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("skipping unreadable %s: %s", path, error)
        return None
    return data if isinstance(data, dict) else None


def _count_params(weights: Path) -> int | None:
    """Elements of every tensor in a safetensors file, read from its header only (posenc saves no buffers)."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except (SafetensorError, OSError) as error:
        logger.warning("cannot read %s: %s", weights, error)
        return None


def _accuracy(metrics: dict[str, Any] | None) -> float | None:
    """Final test top-1 in percent from a ``metrics.json`` written by :mod:`posenc.train` (a fraction there)."""
    value = (metrics or {}).get("accuracy")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 100.0 * float(value)
    return None


def _dataset(metrics: dict[str, Any] | None) -> str:
    """The training data's name: CIFAR-10 for the JPEG zip (train's default), else the ImageFolder's name."""
    data = str((metrics or {}).get("dataset") or "")
    return Path(data).name if data and not data.endswith(".zip") else "CIFAR-10"


def bundled_models(checkpoints_dir: str | Path) -> list[ModelEntry]:
    """The project's own models: every ``checkpoints_dir/*/`` folder holding a posenc ``config.json``.

    Args:
        checkpoints_dir: the project's ``checkpoints/`` folder; a missing folder gives an empty list.

    Returns:
        One entry per folder, sorted by name, with the test accuracy from ``metrics.json`` when present.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        config = _read_json(folder / "config.json")
        model_type = (config or {}).get("model_type")
        if model_type not in ARCHITECTURES:
            logger.debug("skipping %s: not a posenc model folder", folder)
            continue
        arch = ARCHITECTURES[model_type]
        try:
            mechanisms = arch.config.from_dict(config).mechanisms
        except (TypeError, ValueError) as error:
            logger.warning("skipping %s: invalid config.json: %s", folder, error)
            continue
        metrics = _read_json(folder / "metrics.json")
        weights = folder / "model.safetensors"
        params = (metrics or {}).get("params")
        if not isinstance(params, int):
            params = _count_params(weights) if weights.is_file() else None
        entries.append(
            ModelEntry(
                name=folder.name,
                source=str(folder),
                architecture=arch.model.architecture,
                mechanisms=mechanisms,
                num_params=params,
                accuracy=_accuracy(metrics),
                dataset=_dataset(metrics),
            )
        )
    return entries
