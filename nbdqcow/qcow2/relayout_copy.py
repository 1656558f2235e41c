"""The data copy of relayout: plain data clusters from wherever they lie in the old file
to guest + one constant in the new one.

Two ways, chosen by where the old file's data is:

* in the page cache (the usual case right after use): the new file is written front to
  back in :data:`CHUNK` pieces with O_DIRECT, each chunk gathered from the old file's
  page cache into an aligned buffer, :data:`DIRECT_THREADS` chunks in flight.  The new
  file's data never enters the page cache: no page-cache insertion, dirtying and
  writeback for the kernel to do (half the CPU of a buffered copy), and the final sync
  has no data left to write.
* not in the page cache (cold): every piece by ``copy_file_range`` in the order of the
  OLD file, so the disk reads it front to back even when every cluster is out of place
  (not a seek per cluster); the new file is written into the page cache in scattered
  order and the final sync writes it out in file order.

Either way pieces in holes of the old file are left out (the new data area reads as
zeros already), and where O_DIRECT is refused (a file system without it) the second
way is taken.  O_DIRECT writes whole :data:`ALIGN` blocks; the unaligned ends of runs
(small clusters, the last partial cluster) go through the page cache after them.
"""

from __future__ import annotations

import errno
import mmap
import random
import threading
from collections.abc import Callable, Iterable, Iterator

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import WouldBlock

#: (offset in the old file, length, offset in the new file)
Piece = tuple[int, int, int]
Progress = Callable[[int, int], None]

#: threads of the cold copy (two halves of the old file)
THREADS = 2
#: O_DIRECT chunks of the new file and how many are in flight
CHUNK = 4 << 20
DIRECT_THREADS = 4
#: O_DIRECT writes offsets and lengths in whole blocks of this size (4096 serves disks
#: with 512-byte and with 4096-byte sectors)
ALIGN = 4096


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
                direct: bool | None = None) -> int:
    """Copy ``pieces`` from ``src`` to ``dst``; the bytes copied.  ``direct``: force the
    O_DIRECT way (True) or the cold way (False); default: by the page cache."""
    data = [(s, n) for s, n, is_data in src.data_runs(0, src.size()) if is_data]
    todo = list(clip_to_data(sorted(pieces), data))
    total = sum(n for _, n, _ in todo)
    report = _Report(progress, total)
    if direct is None:
        direct = _mostly_cached(src, todo)
    out: HostFile | None = None
    if direct:
        try:
            out = HostFile(dst.path, writable=True, direct=True)
        except OSError:
            out = None  # no O_DIRECT here
    if out is not None:
        try:
            rest = _copy_direct(src, out, todo, report)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            rest = todo  # O_DIRECT wants more alignment here: all through the page cache
        finally:
            out.close()
        for s, n, d in rest:  # after every O_DIRECT write: no page shared meanwhile
            dst.copy_from(src, s, n, d)
            report(n)
    else:
        parts = _split(todo, total, max(1, threads))
        _run(len(parts), lambda i: _copy_part(src, dst, parts[i], report))
    report.finish()
    return total


class _Report:
    """Progress from several threads, in bytes."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.done = min(self.total, self.done + n)
                self.progress(self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


def _run(n: int, work: Callable[[int], None]) -> None:
    """``work(0..n-1)`` on ``n`` threads (0 on the caller's); the first error raised."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # re-raised by the caller's thread
            errors.append(e)
            stop.set()

    workers = [threading.Thread(target=guarded, args=(i,), name=f"relayout-{i}",
                                daemon=True) for i in range(1, n)]
    for t in workers:
        t.start()
    try:
        if n:
            guarded(0)
    finally:
        for t in workers:
            t.join()
    if errors:
        raise errors[0]


def _copy_part(src: HostFile, dst: HostFile, part: list[Piece], report: _Report) -> None:
    for s, n, d in part:
        dst.copy_from(src, s, n, d)
        report(n)


def _copy_direct(src: HostFile, out: HostFile, todo: list[Piece], report: _Report
                 ) -> list[Piece]:
    """The O_DIRECT way; returns the pieces it left for the page cache: the ends of
    each contiguous run of the new file that are not in whole :data:`ALIGN` blocks."""
    chunks: dict[int, list[Piece]] = {}
    rest: list[Piece] = []
    for s, n, d in _aligned(sorted(todo, key=lambda p: p[2]), rest):
        while n:  # a piece across a chunk's end is split there
            k = min(n, (d // CHUNK + 1) * CHUNK - d)
            chunks.setdefault(d // CHUNK, []).append((s, k, d))
            s, n, d = s + k, n - k, d + k
    order = iter(sorted(chunks))
    lock = threading.Lock()
    failed = threading.Event()

    def work(_: int) -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants its memory
        view = memoryview(buf)
        try:
            while not failed.is_set():
                with lock:
                    c = next(order, None)
                if c is None:
                    return
                try:
                    _write_chunk(src, out, c * CHUNK, chunks[c], view, report)
                except BaseException:
                    failed.set()
                    raise
        finally:
            view.release()
            buf.close()

    _run(min(DIRECT_THREADS, len(chunks)), work)
    return rest


def _aligned(by_new: list[Piece], rest: list[Piece]) -> Iterator[Piece]:
    """The parts of ``by_new`` (sorted by new offset) in whole ALIGN blocks of each
    contiguous run of the new file; the unaligned ends of the runs go to ``rest``."""
    i = 0
    while i < len(by_new):
        j = i + 1
        while j < len(by_new) and by_new[j][2] == by_new[j - 1][2] + by_new[j - 1][1]:
            j += 1
        start, end = by_new[i][2], by_new[j - 1][2] + by_new[j - 1][1]
        lo, hi = -(-start // ALIGN) * ALIGN, end // ALIGN * ALIGN
        if lo >= hi:
            lo = hi = end
        for s, n, d in by_new[i:j]:
            for a, b, keep in ((d, min(d + n, lo), False), (max(d, lo), min(d + n, hi), True),
                               (max(d, hi), d + n, False)):
                if a < b:
                    part = (s + a - d, b - a, a)
                    if keep:
                        yield part
                    else:
                        rest.append(part)
        i = j


def _write_chunk(src: HostFile, out: HostFile, base: int, pieces: list[Piece],
                 view: memoryview, report: _Report) -> None:
    """Gather ``pieces`` (sorted by new offset, all in [base, base + CHUNK)) into
    ``view`` and write each contiguous run of them with one O_DIRECT write."""
    start = end = pieces[0][2]
    for s, n, d in pieces:
        if d != end:
            out.pwrite(view[start - base:end - base], start)
            report(end - start)
            start = d
        src.preadinto(view[d - base:d - base + n], s)
        end = d + n
    out.pwrite(view[start - base:end - base], start)
    report(end - start)


def _mostly_cached(src: HostFile, todo: list[Piece], samples: int = 64) -> bool:
    """Whether (nearly) all of the old file's data to copy is in the page cache, judged
    from a sample: a 4 KiB read at the start of each of ``samples`` pieces that may not
    wait for the disk."""
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


def _split(todo: list[Piece], total: int, n: int) -> list[list[Piece]]:
    """``n`` runs of consecutive pieces with about the same number of bytes each."""
    parts: list[list[Piece]] = [[]]
    share = -(-total // n) if total else 1
    acc = 0
    for p in todo:
        if acc >= share * len(parts) and len(parts) < n:
            parts.append([])
        parts[-1].append(p)
        acc += p[1]
    return parts
