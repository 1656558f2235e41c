"""``nbdqcow convert``: qemu-img convert's common command line for one source image:
``convert [-c] [--bitmaps [--skip-broken-bitmaps]] [-f FMT] [-O FMT] [-o OPTIONS] [-q]
SOURCE TARGET``.

The target is created (``create``'s options), then every run of the source that does not
read as zeros is copied; the new image reads zeros elsewhere.  With ``-c`` (qcow2
targets) every non-zero cluster is stored compressed (``Qcow2Driver.write_compressed``,
the image's compression type), as ``qemu-img convert -c`` stores it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.locking import PERM_ALL, Perm
from nbdqcow.cli.create import parse_o
from nbdqcow.cli.images import add_image_opts, check_format
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.errors import NbdqcowError
from nbdqcow.image import open_image, probe_file
from nbdqcow.qcow2.bitmap_store import add_stored_bitmaps, read_stored_bitmaps
from nbdqcow.qcow2.bitmaps import BitmapEntry
from nbdqcow.qcow2.create import CreateError, create_image
from nbdqcow.qcow2.driver import Qcow2Driver

CHUNK = 4 << 20


def _data_runs(src: BlockDriver, align: int) -> list[tuple[int, int]]:
    """[start, end) runs of ``src`` that may hold non-zero data, widened to ``align``."""
    runs: list[tuple[int, int]] = []
    pos, size = 0, src.size
    while pos < size:
        extents = src.block_status(pos, min(size - pos, 1 << 30)) if src.caps.block_status \
            else []
        if not extents:
            runs.append((pos, size))
            break
        for e in extents:
            if not e.zero:
                s = e.start - e.start % align
                t = min(size, -(-(e.start + e.length) // align) * align)
                if runs and s <= runs[-1][1]:
                    runs[-1] = (runs[-1][0], max(runs[-1][1], t))
                else:
                    runs.append((s, t))
        pos = extents[-1].start + extents[-1].length
    return runs


def copy(src: BlockDriver, dst: BlockDriver, compress: bool) -> None:
    if compress:
        assert isinstance(dst, Qcow2Driver)
        cs = dst.cluster_size
        for start, end in _data_runs(src, cs):
            for pos in range(start, end, cs):
                data = src.pread(pos, min(cs, end - pos))
                if data.strip(b"\0"):  # an all-zero cluster stays unallocated
                    dst.write_compressed(data, pos)
        return
    for start, end in _data_runs(src, 4096):
        for pos in range(start, end, CHUNK):
            data = src.pread(pos, min(CHUNK, end - pos))
            if data.strip(b"\0"):
                dst.pwrite(data, pos)


def _source_bitmaps(args: argparse.Namespace, src: BlockDriver,
                    ) -> list[tuple[BitmapEntry, bytes]]:
    """The persistent bitmaps ``--bitmaps`` copies: those of the source image itself."""
    if not args.bitmaps or not isinstance(src, Qcow2Driver):
        return []

    def refuse(name: str) -> None:
        raise NbdqcowError(f"Cannot copy inconsistent bitmap '{name}' (try "
                           "--skip-broken-bitmaps, or remove it with 'nbdqcow bitmap --remove')")

    def skip(name: str) -> None:
        print(f"nbdqcow: warning: Skipping inconsistent bitmap '{name}'", file=sys.stderr)

    return read_stored_bitmaps(src.file, src.header, skip if args.skip_broken else refuse)


def run_convert(args: argparse.Namespace) -> int:
    if args.skip_broken and not args.bitmaps:
        raise NbdqcowError("Use of --skip-broken-bitmaps requires --bitmaps")
    if len(args.files) < 2:
        raise NbdqcowError("Must specify image file name")
    if len(args.files) > 2:
        raise NbdqcowError("nbdqcow convert takes one source image")
    source, target = args.files
    out_fmt = args.out_format
    if args.compress and out_fmt != "qcow2":
        raise NbdqcowError("Compression not supported for this file format")
    opts = parse_o(args.options or [])
    check_format(args)
    # qemu-img convert's source: nobody may write or resize any layer while it is copied
    # (-U: share everything)
    access = replace(read_access(args), shared=PERM_ALL & ~(Perm.WRITE | Perm.RESIZE),
                     chain_shared=True)
    src = open_image(source, args.format, writable=False,
                     image_opts=getattr(args, "image_opts", False), access=access)
    try:
        bitmaps = _source_bitmaps(args, src)  # an inconsistent one is refused first
        if args.bitmaps and out_fmt != "qcow2":
            raise NbdqcowError(f"Format driver '{out_fmt}' does not support bitmaps")
        try:
            create_image(target, src.size, out_fmt, opts, probe=probe_file)
        except CreateError as e:
            raise CreateError(f"{target}: {e}") from None
        dst = open_image(target, out_fmt, writable=True)
        try:
            copy(src, dst, args.compress)
            if bitmaps:
                assert isinstance(dst, Qcow2Driver) and dst.live_bitmaps is not None
                add_stored_bitmaps(dst.live_bitmaps, bitmaps)
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("convert", help="copy an image, optionally compressed "
                                              "(qemu-img convert)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="store the target's clusters compressed (qcow2 targets)")
    p.add_argument("-f", dest="format", default=None, metavar="FMT",
                   help="format of SOURCE (probed if absent)")
    p.add_argument("-O", dest="out_format", default="raw", choices=("qcow2", "raw"),
                   help="format of TARGET (default raw, like qemu-img)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="TARGET's creation options (as create -o), e.g. compression_type=zstd")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy SOURCE's persistent dirty bitmaps too (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", dest="skip_broken", action="store_true",
                   help="with --bitmaps: leave out in-use (inconsistent) bitmaps, with a "
                        "warning, instead of refusing")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (no progress is shown)")
    add_force_share(p)
    add_image_opts(p)
    p.add_argument("files", nargs="*", metavar="SOURCE TARGET",
                   help="the image to copy and the image to create")
    p.set_defaults(func=run_convert)
