"""What a check reports (qemu-img's ImageCheck record, its exit status and messages) and
the repairs it may make (``FIX_LEAKS``, ``FIX_ERRORS``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbdqcow.errors import NbdqcowError

FIX_LEAKS = 1
FIX_ERRORS = 2


class CheckFailed(NbdqcowError):
    """The check could not complete (qemu-img: "Check failed: ...")."""


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports (its ImageCheck record)."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    # the lines qemu-img prints on stderr while checking ("ERROR cluster 5 ...")
    messages: list[str] = field(default_factory=list)
    # set when the check could not complete (qemu-img: "Check failed: <why>")
    failure: str | None = None
    # the active clusters' places (check.bulk.GuestMap), when the walk saw them all
    guest_map: Any = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks."""
        if self.check_errors or self.failure:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The ImageCheck fields as qemu-img's JSON has them (absent when zero)."""
        out: dict[str, Any] = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
        }
        optional = (
            ("image-end-offset", self.image_end_offset), ("corruptions", self.corruptions),
            ("leaks", self.leaks), ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed), ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        )
        for key, value in optional:
            if value:
                out[key] = value
        return out
