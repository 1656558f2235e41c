"""MAPPING POLICY: when a host cluster is kept, reused or released.

This is where the project's promise lives.  ``release`` behaves like qemu: discard
and write-zeroes with MAY_UNMAP free the host cluster.  ``preserve`` keeps the host
cluster of every cluster whose refcount is 1 (it is marked zero instead).  Writes onto
a kept cluster (zero-allocated or an extended-L2 reservation) always land in place.
Shared clusters (refcount > 1) are always copied before being written.
"""

from __future__ import annotations

from enum import Enum

from nbdqcow.errors import ImageOpenError


class Op(Enum):
    WRITE_ZEROES = "write_zeroes"
    WRITE_ZEROES_UNMAP = "write_zeroes_unmap"
    DISCARD = "discard"


class Policy(Enum):
    PRESERVE = "preserve"
    RELEASE = "release"

    @classmethod
    def parse(cls, value: str | bytes | None, default: Policy) -> Policy:
        if value is None:
            return default
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip("\0").strip()
        try:
            return cls(text)
        except ValueError:
            raise ImageOpenError(f"unknown mapping policy '{text}' (preserve or release)") from None

    def keep_host(self, op: Op) -> bool:
        """Whether an exclusively owned host cluster survives ``op``."""
        if self is Policy.PRESERVE:
            return True
        return op is Op.WRITE_ZEROES


DEFAULT_POLICY = Policy.PRESERVE
