"""Reading one node's options the way qemu checks them.

A node of a driver stack is a dict (from ``json:``, ``--image-opts`` or a plain file
name): ``driver`` plus that driver's options; children (``file``, ``backing``,
``data-file``) are dicts of their own.  Values from ``--image-opts`` are strings, values
from ``json:`` are JSON scalars; each reader takes both.  Whatever a driver did not take
is refused with qemu's message, naming the option as the node sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbdqcow.qemuopts import OptsError, flatten, parse_bool
from nbdqcow.sizes import SizeError, parse_size

#: options every node takes (qemu's bdrv_runtime_opts that nbdqcow honours)
COMMON = ("driver", "node-name", "read-only", "auto-read-only", "force-share")

#: a child that was not given at all (``None`` is JSON's null: "no child")
MISSING: Any = object()


class NodeOptions:
    """The options of one node, taken one by one; :meth:`finish` refuses the rest."""

    def __init__(self, driver: str, kind: str, tree: Mapping[str, Any]) -> None:
        self.driver = driver
        self.kind = kind  # "format" or "protocol" (as qemu words its messages)
        self._tree = dict(tree)
        #: the format was probed, not named (a raw image then guards its block 0)
        self.probed = False
        self.node_name = self.text("node-name")
        self.read_only = self.flag("read-only", False)
        self.auto_read_only = self.flag("auto-read-only", False)
        self.force_share = self.flag("force-share", False)
        self._tree.pop("driver", None)

    def has(self, key: str) -> bool:
        return key in self._tree

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self._tree.pop(key, None)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise OptsError(f"Invalid parameter type for '{key}', expected: string")
        return str(value)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        assert value is not None
        if value not in allowed:
            raise OptsError(f"Parameter '{key}' does not accept value '{value}'")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._tree.pop(key, None)
        return default if value is None else parse_bool(value, key)

    def size(self, key: str, default: int | None = None) -> int | None:
        """A byte count: a JSON number, or text with an optional k/M/G/T/P/E suffix."""
        value = self._tree.pop(key, None)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except SizeError:
                pass
        raise OptsError(f"Parameter '{key}' expects a non-negative number below 2^64")

    def number(self, key: str, default: int | None = None) -> int | None:
        value = self._tree.pop(key, None)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = int(value, 10)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise OptsError(f"Parameter '{key}' expects a number")

    def child(self, key: str) -> Any:
        """A child node: a dict, None (JSON null, or the empty string qemu still takes),
        a string (a reference to another node), or :data:`MISSING`."""
        if key not in self._tree:
            return MISSING
        value = self._tree.pop(key)
        return None if value == "" else value

    def finish(self) -> None:
        """Refuse every option nobody took, as qemu does."""
        if not self._tree:
            return
        first = next(iter(flatten(self._tree)))
        verb = "does not support" if self.kind == "format" else "doesn't support"
        raise OptsError(f"Block {self.kind} '{self.driver}' {verb} the option '{first}'")
