"""Request range validation shared by every driver."""

from __future__ import annotations

from nbdqcow.errors import NoSpace, OutOfRange


def check_range(size: int, offset: int, length: int, write: bool = False) -> None:
    """Raise if [offset, offset+length) is not inside an image of ``size`` bytes.

    Writes past the end are ENOSPC (NBD spec SHOULD), reads past the end EINVAL.
    """
    if offset < 0 or length < 0 or offset + length > size:
        if write:
            raise NoSpace(f"write of {length} bytes at {offset} is past the end ({size})")
        raise OutOfRange(f"request of {length} bytes at {offset} is past the end ({size})")
