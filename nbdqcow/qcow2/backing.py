"""Backing files (qcow2.txt "Header": backing_file_offset, backing format extension).

The engine does not open its backing file itself: the image layer
(:mod:`nbdqcow.image`) knows how names are resolved, which formats exist and how loops
are refused, and hands the engine a :data:`BackingOpener`.  The engine calls it with
the name and format its header stores and reads through whatever driver it returns
(None: the image is used without its backing file, qemu's ``"backing": null``).
"""

from __future__ import annotations

from collections.abc import Callable

from nbdqcow.block.driver import BlockDriver
from nbdqcow.errors import ImageOpenError

#: (backing file name from the header, its format or None) -> the backing driver, or None
BackingOpener = Callable[[str, "str | None"], "BlockDriver | None"]


def no_backing(name: str, fmt: str | None) -> BlockDriver | None:
    """Open the image without its backing file: for callers that never read guest data
    through the chain (snapshot table and metadata work), and for ``"backing": null``."""
    return None


class GivenBacking:
    """A backing file the caller chose (qemu's ``"backing": {...}`` option): the engine
    uses it whatever the header names, also when the header names none, as qemu does."""

    def __init__(self, open_backing: Callable[[], BlockDriver]) -> None:
        self._open = open_backing

    def __call__(self, name: str, fmt: str | None) -> BlockDriver | None:
        return self._open()


def backing_required(name: str, fmt: str | None) -> BlockDriver | None:
    """The default: an image with a backing file must be opened through the image
    layer, which opens the chain (reading it as if it had none would be wrong data)."""
    raise ImageOpenError(f"the image has a backing file ('{name}'); open it with "
                         "nbdqcow.image.open_image")
