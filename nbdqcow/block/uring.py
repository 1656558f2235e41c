"""Reads that wait for the disk without a thread: a small io_uring (Linux 5.6+).

A cold READ on the event loop would block it; handing it to a worker thread costs a
thread hop, a loop wake-up and GIL hand-offs per request (and 16 threads contending
for the GIL at QD16).  Here the loop queues the read in the submission ring, one
``io_uring_enter`` submits every read queued since (returning at once), kernel worker
threads do the reads (up to 64, as qemu-nbd's thread pool), and the loop learns of
completions through an eventfd the kernel signals (``IORING_REGISTER_EVENTFD``):
the disk sees the client's queue depth and no thread runs Python.

Only reads: nothing here changes a file.  The ring is driven with the raw system calls
and ``mmap`` (no liburing binding needed); its memory is read and written from Python,
whose stores and loads are ordered as the ring protocol needs on x86-64 only, so
:func:`open_ring` returns None elsewhere (and where the kernel or a seccomp filter
refuses io_uring): callers then use threads.

A buffer handed to :meth:`Ring.read` stays referenced by the ring until its completion
has been reaped, so the kernel never writes into freed memory; :meth:`Ring.close`
waits for every read still in flight before it unmaps the ring.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

from nbdqcow.block.libc import libc

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427  # the same on every architecture
_REGISTER_EVENTFD, _REGISTER_IOWQ_MAX_WORKERS = 4, 19
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1 << 0
_ENTER_GETEVENTS = 1 << 0
_SQ_CQ_OVERFLOW = 1 << 1  # in the submission ring's flags
_OP_READ = 22
#: IOSQE_ASYNC: run the read in a kernel worker thread at once.  Without it the kernel
#: starts a read that misses the page cache in the submitting thread and finishes it
#: there too (task work): every page-cache miss -- page allocation, block I/O
#: submission, a virtio notification (a VM exit on a virtual machine) -- then costs
#: the event loop's one thread.  Measured on a 2-CPU VM, cold 4 KiB reads at QD16:
#: 8-10k reads/s without, 40-44k with (and 32 workers), 16 Python threads 35-42k.
_SQE_ASYNC = 1 << 4
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe (64 bytes)
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe (16 bytes)
_U32 = struct.Struct("<I")
# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets (each
# 8 u32 and a u64)
_PARAMS = struct.Struct("<10I" + "8IQ" + "8IQ")

_syscall = libc()["syscall"]  # a function object of our own (others may type theirs)
_syscall.restype = ctypes.c_long
#: io_uring_enter(fd, to_submit, min_complete, flags, sig, sigsz): typed once, so that a
#: call converts plain ints quickly (glibc's syscall() only moves registers)
_syscall_enter = libc()["syscall"]
_syscall_enter.restype = ctypes.c_long
_syscall_enter.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t]

#: what a completion hands back: the result (bytes read, or -errno)
Done = Callable[[int], None]


def _enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    r: int = _syscall_enter(_SYS_ENTER, fd, to_submit, min_complete, flags, None, 0)
    return r if r >= 0 else -ctypes.get_errno()


class Ring:
    """One io_uring for reads; use from one thread only."""

    def __init__(self, fd: int, params: tuple[int, ...], efd: int) -> None:
        self.fd = fd
        self.efd = efd
        sq_entries, cq_entries, _flags, _cpu, _idle, features = params[:6]
        sq_off, cq_off = params[10:19], params[19:28]
        self.entries = sq_entries
        sq_size = sq_off[6] + sq_entries * 4  # array
        cq_size = cq_off[5] + cq_entries * _CQE.size  # cqes
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if features & _FEAT_SINGLE_MMAP:
            self._sq = self._cq = mmap.mmap(fd, max(sq_size, cq_size), mmap.MAP_SHARED, prot,
                                            offset=_OFF_SQ_RING)
        else:
            self._sq = mmap.mmap(fd, sq_size, mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
            self._cq = mmap.mmap(fd, cq_size, mmap.MAP_SHARED, prot, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(fd, sq_entries * _SQE.size, mmap.MAP_SHARED, prot,
                               offset=_OFF_SQES)
        self._sq_tail_at, self._sq_mask = sq_off[1], _U32.unpack_from(self._sq, sq_off[2])[0]
        self._sq_flags_at = sq_off[4]
        self._cq_head_at, self._cq_tail_at = cq_off[0], cq_off[1]
        self._cq_mask = _U32.unpack_from(self._cq, cq_off[2])[0]
        self._cqes_at = cq_off[5]
        for i in range(sq_entries):  # slot i of the array always names SQE i
            _U32.pack_into(self._sq, sq_off[6] + 4 * i, i)
        self._tail = _U32.unpack_from(self._sq, self._sq_tail_at)[0]
        self._cq_head = _U32.unpack_from(self._cq, self._cq_head_at)[0]
        self._unsubmitted = 0
        self._next = 0
        self.overflows = 0  # times completions had to be fetched from the overflow list
        #: user_data -> (buffer export that pins the buffer, completion)
        self._inflight: dict[int, tuple[Any, Done]] = {}

    def fileno(self) -> int:
        """An eventfd that turns readable (poll/epoll) when a read completes."""
        return self.efd

    @property
    def busy(self) -> int:
        """Reads queued or in flight."""
        return len(self._inflight)

    def read(self, fd: int, buf: bytearray | memoryview, offset: int, done: Done) -> bool:
        """Queue a read of ``len(buf)`` bytes of ``fd`` at ``offset`` into ``buf``;
        ``done(result)`` runs from :meth:`reap`.  False (nothing queued) when the ring
        is full.  Call :meth:`submit` to start what is queued."""
        if len(self._inflight) >= self.entries or self.fd < 0:
            return False
        n = len(buf)
        if not n:
            return False
        pin = ctypes.c_char.from_buffer(buf)  # its first byte; pins the buffer too
        self._next = key = (self._next + 1) & 0xFFFFFFFFFFFF
        tail = self._tail
        _SQE.pack_into(self._sqes, (tail & self._sq_mask) * _SQE.size, _OP_READ, _SQE_ASYNC, 0, fd,
                       offset, ctypes.addressof(pin), n, 0, key, 0, 0, 0, 0, 0)
        self._tail = tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail_at, tail)  # publish (x86-64: ordered)
        self._inflight[key] = (pin, done)
        self._unsubmitted += 1
        return True

    def submit(self) -> None:
        """Hand every queued read to the kernel (one system call)."""
        while self._unsubmitted:
            r = _enter(self.fd, self._unsubmitted, 0, 0)
            if r < 0:
                if r == -errno.EINTR:
                    continue
                if r in (-errno.EAGAIN, -errno.EBUSY):
                    return  # retried on the next submit or reap
                raise OSError(-r, os.strerror(-r))
            self._unsubmitted -= r
            if r == 0:
                return

    def reap(self) -> int:
        """Run the completion of every finished read; how many there were."""
        try:  # cleared before the ring is read: a completion after that sets it again
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        cq = self._cq
        head = self._cq_head
        tail = _U32.unpack_from(cq, self._cq_tail_at)[0]
        n = 0
        inflight = self._inflight
        while head != tail:
            key, res, _ = _CQE.unpack_from(cq, self._cqes_at + (head & self._cq_mask) * _CQE.size)
            head = (head + 1) & 0xFFFFFFFF
            n += 1
            entry = inflight.pop(key, None)
            if entry is not None:
                entry[1](res)
            if head == tail:  # hand the slots back; completions may have come meanwhile
                _U32.pack_into(cq, self._cq_head_at, head)
                tail = _U32.unpack_from(cq, self._cq_tail_at)[0]
        self._cq_head = head
        if _U32.unpack_from(self._sq, self._sq_flags_at)[0] & _SQ_CQ_OVERFLOW:
            # completions the kernel kept aside (seen on 6.18 with an almost empty
            # completion ring): they reach the ring only through io_uring_enter
            self.overflows += 1
            _enter(self.fd, 0, 0, _ENTER_GETEVENTS)
            return n + self.reap()
        if self._unsubmitted:
            self.submit()
        return n

    def close(self) -> None:
        """Wait for the reads in flight (their buffers must outlive them), then free
        the ring.  Their completions are not run."""
        if self.fd < 0:
            return
        for _ in range(10000):
            if not self._inflight:
                break
            if self._unsubmitted:
                self.submit()
            r = _enter(self.fd, 0, 1, _ENTER_GETEVENTS)
            if r < 0 and r not in (-errno.EINTR, -errno.EAGAIN, -errno.EBUSY):
                break
            self._reap_silently()
        if self._inflight:  # the kernel still owns these buffers: never free them
            _LEAKED.append(self._inflight)
        self._inflight = {}
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.fd)
        os.close(self.efd)
        self.fd = self.efd = -1

    def _reap_silently(self) -> None:
        cq = self._cq
        tail = _U32.unpack_from(cq, self._cq_tail_at)[0]
        head = self._cq_head
        while head != tail:
            key = _CQE.unpack_from(cq, self._cqes_at + (head & self._cq_mask) * _CQE.size)[0]
            self._inflight.pop(key, None)
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head_at, head)
        self._cq_head = head


#: buffers of reads that never completed before their ring was closed
_LEAKED: list[object] = []


def open_ring(entries: int = 256, workers: int = 64) -> Ring | None:
    """A new ring whose reads run in up to ``workers`` kernel threads, or None where
    io_uring cannot be used (not x86-64, an old kernel, io_uring disabled by sysctl or
    seccomp)."""
    if platform.machine() not in ("x86_64", "AMD64", "amd64"):
        return None
    params = ctypes.create_string_buffer(_PARAMS.size)
    fd = _syscall(ctypes.c_long(_SYS_SETUP), ctypes.c_uint(entries), params)
    if fd < 0:
        return None
    values = _PARAMS.unpack(params.raw)
    if not values[0]:
        os.close(fd)
        return None
    # as many kernel workers as reads the ring holds (the default is 4 per CPU): each
    # waits for one read, as a thread of qemu's pool does (failure: the default stays)
    limits = (ctypes.c_uint * 2)(min(entries, workers), 0)
    _register(fd, _REGISTER_IOWQ_MAX_WORKERS, limits, 2)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if _register(fd, _REGISTER_EVENTFD, ctypes.c_int(efd), 1) < 0:
        os.close(efd)
        os.close(fd)
        return None
    try:
        return Ring(fd, values, efd)
    except (OSError, ValueError):
        os.close(efd)
        os.close(fd)
        return None


def _register(fd: int, opcode: int, arg: Any, nr_args: int) -> int:
    r: int = _syscall(ctypes.c_long(_SYS_REGISTER), ctypes.c_int(fd), ctypes.c_uint(opcode),
                      ctypes.byref(arg), ctypes.c_uint(nr_args))
    return r
