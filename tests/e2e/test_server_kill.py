"""The server process (``nbdqcow serve``) killed with SIGKILL while clients write.

Three libnbd connections send batches of concurrent writes, write-zeroes and trims
(disjoint bytes within a batch, FUA on some) to a server started with ``-t -e 0
--discard=unmap``; after each batch one connection sends FLUSH.  At a random moment the
server is killed with SIGKILL (the clients' requests are then in every state: queued,
half-received, being written, answered).  Then:

* ``qemu-img check`` finds no corruption (leaked clusters are allowed, as after a
  qemu-nbd crash);
* ``qemu-img convert`` reads, for every byte, the value it had at the last FLUSH that
  was answered, unless a later request (answered or not) touched it: then that value
  or the request's (a FUA write that was answered: its own value, nothing else);
* ``nbdqcow serve`` serves the image again (a lazy-refcounts image is repaired) and
  reads the same bytes; the next cycle writes on from there.

NBDQCOW_KILL_CYCLES (default 2) and NBDQCOW_KILL_SEED make longer or other runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tooling import repo_env, require_tool  # noqa: E402

nbd = pytest.importorskip("nbd")

KiB, MiB = 1024, 1024 * 1024
CYCLES = int(os.environ.get("NBDQCOW_KILL_CYCLES", "2"))
SEED = int(os.environ.get("NBDQCOW_KILL_SEED", "0"))


@dataclass(frozen=True)
class Kind:
    name: str
    cluster: int
    size: int
    opts: str = ""
    backing: bool = False
    server_args: tuple[str, ...] = ()


KINDS = [
    Kind("v3-64k", 64 * KiB, 8 * MiB),
    Kind("lazy-refcounts-4k", 4 * KiB, 4 * MiB, "lazy_refcounts=on"),
    Kind("extl2-backing-32k", 32 * KiB, 4 * MiB, "extended_l2=on", backing=True),
    Kind("metadata-1k-release", 1 * KiB, 2 * MiB, "preallocation=metadata",
         server_args=("--mapping=release", "--cache-size=64k")),
]


def run(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    assert res.returncode in ok, f"{' '.join(args)} -> {res.returncode}: {res.stdout}{res.stderr}"
    return res


def make_image(kind: Kind, d: Path, rng: random.Random) -> Path:
    img = d / "disk.qcow2"
    opts = f"cluster_size={kind.cluster}" + (f",{kind.opts}" if kind.opts else "")
    if kind.backing:
        base = d / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(kind.size))
        cmds: list[str] = []
        for _ in range(10):
            off = rng.randrange(0, kind.size // 4096) * 4096
            cmds += ["-c", f"write -P {rng.randrange(1, 256)} {off} {min(64 * KiB, kind.size - off)}"]
        run("qemu-io", "-f", "qcow2", *cmds, str(base))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", str(base), "-F",
            "qcow2", str(img), str(kind.size))
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(kind.size))
    return img


def read_image(img: Path, d: Path) -> bytes:
    out = d / "read.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def start_server(kind: Kind, img: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    if sock.exists():
        sock.unlink()
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdqcow", "serve", "-t", "-e", "0", "--discard=unmap",
             "-f", "qcow2", *kind.server_args, "-k", str(sock), str(img)],
            stdout=f, stderr=subprocess.STDOUT, env=repo_env())
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


class Load:
    """Batches of concurrent requests; what every byte may hold after a crash."""

    def __init__(self, kind: Kind, sock: Path, model: bytearray, rng: random.Random) -> None:
        self.kind, self.rng = kind, rng
        self.durable = bytearray(model)  # as of the last answered FLUSH
        self.current = bytearray(model)  # with every answered request applied
        # bytes touched since the last answered FLUSH: the values they may hold
        self.maybe: dict[int, set[int]] = {}
        self.handles = []
        for _ in range(3):
            h = nbd.NBD()
            h.connect_unix(str(sock))
            self.handles.append(h)
        self.stop = False
        self.lock = threading.Lock()

    def _range(self) -> tuple[int, int]:
        c, size = self.kind.cluster, self.kind.size
        if self.rng.random() < 0.4:
            off = self.rng.randrange(0, size // c) * c
            n = c * self.rng.randrange(1, 3)
        else:
            off = self.rng.randrange(0, size - 1)
            n = self.rng.randrange(1, min(4 * c, 256 * KiB))
        return off, max(1, min(n, size - off))

    def _note(self, off: int, values: bytes | None, n: int) -> None:
        """Bytes [off, off+n) may now hold ``values`` (None: a trim, zero or unchanged)."""
        for i in range(n):
            s = self.maybe.setdefault(off + i, {self.durable[off + i]})
            s.add(0 if values is None else values[i])

    def batch(self) -> None:
        rng = self.rng
        taken: list[tuple[int, int]] = []
        ops: list[tuple[int, str, int, int, int, bytes | None]] = []
        for _ in range(rng.randrange(2, 10)):
            off, n = self._range()
            if any(not (off + n <= a or b <= off) for a, b in taken):
                continue
            taken.append((off, off + n))
            what = rng.choices(["write", "zero", "trim"], [70, 20, 10])[0]
            fua = nbd.CMD_FLAG_FUA if rng.random() < 0.25 else 0
            data = os.urandom(n) if what == "write" else None
            ops.append((rng.randrange(3), what, off, n, fua, data))
        with self.lock:  # a crash from now on may leave any of them done or not
            for _, what, off, n, _, data in ops:
                self._note(off, data if what == "write" else (bytes(n) if what == "zero"
                                                              else None), n)
        cookies = []
        for conn, what, off, n, fua, data in ops:
            h = self.handles[conn]
            if what == "write":
                assert data is not None
                ck = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off, flags=fua)
            elif what == "zero":
                ck = h.aio_zero(n, off, flags=fua)
            else:
                ck = h.aio_trim(n, off, flags=fua)
            cookies.append((h, ck, what, off, n, fua, data))
        for h, ck, what, off, n, fua, data in cookies:
            while not h.aio_command_completed(ck):
                h.poll(-1)
            with self.lock:
                if what == "write":
                    self.current[off:off + n] = data  # type: ignore[index]
                elif what == "zero":
                    self.current[off:off + n] = bytes(n)
                if fua and what != "trim":  # answered FUA: only its own value now
                    for i in range(n):
                        self.maybe[off + i] = {self.current[off + i]}
        for h, _, what, off, n, _, _ in cookies:  # what a trim left: zeros or the old bytes
            if what == "trim":
                got = h.pread(n, off)
                with self.lock:
                    self.current[off:off + n] = got
        h = self.handles[rng.randrange(3)]
        h.flush()
        with self.lock:  # answered: everything answered before it is durable
            self.durable[:] = self.current
            self.maybe.clear()

    def loop(self) -> None:
        try:
            while not self.stop:
                self.batch()
        except nbd.Error:
            pass  # the server died under us

    def check(self, got: bytes, where: str) -> None:
        with self.lock:
            for i in range(len(got)):
                if got[i] != self.durable[i]:
                    allowed = self.maybe.get(i)
                    assert allowed is not None and got[i] in allowed, (
                        f"{where}: byte {i:#x} reads {got[i]:#x}; durable {self.durable[i]:#x}, "
                        f"allowed {sorted(allowed) if allowed else None}")


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_server_sigkill_mid_write(kind: Kind, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    rng = random.Random(SEED * 100 + KINDS.index(kind))
    img = make_image(kind, tmp_path, rng)
    model = bytearray(read_image(img, tmp_path))
    sock, log = tmp_path / "s.sock", tmp_path / "server.log"
    for cycle in range(CYCLES):
        proc = start_server(kind, img, sock, log)
        try:
            load = Load(kind, sock, model, rng)
            t = threading.Thread(target=load.loop)
            t.start()
            time.sleep(rng.uniform(0.2, 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            load.stop = True
            t.join(30)
            assert not t.is_alive()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        where = f"cycle {cycle}"
        res = run("qemu-img", "check", "-f", "qcow2", str(img), ok=(0, 3))
        text = res.stdout + res.stderr
        assert "ERROR" not in text and "corrupt" not in text.lower(), f"{where}: {text}"
        got = read_image(img, tmp_path)
        load.check(got, where + " (qemu-img convert)")
        # the server takes it back (repairing a dirty lazy-refcount image) and reads the same
        proc = start_server(kind, img, sock, log)
        try:
            h = nbd.NBD()
            h.connect_unix(str(sock))
            assert h.pread(kind.size, 0) == got, f"{where}: the server reads other bytes"
            h.shutdown()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        res = run("qemu-img", "check", "-f", "qcow2", str(img), ok=(0, 3))
        assert "ERROR" not in res.stdout + res.stderr, f"{where} after reopening: {res.stdout}"
        model = bytearray(got)
