"""Train the CIFAR-10 model presets on CIFAR-10 (or any ImageFolder): ``python -m posenc train``.

The data are decoded once into a uint8 tensor (N, 3, H, W) that stays on the training device, so
augmentation works on whole batches. Every preset trains with one shared recipe (AdamW, linear
warm-up + cosine, label smoothing, gradient clipping, random crop + flip); :func:`cifar_model`
holds matched-size presets. A run is deterministic for its seed: every random stream (shuffle,
augmentation, dropout) is re-derived from (seed, epoch, rank) when an epoch starts, so the epoch
saved in ``train_state.pt`` is the whole RNG state, for every ``torchrun`` rank alike. The output
folder is a Hub-layout model (config.json + model.safetensors) with a README.md model card and
metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn

from posenc import distributed, mechanisms
from posenc.labels import CIFAR10_LABELS
from posenc.models import PosencModel, SwinConfig, ViTConfig, build_model
from posenc.preprocess import Preprocess, load_image

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
STATE_FILE = "train_state.pt"
# Leaf names of parameters that are positions or tokens rather than weights: never weight-decayed.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table", "absolute_pos_embed")
# TrainConfig fields that may change when a run is resumed without changing its result.
RUNTIME_FIELDS = ("data", "out", "resume", "stop_after", "threads", "cache_dir", "eval_every")
#: The CIFAR-10 model presets of :func:`cifar_model`, by name (``--family``; the bundled ``cifar10-<name>`` folders).
PRESETS = ("none", "learned", "sincos", "relative", "windowed", "rope")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, recipe and runtime settings (the defaults are the shared CIFAR recipe)."""

    data: Path  # CIFAR-10 JPEG zip, or an ImageFolder root with train/ and val/ or test/
    out: Path  # output folder: Hub-layout model + README.md + metrics.json + train_state.pt
    family: str = "learned"  # the model preset, one of PRESETS
    epochs: int = 30
    batch_size: int = 128  # global batch, split evenly over torchrun ranks
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    warmup_epochs: float = 2.0
    weight_decay: float = 0.05  # weight matrices only; norms, biases, tokens and position tables get none
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    padding: int = 4  # random-crop padding in pixels; 0 disables the crop
    pad_mode: str = "reflect"  # "reflect" or "zero"
    flip: bool = True  # random horizontal flip
    erasing: float = 0.0  # random-erasing probability per image
    mixup: float = 0.0  # mixup Beta alpha; 0 disables
    cutmix: float = 0.0  # cutmix Beta alpha; 0 disables (with mixup on too, one of the two per batch)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32" or "bf16"
    eval_every: int = 1  # evaluate every k epochs, and always after the last
    train_limit: int | None = None  # class-balanced subset sizes, for smoke runs
    test_limit: int | None = None
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    cache_dir: Path | None = None  # decoded-CIFAR cache; None means ~/.cache/posenc
    resume: bool = False  # continue from out/train_state.pt when it exists
    stop_after: int | None = None  # leave after this many more epochs of the schedule (time-boxed sessions)

    def __post_init__(self) -> None:
        for name in ("data", "out", "cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.family not in PRESETS:
            raise ValueError(f"unknown family {self.family!r}; choose one of {', '.join(PRESETS)}")
        if self.pad_mode not in ("reflect", "zero"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zero', got {self.pad_mode!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size and eval_every must be positive")


@dataclass(frozen=True)
class ImageSet:
    """One decoded split: uint8 ``images`` (N, 3, H, W), int64 ``labels`` (N,) and the class names."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def to(self, device: torch.device) -> ImageSet:
        """The same split with its tensors on ``device``."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


# ---------------------------------------------------------------------------------------------------------- data


def balanced_subset(labels: Tensor, limit: int) -> Tensor:
    """Indices of a deterministic class-balanced subset: classes in turn, earliest images first.

    Args:
        labels: (N,) int64 class indices.
        limit: subset size; the whole set when ``limit >= N``.
    Returns:
        (min(limit, N),) int64 indices in increasing order.
    """
    if limit >= labels.numel():
        return torch.arange(labels.numel())
    order = torch.argsort(labels, stable=True)  # N, grouped by class, original order within a class
    grouped = labels[order]  # N
    counts = torch.bincount(grouped)
    rank = torch.arange(labels.numel()) - (torch.cumsum(counts, 0) - counts)[grouped]  # N, position within class
    key = rank * counts.numel() + grouped  # N, round-robin over the classes
    return order[torch.argsort(key)[:limit]].sort().values


def cifar_zip_members(archive: zipfile.ZipFile, split: str) -> tuple[list[str], Tensor]:
    """Sorted image names of one split of the CIFAR-10 JPEG zip (``split/<class>/NNNN.jpg``) and their labels.

    Returns:
        the member names and (N,) int64 labels in torchvision's class order.
    """
    names = sorted(n for n in archive.namelist() if n.startswith(f"{split}/") and n.lower().endswith(".jpg"))
    if not names:
        raise ValueError(f"{archive.filename} holds no {split}/<class>/*.jpg images; is it the CIFAR-10 JPEG zip?")
    folders = [name.split("/")[1] for name in names]
    unknown = sorted(set(folders) - set(CIFAR10_LABELS))
    if unknown:
        raise ValueError(f"{archive.filename}: class folders {unknown} are not CIFAR-10 classes {CIFAR10_LABELS}")
    return names, torch.tensor([CIFAR10_LABELS.index(f) for f in folders], dtype=torch.int64)


def decode_zip_images(archive: zipfile.ZipFile, names: list[str]) -> Tensor:
    """Decode equally sized images from a zip, in order, into (N, 3, H, W) uint8."""
    first = np.asarray(Image.open(io.BytesIO(archive.read(names[0]))).convert("RGB"))
    out = np.empty((len(names), *first.shape), dtype=np.uint8)  # N, H, W, 3
    for i, name in enumerate(names):
        pixels = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"))
        if pixels.shape != first.shape:
            raise ValueError(f"{name} is {pixels.shape[:2]}, unlike {names[0]} ({first.shape[:2]}); sizes must match")
        out[i] = pixels
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # N, 3, H, W


def load_cifar_zip(path: Path, split: str, *, limit: int | None = None, cache_dir: Path | None = None) -> ImageSet:
    """Read one split of the CIFAR-10 JPEG zip in place; whole splits are cached, keyed by the zip's size and mtime."""
    with zipfile.ZipFile(path) as archive:
        names, labels = cifar_zip_members(archive, split)
        if limit is not None:
            keep = balanced_subset(labels, limit)
            return ImageSet(decode_zip_images(archive, [names[i] for i in keep]), labels[keep], CIFAR10_LABELS)
        stat = path.stat()
        cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "posenc"
        cache = cache_dir / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{split}.pt"
        if cache.exists():
            images = torch.load(cache, weights_only=True)
            if images.shape[0] == len(names):
                return ImageSet(images, labels, CIFAR10_LABELS)
        tick = time.perf_counter()
        images = decode_zip_images(archive, names)
    seconds = time.perf_counter() - tick
    logger.info("decoded %d %s images in %.1fs; caching them in %s", len(names), split, seconds, cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save(images, partial)
    os.replace(partial, cache)  # atomic, so concurrent ranks never read half a file
    return ImageSet(images, labels, CIFAR10_LABELS)


def load_image_folder(root: Path, size: tuple[int, int], *, limit: int | None = None) -> ImageSet:
    """Decode an ImageFolder tree (``root/<class>/*``), each image centre-cropped and resized to ``size`` (h, w)."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    keep = balanced_subset(labels, limit) if limit is not None else torch.arange(labels.numel())
    images = torch.empty((keep.numel(), 3, *size), dtype=torch.uint8)
    for i, index in enumerate(keep.tolist()):
        image = ImageOps.fit(load_image(folder.samples[index][0]), (size[1], size[0]), Image.Resampling.BICUBIC)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # 3, h, w
    return ImageSet(images, labels[keep], tuple(folder.classes))


def load_data(cfg: TrainConfig, size: tuple[int, int]) -> tuple[ImageSet, ImageSet]:
    """The (train, test) splits ``cfg.data`` names: the CIFAR-10 zip, or an ImageFolder root resized to ``size``."""
    if cfg.data.is_file() and cfg.data.suffix == ".zip":
        train = load_cifar_zip(cfg.data, "train", limit=cfg.train_limit, cache_dir=cfg.cache_dir)
        return train, load_cifar_zip(cfg.data, "test", limit=cfg.test_limit, cache_dir=cfg.cache_dir)
    held_out = next((cfg.data / name for name in ("val", "test") if (cfg.data / name).is_dir()), None)
    if not (cfg.data / "train").is_dir() or held_out is None:
        raise ValueError(f"--data {cfg.data} is neither the CIFAR-10 zip nor a folder with train/ and val/ (or test/)")
    train = load_image_folder(cfg.data / "train", size, limit=cfg.train_limit)
    test = load_image_folder(held_out, size, limit=cfg.test_limit)
    if train.classes != test.classes:
        raise ValueError(f"{cfg.data}: train/ and {held_out.name}/ have different class folders; they must match")
    return train, test


# -------------------------------------------------------------------------------------------------- augmentation


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Pixels 0-255 (B, 3, H, W), uint8 or float -> float (B, 3, H, W) scaled to [0, 1] and standardised."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)  # 1, 3, 1, 1
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)  # 1, 3, 1, 1
    return (images.float() / 255 - mean_t) / std_t


def random_crop(images: Tensor, padding: int, generator: torch.Generator, *, mode: str = "reflect") -> Tensor:
    """Pad float (B, C, H, W) by ``padding`` ("reflect" or "zero") and crop each image at its own random offset."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4, mode="constant" if mode == "zero" else mode)  # B, C, H+2p, W+2p
    offsets = torch.randint(0, 2 * padding + 1, (2, B, 1), generator=generator, device=images.device)
    rows = offsets[0] + torch.arange(H, device=images.device)  # B, H
    cols = offsets[1] + torch.arange(W, device=images.device)  # B, W
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    channel = torch.arange(C, device=images.device).view(1, C, 1, 1)
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # B, C, H, W


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5  # B
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_erasing(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Zero one random rectangle (2-33 % of the area, aspect 0.3-3.3) per (B, C, H, W) image, with ``probability``."""
    B, _, H, W = images.shape
    u = torch.rand(5, B, 1, 1, generator=generator, device=images.device)
    area = H * W * (0.02 + u[0] * (1 / 3 - 0.02))  # B, 1, 1
    aspect = torch.exp(math.log(0.3) + u[1] * math.log(3.3 / 0.3))  # B, 1, 1
    h, w = torch.sqrt(area * aspect).clamp(max=H), torch.sqrt(area / aspect).clamp(max=W)
    top, left = u[2] * (H - h), u[3] * (W - w)
    ys = torch.arange(H, device=images.device).view(1, H, 1)
    xs = torch.arange(W, device=images.device).view(1, 1, W)
    erase = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & (u[4] < probability)  # B, H, W
    return images.masked_fill(erase[:, None], 0.0)


def mix_batch(
    images: Tensor, targets: Tensor, rng: np.random.Generator, *, mixup: float, cutmix: float
) -> tuple[Tensor, Tensor]:
    """Mixup or cutmix each image with its mirror in the batch, with one Beta(alpha, alpha) draw per batch.

    Args:
        images: (B, C, H, W) float.
        targets: (B, num_classes) class probabilities.
    Returns:
        mixed images (B, C, H, W) and targets (B, num_classes) weighted by the share each image got.
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = images.flip(0)
    if use_cutmix:
        H, W = images.shape[-2:]
        half_h, half_w = int(H * math.sqrt(1 - lam)) // 2, int(W * math.sqrt(1 - lam)) // 2
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1, x0, x1 = max(cy - half_h, 0), min(cy + half_h, H), max(cx - half_w, 0), min(cx + half_w, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = lam * images + (1 - lam) * partner
    return images, lam * targets + (1 - lam) * targets.flip(0)


def augment(images: Tensor, labels: Tensor, cfg: TrainConfig, pp: Preprocess, num_classes: int,
            generator: torch.Generator, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A training batch: uint8 (B, 3, H, W) -> normalised float images, and (B,) labels or (B, classes) targets."""
    x = images.float()
    if cfg.padding:
        x = random_crop(x, cfg.padding, generator, mode=cfg.pad_mode)
    if cfg.flip:
        x = random_flip(x, generator)
    x = normalize(x, pp.mean, pp.std)
    if cfg.erasing:
        x = random_erasing(x, cfg.erasing, generator)
    if cfg.mixup or cfg.cutmix:
        return mix_batch(x, F.one_hot(labels, num_classes).float(), rng, mixup=cfg.mixup, cutmix=cfg.cutmix)
    return x, labels


# --------------------------------------------------------------------------------------------------------- model


def cifar_model(family: str, **overrides: Any) -> ViTConfig | SwinConfig:
    """One CIFAR-10 model preset, each with its own position encoding: 32x32 input, patch 4, about 0.8M parameters.

    Args:
        family: the preset, one of PRESETS; "windowed" is a two-stage Swin, the others share one ViT shape.
        overrides: config fields to replace (e.g. ``depth=1`` for a tiny test model).
    """
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(PRESETS)}")
    pp = Preprocess(input_size=(32, 32), interpolation="bicubic", crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    shared = dict(img_size=(32, 32), patch_size=4, num_classes=10, mlp_ratio=2.0, labels=CIFAR10_LABELS, preprocess=pp)
    if family == "windowed":
        swin = dict(embed_dim=64, depths=(2, 5), num_heads=(2, 4), window_size=(4, 4))
        return SwinConfig(**{**shared, **swin, **overrides})
    position = {
        "none": dict(pos_embed="none"),
        "learned": dict(pos_embed="learned"),
        "sincos": dict(pos_embed="sincos"),
        "relative": dict(pos_embed="none", rel_pos_bias=True),
        "rope": dict(pos_embed="none", rope=True),
    }[family]
    return ViTConfig(**{**shared, "embed_dim": 128, "depth": 6, "num_heads": 4, **position, **overrides})


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight matrices decay; norms, biases, tokens and position tables do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
            (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to 1, then a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------- loop


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: device, autocast dtype (None: fp32), and its torchrun rank."""

    device: torch.device
    autocast: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when enabled, else a no-op context."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def shard_indices(order: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's share of an epoch's order, as DistributedSampler does it: pad by wrapping, then every k-th."""
    padded = torch.cat([order, order[: (-order.numel()) % world_size]])  # ceil(N / world) * world
    return padded[rank::world_size]


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, epoch, stream, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join torchrun's process group when WORLD_SIZE > 1 (env:// init); pick the device and the precision."""
    ranks = distributed.join()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ranks.device.type == "cuda")
    return Runtime(ranks.device, torch.bfloat16 if bf16 else None, ranks.rank, ranks.world_size)


def _all_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum floats over the ranks (the values themselves without torchrun)."""
    if rt.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, pp: Preprocess, rt: Runtime, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] on ``data`` (already on the device), each rank scoring every world_size-th image."""
    model.eval()
    indices = torch.arange(rt.rank, data.labels.numel(), rt.world_size, device=rt.device)
    correct = 0
    for batch in indices.split(batch_size):
        with rt.autocast_context():
            logits = model(normalize(data.images[batch], pp.mean, pp.std))
        correct += (logits.argmax(-1) == data.labels[batch]).sum().item()
    total_correct, total = _all_sum([correct, indices.numel()], rt)
    return total_correct / total


def train_epoch(net: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                data: ImageSet, pp: Preprocess, cfg: TrainConfig, rt: Runtime, epoch: int) -> float:
    """One pass over this rank's shard of a fresh permutation; returns the mean training loss over all ranks."""
    net.train()
    shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 0))  # the same on every rank
    order = torch.randperm(data.labels.numel(), generator=shuffle)
    order = shard_indices(order, rt.rank, rt.world_size).to(rt.device)
    generator = torch.Generator(rt.device).manual_seed(derive_seed(cfg.seed, epoch, 1, rt.rank))
    rng = np.random.default_rng(derive_seed(cfg.seed, epoch, 2, rt.rank))
    torch.manual_seed(derive_seed(cfg.seed, epoch, 3, rt.rank))  # dropout, drop-path
    batches = order.split(cfg.batch_size // rt.world_size)
    bar = None
    if rt.rank == 0 and sys.stdout.isatty():
        from tqdm import tqdm

        batches = bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch")
    loss_sum = 0.0
    for batch in batches:
        x, targets = augment(data.images[batch], data.labels[batch], cfg, pp, len(data.classes), generator, rng)
        with rt.autocast_context():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        loss_sum += loss.item() * batch.numel()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    total, count = _all_sum([loss_sum, order.numel()], rt)
    return total / count


@contextlib.contextmanager
def _reproducible(rt: Runtime) -> Iterator[None]:
    """Deterministic algorithms (warn only) on CPU, and the caller's global RNG state restored afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        if rt.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that decide the result, JSON-ready."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return json.loads(json.dumps(fields, default=str))


def train(cfg: TrainConfig, model_config: ViTConfig | SwinConfig | None = None) -> dict[str, Any]:
    """Train one model as ``cfg`` says; rank 0 writes the output folder once the last epoch is done.

    Args:
        cfg: the run.
        model_config: the model to train; None means ``cifar_model(cfg.family)``. Its classes become the data's.
    Returns:
        the metrics of ``metrics.json`` (a partial record, and no output folder, when ``stop_after`` ended the run).
    """
    rt = setup_runtime(cfg)
    start = time.perf_counter()
    model_config = model_config or cifar_model(cfg.family)
    train_set, test_set = load_data(cfg, model_config.img_size)
    model_config = dataclasses.replace(model_config, num_classes=len(train_set.classes), labels=train_set.classes)
    train_set, test_set = train_set.to(rt.device), test_set.to(rt.device)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {rt.world_size} ranks; use a multiple")
    pp = model_config.preprocess
    with _reproducible(rt):
        torch.manual_seed(cfg.seed)
        model = build_model(model_config).to(rt.device)
        net = nn.parallel.DistributedDataParallel(model) if rt.world_size > 1 else model
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        per_rank = math.ceil(train_set.labels.numel() / rt.world_size)
        steps = cfg.epochs * math.ceil(per_rank / (cfg.batch_size // rt.world_size))
        warmup = min(round(cfg.warmup_epochs * steps / cfg.epochs), steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total_steps=steps, warmup_steps=warmup, min_ratio=cfg.min_lr_ratio)
        )
        first, history, wall_before = _restore(cfg, model, opt, sched, rt)
        last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, first + cfg.stop_after)
        for epoch in range(first, last):
            tick, lr = time.perf_counter(), opt.param_groups[0]["lr"]
            loss = train_epoch(net, opt, sched, train_set, pp, cfg, rt, epoch)
            train_s, lr_end = time.perf_counter() - tick, opt.param_groups[0]["lr"]
            due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            acc = evaluate(model, test_set, pp, rt) if due else None
            epoch_s = time.perf_counter() - tick
            history.append(dict(epoch=epoch + 1, loss=loss, accuracy=acc, lr=lr, lr_end=lr_end, train_s=train_s, epoch_s=epoch_s))
            if rt.rank == 0:
                acc_text = "-" if acc is None else f"{100 * acc:.1f}%"
                logger.info("epoch %d/%d loss %.3f acc %s lr %.2e -> %.2e %.1fs", epoch + 1, cfg.epochs, loss, acc_text,
                            lr, lr_end, epoch_s)
                _save_state(cfg, model, opt, sched, epoch + 1, history, wall_before + time.perf_counter() - start)
    metrics = _metrics(cfg, model, rt, history, wall_before + time.perf_counter() - start, train_set, test_set)
    if rt.rank == 0 and history and history[-1]["epoch"] == cfg.epochs:
        write_outputs(model, cfg.out, metrics)
    if rt.world_size > 1:
        dist.barrier()
    return metrics


def _save_state(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list, wall: float) -> None:
    """Write out/train_state.pt atomically: everything needed to continue after ``epoch``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    state = dict(epoch=epoch, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                 history=history, wall_time_s=wall, recipe=_recipe(cfg))
    torch.save(state, cfg.out / f"{STATE_FILE}.tmp")
    os.replace(cfg.out / f"{STATE_FILE}.tmp", cfg.out / STATE_FILE)


def _restore(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, rt: Runtime) -> tuple[int, list, float]:
    """Load out/train_state.pt into model, optimiser and scheduler; returns (epochs done, history, wall time)."""
    path = cfg.out / STATE_FILE
    if not path.exists():
        return 0, [], 0.0
    if not cfg.resume:
        raise ValueError(f"{path} holds an earlier run; pass --resume to continue it, or choose another --out")
    state = torch.load(path, map_location=rt.device, weights_only=True)
    changed = {k: (state["recipe"].get(k), v) for k, v in _recipe(cfg).items() if state["recipe"].get(k) != v}
    if changed:
        raise ValueError(f"cannot resume {path}: the recipe changed {changed} (saved, now); keep it or use a new --out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    logger.info("resuming %s after epoch %d", path, state["epoch"])
    return state["epoch"], state["history"], state["wall_time_s"]


# -------------------------------------------------------------------------------------------------------- output


def describe_hardware(rt: Runtime) -> dict[str, Any]:
    """CPU model, GPU name, torch thread count and number of processes of this run."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    gpu = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None
    return dict(device=rt.device.type, cpu=cpu, gpu=gpu, threads=torch.get_num_threads(), world_size=rt.world_size)


def _metrics(cfg: TrainConfig, model: PosencModel, rt: Runtime, history: list, wall: float,
             train_set: ImageSet, test_set: ImageSet) -> dict[str, Any]:
    """The machine-readable record of a run: result, model, recipe, hardware and per-epoch history."""
    train_s = sum(h["train_s"] for h in history)
    scored = [h["accuracy"] for h in history if h["accuracy"] is not None]
    return dict(
        accuracy=scored[-1] if scored else None, mechanisms=list(model.mechanisms), family=cfg.family,
        architecture=model.architecture, params=model.num_params(), dataset=str(cfg.data),
        train_images=len(train_set.labels), test_images=len(test_set.labels),
        epochs=cfg.epochs, epochs_done=history[-1]["epoch"] if history else 0, batch_size=cfg.batch_size,
        optimizer=dict(name="AdamW", lr=cfg.lr, betas=[0.9, 0.999], weight_decay=cfg.weight_decay,
                       grad_clip=cfg.grad_clip),
        schedule=dict(name="linear warm-up + cosine", warmup_epochs=cfg.warmup_epochs, min_lr_ratio=cfg.min_lr_ratio),
        label_smoothing=cfg.label_smoothing, seed=cfg.seed,
        augmentation=dict(crop_padding=cfg.padding, pad_mode=cfg.pad_mode, flip=cfg.flip, erasing=cfg.erasing,
                          mixup=cfg.mixup, cutmix=cfg.cutmix),
        precision="bf16 autocast" if rt.autocast else "fp32", hardware=describe_hardware(rt), wall_time_s=wall,
        train_images_per_s=len(train_set.labels) * len(history) / train_s if train_s else None,
        torch_version=torch.__version__, history=history,
    )


def model_card_training(metrics: dict[str, Any]) -> str:
    """The model card's training section: the measured accuracy and the full recipe, in Markdown."""
    m, hw, opt, aug = metrics, metrics["hardware"], metrics["optimizer"], metrics["augmentation"]
    augmentation = [f"random crop (pad {aug['crop_padding']}, {aug['pad_mode']})"] if aug["crop_padding"] else []
    augmentation += ["horizontal flip"] if aug["flip"] else []
    augmentation += [f"{k} {aug[k]:g}" for k in ("erasing", "mixup", "cutmix") if aug[k]]
    where = f"{hw['gpu']} GPU" if hw["gpu"] else f"{hw['cpu']}, {hw['threads']} threads"
    rows = [
        ("test accuracy", f"**{100 * m['accuracy']:.2f}%** top-1 on {m['test_images']:,} held-out images"),
        ("position mechanisms", ", ".join(m["mechanisms"]) or "none"),
        ("parameters", f"{m['params']:,}"),
        ("data", f"{m['dataset']} ({m['train_images']:,} training images)"),
        ("epochs", m["epochs"]),
        ("batch size", m["batch_size"]),
        ("optimiser", f"AdamW, lr {opt['lr']:g}, betas {tuple(opt['betas'])}, weight decay {opt['weight_decay']:g} "
                      f"(none on norms, biases, tokens, position tables), gradient clip {opt['grad_clip']:g}"),
        ("schedule", f"linear warm-up {m['schedule']['warmup_epochs']:g} epochs, then cosine to "
                     f"{m['schedule']['min_lr_ratio']:g} x lr, per step"),
        ("loss", f"cross-entropy, label smoothing {m['label_smoothing']:g}"),
        ("augmentation", ", ".join(augmentation) or "none"),
        ("precision", m["precision"]),
        ("seed", m["seed"]),
        ("hardware", f"{where}, {hw['world_size']} process(es)"),
        ("wall time", f"{m['wall_time_s'] / 60:.1f} min"),
        ("torch", m["torch_version"]),
    ]
    return "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def write_outputs(model: PosencModel, out: Path, metrics: dict[str, Any]) -> None:
    """Write the Hub-layout folder: config.json + model.safetensors, a README.md model card, metrics.json."""
    model.save_pretrained(out)
    card = model.generate_model_card(training=model_card_training(metrics), repo_hint=str(out),
                                     position=mechanisms.card_position(model.mechanisms))
    card.data.datasets = ["cifar10"] if metrics["dataset"].endswith(".zip") else None
    card.data.metrics = ["accuracy"]
    card.save(out / "README.md")  # replaces the card save_pretrained leaves when README.md is absent
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s: test accuracy %.2f%%", out, 100 * metrics["accuracy"])


def ablation_table(checkpoints_dir: str | Path) -> str:
    """The README's ablation table, rendered from the ``metrics.json`` that training wrote in every model folder.

    Returns:
        A Markdown table, in :data:`PRESETS` order: preset, checkpoint, parameters, CIFAR-10 test accuracy,
        epochs, training time and hardware.
    """
    rows = []
    for folder in sorted(Path(checkpoints_dir).iterdir()):
        path = folder / "metrics.json"
        metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not metrics or metrics.get("accuracy") is None:
            continue
        hardware = metrics.get("hardware", {})
        device = hardware.get("gpu") or hardware.get("cpu") or hardware.get("device", "?")
        threads = hardware.get("threads")
        preset = metrics["family"]
        rows.append(
            (
                PRESETS.index(preset) if preset in PRESETS else len(PRESETS),
                f"| {preset} | `{folder.name}` | {metrics['params']:,} | {100 * metrics['accuracy']:.1f} % "
                f"| {metrics['epochs']} | {metrics['wall_time_s'] / 60:.0f} min | {device}"
                + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
                + " |",
            )
        )
    header = (
        "| preset | checkpoint | parameters | CIFAR-10 test accuracy | epochs | training time | hardware |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(row for _, row in sorted(rows)) + "\n"


# ----------------------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the ``python -m posenc`` subparsers."""
    d = TrainConfig
    p = subparsers.add_parser(
        "train", help="train a CIFAR-10 model preset on CIFAR-10 or an ImageFolder",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--family", choices=PRESETS, required=True, help="the cifar_model preset (its position encoding)")
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 JPEG zip, or ImageFolder root with train/, val/")
    p.add_argument("--out", type=Path, required=True, help="output folder (Hub layout, README.md, metrics.json)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch over all ranks")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 disables")
    p.add_argument("--padding", type=int, default=d.padding, help="random-crop padding; 0 disables the crop")
    p.add_argument("--pad-mode", choices=("reflect", "zero"), default=d.pad_mode)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--erasing", type=float, default=d.erasing, help="random-erasing probability")
    p.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha; 0 disables")
    p.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha; 0 disables")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision, help="auto: bf16 on GPU only")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every k epochs and after the last")
    p.add_argument("--train-limit", type=int, help="class-balanced training subset size")
    p.add_argument("--test-limit", type=int, help="class-balanced test subset size")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--cache-dir", type=Path, help="decoded-CIFAR cache (default ~/.cache/posenc)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt when it exists")
    p.add_argument("--stop-after", type=int, help="leave after this many epochs; continue later with --resume")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``python -m posenc train``: train from parsed arguments; returns the exit status."""
    try:
        metrics = train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
    except (ValueError, FileNotFoundError, zipfile.BadZipFile) as error:
        logger.error("%s", error)
        return 2
    finally:
        distributed.leave()
    if metrics["epochs_done"] < metrics["epochs"] and int(os.environ.get("RANK", "0")) == 0:
        logger.info("stopped after epoch %d of %d; continue with --resume", metrics["epochs_done"], metrics["epochs"])
    return 0
