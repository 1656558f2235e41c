"""``nbdqcow check``'s mapping line from the check's own walk (no second walk) says what
the full mapping walk (layout_view.mapping_summary) says, on images qemu-io wrote; and
the host cluster kinds of ``layout``, found in bulk, are the ones found one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagegen import create, qemu_io

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.check import check_file
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.layout_view import (
    GuestRun,
    Kind,
    _metadata_clusters,
    guest_runs,
    host_kinds,
    mapping_summary,
)

MiB = 1 << 20

CASES = {
    "empty": (8 * MiB, []),
    "in place": (8 * MiB, ["write -P 1 0 8M"]),
    "swapped": (8 * MiB, ["write -P 1 1M 1M", "write -P 2 0 1M", "write -P 3 6M 64k"]),
    "zero and discard": (8 * MiB, ["write -P 1 0 2M", "write -z 512k 128k",
                                   "discard 1M 64k", "write -P 4 5M 64k"]),
    "partial last cluster": (8 * MiB + 4096, ["write -P 5 8M 4k", "write -P 6 0 64k"]),
    "reversed": (4 * MiB, [f"write -P {i + 1} {(63 - i) * 65536} 64k" for i in range(64)]),
    "two tables": (1200 * MiB, ["write -P 1 1100M 64k", "write -P 2 0 64k",
                                "write -P 3 600M 128k"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mapping_line_from_the_walk(tmp_path: Path, qemu_tools: None, name: str) -> None:
    size, cmds = CASES[name]
    img = create(tmp_path / "img.qcow2", size, opts={"cluster_size": "65536"})
    if cmds:
        qemu_io(img, cmds)
    f = HostFile(str(img), writable=False)
    try:
        res = check_file(f, str(img))
    finally:
        f.close()
    assert res.guest_map is not None
    d = Qcow2Driver.open(str(img), writable=False, backing=no_backing)
    try:
        want = mapping_summary(d)
    finally:
        d.close()
    assert res.guest_map.summary() == want


def reference_host_kinds(d: Qcow2Driver, runs: list[GuestRun]) -> bytearray:
    """The kinds of host clusters, one cluster at a time (the definition)."""
    geo = d.geo
    cb = geo.cluster_bits
    n = geo.size_to_clusters(d.file.size())
    kinds = bytearray(n)
    rc = d.refcounts
    for c in range(n):
        if rc.get(c):
            kinds[c] = Kind.OTHER

    def mark(c: int, k: Kind) -> None:
        if 0 <= c < n and not (kinds[c] == Kind.DATA and k in (Kind.KEPT_ZERO, Kind.RESERVED)):
            kinds[c] = k

    for c in _metadata_clusters(d):
        mark(c, Kind.METADATA)
    for r in runs:
        if r.host is not None:
            for c in range(r.host >> cb, ((r.host + r.length - 1) >> cb) + 1):
                mark(c, r.kind)
    for e in d.l1:
        off = e & 0x00FFFFFFFFFFFE00
        if off:
            table = d.l2_cache.get(off)
            for i in range(0, len(table), geo.l2_entry_words):
                if table[i] & (1 << 62):
                    for c in geo.compressed_host_clusters(table[i]):
                        mark(c, Kind.COMPRESSED)
    return kinds


@pytest.mark.parametrize("ext", [False, True])
def test_host_kinds_in_bulk(tmp_path: Path, qemu_tools: None, ext: bool) -> None:
    opts = {"cluster_size": "65536"} | ({"extended_l2": "on"} if ext else {})
    img = create(tmp_path / "img.qcow2", 16 * MiB, opts=opts)
    qemu_io(img, ["write -P 1 1M 1M", "write -P 2 0 1M", "write -z 3M 64k",
                  "write -c -P 3 5M 64k", "write -P 4 7M 4k", "write -z 9M 4k",
                  "discard 1M 64k", "write -P 5 12M 64k"])
    d = Qcow2Driver.open(str(img), writable=False, backing=no_backing)
    try:
        runs = guest_runs(d)
        assert host_kinds(d, runs) == reference_host_kinds(d, runs)
    finally:
        d.close()
