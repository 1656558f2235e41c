"""Size parsing and human formatting (strings as qemu-img 7.2 prints them; most were
observed in its "virtual size" and "disk size" lines)."""

from __future__ import annotations

import pytest

from nbdqcow.sizes import SizeError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("64k", 65536),
        ("1M", 1 << 20), ("2m", 2 << 20), ("1G", 1 << 30), ("3T", 3 << 40),
        ("1P", 1 << 50), ("2E", 2 << 60), ("1.5k", 1536), ("0.5M", 512 * 1024),
        ("100b", 100), ("100B", 100), (" 7 ", 7), (".5k", 512),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "1Q", "1kk", "1.1", "0.3k", "1 G B", "8E",
                                  "abc", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
        (1536, "1.5 KiB"), (200704, "196 KiB"), (368640, "360 KiB"),
        (1024000, "0.977 MiB"), (1048576, "1 MiB"), (1000000000, "954 MiB"),
        (1 << 30, "1 GiB"), (1 << 40, "1 TiB"), (266240, "260 KiB"),
        (3 << 60, "3 EiB"),
    ],
)
def test_format_size_like_qemu(value: int, text: str) -> None:
    assert format_size(value) == text
