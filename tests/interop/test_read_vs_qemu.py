"""Differential reads: the engine reads every qemu-made image exactly as qemu-img does.

The reference is ``qemu-img convert -O raw`` of the same image (for internal snapshots,
``qemu-img convert -l snapshot.name=...``); the engine opens the image read-only and reads
it in chunks of odd sizes, then at random unaligned places.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import imagegen
import pytest
from imagegen import Case

from nbdqcow.block.driver import BlockDriver

CHUNKS = (65537, 4097, 1000003, 511, 262147, 3)


def sha256(path: Path) -> dict[str, str]:
    """Digests of the image and of every file beside it (backing and data files)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.parent.iterdir()) if p.is_file()
    }


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first differing byte of two equally long buffers."""
    lo, hi = 0, len(a)
    while hi - lo > 4096:  # bisect on slices: cheap for long equal prefixes
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


def assert_same(got: bytes, want: bytes, where: int, what: str) -> None:
    assert len(got) == len(want), f"{what}: read {len(got)} bytes at {where}, wanted {len(want)}"
    if got != want:
        i = first_difference(got, want)
        raise AssertionError(
            f"{what}: first difference at guest offset {where + i:#x}: "
            f"engine {got[i:i + 16].hex()} qemu {want[i:i + 16].hex()}"
        )


def check_reads(drv: BlockDriver, ref: bytes, seed: str, what: str) -> None:
    size = drv.size
    pread = drv.pread
    assert size == len(ref), f"{what}: size {size}, qemu-img convert gave {len(ref)}"
    # the full image, in chunks of odd sizes
    pos, i = 0, 0
    while pos < size:
        n = min(CHUNKS[i % len(CHUNKS)], size - pos)
        assert_same(bytes(pread(pos, n)), ref[pos:pos + n], pos, what)
        pos += n
        i += 1
    # random unaligned reads, some across cluster boundaries, some at the very end
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.choice((1, 7, 511, 513, 4095, 65535, 65537, 200001))
        n = min(n, size)
        off = rng.randrange(0, size - n + 1)
        assert_same(bytes(pread(off, n)), ref[off:off + n], off, what)
    assert_same(bytes(pread(size - 1, 1)), ref[-1:], size - 1, what)
    # preadinto a buffer full of garbage (the server reuses buffers): every byte written
    pos, i = 0, 0
    while pos < size:
        n = min(CHUNKS[(i + 3) % len(CHUNKS)], size - pos)
        buf = bytearray(b"\xa5" * n)
        drv.preadinto(pos, memoryview(buf))
        assert_same(bytes(buf), ref[pos:pos + n], pos, what + " (preadinto)")
        pos += n
        i += 1


def test_full_read_equals_qemu(case_image: tuple[Case, Path], tmp_path: Path) -> None:
    from nbdqcow.image import open_image

    case, path = case_image
    ref = imagegen.convert_to_raw(path, tmp_path / "ref.raw")
    before = sha256(path)
    drv = open_image(str(path), writable=False)
    try:
        check_reads(drv, ref, case.name, case.name)
    finally:
        drv.close()
    assert sha256(path) == before, "a read-only open changed the image or its backing/data files"


SNAPSHOT_CASES = [c for c in imagegen.CASES if c.snapshots]


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=[c.name for c in SNAPSHOT_CASES])
def test_snapshot_read_equals_qemu(
    case: Case, image_factory: Callable[[str], Path], tmp_path: Path
) -> None:
    from nbdqcow.image import open_image

    path = image_factory(case.name)
    before = sha256(path)
    active = imagegen.convert_to_raw(path, tmp_path / "active.raw")
    listing = imagegen.qemu_img("snapshot", "-l", str(path)).stdout
    for name in case.snapshots:
        ref = imagegen.convert_to_raw(path, tmp_path / "snap.raw", snapshot=name)
        assert ref != active, "test setup: the snapshot should differ from the active layer"
        # find the snapshot's id in qemu-img's listing ("ID TAG ...")
        ids = [ln.split()[0] for ln in listing.splitlines()[2:] if ln.split()[1:2] == [name]]
        assert ids, listing
        for key in (name, ids[0]):
            drv = open_image(str(path), writable=False, snapshot=key)
            try:
                check_reads(drv, ref, f"{case.name}/{key}", f"{case.name} snapshot {key}")
            finally:
                drv.close()
    assert sha256(path) == before, "opening a snapshot changed the image file"


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=[c.name for c in SNAPSHOT_CASES])
def test_unknown_snapshot_is_refused(case: Case, image_factory: Callable[[str], Path]) -> None:
    from nbdqcow.errors import ImageOpenError
    from nbdqcow.image import open_image

    path = image_factory(case.name)
    with pytest.raises(ImageOpenError) as e:
        open_image(str(path), writable=False, snapshot="no-such-snapshot")
    assert "\n" not in str(e.value) and str(e.value)
