"""A Dispatcher with a fake driver and transport, for tests of where requests run."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from nbdqcow.block.driver import Capabilities
from nbdqcow.errors import NowaitUnsupported
from nbdqcow.nbd.constants import Cmd
from nbdqcow.nbd.handshake import Negotiated
from nbdqcow.nbd.transmission import Request
from nbdqcow.server.dispatch import Dispatcher
from nbdqcow.server.exports import Export
from nbdqcow.server.flow import FlowControl


class Driver:
    """A bytearray image that records the thread each write ran in."""

    caps = Capabilities(writable=True, flush=True)

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.threads: list[str] = []
        self.delay = 0.0
        self.flushes = 0
        self.nowait = True  # False: a file system without RWF_NOWAIT (tmpfs)
        self.in_place = True  # False: writes would allocate (qcow2 clusters)

    @property
    def size(self) -> int:
        return len(self.data)

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.threads.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def writes_in_place(self, offset: int, length: int) -> bool:
        return self.in_place

    def pread(self, offset: int, length: int) -> bytes:
        self.threads.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        return bytes(self.data[offset : offset + length])

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        if nowait and not self.nowait:
            raise NowaitUnsupported("no RWF_NOWAIT here")
        buf[:] = self.pread(offset, len(buf))


class Transport:
    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def dispatcher(cache: str, drv: Driver, replies: list[object]) -> Dispatcher:
    loop = asyncio.get_running_loop()
    export = Export("", drv, cache=cache)  # type: ignore[arg-type]
    neg = Negotiated(export.info())
    flow = FlowControl(Transport())  # type: ignore[arg-type]
    return Dispatcher(export, neg, replies.append, flow, loop)


def write(cookie: int, offset: int, data: bytes, flags: int = 0) -> Request:
    return Request(int(Cmd.WRITE), flags, cookie, offset, len(data), bytearray(data))


async def settle(replies: list[object], n: int) -> None:
    for _ in range(500):
        if len(replies) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(replies)} of {n} replies")




def read(cookie: int, offset: int, length: int) -> Request:
    return Request(int(Cmd.READ), 0, cookie, offset, length, None)
