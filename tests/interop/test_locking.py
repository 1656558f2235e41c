"""qemu's image locks, both ways, with the real tools.

nbdqcow takes the same open-file-description byte locks qemu 7.2 takes (see
nbdqcow/block/locking.py), so qemu-io, qemu-img and qemu-nbd refuse an image nbdqcow
serves exactly as they refuse one another qemu process uses, and nbdqcow refuses what
qemu holds.  The lock bytes themselves are compared with /proc/locks against qemu-nbd
and qemu-io holding the same image the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tooling import ServerFactory, repo_env, require_tool  # noqa: E402

from nbdqcow.cli import main  # noqa: E402

MiB = 1 << 20


def qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def nbdqcow(*argv: str) -> subprocess.CompletedProcess[str]:
    """``nbdqcow ARGV`` run in this process (fast; OFD locks judge an open in this
    process exactly as one in another process); ``serve`` in a child process, so that a
    server that should have been refused cannot hang the test."""
    if argv[0] == "serve":
        return subprocess.run([sys.executable, "-m", "nbdqcow", *argv], capture_output=True,
                              text=True, timeout=30, env=repo_env(), stdin=subprocess.DEVNULL)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = int(e.code or 0)
    return subprocess.CompletedProcess(["nbdqcow", *argv], rc, out.getvalue(), err.getvalue())


def settled(*files: Path) -> dict[str, list[int]]:
    """The lock bytes once a server has taken them all (qemu-nbd listens before it opens
    the image): the first file locked and two looks 0.1 s apart agreeing."""
    deadline = time.monotonic() + 10
    last = lock_bytes(*files)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = lock_bytes(*files)
        if now == last and now[files[0].name]:
            return now
        last = now
    return last


def ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"{res.args}: {res.returncode}\n{res.stdout}{res.stderr}"


def refused(res: subprocess.CompletedProcess[str], first: str, image: Path) -> list[str]:
    """The command failed with qemu's two lines: ``first`` and 'Is another process using
    the image [IMAGE]?'; returns the lines after them."""
    assert res.returncode == 1, f"{res.args}: {res.returncode}\n{res.stdout}{res.stderr}"
    lines = res.stderr.splitlines()
    assert lines[:2] == [first, f"Is another process using the image [{image}]?"], res.stderr
    return lines[2:]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 image over a raw backing file, both with data."""
    base = tmp_path / "base.raw"
    img = tmp_path / "img.qcow2"
    ok(qemu("qemu-img", "create", "-q", "-f", "raw", str(base), str(4 * MiB)))
    ok(qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", str(base)))
    ok(qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
            str(img), str(4 * MiB)))
    ok(qemu("qemu-io", "-c", "write -P 0x22 1M 64k", str(img)))
    ok(qemu("qemu-img", "snapshot", "-c", "s0", str(img)))
    ok(qemu("qemu-img", "bitmap", "--add", str(img), "b0"))
    return img, base


# ------------------------------------------------------------------ the lock bytes
def lock_bytes(*files: Path) -> dict[str, list[int]]:
    """Every OFD-locked byte of each file, from /proc/locks."""
    ino = {os.stat(f).st_ino: f.name for f in files}
    out: dict[str, list[int]] = {f.name: [] for f in files}
    with open("/proc/locks") as f:
        for line in f:
            p = line.split()
            if len(p) < 8 or p[1] != "OFDLCK":
                continue
            i = int(p[5].rsplit(":", 1)[1])
            if i in ino:
                out[ino[i]] += range(int(p[6]), int(p[7]) + 1)
    return {k: sorted(v) for k, v in out.items()}


@contextmanager
def qemu_io_holding(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-io with the image open (interactive, waiting on stdin)."""
    require_tool("qemu-io")
    p = subprocess.Popen(["qemu-io", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        assert p.stdin is not None
        p.stdin.write(b"help\n")  # answered once the image is open
        p.stdin.flush()
        assert p.stdout is not None
        assert p.stdout.readline(), "qemu-io exited"
        yield p
    finally:
        if p.stdin:
            p.stdin.close()
        p.wait(10)


def _differential(tmp_path: Path, nbdqcow_server: ServerFactory,
                  qemu_nbd_server: ServerFactory, image: Path, files: list[Path],
                  *args: str) -> None:
    q = qemu_nbd_server(image, *args)
    want = settled(*files)
    q.stop()
    n = nbdqcow_server(image, *args)
    got = settled(*files)
    n.stop()
    assert got == want, f"{args}: nbdqcow {got} qemu-nbd {want}"
    assert any(want.values())


@pytest.mark.parametrize("args", [("-f", "qcow2"), ("-r", "-l", "s0"), ("-s",)],
                         ids=["rw", "r", "s"])
def test_lock_bytes_as_qemu_nbd_qcow2_raw_backing(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory,
        qemu_nbd_server: ServerFactory, args: tuple[str, ...]) -> None:
    img, base = chain
    _differential(tmp_path, nbdqcow_server, qemu_nbd_server, img, [img, base], *args)


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "r"])
def test_lock_bytes_as_qemu_nbd_raw_and_qcow2_backing_and_data_file(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory,
        qemu_nbd_server: ServerFactory, ro: bool) -> None:
    img, base = chain
    r = ("-r",) if ro else ()
    _differential(tmp_path, nbdqcow_server, qemu_nbd_server, base, [base], "-f", "raw", *r)
    top = tmp_path / "top.qcow2"
    ok(qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img), "-F", "qcow2",
            str(top)))
    _differential(tmp_path, nbdqcow_server, qemu_nbd_server, top, [top, img, base], *r)
    data = tmp_path / "data.raw"
    ext = tmp_path / "ext.qcow2"
    ok(qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}",
            str(ext), str(4 * MiB)))
    _differential(tmp_path, nbdqcow_server, qemu_nbd_server, ext, [ext, data], *r)


def test_force_share_locks_as_qemu_io_U(chain: tuple[Path, Path],
                                         nbdqcow_server: ServerFactory) -> None:
    img, base = chain
    with qemu_io_holding("-r", "-U", str(img)):
        want = lock_bytes(img, base)
    n = nbdqcow_server(img, "-r", "--force-share")
    assert lock_bytes(img, base) == want == {"img.qcow2": [100], "base.raw": [100]}
    n.stop()


# ------------------------------------------------------------------ qemu against nbdqcow
def test_qemu_tools_refuse_an_image_nbdqcow_serves(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory) -> None:
    img, base = chain
    srv = nbdqcow_server(img)
    w, sw = 'Failed to get "write" lock', 'Failed to get shared "write" lock'
    refused(qemu("qemu-io", "-c", "quit", str(img)), f"qemu-io: can't open device {img}: {w}", img)
    refused(qemu("qemu-io", "-r", "-c", "quit", str(img)),
            f"qemu-io: can't open device {img}: {sw}", img)
    for cmd in (["info"], ["map"], ["check"], ["snapshot", "-l"]):
        refused(qemu("qemu-img", *cmd, str(img)), f"qemu-img: Could not open '{img}': {sw}", img)
    for cmd in (["check", "-r", "all"], ["snapshot", "-c", "x"], ["snapshot", "-d", "s0"],
                ["bitmap", "--remove"]):
        argv = ["qemu-img", *cmd, str(img)] + (["b0"] if cmd[0] == "bitmap" else [])
        refused(qemu(*argv), f"qemu-img: Could not open '{img}': {w}", img)
    refused(qemu("qemu-img", "create", "-f", "qcow2", str(img), "1M"), f"qemu-img: {img}: {w}",
            img)
    refused(qemu("qemu-nbd", "-k", str(tmp_path / "q.sock"), str(img)),
            f"qemu-nbd: Failed to blk_new_open '{img}': {w}", img)
    # -U reads it anyway; the raw backing file is shared with everyone, as qemu shares it
    ok(qemu("qemu-img", "info", "-U", str(img)))
    ok(qemu("qemu-img", "map", "-U", str(img)))
    ok(qemu("qemu-io", "-r", "-U", "-c", "read -P 0x22 1M 64k", str(img)))
    ok(qemu("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", str(base)))
    srv.stop()
    # released at exit
    ok(qemu("qemu-img", "check", str(img)))
    ok(qemu("qemu-io", "-c", "read -P 0x22 1M 64k", str(img)))


def test_qemu_readers_coexist_with_a_read_only_serve(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory,
        qemu_nbd_server: ServerFactory) -> None:
    img, _ = chain
    srv = nbdqcow_server(img, "-r")
    ok(qemu("qemu-io", "-r", "-c", "read -P 0x22 1M 64k", str(img)))
    ok(qemu("qemu-img", "info", str(img)))
    ok(qemu("qemu-img", "check", str(img)))
    q = qemu_nbd_server(img, "-r")  # a second read-only server of the same image
    settled(img)
    refused(qemu("qemu-io", "-c", "quit", str(img)),
            f"qemu-io: can't open device {img}: Failed to get \"write\" lock", img)
    refused(qemu("qemu-img", "snapshot", "-c", "x", str(img)),
            f"qemu-img: Could not open '{img}': Failed to get \"write\" lock", img)
    q.stop()
    srv.stop()


# ------------------------------------------------------------------ nbdqcow against qemu
def test_nbdqcow_refuses_an_image_qemu_nbd_serves(
        tmp_path: Path, chain: tuple[Path, Path], qemu_nbd_server: ServerFactory) -> None:
    img, _ = chain
    q = qemu_nbd_server(img)
    settled(img)
    before = sha(img)
    w = f"nbdqcow: Could not open '{img}': Failed to get \"write\" lock"
    sw = f"nbdqcow: Could not open '{img}': Failed to get shared \"write\" lock"
    held = f"The lock is held by qemu-nbd (pid {q.proc.pid})."
    rest = refused(nbdqcow("serve", "-k", str(tmp_path / "n.sock"), str(img)), w, img)
    assert rest == [held]
    rest = refused(nbdqcow("serve", "-r", "-k", str(tmp_path / "n.sock"), str(img)), sw, img)
    assert rest[0] == held and "--force-share" in rest[1]
    for cmd in (["info"], ["map"], ["check"], ["snapshot", "-l"],
                ["layout", "-o", str(tmp_path / "p.svg")]):
        rest = refused(nbdqcow(*cmd, str(img)), sw, img)
        assert rest == [held, "Use -U (--force-share) to read it anyway "
                              "(the result may be inconsistent)."]
    for cmd in (["snapshot", "-c", "x"], ["snapshot", "-d", "s0"], ["snapshot", "-a", "s0"],
                ["check", "-r", "all"], ["check", "-r", "leaks"], ["relayout"]):
        assert refused(nbdqcow(*cmd, str(img)), w, img) == [held]
    assert refused(nbdqcow("bitmap", "--remove", str(img), "b0"), w, img) == [held]
    assert refused(nbdqcow("create", "-f", "qcow2", str(img), "1M"),
                   f"nbdqcow: {img}: Failed to get \"write\" lock", img) == [held]
    assert sha(img) == before  # nothing was written, nothing truncated
    # -U: read it anyway, as qemu-img -U does
    for cmd in (["info", "-U"], ["map", "-U"], ["check", "-U"], ["snapshot", "-l", "-U"],
                ["layout", "-U", "-o", str(tmp_path / "p.svg")]):
        ok(nbdqcow(*cmd, str(img)))
    copy = str(tmp_path / "copy.raw")
    assert refused(nbdqcow("convert", str(img), copy), sw, img)[0] == held
    ok(nbdqcow("convert", "-U", str(img), copy))
    refused(nbdqcow("info", "--backing-chain", str(img)), sw, img)
    ok(nbdqcow("info", "-U", "--backing-chain", str(img)))
    # the specification's own force-share=on / file.locking=off, as qemu-img honours them
    spec = f"driver=qcow2,file.filename={img}"
    ok(nbdqcow("info", "--image-opts", spec + ",force-share=on"))
    ok(nbdqcow("check", "--image-opts", spec + ",file.locking=off"))
    ok(nbdqcow("map", "--image-opts", spec + ",force-share=on"))
    ok(nbdqcow("info", 'json:{"driver": "qcow2", "file": {"driver": "file", '
                       f'"filename": "{img}", "locking": "off"}}}}'))
    res = nbdqcow("check", "-r", "all", "--image-opts", spec + ",force-share=on")
    assert res.returncode == 1
    assert res.stderr == (f"nbdqcow: Could not open '{spec},force-share=on': force-share=on "
                          "can only be used with read-only images\n")
    q.stop()
    ok(qemu("qemu-img", "check", str(img)))


def test_nbdqcow_coexists_with_a_read_only_qemu_nbd(
        tmp_path: Path, chain: tuple[Path, Path], qemu_nbd_server: ServerFactory,
        nbdqcow_server: ServerFactory) -> None:
    img, _ = chain
    qemu_nbd_server(img, "-r")
    settled(img)
    ok(nbdqcow("info", str(img)))
    ok(nbdqcow("check", str(img)))
    srv = nbdqcow_server(img, "-r")
    refused(nbdqcow("serve", "-k", str(tmp_path / "w.sock"), str(img)),
            f"nbdqcow: Could not open '{img}': Failed to get \"write\" lock", img)
    srv.stop()


def test_a_served_backing_file_is_locked_as_qemu_locks_it(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory,
        qemu_nbd_server: ServerFactory) -> None:
    """A qcow2 backing file refuses writers (qcow2 protects its metadata); a raw one
    refuses nobody.  Both ways."""
    img, base = chain
    top = tmp_path / "top.qcow2"
    ok(qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img), "-F", "qcow2", str(top)))
    w = 'Failed to get "write" lock'
    for factory in (nbdqcow_server, qemu_nbd_server):
        s = factory(top)
        settled(top, img)
        refused(qemu("qemu-io", "-c", "quit", str(img)), f"qemu-io: can't open device {img}: {w}",
                img)
        refused(nbdqcow("snapshot", "-c", "x", str(img)),
                f"nbdqcow: Could not open '{img}': {w}", img)
        ok(qemu("qemu-img", "info", str(img)))
        ok(nbdqcow("info", str(img)))
        ok(qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", str(base)))
        s.stop()
    # and a writer of the backing file keeps the image from being opened through it
    with qemu_io_holding(str(img)):
        for cmd in ("map", "check"):
            refused(qemu("qemu-img", cmd, str(top)),
                    f"qemu-img: Could not open '{top}': Could not open backing file: "
                    'Failed to get shared "write" lock', img)
            refused(nbdqcow(cmd, str(top)),
                    f"nbdqcow: Could not open '{top}': Could not open backing file: "
                    'Failed to get shared "write" lock', img)
        ok(nbdqcow("check", "-U", str(top)))


# ------------------------------------------------------------------ nbdqcow against nbdqcow
def test_two_nbdqcow_servers(tmp_path: Path, chain: tuple[Path, Path],
                             nbdqcow_server: ServerFactory) -> None:
    img, _ = chain
    w = f"nbdqcow: Could not open '{img}': Failed to get \"write\" lock"
    sw = f"nbdqcow: Could not open '{img}': Failed to get shared \"write\" lock"
    a = nbdqcow_server(img)
    sock = str(tmp_path / "second.sock")
    rest = refused(nbdqcow("serve", "-k", sock, str(img)), w, img)
    assert rest == [f"The lock is held by nbdqcow (pid {a.proc.pid})."]
    refused(nbdqcow("serve", "-r", "-k", sock, str(img)), sw, img)
    a.stop()
    r1 = nbdqcow_server(img, "-r")
    r2 = nbdqcow_server(img, "-r")  # readers coexist
    refused(nbdqcow("serve", "-k", sock, str(img)), w, img)
    r1.stop()
    r2.stop()


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "r"])
def test_modifying_commands_refused_while_nbdqcow_serves(
        tmp_path: Path, chain: tuple[Path, Path], nbdqcow_server: ServerFactory,
        ro: bool) -> None:
    img, _ = chain
    srv = nbdqcow_server(img, *(["-r"] if ro else []))
    time.sleep(0.1)
    before = sha(img)
    w = f"nbdqcow: Could not open '{img}': Failed to get \"write\" lock"
    for cmd in (["snapshot", "-c", "x", str(img)], ["snapshot", "-d", "s0", str(img)],
                ["snapshot", "-a", "s0", str(img)], ["check", "-r", "all", str(img)],
                ["relayout", str(img)], ["bitmap", "--add", str(img), "b9"],
                ["bitmap", "--remove", str(img), "b0"]):
        refused(nbdqcow(*cmd), w, img)
    refused(nbdqcow("create", "-f", "qcow2", str(img), "1M"),
            f"nbdqcow: {img}: Failed to get \"write\" lock", img)
    refused(nbdqcow("create", "-f", "raw", str(img), "1M"),
            f"nbdqcow: {img}: Failed to get \"write\" lock", img)
    out = tmp_path / "other.qcow2"
    ok(qemu("qemu-img", "create", "-q", "-f", "qcow2", str(out), "1M"))
    refused(nbdqcow("relayout", "-O", str(img), str(out)),
            f"nbdqcow: Could not open '{img}': Failed to get \"write\" lock", img)
    assert sha(img) == before
    if ro:  # readers are welcome
        ok(nbdqcow("info", str(img)))
        ok(nbdqcow("map", str(img)))
        ok(nbdqcow("check", str(img)))
    else:  # -U reads anyway
        ok(nbdqcow("info", "-U", str(img)))
        ok(nbdqcow("check", "-U", str(img)))
        ok(nbdqcow("map", "-U", "--output=json", str(img)))
        nbdqcow_server(img, "-r", "--force-share").stop()
    srv.stop()
    ok(qemu("qemu-img", "check", str(img)))
    # released: the same commands work now
    ok(nbdqcow("snapshot", "-c", "x", str(img)))
    ok(nbdqcow("check", "-r", "all", str(img)))


def test_force_share_only_reads(tmp_path: Path, chain: tuple[Path, Path]) -> None:
    img, _ = chain
    res = nbdqcow("serve", "--force-share", "-k", str(tmp_path / "x.sock"), str(img))
    assert res.returncode == 1
    assert res.stderr == "nbdqcow: force-share=on can only be used with read-only images\n"
    for cmd in (["check", "-U", "-r", "all"], ["snapshot", "-U", "-c", "x"]):
        res = nbdqcow(*cmd, str(img))
        assert res.returncode == 1
        assert res.stderr == (f"nbdqcow: Could not open '{img}': force-share=on can only be "
                              "used with read-only images\n")
