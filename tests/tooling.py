"""Helpers for tests that need reference tools (qemu-img, nbdinfo, ...)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """Path of tool ``name``; skip the test when missing, FAIL when $CI is set."""
    path = shutil.which(name)
    if path is None:
        msg = f"reference tool {name!r} is not installed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# --- servers (used by tests/conftest.py fixtures) ----------------------------------------
REPO = Path(__file__).resolve().parents[1]



def repo_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this checkout first on PYTHONPATH, /usr/bin first
    on PATH (libnbd's nbdsh runs `python3 -m nbd` and needs Debian's python3)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin:" + env.get("PATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running server process and how to reach it."""

    proc: subprocess.Popen[bytes]
    uri: str
    socket: Path | None
    port: int | None
    log: Path
    name: str = ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def unix_listening(path: Path) -> bool:
    """True once a socket bound to ``path`` listens (/proc/net/unix: flag __SO_ACCEPTCON).
    The file exists from bind(); a client connecting before listen() is refused, and
    qemu-nbd binds the final name directly: under load that window is long enough."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return path.exists()
    want = str(path)
    for line in lines:
        fields = line.split()
        # nbdqcow binds PATH.PID.tmp and renames it once listening: the table keeps the
        # name bound
        if (len(fields) >= 8 and int(fields[3], 16) & 0x10000
                and re.fullmatch(re.escape(want) + r"(\.\d+\.tmp)?", fields[7])):
            return path.exists()
    return False


def wait_ready(proc: subprocess.Popen[bytes], sock: Path | None, port: int | None,
               log: Path | None = None, timeout: float = 30) -> None:
    """Wait until the server ``proc`` listens on unix socket ``sock`` or TCP ``port``;
    fail the test if it exits first or takes longer than ``timeout``.  Its output is
    read from ``log``, else from its stderr when that is a pipe."""

    def output() -> str:
        if log is not None:
            return log.read_text()[-2000:]
        if proc.stderr is not None and proc.poll() is not None:
            return proc.stderr.read().decode(errors="replace")[-2000:]
        return ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early ({proc.returncode}): {output()}")
        if sock is not None and unix_listening(sock):
            return
        if port is not None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
        time.sleep(0.02)
    pytest.fail(f"server not ready after {timeout}s: {output()}")


ServerFactory = Callable[..., Served]


def _factory(tmp_path: Path, base_cmd: Callable[[], list[str]], prefix: str
             ) -> Iterator[ServerFactory]:
    """Start servers; ``prefix`` keeps the sockets and logs of two factories apart."""
    started: list[Served] = []

    def start(image: str | os.PathLike[str], *args: str, tcp: bool = False,
              name: str = "", wait: bool = True) -> Served:
        n = len(started)
        log = tmp_path / f"{prefix}{n}.log"
        sock: Path | None = None
        port: int | None = None
        cmd = base_cmd()
        if tcp:
            port = free_port()
            cmd += ["-b", "127.0.0.1", "-p", str(port)]
            uri = f"nbd://127.0.0.1:{port}/{name}"
        else:
            sock = tmp_path / f"{prefix}{n}.sock"
            cmd += ["-k", str(sock)]
            uri = f"nbd+unix:///{name}?socket={sock}"
        if name:
            cmd += ["-x", name]
        cmd += [*args, str(image)]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=repo_env())
        served = Served(proc, uri, sock, port, log, name)
        started.append(served)
        if wait:
            wait_ready(proc, sock, port, log)
        return served

    try:
        yield start
    finally:
        for s in started:
            s.stop()
