"""Differential maps: ``nbdqcow map`` prints what ``qemu-img map`` prints, and the engine's
block status agrees with that map.
"""

from __future__ import annotations

import bisect
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import imagegen
import pytest
from imagegen import Case, settle

from nbdqcow.block.driver import BlockDriver, Extent

Flags = tuple[bool, bool, bool, int]  # present, data, zero, depth
Run = tuple[int, int, Flags]  # start, end, flags


def nbdqcow(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    settle(Path(args[-1]).parent if cwd is None else cwd)
    return subprocess.run(
        [sys.executable, "-m", "nbdqcow", *args], capture_output=True, text=True, timeout=120,
        cwd=cwd,
    )


def test_map_json_equals_qemu(case_image: tuple[Case, Path]) -> None:
    case, path = case_image
    want = imagegen.qemu_map_json(path)
    proc = nbdqcow("map", "--output=json", str(path))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == want


def test_map_human_equals_qemu(case_image: tuple[Case, Path]) -> None:
    case, path = case_image
    imagegen.settle(path.parent)
    want = imagegen.qemu_img("map", str(path), check=False)
    got = nbdqcow("map", str(path))
    assert got.stdout == want.stdout
    assert (got.returncode == 0) == (want.returncode == 0), got.stderr
    if want.returncode != 0:  # e.g. compressed clusters: one line of error, no traceback
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in got.stderr, got.stderr


FILE_NAME_CASES = [c for c in imagegen.CASES if c.name.startswith(("chain", "data_file"))]


@pytest.mark.parametrize("case", FILE_NAME_CASES, ids=[c.name for c in FILE_NAME_CASES])
def test_map_human_relative_path(case: Case, image_factory: Callable[[str], Path]) -> None:
    """Run from the image's folder with a relative name: the "File" column (backing and
    data file names) must read as qemu-img prints it."""
    path = image_factory(case.name)
    imagegen.settle(path.parent)
    want = subprocess.run(["qemu-img", "map", path.name], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)
    got = nbdqcow("map", path.name, cwd=path.parent)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout


def merge(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for start, end, flags in runs:
        if out and out[-1][1] == start and out[-1][2] == flags:
            out[-1] = (out[-1][0], end, flags)
        else:
            out.append((start, end, flags))
    return out


def qemu_runs(path: Path) -> list[Run]:
    runs: list[Run] = []
    for e in imagegen.qemu_map_json(path):
        start, length = int(str(e["start"])), int(str(e["length"]))
        flags = (bool(e["present"]), bool(e["data"]), bool(e["zero"]), int(str(e["depth"])))
        runs.append((start, start + length, flags))
    return merge(runs)


def extent_flags(e: Extent) -> Flags:
    return (e.present, e.data, e.zero, e.depth)


def status_runs(drv: BlockDriver, offset: int, length: int, size: int) -> list[Run]:
    """Ask block_status until [offset, offset+length) is covered; check it is contiguous."""
    block_status = drv.block_status
    runs: list[Run] = []
    pos, end = offset, offset + length
    while pos < end:
        extents = block_status(pos, end - pos)
        assert extents, f"block_status({pos}, {end - pos}) returned no extent"
        for e in extents:
            assert e.start == pos, f"extents not contiguous: {e} at {pos}"
            assert e.length > 0, f"empty extent {e}"
            stop = min(e.start + e.length, size)
            runs.append((pos, min(stop, end), extent_flags(e)))
            pos = stop
            if pos >= end:
                break
    return merge(runs)


def flags_over(want: list[Run], start: int, end: int) -> set[Flags]:
    starts = [r[0] for r in want]
    i = bisect.bisect_right(starts, start) - 1
    seen: set[Flags] = set()
    while i < len(want) and want[i][0] < end:
        if want[i][1] > start:
            seen.add(want[i][2])
        i += 1
    return seen


def test_block_status_agrees_with_map(case_image: tuple[Case, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdqcow.block import hostfile
    from nbdqcow.image import open_image

    # read the tables as `nbdqcow map` does (no readahead of data pages, which SEEK_DATA
    # would count as data over unwritten extents)
    monkeypatch.setattr(hostfile, "METADATA_ONLY", True)

    case, path = case_image
    want = qemu_runs(path)
    imagegen.settle(path.parent)
    drv = open_image(str(path), writable=False)
    try:
        size = drv.size
        assert want[-1][1] == size
        got = status_runs(drv, 0, size, size)
        assert got == want, "(start, end, (present, data, zero, depth)) runs differ"
        # unaligned windows: every extent's flags must be those of the map there
        rng = random.Random(case.name)
        for _ in range(25):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, min(size - off, 3 * 1024 * 1024) + 1)
            for start, end, flags in status_runs(drv, off, n, size):
                assert flags_over(want, start, end) == {flags}, (
                    f"block_status({off}, {n}) says {flags} for [{start}, {end})"
                )
    finally:
        drv.close()
