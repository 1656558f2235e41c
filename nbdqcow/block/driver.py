"""The BlockDriver seam: what the server (and the commands) know of an image.

Drivers are synchronous and thread-safe: the server calls small requests inline on
its event loop and may call large ones from a worker thread.  Every method may raise
the exceptions of :mod:`nbdqcow.errors`; the server maps them to NBD errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; the server advertises exactly this."""

    writable: bool = False
    flush: bool = False
    discard: bool = False
    write_zeroes: bool = False
    fast_zero: bool = False
    block_status: bool = False
    allocation_depth: bool = False
    # True when pwrite(fua=True) makes the data stable by itself; else the server flushes.
    native_fua: bool = False
    cache: bool = False
    # writes are done in units of this many bytes (unaligned ones by read-modify-write):
    # the export's minimum block size (qemu's request_alignment)
    request_alignment: int = 1


class Extent(NamedTuple):
    """One run of a block-status answer, in the terms of ``qemu-img map``.

    ``present``: allocated somewhere in the chain (this image or a backing file).
    ``data``: reads from stored data (not known zero, not a hole).
    ``zero``: reads as zeros.
    ``depth``: chain layer that answered (0 = this image, 1 = first backing file...);
    for runs not present anywhere, the depth of the bottom layer.
    ``offset``: host offset in ``filename`` when the run maps to host bytes, else None.
    ``reserved``: see the field.
    """

    start: int
    length: int
    present: bool
    data: bool
    zero: bool
    depth: int
    offset: int | None
    filename: str | None = None
    # host space is kept for this run and a write lands there in place (no allocation,
    # no fragmentation): NBD base:allocation reports it without HOLE even when zero
    reserved: bool = False

    @property
    def allocation_depth(self) -> int:
        """qemu:allocation-depth: 0 unallocated, 1 this image, 2 first backing..."""
        return self.depth + 1 if self.present else 0


class DirtyRun(NamedTuple):
    """One run of a dirty bitmap (qemu:dirty-bitmap:NAME): written while it tracked, or not."""

    start: int
    length: int
    dirty: bool


class DirtyBitmapSource(Protocol):
    """A persistent dirty bitmap the server exports (qemu-nbd -B NAME)."""

    @property
    def name(self) -> str: ...

    def dirty_runs(self, offset: int, length: int, max_runs: int) -> list[DirtyRun]:
        """Maximal runs from ``offset``: they cover [offset, offset+length), or a prefix
        of it when there would be more than ``max_runs``."""
        ...


@runtime_checkable
class BlockDriver(Protocol):
    """Size and pread are required; the rest is announced by ``caps``."""

    @property
    def size(self) -> int: ...

    @property
    def caps(self) -> Capabilities: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        """pread into ``buf`` (len(buf) bytes at ``offset``); avoids a fresh buffer.
        ``nowait``: raise WouldBlock rather than wait for guest data to come from disk
        (the server then retries in a worker thread)."""
        ...

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        """(file descriptor, position) when guest [offset, offset+length) is stored
        as-is and contiguously in one host file, so that the server may send it with
        sendfile(2); None otherwise.  Only where that host range will not be handed to
        other guest data while a reply may still be reading it (see Qcow2Driver)."""
        ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...

    def close(self) -> None: ...
