"""``nbdqcow map``: extent merging and the two output formats, with no image at all."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stderr, redirect_stdout

import pytest

from nbdqcow.block.driver import Capabilities, Extent
from nbdqcow.cli import map as M

KiB = 1024


def entry(start: int, length: int, *, present: bool = True, data: bool = True,
          zero: bool = False, depth: int = 0, offset: int | None = None,
          filename: str | None = None) -> M.MapEntry:
    return M.MapEntry(start, length, depth, present, zero, data, offset,
                      filename if offset is not None else None)


def spans(entries: list[M.MapEntry]) -> list[tuple[int, int]]:
    return [(e.start, e.length) for e in entries]


def test_contiguous_offsets_merge() -> None:
    got = list(M.merge([entry(0, 64 * KiB, offset=0x50000, filename="f"),
                        entry(64 * KiB, 64 * KiB, offset=0x60000, filename="f")]))
    assert spans(got) == [(0, 128 * KiB)] and got[0].offset == 0x50000


def test_discontiguous_offsets_do_not_merge() -> None:
    got = list(M.merge([entry(0, 64 * KiB, offset=0x60000, filename="f"),
                        entry(64 * KiB, 64 * KiB, offset=0x50000, filename="f")]))
    assert spans(got) == [(0, 64 * KiB), (64 * KiB, 64 * KiB)]


def test_offset_and_no_offset_do_not_merge() -> None:
    got = list(M.merge([entry(0, 4 * KiB, data=False, zero=True, offset=0x50000, filename="f"),
                        entry(4 * KiB, 4 * KiB, data=False, zero=True)]))
    assert len(got) == 2


def test_runs_without_offset_merge() -> None:
    got = list(M.merge([entry(0, 4 * KiB, present=False, data=False, zero=True),
                        entry(4 * KiB, 8 * KiB, present=False, data=False, zero=True),
                        entry(12 * KiB, 4 * KiB, present=False, data=False, zero=True, depth=1)]))
    assert spans(got) == [(0, 12 * KiB), (12 * KiB, 4 * KiB)]


@pytest.mark.parametrize("field", ["present", "data", "zero"])
def test_flags_must_agree(field: str) -> None:
    a = entry(0, 4 * KiB)
    b = entry(4 * KiB, 4 * KiB)
    setattr(b, field, not getattr(b, field))
    assert len(list(M.merge([a, b]))) == 2


def test_different_files_do_not_merge() -> None:
    got = list(M.merge([entry(0, 4 * KiB, offset=0, filename="a"),
                        entry(4 * KiB, 4 * KiB, offset=4 * KiB, filename="b")]))
    assert len(got) == 2


def test_human_merges_zero_with_zero_data() -> None:
    # zero-allocated and zero+data (a hole in the host file) both count as "not data"
    # in the human format only; data after them does not join them
    es = [entry(0, 4 * KiB, offset=0x1000, filename="f"),
          entry(4 * KiB, 4 * KiB, data=True, zero=True, offset=0x2000, filename="f"),
          entry(8 * KiB, 4 * KiB, data=False, zero=True, offset=0x3000, filename="f"),
          entry(12 * KiB, 4 * KiB, offset=0x4000, filename="f")]
    assert len(list(M.merge([M.MapEntry(**vars(e)) for e in es]))) == 4
    got = list(M.merge(es, human=True))
    assert spans(got) == [(0, 4 * KiB), (4 * KiB, 8 * KiB), (12 * KiB, 4 * KiB)]
    lines = [x for x in (M._human_line(e) for e in got) if x]
    assert lines == ["0               0x1000          0x1000          f\n",
                     "0x3000          0x1000          0x4000          f\n"]


def test_present_must_agree_even_in_human() -> None:
    es = [entry(0, 4 * KiB, present=False, data=False, zero=True),
          entry(4 * KiB, 4 * KiB, present=True, data=False, zero=True)]
    assert len(list(M.merge(es, human=True))) == 2


def test_json_line_format() -> None:
    e = entry(0, 65536, offset=327680, filename="f")
    assert e.json() == ('{ "start": 0, "length": 65536, "depth": 0, "present": true, '
                        '"zero": false, "data": true, "offset": 327680}')
    h = entry(65536, 512, present=False, data=False, zero=True, depth=2)
    assert h.json() == ('{ "start": 65536, "length": 512, "depth": 2, "present": false, '
                        '"zero": true, "data": false}')


def test_human_line_compressed_is_an_error() -> None:
    with pytest.raises(M.MapError, match="compressed clusters"):
        M._human_line(entry(0, 64 * KiB))  # data without an offset


def test_human_line_hex() -> None:
    assert M._human_line(entry(0x100000, 0x10000, offset=0x70000, filename="img")) == (
        "0x100000        0x10000         0x70000         img\n")


class FakeDriver:
    """A driver whose block status answers in odd pieces (overlapping the request)."""

    def __init__(self, runs: list[Extent]) -> None:
        self.runs = runs
        self.calls: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.runs[-1].start + self.runs[-1].length

    @property
    def caps(self) -> Capabilities:
        return Capabilities(block_status=True)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.calls.append((offset, length))
        out = [e for e in self.runs if e.start + e.length > offset and e.start < offset + length]
        first = out[0]
        return [first._replace(start=offset, length=first.start + first.length - offset,
                               offset=None if first.offset is None
                               else first.offset + offset - first.start), *out[1:2]]

    def close(self) -> None:
        pass


def test_extents_cover_the_image_in_chunks() -> None:
    runs = [Extent(0, 3000, True, True, False, 0, 1 << 20, "f"),
            Extent(3000, 5000, False, False, True, 0, None, None),
            Extent(8000, 192, True, False, True, 0, None, None)]
    drv = FakeDriver(runs)
    got = list(M.extents(drv, chunk=1024))  # type: ignore[arg-type]
    assert sum(e.length for e in got) == 8192
    pos = 0
    for e in got:
        assert e.start == pos
        pos += e.length
    assert all(length <= 1024 for _, length in drv.calls)
    merged = list(M.merge(got))
    assert [(e.start, e.length, e.offset) for e in merged] == [
        (0, 3000, 1 << 20), (3000, 5000, None), (8000, 192, None)]


def test_run_map_json_output(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver([Extent(0, 65536, True, True, False, 0, 327680, "f"),
                      Extent(65536, 65536, False, False, True, 0, None, None)])
    monkeypatch.setattr(M, "open_image", lambda *a, **k: drv)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = M.run_map(argparse.Namespace(file="x", format=None, output="json"))
    assert rc == 0
    assert out.getvalue() == (
        '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 327680},\n'
        '{ "start": 65536, "length": 65536, "depth": 0, "present": false, "zero": true, '
        '"data": false}]\n')


def test_run_map_human_compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver([Extent(0, 65536, True, True, False, 0, 327680, "f"),
                      Extent(65536, 65536, True, True, False, 0, None, None)])
    monkeypatch.setattr(M, "open_image", lambda *a, **k: drv)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = M.run_map(argparse.Namespace(file="x", format=None, output="human"))
    assert rc == 1
    assert out.getvalue() == ("Offset          Length          Mapped to       File\n"
                              "0               0x10000         0x50000         f\n")
    assert "compressed clusters" in err.getvalue()
