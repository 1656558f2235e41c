"""``nbdqcow relayout`` honours the lock options of the image's own specification
(``--image-opts`` / ``json:``) as qemu-img honours them: ``file.locking=off`` takes and
tests no lock, ``force-share=on`` reads an image someone writes (only for ``-O``: in place
the image is written, and qemu's refusal is kept)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imagegen import create, qemu_img, qemu_io, qemu_map_json

from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import Access
from nbdqcow.cli import main

MiB = 1 << 20


def fragmented(path: Path) -> Path:
    create(path, 4 * MiB, opts={"cluster_size": "65536"})
    qemu_io(path, [f"write -P {k + 1} {k * 64}k 64k" for k in (5, 3, 1, 0, 2, 4)])
    return path


def constant(path: Path) -> bool:
    return len({int(e["offset"]) - int(e["start"])  # type: ignore[call-overload]
                for e in qemu_map_json(path) if "offset" in e}) == 1


def test_relayout_honours_the_specifications_lock_options(
        tmp_path: Path, qemu_tools: None, capsys: pytest.CaptureFixture[str]) -> None:
    img = fragmented(tmp_path / "img.qcow2")
    ref = tmp_path / "ref.qcow2"
    ref.write_bytes(img.read_bytes())
    out = tmp_path / "out.qcow2"
    spec = f"driver=qcow2,file.driver=file,file.filename={img}"
    # a reader (it refuses writers): in place is refused unless the spec turns locks off
    reader = HostFile(str(img), writable=False, lock=Access().image("qcow2"))
    try:
        assert main(["relayout", "-q", str(img)]) != 0
        assert 'Failed to get "write" lock' in capsys.readouterr().err
        assert img.read_bytes() == ref.read_bytes()
        assert main(["relayout", "-q", "--image-opts", spec + ",file.locking=off"]) == 0
    finally:
        reader.close()
    assert constant(img)
    assert qemu_img("compare", str(ref), str(img), check=False).returncode == 0

    img.write_bytes(ref.read_bytes())
    # a writer: reading it for -O is refused unless the spec says force-share=on
    writer = HostFile(str(img), writable=True, lock=Access(write=True).image("qcow2"))
    try:
        assert main(["relayout", "-q", "-O", str(out), str(img)]) != 0
        assert 'Failed to get shared "write" lock' in capsys.readouterr().err
        assert not out.exists()
        assert main(["relayout", "-q", "-O", str(out), "--image-opts",
                     spec + ",force-share=on"]) == 0
        assert constant(out)
        out.unlink()
        as_json = "json:" + json.dumps({"driver": "qcow2", "file": {
            "driver": "file", "filename": str(img), "locking": "off"}})
        assert main(["relayout", "-q", "-O", str(out), as_json]) == 0
        assert constant(out)
        # in place with force-share=on: qemu's refusal, nothing written
        assert main(["relayout", "-q", "--image-opts", spec + ",force-share=on"]) != 0
        assert ("force-share=on can only be used with read-only images"
                in capsys.readouterr().err)
    finally:
        writer.close()
    assert img.read_bytes() == ref.read_bytes()
    assert qemu_img("compare", str(ref), str(out), check=False).returncode == 0
