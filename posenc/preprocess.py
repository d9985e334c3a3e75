"""Image input handling and the timm evaluation transform.

Sizes are (h, w) throughout; PIL's own ``Image.size`` is (w, h) and is swapped where it is read.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 64_000_000  # larger images are refused, judged from the header before decoding
MAX_DECODED_PIXELS = 4096 * 4096  # larger (allowed) images are reduced by an integer factor while loading
_RESAMPLE = {name: Image.Resampling[name.upper()] for name in ("nearest", "bilinear", "bicubic")}
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # transformers' PIL `resample` ints
_CROP_MODES = ("center", "squash")
_MAX_RESIZED_PIXELS = 4_000_000  # above this (12 MB of RGB) only the crop window is resized
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr")  # modes Image.reduce averages correctly
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_HINT = "Please upload a PNG or JPEG image."

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, Image.Image]


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is written for the person who supplied it."""


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite floats from a sequence of 3 or one broadcast number."""
    values = (value,) * 3 if isinstance(value, Real) else tuple(value)
    finite = all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if len(values) != 3 or not finite:
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of one model, in timm's terms; `build_transform` turns it into a callable."""

    input_size: tuple[int, int] = (224, 224)  # (h, w) of the tensor fed to the model
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    crop_pct: float = 0.875  # input side / resized side, in (0, 1]
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, on the 0..1 pixel scale
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"  # "center": keep aspect ratio, then crop; "squash": resize both sides, then crop

    def __post_init__(self) -> None:
        size = (self.input_size,) * 2 if isinstance(self.input_size, Integral) else tuple(self.input_size)
        if len(size) != 2 or not all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"input_size must be two positive integers (h, w), got {self.input_size!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        pct = self.crop_pct
        if not (isinstance(pct, Real) and not isinstance(pct, bool) and 0.0 < pct <= 1.0):
            raise ValueError(f"crop_pct must be a number in (0, 1], got {pct!r}")
        if self.crop_mode not in _CROP_MODES:
            raise ValueError(f"crop_mode must be one of {_CROP_MODES}, got {self.crop_mode!r}")
        mean, std = _triple("mean", self.mean), _triple("std", self.std)
        if min(std) <= 0.0:
            raise ValueError(f"std must be positive, got {std}")
        normalised = {"input_size": tuple(int(s) for s in size), "crop_pct": float(pct), "mean": mean, "std": std}
        for name, value in normalised.items():  # frozen: JSON lists become tuples here
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples serialise as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """Inverse of `to_dict`; unknown keys are ignored so configs from newer versions still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_timm(cls, pretrained_cfg: dict[str, Any]) -> Preprocess:
        """From timm's ``pretrained_cfg`` (or a whole timm ``config.json``), with timm's defaults for missing keys.

        Args:
            pretrained_cfg: ``input_size`` ([3, H, W]), ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``,
                ``std``, as ``timm.data.resolve_data_config`` reads them.
        """
        cfg = pretrained_cfg.get("pretrained_cfg", pretrained_cfg)
        chans, *size = cfg.get("input_size") or (3, 224, 224)
        if chans != 3 or len(size) != 2:
            raise ValueError(f"only RGB models with input_size [3, H, W] are supported, got {cfg.get('input_size')!r}")
        return cls(input_size=tuple(size), interpolation=cfg.get("interpolation") or "bicubic",
                   crop_pct=cfg.get("crop_pct") or 0.875, mean=cfg.get("mean") or IMAGENET_MEAN,
                   std=cfg.get("std") or IMAGENET_STD, crop_mode=cfg.get("crop_mode") or "center")

    @classmethod
    def from_transformers(cls, preprocessor_config: dict[str, Any]) -> Preprocess:
        """From a transformers ``preprocessor_config.json`` (ViT, DeiT, BEiT and similar image processors).

        transformers 5.24 resizes to a ``{"height", "width"}`` size exactly, ignoring the aspect ratio (timm's
        ``crop_mode="squash"``), and resizes the shorter side to ``{"shortest_edge": s}`` (timm's "center"). So:

        - size {H, W}, no center crop -> input (H, W), squash, crop_pct 1.0 (a plain resize to (H, W));
        - size {H, W} + crop (h, w) -> input (h, w), squash, crop_pct = h / H (must also give w / W);
        - size {shortest_edge: s} + square crop c -> input (c, c), center, crop_pct = c / s;
        - an int size means {H: size, W: size}, as in the ViT-family processors;
        - ``rescale_factor`` (when not 1/255) and ``do_normalize=False`` are folded into mean/std.

        This equals the PIL backend (e.g. ``DeiTImageProcessorPil``) to float rounding, except that timm rounds an
        odd crop margin half-to-even where transformers floors it (a one-pixel shift). The default torchvision
        backend antialiases tensors and differs from PIL by a few 1/255 steps. Missing keys take
        ViTImageProcessor's defaults (224x224, bilinear, mean = std = 0.5, no crop).
        """
        cfg = preprocessor_config
        if not cfg.get("do_resize", True):
            raise ValueError("do_resize=False gives a different input size per image; posenc needs a fixed size")
        size, crop = cfg.get("size", 224), cfg.get("crop_size") if cfg.get("do_center_crop") else None
        size = {"height": size, "width": size} if isinstance(size, Integral) else dict(size)
        crop = {"height": crop, "width": crop} if isinstance(crop, Integral) else crop
        if "height" in size and "width" in size:
            resized, mode = (size["height"], size["width"]), "squash"
            crop_hw = (crop["height"], crop["width"]) if crop else resized
        elif set(size) == {"shortest_edge"} and crop and crop["height"] == crop["width"]:
            resized, crop_hw, mode = (size["shortest_edge"],) * 2, (crop["height"], crop["width"]), "center"
        else:
            raise ValueError(f"unsupported size/crop combination: size={cfg.get('size')!r}, crop={crop!r}; "
                             "posenc needs a fixed input size (height/width, or shortest_edge with a square crop)")
        resample = cfg.get("resample", 2)
        if resample not in _HF_RESAMPLE:
            raise ValueError(f"resample={resample!r} is not supported; use 0 (nearest), 2 (bilinear) or 3 (bicubic)")
        scale = 255 * (cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0)
        mean, std = _triple("image_mean", cfg.get("image_mean", 0.5)), _triple("image_std", cfg.get("image_std", 0.5))
        if not cfg.get("do_normalize", True):
            mean, std = (0.0,) * 3, (1.0,) * 3
        return cls(input_size=crop_hw, interpolation=_HF_RESAMPLE[resample], crop_pct=_crop_pct(crop_hw, resized),
                   mean=tuple(m / scale for m in mean), std=tuple(v / scale for v in std), crop_mode=mode)


def _crop_pct(crop: tuple[int, int], resized: tuple[int, int]) -> float:
    """The crop_pct for which timm's ``floor(crop / crop_pct)`` gives exactly `resized` on both sides."""
    pct = crop[0] / resized[0]
    for _ in range(4):  # the float quotient may floor one short; step down an ulp at a time
        if pct <= 1.0 and all(math.floor(c / pct) == r for c, r in zip(crop, resized)):
            return pct
        pct = math.nextafter(pct, 0.0)
    raise ValueError(f"a {crop} crop of a {resized} resize cannot be written as one crop_pct <= 1")


def _resize_and_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """timm's eval resize and center crop of an RGB image to `pp.input_size`."""
    h, w = pp.input_size
    img_w, img_h = img.size
    scale_h, scale_w = (math.floor(s / pp.crop_pct) for s in pp.input_size)
    if pp.crop_mode == "squash":
        new_h, new_w = scale_h, scale_w
    elif scale_h == scale_w:  # torchvision Resize(int): shorter side to the size, longer side truncated
        short, long = sorted((img_h, img_w))
        new_long = int(scale_h * long / short)
        new_h, new_w = (new_long, scale_h) if img_w <= img_h else (scale_h, new_long)
    else:  # timm ResizeKeepRatio: scale by the side needing the least change, round half to even
        ratio = min(img_h / scale_h, img_w / scale_w)
        new_h, new_w = round(img_h / ratio), round(img_w / ratio)
    top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))  # torchvision CenterCrop
    resample = _RESAMPLE[pp.interpolation]
    if new_h * new_w <= _MAX_RESIZED_PIXELS:
        return img.resize((new_w, new_h), resample).crop((left, top, left + w, top + h))
    # Extreme aspect ratios (a 1x20000 strip would resize to 256x5,120,000): resample only the crop window.
    # Same filter and sample positions; float rounding of the window can move a pixel by one 8-bit step.
    sx, sy = img_w / new_w, img_h / new_h
    return img.resize((w, h), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def build_transform(pp: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """timm's ``transforms_imagenet_eval`` for `pp`: resize to floor(size / crop_pct), center crop, normalize.

    Returns:
        A function from a PIL image (any mode) to a float32 tensor (3, h, w).
    """

    def transform(img: Image.Image) -> torch.Tensor:
        rgb = img if img.mode == "RGB" else _to_rgb(img)
        return TF.normalize(TF.to_tensor(_resize_and_crop(rgb, pp)), pp.mean, pp.std)  # 3, h, w

    return transform


def preprocess_batch(images: Sequence[ImageSource], pp: Preprocess) -> torch.Tensor:
    """Load every image with `load_image` and transform it; returns float32 (B, 3, h, w)."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    transform = build_transform(pp)
    return torch.stack([transform(load_image(image)) for image in images])  # B, 3, h, w


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS,
               max_decoded_pixels: int = MAX_DECODED_PIXELS) -> Image.Image:
    """Open `source` as an upright RGB image: first frame, EXIF orientation applied, transparency on white.

    Memory stays bounded: the pixel count is read from the header and checked before decoding. Images above
    `max_decoded_pixels` are reduced by an integer factor: JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale
    (``Image.draft``, about 120 MB peak for 64 MP); other formats are decoded at full size and reduced before
    the RGB conversion, peaking (measured at 64 MP) near 6 bytes a pixel for RGB PNG (370 MB), 9 for RGBA
    (550 MB) and 12 for 16-bit (800 MB). The result has at most `max_decoded_pixels` pixels (48 MB of RGB).

    Args:
        source: a path, encoded bytes, a binary file object, a PIL image or an array (H, W[, 1|3|4]);
            integer arrays are scaled by their bit depth, float arrays are read as 0..1 (0..255 if larger).
        max_pixels: refuse images with more pixels than this.
        max_decoded_pixels: reduce larger images to at most this many pixels.
    Returns:
        A new PIL image in mode RGB.
    Raises:
        ImageError: empty, unreadable, vector (SVG), truncated or too large input.
    """
    if isinstance(source, Image.Image):  # the caller's object: never drafted
        return _decode(source, "The image", max_pixels, max_decoded_pixels, draft=False)
    if isinstance(source, np.ndarray):
        return _decode(_from_array(source), "The array", max_pixels, max_decoded_pixels, draft=False)
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(getattr(source, "name", ""))
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        raise TypeError(f"load_image takes a path, bytes, file, PIL image or array, not {type(source).__name__}")
    label = f"The file {os.path.basename(name)!r}" if name else "The upload"
    if not data:
        raise ImageError(f"{label} is empty (0 bytes). {_HINT}")
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own header check, above 2 x Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{label} declares over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels, far "
                         f"above the limit of {max_pixels / 1e6:g} megapixels. Please downscale it.") from e
    except UnidentifiedImageError as e:
        head = data[:4096].lstrip().lower()
        if name.lower().endswith((".svg", ".svgz")) or head.startswith(b"<svg") or (
                head.startswith(b"<?xml") and b"<svg" in head):
            raise ImageError(f"{label} is an SVG; SVG and other vector images are not supported. {_HINT}") from e
        raise ImageError(f"{label} is not an image in a format that can be read. {_HINT}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{label} has a damaged image header ({e}). {_HINT}") from e
    with opened as img:
        return _decode(img, label, max_pixels, max_decoded_pixels, draft=True)


def _decode(img: Image.Image, label: str, max_pixels: int, max_decoded_pixels: int, *, draft: bool) -> Image.Image:
    """Check the header size, then decode (reduced if huge), orient and convert an opened image to RGB."""
    w, h = img.size
    if w * h == 0:
        raise ImageError(f"{label} has no pixels ({w}x{h}). {_HINT}")
    if w * h > max_pixels:
        raise ImageError(f"{label} is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels), above the limit of "
                         f"{max_pixels / 1e6:g} megapixels. Please downscale it and try again.")
    if getattr(img, "n_frames", 1) > 1 and img.tell() != 0:
        img.seek(0)  # the first frame of an animation
    if draft and w * h > max_decoded_pixels:
        factor = math.ceil(math.sqrt(w * h / max_decoded_pixels))
        img.draft(None, (math.ceil(w / factor), math.ceil(h / factor)))  # JPEG only: decode at 1/2..1/8 scale
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise ImageError(f"{label} could not be decoded; the file is truncated or corrupt ({e}). {_HINT}") from e
    img = _eight_bit(_upright(img))
    if img.mode in _REDUCIBLE and "transparency" not in img.info:
        img = _reduce(img, max_decoded_pixels)  # before the RGB conversion, while the image is smallest
    return _reduce(_to_rgb(img), max_decoded_pixels)


def _reduce(img: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink by the smallest integer factor that leaves at most `max_pixels` pixels (``Image.reduce`` keeps info)."""
    w, h = img.size
    factor = max(1, math.isqrt(w * h // max_pixels))
    while math.ceil(w / factor) * math.ceil(h / factor) > max_pixels:
        factor += 1
    return img.reduce(factor) if factor > 1 else img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any; a broken EXIF block is logged and ignored."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as e:
        logger.warning("ignoring unreadable EXIF data: %s", e)
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB copy of `img`: alpha composited on white, 16-bit and float scaled to 8 bits (not clipped)."""
    img = _eight_bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("LA").convert("RGBA") if img.mode == "La" else img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:  # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK itself), YCbCr, LAB, HSV, RGB
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"Images in PIL mode {img.mode!r} are not supported. {_HINT}") from e


def _eight_bit(img: Image.Image) -> Image.Image:
    """Integer (I, I;16*) and float (F) images as 8-bit L, scaled by bit depth; other modes unchanged."""
    return Image.fromarray(_to_uint8(np.asarray(img))) if img.mode.startswith("I") or img.mode == "F" else img


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale to uint8 by bit depth: 16-bit ints by 65535, wider ints by the smallest of 8/16/32 bits holding
    their maximum, floats as 0..1 (0..255 when larger), bool to 0/255; negatives and NaN become 0."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    x = np.nan_to_num(a.astype(np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # in place from here
    top = float(x.max())
    if np.issubdtype(a.dtype, np.floating):
        peak = 1.0 if top <= 1.0 else 255.0
    elif a.dtype.itemsize == 2:
        peak = 65535.0
    else:
        peak = next((p for p in (255.0, 65535.0, 2.0**32 - 1) if top <= p), top)
    x *= 255.0 / peak
    return np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)


def _from_array(a: np.ndarray) -> Image.Image:
    """A PIL image from an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageError(f"An image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(a)))
