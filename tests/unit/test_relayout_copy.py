"""relayout's data copy (nbdqcow/qcow2/relayout_copy.py and HostFile.copy_from): pieces
from scattered places of one file to their places in another, against a plain
bytearray model, in the kernel and through a buffer, with holes in the source."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2.relayout_copy import clip_to_data, copy_pieces, merge_pieces

CS = 4096


def test_merge_joins_pieces_contiguous_in_both_files() -> None:
    got = merge_pieces([(3 * CS, CS, 0), (0, CS, 100 * CS), (CS, CS, 101 * CS),
                        (4 * CS, CS, CS), (2 * CS, CS, 50 * CS)])
    assert got == [(0, 2 * CS, 100 * CS), (2 * CS, CS, 50 * CS), (3 * CS, 2 * CS, 0)]


def test_clip_keeps_only_the_data_extents() -> None:
    pieces = [(0, 10, 100), (20, 10, 200), (40, 30, 300)]
    data = [(5, 20), (45, 5), (60, 100)]
    assert list(clip_to_data(pieces, data)) == [
        (5, 5, 105), (20, 5, 200), (45, 5, 305), (60, 10, 320)]
    assert list(clip_to_data(pieces, [])) == []


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffer"])
@pytest.mark.parametrize("threads,direct,chunk", [(1, False, 0), (3, False, 0),
                                                  (2, True, 8 * CS), (4, True, 3 * CS)])
def test_copy_matches_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool,
                              threads: int, direct: bool, chunk: int) -> None:
    from nbdqcow.qcow2 import relayout_copy

    if chunk:
        monkeypatch.setattr(relayout_copy, "CHUNK", chunk)
        monkeypatch.setattr(relayout_copy, "DIRECT_THREADS", threads)
    direct_calls: list[int] = []
    real_direct = relayout_copy._copy_direct

    def spy(*a: Any) -> Any:
        direct_calls.append(len(a[2]))
        return real_direct(*a)

    monkeypatch.setattr(relayout_copy, "_copy_direct", spy)
    rng = random.Random(threads * 7 + chunk)
    n = 64
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    src_data = bytearray(rng.randbytes(n * CS))
    with open(src_path, "wb") as f:
        f.write(src_data)
    # a hole in the source: clusters 10..19 read as zeros and are not copied
    holed = HostFile(str(src_path), writable=True)
    try:
        assert holed.punch_hole(10 * CS, 10 * CS)
    finally:
        holed.close()
    src_data[10 * CS : 20 * CS] = bytes(10 * CS)
    dst_size = (n + 8) * CS
    with open(dst_path, "wb") as f:
        f.truncate(dst_size)
    order = list(range(n))
    rng.shuffle(order)
    base = 8 * CS
    pieces = [(order[g] * CS, CS, base + g * CS) for g in range(n)]
    # one piece runs past the end of the source: it reads as zeros; one is not in
    # whole sectors (O_DIRECT cannot write it)
    pieces[-1] = (n * CS - CS // 2, CS, base + (n - 1) * CS)
    pieces[-2] = (pieces[-2][0], CS - 100, pieces[-2][2])
    model = bytearray(dst_size)
    for s, k, d in pieces:
        model[d : d + k] = bytes(src_data[s : s + k]).ljust(k, b"\0")
    src, dst = HostFile(str(src_path), writable=False), HostFile(str(dst_path), writable=True)
    dst._kernel_copy = kernel
    seen: list[tuple[int, int]] = []
    try:
        copied = copy_pieces(src, dst, merge_pieces(pieces),
                             lambda d, t: seen.append((d, t)), threads=threads, direct=direct)
    finally:
        src.close()
        dst.close()
    assert dst_path.read_bytes() == bytes(model)
    assert copied < n * CS  # the hole was left out
    assert bool(direct_calls) == direct  # O_DIRECT was taken (this file system has it)
    assert seen and seen[-1] == (copied, copied)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_a_failing_copy_is_raised_in_the_caller(tmp_path: Path) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    src_path.write_bytes(os.urandom(16 * CS))
    dst_path.write_bytes(bytes(16 * CS))
    src, dst = HostFile(str(src_path), writable=False), HostFile(str(dst_path), writable=False)
    try:
        with pytest.raises(OSError):
            copy_pieces(src, dst, [(0, 16 * CS, 0)], threads=2, direct=False)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffer"])
def test_copy_from_past_the_end_of_the_source_writes_zeros(tmp_path: Path,
                                                           kernel: bool) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    src_path.write_bytes(b"a" * 3000)
    dst_path.write_bytes(b"b" * 8192)
    src, dst = HostFile(str(src_path), writable=False), HostFile(str(dst_path), writable=True)
    dst._kernel_copy = kernel
    try:
        dst.copy_from(src, 1000, 4000, 100)
    finally:
        src.close()
        dst.close()
    assert dst_path.read_bytes() == b"b" * 100 + b"a" * 2000 + bytes(2000) + b"b" * 4092


def test_aligned_parts_of_runs_go_direct_and_their_ends_later() -> None:
    from nbdqcow.qcow2.relayout_copy import ALIGN, _aligned

    a = ALIGN
    by_new = [(10 * a, 512, a - 512), (0, 2 * a + 512, a),  # one run [a-512, 3a+512)
              (50 * a, 1024, 8 * a + 512)]  # a run with no whole block
    rest: list[tuple[int, int, int]] = []
    direct = list(_aligned(by_new, rest))
    assert direct == [(0, 2 * a, a)]
    assert sorted(rest, key=lambda p: p[2]) == [(10 * a, 512, a - 512), (2 * a, 512, 3 * a),
                                                (50 * a, 1024, 8 * a + 512)]


def test_direct_copy_of_small_clusters(tmp_path: Path) -> None:
    """512-byte pieces in random order: runs start and end inside 4 KiB blocks."""
    rng = random.Random(4)
    n, cs = 200, 512
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    data = rng.randbytes(n * cs)
    src_path.write_bytes(data)
    dst_path.write_bytes(bytes(n * cs + 3 * cs))
    order = list(range(n))
    rng.shuffle(order)
    skip = {17, 18, 100}  # gaps in the new file: runs end mid-block there
    pieces = [(order[g] * cs, cs, 3 * cs + g * cs) for g in range(n) if g not in skip]
    model = bytearray(n * cs + 3 * cs)
    for s, k, d in pieces:
        model[d : d + k] = data[s : s + k]
    src, dst = HostFile(str(src_path), writable=False), HostFile(str(dst_path), writable=True)
    try:
        assert copy_pieces(src, dst, merge_pieces(pieces), direct=True) == len(pieces) * cs
    finally:
        src.close()
        dst.close()
    assert dst_path.read_bytes() == bytes(model)
