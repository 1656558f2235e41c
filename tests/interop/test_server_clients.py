"""``nbdqcow serve`` against the real clients: nbdinfo, nbdsh/libnbd, qemu-io, qemu-img,
nbdcopy, nbd-client and fio, on raw and qcow2 images.

Oracles are independent of the server: images are prepared with qemu-img/qemu-io, block
status is compared with ``qemu-img map`` of the image file, data is compared with the
bytes that were written (or with ``qemu-img compare`` of the image after the server stops).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tooling import REPO, Served, ServerFactory, free_port, repo_env, require_tool

MiB = 1 << 20
SIZE = 64 * MiB
FORMATS = ["raw", "qcow2"]


def run(*argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         env=repo_env(), **kw)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def make_image(tmp_path: Path, fmt: str, backing: bool = False) -> Path:
    """A 64 MiB image with data at known places (and, for qcow2 with ``backing``, a
    backing file with data of its own)."""
    img = tmp_path / f"disk.{fmt}"
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 4M 256k", "-c", "write -P 0x12 8M 64k",
            str(base))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img))
    else:
        run("qemu-img", "create", "-q", "-f", fmt, str(img), str(SIZE))
    run("qemu-io", "-f", fmt, "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 1M 192k",
        "-c", "write -P 0xcc 8M 4k", "-c", "write -z 16M 1M", str(img))
    return img


def nbd_handle(uri: str, *, contexts: tuple[str, ...] = ("base:allocation",),
               strict: bool = True) -> Any:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def close(h: Any) -> None:
    """libnbd 1.14's Python handle has no close(): shut down politely, drop the handle."""
    try:
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()
    except Exception:  # noqa: BLE001 - already closed or dead
        pass


def merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge adjacent (offset, length, value) runs with equal values."""
    out: list[list[int]] = []
    for off, n, v in runs:
        if out and out[-1][2] == v and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n, v])
    return [(a, b, c) for a, b, c in out]


def qemu_img_map(image: Path, fmt: str) -> list[dict[str, Any]]:
    return json.loads(run("qemu-img", "map", "-f", fmt, "--output=json", str(image)).stdout)


def expected_allocation(image: Path, fmt: str) -> list[tuple[int, int, int]]:
    """base:allocation from ``qemu-img map``: HOLE unless data, ZERO when zero.  A qcow2
    zero run that keeps its host space (zero with an offset) is no hole (nbdqcow's one
    intentional difference from qemu-nbd here)."""
    def flags(e: dict[str, Any]) -> int:
        kept = fmt == "qcow2" and e["zero"] and "offset" in e and e["depth"] == 0
        return (0 if e["data"] or kept else 1) | (2 if e["zero"] else 0)

    return merged([(e["start"], e["length"], flags(e)) for e in qemu_img_map(image, fmt)])


def expected_depth(image: Path, fmt: str) -> list[tuple[int, int, int]]:
    runs = [(e["start"], e["length"], e["depth"] + 1 if e.get("present", True) else 0)
            for e in qemu_img_map(image, fmt)]
    return merged(runs)


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    out = run("nbdinfo", "--json", f"--map={context}", uri).stdout
    return merged([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


# --- nbdinfo ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_nbdinfo_json(tmp_path: Path, fmt: str, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, fmt)
    srv = nbdqcow_server(img, "-f", fmt, "-D", "a test disk", "-A", "-t", name="disk")
    info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (ex,) = info["exports"]
    assert ex["export-name"] == "disk"
    assert ex["description"] == "a test disk"
    assert ex["export-size"] == SIZE
    assert set(ex["contexts"]) == {"base:allocation", "qemu:allocation-depth"}
    assert ex["is_read_only"] is False
    assert ex["can_flush"] and ex["can_fua"] and ex["can_zero"] and ex["can_df"]
    assert ex["can_cache"] and ex["can_fast_zero"]
    assert ex["can_trim"] is True  # advertised as by qemu-nbd (--discard=ignore: no effect)
    assert ex["can_multi_conn"] is False  # -e 1
    assert (ex["block_size_minimum"], ex["block_size_preferred"],
            ex["block_size_maximum"]) == (1, 4096, 32 * MiB)


def test_nbdinfo_list_and_flags(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "raw")
    srv = nbdqcow_server(img, "-r", "-e", "3", "-D", "listed", "-t", name="named")
    info = json.loads(run("nbdinfo", "--list", "--json", srv.uri).stdout)
    (ex,) = info["exports"]
    assert (ex["export-name"], ex["description"]) == ("named", "listed")
    assert ex["is_read_only"] is True
    assert ex["can_zero"] is False and ex["can_trim"] is False
    assert ex["can_multi_conn"] is True  # -e 3: every client shares one driver


@pytest.mark.parametrize("fmt", FORMATS)
def test_nbdinfo_map_matches_qemu_img_map(tmp_path: Path, fmt: str,
                                          nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, fmt, backing=fmt == "qcow2")
    srv = nbdqcow_server(img, "-f", fmt, "-A", "-r", "-t")
    assert nbdinfo_map(srv.uri) == expected_allocation(img, fmt)
    depth = nbdinfo_map(srv.uri, "qemu:allocation-depth")
    assert depth == expected_depth(img, fmt)
    if fmt == "qcow2":
        assert {v for _, _, v in depth} == {0, 1, 2}  # unallocated, this image, backing


# --- every command and flag through libnbd ------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_libnbd_commands_and_flags(tmp_path: Path, fmt: str, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, fmt)
    model = bytearray(SIZE)
    model[0 : 64 * 1024] = b"\xaa" * (64 * 1024)
    model[MiB : MiB + 192 * 1024] = b"\xbb" * (192 * 1024)
    model[8 * MiB : 8 * MiB + 4096] = b"\xcc" * 4096
    srv = nbdqcow_server(img, "-f", fmt, "--discard=unmap", "-A", "-t")
    nbd = pytest.importorskip("nbd")
    h = nbd_handle(srv.uri, contexts=("base:allocation", "qemu:allocation-depth"))
    try:
        assert h.can_trim() and h.can_zero() and h.can_fast_zero() and h.can_cache()
        # READ: plain, DF, across data/holes, large (worker thread path)
        assert h.pread(1 * MiB, 0) == bytes(model[:1 * MiB])
        chunks: list[tuple[int, int]] = []

        def chunk(sub: bytes, offset: int, status: int, err: Any) -> int:
            chunks.append((offset, status))
            return 0

        want = bytes(model[1000 * 1024 - 5 : 1300 * 1024 - 5])
        assert h.pread_structured(300 * 1024, 1000 * 1024 - 5, chunk) == want
        assert len(chunks) > 1 and {s for _, s in chunks} == {nbd.READ_DATA, nbd.READ_HOLE}
        chunks.clear()
        assert h.pread_structured(300 * 1024, 1000 * 1024 - 5, chunk, nbd.CMD_FLAG_DF) == want
        assert chunks == [(1000 * 1024 - 5, nbd.READ_DATA)]  # DF: one data chunk
        assert h.pread(4096, 8 * MiB - 100) == bytes(model[8 * MiB - 100 : 8 * MiB + 3996])
        # WRITE, with and without FUA, small and large
        blob = os.urandom(3 * MiB + 17)
        h.pwrite(blob, 20 * MiB + 3)
        model[20 * MiB + 3 : 20 * MiB + 3 + len(blob)] = blob
        h.pwrite(b"fua!" * 1024, 30 * MiB, nbd.CMD_FLAG_FUA)
        model[30 * MiB : 30 * MiB + 4096] = b"fua!" * 1024
        # WRITE_ZEROES: default (may punch), NO_HOLE, FUA, FAST_ZERO (answers or ENOTSUP)
        h.zero(64 * 1024, 20 * MiB)
        h.zero(4096, 21 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        model[20 * MiB : 20 * MiB + 64 * 1024] = bytes(64 * 1024)
        model[21 * MiB : 21 * MiB + 4096] = bytes(4096)
        try:
            h.zero(MiB, 22 * MiB, nbd.CMD_FLAG_FAST_ZERO)
            model[22 * MiB : 23 * MiB] = bytes(MiB)
        except nbd.Error as e:
            assert e.args[1] == errno.ENOTSUP
        # TRIM (then the contents are unspecified until rewritten: rewrite them)
        h.trim(MiB, 20 * MiB + 2 * MiB, nbd.CMD_FLAG_FUA)
        h.pwrite(bytes(model[22 * MiB : 23 * MiB]), 22 * MiB)
        h.trim(4 * MiB, 40 * MiB)
        model[40 * MiB : 44 * MiB] = bytes(4 * MiB)
        h.pwrite(bytes(4 * MiB), 40 * MiB)
        # FLUSH, CACHE
        h.flush()
        h.cache(MiB, 0)
        # BLOCK_STATUS with and without REQ_ONE, for both contexts
        seen: dict[str, list[int]] = {}

        def cb(meta: str, offset: int, entries: list[int], err: Any) -> int:
            seen[meta] = entries
            return 0

        h.block_status(16 * MiB, 0, cb)
        assert sum(seen["base:allocation"][0::2]) <= 16 * MiB
        assert seen["base:allocation"][0] == 64 * 1024 and seen["base:allocation"][1] == 0
        h.block_status(16 * MiB, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert len(seen["base:allocation"]) == 2 and len(seen["qemu:allocation-depth"]) == 2
        h.block_status(8192, 16 * MiB + 4096, cb)
        assert seen["base:allocation"][1] & 2  # written as zeroes
        # the whole export reads back like the model (in 4 MiB pieces)
        for off in range(0, SIZE, 4 * MiB):
            assert h.pread(4 * MiB, off) == bytes(model[off : off + 4 * MiB]), off
        h.shutdown()
    finally:
        close(h)
    assert srv.stop() == 0
    if fmt == "qcow2":
        run("qemu-img", "check", str(img))
    converted = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(converted))
    assert converted.read_bytes() == bytes(model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_cases(tmp_path: Path, fmt: str, nbdqcow_server: ServerFactory) -> None:
    nbd = pytest.importorskip("nbd")
    img = make_image(tmp_path, fmt)
    rw = nbdqcow_server(img, "-f", fmt, "-t", "-e", "2")

    def code(fn: Any, *args: Any) -> int:
        with pytest.raises(nbd.Error) as ei:
            fn(*args)
        return int(ei.value.args[1])

    h = nbd_handle(rw.uri, strict=False)
    try:
        assert code(h.pread, 4096, SIZE - 100) == errno.EINVAL  # read past the end
        assert code(h.pwrite, b"x" * 4096, SIZE - 100) == errno.ENOSPC  # write past the end
        assert code(h.zero, 4096, SIZE) == errno.ENOSPC
        assert len(h.pread(48 * MiB, 0)) == 48 * MiB  # over 32 MiB: served (up to 64 MiB)
        assert code(h.pwrite, b"x", 0, nbd.CMD_FLAG_DF) == errno.EINVAL  # flag not for WRITE
        assert code(h.pwrite, b"x", 0, nbd.CMD_FLAG_REQ_ONE) == errno.EINVAL
        assert code(h.pwrite, b"x", 0, 0x4000) == errno.EINVAL  # unknown flag
        assert code(h.block_status, 512, SIZE - 256, lambda *a: 0) == errno.EINVAL
        h.trim(512, 0)  # --discard=ignore (the default): answered, nothing changes
        assert h.pread(512, 0) == b"\xaa" * 512
        assert code(h.trim, 512, SIZE - 256) == errno.ENOSPC  # past the end, as a write
        # the connection is still fine after all of this
        assert h.pread(4, 0) == b"\xaa" * 4
    finally:
        close(h)
    rw.stop()
    ro = nbdqcow_server(img, "-f", fmt, "-r", "-t")
    h = nbd_handle(ro.uri, strict=False)
    try:
        assert h.is_read_only()
        assert code(h.pwrite, b"x", 0) == errno.EPERM
        assert code(h.zero, 512, 0) == errno.EPERM
        assert code(h.trim, 512, 0) == errno.EPERM
        h.flush()  # flush on a read-only export is allowed (and trivially true)
        assert h.pread(4, MiB) == b"\xbb" * 4
    finally:
        close(h)


def test_nbdsh_script(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    require_tool("nbdsh")
    img = make_image(tmp_path, "qcow2")
    srv = nbdqcow_server(img, "-t")
    script = (
        "h.pwrite(b'nbdsh!' * 100, 5 * 1024 * 1024)\n"
        "h.flush()\n"
        "print(h.pread(6, 5 * 1024 * 1024 + 6).decode(), h.get_size())\n"
        "print(h.pread(2, 0).hex())\n"
    )
    out = run("nbdsh", "-u", srv.uri, "-c", script).stdout.split()
    assert out == ["nbdsh!", str(SIZE), "aaaa"]


# --- qemu-io / qemu-img over nbd:// and nbd+unix:// ----------------------------------------------
@pytest.mark.parametrize("fmt,tcp", [("raw", True), ("qcow2", False)])
def test_qemu_io_and_qemu_img(tmp_path: Path, fmt: str, tcp: bool,
                              nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, fmt)
    srv = nbdqcow_server(img, "-f", fmt, "-t", "-e", "0", tcp=tcp)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 12M 1M", "-c", "read -P 0x5a 12M 1M",
        "-c", "read -P 0xbb 1M 192k", "-c", "write -z 12M 64k", "-c", "read -P 0 12M 64k",
        "-c", "flush", srv.uri)
    reference = tmp_path / "reference.raw"
    # the image is being served writable: read it with -U, as qemu's locks require
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(img), str(reference))
    # qemu-img compare over NBD against a local copy of what it should contain
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), srv.uri)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", srv.uri).stdout)
    assert info["virtual-size"] == SIZE
    nbd_map = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", srv.uri).stdout)
    data_runs = merged([(e["start"], e["length"], int(e["data"])) for e in nbd_map])
    assert (0, 64 * 1024, 1) in data_runs
    assert any(o <= 12 * MiB + 64 * 1024 and 13 * MiB <= o + n and v for o, n, v in data_runs)


# --- nbdcopy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_nbdcopy_both_ways(tmp_path: Path, fmt: str, nbdqcow_server: ServerFactory) -> None:
    img = tmp_path / f"empty.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, str(img), str(32 * MiB))
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(32):
            f.write(os.urandom(MiB) if i % 3 else bytes(MiB))
    srv = nbdqcow_server(img, "-f", fmt, "-e", "4", "-t")
    run("nbdcopy", str(src), srv.uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", srv.uri, str(out))
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out) == digest(src)
    assert srv.stop() == 0
    run("qemu-img", "compare", "-f", fmt, "-F", "raw", str(img), str(src))


# --- nbd-client -----------------------------------------------------------------------------------
def test_nbd_client_negotiation_and_list(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    require_tool("nbd-client")
    img = make_image(tmp_path, "raw")
    srv = nbdqcow_server(img, "-t", "-D", "for nbd-client", tcp=True, name="exp")
    assert srv.port is not None
    # the kernel module is absent: nbd-client fails after the negotiation reached the size
    neg = run("nbd-client", "-N", "exp", "127.0.0.1", str(srv.port), "/dev/nbd15",
              check=False, timeout=20)
    assert "size = 64MB" in neg.stdout + neg.stderr
    listing = run("nbd-client", "-l", "127.0.0.1", str(srv.port), timeout=20)
    assert "exp: for nbd-client" in listing.stdout


# --- fio --------------------------------------------------------------------------------------------
def test_fio_verify(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    require_tool("fio")
    img = tmp_path / "fio.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(32 * MiB))
    srv = nbdqcow_server(img, "-t", "-e", "0")
    res = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
              "--bs=4k,64k", "--bsrange=4k-256k", "--iodepth=16", "--size=32M",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
              timeout=120, cwd=str(tmp_path))  # fio leaves its verify state in the cwd
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 * MiB and job["read"]["io_bytes"] >= 32 * MiB


# --- server lifecycle ---------------------------------------------------------------------------------
def test_exits_after_last_client(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "raw")
    srv = nbdqcow_server(img)  # no -t
    run("nbdinfo", "--size", srv.uri)
    assert srv.proc.wait(10) == 0
    assert srv.socket is not None and not srv.socket.exists()


def test_persistent_and_sigterm_flushes(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "qcow2")
    srv = nbdqcow_server(img, "-t")
    for i in range(2):
        run("qemu-io", "-f", "raw", "-c", f"write -P {0x61 + i} {30 + i}M 64k", srv.uri)
    assert srv.proc.poll() is None  # still serving
    assert srv.stop(signal.SIGTERM) == 0
    run("qemu-img", "check", str(img))
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0x61 30M 64k", "-c", "read -P 0x62 31M 64k",
        str(img))


def test_shared_clients_queue_and_multi_conn(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "qcow2")
    srv = nbdqcow_server(img, "-t", "-e", "2")
    a = nbd_handle(srv.uri)
    b = nbd_handle(srv.uri)
    try:
        assert a.can_multi_conn()
        a.pwrite(b"A" * 4096, 0)
        a.flush()
        assert b.pread(4096, 0) == b"A" * 4096
        # a third client waits until a slot frees up
        third = subprocess.Popen(["nbdinfo", "--size", srv.uri], stdout=subprocess.PIPE,
                                 env=repo_env())
        time.sleep(0.5)
        assert third.poll() is None
        a.shutdown()
        assert third.communicate(timeout=10)[0].strip() == str(SIZE).encode()
    finally:
        close(a)
        close(b)


def test_fork_and_pid_file(tmp_path: Path) -> None:
    img = make_image(tmp_path, "raw")
    sock = tmp_path / "f.sock"
    pidfile = tmp_path / "pid"
    pid = None
    try:
        res = subprocess.run([sys.executable, "-m", "nbdqcow", "serve", "--fork", "--pid-file",
                              str(pidfile), "-k", str(sock), str(img)],
                             env=repo_env(), timeout=20, capture_output=True)
        assert res.returncode == 0, res.stderr
        assert sock.exists()  # ready as soon as the parent returned
        pid = int(pidfile.read_text())
        run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
        for _ in range(100):  # exits after its only client left
            if not pidfile.exists():
                break
            time.sleep(0.05)
        assert not pidfile.exists()
    finally:
        if pid is None and pidfile.exists():
            with contextlib.suppress(ValueError):
                pid = int(pidfile.read_text())
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_socket_activation(tmp_path: Path) -> None:
    img = make_image(tmp_path, "raw")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # LISTEN_PID must be the server's own pid: set it from a shell that then execs
    cmd = (f"exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m nbdqcow serve "
           f"-x act {img}")
    proc = subprocess.Popen(["/bin/bash", "-c", cmd], pass_fds=(fd,), env=repo_env(),
                            stderr=subprocess.PIPE)
    listener.close()
    try:
        res = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/act", check=False)
        assert res.stdout.strip() == str(SIZE), res.stderr
        assert proc.wait(10) == 0
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_list_option(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "raw")
    srv = nbdqcow_server(img, "-t", "-A", "-D", "described", name="lst")
    res = subprocess.run([sys.executable, "-m", "nbdqcow", "serve", "-L", "-k", str(srv.socket)],
                         capture_output=True, text=True, env=repo_env(), timeout=20)
    assert res.returncode == 0, res.stderr
    assert "exports available: 1" in res.stdout
    assert " export: 'lst'" in res.stdout and "description: described" in res.stdout
    assert f"size:  {SIZE}" in res.stdout
    assert "qemu:allocation-depth" in res.stdout


def test_qemu_nbd_command_line(tmp_path: Path) -> None:
    """``nbdqcow-nbd`` takes qemu-nbd's command line (positional FILE, no subcommand)."""
    img = make_image(tmp_path, "raw")
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from nbdqcow.cli import "
                             "qemu_nbd_main; sys.exit(qemu_nbd_main())", "-r", "-f", "raw",
                             "-k", str(sock), "-x", "q", str(img)], env=repo_env())
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        out = json.loads(run("nbdinfo", "--json", f"nbd+unix:///q?socket={sock}").stdout)
        assert out["exports"][0]["is_read_only"] is True
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_snapshot_overlay_leaves_image_untouched(tmp_path: Path,
                                                 nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "qcow2")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    srv = nbdqcow_server(img, "-s", "-t")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M",
        "-c", "read -P 0xcc 8M 4k", srv.uri)
    assert srv.stop() == 0
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def test_load_internal_snapshot(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = make_image(tmp_path, "qcow2")
    run("qemu-img", "snapshot", "-c", "snap1", str(img))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", str(img))
    srv = nbdqcow_server(img, "-l", "snap1", "-t")
    h = nbd_handle(srv.uri)
    try:
        assert h.is_read_only()
        assert h.pread(65536, 0) == b"\xaa" * 65536
    finally:
        close(h)


def test_repo_is_importable_from_anywhere() -> None:
    # the fixtures put this checkout first on PYTHONPATH
    assert (REPO / "nbdqcow" / "__init__.py").exists()


def _unused(x: Served) -> None:  # keep the import used for type checkers
    pass


def test_tcp_ipv6(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    img = make_image(tmp_path, "raw")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nbdqcow", "serve", "-t", "-b", "::1", "-p",
                             str(port), "-x", "v6", str(img)], env=repo_env())
    try:
        for _ in range(250):
            try:
                socket.create_connection(("::1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        out = run("nbdinfo", "--json", f"nbd://[::1]:{port}/v6").stdout
        assert json.loads(out)["exports"][0]["export-size"] == SIZE
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.parametrize("detect", ["off", "on", "unmap"])
def test_detect_zeroes(tmp_path: Path, detect: str, nbdqcow_server: ServerFactory) -> None:
    img = tmp_path / "dz.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(4 * MiB))
    srv = nbdqcow_server(img, "-t", f"--detect-zeroes={detect}", "--discard=unmap")
    h = nbd_handle(srv.uri)
    try:
        h.pwrite(bytes(65536), 0)
        h.pwrite(b"\x01" * 65536, 65536)
        h.flush()
    finally:
        close(h)
    assert srv.stop() == 0
    first = qemu_img_map(img, "qcow2")[0]
    assert first["start"] == 0 and first["length"] == (131072 if detect == "off" else 65536)
    # off: the zeroes are written as data; on/unmap: they become a zero run
    assert first["data"] is (detect == "off")
    assert first["zero"] is (detect != "off")
