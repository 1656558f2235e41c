"""holds_zero_sector: the quick pre-check never changes the answer of the full search."""

from __future__ import annotations

import random

from nbdqcow.server.dispatch import SECTOR, ZEROS_SECTOR, holds_zero_sector


def _nonzero(n: int, rng: random.Random) -> bytearray:
    return bytearray(rng.randrange(1, 256) for _ in range(n))


def test_agrees_with_a_full_search_at_every_offset_and_length() -> None:
    rng = random.Random(7)
    for n in (2 * SECTOR, 4096, 4096 + 100, 3 * SECTOR - 1):
        base = _nonzero(n, rng)
        assert not holds_zero_sector(base) and not holds_zero_sector(bytes(base))
        for start in range(0, n - SECTOR + 1, 37):
            for run in (SECTOR - 1, SECTOR, SECTOR + 13):
                if start + run > n:
                    continue
                data = bytearray(base)
                data[start : start + run] = bytes(run)
                want = data.find(ZEROS_SECTOR) >= 0
                assert want == (run >= SECTOR)
                assert holds_zero_sector(data) == want, (n, start, run)
                assert holds_zero_sector(bytes(data)) == want


def test_scattered_zero_bytes_are_no_zero_sector() -> None:
    rng = random.Random(8)
    data = _nonzero(4096, rng)
    for i in range(0, 4096, SECTOR):  # a zero at every probed position, runs of 300
        data[i : i + 300] = bytes(300)
    assert not holds_zero_sector(data)
    data[1000:1512] = bytes(SECTOR)
    assert holds_zero_sector(data)
