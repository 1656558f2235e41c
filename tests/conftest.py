"""Shared fixtures: start NBD servers (nbdqcow serve, qemu-nbd) on unix sockets or TCP.

The machinery lives in tests/tooling.py (importable from any test folder).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tooling import ServerFactory, _factory, require_tool  # noqa: E402


@pytest.fixture
def nbdqcow_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``nbdqcow serve [args] IMAGE`` on a unix socket (or ``tcp=True``)."""
    yield from _factory(tmp_path, lambda: [sys.executable, "-m", "nbdqcow", "serve"], "nbdqcow")


@pytest.fixture
def qemu_nbd_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``qemu-nbd [args] IMAGE`` the same way (the reference server)."""
    require_tool("qemu-nbd")
    yield from _factory(tmp_path, lambda: ["qemu-nbd"], "qemu-nbd")
