"""Request range validation shared by every driver."""

from __future__ import annotations

from nbdqcow.errors import NoSpace, OutOfRange, ReadOnlyImage


def check_range(size: int, offset: int, length: int, write: bool = False) -> None:
    """Raise if [offset, offset+length) is not inside an image of ``size`` bytes.

    Writes past the end are ENOSPC (NBD spec SHOULD), reads past the end EINVAL.
    """
    if offset < 0 or length < 0 or offset + length > size:
        if write:
            raise NoSpace(f"write of {length} bytes at {offset} is past the end ({size})")
        raise OutOfRange(f"request of {length} bytes at {offset} is past the end ({size})")


def check_write(writable: bool, size: int, offset: int, length: int) -> None:
    """Raise unless a write of [offset, offset+length) may go to a driver that is
    ``writable`` and ``size`` bytes long."""
    if not writable:
        raise ReadOnlyImage("image is read-only")
    check_range(size, offset, length, write=True)
