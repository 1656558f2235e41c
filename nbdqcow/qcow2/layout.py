"""PURE spec constants and masks (qcow2.txt: "Header", "Cluster mapping", "Extended L2").

Names follow the spec and qemu's helpers so the arithmetic reads side by side with them.
"""

from __future__ import annotations

QCOW_MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_EXTL2_CLUSTER_BITS = 14
HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112  # what qemu writes: includes compression_type + padding

MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's implementation limit
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # qemu's implementation limit
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_BACKING_DEPTH = 64

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
# compatible
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW  # bitmaps: see bitmap_store.py

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# nbdqcow's own optional extension ("nbdq"): the mapping policy. qemu keeps it unread.
EXT_NBDQCOW_POLICY = 0x6E626471

# L1 / L2 / refcount table entries
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

# extended L2
SUBCLUSTERS = 32
L2_BITMAP_ALLOC_ALL = 0x00000000FFFFFFFF
L2_BITMAP_ZERO_ALL = 0xFFFFFFFF00000000

SECTOR = 512
