"""Cold READs (data not in the page cache): once a read has waited for the disk, the
server reads through io_uring (or worker threads where io_uring is unusable) with many
requests in flight; every reply must carry the image's bytes, small and large, simple
and structured, answered out of order."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from imagegen import evict
from tooling import ServerFactory, require_tool

from nbdqcow.block.uring import open_ring

MiB = 1 << 20
SIZE = 24 * MiB


def make(tmp_path: Path) -> tuple[Path, bytes]:
    raw = tmp_path / "ref.raw"
    data = bytearray(os.urandom(SIZE))
    data[8 * MiB : 9 * MiB] = bytes(MiB)  # a zero MiB: a hole in structured replies
    raw.write_bytes(data)
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "0",
                    str(raw), str(img)], check=True)
    return img, bytes(data)


def io_urings(pid: int) -> int:
    """io_uring descriptors of ``pid`` (uvloop's libuv may hold one of its own)."""
    fds = Path(f"/proc/{pid}/fd")
    n = 0
    for fd in os.listdir(fds):
        try:
            n += "io_uring" in os.readlink(fds / fd)
        except FileNotFoundError:  # closed meanwhile
            pass
    return n


def cold_reads(nbd: Any, uri: str, structured: bool, img: Path, ref: bytes) -> None:
    h: Any = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    rnd = random.Random(3)
    try:
        for _ in range(3):
            evict(img)
            reqs = []
            for i in range(64):
                n = rnd.choice([512, 4096, 4096, 65536, MiB + 4096]) if i else 4096
                off = rnd.randrange(0, SIZE - n)
                if i % 7 == 3:
                    off = 8 * MiB + 4096 * rnd.randrange(0, 16)  # in the zero MiB
                buf = nbd.Buffer(n)
                h.aio_pread(buf, off)
                reqs.append((off, n, buf))
            while h.aio_in_flight():
                h.poll(-1)
            for off, n, buf in reqs:
                assert buf.to_bytearray() == ref[off : off + n], (off, n)
    finally:
        h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_cold_reads_in_flight_return_the_image(
        tmp_path: Path, structured: bool, nbdqcow_server: ServerFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("qemu-img")
    nbd = pytest.importorskip("nbd")
    img, ref = make(tmp_path)
    rings = {}
    for uring in ("1", "0"):  # io_uring, then worker threads
        monkeypatch.setenv("NBDQCOW_URING", uring)
        srv = nbdqcow_server(img, "-f", "qcow2", "-r", "-t")
        cold_reads(nbd, srv.uri, structured, img, ref)
        rings[uring] = io_urings(srv.proc.pid)
        assert srv.stop() == 0
    if open_ring(2) is not None:  # the cold reads went through a ring of our own (uvloop's
        assert rings["1"] > rings["0"]  # libuv may hold one too; mmap dups the ring's fd)
