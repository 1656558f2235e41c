"""``nbdqcow bitmap``: qemu-img bitmap's command line (persistent dirty bitmaps).

``--add [-g G] [--disable]``, ``--remove``, ``--clear``, ``--enable``, ``--disable`` and
``--merge SOURCE [-b SOURCE_FILE [-F SOURCE_FMT]]``, several in one call, applied in the
order given; the first that fails stops the rest (what was done before it is kept, as
qemu-img keeps it) and is reported in qemu-img's words, exit status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from nbdqcow.block.driver import DirtyBitmapSource, DirtyRun
from nbdqcow.cli.images import add_image_opts, file_of
from nbdqcow.cli.locks import write_access
from nbdqcow.cli.sizes import SizeError, parse_size
from nbdqcow.errors import ImageOpenError, NbdqcowError
from nbdqcow.image import probe_file
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.bitmap_store import BitmapOpError, LiveBitmap, LiveBitmaps
from nbdqcow.qcow2.driver import Qcow2Driver

DEFAULT_GRANULARITY = 64 * 1024
_OPS = ("add", "remove", "clear", "enable", "disable", "merge")


class _Op(argparse.Action):
    """Record an action in ``ops``, in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        arg = values[0] if isinstance(values, list) and values else None
        ns.ops = [*ns.ops, (self.dest, arg)]


def _check_args(args: argparse.Namespace) -> tuple[str, str]:
    ops = {op for op, _ in args.ops}
    if not ops:
        raise NbdqcowError("Need at least one of --add, --remove, --clear, --enable, "
                           "--disable, or --merge")
    if args.granularity is not None and "add" not in ops:
        raise NbdqcowError("granularity only supported with --add")
    if args.source_fmt is not None and args.source_file is None:
        raise NbdqcowError("-F only supported with -b")
    if args.source_file is not None and "merge" not in ops:
        raise NbdqcowError("Merge bitmap source file only supported with --merge")
    if len(args.names) != 2:
        raise NbdqcowError("Expecting filename and bitmap name")
    return args.names[0], args.names[1]


def _granularity(text: str | None) -> int:
    if text is None:
        return DEFAULT_GRANULARITY
    try:
        return parse_size(text)
    except SizeError:
        raise NbdqcowError("Invalid granularity specified. You may use k, M, G, T, P or E "
                           "suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                           "petabytes and exabytes.") from None


def _runs(src: DirtyBitmapSource, size: int) -> list[DirtyRun]:
    out: list[DirtyRun] = []
    pos = 0
    while pos < size:
        got = src.dirty_runs(pos, size - pos, 1 << 16)
        out.extend(r for r in got if r.dirty)
        pos = got[-1].start + got[-1].length
    return out


def _merge_source(args: argparse.Namespace, live: LiveBitmaps, name: str,
                  ) -> tuple[list[DirtyRun], int]:
    """The dirty runs of bitmap ``name`` (of -b SOURCE_FILE, else of the image itself)
    and the disk size it covers."""
    if args.source_file is None:
        b = live.get(name)
        if b.inconsistent:
            raise BitmapOpError(f"Bitmap '{name}' is inconsistent and cannot be used")
        return _runs(b, b.disk_size), b.disk_size
    path = args.source_file
    fmt = args.source_fmt or probe_file(path)
    if fmt != "qcow2":
        if fmt != "raw":
            raise NbdqcowError(f"Unknown driver '{fmt}'")
        raise BitmapOpError(f"Dirty bitmap '{name}' not found")
    from nbdqcow.qcow2.bitmaps import BitmapEntry, DirtyBitmap, read_directory, validate_entry

    src = Qcow2Driver.open(path, writable=False, backing=no_backing)
    try:
        h = src.header
        entry: BitmapEntry | None = next(
            (e for e in read_directory(src.file, h) if e.name == name), None)
        if entry is None:
            raise BitmapOpError(f"Dirty bitmap '{name}' not found")
        if entry.in_use:
            raise BitmapOpError(f"Bitmap '{name}' is inconsistent and cannot be used")
        validate_entry(entry, h, src.file.size())
        bm = DirtyBitmap(src.file, entry, h.cluster_size, h.size)
        bm.check()
        return _runs(bm, h.size), h.size
    finally:
        src.close()


def _apply(args: argparse.Namespace, live: LiveBitmaps, op: str, arg: str | None,
           name: str) -> None:
    if op == "add":
        live.add(name, _granularity(args.granularity))
    elif op == "remove":
        live.remove(name)
    elif op == "clear":
        live.get(name).clear()
    elif op in ("enable", "disable"):
        live.set_enabled(name, op == "enable")
    else:
        assert arg is not None
        target: LiveBitmap = live.get(name)
        if target.inconsistent:
            raise BitmapOpError(f"Bitmap '{name}' is inconsistent and cannot be used")
        runs, size = _merge_source(args, live, arg)
        if size != target.disk_size:
            raise BitmapOpError(
                f"Bitmaps are of different sizes (destination size is {target.disk_size}, "
                f"source size is {size}) and can't be merged")
        target.merge(runs)


def run_bitmap(args: argparse.Namespace) -> int:
    path, name = _check_args(args)
    args.file = path  # the image as named, for qemu's lock messages and lock options
    _granularity(args.granularity)  # a bad -g is a usage error: the image is not touched
    fmt, path = file_of(args, path)  # a file name, json: or --image-opts
    first_op = args.ops[0][0]
    if fmt != "qcow2":
        if fmt != "raw":
            raise NbdqcowError(f"Unknown driver '{fmt}'")
        raise NbdqcowError(f"Operation {first_op} on bitmap {name} failed: Can't store "
                           f"persistent bitmaps to '{path}': Operation not supported")
    drv = Qcow2Driver.open(path, writable=True, backing=no_backing, access=write_access(args))
    try:
        live = drv.live_bitmaps
        if live is None:  # pragma: no cover - every writable open of the active layer has it
            raise ImageOpenError(f"'{path}': bitmaps cannot be changed")
        for op, arg in args.ops:
            try:
                _apply(args, live, op, arg, name)
            except BitmapOpError as e:
                raise NbdqcowError(f"Operation {op} on bitmap {name} failed: {e}") from None
    finally:
        drv.close()  # stores what was done, even when an operation failed
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bitmap", help="persistent dirty bitmaps (qemu-img bitmap)",
        description="Change the persistent dirty bitmaps of a qcow2 image, as qemu-img "
                    "bitmap does: several actions in one call are applied in order.")
    p.set_defaults(ops=[], func=run_bitmap)
    p.add_argument("--add", nargs=0, action=_Op,
                   help="add bitmap NAME, enabled (--add --disable: added disabled)")
    p.add_argument("--remove", nargs=0, action=_Op, help="remove bitmap NAME")
    p.add_argument("--clear", nargs=0, action=_Op, help="clear every bit of NAME")
    p.add_argument("--enable", nargs=0, action=_Op, help="NAME tracks writes")
    p.add_argument("--disable", nargs=0, action=_Op,
                   help="NAME stops tracking writes")
    p.add_argument("--merge", nargs=1, action=_Op, metavar="SOURCE",
                   help="set in NAME every bit set in bitmap SOURCE (of -b SOURCE_FILE, "
                        "else of FILE)")
    p.add_argument("-g", "--granularity", default=None, metavar="G",
                   help="with --add: bytes per bit (power of 2, 512 to 2G; default 64k)")
    p.add_argument("-b", dest="source_file", default=None, metavar="SOURCE_FILE",
                   help="with --merge: the image holding bitmap SOURCE")
    p.add_argument("-F", dest="source_fmt", default=None, metavar="SOURCE_FMT",
                   help="with -b: format of SOURCE_FILE (qcow2 or raw; probed if absent)")
    p.add_argument("-f", dest="format", default=None, metavar="FMT",
                   help="format of FILE (qcow2; probed if absent)")
    add_image_opts(p)
    p.add_argument("names", nargs="*", metavar="FILE NAME", help="the image and the bitmap")
