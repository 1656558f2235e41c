"""Fixtures for the engine-vs-model state machines: reference tools and backing files.

Images are made at test time by ``qemu-img create`` and filled by ``qemu-io``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tooling import require_tool  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

# The pattern qemu-io writes into backing files: (byte, offset, length), some unaligned.
BASE_PATTERN = [
    (0x11, 0, 1 * MiB),
    (0x22, 1 * MiB + 3 * KiB, 700 * KiB + 1),
    (0x33, 2 * MiB + 64 * KiB - 512, 1536),
    (0x44, 3 * MiB - 512, 1 * MiB + 512),
]


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture
def qemu_tools() -> None:
    """The reference tools these tests drive (fail under CI when missing)."""
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)


@pytest.fixture
def backing_base(tmp_path: Path, qemu_tools: None) -> Callable[[int], tuple[Path, bytes]]:
    """Factory: a qcow2 backing file (4 KiB clusters) of ``size`` bytes filled by qemu-io.

    Returns (path, guest content); the content is read back by ``qemu-img convert``
    and checked against the pattern, independently of nbdqcow.
    """

    def make(size: int) -> tuple[Path, bytes]:
        path = tmp_path / "base.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
              str(path), str(size)])
        cmds: list[str] = []
        expect = bytearray(size)
        for byte, off, length in BASE_PATTERN:
            if off + length <= size:
                cmds += ["-c", f"write -q -P {byte:#x} {off} {length}"]
                expect[off:off + length] = bytes([byte]) * length
        _run(["qemu-io", "-f", "qcow2", *cmds, str(path)])
        raw = tmp_path / "base.raw"
        _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)])
        content = raw.read_bytes()
        raw.unlink()
        same = content == bytes(expect)  # no bare bytes == bytes assert: pytest would diff
        assert same, "qemu-io did not write the backing pattern"
        return path, content

    return make
