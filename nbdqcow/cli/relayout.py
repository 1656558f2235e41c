"""``nbdqcow relayout FILE [-O NEWFILE]``: rewrite a fragmented image into the
constant-offset layout (host = guest + one constant), crash-safe, with a progress bar
on a terminal."""

from __future__ import annotations

import argparse
import os
import sys

from nbdqcow.cli.images import add_image_opts, qcow2_file_of
from nbdqcow.cli.locks import read_access, write_access
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.create import PREALLOC_MODES
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.layout_view import mapping_summary
from nbdqcow.qcow2.relayout import relayout

_BAR = 40


class _Bar:
    def __init__(self) -> None:
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        pct = done * 100 // max(1, total)
        if pct == self.shown:
            return
        self.shown = pct
        filled = _BAR * done // max(1, total)
        sys.stderr.write(f"\r    ({pct:3d}/100%) [{'#' * filled}{' ' * (_BAR - filled)}]")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_relayout(args: argparse.Namespace) -> int:
    pause = float(os.environ.get("NBDQCOW_RELAYOUT_TEST_PAUSE", "0") or 0)
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    # the specification's own file.locking=off / force-share=on (the latter only for a
    # relayout into another file: in place it writes the image), as qemu-img honours them
    access = write_access(args) if args.output is None else read_access(args, hint="")
    result = relayout(qcow2_file_of(args), args.output, _Bar() if show else None,
                      args.preallocation, _pause=pause, access=access,
                      durable=args.cache != "unsafe")
    if not args.quiet:
        d = Qcow2Driver.open(result.path, writable=False, backing=no_backing)
        try:
            verdict = mapping_summary(d).verdict
        finally:
            d.close()
        sys.stdout.write(f"{result.path}: {verdict}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "relayout", help="rewrite an image so that host = guest + one constant")
    p.add_argument("-O", dest="output", metavar="NEWFILE", default=None,
                   help="write the new layout to NEWFILE instead of replacing FILE")
    p.add_argument("-p", dest="progress", action="store_true", default=None,
                   help="show a progress bar (default: on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show the progress bar")
    p.add_argument("--preallocation", choices=[m for m in PREALLOC_MODES if m != "off"],
                   default=None, help="data area of the new image (default: falloc when "
                   "the old file is fully allocated, else metadata)")
    p.add_argument("-t", dest="cache", choices=("writeback", "unsafe"), default="writeback",
                   help="writeback (default): the new image is synced before it replaces "
                   "anything; unsafe (only with -O, qemu-img convert's default): nothing "
                   "is synced, a crash may leave NEWFILE incomplete")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    add_image_opts(p)
    p.add_argument("file", metavar="FILE", help="the qcow2 image to rewrite")
    p.set_defaults(func=run_relayout)
