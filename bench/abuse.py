"""Abusive NBD traffic on raw sockets, and a good client checked while it runs.

Used by ``bench/memory.py --abuse`` (peak RSS of qemu-nbd and nbdqcow on the same
traffic) and by ``tests/e2e/test_abuse_memory.py``:

- *flooders*: connections that send large READs (32 MiB by default) as fast as the
  server takes them and never read a reply (a tiny receive buffer);
- *stallers*: connections that send a large WRITE header and part of its payload, then
  nothing (the server must not hold a buffer for the whole payload per connection
  without bound);
- *garbage*: connections that send random bytes after the greeting, over and over;
- a *good client* that writes random blocks, reads them back and reads large ranges,
  verifying every byte, while the others run.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1
CMD_READ, CMD_WRITE = 0, 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect(path: Path, rcvbuf: int = 0, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def handshake(s: socket.socket) -> int:
    """Fixed newstyle, NO_ZEROES, OPT_GO on the default export: simple replies only.
    Returns the export size."""
    greeting = _recv_exact(s, 18)
    flags = struct.unpack(">H", greeting[16:18])[0]
    s.sendall(struct.pack(">I", flags & 3))
    payload = struct.pack(">I", 0) + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
    size = 0
    while True:
        _magic, _opt, rep, length = struct.unpack(">QIII", _recv_exact(s, 20))
        data = _recv_exact(s, length)
        if rep == 3 and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == 0:  # INFO_EXPORT
            size = struct.unpack(">Q", data[2:10])[0]
        if rep == REP_ACK:
            return size
        if rep & 0x80000000:
            raise OSError(f"GO refused: {rep:#x}")


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass
class Load:
    """Everything the abuse threads share."""

    path: Path
    size: int
    stop: threading.Event = field(default_factory=threading.Event)
    socks: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    flood_requests: int = 0
    garbage_conns: int = 0
    good_ops: int = 0
    good_errors: list[str] = field(default_factory=list)
    good_max_latency: float = 0.0

    def _keep(self, s: socket.socket) -> None:
        with self.lock:
            self.socks.append(s)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    # --- the abusers ------------------------------------------------------------------
    def flooder(self, request_size: int) -> None:
        try:
            s = connect(self.path, rcvbuf=4096, timeout=0.5)
            self._keep(s)
            handshake(s)
        except OSError:
            return
        rng = random.Random(os.getpid() ^ id(s))
        cookie = 0
        span = max(1, self.size // request_size)
        while not self.stop.is_set():
            cookie += 1
            off = rng.randrange(span) * request_size
            try:
                s.sendall(request(CMD_READ, cookie, off, request_size))
            except TimeoutError:
                continue  # the server stopped reading us (it may send nothing more)
            except OSError:
                return
            with self.lock:
                self.flood_requests += 1

    def staller(self, write_size: int) -> None:
        """A WRITE header, part of its payload, then silence."""
        try:
            s = connect(self.path, timeout=2.0)
            self._keep(s)
            handshake(s)
            s.sendall(request(CMD_WRITE, 1, 0, write_size) + b"\xee" * MiB)
        except OSError:
            return

    def garbage(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            try:
                with connect(self.path, timeout=2.0) as s:
                    _recv_exact(s, 18)
                    s.sendall(rng.randbytes(rng.randrange(1, 64 * 1024)))
                    s.settimeout(0.2)
                    try:
                        while s.recv(65536):
                            pass
                    except OSError:
                        pass
            except (OSError, EOFError):
                time.sleep(0.05)
            with self.lock:
                self.garbage_conns += 1

    # --- the good client --------------------------------------------------------------
    def good_client(self, area: int, large: int) -> None:
        """Writes, reads back and reads ``large``-byte ranges in [size - area, size);
        every reply checked, every latency recorded."""
        base = self.size - area
        model = bytearray(area)
        try:
            s = connect(self.path, timeout=30.0)
            handshake(s)
        except OSError as e:
            self.good_errors.append(f"connect: {e}")
            return
        rng = random.Random(7)
        cookie = 0
        with s:
            try:  # what the area holds now
                for pos in range(0, area, large):
                    cookie += 1
                    s.sendall(request(CMD_READ, cookie, base + pos, large))
                    model[pos:pos + large] = self._reply(s, cookie, large)
            except (OSError, EOFError, AssertionError) as e:
                self.good_errors.append(f"initial read: {type(e).__name__}: {e}")
                return
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    cookie += 1
                    off = rng.randrange(0, area - 65536, 4096)
                    data = rng.randbytes(65536)
                    s.sendall(request(CMD_WRITE, cookie, base + off, len(data)) + data)
                    self._reply(s, cookie, 0)
                    model[off:off + len(data)] = data
                    cookie += 1
                    s.sendall(request(CMD_READ, cookie, base + off, len(data)))
                    if self._reply(s, cookie, len(data)) != data:
                        raise AssertionError(f"read back at {base + off} differs")
                    cookie += 1
                    loff = rng.randrange(0, area - large + 1, 4096)
                    s.sendall(request(CMD_READ, cookie, base + loff, large))
                    if self._reply(s, cookie, large) != model[loff:loff + large]:
                        raise AssertionError(f"large read at {base + loff} differs")
                except (OSError, EOFError, AssertionError) as e:
                    self.good_errors.append(f"{type(e).__name__}: {e}")
                    return
                dt = time.monotonic() - t0
                with self.lock:
                    self.good_ops += 1
                    self.good_max_latency = max(self.good_max_latency, dt)

    @staticmethod
    def _reply(s: socket.socket, cookie: int, n: int) -> bytes:
        magic, error, got = struct.unpack(">IIQ", _recv_exact(s, 16))
        if magic != SIMPLE_REPLY_MAGIC or got != cookie:
            raise AssertionError(f"bad reply {magic:#x} cookie {got}")
        if error:
            raise AssertionError(f"error {error}")
        return _recv_exact(s, n) if n else b""

    # --- running -------------------------------------------------------------------------
    def start(self, flooders: int, stallers: int, garbage: int, request_size: int = 32 * MiB,
              write_size: int = 32 * MiB, good: bool = True, good_area: int = 16 * MiB,
              good_large: int = 4 * MiB) -> None:
        for _ in range(flooders):
            self._spawn(self.flooder, request_size)
        for _ in range(stallers):
            self._spawn(self.staller, write_size)
        for _ in range(garbage):
            self._spawn(self.garbage)
        if good:
            self._spawn(self.good_client, good_area, good_large)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        with self.lock:
            for s in self.socks:
                s.close()
            self.socks.clear()


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def run_abuse(pid: int, path: Path, size: int, seconds: float, flooders: int = 8,
              stallers: int = 4, garbage: int = 2, request_size: int = 32 * MiB,
              write_size: int = 32 * MiB, good_large: int = 4 * MiB) -> dict[str, object]:
    """Run the abuse for ``seconds`` against the server ``pid`` on ``path``; peak RSS
    sampled every 50 ms (and VmHWM at the end), the good client's figures."""
    load = Load(path, size)
    peak = status_kib(pid, "VmRSS")
    load.start(flooders, stallers, garbage, request_size, write_size, good_large=good_large)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not load.good_errors:
            peak = max(peak, status_kib(pid, "VmRSS"))
            time.sleep(0.05)
        peak = max(peak, status_kib(pid, "VmRSS"))
    finally:
        load.finish()
    time.sleep(0.5)
    return {
        "peak_rss_kib": peak,
        "hwm_kib": status_kib(pid, "VmHWM"),
        "after_kib": status_kib(pid, "VmRSS"),
        "flood_requests": load.flood_requests,
        "garbage_conns": load.garbage_conns,
        "good_ops": load.good_ops,
        "good_errors": load.good_errors,
        "good_max_latency": load.good_max_latency,
    }
