"""The builders of the drivers nbdqcow opens: protocols ``file``, ``host_device`` and
``null-co``; formats ``raw`` and ``qcow2``.  Options and messages as qemu's."""

from __future__ import annotations

import os
from typing import Any

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.null import DEFAULT_SIZE, NullDriver
from nbdqcow.block.raw import RawDriver, sector_ceil
from nbdqcow.block.slice import SliceDriver
from nbdqcow.errors import ImageOpenError
from nbdqcow.image.context import OpenContext, file_options, host_error
from nbdqcow.image.options import MISSING, NodeOptions
from nbdqcow.image.probe import claims_format
from nbdqcow.image.registry import register
from nbdqcow.qemuopts import OptsError

SECTOR = 512


# ---------------------------------------------------------------- protocols
def build_file(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    """A host file served as it is (no format layer, no probing)."""
    ref = file_options(o, ctx.access)
    o.finish()
    try:
        return RawDriver(ref.path, writable=ctx.writable, access=ref.access)
    except OSError as e:
        raise host_error(ref.path, e) from None


def build_null(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    filename = o.text("filename")
    if filename is not None and not filename.startswith("null-co://"):
        raise OptsError("The filename of a null-co node must start with 'null-co://'")
    size = o.size("size", DEFAULT_SIZE)
    read_zeroes = o.flag("read-zeroes", False)
    latency = o.number("latency-ns", 0)
    o.finish()
    assert size is not None and latency is not None
    return NullDriver(size, read_zeroes, latency, writable=ctx.writable)


# ---------------------------------------------------------------- raw
def _required_child(o: NodeOptions, key: str = "file") -> Any:
    child = o.child(key)
    if child is MISSING or child is None:
        raise OptsError(f'A block device must be specified for "{key}"')
    return child


def _check_window(offset: int, size: int | None, total: int) -> None:
    """qemu's raw-format checks of ``offset`` and ``size`` against the child."""
    if offset > total:
        raise OptsError(f"Offset ({offset}) cannot be greater than size of the containing "
                        f"file ({total})")
    if size is not None:
        if total - offset < size:
            raise OptsError(f"The sum of offset ({offset}) and size ({size}) has to be smaller "
                            f"or equal to the  actual size of the containing file ({total})")
        if size % SECTOR:
            raise OptsError("Specified size is not multiple of 512")


def build_raw(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    offset = o.size("offset", ctx.offset)
    size = o.size("size")
    assert offset is not None
    child = _required_child(o)
    o.finish()
    # a probed raw image may not start to look like another format (qemu's raw driver)
    guard = claims_format if o.probed and ctx.writable else None
    if o.probed and ctx.writable and ctx.warn is not None and ctx.top:
        ctx.warn(probing_warning(child))
    ref = ctx.file_ref(child)
    if ref is None:
        drv = ctx.open_child(child)
        _check_window(offset, size, drv.size)
        if not offset and size is None:
            return drv
        return SliceDriver(drv, offset, size, writable=ctx.writable)
    try:
        total = sector_ceil(os.stat(ref.path).st_size)
    except OSError as e:
        raise host_error(ref.path, e) from None
    _check_window(offset, size, total)
    try:
        return RawDriver(ref.path, writable=ctx.writable, offset=offset, size=size,
                         access=ref.access, first_sector_check=guard)
    except OSError as e:
        raise host_error(ref.path, e) from None


def probing_warning(child: Any) -> str:
    """qemu-nbd's warning when it serves a raw image whose format it probed."""
    name = child.get("filename", "") if isinstance(child, dict) else ""
    return (f"WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.")


# ---------------------------------------------------------------- qcow2
def build_qcow2(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    from nbdqcow.image.qcow2 import open_qcow2

    return open_qcow2(ctx, o)


def _unsupported(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    raise ImageOpenError(f"image format '{o.driver}' is not supported by nbdqcow "
                         "(it opens raw and qcow2 images)")


register("file", build_file, protocol=True)
register("host_device", build_file, protocol=True)
register("null-co", build_null, protocol=True)
register("raw", build_raw)
register("qcow2", build_qcow2)
# formats qemu has (and probes) that nbdqcow does not open: a clear refusal, never raw
for _name in ("qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels", "bochs", "cloop",
              "dmg", "luks"):
    register(_name, _unsupported)
