"""I/O errors from the host file, injected at the HostFile level (the only code that
touches image files): the request that meets the error fails with that errno (EIO as
EIO, ENOSPC as ENOSPC), the image stays consistent (`qemu-img check` clean after close),
and a FLUSH that failed is retried by the next one and loses nothing acknowledged.
A failed fdatasync is different: the kernel may have dropped the pages it could not
write, so every later sync fails too (nothing is claimed durable that may not be)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import NBD_EIO, NBD_ENOSPC, nbd_errno
from nbdqcow.qcow2.driver import Qcow2Driver

MiB = 1 << 20
CLUSTER = 65536


def _image(tmp_path: Path, cluster: int = CLUSTER) -> Path:
    p = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
                    str(p), "64M"], check=True)
    return p


def _check_clean(p: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(p)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    for key in ("leaks", "corruptions", "check-errors"):
        assert not report.get(key), report


def _read_back(p: Path, written: dict[int, bytes], tmp_path: Path) -> None:
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(p), str(raw)], check=True)
    with open(raw, "rb") as f:
        for off, data in written.items():
            assert os.pread(f.fileno(), len(data), off) == data, f"write at {off} lost"


@contextmanager
def failing_pwrite(f: HostFile, err: int, when: Callable[[int, int], bool]) -> Iterator[list[int]]:
    """Make ``f.pwrite`` fail with ``err`` for writes where ``when(offset, length)``."""
    real = f.pwrite
    hits: list[int] = []

    def pwrite(data: bytes | bytearray | memoryview, offset: int) -> None:
        n = memoryview(data).nbytes
        if when(offset, n):
            hits.append(offset)
            raise OSError(err, os.strerror(err))
        real(data, offset)

    f.pwrite = pwrite  # type: ignore[method-assign]
    try:
        yield hits
    finally:
        f.pwrite = real  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _tools() -> None:
    from tooling import require_tool

    require_tool("qemu-img")


@pytest.mark.parametrize("err, nbd", [(errno.EIO, NBD_EIO), (errno.ENOSPC, NBD_ENOSPC)])
def test_failed_data_write_fails_that_write_only(tmp_path: Path, err: int, nbd: int) -> None:
    p = _image(tmp_path)
    d = Qcow2Driver.open(str(p))
    written = {0: b"A" * CLUSTER}
    d.pwrite(written[0], 0)
    size_before = d.file.size()
    with failing_pwrite(d.file, err, lambda off, n: n == CLUSTER and off >= size_before) as hits:
        with pytest.raises(OSError) as e:
            d.pwrite(b"B" * CLUSTER, 8 * MiB)
    assert hits and nbd_errno(e.value) == nbd
    # the cluster the failed write took is free again and is used by the next write
    d.pwrite(b"C" * CLUSTER, 9 * MiB)
    written[9 * MiB] = b"C" * CLUSTER
    assert d.pread(8 * MiB, CLUSTER) == bytes(CLUSTER)
    d.close()
    _check_clean(p)
    _read_back(p, written, tmp_path)


@pytest.mark.parametrize("err, nbd", [(errno.EIO, NBD_EIO), (errno.ENOSPC, NBD_ENOSPC)])
def test_failed_flush_is_retried_and_loses_nothing(tmp_path: Path, err: int, nbd: int) -> None:
    p = _image(tmp_path, 4096)  # small clusters: many new L2 tables and refcount blocks
    d = Qcow2Driver.open(str(p))
    written: dict[int, bytes] = {}
    for i in range(64):
        off = i * 997 * 4096 % (64 * MiB)
        written[off] = os.urandom(4096)
        d.pwrite(written[off], off)
    meta = {c << 12 for c in d.meta}
    # every metadata write fails (L2 tables, refcount blocks, L1)
    with failing_pwrite(d.file, err, lambda off, n: (off & ~4095) in meta) as hits:
        for _ in range(2):
            with pytest.raises(OSError) as e:
                d.flush()
            assert nbd_errno(e.value) == nbd
    assert hits
    # the fault is gone: the next flush writes everything that was dirty
    d.flush()
    for off, data in written.items():
        assert d.pread(off, 4096) == data
    d.close()
    _check_clean(p)
    _read_back(p, written, tmp_path)


def test_a_failed_sync_fails_every_later_flush(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    p = _image(tmp_path)
    d = Qcow2Driver.open(str(p))
    d.pwrite(b"x" * 4096, 0)
    real = os.fdatasync
    calls = {"n": 0}

    def fdatasync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            d.flush()
        assert nbd_errno(e.value) == NBD_EIO
    monkeypatch.setattr(os, "fdatasync", real)
    with pytest.raises(OSError):
        d.close()  # the last flush fails as well: reported, not hidden
