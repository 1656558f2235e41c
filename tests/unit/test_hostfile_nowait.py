"""HostFile.preadinto(nowait=True): page-cache data only, WouldBlock otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import WouldBlock


def test_nowait_read_misses_dropped_pages_and_hits_cached_ones(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    f = HostFile(str(path), writable=False)
    try:
        os.fsync(f.fd)
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
        buf = bytearray(256 * 1024)
        with pytest.raises(WouldBlock):
            f.preadinto(memoryview(buf), 512 * 1024, nowait=True)
        f.preadinto(memoryview(buf), 512 * 1024)  # waits: now cached
        buf2 = bytearray(len(buf))
        f.preadinto(memoryview(buf2), 512 * 1024, nowait=True)
        assert buf == buf2 == data[512 * 1024 : 768 * 1024]
        # at the end of the file a nowait read is short: it asks for a blocking retry
        with pytest.raises(WouldBlock):
            f.preadinto(memoryview(bytearray(8192)), len(data) - 4096, nowait=True)
        tail = bytearray(b"\xff" * 8192)
        f.preadinto(memoryview(tail), len(data) - 4096)
        assert tail == data[-4096:] + bytes(4096)
    finally:
        f.close()


def test_cachestat_tells_cached_ranges(tmp_path: Path) -> None:
    from nbdqcow.block.cachestat import cached

    path = tmp_path / "g"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cached(fd, 4096 + 5, 300000) is True  # just written: in the page cache
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert cached(fd, 0, 1 << 20) is False
        os.pread(fd, 8192, 0)  # one page... and the readahead after it
        assert cached(fd, 0, 4096) is True
    finally:
        os.close(fd)


def test_a_file_system_without_rwf_nowait_says_so() -> None:
    """tmpfs (no RWF_NOWAIT on this kernel) answers NowaitUnsupported, not a miss: the
    server then reads such files on the event loop instead of in threads."""
    import tempfile

    from nbdqcow.errors import NowaitUnsupported

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as t:
        t.write(b"\x07" * 8192)
        t.flush()
        f = HostFile(t.name, writable=False)
        try:
            buf = bytearray(4096)
            try:
                f.preadinto(memoryview(buf), 4096, nowait=True)
            except NowaitUnsupported:
                pass  # the file system cannot tell (the data is cached: it was written)
            else:
                assert buf == b"\x07" * 4096  # this kernel's tmpfs supports it
        finally:
            f.close()


def test_qcow2_nowait_reads_never_load_l2_tables(tmp_path: Path) -> None:
    """On the event loop (nowait) a qcow2 read whose L2 table is not in memory raises
    WouldBlock and host_extent says None, even with the data in the page cache: loading
    the table would read the file there.  A blocking read loads it; then both work."""
    import subprocess

    from tooling import require_tool

    from nbdqcow.qcow2 import layout as L
    from nbdqcow.qcow2.driver import Qcow2Driver

    require_tool("qemu-img")
    require_tool("qemu-io")
    img = tmp_path / "d.qcow2"
    # 4 KiB clusters: one L2 table maps 2 MiB, so these writes use several tables
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(img), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k",
                    "-c", "write -P 0x6b 9M 64k", str(img)], check=True, capture_output=True)
    d = Qcow2Driver.open(str(img), writable=False, backing=lambda *a, **k: None)
    try:
        os.pread(d.file.fd, 1 << 24, 0)  # the whole file in the page cache
        d.l2_cache.clear()
        buf = bytearray(4096)
        with pytest.raises(WouldBlock):
            d.preadinto(9 << 20, memoryview(buf), nowait=True)
        assert d.host_extent(9 << 20, 4096) is None
        assert not d.l2_cache.in_memory(d.l1[(9 << 20) >> d._l1_shift] & L.L1E_OFFSET_MASK)
        assert d.pread(9 << 20, 4096) == b"\x6b" * 4096  # blocking: loads the table
        d.preadinto(9 << 20, memoryview(buf), nowait=True)
        assert buf == b"\x6b" * 4096
        assert d.host_extent(9 << 20, 4096) is not None
        # a range whose L2 table is not allocated at all needs no table: zeros at once
        d.preadinto(5 << 20, memoryview(buf), nowait=True)
        assert buf == bytes(4096)
    finally:
        d.close()
