"""Probing like qemu (issue 8 item 2), side by side with qemu-img and qemu-nbd.

A raw image whose format was probed must never start to look like another format: a
write to block 0 that would make it probe as one is refused with EPERM, qemu-nbd's
warning is printed at start, and 512 bytes are advertised as the minimum block size.
``-f raw`` lifts all of it.  Which first sectors count as "another format" is compared
header by header with qemu-nbd itself.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from tooling import require_tool

from nbdqcow.errors import RemoteError
from nbdqcow.image import probe_file
from nbdqcow.image.probe import probe_bytes
from nbdqcow.nbdclient.sync import SyncClient

EPERM = 1
SECTOR = 512


def _bochs() -> bytes:
    return (b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
            + b"Growing".ljust(16, b"\0") + struct.pack("<I", 0x20000))


#: first sectors: each other format's signature, and near misses qemu takes as raw
HEADERS: dict[str, bytes] = {
    "qcow2 v3": b"QFI\xfb" + struct.pack(">I", 3),
    "qcow2 v0": b"QFI\xfb" + struct.pack(">I", 0),
    "qcow v1": b"QFI\xfb" + struct.pack(">I", 1),
    "qcow2 v4": b"QFI\xfb" + struct.pack(">I", 4),
    "qed": b"QED\x00",
    "vdi": bytes(64) + struct.pack("<I", 0xBEDA107F),
    "vmdk4": b"KDMV",
    "vmdk3": b"COWD",
    "vmdk descriptor": b"# Disk DescriptorFile\nversion=1\n",
    "vmdk descriptor crlf": b"#x\r\nversion=2\r\n",
    "vmdk descriptor v4": b"version=4\n",
    "vmdk descriptor late": b"foo\nversion=1\n",
    "vpc": b"conectix",
    "vhdx": b"vhdxfile",
    "parallels": b"WithoutFreeSpace" + struct.pack("<I", 2),
    "parallels v3": b"WithoutFreeSpace" + struct.pack("<I", 3),
    "bochs": _bochs(),
    "cloop": b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
             b"/dev/cloop $1\n",
    "luks1": b"LUKS\xba\xbe" + struct.pack(">H", 1),
    "luks2": b"LUKS\xba\xbe" + struct.pack(">H", 2),
    "text": b"hello, world\n",
}


def _sector(head: bytes) -> bytes:
    return head + bytes(SECTOR - len(head))


def _qemu_img_format(path: Path) -> str | None:
    """The format qemu-img probes (None when it probes a format it then fails to open)."""
    r = subprocess.run([require_tool("qemu-img"), "info", "--output=json", str(path)],
                       capture_output=True, text=True)
    return json.loads(r.stdout)["format"] if r.returncode == 0 else None


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_probe_names_raw_exactly_where_qemu_img_does(tmp_path: Path, name: str) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(_sector(HEADERS[name]) + bytes(64 << 10))
    theirs = _qemu_img_format(path)
    ours = probe_file(str(path))
    if theirs == "raw":
        assert ours == "raw", name
    else:  # qemu probed another format (and could not open this stub of it)
        assert ours != "raw", name


def test_probe_unit_cases() -> None:
    assert probe_bytes(_sector(HEADERS["qcow2 v3"])) == "qcow2"
    assert probe_bytes(_sector(HEADERS["qcow2 v4"])) == "qcow2"
    assert probe_bytes(_sector(HEADERS["qcow v1"])) == "qcow"
    assert probe_bytes(_sector(HEADERS["qcow2 v0"])) == "raw"
    assert probe_bytes(b"") == "raw"
    assert probe_bytes(_sector(b"hello"), "disk.dmg") == "dmg"


def _write_verdict(c: SyncClient, data: bytes, offset: int = 0) -> str:
    try:
        c.pwrite(data, offset)
    except RemoteError as e:
        return "EPERM" if e.code == EPERM else f"error {e.code}"
    return "ok"


def _raw_image(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(1 << 20))
    return path


def test_block0_guard_header_by_header_like_qemu_nbd(tmp_path: Path, nbdqcow_server,
                                                     qemu_nbd_server) -> None:
    verdicts: dict[str, dict[str, str]] = {}
    for label, factory in (("nbdqcow", nbdqcow_server), ("qemu-nbd", qemu_nbd_server)):
        img = _raw_image(tmp_path, f"{label}.raw")
        srv = factory(img, "-t")
        with SyncClient(srv.uri) as c:
            got = verdicts[label] = {}
            for name, head in HEADERS.items():
                got[name] = _write_verdict(c, _sector(head))
                # the same header written by a small unaligned write into block 0
                got[name + " (unaligned)"] = _write_verdict(c, head[:68] or b"\0", 0)
                c.pwrite(bytes(SECTOR), 0)
            got["past block 0"] = _write_verdict(c, _sector(HEADERS["qcow2 v3"]), SECTOR)
        srv.stop()
    assert verdicts["nbdqcow"] == verdicts["qemu-nbd"]
    assert verdicts["nbdqcow"]["qcow2 v3"] == "EPERM"
    assert verdicts["nbdqcow"]["text"] == "ok"


def test_probed_raw_refuses_qcow2_header_warns_and_stays_raw(tmp_path: Path, nbdqcow_server,
                                                            qemu_nbd_server) -> None:
    evil = _sector(b"QFI\xfb" + struct.pack(">I", 3) + b"\0" * 8 + struct.pack(">I", 16))
    for label, factory in (("nbdqcow", nbdqcow_server), ("qemu-nbd", qemu_nbd_server)):
        img = _raw_image(tmp_path, f"{label}.raw")
        srv = factory(img, "-t")
        with SyncClient(srv.uri) as c:
            assert c.client.block_sizes is not None
            assert c.client.block_sizes.minimum == SECTOR, label
            assert _write_verdict(c, evil) == "EPERM", label
            assert _write_verdict(c, _sector(b"boot sector")) == "ok", label
            assert _write_verdict(c, b"BOOT", 0) == "ok", label  # unaligned, still raw
        srv.stop()
        log = srv.log.read_text()
        assert ("WARNING: Image format was not specified for '" + str(img)
                + "' and probing guessed raw.") in log, (label, log)
        assert "write operations on block 0 will be restricted" in log
        assert img.read_bytes()[:11] == b"BOOT sector"
        # restarted: still raw, for qemu and for us
        assert _qemu_img_format(img) == "raw" and probe_file(str(img)) == "raw"


def test_explicit_raw_and_read_only(tmp_path: Path, nbdqcow_server, qemu_nbd_server) -> None:
    header = _sector(HEADERS["qcow2 v3"])
    for label, factory in (("nbdqcow", nbdqcow_server), ("qemu-nbd", qemu_nbd_server)):
        img = _raw_image(tmp_path, f"{label}.raw")
        srv = factory(img, "-t", "-f", "raw")
        with SyncClient(srv.uri) as c:
            assert c.client.block_sizes is not None
            assert c.client.block_sizes.minimum == 1, label
            assert _write_verdict(c, header) == "ok", label
        srv.stop()
        assert "WARNING" not in srv.log.read_text(), label
        assert img.read_bytes()[:8] == header[:8]
        # read-only and probed: no warning (nothing can be written), as qemu-nbd
        other = _raw_image(tmp_path, f"{label}-ro.raw")
        ro = factory(other, "-t", "-r")
        with SyncClient(ro.uri) as c:
            assert c.pread(0, SECTOR) == bytes(SECTOR)
        ro.stop()
        assert "WARNING" not in ro.log.read_text(), label
