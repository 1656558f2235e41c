"""The drivers a specification may name: driver name -> builder function.

A builder takes the :class:`~nbdqcow.image.context.OpenContext` of the open and the
node's :class:`~nbdqcow.image.options.NodeOptions`; it takes the options it knows, opens
its children through the context (``ctx.open_child``, ``ctx.file_ref``) and returns a
:class:`~nbdqcow.block.driver.BlockDriver`.  The options it leaves are refused for it.

Formats and protocols register here (:mod:`nbdqcow.image.drivers` fills the table; a
filter such as ``compress`` adds itself with :func:`register`).  ``PROTOCOLS`` names the
drivers qemu calls protocols (its messages word them differently).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nbdqcow.block.driver import BlockDriver

if TYPE_CHECKING:
    from nbdqcow.image.context import OpenContext
    from nbdqcow.image.options import NodeOptions

Builder = Callable[["OpenContext", "NodeOptions"], BlockDriver]

DRIVERS: dict[str, Builder] = {}
PROTOCOLS: set[str] = set()


def register(name: str, builder: Builder, protocol: bool = False) -> None:
    DRIVERS[name] = builder
    if protocol:
        PROTOCOLS.add(name)


def kind_of(name: str) -> str:
    return "protocol" if name in PROTOCOLS else "format"
