"""Disk full, side by side with qemu-nbd: a qcow2 image on a small ext4 (64 MiB, on a loop
device) takes random 4 KiB writes until the file system is full.

Every failed write must fail with ENOSPC (never EIO), and nothing acknowledged may be
lost: either space is freed (a filler file deleted) and FLUSH then succeeds, every
acknowledged write reads back and the server exits 0 on SIGTERM; or the server gets
SIGTERM while the disk is still full and must exit 0 all the same.  In both cases
`qemu-img check` finds the image clean (no leaks, no corruption) and `qemu-img convert`
reads every acknowledged write.  qemu-nbd runs the very same scenario and checks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from loopfs import fill, small_ext4
from tooling import ServerFactory, require_tool

from nbdqcow.errors import RemoteError
from nbdqcow.nbdclient.sync import SyncClient

VIRTUAL = 1 << 30
BLOCK = 4096
MAX_FAILURES = 30  # failed writes after which the disk counts as full
MAX_ATTEMPTS = 40000


def _hammer(c: SyncClient, rng: random.Random) -> tuple[dict[int, bytes], dict[int, int]]:
    """Random 4 KiB writes until MAX_FAILURES of them failed: (acknowledged, errors)."""
    acked: dict[int, bytes] = {}
    errors: dict[int, int] = {}
    failures = 0
    for _ in range(MAX_ATTEMPTS):
        off = rng.randrange(VIRTUAL // BLOCK) * BLOCK
        data = rng.randbytes(BLOCK)
        try:
            c.pwrite(data, off)
        except RemoteError as e:
            errors[e.code] = errors.get(e.code, 0) + 1
            failures += 1
            if failures >= MAX_FAILURES:
                break
            continue
        acked[off] = data
    return acked, errors


def _check_clean(image: Path) -> None:
    p = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(image)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"qemu-img check: rc {p.returncode}\n{p.stdout}{p.stderr}"
    report = json.loads(p.stdout)
    for key in ("leaks", "corruptions", "check-errors"):
        assert not report.get(key), f"qemu-img check: {key}: {report}"


def _check_data(image: Path, raw: Path, acked: dict[int, bytes]) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                   check=True, capture_output=True)
    with open(raw, "rb") as f:
        lost = [off for off, data in acked.items() if os.pread(f.fileno(), BLOCK, off) != data]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost, e.g. {lost[:5]}"


def _scenario(start: ServerFactory, tmp_path: Path, cluster_size: int, sigterm_full: bool,
              extra: tuple[str, ...]) -> None:
    require_tool("qemu-img")
    with small_ext4(tmp_path) as mnt:
        image = mnt / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cluster_size}", str(image), str(VIRTUAL)], check=True)
        filler = mnt / "filler"
        filler.write_bytes(b"\x5a" * (6 << 20))
        os.sync()
        served = start(image, "-f", "qcow2", "-t", *extra)
        c = SyncClient(served.uri)
        try:
            acked, errors = _hammer(c, random.Random(cluster_size * 2 + sigterm_full))
            assert errors, "the file system never filled up"
            assert set(errors) == {errno.ENOSPC}, f"write errors other than ENOSPC: {errors}"
            assert len(acked) > 100
            if sigterm_full:
                assert served.stop(signal.SIGTERM) == 0, served.log.read_text()[-2000:]
            else:
                filler.unlink()
                c.flush()
                bad = [off for off, data in acked.items() if c.pread(off, BLOCK) != data]
                assert not bad, f"{len(bad)} acknowledged writes read back wrong"
        finally:
            try:
                c.close()
            except (OSError, RemoteError, ConnectionError, EOFError):
                pass  # the server may be gone already (SIGTERM case)
        assert served.stop(signal.SIGTERM) == 0, served.log.read_text()[-2000:]
        _check_clean(image)
        _check_data(image, tmp_path / "out.raw", acked)


@pytest.mark.parametrize("sigterm_full", [False, True], ids=["freed", "sigterm-full"])
def test_disk_full_nbdqcow(nbdqcow_server: ServerFactory, tmp_path: Path,
                           sigterm_full: bool) -> None:
    _scenario(nbdqcow_server, tmp_path, 65536, sigterm_full, ())


@pytest.mark.parametrize("sigterm_full", [False, True], ids=["freed", "sigterm-full"])
def test_disk_full_small_clusters(nbdqcow_server: ServerFactory, tmp_path: Path,
                                  sigterm_full: bool) -> None:
    """4 KiB clusters: nearly every write also needs a new L2 table, and refcount blocks
    and the refcount table grow while the disk is full."""
    _scenario(nbdqcow_server, tmp_path, 4096, sigterm_full, ())


@pytest.mark.parametrize("sigterm_full", [False, True], ids=["freed", "sigterm-full"])
def test_disk_full_qemu_nbd(qemu_nbd_server: ServerFactory, tmp_path: Path,
                            sigterm_full: bool) -> None:
    """The reference: qemu-nbd passes the same scenario and checks."""
    _scenario(qemu_nbd_server, tmp_path, 65536, sigterm_full, ())


def test_disk_full_thin_rewrite(nbdqcow_server: ServerFactory, tmp_path: Path) -> None:
    """Under --mapping=thin a trimmed cluster keeps its offset but gives its blocks back:
    rewriting it on a full disk must fail that write with ENOSPC (its blocks are claimed
    before the write), and a SIGTERM still leaves a clean image with every acknowledged
    write in it."""
    require_tool("qemu-img")
    with small_ext4(tmp_path) as mnt:
        image = mnt / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"],
                       check=True)
        served = nbdqcow_server(image, "-f", "qcow2", "-t", "--mapping=thin",
                                "--discard=unmap")
        c = SyncClient(served.uri)
        try:
            rng = random.Random(5)
            c.pwrite(rng.randbytes(16 << 20), 0)
            c.flush()
            c.trim(0, 16 << 20)
            c.flush()
            fill(mnt / "filler")
            acked: dict[int, bytes] = {}
            errors: dict[int, int] = {}
            for off in range(0, 16 << 20, 64 * 1024):
                data = rng.randbytes(BLOCK)
                try:
                    c.pwrite(data, off)
                    acked[off] = data
                except RemoteError as e:
                    errors[e.code] = errors.get(e.code, 0) + 1
            assert errors and set(errors) == {errno.ENOSPC}, errors
            assert served.stop(signal.SIGTERM) == 0, served.log.read_text()[-2000:]
        finally:
            try:
                c.close()
            except (OSError, RemoteError, ConnectionError, EOFError):
                pass
        _check_clean(image)
        _check_data(image, tmp_path / "out.raw", acked)
