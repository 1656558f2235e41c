"""Hostile images: a corpus of damaged qcow2 files, generated here from small valid images
that qemu-img made.  For each file the engine must, within a time and memory bound,
either refuse to open it with a one-line nbdqcow error, or open it and then read it
wholly or fail with an nbdqcow error; a read-only open never changes the file.

Each case runs in a forked child under ``RLIMIT_AS`` (so an absurd size field that makes
the engine allocate a huge table fails the test instead of the machine), ``RLIMIT_CPU``
(5 s of CPU for open + read) and a wall-clock timeout against blocking hangs.
Expectations per case:

- ``ok``: must open and read exactly what qemu reads from the undamaged image (controls:
  the corpus is not passed by refusing everything);
- ``refuse``: must be refused at open (ImageOpenError / CorruptImage);
- ``unsupported``: must be refused with UnsupportedFeature naming the feature;
- ``fail``: must be refused at open or make some read fail with an nbdqcow error;
- ``any``: either, as long as it is clean.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import imagegen
import pytest

MiB = 1024 * 1024
CASE_CPU_SECONDS = 5  # CPU time per case (open + read), enforced with RLIMIT_CPU
CASE_WALL_TIMEOUT = 30.0  # wall clock per case: catches blocking hangs on a loaded machine
AS_HEADROOM = 768 * MiB  # address space the child may add to what it has at fork
FULL_READ_LIMIT = 16 * MiB  # larger (claimed) sizes are sampled, not read wholly
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # L1/L2 host offset bits 9-55
COPIED = 1 << 63
COMPRESSED = 1 << 62

# --------------------------------------------------------------------------------------
# the header (qcow2 spec, "Header"), parsed with the spec's field names
# --------------------------------------------------------------------------------------
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


def get(buf: bytes | bytearray, name: str) -> int:
    off, fmt = FIELDS[name]
    return int(struct.unpack_from(fmt, buf, off)[0])


def put(buf: bytearray, name: str, value: int) -> None:
    off, fmt = FIELDS[name]
    struct.pack_into(fmt, buf, off, value)


def u64(buf: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", buf, off)[0])


def put_u64(buf: bytearray, off: int, value: int) -> None:
    struct.pack_into(">Q", buf, off, value)


@dataclass
class Base:
    """A valid small image made by qemu, with the facts the mutations need."""

    name: str
    data: bytes
    ref_sha: str  # sha256 of qemu-img convert -O raw of it
    cluster: int
    l1: int  # l1_table_offset
    l2: int  # host offset of the first L2 table
    l2_entry: int  # 8 or 16 bytes
    n_entries: int  # guest clusters of the image (entries used in the L2 table)
    data_offsets: list[int] = field(default_factory=list)  # host offsets of data clusters
    compressed_index: int | None = None  # an L2 index holding a compressed cluster
    snap_ref_sha: str | None = None  # sha256 of qemu's read of snapshot "s1", if any


def parse_base(name: str, data: bytes, ref: bytes) -> Base:
    cluster = 1 << get(data, "cluster_bits")
    ext_l2 = bool(get(data, "incompatible_features") & (1 << 4))
    l1 = get(data, "l1_table_offset")
    l2 = u64(data, l1) & OFFSET_MASK
    assert l2, f"{name}: test setup: the first L2 table should exist"
    entry = 16 if ext_l2 else 8
    n = -(-get(data, "size") // cluster)
    base = Base(name, data, hashlib.sha256(ref).hexdigest(), cluster, l1, l2, entry, n)
    for i in range(n):
        e = u64(data, l2 + i * entry)
        if e & COMPRESSED:
            base.compressed_index = i if base.compressed_index is None else base.compressed_index
        elif e & OFFSET_MASK:
            base.data_offsets.append(e & OFFSET_MASK)
    return base


def _build_bases(d: Path) -> dict[str, Base]:
    size = 1 * MiB
    out: dict[str, Base] = {}

    def add(name: str, img: Path) -> None:
        ref = imagegen.convert_to_raw(img, d / "ref.raw")
        out[name] = parse_base(name, img.read_bytes(), ref)

    cmds = [f"write -P {0x31 + i:#x} {i * 65536 + 100 * i} {40000 + 997 * i}" for i in range(13)]
    cmds += ["write -z 851968 65536", "discard 917504 65536"]
    img = imagegen.create(d / "plain.qcow2", size)
    imagegen.qemu_io(img, cmds)
    add("plain", img)

    img = imagegen.create(d / "v2.qcow2", size, opts={"compat": "0.10"})
    imagegen.qemu_io(img, cmds)
    add("v2", img)

    img = imagegen.create(d / "extl2.qcow2", size, opts={"extended_l2": "on"})
    imagegen.qemu_io(img, [
        "write -P 0x41 0 65536", "write -P 0x42 70000 5000", "write -z 131072 4096",
        "write -P 0x43 200000 300000", "write -z -u 524288 8192", "write -P 0x44 600000 2048",
    ])
    add("extl2", img)

    img = imagegen.create(d / "snap.qcow2", size)
    imagegen.qemu_io(img, cmds[:6])
    imagegen.qemu_img("snapshot", "-c", "s1", str(img))
    imagegen.qemu_io(img, ["write -P 0x77 0 300000"])
    add("snap", img)
    snap_ref = imagegen.convert_to_raw(img, d / "ref.raw", snapshot="s1")
    out["snap"].snap_ref_sha = hashlib.sha256(snap_ref).hexdigest()

    for comp in ("zlib", "zstd"):
        src = d / "src.raw"
        src.write_bytes(b"".join(bytes([i]) * 30000 + imagegen.random_bytes(i, 35536)
                                 for i in range(16)))
        img = d / f"{comp}.qcow2"
        imagegen.qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={comp}",
                          str(src), str(img))
        add(comp, img)
    return out


# --------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------
class Ctx:
    """What a mutation works on: the base's bytes (``buf``) in the case's folder."""

    def __init__(self, base: Base | None, d: Path) -> None:
        self.base = base
        self.buf: bytearray | None = bytearray(base.data) if base else None
        self.dir = d
        self.path = d / "img.qcow2"

    @property
    def b(self) -> bytearray:
        assert self.buf is not None
        return self.buf

    @property
    def bs(self) -> Base:
        assert self.base is not None
        return self.base

    def eof_cluster(self, extra: int = 0) -> int:
        """A cluster-aligned offset ``extra`` clusters past the end of the file."""
        c = self.bs.cluster
        return (-(-len(self.b) // c) + extra) * c

    def l2_entry(self, i: int) -> int:
        return self.bs.l2 + i * self.bs.l2_entry


Mutation = Callable[[Ctx], None]


@dataclass(frozen=True)
class HCase:
    name: str
    base: str | None  # None: the mutation makes its files itself
    mutate: Mutation
    expect: str  # ok | refuse | unsupported | fail | any
    words: tuple[str, ...] = ()  # for "unsupported": the message names one of these
    snapshot: str | None = None  # open this internal snapshot instead of the active layer


def set_field(name: str, value: int | Callable[[Ctx], int]) -> Mutation:
    def m(c: Ctx) -> None:
        put(c.b, name, value(c) if callable(value) else value)

    return m


def or_field(name: str, bits: int) -> Mutation:
    def m(c: Ctx) -> None:
        put(c.b, name, get(c.b, name) | bits)

    return m


def truncate(where: Callable[[Ctx], int]) -> Mutation:
    def m(c: Ctx) -> None:
        del c.b[where(c):]

    return m


def both(*ms: Mutation) -> Mutation:
    def m(c: Ctx) -> None:
        for one in ms:
            one(c)

    return m


def set_l1_entry(value: Callable[[Ctx], int]) -> Mutation:
    def m(c: Ctx) -> None:
        put_u64(c.b, c.bs.l1, value(c))

    return m


def set_l2_entry(i: int, value: Callable[[Ctx], int], bitmap: int | None = None) -> Mutation:
    def m(c: Ctx) -> None:
        put_u64(c.b, c.l2_entry(i), value(c))
        if bitmap is not None:
            put_u64(c.b, c.l2_entry(i) + 8, bitmap)

    return m


def first_extension_length(value: Callable[[Ctx], int]) -> Mutation:
    def m(c: Ctx) -> None:
        at = get(c.b, "header_length")
        assert struct.unpack_from(">I", c.b, at)[0] != 0, "test setup: no header extension"
        struct.pack_into(">I", c.b, at + 4, value(c))

    return m


def compressed_garbage(fill: Callable[[int], bytes], where: str = "file") -> Mutation:
    """Point L2 entry 1 at a compressed descriptor over garbage (or past EOF)."""

    def m(c: Ctx) -> None:
        cb = get(c.b, "cluster_bits")
        x = 62 - (cb - 8)
        if where == "eof":
            host = c.eof_cluster(50) + 512
        else:
            host = c.bs.data_offsets[0] if c.bs.data_offsets else c.eof_cluster()
            garbage = fill(c.bs.cluster)
            if len(c.b) < host:  # no normal data cluster: put the garbage at the end
                c.b.extend(bytes(host - len(c.b)))
            c.b[host:host + len(garbage)] = garbage
        sectors = 1  # additional 512-byte sectors
        put_u64(c.b, c.l2_entry(1), COMPRESSED | (sectors << x) | host)

    return m


def snapshot_entry(field_off: int, fmt: str, value: Callable[[Ctx], int]) -> Mutation:
    """Set a field of the first snapshot table entry (spec: "Snapshot table entry")."""

    def m(c: Ctx) -> None:
        at = get(c.b, "snapshots_offset") + field_off
        struct.pack_into(fmt, c.b, at, value(c))

    return m


def snapshot_field(c: Ctx, field_off: int, fmt: str) -> int:
    return int(struct.unpack_from(fmt, c.b, get(c.b, "snapshots_offset") + field_off)[0])


def data_file(kind: str) -> Mutation:
    """A qcow2 image with an external data file that is missing or too short."""

    def m(c: Ctx) -> None:
        c.buf = None
        data = c.dir / "data.raw"
        imagegen.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}",
                          str(c.path), "1M")
        imagegen.qemu_io(c.path, ["write -P 0x61 0 131072", "write -P 0x62 655360 65536"])
        if kind == "missing":
            data.unlink()
        else:
            os.truncate(data, 65536)

    return m


def backing(kind: str) -> Mutation:
    def m(c: Ctx) -> None:
        c.buf = None
        top = c.path
        if kind == "missing":
            imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2",
                              "-F", "qcow2", str(top), "1M")
        elif kind == "missing_raw":
            imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw",
                              "-F", "raw", str(top), "1M")
        elif kind == "self":
            imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", top.name,
                              "-F", "qcow2", str(top), "1M")
        elif kind == "loop":
            other = c.dir / "b.qcow2"
            imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", other.name,
                              "-F", "qcow2", str(top), "1M")
            imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", top.name,
                              "-F", "qcow2", str(other), "1M")
        elif kind == "loop3":
            names = ["img.qcow2", "b.qcow2", "c.qcow2"]
            for i, n in enumerate(names):
                imagegen.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
                                  names[(i + 1) % 3], "-F", "qcow2", str(c.dir / n), "1M")
        else:
            raise AssertionError(kind)

    return m


def _cases() -> list[HCase]:
    C: list[HCase] = []

    def add(name: str, base: str | None, m: Mutation, expect: str, *words: str) -> None:
        C.append(HCase(name, base, m, expect, words))

    # controls: undamaged, and bits a read-only open must accept
    for b in ("plain", "v2", "extl2", "zlib", "zstd"):
        add(f"control_{b}", b, lambda c: None, "ok")
    add("dirty_bit_readonly", "plain", or_field("incompatible_features", 1), "ok")
    add("corrupt_bit_readonly", "plain", or_field("incompatible_features", 2), "ok")
    add("unknown_compatible_bit", "plain", or_field("compatible_features", 1 << 33), "ok")
    add("unknown_autoclear_bit", "plain", or_field("autoclear_features", 1 << 40), "ok")

    # truncated files
    for n in (8, 40, 71, 100, 108):
        add(f"header_cut_{n}", "plain", truncate(lambda c, n=n: n), "refuse")
    add("cut_after_header_cluster", "plain", truncate(lambda c: c.bs.cluster), "refuse")
    add("l1_table_cut", "plain", truncate(lambda c: c.bs.l1 + 4), "refuse")
    add("l2_table_cut", "plain", truncate(lambda c: c.bs.l2 + 12), "fail")
    add("data_cluster_cut", "plain", truncate(lambda c: max(c.bs.data_offsets)), "fail")
    add("compressed_data_cut", "zlib", truncate(lambda c: c.bs.l2 + c.bs.cluster + 100), "fail")

    # table offsets past EOF, unaligned, overlapping
    add("l1_offset_past_eof", "plain",
        set_field("l1_table_offset", lambda c: c.eof_cluster(10)), "refuse")
    add("l1_offset_unaligned", "plain",
        set_field("l1_table_offset", lambda c: c.bs.l1 + 8), "refuse")
    add("l1_offset_huge", "plain", set_field("l1_table_offset", 1 << 62), "refuse")
    add("l1_offset_zero", "plain", set_field("l1_table_offset", 0), "refuse")
    add("refcount_table_past_eof", "plain",
        set_field("refcount_table_offset", lambda c: c.eof_cluster(10)), "refuse")
    add("refcount_table_unaligned", "plain",
        set_field("refcount_table_offset", lambda c: get(c.b, "refcount_table_offset") + 512),
        "refuse")
    add("refcount_table_zero", "plain", set_field("refcount_table_offset", 0), "refuse")
    add("l1_overlaps_refcount_table", "plain",
        set_field("l1_table_offset", lambda c: get(c.b, "refcount_table_offset")), "refuse")
    add("refcount_table_overlaps_l1", "plain",
        set_field("refcount_table_offset", lambda c: c.bs.l1), "refuse")

    # absurd sizes
    add("l1_size_2e31", "plain", set_field("l1_size", 1 << 31), "refuse")
    add("l1_size_max", "plain", set_field("l1_size", 0xFFFFFFFF), "refuse")
    add("l1_size_too_small", "plain", set_field("l1_size", 0), "refuse")
    add("size_2e62", "plain", set_field("size", 1 << 62), "refuse")
    add("size_max", "plain", set_field("size", (1 << 64) - 1), "refuse")
    add("refcount_table_clusters_huge", "plain",
        set_field("refcount_table_clusters", (1 << 31) - 1), "refuse")
    add("refcount_table_clusters_max", "plain",
        set_field("refcount_table_clusters", 0xFFFFFFFF), "refuse")
    add("refcount_table_clusters_zero", "plain", set_field("refcount_table_clusters", 0), "any")
    for bits in (0, 8, 22, 63):
        add(f"cluster_bits_{bits}", "plain", set_field("cluster_bits", bits), "refuse")
    add("cluster_bits_9_reinterpreted", "plain", set_field("cluster_bits", 9), "any")
    add("refcount_order_7", "plain", set_field("refcount_order", 7), "refuse")
    add("nb_snapshots_max", "plain", both(set_field("nb_snapshots", 0xFFFFFFFF),
                                          set_field("snapshots_offset", 65536)), "any")
    add("snapshots_past_eof", "plain", both(set_field("nb_snapshots", 1), set_field(
        "snapshots_offset", lambda c: c.eof_cluster(10))), "any")

    # versions, features, encryption
    for v in (1, 4):
        add(f"version_{v}", "plain", set_field("version", v), "refuse")
    # qemu does not take the qcow2 magic with version 0 for any format: the file probes
    # as raw and is served as raw (tests/interop/test_image_probing.py compares)
    add("version_0", "plain", set_field("version", 0), "any")
    add("bad_magic_still_qcow2_like", "plain", set_field("magic", 0x514649FC), "any")
    add("incompatible_bit_40", "plain", or_field("incompatible_features", 1 << 40),
        "unsupported", "40", "unknown", "incompatible", "0x10000000000")
    add("incompatible_bit_5", "plain", or_field("incompatible_features", 1 << 5),
        "unsupported", "5", "unknown", "incompatible", "0x20")
    add("crypt_method_1_aes", "plain", set_field("crypt_method", 1), "unsupported",
        "encrypt", "aes", "crypt")
    add("crypt_method_2_luks", "plain", set_field("crypt_method", 2), "unsupported",
        "encrypt", "luks", "crypt")
    add("compression_type_unknown", "plain",
        both(or_field("incompatible_features", 1 << 3), set_field("compression_type", 2)),
        "refuse")
    add("data_file_bit_without_name", "plain", or_field("incompatible_features", 1 << 2),
        "refuse")
    add("extended_l2_small_cluster", "extl2",
        set_field("cluster_bits", 12), "refuse")

    # header_length, extensions, backing file name
    for name, hl in (("8", 8), ("105", 105), ("past_cluster", 0x20000),
                     ("max", 0xFFFFFFFF)):
        add(f"header_length_{name}", "plain", set_field("header_length", hl), "refuse")
    add("extension_length_past_cluster", "plain",
        first_extension_length(lambda c: c.bs.cluster), "refuse")
    add("extension_length_max", "plain", first_extension_length(lambda c: 0xFFFFFFF8), "refuse")
    add("backing_name_past_cluster", "plain",
        both(set_field("backing_file_offset", lambda c: c.bs.cluster - 4),
             set_field("backing_file_size", 100)), "refuse")
    add("backing_name_size_max", "plain",
        both(set_field("backing_file_offset", 512), set_field("backing_file_size", 0xFFFFFFFF)),
        "refuse")
    for kind in ("missing", "missing_raw", "self", "loop", "loop3"):
        add(f"backing_{kind}", None, backing(kind), "refuse")

    # snapshot table (opened with snapshot="s1")
    def snap(name: str, m: Mutation, expect: str) -> None:
        C.append(HCase(name, "snap", m, expect, (), "s1"))

    snap("control_snapshot", lambda c: None, "ok")
    snap("snapshot_l1_past_eof", snapshot_entry(0, ">Q", lambda c: c.eof_cluster(10)), "fail")
    snap("snapshot_l1_unaligned",
         snapshot_entry(0, ">Q", lambda c: snapshot_field(c, 0, ">Q") + 8), "fail")
    snap("snapshot_l1_size_huge", snapshot_entry(8, ">I", lambda c: 0xFFFFFFFF), "fail")
    snap("snapshot_extra_data_huge", snapshot_entry(36, ">I", lambda c: 0xFFFFFFF0), "fail")
    snap("snapshot_name_size_huge", snapshot_entry(14, ">H", lambda c: 0xFFFF), "fail")
    snap("snapshot_table_past_eof",
         set_field("snapshots_offset", lambda c: c.eof_cluster(10)), "fail")
    snap("snapshot_table_unaligned",
         set_field("snapshots_offset", lambda c: get(c.b, "snapshots_offset") + 4), "fail")
    snap("snapshot_count_zero", set_field("nb_snapshots", 0), "refuse")

    # external data file missing or short
    add("data_file_missing", None, data_file("missing"), "refuse")
    add("data_file_short", None, data_file("short"), "any")  # qemu reads zeros past its end

    # bad L1 / L2 entries
    add("l1_entry_past_eof", "plain", set_l1_entry(lambda c: COPIED | c.eof_cluster(100)), "fail")
    add("l1_entry_unaligned", "plain", set_l1_entry(lambda c: COPIED | (c.bs.l2 + 512)), "fail")
    add("l1_entry_huge", "plain", set_l1_entry(lambda c: COPIED | OFFSET_MASK & ~0xFFFF), "fail")
    add("l2_entry_past_eof", "plain",
        set_l2_entry(1, lambda c: COPIED | c.eof_cluster(100)), "fail")
    add("l2_entry_unaligned", "plain",
        set_l2_entry(2, lambda c: COPIED | (c.bs.data_offsets[0] + 512)), "fail")
    add("l2_entry_huge", "plain", set_l2_entry(3, lambda c: COPIED | (OFFSET_MASK & ~0xFFFF)),
        "fail")
    add("l2_entry_reserved_bits", "plain",
        set_l2_entry(4, lambda c: u64(c.b, c.l2_entry(4)) | (1 << 57)), "any")
    add("v2_l2_zero_bit", "v2", set_l2_entry(2, lambda c: u64(c.b, c.l2_entry(2)) | 1), "any")
    for b in ("plain", "zlib", "zstd"):
        add(f"compressed_garbage_ff_{b}", b, compressed_garbage(lambda n: b"\xff" * n), "fail")
        add(f"compressed_garbage_random_{b}", b,
            compressed_garbage(lambda n: random.Random(7).randbytes(n)), "any")
        add(f"compressed_past_eof_{b}", b, compressed_garbage(bytes, "eof"), "fail")
    add("compressed_max_sectors", "zlib",
        set_l2_entry(1, lambda c: u64(c.b, c.l2_entry(1)) | (((1 << 62) - 1) & ~(
            (1 << (62 - (get(c.b, "cluster_bits") - 8))) - 1))), "any")
    add("compressed_pointing_at_header", "zlib",
        set_l2_entry(1, lambda c: COMPRESSED | (1 << (62 - (get(c.b, "cluster_bits") - 8)))),
        "fail")
    add("ext_l2_alloc_and_zero", "extl2",
        set_l2_entry(0, lambda c: u64(c.b, c.l2_entry(0)), bitmap=(1 << 32) | 1), "fail")
    add("ext_l2_alloc_without_offset", "extl2", set_l2_entry(9, lambda c: 0, bitmap=0xF), "fail")
    add("ext_l2_all_bits", "extl2",
        set_l2_entry(3, lambda c: u64(c.b, c.l2_entry(3)), bitmap=(1 << 64) - 1), "fail")
    return C


def _random_cases(n: int = 100) -> list[HCase]:
    """Seeded random mutations of the first cluster (header) and of an L2 table."""
    C: list[HCase] = []
    bases = ("plain", "extl2", "zlib", "zstd", "v2")
    for seed in range(n):
        base = bases[seed % len(bases)]
        region = "header" if seed % 2 == 0 else "l2"

        def m(c: Ctx, seed: int = seed, region: str = region) -> None:
            r = random.Random(1000 + seed)
            if region == "header":
                # the header, its extensions and the backing name live in the first 1 KiB
                lo, hi = 4, (1024 if r.random() < 0.3 else 112)
            else:
                lo, hi = c.bs.l2, c.bs.l2 + c.bs.n_entries * c.bs.l2_entry
            for _ in range(r.randint(1, 4)):
                at = r.randrange(lo, hi)
                how = r.random()
                if how < 0.5:
                    c.b[at] = r.randrange(256)
                elif how < 0.8:
                    c.b[at] ^= 1 << r.randrange(8)
                else:  # an extreme 32/64-bit value at an aligned place
                    at &= ~3
                    v = r.choice((0, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0x10000))
                    struct.pack_into(">I", c.b, at, v)

        C.append(HCase(f"random_{region}_{base}_{seed}", base, m, "any"))
    return C


CASES = _cases()
RANDOM_CASES = _random_cases()
ALL_CASES = {c.name: c for c in CASES + RANDOM_CASES}
assert len(ALL_CASES) == len(CASES) + len(RANDOM_CASES), "duplicate case names"


# --------------------------------------------------------------------------------------
# running one case in a bounded child
# --------------------------------------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _describe(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "mro": [f"{k.__module__}.{k.__name__}" for k in type(e).__mro__],
        "msg": str(e),
        "tb": "".join(traceback.format_exception(e)),
    }


def _child(path: str, snapshot: str | None, conn: Connection) -> None:
    limit = _vm_size() + AS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # a forked child starts with zero CPU time: SIGXCPU kills it after CASE_CPU_SECONDS
    resource.setrlimit(resource.RLIMIT_CPU, (CASE_CPU_SECONDS, CASE_CPU_SECONDS + 1))
    result: dict[str, Any]
    try:
        from nbdqcow.image import open_image

        try:
            drv = open_image(path, writable=False, snapshot=snapshot)
        except BaseException as e:  # noqa: BLE001 - every exception is reported
            result = {"stage": "open", **_describe(e)}
        else:
            try:
                size = drv.size
                h = hashlib.sha256()
                if size <= FULL_READ_LIMIT:
                    spans = [(off, min(MiB, size - off)) for off in range(0, size, MiB)]
                else:  # a claimed huge size: sample it
                    r = random.Random(size)
                    spans = [(0, 4 * MiB), (size - MiB, MiB)]
                    spans += [(r.randrange(0, size - 65536), 65536) for _ in range(8)]
                for off, n in spans:
                    data = drv.pread(off, n)
                    assert len(data) == n, f"short read at {off}: {len(data)} of {n}"
                    h.update(data)
                result = {"stage": "ok", "size": size, "sha": h.hexdigest(),
                          "full": size <= FULL_READ_LIMIT}
            except BaseException as e:  # noqa: BLE001
                result = {"stage": "read", **_describe(e)}
            finally:
                try:
                    drv.close()
                except BaseException as e:  # noqa: BLE001
                    if result.get("stage") == "ok":
                        result = {"stage": "close", **_describe(e)}
    except BaseException as e:  # noqa: BLE001 - e.g. the engine failed to import
        result = {"stage": "import", **_describe(e)}
    conn.send(result)
    conn.close()


def run_case(path: Path, snapshot: str | None = None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(path), snapshot, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(CASE_WALL_TIMEOUT):
            pytest.fail(f"open + read of {path.name} blocked for {CASE_WALL_TIMEOUT} s (hang)")
        try:
            result: dict[str, Any] = parent.recv()
        except EOFError:
            proc.join(5)
            if proc.exitcode == -signal.SIGXCPU:
                pytest.fail(f"open + read of {path.name} used more than {CASE_CPU_SECONDS} s "
                            "of CPU (unbounded work?)")
            pytest.fail(f"the engine died reading {path.name} (exit code {proc.exitcode})")
        return result
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()


NBDQCOW_ERROR = "nbdqcow.errors.NbdqcowError"
OPEN_ERRORS = ("nbdqcow.errors.ImageOpenError", "nbdqcow.errors.CorruptImage")
UNSUPPORTED = "nbdqcow.errors.UnsupportedFeature"


def check_result(case: HCase, res: dict[str, Any], ref_sha: str | None) -> None:
    stage = res["stage"]
    where = f"{case.name}: {stage}"
    if stage == "import":
        pytest.fail(f"engine not importable: {res['tb']}")
    if stage in ("open", "read", "close"):
        allowed = OPEN_ERRORS if stage == "open" else (NBDQCOW_ERROR,)
        assert any(a in res["mro"] for a in allowed), (
            f"{where} raised {res['type']} (not one of {allowed}):\n{res['tb']}"
        )
        msg = res["msg"]
        assert msg.strip() and "\n" not in msg.strip(), f"{where}: message not one line: {msg!r}"
    if case.expect == "ok":
        assert stage == "ok", f"{case.name} must open and read, got {res.get('tb', res)}"
        assert res["full"] and ref_sha and res["sha"] == ref_sha, (
            f"{case.name}: read data differs from qemu's read of the undamaged image"
        )
    elif case.expect in ("refuse", "unsupported"):
        assert stage == "open", f"{case.name} must be refused at open, got {res}"
        if case.expect == "unsupported":
            assert UNSUPPORTED in res["mro"], f"{case.name}: want UnsupportedFeature, got {res}"
            low = res["msg"].lower()
            assert any(w in low for w in case.words), (
                f"{case.name}: message {res['msg']!r} names none of {case.words}"
            )
    elif case.expect == "fail":
        assert stage in ("open", "read"), f"{case.name} must fail at open or on read, got {res}"


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hostile_bases(tmp_path_factory: pytest.TempPathFactory, qemu_tools: None) -> dict[str, Base]:
    return _build_bases(tmp_path_factory.mktemp("hostile_bases"))


def make_case(case: HCase, bases: dict[str, Base], d: Path) -> Path:
    ctx = Ctx(bases[case.base] if case.base else None, d)
    case.mutate(ctx)
    if ctx.buf is not None:
        ctx.path.write_bytes(bytes(ctx.buf))
    return ctx.path


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_and_check(case: HCase, bases: dict[str, Base], d: Path, path: Path) -> None:
    shas = {p.name: file_sha(p) for p in d.iterdir()}
    res = run_case(path, case.snapshot)
    ref = None
    if case.base:
        base = bases[case.base]
        ref = base.snap_ref_sha if case.snapshot else base.ref_sha
    check_result(case, res, ref)
    assert {p.name: file_sha(p) for p in d.iterdir()} == shas, (
        f"{case.name}: a read-only open changed the files"
    )


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_hostile_image(name: str, hostile_bases: dict[str, Base], tmp_path: Path) -> None:
    case = ALL_CASES[name]
    path = make_case(case, hostile_bases, tmp_path)
    if case.base and case.expect != "ok":
        assert path.read_bytes() != hostile_bases[case.base].data, "test setup: no mutation"
    _run_and_check(case, hostile_bases, tmp_path, path)


@pytest.mark.parametrize("name", [c.name for c in RANDOM_CASES])
def test_random_mutation(name: str, hostile_bases: dict[str, Base], tmp_path: Path) -> None:
    case = ALL_CASES[name]
    path = make_case(case, hostile_bases, tmp_path)
    if case.base and path.read_bytes() == hostile_bases[case.base].data:
        pytest.skip("this seed's mutation left the image unchanged")
    _run_and_check(case, hostile_bases, tmp_path, path)


CLI_CASES = [c.name for c in CASES if c.expect in ("refuse", "unsupported") and not c.snapshot]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdqcow", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONFAULTHANDLER": "0"},
    )


def assert_clean_cli(proc: subprocess.CompletedProcess[str], must_fail: bool) -> None:
    """Exit 0, or exit 1 with exactly one line on stderr; never a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    if must_fail or proc.returncode != 0:
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr: {proc.stderr!r}"


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_info_one_line_error(
    name: str, hostile_bases: dict[str, Base], tmp_path: Path
) -> None:
    """``nbdqcow info`` describes the header like ``qemu-img info`` (which opens neither the
    backing chain nor the L1 table): where qemu-img info fails it must fail with one line;
    elsewhere it may describe the image or fail with one line."""
    path = make_case(ALL_CASES[name], hostile_bases, tmp_path)
    shas = {p.name: file_sha(p) for p in tmp_path.iterdir()}
    qemu = imagegen.qemu_img("info", str(path), check=False)
    assert_clean_cli(run_cli("info", str(path)), must_fail=qemu.returncode != 0)
    assert {p.name: file_sha(p) for p in tmp_path.iterdir()} == shas


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_map_one_line_error(
    name: str, hostile_bases: dict[str, Base], tmp_path: Path
) -> None:
    """``nbdqcow map`` opens the image like the engine does: these images are refused."""
    path = make_case(ALL_CASES[name], hostile_bases, tmp_path)
    shas = {p.name: file_sha(p) for p in tmp_path.iterdir()}
    assert_clean_cli(run_cli("map", "--output=json", str(path)), must_fail=True)
    assert {p.name: file_sha(p) for p in tmp_path.iterdir()} == shas
