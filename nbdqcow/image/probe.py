"""Format probing as qemu does it: every format qemu knows looks at the first 512 bytes
(and, for one format, at the file name); the best score wins and raw, whose score is the
lowest possible, is chosen only when no other format claims the bytes.

Facts from qemu's probe functions (read, not copied), each confirmed against
``qemu-img info`` on files holding just that header:

- qcow2: magic ``QFI\\xfb`` and a big-endian version of 2 or more (a version above 3 is
  still qcow2, whose open then fails "Unsupported qcow2 version"); version 1 is the
  old qcow format; version 0 is no format at all, so the file is raw.
- qed ``QED\\0``; vpc ``conectix``; vhdx ``vhdxfile``; vmdk ``KDMV`` or ``COWD``, or a
  text descriptor whose first line that is not a ``#`` comment is ``version=1|2|3``;
  vdi: little-endian 0xbeda107f at byte 64; parallels: ``WithoutFreeSpace`` or
  ``WithouFreSpacExt`` and little-endian version 2 at byte 16; bochs: its three
  NUL-terminated names and version 1 or 2; luks: ``LUKS\\xba\\xbe`` and version 1;
  cloop: its shell-script first lines (score 2: above raw, below the rest);
  dmg: only a file name ending in ``.dmg`` (score 2), never the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

PROBE_SIZE = 512  # qemu's BLOCK_PROBE_BUF_SIZE
RAW = "raw"

_U32_BE = struct.Struct(">I")
_U32_LE = struct.Struct("<I")
_U16_BE = struct.Struct(">H")

_CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
_BOCHS_SUBTYPES = (b"Undoable", b"Volatile", b"Growing")
_VMDK_VERSIONS = tuple(f"version={v}{end}".encode() for v in (1, 2, 3) for end in ("\n", "\r\n"))


def _u32be(buf: bytes, at: int) -> int | None:
    return _U32_BE.unpack_from(buf, at)[0] if len(buf) >= at + 4 else None


def _qcow_version(buf: bytes) -> int | None:
    return _u32be(buf, 4) if buf[:4] == b"QFI\xfb" else None


def _qcow2(buf: bytes) -> int:
    v = _qcow_version(buf)
    return 100 if v is not None and v >= 2 else 0


def _qcow(buf: bytes) -> int:
    return 100 if _qcow_version(buf) == 1 else 0


def _prefix(magic: bytes, score: int = 100) -> Callable[[bytes], int]:
    return lambda buf: score if buf.startswith(magic) else 0


def _vdi(buf: bytes) -> int:
    ok = len(buf) >= PROBE_SIZE and _U32_LE.unpack_from(buf, 64)[0] == 0xBEDA107F
    return 100 if ok else 0


def _vmdk(buf: bytes) -> int:
    if buf[:4] in (b"KDMV", b"COWD"):
        return 100
    pos = 0
    while pos < len(buf) and buf[pos : pos + 1] == b"#":
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return 0
        pos = nl + 1
    return 100 if buf.startswith(_VMDK_VERSIONS, pos) else 0


def _parallels(buf: bytes) -> int:
    if len(buf) < 64 or buf[:16] not in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return 0
    return 100 if _U32_LE.unpack_from(buf, 16)[0] == 2 else 0


def _cstr(buf: bytes, start: int, size: int) -> bytes:
    field = buf[start : start + size]
    nul = field.find(b"\0")
    return field if nul < 0 else field[:nul]


def _bochs(buf: bytes) -> int:
    if len(buf) < PROBE_SIZE:
        return 0
    ok = (_cstr(buf, 0, 32) == b"Bochs Virtual HD Image"
          and _cstr(buf, 32, 16) == b"Redolog"
          and _cstr(buf, 48, 16) in _BOCHS_SUBTYPES
          and _U32_LE.unpack_from(buf, 64)[0] in (0x10000, 0x20000))
    return 100 if ok else 0


def _luks(buf: bytes) -> int:
    ok = buf.startswith(b"LUKS\xba\xbe") and len(buf) >= 8 and _U16_BE.unpack_from(buf, 6)[0] == 1
    return 100 if ok else 0


#: format name -> score of the first bytes (0: not this format)
_PROBES: dict[str, Callable[[bytes], int]] = {
    "qcow2": _qcow2,
    "qcow": _qcow,
    "qed": _prefix(b"QED\x00"),
    "vdi": _vdi,
    "vmdk": _vmdk,
    "vpc": _prefix(b"conectix"),
    "vhdx": _prefix(b"vhdxfile"),
    "parallels": _parallels,
    "bochs": _bochs,
    "luks": _luks,
    "cloop": _prefix(_CLOOP, 2),
}


def probe_bytes(buf: bytes, filename: str | None = None) -> str:
    """The format qemu would pick for a file starting with ``buf`` ('raw' if none)."""
    buf = bytes(buf[:PROBE_SIZE])
    best, score = RAW, 1
    for name, probe in _PROBES.items():
        s = probe(buf)
        if s > score:
            best, score = name, s
    if filename is not None and filename.endswith(".dmg") and score < 2:
        best = "dmg"
    return best


def claims_format(buf: bytes) -> str | None:
    """The format other than raw that a first sector would probe as (no file name, as
    qemu's raw driver checks a write to block 0), or None."""
    fmt = probe_bytes(buf)
    return None if fmt == RAW else fmt
