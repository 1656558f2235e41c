"""Block status's "is this image metadata-preallocated?" (Qcow2Driver._metadata_preallocated,
counted a refcount block at a time) against its cluster-by-cluster definition, on
images with and without preallocated metadata, partly written, with refcount blocks
rewritten at random (counts near the threshold, blocks past the end of the file)."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.errors import ImageError
from nbdqcow.image import open_image
from nbdqcow.qcow2.create import Qcow2Options, create_qcow2


def _one_by_one(drv: Any) -> bool:
    """The definition: count refcounted clusters one at a time, stop at the threshold;
    an unreadable refcount means "not preallocated"."""
    cs = drv.geo.cluster_size
    real = drv.file.allocated_bytes() // cs
    threshold = max(real * 10 // 9, real + 2)
    count = 0
    try:
        for c in range(drv.geo.size_to_clusters(drv.file.size())):
            if drv.refcounts.get(c) > 0:
                count += 1
                if count >= threshold:
                    break
    except (ImageError, OSError, OverflowError, ValueError, MemoryError):
        return False
    return count >= threshold


def _damage(path: Path, r: random.Random) -> None:
    """Patched in place: the file stays as sparse as it was."""
    with open(path, "r+b") as f:
        hdr = f.read(104)
        cs = 1 << struct.unpack_from(">I", hdr, 20)[0]
        rt = struct.unpack_from(">Q", hdr, 48)[0]
        size = path.stat().st_size
        f.seek(rt)
        table = f.read(cs)
        blocks = [o for i in range(cs // 8) if (o := struct.unpack_from(">Q", table, 8 * i)[0])]
        for _ in range(r.randrange(4)):
            what = r.randrange(3)
            if what == 0 and blocks:  # refcounts zeroed or set over a random stretch
                a = r.randrange(cs)
                f.seek(r.choice(blocks) + a)
                f.write(bytes([r.choice([0, 1, 0xFF])]) * r.randrange(cs - a + 1))
            elif what == 1:  # a refcount table entry past the end of the file
                i = r.randrange(len(blocks) + 1)
                f.seek(rt + 8 * i)
                f.write(struct.pack(">Q", (size // cs + 9 + i) * cs))
            else:  # the file grows with an unallocated tail
                f.truncate(size + cs * r.randrange(1, 8))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 32), prealloc=st.sampled_from(["off", "metadata"]),
       cluster_bits=st.sampled_from([9, 12, 16]), refcount_order=st.sampled_from([0, 3, 4]),
       damage=st.booleans())
def test_bulk_count_equals_definition(tmp_path: Path, seed: int, prealloc: str,
                                      cluster_bits: int, refcount_order: int,
                                      damage: bool) -> None:
    r = random.Random(seed)
    p = tmp_path / f"i{seed}.qcow2"
    create_qcow2(str(p), r.randrange(1, 16) << 20,
                 Qcow2Options(cluster_bits=cluster_bits, refcount_order=refcount_order,
                              preallocation=prealloc))
    drv: Any = open_image(str(p), "qcow2", writable=True)
    try:
        for _ in range(r.randrange(6)):
            n = r.randrange(1, 64) * 4096
            off = r.randrange(0, max(1, (drv.size - n) // 4096)) * 4096
            if off + n <= drv.size:
                drv.pwrite(bytes([r.randrange(1, 256)]) * n, off)
        drv.flush()
    finally:
        drv.close()
    if damage:
        _damage(p, r)
    try:
        a: Any = open_image(str(p), "qcow2", writable=False)
    except ImageError:
        return  # refused at open: nothing to compare
    try:
        want = _one_by_one(a)
    finally:
        a.close()
    b: Any = open_image(str(p), "qcow2", writable=False)
    try:
        assert b._metadata_preallocated() == want
    finally:
        b.close()


def test_unreadable_block_before_the_threshold(tmp_path: Path) -> None:
    """Metadata preallocated (every cluster refcounted, the file sparse): yes; with the
    first refcount block past the end of the file: no, though the blocks after it
    alone would say yes (an unreadable refcount is "not preallocated")."""
    p = tmp_path / "m.qcow2"
    create_qcow2(str(p), 16 << 20, Qcow2Options(cluster_bits=9, preallocation="metadata"))
    drv: Any = open_image(str(p), "qcow2", writable=False)
    try:
        assert drv._metadata_preallocated() and _one_by_one(drv)
    finally:
        drv.close()
    with open(p, "r+b") as f:  # in place: the file stays sparse
        rt = struct.unpack_from(">Q", f.read(104), 48)[0]
        f.seek(rt)
        f.write(struct.pack(">Q", (p.stat().st_size // 512 + 9) * 512))
    drv = open_image(str(p), "qcow2", writable=False)
    try:
        assert not drv._metadata_preallocated() and not _one_by_one(drv)
    finally:
        drv.close()
