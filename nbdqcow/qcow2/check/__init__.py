"""Consistency check and repair of a qcow2 image (qcow2.txt "Host cluster management",
"Cluster mapping", "Snapshots", "Bitmaps"), with the figures and the verdicts of
``qemu-img check``.

The check walks every reference an image holds and counts them in memory
(:mod:`.walk`), then compares those counts with the refcounts stored in the image
(:mod:`.stored`, :mod:`.compare`); repairs that rewrite the refcount structure or the
header are in :mod:`.repair`, what a check reports in :mod:`.result`, and one pass and
the entry points in :mod:`.run`.
"""

from nbdqcow.qcow2.check.result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult
from nbdqcow.qcow2.check.run import check_file, check_image, rebuild_refcounts
from nbdqcow.qcow2.check.stored import MAX_TABLE_READ, read_at
from nbdqcow.qcow2.check.walk import MAX_CLUSTERS

__all__ = [
    "FIX_ERRORS",
    "FIX_LEAKS",
    "MAX_CLUSTERS",
    "MAX_TABLE_READ",
    "CheckFailed",
    "CheckResult",
    "check_file",
    "check_image",
    "read_at",
    "rebuild_refcounts",
]
