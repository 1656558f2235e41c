"""qemu-nbd's command line where scripts read it: usage errors (one line, exit 1), -v
printing nothing per connection, -l snapshot.name=, --selinux-label, -c/-d without the
kernel module, and -L listing the same flags -- each compared with qemu-nbd itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tooling import repo_env, require_tool


def _nbdqcow_nbd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    code = "import sys; from nbdqcow.cli import qemu_nbd_main; sys.exit(qemu_nbd_main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=repo_env(), timeout=timeout)


def _qemu_nbd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-nbd"), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "a.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(img), "64M"],
                   check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "sn1", str(img)], check=True)
    return img


@pytest.mark.parametrize("argv, needle", [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["-x"], "option requires an argument -- 'x'"),
    (["--selinux-label=x"], "--selinux-label is not permitted without --socket"),
    (["-c", "/dev/nbd-absent"], "/dev/nbd-absent"),
    (["-d", "/dev/nbd-absent"], "/dev/nbd-absent"),
])
def test_usage_errors_one_line_exit_1_like_qemu_nbd(image: Path, argv: list[str],
                                                    needle: str) -> None:
    pre = [] if argv[0] == "-d" else [str(image)]  # -d DEV takes no image
    ours = _nbdqcow_nbd(*pre, *argv)
    theirs = _qemu_nbd(*pre, *argv)
    assert theirs.returncode == 1 and needle in theirs.stderr
    assert ours.returncode == 1, ours.stderr
    lines = ours.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], ours.stderr
    assert "usage:" not in ours.stderr and "Traceback" not in ours.stderr


def test_verbose_prints_nothing_per_connection(image: Path, tmp_path: Path,
                                               nbdqcow_server, qemu_nbd_server) -> None:
    qemu_io = require_tool("qemu-io")
    nbdinfo = require_tool("nbdinfo")
    for factory in (nbdqcow_server, qemu_nbd_server):
        srv = factory(image, "-v", "-t", "-r")
        subprocess.run([nbdinfo, "--list", srv.uri], check=True, capture_output=True)
        subprocess.run([qemu_io, "-r", "-f", "raw", "-c", "read 0 512", srv.uri], check=True,
                       capture_output=True)
        assert srv.stop() == 0
        assert srv.log.read_text().strip() == "", srv.log.read_text()


def test_log_connections_is_nbdqcows_own(image: Path, nbdqcow_server) -> None:
    srv = nbdqcow_server(image, "--log-connections", "-t", "-r")
    subprocess.run([require_tool("nbdinfo"), srv.uri], check=True, capture_output=True)
    srv.stop()
    assert "connected" in srv.log.read_text()


@pytest.mark.parametrize("spec", ["sn1", "1", "snapshot.name=sn1", "snapshot.id=1"])
def test_load_snapshot_forms(image: Path, spec: str, nbdqcow_server) -> None:
    srv = nbdqcow_server(image, "-l", spec)
    r = subprocess.run([require_tool("nbdinfo"), "--json", srv.uri], capture_output=True,
                       text=True, check=True)
    assert '"is_read_only": true' in r.stdout


def test_list_flags_match_qemu_nbd(image: Path, nbdqcow_server, qemu_nbd_server) -> None:
    outs = []
    for factory in (qemu_nbd_server, nbdqcow_server):
        srv = factory(image, "-t", "-r", "-x", "e1")
        assert srv.socket is not None
        if factory is qemu_nbd_server:
            r = _qemu_nbd("-L", "-k", str(srv.socket))
        else:
            r = _nbdqcow_nbd("-L", "-k", str(srv.socket))
        assert r.returncode == 0, r.stderr
        outs.append([ln for ln in r.stdout.splitlines() if "flags:" in ln])
        srv.stop()
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv", [
    ["info"], ["check"], ["map"], ["snapshot", "-l"], ["relayout"], ["bitmap", "--add"],
    ["layout", "-o", "x.svg"],
])
def test_every_image_error_names_the_file(tmp_path: Path, argv: list[str]) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(200))
    extra = ["b0"] if argv[0] == "bitmap" else []
    r = subprocess.run([sys.executable, "-m", "nbdqcow", *argv, str(bad), *extra],
                       capture_output=True, text=True, env=repo_env(), cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], r.stderr


def test_missing_image_named_once(tmp_path: Path) -> None:
    r = _nbdqcow_nbd("-k", str(tmp_path / "s.sock"), str(tmp_path / "nosuch.raw"))
    assert r.returncode == 1
    assert r.stderr.count("Could not open") == 1 and "nosuch.raw" in r.stderr, r.stderr


def test_list_without_a_server_says_where_like_qemu_nbd(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    ours = _nbdqcow_nbd("-L", "-k", sock)
    theirs = _qemu_nbd("-L", "-k", sock)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1], (ours.stderr,
                                                                             theirs.stderr)


@pytest.mark.parametrize("trace", [["-T", "nbd_*"], ["--trace=enable=nbd_negotiate*"],
                                   ["--trace", "events=/dev/null"]])
def test_trace_option_accepted_like_qemu_nbd(image: Path, trace: list[str], nbdqcow_server,
                                             qemu_nbd_server) -> None:
    """Scripts that pass qemu-nbd's -T/--trace keep working (the events are qemu's own;
    nbdqcow accepts the option and prints nothing for it)."""
    for start in (nbdqcow_server, qemu_nbd_server):
        srv = start(image, "-t", "-r", *trace)
        res = subprocess.run(["nbdinfo", "--size", srv.uri], capture_output=True, text=True,
                             timeout=30)
        assert res.stdout.strip() == str(64 << 20), res.stderr
