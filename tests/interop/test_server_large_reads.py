"""Large READs: sent with sendfile(2) from the page cache when the data allows it, else
copied; the bytes must be the image's either way, with or without structured replies,
over unix and TCP sockets, and right after overlapping writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tooling import ServerFactory, repo_env, require_tool

MiB = 1 << 20
SIZE = 16 * MiB


def make(tmp_path: Path, fmt: str) -> tuple[Path, bytes]:
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(SIZE)], check=True)
    cmds = ["write -P 0x11 0 3M", "write -P 0x22 5M 2M", "write -z 6M 64k",
            "write -P 0x33 9M 4k", "write -P 0x44 12M 4M"]
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(img)], check=True, capture_output=True)
    # random bytes in the middle of the data runs, so that misplaced bytes show
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(MiB))
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -s {blob} 1M 1M", str(img)],
                   check=True, capture_output=True)
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(ref)], check=True)
    return img, ref.read_bytes()


def handle(uri: str, structured: bool) -> Any:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h


READS = [(0, MiB), (MiB, MiB), (MiB + 4096 * 3, MiB), (512 * 1024 + 17, 3 * MiB),
         (5 * MiB, 2 * MiB), (6 * MiB - 300, 1 * MiB), (12 * MiB, 4 * MiB), (0, SIZE)]


@pytest.mark.parametrize(("fmt", "args", "tcp"), [
    ("qcow2", (), False),
    ("qcow2", ("--mapping", "release"), False),
    ("qcow2", (), True),
    ("raw", (), False),
])
@pytest.mark.parametrize("structured", [True, False])
def test_large_reads_return_the_image(tmp_path: Path, fmt: str, args: tuple[str, ...],
                                      tcp: bool, structured: bool,
                                      nbdqcow_server: ServerFactory) -> None:
    require_tool("qemu-img")
    img, ref = make(tmp_path, fmt)
    subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)  # cached
    srv = nbdqcow_server(img, "-f", fmt, "-t", *args, tcp=tcp)
    h = handle(srv.uri, structured)
    model = bytearray(ref)
    try:
        for rnd in range(2):
            for off, n in READS:
                assert h.pread(n, off) == model[off:off + n], (rnd, off, n)
            # overlapping writes between the rounds: the next reads must see them
            for off, n in READS[:4]:
                data = os.urandom(n)
                h.pwrite(data, off)
                model[off:off + n] = data
        # many large reads in flight at once, answered out of order
        nbd = pytest.importorskip("nbd")
        bufs = {off: nbd.Buffer(MiB) for off in range(0, SIZE, MiB)}
        for off, buf in bufs.items():
            h.aio_pread(buf, off)
        while h.aio_in_flight():
            h.poll(-1)
        for off, buf in bufs.items():
            assert buf.to_bytearray() == model[off:off + MiB], off
        h.flush()
    finally:
        h.shutdown()
    srv.stop()
    out = tmp_path / "after.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(out)],
                   check=True, env=repo_env())
    assert out.read_bytes() == bytes(model)
