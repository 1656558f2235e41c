"""The C library through ctypes, loaded once per process.

``ctypes.util.find_library`` runs ``ldconfig -p`` (2-3 ms here) on every call: the
modules that call into libc (fallocate and sync_file_range, cachestat(2) and
io_uring's system calls, glibc's malloc tuning) share this one handle.  Functions
taken by attribute (``libc().fallocate``) are shared by every user; a module that
types a function its own way takes its own object with ``libc()["name"]``."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """libc, with errno kept for ``ctypes.get_errno()``."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
