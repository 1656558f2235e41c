"""qemu's image locks: the bytes each opener takes, the conflicts, the messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdqcow.block import locking as lk
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import PERM_ALL, Access, ImageLocked, LockMode, Perm
from nbdqcow.errors import ImageOpenError

R, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE

# (what opens the file, the bytes qemu 7.2 locks for it: strace / /proc/locks)
QEMU_72 = [
    ("qcow2 rw (qemu-nbd, qemu-io, check -r)", Access(write=True).image("qcow2"),
     [100, 101, 103, 201, 203]),
    ("qcow2 ro (qemu-nbd -r, map, check)", Access().image("qcow2"), [100, 201, 203]),
    ("qcow2 info", Access(io=False).image("qcow2"), [201, 203]),
    ("qcow2 map -U", Access(force_share=True).image("qcow2"), [100]),
    ("qcow2 info -U", Access(io=False, force_share=True).image("qcow2"), []),
    ("raw qemu-nbd", Access(write=True, shared=PERM_ALL & ~RS).image("raw"), [100, 101, 203]),
    ("raw qemu-nbd -r", Access(shared=PERM_ALL & ~RS).image("raw"), [100, 203]),
    ("raw qemu-io", Access(write=True).image("raw"), [100, 101]),
    ("raw qemu-img map", Access().image("raw"), [100]),
    ("raw info", Access(io=False).image("raw"), []),
    ("data file rw", Access(write=True).data_file(), [100, 101, 103, 203]),
    ("data file ro", Access().data_file(), [100, 203]),
    ("raw backing", Access(write=True).backing().image("raw"), [100]),
    ("qcow2 backing", Access(write=True).backing().image("qcow2"), [100, 201, 203]),
    ("create", lk.create_mode(), [101, 103, 203]),
]


@pytest.mark.parametrize("what,mode,expected", QEMU_72, ids=[c[0] for c in QEMU_72])
def test_lock_bytes_match_qemu(what: str, mode: LockMode | None, expected: list[int]) -> None:
    assert mode is not None
    assert sorted(mode.lock_bytes()) == expected


def test_tests_and_messages_in_qemu_order() -> None:
    mode = Access(write=True).image("qcow2")
    assert mode is not None
    assert mode.tests() == [
        (200, 'Failed to get "consistent read" lock'),
        (201, 'Failed to get "write" lock'),
        (203, 'Failed to get "resize" lock'),
        (101, 'Failed to get shared "write" lock'),
        (103, 'Failed to get shared "resize" lock'),
    ]


def test_locking_off_and_force_share_rules() -> None:
    assert Access(write=True, enabled=False).image("qcow2") is None
    assert lk.create_mode(enabled=False) is None
    with pytest.raises(ImageOpenError, match="force-share=on can only be used with read-only"):
        Access(write=True, force_share=True)
    assert lk.parse_locking("off") is False
    assert lk.parse_locking("on") is True
    with pytest.raises(ImageOpenError, match="locking"):
        lk.parse_locking("maybe")


@pytest.fixture
def img(tmp_path: Path) -> str:
    p = tmp_path / "img.qcow2"
    p.write_bytes(bytes(4096))
    return str(p)


def _free(path: str, byte: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return lk.byte_is_free(fd, byte)
    finally:
        os.close(fd)


def _open(path: str, access: Access, fmt: str = "qcow2") -> HostFile:
    return HostFile(path, writable=access.write, lock=access.image(fmt))


def test_two_writers_exclude_each_other(img: str) -> None:
    a = _open(img, Access(write=True))
    try:
        with pytest.raises(ImageLocked) as ei:
            _open(img, Access(write=True))
        msg = str(ei.value)
        assert msg.splitlines()[:2] == [
            'Failed to get "write" lock', f"Is another process using the image [{img}]?"]
        assert ei.value.path == img
    finally:
        a.close()
    _open(img, Access(write=True)).close()  # released at close


def test_reader_refused_by_writer_and_writer_by_reader(img: str) -> None:
    w = _open(img, Access(write=True))
    try:
        with pytest.raises(ImageLocked, match='Failed to get shared "write" lock'):
            _open(img, Access())
        with pytest.raises(ImageLocked, match='Failed to get shared "write" lock'):
            _open(img, Access(io=False))  # info
        _open(img, Access(force_share=True)).close()  # -U
        _open(img, Access(io=False, force_share=True)).close()
    finally:
        w.close()
    r = _open(img, Access())
    try:
        _open(img, Access()).close()  # readers coexist
        with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
            _open(img, Access(write=True))
    finally:
        r.close()


def test_failed_open_leaves_no_lock(img: str) -> None:
    w = _open(img, Access(write=True))
    try:
        with pytest.raises(ImageLocked):
            _open(img, Access())
    finally:
        w.close()
    assert all(_free(img, b) for b in (100, 101, 103, 200, 201, 203))


def test_backing_reader_does_not_block_a_raw_writer(img: str) -> None:
    """qemu: the backing file of a running image shares everything (a raw one)."""
    b = _open(img, Access(write=True).backing(), "raw")
    try:
        _open(img, Access(write=True), "raw").close()
    finally:
        b.close()


def test_holder_is_named(img: str) -> None:
    code = ("import sys, time\n"
            "from nbdqcow.block.hostfile import HostFile\n"
            "from nbdqcow.block.locking import Access\n"
            f"f = HostFile({img!r}, True, lock=Access(write=True).image('qcow2'))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        with pytest.raises(ImageLocked) as ei:
            _open(img, Access(write=True))
        assert f"(pid {p.pid})" in str(ei.value)
        assert any(f"pid {p.pid}" in h for h in ei.value.holders)
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)


def test_fdinfo_lock_lines_are_matched_by_file_and_byte(img: str) -> None:
    st = os.stat(img)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    text = (f"pos:\t0\nflags:\t02100002\nlock:\t1: OFDLCK ADVISORY  READ -1 {dev} 100 101\n"
            f"lock:\t2: OFDLCK ADVISORY  READ -1 {dev} 203 EOF\n"
            f"lock:\t3: OFDLCK ADVISORY  READ -1 00:01:{st.st_ino + 1} 201 201\n")
    assert lk._holds(text, st, 100) and lk._holds(text, st, 101)
    assert not lk._holds(text, st, 102) and not lk._holds(text, st, 201)
    assert lk._holds(text, st, 1 << 40)  # up to the end of the file


def test_image_locked_rewrapped_from_its_text() -> None:
    e = ImageLocked("a.qcow2", 'Failed to get "write" lock', ["qemu-nbd (pid 1)"])
    again = type(e)(f"Could not open 'a.qcow2': {e}")
    assert str(again) == ("Could not open 'a.qcow2': Failed to get \"write\" lock\n"
                          "Is another process using the image [a.qcow2]?\n"
                          "The lock is held by qemu-nbd (pid 1).")
    assert str(e.within("Could not open backing file: ")).startswith(
        'Could not open backing file: Failed to get "write" lock\n')
