"""Scenarios of the peer test suites that run qemu-nbd (libnbd's interop/ tests), run
against nbdqcow's qemu-nbd command line and against qemu-nbd itself.

Each test starts the server the way the peer test does (systemd socket activation
through libnbd, or ``-k SOCKET`` with no ``-t``), with the same command-line arguments,
and checks what the peer test asserts.  The facts come from reading those tests
(libnbd interop/interop-qemu-block-size.sh, structured-read.sh, list-exports.c,
interop.c, dirty-bitmap.sh); no code is taken from them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tooling import REPO, repo_env, require_tool  # noqa: E402

nbd = pytest.importorskip("nbd")

SERVERS = ["nbdqcow", "qemu-nbd"]


def server_argv(which: str) -> list[str]:
    """The server's qemu-nbd-compatible command (no arguments yet)."""
    if which == "qemu-nbd":
        return [require_tool("qemu-nbd")]
    # libnbd execs this itself: put the checkout on the path through env(1), which
    # keeps the pid (LISTEN_PID must name the server process)
    return ["/usr/bin/env", f"PYTHONPATH={REPO}", sys.executable, "-c",
            "import sys; from nbdqcow.cli import qemu_nbd_main; sys.exit(qemu_nbd_main())"]


def activated(which: str, *args: str, **opts: object) -> nbd.NBD:
    h = nbd.NBD()
    for key, value in opts.items():
        getattr(h, key)(*value) if isinstance(value, tuple) else getattr(h, key)(value)
    h.connect_systemd_socket_activation([*server_argv(which), *args])
    return h


def qemu(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


@pytest.mark.parametrize("which", SERVERS)
def test_interop_raw_export_named_slash(tmp_path: Path, which: str) -> None:
    """interop.c: -f raw -x / on a 1 MiB sparse file; size, one 512-byte read, shutdown."""
    img = tmp_path / "disk"
    img.write_bytes(b"")
    os.truncate(img, 1 << 20)
    h = activated(which, "-f", "raw", "-x", "/", str(img), set_export_name="/")
    assert h.get_size() == 1 << 20
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


@pytest.mark.parametrize("which", SERVERS)
def test_list_exports_with_description(tmp_path: Path, which: str) -> None:
    """list-exports.c: -f raw -x testing -D data on a 1 KiB file, in option mode."""
    img = tmp_path / "disk"
    img.write_bytes(bytes(1024))
    h = activated(which, "-f", "raw", "-x", "testing", "-D", "data", str(img),
                  set_opt_mode=True)
    got: list[tuple[str, str]] = []
    h.opt_list(lambda name, desc: got.append((name, desc)) or 0)
    assert got == [("testing", "data")]
    h.opt_abort()


@pytest.mark.parametrize("which", SERVERS)
def test_structured_read_hole_then_data(tmp_path: Path, which: str) -> None:
    """structured-read.sh: 512-byte clusters, all 1 but a zero cluster at 2 KiB.  A read
    of [2 KiB, 3 KiB) comes as a HOLE chunk then a DATA chunk; with DF one DATA chunk."""
    require_tool("qemu-img")
    img = tmp_path / "sr.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=v3",
         str(img), "3k")
    qemu("qemu-io", "-d", "unmap", "-f", "qcow2", "-c", "w -P 1 0 3k", "-c", "w -zu 2k 512",
         str(img))
    h = activated(which, "-f", "qcow2", str(img))
    assert h.get_size() == 3072 and h.can_df()
    chunks: list[tuple[int, int, int, bytes]] = []

    def cb(buf: bytes, offset: int, status: int, err: int) -> int:
        chunks.append((offset, len(buf), status, bytes(buf)))
        return 0

    h.pread_structured(1024, 2048, cb)
    assert [c[:3] for c in chunks] == [(2048, 512, nbd.READ_HOLE), (2560, 512, nbd.READ_DATA)]
    assert chunks[1][3] == b"\1" * 512
    chunks.clear()
    h.pread_structured(1024, 2048, cb, nbd.CMD_FLAG_DF)
    assert [c[:3] for c in chunks] == [(2048, 1024, nbd.READ_DATA)]
    assert chunks[0][3] == bytes(512) + b"\1" * 512

    def failing(buf: bytes, offset: int, status: int, err: int) -> int:
        chunks.append((offset, len(buf), status, b""))
        return -1

    chunks.clear()
    with pytest.raises(nbd.Error):
        h.pread_structured(1024, 2048, failing)
    assert len(chunks) == 2 and h.aio_is_ready()  # the connection stays up
    assert h.pread(1, 0) == b"\1"
    h.shutdown()


@pytest.mark.parametrize("which", SERVERS)
def test_structured_read_small_mixed_reads(tmp_path: Path, which: str) -> None:
    """Small structured reads across data and zero clusters read back exactly, and the
    zero clusters come as holes, whatever their position in the request."""
    require_tool("qemu-img")
    img = tmp_path / "mix.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "64k")
    qemu("qemu-io", "-f", "qcow2", "-c", "w -P 7 4k 4k", "-c", "w -P 9 12k 8k",
         "-c", "w -P 0 24k 4k", str(img))
    h = activated(which, "-f", "qcow2", str(img))
    expect = (bytes(4096) + b"\7" * 4096 + bytes(4096) + b"\x09" * 8192).ljust(65536, b"\0")
    chunks: list[tuple[int, int, int, bytes]] = []

    def cb(buf: bytes, offset: int, status: int, err: int) -> int:
        chunks.append((offset, len(buf), status, bytes(buf)))
        return 0

    for off, n in [(0, 32768), (2048, 8192), (4096, 16384), (6000, 9000)]:
        chunks.clear()
        h.pread_structured(n, off, cb)
        got = bytearray(n)
        for o, length, status, data in chunks:
            got[o - off : o - off + length] = data
            if status == nbd.READ_HOLE:
                assert not any(expect[o : o + length])
        assert bytes(got) == expect[off : off + n]
        assert sum(c[1] for c in chunks) == n
        holes = [c for c in chunks if c[2] == nbd.READ_HOLE]
        if off == 4096:  # [8k, 12k) is an unallocated cluster between two data clusters
            assert (8192, 4096) in [(c[0], c[1]) for c in holes]
    h.shutdown()


def _block_sizes(which: str, fmt_args: list[str], request: bool, image: Path
                 ) -> tuple[int, int]:
    """interop-qemu-block-size.sh: qemu-nbd -k SOCK [FMT] FILE (no -t); nbdsh in option
    mode, with or without asking for block sizes; the minimum INFO reports (0 when INFO
    fails) and the one GO reports; the server must exit 0 after the client leaves."""
    sock = image.parent / f"bs-{which}-{request}-{len(fmt_args)}.sock"
    argv = ([require_tool("qemu-nbd")] if which == "qemu-nbd"
            else [sys.executable, "-m", "nbdqcow", "serve"])
    proc = subprocess.Popen([*argv, "-k", str(sock), *fmt_args, str(image)],
                            env=repo_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        h = nbd.NBD()
        h.set_opt_mode(True)
        assert h.get_request_block_size()
        h.set_request_block_size(request)
        h.connect_unix(str(sock))
        try:
            h.opt_info()
            info_min = h.get_block_size(nbd.SIZE_MINIMUM)
        except nbd.Error:
            info_min = 0
        h.opt_go()
        go_min = h.get_block_size(nbd.SIZE_MINIMUM)
        h.shutdown()
        del h
        assert proc.wait(15) == 0
        return info_min, go_min
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("which", SERVERS)
def test_block_size_probed_raw(tmp_path: Path, which: str) -> None:
    img = tmp_path / "bs.raw"
    img.write_bytes(b"")
    os.truncate(img, 10 << 20)
    # probed raw: sectors when asked; INFO refused and GO at 1 when not asked
    assert _block_sizes(which, [], True, img) == (512, 512)
    assert _block_sizes(which, [], False, img) == (0, 1)
    # -f raw: byte granularity either way
    assert _block_sizes(which, ["-f", "raw"], True, img) == (1, 1)
    assert _block_sizes(which, ["-f", "raw"], False, img) == (1, 1)


def test_unaligned_writes_to_probed_raw_after_go_at_one(tmp_path: Path) -> None:
    """A client told minimum 1 may write single bytes anywhere, block 0 included; the
    probing guard still refuses a first sector that would probe as another format."""
    img = tmp_path / "u.raw"
    img.write_bytes(b"")
    os.truncate(img, 1 << 20)
    h = activated("nbdqcow", str(img), set_request_block_size=False)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    h.pwrite(b"x", 100)
    h.pwrite(b"yz", 5000)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"QFI\xfb\0\0\0\3", 0)
    assert err.value.errnum == 1  # EPERM
    assert h.pread(4, 99) == b"\0x\0\0" and h.pread(4, 4999) == b"\0yz\0"
    h.shutdown()
    data = img.read_bytes()
    assert data[100:101] == b"x" and data[5000:5002] == b"yz" and data[:4] == bytes(4)


def _export_flags(sock_path: Path, structured: bool) -> int:
    """Transmission flags as NBD_OPT_GO reports them, on a raw socket."""
    import socket
    import struct

    def take(s: socket.socket, n: int) -> bytes:
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            assert c, "server closed"
            b += c
        return b

    def option(s: socket.socket, code: int, data: bytes) -> list[tuple[int, bytes]]:
        s.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)
        out = []
        while True:
            _, _, rtype, length = struct.unpack(">QIII", take(s, 20))
            out.append((rtype, take(s, length)))
            if rtype != 3:
                return out

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        take(s, 18)
        s.sendall(struct.pack(">I", 3))
        if structured:
            assert option(s, 8, b"")[-1][0] == 1
        for rtype, payload in option(s, 7, struct.pack(">IH", 0, 0)):
            if rtype == 3 and payload[:2] == b"\0\0":
                return int(struct.unpack(">H", payload[10:12])[0])
    raise AssertionError("no NBD_INFO_EXPORT")


@pytest.mark.parametrize("which", SERVERS)
def test_no_df_flag_before_structured_replies(
        tmp_path: Path, which: str, nbdqcow_server, qemu_nbd_server) -> None:  # type: ignore[no-untyped-def]
    """The spec: SEND_DF MUST be clear when structured replies are not negotiated."""
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 16))
    start = nbdqcow_server if which == "nbdqcow" else qemu_nbd_server
    srv = start(img, "-f", "raw", "-t")
    assert srv.socket is not None
    assert not _export_flags(srv.socket, structured=False) & 0x80
    assert _export_flags(srv.socket, structured=True) & 0x80


def _map_over_nbd(uri: str, probe: bool) -> str:
    fmt = [] if probe else ["-f", "raw"]
    res = subprocess.run(["qemu-img", "map", *fmt, "--output=json", uri],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr  # qemu's client asserts on a misaligned size
    return res.stdout


@pytest.mark.parametrize("probed", [False, True])
def test_unaligned_raw_file_is_served_in_whole_sectors(
        tmp_path: Path, probed: bool, nbdqcow_server, qemu_nbd_server) -> None:  # type: ignore[no-untyped-def]
    """qemu-iotests 241: a 1000-byte raw file is a 1024-byte export (qemu counts whole
    sectors; the spec: the size SHOULD be a multiple of the minimum block size, which is
    512 for a probed raw image) and qemu's client maps it without failing."""
    require_tool("qemu-img")
    img = tmp_path / "img"
    img.write_bytes(b"0" * 1000)
    args = [] if probed else ["-f", "raw"]
    ours = nbdqcow_server(img, "-t", *args)
    ref = qemu_nbd_server(img, "-t", *args)
    h = nbd.NBD()
    h.connect_uri(ours.uri)
    assert h.get_size() == 1024
    assert h.get_block_size(nbd.SIZE_MINIMUM) == (512 if probed else 1)
    assert h.pread(1024, 0) == b"0" * 1000 + bytes(24)
    h.shutdown()
    for probe in (False, True):
        assert _map_over_nbd(ours.uri, probe) == _map_over_nbd(ref.uri, probe)


def test_unaligned_raw_file_info_and_map_as_qemu_img(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = tmp_path / "img"
    img.write_bytes(b"0" * 1000)
    for cmd in (["info", "--output=json"], ["map", "--output=json", "-f", "raw"]):
        ref = subprocess.run(["qemu-img", *cmd, str(img)], capture_output=True, text=True)
        ours = subprocess.run([sys.executable, "-m", "nbdqcow", *cmd, str(img)],
                              capture_output=True, text=True, env=repo_env())
        assert ours.returncode == 0, ours.stderr
        if cmd[0] == "info":  # disk size depends on the file system: compare the rest
            import json
            a, b = json.loads(ours.stdout), json.loads(ref.stdout)
            assert a["virtual-size"] == b["virtual-size"] == 1024
        else:
            assert ours.stdout == ref.stdout


def _backed_pair(d: Path) -> tuple[Path, Path]:
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 0 3M", "-c", "write -z 3M 1M",
         "-c", "write -P 0x11 6M 512k", str(base))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top),
         "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 64k", str(top))
    return base, top


def _raw(img: Path) -> bytes:
    out = img.with_suffix(".raw")
    qemu("qemu-img", "convert", "-O", "raw", str(img), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _top_map(top: Path) -> list[tuple[int, int, int, bool, bool]]:
    import json
    res = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)],
                         capture_output=True, text=True, check=True)
    return [(e["start"], e["length"], e["depth"], e["zero"], e["data"])
            for e in json.loads(res.stdout)]


def test_cache_copies_backing_data_up_like_qemu_nbd(tmp_path: Path) -> None:
    """NBD_CMD_CACHE on a writable export copies what the backing file provides into the
    image (qemu-nbd's copy-on-read): afterwards qemu-img map shows the cached range at
    depth 0, the same runs as qemu-nbd leaves, and the data did not change."""
    require_tool("qemu-img")
    maps = {}
    for which in SERVERS:
        d = tmp_path / which
        d.mkdir()
        base, top = _backed_pair(d)
        before = _raw(top)
        h = activated(which, "-f", "qcow2", str(top))
        h.cache(6 << 20, 0)
        assert h.pread(8 << 20, 0) == before
        h.shutdown()
        del h
        assert _raw(top) == before
        maps[which] = _top_map(top)
        qemu("qemu-img", "check", str(top))
    # the same allocation depth everywhere; zero ranges are zero clusters with nbdqcow
    # (qemu-nbd 7.2 writes clusters of zeros), so zero/data flags are not compared
    depths = {which: merge_depths(m) for which, m in maps.items()}
    assert depths["nbdqcow"] == depths["qemu-nbd"] == [(0, 6 << 20, 0), (6 << 20, 2 << 20, 1)]


def merge_depths(m: list[tuple[int, int, int, bool, bool]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for start, length, depth, *_ in m:
        if out and out[-1][2] == depth and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, depth)
        else:
            out.append((start, length, depth))
    return out


def test_cache_on_read_only_export_changes_nothing(tmp_path: Path) -> None:
    require_tool("qemu-img")
    _, top = _backed_pair(tmp_path)
    before = _top_map(top)
    h = activated("nbdqcow", "-r", "-f", "qcow2", str(top))
    h.cache(8 << 20, 0)  # qemu-nbd 7.2 answers EPERM here (and logs a refcount error)
    h.shutdown()
    assert _top_map(top) == before


def _pidfile_served(which: str, pidfile: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start the server as libnbd's info/ tests do (-t --socket --pid-file, in the
    background) and wait for the pid file only: then the server must already answer,
    and the file must hold the whole pid."""
    argv = ([require_tool("qemu-nbd")] if which == "qemu-nbd"
            else [sys.executable, "-m", "nbdqcow", "serve"])
    proc = subprocess.Popen([*argv, "-t", "--pid-file", str(pidfile), *args], env=repo_env(),
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    if which == "nbdqcow":  # qemu-nbd creates the file first and writes the pid after
        assert pidfile.read_text().strip() == str(proc.pid)
    return proc


def _nbdinfo(*args: str) -> str:
    res = subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("which", SERVERS)
def test_info_scripts_wait_for_the_pid_file(tmp_path: Path, which: str) -> None:
    """libnbd info/info-list-qemu.sh, info-description-qemu.sh and
    info-map-qemu-allocation-depth.sh: a 4-deep chain served with -A."""
    require_tool("nbdinfo")
    img = tmp_path / "img"
    img.write_bytes(b"")
    os.truncate(img, 1 << 20)
    sock = tmp_path / "a.sock"
    proc = _pidfile_served(which, tmp_path / "a.pid", "--socket", str(sock), "-x", "hello",
                           "-D", "world", str(img))
    try:
        for uri in (f"nbd+unix://?socket={sock}", f"nbd+unix:///hello?socket={sock}"):
            out = _nbdinfo(uri, "--list")
            assert 'export="hello":' in out and "description: world" in out
            assert "export-size: 1048576" in out
    finally:
        proc.terminate()
        proc.wait(30)
    files = [tmp_path / f"f{i}.qcow2" for i in range(1, 5)]
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(files[0]), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "w 0 4M", str(files[0]))
    layers = (["w 2M 4M"], ["w 1M 2M", "w 5M 2M"], ["w 1M 1M", "w 5M 1M"])
    for below, above, writes in zip(files[:-1], files[1:], layers, strict=True):
        qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(below), "-F", "qcow2",
             str(above))
        qemu("qemu-io", "-f", "qcow2", *[a for w in writes for a in ("-c", w)], str(above))
    sock = tmp_path / "b.sock"
    proc = _pidfile_served(which, tmp_path / "b.pid", "--socket", str(sock), "-f", "qcow2",
                           "-A", str(files[3]))
    try:
        out = _nbdinfo("--map=qemu:allocation-depth", f"nbd+unix://?socket={sock}")
    finally:
        proc.terminate()
        proc.wait(30)
    rows = [tuple(int(x) for x in line.split()[:3]) for line in out.splitlines()]
    M = 1 << 20
    assert rows == [(0, M, 4), (M, M, 1), (2 * M, M, 2), (3 * M, 2 * M, 3), (5 * M, M, 1),
                    (6 * M, M, 2), (7 * M, M, 0)], out
