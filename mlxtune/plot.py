"""A loss-curve PNG written with numpy and zlib only (matplotlib is not a dependency).

The picture is deliberately plain: white background, grey axes and grid, training loss in blue and
validation loss in orange, each scaled to share one y range. The numbers themselves live in
metrics.jsonl beside the image; the PNG is for a quick look.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .files import atomic_file

BLUE = (31, 119, 180)
ORANGE = (255, 127, 14)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)


# A 3x5 pixel font for the axis numbers: each glyph is five rows of three bits.
GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
}


def _text(img: np.ndarray, x: int, y: int, text: str, color=AXIS, scale: int = 2) -> None:
    """Draw `text` with its top-left corner at (x, y)."""
    h, w, _ = img.shape
    for ch in text:
        for row, bits in enumerate(GLYPHS.get(ch, (0,) * 5)):
            for col in range(3):
                if bits & (4 >> col):
                    y0, x0 = y + row * scale, x + col * scale
                    if 0 <= y0 < h - scale and 0 <= x0 < w - scale:
                        img[y0:y0 + scale, x0:x0 + scale] = color
        x += 4 * scale


def _png_bytes(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            xx, yy = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            img[yy, xx] = color


def loss_plot(train: list[tuple[int, float]], val: list[tuple[int, float]], width: int = 640, height: int = 400) -> np.ndarray:
    """An RGB image (height, width, 3) of the loss curves; points are (iteration, loss)."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 50, width - 15, 15, height - 30
    points = [p for p in train + val if np.isfinite(p[1])]
    for i in range(5):  # horizontal grid lines
        y = top + (bottom - top) * i / 4
        img[int(y), left:right] = GRID
    img[top:bottom + 1, left] = AXIS
    img[bottom, left:right + 1] = AXIS
    if not points:
        return img
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)

    for value, y in ((y_hi, top), (y_lo, bottom)):  # loss range on the y axis, iterations on the x axis
        _text(img, 4, y - 5, f"{value:.2f}"[:5])
    _text(img, left, bottom + 8, str(x_lo))
    _text(img, right - 8 * len(str(x_hi)), bottom + 8, str(x_hi))

    def xy(p):
        return (left + (p[0] - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (p[1] - y_lo) / (y_hi - y_lo) * (bottom - top))

    for series, color in ((train, BLUE), (val, ORANGE)):
        pts = [xy(p) for p in series if np.isfinite(p[1])]
        for a, b in zip(pts, pts[1:]):
            _line(img, *a, *b, color)
        for x, y in pts[-1:] if len(pts) == 1 else []:
            _line(img, x - 2, y, x + 2, y, color, 3)
    return img


def write_loss_png(path: str | Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(_png_bytes(loss_plot(train, val)))
    return Path(path)
