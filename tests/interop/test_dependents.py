"""The command lines real qemu-nbd users run, verbatim with paths substituted, against
nbdqcow-nbd and qemu-nbd: what their clients see must be the same.

- virt-v2v writes qcow2 through qemu's compress filter (``--image-opts driver=compress``);
- virtnbdbackup's offline backup serves a bitmap (``--fork --pid-file --bitmap``) and its
  restore writes through ``--discard=unmap --format=qcow2`` (forked, or socket activated
  by libnbd);
- oVirt imageio serves ``json:`` specs (raw with offset/size, qcow2 overlays with
  ``"backing": null``) with ``--persistent --shared=8 --cache=none --aio=native
  --discard=unmap --detect-zeroes=unmap --bitmap B --allocation-depth``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tooling import repo_env, require_tool

NBDQCOW_NBD = [sys.executable, "-c",
               "import sys; from nbdqcow.cli import qemu_nbd_main; sys.exit(qemu_nbd_main())"]
SERVERS = ("nbdqcow", "qemu-nbd")


def _binary(kind: str) -> list[str]:
    return list(NBDQCOW_NBD) if kind == "nbdqcow" else [require_tool("qemu-nbd")]


def _qemu_img(*args: str) -> str:
    r = subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _qemu_io(img: str, *cmds: str, fmt: str = "qcow2") -> None:
    argv = [require_tool("qemu-io"), "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run([*argv, img], capture_output=True, text=True)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


class Running:
    """A server started by a dependent's command line."""

    def __init__(self, argv: list[str], sock: Path, fork: bool = False,
                 pid_file: Path | None = None) -> None:
        self.sock = sock
        self.pid_file = pid_file
        self.proc: subprocess.Popen[bytes] | None = None
        if fork:
            r = subprocess.run(argv, capture_output=True, env=repo_env(), timeout=60)
            assert r.returncode == 0, r.stderr.decode()
            assert pid_file is not None and pid_file.exists()
            self.pid = int(pid_file.read_text())
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, env=repo_env())
            self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc is None or self.proc.poll() is None, self._err()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def _err(self) -> str:
        return self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def named(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.proc is not None:
            self.proc.wait(30)
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        pytest.fail(f"server {self.pid} did not stop")


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.stop()


def _compressible(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for i in range(size // 65536):
            f.write((b"virt-v2v block %06d " % i) * (65536 // 22) + b"\0" * (65536 % 22))


def _nbdinfo_map(uri: str, context: str = "base:allocation") -> list[dict[str, object]]:
    out = subprocess.run([require_tool("nbdinfo"), "--json", f"--map={context}", uri],
                         capture_output=True, text=True, check=True).stdout
    return [{k: e[k] for k in ("offset", "length", "type")} for e in json.loads(out)]


@pytest.mark.parametrize("kind", SERVERS)
def test_virt_v2v_compressed_qcow2_output(tmp_path: Path, kind: str, running) -> None:
    src = tmp_path / "source.raw"
    _compressible(src, 8 << 20)
    out = tmp_path / "out.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(out), str(8 << 20))
    sock, pid = tmp_path / "v2v.sock", tmp_path / "v2v.pid"
    argv = [*_binary(kind), "-t", "--shared=0", "--discard=unmap", "--pid-file", str(pid),
            "--socket", str(sock), "--image-opts",
            f"driver=compress,file.driver=qcow2,file.file.driver=file,"
            f"file.file.filename={out}"]
    srv = Running(argv, sock)
    running.append(srv)
    subprocess.run([require_tool("nbdcopy"), "--flush", str(src), srv.uri], check=True)
    srv.stop()
    check = json.loads(_qemu_img("check", "--output=json", str(out)))
    assert check.get("compressed-clusters", 0) == check["allocated-clusters"] > 0, check
    _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(out))
    assert out.stat().st_size < src.stat().st_size // 2


def _backup_image(tmp_path: Path) -> Path:
    img = tmp_path / "vm.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    _qemu_io(str(img), "write -P 1 0 2M")
    _qemu_img("bitmap", "--add", str(img), "backup-1")
    _qemu_io(str(img), "write -P 2 1M 64k", "write -P 3 8M 128k", "write -z 12M 64k")
    return img


def test_virtnbdbackup_offline_backup_same_view(tmp_path: Path, running) -> None:
    views = []
    for kind in SERVERS:
        d = tmp_path / kind
        d.mkdir()
        img = _backup_image(d)
        sock, pid = d / "backup.sock", d / "backup.pid"
        argv = [*_binary(kind), "-r", "--format=qcow2", "-x", "sda", str(img), "-k",
                str(sock), "-t", "-e", "2", "--fork", "--detect-zeroes=on",
                f"--pid-file={pid}", "--bitmap=backup-1"]
        srv = Running(argv, sock, fork=True, pid_file=pid)
        running.append(srv)
        uri = srv.named("sda")
        dirty = _nbdinfo_map(uri, "qemu:dirty-bitmap:backup-1")
        alloc = _nbdinfo_map(uri)
        data = d / "full.raw"
        subprocess.run([require_tool("nbdcopy"), uri, str(data)], check=True)
        views.append((dirty, alloc, data.read_bytes()))
        srv.stop()
        assert not pid.exists() or kind == "qemu-nbd"
    assert views[0][0] == views[1][0]  # the same dirty ranges
    assert views[0][2] == views[1][2]  # the same data
    assert any(e["type"] == 1 for e in views[0][0])


@pytest.mark.parametrize("kind", SERVERS)
def test_virtnbdbackup_restore(tmp_path: Path, kind: str, running) -> None:
    src = tmp_path / "backup.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(3 << 20) + os.urandom(1 << 20))
    target = tmp_path / "restored.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(target), str(5 << 20))
    sock, pid = tmp_path / "restore.sock", tmp_path / "restore.pid"
    argv = [*_binary(kind), "--discard=unmap", "--format=qcow2", "-x", "sda", str(target),
            "-k", str(sock), "--fork", "--pid-file", str(pid)]
    srv = Running(argv, sock, fork=True, pid_file=pid)
    running.append(srv)
    subprocess.run([require_tool("nbdcopy"), str(src), srv.named("sda")], check=True)
    srv.stop()
    assert "No errors were found" in _qemu_img("check", str(target))
    _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(target))


@pytest.mark.parametrize("kind", SERVERS)
def test_virtnbdbackup_restore_socket_activation(tmp_path: Path, kind: str) -> None:
    """Newer virtnbdbackup lets libnbd start the server with systemd socket activation."""
    target = tmp_path / "restored.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(target), "4M")
    argv = [*_binary(kind), "--discard=unmap", "--format=qcow2", str(target)]
    script = (f"h.connect_systemd_socket_activation({argv!r})\n"
              "h.pwrite(b'\\x05' * 65536, 1 << 20)\nh.flush()\nh.shutdown()\n")
    subprocess.run([require_tool("nbdsh"), "-c", script], check=True, env=repo_env(),
                   timeout=60)
    _qemu_io(str(target), "read -P 5 1M 64k")


def _imageio_argv(kind: str, sock: Path, spec: str, bitmap: str | None) -> list[str]:
    argv = [*_binary(kind), "--socket", str(sock), "--persistent", "--shared=8",
            "--cache=none", "--aio=native", "--discard=unmap", "--detect-zeroes=unmap"]
    if bitmap:
        argv += ["--bitmap", bitmap]
    return [*argv, "--allocation-depth", spec]


def test_ovirt_imageio_qcow2_overlay_without_backing(tmp_path: Path, running) -> None:
    views = []
    for kind in SERVERS:
        d = tmp_path / kind
        d.mkdir()
        base = d / "base.qcow2"
        top = d / "top.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
        _qemu_io(str(base), "write -P 9 0 4M")
        _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
        _qemu_io(str(top), "write -P 4 1M 64k")
        _qemu_img("bitmap", "--add", str(top), "b1")
        spec = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                     "file": {"driver": "file", "filename": str(top)}})
        sock = d / "imageio.sock"
        srv = Running(_imageio_argv(kind, sock, spec, "b1"), sock)
        running.append(srv)
        # a write through the export is seen in the live bitmap; zeros are detected
        subprocess.run([require_tool("nbdsh"), "-u", srv.uri, "-c",
                        "h.pwrite(b'\\x06' * 65536, 2 << 20)\n"
                        "h.pwrite(bytes(65536), 3 << 20)\nh.flush()"],
                       check=True, env=repo_env())
        depth = _nbdinfo_map(srv.uri, "qemu:allocation-depth")
        dirty = _nbdinfo_map(srv.uri, "qemu:dirty-bitmap:b1")
        data = d / "all.raw"
        subprocess.run([require_tool("nbdcopy"), srv.uri, str(data)], check=True)
        views.append((depth, dirty, data.read_bytes()))
        srv.stop()
        assert "No errors were found" in _qemu_img("check", str(top))
    assert views[0][0] == views[1][0]
    assert views[0][1] == views[1][1]
    assert views[0][2] == views[1][2]
    blob = views[0][2]
    assert blob[:65536] == bytes(65536)  # "backing": null hides the base's data
    assert blob[1 << 20:(1 << 20) + 65536] == b"\x04" * 65536


def test_ovirt_imageio_raw_slice(tmp_path: Path, running) -> None:
    disk = tmp_path / "lv.raw"
    disk.write_bytes(os.urandom(3 << 20))
    views = []
    for kind in SERVERS:
        spec = "json:" + json.dumps({"driver": "raw", "offset": 1 << 20, "size": 1 << 20,
                                     "file": {"driver": "file", "filename": str(disk)}})
        sock = tmp_path / f"{kind}.sock"
        argv = _imageio_argv(kind, sock, spec, None)
        argv.insert(len(argv) - 2, "-r")
        srv = Running(argv, sock)
        running.append(srv)
        info = json.loads(subprocess.run([require_tool("nbdinfo"), "--json", srv.uri],
                                         capture_output=True, text=True, check=True).stdout)
        data = tmp_path / f"{kind}.out"
        subprocess.run([require_tool("nbdcopy"), srv.uri, str(data)], check=True)
        views.append((info["exports"][0]["export-size"], data.read_bytes()))
        srv.stop()
    assert views[0] == views[1]
    assert views[0][1] == disk.read_bytes()[1 << 20:2 << 20]
