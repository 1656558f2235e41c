"""The data copy of relayout: plain data clusters from wherever they lie in the old file
to guest + one constant in the new one.

Two ways:

* O_DIRECT (the default): the new file is written front to back in :data:`CHUNK`
  pieces, each gathered from the old file into an aligned buffer, :data:`DIRECT_THREADS`
  chunks in flight.  The new data never enters the page cache: no page-cache insertion,
  dirtying and writeback for the kernel to do (half the CPU of a buffered copy), and
  the final sync has no data left to write.  A cold old file is read with as many
  reads in flight as there are threads: the disk serves scattered reads in parallel
  faster than one pass in file order (measured on this machine's virtio disk: 3.8 s
  against 10 s for 2 GiB with every cluster out of place).
* through the page cache (``direct=False``: ``-t unsafe``, where nothing waits for the
  disk; or where O_DIRECT is refused): every piece by ``copy_file_range`` (inside the
  kernel, nothing passes through Python) in the order of the OLD file, two threads
  taking one half each.

Either way pieces in holes of the old file are left out (the new data area reads as
zeros already).  O_DIRECT writes whole :data:`ALIGN` blocks; the unaligned ends of runs
(small clusters, the last partial cluster) go through the page cache after them.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Callable, Iterable, Iterator

from nbdqcow.block.hostfile import HostFile

#: (offset in the old file, length, offset in the new file)
Piece = tuple[int, int, int]
Progress = Callable[[int, int], None]

#: threads of the copy through the page cache (two halves of the old file)
THREADS = 2
#: O_DIRECT chunks of the new file and how many are in flight (their reads too: a cold
#: disk served 8 scattered reads at a time in 3.8 s where 4 took 4.4 s)
CHUNK = 4 << 20
DIRECT_THREADS = 8
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
                direct: bool = True) -> int:
    """Copy ``pieces`` from ``src`` to ``dst``; the bytes copied.  ``direct``: the
    O_DIRECT way (where the file system has it), else through the page cache."""
    data = [(s, n) for s, n, is_data in src.data_runs(0, src.size()) if is_data]
    todo = list(clip_to_data(sorted(pieces), data))
    total = sum(n for _, n, _ in todo)
    report = _Report(progress, total)
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
