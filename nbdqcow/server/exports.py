"""Export name -> driver, plus the flags and metadata contexts advertised for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nbdqcow.block.driver import BlockDriver, DirtyBitmapSource
from nbdqcow.nbd.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    QEMU_ALLOCATION_DEPTH,
    QEMU_DIRTY_BITMAP,
    TransmissionFlag,
)
from nbdqcow.nbd.handshake import ExportInfo
from nbdqcow.server.stats import ExportStats

DISCARD_MODES = ("ignore", "unmap")
DETECT_ZEROES_MODES = ("off", "on", "unmap")
CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")


class RangeTracker:
    """Requests that did not complete inline (worker thread or waiting), per export.

    A new request that overlaps a tracked one where either writes waits for it, so
    overlapping writes (and reads after writes) take effect in arrival order.
    """

    def __init__(self) -> None:
        self.ops: dict[asyncio.Future[None], tuple[int, int, bool]] = {}
        self.writes = 0  # tracked requests that write (reads conflict only with these)

    def conflicts(self, start: int, end: int, write: bool) -> list[asyncio.Future[None]]:
        if not write and not self.writes:
            return []
        return [
            fut
            for fut, (s, e, w) in self.ops.items()
            if (w or write) and s < end and start < e and not fut.done()
        ]

    def add(self, start: int, end: int, write: bool, fut: asyncio.Future[None]) -> None:
        self.ops[fut] = (start, end, write)
        self.writes += write

    def remove(self, fut: asyncio.Future[None]) -> None:
        op = self.ops.pop(fut, None)
        if op is not None and op[2]:
            self.writes -= 1


@dataclass
class Export:
    """One served image and how it is served."""

    name: str
    driver: BlockDriver
    description: str = ""
    readonly: bool = False
    allocation_depth: bool = False
    discard: str = "ignore"
    detect_zeroes: str = "off"
    cache: str = "writeback"
    multi_conn: bool = False
    #: persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME contexts (-B)
    bitmaps: tuple[DirtyBitmapSource, ...] = ()
    #: where the image comes from (file name or spec), for listings
    source: str = ""
    tracker: RangeTracker = field(default_factory=RangeTracker)
    stats: ExportStats = field(default_factory=ExportStats)

    @property
    def writable(self) -> bool:
        return not self.readonly and self.driver.caps.writable

    @property
    def writethrough(self) -> bool:
        """Every write is FUA (qemu's writethrough and directsync cache modes)."""
        return self.cache in ("writethrough", "directsync")

    @property
    def can_trim(self) -> bool:
        return self.writable and self.discard == "unmap" and self.driver.caps.discard

    @property
    def flags(self) -> int:
        """Transmission flags: exactly what this server does for this export."""
        f = TransmissionFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_DF | f.SEND_CACHE
        if self.writable:
            # TRIM is advertised on every writable export, as qemu-nbd does: where it
            # does nothing (--discard=ignore) it is answered without effect, which the
            # spec allows (a client assumes nothing of trimmed data)
            flags |= f.SEND_WRITE_ZEROES | f.SEND_FAST_ZERO | f.SEND_TRIM
        else:
            flags |= f.READ_ONLY
        if self.multi_conn:
            flags |= f.CAN_MULTI_CONN
        return int(flags)

    @property
    def contexts(self) -> tuple[str, ...]:
        depth = (QEMU_ALLOCATION_DEPTH,) if self.allocation_depth else ()
        return (BASE_ALLOCATION, *depth, *(QEMU_DIRTY_BITMAP + b.name for b in self.bitmaps))

    def bitmap(self, context: str) -> DirtyBitmapSource | None:
        """The bitmap behind a qemu:dirty-bitmap: context name."""
        for b in self.bitmaps:
            if QEMU_DIRTY_BITMAP + b.name == context:
                return b
        return None

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.driver.size,
            flags=self.flags,
            description=self.description,
            min_block=self.driver.caps.request_alignment,
            pref_block=max(4096, self.driver.caps.request_alignment),
            max_block=MAX_PAYLOAD,
            contexts=self.contexts,
        )
