"""nbdqcow.qcow2.bitmaps.DirtyBitmap.dirty_runs against a bit-by-bit model, on bitmaps
laid out in memory (bitmap table, data clusters, all-zeros and all-ones entries)."""

from __future__ import annotations

import random
import struct

import pytest

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.bitmaps import BitmapEntry, DirtyBitmap, _next_change


class MemFile:
    """The two HostFile methods a bitmap reads through."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset : offset + length]

    def size(self) -> int:
        return len(self.data)


def build(bits: list[int], gran_bits: int, cs: int, disk_size: int,
          special: dict[int, int] | None = None) -> DirtyBitmap:
    """A bitmap whose bit i is bits[i]; table entries in ``special`` are stored as given
    (0: all zeros, 1: all ones) instead of pointing to a data cluster."""
    data = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        data[i >> 3] |= b << (i & 7)
    nclusters = -(-len(data) // cs)
    data += bytes(nclusters * cs - len(data))
    table, clusters = [], []
    for c in range(nclusters):
        if special and c in special:
            table.append(special[c])
        else:
            table.append((2 + len(clusters)) * cs)
            clusters.append(bytes(data[c * cs : (c + 1) * cs]))
    image = bytes(cs) + struct.pack(f">{nclusters}Q", *table).ljust(cs, b"\0") + b"".join(clusters)
    entry = BitmapEntry("b", cs, nclusters, 0, 1, gran_bits, 0)
    return DirtyBitmap(MemFile(image), entry, cs, disk_size)  # type: ignore[arg-type]


def model_runs(bits: list[int], gran: int, disk_size: int, offset: int, length: int
               ) -> list[tuple[int, int, bool]]:
    out: list[list[int]] = []
    end = offset + length
    for i in range(offset // gran, (end - 1) // gran + 1):
        s, t = max(offset, i * gran), min(end, (i + 1) * gran)
        if out and out[-1][2] == bits[i]:
            out[-1][1] += t - s
        else:
            out.append([s, t - s, bits[i]])
    return [(s, n, bool(d)) for s, n, d in out]


CS = 512  # 4096 bits of bitmap data per cluster


@pytest.mark.parametrize("seed", range(24))
def test_runs_match_the_model(seed: int) -> None:
    rng = random.Random(seed)
    gran_bits = rng.choice([0, 3, 9])
    gran = 1 << gran_bits
    nbits = rng.randrange(1, 3 * 8 * CS + 100)
    disk_size = (nbits - 1) * gran + rng.randrange(1, gran + 1)
    density = rng.choice([0.001, 0.3, 0.5, 0.97])
    bits = [1 if rng.random() < density else 0 for _ in range(nbits)]
    if rng.random() < 0.5:  # long runs too
        for _ in range(5):
            a, k = rng.randrange(nbits), rng.randrange(1, 3000)
            bits[a : a + k] = [rng.randrange(2)] * len(bits[a : a + k])
    bitmap = build(bits, gran_bits, CS, disk_size)
    for _ in range(12):
        offset = rng.randrange(disk_size)
        length = rng.randrange(1, disk_size - offset + 1)
        got = [tuple(r) for r in bitmap.dirty_runs(offset, length, 1 << 30)]
        assert got == model_runs(bits, gran, disk_size, offset, length), (offset, length)
        k = rng.randrange(1, 4)
        assert [tuple(r) for r in bitmap.dirty_runs(offset, length, k)] == got[:k]


def test_whole_bytes_and_long_runs() -> None:
    bits = [0] * 100 + [1] * 200 + [0] * 33 + [1]
    bitmap = build(bits, 9, CS, len(bits) * 512 - 100)
    runs = [tuple(r) for r in bitmap.dirty_runs(0, len(bits) * 512 - 100, 99)]
    assert runs == [(0, 51200, False), (51200, 102400, True), (153600, 16896, False),
                    (170496, 412, True)]


def test_zero_and_all_ones_table_entries() -> None:
    n = 8 * CS
    bits = [1, 0] * (n // 2) + [0] * n + [0] * n + [1, 1, 0] * (n // 3) + [1]
    bitmap = build(bits, 0, CS, len(bits), special={1: 0, 2: 1})
    want = bits[:n] + [0] * n + [1] * n + bits[3 * n :]
    assert [tuple(r) for r in bitmap.dirty_runs(0, len(bits), 1 << 20)] == \
        model_runs(want, 1, len(bits), 0, len(bits))


def test_past_the_end_of_a_shorter_bitmap_is_clean() -> None:
    """A bitmap of a shorter backing image: the export's tail reads as clean."""
    bitmap = build([0, 1], 9, CS, 1000)
    assert [tuple(r) for r in bitmap.dirty_runs(100, 5000, 10)] == \
        [(100, 412, False), (512, 488, True), (1000, 4100, False)]
    assert [tuple(r) for r in bitmap.dirty_runs(2000, 300, 10)] == [(2000, 300, False)]
    assert len(bitmap.dirty_runs(600, 5000, 1)) == 1


@pytest.mark.parametrize("entry", [1 << 60, 0x400 | 1, 0x2, 0x10000000])
def test_bad_table_entries_are_errors(entry: int) -> None:
    bitmap = build([1] * 64, 0, CS, 64, special={0: entry})
    with pytest.raises(CorruptImage, match="bitmap table entry 0"):
        bitmap.dirty_runs(0, 64, 10)
    with pytest.raises(CorruptImage):
        bitmap.check()


def test_next_change_stops_at_the_limit() -> None:
    buf = b"\x00" * 8 + b"\x10"
    assert _next_change(buf, 3, False, 72) == 68
    assert _next_change(buf, 3, False, 60) == 60
    assert _next_change(b"\xff\xff\x7f", 0, True, 24) == 23
