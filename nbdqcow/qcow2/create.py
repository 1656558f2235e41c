"""Image creation (qcow2.txt "Header", "Host cluster management", "Cluster mapping").

``preallocation=off`` reproduces qemu-img's layout: header in cluster 0, the refcount
table in cluster 1, the first refcount block in cluster 2, the L1 table from cluster 3,
and further refcount blocks where qemu's allocator would put them.

``preallocation=metadata|falloc|full`` writes ALL metadata first (header, refcount table,
refcount blocks covering the whole final file, L1, every L2 table) and then the data
area, so that host offset = guest offset + one constant for every cluster.  With an
external data file the data clusters live in the data file at their guest offset.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nbdqcow.block.hostfile import HostFile, read_head
from nbdqcow.block.locking import Access, LockMode, create_mode
from nbdqcow.errors import ImageOpenError, NbdqcowError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.header import Extension, Header, encode_header, feature_table_extension


class CreateError(NbdqcowError):
    """The options given to create an image are invalid (one-line message)."""


PREALLOC_MODES = ("off", "metadata", "falloc", "full")
MAPPING_POLICIES = ("preserve", "release", "thin")
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")

# (name, type, description) in qemu-img's "-o help" style
QCOW2_OPTION_HELP: tuple[tuple[str, str, str], ...] = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("compression_type", "str", "Compression method used for image cluster compression"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("mapping", "str", "nbdqcow mapping policy (allowed values: preserve, release, thin)"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)
RAW_OPTION_HELP: tuple[tuple[str, str, str], ...] = (
    ("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    ("size", "size", "Virtual disk size"),
)


def option_help(fmt: str) -> str:
    table = QCOW2_OPTION_HELP if fmt == "qcow2" else RAW_OPTION_HELP
    lines = ["Supported options:"]
    for name, typ, desc in table:
        lines.append(f"  {f'{name}=<{typ}>':<22} - {desc}")
    return "\n".join(lines) + "\n"


# --- options ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Qcow2Options:
    """Validated qcow2 creation options."""

    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: int = L.COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"
    mapping: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _parse_bool(name: str, value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise CreateError(f"Parameter '{name}' expects 'on' or 'off'")


def _parse_num(name: str, value: str, size: bool) -> int:
    from nbdqcow.sizes import SizeError, parse_size

    try:
        return parse_size(value) if size else int(value, 0)
    except (SizeError, ValueError):
        kind = "a size" if size else "a number"
        raise CreateError(f"Parameter '{name}' expects {kind}") from None


def _choice(name: str, value: str, allowed: Mapping[str, object] | tuple[str, ...]) -> str:
    if value not in allowed:
        raise CreateError(f"Parameter '{name}' does not accept value '{value}'")
    return value


_KNOWN = {name for name, _, _ in QCOW2_OPTION_HELP}


def parse_qcow2_options(opts: Mapping[str, str]) -> Qcow2Options:
    """Validate qemu-img style ``-o`` options for qcow2 (values are strings)."""
    for k in opts:
        if k not in _KNOWN:
            raise CreateError(f"Invalid parameter '{k}'")
    compat = _COMPAT[_choice("compat", opts.get("compat", "1.1"), tuple(_COMPAT))]
    cs = _parse_num("cluster_size", opts.get("cluster_size", "65536"), True)
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    rbits = _parse_num("refcount_bits", opts.get("refcount_bits", "16"), False)
    if rbits < 1 or rbits > 64 or rbits & (rbits - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    lazy = _parse_bool("lazy_refcounts", opts.get("lazy_refcounts", "off"))
    extl2 = _parse_bool("extended_l2", opts.get("extended_l2", "off"))
    ctype_name = _choice("compression-type", opts.get("compression_type", "zlib"),
                         ("zlib", "zstd"))
    ctype = L.COMPRESSION_ZSTD if ctype_name == "zstd" else L.COMPRESSION_ZLIB
    prealloc = _choice("preallocation", opts.get("preallocation", "off"), PREALLOC_MODES)
    mapping = opts.get("mapping")
    if mapping is not None:
        _choice("mapping", mapping, MAPPING_POLICIES)
    backing = opts.get("backing_file") or None
    bfmt = opts.get("backing_fmt") or None
    dfile = opts.get("data_file") or None
    draw = _parse_bool("data_file_raw", opts.get("data_file_raw", "off"))

    v3_only = ((rbits != 16, "Different refcount widths than 16 bits require"),
               (lazy, "Lazy refcounts only supported with"),
               (extl2, "Extended L2 entries are only supported with"),
               (ctype != L.COMPRESSION_ZLIB, "Non-zlib compression type is only supported with"),
               (dfile is not None, "External data files are only supported with"))
    if compat < 3:
        for bad, what in v3_only:
            if bad:
                raise CreateError(f"{what} compatibility level 1.1 and above "
                                  "(use version=v3 or greater)")
    if extl2 and cs < 1 << L.MIN_EXTL2_CLUSTER_BITS:
        raise CreateError("Extended L2 entries are only supported with cluster sizes of "
                          "at least 16384 bytes")
    if bfmt and not backing:
        raise CreateError("Backing format cannot be used without backing file")
    if draw and not dfile:
        raise CreateError("data-file-raw requires data-file")
    if draw and backing:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if backing and prealloc != "off" and not extl2:
        raise CreateError("Backing file and preallocation can only be used at the same time "
                          "if extended_l2 is on")
    return Qcow2Options(
        version=compat, cluster_bits=cs.bit_length() - 1,
        refcount_order=rbits.bit_length() - 1, lazy_refcounts=lazy, extended_l2=extl2,
        compression_type=ctype, backing_file=backing, backing_fmt=bfmt, data_file=dfile,
        data_file_raw=draw, preallocation=prealloc, mapping=mapping,
    )


def formatting_line(path: str, fmt: str, size: int, given: Mapping[str, str]) -> str:
    """The "Formatting 'FILE', fmt=..." line qemu-img prints (same option order)."""
    parts = [f"Formatting '{path}', fmt={fmt}"]
    if fmt == "raw":
        parts.append(f"size={size}")
        if "preallocation" in given:
            parts.append(f"preallocation={given['preallocation']}")
        return " ".join(parts)
    cs = _parse_num("cluster_size", given.get("cluster_size", "65536"), True)
    parts += [f"cluster_size={cs}", f"extended_l2={given.get('extended_l2', 'off')}"]
    if "preallocation" in given:
        parts.append(f"preallocation={given['preallocation']}")
    parts += [f"compression_type={given.get('compression_type', 'zlib')}", f"size={size}"]
    for key in ("compat", "backing_file", "backing_fmt", "data_file", "data_file_raw"):
        if key in given:
            parts.append(f"{key}={given[key]}")
    parts += [f"lazy_refcounts={given.get('lazy_refcounts', 'off')}",
              f"refcount_bits={given.get('refcount_bits', '16')}"]
    if "mapping" in given:
        parts.append(f"mapping={given['mapping']}")
    return " ".join(parts)


# --- layout planning -------------------------------------------------------------------
@dataclass
class Plan:
    """Where every metadata structure goes (all offsets in bytes, cluster aligned)."""

    cluster_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refblocks: dict[int, int]  # refcount block index -> host offset
    l1_table_offset: int
    l1_size: int
    l2_offsets: list[int] = field(default_factory=list)  # per L1 index
    data_offset: int | None = None  # host offset of guest offset 0 (None: not mapped)
    nb_clusters: int = 0  # clusters [0, nb_clusters) have refcount 1
    file_length: int = 0


class _TableFull(Exception):
    pass


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool) -> int:
    l2_entries = (1 << cluster_bits) // (16 if extended_l2 else 8)
    return _ceil(size, l2_entries << cluster_bits)


def _plan_qemu_off(cs: int, refs_per_block: int, l1_size: int) -> Plan:
    """Mimic qemu-img: clusters 0-2 fixed, L1 from cluster 3, refcount blocks for the
    L1 allocated on demand at the first free cluster (self-describing when possible)."""
    l1_clusters = _ceil(l1_size * 8, cs)
    table_entries = cs // 8
    blocks = {0: 2 * cs}
    next_free = 3 + l1_clusters

    def ensure(cluster: int) -> None:
        nonlocal next_free
        idx = cluster // refs_per_block
        if idx in blocks:
            return
        if idx >= table_entries:
            raise _TableFull
        new = next_free
        next_free += 1
        blocks[idx] = new * cs
        if new // refs_per_block != idx:
            ensure(new)

    for c in range(3, 3 + l1_clusters):
        ensure(c)
    length = max(3 * cs + l1_size * 8, max(blocks.values()) + cs)
    return Plan(cs, cs, 1, blocks, 3 * cs if l1_size else 0, l1_size,
                nb_clusters=next_free, file_length=length)


def _plan_metadata_first(cs: int, refs_per_block: int, l1_size: int, data_clusters: int,
                         with_l2: bool) -> Plan:
    """Header, refcount table, refcount blocks, L1, L2 tables, then the data area."""
    l1_clusters = _ceil(l1_size * 8, cs)
    l2_count = l1_size if with_l2 else 0
    fixed = 1 + l1_clusters + l2_count + data_clusters
    rb = rt = 1
    while True:
        total = fixed + rb + rt
        new_rb = _ceil(total, refs_per_block)
        new_rt = max(1, _ceil(new_rb * 8, cs))
        if (new_rb, new_rt) == (rb, rt):
            break
        rb, rt = max(rb, new_rb), max(rt, new_rt)
    if rt * cs > L.MAX_REFTABLE_BYTES:
        raise CreateError("The image size is too large for file format 'qcow2' "
                          "(try using a larger cluster size)")
    pos = 1 + rt
    blocks = {i: (pos + i) * cs for i in range(rb)}
    pos += rb
    l1_off = pos * cs if l1_size else 0
    pos += l1_clusters
    l2 = [(pos + i) * cs for i in range(l2_count)]
    pos += l2_count
    data = pos * cs if with_l2 else None
    pos += data_clusters
    if with_l2:
        length = pos * cs
    else:
        length = max(l1_off + l1_size * 8, (1 + rt + rb) * cs)
    return Plan(cs, cs, rt, blocks, l1_off, l1_size, l2, data, nb_clusters=pos,
                file_length=length)


def plan_layout(size: int, o: Qcow2Options) -> Plan:
    cs = o.cluster_size
    refs_per_block = cs * 8 >> o.refcount_order
    l1_size = l1_entries_for(size, o.cluster_bits, o.extended_l2)
    if l1_size * 8 > L.MAX_L1_BYTES:
        raise CreateError("The image size is too large for file format 'qcow2' "
                          "(try using a larger cluster size)")
    prealloc = o.preallocation
    if prealloc == "off" and o.data_file_raw:
        prealloc = "metadata"  # a raw data file must be readable through the qcow2 too
    if prealloc == "off":
        try:
            return _plan_qemu_off(cs, refs_per_block, l1_size)
        except _TableFull:
            # qemu would grow and move the refcount table here; a bigger table from the
            # start is simpler and just as valid
            return _plan_metadata_first(cs, refs_per_block, l1_size, 0, with_l2=False)
    data_clusters = 0 if o.data_file else _ceil(size, cs)
    plan = _plan_metadata_first(cs, refs_per_block, l1_size, data_clusters, with_l2=True)
    if o.data_file:
        plan.data_offset = 0
    return plan


# --- encoding --------------------------------------------------------------------------
def refcount_block(n_used: int, cs: int, refcount_order: int) -> bytes:
    """A refcount block whose first ``n_used`` entries are 1 and the rest 0."""
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        one = bytes(width - 1) + b"\x01"
        return (one * n_used).ljust(cs, b"\0")
    per_byte = 8 // bits
    full = sum(1 << (j * bits) for j in range(per_byte))
    nbytes, rest = divmod(n_used, per_byte)
    out = bytes([full]) * nbytes
    if rest:
        out += bytes([sum(1 << (j * bits) for j in range(rest))])
    return out.ljust(cs, b"\0")


def _be_u64(values: array) -> bytes:  # type: ignore[type-arg]
    if sys.byteorder == "little":
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def _l2_table(first_guest_cluster: int, n: int, host0: int, cs: int, entries: int,
              extended: bool) -> bytes:
    start = host0 + first_guest_cluster * cs
    offs = array("Q", range(start | L.QCOW_OFLAG_COPIED,
                            (start + n * cs) | L.QCOW_OFLAG_COPIED, cs))
    if extended:
        both = array("Q", bytes(16 * n))
        both[0::2] = offs  # bitmap 0: reserved host cluster, reads as unallocated
        offs = both
    return _be_u64(offs).ljust(entries * (16 if extended else 8), b"\0")


def build_header(size: int, o: Qcow2Options, plan: Plan) -> Header:
    incompat = 0
    if o.data_file:
        incompat |= L.INCOMPAT_DATA_FILE
    if o.compression_type != L.COMPRESSION_ZLIB:
        incompat |= L.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompat |= L.INCOMPAT_EXTL2
    exts: list[Extension] = []
    if o.version >= 3 and o.cluster_size > 4096:
        # qemu-img writes the feature name table only for clusters larger than 4 KiB
        exts.append(feature_table_extension())
    if o.mapping is not None:
        exts.append(Extension(L.EXT_NBDQCOW_POLICY, o.mapping.encode()))
    return Header(
        version=o.version, cluster_bits=o.cluster_bits, size=size, l1_size=plan.l1_size,
        l1_table_offset=plan.l1_table_offset,
        refcount_table_offset=plan.refcount_table_offset,
        refcount_table_clusters=plan.refcount_table_clusters,
        incompatible_features=incompat if o.version >= 3 else 0,
        compatible_features=L.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
        autoclear_features=L.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
        refcount_order=o.refcount_order,
        header_length=L.HEADER_V3_LENGTH if o.version >= 3 else L.HEADER_V2_LENGTH,
        compression_type=o.compression_type, extra_fields=b"\0" * 7,
        backing_file=o.backing_file, backing_format=o.backing_fmt, data_file=o.data_file,
        extensions=tuple(exts),
    )


def _write_refcounts(f: HostFile, plan: Plan, o: Qcow2Options) -> None:
    cs = plan.cluster_size
    refs_per_block = cs * 8 >> o.refcount_order
    table = array("Q", bytes(8 * (plan.refcount_table_clusters * cs // 8)))
    full: bytes | None = None
    for idx, off in sorted(plan.refblocks.items()):
        table[idx] = off
        used = min(refs_per_block, max(0, plan.nb_clusters - idx * refs_per_block))
        if used == refs_per_block:
            full = full or refcount_block(used, cs, o.refcount_order)
            f.pwrite(full, off)
        else:
            f.pwrite(refcount_block(used, cs, o.refcount_order), off)
    f.pwrite(_be_u64(table), plan.refcount_table_offset)


def _write_tables(f: HostFile, size: int, plan: Plan, o: Qcow2Options) -> None:
    cs = plan.cluster_size
    if plan.l1_size == 0:
        return
    if not plan.l2_offsets:
        f.pwrite(bytes(plan.l1_size * 8), plan.l1_table_offset)
        return
    assert plan.data_offset is not None
    l1 = array("Q", (off | L.QCOW_OFLAG_COPIED for off in plan.l2_offsets))
    f.pwrite(_be_u64(l1), plan.l1_table_offset)
    entries = cs // (16 if o.extended_l2 else 8)
    guest_clusters = _ceil(size, cs)
    for i, l2_off in enumerate(plan.l2_offsets):
        first = i * entries
        n = min(entries, guest_clusters - first)
        f.pwrite(_l2_table(first, n, plan.data_offset, cs, entries, o.extended_l2), l2_off)


def _fill(f: HostFile, mode: str, offset: int, length: int) -> None:
    """Preallocate [offset, offset+length) of ``f`` for ``mode``; extend the file."""
    if length <= 0:
        return
    if mode == "falloc":
        f.allocate(offset, length)
    elif mode == "full":
        f.write_zeros(offset, length)
    if f.size() < offset + length:
        f.truncate(offset + length)


def _create_file(path: str, lock: LockMode | None) -> HostFile:
    """Create (or empty) ``path``, holding qemu's locks for ``lock`` first: a file some
    other process uses is refused before a byte of it is truncated."""
    f = HostFile(path, writable=True, lock=lock, create=True)
    try:
        f.truncate(0)
    except BaseException:
        f.close()
        raise
    return f


def _resolve(image_path: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def create_qcow2(path: str, size: int, o: Qcow2Options) -> None:
    plan = plan_layout(size, o)
    header = build_header(size, o, plan)
    hdr = encode_header(header)
    if o.data_file:
        # like qemu-img, a relative data file name is relative to the working directory
        df = _create_file(o.data_file, Access(write=True).data_file())
        try:
            mode = o.preallocation if o.preallocation in ("falloc", "full") else "off"
            _fill(df, mode, 0, size)
            df.truncate(size)
        finally:
            df.close()
    f = _create_file(path, Access(write=True).image("qcow2"))
    try:
        _write_refcounts(f, plan, o)
        _write_tables(f, size, plan, o)
        if plan.data_offset is not None and not o.data_file:
            data_len = _ceil(size, plan.cluster_size) * plan.cluster_size
            mode = o.preallocation
            _fill(f, mode if mode in ("falloc", "full") else "off", plan.data_offset, data_len)
        if f.size() < plan.file_length:
            f.truncate(plan.file_length)
        f.pwrite(hdr, 0)
        f.sync()
    finally:
        f.close()


def create_raw(path: str, size: int, preallocation: str = "off") -> None:
    f = _create_file(path, create_mode())
    try:
        _fill(f, preallocation, 0, size)
        f.truncate(size)
        f.sync()
    finally:
        f.close()


def backing_size(image_path: str, backing: str, fmt: str) -> int:
    """Virtual size of the backing file (name resolved against the new image's folder)."""
    from nbdqcow.qcow2.header import parse_header

    real = _resolve(image_path, backing)
    try:
        head, file_size = read_head(real, 1 << L.MAX_CLUSTER_BITS if fmt == "qcow2" else 0)
        return parse_header(head, file_size).size if fmt == "qcow2" else file_size
    except OSError as e:
        raise CreateError(f"Could not open '{backing}': {e.strerror}") from None
    except ImageOpenError as e:
        raise CreateError(f"Could not open backing image '{backing}': {e}") from None


def probe_backing_format(image_path: str, backing: str,
                         probe: Callable[[str], str] | None) -> str:
    """The backing file's format by ``probe`` (the image layer's prober, given by the
    caller: the engine does not know the other formats)."""
    if probe is None:
        raise CreateError("Backing file specified without backing format")
    try:
        return probe(_resolve(image_path, backing))
    except ImageOpenError as e:
        raise CreateError(str(e)) from None


_RAW_KEYS = ("preallocation", "size")


def create_image(
    path: str,
    size: int | None,
    fmt: str = "qcow2",
    options: Mapping[str, str] | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    *,
    check_backing: bool = True,
    require_backing_fmt: bool = False,
    announce: Callable[[str], None] | None = None,
    probe: Callable[[str], str] | None = None,
) -> int:
    """Create ``path``; returns the virtual size.  ``options`` are qemu-img ``-o`` strings.

    ``size`` None takes the backing file's size.  A backing file without a format is
    probed, unless ``require_backing_fmt`` (qemu-img's rule, used by the CLI) makes that
    an error.  ``check_backing`` False skips opening the backing file (qemu-img -u).
    ``announce`` receives the "Formatting ..." line before the file is written.
    ``probe`` names the format of a file (nbdqcow.image.probe_file) for a backing file
    given without its format.
    """
    given = dict(options or {})
    if backing_file is not None:
        given["backing_file"] = backing_file
    if backing_fmt is not None:
        given["backing_fmt"] = backing_fmt
    if "size" in given:
        from nbdqcow.sizes import SizeError, parse_size

        try:
            opt_size = parse_size(given.pop("size"))
        except SizeError:
            raise CreateError("Parameter 'size' expects a size") from None
        size = opt_size if size is None else size
    if fmt == "raw":
        for k in given:
            if k not in _RAW_KEYS:
                raise CreateError(f"Invalid parameter '{k}'")
        if size is None:
            raise CreateError("Image creation needs a size parameter")
        prealloc = _choice("preallocation", given.get("preallocation", "off"),
                           PREALLOC_MODES)
        if announce:  # qemu-img shows the size as given, before rounding
            announce(formatting_line(path, fmt, size, given))
        size = _ceil(size, L.SECTOR) * L.SECTOR
        create_raw(path, size, prealloc)
        return size
    if fmt != "qcow2":
        raise CreateError(f"Unknown file format '{fmt}'")
    if given.get("backing_file") and not given.get("backing_fmt") and (
            check_backing or require_backing_fmt):
        detected = probe_backing_format(path, given["backing_file"], probe)
        if require_backing_fmt:
            raise CreateError("Backing file specified without backing format "
                              f"(detected format of {detected})")
        given["backing_fmt"] = detected
    opts = parse_qcow2_options(given)
    if opts.backing_file and check_backing:
        assert opts.backing_fmt is not None
        bsize = backing_size(path, opts.backing_file, opts.backing_fmt)
        if size is None:
            size = bsize
    if size is None:
        raise CreateError("Image creation needs a size parameter")
    if announce:
        announce(formatting_line(path, fmt, size, given))
    size = _ceil(size, L.SECTOR) * L.SECTOR
    create_qcow2(path, size, opts)
    return size


__all__ = [
    "CreateError", "Qcow2Options", "Plan", "create_image", "create_qcow2", "create_raw",
    "formatting_line", "option_help", "parse_qcow2_options", "plan_layout",
    "refcount_block",
]
