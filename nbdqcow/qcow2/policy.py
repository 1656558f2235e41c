"""MAPPING POLICY: when a host cluster is kept, reused or released, and what becomes of
its blocks in the host file.

This is where the project's promise lives.  For a discard, and for write-zeroes with
or without MAY_UNMAP, of a cluster this image owns alone (refcount 1):

============  ===============================  ============  ===========================
policy        guest -> host mapping            host space    old data in the host file
============  ===============================  ============  ===========================
``preserve``  kept (zero flag)                 kept          erased (FALLOC_FL_ZERO_RANGE)
``release``   freed (as qemu --discard=unmap)  returned      gone (hole punched)
``thin``      kept (zero flag)                 returned      gone (hole punched)
============  ===============================  ============  ===========================

Write-zeroes without MAY_UNMAP (NBD's NO_HOLE) always keeps the mapping and the space and
erases the data.  Writes onto a kept cluster land in place; under ``thin`` the blocks
are claimed again first, so a full file system fails that write with ENOSPC.  Shared
clusters (refcount > 1, internal snapshots) are copied before being written; the
mapping-keeping policies give the snapshot its own copy so the live cluster stays.
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
    THIN = "thin"

    @classmethod
    def parse(cls, value: str | bytes | None, default: Policy) -> Policy:
        if value is None:
            return default
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip("\0").strip()
        try:
            return cls(text)
        except ValueError:
            raise ImageOpenError(
                f"unknown mapping policy '{text}' ({', '.join(NAMES)})") from None

    @property
    def keeps_mapping(self) -> bool:
        """Whether a host cluster keeps its guest cluster for good (discard included)."""
        return self is not Policy.RELEASE

    def keep_host(self, op: Op) -> bool:
        """Whether an exclusively owned host cluster survives ``op``."""
        return self.keeps_mapping or op is Op.WRITE_ZEROES

    def punch_kept(self, op: Op) -> bool:
        """Whether a host cluster kept through ``op`` gives its blocks back (a hole that
        a later write claims again) rather than keeping them (data erased)."""
        return self is Policy.THIN and op is not Op.WRITE_ZEROES


NAMES = tuple(p.value for p in Policy)
DEFAULT_POLICY = Policy.PRESERVE
