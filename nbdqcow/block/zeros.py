"""Zero bytes without allocating them again and again."""

from __future__ import annotations

ZERO_CHUNK = 1024 * 1024
ZEROS = bytes(ZERO_CHUNK)
ZEROV = memoryview(ZEROS)


def fill_zero(out: memoryview) -> None:
    """Overwrite every byte of ``out`` with zero."""
    n = len(out)
    for pos in range(0, n, ZERO_CHUNK):
        k = min(ZERO_CHUNK, n - pos)
        out[pos : pos + k] = ZEROV[:k]
