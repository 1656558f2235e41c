"""Build qcow2 test images with the reference tools (qemu-img, qemu-io) at test time.

Every image of the differential matrix is described by a :class:`Case`: a name and a
builder that makes the image (and its backing / data files) in a directory and returns
the path of the top image.  Contents are written by qemu-io with distinct patterns,
unaligned partial-cluster writes, zero writes (with and without unmap), discards and
writes that cross cluster and L2-table boundaries.  Nothing here knows about nbdqcow:
these helpers only drive qemu.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
KiB = 1024

TOOL_TIMEOUT = 60


# --------------------------------------------------------------------------------------
# running the tools
# --------------------------------------------------------------------------------------
def run(argv: Sequence[str], *, check: bool = True, cwd: str | os.PathLike[str] | None = None,
        core: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a reference tool; raise with its stderr when it fails and ``check`` is set."""

    def _no_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=cwd,
        preexec_fn=None if core else _no_core,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
    return proc


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["qemu-img", *map(str, args)], check=check)


def qemu_io(path: str | os.PathLike[str], cmds: Sequence[str], fmt: str = "qcow2",
            check: bool = True, core: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands (all in one process, in order) on ``path``."""
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    proc = run(argv, check=check, core=core)
    # qemu-io reports failed commands on stdout/stderr but may still exit 0
    if check and ("failed" in proc.stdout or "error" in proc.stderr.lower()):
        raise RuntimeError(f"qemu-io {cmds} on {path}: {proc.stdout}{proc.stderr}")
    return proc


def create(path: Path, size: int, *, fmt: str = "qcow2", opts: dict[str, str] | None = None,
           backing: Path | None = None, backing_fmt: str | None = None) -> Path:
    args: list[str] = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    args += [str(path), str(size)]
    qemu_img(*args)
    return path


def convert_to_raw(path: Path, out: Path, snapshot: str | None = None) -> bytes:
    """The reference read: ``qemu-img convert -O raw`` (optionally of an internal snapshot)."""
    args: list[str] = ["convert"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    args += ["-O", "raw", str(path), str(out)]
    qemu_img(*args)
    data = out.read_bytes()
    out.unlink()
    return data


def settle(folder: Path) -> None:
    """Write back and drop the page cache of every file in ``folder``.  SEEK_DATA counts
    cached pages of an unwritten (fallocated) extent as data: a map taken before and one
    taken after the kernel evicts such pages (memory pressure, another test reading the
    file) would differ with no change to the image.  Call it before each map compared."""
    for f in folder.iterdir():
        if f.is_file():
            evict(f)


def evict(path: Path) -> None:
    """Write back the file's dirty pages, then drop all its pages from the page cache
    (its next reads go to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_clean(img: Path) -> dict[str, Any]:
    """``qemu-img check --output=json``: exit 0, no leaks, no corruptions; its figures."""
    res = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                         text=True, timeout=60)
    data: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == 0 and not data.get("leaks") and not data.get("corruptions"), data
    return data


def qemu_map_json(path: Path) -> list[dict[str, object]]:
    settle(path.parent)
    proc = qemu_img("map", "--output=json", str(path))
    result = json.loads(proc.stdout)
    assert isinstance(result, list)
    return result


def l2_coverage(cluster_size: int, extended_l2: bool = False) -> int:
    """Guest bytes one L2 table maps (spec: cluster_size / entry size clusters)."""
    entry = 16 if extended_l2 else 8
    return (cluster_size // entry) * cluster_size


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------
# fill scripts
# --------------------------------------------------------------------------------------
def fill_commands(size: int, cluster: int, *, extended_l2: bool = False, base: int = 0x10,
                  compressed_writes: bool = False) -> list[str]:
    """qemu-io commands exercising the interesting cases in an image of ``size`` bytes.

    Positions are in units ``u`` (one cluster, or less when the image is small compared
    with the cluster) so every script stays inside the image.  ``base`` shifts the
    patterns so that layers of a chain hold distinct bytes.
    """
    u = min(cluster, size // 32)
    p = [(base + i * 0x11) & 0xFF or 0x5A for i in range(16)]
    cmds = [
        f"write -P {p[0]:#x} 0 {u}",  # one full unit
        f"write -P {p[1]:#x} {u + 100} {u}",  # unaligned, spans a boundary
        f"write -P {p[2]:#x} {3 * u - 7} 13",  # tiny, crosses a boundary
        f"write -P {p[3]:#x} {5 * u + 3} 777",  # partial, inside one unit
        f"write -P {p[4]:#x} {6 * u} {2 * u}",
        f"write -z {6 * u} {u}",  # zero write over data, no unmap
        f"write -z -u {7 * u} {u}",  # zero write over data, unmap allowed
        f"write -P {p[5]:#x} {8 * u} {3 * u}",
        f"discard {8 * u} {u}",  # aligned discard of data
        f"discard {9 * u + u // 2} {u}",  # unaligned discard: partial units
        f"write -z {11 * u + 5} {u + 1000}",  # unaligned zero write
        f"write -z -u {13 * u} {u}",  # zero write over unallocated space
        f"write -P {p[6]:#x} {14 * u + u // 3} {u // 3}",
        f"write -P {p[7]:#x} {size // 2 + 1234} {3 * u}",  # middle of the image
        f"write -P {p[8]:#x} {size - u - 1} {u + 1}",  # last bytes of the image
    ]
    if compressed_writes:
        cmds += [
            f"write -c -P {p[9]:#x} {16 * u} {cluster}",
            f"write -P {p[10]:#x} {16 * u + 1000} 3000",  # partial write into it
            f"write -c -P {p[11]:#x} {18 * u} {cluster}",
        ]
    l2 = l2_coverage(cluster, extended_l2)
    if l2 * 2 < size:  # writes across L2-table boundaries
        cmds += [
            f"write -P {p[12]:#x} {l2 - u // 2 - 3} {u + 6}",
            f"write -P {p[13]:#x} {2 * l2 - 1} 2",
            f"write -z {l2 + u} {l2}",
            f"write -P {p[14]:#x} {l2 + 2 * u} {u}",
        ]
    return cmds


def overlay_commands(size: int, cluster: int, base: int) -> list[str]:
    """Writes for an upper layer of a chain: hit backing data partially and past its end."""
    u = min(cluster, size // 32)
    return [
        f"write -P {base:#x} {u // 2} {u}",  # partial units over backing data
        f"write -P {base + 1:#x} {4 * u + 17} 100",
        f"write -z {6 * u + 512} {u}",  # zeros over backing data, partial units
        f"discard {9 * u} {2 * u}",  # discard over backing data
        f"write -z -u {12 * u} {2 * u}",
        f"write -P {base + 2:#x} {size - 3 * u - 100} {u}",  # where the backing is short
    ]


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    snapshots: tuple[str, ...] = field(default=())  # snapshot names/ids to compare too


def _plain(size: int, opts: dict[str, str], extended_l2: bool = False,
           compressed_writes: bool = False) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = create(d / "img.qcow2", size, opts=opts)
        cluster = int(opts.get("cluster_size", 65536))
        qemu_io(img, fill_commands(size, cluster, extended_l2=extended_l2,
                                   compressed_writes=compressed_writes))
        return img

    return build


def _chain_qcow2_raw(d: Path) -> Path:
    """qcow2 (8 MiB) over a raw file (3 MiB + a bit: not a cluster multiple)."""
    base = d / "base.raw"
    base.write_bytes(b"")
    os.truncate(base, 3 * MiB + 4096 + 512)
    qemu_io(base, fill_commands(3 * MiB, 65536, base=0x30)[:-1], fmt="raw")
    top = create(d / "top.qcow2", 8 * MiB, backing=base, backing_fmt="raw")
    qemu_io(top, overlay_commands(8 * MiB, 65536, 0xA0))
    return top


def _chain_depth2(d: Path) -> Path:
    """qcow2 (8 MiB) over qcow2 (6 MiB, 4k clusters) over raw (2 MiB)."""
    base = d / "base.raw"
    base.write_bytes(random_bytes(1, 2 * MiB))
    mid = create(d / "mid.qcow2", 6 * MiB, opts={"cluster_size": "4096"}, backing=base,
                 backing_fmt="raw")
    qemu_io(mid, overlay_commands(6 * MiB, 4096, 0x40) + [
        f"write -P 0x47 {3 * MiB} {64 * KiB}",
    ])
    top = create(d / "top.qcow2", 8 * MiB, backing=mid, backing_fmt="qcow2")
    qemu_io(top, overlay_commands(8 * MiB, 65536, 0xB0))
    return top


def _chain_v2(d: Path) -> Path:
    """Version 2 overlay (no zero flag: discards expose the backing file) over qcow2."""
    base = create(d / "base.qcow2", 4 * MiB, opts={"compat": "0.10"})
    qemu_io(base, fill_commands(4 * MiB, 65536, base=0x21))
    top = create(d / "top.qcow2", 8 * MiB, opts={"compat": "0.10"}, backing=base)
    qemu_io(top, overlay_commands(8 * MiB, 65536, 0xC0))
    return top


def _chain_ext_l2(d: Path) -> Path:
    """Extended-L2 overlay over raw: subclusters fall through to the backing file."""
    base = d / "base.raw"
    base.write_bytes(random_bytes(2, 4 * MiB))
    top = create(d / "top.qcow2", 4 * MiB, opts={"extended_l2": "on", "cluster_size": "65536"},
                 backing=base, backing_fmt="raw")
    qemu_io(top, [
        "write -P 0xd1 0 2048",  # one subcluster (64k / 32)
        "write -P 0xd2 4000 10000",  # partial subclusters
        f"write -P 0xd3 {64 * KiB + 2048 * 5} {2048 * 7}",
        f"write -z {128 * KiB + 2048} {2048 * 3}",
        f"write -z -u {192 * KiB} {64 * KiB}",
        f"discard {64 * KiB + 2048 * 6} {2048 * 2}",
        f"write -P 0xd4 {1 * MiB - 1000} 5000",
    ])
    return top


def _compressed(compression: str, cluster: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        size = max(4 * MiB, 10 * cluster)
        src = d / "src.raw"
        # mix of compressible patterns, incompressible random data, zeros, partial units
        buf = bytearray(size)
        rng = random.Random(3)
        for i in range(size // cluster):
            kind = i % 5
            off = i * cluster
            if kind == 0:
                buf[off:off + cluster] = bytes([i & 0xFF]) * cluster
            elif kind == 1:
                buf[off:off + cluster] = rng.randbytes(cluster)
            elif kind == 2:
                pass  # zeros
            elif kind == 3:
                buf[off + 100:off + 300] = rng.randbytes(200)
            else:
                buf[off:off + cluster] = (b"nbdqcow %d " % i) * (cluster // 16) + bytes(
                    cluster - (cluster // 16) * len(b"nbdqcow %d " % i))
        src.write_bytes(bytes(buf))
        img = d / "img.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o",
                 f"compression_type={compression},cluster_size={cluster}", str(src), str(img))
        src.unlink()
        # partial rewrites of compressed clusters, and more compressed writes
        qemu_io(img, [
            f"write -P 0xe1 {cluster + 10} 100",
            f"write -z {3 * cluster} {cluster}",
            f"discard {5 * cluster} {cluster}",
            f"write -c -P 0xe2 {7 * cluster} {cluster}",  # a zero (unallocated) cluster
        ])
        return img

    return build


def _data_file(raw: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        opts = {"data_file": str(d / "data.raw")}
        if raw:
            opts["data_file_raw"] = "on"
        img = create(d / "img.qcow2", 8 * MiB, opts=opts)
        qemu_io(img, fill_commands(8 * MiB, 65536))
        return img

    return build


def _chain_relative(d: Path) -> Path:
    """Backing names relative to the image's folder (not to the current directory)."""
    sub = d / "sub"
    sub.mkdir()
    base = sub / "base.raw"
    base.write_bytes(random_bytes(4, 1 * MiB + 512))
    mid = sub / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "2M")
    qemu_io(mid, ["write -P 0x51 65536 4096", "discard 131072 65536"])
    top = sub / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top), "4M")
    qemu_io(top, ["write -P 0x52 100 1000", f"write -P 0x53 {3 * MiB} 4096"])
    return top


def _preallocated(mode: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = create(d / "img.qcow2", 4 * MiB, opts={"preallocation": mode})
        qemu_io(img, fill_commands(4 * MiB, 65536, base=0x71))
        return img

    return build


def _snapshots_v2(d: Path) -> Path:
    """Two snapshots in a version-2 image, both differing from the active layer."""
    img = create(d / "img.qcow2", 4 * MiB, opts={"compat": "0.10"})
    qemu_io(img, fill_commands(4 * MiB, 65536, base=0x81))
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, ["write -P 0x8a 0 100000", "write -z 262144 65536", "discard 524288 131072"])
    qemu_img("snapshot", "-c", "s2", str(img))
    qemu_io(img, ["write -P 0x8b 50000 200000", f"write -P 0x8c {3 * MiB} 65536"])
    return img


def _snapshot(d: Path) -> Path:
    img = create(d / "img.qcow2", 8 * MiB, opts={"cluster_size": "4096"})
    qemu_io(img, fill_commands(8 * MiB, 4096, base=0x61))
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, overlay_commands(8 * MiB, 4096, 0x90) + [
        "write -P 0x97 0 12288",
        "discard 65536 65536",
    ])
    return img


def _lazy_dirty(d: Path) -> Path:
    """lazy_refcounts image left dirty: qemu-io aborts before closing it."""
    img = create(d / "img.qcow2", 4 * MiB, opts={"lazy_refcounts": "on"})
    qemu_io(img, fill_commands(4 * MiB, 65536))
    proc = qemu_io(img, ["write -P 0x7e 65536 131072", "write -P 0x7f 3000000 1000", "abort"],
                   check=False, core=False)
    assert proc.returncode != 0, "qemu-io abort should kill qemu-io"
    return img


CASES: tuple[Case, ...] = (
    Case("v2_c64k", _plain(8 * MiB, {"compat": "0.10"})),
    Case("v3_c512", _plain(4 * MiB, {"cluster_size": "512"})),
    Case("v3_c4k", _plain(8 * MiB, {"cluster_size": "4096"})),
    Case("v3_c64k", _plain(8 * MiB, {"cluster_size": "65536"}, compressed_writes=True)),
    Case("v3_c2M", _plain(16 * MiB, {"cluster_size": str(2 * MiB)})),
    Case("v2_c512", _plain(4 * MiB, {"compat": "0.10", "cluster_size": "512"})),
    Case("refcount1", _plain(4 * MiB, {"refcount_bits": "1", "cluster_size": "4096"})),
    Case("refcount64", _plain(4 * MiB, {"refcount_bits": "64"})),
    Case("ext_l2_c64k", _plain(8 * MiB, {"extended_l2": "on", "cluster_size": "65536"},
                               extended_l2=True)),
    Case("ext_l2_c32k", _plain(8 * MiB, {"extended_l2": "on", "cluster_size": "32768"},
                               extended_l2=True, compressed_writes=True)),
    Case("chain_qcow2_raw", _chain_qcow2_raw),
    Case("chain_depth2", _chain_depth2),
    Case("chain_v2", _chain_v2),
    Case("chain_ext_l2", _chain_ext_l2),
    Case("compressed_zlib", _compressed("zlib", 65536)),
    Case("compressed_zstd", _compressed("zstd", 65536)),
    Case("compressed_zlib_c4k", _compressed("zlib", 4096)),
    Case("compressed_zlib_c512", _compressed("zlib", 512)),
    Case("compressed_zstd_c2M", _compressed("zstd", 2 * MiB)),
    Case("chain_relative_names", _chain_relative),
    Case("prealloc_metadata", _preallocated("metadata")),
    Case("prealloc_falloc", _preallocated("falloc")),
    Case("prealloc_full", _preallocated("full")),
    Case("data_file", _data_file(False)),
    Case("data_file_raw", _data_file(True)),
    Case("snapshot", _snapshot, snapshots=("s1",)),
    Case("snapshots_v2", _snapshots_v2, snapshots=("s1", "s2")),
    Case("lazy_refcounts", _plain(4 * MiB, {"lazy_refcounts": "on"})),
    Case("lazy_dirty", _lazy_dirty),
)

CASES_BY_NAME = {c.name: c for c in CASES}
