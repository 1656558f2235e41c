"""The ``compress`` filter (qemu's ``driver=compress``): every write to it is stored
compressed by the format below, in whole clusters.

As qemu's filter: the cluster size is the request alignment (the export's minimum block
size), so an unaligned write is padded by reading the rest of its first and last
clusters (read-modify-write) and written compressed as whole clusters; the format then
refuses clusters that already hold data (EIO), writes incompressible data as normal
clusters, and stores a partial last cluster of the image padded with zeros.  A writable
filter needs a disk size that is a multiple of the cluster size (qemu refuses it too).
Reads, write-zeroes, discard, flush and block status go to the format unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, runtime_checkable

from nbdqcow.block.driver import BlockDriver, Capabilities, Extent
from nbdqcow.errors import ImageOpenError


@runtime_checkable
class CompressingDriver(BlockDriver, Protocol):
    """A format that can store compressed clusters (qcow2)."""

    @property
    def cluster_size(self) -> int: ...

    def write_compressed(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store whole clusters from a cluster boundary compressed (the image's last
        cluster may be partial)."""
        ...


class CompressFilter:
    """BlockDriver over a :class:`CompressingDriver` whose writes are compressed."""

    def __init__(self, inner: BlockDriver, format_name: str = "raw") -> None:
        if not isinstance(inner, CompressingDriver):
            raise ImageOpenError(
                f"Compression is not supported for underlying format: {format_name}")
        self.inner: CompressingDriver = inner
        self.align = inner.cluster_size
        caps = inner.caps
        if caps.writable and inner.size % self.align:
            raise ImageOpenError("Cannot get 'write' permission without 'resize': Image size "
                                 "is not a multiple of request alignment")
        self._caps = replace(caps, request_alignment=self.align if caps.writable else 1,
                             native_fua=False)

    # --- passed through -------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        self.inner.preadinto(offset, buf, nowait)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.inner.host_extent(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self.inner.write_zeroes(offset, length, may_unmap, fast)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.inner.block_status(offset, length)

    def close(self) -> None:
        self.inner.close()

    # --- compressed writes ------------------------------------------------------------
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if n == 0:  # nothing to store (and no cluster to pad)
            if fua:
                self.inner.flush()
            return
        a = self.align
        start = offset - offset % a
        end = min(-(-(offset + n) // a) * a, self.inner.size)
        if start != offset or end != offset + n:
            # read-modify-write of the partial first and last clusters
            buf = bytearray(self.inner.pread(start, end - start))
            buf[offset - start : offset - start + n] = mv
            self.inner.write_compressed(buf, start)
        else:
            self.inner.write_compressed(mv, offset)
        if fua:
            self.inner.flush()


def _typecheck(f: CompressFilter) -> BlockDriver:
    return f
