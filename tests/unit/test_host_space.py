"""Host-space primitives: HostFile.reserve / punch_hole / zero_range / sticky sync errors,
and the engine's HostSpace (claim ahead, claim exactly when nearly full, give back)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import NoSpace
from nbdqcow.qcow2.space import HostSpace

KiB = 1024
MiB = 1024 * KiB


def _file(tmp_path: Path, size: int = 0) -> HostFile:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(size)
    return HostFile(str(p), writable=True)


def test_reserve_claims_blocks_without_growing_the_file(tmp_path: Path) -> None:
    f = _file(tmp_path, 64 * KiB)
    try:
        before = f.allocated_bytes()
        assert f.reserve(0, 1 * MiB)
        assert f.size() == 64 * KiB  # KEEP_SIZE
        assert f.allocated_bytes() >= before + 1 * MiB
        # the claimed blocks past the end are used when the file grows
        f.pwrite(b"x" * (512 * KiB), 64 * KiB)
        assert f.allocated_bytes() >= 1 * MiB
    finally:
        f.close()


def test_zero_range_erases_and_keeps_blocks_punch_hole_frees_them(tmp_path: Path) -> None:
    f = _file(tmp_path)
    try:
        pattern = b"SECRET!!" * (32 * KiB)  # 256 KiB
        f.pwrite(pattern, 0)
        f.sync()
        alloc = f.allocated_bytes()
        f.zero_range(64 * KiB, 64 * KiB)
        assert f.pread(64 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert f.allocated_bytes() == alloc
        assert f.punch_hole(128 * KiB, 64 * KiB)
        assert f.pread(64 * KiB, 128 * KiB) == bytes(64 * KiB)
        assert f.allocated_bytes() == alloc - 64 * KiB
        assert f.size() == 256 * KiB
        f.sync()
        raw = (tmp_path / "f").read_bytes()
        assert raw.count(b"SECRET!!") == 128 * KiB // 8
    finally:
        f.close()


def test_zero_range_writes_zeros_where_fallocate_is_missing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    f = _file(tmp_path)
    try:
        f.pwrite(b"\xff" * (128 * KiB), 0)

        def no_fallocate(mode: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(f, "_fallocate", no_fallocate)
        f.zero_range(4 * KiB, 100 * KiB)
        data = f.pread(128 * KiB, 0)
        assert data == b"\xff" * (4 * KiB) + bytes(100 * KiB) + b"\xff" * (24 * KiB)
        assert f.reserve(0, MiB) is False
        assert f.punch_hole(0, 4 * KiB) is False
    finally:
        f.close()


def test_a_failed_sync_fails_every_later_sync(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """After fdatasync fails the kernel may have dropped the pages it could not write:
    a later fdatasync that succeeds would claim durability it does not have."""
    f = _file(tmp_path)
    real = os.fdatasync
    calls = []

    def failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    try:
        f.pwrite(b"a", 0)
        with pytest.raises(OSError) as first:
            f.sync()
        assert first.value.errno == errno.EIO
        with pytest.raises(OSError) as later:
            f.sync()
        assert later.value.errno == errno.EIO and "earlier sync failed" in str(later.value)
        assert len(calls) == 1
    finally:
        f.close()


class RecordingFile(HostFile):
    """A HostFile whose reserve calls are recorded and can be made to fail."""

    def __init__(self, path: str) -> None:
        super().__init__(path, writable=True)
        self.reserves: list[tuple[int, int]] = []
        self.free = 1 << 60  # bytes the "file system" can still claim

    def reserve(self, offset: int, length: int) -> bool:
        if length > self.free:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.reserves.append((offset, length))
        return True


def test_claims_ahead_past_the_end_with_one_call_per_step(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(3 * 64 * KiB))
    f = RecordingFile(str(tmp_path / "f"))
    try:
        s = HostSpace(f, 16, lookahead=1 * MiB)
        for c in range(3, 3 + 30):
            s.claim(c)
        # the first claim takes [192K, 192K+1M); cluster 19 crosses it: one more step
        assert f.reserves == [(192 * KiB, MiB), (192 * KiB + MiB, MiB)]
        # a free cluster below the window (maybe a hole) is claimed exactly
        s.claim(1)
        assert f.reserves[-1] == (64 * KiB, 64 * KiB)
    finally:
        f.close()


def test_nearly_full_claims_exactly_or_fails_with_nospace(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    f = RecordingFile(str(tmp_path / "f"))
    try:
        s = HostSpace(f, 16, lookahead=1 * MiB)
        f.free = 256 * KiB  # less than a lookahead step
        s.claim(0, 2)
        assert f.reserves == [(0, 128 * KiB)]
        assert s.window == (0, 128 * KiB)
        f.free = 32 * KiB
        with pytest.raises(NoSpace):
            s.claim(2)
        assert s.window == (0, 128 * KiB)
    finally:
        f.close()


def test_punch_cuts_the_window_and_trim_gives_back_the_lookahead(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    f = HostFile(str(p), writable=True)
    try:
        s = HostSpace(f, 16, lookahead=1 * MiB)
        s.claim(0, 2)
        f.pwrite(b"d" * (128 * KiB), 0)
        assert s.window == (0, MiB)
        assert f.allocated_bytes() >= MiB
        s.punch(0, 64 * KiB)
        assert s.window == (64 * KiB, MiB)  # cluster 0 is a hole again: reclaim it on reuse
        s.trim()
        assert s.window == (64 * KiB, 128 * KiB)
        assert f.allocated_bytes() <= 64 * KiB + 4 * KiB
        assert f.size() == 128 * KiB
    finally:
        f.close()
