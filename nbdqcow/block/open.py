"""Open an image by path: probe the format and build the driver stack."""

from __future__ import annotations

import os

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.hostfile import read_head
from nbdqcow.block.locking import Access
from nbdqcow.block.raw import RawDriver
from nbdqcow.errors import ImageOpenError

QCOW2_MAGIC = b"QFI\xfb"


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw'."""
    try:
        head = read_head(path, 4)[0]
    except OSError as e:
        raise ImageOpenError(f"could not open '{path}': {e.strerror}") from None
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def open_image(
    path: str,
    fmt: str | None = None,
    writable: bool = True,
    *,
    offset: int = 0,
    snapshot: str | None = None,
    cache_size: int | None = None,
    mapping: str | None = None,
    access: Access | None = None,
) -> BlockDriver:
    """Open ``path`` as ``fmt`` ('raw', 'qcow2' or None to probe); ``access`` says how,
    for qemu's file locks (default: this process alone, as ``writable`` says)."""
    if not os.path.exists(path):
        raise ImageOpenError(f"could not open '{path}': No such file or directory")
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        if snapshot:
            raise ImageOpenError("raw images have no internal snapshots")
        return RawDriver(path, writable=writable, offset=offset, access=access)
    if fmt == "qcow2":
        if offset:
            raise ImageOpenError("--offset is only supported for raw images")
        from nbdqcow.qcow2.driver import Qcow2Driver

        return Qcow2Driver.open(
            path, writable=writable, snapshot=snapshot, cache_size=cache_size, mapping=mapping,
            access=access,
        )
    raise ImageOpenError(f"unknown format '{fmt}' (use raw or qcow2)")
