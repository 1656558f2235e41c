"""The data copy of relayout: plain data clusters from wherever they lie in the old file
to guest + one constant in the new one.

Each piece is copied by ``copy_file_range`` (inside the kernel: nothing passes through
Python; a file system that can share blocks shares them).  When the old file's data is
in the page cache, the new file is done in windows of :data:`WINDOW` bytes front to
back (two threads taking windows in turn, each window's pieces in the old file's order)
and every finished window is handed to the disk at once, so writing to the disk
overlaps the copy and the final sync finds little left.  When it is not (a cold
cache), all pieces go in one pass in the old file's order: the disk reads the old file
front to back, not a seek per cluster, and the final sync writes the new file out in
its order.  Pieces in holes of the old file are left out (the new data area reads as
zeros already).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import WouldBlock

#: (offset in the old file, length, offset in the new file)
Piece = tuple[int, int, int]
Progress = Callable[[int, int], None]

THREADS = 2
#: the new file is written and handed to the disk in windows this large
WINDOW = 256 << 20


def merge_pieces(pieces: Iterable[Piece]) -> list[Piece]:
    """Sort by old offset; join pieces contiguous in both files."""
    out: list[Piece] = []
    for s, n, d in sorted(pieces):
        if out:
            ps, pn, pd = out[-1]
            if ps + pn == s and pd + pn == d:
                out[-1] = (ps, pn + n, pd)
                continue
        out.append((s, n, d))
    return out


def clip_to_data(pieces: list[Piece], data: list[tuple[int, int]]) -> Iterator[Piece]:
    """The parts of ``pieces`` (sorted by old offset) that lie in ``data`` extents
    (sorted (start, length) of the old file)."""
    k = 0
    for s, n, d in pieces:
        end = s + n
        while k < len(data) and data[k][0] + data[k][1] <= s:
            k += 1
        j = k
        while j < len(data) and data[j][0] < end:
            a = max(s, data[j][0])
            b = min(end, data[j][0] + data[j][1])
            if a < b:
                yield a, b - a, d + a - s
            j += 1


def copy_pieces(src: HostFile, dst: HostFile, pieces: list[Piece],
                progress: Progress | None = None, threads: int = THREADS,
                window: int | None = None) -> int:
    """Copy ``pieces`` from ``src`` to ``dst``; the bytes copied.  Holes of ``src`` are
    skipped.  The new file is done in windows of ``window`` bytes, front to back (each
    window's pieces in the old file's order, the windows shared among ``threads``
    threads); each finished window is handed to the disk at once (start_writeback), so
    the final sync finds little left to write."""
    data = [(s, n) for s, n, is_data in src.data_runs(0, src.size()) if is_data]
    todo = list(clip_to_data(sorted(pieces), data))
    total = sum(n for _, n, _ in todo)
    if window is None:
        window = WINDOW if _mostly_cached(src, todo) else 0
    windows = _windows(todo, window)
    done = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()
    it = iter(windows)

    def work() -> None:
        try:
            while not errors:
                with lock:
                    w = next(it, None)
                if w is None:
                    return
                lo, hi, part = w
                for s, n, d in part:
                    dst.copy_from(src, s, n, d)
                dst.start_writeback(lo, hi - lo)
                with lock:
                    done[0] += sum(n for _, n, _ in part)
                    if progress is not None:
                        progress(done[0], total)
        except BaseException as e:  # re-raised by the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=work, name=f"relayout-{i}", daemon=True)
               for i in range(1, max(1, min(threads, len(windows))))]
    for t in workers:
        t.start()
    try:
        work()
    finally:
        for t in workers:
            t.join()
    if errors:
        raise errors[0]
    if progress is not None:
        progress(total, total)
    return total


def _mostly_cached(src: HostFile, todo: list[Piece], samples: int = 64) -> bool:
    """Whether (nearly) all of the old file's data to copy is in the page cache: then
    the new file is done window by window (its writing to the disk overlaps the copy);
    else one pass in the old file's order (a cold disk reads it front to back, where
    windows would make it read a little of everything once per window).  Judged from a
    sample: a 4 KiB read at the start of each of ``samples`` pieces that may not wait
    for the disk."""
    if not todo:
        return True
    rng = random.Random(len(todo))
    picks = rng.sample(todo, min(samples, len(todo)))
    buf = memoryview(bytearray(4096))
    missing = 0
    for s, n, _ in picks:
        try:
            src.preadinto(buf[:min(n, 4096)], s, nowait=True)
        except WouldBlock:
            missing += 1
    return missing * 10 <= len(picks)


def _windows(todo: list[Piece], window: int) -> list[tuple[int, int, list[Piece]]]:
    """(first, end, pieces) per ``window`` bytes of the new file, in its order; each
    window's pieces keep the old file's order (``todo`` is sorted by it)."""
    if not todo:
        return []
    if window <= 0:
        lo = min(d for _, _, d in todo)
        return [(lo, max(d + n for _, n, d in todo), todo)]
    out: dict[int, list[Piece]] = {}
    for p in todo:
        s, n, d = p
        while n:  # a piece across a window's end is split there
            k = min(n, (d // window + 1) * window - d)
            out.setdefault(d // window, []).append((s, k, d))
            s, n, d = s + k, n - k, d + k
    return [(w * window, (w + 1) * window, out[w]) for w in sorted(out)]
