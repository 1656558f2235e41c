"""qemu's ``null-co`` driver: an image of a given size that stores nothing.

Writes succeed and are dropped; reads return zeros (qemu leaves the buffer as it is
unless ``read-zeroes`` is on; zeros are a valid "anything").  Block status reports the
whole image as a hole, also zero when ``read-zeroes`` is on, as qemu-nbd's null-co does.
Test suites use it as a server with no storage; ``latency_ns`` delays every request.
"""

from __future__ import annotations

import time

from nbdqcow.block.driver import Capabilities, Extent
from nbdqcow.block.ranges import check_range
from nbdqcow.block.zeros import fill_zero

DEFAULT_SIZE = 1 << 30  # qemu's null-co default: 1 GiB


class NullDriver:
    def __init__(self, size: int = DEFAULT_SIZE, read_zeroes: bool = False,
                 latency_ns: int = 0, writable: bool = True) -> None:
        self._size = size
        self.read_zeroes = read_zeroes
        self._delay = latency_ns / 1e9
        self._caps = Capabilities(
            writable=writable, flush=writable, discard=writable, write_zeroes=writable,
            fast_zero=writable, block_status=True, allocation_depth=True, native_fua=True,
            cache=True,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def _wait(self) -> None:
        if self._delay:
            time.sleep(self._delay)

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        self._wait()
        return bytes(length)

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        check_range(self._size, offset, len(buf))
        self._wait()
        fill_zero(buf)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        check_range(self._size, offset, len(data), write=True)
        self._wait()

    def flush(self) -> None:
        self._wait()

    def discard(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length, write=True)

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        check_range(self._size, offset, length, write=True)
        self._wait()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        return [Extent(offset, length, True, False, self.read_zeroes, 0, offset)]

    def close(self) -> None:
        pass
