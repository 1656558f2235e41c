"""Helpers for the seed-post scenarios and the mapping-invariant state machine.

Everything here observes images with the reference tools only (``qemu-img map``,
``qemu-img check``, ``qemu-img convert``, ``qemu-io``) and the host file's ``stat``:
nothing asks nbdqcow about its own mapping.  Servers (``nbdqcow serve`` or ``qemu-nbd``)
run on a unix socket in a short private directory and are always stopped.

Images are made fresh by ``qemu-img create`` for each case and never copied: ``cp``
turns the zero-filled data area of a ``preallocation=full`` image into holes, which would
make the "allocated blocks not fewer" check meaningless.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from tooling import Served, repo_env, require_tool, wait_ready  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

# NBD flags (numbers from the NBD spec; libnbd's names in comments)
FLAG_FUA = 1 << 0  # CMD_FLAG_FUA
FLAG_NO_HOLE = 1 << 1  # CMD_FLAG_NO_HOLE
FLAG_FAST_ZERO = 1 << 4  # CMD_FLAG_FAST_ZERO
STATE_HOLE = 1  # base:allocation bit 0
STATE_ZERO = 2  # base:allocation bit 1


# --------------------------------------------------------------------------------------
# reference tools
# --------------------------------------------------------------------------------------
def run(*argv: str | os.PathLike[str], check: bool = True) -> str:
    """Run a reference tool (FAIL under $CI when missing); return its stdout."""
    args = [str(a) for a in argv]
    require_tool(args[0])
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, env=repo_env())
    if check and res.returncode:
        pytest.fail(f"{' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res.stdout


@dataclass(frozen=True)
class ImageKind:
    """How ``qemu-img create`` makes a test image."""

    prealloc: str  # off | metadata | falloc | full
    extended_l2: bool = False
    cluster: int = MiB
    size: int = 16 * MiB

    @property
    def id(self) -> str:
        ck = f"{self.cluster // KiB}k"
        return f"{self.prealloc}{'-extl2' if self.extended_l2 else ''}-{ck}"

    def create(self, path: Path) -> Path:
        opts = f"cluster_size={self.cluster},preallocation={self.prealloc}"
        if self.extended_l2:
            opts += ",extended_l2=on"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, str(self.size))
        return path

    @property
    def clusters(self) -> int:
        return -(-self.size // self.cluster)


def qemu_map(path: Path) -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` of a qcow2 image."""
    out: list[dict[str, Any]] = json.loads(
        run("qemu-img", "map", "-f", "qcow2", "--output=json", path))
    return out


def cluster_offsets(path: Path, cluster: int, size: int) -> list[int | None]:
    """Host offset of the first byte of every guest cluster, from ``qemu-img map``.

    Also asserts that within a cluster the map never changes its guest→host delta
    (a cluster is one host cluster or nothing)."""
    entries = qemu_map(path)
    n = -(-size // cluster)
    out: list[int | None] = [None] * n
    deltas: list[set[int | None]] = [set() for _ in range(n)]
    for e in entries:
        start, end = int(e["start"]), int(e["start"]) + int(e["length"])
        off = e.get("offset")
        for c in range(start // cluster, -(-end // cluster)):
            deltas[c].add(None if off is None else int(off) - start)
            if start <= c * cluster < end and off is not None:
                out[c] = int(off) + c * cluster - start
    for c, d in enumerate(deltas):
        assert len(d) == 1, f"guest cluster {c} maps to several host runs: {entries}"
    return out


def check_clean(path: Path) -> str:
    """``qemu-img check``: no errors, no leaks, 0.00% fragmented."""
    res = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)],
                         capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0, f"qemu-img check failed ({res.returncode}):\n{text}"
    assert "No errors were found on the image." in text, text
    assert "0.00% fragmented" in text, text
    return text


def allocated_blocks(path: Path) -> int:
    """st_blocks of the host file (512-byte units actually allocated)."""
    return os.stat(path).st_blocks


def read_guest(path: Path, tmpdir: Path) -> bytes:
    """Guest content as ``qemu-img convert`` reads it (no nbdqcow involved)."""
    out = tmpdir / (path.name + ".readback.raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_io_verify(path: Path, model: bytes, cluster: int) -> None:
    """Check every cluster whose model content is one repeated byte with ``qemu-io
    read -P`` (one process for all of them); qemu-io fails the read on a mismatch."""
    cmds: list[str] = []
    for off in range(0, len(model), cluster):
        chunk = model[off:off + cluster]
        if chunk.count(chunk[:1]) == len(chunk):
            cmds += ["-c", f"read -q -P {chunk[0]:#x} {off} {len(chunk)}"]
    if not cmds:
        return
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-r", *cmds, str(path)],
                         capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "Pattern verification failed" not in text, text


def first_diff(a: bytes, b: bytes) -> str:
    """Short description of where two byte strings differ (no huge pytest diffs)."""
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            return f"first difference at {j:#x}: {a[j]:#x} != {b[j]:#x}"
    return "equal"


@dataclass
class Snapshot:
    """What the offline checks compare before and after a session."""

    offsets: list[int | None]
    size: int
    blocks: int

    @classmethod
    def take(cls, path: Path, kind: ImageKind) -> Snapshot:
        st = os.stat(path)
        return cls(cluster_offsets(path, kind.cluster, kind.size), st.st_size, st.st_blocks)


def assert_preserved(before: Snapshot, path: Path, kind: ImageKind, model: bytes,
                     tmpdir: Path) -> Snapshot:
    """The promise: same host offset for every cluster, file not grown, allocated blocks
    not fewer, check clean with 0.00% fragmented, data equal to the model."""
    after = Snapshot.take(path, kind)
    assert None not in before.offsets, f"image was not fully mapped: {before.offsets}"
    moved = {c: (hex(b or 0), None if a is None else hex(a))
             for c, (b, a) in enumerate(zip(before.offsets, after.offsets, strict=True))
             if a != b}
    assert not moved, f"guest clusters moved or lost their host cluster: {moved}"
    assert after.size <= before.size, f"file grew: {before.size} -> {after.size}"
    assert after.blocks >= before.blocks, f"blocks dropped: {before.blocks} -> {after.blocks}"
    check_clean(path)
    data = read_guest(path, tmpdir)
    same = data == bytes(model)
    assert same, "qemu-img convert: " + first_diff(data, bytes(model))
    qemu_io_verify(path, model, kind.cluster)
    return after


# --------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------
def _cmd(server: str) -> list[str]:
    if server == "nbdqcow":
        return [sys.executable, "-m", "nbdqcow", "serve"]
    require_tool("qemu-nbd")
    return ["qemu-nbd"]


@contextmanager
def serving(image: Path, *args: str, server: str = "nbdqcow",
            logdir: Path | None = None) -> Iterator[Served]:
    """Run ``server [args] -k SOCK image`` (persistent, qcow2) for the block; stopped
    afterwards whatever happens.  The socket lives in a short private dir (unix socket
    paths are limited to 108 bytes, pytest's tmp paths can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="seed"))
    sock = d / "s.sock"
    log = (logdir or d) / f"{server}-{image.name}.log"
    cmd = [*_cmd(server), "-f", "qcow2", "-t", "-k", str(sock), *args, str(image)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=repo_env())
    served = Served(proc, f"nbd+unix:///?socket={sock}", sock, None, log)
    try:
        wait_ready(proc, sock, None, log)
        _wait_accepting(sock, proc, log)
        yield served
    finally:
        rc = served.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert rc in (0, -15), f"{server} exited with {rc}: {log.read_text()[-2000:]}"


def _wait_accepting(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The socket file appears at bind(), before listen(): wait until a connect works
    (qemu-nbd answered ECONNREFUSED in that window)."""
    deadline = time.monotonic() + 15
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(sock))
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server not accepting on {sock}: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        finally:
            s.close()


def connect(uri: str, contexts: Sequence[str] = ()) -> Any:
    """A libnbd handle connected to ``uri`` (asking for ``contexts``)."""
    import nbd

    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def block_status(h: Any, length: int, offset: int, context: str) -> list[tuple[int, int, int]]:
    """[(start, length, flags)] of ``context`` covering [offset, offset+length)."""
    out: list[tuple[int, int, int]] = []
    pos = offset
    while pos < offset + length:
        got: list[int] = []

        def cb(ctx: str, off: int, entries: list[int], err: int,
               got: list[int] = got) -> int:
            if ctx == context:
                got.extend(entries)
            return 0

        h.block_status(offset + length - pos, pos, cb)
        assert got, f"no extents for {context} at {pos}"
        for i in range(0, len(got), 2):
            n = min(got[i], offset + length - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= offset + length:
                break
    return out


# --------------------------------------------------------------------------------------
# operation scripts: (op, offset, length, arg) applied to a handle and a model
# --------------------------------------------------------------------------------------
Op = tuple[str, int, int, int]


def apply(h: Any, op: Op, model: bytearray) -> None:
    """Send one op over NBD and update the model.  ``write``: arg is the fill byte;
    ``zero``: arg is NBD flags; ``trim``: trimmed data must read back as zeros (both
    servers and both policies do so on v3 images without a backing file)."""
    kind, off, n, arg = op
    if kind == "write":
        data = bytes([arg]) * n
        h.pwrite(data, off)
        model[off:off + n] = data
    elif kind == "zero":
        h.zero(n, off, arg)
        model[off:off + n] = bytes(n)
    elif kind == "trim":
        h.trim(n, off)
        model[off:off + n] = bytes(n)
    elif kind == "flush":
        h.flush()
    else:  # pragma: no cover - a typo in a script
        raise ValueError(kind)


def cluster_states(path: Path, kind: ImageKind) -> list[tuple[bool, bool, int | None]]:
    """(zero, data, host offset) of every guest cluster's first byte, from
    ``qemu-img map`` (``present`` left out)."""
    entries = qemu_map(path)
    out: list[tuple[bool, bool, int | None]] = []
    for c in range(kind.clusters):
        g = c * kind.cluster
        e = next(x for x in entries if x["start"] <= g < x["start"] + x["length"])
        off = e.get("offset")
        out.append((bool(e["zero"]), bool(e["data"]),
                    None if off is None else int(off) + g - int(e["start"])))
    return out


class Timed:
    """A libnbd handle whose commands fail the test after ``timeout`` seconds instead
    of blocking forever when the server never answers (libnbd's blocking calls have no
    timeout); the same method names as ``nbd.NBD`` for what the tests use."""

    def __init__(self, h: Any, timeout: float = 20.0) -> None:
        self.h = h
        self.timeout = timeout

    def _wait(self, cookie: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.h.aio_command_completed(cookie):
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer {what} in {self.timeout} s")
            self.h.poll(200)

    def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        import nbd

        buf = nbd.Buffer(count)
        self._wait(self.h.aio_pread(buf, offset, flags=flags), f"READ {offset}+{count}")
        return bytes(buf.to_bytearray())

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> None:
        import nbd

        buf = nbd.Buffer.from_bytearray(bytearray(data))
        self._wait(self.h.aio_pwrite(buf, offset, flags=flags),
                   f"WRITE {offset}+{len(data)} flags {flags}")

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self._wait(self.h.aio_zero(count, offset, flags=flags),
                   f"WRITE_ZEROES {offset}+{count} flags {flags}")

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self._wait(self.h.aio_trim(count, offset, flags=flags), f"TRIM {offset}+{count}")

    def flush(self) -> None:
        self._wait(self.h.aio_flush(), "FLUSH")

    def can_fast_zero(self) -> bool:
        return bool(self.h.can_fast_zero())

    def shutdown(self) -> None:
        self.h.shutdown()
