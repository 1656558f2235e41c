"""``nbdqcow layout FILE -o picture.svg|picture.png``: draw the guest -> host runs.

The top strip is the guest disk, the bottom strip the host file, on the same byte scale;
bands join each mapped guest run to its host clusters (blue where host = guest + the
image's usual offset, red where a cluster is out of place).  Colors say the kind
(metadata, data, kept zero, reserved, compressed, unallocated, free).  PNG is written
without extra dependencies (own rasterizer, 5x7 font, zlib).
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from dataclasses import dataclass
from xml.sax.saxutils import escape

from nbdqcow.cli.images import add_image_opts, qcow2_file_of
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.cli.sizes import format_size
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.layout_view import (
    KIND_LABEL,
    Kind,
    guest_runs,
    host_kinds,
    host_runs,
    summarize,
)

COLORS = {
    Kind.FREE: "#ffffff", Kind.METADATA: "#7b3fbf", Kind.DATA: "#2f7fd8",
    Kind.KEPT_ZERO: "#7ccf8c", Kind.RESERVED: "#f2c14e", Kind.COMPRESSED: "#e07b39",
    Kind.ZERO: "#cfcfcf", Kind.UNALLOCATED: "#f0f0f0", Kind.OTHER: "#8c8c8c",
}
IN_PLACE = "#2f7fd8"
OUT_OF_PLACE = "#d62728"
W = 1000
LEGEND_Y = 350
X0, X1 = 70, 970
GUEST_Y, HOST_Y, STRIP_H = 90, 260, 34


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


Shape = Rect | Band | Text


def build_scene(path: str, d: Qcow2Driver) -> list[Shape]:
    runs = guest_runs(d)
    cs = d.geo.cluster_size
    summary = summarize(runs, cs, d.header.has_data_file)
    kinds = host_kinds(d, runs)
    file_size = d.file.size()
    span = max(d.size, file_size, 1)
    scale = (X1 - X0) / span

    def x(v: int) -> float:
        return X0 + v * scale

    def w(n: int) -> float:
        return max(n * scale, 1.0)

    out: list[Shape] = [
        Text(X0, 30, f"{path}: {format_size(d.size)} guest, {format_size(file_size)} file, "
                     f"cluster {format_size(cs)}", 16),
        Text(X0, 56, summary.verdict, 16,
             "#1a7f37" if summary.constant else OUT_OF_PLACE),
    ]
    # shapes that land on the same pixels are drawn once (huge fragmented images)
    seen: set[tuple[object, ...]] = set()

    def add(shape: Rect | Band, key: tuple[object, ...]) -> None:
        if key not in seen:
            seen.add(key)
            out.append(shape)

    for r in runs:
        if r.host is None:
            continue
        ok = summary.offset is not None and r.host - r.start == summary.offset
        b = Band(GUEST_Y + STRIP_H, x(r.start), x(r.start) + w(r.length),
                 HOST_Y, x(r.host), x(r.host) + w(r.length),
                 IN_PLACE if ok else OUT_OF_PLACE, 0.25 if ok else 0.55)
        add(b, (round(b.a0), round(b.a1), round(b.b0), round(b.b1), ok))
    for r in runs:
        g = Rect(x(r.start), GUEST_Y, w(r.length), STRIP_H, COLORS[r.kind])
        add(g, ("g", round(g.x), round(g.w), r.kind))
    for first, n, k in host_runs(kinds):
        hr = Rect(x(first * cs), HOST_Y, w(n * cs), STRIP_H, COLORS[k])
        add(hr, ("h", round(hr.x), round(hr.w), k))
    for y, label, end in ((GUEST_Y, "guest", d.size), (HOST_Y, "host", file_size)):
        out.append(Text(X0 - 8, y + 22, label, 14, anchor="end"))
        out.append(Text(X0, y + STRIP_H + 16, "0", 12))
        out.append(Text(x(end), y + STRIP_H + 16, f"{end:#x}", 12, anchor="end"))
    shown = [k for k in Kind if any(r.kind is k for r in runs) or k in kinds]
    items: list[tuple[str, Shape]] = [
        (KIND_LABEL[k], Rect(0, 0, 16, 16, COLORS[k])) for k in shown]
    items += [("in place", Rect(0, 4, 24, 8, IN_PLACE)),
              ("out of place", Rect(0, 4, 24, 8, OUT_OF_PLACE))]
    lx, ly = float(X0), float(LEGEND_Y)
    for label, swatch in items:
        assert isinstance(swatch, Rect)
        width = swatch.w + 16 + 12 * len(label)
        if lx + width > X1:
            lx, ly = X0, ly + 28
        if swatch.h == 16:
            out.append(Rect(lx, ly, 16, 16, "#444444"))
            out.append(Rect(lx + 1, ly + 1, 14, 14, swatch.color))
        else:
            out.append(Rect(lx, ly + swatch.y, swatch.w, swatch.h, swatch.color))
        out.append(Text(lx + swatch.w + 6, ly + 15, label, 14))
        lx += width + 12
    # the background comes first and gives the picture its size
    out.insert(0, Rect(0, 0, W, ly + 40, "#ffffff"))
    return out


# ------------------------------------------------------------------ SVG
def _size(scene: list[Shape]) -> tuple[int, int]:
    bg = scene[0]
    assert isinstance(bg, Rect)
    return int(bg.w), int(bg.h)


def to_svg(scene: list[Shape]) -> str:
    W, H = _size(scene)  # noqa: N806
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
        else:
            parts.append(f'<text x="{s.x:.2f}" y="{s.y:.2f}" font-size="{s.size}" '
                         f'fill="{s.color}" text-anchor="{s.anchor}">{escape(s.s)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ PNG
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
    " ": "00000000000000", ":": "000C0C000C0C00", "=": "00001F001F0000",
    "+": "0004041F040400", "-": "0000001F000000", ".": "00000000000C0C",
    ",": "000000000C0408", "(": "02040808080402", ")": "08040202020408",
    "/": "00010204081000", "%": "18190204081303", "_": "0000000000001F",
    "'": "0C040800000000", "?": "0E110102040004",
}
FONT = {ch: [int(v[i:i + 2], 16) for i in range(0, 14, 2)]
        for ch, v in _FONT_SRC.items()}


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def _blend_span(self, y: int, xa: float, xb: float, rgb: tuple[int, int, int],
                    alpha: float) -> None:
        if not 0 <= y < self.h:
            return
        a = max(0, int(round(xa)))
        b = min(self.w, max(int(round(xb)), a + 1))
        if alpha >= 1:
            row = bytes(rgb) * (b - a)
            self.px[(y * self.w + a) * 3:(y * self.w + b) * 3] = row
            return
        for xx in range(a, b):
            i = (y * self.w + xx) * 3
            for k in range(3):
                self.px[i + k] = int(self.px[i + k] * (1 - alpha) + rgb[k] * alpha)

    def rect(self, r: Rect) -> None:
        rgb = _rgb(r.color)
        for y in range(int(round(r.y)), int(round(r.y + r.h))):
            self._blend_span(y, r.x, r.x + r.w, rgb, 1.0)

    def band(self, b: Band) -> None:
        rgb = _rgb(b.color)
        y0, y1 = int(round(b.y0)), int(round(b.y1))
        for y in range(y0, y1):
            t = (y - y0) / max(1, y1 - y0)
            self._blend_span(y, b.a0 + (b.b0 - b.a0) * t, b.a1 + (b.b1 - b.a1) * t,
                             rgb, b.opacity)

    def text(self, t: Text) -> None:
        scale = 2 if t.size >= 14 else 1
        s = t.s.upper()
        width = len(s) * 6 * scale
        x = t.x - width if t.anchor == "end" else t.x
        top = int(t.y) - 7 * scale
        rgb = _rgb(t.color)
        for n, ch in enumerate(s):
            rows = FONT.get(ch, FONT["?"])
            for ry, bits in enumerate(rows):
                for rx in range(5):
                    if bits >> (4 - rx) & 1:
                        px = int(x) + (n * 6 + rx) * scale
                        for dy in range(scale):
                            self._blend_span(top + ry * scale + dy, px, px + scale, rgb, 1.0)

    def png(self) -> bytes:
        raw = b"".join(b"\0" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + tag + data
                    + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def to_png(scene: list[Shape]) -> bytes:
    c = Canvas(*_size(scene))
    for s in scene:
        if isinstance(s, Rect):
            c.rect(s)
        elif isinstance(s, Band):
            c.band(s)
        else:
            c.text(s)
    return c.png()


# ------------------------------------------------------------------ command
def run_layout(args: argparse.Namespace) -> int:
    path = qcow2_file_of(args)
    d = Qcow2Driver.open(path, writable=False, access=read_access(args), backing=no_backing)
    try:
        scene = build_scene(path, d)
        verdict = summarize(guest_runs(d), d.geo.cluster_size, d.header.has_data_file).verdict
    finally:
        d.close()
    out: str = args.output
    if out.lower().endswith(".png"):
        with open(out, "wb") as f:
            f.write(to_png(scene))
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.write(to_svg(scene))
    if not args.quiet:
        sys.stdout.write(f"{verdict}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("layout", help="draw the guest -> host layout (SVG or PNG)")
    p.add_argument("-o", "--output", required=True, metavar="PICTURE",
                   help="picture file: .svg, or .png")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the verdict")
    add_force_share(p)
    add_image_opts(p)
    p.add_argument("file", metavar="FILE", help="the qcow2 image to draw")
    p.set_defaults(func=run_layout)
