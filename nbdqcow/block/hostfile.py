"""The only code that touches image files: pread/pwrite/fsync/fallocate/punch-hole."""

from __future__ import annotations

import errno
import functools
import os
import threading
from typing import Any

from nbdqcow.block.locking import LockMode, acquire
from nbdqcow.block.writebehind import MIN_WRITE, WriteBehind
from nbdqcow.block.zeros import fill_zero
from nbdqcow.errors import NowaitUnsupported, WouldBlock

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_SYNC_FILE_RANGE_WRITE = 2
#: copy_file_range errors after which a copy goes through a buffer instead
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                             errno.EBADF, errno.ETXTBSY})
_COPY_BUFFER = 1 << 20


@functools.cache
def _libc() -> tuple[Any, Any]:
    """libc's (fallocate, sync_file_range or None) through ctypes, loaded on first use
    (ctypes.util.find_library runs ldconfig: every command would pay it at start-up)."""
    import ctypes

    from nbdqcow.block.libc import libc as load_libc

    libc = load_libc()
    fallocate = libc["fallocate"]
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    try:
        sync_file_range = libc["sync_file_range"]
    except AttributeError:
        sync_file_range = None
    if sync_file_range is not None:
        sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        sync_file_range.restype = ctypes.c_int
    return fallocate, sync_file_range


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with flags (os.posix_fallocate has none): 0, or -1 with the error in
    ctypes' errno."""
    return int(_libc()[0](fd, mode, offset, length))

def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes of ``fd`` at ``offset``; past the end of the file they read as
    zeros (a short read only happens there)."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        out = bytearray(data)
        while len(out) < length:
            chunk = os.pread(fd, length - len(out), offset + len(out))
            if not chunk:
                out += bytes(length - len(out))
                break
            out += chunk
        data = bytes(out)
    return data


#: set by commands that inspect metadata only (map, check, info): files they open read-only
#: get no readahead
METADATA_ONLY = False


class HostFile:
    """One open host file.  Reads past the end of the file return zeros.

    ``lock``: qemu's image locks (see :mod:`nbdqcow.block.locking`) to take on this open;
    they are held on this file's own descriptor until :meth:`close`, and an open that
    conflicts with another opener's locks raises ``ImageLocked`` before anything is read
    or written.  ``create``: create the file if it is missing (never truncated here: the
    caller truncates once it holds its locks).
    """

    def __init__(self, path: str, writable: bool, direct: bool = False, *,
                 lock: LockMode | None = None, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        flags |= getattr(os, "O_CLOEXEC", 0)
        if direct:
            flags |= getattr(os, "O_DIRECT", 0)
        if create:
            flags |= os.O_CREAT
        self.path = path
        self.writable = writable
        self.direct = direct
        self.fd = os.open(path, flags, 0o644)
        self.lock = lock
        if lock is not None:
            try:
                acquire(self.fd, path, lock)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
        if METADATA_ONLY and not writable:
            # no readahead: an inspection reads tables only, and readahead (8 MiB on
            # some disks) would pull data pages in; SEEK_DATA counts cached pages of an
            # unwritten extent as data, so the map would depend on what was read before
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._size_lock = threading.Lock()
        self._kernel_copy = hasattr(os, "copy_file_range")
        #: False: :meth:`sync` does nothing (qemu's cache=unsafe, asked for by the user)
        self.syncs = True
        # streamed writes start their way to the disk early (see writebehind.py); not
        # with O_DIRECT (nothing is left in the page cache)
        self.write_behind = WriteBehind() if writable and not direct else None
        # set by a failed fdatasync: the kernel may have dropped the dirty pages it could
        # not write, so a later fdatasync that succeeds proves nothing; every later sync
        # fails (as qemu's file driver does) instead of claiming durability
        self.sync_error: OSError | None = None

    # --- reads and writes ------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        return pread_full(self.fd, length, offset)

    def preadinto(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        """Fill ``buf`` from ``offset`` (zeros past the end of the file).  ``nowait``:
        raise WouldBlock instead of waiting for the disk (RWF_NOWAIT; data in the page
        cache only)."""
        if nowait:
            try:
                n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    raise NowaitUnsupported(str(e)) from None
                if e.errno in (errno.EAGAIN, errno.EINVAL):
                    raise WouldBlock(str(e)) from None
                raise
            if n < len(buf):  # partly cached (or the end of the file): wait for the rest
                raise WouldBlock(f"{n} of {len(buf)} bytes cached")
            return
        n = os.preadv(self.fd, [buf], offset)
        while n < len(buf):
            got = os.preadv(self.fd, [buf[n:]], offset + n)
            if got == 0:
                fill_zero(buf[n:])
                return
            n += got

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data)
        n = os.pwrite(self.fd, mv, offset)
        while n < len(mv):
            n += os.pwrite(self.fd, mv[n:], offset + n)
        wb = self.write_behind
        if wb is not None and n >= MIN_WRITE and self.syncs:  # cache=unsafe: no hurry
            wb.wrote(offset, n, self.start_writeback)

    def copy_from(self, src: HostFile, src_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes of ``src`` at ``src_offset`` to ``offset`` of this file
        inside the kernel (copy_file_range: the data never passes through user space,
        and a file system that can share blocks shares them); through a buffer where
        the kernel cannot (another file system, no copy_file_range).  Bytes past the end
        of ``src`` read as zeros, as :meth:`pread` has them."""
        while length > 0:
            n = 0
            if self._kernel_copy:
                try:
                    n = os.copy_file_range(src.fd, self.fd, length, src_offset, offset)
                except OSError as e:
                    if e.errno not in _NO_KERNEL_COPY:
                        raise
                    self._kernel_copy = False
                    continue
            else:
                data = os.pread(src.fd, min(length, _COPY_BUFFER), src_offset)
                if data:
                    self.pwrite(data, offset)
                n = len(data)
            if n == 0:  # the end of src
                self.write_zeros(offset, length)
                return
            src_offset, offset, length = src_offset + n, offset + n, length - n

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing the dirty pages of a range to the disk without waiting
        (sync_file_range WRITE; no durability promise: :meth:`sync` still makes it
        durable, only sooner).  Does nothing where the call is missing, or once the file
        is closed (write-behind may call it late from its thread)."""
        fd = self.fd
        sync_file_range = _libc()[1]
        if sync_file_range is not None and length > 0 and fd >= 0:
            sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def sync(self) -> None:
        if not self.syncs:
            return
        if self.sync_error is not None:
            raise OSError(errno.EIO, f"{self.path}: an earlier sync failed "
                          f"({self.sync_error.strerror}); data may be lost")
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            if not self.direct:
                self.sync_error = e
            raise
        if self.write_behind is not None:
            self.write_behind.synced()

    # --- size and space --------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        if _fallocate(self.fd, mode, offset, length) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def allocate(self, offset: int, length: int) -> None:
        """Reserve host blocks (may extend the file)."""
        if length > 0:
            os.posix_fallocate(self.fd, offset, length)

    def reserve(self, offset: int, length: int) -> bool:
        """Claim host blocks for a range without changing the file size (blocks past the
        end are kept for when the file grows), so that writing there later cannot fail
        for lack of space.  Raises OSError(ENOSPC) when the file system is full; False
        when the file system cannot reserve (no fallocate): writes then claim space as
        they happen."""
        try:
            self._fallocate(_FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (reads as zeros afterwards). False if unsupported."""
        try:
            self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros, keeping it allocated."""
        try:
            self._fallocate(_FALLOC_FL_ZERO_RANGE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwrite(memoryview(chunk)[:n], offset)
            offset += n
            length -= n

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, length, is_data) runs from SEEK_DATA/SEEK_HOLE over [offset, offset+length)."""
        end = offset + length
        fsize = self.size()
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            if pos >= fsize:
                runs.append((pos, end - pos, False))
                break
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    runs.append((pos, end - pos, False))
                    break
                return [(offset, length, True)]
            if data > pos:
                runs.append((pos, min(data, end) - pos, False))
                pos = min(data, end)
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            runs.append((pos, min(hole, end) - pos, True))
            pos = min(hole, end)
        return runs

    def close(self) -> None:
        """Close the file; its locks go with its open file description."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- whole files: probing, syncing, replacing (kept here so that this module stays the
# only code touching image files; the power-loss tests check it) -----------------------
def read_head(path: str, length: int) -> tuple[bytes, int]:
    """The first ``length`` bytes of ``path`` (fewer if it is shorter) and its size;
    no locks (a probe, as qemu's)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if METADATA_ONLY:  # its readahead would mark pages that start more of it later
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, length, 0), os.fstat(fd).st_size
    finally:
        os.close(fd)


def sync_path(path: str) -> None:
    """fsync a file (or a directory: makes a rename or creation in it durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(src: str, dst: str, durable: bool = True) -> None:
    """Rename ``src`` over ``dst`` and make the rename durable (the directory synced;
    ``durable=False``: not)."""
    os.replace(src, dst)
    if durable:
        sync_path(os.path.dirname(os.path.abspath(dst)) or ".")


def remove_file(path: str) -> None:
    """Remove ``path`` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def copy_mode(src: str, dst: str) -> None:
    """Give ``dst`` the permission bits of ``src``."""
    os.chmod(dst, os.stat(src).st_mode & 0o7777)
