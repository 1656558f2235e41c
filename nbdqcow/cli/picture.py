"""Pictures for ``nbdqcow layout``: shapes, a small raster canvas (numpy) that writes
PNG with zlib alone, SVG text, and a 5x7 bitmap font with lower case."""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np

if TYPE_CHECKING:  # numpy.typing costs an import ~10 ms: for the type checker only
    import numpy.typing as npt

    Pixels = npt.NDArray[np.uint8]  # (h, w, 3)


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    color: str


@dataclass(frozen=True)
class Band:  # top edge (y0, a0..a1), bottom edge (y1, b0..b1)
    y0: float
    a0: float
    a1: float
    y1: float
    b0: float
    b1: float
    color: str
    opacity: float


@dataclass(frozen=True)
class Text:
    x: float
    y: float  # baseline
    s: str
    size: int
    color: str = "#000000"
    anchor: str = "start"


@dataclass(frozen=True)
class Raster:
    """Pixels drawn as they are (aggregated data: one pixel says what falls on it)."""

    x: int
    y: int
    pixels: Pixels = field(compare=False)


Shape = Rect | Band | Text | Raster


def rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


# --- font: 5 columns x 7 rows, one hex byte per row ------------------------------------
_FONT_SRC = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E",
    "9": "0E11110F01020C", "A": "0E1111111F1111", "B": "1E11111E11111E",
    "C": "0E11101010110E", "D": "1C12111111121C", "E": "1F10101E10101F",
    "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111",
    "O": "0E11111111110E", "P": "1E11111E101010", "Q": "0E11111115120D",
    "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A",
    "X": "11110A040A1111", "Y": "1111110A040404", "Z": "1F01020408101F",
    "a": "00000E010F110F", "b": "1010161911111E", "c": "00000E1010110E",
    "d": "01010D1311110F", "e": "00000E111F100E", "f": "0609081C080808",
    "g": "00000F11110F010E", "h": "10101619111111", "i": "04000C0404040E",
    "j": "020006020202120C", "k": "10101214181412", "l": "0C04040404040E",
    "m": "00001A15151111", "n": "00001619111111", "o": "00000E1111110E",
    "p": "00001E11111E1010", "q": "00000F11110F0101", "r": "00001619101010",
    "s": "00000E100E011E", "t": "08081C08080906", "u": "0000111111130D",
    "v": "00001111110A04", "w": "0000111115150A",
    "x": "0000110A040A11", "y": "00001111110F010E", "z": "00001F0204081F",
    " ": "00000000000000", ":": "000C0C000C0C00", "=": "00001F001F0000",
    "+": "0004041F040400", "-": "0000001F000000", ".": "00000000000C0C",
    ",": "000000000C0408", "(": "02040808080402", ")": "08040202020408",
    "/": "00010204081000", "%": "18190204081303", "_": "0000000000001F",
    "'": "0C040800000000", "?": "0E110102040004", ">": "10080402040810",
    "<": "02040810080402", "#": "0A0A1F0A1F0A0A", ";": "000C0C000C0408",
}
# 7 rows above the baseline; g j p q y have an 8th row below it
_GLYPHS = {ch: np.array([[int(v[i:i + 2], 16) >> (4 - c) & 1 for c in range(5)]
                         for i in range(0, len(v), 2)], dtype=bool)
           for ch, v in _FONT_SRC.items()}
GLYPH_W = 6  # 5 columns and a space


def text_width(s: str, size: int) -> int:
    return len(s) * GLYPH_W * (2 if size >= 14 else 1)


# --- raster ----------------------------------------------------------------------------
class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px: Pixels = np.full((h, w, 3), 255, dtype=np.uint8)

    def _span(self, xa: float, xb: float) -> tuple[int, int]:
        a = max(0, int(round(xa)))
        return a, min(self.w, max(int(round(xb)), a + 1))

    def rect(self, r: Rect) -> None:
        a, b = self._span(r.x, r.x + r.w)
        y0, y1 = max(0, int(round(r.y))), min(self.h, int(round(r.y + r.h)))
        self.px[y0:y1, a:b] = rgb(r.color)

    def band(self, b: Band) -> None:
        color = np.array(rgb(b.color), dtype=np.float32)
        y0, y1 = int(round(b.y0)), int(round(b.y1))
        for y in range(max(0, y0), min(self.h, y1)):
            t = (y - y0) / max(1, y1 - y0)
            xa, xb = self._span(b.a0 + (b.b0 - b.a0) * t, b.a1 + (b.b1 - b.a1) * t)
            row = self.px[y, xa:xb].astype(np.float32)
            self.px[y, xa:xb] = (row * (1 - b.opacity) + color * b.opacity).astype(np.uint8)

    def text(self, t: Text) -> None:
        scale = 2 if t.size >= 14 else 1
        x = int(t.x - text_width(t.s, t.size) if t.anchor == "end" else t.x)
        top = int(t.y) - 7 * scale
        color = rgb(t.color)
        for n, ch in enumerate(t.s):
            g = _GLYPHS.get(ch, _GLYPHS["?"])
            if scale > 1:
                g = np.kron(g, np.ones((scale, scale), dtype=bool))
            gx = x + n * GLYPH_W * scale
            ys, xs = np.nonzero(g)
            ys, xs = ys + top, xs + gx
            ok = (ys >= 0) & (ys < self.h) & (xs >= 0) & (xs < self.w)
            self.px[ys[ok], xs[ok]] = color

    def raster(self, r: Raster) -> None:
        h, w = r.pixels.shape[:2]
        self.px[r.y:r.y + h, r.x:r.x + w] = r.pixels[: self.h - r.y, : self.w - r.x]


def png_bytes(px: Pixels) -> bytes:
    h, w = px.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), px.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def size_of(scene: list[Shape]) -> tuple[int, int]:
    bg = scene[0]
    assert isinstance(bg, Rect)
    return int(bg.w), int(bg.h)


def to_png(scene: list[Shape]) -> bytes:
    c = Canvas(*size_of(scene))
    for s in scene:
        if isinstance(s, Rect):
            c.rect(s)
        elif isinstance(s, Band):
            c.band(s)
        elif isinstance(s, Raster):
            c.raster(s)
        else:
            c.text(s)
    return png_bytes(c.px)


def to_svg(scene: list[Shape]) -> str:
    W, H = size_of(scene)  # noqa: N806
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif">']
    for s in scene:
        if isinstance(s, Rect):
            parts.append(f'<rect x="{s.x:.2f}" y="{s.y:.2f}" width="{s.w:.2f}" '
                         f'height="{s.h:.2f}" fill="{s.color}"/>')
        elif isinstance(s, Band):
            pts = (f"{s.a0:.2f},{s.y0:.2f} {s.a1:.2f},{s.y0:.2f} "
                   f"{s.b1:.2f},{s.y1:.2f} {s.b0:.2f},{s.y1:.2f}")
            parts.append(f'<polygon points="{pts}" fill="{s.color}" '
                         f'fill-opacity="{s.opacity}"/>')
        elif isinstance(s, Raster):
            h, w = s.pixels.shape[:2]
            data = base64.b64encode(png_bytes(s.pixels)).decode("ascii")
            parts.append(f'<image x="{s.x}" y="{s.y}" width="{w}" height="{h}" '
                         f'style="image-rendering:pixelated" '
                         f'href="data:image/png;base64,{data}"/>')
        else:
            parts.append(f'<text x="{s.x:.2f}" y="{s.y:.2f}" font-size="{s.size}" '
                         f'fill="{s.color}" text-anchor="{s.anchor}">{escape(s.s)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
