"""Random compressed writes mixed with normal writes, write-zeroes, discards, flushes
and reopens (both mapping policies, zlib and zstd, standard and extended L2), against a
bytearray model; at the end qemu-img finds the refcounts right (compressed data packed
into shared host clusters, freed while the packing cursor points into them) and the
data equal."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from tooling import require_tool

from nbdqcow.qcow2.compressing import CompressedWriteError
from nbdqcow.qcow2.driver import Qcow2Driver

SIZE = 2 << 20


def _data(rng: random.Random, n: int) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(n)  # incompressible: stored as a normal cluster
    word = rng.randbytes(rng.randint(1, 40))
    return (word * (n // len(word) + 1))[:n]


@pytest.mark.parametrize("opts,mapping", [
    ("cluster_size=4096", "release"),
    ("cluster_size=4096,compression_type=zstd", "preserve"),
    ("cluster_size=16384,extended_l2=on", "release"),
    ("cluster_size=512,refcount_bits=2", "release"),
])
def test_random_compressed_writes(tmp_path: Path, opts: str, mapping: str) -> None:
    require_tool("qemu-img")
    img, raw = tmp_path / "c.qcow2", tmp_path / "c.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE)],
                   check=True)
    rng = random.Random(f"{opts}-{mapping}")
    model = bytearray(SIZE)
    d = Qcow2Driver.open(str(img), writable=True, mapping=mapping)
    cs = d.cluster_size
    for _ in range(600):
        op = rng.random()
        c = rng.randrange(SIZE // cs)
        if op < 0.45:
            n = cs * rng.randint(1, 3)
            n = min(n, SIZE - c * cs)
            data = _data(rng, n)
            try:
                d.write_compressed(data, c * cs)
                model[c * cs : c * cs + n] = data
            except CompressedWriteError:
                # a cluster of the range was allocated: the clusters before it were
                # written, it and the ones after it are unchanged
                got = d.pread(c * cs, n)
                old = bytes(model[c * cs : c * cs + n])
                assert any(got == data[: k * cs] + old[k * cs :] for k in range(n // cs))
                model[c * cs : c * cs + n] = got
        elif op < 0.65:
            off = rng.randrange(SIZE)
            n = rng.randint(1, min(3 * cs, SIZE - off))
            data = _data(rng, n)
            d.pwrite(data, off)
            model[off : off + n] = data
        elif op < 0.8:
            off = c * cs
            n = min(cs * rng.randint(1, 4), SIZE - off)
            d.discard(off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.9:
            off = rng.randrange(SIZE)
            n = rng.randint(1, min(3 * cs, SIZE - off))
            d.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
            model[off : off + n] = bytes(n)
        elif op < 0.97:
            d.flush()
        else:
            d.close()
            d = Qcow2Driver.open(str(img), writable=True, mapping=mapping)
        if rng.random() < 0.05:
            assert d.pread(0, SIZE) == bytes(model)
    assert d.pread(0, SIZE) == bytes(model)
    d.close()
    res = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                         text=True, timeout=60)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert report["compressed-clusters"] > 0
    raw.write_bytes(bytes(model))
    cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(img),
                          str(raw)], capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
