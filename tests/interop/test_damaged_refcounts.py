"""Lenient where qemu is: images whose refcount table or refcount blocks are damaged but
whose data qemu serves fine.  Reads and block status do not depend on refcounts (only
writes that allocate do), so the server must serve the very bytes `qemu-img convert`
reads, answer large READs and BLOCK_STATUS (the metadata-preallocation heuristic behind
block status reads refcounts and must answer "not preallocated" when it cannot), and
`nbdinfo --map` must work.  No Python traceback for any of them.

The images are made by qemu-img / qemu-io and then byte-patched.
"""

from __future__ import annotations

import errno
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import imagegen
import pytest
from tooling import ServerFactory, require_tool

from nbdqcow.errors import RemoteError
from nbdqcow.nbdclient.sync import SyncClient

MiB = 1 << 20
CLUSTER = 65536
SIZE = 8 * MiB

Patch = Callable[[bytearray], None]


def _reftable_offset(b: bytearray) -> int:
    return int(struct.unpack_from(">Q", b, 48)[0])


def _set_reftable_entry(value: Callable[[bytearray], int]) -> Patch:
    def patch(b: bytearray) -> None:
        struct.pack_into(">Q", b, _reftable_offset(b), value(b))
    return patch


def _refblock(b: bytearray) -> int:
    return int(struct.unpack_from(">Q", b, _reftable_offset(b))[0])


def _fill_refblock(byte: int) -> Patch:
    def patch(b: bytearray) -> None:
        off = _refblock(b)
        b[off : off + CLUSTER] = bytes([byte]) * CLUSTER
    return patch


def _garbage_reftable(b: bytearray) -> None:
    off = _reftable_offset(b)
    b[off : off + CLUSTER] = random.Random(7).randbytes(CLUSTER)


CASES: dict[str, Patch] = {
    "refblock_past_eof": _set_reftable_entry(lambda b: (len(b) + (1 << 40)) & ~(CLUSTER - 1)),
    "refblock_unaligned": _set_reftable_entry(lambda b: _refblock(b) + 512),
    "refblock_offset_huge": _set_reftable_entry(lambda b: 0xFFFF_FFFF_FFFF_0000),
    "refblock_offset_2e63": _set_reftable_entry(lambda b: 1 << 63),
    "refblock_missing": _set_reftable_entry(lambda b: 0),
    "refblock_is_l1": _set_reftable_entry(lambda b: int(struct.unpack_from(">Q", b, 40)[0])),
    "refblock_all_ones": _fill_refblock(0xFF),
    "refblock_all_zero": _fill_refblock(0x00),
    "reftable_garbage": _garbage_reftable,
}


def _make(path: Path, patch: Patch) -> None:
    imagegen.create(path, SIZE, opts={"cluster_size": str(CLUSTER)})
    imagegen.qemu_io(path, [
        "write -P 0xa1 0 3M",  # one large run: a 2 MiB READ lies inside it
        "write -P 0xb2 4M 100k",
        "write -z 5M 128k",
        "write -P 0xc3 7M 64k",
    ])
    b = bytearray(path.read_bytes())
    patch(b)
    path.write_bytes(b)


@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_refcounts_served_like_qemu(nbdqcow_server: ServerFactory, tmp_path: Path,
                                            case: str, writable: bool) -> None:
    require_tool("qemu-img")
    nbdinfo = require_tool("nbdinfo")
    image = tmp_path / "img.qcow2"
    _make(image, CASES[case])
    expected = imagegen.convert_to_raw(image, tmp_path / "ref.raw")  # qemu serves it
    served = nbdqcow_server(image, "-f", "qcow2", "-t", *(() if writable else ("-r",)))
    with SyncClient(served.uri) as c:
        assert c.pread(512 * 1024, 2 * MiB) == expected[512 * 1024 : 512 * 1024 + 2 * MiB]
        extents = c.block_status(0, SIZE)
        assert extents
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == expected
    m = subprocess.run([nbdinfo, "--map", served.uri], capture_output=True, text=True,
                       timeout=60)
    assert m.returncode == 0, m.stderr
    assert "data" in m.stdout
    assert served.stop() == 0
    log = served.log.read_text()
    assert "Traceback" not in log, log


# damage that makes the allocator's view wrong: a write that needs a new cluster must
# fail (EIO) instead of trusting it, and must not change what reads return
STRICT_ON_WRITE = ("refblock_past_eof", "refblock_unaligned", "refblock_offset_huge",
                   "refblock_offset_2e63", "refblock_is_l1", "reftable_garbage")


@pytest.mark.parametrize("case", STRICT_ON_WRITE)
def test_allocating_write_refused_on_damaged_refcounts(nbdqcow_server: ServerFactory,
                                                       tmp_path: Path, case: str) -> None:
    require_tool("qemu-img")
    image = tmp_path / "img.qcow2"
    _make(image, CASES[case])
    expected = imagegen.convert_to_raw(image, tmp_path / "ref.raw")
    served = nbdqcow_server(image, "-f", "qcow2", "-t")
    with SyncClient(served.uri) as c:
        with pytest.raises(RemoteError) as e:
            c.pwrite(b"\x77" * CLUSTER, 6 * MiB)  # unallocated: needs a new cluster
        assert e.value.code == errno.EIO
        assert c.pread(0, SIZE) == expected
    assert served.stop() == 0
    assert "Traceback" not in served.log.read_text()
    assert imagegen.convert_to_raw(image, tmp_path / "after.raw") == expected
