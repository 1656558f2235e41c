"""READ/WRITE over 32 MiB from clients that skip block-size negotiation (issue 10 item 5).

libnbd with strict mode off sends what it is asked to (nbd-server's own test client sends
up to 48 MiB too).  nbdqcow takes READ/WRITE up to 64 MiB inside its memory budget, while
NBD_INFO_BLOCK_SIZE still advertises 32 MiB as the maximum.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tooling import ServerFactory, require_tool

MiB = 1 << 20


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_48_mib_write_and_read_with_libnbd(
    tmp_path: Path, fmt: str, nbdqcow_server: ServerFactory
) -> None:
    nbd = pytest.importorskip("nbd")
    require_tool("qemu-img")
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(128 * MiB)], check=True)
    srv = nbdqcow_server(img, "-f", fmt)  # no -t: one client, then exit 0
    data = os.urandom(MiB) * 48
    h = nbd.NBD()
    h.set_strict_mode(0)  # no client-side checks: the server decides
    h.connect_uri(srv.uri)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB  # still advertised
    h.pwrite(data, 16 * MiB)
    h.flush()
    assert h.pread(48 * MiB, 16 * MiB) == data
    assert h.pread(64 * MiB, 0) == bytes(16 * MiB) + data
    h.shutdown()
    del h
    assert srv.proc.wait(10) == 0
    raw = img if fmt == "raw" else tmp_path / "out.raw"
    if fmt != "raw":
        subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(raw)],
                       check=True)
    with open(raw, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(48 * MiB) == data
