"""A small blocking wrapper around :class:`~nbdqcow.nbdclient.client.Client` for scripts.

Each :class:`SyncClient` owns a private event loop and runs it for every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from nbdqcow.nbd.constants import BASE_ALLOCATION, CmdFlag, TransmissionFlag
from nbdqcow.nbdclient.client import Client, Extents, connect, list_exports

T = TypeVar("T")


class SyncClient:
    """Blocking NBD client: ``with SyncClient("nbd://127.0.0.1:10809/") as c: c.pread(0, 512)``."""

    def __init__(
        self,
        uri: str,
        *,
        export: str | None = None,
        structured: bool = True,
        meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
        extended: bool = False,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.client: Client = self._run(
                connect(
                    uri,
                    export=export,
                    structured=structured,
                    meta_contexts=tuple(meta_contexts),
                    extended=extended,
                )
            )
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    @property
    def size(self) -> int:
        return self.client.size

    @property
    def flags(self) -> TransmissionFlag:
        return self.client.flags

    def pread(self, offset: int, length: int, flags: CmdFlag | int = 0) -> bytes | bytearray:
        return self._run(self.client.pread(offset, length, flags))

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        self._run(self.client.pwrite(data, offset, fua))

    def flush(self) -> None:
        self._run(self.client.flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._run(self.client.trim(offset, length, fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        self._run(self.client.write_zeroes(offset, length, no_hole, fast_zero, fua))

    def cache(self, offset: int, length: int) -> None:
        self._run(self.client.cache(offset, length))

    def block_status(self, offset: int, length: int, req_one: bool = False) -> dict[str, Extents]:
        return self._run(self.client.block_status(offset, length, req_one))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.disconnect())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def list_exports_sync(uri: str) -> list[tuple[str, str]]:
    return asyncio.run(list_exports(uri))
