"""Helpers for tests that need reference tools (qemu-img, nbdinfo, ...)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of tool ``name``; skip the test when missing, FAIL when $CI is set."""
    path = shutil.which(name)
    if path is None:
        msg = f"reference tool {name!r} is not installed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
