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
