"""Random operations over NBD, from several connections at once, against a byte model.

Each image kind is made by ``qemu-img`` (thin, preallocated, extended L2 over a backing
file, compressed clusters, 512-byte and 2 MiB clusters, a size that is not a multiple of
the cluster size, version 2) and served by ``nbdqcow serve -t -e 0 --discard=unmap -A``.
Three libnbd connections (structured replies with both metadata contexts, structured
with base:allocation, simple replies) send rounds of concurrent requests through libnbd's
asynchronous API: WRITE, WRITE_ZEROES (NO_HOLE, FAST_ZERO, FUA), TRIM, READ (simple and
structured, with and without DF), BLOCK_STATUS (with and without REQ_ONE), CACHE and
FLUSH.  The requests of one round touch disjoint bytes (often of the same clusters, so
allocations race), which makes the outcome exact:

* every READ equals the model; structured chunks cover the request once, holes read zero;
* every BLOCK_STATUS answer is what the spec permits: extents start at the offset, are
  contiguous and non-empty, REQ_ONE gives one extent inside the request, only defined
  flags, ZERO (and allocation depth 0) only where the model is zero;
* a TRIM leaves each byte either as it was or zero (never another value, such as a
  backing file's data);
* the mapping promise: after each FLUSH ``qemu-img map -U`` is read and a guest cluster
  that once had a host cluster in the top image keeps that offset;
* now and then a connection is replaced and the server restarted (SIGTERM, exit 0);
* at the end ``qemu-img check`` finds no errors and no leaks, and ``qemu-img convert``
  reads the model.

NBDQCOW_MODEL_ROUNDS (default 40) and NBDQCOW_MODEL_SEED make longer or other runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tooling import repo_env, require_tool  # noqa: E402

nbd = pytest.importorskip("nbd")

KiB, MiB = 1024, 1024 * 1024
ROUNDS = int(os.environ.get("NBDQCOW_MODEL_ROUNDS", "40"))
SEED = int(os.environ.get("NBDQCOW_MODEL_SEED", "0"))
HOLE, ZERO = 1, 2
ENOTSUP, EINVAL, ENOSPC = 95, 22, 28


@dataclass(frozen=True)
class Kind:
    name: str
    cluster: int
    size: int
    opts: str = ""
    backing: bool = False
    compressed: bool = False
    server_args: tuple[str, ...] = ()
    preserve: bool = True  # the mapping promise applies


KINDS = [
    Kind("thin-64k", 64 * KiB, 4 * MiB),
    Kind("metadata-4k-unaligned-size", 4 * KiB, 3 * MiB + 1536, "preallocation=metadata"),
    Kind("falloc-extl2-32k-backing", 32 * KiB, 4 * MiB,
         "preallocation=falloc,extended_l2=on", backing=True),
    Kind("thin-extl2-64k-backing", 64 * KiB, 4 * MiB, "extended_l2=on", backing=True),
    Kind("full-2M", 2 * MiB, 8 * MiB, "preallocation=full"),
    Kind("thin-512-refcount1", 512, 1 * MiB, "refcount_bits=1"),
    Kind("compressed-64k", 64 * KiB, 4 * MiB, compressed=True),
    Kind("v2-16k-backing", 16 * KiB, 2 * MiB, "compat=0.10", backing=True),
    Kind("thin-64k-release", 64 * KiB, 4 * MiB, server_args=("--mapping=release",),
         preserve=False),
    Kind("thin-extl2-32k-thin-policy", 32 * KiB, 2 * MiB, "extended_l2=on",
         server_args=("--mapping=thin",)),
]


def run(*args: str) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(args)}: {res.stdout}{res.stderr}"
    return res.stdout


def pattern(rng: random.Random, n: int) -> bytes:
    """Compressible data with a random seed byte (so zlib finds something to do)."""
    b = rng.randrange(1, 256)
    return bytes((b + i // 97) & 0xFF or 1 for i in range(n))


def make_image(kind: Kind, d: Path, rng: random.Random) -> Path:
    img = d / "top.qcow2"
    opts = f"cluster_size={kind.cluster}" + (f",{kind.opts}" if kind.opts else "")
    if kind.backing:
        base = d / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(kind.size))
        cmds = []
        for _ in range(12):
            off = rng.randrange(0, kind.size // 512) * 512
            n = min(rng.randrange(1, 128) * 512, kind.size - off)
            cmds += ["-c", f"write -P {rng.randrange(1, 256)} {off} {n}"]
        run("qemu-io", "-f", "qcow2", *cmds, str(base))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", str(base),
            "-F", "qcow2", str(img), str(kind.size))
        return img
    if kind.compressed:
        raw = d / "src.raw"
        data = bytearray(kind.size)
        for _ in range(20):
            off = rng.randrange(0, kind.size // kind.cluster) * kind.cluster
            n = min(rng.randrange(1, 4) * kind.cluster, kind.size - off)
            data[off:off + n] = pattern(rng, n)
        raw.write_bytes(bytes(data))
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts,
            str(raw), str(img))
        info = json.loads(run("qemu-img", "check", "--output=json", str(img)))
        assert info["compressed-clusters"] > 0, info
        return img
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(kind.size))
    return img


def guest_bytes(img: Path, d: Path) -> bytearray:
    out = d / "read.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(img), str(out))
    data = bytearray(out.read_bytes())
    out.unlink()
    return data


def top_offsets(img: Path, cluster: int) -> dict[int, int]:
    """Host cluster of every guest cluster the top image maps (qemu-img map, depth 0)."""
    out: dict[int, int] = {}
    for e in json.loads(run("qemu-img", "map", "-U", "-f", "qcow2", "--output=json",
                            str(img))):
        if e["depth"] != 0 or "offset" not in e:
            continue
        start, end, off = int(e["start"]), int(e["start"]) + int(e["length"]), int(e["offset"])
        for c in range(start // cluster, -(-end // cluster)):
            g = max(start, c * cluster)
            out[c] = off + (g - start) - (g - c * cluster)
    return out


class Server:
    def __init__(self, img: Path, sock: Path, log: Path, args: tuple[str, ...]) -> None:
        self.img, self.sock, self.log, self.args = img, sock, log, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nbdqcow", "serve", "-t", "-e", "0", "--discard=unmap",
                 "-A", "-f", "qcow2", *self.args, "-k", str(self.sock), str(self.img)],
                stdout=logf, stderr=subprocess.STDOUT, env=repo_env())
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not stop on SIGTERM") from None
            assert rc == 0, f"server exited {rc}: {self.log.read_text()[-3000:]}"
        self.proc = None


@dataclass
class Op:
    kind: str
    off: int = 0
    n: int = 0
    flags: int = 0
    data: bytes = b""
    conn: int = 0
    result: Any = None
    error: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# connection 0: structured, both contexts; 1: structured, base:allocation; 2: simple
CONTEXTS = [("base:allocation", "qemu:allocation-depth"), ("base:allocation",), ()]


def connect(sock: Path, i: int) -> Any:
    h = nbd.NBD()
    h.set_strict_mode(0)  # the server, not libnbd, judges every request
    if i == 2:
        h.set_request_structured_replies(False)
    for c in CONTEXTS[i]:
        h.add_meta_context(c)
    h.connect_unix(str(sock))
    return h


class Run:
    def __init__(self, kind: Kind, d: Path, seed: int) -> None:
        self.kind, self.d = kind, d
        self.rng = random.Random(seed)
        self.img = make_image(kind, d, self.rng)
        self.model = guest_bytes(self.img, d)
        assert len(self.model) == kind.size
        self.server = Server(self.img, d / "s.sock", d / "server.log", kind.server_args)
        self.server.start()
        self.handles: list[Any] = [connect(self.server.sock, i) for i in range(3)]
        self.mapped: dict[int, int] = top_offsets(self.img, kind.cluster)

    # --- request generation -------------------------------------------------------
    def _range(self) -> tuple[int, int]:
        k, rng = self.kind, self.rng
        c = k.cluster
        shape = rng.random()
        if shape < 0.3:  # whole clusters
            first = rng.randrange(0, -(-k.size // c))
            n = c * rng.randrange(1, 4)
            off = first * c
        elif shape < 0.7:  # inside a cluster
            off = rng.randrange(0, k.size - 1)
            n = rng.randrange(1, min(c, 64 * KiB) + 1)
        else:  # across cluster boundaries
            off = rng.randrange(0, k.size - 1)
            n = rng.randrange(1, min(3 * c, 512 * KiB))
        n = max(1, min(n, k.size - off, 1 * MiB))
        return off, n

    def round_ops(self) -> list[Op]:
        rng = self.rng
        taken: list[tuple[int, int]] = []
        ops: list[Op] = []
        for _ in range(rng.randrange(1, 9)):
            kind = rng.choices(
                ["write", "zero", "trim", "read", "sread", "bs", "cache", "flush"],
                [30, 14, 9, 12, 10, 12, 4, 4])[0]
            op = Op(kind, conn=rng.randrange(3))
            if kind == "flush":
                ops.append(op)
                continue
            for _ in range(6):
                off, n = self._range()
                if all(off + n <= a or b <= off for a, b in taken):
                    break
            else:
                continue
            taken.append((off, off + n))
            op.off, op.n = off, n
            if kind == "write":
                op.data = pattern(rng, n) if rng.random() < 0.5 else os.urandom(n)
                op.flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
            elif kind == "zero":
                op.flags = ((nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.4 else 0)
                            | (nbd.CMD_FLAG_FAST_ZERO if rng.random() < 0.3 else 0)
                            | (nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0))
            elif kind == "trim":
                op.flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
            elif kind in ("sread", "bs"):
                op.conn = rng.randrange(2)  # structured connections
                if kind == "sread":
                    op.flags = nbd.CMD_FLAG_DF if rng.random() < 0.3 else 0
                else:
                    op.flags = nbd.CMD_FLAG_REQ_ONE if rng.random() < 0.3 else 0
            ops.append(op)
        return ops

    # --- issuing ------------------------------------------------------------------
    def _issue(self, h: Any, op: Op) -> int:
        if op.kind == "write":
            return int(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(op.data)), op.off,
                                    flags=op.flags))
        if op.kind == "zero":
            return int(h.aio_zero(op.n, op.off, flags=op.flags))
        if op.kind == "trim":
            return int(h.aio_trim(op.n, op.off, flags=op.flags))
        if op.kind == "read":
            buf = nbd.Buffer(op.n)
            op.extra["buf"] = buf
            return int(h.aio_pread(buf, op.off))
        if op.kind == "sread":
            buf = nbd.Buffer(op.n)
            op.extra["buf"] = buf
            chunks: list[tuple[int, int, int, bytes]] = []
            op.extra["chunks"] = chunks

            def chunk(sub: bytes, offset: int, status: int, err: int) -> int:
                chunks.append((offset, len(sub), status, bytes(sub)))
                return 0
            return int(h.aio_pread_structured(buf, op.off, chunk, flags=op.flags))
        if op.kind == "bs":
            answers: dict[str, list[tuple[int, list[int]]]] = {}
            op.extra["bs"] = answers

            def extent(meta: str, offset: int, entries: list[int], err: int) -> int:
                answers.setdefault(meta, []).append((offset, list(entries)))
                return 0
            return int(h.aio_block_status(op.n, op.off, extent, flags=op.flags))
        if op.kind == "cache":
            return int(h.aio_cache(op.n, op.off))
        return int(h.aio_flush())

    def _drive(self, conn: int, ops: list[Op]) -> None:
        h = self.handles[conn]
        cookies = [(self._issue(h, op), op) for op in ops]
        for cookie, op in cookies:
            while True:
                try:
                    if h.aio_command_completed(cookie):
                        break
                except nbd.Error as e:
                    op.error = e.errnum or -1
                    break
                h.poll(-1)

    def execute(self, ops: list[Op]) -> None:
        by_conn: dict[int, list[Op]] = {}
        for op in ops:
            by_conn.setdefault(op.conn, []).append(op)
        threads = [threading.Thread(target=self._drive, args=(c, o)) for c, o in by_conn.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "requests did not complete"

    # --- checking -----------------------------------------------------------------
    def check(self, ops: list[Op]) -> None:
        model = self.model
        trims: list[Op] = []
        for op in ops:  # reads and block status see the state before this round
            where = f"{op.kind} {op.off:#x}+{op.n:#x} flags {op.flags:#x}"
            if op.kind in ("read", "sread"):
                assert not op.error, f"{where}: error {op.error}"
                got = op.extra["buf"].to_bytearray()
                assert got == model[op.off:op.off + op.n], f"{where}: {first_diff(got, model, op.off)}"
                if op.kind == "sread":
                    self._check_chunks(op, where)
            elif op.kind == "bs":
                assert not op.error, f"{where}: error {op.error}"
                self._check_extents(op, where)
        for op in ops:
            where = f"{op.kind} {op.off:#x}+{op.n:#x} flags {op.flags:#x}"
            if op.kind == "write":
                assert not op.error, f"{where}: error {op.error}"
                model[op.off:op.off + op.n] = op.data
            elif op.kind == "zero":
                if op.error == ENOTSUP and op.flags & nbd.CMD_FLAG_FAST_ZERO:
                    continue
                assert not op.error, f"{where}: error {op.error}"
                model[op.off:op.off + op.n] = bytes(op.n)
            elif op.kind == "trim":
                assert not op.error, f"{where}: error {op.error}"
                trims.append(op)
            elif op.kind in ("cache", "flush"):
                assert not op.error, f"{where}: error {op.error}"
        h = self.handles[0]
        for op in trims:  # each byte: as it was, or zero; then that is the model
            got = h.pread(op.n, op.off)
            old = model[op.off:op.off + op.n]
            bad = [i for i in range(op.n) if got[i] != old[i] and got[i] != 0]
            assert not bad, (f"trim {op.off:#x}+{op.n:#x}: byte {op.off + bad[0]:#x} reads "
                             f"{got[bad[0]]:#x}, was {old[bad[0]]:#x}")
            model[op.off:op.off + op.n] = got

    def _check_chunks(self, op: Op, where: str) -> None:
        covered = bytearray(op.n)
        for offset, length, status, data in op.extra["chunks"]:
            rel = offset - op.off
            assert 0 <= rel and rel + length <= op.n and length > 0, f"{where}: chunk {offset}+{length}"
            assert not any(covered[rel:rel + length]), f"{where}: chunks overlap"
            covered[rel:rel + length] = b"\1" * length
            assert status in (nbd.READ_DATA, nbd.READ_HOLE), f"{where}: status {status}"
            if status == nbd.READ_HOLE:
                assert not any(self.model[offset:offset + length]), f"{where}: hole over data"
            assert data == self.model[offset:offset + length], f"{where}: chunk data"
        assert all(covered), f"{where}: chunks do not cover the request"
        if op.flags & nbd.CMD_FLAG_DF:
            assert len(op.extra["chunks"]) == 1, f"{where}: DF reply in several chunks"

    def _check_extents(self, op: Op, where: str) -> None:
        answers = op.extra["bs"]
        wanted = set(CONTEXTS[op.conn])
        assert set(answers) == wanted, f"{where}: contexts {sorted(answers)}"
        for meta, replies in answers.items():
            assert len(replies) == 1, f"{where}: {meta} answered {len(replies)} times"
            offset, entries = replies[0]
            assert offset == op.off and entries and len(entries) % 2 == 0, f"{where}: {meta}"
            pos = op.off
            pairs = list(zip(entries[0::2], entries[1::2], strict=True))
            if op.flags & nbd.CMD_FLAG_REQ_ONE:
                assert len(pairs) == 1 and pairs[0][0] <= op.n, f"{where}: REQ_ONE {pairs}"
            for length, flags in pairs:
                assert length > 0, f"{where}: {meta} empty extent"
                end = min(pos + length, op.off + op.n)
                if meta == "base:allocation":
                    assert flags & ~(HOLE | ZERO) == 0, f"{where}: flags {flags:#x}"
                    if flags & ZERO:
                        assert not any(self.model[pos:end]), \
                            f"{where}: ZERO over data at {pos:#x}+{end - pos:#x}"
                elif flags == 0:  # allocation depth 0: nowhere in the chain
                    assert not any(self.model[pos:end]), \
                        f"{where}: depth 0 over data at {pos:#x}+{end - pos:#x}"
                pos += length
            assert pos <= self.kind.size, f"{where}: {meta} extents past the end"

    def check_mapping(self) -> None:
        self.handles[0].flush()
        now = top_offsets(self.img, self.kind.cluster)
        if self.kind.preserve:
            moved = {c: (hex(o), hex(now[c]) if c in now else None)
                     for c, o in self.mapped.items() if now.get(c) != o}
            assert not moved, f"guest clusters moved or lost their host cluster: {moved}"
        for c, o in now.items():
            self.mapped.setdefault(c, o)

    def errors(self) -> None:
        """Requests the server must refuse, the connection staying up."""
        h, size = self.handles[self.rng.randrange(3)], self.kind.size
        expect: list[tuple[Callable[[], object], int]] = [
            (lambda: h.pread(1024, size - 512), EINVAL),
            (lambda: h.pwrite(b"x" * 1024, size - 512), ENOSPC),
            (lambda: h.zero(4096, size), ENOSPC),
        ]
        for fn, code in expect:
            with pytest.raises(nbd.Error) as err:
                fn()
            assert err.value.errnum == code, f"expected errno {code}, got {err.value}"
        assert h.pread(1, 0) == self.model[:1]

    def reconnect(self, i: int) -> None:
        self.handles[i].shutdown()
        self.handles[i] = connect(self.server.sock, i)

    def restart(self) -> None:
        for h in self.handles:
            h.shutdown()
        self.server.stop()
        self.server.start()
        self.handles = [connect(self.server.sock, i) for i in range(3)]

    def finish(self) -> None:
        full = self.handles[2].pread(self.kind.size, 0) if self.kind.size <= 32 * MiB else None
        if full is not None:
            assert full == self.model, "full read: " + first_diff(full, self.model, 0)
        for h in self.handles:
            h.shutdown()
        self.server.stop()
        res = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(self.img)],
                             capture_output=True, text=True, timeout=120)
        text = res.stdout + res.stderr
        assert res.returncode == 0 and "No errors were found" in text, text
        assert "leaked" not in text, text
        final = guest_bytes(self.img, self.d)
        assert final == self.model, "qemu-img convert: " + first_diff(final, self.model, 0)
        if self.kind.preserve:
            now = top_offsets(self.img, self.kind.cluster)
            moved = {c: o for c, o in self.mapped.items() if now.get(c) != o}
            assert not moved, f"guest clusters moved after the server stopped: {moved}"


def first_diff(got: bytes | bytearray, model: bytes | bytearray, base: int) -> str:
    want = model[base:base + len(got)] if base or len(got) != len(model) else model
    for i in range(len(got)):
        if got[i] != want[i]:
            return f"first difference at {base + i:#x}: {got[i]:#x}, model {want[i]:#x}"
    return "equal"


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_random_requests_against_model(kind: Kind, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    seed = SEED * 1000 + KINDS.index(kind)
    r = Run(kind, tmp_path, seed)
    try:
        for i in range(ROUNDS):
            ops = r.round_ops()
            r.execute(ops)
            r.check(ops)
            if i % 10 == 9:
                r.check_mapping()
            if i % 17 == 5:
                r.reconnect(r.rng.randrange(3))
            if i % 23 == 11:
                r.errors()
            if i == ROUNDS // 2:
                r.restart()
        r.finish()
    finally:
        r.server.proc and r.server.proc.poll() is None and r.server.proc.kill()
