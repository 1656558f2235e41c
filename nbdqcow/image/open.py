"""The one place commands and the server open images: a file name, a ``json:``
filename or an ``--image-opts`` string becomes a specification tree, then a driver
stack (see :mod:`nbdqcow.image.context` for how each node is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.errors import ImageOpenError
from nbdqcow.image import compress as _compress  # noqa: F401  (registers compress)
from nbdqcow.image import drivers as _drivers  # noqa: F401  (fills the registry)
from nbdqcow.image.context import FILE_PROTOCOLS, OpenContext, file_options, read_head
from nbdqcow.image.options import NodeOptions
from nbdqcow.image.probe import probe_bytes
from nbdqcow.qemuopts import OptsError, crumple, parse_json_filename, parse_opts


def image_tree(name: str, fmt: str | None = None, image_opts: bool = False) -> dict[str, Any]:
    """The specification of ``name``: ``--image-opts`` text, a ``json:`` filename or a
    plain file name.  ``fmt`` (``-f``) names the top driver, as qemu's ``-f`` does."""
    if image_opts:
        tree = crumple(parse_opts(name))
    elif name.startswith("json:"):
        tree = parse_json_filename(name)
    else:
        tree = {"file": {"driver": "file", "filename": name}}
    if fmt is not None:
        tree["driver"] = fmt
    return tree


def open_image(
    name: str,
    fmt: str | None = None,
    writable: bool = True,
    *,
    image_opts: bool = False,
    offset: int = 0,
    snapshot: str | None = None,
    cache_size: int | None = None,
    mapping: str | None = None,
    access: Access | None = None,
    warn: Callable[[str], None] | None = None,
) -> BlockDriver:
    """Open ``name`` (see :func:`image_tree`) as a driver stack.

    ``offset`` is qemu-nbd's ``-o`` (a raw image's offset), ``snapshot`` its ``-l``,
    ``cache_size``/``mapping`` nbdqcow's qcow2 settings; each applies to the top node.
    ``access`` says how the images are used for qemu's file locks (default: by this
    process alone, as ``writable`` says).  ``warn`` receives qemu-nbd's warning when a raw format was probed for a writable
    open.  Every failure is one :class:`ImageOpenError` naming ``name``, as qemu's
    "Could not open 'NAME': reason"."""
    ctx = OpenContext(writable=writable, access=access or Access(write=writable),
                      snapshot=snapshot, cache_size=cache_size, mapping=mapping,
                      offset=offset, warn=warn)
    try:
        return ctx.open_node(image_tree(name, fmt, image_opts))
    except ImageLocked as e:
        raise e.within(f"Could not open '{name}': ") from None
    except ImageOpenError as e:
        if str(e).startswith(f"Could not open '{name}'"):
            raise
        raise type(e)(f"Could not open '{name}': {e}") from None
    except OptsError as e:
        raise ImageOpenError(f"Could not open '{name}': {e}") from None


def probe_file(path: str) -> str:
    """The format qemu would probe for the file at ``path`` ('raw' when none claims it)."""
    return probe_bytes(read_head(path), path)


class NotPlainImage(ImageOpenError):
    """The specification is more than a format over a plain file (a raw window, null-co,
    a backing override...): a command that works on the image file itself cannot use it."""


#: options that do not change what a command working on the image file itself sees
_PLAIN_FORMAT_KEYS = {"driver", "file", "node-name", "read-only", "auto-read-only",
                      "force-share"}
_PLAIN_FILE_KEYS = {"driver", "filename", "node-name", "read-only", "auto-read-only",
                    "force-share", "locking", "aio"}


def image_file(name: str, fmt: str | None = None, image_opts: bool = False) -> tuple[str, str]:
    """(format, host file) for commands that work on the image file itself (``check``,
    ``info``, ``snapshot``, ``relayout``, ``layout``): the specification must be a format
    over a plain file, with no option that changes what the image looks like."""
    try:
        tree = image_tree(name, fmt, image_opts)
        if "file" not in tree and "driver" not in tree and "filename" in tree:
            tree["file"] = {"driver": "file", "filename": tree.pop("filename")}
        child = tree.get("file")
        if not isinstance(child, dict) or child.get("driver", "file") not in FILE_PROTOCOLS:
            driver = tree.get("driver")
            if isinstance(driver, str) and driver in FILE_PROTOCOLS:
                raise NotPlainImage(f"Could not open '{name}': this command needs an image "
                                    f"format over a file, not a bare '{driver}' node")
            raise NotPlainImage(f"Could not open '{name}': this command works on an image "
                                "file: give a format over a 'file' node")
        extra = sorted(set(tree) - _PLAIN_FORMAT_KEYS) + [
            f"file.{k}" for k in sorted(set(child) - _PLAIN_FILE_KEYS)]
        if extra:
            raise NotPlainImage(f"Could not open '{name}': this command works on the image "
                                f"file itself and cannot apply the option '{extra[0]}'")
        # the file node's options checked as an open checks them (locking=..., aio=...)
        path = file_options(NodeOptions(str(child.get("driver", "file")), "protocol",
                                        child), Access()).path
        driver = tree.get("driver")
        if driver is None:
            driver = probe_file(path)
        if not isinstance(driver, str):
            raise OptsError("Invalid parameter type for 'driver', expected: string")
        return driver, path
    except OptsError as e:
        raise ImageOpenError(f"Could not open '{name}': {e}") from None
