"""How guest clusters sit in the host file, in one record (qcow2.txt "Cluster mapping"):
what ``check``'s mapping line and ``layout`` say.  Apart from the modules that compute it,
so that a check imports no more than it needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MappingSummary:
    """How guest clusters sit in the host file."""

    cluster_size: int
    mapped_clusters: int
    runs: int  # maximal runs that are contiguous in guest and host
    offset: int | None  # host - guest of most mapped bytes (None: nothing mapped)
    out_of_place: int  # mapped clusters whose host - guest differs from ``offset``
    external_data_file: bool = False

    @property
    def constant(self) -> bool:
        return self.offset is not None and self.out_of_place == 0

    @property
    def verdict(self) -> str:
        if self.offset is None:
            return "no guest cluster is mapped"
        where = "data file offset" if self.external_data_file else "host"
        if self.constant:
            sign = "+" if self.offset >= 0 else "-"
            return f"constant: {where} = guest {sign} {abs(self.offset):#x}"
        return (f"{self.runs} runs, {self.out_of_place} of {self.mapped_clusters} "
                f"clusters out of place")
