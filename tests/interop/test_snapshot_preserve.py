"""Issue 4, internal snapshots: a write to a cluster shared with a snapshot must not change
the snapshot.  Under ``preserve`` the live image keeps its mapping (the snapshot gets the
copy); under ``release`` the live cluster is copied as qemu does (it moves).

Scenario: preallocate, fill, ``qemu-img snapshot -c s1``, overwrite clusters over NBD
(write, partial write, write-zeroes), then offline: the live mapping is (or is not)
unchanged, ``qemu-img convert -l s1`` gives the old data, ``qemu-img check`` is clean.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tooling import ServerFactory, repo_env, require_tool

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
SIZE = 4 * MiB


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=repo_env())
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}{res.stdout}"
    return res


def host_offsets(img: Path) -> dict[int, int]:
    """guest cluster -> host offset, from qemu-img map (clusters with an offset only)."""
    out: dict[int, int] = {}
    for e in json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout):
        if "offset" not in e:
            continue
        for c in range(e["start"] // CS, (e["start"] + e["length"]) // CS):
            out[c] = e["offset"] + c * CS - e["start"]
    return out


def make_image(tmp_path: Path, extended_l2: bool) -> tuple[Path, bytes]:
    img = tmp_path / "snap.qcow2"
    opts = f"cluster_size={CS},preallocation=full,extended_l2={'on' if extended_l2 else 'off'}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE}", str(img))
    run("qemu-img", "snapshot", "-c", "s1", str(img))
    return img, b"\x5a" * SIZE


@pytest.mark.parametrize("extended_l2", [False, True], ids=["std-l2", "ext-l2"])
@pytest.mark.parametrize("mapping", ["preserve", "release"])
def test_write_after_snapshot(
    tmp_path: Path, nbdqcow_server: ServerFactory, mapping: str, extended_l2: bool
) -> None:
    nbd = pytest.importorskip("nbd")
    img, old = make_image(tmp_path, extended_l2)
    before = host_offsets(img)
    assert len(before) == SIZE // CS

    srv = nbdqcow_server(img, "-t", f"--mapping={mapping}", "--discard=unmap")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    model = bytearray(old)
    writes = [(1 * CS, b"\x01" * CS), (3 * CS + 100, b"\x02" * 5000), (7 * CS - 10, b"\x03" * 30)]
    for off, data in writes:
        h.pwrite(data, off)
        model[off : off + len(data)] = data
    h.zero(CS, 5 * CS)
    model[5 * CS : 6 * CS] = bytes(CS)
    h.flush()
    assert h.pread(SIZE, 0) == bytes(model)
    h.shutdown()
    assert srv.stop() == 0

    after = host_offsets(img)
    touched = {1, 3, 6, 7}
    if mapping == "preserve":
        # every cluster still has its host offset, the zeroed one included
        assert {c: after.get(c) for c in before} == before
    else:
        # qemu's copy-on-write: the written clusters moved
        assert all(after.get(c) != before[c] for c in touched)
    check = run("qemu-img", "check", str(img)).stdout
    assert "No errors were found" in check
    if mapping == "preserve":
        assert "0.00% fragmented" in check

    snap = tmp_path / "s1.raw"
    run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", str(img), str(snap))
    assert snap.read_bytes() == old
    live = tmp_path / "live.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(live))
    assert live.read_bytes() == bytes(model)
