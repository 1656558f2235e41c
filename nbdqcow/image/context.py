"""One open of a driver stack: what the command asked for, and how each node of the
specification becomes a driver (driver lookup, probing, children, messages)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from nbdqcow.block import hostfile
from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import Access, parse_locking
from nbdqcow.errors import ImageOpenError
from nbdqcow.image.options import NodeOptions
from nbdqcow.image.probe import PROBE_SIZE, probe_bytes
from nbdqcow.image.registry import DRIVERS, kind_of
from nbdqcow.qemuopts import OptsError

#: protocol drivers whose node is a plain host file
FILE_PROTOCOLS = ("file", "host_device")
LOCKING_MODES = ("auto", "on", "off")
AIO_MODES = ("threads", "native", "io_uring")


@dataclass(frozen=True)
class FileRef:
    """A ``file`` node: the host file a format driver opens itself, and how it is
    locked (qemu's locks: the open's :class:`Access` with this node's ``locking`` and
    ``force-share`` options applied)."""

    path: str
    access: Access


@dataclass(frozen=True)
class OpenContext:
    """What the command asked for.  ``snapshot``, ``cache_size``, ``mapping`` and
    ``offset`` are the command line's settings for the top node only."""

    writable: bool
    #: how the images are used, for qemu's file locks
    access: Access = Access()
    snapshot: str | None = None
    cache_size: int | None = None
    mapping: str | None = None
    offset: int = 0
    #: real paths of the images above this node (backing-file loops)
    chain: tuple[str, ...] = ()
    top: bool = True
    #: where a warning for the user goes (qemu-nbd's probing warning)
    warn: Callable[[str], None] | None = None

    def for_child(self, writable: bool | None = None, image: str | None = None) -> OpenContext:
        """The context of a child node; ``image``: the child is the backing file of that
        image (read-only, locked as qemu locks the layers below an image)."""
        chain = self.chain + ((os.path.realpath(image),) if image else ())
        access = self.access.backing() if image else self.access
        if writable is False and access.write:
            access = replace(access, write=False)
        return replace(self, writable=self.writable if writable is None else writable,
                       access=access, snapshot=None, cache_size=None, mapping=None,
                       offset=0, top=False, chain=chain)

    # ---------------------------------------------------------------- nodes
    def open_node(self, tree: Any) -> BlockDriver:
        """The driver for one node of a specification (and its children)."""
        tree, probed = self._with_driver(_node_dict(tree))
        driver = tree["driver"]
        if not isinstance(driver, str):
            raise OptsError("Invalid parameter type for 'driver', expected: string")
        build = DRIVERS.get(driver)
        if build is None:
            raise OptsError(f"Unknown driver '{driver}'")
        if self.top and self.snapshot is not None and driver != "qcow2":
            raise ImageOpenError(f"{driver} images have no internal snapshots")
        opts = NodeOptions(driver, kind_of(driver), tree)
        opts.probed = probed
        if opts.read_only and self.writable:
            raise ImageOpenError("Block node is read-only")
        ctx = self
        if opts.force_share and not self.access.force_share:
            # qemu's force-share applies to the node and the nodes below it
            ctx = replace(self, access=replace(self.access, force_share=True))
        return build(ctx, opts)

    def open_filtered(self, tree: Any) -> BlockDriver:
        """The child of a filter node: the command line's qcow2 settings (cache size,
        mapping policy) reach it as if it were the top node."""
        return replace(self.for_child(), cache_size=self.cache_size,
                       mapping=self.mapping).open_node(tree)

    def open_child(self, tree: Any, writable: bool | None = None,
                   image: str | None = None) -> BlockDriver:
        return self.for_child(writable, image).open_node(tree)

    def file_ref(self, tree: Any) -> FileRef | None:
        """``tree`` as a host file, or None when it is another kind of node."""
        node = _node_dict(tree)
        driver = node.get("driver", "file")
        if driver not in FILE_PROTOCOLS:
            return None
        opts = NodeOptions(str(driver), "protocol", node)
        ref = file_options(opts, self.access)
        opts.finish()
        if opts.read_only and self.writable:
            raise ImageOpenError("Block node is read-only")
        return ref

    # ---------------------------------------------------------------- probing
    def _with_driver(self, tree: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if "driver" in tree:
            return tree, False
        if "file" not in tree:
            if "filename" not in tree:
                raise OptsError("Must specify either driver or file")
            tree = dict(tree)
            tree["file"] = {"driver": "file", "filename": tree.pop("filename")}
        tree = dict(tree)
        tree["driver"] = self.probe(tree["file"])
        return tree, True

    def probe(self, child: Any) -> str:
        """The format qemu would probe for the node ``child`` (its first 512 bytes)."""
        if isinstance(child, Mapping) and child.get("driver", "file") in FILE_PROTOCOLS:
            ref = self.file_ref(child)
            assert ref is not None
            return probe_bytes(read_head(ref.path), ref.path)
        drv = self.open_child(child, writable=False)
        try:
            return probe_bytes(drv.pread(0, min(drv.size, PROBE_SIZE)))
        finally:
            drv.close()


def _node_dict(tree: Any) -> dict[str, Any]:
    if isinstance(tree, str):
        # qemu: a string names an existing node; a command line opens only one image
        raise OptsError(f"Cannot find device='{tree}' nor node-name='{tree}'")
    if not isinstance(tree, Mapping):
        raise OptsError("Invalid JSON object given")
    return dict(tree)


def file_options(opts: NodeOptions, access: Access) -> FileRef:
    """The options of qemu's ``file`` protocol that nbdqcow takes."""
    filename = opts.text("filename")
    if not filename:
        raise OptsError(f"The '{opts.driver}' block driver requires a file name")
    locking = opts.text("locking", "auto")
    if locking not in LOCKING_MODES:
        raise OptsError(f"invalid parameter value: {locking}")
    opts.choice("aio", AIO_MODES, "threads")  # how qemu submits I/O: nothing to do here
    access = replace(access, enabled=access.enabled and parse_locking(locking))
    if opts.force_share and not access.force_share:
        access = replace(access, force_share=True)  # refused for writable opens
    return FileRef(filename, access)


def read_head(path: str) -> bytes:
    """The first bytes of ``path``, for probing."""
    try:
        return hostfile.read_head(path, PROBE_SIZE)[0]
    except OSError as e:
        raise ImageOpenError(f"Could not open '{path}': {e.strerror}") from None


def host_error(path: str, e: OSError) -> ImageOpenError:
    return ImageOpenError(f"Could not open '{path}': {e.strerror}")
