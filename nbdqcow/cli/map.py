"""``nbdqcow map``: qemu-img map's extents, merging and output formats (qemu 7.2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from nbdqcow.block.driver import BlockDriver, Extent
from nbdqcow.cli.images import add_image_opts, check_format
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.errors import ImageError
from nbdqcow.image import open_image

CHUNK = 1 << 30  # qemu-img map asks for at most 1 GiB at a time


@dataclass
class MapEntry:
    """One line of qemu-img map (its MapEntry record)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    @classmethod
    def of(cls, e: Extent, start: int, length: int) -> MapEntry:
        off = e.offset + (start - e.start) if e.offset is not None else None
        return cls(start, length, e.depth, e.present, e.zero, e.data, off,
                   e.filename if off is not None else None)

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img map joins two entries only if they agree on everything and their
        offsets (if any) are contiguous."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present, self.filename) != (
                nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset

    def json(self) -> str:
        s = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth},'
             f' "present": {_b(self.present)}, "zero": {_b(self.zero)},'
             f' "data": {_b(self.data)}')
        if self.offset is not None:
            s += f', "offset": {self.offset}'
        return s + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


def extents(drv: BlockDriver, chunk: int = CHUNK) -> Iterator[MapEntry]:
    """Block status of the whole image, clipped and contiguous, in chunks."""
    size = drv.size
    pos = 0
    while pos < size:
        end = min(size, pos + chunk)
        got = drv.block_status(pos, end - pos)
        if not got:
            raise ImageError(f"block status at {pos} returned nothing")
        for e in got:
            if e.start + e.length <= pos:
                continue
            if e.start > pos:
                raise ImageError(f"block status skipped [{pos}, {e.start})")
            stop = min(e.start + e.length, end)
            yield MapEntry.of(e, pos, stop - pos)
            pos = stop
            if pos >= end:
                break


def merge(entries: Iterable[MapEntry], human: bool = False) -> Iterator[MapEntry]:
    """Join entries the way qemu-img map does.  The human format ignores the difference
    between hole, zero and zero+data: once an entry has been output, the one that
    follows it is turned into a plain hole when it is not plain data."""
    cur: MapEntry | None = None
    for nxt in entries:
        if cur is not None and cur.mergeable(nxt):
            cur.length += nxt.length
            continue
        if cur is not None:
            yield cur
            if human and (not nxt.data or nxt.zero):
                nxt.data, nxt.zero = False, True
        cur = nxt
    if cur is not None:
        yield cur


class MapError(Exception):
    pass


def _human_line(e: MapEntry) -> str | None:
    if e.data and e.offset is None:
        raise MapError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        return (f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                f"{e.filename or ''}\n")
    return None


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def run_map(args: argparse.Namespace) -> int:
    from nbdqcow.block import hostfile

    hostfile.METADATA_ONLY = True  # what map shows must not depend on its own reads
    check_format(args)
    drv = open_image(args.file, args.format, writable=False,
                     image_opts=getattr(args, "image_opts", False), access=read_access(args))
    out = sys.stdout
    try:
        if args.output == "json":
            lines = [e.json() for e in merge(extents(drv))]
            out.write("[" + ",\n".join(lines) + "]\n")
            return 0
        out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        try:
            for e in merge(extents(drv), human=True):
                line = _human_line(e)
                if line:
                    out.write(line)
        except MapError as err:
            out.flush()
            print(f"nbdqcow: {err}", file=sys.stderr)
            return 1
        return 0
    finally:
        drv.close()


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("map", help="show the image's allocation map (qemu-img map)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default) or json: qemu-img map's formats")
    p.add_argument("-f", "--format", metavar="FORMAT",
                   help="image format: raw, qcow2, ... (probed when absent)")
    add_force_share(p)
    add_image_opts(p)
    p.add_argument("file", metavar="FILE", help="the image to map")
    p.set_defaults(func=run_map)
