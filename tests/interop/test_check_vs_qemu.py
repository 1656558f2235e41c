"""``nbdqcow check`` agrees with ``qemu-img check``; its repairs satisfy qemu-img; a dirty
image opened writable by the engine comes out clean.

Damaged images are made at test time: qemu-io writes, then this file patches L2 entries,
refcounts, COPIED flags or the dirty bit with its own minimal qcow2 reader (``Raw``),
which knows nothing of nbdqcow's engine.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import imagegen
import pytest

MiB = 1024 * 1024
COPIED = 1 << 63
OFF_MASK = 0x00FFFFFFFFFFFE00

# the figures and verdicts compared with qemu-img (everything but the file name)
KEYS = ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed",
        "total-clusters", "allocated-clusters", "fragmented-clusters",
        "compressed-clusters", "image-end-offset", "format")


def nbdqcow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdqcow", *args],
                          capture_output=True, text=True, timeout=120)


def qemu_check(path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    p = imagegen.qemu_img("check", "--output=json", *extra, str(path), check=False)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def our_check(path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    p = nbdqcow("check", "--output=json", *extra, str(path))
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def figures(d: dict[str, object]) -> dict[str, object]:
    return {k: d.get(k, 0) for k in KEYS}


def assert_same_check(path: Path) -> dict[str, object]:
    want_rc, want = qemu_check(path)
    got_rc, got = our_check(path)
    assert figures(got) == figures(want)
    assert got_rc == want_rc
    return want


# --------------------------------------------------------------------------------------
# a minimal, independent qcow2 patcher
# --------------------------------------------------------------------------------------
class Raw:
    def __init__(self, path: Path) -> None:
        self.path = path
        b = path.read_bytes()[:112]
        self.version = struct.unpack_from(">I", b, 4)[0]
        self.cluster_bits = struct.unpack_from(">I", b, 20)[0]
        self.l1_offset = struct.unpack_from(">Q", b, 40)[0]
        self.rt_offset = struct.unpack_from(">Q", b, 48)[0]
        self.refcount_order = struct.unpack_from(">I", b, 96)[0] if self.version == 3 else 4
        self.cs = 1 << self.cluster_bits

    def _u64(self, off: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(off)
            return int(struct.unpack(">Q", f.read(8))[0])

    def _put(self, off: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def l2_entry_offset(self, guest: int) -> int:
        l2_bits = self.cluster_bits - 3
        l2 = self._u64(self.l1_offset + 8 * (guest >> (self.cluster_bits + l2_bits))) & OFF_MASK
        assert l2, "guest offset has no L2 table"
        return l2 + 8 * ((guest >> self.cluster_bits) & ((1 << l2_bits) - 1))

    def l2_entry(self, guest: int) -> int:
        return self._u64(self.l2_entry_offset(guest))

    def set_l2_entry(self, guest: int, value: int) -> None:
        self._put(self.l2_entry_offset(guest), struct.pack(">Q", value))

    def host_cluster(self, guest: int) -> int:
        return (self.l2_entry(guest) & OFF_MASK) >> self.cluster_bits

    def set_refcount(self, cluster: int, value: int) -> None:
        assert self.refcount_order == 4, "patcher handles 16-bit refcounts only"
        bits = self.cluster_bits + 3 - 4
        blk = self._u64(self.rt_offset + 8 * (cluster >> bits))
        self._put(blk + 2 * (cluster & ((1 << bits) - 1)), struct.pack(">H", value))

    def refcount(self, cluster: int) -> int:
        bits = self.cluster_bits + 3 - 4
        blk = self._u64(self.rt_offset + 8 * (cluster >> bits))
        with open(self.path, "rb") as f:
            f.seek(blk + 2 * (cluster & ((1 << bits) - 1)))
            return int(struct.unpack(">H", f.read(2))[0])

    def set_incompat(self, bit: int) -> None:
        feats = self._u64(72) | bit
        self._put(72, struct.pack(">Q", feats))

    def incompat(self) -> int:
        return self._u64(72)


def written(tmp_path: Path, *opts: str, name: str = "img.qcow2") -> Path:
    """A 4 MiB image with data in guest clusters 0-3, 16 and 40 (64 KiB clusters)."""
    path = tmp_path / name
    o = {"cluster_size": "65536"}
    for kv in opts:
        k, v = kv.split("=")
        o[k] = v
    imagegen.create(path, 4 * MiB, opts=o)
    imagegen.qemu_io(path, ["write -P 0x11 0 256k", "write -P 0x22 1M 64k",
                            "write -P 0x33 2560k 10k"])
    return path


# --------------------------------------------------------------------------------------
# clean images of many kinds: the figures are qemu-img's
# --------------------------------------------------------------------------------------
CLEAN_CASES = ["v2_c64k", "v3_c512", "v3_c4k", "v3_c64k", "refcount1", "refcount64",
               "ext_l2_c64k", "chain_depth2", "chain_v2", "compressed_zlib", "compressed_zstd",
               "compressed_zlib_c4k", "data_file", "data_file_raw", "snapshot",
               "lazy_refcounts", "v3_c2M"]


@pytest.mark.parametrize("name", CLEAN_CASES)
def test_clean_matrix_figures(name: str, image_factory: Callable[[str], Path]) -> None:
    want = assert_same_check(image_factory(name))
    assert want.get("corruptions", 0) == 0 and want.get("leaks", 0) == 0


def test_lazy_dirty_image_from_qemu(image_factory: Callable[[str], Path],
                                    tmp_path: Path) -> None:
    """A lazy-refcounts image qemu-io left dirty (killed): same verdict as qemu-img, and
    the engine's writable open repairs it without changing the guest data."""
    from nbdqcow.qcow2.driver import Qcow2Driver

    path = tmp_path / "img.qcow2"
    shutil.copy(image_factory("lazy_dirty"), path)
    assert_same_check(path)
    before = imagegen.convert_to_raw(path, tmp_path / "before.raw")
    Qcow2Driver.open(str(path), writable=True).close()
    assert qemu_check(path)[0] == 0
    assert not Raw(path).incompat() & 1
    assert imagegen.convert_to_raw(path, tmp_path / "after.raw") == before


def test_clean_bitmaps(tmp_path: Path, qemu_tools: None) -> None:
    path = tmp_path / "bm.qcow2"
    imagegen.create(path, 4 * MiB)
    imagegen.qemu_img("bitmap", "--add", str(path), "b0")
    imagegen.qemu_img("bitmap", "--add", "-g", "4096", str(path), "b1")
    imagegen.qemu_io(path, ["write -P 7 0 200k", "write 3M 64k"])
    want = assert_same_check(path)
    assert want.get("leaks", 0) == 0


def test_human_output_matches(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, 0)  # leak
    raw.set_refcount(raw.host_cluster(0), 0)  # too low (and a wrong COPIED flag)
    want = imagegen.qemu_img("check", str(path), check=False)
    got = nbdqcow("check", str(path))
    # qemu-img's lines exactly, then nbdqcow's own mapping line
    lines = got.stdout.splitlines(keepends=True)
    assert "".join(lines[:-1]) == want.stdout
    assert lines[-1].startswith("Mapping: ") and "runs" in lines[-1]
    assert got.returncode == want.returncode == 2
    assert sorted(got.stderr.splitlines()) == sorted(want.stderr.splitlines())


def test_raw_not_supported(tmp_path: Path, qemu_tools: None) -> None:
    path = tmp_path / "r.img"
    imagegen.create(path, MiB, fmt="raw")
    want = imagegen.qemu_img("check", str(path), check=False)
    got = nbdqcow("check", str(path))
    assert got.returncode == want.returncode == 63
    assert got.stderr.split(": ", 1)[1] == want.stderr.split(": ", 1)[1]


# --------------------------------------------------------------------------------------
# damaged images
# --------------------------------------------------------------------------------------
def test_leak_then_repair_leaks(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, 0)  # the data cluster is no longer referenced
    raw.set_l2_entry(2560 * 1024, 0)
    want = assert_same_check(path)
    assert want["leaks"] == 2 and want.get("corruptions", 0) == 0
    rc, got = our_check(path, "-r", "leaks")
    assert rc == 0 and got.get("leaks-fixed") == 2
    rc, after = qemu_check(path)
    assert rc == 0 and "leaks" not in after, after


def test_refcount_too_high(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_refcount(raw.host_cluster(0), 2)  # leak, and COPIED now wrong
    want = assert_same_check(path)
    assert want["leaks"] == 1 and want["corruptions"] == 1
    other = tmp_path / "copy.qcow2"
    shutil.copy(path, other)
    # -r leaks fixes the leak; the COPIED check then agrees again
    _, got = our_check(path, "-r", "leaks")
    assert got.get("leaks-fixed") == 1
    rc, after = qemu_check(path)
    assert rc == 0, after
    # -r all on the copy: same outcome
    assert our_check(other, "-r", "all")[0] == 0
    assert qemu_check(other)[0] == 0


def test_refcount_zero_needs_rebuild(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_refcount(raw.host_cluster(0), 0)  # referenced cluster with no refcount
    raw.set_l2_entry(1 * MiB, 0)  # and a leak
    want = assert_same_check(path)
    assert want["corruptions"] == 2 and want["leaks"] == 1  # refcount + COPIED
    # qemu-img refuses to fix only leaks when the structure needs a rebuild: so do we
    copy = tmp_path / "copy.qcow2"
    shutil.copy(path, copy)
    q = imagegen.qemu_img("check", "-r", "leaks", str(copy), check=False)
    ours = nbdqcow("check", "-r", "leaks", str(path))
    assert ours.returncode == q.returncode == 1
    rc, got = our_check(path, "-r", "all")
    assert rc == 0, got
    assert got.get("leaks-fixed") == 1 and got.get("corruptions-fixed") == 1
    rc, after = qemu_check(path)
    assert rc == 0, after
    assert imagegen.qemu_img("compare", str(copy), str(path), check=False).returncode == 0


def test_refcount_too_low_shared(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    imagegen.qemu_img("snapshot", "-c", "s1", str(path))
    raw = Raw(path)
    shared = raw.host_cluster(1 * MiB)
    assert raw.refcount(shared) == 2
    raw.set_refcount(shared, 1)  # too low by one; COPIED (clear) is now wrong as well
    want = assert_same_check(path)
    assert want["corruptions"] == 2
    rc, got = our_check(path, "-r", "all")
    assert rc == 0 and got.get("corruptions-fixed") == 1, got
    assert qemu_check(path)[0] == 0
    assert Raw(path).refcount(shared) == 2


def repair_like_qemu(path: Path, mode: str) -> tuple[int, int]:
    """Repair a copy with qemu-img and the image with nbdqcow: same exit codes, and the
    same verdict of qemu-img check afterwards.  Returns (exit code, verdict)."""
    copy = path.with_name("qemu-repaired.qcow2")
    shutil.copy(path, copy)
    q = imagegen.qemu_img("check", "--output=json", "-r", mode, str(copy), check=False)
    ours = nbdqcow("check", "--output=json", "-r", mode, str(path))
    assert "Traceback" not in ours.stderr, ours.stderr
    assert ours.returncode == q.returncode, (ours.stdout, ours.stderr, q.stdout, q.stderr)
    if q.stdout.strip():
        # the verdict after the repair (a rebuilt refcount structure may end elsewhere)
        want, got = figures(json.loads(q.stdout)), figures(json.loads(ours.stdout))
        want.pop("image-end-offset")
        got.pop("image-end-offset")
        assert got == want
    verdict = qemu_check(path)[0]
    assert verdict == qemu_check(copy)[0]
    copy.unlink()
    return ours.returncode, verdict


def test_wrong_copied_flags(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    for g in (0, 64 * 1024, 1 * MiB):
        raw.set_l2_entry(g, raw.l2_entry(g) & ~COPIED)
    want = assert_same_check(path)
    assert want["corruptions"] == 3
    backup = tmp_path / "backup.qcow2"
    shutil.copy(path, backup)
    # with nothing else wrong, even -r leaks repairs COPIED flags (qemu-img does)
    assert repair_like_qemu(path, "leaks") == (0, 0)
    shutil.copy(backup, path)
    rc, got = our_check(path, "-r", "all")
    assert rc == 0 and got.get("corruptions-fixed") == 3
    assert qemu_check(path)[0] == 0
    assert Raw(path).l2_entry(1 * MiB) & COPIED


def test_wrong_copied_flags_with_corruption(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, raw.l2_entry(1 * MiB) & ~COPIED)
    raw.set_l2_entry(0, raw.l2_entry(0) | (1 << 57))  # reserved bit: not repairable
    assert assert_same_check(path)["corruptions"] == 2
    assert repair_like_qemu(path, "leaks") == (2, 2)  # COPIED left alone
    assert not Raw(path).l2_entry(1 * MiB) & COPIED
    assert repair_like_qemu(path, "all") == (2, 2)  # COPIED fixed, the bit remains
    assert Raw(path).l2_entry(1 * MiB) & COPIED


def test_refblock_outside_image(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw._put(raw.rt_offset + 8, struct.pack(">Q", 1 << 30))
    assert assert_same_check(path)["corruptions"] == 1
    assert repair_like_qemu(path, "leaks") == (2, 2)
    assert repair_like_qemu(path, "all") == (0, 0)


def test_refblock_unaligned(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw._put(raw.rt_offset + 8, struct.pack(">Q", 0x10200))
    assert assert_same_check(path)["corruptions"] == 1
    assert repair_like_qemu(path, "leaks") == (1, 2)  # "need to rebuild": check failed
    assert repair_like_qemu(path, "all") == (0, 0)


def test_data_cluster_overlaps_l2_table(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    l2 = raw._u64(raw.l1_offset) & OFF_MASK
    raw.set_l2_entry(1 * MiB, COPIED | l2)
    want = assert_same_check(path)
    assert want["corruptions"] == 1 and want["leaks"] == 1
    assert repair_like_qemu(path, "leaks") == (2, 2)


def test_unaligned_and_past_eof_entries(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, raw.l2_entry(1 * MiB) + 4096)
    raw.set_l2_entry(64 * 1024, COPIED | (100 * MiB))
    want = assert_same_check(path)
    assert want["corruptions"] >= 3


def test_fragmented_after_cluster_swap(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    a, b = raw.l2_entry(0), raw.l2_entry(64 * 1024)
    raw.set_l2_entry(0, b)
    raw.set_l2_entry(64 * 1024, a)
    want = assert_same_check(path)
    assert want.get("fragmented-clusters", 0) >= 2


# --------------------------------------------------------------------------------------
# a dirty image (lazy refcounts) is repaired by a writable open
# --------------------------------------------------------------------------------------
def test_dirty_image_rebuilt_on_open(tmp_path: Path, qemu_tools: None) -> None:
    from nbdqcow.qcow2.driver import Qcow2Driver

    path = written(tmp_path, "lazy_refcounts=on")
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, 0)  # leak
    raw.set_refcount(raw.host_cluster(0), 0)  # too low
    raw.set_incompat(1)  # dirty
    assert qemu_check(path)[0] != 0
    before = imagegen.convert_to_raw(path, tmp_path / "before.raw")
    drv = Qcow2Driver.open(str(path), writable=True)
    try:
        drv.pwrite(b"\x44" * 4096, 3 * MiB)
    finally:
        drv.close()
    rc, after = qemu_check(path)
    assert rc == 0, after
    assert not Raw(path).incompat() & 1
    data = imagegen.convert_to_raw(path, tmp_path / "after.raw")
    assert data[: 3 * MiB] == before[: 3 * MiB]
    assert data[3 * MiB : 3 * MiB + 4096] == b"\x44" * 4096


def test_repair_clears_corrupt_bit_like_qemu(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, 0)  # a leak
    raw.set_incompat(2)  # corrupt bit
    copy = tmp_path / "copy.qcow2"
    shutil.copy(path, copy)
    imagegen.qemu_img("check", "-r", "all", str(copy))
    assert nbdqcow("check", "-r", "all", str(path)).returncode == 0
    assert Raw(path).incompat() == Raw(copy).incompat() == 0


def test_dirty_bit_without_lazy_refcounts_cleared(tmp_path: Path, qemu_tools: None) -> None:
    from nbdqcow.qcow2.driver import Qcow2Driver

    path = written(tmp_path)
    raw = Raw(path)
    raw.set_refcount(raw.host_cluster(1 * MiB), 3)  # a leak (and a wrong COPIED flag)
    raw.set_incompat(1)
    Qcow2Driver.open(str(path), writable=True).close()
    assert Raw(path).incompat() == 0
    assert qemu_check(path)[0] == 0
    assert Raw(path).refcount(Raw(path).host_cluster(1 * MiB)) == 1


REBUILD_KINDS = {
    "v2": {"compat": "0.10"},
    "refcount1": {"refcount_bits": "1"},
    "refcount64": {"refcount_bits": "64"},
    "c512": {"cluster_size": "512"},
    "ext_l2": {"extended_l2": "on"},
}


@pytest.mark.parametrize("kind", [*REBUILD_KINDS, "snapshot", "bitmap"])
def test_rebuild_refcount_structure(kind: str, tmp_path: Path, qemu_tools: None) -> None:
    """Zero the header's refcount (first byte of the first refcount block): qemu-img
    and nbdqcow agree on the damage, and ``-r all`` rebuilds a structure qemu accepts,
    with the guest data unchanged."""
    path = tmp_path / "img.qcow2"
    imagegen.create(path, 4 * MiB, opts=REBUILD_KINDS.get(kind))
    if kind == "bitmap":
        imagegen.qemu_img("bitmap", "--add", str(path), "b0")
    cmds = ["write -P 1 0 200k", "write -P 2 1M 4k"]
    if kind != "v2" and kind != "ext_l2":
        cmds.append("write -c -P 3 2M 64k")
    imagegen.qemu_io(path, cmds)
    if kind == "snapshot":
        imagegen.qemu_img("snapshot", "-c", "s1", str(path))
        imagegen.qemu_io(path, ["write -P 9 0 64k"])
    b = path.read_bytes()[:112]
    rt = struct.unpack_from(">Q", b, 48)[0]
    order = struct.unpack_from(">I", b, 96)[0] if struct.unpack_from(">I", b, 4)[0] == 3 else 4
    with open(path, "r+b") as f:
        f.seek(rt)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block)
        f.write(bytes(max(1, (1 << order) // 8)))  # the header cluster's refcount (and more)
    want = assert_same_check(path)
    assert want["corruptions"] >= 1
    before = imagegen.convert_to_raw(path, tmp_path / "before.raw")
    rc, got = our_check(path, "-r", "all")
    assert rc == 0 and got.get("corruptions-fixed", 0) >= 1, got
    rc, after = qemu_check(path)
    assert rc == 0, after
    assert imagegen.convert_to_raw(path, tmp_path / "after.raw") == before
    if kind == "snapshot":
        imagegen.qemu_img("snapshot", "-d", "s1", str(path))  # frees through the new refcounts
        assert qemu_check(path)[0] == 0


def test_encrypted_image_needs_no_key(tmp_path: Path, qemu_tools: None) -> None:
    """The LUKS header area is counted; qemu-img needs the secret to check, we don't."""
    path = tmp_path / "enc.qcow2"
    secret = "secret,id=sec0,data=abc"
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"
    for _ in range(5):
        # qemu times its PBKDF by the thread's CPU time and gives up ("Unable to get
        # accurate CPU usage") when a loaded machine hands it too few ticks: try again
        p = imagegen.qemu_img("create", "-q", "-f", "qcow2", "--object", secret, "-o", luks,
                              str(path), "4M", check=False)
        if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
            break
    assert p.returncode == 0, p.stderr
    imagegen.run(["qemu-io", "--object", secret, "--image-opts", opts,
                  "-c", "write -P 3 0 100k", "-c", "write -P 4 1M 64k"])
    raw = Raw(path)
    raw.set_l2_entry(1 * MiB, 0)
    p = imagegen.qemu_img("check", "--output=json", "--object", secret, "--image-opts", opts,
                          check=False)
    want = json.loads(p.stdout)
    rc, got = our_check(path)
    assert figures(got) == figures(want) and rc == p.returncode == 3
    assert our_check(path, "-r", "leaks")[0] == 0
    p = imagegen.qemu_img("check", "--object", secret, "--image-opts", opts, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_snapshot_entry_with_unaligned_l1(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    imagegen.qemu_img("snapshot", "-c", "s1", str(path))
    b = path.read_bytes()
    table = struct.unpack_from(">Q", b, 64)[0]
    l1 = struct.unpack_from(">Q", b, table)[0]
    Raw(path)._put(table, struct.pack(">Q", l1 + 8))
    want = assert_same_check(path)
    assert want["corruptions"] == 1 and want["leaks"] >= 1


def test_l1_entry_without_offset(tmp_path: Path, qemu_tools: None) -> None:
    """An L1 entry holding only flags: qemu-img reads cluster 0 as its L2 table."""
    path = written(tmp_path)
    raw = Raw(path)
    raw._put(raw.l1_offset, struct.pack(">Q", COPIED))
    want = assert_same_check(path)
    assert want["corruptions"] >= 1


def test_unaligned_preallocated_zero_cluster_repaired(tmp_path: Path, qemu_tools: None) -> None:
    path = written(tmp_path)
    raw = Raw(path)
    e = raw.l2_entry(1 * MiB)
    raw.set_l2_entry(1 * MiB, (e + 512) | 1)  # zero flag, offset off by a sector
    want = assert_same_check(path)
    assert want["corruptions"] >= 1
    assert repair_like_qemu(path, "all") == (0, 0)
    assert Raw(path).l2_entry(1 * MiB) == 1  # a plain zero cluster now


@pytest.mark.parametrize("opts", [{}, {"extended_l2": "on"}, {"compat": "0.10"}],
                         ids=["v3", "ext_l2", "v2"])
def test_engine_written_image_figures(opts: dict[str, str], tmp_path: Path,
                                      qemu_tools: None) -> None:
    """Images the engine wrote (writes, zeroes, discards: kept host clusters included)
    get qemu-img's figures, and the verdict is clean."""
    import random

    from nbdqcow.qcow2.driver import Qcow2Driver

    path = tmp_path / "eng.qcow2"
    imagegen.create(path, 8 * MiB, opts={"cluster_size": "65536", **opts})
    rng = random.Random(7)
    drv = Qcow2Driver.open(str(path), writable=True)
    try:
        for _ in range(60):
            off = rng.randrange(0, 8 * MiB - 256 * 1024) & ~511
            n = rng.randrange(1, 256) * 512
            op = rng.random()
            if op < 0.6:
                drv.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
            elif op < 0.8:
                drv.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
            else:
                drv.discard(off, n)
    finally:
        drv.close()
    want = assert_same_check(path)
    assert want.get("corruptions", 0) == 0 and want.get("leaks", 0) == 0
