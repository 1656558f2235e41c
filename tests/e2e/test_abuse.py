"""Protocol abuse against a real ``nbdqcow serve`` over raw sockets.

Every case runs with a well-behaved second client (the bystander) connected at the same
time: it must keep working during and after the abuse, and at the end the image holds
exactly the fixture data plus the bystander's writes (checked with qemu-img after the
server stopped).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdqcow.nbd import client as codec
from nbdqcow.nbd.constants import (
    Cmd,
    CmdFlag,
    Info,
    Opt,
    Rep,
)
from nbdqcow.nbdclient import SyncClient
from tests.tooling import require_tool

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nbdqcow.cli.serve") is None,
    reason="nbdqcow serve (nbdqcow.cli.serve) is not importable",
)

MiB = 1 << 20
SIZE = 64 * MiB
PATTERN = 0xA5
PATTERN_LEN = 16 * MiB  # fixture data: PATTERN over [0, 16 MiB)
BYSTANDER_AT = 32 * MiB  # the bystander writes 4 KiB blocks from here
TIMEOUT = 10.0


# --- the server and the bystander ----------------------------------------------------------
class Served:
    def __init__(self, tmp: Path) -> None:
        require_tool("qemu-img")
        require_tool("qemu-io")
        self.image = tmp / "disk.qcow2"
        self.sock = tmp / "nbd.sock"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(SIZE)], check=True
        )
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -q -P {PATTERN} 0 {PATTERN_LEN}",
                str(self.image),
            ],
            check=True,
        )
        self.model = bytearray(SIZE)
        self.model[:PATTERN_LEN] = bytes([PATTERN]) * PATTERN_LEN
        argv = [sys.executable, "-m", "nbdqcow", "serve", "-f", "qcow2", "-t", "-e", "8"]
        self.proc = subprocess.Popen(
            [*argv, "-k", str(self.sock), str(self.image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nbdqcow serve did not start: {err}")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.bystander = SyncClient(self.uri)
        self._block = 0

    def _listening(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
            return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def bystander_works(self) -> None:
        """The second client reads the fixture and writes (then reads back) a new block."""
        assert self.alive(), "the server died"
        c = self.bystander
        off = (self._block * 7919 % (PATTERN_LEN // 65536)) * 65536
        assert c.pread(off, 65536) == self.model[off : off + 65536]
        at = BYSTANDER_AT + self._block * 4096
        data = os.urandom(4096)
        c.pwrite(data, at, fua=True)
        self.model[at : at + 4096] = data
        assert c.pread(at, 4096) == data
        self._block += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check_image(self) -> None:
        """Server stopped: the image is consistent and holds exactly the model."""
        check = subprocess.run(
            ["qemu-img", "check", str(self.image)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        raw = self.image.with_suffix(".raw")
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.image), str(raw)],
            check=True,
        )
        assert raw.read_bytes() == self.model


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        s.bystander_works()
        yield s
        s.bystander_works()
        s.bystander.close()
        assert s.alive(), "the server died"
        s.stop()
        s.check_image()
    finally:
        s.stop()


# --- raw socket helpers ---------------------------------------------------------------------
def raw_connect(s: Served) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(TIMEOUT)
    sock.connect(str(s.sock))
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def greet(sock: socket.socket) -> None:
    flags = codec.parse_greeting(recv_exact(sock, codec.GREETING_SIZE))
    sock.sendall(codec.build_client_flags(codec.client_flags(flags)))


def option(sock: socket.socket, opt: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
    sock.sendall(codec.build_option(opt, payload))
    replies = []
    while True:
        head = codec.parse_option_reply_header(recv_exact(sock, 20))
        assert head.option == opt
        data = recv_exact(sock, head.length)
        replies.append((head.reply, data))
        if head.reply == Rep.ACK or head.is_error:
            return replies


def go(sock: socket.socket) -> None:
    replies = option(sock, Opt.GO, codec.info_request_payload("", (Info.BLOCK_SIZE,)))
    assert replies[-1][0] == Rep.ACK


def transmission(s: Served) -> socket.socket:
    """A raw connection in transmission phase with simple replies only."""
    sock = raw_connect(s)
    greet(sock)
    go(sock)
    return sock


def send_request(
    sock: socket.socket, cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1
) -> None:
    sock.sendall(codec.build_request(cmd, flags, cookie, offset, length))


def simple_reply(sock: socket.socket, data_len: int = 0) -> tuple[int, int, bytes]:
    """(error, cookie, data); data is read only when the reply is not an error."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == 0x67446698
    data = recv_exact(sock, data_len) if data_len and not error else b""
    return error, cookie, data


def closed_by_server(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True when the server closes the connection (reading whatever it still sends)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_serves(sock: socket.socket, s: Served) -> None:
    send_request(sock, Cmd.READ, 4096, 512, cookie=77)
    error, cookie, data = simple_reply(sock, 512)
    assert (error, cookie) == (0, 77)
    assert data == s.model[4096 : 4096 + 512]


# --- handshake abuse ---------------------------------------------------------------------------
def test_unknown_options_then_negotiation_goes_on(served: Served) -> None:
    sock = raw_connect(served)
    try:
        greet(sock)
        for opt in (99, 0x7FFF_FFFF):
            replies = option(sock, opt, b"some payload")
            assert replies == [(Rep.ERR_UNSUP, replies[0][1])]
        served.bystander_works()
        assert option(sock, Opt.STARTTLS)[-1][0] == Rep.ERR_POLICY
        go(sock)
        still_serves(sock, served)
    finally:
        sock.close()


def test_unknown_client_flags_close(served: Served) -> None:
    sock = raw_connect(served)
    try:
        codec.parse_greeting(recv_exact(sock, codec.GREETING_SIZE))
        sock.sendall(struct.pack(">I", 1 | (1 << 20)))
        assert closed_by_server(sock)
    finally:
        sock.close()


def test_bad_option_magic_closes(served: Served) -> None:
    sock = raw_connect(served)
    try:
        greet(sock)
        sock.sendall(struct.pack(">QII", 0x1122334455667788, Opt.GO, 0))
        assert closed_by_server(sock)
        served.bystander_works()
    finally:
        sock.close()


@pytest.mark.parametrize(
    "fragment",
    [
        b"\x00\x00",  # half the client flags
        struct.pack(">I", 3) + b"IHAVEOPT\x00\x00",  # half an option header
        struct.pack(">I", 3) + codec.build_option(Opt.GO, bytes(100))[:40],  # short payload
    ],
    ids=["flags", "option-header", "option-payload"],
)
def test_truncated_handshake(served: Served, fragment: bytes) -> None:
    sock = raw_connect(served)
    recv_exact(sock, codec.GREETING_SIZE)
    sock.sendall(fragment)
    served.bystander_works()
    sock.close()
    served.bystander_works()


# --- transmission abuse -------------------------------------------------------------------------
def test_bad_request_magic_disconnects_only_that_client(served: Served) -> None:
    sock = transmission(served)
    try:
        sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, Cmd.READ, 1, 0, 512))
        assert closed_by_server(sock)
        served.bystander_works()
    finally:
        sock.close()


def test_unknown_command_einval(served: Served) -> None:
    sock = transmission(served)
    try:
        send_request(sock, 42, 0, 512, cookie=5)
        assert simple_reply(sock)[:2] == (errno.EINVAL, 5)
        served.bystander_works()
        still_serves(sock, served)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("cmd", "flags", "length"),
    [
        (Cmd.READ, 1 << 12, 512),  # undefined flag bit
        (Cmd.READ, CmdFlag.REQ_ONE, 512),  # BLOCK_STATUS-only flag
        (Cmd.FLUSH, 1 << 15, 0),
        (Cmd.BLOCK_STATUS, 0, 512),  # no meta context was negotiated
    ],
    ids=["read-unknown-bit", "read-req-one", "flush-unknown-bit", "status-no-context"],
)
def test_invalid_flags_einval(served: Served, cmd: int, flags: int, length: int) -> None:
    sock = transmission(served)
    try:
        send_request(sock, cmd, 0, length, flags=flags, cookie=9)
        assert simple_reply(sock)[:2] == (errno.EINVAL, 9)
        still_serves(sock, served)
    finally:
        sock.close()


def test_ranges_past_the_end(served: Served) -> None:
    sock = transmission(served)
    try:
        send_request(sock, Cmd.READ, SIZE - 512, 1024, cookie=1)
        assert simple_reply(sock)[:2] == (errno.EINVAL, 1)
        send_request(sock, Cmd.READ, (1 << 64) - 512, 1024, cookie=2)  # offset + length wraps
        assert simple_reply(sock)[:2] == (errno.EINVAL, 2)
        # a write past the end: ENOSPC, and its payload is consumed (the stream stays in sync)
        send_request(sock, Cmd.WRITE, SIZE - 512, 4096, cookie=3)
        sock.sendall(b"\xee" * 4096)
        assert simple_reply(sock)[:2] == (errno.ENOSPC, 3)
        send_request(sock, Cmd.WRITE_ZEROES, SIZE, 512, cookie=4)
        assert simple_reply(sock)[:2] == (errno.ENOSPC, 4)
        served.bystander_works()
        still_serves(sock, served)
    finally:
        sock.close()


def test_requests_over_32_mib(served: Served) -> None:
    """READs up to 64 MiB are served (clients that skip block-size negotiation send up to
    48 MiB); larger ones get EINVAL and the connection goes on."""
    sock = transmission(served)
    try:
        send_request(sock, Cmd.READ, 0, 48 * MiB, cookie=1)
        error, cookie, data = simple_reply(sock, 48 * MiB)
        assert (error, cookie) == (0, 1)
        assert data == served.model[: 48 * MiB]
        send_request(sock, Cmd.READ, 0, 64 * MiB + 512, cookie=2)
        assert simple_reply(sock)[:2] in ((errno.EINVAL, 2), (errno.EOVERFLOW, 2))
        still_serves(sock, served)
        # TRIM and WRITE_ZEROES carry no payload: over 32 MiB is fine
        send_request(sock, Cmd.WRITE_ZEROES, 40 * MiB, 20 * MiB, cookie=3)
        assert simple_reply(sock)[:2] == (0, 3)
        served.model[40 * MiB : 60 * MiB] = bytes(20 * MiB)
        served.bystander_works()
    finally:
        sock.close()


def test_write_of_48_mib_is_written(served: Served) -> None:
    sock = transmission(served)
    try:
        data = os.urandom(MiB) * 48
        send_request(sock, Cmd.WRITE, 8 * MiB, len(data), cookie=3)
        sock.sendall(data)
        assert simple_reply(sock)[:2] == (0, 3)
        served.model[8 * MiB : 56 * MiB] = data
        send_request(sock, Cmd.READ, 8 * MiB, len(data), cookie=4)
        assert simple_reply(sock, len(data)) == (0, 4, data)
        served.bystander_works()
    finally:
        sock.close()


def test_write_over_64_mib_rejected_or_disconnected(served: Served) -> None:
    """A WRITE over 64 MiB: the server answers an error (after skipping the payload) or
    hangs up; it never writes the data."""
    sock = transmission(served)
    result: list[object] = []

    def collect() -> None:
        try:
            result.append(simple_reply(sock))
        except (EOFError, OSError) as e:
            result.append(e)

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        send_request(sock, Cmd.WRITE, 0, 65 * MiB, cookie=3)
        try:
            sock.sendall(b"\xee" * (65 * MiB))
        except OSError:
            pass  # the server hung up
        reader.join(TIMEOUT)
        assert result, "neither a reply nor a disconnect"
        if isinstance(result[0], tuple):
            assert result[0][0] in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM)
        served.bystander_works()
    finally:
        sock.close()
        reader.join(TIMEOUT)


@pytest.mark.parametrize("cut", [1, 27], ids=["1-byte", "27-bytes"])
def test_truncated_request_header(served: Served, cut: int) -> None:
    sock = transmission(served)
    sock.sendall(codec.build_request(Cmd.WRITE, 0, 1, 0, 4096)[:cut])
    served.bystander_works()
    sock.close()
    served.bystander_works()


def test_disconnect_mid_write_payload(served: Served) -> None:
    """Half a WRITE payload, then the client vanishes: nothing of it reaches the image."""
    sock = transmission(served)
    send_request(sock, Cmd.WRITE, 0, MiB, cookie=1)
    sock.sendall(b"\xee" * (300 * 1024))
    served.bystander_works()
    sock.close()
    time.sleep(0.2)
    served.bystander_works()
    assert served.bystander.pread(0, MiB) == served.model[:MiB]


def _flood(served: Served) -> int:
    """Flood 1 MiB READs without reading replies until the server stops reading us.

    Returns the server's RSS growth in KiB while the flood is stuck; checks the flood
    did get stuck (the server paused reading) and the bystander kept working.
    """
    sock = transmission(served)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    baseline = served.rss_kib()
    request = codec.build_request(Cmd.READ, 0, 0, 0, MiB)
    cookie_at = struct.calcsize(">IHH")
    sent = 0
    total = 4096  # 4 GiB of replies asked for
    sock.settimeout(2.0)
    try:
        for i in range(total):
            req = bytearray(request)
            struct.pack_into(">QQ", req, cookie_at, i + 1, (i % 16) * MiB)
            try:
                sock.sendall(req)
            except TimeoutError:
                break  # the server stopped reading us: back-pressure works
            sent += 1
        assert sent < total, "the server read 4096 requests without their replies being read"
        grown = served.rss_kib() - baseline
        served.bystander_works()
        grown = max(grown, served.rss_kib() - baseline)
        print(f"flood: {sent} requests sent, RSS +{grown} KiB")
    finally:
        sock.close()
    time.sleep(0.2)
    served.bystander_works()
    return grown


def test_client_that_never_reads_replies(served: Served) -> None:
    """The flooding client is paused, the bystander works, memory stays bounded."""
    grown = _flood(served)
    assert grown < 200 * 1024, f"server RSS grew by {grown // 1024} MiB"


def test_flood_memory_within_per_client_budget(served: Served) -> None:
    """Issue 3's target (16 clients x 32 MiB in flight under 200 MiB) leaves ~12 MiB per
    client; one flooding client must stay well within 40 MiB (in-flight cap + write
    buffer + socket buffers + slack)."""
    grown = _flood(served)
    assert grown < 40 * 1024, f"server RSS grew by {grown // 1024} MiB"


def test_disc_after_a_backlog_of_large_reads_closes(served: Served) -> None:
    """Many large READs pipelined then DISC: more replies than the write buffer holds, so
    requests wait in the backlog and are answered as it drains; every reply arrives,
    then the server closes the connection (it once waited forever for 'idle')."""
    sock = transmission(served)
    n, size = 200, 256 * 1024
    # first a large WRITE (answered from a worker thread), elsewhere
    wdata = os.urandom(MiB)
    stream = codec.build_request(Cmd.WRITE, 0, 999, 48 * MiB, MiB) + wdata
    stream += b"".join(codec.build_request(Cmd.READ, 0, i + 1, (i % 64) * size, size)
                       for i in range(n))
    stream += codec.build_request(Cmd.DISC, 0, 0, 0, 0)
    served.model[48 * MiB:49 * MiB] = wdata
    sender = threading.Thread(target=sock.sendall, args=(stream,))
    sender.start()
    try:
        sock.settimeout(TIMEOUT)
        got = set()
        for _ in range(n + 1):
            magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert magic == 0x67446698 and error == 0
            if cookie != 999:
                off = (cookie - 1) % 64 * size
                assert recv_exact(sock, size) == served.model[off:off + size]
            got.add(cookie)
        assert got == set(range(1, n + 1)) | {999}
        assert closed_by_server(sock), "the server did not close the connection after DISC"
    finally:
        sender.join()
        sock.close()
    served.bystander_works()
