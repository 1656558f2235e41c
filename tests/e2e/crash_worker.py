"""Child process for the crash-safety test: random writes on the engine, forever.

    python tests/e2e/crash_worker.py IMG SEED [JOURNAL] [--mapping=preserve|release]

Opens IMG (qcow2) writable with nbdqcow and runs random pwrite / write_zeroes /
discard / flush until it is killed.  It keeps a bytearray model of the guest content
and appends JSON lines to JOURNAL (default IMG.journal):

* ``{"t": "start", "sha": ...}``: SHA-256 of the whole guest content it read at open;
* ``{"t": "op", "i": N, "op": ..., "off": ..., "len": ..., ...}``: written (and
  complete) BEFORE operation N starts, so that after a SIGKILL the journal names every
  operation that may have reached the file;
* ``{"t": "settle", "i": N, "zeros": [[start, end], ...]}``: after discard N, the bytes
  outside its whole discard units that read as zeros although the model kept them
  (NBD leaves a trimmed range's content unspecified; the engine erases trimmed data the
  image holds alone).  Every other byte of the range must read as the model says;
* ``{"t": "flush", "n": K, "ranges": [[start, end, sha256], ...]}``: written and
  fsync'd AFTER flush K returned; the ranges are every range written since start
  (merged), hashed from the model as of that flush.

Write data is ``random.Random(seed).randbytes(len)`` with the seed in the op record, so
the test can replay the journal from the content it knows and decide, byte by byte,
what the image may contain after the crash.  The model code here is also what the
test replays with (:class:`Model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys
from typing import Any

QCOW2_MAGIC = b"QFI\xfb"
INCOMPAT_EXTL2 = 1 << 4


def image_geometry(path: str) -> tuple[int, int, bool]:
    """(discard unit, virtual size, has backing file) from the qcow2 header."""
    with open(path, "rb") as f:
        head = f.read(104)
    if head[:4] != QCOW2_MAGIC:
        raise SystemExit(f"{path}: not a qcow2 image")
    version, backing_off = struct.unpack_from(">IQ", head, 4)
    cluster_bits, size = struct.unpack_from(">IQ", head, 20)
    incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
    cluster = 1 << cluster_bits
    if version < 3 and backing_off:
        # v2 + backing: a discarded cluster shows the backing data; not modelled here.
        raise SystemExit("crash_worker: v2 images with a backing file are not supported")
    unit = cluster // 32 if incompat & INCOMPAT_EXTL2 else cluster
    return unit, size, bool(backing_off)


def payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


class Model:
    """Guest content as a bytearray, changed exactly as the engine promises."""

    def __init__(self, content: bytes | bytearray, unit: int) -> None:
        self.data = bytearray(content)
        self.unit = unit

    def apply(self, rec: dict[str, Any]) -> None:
        if rec.get("t") == "settle":
            # what a discard erased beyond its whole units (observed by the worker)
            for start, end in rec["zeros"]:
                self.data[start:end] = bytes(end - start)
            return
        off, length = rec["off"], rec["len"]
        op = rec["op"]
        if op == "write":
            self.data[off:off + length] = payload(rec["seed"], length)
        elif op == "zero":
            self.data[off:off + length] = bytes(length)
        elif op == "discard":
            # units fully covered read as zeros; partially covered ones are unchanged
            first = -(-off // self.unit) * self.unit
            last = (off + length) // self.unit * self.unit
            if last > first:
                self.data[first:last] = bytes(last - first)
        else:
            raise ValueError(f"unknown op {op!r}")


def settle_discard(old: bytes, want: bytes, got: bytes, off: int) -> list[list[int]]:
    """Runs (guest offsets) where a discard's result ``got`` reads zero while the model
    (``want``) kept the old value; any other difference is a bug (the worker exits)."""
    runs: list[list[int]] = []
    if got == want:
        return runs
    for i, (g, w, o) in enumerate(zip(got, want, old, strict=True)):
        if g == w:
            continue
        if g != 0 or w != o:
            raise SystemExit(f"crash_worker: after a discard, guest byte {off + i} reads "
                             f"{g:#04x} (model {w:#04x}, old {o:#04x})")
        if runs and runs[-1][1] == off + i:
            runs[-1][1] += 1
        else:
            runs.append([off + i, off + i + 1])
    return runs


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (start, end) spans."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def random_range(rng: random.Random, size: int, cluster: int, unit: int) -> tuple[int, int]:
    """1 byte .. 3 clusters, aligned or not, mostly around a few hot spots."""
    if rng.random() < 0.2:
        off = rng.randrange(size)
    else:
        anchors = [0, cluster, size // 2, size - 3 * cluster, size - cluster]
        off = rng.choice(anchors) + rng.randint(-3 * cluster, 3 * cluster)
    align = rng.choice([1, 1, 512, unit, cluster])
    length = rng.randint(1, 3 * cluster)
    off = min(max(off, 0), size - 1) // align * align
    if align > 1:
        length = max(align, length // align * align)
    return off, min(length, size - off)


class Journal:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, rec: dict[str, Any], sync: bool = False) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        n = os.write(self.fd, line)
        assert n == len(line)
        if sync:
            os.fsync(self.fd)


def main(argv: list[str]) -> int:
    mapping = None
    for arg in [a for a in argv if a.startswith("--mapping=")]:
        mapping = arg.split("=", 1)[1]
        argv.remove(arg)
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    img, seed = argv[0], int(argv[1])
    journal = Journal(argv[2] if len(argv) == 3 else img + ".journal")
    from nbdqcow.image import open_image

    unit, size, _ = image_geometry(img)
    with open(img, "rb") as f:
        cluster = 1 << struct.unpack_from(">I", f.read(24), 20)[0]
    drv = open_image(img, "qcow2", writable=True, mapping=mapping)
    assert drv.size == size
    model = Model(drv.pread(0, size), unit)
    journal.append({"t": "start", "sha": sha(model.data)}, sync=True)

    rng = random.Random(seed)
    touched: list[tuple[int, int]] = []
    i = flushes = 0
    while True:
        r = rng.random()
        if r < 0.2:
            drv.flush()
            flushes += 1
            touched = merge(touched)
            ranges = [[s, e, sha(model.data[s:e])] for s, e in touched]
            journal.append({"t": "flush", "n": flushes, "ranges": ranges}, sync=True)
            continue
        off, length = random_range(rng, size, cluster, unit)
        rec: dict[str, Any] = {"t": "op", "i": i, "off": off, "len": length}
        if r < 0.6:
            rec.update(op="write", seed=rng.getrandbits(32), fua=rng.random() < 0.1)
        elif r < 0.8:
            rec.update(op="zero", unmap=rng.random() < 0.5)
        else:
            rec.update(op="discard")
        journal.append(rec)
        if rec["op"] == "write":
            drv.pwrite(payload(rec["seed"], length), off, fua=rec["fua"])
        elif rec["op"] == "zero":
            drv.write_zeroes(off, length, may_unmap=rec["unmap"])
        else:
            drv.discard(off, length)
        old = bytes(model.data[off:off + length])
        model.apply(rec)
        if rec["op"] == "discard":
            zeros = settle_discard(old, bytes(model.data[off:off + length]),
                                   drv.pread(off, length), off)
            if zeros:
                settle = {"t": "settle", "i": i, "zeros": zeros}
                journal.append(settle)
                model.apply(settle)
        touched.append((off, off + length))
        i += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
