"""Class names for classifier outputs, and the rule that picks them for a loaded checkpoint.

The rule, first match wins: posenc's own ``labels`` in its config > timm's ``label_names`` >
transformers' ``id2label`` (unless it is the generic ``LABEL_0, LABEL_1, ...``) > the ImageNet-1k
names when there are 1000 classes > ``"class i"``. A candidate whose length differs from the number
of classes is skipped with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

#: CIFAR-10 class names in torchvision's order (the order of the dataset's integer labels).
CIFAR10_LABELS: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_GENERIC_LABEL = re.compile(r"LABEL_\d+")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order, from the list bundled with torchvision.

    Returns:
        A new list of 1000 names (no download: torchvision ships the list in its weight metadata).
    """
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def id2label_list(id2label: Mapping[str | int, str], num_classes: int) -> list[str] | None:
    """transformers' ``id2label`` (keys are ints or their strings) as a list, or None when incomplete or generic."""
    by_index = {int(key): str(value) for key, value in id2label.items()}
    if sorted(by_index) != list(range(num_classes)):
        return None
    names = [by_index[i] for i in range(num_classes)]
    if all(_GENERIC_LABEL.fullmatch(name) for name in names):
        return None
    return names


def pick_labels(
    num_classes: int,
    *,
    posenc_labels: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    id2label: Mapping[str | int, str] | None = None,
) -> list[str]:
    """Class names for a checkpoint by the module's rule.

    Args:
        num_classes: width of the classifier head.
        posenc_labels: ``labels`` from a posenc ``config.json``.
        label_names: ``label_names`` from a timm ``config.json``.
        id2label: ``id2label`` from a transformers ``config.json``.

    Returns:
        ``num_classes`` names, index i naming logit i.
    """
    candidates = [
        ("posenc labels", list(posenc_labels) if posenc_labels else None),
        ("timm label_names", list(label_names) if label_names else None),
        ("transformers id2label", id2label_list(id2label, num_classes) if id2label else None),
    ]
    for origin, names in candidates:
        if names is None:
            continue
        if len(names) == num_classes:
            return [str(name) for name in names]
        logger.warning("ignoring %s: %d names for %d classes", origin, len(names), num_classes)
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class {i}" for i in range(num_classes)]
