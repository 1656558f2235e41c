"""One-shot serving (no ``-t``): only a client that reached transmission ends the server.

Each scenario runs against nbdqcow and against qemu-nbd, and both must agree step by
step: bare connects, failed handshakes and listing-only clients (nbdinfo --list,
nbd-client -l, ``-L``) leave the server running; the first real client that leaves while
no other connection is open ends it with exit status 0.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tooling import Served, ServerFactory, repo_env, require_tool

MiB = 1 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), env=repo_env(), capture_output=True, timeout=30)


def _alive(srv: Served, grace: float = 0.4) -> bool:
    """True when the server is still running ``grace`` seconds after the last step."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            return False
        time.sleep(0.05)
    return srv.proc.poll() is None


def _exit_status(srv: Served, timeout: float = 10) -> int | None:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _connect(srv: Served) -> socket.socket:
    assert srv.socket is not None
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(srv.socket))
    return s


def bare_connect(srv: Served) -> None:
    _connect(srv).close()


def garbage_handshake(srv: Served) -> None:
    s = _connect(srv)
    try:
        s.recv(18)  # the greeting
        s.sendall(b"garbage!" * 8)
        time.sleep(0.2)
    finally:
        s.close()


def nbdinfo_list(srv: Served) -> None:
    res = _run("nbdinfo", "--list", srv.uri)
    assert res.returncode == 0, res.stderr


def nbd_client_list(srv: Served) -> None:
    assert srv.socket is not None
    res = _run("nbd-client", "-l", "-unix", str(srv.socket))
    assert res.returncode == 0, res.stderr


def serve_list(srv: Served) -> None:
    """``-L`` of the same program family (nbdqcow serve -L / qemu-nbd -L)."""
    assert srv.socket is not None
    if srv.name.startswith("qemu-nbd"):
        argv = ["qemu-nbd", "-L", "-k", str(srv.socket)]
    else:
        argv = [sys.executable, "-m", "nbdqcow", "serve", "-L", "-k", str(srv.socket)]
    res = _run(*argv)
    assert res.returncode == 0, res.stderr


PROBES = {
    "bare-connect": bare_connect,
    "garbage-handshake": garbage_handshake,
    "nbdinfo-list": nbdinfo_list,
    "nbd-client-l": nbd_client_list,
    "serve-L": serve_list,
}


def _image(tmp_path: Path) -> Path:
    require_tool("qemu-img")
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(64 * MiB)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 1M", str(img)],
                   check=True)
    return img


def _start(kind: str, img: Path, nbdqcow_server: ServerFactory,
           qemu_nbd_server: ServerFactory, *args: str) -> Served:
    factory = qemu_nbd_server if kind == "qemu-nbd" else nbdqcow_server
    srv = factory(img, "-f", "qcow2", *args, name="disk")
    srv.name = kind
    return srv


def _qemu_io(srv: Served, *opts: str) -> None:
    res = _run("qemu-io", *opts, "-f", "raw", "-c", "read -P 0x5a 0 512", srv.uri)
    assert res.returncode == 0 and b"read 512/512" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("kind", ["nbdqcow", "qemu-nbd"])
def test_probes_do_not_end_the_server(
    tmp_path: Path, kind: str, nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory
) -> None:
    for tool in ("qemu-io", "nbdinfo", "nbd-client"):
        require_tool(tool)
    img = _image(tmp_path)
    srv = _start(kind, img, nbdqcow_server, qemu_nbd_server)
    try:
        for name, probe in PROBES.items():
            probe(srv)
            assert _alive(srv), f"{kind}: the server ended after {name}"
        _qemu_io(srv)  # the real client works after all of them ...
        assert _exit_status(srv) == 0  # ... and its leaving ends the server, status 0
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["nbdqcow", "qemu-nbd"])
def test_readme_sequence(
    tmp_path: Path, kind: str, nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory
) -> None:
    """README: ``serve -k SOCK -x disk -r disk.qcow2``, ``nbdinfo --list``, ``qemu-io``."""
    require_tool("qemu-io")
    require_tool("nbdinfo")
    img = _image(tmp_path)
    srv = _start(kind, img, nbdqcow_server, qemu_nbd_server, "-r")
    try:
        nbdinfo_list(srv)
        assert _alive(srv)
        _qemu_io(srv, "-r")  # a read-only export: qemu-io without -r is refused (EPERM)
        assert _exit_status(srv) == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["nbdqcow", "qemu-nbd"])
def test_real_client_leaving_while_a_probe_is_open(
    tmp_path: Path, kind: str, nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory
) -> None:
    """qemu-nbd's rule exactly: a real client that leaves while another connection is
    open does not end the server, nor does that other connection when it is no client;
    the next real client that leaves alone does."""
    require_tool("qemu-io")
    img = _image(tmp_path)
    srv = _start(kind, img, nbdqcow_server, qemu_nbd_server, "-e", "2")
    try:
        probe = _connect(srv)
        try:
            _qemu_io(srv)
            assert _alive(srv), f"{kind}: ended while another connection was open"
        finally:
            probe.close()
        assert _alive(srv), f"{kind}: a probe's leaving ended the server"
        _qemu_io(srv)
        assert _exit_status(srv) == 0
    finally:
        srv.stop()
