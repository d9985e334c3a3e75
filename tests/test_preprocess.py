"""Tests for posenc.preprocess: the timm eval transform, config conversion and image loading."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from posenc.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    Preprocess,
    build_transform,
    load_image,
    preprocess_batch,
)

CONFIGS = {
    "deit-0.875-bicubic": Preprocess(crop_pct=0.875, interpolation="bicubic"),
    "deit-0.9-bicubic": Preprocess(crop_pct=0.9, interpolation="bicubic"),
    "bilinear-1.0": Preprocess(crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3),
    "nonsquare-0.9": Preprocess(input_size=(160, 224), crop_pct=0.9),
    "squash-0.875": Preprocess(crop_pct=0.875, crop_mode="squash"),
    "nearest-0.95": Preprocess(input_size=(96, 96), crop_pct=0.95, interpolation="nearest"),
}


def timm_data():
    """timm.data, the reference implementation; skips the test when timm is not installed."""
    return pytest.importorskip("timm.data", reason="timm is the reference for the eval transform")


def timm_transform(pp: Preprocess):
    """The reference: timm's own eval transform built from the same fields."""
    return timm_data().create_transform(
        input_size=(3, *pp.input_size), interpolation=pp.interpolation, mean=pp.mean, std=pp.std,
        crop_pct=pp.crop_pct, crop_mode=pp.crop_mode,
    )


def random_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth gradient plus noise, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (CRC fixed up) claims `width` x `height`."""
    data = bytearray(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(300, 400), (257, 255), (37, 500), (1, 1), (600, 33)])
def test_transform_equals_timm_on_synthetic_images(name, hw):
    pp = CONFIGS[name]
    img = random_rgb(*hw, seed=hw[0] * 1000 + hw[1])
    ours = build_transform(pp)(img)
    assert ours.shape == (3, *pp.input_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, timm_transform(pp)(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["deit-0.875-bicubic", "deit-0.9-bicubic", "bilinear-1.0", "nonsquare-0.9"])
def test_transform_equals_timm_on_real_photos(shared_data, name):
    photos = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))[:: 50]
    if not photos:
        pytest.skip("no photos in imagenet-samples")
    pp = CONFIGS[name]
    ours, reference = build_transform(pp), timm_transform(pp)
    for path in photos:
        img = load_image(path)
        torch.testing.assert_close(ours(img), reference(img), rtol=0, atol=1e-6, msg=path.name)


def test_transform_of_extreme_aspect_ratio_stays_within_one_level_of_timm():
    pp = CONFIGS["deit-0.9-bicubic"]
    img = random_rgb(2, 300)  # timm resizes this to 248 x 37200 before cropping; we resample only the crop
    diff = (build_transform(pp)(img) - timm_transform(pp)(img)).abs()
    one_level = 1 / 255 / min(pp.std)
    assert diff.max() <= one_level + 1e-6
    assert diff.mean() < 0.01 * one_level


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 1)])
def test_tiny_and_strip_images_load_and_transform(size):
    img = load_image(Image.new("RGB", size, (200, 10, 10)))
    start = time.perf_counter()
    x = build_transform(Preprocess())(img)
    assert time.perf_counter() - start < 2.0
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([200, 10, 10]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 112, 112], expected.float(), rtol=0, atol=1e-5)


def test_preprocess_batch_stacks_individual_transforms():
    pp = CONFIGS["deit-0.9-bicubic"]
    images = [random_rgb(100, 150, seed=1), encode(random_rgb(80, 60, seed=2), "PNG")]
    batch = preprocess_batch(images, pp)
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[1], build_transform(pp)(load_image(images[1])))
    with pytest.raises(ValueError):
        preprocess_batch([], pp)


def test_from_timm_reads_deit_tiny_config(shared_data):
    config = json.loads((shared_data / "deit_tiny_patch16_224.fb_in1k" / "config.json").read_text())
    pp = Preprocess.from_timm(config["pretrained_cfg"])
    assert pp == Preprocess(input_size=(224, 224), interpolation="bicubic", crop_pct=0.9, crop_mode="center")
    assert pp.mean == IMAGENET_MEAN and pp.std == IMAGENET_STD
    assert Preprocess.from_timm(config) == pp  # the whole config.json works too


@pytest.mark.parametrize("cfg", [
    {"input_size": [3, 384, 384], "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3},
    {"input_size": [3, 256, 192], "crop_mode": "squash"},
    {"crop_pct": None, "interpolation": ""},
])
def test_from_timm_resolves_like_timm(cfg):
    resolved = timm_data().resolve_data_config(pretrained_cfg=cfg)
    pp = Preprocess.from_timm(cfg)
    assert (3, *pp.input_size) == tuple(resolved["input_size"])
    for key in ("interpolation", "crop_pct", "crop_mode"):
        assert getattr(pp, key) == resolved[key], key
    assert pp.mean == tuple(resolved["mean"]) and pp.std == tuple(resolved["std"])


def test_preprocess_round_trips_through_json():
    pp = Preprocess(input_size=(160, 224), interpolation="bilinear", crop_pct=0.95, mean=(0.1, 0.2, 0.3),
                    crop_mode="squash")
    data = json.loads(json.dumps(pp.to_dict()))
    assert isinstance(data["input_size"], list)
    back = Preprocess.from_dict({**data, "some_future_key": 1})
    assert back == pp and isinstance(back.input_size, tuple) and isinstance(back.mean, tuple)
    assert hash(back) == hash(pp)


@pytest.mark.parametrize("kwargs, match", [
    ({"input_size": (224, 0)}, "input_size"),
    ({"input_size": (3, 224, 224)}, "input_size"),
    ({"input_size": (224.0, 224.0)}, "input_size"),
    ({"interpolation": "lanczos"}, "interpolation"),
    ({"crop_pct": 0.0}, "crop_pct"),
    ({"crop_pct": 1.2}, "crop_pct"),
    ({"crop_pct": "0.9"}, "crop_pct"),
    ({"crop_mode": "border"}, "crop_mode"),
    ({"mean": (0.5, 0.5)}, "mean"),
    ({"std": (0.5, 0.0, 0.5)}, "std"),
    ({"std": (0.5, float("nan"), 0.5)}, "std"),
])
def test_preprocess_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kwargs)


def test_from_transformers_deit_config_matches_pil_processor():
    cfg = {"image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 256, "width": 256},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
           "image_std": list(IMAGENET_STD)}
    pp = Preprocess.from_transformers(cfg)
    assert pp == Preprocess(crop_pct=0.875, crop_mode="squash", interpolation="bicubic")
    deit = pytest.importorskip("transformers.models.deit.image_processing_pil_deit")
    processor = deit.DeiTImageProcessorPil(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    img = random_rgb(300, 410, seed=3)
    expected = torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(build_transform(pp)(img), expected.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg, expected", [
    ({"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     Preprocess(crop_pct=1.0, crop_mode="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)),
    ({"size": 384, "resample": 3, "do_center_crop": False, "crop_size": 224},
     Preprocess(input_size=(384, 384), crop_pct=1.0, crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)),
    ({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224, "resample": 3, "do_normalize": False},
     Preprocess(crop_pct=0.875, crop_mode="center", mean=(0.0,) * 3, std=(1.0,) * 3)),
    ({"size": 224, "resample": 0, "do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3},
     Preprocess(crop_pct=1.0, crop_mode="squash", interpolation="nearest", mean=(0.5,) * 3, std=(0.5,) * 3)),
])
def test_from_transformers_equivalences(cfg, expected):
    assert Preprocess.from_transformers(cfg) == expected


def test_from_transformers_shortest_edge_matches_pil_processor():
    cfg = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
           "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    deit = pytest.importorskip("transformers.models.deit.image_processing_pil_deit")
    processor = deit.DeiTImageProcessorPil(**cfg)
    img = random_rgb(300, 400, seed=4)  # resized to 256 x 341: odd margin 117 floors and rounds alike
    expected = torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))
    ours = build_transform(Preprocess.from_transformers(cfg))(img)
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [
    {"size": {"shortest_edge": 224}},  # no crop: the input size would vary per image
    {"size": {"height": 256, "width": 320}, "do_center_crop": True, "crop_size": 224},  # two different ratios
    {"size": 224, "resample": 1},  # lanczos
    {"size": 224, "do_resize": False},
    {"size": {"height": 200, "width": 200}, "do_center_crop": True, "crop_size": 224},  # crop larger than image
])
def test_from_transformers_rejects_unrepresentable_configs(cfg):
    with pytest.raises(ValueError):
        Preprocess.from_transformers(cfg)


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "file", "pil", "array"])
def test_load_image_accepts_every_source_kind(tmp_path, kind):
    img = random_rgb(20, 30)
    path = tmp_path / "x.png"
    path.write_bytes(encode(img, "PNG"))
    source = {"path": path, "str": str(path), "bytes": path.read_bytes(), "file": io.BytesIO(path.read_bytes()),
              "pil": img, "array": np.asarray(img)}[kind]
    out = load_image(source)
    assert out.mode == "RGB" and out.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_load_image_rejects_unknown_source_type():
    with pytest.raises(TypeError):
        load_image(12345)


@pytest.mark.parametrize("as_path", [True, False])
def test_empty_file_is_refused(tmp_path, as_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path if as_path else b"")


def test_text_named_png_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just some text, not pixels\n" * 20)
    with pytest.raises(ImageError, match="not an image") as err:
        load_image(path)
    assert "notes.png" in str(err.value) and "PNG or JPEG" in str(err.value)


@pytest.mark.parametrize("name, text", [
    ("drawing.svg", '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5"/></svg>'),
    ("", '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>'),
])
def test_svg_is_refused_with_vector_message(tmp_path, name, text):
    source = text.encode()
    if name:
        source = tmp_path / name
        source.write_text(text)
    with pytest.raises(ImageError, match="SVG") as err:
        load_image(source)
    assert "vector" in str(err.value) and "PNG or JPEG" in str(err.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(fmt):
    data = encode(random_rgb(64, 64), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_is_configurable_per_call():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="megapixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("side", [40000, 9000])  # above PIL's own bomb limit, and between it and ours
def test_header_bomb_is_refused_before_decoding(monkeypatch, side):
    max_image_pixels = Image.MAX_IMAGE_PIXELS
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    start = time.perf_counter()
    with pytest.raises(ImageError, match="megapixel"):
        load_image(png_with_header_size(side, side))
    assert time.perf_counter() - start < 1.0
    assert loads == []  # nothing was decoded (tracemalloc cannot see PIL's C allocations, so we watch load())
    assert Image.MAX_IMAGE_PIXELS == max_image_pixels  # no global state touched


@pytest.mark.parametrize("fmt, scale", [("JPEG", 1), ("PNG", 1), ("JPEG", 8), ("PNG", 8)])
def test_exif_orientation_6_comes_out_upright(fmt, scale):
    stored = np.zeros((20 * scale, 40 * scale, 3), np.uint8)  # wide, with a red block at the top-left
    stored[: 5 * scale, : 5 * scale] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(stored), fmt, quality=95, exif=exif.tobytes())
    out = np.asarray(load_image(data, max_decoded_pixels=800))  # scale 8: drafted / reduced, EXIF must survive
    assert out.shape == (40, 20, 3)
    assert out[2, -3, 0] > 200 and out[2, -3, 1] < 60  # top-right after the clockwise turn
    assert out[2, 2, 0] < 60 and out[-3, 2, 0] < 60


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(np.asarray(load_image(data))[8, 8], [255, 0, 0])


def test_palette_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = np.asarray(load_image(encode(img, "PNG", transparency=0)))
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


@pytest.mark.parametrize("mode, value, expected", [
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
    ("LA", (0, 0), (255, 255, 255)),
    ("LA", (40, 255), (40, 40, 40)),
])
def test_alpha_is_composited_on_white(mode, value, expected):
    out = np.asarray(load_image(encode(Image.new(mode, (3, 3), value), "PNG")))
    np.testing.assert_allclose(out[1, 1], expected, atol=1)


@pytest.mark.parametrize("values, expected", [
    ([0, 257, 32768, 65535], [0, 1, 128, 255]),
    ([0, 100, 200, 255], [0, 0, 1, 1]),  # a dark 16-bit image stays dark: scaled by 16 bits, not by its maximum
])
def test_16_bit_png_is_scaled_by_bit_depth_not_clipped(values, expected):
    img = Image.frombytes("I;16", (4, 1), np.array(values, dtype="<u2").tobytes())
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(data))[0, :, 0], expected)


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [0, 100, 255], [0, 100, 255]),  # fits 8 bits: kept
    ("I", [0, 1000, 65535], [0, 4, 255]),  # 16-bit data in a 32-bit container
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
    ("F", [0.0, 100.0, 300.0], [0, 100, 255]),
])
def test_high_bit_depth_modes_are_scaled(mode, values, expected):
    dtype = np.float32 if mode == "F" else np.int32
    img = Image.fromarray(np.array([values], dtype=dtype), mode=None)
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(img))[0, :, 1], expected)


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_other_modes_convert_to_rgb(mode, value, expected):
    out = np.asarray(load_image(Image.new(mode, (2, 2), value)))
    np.testing.assert_allclose(out[0, 0], expected, atol=2)


def test_cmyk_jpeg_with_adobe_marker_decodes_to_right_colour():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # PIL stores inverted CMYK and marks it, as Photoshop does
    np.testing.assert_allclose(np.asarray(load_image(data))[8, 8], (255, 0, 0), atol=3)


@pytest.mark.parametrize("array, expected", [
    (np.full((2, 2), 9, np.uint8), (9, 9, 9)),
    (np.full((2, 2, 1), 9, np.int64), (9, 9, 9)),
    (np.full((2, 2), 65535, np.uint16), (255, 255, 255)),
    (np.full((2, 2, 3), 0.5, np.float64), (128, 128, 128)),
    (np.full((2, 2), True), (255, 255, 255)),
    (np.dstack([np.full((2, 2, 3), 0, np.uint8), np.zeros((2, 2, 1), np.uint8)]), (255, 255, 255)),
])
def test_arrays_convert_by_dtype(array, expected):
    np.testing.assert_array_equal(np.asarray(load_image(array))[0, 0], expected)


@pytest.mark.parametrize("array", [np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8), np.zeros(5)])
def test_bad_array_shape_is_refused(array):
    with pytest.raises(ImageError, match="shape"):
        load_image(array)


def test_image_without_pixels_is_refused():
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 3)))


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "I;16")])
def test_huge_images_are_reduced_while_loading(monkeypatch, fmt, mode):
    img = random_rgb(480, 600, seed=5)
    img = {"RGB": img, "P": img.quantize(64), "I;16": img.convert("L").convert("I").point(lambda v: v * 257)}[mode]
    data = encode(img.convert("I;16") if mode == "I;16" else img, fmt, quality=95)
    full = load_image(data)
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded_sizes.append(self.size) or real_load(self))
    out = load_image(data, max_decoded_pixels=36_000)
    assert out.width * out.height <= 36_000
    assert abs(out.width / out.height - 1.25) < 0.02
    if fmt == "JPEG":  # decoded at reduced scale, not reduced after a full decode
        assert decoded_sizes and decoded_sizes[0][0] * decoded_sizes[0][1] <= 600 * 480 // 4
    reference = np.asarray(full.resize(out.size, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(out, np.float32) - reference).mean() < 8  # the same picture, smaller
