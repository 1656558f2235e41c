"""block/uring.py: reads through io_uring land the file's bytes in the buffers given,
report short reads and errors, never more in flight than the ring holds, and close()
waits for what is in flight."""

from __future__ import annotations

import errno
import os
import random
import select
from pathlib import Path

import pytest

from nbdqcow.block.uring import Ring, open_ring


@pytest.fixture
def ring() -> Ring:
    r = open_ring(32)
    if r is None:
        pytest.skip("io_uring is not usable here (kernel, sysctl, seccomp or not x86-64)")
    return r


def wait_all(r: Ring, results: dict[int, int], want: int) -> None:
    while len(results) < want:
        assert select.select([r], [], [], 5)[0], "no completion within 5 s"
        r.reap()


def test_reads_land_the_files_bytes(tmp_path: Path, ring: Ring) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # some reads wait for the disk
        rnd = random.Random(7)
        for _ in range(3):
            results: dict[int, int] = {}
            bufs: list[tuple[int, bytearray]] = []
            for i in range(32):
                n = rnd.choice([1, 512, 4096, 5000, 65536, 1 << 20])
                off = rnd.randrange(0, len(data) - n)
                buf = bytearray(b"\xee" * n)
                bufs.append((off, buf))
                assert ring.read(fd, buf, off, lambda res, i=i, got=results: got.__setitem__(i, res))
            # the ring is full: nothing more is queued
            assert not ring.read(fd, bytearray(1), 0, lambda res: None)
            assert ring.busy == 32
            ring.submit()
            wait_all(ring, results, 32)
            assert ring.busy == 0
            for i, (off, buf) in enumerate(bufs):
                assert results[i] == len(buf)
                assert buf == data[off : off + len(buf)]
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        ring.close()
        os.close(fd)


def test_short_reads_and_errors_are_reported(tmp_path: Path, ring: Ring) -> None:
    path = tmp_path / "g"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    bad = os.open(tmp_path, os.O_RDONLY)  # a directory: reading it fails with EISDIR
    try:
        results: dict[int, int] = {}
        assert ring.read(fd, bytearray(8192), 8192, lambda res: results.__setitem__(0, res))
        assert ring.read(bad, bytearray(10), 0, lambda res: results.__setitem__(1, res))
        ring.submit()
        wait_all(ring, results, 2)
        assert results[0] == 10000 - 8192
        assert results[1] == -errno.EISDIR
    finally:
        ring.close()
        os.close(fd)
        os.close(bad)


def test_close_waits_for_reads_in_flight(tmp_path: Path, ring: Ring) -> None:
    path = tmp_path / "h"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bufs = [bytearray(65536) for _ in range(16)]
        for i, buf in enumerate(bufs):
            assert ring.read(fd, buf, i * 65536, lambda res: None)
        ring.submit()
        ring.close()  # returns once the kernel is done with every buffer
        assert ring.fd == -1 and ring.busy == 0
        assert b"".join(bufs) == data
        assert not ring.read(fd, bytearray(1), 0, lambda res: None)  # closed: refused
    finally:
        os.close(fd)
