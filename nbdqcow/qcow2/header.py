"""PURE: the qcow2 header and header extensions <-> a frozen dataclass (qcow2.txt "Header",
"Header extensions").  Unknown incompatible bits and encryption are refused; unknown
extensions and unknown additional header fields are kept and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from nbdqcow.errors import ImageOpenError, UnsupportedFeature
from nbdqcow.qcow2 import layout as L


class _Fixed:
    """A fixed big-endian record: named fields <-> bytes (struct, not construct: this
    is read on every open, and importing construct costs a command ~25 ms)."""

    def __init__(self, fmt: str, names: str) -> None:
        self.struct = struct.Struct(fmt)
        self.names = names.split()

    def parse(self, buf: bytes) -> SimpleNamespace:
        return SimpleNamespace(**dict(zip(self.names, self.struct.unpack_from(buf),
                                          strict=True)))

    def build(self, values: dict[str, int | bytes]) -> bytes:
        return self.struct.pack(*(values[n] for n in self.names))


HeaderV2 = _Fixed(
    ">4sIQIIQIIQQIIQ",
    "magic version backing_file_offset backing_file_size cluster_bits size crypt_method "
    "l1_size l1_table_offset refcount_table_offset refcount_table_clusters nb_snapshots "
    "snapshots_offset")
HeaderV3Tail = _Fixed(
    ">QQQII",
    "incompatible_features compatible_features autoclear_features refcount_order "
    "header_length")
_EXT_HDR = struct.Struct(">II")


@dataclass(frozen=True)
class Extension:
    type: int
    data: bytes


@dataclass(frozen=True)
class Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    crypt_method: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = L.HEADER_V3_LENGTH
    compression_type: int = 0
    # bytes 105..header_length-1 as found (padding and unknown additional fields)
    extra_fields: bytes = b"\0" * 7
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    # every extension except backing format / data file / end, in file order
    extensions: tuple[Extension, ...] = field(default_factory=tuple)

    # --- derived ---------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & L.COMPAT_LAZY_REFCOUNTS)

    def extension(self, ext_type: int) -> bytes | None:
        for e in self.extensions:
            if e.type == ext_type:
                return e.data
        return None

    def replace(self, **changes: object) -> Header:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _feature_name(header_exts: list[Extension], bit: int) -> str:
    """Name an incompatible bit from the image's feature name table, if it has one."""
    for e in header_exts:
        if e.type != L.EXT_FEATURE_TABLE:
            continue
        for i in range(0, len(e.data) - 47, 48):
            ftype, fbit = e.data[i], e.data[i + 1]
            if ftype == 0 and fbit == bit:
                return e.data[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
    return L.INCOMPAT_NAMES.get(bit, f"bit {bit}")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate the header found at the start of ``buf`` (the first cluster,
    or as much of the file as exists up to 2 MiB)."""
    if len(buf) < L.HEADER_V2_LENGTH or buf[:4] != L.QCOW_MAGIC:
        raise ImageOpenError("Image is not in qcow2 format")
    h: Any = HeaderV2.parse(buf)
    if h.version not in (2, 3):
        raise UnsupportedFeature(f"unsupported qcow2 version {h.version}")
    if not L.MIN_CLUSTER_BITS <= h.cluster_bits <= L.MAX_CLUSTER_BITS:
        raise ImageOpenError(
            f"unsupported cluster size: 2^{h.cluster_bits} (must be 512 B to 2 MiB)"
        )
    cluster_size = 1 << h.cluster_bits
    if h.version == 3:
        if len(buf) < L.HEADER_V3_MIN_LENGTH:
            raise ImageOpenError("truncated qcow2 v3 header")
        t: Any = HeaderV3Tail.parse(buf[72:104])
        incompat, compat, autoclear = (
            t.incompatible_features, t.compatible_features, t.autoclear_features)
        refcount_order, header_length = t.refcount_order, t.header_length
        if header_length < L.HEADER_V3_MIN_LENGTH or header_length % 8:
            raise ImageOpenError(f"invalid header_length {header_length}")
        if header_length > cluster_size or header_length > len(buf):
            raise ImageOpenError(f"header_length {header_length} exceeds the first cluster")
    else:
        incompat = compat = autoclear = 0
        refcount_order, header_length = 4, L.HEADER_V2_LENGTH
    if refcount_order > 6:
        raise ImageOpenError(f"invalid refcount_order {refcount_order} (max 6)")
    compression_type = buf[104] if header_length > 104 else 0
    extra = bytes(buf[105:header_length]) if header_length > 105 else b""

    exts = _parse_extensions(buf, header_length, cluster_size, h.backing_file_offset)
    plain = [e for e in exts if e.type not in (L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE)]
    unknown = incompat & ~L.INCOMPAT_KNOWN
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise UnsupportedFeature(
            f"unsupported qcow2 feature: {_feature_name(plain, bit)} (incompatible bit {bit})"
        )
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))
        raise UnsupportedFeature(f"encrypted images are not supported ({kind} encryption)")
    if incompat & L.INCOMPAT_EXTL2 and h.cluster_bits < L.MIN_EXTL2_CLUSTER_BITS:
        raise ImageOpenError("extended L2 entries need clusters of at least 16 KiB")
    if incompat & L.INCOMPAT_COMPRESSION:
        if compression_type not in L.COMPRESSION_NAMES or compression_type == 0:
            raise UnsupportedFeature(f"unsupported compression type {compression_type}")
    elif compression_type != 0:
        raise ImageOpenError("compression_type set without the compression type bit")
    if autoclear & L.AUTOCLEAR_DATA_FILE_RAW and not incompat & L.INCOMPAT_DATA_FILE:
        autoclear &= ~L.AUTOCLEAR_DATA_FILE_RAW  # meaningless without a data file

    backing = None
    if h.backing_file_offset:
        if h.backing_file_size > L.MAX_BACKING_NAME:
            raise ImageOpenError("backing file name too long")
        end = h.backing_file_offset + h.backing_file_size
        if end > cluster_size or end > len(buf):
            raise ImageOpenError("backing file name lies outside the first cluster")
        backing = bytes(buf[h.backing_file_offset : end]).decode("utf-8", "replace")
    bfmt = next((e.data for e in exts if e.type == L.EXT_BACKING_FORMAT), None)
    dfile = next((e.data for e in exts if e.type == L.EXT_DATA_FILE), None)
    for name, value in (("l1_table_offset", h.l1_table_offset),
                        ("refcount_table_offset", h.refcount_table_offset),
                        ("snapshots_offset", h.snapshots_offset)):
        if value % cluster_size:
            raise ImageOpenError(f"{name} {value:#x} is not cluster aligned")
    if h.refcount_table_clusters == 0 or h.refcount_table_offset == 0:
        raise ImageOpenError("image has no refcount table")
    if h.refcount_table_clusters * cluster_size > L.MAX_REFTABLE_BYTES:
        raise ImageOpenError(f"refcount table too large ({h.refcount_table_clusters} clusters)")
    if h.l1_size * 8 > L.MAX_L1_BYTES:
        raise ImageOpenError(f"active L1 table too large ({h.l1_size} entries)")
    if h.nb_snapshots > L.MAX_SNAPSHOTS:
        raise ImageOpenError(f"too many snapshots ({h.nb_snapshots})")
    return Header(
        version=h.version, cluster_bits=h.cluster_bits, size=h.size, l1_size=h.l1_size,
        l1_table_offset=h.l1_table_offset, refcount_table_offset=h.refcount_table_offset,
        refcount_table_clusters=h.refcount_table_clusters, nb_snapshots=h.nb_snapshots,
        snapshots_offset=h.snapshots_offset, crypt_method=h.crypt_method,
        incompatible_features=incompat, compatible_features=compat,
        autoclear_features=autoclear, refcount_order=refcount_order,
        header_length=header_length, compression_type=compression_type, extra_fields=extra,
        backing_file=backing,
        backing_format=bfmt.decode("utf-8", "replace") if bfmt is not None else None,
        data_file=dfile.decode("utf-8", "replace") if dfile is not None else None,
        extensions=tuple(plain),
    )


def _parse_extensions(
    buf: bytes, start: int, cluster_size: int, backing_off: int
) -> list[Extension]:
    exts: list[Extension] = []
    pos = start
    limit = min(len(buf), cluster_size)
    if backing_off and backing_off >= start:
        limit = min(limit, backing_off)
    seen: set[int] = set()
    while True:
        if pos + 8 > limit:
            # v2 images may simply end; a truncated area is tolerated like qemu does only
            # when no bytes remain
            if pos >= limit:
                break
            raise ImageOpenError("header extension area is truncated")
        etype, elen = _EXT_HDR.unpack_from(buf, pos)
        if etype == L.EXT_END:
            break
        dstart = pos + 8
        if dstart + elen > limit:
            raise ImageOpenError(f"header extension {etype:#x} is larger than the first cluster")
        if etype in seen and etype in (L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_BITMAPS):
            raise ImageOpenError(f"duplicate header extension {etype:#x}")
        seen.add(etype)
        exts.append(Extension(etype, bytes(buf[dstart : dstart + elen])))
        pos = dstart + ((elen + 7) & ~7)
    return exts


def encode_header(h: Header) -> bytes:
    """The first-cluster bytes: header, extensions, end marker, backing file name.

    Returns exactly the bytes to write at offset 0 (the rest of the cluster is left as is).
    Raises ImageOpenError if it does not fit in one cluster.
    """
    out = bytearray(
        HeaderV2.build(dict(
            magic=L.QCOW_MAGIC, version=h.version, backing_file_offset=0,
            backing_file_size=0, cluster_bits=h.cluster_bits, size=h.size,
            crypt_method=h.crypt_method, l1_size=h.l1_size, l1_table_offset=h.l1_table_offset,
            refcount_table_offset=h.refcount_table_offset,
            refcount_table_clusters=h.refcount_table_clusters, nb_snapshots=h.nb_snapshots,
            snapshots_offset=h.snapshots_offset,
        ))
    )
    if h.version >= 3:
        out += HeaderV3Tail.build(dict(
            incompatible_features=h.incompatible_features,
            compatible_features=h.compatible_features,
            autoclear_features=h.autoclear_features, refcount_order=h.refcount_order,
            header_length=h.header_length,
        ))
        if h.header_length > 104:
            out.append(h.compression_type)
            tail = h.extra_fields[: h.header_length - 105]
            out += tail + bytes(h.header_length - 105 - len(tail))

    def add_ext(etype: int, data: bytes) -> None:
        out.extend(_EXT_HDR.pack(etype, len(data)))
        out.extend(data)
        out.extend(bytes((-len(data)) % 8))

    if h.backing_format is not None:
        add_ext(L.EXT_BACKING_FORMAT, h.backing_format.encode())
    if h.data_file is not None:
        add_ext(L.EXT_DATA_FILE, h.data_file.encode())
    for e in h.extensions:
        add_ext(e.type, e.data)
    out.extend(_EXT_HDR.pack(L.EXT_END, 0))
    if h.backing_file is not None:
        name = h.backing_file.encode()
        off = len(out)
        struct.pack_into(">QI", out, 8, off, len(name))
        out.extend(name)
    if len(out) > h.cluster_size:
        raise ImageOpenError("header and extensions do not fit in the first cluster")
    return bytes(out)


def feature_table_extension() -> Extension:
    """The feature name table qemu writes, so other tools can name our features."""
    names = [
        (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
        (0, 3, "compression type"), (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
    ]
    data = b"".join(bytes([t, b]) + n.encode().ljust(46, b"\0") for t, b, n in names)
    return Extension(L.EXT_FEATURE_TABLE, data)
