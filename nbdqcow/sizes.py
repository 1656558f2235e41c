"""Sizes on the command line: parse "64k", "1.5G" like qemu-img, print "1 GiB" like it."""

from __future__ import annotations

import math
import re

_SUFFIXES = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]?)\s*\Z")
MAX_SIZE = (1 << 63) - 1


class SizeError(ValueError):
    """The text is not a size."""


def parse_size(text: str, default_suffix: str = "") -> int:
    """Bytes in ``text``: a number with an optional binary suffix B/k/M/G/T/P/E
    (case-insensitive, powers of 1024).  A fraction needs a suffix other than B and
    must come out as whole bytes ("1.5k" is 1536)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise SizeError(f"invalid size '{text}'")
    number, suffix = m.group(1), (m.group(2) or default_suffix).lower()
    if suffix not in _SUFFIXES:
        raise SizeError(f"invalid size suffix in '{text}'")
    mult = 1 << (10 * _SUFFIXES[suffix])
    if "." in number:
        whole, _, frac = number.partition(".")
        frac = frac or "0"
        scale = int(10 ** len(frac))
        num = int(whole or "0") * mult * scale + int(frac) * mult
        value, rem = divmod(num, scale)
        if rem:
            raise SizeError(f"size '{text}' is not a whole number of bytes")
    else:
        value = int(number) * mult
    if value > MAX_SIZE:
        raise SizeError(f"size '{text}' is too large")
    return value


def format_size(value: int) -> str:
    """Human size with three significant digits and a binary unit: "196 KiB", "1 GiB".

    The unit switches up once the number would reach 1000 (so 1000 KiB is "0.977 MiB").
    """
    if value <= 0:
        return f"{value} B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = min((exp - 1) // 10, len(_UNITS) - 1)
    return f"{value / (1 << (10 * i)):0.3g} {_UNITS[i]}B"
