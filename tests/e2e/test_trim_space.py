"""TRIM and the host file, for each mapping policy (README "Mapping policy").

A client writes 8 MiB of a recognisable pattern and trims it (and part of one more
cluster, which changes nothing: as in qemu, a discard covers whole clusters only).
Afterwards, with the server stopped:

- the pattern is nowhere in the .qcow2 file, whatever the policy (nothing trimmed can be
  read from the image file);
- ``st_blocks``: ``preserve`` keeps the space, ``release`` and ``thin`` give it back;
- ``qemu-img map`` offsets: ``preserve`` and ``thin`` keep every trimmed cluster's host
  offset, and a rewrite lands at the same offsets (in place); ``release`` frees them;
- block status: ``preserve`` reports zero without HOLE (space kept), the others HOLE|ZERO;
- ``qemu-img check`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tooling import ServerFactory, repo_env, require_tool

from nbdqcow.nbd.constants import BASE_ALLOCATION
from nbdqcow.nbdclient.sync import SyncClient

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB
TRIMMED = 8 * MiB
SECRET = b"TRIM-ME-PLEASE:"
PARTIAL = b"PARTIAL-TRIM!!!:"
KEPT = b"KEEP-THIS-ONE!!:"


def _pattern(marker: bytes, n: int) -> bytes:
    return (marker * (n // len(marker) + 1))[:n]


def _map(image: Path, length: int) -> list[tuple[int, int, int | None, bool]]:
    """(start, length, host offset, zero) of qemu-img map over [0, length)."""
    p = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                       capture_output=True, text=True, check=True)
    out = []
    for e in json.loads(p.stdout):
        if e["start"] < length:
            out.append((e["start"], e["length"], e.get("offset"), bool(e["zero"])))
    return out


def _host_offsets(image: Path, length: int) -> dict[int, int]:
    """guest cluster -> host offset over [0, length) (clusters with an offset)."""
    res = {}
    for start, n, off, _ in _map(image, length):
        if off is not None:
            for c in range(start, min(start + n, length), CLUSTER):
                res[c] = off + (c - start)
    return res


def _check_clean(image: Path) -> None:
    p = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(image)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    for key in ("leaks", "corruptions", "check-errors"):
        assert not report.get(key), report


def _blocks(image: Path) -> int:
    return os.stat(image).st_blocks * 512


def _session(start: ServerFactory, image: Path, policy_args: tuple[str, ...]) -> SyncClient:
    served = start(image, "-f", "qcow2", "-t", "--discard=unmap", *policy_args)
    c = SyncClient(served.uri, meta_contexts=(BASE_ALLOCATION,))
    c.served = served  # type: ignore[attr-defined]
    return c


def _end(c: SyncClient) -> None:
    c.close()
    assert c.served.stop() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", ["preserve", "release", "thin"])
def test_trim_space_and_data(nbdqcow_server: ServerFactory, tmp_path: Path, policy: str) -> None:
    require_tool("qemu-img")
    image = tmp_path / "img.qcow2"
    if policy == "thin":
        # stored in the image: no option needed when serving
        subprocess.run([sys.executable, "-m", "nbdqcow", "create", "-q", "-f", "qcow2", "-o",
                        f"mapping={policy}", str(image), "64M"], check=True, env=repo_env())
        args: tuple[str, ...] = ()
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"],
                       check=True)
        args = (f"--mapping={policy}",)

    c = _session(nbdqcow_server, image, args)
    c.pwrite(_pattern(SECRET, TRIMMED), 0)
    last = bytearray(_pattern(KEPT, CLUSTER))
    last[4 * KiB : 12 * KiB] = _pattern(PARTIAL, 8 * KiB)
    c.pwrite(last, TRIMMED)
    c.flush()
    _end(c)
    before_blocks = _blocks(image)
    before_map = _host_offsets(image, TRIMMED)
    assert len(before_map) == TRIMMED // CLUSTER
    assert SECRET in image.read_bytes()

    c = _session(nbdqcow_server, image, args)
    c.trim(0, TRIMMED)
    c.trim(TRIMMED + 4 * KiB, 8 * KiB)  # part of a cluster: nothing happens
    c.flush()
    ext = c.block_status(0, TRIMMED)[BASE_ALLOCATION]
    flags = {f for _, f in ext}
    assert sum(n for n, _ in ext) >= TRIMMED
    assert c.pread(TRIMMED, CLUSTER) == bytes(last)
    _end(c)

    raw = image.read_bytes()
    assert SECRET not in raw, "trimmed data is still readable in the image file"
    assert KEPT in raw and PARTIAL in raw  # (the documented limit, as in qemu)
    after_blocks = _blocks(image)
    after_map = _host_offsets(image, TRIMMED)
    _check_clean(image)
    if policy == "preserve":
        assert flags == {2}, f"preserve: zero, no HOLE expected: {ext}"
        assert after_blocks >= before_blocks - 64 * KiB, (before_blocks, after_blocks)
        assert after_map == before_map
    elif policy == "thin":
        assert flags == {3}, f"thin: HOLE|ZERO expected: {ext}"
        assert after_blocks <= before_blocks - TRIMMED + 64 * KiB, (before_blocks, after_blocks)
        assert after_map == before_map
    else:
        assert flags == {3}, f"release: HOLE|ZERO expected: {ext}"
        assert after_blocks <= before_blocks - TRIMMED + 64 * KiB, (before_blocks, after_blocks)
        assert after_map == {}

    # a rewrite: in place under the mapping-keeping policies (space claimed again)
    c = _session(nbdqcow_server, image, args)
    c.pwrite(_pattern(b"REWRITTEN", 2 * MiB), 0)
    assert c.pread(0, 2 * MiB) == _pattern(b"REWRITTEN", 2 * MiB)
    _end(c)
    rewritten = _host_offsets(image, 2 * MiB)
    if policy != "release":
        assert rewritten == {k: v for k, v in before_map.items() if k < 2 * MiB}
    _check_clean(image)
    assert _blocks(image) >= after_blocks + 2 * MiB - 64 * KiB or policy == "preserve"


@pytest.mark.parametrize("policy", ["preserve", "release", "thin"])
def test_write_zeroes_no_hole_keeps_space(nbdqcow_server: ServerFactory, tmp_path: Path,
                                          policy: str) -> None:
    """WRITE_ZEROES with NO_HOLE keeps mapping and space under every policy, and erases."""
    require_tool("qemu-img")
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    c = _session(nbdqcow_server, image, (f"--mapping={policy}",))
    c.pwrite(_pattern(SECRET, 2 * MiB), 0)
    _end(c)
    before_map, before_blocks = _host_offsets(image, 2 * MiB), _blocks(image)
    c = _session(nbdqcow_server, image, (f"--mapping={policy}",))
    c.write_zeroes(0, 2 * MiB, no_hole=True)
    assert c.pread(0, 2 * MiB) == bytes(2 * MiB)
    _end(c)
    assert SECRET not in image.read_bytes()
    assert _host_offsets(image, 2 * MiB) == before_map
    assert _blocks(image) >= before_blocks - 64 * KiB
    _check_clean(image)
