"""A window [offset, offset+size) of another driver, as a driver of its own (qemu's raw
format with ``offset``/``size`` over a child that is not a plain file, e.g. null-co)."""

from __future__ import annotations

from dataclasses import replace

from nbdqcow.block.driver import BlockDriver, Capabilities, Extent
from nbdqcow.block.ranges import check_range, check_write


class SliceDriver:
    def __init__(self, child: BlockDriver, offset: int = 0, size: int | None = None,
                 writable: bool = True) -> None:
        self.child = child
        self.offset = offset
        self._size = child.size - offset if size is None else size
        self._caps = child.caps if writable else replace(
            child.caps, writable=False, flush=False, discard=False, write_zeroes=False,
            fast_zero=False)

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        return self.child.pread(self.offset + offset, length)

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        self.child.preadinto(self.offset + offset, buf, nowait)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        if offset < 0 or offset + length > self._size:
            return None
        return self.child.host_extent(self.offset + offset, length)

    def _check_write(self, offset: int, length: int) -> None:
        check_write(self._caps.writable, self._size, offset, length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        self.child.pwrite(data, self.offset + offset, fua)

    def flush(self) -> None:
        if self._caps.writable:
            self.child.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        self.child.discard(self.offset + offset, length)

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_write(offset, length)
        self.child.write_zeroes(self.offset + offset, length, may_unmap, fast)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        out = []
        end = offset + length
        for e in self.child.block_status(self.offset + offset, length):
            start = e.start - self.offset
            n = min(e.length, end - start)
            if n > 0:
                out.append(e._replace(start=start, length=n))
        return out

    def close(self) -> None:
        self.child.close()
