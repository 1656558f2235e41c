"""Image specifications (issue 10 item 1): ``json:`` filenames and ``--image-opts``,
side by side with qemu-nbd and qemu-img on the same specifications -- the command lines
of oVirt imageio (raw with offset/size, qcow2 with ``"backing": null``), null-co as test
suites use it, and qemu's one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tooling import ServerFactory, repo_env, require_tool

from nbdqcow.nbdclient.sync import SyncClient

MiB = 1 << 20


def run(*argv: str, cwd: Path | None = None) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, cwd=cwd)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"
    return res.stdout


def nbdqcow(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdqcow", *argv], capture_output=True,
                          text=True, timeout=60, env=repo_env(), cwd=cwd)


def nbdqcow_nbd(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from nbdqcow.cli import qemu_nbd_main; sys.exit(qemu_nbd_main())"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, timeout=60, env=repo_env())


def qemu_nbd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-nbd"), *argv], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A raw disk holding a 1 MiB partition-like window at 1 MiB (oVirt's layout)."""
    path = tmp_path / "disk,1.raw"  # a comma: ,, escaping in --image-opts
    data = bytearray(4 * MiB)
    for i in range(0, len(data), 4096):
        data[i : i + 8] = i.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", "-c", "write -P 0x42 3M 64k",
        str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x43 512k 64k", str(top))
    return top


def _esc(path: Path) -> str:
    return str(path).replace(",", ",,")


def _view(uri: str, *, read: bool = True) -> tuple[int, bytes, str]:
    """What a client sees: size, every byte, and nbdinfo's allocation map."""
    with SyncClient(uri) as c:
        size = c.size
        data = b"".join(bytes(c.pread(o, min(MiB, size - o))) for o in range(0, size, MiB)) \
            if read else b""
    nbdmap = subprocess.run([require_tool("nbdinfo"), "--map", uri], capture_output=True,
                            text=True, timeout=60, env=repo_env()).stdout
    return size, data, nbdmap


def _both(nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory, image: str,
          *args: str) -> tuple[tuple[int, bytes, str], tuple[int, bytes, str]]:
    ours = nbdqcow_server(image, "-t", "-r", *args)
    theirs = qemu_nbd_server(image, "-t", "-r", *args)
    return _view(ours.uri), _view(theirs.uri)


def test_ovirt_raw_window_json_and_image_opts(disk: Path, nbdqcow_server: ServerFactory,
                                              qemu_nbd_server: ServerFactory) -> None:
    spec = json.dumps({"driver": "raw", "offset": MiB, "size": MiB,
                       "file": {"driver": "file", "filename": str(disk)}})
    ours, theirs = _both(nbdqcow_server, qemu_nbd_server, "json:" + spec)
    assert ours == theirs
    assert ours[0] == MiB and ours[1] == disk.read_bytes()[MiB : 2 * MiB]
    opts = f"driver=raw,offset=1M,size=1M,file.driver=file,file.filename={_esc(disk)}"
    assert _both(nbdqcow_server, qemu_nbd_server, opts, "--image-opts") == (ours, theirs)


def test_raw_window_writes_land_in_the_window(disk: Path, nbdqcow_server: ServerFactory
                                              ) -> None:
    before = disk.read_bytes()
    spec = json.dumps({"driver": "raw", "offset": MiB, "size": MiB,
                       "file": {"driver": "file", "filename": str(disk)}})
    srv = nbdqcow_server("json:" + spec, "-t")
    with SyncClient(srv.uri) as c:
        c.pwrite(b"\xee" * 4096, MiB - 4096)
    srv.stop()
    after = disk.read_bytes()
    assert after[2 * MiB - 4096 : 2 * MiB] == b"\xee" * 4096
    assert after[: 2 * MiB - 4096] == before[: 2 * MiB - 4096]
    assert after[2 * MiB :] == before[2 * MiB :]
    assert "WARNING" not in srv.log.read_text()  # the format was named: no probing


@pytest.mark.parametrize("backing", ["null", "default", "raw-spec"])
def test_qcow2_backing_option_like_qemu_nbd(overlay: Path, backing: str,
                                            nbdqcow_server: ServerFactory,
                                            qemu_nbd_server: ServerFactory) -> None:
    spec: dict[str, object] = {"driver": "qcow2",
                               "file": {"driver": "file", "filename": str(overlay)}}
    if backing == "null":
        spec["backing"] = None
    elif backing == "raw-spec":  # another file as the backing file, by specification
        other = overlay.parent / "other.raw"
        other.write_bytes(b"\x51" * (4 * MiB))
        spec["backing"] = {"driver": "raw", "file": {"driver": "file", "filename": str(other)}}
    ours, theirs = _both(nbdqcow_server, qemu_nbd_server, "json:" + json.dumps(spec))
    assert ours == theirs
    data = ours[1]
    assert data[512 << 10 : (512 << 10) + 65536] == b"\x43" * 65536  # the overlay's own
    below = {"null": 0, "default": 0x41, "raw-spec": 0x51}[backing]
    assert data[:4096] == bytes([below]) * 4096


def test_qcow2_backing_null_image_opts(overlay: Path, nbdqcow_server: ServerFactory,
                                       qemu_nbd_server: ServerFactory) -> None:
    opts = f"driver=qcow2,backing=,file.driver=file,file.filename={_esc(overlay)}"
    ours, theirs = _both(nbdqcow_server, qemu_nbd_server, opts, "--image-opts")
    assert ours == theirs and ours[1][:4096] == bytes(4096)


@pytest.mark.parametrize("opts", ["driver=null-co,size=8M",
                                  "driver=null-co,size=8M,read-zeroes=on",
                                  "driver=raw,file.driver=null-co,file.size=2M"])
def test_null_co_like_qemu_nbd(opts: str, nbdqcow_server: ServerFactory,
                               qemu_nbd_server: ServerFactory) -> None:
    ours = nbdqcow_server(opts, "-t", "--image-opts")
    theirs = qemu_nbd_server(opts, "-t", "--image-opts")
    (osize, _, omap), (tsize, _, tmap) = _view(ours.uri, read=False), _view(theirs.uri,
                                                                             read=False)
    assert (osize, omap) == (tsize, tmap)
    with SyncClient(ours.uri) as c:
        c.pwrite(b"x" * 4096, 0)  # accepted and dropped
        assert bytes(c.pread(0, 4096)) == bytes(4096)


def _reason(stderr: str) -> str:
    """The reason after qemu-nbd's "Failed to blk_new_open 'X': " or our "Could not
    open 'X': " (the first "': ")."""
    line = stderr.strip().splitlines()[0]
    return line.split("': ", 1)[1] if "': " in line else line.split(": ", 1)[1]


@pytest.mark.parametrize("argv", [
    ["--image-opts", "driver=foo"],
    ["json:{\"driver\": \"foo\"}"],
    ["--image-opts", "driver=raw,bar=1,file.filename=DISK"],
    ["--image-opts", "driver=raw,file.driver=file,file.filename=DISK,file.bar=2"],
    ["--image-opts", "driver=null-co,size=1k,x=1"],
    ["--image-opts", "driver=raw,file.filename=/nonexistent/x.raw"],
    ["--image-opts", "driver=raw"],
    ["--image-opts", "driver=file"],
    ["--image-opts", "foo=bar"],
    ["--image-opts", "driver=raw,file.filename=DISK,read-only=on"],
    ["--image-opts", "driver=raw,file.filename=DISK,file.locking=maybe"],
    ["--image-opts", "driver=raw,offset=8M,file.filename=DISK"],
    ["--image-opts", "driver=raw,offset=1M,size=4M,file.filename=DISK"],
    ["--image-opts", "driver=raw,size=1000,file.filename=DISK"],
    ["--image-opts", "driver=qcow2,file=DISK"],
    ["--image-opts", "driver=qcow2,file.filename=TOP,backing.driver=foo"],
    ["json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"DISK\"}}", "-f",
     "qcow2"],
    ["-f", "raw", "--image-opts", "driver=raw,file.filename=DISK"],
])
def test_refusals_one_line_like_qemu_nbd(argv: list[str], disk: Path, overlay: Path,
                                         tmp_path: Path) -> None:
    argv = [a.replace("DISK", _esc(disk) if "--image-opts" in argv else str(disk))
            .replace("TOP", str(overlay)) for a in argv]
    sock = ["-k", str(tmp_path / "s.sock")]
    ours, theirs = nbdqcow_nbd(*sock, *argv), qemu_nbd(*sock, *argv)
    assert theirs.returncode == 1, theirs.stderr
    assert ours.returncode == 1, ours.stderr
    assert "Traceback" not in ours.stderr
    assert len(ours.stderr.strip().splitlines()) == 1, ours.stderr
    assert _reason(ours.stderr) == _reason(theirs.stderr), (ours.stderr, theirs.stderr)


def test_commands_take_json_and_image_opts_like_qemu_img(overlay: Path, disk: Path) -> None:
    top_json = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file",
                                                                 "filename": str(overlay)}})
    top_opts = f"driver=qcow2,file.filename={_esc(overlay)}"
    window = "json:" + json.dumps({"driver": "raw", "offset": MiB, "size": 2 * MiB,
                                   "file": {"driver": "file", "filename": str(disk)}})
    for args in (["info", "--output=json", top_json],
                 ["info", "--output=json", "--image-opts", top_opts],
                 ["map", "--output=json", top_json],
                 ["map", "--output=json", "--image-opts", top_opts],
                 ["map", "--output=json", window],
                 ["check", "--output=json", top_json],
                 ["check", "--output=json", "--image-opts", top_opts]):
        ours = nbdqcow(*args)
        theirs = subprocess.run([require_tool("qemu-img"), *args], capture_output=True,
                                text=True, timeout=60)
        assert ours.returncode == theirs.returncode == 0, (args, ours.stderr, theirs.stderr)
        assert json.loads(ours.stdout) == json.loads(theirs.stdout), args
    # snapshots through a specification
    assert nbdqcow("snapshot", "-c", "s1", "--image-opts", top_opts).returncode == 0
    assert "s1" in run("qemu-img", "snapshot", "-l", str(overlay))
    # and bitmaps
    assert nbdqcow("bitmap", "--add", "--image-opts", top_opts, "b1").returncode == 0
    assert '"name": "b1"' in run("qemu-img", "info", "--output=json", str(overlay))
    # a command that works on the file itself refuses what it cannot apply
    bad = nbdqcow("check", window)
    assert bad.returncode == 1 and "offset" in bad.stderr and "Traceback" not in bad.stderr


def test_backing_spec_attaches_to_an_image_without_one(tmp_path: Path,
                                                       nbdqcow_server: ServerFactory,
                                                       qemu_nbd_server: ServerFactory) -> None:
    """qemu uses a ``backing`` specification even when the header names no backing file."""
    img = tmp_path / "alone.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(img))
    fill = tmp_path / "fill.raw"
    fill.write_bytes(b"\x77" * (2 * MiB))
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)},
            "backing": {"driver": "raw", "file": {"driver": "file", "filename": str(fill)}}}
    ours, theirs = _both(nbdqcow_server, qemu_nbd_server, "json:" + json.dumps(spec))
    assert ours == theirs
    assert ours[1][:16] == b"\x77" * 16 and ours[1][MiB : MiB + 16] == b"\x61" * 16


OVIRT = ["--persistent", "--shared=8", "--cache=none", "--aio=native", "--discard=unmap",
         "--detect-zeroes=unmap", "--allocation-depth"]


def _nbdinfo(uri: str, *args: str) -> str:
    out = subprocess.run([require_tool("nbdinfo"), *args, uri], capture_output=True,
                         text=True, timeout=60, env=repo_env())
    assert out.returncode == 0, out.stderr
    return "\n".join(line for line in out.stdout.splitlines()
                     if "uri:" not in line and "content:" not in line)


def test_ovirt_imageio_command_line_like_qemu_nbd(tmp_path: Path, disk: Path,
                                                  nbdqcow_server: ServerFactory,
                                                  qemu_nbd_server: ServerFactory) -> None:
    """oVirt imageio's qemu-nbd command lines, verbatim: a qcow2 overlay with
    ``"backing": null`` and a dirty bitmap, and a raw window; nbdinfo sees the same."""
    views = []
    for label, factory in (("nbdqcow", nbdqcow_server), ("qemu-nbd", qemu_nbd_server)):
        img = tmp_path / f"{label}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M")
        run("qemu-img", "bitmap", "--add", str(img), "B")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 5M 4k",
            str(img))
        spec = json.dumps({"driver": "qcow2", "backing": None,
                           "file": {"driver": "file", "filename": str(img)}})
        srv = factory("json:" + spec, *OVIRT, "--bitmap", "B")
        window = json.dumps({"driver": "raw", "offset": MiB, "size": 2 * MiB,
                             "file": {"driver": "file", "filename": str(disk)}})
        raw = factory("json:" + window, *OVIRT)
        views.append((_nbdinfo(srv.uri), _nbdinfo(srv.uri, "--map=qemu:allocation-depth"),
                      _nbdinfo(srv.uri, "--map=qemu:dirty-bitmap:B"),
                      _nbdinfo(raw.uri), _nbdinfo(raw.uri, "--map")))
        srv.stop()
        raw.stop()
    assert views[0] == views[1]
    assert "qemu:dirty-bitmap:B" in views[0][0]


def test_convert_from_a_specification_like_qemu_img(tmp_path: Path, disk: Path,
                                                    overlay: Path) -> None:
    window = f"driver=raw,offset=1M,size=2M,file.filename={_esc(disk)}"
    top_null = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                     "file": {"driver": "file", "filename": str(overlay)}})
    for n, args in enumerate((["--image-opts", window], [top_null])):
        ours, theirs = tmp_path / f"ours{n}.raw", tmp_path / f"theirs{n}.raw"
        r = nbdqcow("convert", "-O", "raw", *args, str(ours))
        assert r.returncode == 0, r.stderr
        run("qemu-img", "convert", "-O", "raw", *args, str(theirs))
        assert ours.read_bytes() == theirs.read_bytes(), args


@pytest.mark.parametrize("spec", [
    ["json:{\"driver\":\"raw\",\"offset\":1048576,\"size\":1048576,"
     "\"file\":{\"driver\":\"file\",\"filename\":\"DISK\"}}"],
    ["--image-opts", "driver=raw,offset=1M,file.filename=DISK"],
    ["--image-opts", "driver=null-co,size=1M"],
    ["--image-opts", "driver=raw,file.driver=null-co,file.size=1M"],
])
@pytest.mark.parametrize("output", ["json", "human"])
def test_info_of_a_stack_like_qemu_img(spec: list[str], output: str, disk: Path) -> None:
    """Stacks that are more than a format over a file are described from the open stack,
    named by qemu's canonical json: filename."""
    args = [f"--output={output}",
            *[a.replace("DISK", _esc(disk) if "--image-opts" in spec else str(disk))
              for a in spec]]
    ours = nbdqcow("info", *args)
    theirs = subprocess.run([require_tool("qemu-img"), "info", *args], capture_output=True,
                            text=True, timeout=60)
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout
