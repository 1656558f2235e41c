"""Is a file range in the page cache?  (Linux cachestat(2), 6.5+; None when unknown.)

The server sends large READs straight from the page cache with sendfile(2) on its event
loop; it must not wait for a disk there, so it asks first.
"""

from __future__ import annotations

import ctypes
import errno

from nbdqcow.block.libc import libc

_SYS_CACHESTAT = 451  # the same number on every architecture (asm-generic table)
_PAGE = 4096


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_syscall = libc()["syscall"]
_syscall.restype = ctypes.c_long
_available = True


def cached(fd: int, offset: int, length: int) -> bool | None:
    """True when every page of [offset, offset+length) of ``fd`` is in the page cache,
    False when some is not, None when the kernel cannot tell (then assume not)."""
    global _available
    if not _available or length <= 0:
        return None if not _available else True
    first = offset // _PAGE
    pages = (offset + length + _PAGE - 1) // _PAGE - first
    rng = _Range(first * _PAGE, pages * _PAGE)
    st = _Stat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _available = False  # old kernel, or a seccomp filter: stop asking
        return None
    return bool(st.nr_cache >= pages)
