"""Write-behind: a fully written chunk of a host file is handed to the disk early."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from nbdqcow.block import writebehind
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.writebehind import MIN_WRITE, WriteBehind

MiB = 1 << 20


class Kicks:
    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, start: int, length: int) -> None:
        with self.lock:
            self.ranges.append((start, length))
            self.threads.add(threading.current_thread().name)

    def wait(self, n: int, timeout: float = 10) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while len(self.ranges) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # and nothing more comes
        return sorted(self.ranges)


def test_sequential_writes_kick_each_full_chunk_once() -> None:
    kicks, wb = Kicks(), WriteBehind(chunk=MiB)
    for off in range(0, 3 * MiB + MiB // 2, 256 * 1024):  # 3.5 chunks, front to back
        wb.wrote(off, 256 * 1024, kicks)
    assert kicks.wait(3) == [(0, MiB), (MiB, MiB), (2 * MiB, MiB)]
    assert kicks.threads == {"nbdqcow-writebehind"}  # never in the writer's thread


def test_out_of_order_and_straddling_writes_count_per_chunk() -> None:
    kicks, wb = Kicks(), WriteBehind(chunk=MiB)
    wb.wrote(MiB // 2, MiB, kicks)  # half of chunk 0, half of chunk 1
    wb.wrote(3 * MiB // 2, MiB // 2, kicks)  # chunk 1 complete
    assert kicks.wait(1) == [(MiB, MiB)]
    wb.wrote(0, MiB // 2, kicks)  # chunk 0 complete, last
    assert kicks.wait(2) == [(0, MiB), (MiB, MiB)]


def test_scattered_writes_kick_nothing() -> None:
    kicks, wb = Kicks(), WriteBehind(chunk=32 * MiB)
    for i in range(200):
        wb.wrote((i * 7919 % 4096) * 256 * 1024, MIN_WRITE, kicks)
    assert kicks.wait(0) == []


def test_the_queue_is_bounded() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def slow(start: int, length: int) -> None:
        gate.wait(10)
        seen.append(start)

    wb = WriteBehind(chunk=MIN_WRITE)
    for i in range(writebehind.MAX_QUEUED * 3):
        wb.wrote(i * MIN_WRITE, MIN_WRITE, slow)
    assert writebehind._THREAD.queued <= writebehind.MAX_QUEUED
    gate.set()
    deadline = time.monotonic() + 10
    while writebehind._THREAD.queued and time.monotonic() < deadline:
        time.sleep(0.005)
    assert writebehind._THREAD.queued == 0
    assert len(seen) <= writebehind.MAX_QUEUED


def test_host_files_stream_their_large_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    f = HostFile(str(path), writable=True)
    kicks = Kicks()
    try:
        assert f.write_behind is not None
        f.write_behind = WriteBehind(chunk=MiB)
        f.start_writeback = kicks  # type: ignore[method-assign]
        f.pwrite(b"\1" * 4096, 0)  # small: not counted
        for off in range(0, 2 * MiB, MIN_WRITE):
            f.pwrite(os.urandom(MIN_WRITE), off)
        assert kicks.wait(2) == [(0, MiB), (MiB, MiB)]
        f.syncs = False  # cache=unsafe: nothing will ever wait for the disk
        for off in range(2 * MiB, 3 * MiB, MIN_WRITE):
            f.pwrite(os.urandom(MIN_WRITE), off)
        assert kicks.wait(3, timeout=0.3) == [(0, MiB), (MiB, MiB)]
    finally:
        f.close()
    g = HostFile(str(path), writable=False)
    try:
        assert g.write_behind is None  # nothing to write
        g.start_writeback(0, MiB)  # the real call, on a clean file: harmless
    finally:
        g.close()


def test_a_rewritten_chunk_is_kicked_again_only_after_a_sync_or_the_cooldown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(writebehind.time, "monotonic", lambda: now[0])
    kicks, wb = Kicks(), WriteBehind(chunk=MiB)
    for _ in range(3):  # a benchmark rewriting the same range without a flush
        wb.wrote(0, MiB, kicks)
    assert kicks.wait(1) == [(0, MiB)]
    wb.synced()  # a FLUSH: what comes next is new work for the disk
    wb.wrote(0, MiB, kicks)
    assert kicks.wait(2) == [(0, MiB), (0, MiB)]
    wb.wrote(0, MiB, kicks)
    now[0] += writebehind.COOLDOWN
    wb.wrote(0, MiB, kicks)
    assert kicks.wait(3) == [(0, MiB)] * 3
