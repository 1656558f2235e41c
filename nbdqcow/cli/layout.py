"""``nbdqcow layout FILE -o picture.svg|picture.png``: draw the guest -> host runs.

The top strip is the guest disk.  With few runs, the host file is a strip below on the
same byte scale and bands join each mapped guest run to its host clusters (blue where
host = guest + the image's usual offset, red where a cluster is out of place).  With
many runs, every pixel aggregates what falls on it: a strip under the guest disk gives
each guest pixel the colour of its displacement (blue: in place; warm: the host copy
lies later in the file than the usual offset puts it, cool: earlier; paler: a small
displacement), and a map below puts each guest pixel (x) at its host position (y),
with the host file as a strip on the left.  Colours of the strips say the kind
(metadata, data, kept zero, reserved, compressed, unallocated, free).  PNG is written
without extra dependencies (numpy raster, 5x7 font with lower case, zlib).  Past one
second, a progress bar on a terminal (or with -p).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from nbdqcow.cli.images import add_image_opts, qcow2_file_of
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.cli.picture import (
    Band,
    Raster,
    Rect,
    Shape,
    Text,
    rgb,
    text_width,
    to_png,
    to_svg,
)
from nbdqcow.cli.sizes import format_size
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.layout_view import (
    KIND_LABEL,
    GuestRun,
    Kind,
    guest_runs,
    host_kinds,
    host_runs,
    summarize,
)
from nbdqcow.qcow2.mapping_summary import MappingSummary

COLORS = {
    Kind.FREE: "#ffffff", Kind.METADATA: "#7b3fbf", Kind.DATA: "#2f7fd8",
    Kind.KEPT_ZERO: "#7ccf8c", Kind.RESERVED: "#f2c14e", Kind.COMPRESSED: "#e07b39",
    Kind.ZERO: "#cfcfcf", Kind.UNALLOCATED: "#f0f0f0", Kind.OTHER: "#8c8c8c",
}
IN_PLACE = "#2f7fd8"
OUT_OF_PLACE = "#d62728"
W = 1000
X0, X1 = 120, 970
GUEST_Y, HOST_Y, STRIP_H = 90, 260, 34
#: more mapped runs than this: aggregated pixels instead of one band per run
BAND_MAX = 300
DISP_Y, DISP_H = GUEST_Y + STRIP_H + 4, 14
MAP_Y, MAP_H = DISP_Y + DISP_H + 30, 220
# displacement colours: later in the file (warm), earlier (cool); pale when small
_LATER = ((250, 205, 60), (200, 30, 30))
_EARLIER = ((110, 215, 190), (110, 40, 170))
_EMPTY = (246, 246, 246)
if TYPE_CHECKING:  # numpy.typing costs an import ~10 ms: for the type checker only
    import numpy.typing as npt

    Arr = npt.NDArray[Any]


def _started() -> float:
    """When this process started, on the time.monotonic() scale (Linux /proc); now
    where that cannot be read."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - min(max(0.0, age), 60.0)


class Bar:
    """A progress bar on stderr that appears once the command has taken a second
    (counted from the start of the process: imports are part of the wait)."""

    def __init__(self, enabled: bool, after: float = 1.0) -> None:
        self.enabled = enabled
        self.start = _started() if enabled else time.monotonic()
        self.after = after
        self.shown = -1

    def phase(self, lo: int, hi: int) -> Callable[[int, int], None]:
        """A callback (done, total) that moves the bar from ``lo`` to ``hi`` percent."""
        return lambda done, total: self(lo * 100 + (hi - lo) * 100 * done // max(1, total),
                                        10000)

    def at(self, pct: int) -> None:
        self(pct, 100)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or time.monotonic() - self.start < self.after:
            return
        pct = done * 100 // max(1, total)
        if pct != self.shown:
            self.shown = pct
            filled = 40 * done // max(1, total)
            sys.stderr.write(f"\r    ({pct:3d}/100%) [{'#' * filled}{' ' * (40 - filled)}]")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def displacement_colors(disp: Arr, span: int) -> Arr:
    """RGB for displacements (bytes, host - guest - usual offset): blue at 0."""
    t = np.clip(np.abs(disp.astype(np.float64)) / max(1, span), 0, 1) ** 0.35
    out = np.empty((len(disp), 3), dtype=np.float64)
    for sign, (lo, hi) in ((disp > 0, _LATER), (disp < 0, _EARLIER)):
        a, b = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
        out[sign] = a + (b - a) * t[sign, None]
    out[disp == 0] = rgb(IN_PLACE)
    return out.astype(np.uint8)


def build_scene(path: str, d: Qcow2Driver, bar: Bar | None = None
                ) -> tuple[list[Shape], MappingSummary]:
    bar = bar if bar is not None else Bar(False)
    runs = guest_runs(d, bar.phase(0, 60))
    cs = d.geo.cluster_size
    summary = summarize(runs, cs, d.header.has_data_file)
    bar.at(68)
    kinds = host_kinds(d, runs)
    bar.at(75)
    file_size = d.file.size()
    out: list[Shape] = [
        Text(X0, 30, f"{path}: {format_size(d.size)} guest, {format_size(file_size)} file, "
                     f"cluster {format_size(cs)}", 16),
        Text(X0, 56, summary.verdict, 16,
             "#1a7f37" if summary.constant else OUT_OF_PLACE),
    ]
    mapped = sum(1 for r in runs if r.host is not None)
    if mapped <= BAND_MAX:
        legend_y = _bands(out, d, runs, kinds, summary, file_size)
        extra: list[tuple[str, str]] = [("in place", IN_PLACE), ("out of place", OUT_OF_PLACE)]
    else:
        legend_y = _pixels(out, d, runs, kinds, summary, file_size)
        extra = [("in place", IN_PLACE), ("host later", "#c81e1e"),
                 ("host earlier", "#6e28aa"), ("small shift", "#fac83c")]
    bar.at(90)
    present = {r.kind for r in runs} | set(kinds)
    shown = [k for k in Kind if k in present]
    items = [(KIND_LABEL[k], COLORS[k], True) for k in shown]
    items += [(label, color, False) for label, color in extra]
    lx, ly = float(X0), float(legend_y)
    for label, color, box in items:
        width = 16 + 8 + text_width(label, 14)
        if lx + width > X1:
            lx, ly = X0, ly + 28
        if box:
            out.append(Rect(lx, ly, 16, 16, "#444444"))
            out.append(Rect(lx + 1, ly + 1, 14, 14, color))
        else:
            out.append(Rect(lx, ly + 4, 16, 8, color))
        out.append(Text(lx + 22, ly + 15, label, 14))
        lx += width + 16
    # the background comes first and gives the picture its size
    out.insert(0, Rect(0, 0, W, ly + 40, "#ffffff"))
    return out, summary


def _axis_labels(out: list[Shape], y: float, label: str, end: int, x_end: float) -> None:
    out.append(Text(X0 - 8, y + 22, label, 14, anchor="end"))
    out.append(Text(X0, y + STRIP_H + 16, "0", 12))
    out.append(Text(x_end, y + STRIP_H + 16, f"{end:#x}", 12, anchor="end"))


def _bands(out: list[Shape], d: Qcow2Driver, runs: list[GuestRun], kinds: bytearray,
           summary: MappingSummary, file_size: int) -> float:
    """Few runs: guest and host strips on one byte scale, a band per mapped run."""
    cs = d.geo.cluster_size
    span = max(d.size, file_size, 1)
    scale = (X1 - X0) / span

    def x(v: int) -> float:
        return X0 + v * scale

    def w(n: int) -> float:
        return max(n * scale, 1.0)

    for r in runs:
        if r.host is None:
            continue
        ok = summary.offset is not None and r.host - r.start == summary.offset
        out.append(Band(GUEST_Y + STRIP_H, x(r.start), x(r.start) + w(r.length),
                        HOST_Y, x(r.host), x(r.host) + w(r.length),
                        IN_PLACE if ok else OUT_OF_PLACE, 0.25 if ok else 0.55))
    for r in runs:
        out.append(Rect(x(r.start), GUEST_Y, w(r.length), STRIP_H, COLORS[r.kind]))
    for first, n, k in host_runs(kinds):
        out.append(Rect(x(first * cs), HOST_Y, w(n * cs), STRIP_H, COLORS[k]))
    _axis_labels(out, GUEST_Y, "guest", d.size, x(d.size))
    _axis_labels(out, HOST_Y, "host", file_size, x(file_size))
    return HOST_Y + STRIP_H + 56


def _samples(runs: list[GuestRun], step: int, only_mapped: bool
             ) -> tuple[Arr, Arr, Arr, Arr]:
    """Points every ``step`` bytes of the runs: guest offset, host offset (or -1),
    bytes each stands for, kind."""
    sel = [r for r in runs if r.host is not None or not only_mapped]
    if not sel:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    start = np.fromiter((r.start for r in sel), np.int64, len(sel))
    host = np.fromiter((-1 if r.host is None else r.host for r in sel), np.int64, len(sel))
    length = np.fromiter((r.length for r in sel), np.int64, len(sel))
    kind = np.fromiter((int(r.kind) for r in sel), np.int64, len(sel))
    k = np.maximum(1, (length + step - 1) // step)
    idx = np.repeat(np.arange(len(sel)), k)
    off = (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)) * step
    h = np.where(host[idx] >= 0, host[idx] + off, -1)
    return start[idx] + off, h, np.minimum(step, length[idx] - off), kind[idx]


def _majority(bins: Arr, kind: Arr, weight: Arr, n: int) -> Arr:
    """The kind that covers most of each of ``n`` bins (-1 where none)."""
    nk = len(Kind)
    acc = np.bincount(bins * nk + kind, weights=weight, minlength=n * nk).reshape(n, nk)
    best = acc.argmax(axis=1)
    return np.where(acc.max(axis=1) > 0, best, -1)


def _palette() -> Arr:
    return np.array([rgb(COLORS[k]) for k in Kind] + [_EMPTY], dtype=np.uint8)


def _pixels(out: list[Shape], d: Qcow2Driver, runs: list[GuestRun], kinds: bytearray,
            summary: MappingSummary, file_size: int) -> float:
    """Many runs: per-pixel kinds, displacement colours and a guest x host map."""
    cs = d.geo.cluster_size
    gw = X1 - X0
    span = max(d.size, 1)
    fspan = max(file_size, 1)
    pal = _palette()
    step = max(1, min(cs, span // (gw * 4)))
    g, _, wgt, kd = _samples(runs, max(step, span // (gw * 8)), False)
    col = np.minimum(g * gw // span, gw - 1)
    guest = pal[_majority(col, kd, wgt, gw)]
    out.append(Raster(X0, GUEST_Y, np.repeat(guest[None, :, :], STRIP_H, axis=0)))
    # displacement of the mapped samples
    g, h, wgt, _ = _samples(runs, step, True)
    usual = summary.offset or 0
    disp = h - g - usual
    col = np.minimum(g * gw // span, gw - 1)
    row = np.minimum(h * MAP_H // fspan, MAP_H - 1)
    strip = np.tile(np.array(_EMPTY, dtype=np.uint8), (gw, 1))
    if len(g):
        tot = np.bincount(col, weights=wgt, minlength=gw)
        mean = np.bincount(col, weights=wgt * disp, minlength=gw) / np.maximum(tot, 1)
        moved = np.bincount(col, weights=wgt * (disp != 0), minlength=gw)
        mean = np.where(moved > 0, np.where(mean == 0, 1, mean), 0)
        has = tot > 0
        strip[has] = displacement_colors(mean[has], fspan)
    out.append(Raster(X0, DISP_Y, np.repeat(strip[None, :, :], DISP_H, axis=0)))
    # the map: x = guest, y = host; the usual offset as a faint line
    panel = np.full((MAP_H, gw, 3), 255, dtype=np.uint8)
    gx = np.arange(gw)
    ly = ((gx * span // gw) + usual) * MAP_H // fspan
    ok = (ly >= 0) & (ly < MAP_H)
    panel[ly[ok], gx[ok]] = (200, 200, 200)
    if len(g):
        cell = row * gw + col
        ncell = MAP_H * gw
        tot = np.bincount(cell, weights=wgt, minlength=ncell)
        moved = np.bincount(cell, weights=wgt * (disp != 0), minlength=ncell)
        mean = np.bincount(cell, weights=wgt * disp, minlength=ncell) / np.maximum(tot, 1)
        mean = np.where(moved > 0, np.where(mean == 0, 1, mean), 0)
        cells = np.flatnonzero(tot > 0)
        panel.reshape(-1, 3)[cells] = displacement_colors(mean[cells], fspan)
    out.append(Rect(X0 - 1, MAP_Y - 1, gw + 2, MAP_H + 2, "#888888"))
    out.append(Raster(X0, MAP_Y, panel))
    # host file strip on the left, same vertical scale as the map
    hk = np.frombuffer(bytes(kinds), dtype=np.uint8).astype(np.int64)
    hrow = np.minimum(np.arange(len(hk), dtype=np.int64) * cs * MAP_H // fspan, MAP_H - 1)
    host_col = pal[_majority(hrow, hk, np.ones(len(hk)), MAP_H)] if len(hk) else \
        np.tile(np.array(_EMPTY, dtype=np.uint8), (MAP_H, 1))
    out.append(Raster(X0 - 26, MAP_Y, np.repeat(host_col[:, None, :], 18, axis=1)))
    out.append(Text(X0 - 8, GUEST_Y + 22, "guest", 14, anchor="end"))
    out.append(Text(X0 - 8, DISP_Y + 11, "shift", 12, anchor="end"))
    out.append(Text(X0, DISP_Y + DISP_H + 14, "0", 12))
    out.append(Text(X1, DISP_Y + DISP_H + 14, f"{d.size:#x}", 12, anchor="end"))
    out.append(Text(X0 - 32, MAP_Y + 12, "host", 14, anchor="end"))
    out.append(Text(X0 - 32, MAP_Y + 30, "0", 12, anchor="end"))
    out.append(Text(X0 - 32, MAP_Y + MAP_H, f"{file_size:#x}", 12, anchor="end"))
    out.append(Text(X0 + 4, MAP_Y + MAP_H + 18, "x: guest offset, y: host offset; "
                    "grey line: where the usual offset puts each cluster", 12, "#555555"))
    return MAP_Y + MAP_H + 40


# ------------------------------------------------------------------ command
def run_layout(args: argparse.Namespace) -> int:
    path = qcow2_file_of(args)
    bar = Bar(args.progress or (args.progress is None and sys.stderr.isatty()))
    d = Qcow2Driver.open(path, writable=False, access=read_access(args), backing=no_backing)
    try:
        try:
            scene, summary = build_scene(path, d, bar)
        finally:
            d.close()
        out: str = args.output
        if out.lower().endswith(".png"):
            picture = to_png(scene)
            bar.at(98)
            with open(out, "wb") as f:
                f.write(picture)
        else:
            with open(out, "w", encoding="utf-8") as f:
                f.write(to_svg(scene))
        bar.at(100)
    finally:
        bar.close()
    if not args.quiet:
        sys.stdout.write(f"{summary.verdict}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("layout", help="draw the guest -> host layout (SVG or PNG)")
    p.add_argument("-o", "--output", required=True, metavar="PICTURE",
                   help="picture file: .svg, or .png")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the verdict")
    p.add_argument("-p", dest="progress", action="store_true", default=None,
                   help="show a progress bar past one second (default: on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show the progress bar")
    add_force_share(p)
    add_image_opts(p)
    p.add_argument("file", metavar="FILE", help="the qcow2 image to draw")
    p.set_defaults(func=run_layout)
