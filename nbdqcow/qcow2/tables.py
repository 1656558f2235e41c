"""L1/L2/refcount tables as ``array`` objects in host byte order, byte-swapped once on
load and store (qcow2.txt "Cluster mapping", "Host cluster management")."""

from __future__ import annotations

import sys
from array import array

_LITTLE = sys.byteorder == "little"
_WIDTH_CODE = {8: "B", 16: "H", 32: "I", 64: "Q"}


def _fix_code(code: str) -> str:
    # array's 'I' and 'L' sizes are platform dependent: pick the one that is 4 bytes
    if code == "I" and array("I").itemsize != 4:
        return "L"
    return code


def load_u64(buf: bytes) -> array[int]:
    """Big-endian u64 table -> array('Q')."""
    a = array("Q")
    a.frombytes(buf[: len(buf) - len(buf) % 8])
    if _LITTLE:
        a.byteswap()
    return a


def store_u64(a: array[int]) -> bytes:
    if not _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def load_refblock(buf: bytes, refcount_bits: int) -> array[int]:
    """A refcount block -> array of refcounts (one item per cluster)."""
    if refcount_bits >= 8:
        a = array(_fix_code(_WIDTH_CODE[refcount_bits]))
        a.frombytes(buf)
        if _LITTLE and refcount_bits > 8:
            a.byteswap()
        return a
    # sub-byte widths: entries packed least-significant-bit first within each byte
    per = 8 // refcount_bits
    mask = (1 << refcount_bits) - 1
    out = array("B", bytes(len(buf) * per))
    for shift_i in range(per):
        shift = shift_i * refcount_bits
        out[shift_i::per] = array("B", bytes((b >> shift) & mask for b in buf))
    return out


def store_refblock(a: array[int], refcount_bits: int) -> bytes:
    if refcount_bits >= 8:
        if _LITTLE and refcount_bits > 8:
            b = array(a.typecode, a)
            b.byteswap()
            return b.tobytes()
        return a.tobytes()
    per = 8 // refcount_bits
    out = bytearray(len(a) // per)
    for shift_i in range(per):
        shift = shift_i * refcount_bits
        vals = a[shift_i::per]
        for i, v in enumerate(vals):
            if v:
                out[i] |= v << shift
    return bytes(out)


def new_refblock(entries: int, refcount_bits: int) -> array[int]:
    code = _fix_code(_WIDTH_CODE[refcount_bits]) if refcount_bits >= 8 else "B"
    return array(code, bytes(entries * (max(refcount_bits, 8) // 8)))
