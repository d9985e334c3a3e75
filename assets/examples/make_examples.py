"""Draw the app's example images (run from the repository root: ``python assets/examples/make_examples.py``).

Three scenes are drawn here with numpy and PIL, so the project owns them (Apache-2.0 with the code).
``grace_hopper.jpg`` is copied from matplotlib's bundled sample data; it is an official U.S. Navy
photograph of Commodore Grace M. Hopper and is in the public domain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = (384, 288)  # (w, h): landscape, so the models' centre crop has something to cut


def vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    """An RGB image fading from ``top`` to ``bottom``."""
    w, h = size
    t = np.linspace(0.0, 1.0, h)[:, None, None]  # h, 1, 1
    rows = (1 - t) * np.array(top) + t * np.array(bottom)  # h, 1, 3
    return Image.fromarray(np.broadcast_to(rows, (h, w, 3)).astype(np.uint8))


def clouds(img: Image.Image, seed: int) -> Image.Image:
    """Soft white blobs over the upper part of ``img``."""
    rng = np.random.default_rng(seed)
    layer = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(layer)
    w, h = img.size
    for _ in range(7):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h * 0.45)
        for _ in range(5):
            r = rng.uniform(12, 30)
            dx, dy = rng.uniform(-35, 35), rng.uniform(-8, 8)
            draw.ellipse((cx + dx - r, cy + dy - r * 0.6, cx + dx + r, cy + dy + r * 0.6), fill=200)
    layer = layer.filter(ImageFilter.GaussianBlur(6))
    return Image.composite(Image.new("RGB", img.size, (255, 255, 255)), img, layer)


def airplane() -> Image.Image:
    """A grey airliner crossing a blue sky."""
    img = clouds(vertical_gradient((70, 130, 205), (185, 215, 240), SIZE), seed=1)
    draw = ImageDraw.Draw(img)
    body = (80, 140, 300, 165)
    draw.rounded_rectangle(body, radius=12, fill=(225, 228, 232), outline=(90, 95, 105), width=2)
    draw.polygon([(300, 140), (330, 152), (300, 165)], fill=(225, 228, 232), outline=(90, 95, 105))
    draw.polygon([(170, 150), (235, 150), (160, 230), (135, 230)], fill=(200, 204, 210), outline=(90, 95, 105))
    draw.polygon([(170, 150), (230, 150), (175, 95), (155, 95)], fill=(190, 195, 202), outline=(90, 95, 105))
    draw.polygon([(85, 142), (110, 142), (80, 95), (65, 95)], fill=(200, 60, 60), outline=(90, 95, 105))
    for x in range(130, 290, 14):
        draw.ellipse((x, 146, x + 6, 152), fill=(60, 70, 90))
    return img


def sailboat() -> Image.Image:
    """A sailboat on the sea under a low sun."""
    w, h = SIZE
    img = vertical_gradient((250, 180, 120), (255, 225, 190), (w, h))
    draw = ImageDraw.Draw(img)
    draw.ellipse((250, 70, 310, 130), fill=(255, 240, 170))
    sea = vertical_gradient((30, 90, 140), (10, 40, 80), (w, h - 175))
    img.paste(sea, (0, 175))
    draw = ImageDraw.Draw(img)
    for y in range(185, h, 9):
        draw.line((0, y, w, y), fill=(60, 120, 170), width=1)
    draw.polygon([(110, 190), (250, 190), (225, 215), (135, 215)], fill=(120, 60, 30))
    draw.line((180, 60, 180, 190), fill=(70, 40, 20), width=4)
    draw.polygon([(184, 65), (184, 182), (245, 182)], fill=(250, 250, 245), outline=(150, 150, 150))
    draw.polygon([(176, 80), (176, 182), (125, 182)], fill=(235, 235, 228), outline=(150, 150, 150))
    return img


def red_car() -> Image.Image:
    """A red car on a road in front of green hills."""
    w, h = SIZE
    img = vertical_gradient((120, 175, 230), (200, 225, 245), (w, h))
    draw = ImageDraw.Draw(img)
    draw.ellipse((-80, 120, 220, 300), fill=(90, 150, 80))
    draw.ellipse((150, 130, 480, 320), fill=(70, 130, 65))
    draw.rectangle((0, 215, w, h), fill=(80, 80, 85))
    for x in range(0, w, 48):
        draw.rectangle((x, 250, x + 24, 255), fill=(235, 235, 235))
    draw.rounded_rectangle((85, 165, 305, 225), radius=14, fill=(200, 30, 35), outline=(90, 10, 15), width=2)
    draw.polygon([(130, 167), (160, 125), (245, 125), (275, 167)], fill=(185, 25, 30), outline=(90, 10, 15))
    draw.polygon([(143, 164), (166, 132), (200, 132), (200, 164)], fill=(170, 210, 235))
    draw.polygon([(208, 164), (208, 132), (240, 132), (262, 164)], fill=(170, 210, 235))
    for cx in (135, 255):
        draw.ellipse((cx - 24, 200, cx + 24, 248), fill=(25, 25, 25))
        draw.ellipse((cx - 11, 213, cx + 11, 235), fill=(170, 170, 175))
    draw.rectangle((292, 180, 305, 192), fill=(255, 230, 120))
    return img


def main() -> None:
    for name, draw in (("airplane.png", airplane), ("sailboat.png", sailboat), ("red_car.png", red_car)):
        draw().save(HERE / name, optimize=True)
    shutil.copyfile(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", HERE / "grace_hopper.jpg")


if __name__ == "__main__":
    main()
