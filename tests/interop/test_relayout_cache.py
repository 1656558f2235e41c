"""``nbdqcow relayout -t unsafe -O NEW``: qemu-img convert's default cache mode, nothing
synced (the same image, no fdatasync/fsync of it, no folder sync); refused in place."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from imagegen import create, qemu_img, qemu_io, qemu_map_json

from nbdqcow.cli import main
from nbdqcow.qcow2.relayout import tmp_path_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
from powerlog import Recorder  # noqa: E402

MiB = 1 << 20


def fragmented(path: Path) -> Path:
    create(path, 4 * MiB, opts={"cluster_size": "65536"})
    qemu_io(path, [f"write -P {k + 1} {k * 64}k 64k" for k in (7, 3, 1, 0, 2, 4)]
            + ["write -z 1m 64k"])
    return path


def syncs_of(cache: str, img: Path, out: Path) -> list[str]:
    paths = [str(out), tmp_path_for(str(out))]
    with Recorder(paths) as rec:
        assert main(["relayout", "-q", "-t", cache, "-O", str(out), str(img)]) == 0
    assert not rec.violations
    # creating the new file syncs its header (as qemu-img create does); what follows is
    # the data copy, the tables and the rename
    created = next(i for i, e in enumerate(rec.events) if e.kind == "sync")
    assert any(e.kind == "write" for e in rec.events[created:])
    return [e.kind for e in rec.events[created + 1:] if e.kind in ("sync", "dirsync")]


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_relayout_cache_modes(tmp_path: Path, qemu_tools: None, cache: str) -> None:
    img = fragmented(tmp_path / "img.qcow2")
    out = tmp_path / "out.qcow2"
    syncs = syncs_of(cache, img, out)
    if cache == "unsafe":
        assert syncs == []
    else:  # the new file, then the folder after the rename
        assert "sync" in syncs and syncs[-1] == "dirsync"
    assert qemu_img("check", str(out)).returncode == 0
    assert qemu_img("compare", str(img), str(out), check=False).returncode == 0
    assert len({int(e["offset"]) - int(e["start"])  # type: ignore[call-overload]
                for e in qemu_map_json(out) if "offset" in e}) == 1
    assert not os.path.exists(tmp_path_for(str(out)))


def test_unsafe_in_place_is_refused(tmp_path: Path, qemu_tools: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = fragmented(tmp_path / "img.qcow2")
    before = img.read_bytes()
    assert main(["relayout", "-q", "-t", "unsafe", str(img)]) != 0
    err = capsys.readouterr().err
    assert "only with -O" in err and "Traceback" not in err
    assert img.read_bytes() == before
