"""Raw images (optionally a window [offset, offset+size) of the host file).

A raw image whose format was *probed* must never start to look like another format:
``first_sector_check`` (given by the image layer, which knows the formats) names the
format a new first sector would probe as, and such a write is refused with EPERM, as
qemu's raw driver does.  Such an image advertises 512-byte requests as its minimum
(qemu's alignment for probed raw images); smaller writes into block 0 are merged with
the sector's current bytes before the check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from nbdqcow.block.driver import Capabilities, Extent
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import Access
from nbdqcow.block.ranges import check_range, check_write
from nbdqcow.errors import NotSupported, WriteRefused

SECTOR = 512


def sector_ceil(n: int) -> int:
    """``n`` rounded up to whole 512-byte sectors (qemu's length of a host file)."""
    return -(-n // SECTOR) * SECTOR


class RawDriver:
    """A raw image file.  ``size`` is fixed at open (file size in whole sectors minus
    ``offset``)."""

    def __init__(
        self, path: str, writable: bool = True, offset: int = 0, size: int | None = None,
        access: Access | None = None,
        first_sector_check: Callable[[bytes], str | None] | None = None,
    ) -> None:
        """``access``: how the image is used, for qemu's file locks (default: by this
        process alone, read-only or writable as ``writable`` says)."""
        access = access if access is not None else Access(write=writable)
        self.file = HostFile(path, writable, lock=access.image("raw"))
        self.path = path
        self.offset = offset
        # qemu's block layer counts whole sectors: a file of 1000 bytes is a 1024-byte
        # image (the tail reads as zeros; writing there extends the file)
        self._size = (sector_ceil(self.file.size()) - offset) if size is None else size
        if self._size < 0:
            self._size = 0
        self._caps = Capabilities(
            writable=writable,
            flush=writable,
            discard=writable,
            write_zeroes=writable,
            fast_zero=writable,
            block_status=True,
            allocation_depth=True,
            cache=True,
        )
        self._lock = threading.Lock()
        self._guard = first_sector_check
        if first_sector_check is not None:
            self._caps = replace(self._caps, request_alignment=SECTOR)

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        return self.file.pread(length, self.offset + offset)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        if offset < 0 or length <= 0 or offset + length > self._size or self.file.direct:
            return None
        return self.file.fd, self.offset + offset

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        self.file.preadinto(buf, self.offset + offset, nowait)

    def _check_write(self, offset: int, length: int) -> None:
        check_write(self._caps.writable, self._size, offset, length)

    def writes_in_place(self, offset: int, length: int) -> bool:
        """A write here only copies into the page cache (no metadata to update), unless
        the file is opened with O_DIRECT."""
        return not self.file.direct

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        if self._guard is not None and offset < SECTOR:
            self._guarded_pwrite(data, offset)
        else:
            self.file.pwrite(data, self.offset + offset)
        if fua:
            self.file.sync()

    def _guarded_pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """A write into block 0 of a probed image: refused if the sector would then
        probe as another format (checked and written under one lock)."""
        assert self._guard is not None
        mv = memoryview(data)
        with self._lock:
            end = min(SECTOR, offset + len(mv), self._size)
            sector = bytearray(self.file.pread(min(SECTOR, self._size), self.offset))
            sector[offset:end] = mv[: end - offset]
            fmt = self._guard(bytes(sector))
            if fmt is not None:
                raise WriteRefused(f"writing this first sector would make the raw image "
                                   f"probe as {fmt}")
            self.file.pwrite(mv, self.offset + offset)

    def flush(self) -> None:
        if self._caps.writable:
            self.file.sync()

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        # A hole reads as zeros in a raw file; that is a valid (stronger) TRIM.
        self.file.punch_hole(self.offset + offset, length)

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_write(offset, length)
        if may_unmap and self.file.punch_hole(self.offset + offset, length):
            return
        try:
            self.file.zero_range(self.offset + offset, length)
        except OSError:
            if fast:
                raise NotSupported("cannot zero quickly") from None
            raise

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        out = []
        for start, n, is_data in self.file.data_runs(self.offset + offset, length):
            out.append(
                Extent(start - self.offset, n, True, is_data, not is_data, 0,
                       start, self.path)
            )
        return out

    def close(self) -> None:
        self.file.close()
