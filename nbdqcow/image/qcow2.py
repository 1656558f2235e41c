"""The ``qcow2`` format node: its options (qemu's names and checks) and its children
(``file``, ``backing``, ``data-file``)."""

from __future__ import annotations

import os
from typing import Any

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import ImageLocked
from nbdqcow.errors import ImageOpenError
from nbdqcow.image.backing import backing_opener
from nbdqcow.image.context import FileRef, OpenContext, host_error
from nbdqcow.image.options import MISSING, NodeOptions
from nbdqcow.qcow2.backing import BackingOpener, GivenBacking, no_backing
from nbdqcow.qemuopts import OptsError

_MIB = 1 << 20


def _file_child(ctx: OpenContext, o: NodeOptions, key: str, required: bool) -> FileRef | None:
    child = o.child(key)
    if child is MISSING or child is None:
        if required:
            raise OptsError(f'A block device must be specified for "{key}"')
        return None
    ref = ctx.file_ref(child)
    if ref is None:
        raise OptsError(f"nbdqcow opens the {key} of a qcow2 image only from a 'file' node")
    return ref


def _cache_sizes(ctx: OpenContext, o: NodeOptions) -> tuple[int | None, int | None]:
    """qemu's cache options -> (L2 cache bytes, refcount cache bytes); None: default.

    ``cache-size`` is the total of both; qemu gives refcount blocks a quarter of it when
    only the total is set, which is what the engine does by default too."""
    total = o.size("cache-size")
    l2 = o.size("l2-cache-size")
    refcount = o.size("refcount-cache-size")
    entry = o.size("l2-cache-entry-size")
    if entry is not None and (entry < 512 or entry > 2 * _MIB or entry & (entry - 1)):
        raise OptsError("L2 cache entry size must be a power of two between 512 and the "
                        "cluster size")
    o.number("cache-clean-interval")  # when qemu frees unused cache entries: nbdqcow's
    # cache is bounded by its size alone
    if total is not None:
        if l2 is not None and refcount is not None and l2 + refcount > total:
            raise OptsError("l2-cache-size + refcount-cache-size may not exceed cache-size")
        if l2 is None:
            l2 = total - refcount if refcount is not None else total - total // 4
        if refcount is None:
            refcount = total - l2
    if l2 is None:
        l2 = ctx.cache_size
    return l2, refcount


def open_qcow2(ctx: OpenContext, o: NodeOptions) -> BlockDriver:
    from nbdqcow.qcow2.driver import Qcow2Driver

    if ctx.offset:
        raise ImageOpenError("--offset is only supported for raw images")
    ref = _file_child(ctx, o, "file", required=True)
    assert ref is not None
    path = ref.path
    data_ref = _file_child(ctx, o, "data-file", required=False)
    data_file = data_ref.path if data_ref is not None else None
    backing_spec = o.child("backing")
    l2_cache, refcount_cache = _cache_sizes(ctx, o)
    mapping = ctx.mapping
    if o.has("discard-no-unref"):
        # qemu 8.1's option: keep a discarded cluster's host space (nbdqcow's "preserve"
        # mapping policy) or give it back ("release")
        mapping = "preserve" if o.flag("discard-no-unref", False) else "release"
    o.finish()
    opener = _backing(ctx, path, backing_spec)
    try:
        return Qcow2Driver.open(
            path, writable=ctx.writable, snapshot=ctx.snapshot, cache_size=l2_cache,
            mapping=mapping, access=ref.access, backing=opener, data_file=data_file,
            refcount_cache_size=refcount_cache,
        )
    except OSError as e:
        raise host_error(path, e) from None


def _backing(ctx: OpenContext, path: str, spec: Any) -> BackingOpener:
    if spec is None:
        return no_backing
    if spec is MISSING:
        return backing_opener(ctx, path)
    if isinstance(spec, str):
        raise OptsError(f"Cannot find device='{spec}' nor node-name='{spec}'")

    def given() -> BlockDriver:
        try:
            return ctx.open_child(spec, writable=False, image=path)
        except ImageLocked as e:
            raise e.within("Could not open backing file: ") from None
        except (ImageOpenError, OptsError) as e:
            raise ImageOpenError(f"Could not open backing file: {e}") from None

    if os.path.realpath(path) in ctx.chain:
        raise ImageOpenError(f"backing file loop: '{path}' is already in the chain")
    return GivenBacking(given)
