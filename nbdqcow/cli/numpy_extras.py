"""numpy without the parts nbdqcow never uses, until someone uses them.

``import numpy`` (1.x) also imports ``numpy.random``, ``numpy.ma``, ``numpy.polynomial``,
``numpy.fft`` and ``numpy.ctypeslib``: about a third of its import time (~20 ms here,
where the whole of ``nbdqcow check`` of a 1 TiB sparse image is ~150 ms).  The command
line calls :func:`defer` before anything imports numpy: each of those subpackages is
then a placeholder module in ``sys.modules`` that imports the real one on first
attribute access and takes on its contents, so code that does use them still works
(``numpy.random.default_rng(...)``, ``from numpy.ma import masked_array``).
"""

from __future__ import annotations

import importlib
import sys
import types

EXTRAS = ("random", "ma", "polynomial", "fft", "ctypeslib")


class _Deferred(types.ModuleType):
    """Stands for ``numpy.<name>`` until an attribute of it is asked for."""

    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)  # the import system probing: stay a placeholder
        return getattr(self._load(), attr)

    def _load(self) -> types.ModuleType:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        for k, v in vars(real).items():
            if k not in ("__name__", "__class__"):
                self.__dict__[k] = v
        return real


def defer() -> None:
    """Put the placeholders in place, unless numpy is already imported (or missing)."""
    if "numpy" in sys.modules:
        return
    for name in EXTRAS:
        sys.modules.setdefault(f"numpy.{name}", _Deferred(f"numpy.{name}"))
