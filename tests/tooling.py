"""Shared test helpers: reference tools must exist in CI, may be missing locally."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Return the path of the tool ``name``.

    When it is missing: fail under CI (env var CI set), skip otherwise.
    """
    path = shutil.which(name)
    if path is None:
        msg = f"required tool '{name}' is not installed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
