"""Power-loss crash states: record every change made to image files, then rebuild what
a power cut could leave behind.

:class:`Recorder` (a context manager) wraps the system calls that change files --
``os.pwrite``/``os.pwritev``/``os.write``, ``os.copy_file_range`` (logged as a write of
what it copied), ``os.ftruncate``, ``os.posix_fallocate``, the ``fallocate(2)`` of
:mod:`nbdqcow.block.hostfile` (punch hole, zero range, ...),
``os.fsync``/``os.fdatasync`` and ``os.open`` with ``O_TRUNC`` -- and logs, in order,
the calls that land on the tracked files.  Each such call must come from
``nbdqcow/block/hostfile.py`` (the only code meant to touch image files); a call from
anywhere else is logged in :attr:`Recorder.violations`.  The test also adds its own
markers (operation started / done, flush done) to the same log.

:func:`crash_points` walks the log: before each sync, every tracked file holds what it
held at its last sync (``durable``) plus ANY subset of the changes made since
(``pending``), each of them possibly torn at 512-byte sectors; a rename or removal
is durable once its folder is synced (the recorder logs that sync too), before that
any prefix of them may be (one crash point per prefix).  :func:`build` makes
one such state; :func:`replay_all` rebuilds the final content (which must equal the
real file: nothing changed it behind the recorder's back).

:class:`Promises` decides, per guest byte, what a crash state may read: exactly the
content of the last completed FLUSH (or of a completed FUA write) for everything no
later operation touched, and for bytes that a later (unflushed) operation touched, one
of the values they held since -- never anything else.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SECTOR = 512
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10
HOSTFILE = os.path.join("nbdqcow", "block", "hostfile.py")


@dataclass
class Event:
    """One logged change (or marker).  ``kind``: write, trunc, falloc, sync, rename
    (``data``: the new path), unlink, dirsync (``path``: a folder of tracked files was
    synced: its renames and removals are durable), mark."""

    kind: str
    path: str = ""
    off: int = 0
    data: bytes = b""
    length: int = 0
    mode: int = 0
    mark: tuple[Any, ...] = ()

    def pieces(self) -> list[tuple[int, int]]:
        """(start, end) of the sector-sized pieces a write / zeroing may tear into."""
        if self.kind == "write":
            start, end = self.off, self.off + len(self.data)
        elif self.kind == "falloc" and self.mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            start, end = self.off, self.off + self.length
        else:
            return []
        out = []
        while start < end:
            nxt = min(end, (start // SECTOR + 1) * SECTOR)
            out.append((start, nxt))
            start = nxt
        return out


# ------------------------------------------------------------------------- recording
class Recorder:
    """Log every change to the files in ``paths`` while active (see the module doc)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = {os.path.realpath(p) for p in paths}
        self.base: dict[str, bytes | None] = {}
        self.events: list[Event] = []
        self.violations: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    # --- helpers ---------------------------------------------------------------------
    def _path_of(self, fd: int) -> str | None:
        try:
            p = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return p if p in self.paths else None

    def _folder_of(self, fd: int) -> str | None:
        """The folder ``fd`` is open on when tracked files live in it."""
        try:
            p = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        if any(os.path.dirname(t) == p for t in self.paths) and os.path.isdir(p):
            return p
        return None

    def _caller_ok(self, path: str, what: str) -> None:
        frame = sys._getframe(2)
        fname = frame.f_code.co_filename
        if not fname.endswith(HOSTFILE):
            self.violations.append(f"{what} on {path} from {fname}:{frame.f_lineno}")

    def mark(self, *what: Any) -> None:
        self.events.append(Event("mark", mark=what))

    def add_path(self, path: str) -> None:
        real = os.path.realpath(path)
        self.paths.add(real)
        self.base[real] = _read(real)

    # --- wrappers --------------------------------------------------------------------
    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        orig = getattr(owner, name)
        self._saved.append((owner, name, orig))
        setattr(owner, name, make(orig))

    def __enter__(self) -> Recorder:
        from nbdqcow.block import hostfile

        for p in self.paths:
            self.base[p] = _read(p)
        rec = self

        def pwrite(orig: Any) -> Any:
            def f(fd: int, data: Any, offset: int, *a: Any) -> Any:
                path = rec._path_of(fd)
                n = orig(fd, data, offset, *a)
                if path is not None:
                    rec._caller_ok(path, "pwrite")
                    rec.events.append(Event("write", path, offset, bytes(memoryview(data)[:n])))
                return n
            return f

        def pwritev(orig: Any) -> Any:
            def f(fd: int, bufs: Any, offset: int, *a: Any) -> Any:
                path = rec._path_of(fd)
                n = orig(fd, bufs, offset, *a)
                if path is not None:
                    rec._caller_ok(path, "pwritev")
                    data = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)[:n]
                    rec.events.append(Event("write", path, offset, data))
                return n
            return f

        def copy_file_range(orig: Any) -> Any:
            def f(src: int, dst: int, count: int, offset_src: int | None = None,
                  offset_dst: int | None = None) -> Any:
                path = rec._path_of(dst)
                n = orig(src, dst, count, offset_src, offset_dst)
                if path is not None:
                    rec._caller_ok(path, "copy_file_range")
                    if offset_src is None or offset_dst is None:
                        rec.violations.append(f"copy_file_range on {path} (position unknown)")
                    else:  # logged as the write of what was copied
                        rec.events.append(Event("write", path, offset_dst,
                                                os.pread(src, n, offset_src)))
                return n
            return f

        def write(orig: Any) -> Any:
            def f(fd: int, data: Any) -> Any:
                path = rec._path_of(fd)
                if path is not None:
                    rec.violations.append(f"os.write on {path} (position unknown)")
                return orig(fd, data)
            return f

        def ftruncate(orig: Any) -> Any:
            def f(fd: int, size: int) -> Any:
                path = rec._path_of(fd)
                r = orig(fd, size)
                if path is not None:
                    rec._caller_ok(path, "ftruncate")
                    rec.events.append(Event("trunc", path, size))
                return r
            return f

        def sync(orig: Any) -> Any:
            def f(fd: int) -> Any:
                path = rec._path_of(fd)
                folder = None if path is not None else rec._folder_of(fd)
                r = orig(fd)
                if path is not None:
                    rec._caller_ok(path, "sync")
                    rec.events.append(Event("sync", path))
                elif folder is not None:
                    rec._caller_ok(folder, "sync")
                    rec.events.append(Event("dirsync", folder))
                return r
            return f

        def posix_fallocate(orig: Any) -> Any:
            def f(fd: int, offset: int, length: int) -> Any:
                path = rec._path_of(fd)
                r = orig(fd, offset, length)
                if path is not None:
                    rec._caller_ok(path, "posix_fallocate")
                    rec.events.append(Event("falloc", path, offset, length=length, mode=0))
                return r
            return f

        def fallocate(orig: Any) -> Any:
            def f(fd: int, mode: int, offset: int, length: int) -> Any:
                path = rec._path_of(fd)
                r = orig(fd, mode, offset, length)
                if path is not None and r == 0:
                    rec._caller_ok(path, "fallocate")
                    rec.events.append(Event("falloc", path, offset, length=length, mode=mode))
                return r
            return f

        def osopen(orig: Any) -> Any:
            def f(path: Any, flags: int, *a: Any, **k: Any) -> Any:
                fd = orig(path, flags, *a, **k)
                real = rec._path_of(fd)
                if real is None and isinstance(path, str) and flags & os.O_CREAT:
                    if os.path.realpath(path) in rec.paths:
                        real = os.path.realpath(path)
                if real is not None and flags & (os.O_TRUNC | os.O_CREAT):
                    rec._caller_ok(real, "open(O_CREAT/O_TRUNC)")
                    if flags & os.O_TRUNC:
                        rec.events.append(Event("trunc", real, 0))
                return fd
            return f

        def by_path(what: str, rename: bool = False) -> Callable[[Any], Any]:
            def make(orig: Any) -> Any:
                def f(src: Any, *a: Any, **k: Any) -> Any:
                    paths = [src, a[0]] if rename else [src]
                    tracked = [os.path.realpath(p) for p in paths
                               if isinstance(p, str) and os.path.realpath(p) in rec.paths]
                    real_src = os.path.realpath(src) if isinstance(src, str) else None
                    r = orig(src, *a, **k)
                    for p in tracked:
                        rec._caller_ok(p, what)
                    if rename and isinstance(a[0], str) and real_src in rec.paths:
                        rec.paths.add(os.path.realpath(a[0]))
                        rec.events.append(Event("rename", real_src, data=os.path.realpath(
                            a[0]).encode()))
                    elif what == "unlink" and tracked:
                        rec.events.append(Event("unlink", tracked[0]))
                    return r
                return f
            return make

        self._wrap(os, "replace", by_path("rename", rename=True))
        self._wrap(os, "rename", by_path("rename", rename=True))
        self._wrap(os, "unlink", by_path("unlink"))
        self._wrap(os, "remove", by_path("unlink"))
        self._wrap(os, "chmod", by_path("chmod"))
        self._wrap(os, "pwrite", pwrite)
        self._wrap(os, "pwritev", pwritev)
        self._wrap(os, "write", write)
        if hasattr(os, "copy_file_range"):
            self._wrap(os, "copy_file_range", copy_file_range)
        self._wrap(os, "ftruncate", ftruncate)
        self._wrap(os, "fsync", sync)
        self._wrap(os, "fdatasync", sync)
        self._wrap(os, "posix_fallocate", posix_fallocate)
        self._wrap(os, "open", osopen)
        if callable(getattr(hostfile, "_fallocate", None)):
            self._wrap(hostfile, "_fallocate", fallocate)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------- replaying
Selection = list[tuple[Event, "set[int] | None"]]  # event, pieces applied (None: all)


def apply(files: dict[Any, bytearray], ev: Event, pieces: set[int] | None = None,
          ino: int | None = None) -> None:
    """Apply one change to ``files`` (``pieces``: only those sector pieces of it;
    ``ino``: ``files`` is keyed by inode, this one is the event's file)."""
    if ino is not None:
        if ev.kind in ("rename", "unlink", "dirsync"):
            raise ValueError("namespace changes have no inode")
        key: Any = ino
    else:
        key = ev.path
    if ev.kind == "rename":
        if ev.path in files:
            files[ev.data.decode()] = files.pop(ev.path)
        return
    if ev.kind == "unlink":
        files.pop(ev.path, None)
        return
    buf = files.setdefault(key, bytearray())
    if ev.kind == "write":
        if pieces is None:
            _put(buf, ev.off, ev.data)
        else:
            for k, (s, e) in enumerate(ev.pieces()):
                if k in pieces:
                    _put(buf, s, ev.data[s - ev.off : e - ev.off])
    elif ev.kind == "trunc":
        if ev.off < len(buf):
            del buf[ev.off :]
        else:
            buf.extend(bytes(ev.off - len(buf)))
    elif ev.kind == "falloc":
        end = ev.off + ev.length
        if not ev.mode & FALLOC_KEEP_SIZE and end > len(buf):
            buf.extend(bytes(end - len(buf)))
        if ev.mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            for k, (s, e) in enumerate(ev.pieces()):
                if (pieces is None or k in pieces) and s < len(buf):
                    e = min(e, len(buf))
                    buf[s:e] = bytes(e - s)
        elif ev.mode & ~FALLOC_KEEP_SIZE:
            raise ValueError(f"fallocate mode {ev.mode:#x} is not modelled")


def _put(buf: bytearray, off: int, data: bytes) -> None:
    if off > len(buf):
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(data)] = data


def replay_all(base: dict[str, bytes | None], events: list[Event]) -> dict[str, bytearray]:
    files = {p: bytearray(b) for p, b in base.items() if b is not None}
    for ev in events:
        if ev.kind not in ("sync", "dirsync", "mark"):
            apply(files, ev)
    return files


@dataclass
class CrashPoint:
    """The moment just before log entry ``index`` (a sync, or the end of the log), with
    ``dir_changes`` of the ``dir_pending`` renames / removals not yet made durable by a
    directory sync applied."""

    index: int
    durable: dict[str, bytes]
    pending: list[Event]
    dir_changes: int = 0
    dir_pending: int = 0


def crash_points(base: dict[str, bytes | None], events: list[Event]) -> Iterator[CrashPoint]:
    """Crash points of the log.  File contents live in inodes: a name's content moves
    with a rename.  A rename or removal is durable once its folder is synced
    (``dirsync``); before that, any prefix of the pending ones may have reached the disk
    (a journalling file system commits them in order), so a crash point is yielded per
    prefix.  Creating a file is taken as durable at once (it comes before anything done
    to the file, so a durable rename of it implies it anyway)."""
    names: dict[str, int] = {}  # the names as the program sees them -> inode
    durable_names: dict[str, int] = {}
    content: dict[int, bytearray] = {}  # inode -> durable content
    order: list[tuple[int, Event]] = []  # pending content changes, in issue order
    dir_pending: list[Event] = []

    def inode(path: str) -> int:
        if path not in names:
            ino = len(content)
            content[ino] = bytearray()
            names[path] = ino
            durable_names.setdefault(path, ino)
        return names[path]

    for p, b in base.items():
        if b is not None:
            inode(p)
            content[names[p]][:] = b

    def points(i: int) -> Iterator[CrashPoint]:
        for k in range(len(dir_pending) + 1):
            ns = dict(durable_names)
            for ev in dir_pending[:k]:
                ino = ns.pop(ev.path, None)
                if ev.kind == "rename" and ino is not None:
                    ns[ev.data.decode()] = ino
            name_of = {ino: name for name, ino in ns.items()}
            yield CrashPoint(
                i, {name: bytes(content[ino]) for name, ino in ns.items()},
                [_renamed(ev, name_of[ino]) for ino, ev in order if ino in name_of],
                k, len(dir_pending))

    for i, ev in enumerate(events):
        if ev.kind == "sync":
            yield from points(i)
            ino = inode(ev.path)
            for j, e in order:
                if j == ino:
                    apply(content, e, ino=ino)
            order = [(j, e) for j, e in order if j != ino]
        elif ev.kind == "dirsync":
            yield from points(i)
            for e in dir_pending:
                ino = durable_names.pop(e.path, None)
                if e.kind == "rename" and ino is not None:
                    durable_names[e.data.decode()] = ino
            dir_pending.clear()
        elif ev.kind == "rename":
            names[ev.data.decode()] = names.pop(ev.path)
            dir_pending.append(ev)
        elif ev.kind == "unlink":
            names.pop(ev.path, None)
            dir_pending.append(ev)
        elif ev.kind != "mark":
            order.append((inode(ev.path), ev))
    yield from points(len(events))


def _renamed(ev: Event, path: str) -> Event:
    return ev if ev.path == path else Event(ev.kind, path, ev.off, ev.data, ev.length,
                                            ev.mode, ev.mark)


def build(cp: CrashPoint, sel: Selection) -> dict[str, bytearray]:
    files = {p: bytearray(b) for p, b in cp.durable.items()}
    for ev, pieces in sel:
        apply(files, ev, pieces)
    return files


def selections(cp: CrashPoint, rng: random.Random, n_random: int, prefixes: bool = True
               ) -> list[tuple[str, Selection]]:
    """Crash states at ``cp``: none of the pending changes, all of them, every prefix and
    every "all but one" (if ``prefixes``), and ``n_random`` random subsets with torn
    writes."""
    pend = cp.pending
    out: list[tuple[str, Selection]] = [("none", [])]
    if pend:
        out.append(("all", [(e, None) for e in pend]))
    if prefixes:
        out += [(f"prefix{k}", [(e, None) for e in pend[:k]]) for k in range(1, len(pend))]
        if len(pend) > 2:
            out += [(f"all-but{k}", [(e, None) for i, e in enumerate(pend) if i != k])
                    for k in range(len(pend))]
    for r in range(n_random if pend else 0):
        sel: Selection = []
        for e in pend:
            x = rng.random()
            if x < 0.4:
                sel.append((e, None))
            elif x < 0.7 and len(e.pieces()) > 1:
                k = len(e.pieces())
                sel.append((e, {i for i in range(k) if rng.random() < 0.5}))
            elif x < 0.7 and len(e.pieces()) == 1:
                sel.append((e, None))
        out.append((f"random{r}", sel))
    return out


# ------------------------------------------------------------------------- promises
@dataclass
class GuestOp:
    """One guest operation after the baseline flush: its range, whether it completed
    with FUA, and the guest content of its sector-aligned span right after it."""

    start: int
    end: int
    fua_done: bool
    span_start: int
    after: bytes


@dataclass
class Promises:
    baseline: bytes
    later: list[GuestOp] = field(default_factory=list)

    def check(self, got: bytes) -> str | None:
        """None if ``got`` (the guest content of a crash state) keeps every promise,
        else what is wrong."""
        base = self.baseline
        if len(got) != len(base):
            return f"guest size {len(got)} != {len(base)}"
        spans = _merge([(o.start // SECTOR * SECTOR, -(-o.end // SECTOR) * SECTOR)
                        for o in self.later])
        pos = 0
        for s, e in [*spans, (len(base), len(base))]:
            e = min(e, len(base))
            if got[pos:s] != base[pos:s]:
                bad = pos + _first_diff(got[pos:s], base[pos:s])
                return (f"guest byte {bad} reads {got[bad]:#04x} but was flushed as "
                        f"{base[bad]:#04x} and no later operation touched it")
            pos = max(pos, e)
        for s, e in spans:
            for a in range(s, min(e, len(base)), SECTOR):
                err = self._check_sector(got, a, min(a + SECTOR, len(base)))
                if err:
                    return err
        return None

    def _check_sector(self, got: bytes, a: int, b: int) -> str | None:
        ops = [o for o in self.later if o.start < b and a < o.end]
        sector = got[a:b]
        if not any(o.fua_done for o in ops):
            if sector == self.baseline[a:b] or any(
                    o.after[a - o.span_start : b - o.span_start] == sector for o in ops):
                return None
        for i in range(a, b):
            allowed: set[int] = set()
            touching = [o for o in ops if o.start <= i < o.end]
            last_fua = max((k for k, o in enumerate(touching) if o.fua_done), default=-1)
            if last_fua < 0:
                allowed.add(self.baseline[i])
            for o in touching[max(last_fua, 0):]:
                allowed.add(o.after[i - o.span_start])
            if got[i] not in allowed:
                what = "a FUA write" if last_fua >= 0 else "the last flush and the writes since"
                return (f"guest byte {i} reads {got[i]:#04x}; {what} allow only "
                        f"{sorted(allowed)}")
        return None


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _first_diff(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:  # bisect on slices: fast for large buffers
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next((i for i in range(lo, hi) if a[i] != b[i]), hi)
