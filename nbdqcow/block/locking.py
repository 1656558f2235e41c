"""qemu's image file locks, so that nbdqcow and qemu's tools exclude each other exactly as
two qemu processes do.

The scheme (qemu ``block/file-posix.c``, checked against qemu 7.2 with /proc/locks and
strace): open-file-description byte-range locks (``F_OFD_SETLK``/``F_OFD_GETLK``) on the
image file itself, always *shared* (read) locks:

* holding permission *n* is a shared lock on byte ``100 + n``;
* refusing to share permission *n* is a shared lock on byte ``200 + n``;
* after taking its locks an opener tests, with ``F_OFD_GETLK`` for an *exclusive* lock,
  byte ``200 + n`` for every permission it holds (does anyone refuse to share it?) and
  byte ``100 + n`` for every permission it refuses to share (does anyone hold it?).

Permissions (qemu's BLK_PERM_*): consistent read 0, write 1, write unchanged 2, resize 3.
The locks belong to the open file description, so they live exactly as long as the
HostFile that took them, and a second open of the same file (even in this process) is
judged like any other process.

What each opener holds and shares, as measured on qemu 7.2 (see :class:`Access`):

=====================================  ======================  =====================
file, opened by                        holds                   refuses to share
=====================================  ======================  =====================
qcow2 image, writable                  read, write, resize     write, resize
qcow2 image, read-only                 read                    write, resize
qcow2 image, headers only (info)       --                      write, resize
qcow2 external data file, writable     read, write, resize     resize
qcow2 external data file, read-only    read                    resize
raw image, qemu-nbd export             read (+ write)          resize
raw image, qemu-img/qemu-io            read (+ write)          --
backing file (any layer below top)     read                    as its format says
new file being created                 write, resize           resize
any of these with -U / force-share     read (info: --)         --
=====================================  ======================  =====================
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from dataclasses import dataclass, replace

from nbdqcow.errors import ImageOpenError

PERM_BASE = 100
SHARED_BASE = 200


class Perm(enum.IntFlag):
    """qemu's block permissions (BLK_PERM_*), bit n = lock byte 100 + n / 200 + n."""

    NONE = 0
    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
_PERMS = tuple(PERM_NAMES)  # in bit order: the order qemu takes and tests them


@dataclass(frozen=True)
class LockMode:
    """The permissions one open holds and those it lets others hold."""

    perm: Perm
    shared: Perm = PERM_ALL

    @property
    def unshared(self) -> Perm:
        return PERM_ALL & ~self.shared

    def lock_bytes(self) -> list[int]:
        """Every byte this mode keeps a shared lock on, in the order they are taken."""
        held = [PERM_BASE + p.bit_length() - 1 for p in _PERMS if self.perm & p]
        refused = [SHARED_BASE + p.bit_length() - 1 for p in _PERMS if self.unshared & p]
        return held + refused

    def tests(self) -> list[tuple[int, str]]:
        """(byte, message) for every byte that must be free of other openers' locks, in
        qemu's order; the message is qemu's error when it is not."""
        out = [(SHARED_BASE + p.bit_length() - 1, f'Failed to get "{PERM_NAMES[p]}" lock')
               for p in _PERMS if self.perm & p]
        out += [(PERM_BASE + p.bit_length() - 1, f'Failed to get shared "{PERM_NAMES[p]}" lock')
                for p in _PERMS if self.unshared & p]
        return out


# ------------------------------------------------------------------ who opens what
_READ, _WRITE, _RESIZE = Perm.CONSISTENT_READ, Perm.WRITE, Perm.RESIZE


@dataclass(frozen=True)
class Access:
    """How an image is being opened, as far as locks go.

    ``write``: the image will be written.  ``io``: guest data will be read (False for
    header-only inspection, qemu-img info).  ``force_share``: -U / --force-share, only
    with read-only opens: share everything, hold nothing but reads.  ``shared``: what
    the user of the top image lets others do besides what the format refuses (a qemu-nbd
    export refuses resize; qemu-img and qemu-io refuse nothing).  ``enabled``: the file
    driver's ``locking=on|off|auto`` (False takes and tests no lock at all).
    ``chain_shared``: ``shared`` applies to the backing files too (qemu-img convert's
    source refuses writers on every layer); otherwise the layers below share everything.
    """

    write: bool = False
    io: bool = True
    force_share: bool = False
    shared: Perm = PERM_ALL
    enabled: bool = True
    chain_shared: bool = False

    def __post_init__(self) -> None:
        if self.force_share and self.write:
            raise ImageOpenError("force-share=on can only be used with read-only images")

    def _mode(self, perm: Perm, unshared: Perm) -> LockMode | None:
        if not self.enabled:
            return None
        if not self.io:
            perm &= ~_READ
        if self.force_share:
            return LockMode(perm, PERM_ALL)
        return LockMode(perm, PERM_ALL & ~unshared)

    def image(self, fmt: str) -> LockMode | None:
        """The lock mode for the image file of format ``fmt`` ('qcow2' or 'raw')."""
        if fmt == "qcow2":
            # qcow2 owns its metadata: nobody else may write or resize the file
            perm = _READ | (_WRITE | _RESIZE if self.write else Perm.NONE)
            return self._mode(perm, _WRITE | _RESIZE | (PERM_ALL & ~self.shared))
        # raw passes its user's permissions and sharing through to the file
        return self._mode(_READ | (_WRITE if self.write else Perm.NONE), PERM_ALL & ~self.shared)

    def data_file(self) -> LockMode | None:
        """The lock mode for a qcow2 image's external data file."""
        return self._mode(_READ | (_WRITE | _RESIZE if self.write else Perm.NONE), _RESIZE)

    def backing(self) -> Access:
        """How the layers below the image are opened: read-only, sharing everything
        (their own format may still refuse to share, as qcow2 does)."""
        return replace(self, write=False, io=True,
                       shared=self.shared if self.chain_shared else PERM_ALL)


def create_mode(enabled: bool = True) -> LockMode | None:
    """The lock mode qemu-img create holds while it truncates and formats a file."""
    return LockMode(_WRITE | _RESIZE, PERM_ALL & ~_RESIZE) if enabled else None


def parse_locking(value: str | None) -> bool:
    """The file driver's ``locking`` option: on, off or auto (default) -> enabled."""
    if value in (None, "auto"):
        return ofd_locks_supported()
    if value == "on":
        return True
    if value == "off":
        return False
    raise ImageOpenError(f"Parameter 'locking' does not accept value '{value}'")


# ------------------------------------------------------------------ the fcntl calls
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("@hhqqi4x")
_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel answered."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return int(_FLOCK.unpack(out)[0])


def ofd_locks_supported() -> bool:
    """Whether the kernel has OFD locks (Linux 3.15+); qemu's locking=auto needs them."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def lock_byte(fd: int, byte: int) -> None:
    _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, byte)


def unlock_byte(fd: int, byte: int) -> None:
    _flock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, byte)


def byte_is_free(fd: int, byte: int) -> bool:
    """True when no other open file description holds a lock on ``byte``."""
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) == fcntl.F_UNLCK


class ImageLocked(ImageOpenError):
    """Another opener's locks forbid this open.  The text is qemu's: ``reason`` ('Failed
    to get "write" lock'), then 'Is another process using the image [path]?' naming the
    locked file, then (nbdqcow's own) who holds the lock.  ``context`` is what the open
    was part of ('Could not open backing file: '), as qemu prefixes it."""

    def __init__(self, path: str, reason: str | None = None, holders: list[str] | None = None,
                 context: str = "") -> None:
        if reason is None:  # re-raised from its text alone (``type(e)(message)``)
            self.path, self.reason, self.holders, self.context = "", path, [], ""
            super().__init__(path)
            return
        self.path = path
        self.reason = reason
        self.holders = holders or []
        self.context = context
        text = f"{context}{reason}\nIs another process using the image [{path}]?"
        if self.holders:
            text += f"\nThe lock is held by {', '.join(self.holders)}."
        super().__init__(text)

    def within(self, context: str) -> ImageLocked:
        """The same refusal, as part of a larger open (qemu's error prefixes)."""
        if not self.path:
            return ImageLocked(context + str(self))
        return ImageLocked(self.path, self.reason, self.holders, context + self.context)


def _fail(fd: int, path: str, byte: int, err: OSError) -> ImageOpenError:
    if err.errno in (errno.EAGAIN, errno.EACCES):
        return ImageLocked(path, f"Failed to lock byte {byte}", holders_of(fd, byte))
    return ImageOpenError(f"Failed to lock byte {byte}: {os.strerror(err.errno or 0)}")


def acquire(fd: int, path: str, mode: LockMode) -> None:
    """Take ``mode``'s locks on ``fd`` and test the other side's bytes; on a conflict
    drop them again and raise :class:`ImageLocked` with qemu's message."""
    taken: list[int] = []
    try:
        for byte in mode.lock_bytes():
            try:
                lock_byte(fd, byte)
            except OSError as e:
                raise _fail(fd, path, byte, e) from None
            taken.append(byte)
        for byte, message in mode.tests():
            try:
                free = byte_is_free(fd, byte)
            except OSError as e:
                raise _fail(fd, path, byte, e) from None
            if not free:
                raise ImageLocked(path, message, holders_of(fd, byte))
    except BaseException:
        for byte in taken:
            try:
                unlock_byte(fd, byte)
            except OSError:
                pass
        raise


def release(fd: int, mode: LockMode) -> None:
    for byte in mode.lock_bytes():
        unlock_byte(fd, byte)


# ------------------------------------------------------------------ who holds it
def holders_of(fd: int, byte: int) -> list[str]:
    """'qemu-nbd (pid 1234)' for every process whose open of the same file holds a lock
    on ``byte`` (from /proc/PID/fdinfo; processes we may not inspect are not named)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return []
    me = (os.getpid(), fd)
    found: dict[int, str] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for name in fds:
            if (pid, int(name)) == me or pid in found:
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "lock:" in text and _holds(text, st, byte):
                found[pid] = f"{_process_name(pid)} (pid {pid})"
    return [found[p] for p in sorted(found)]


def _holds(fdinfo: str, st: os.stat_result, byte: int) -> bool:
    """Whether an fdinfo text lists a lock on (st's file, byte).  Lines look like
    ``lock:\\t1: OFDLCK ADVISORY  READ -1 fe:00:2147109 100 101``."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in fdinfo.splitlines():
        if not line.startswith("lock:"):
            continue
        parts = line.split()
        if len(parts) < 8 or parts[-3] != dev:
            continue
        start, end = parts[-2], parts[-1]
        try:
            lo = int(start)
            hi = int(end) if end != "EOF" else 1 << 63
        except ValueError:
            continue
        if lo <= byte <= hi:
            return True
    return False


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    for i, arg in enumerate(argv[:4]):
        base = os.path.basename(arg)
        if base.startswith("nbdqcow") or (arg == "-m" and i + 1 < len(argv)
                                           and argv[i + 1].startswith("nbdqcow")):
            return "nbdqcow"
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return os.path.basename(argv[0]) if argv else "?"
