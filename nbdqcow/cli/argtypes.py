"""Option value types shared by the command modules (argparse ``type=`` functions)."""

from __future__ import annotations

import argparse


def nonneg_int(text: str) -> int:
    """A non-negative integer, decimal or 0x/0o/0b prefixed."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative number '{text}'")
    return value
