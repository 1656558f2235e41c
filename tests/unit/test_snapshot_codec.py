"""The snapshot table codec: entries built by hand from the spec's byte layout parse to
the right fields, re-encode byte for byte, and bad tables fail cleanly."""

from __future__ import annotations

import struct
import time

import pytest

from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2.header import Header
from nbdqcow.qcow2.snapshot import (
    Snapshot,
    encode_entry,
    encode_table,
    parse_entry,
    parse_table,
    read_snapshot_table,
)

CS = 65536


def raw_entry(l1_off: int, l1_size: int, sid: bytes, name: bytes, *, extra: bytes,
              date: tuple[int, int] = (1700000000, 123), clock: int = 0,
              vm32: int = 0) -> bytes:
    """One entry exactly as qcow2.txt lays it out (independent of the codec)."""
    head = (l1_off.to_bytes(8, "big") + l1_size.to_bytes(4, "big")
            + len(sid).to_bytes(2, "big") + len(name).to_bytes(2, "big")
            + date[0].to_bytes(4, "big") + date[1].to_bytes(4, "big")
            + clock.to_bytes(8, "big") + vm32.to_bytes(4, "big")
            + len(extra).to_bytes(4, "big"))
    body = head + extra + sid + name
    return body + b"\0" * (-len(body) % 8)


def extra24(vm: int, disk: int, icount: int) -> bytes:
    return vm.to_bytes(8, "big") + disk.to_bytes(8, "big") + icount.to_bytes(8, "big")


def test_fields_from_a_hand_made_entry() -> None:
    raw = raw_entry(0x50000, 3, b"1", b"snap one", extra=extra24(4096, 1 << 30, 77),
                    clock=3_723_004_000_000, vm32=4096)
    snap, end = parse_entry(raw)
    assert end == len(raw) and end % 8 == 0
    assert (snap.l1_table_offset, snap.l1_size, snap.id_str, snap.name) == (
        0x50000, 3, "1", "snap one")
    assert (snap.date_sec, snap.date_nsec) == (1700000000, 123)
    assert snap.vm_clock_nsec == 3_723_004_000_000 and snap.vm_clock_sec == 3723
    assert (snap.vm_state_size, snap.disk_size, snap.icount) == (4096, 1 << 30, 77)
    assert snap.icount_valid


def test_large_vm_state_overrides_the_32_bit_field() -> None:
    raw = raw_entry(0, 0, b"2", b"x", extra=extra24(5 << 32, 0, (1 << 64) - 1), vm32=7)
    snap, _ = parse_entry(raw)
    assert snap.vm_state_size == 5 << 32
    assert not snap.icount_valid


def test_short_extra_data_v2_style() -> None:
    raw = raw_entry(0x30000, 1, b"10", b"old", extra=b"", vm32=512)
    snap, _ = parse_entry(raw)
    assert snap.vm_state_size == 512 and snap.disk_size is None and snap.icount is None
    assert encode_entry(snap) == raw


@pytest.mark.parametrize("extra", [b"", b"\1\2\3\4", extra24(1, 2, 3)[:16],
                                   extra24(1, 2, 3)[:12] + b"odd!", extra24(1, 2, 3),
                                   extra24(1, 2, 3)[:20] + b"tail",
                                   extra24(1, 2, 3) + b"future-bytes!!!!"])
def test_round_trip_is_byte_exact(extra: bytes) -> None:
    entries = [raw_entry(0x10000 * (i + 1), i, str(i).encode(), f"name-{i}".encode() * i,
                         extra=extra) for i in range(5)]
    table = b"".join(entries)
    snaps = parse_table(table, 5)
    assert [s.name for s in snaps] == [f"name-{i}" * i for i in range(5)]
    assert encode_table(snaps) == table


def test_new_snapshot_encodes_with_full_extra_data() -> None:
    s = Snapshot(l1_table_offset=0x20000, l1_size=2, id_str="3", name="n",
                 date_sec=int(time.time()), disk_size=1 << 20, icount=0)
    raw = encode_entry(s)
    assert struct.unpack_from(">I", raw, 36)[0] == 24
    back, end = parse_entry(raw)
    assert end == len(raw) and back.disk_size == 1 << 20 and back.icount == 0
    assert back.name == "n" and back.id_str == "3"


def test_truncated_entry() -> None:
    raw = raw_entry(0, 0, b"1", b"abcdef", extra=extra24(0, 0, 0))
    with pytest.raises(ImageOpenError):
        parse_entry(raw[:45])
    with pytest.raises(ImageOpenError):
        parse_entry(raw[:20])


def test_absurd_extra_size() -> None:
    raw = bytearray(raw_entry(0, 0, b"1", b"a", extra=b""))
    struct.pack_into(">I", raw, 36, 0x7FFFFFFF)
    with pytest.raises(ImageOpenError):
        parse_entry(bytes(raw))


class FakeFile:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    def pread(self, length: int, offset: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + length].ljust(length, b"\0")

    def size(self) -> int:
        return len(self.data)


def image_with_table(table: bytes, n: int, *, l1_room: int = 4 * CS,
                     off: int = 2 * CS) -> tuple[FakeFile, Header]:
    data = bytearray(max(off + len(table), l1_room))
    data[off : off + len(table)] = table
    h = Header(version=3, cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=CS,
               refcount_table_offset=CS, refcount_table_clusters=1, nb_snapshots=n,
               snapshots_offset=off)
    return FakeFile(bytes(data)), h


def test_read_table_ok() -> None:
    table = raw_entry(3 * CS, 1, b"1", b"a", extra=extra24(0, 1 << 20, 0)) + raw_entry(
        3 * CS, 1, b"2", b"b", extra=extra24(0, 1 << 20, 0))
    f, h = image_with_table(table, 2)
    assert [s.name for s in read_snapshot_table(f, h)] == ["a", "b"]


def test_read_table_no_snapshots_reads_nothing() -> None:
    f, h = image_with_table(b"", 0)
    assert read_snapshot_table(f, h) == [] and f.reads == 0


@pytest.mark.parametrize("off", [CS + 8, 1 << 40])
def test_table_offset_invalid(off: int) -> None:
    table = raw_entry(3 * CS, 1, b"1", b"a", extra=extra24(0, 0, 0))
    f, h = image_with_table(table, 1)
    with pytest.raises(ImageOpenError):
        read_snapshot_table(f, h.replace(snapshots_offset=off))


def test_lying_count_is_bounded() -> None:
    table = raw_entry(3 * CS, 1, b"1", b"a", extra=extra24(0, 0, 0))
    f, h = image_with_table(table, 1)
    start = time.monotonic()
    with pytest.raises(ImageOpenError):
        read_snapshot_table(f, h.replace(nb_snapshots=65536))
    assert time.monotonic() - start < 2
    with pytest.raises(ImageOpenError):
        read_snapshot_table(f, h.replace(nb_snapshots=1 << 31))


def test_duplicate_ids() -> None:
    e = raw_entry(3 * CS, 1, b"1", b"a", extra=extra24(0, 0, 0))
    f, h = image_with_table(e + e, 2)
    with pytest.raises(ImageOpenError, match="duplicate"):
        read_snapshot_table(f, h)


@pytest.mark.parametrize(("l1_off", "l1_size"), [(3 * CS + 512, 1), (1 << 40, 1),
                                                  (3 * CS, 1 << 30)])
def test_bad_snapshot_l1(l1_off: int, l1_size: int) -> None:
    table = raw_entry(l1_off, l1_size, b"1", b"a", extra=extra24(0, 0, 0))
    f, h = image_with_table(table, 1)
    with pytest.raises(ImageOpenError):
        read_snapshot_table(f, h)
