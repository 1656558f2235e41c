"""The ``compress`` filter driver (qemu's ``driver=compress``): its child ``file`` is a
format that stores compressed clusters (qcow2); every write through the filter is stored
compressed (see :mod:`nbdqcow.block.compress`).  As qemu, the child is not probed: a
child without ``driver`` is the ``file`` protocol, which cannot compress."""

from __future__ import annotations

from collections.abc import Mapping

from nbdqcow.block.compress import CompressFilter
from nbdqcow.block.driver import BlockDriver
from nbdqcow.image.context import OpenContext
from nbdqcow.image.options import MISSING, NodeOptions
from nbdqcow.image.registry import register
from nbdqcow.qemuopts import OptsError


def build_compress(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    child = o.child("file")
    if child is MISSING or child is None:
        raise OptsError('A block device must be specified for "file"')
    o.finish()
    if isinstance(child, Mapping) and "driver" not in child:
        child = {"driver": "file", **child}
    fmt = str(child.get("driver", "file")) if isinstance(child, Mapping) else "file"
    drv = ctx.open_filtered(child)
    try:
        return CompressFilter(drv, fmt)
    except BaseException:
        drv.close()
        raise


register("compress", build_compress)
