"""Write-zeroes pieces smaller than a cluster: the engine leaves the image as qemu does.

qemu (qcow2 v3, standard L2) turns a partial zero write into a zero cluster when the
cluster holds no data and the rest of it reads as zero; otherwise it writes the zeros
(allocating the cluster when it was not).  Same data is not enough here: `qemu-img map`
of the two images must agree too, and ours must pass `qemu-img check`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import imagegen
import pytest

K = 1024
CL = 64 * K


def _map(path: Path) -> list[tuple[object, ...]]:
    # host offsets may differ (allocation order); everything else must not
    return [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"])
            for e in imagegen.qemu_map_json(path)]


SCENARIOS = {
    # name: (image setup qemu-io commands, backing setup or None, zero writes)
    "unallocated-head": ([], None, [(1000, 5000)]),
    "unallocated-across-two": ([], None, [(CL - 512, 1024)]),
    "unallocated-full-plus-tail": ([], None, [(0, CL + 1000)]),
    "data-cluster": ([f"write -P 7 0 {CL}"], None, [(1000, 5000)]),
    "zero-cluster": ([f"write -z 0 {CL}"], None, [(1000, 5000)]),
    "backing-data-elsewhere-in-cluster": ([], [f"write -P 9 {CL // 2} 4096"], [(1000, 5000)]),
    "backing-zero-in-cluster": ([], [f"write -P 9 {2 * CL} 4096"], [(1000, 5000)]),
    "backing-data-under-piece": ([], [f"write -P 9 0 {CL}"], [(1000, 5000)]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_partial_zero_writes_match_qemu(name: str, tmp_path: Path) -> None:
    from nbdqcow.image import open_image

    setup, backing_setup, zeroes = SCENARIOS[name]
    backing = None
    if backing_setup is not None:
        backing = imagegen.create(tmp_path / "base.qcow2", 1 << 20)
        imagegen.qemu_io(backing, backing_setup)
    ours = imagegen.create(tmp_path / "ours.qcow2", 1 << 20, backing=backing)
    if setup:
        imagegen.qemu_io(ours, setup)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)

    imagegen.qemu_io(theirs, [f"write -z {off} {n}" for off, n in zeroes])
    drv = open_image(str(ours), writable=True)
    try:
        for off, n in zeroes:
            drv.write_zeroes(off, n)
    finally:
        drv.close()

    assert imagegen.convert_to_raw(ours, tmp_path / "a.raw") == imagegen.convert_to_raw(
        theirs, tmp_path / "b.raw")
    assert _map(ours) == _map(theirs)
    assert imagegen.qemu_img("check", str(ours), check=False).returncode == 0
