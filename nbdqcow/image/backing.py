"""Opening the backing file a qcow2 header names: resolve the name as qemu does
(relative to the image's folder; a ``json:`` name is a specification of its own), probe
its format when the header does not say it, refuse loops and absurd depths, and open it
read-only through the same layer as the image on top."""

from __future__ import annotations

import os

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.errors import ImageOpenError
from nbdqcow.image.context import OpenContext
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import BackingOpener
from nbdqcow.qemuopts import OptsError, parse_json_filename


def resolve_relative(image_path: str, name: str) -> str:
    """A file name stored in an image is relative to the image's folder (qemu's
    path_combine: the result stays relative when the image path was relative)."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def _has_protocol(name: str) -> bool:
    """qemu reads ``proto:rest`` as a protocol when the colon comes before any slash."""
    colon = name.find(":")
    return colon > 0 and "/" not in name[:colon]


def backing_spec(image_path: str, name: str, fmt: str | None) -> dict[str, object]:
    """The specification of the backing file ``name`` (with format ``fmt``, or probed)."""
    if name.startswith("json:"):
        tree = parse_json_filename(name)
        if fmt is not None and "driver" not in tree:
            tree["driver"] = fmt
        return tree
    if _has_protocol(name):
        raise ImageOpenError(f"Unknown protocol '{name[: name.find(':')]}'")
    spec: dict[str, object] = {
        "file": {"driver": "file", "filename": resolve_relative(image_path, name)}}
    if fmt is not None:
        spec["driver"] = fmt
    return spec


def open_backing_file(image_path: str, name: str, fmt: str | None,
                      access: Access) -> BlockDriver | None:
    """The backing file ``name`` (format ``fmt``) of the image at ``image_path``, opened
    read-only as the layers below an image opened with ``access`` are."""
    return backing_opener(OpenContext(writable=False, access=access), image_path)(name, fmt)


def backing_opener(ctx: OpenContext, image_path: str) -> BackingOpener:
    """What the qcow2 engine calls to open the backing file its header names."""
    real = os.path.realpath(image_path)
    if real in ctx.chain:
        raise ImageOpenError(f"backing file loop: '{image_path}' is already in the chain")

    def open_backing(name: str, fmt: str | None) -> BlockDriver:
        if len(ctx.chain) + 1 >= L.MAX_BACKING_DEPTH:
            raise ImageOpenError("backing chain is too deep")
        try:
            spec = backing_spec(image_path, name, fmt)
            return ctx.open_child(spec, writable=False, image=image_path)
        except ImageLocked as e:
            raise e.within("Could not open backing file: ") from None
        except (ImageOpenError, OptsError) as e:
            raise ImageOpenError(f"Could not open backing file: {e}") from None

    return open_backing
