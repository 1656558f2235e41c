"""Backing chains (qcow2.txt "Header": backing_file_offset, backing format extension):
resolve names against the image's folder, refuse loops and absurd depths, open each
layer read-only (qcow2 or raw)."""

from __future__ import annotations

import os

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.block.open import probe_format
from nbdqcow.block.raw import RawDriver
from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2 import layout as L


def resolve_relative(image_path: str, name: str) -> str:
    """A file name stored in an image is relative to the image's folder."""
    if name.startswith("json:") or "://" in name:
        raise ImageOpenError(f"unsupported backing file protocol: {name}")
    if os.path.isabs(name):
        return name
    # like qemu's path_combine: keep it relative when the image path was relative
    return os.path.join(os.path.dirname(image_path), name)


def open_backing(
    image_path: str, name: str, fmt: str | None, chain: tuple[str, ...],
    access: Access | None = None,
) -> BlockDriver:
    """``access``: how the layers below are opened for qemu's locks (read-only,
    sharing everything; see :meth:`Access.backing`)."""
    access = access if access is not None else Access()
    path = resolve_relative(image_path, name)
    real = os.path.realpath(path)
    if real in chain:
        raise ImageOpenError(f"backing file loop: '{name}' is already in the chain")
    if len(chain) >= L.MAX_BACKING_DEPTH:
        raise ImageOpenError("backing chain is too deep")
    if not os.path.exists(path):
        raise ImageOpenError(f"could not open backing file '{name}': No such file or directory")
    fmt = fmt or probe_format(path)
    try:
        if fmt == "raw":
            return RawDriver(path, writable=False, access=access)
        if fmt == "qcow2":
            from nbdqcow.qcow2.driver import Qcow2Driver

            return Qcow2Driver.open(path, writable=False, access=access, _chain=chain + (real,))
    except ImageLocked as e:
        raise e.within("Could not open backing file: ") from None
    raise ImageOpenError(f"unsupported backing file format '{fmt}'")
