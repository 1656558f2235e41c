"""The L2 entry masks of :mod:`nbdqcow.qcow2.layout` as numpy scalars, for the bulk
scanners (``scan``, ``check.sweep``, ``check.bulk``): one definition, and arithmetic on
uint64 arrays stays uint64 (a Python int mask would promote it)."""

from __future__ import annotations

import numpy as np

from nbdqcow.qcow2 import layout as L

COMP = np.uint64(L.QCOW_OFLAG_COMPRESSED)
COPIED = np.uint64(L.QCOW_OFLAG_COPIED)
ZERO = np.uint64(L.QCOW_OFLAG_ZERO)
OFF = np.uint64(L.L2E_OFFSET_MASK)
RESERVED = np.uint64(L.L2E_STD_RESERVED_MASK)
LOW32 = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)
