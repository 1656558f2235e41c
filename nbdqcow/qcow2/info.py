"""Image facts as ``qemu-img info`` reports them (qcow2.txt "Header", "Snapshots",
"Bitmaps"; the key names and formats of qemu 7.2's ImageInfo).

Only the header, the snapshot table and the bitmap directory are read: this does not
depend on the engine, so it also describes images the engine would refuse to write.
The output helpers reproduce qemu's key order (qemu prints its dictionaries in the order
of their hash buckets) and its JSON and human layouts, so the text can be compared line
for line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.block.raw import sector_ceil
from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.bitmaps import read_directory
from nbdqcow.qcow2.header import Header, parse_header
from nbdqcow.qcow2.snapshot import Snapshot, read_snapshot_table

Info = dict[str, Any]


# --- facts ---------------------------------------------------------------------------------
def read_header(f: HostFile) -> Header:
    size = f.size()
    return parse_header(f.pread(min(size, 1 << L.MAX_CLUSTER_BITS), 0), size)


def read_bitmaps(f: HostFile, header: Header) -> list[Info]:
    """The bitmap directory as qemu-img info lists it (flags, name, granularity)."""
    out: list[Info] = []
    for e in read_directory(f, header):
        names = []
        if e.in_use:
            names.append("in-use")
        if e.auto:
            names.append("auto")
        out.append({"flags": names, "name": e.name, "granularity": e.granularity})
    return out


def full_backing_filename(image: str, backing: str) -> str:
    """qemu's path_combine: a relative backing name is relative to the image's folder."""
    if os.path.isabs(backing):
        return backing
    slash = image.rfind("/")
    return image[: slash + 1] + backing if slash >= 0 else backing


def snapshot_info(s: Snapshot) -> Info:
    d: Info = {}
    if s.icount_valid:
        d["icount"] = s.icount
    d.update({
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000, "name": s.name,
        "date-sec": s.date_sec, "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_sec,
        "id": s.id_str, "vm-state-size": s.vm_state_size,
    })
    return d


def check_open_limits(h: Header) -> None:
    """The header checks qemu makes when it opens an image (so info fails where
    qemu-img info fails): the size must be representable and the L1 table must cover it.
    """
    l2_entries = h.cluster_size // (16 if h.extended_l2 else 8)
    needed = -(-h.size // (l2_entries * h.cluster_size))
    if h.size > (1 << 63) - 1 or needed > (1 << 31) - 1:
        raise ImageOpenError("Image is too big")
    if h.l1_size < needed:
        raise ImageOpenError("L1 table is too small")


def _qcow2_info(f: HostFile, path: str, snapshots_out: list[Snapshot]) -> Info:
    h = read_header(f)
    check_open_limits(h)
    snaps = read_snapshot_table(f, h)
    snapshots_out.extend(snaps)
    data: Info = {"compat": "1.1" if h.version >= 3 else "0.10",
                  "compression-type": L.COMPRESSION_NAMES.get(h.compression_type, "zlib")}
    if h.version >= 3:
        data["lazy-refcounts"] = h.lazy_refcounts
        bitmaps = read_bitmaps(f, h)
        if bitmaps:
            data["bitmaps"] = bitmaps
    data["refcount-bits"] = h.refcount_bits
    if h.data_file is not None:
        data["data-file"] = h.data_file
        data["data-file-raw"] = h.data_file_raw
    if h.version >= 3:
        data["corrupt"] = h.corrupt
        data["extended-l2"] = h.extended_l2
    info: Info = {}
    if snaps:
        info["snapshots"] = [snapshot_info(s) for s in snaps]
    info.update({"virtual-size": h.size, "filename": path, "cluster-size": h.cluster_size,
                 "format": "qcow2", "actual-size": f.allocated_bytes(),
                 "format-specific": {"type": "qcow2", "data": data}})
    if h.backing_file is not None:
        info["full-backing-filename"] = full_backing_filename(path, h.backing_file)
        info["backing-filename"] = h.backing_file
        if h.backing_format is not None:
            info["backing-filename-format"] = h.backing_format
    info["dirty-flag"] = h.dirty
    return info


def image_info(path: str, fmt: str,
               snapshots_out: list[Snapshot] | None = None,
               access: Access | None = None) -> Info:
    """The facts ``qemu-img info --output=json`` prints for ``path`` (as a dict) in
    format ``fmt`` (the caller probes it: nbdqcow.image.probe_file).
    ``access``: for qemu's locks (default: headers only, as qemu-img info)."""
    if not os.path.exists(path):
        raise ImageOpenError(f"Could not open '{path}': No such file or directory")
    access = access if access is not None else Access(io=False)
    try:
        f = HostFile(path, writable=False, lock=access.image(fmt))
    except ImageLocked as e:
        raise e.within(f"Could not open '{path}': ") from None
    try:
        if fmt == "qcow2":
            return _qcow2_info(f, path, snapshots_out if snapshots_out is not None else [])
        if fmt != "raw":
            raise ImageOpenError(f"Unknown driver '{fmt}'")
        return {"virtual-size": sector_ceil(f.size()), "filename": path, "format": "raw",
                "actual-size": f.allocated_bytes(), "dirty-flag": False}
    finally:
        f.close()


def backing_chain(path: str, fmt: str, probe: Callable[[str], str],
                  access: Access | None = None) -> list[tuple[Info, list[Snapshot]]]:
    """Info (and snapshots) for the image and every backing file below it, each opened
    on its own as qemu-img info --backing-chain does; loops are refused.  ``probe``
    names the format of a backing file whose format is not stored."""
    out: list[tuple[Info, list[Snapshot]]] = []
    seen: set[tuple[int, int]] = set()
    while True:
        st = os.stat(path) if os.path.exists(path) else None
        if st is not None:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ImageOpenError(f"backing file loop at '{path}'")
            seen.add(key)
        if len(out) > L.MAX_BACKING_DEPTH:
            raise ImageOpenError("backing chain too deep")
        snaps: list[Snapshot] = []
        info = image_info(path, fmt, snaps, access)
        out.append((info, snaps))
        nxt = info.get("full-backing-filename")
        if nxt is None:
            return out
        path = nxt
        fmt = info.get("backing-filename-format") or (
            probe(path) if os.path.exists(path) else "raw")


# --- qemu's output formats -----------------------------------------------------------------
def _qdict_bucket(key: str) -> int:
    """The bucket qemu's QDict files ``key`` under (its iteration order)."""
    b = key.encode()
    v = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qemu_order(obj: Any) -> Any:
    """Reorder every dict in ``obj`` the way qemu prints it."""
    if isinstance(obj, dict):
        items = list(obj.items())
        order = sorted(range(len(items)), key=lambda i: (_qdict_bucket(items[i][0]), -i))
        return {items[i][0]: qemu_order(items[i][1]) for i in order}
    if isinstance(obj, list):
        return [qemu_order(v) for v in obj]
    return obj


def _json_str(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 | (cp >> 10):04X}\\u{0xDC00 | (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def to_json(obj: Any, indent: int = 0) -> str:
    """qemu's pretty JSON (4 spaces, empty containers still span two lines)."""
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(obj, dict):
        body = ",\n".join(f"{inner}{_json_str(k)}: {to_json(v, indent + 4)}"
                          for k, v in obj.items())
        return "{\n" + (body + "\n" if body else "") + pad + "}"
    if isinstance(obj, list):
        body = ",\n".join(inner + to_json(v, indent + 4) for v in obj)
        return "[\n" + (body + "\n" if body else "") + pad + "]"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if obj is None:
        return "null"
    if isinstance(obj, str):
        return _json_str(obj)
    return str(obj)


def _dump(obj: Any, indent: int, lines: list[str]) -> None:
    pad = "    " * indent
    entries = obj.items() if isinstance(obj, dict) else (
        (f"[{i}]", v) for i, v in enumerate(obj))
    for k, v in entries:
        key = k.replace("-", " ")
        if isinstance(v, dict | list):
            lines.append(f"{pad}{key}:")
            _dump(v, indent + 1, lines)
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _pad_bytes(s: str, width: int, left: bool = True) -> str:
    """printf-style padding, which counts bytes, not characters."""
    n = max(0, width - len(s.encode()))
    return s + " " * n if left else " " * n + s


def snapshot_table_lines(snaps: list[Snapshot],
                         fmt_size: Callable[[int], str]) -> list[str]:
    """``qemu-img snapshot -l`` table: a header line and one line per snapshot."""
    lines = ["ID".ljust(10) + "TAG".ljust(17) + "VM SIZE".rjust(8) + "DATE".rjust(20)
             + "VM CLOCK".rjust(13) + "ICOUNT".rjust(11)]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, msecs = divmod(s.vm_clock_nsec // 1_000_000, 1000)
        mins, secs = divmod(secs, 60)
        hours, mins = divmod(mins, 60)
        clock = f"{hours:02d}:{mins:02d}:{secs:02d}.{msecs:03d}"
        icount = str(s.icount) if s.icount_valid else ""
        lines.append(_pad_bytes(s.id_str, 9) + " " + _pad_bytes(s.name, 16) + " "
                     + _pad_bytes(fmt_size(s.vm_state_size), 8, left=False)
                     + date.rjust(20) + clock.rjust(13) + _pad_bytes(icount, 11, left=False))
    return lines


def human_lines(info: Info, snaps: list[Snapshot], fmt_size: Callable[[int], str]) -> list[str]:
    """``qemu-img info`` human output for one image."""
    vsize = info["virtual-size"]
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {fmt_size(vsize)} ({vsize} bytes)",
             f"disk size: {fmt_size(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if snaps:
        lines.append("Snapshot list:")
        lines += snapshot_table_lines(snaps, fmt_size)
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        _dump(qemu_order(spec["data"]), 1, lines)
    return lines
