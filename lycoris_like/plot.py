"""A line plot written as a PNG with no dependencies: a small raster, a 5×7 bitmap font and a
zlib-based PNG encoder. The demo draws its loss curves with it, so the demo needs no matplotlib."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ConfigError


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_losses(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                title: str = "validation loss (noise prediction mse)", size: tuple[int, int] = (800, 450)) -> Path:
    """Draw loss curves (`{label: [(step, loss), …]}`) on linear axes and write them as a PNG."""
    width, height = size
    canvas = Canvas(width, height)
    points = [(s, v) for curve in curves.values() for s, v in curve if math.isfinite(v)]
    if not points:
        raise ConfigError("plot_losses needs at least one finite point")
    x_max = max(max(s for s, _ in points), 1)
    y_top = max(v for _, v in points)
    y_ticks = _ticks(0.0, y_top)
    x_ticks = _ticks(0.0, float(x_max))
    y_top = max(y_ticks[-1], y_top)
    scale = 2
    left, right, top, bottom = 70, 150, 40, 55
    x0, x1, y0, y1 = left, width - right, top, height - bottom

    def px(step: float) -> float:
        return x0 + (x1 - x0) * step / x_ticks[-1]

    def py(value: float) -> float:
        return y1 - (y1 - y0) * value / y_top

    grid, axis, ink = (225, 225, 225), (90, 90, 90), (30, 30, 30)
    for v, label in zip(y_ticks, _labels(y_ticks)):
        y = round(py(v))
        canvas.line(x0, y, x1, y, grid)
        canvas.text(x0 - 8 - canvas.text_width(label, scale), y - 7, label, ink, scale)
    for s, label in zip(x_ticks, _labels(x_ticks)):
        x = round(px(s))
        canvas.line(x, y0, x, y1, grid)
        canvas.text(x - canvas.text_width(label, scale) // 2, y1 + 8, label, ink, scale)
    canvas.line(x0, y1, x1, y1, axis)
    canvas.line(x0, y0, x0, y1, axis)
    canvas.text((x0 + x1 - canvas.text_width(title, scale)) // 2, 12, title, ink, scale)
    canvas.text((x0 + x1 - canvas.text_width("step", scale)) // 2, height - 22, "step", ink, scale)
    for i, (label, curve) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(px(s), py(v)) for s, v in curve if math.isfinite(v)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            canvas.line(ax, ay, bx, by, colour, thick=2)
        ly = y0 + 10 + 24 * i
        canvas.rect(x1 + 16, ly + 5, x1 + 40, ly + 8, colour)
        canvas.text(x1 + 48, ly, label, ink, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from `lo` covering `hi` (steps of 1, 2 or 5 × 10ᵏ)."""
    span = max(hi - lo, 1e-12)
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = math.ceil(span / step - 1e-9)
    return [lo + i * step for i in range(n + 1)]


def _labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with the decimals the tick step needs (0, 0.5, 1.0 → "0.0", "0.5", "1.0")."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{v:.{decimals}f}" for v in ticks]


# A 5×7 bitmap font: each glyph is 7 rows (8 with a descender), each row 5 bits as hex
# (16 = the leftmost pixel).
_FONT = {
    "0": "0e 11 13 15 19 11 0e", "1": "04 0c 04 04 04 04 0e", "2": "0e 11 01 02 04 08 1f",
    "3": "1f 02 04 02 01 11 0e", "4": "02 06 0a 12 1f 02 02", "5": "1f 10 1e 01 01 11 0e",
    "6": "06 08 10 1e 11 11 0e", "7": "1f 01 02 04 08 08 08", "8": "0e 11 11 0e 11 11 0e",
    "9": "0e 11 11 0f 01 02 0c",
    "a": "00 00 0e 01 0f 11 0f", "b": "10 10 16 19 11 11 1e", "c": "00 00 0e 10 10 11 0e",
    "d": "01 01 0d 13 11 11 0f", "e": "00 00 0e 11 1f 10 0e", "f": "06 09 08 1c 08 08 08",
    "g": "00 00 0f 11 11 0f 01 0e", "h": "10 10 16 19 11 11 11", "i": "04 00 0c 04 04 04 0e",
    "j": "02 00 06 02 02 02 12 0c", "k": "10 10 12 14 18 14 12", "l": "0c 04 04 04 04 04 0e",
    "m": "00 00 1a 15 15 11 11", "n": "00 00 16 19 11 11 11", "o": "00 00 0e 11 11 11 0e",
    "p": "00 00 1e 11 11 1e 10 10", "q": "00 00 0f 11 11 0f 01 01", "r": "00 00 16 19 10 10 10",
    "s": "00 00 0e 10 0e 01 1e", "t": "08 08 1c 08 08 09 06", "u": "00 00 11 11 11 13 0d",
    "v": "00 00 11 11 11 0a 04", "w": "00 00 11 11 15 15 0a", "x": "00 00 11 0a 04 0a 11",
    "y": "00 00 11 11 11 0f 01 0e", "z": "00 00 1f 02 04 08 1f",
    " ": "00 00 00 00 00 00 00", ".": "00 00 00 00 00 0c 0c", ",": "00 00 00 00 0c 04 08",
    "-": "00 00 00 1f 00 00 00", "+": "00 04 04 1f 04 04 00", "%": "18 19 02 04 08 13 03",
    "(": "02 04 08 08 08 04 02", ")": "08 04 02 02 02 04 08", "/": "00 01 02 04 08 10 00",
    ":": "00 0c 0c 00 0c 0c 00", "=": "00 00 1f 00 1f 00 00", "_": "00 00 00 00 00 00 1f",
    "?": "0e 11 01 02 04 00 04",
}


class Canvas:
    """An RGB raster with just what a line plot needs, and a PNG encoder (zlib, no dependencies)."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(colour)

    def rect(self, xa: int, ya: int, xb: int, yb: int, colour: tuple[int, int, int]) -> None:
        for y in range(min(ya, yb), max(ya, yb) + 1):
            for x in range(min(xa, xb), max(xa, xb) + 1):
                self.set(x, y, colour)

    def line(self, xa: float, ya: float, xb: float, yb: float, colour: tuple[int, int, int], thick: int = 1) -> None:
        steps = max(int(max(abs(xb - xa), abs(yb - ya))), 1)
        lo, hi = -(thick // 2), (thick - 1) // 2 + 1
        for i in range(steps + 1):
            x = round(xa + (xb - xa) * i / steps)
            y = round(ya + (yb - ya) * i / steps)
            for dy in range(lo, hi):
                for dx in range(lo, hi):
                    self.set(x + dx, y + dy, colour)

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return max(len(text) * 6 * scale - scale, 0)

    def text(self, x: int, y: int, text: str, colour: tuple[int, int, int], scale: int = 1) -> None:
        for n, char in enumerate(text.lower()):
            rows = _FONT.get(char, _FONT["?"]).split()
            for r, row in enumerate(rows):
                bits = int(row, 16)
                for c in range(5):
                    if bits & (16 >> c):
                        cx, cy = x + (6 * n + c) * scale, y + r * scale
                        self.rect(cx, cy, cx + scale - 1, cy + scale - 1, colour)

    def png(self) -> bytes:
        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
