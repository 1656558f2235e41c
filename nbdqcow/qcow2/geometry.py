"""PURE: cluster arithmetic derived from the header (qcow2.txt "Cluster mapping",
"Host cluster management", "Compressed Clusters Descriptor").  qemu's helper names."""

from __future__ import annotations

from dataclasses import dataclass

from nbdqcow.qcow2 import layout as L


@dataclass(frozen=True)
class Geometry:
    cluster_bits: int
    refcount_order: int
    extended_l2: bool

    # --- clusters --------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def offset_into_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def start_of_cluster(self, offset: int) -> int:
        return offset & ~(self.cluster_size - 1)

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cluster_size - 1) >> self.cluster_bits

    # --- L1 / L2 ---------------------------------------------------------------------
    @property
    def l2_entry_words(self) -> int:
        """64-bit words per L2 entry: 1 standard, 2 extended."""
        return 2 if self.extended_l2 else 1

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - 3 - (1 if self.extended_l2 else 0)

    @property
    def l2_size(self) -> int:
        """Entries per L2 table."""
        return 1 << self.l2_bits

    def offset_to_l1_index(self, offset: int) -> int:
        return offset >> (self.l2_bits + self.cluster_bits)

    def offset_to_l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_size - 1)

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map a virtual disk of ``size`` bytes."""
        span = 1 << (self.l2_bits + self.cluster_bits)
        return (size + span - 1) // span

    # --- subclusters -----------------------------------------------------------------
    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits

    @property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits

    @property
    def subclusters_per_cluster(self) -> int:
        return L.SUBCLUSTERS if self.extended_l2 else 1

    def offset_to_sc_index(self, offset: int) -> int:
        return (offset >> self.subcluster_bits) & (self.subclusters_per_cluster - 1)

    # --- refcounts -------------------------------------------------------------------
    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def refcount_block_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def refcount_block_entries(self) -> int:
        return 1 << self.refcount_block_bits

    # --- compressed clusters ---------------------------------------------------------
    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def compressed_extent(self, l2_entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of a compressed cluster's data."""
        off = l2_entry & self.cluster_offset_mask
        nb_sectors = ((l2_entry >> self.csize_shift) & self.csize_mask) + 1
        return off, nb_sectors * L.SECTOR - (off & (L.SECTOR - 1))

    def compressed_host_clusters(self, l2_entry: int) -> range:
        """Host cluster indexes a compressed cluster's data touches (each refcounted)."""
        off, n = self.compressed_extent(l2_entry)
        return range(off >> self.cluster_bits, ((off + n - 1) >> self.cluster_bits) + 1)
