"""One server, many exports (issue: --export, --config, ctl, SIGHUP, /metrics).

Three images (qcow2, raw, a backing chain) from one process, checked with nbdinfo,
qemu-io, nbdcopy and qemu-img; exports added and removed while running; statistics
parsed by prometheus_client's OpenMetrics parser and compared with what was sent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from tooling import free_port, repo_env, require_tool


def _ctl(ctl: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "nbdqcow", "ctl", "-c", str(ctl), *args],
                       capture_output=True, text=True, env=repo_env(), timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def _qemu_img(*args: str) -> str:
    return subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True,
                          text=True).stdout


def _qemu_io(uri: str, cmd: str) -> None:
    r = subprocess.run([require_tool("qemu-io"), "-f", "raw", "-c", cmd, uri],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    q = tmp_path / "disk.qcow2"
    r = tmp_path / "disk.raw"
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(q), "64M")
    _qemu_img("create", "-q", "-f", "raw", str(r), "32M")
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 7 0 1M", str(base)], check=True,
                   capture_output=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    return {"q": q, "r": r, "base": base, "top": top}


class Server:
    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.sock = tmp / "multi.sock"
        self.ctl = tmp / "ctl"
        self.log = tmp / "server.log"
        self.port = free_port()
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nbdqcow", "serve", "-t", "-e", "0", "-k",
                 str(self.sock), "--control", str(self.ctl), "--metrics",
                 f"127.0.0.1:{self.port}", *args],
                stdout=logf, stderr=subprocess.STDOUT, env=repo_env())
        deadline = time.monotonic() + 15
        while not (self.sock.exists() and self.ctl.exists()):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        return int(self.proc.returncode)


@pytest.fixture
def start(tmp_path: Path):
    servers: list[Server] = []

    def run(*args: str) -> Server:
        s = Server(tmp_path, list(args))
        servers.append(s)
        return s

    yield run
    for s in servers:
        s.stop()


def test_three_images_from_one_process(tmp_path: Path, images: dict[str, Path],
                                       start) -> None:
    cfg = tmp_path / "nbd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        default = "qcow"
        max-buffer = "128M"
        [exports.qcow]
        file = "{images['q']}"
        description = "a qcow2 disk"
        [exports.raw]
        file = "{images['r']}"
        format = "raw"
        description = "a raw disk"
    """))
    srv = start("--config", str(cfg), "--export", f"chain={images['top']},description=a chain")
    listing = subprocess.run([require_tool("nbdinfo"), "--list", "--json",
                              _uri(srv.sock, "")], capture_output=True, text=True, check=True)
    got = {e["export-name"]: e.get("description") for e in json.loads(listing.stdout)["exports"]}
    assert got == {"qcow": "a qcow2 disk", "raw": "a raw disk", "chain": "a chain"}
    # server options from the config mean what the options mean
    assert srv.metrics()[("nbdqcow_memory_budget_limit_bytes", ())] == 128 << 20
    _qemu_io(_uri(srv.sock, "qcow"), "write -P 1 0 1M")
    _qemu_io(_uri(srv.sock, ""), "read -P 1 0 1M")  # the configured default export
    _qemu_io(_uri(srv.sock, "raw"), "write -P 2 1M 1M")
    _qemu_io(_uri(srv.sock, "chain"), "read -P 7 0 1M")
    _qemu_io(_uri(srv.sock, "chain"), "write -P 3 4M 64k")
    out = tmp_path / "copy.raw"
    subprocess.run([require_tool("nbdcopy"), _uri(srv.sock, "chain"), str(out)], check=True)
    data = out.read_bytes()
    assert data[:1 << 20] == b"\x07" * (1 << 20)
    assert data[4 << 20:(4 << 20) + 65536] == b"\x03" * 65536
    r = subprocess.run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 512",
                        _uri(srv.sock, "nosuch")], capture_output=True, text=True)
    assert r.returncode != 0 or "failed" in r.stdout + r.stderr
    assert srv.stop() == 0
    for img in (images["q"], images["top"], images["base"]):
        assert "No errors were found" in _qemu_img("check", str(img))
    assert images["r"].read_bytes()[1 << 20:2 << 20] == b"\x02" * (1 << 20)


def test_add_and_remove_while_running(tmp_path: Path, images: dict[str, Path], start) -> None:
    nbdsh = require_tool("nbdsh")
    srv = start("--export", f"first={images['q']}")
    r = _ctl(srv.ctl, "add", "second", str(images["top"]), "description=added later")
    assert "second" in r.stdout
    assert _ctl(srv.ctl, "add", "second", str(images["r"]), check=False).returncode == 1
    bad = _ctl(srv.ctl, "add", "third", str(images["r"]), "bogus=1", check=False)
    assert bad.returncode == 1 and "Invalid parameter 'bogus'" in bad.stderr
    _qemu_io(_uri(srv.sock, "second"), "write -P 5 2M 64k")
    listed = json.loads(_ctl(srv.ctl, "--json", "list").stdout)
    assert [e["name"] for e in listed["exports"]] == ["first", "second"]
    # a client holds "second": remove is refused, --force disconnects it after its
    # in-flight writes, which must be on disk then
    script = textwrap.dedent("""
        import sys
        h.pwrite(b"\\x09" * 65536, 3 << 20)
        print("written", flush=True)
        sys.stdin.readline()
        try:
            h.pread(512, 0)
            print("still connected", flush=True)
        except Exception:
            print("disconnected", flush=True)
    """)
    client = subprocess.Popen([nbdsh, "-u", _uri(srv.sock, "second"), "-c", script],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=repo_env())
    assert client.stdout is not None and client.stdout.readline().strip() == "written"
    refused = _ctl(srv.ctl, "remove", "second", check=False)
    assert refused.returncode == 1 and "client" in refused.stderr
    _ctl(srv.ctl, "remove", "second", "--force")
    assert client.stdin is not None
    client.stdin.write("\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "disconnected"
    client.wait(20)
    listed = json.loads(_ctl(srv.ctl, "--json", "list").stdout)
    assert [e["name"] for e in listed["exports"]] == ["first"]
    # closed by the server: the file is ours to inspect while it keeps serving "first"
    assert "No errors were found" in _qemu_img("check", str(images["top"]))
    raw = subprocess.run([require_tool("qemu-io"), "-c", "read -P 9 3M 64k", "-c",
                          "read -P 5 2M 64k", str(images["top"])], capture_output=True,
                         text=True)
    assert "failed" not in raw.stdout + raw.stderr, raw.stdout
    assert srv.stop() == 0


def test_sighup_applies_the_edited_config(tmp_path: Path, images: dict[str, Path],
                                          start) -> None:
    cfg = tmp_path / "nbd.toml"
    cfg.write_text(f'[exports.a]\nfile = "{images["q"]}"\n[exports.b]\nfile = "{images["r"]}"\n'
                   'format = "raw"\n')
    srv = start("--config", str(cfg))
    cfg.write_text(f'[exports.a]\nfile = "{images["q"]}"\n[exports.c]\nfile = "{images["top"]}"\n')
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [e["name"] for e in json.loads(_ctl(srv.ctl, "--json", "list").stdout)["exports"]]
        if names == ["a", "c"]:
            break
        time.sleep(0.1)
    assert names == ["a", "c"]
    _qemu_io(_uri(srv.sock, "c"), "read -P 7 0 64k")
    assert srv.proc.poll() is None


def test_metrics_count_what_was_sent(tmp_path: Path, images: dict[str, Path], start) -> None:
    srv = start("--export", f"m={images['q']}", "--export", f"idle={images['r']},format=raw")
    script = textwrap.dedent(f"""
        h.add_meta_context("base:allocation")
        h.connect_uri("{_uri(srv.sock, 'm')}")
        h.set_strict_mode(0)
        for i in range(7):
            h.pwrite(b"\\x01" * 4096, i * 4096)
        for i in range(5):
            h.pread(4096, i * 4096)
        h.pread(1 << 20, 0)
        h.flush()
        for i in range(3):
            h.block_status(1 << 20, 0, lambda *a: 0)
        try:
            h.pread(4096, 1 << 40)
        except Exception:
            pass
    """)
    subprocess.run([require_tool("nbdsh"), "-c", script],
                   check=True, env=repo_env(), capture_output=True)
    m = srv.metrics()

    def req(cmd: str, export: str = "m") -> float:
        return m[("nbdqcow_requests_total", (("command", cmd), ("export", export)))]

    assert (req("write"), req("read"), req("flush"), req("block_status")) == (7, 7, 1, 3)
    assert req("read", "idle") == 0
    assert m[("nbdqcow_request_bytes_total", (("command", "write"), ("export", "m")))] == 7 * 4096
    assert m[("nbdqcow_errors_total", (("errno", "22"), ("export", "m")))] == 1
    lat = m[("nbdqcow_request_latency_seconds_count", (("export", "m"), ("op", "read")))]
    assert lat == 7
    inf = m[("nbdqcow_request_latency_seconds_bucket",
             (("export", "m"), ("le", "+Inf"), ("op", "write")))]
    assert inf == 7
    stats = json.loads(_ctl(srv.ctl, "--json", "stats", "m").stdout)
    assert stats["exports"]["m"]["requests"]["write"] == 7
    assert stats["server"]["exports"] == 2


def _corrupt_first_cluster(img: Path) -> None:
    """Point guest cluster 0's L2 entry far past the end of the file."""
    b = bytearray(img.read_bytes())
    l1 = int.from_bytes(b[40:48], "big")
    l2 = int.from_bytes(b[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    b[l2:l2 + 8] = ((1 << 63) | (1 << 40)).to_bytes(8, "big")
    img.write_bytes(bytes(b))


def test_one_exports_trouble_stays_its_own(tmp_path: Path, images: dict[str, Path],
                                           start) -> None:
    """A corrupt image and a garbage-flooding client on one export: the other export
    keeps serving correct data; errors are counted where they happened."""
    import os
    import socket

    bad = tmp_path / "bad.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(bad), "8M")
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 4 0 64k", str(bad)], check=True,
                   capture_output=True)
    _corrupt_first_cluster(bad)
    srv = start("--export", f"bad={bad}", "--export", f"good={images['q']}")
    floods = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(srv.sock))
        s.setblocking(False)
        try:
            s.send(os.urandom(1 << 16))
        except BlockingIOError:
            pass
        floods.append(s)
    r = subprocess.run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 64k",
                        _uri(srv.sock, "bad")], capture_output=True, text=True)
    assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    for i in range(3):
        _qemu_io(_uri(srv.sock, "good"), f"write -P {i + 1} {i}M 1M")
        _qemu_io(_uri(srv.sock, "good"), f"read -P {i + 1} {i}M 1M")
    for s in floods:
        s.close()
    m = srv.metrics()
    assert m[("nbdqcow_errors_total", (("errno", "5"), ("export", "bad")))] >= 1
    assert not any(k[0] == "nbdqcow_errors_total" and ("export", "good") in k[1] for k in m)
    assert srv.proc.poll() is None
    assert srv.stop() == 0
    assert "No errors were found" in _qemu_img("check", str(images["q"]))
