"""One memory budget for the whole server, under abuse, with RSS sampled.

Many connections send 32 MiB READs and never read a reply, others send the header and
part of the payload of 64 MiB WRITEs and then nothing, others send garbage after the
greeting, over and over; a good client writes, reads back and verifies all the while
(the traffic generator is bench/abuse.py, shared with ``bench/memory.py --abuse``).
The server's RSS (VmRSS sampled every 50 ms, and VmHWM) must stay under 300 MiB, and
go back down once the abusers are gone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tooling import REPO, repo_env, require_tool

sys.path.insert(0, str(REPO / "bench"))
import abuse  # noqa: E402

MiB = 1 << 20
SIZE = 128 * MiB
RSS_LIMIT_MIB = 300


class Server:
    def __init__(self, tmp: Path, *opts: str) -> None:
        require_tool("qemu-img")
        require_tool("qemu-io")
        self.image = tmp / "disk.qcow2"
        self.sock = tmp / "nbd.sock"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(SIZE)],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x3c 0 {SIZE}",
                        str(self.image)], check=True)
        argv = [sys.executable, "-m", "nbdqcow", "serve", "-f", "qcow2", "-t", "-e", "0",
                *opts, "-k", str(self.sock), str(self.image)]
        self.proc = subprocess.Popen(argv, env=repo_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, "nbdqcow serve exited"
            assert time.monotonic() < deadline, "nbdqcow serve did not start"
            time.sleep(0.02)
        time.sleep(0.2)
        self.idle_kib = abuse.status_kib(self.proc.pid, "VmRSS")

    def rss_kib(self) -> int:
        return abuse.status_kib(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[Server]]:
    started: list[Server] = []

    class Factory(Server):
        def __init__(self, *opts: str) -> None:
            super().__init__(tmp_path, *opts)
            started.append(self)

    yield Factory
    for s in started:
        s.stop()


def _settles(srv: Server, limit_kib: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    rss = srv.rss_kib()
    while rss > limit_kib and time.monotonic() < deadline:
        time.sleep(0.1)
        rss = srv.rss_kib()
    return rss


def test_flooders_stallers_and_garbage_stay_under_300_mib(
    server_factory: type[Server],
) -> None:
    srv = server_factory()  # the default budget
    r = abuse.run_abuse(srv.proc.pid, srv.sock, SIZE, seconds=5, flooders=8, stallers=4,
                        garbage=2, request_size=32 * MiB, write_size=64 * MiB,
                        good_large=128 * 1024)
    print(f"abuse: {r}")
    assert srv.proc.poll() is None, "the server died"
    assert not r["good_errors"], r["good_errors"]
    assert isinstance(r["good_ops"], int) and r["good_ops"] >= 20, r
    assert isinstance(r["flood_requests"], int) and r["flood_requests"] >= 8, r
    peak = max(int(str(r["peak_rss_kib"])), int(str(r["hwm_kib"])))
    # without the budget: 8 x 32 MiB replies + 4 x 64 MiB payloads, well over 500 MiB
    assert peak < RSS_LIMIT_MIB * 1024, f"peak RSS {peak // 1024} MiB"
    # the abusers are gone: what they held goes back (pool and heap slack aside)
    rss = _settles(srv, srv.idle_kib + 48 * 1024)
    assert rss <= srv.idle_kib + 48 * 1024, f"RSS {rss // 1024} MiB after the abuse"


def test_paused_flooders_do_not_starve_a_good_client(server_factory: type[Server]) -> None:
    """Two clients flood 32 MiB READs without reading, inside a 96 MiB budget: the good
    client's 4 MiB reads keep being served, promptly."""
    srv = server_factory("--max-buffer=96M")
    r = abuse.run_abuse(srv.proc.pid, srv.sock, SIZE, seconds=4, flooders=2, stallers=0,
                        garbage=0, request_size=32 * MiB, good_large=4 * MiB)
    print(f"fair share: {r}")
    assert not r["good_errors"], r["good_errors"]
    assert isinstance(r["good_ops"], int) and r["good_ops"] >= 10, r
    assert isinstance(r["good_max_latency"], float) and r["good_max_latency"] < 2.0, r
    peak = max(int(str(r["peak_rss_kib"])), int(str(r["hwm_kib"])))
    assert peak < (srv.idle_kib + 96 * 1024 + 48 * 1024), f"peak RSS {peak // 1024} MiB"


def test_write_payloads_wait_for_the_budget(server_factory: type[Server]) -> None:
    """Eight clients each send the header and 1 MiB of a 64 MiB WRITE, then stall: only
    what the budget allows gets a buffer; a good client keeps working."""
    srv = server_factory("--max-buffer=64M")
    r = abuse.run_abuse(srv.proc.pid, srv.sock, SIZE, seconds=3, flooders=0, stallers=8,
                        garbage=0, write_size=64 * MiB, good_large=128 * 1024)
    print(f"stallers: {r}")
    assert not r["good_errors"], r["good_errors"]
    assert isinstance(r["good_ops"], int) and r["good_ops"] >= 10, r
    peak = max(int(str(r["peak_rss_kib"])), int(str(r["hwm_kib"])))
    # 8 x 64 MiB without the budget; one 64 MiB payload within it
    assert peak < srv.idle_kib + 64 * 1024 + 48 * 1024, f"peak RSS {peak // 1024} MiB"
