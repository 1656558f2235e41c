"""writes_in_place: the drivers' answer to 'would this write only copy data?' (the server
runs large writes on its event loop only then)."""

from __future__ import annotations

from pathlib import Path

from nbdqcow.image.open import open_image
from nbdqcow.qcow2.create import Qcow2Options, create_qcow2
from nbdqcow.qcow2.snapshot_ops import create_snapshot

MiB = 1 << 20


def test_qcow2_in_place_only_over_owned_contiguous_clusters(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(str(path), 8 * MiB, Qcow2Options(cluster_bits=16))
    drv = open_image(str(path), "qcow2", writable=True)
    try:
        assert not drv.writes_in_place(0, MiB)  # unallocated: the write allocates
        drv.pwrite(b"\1" * (2 * MiB), 0)
        assert drv.writes_in_place(0, MiB) and drv.writes_in_place(4096, 2 * MiB - 4096)
        assert not drv.writes_in_place(MiB, 2 * MiB)  # half of it is unallocated
        assert not drv.writes_in_place(8 * MiB - 4096, 8192)  # past the end
        drv.write_zeroes(0, 65536)  # a zero cluster: writing it changes its entry
        assert not drv.writes_in_place(0, MiB)
        drv.flush()
    finally:
        drv.close()
    create_snapshot(str(path), "s1")  # clusters shared with a snapshot: copied on write
    drv = open_image(str(path), "qcow2", writable=True)
    try:
        assert not drv.writes_in_place(MiB, MiB)
    finally:
        drv.close()
    drv = open_image(str(path), "qcow2", writable=False)
    try:
        assert not drv.writes_in_place(MiB, MiB)
    finally:
        drv.close()


def test_raw_writes_in_place(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(MiB))
    drv = open_image(str(path), "raw", writable=True)
    try:
        assert drv.writes_in_place(0, MiB)
    finally:
        drv.close()
