"""``nbdqcow info``: qemu-img info's facts and output formats."""

from __future__ import annotations

import argparse
import sys

from nbdqcow.cli.images import add_image_opts, file_of
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.cli.sizes import format_size
from nbdqcow.image import probe_file
from nbdqcow.qcow2.info import (
    Info,
    backing_chain,
    human_lines,
    image_info,
    qemu_order,
    to_json,
)
from nbdqcow.qcow2.snapshot import Snapshot


def run_info(args: argparse.Namespace) -> int:
    chain: list[tuple[Info, list[Snapshot]]]
    access = read_access(args, io=False)
    fmt, path = file_of(args)
    if args.backing_chain:
        chain = backing_chain(path, fmt, probe_file, access)
    else:
        snaps: list[Snapshot] = []
        chain = [(image_info(path, fmt, snaps, access), snaps)]
    if args.output == "json":
        if args.backing_chain:
            sys.stdout.write(to_json([qemu_order(i) for i, _ in chain]) + "\n")
        else:
            sys.stdout.write(to_json(qemu_order(chain[0][0])) + "\n")
        return 0
    blocks = ["\n".join(human_lines(i, s, format_size)) + "\n" for i, s in chain]
    sys.stdout.write("\n".join(blocks))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("info", help="show image facts (qemu-img info)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default) or json: qemu-img info's formats")
    p.add_argument("-f", "--format", dest="format", metavar="FORMAT", default=None,
                   help="image format: raw, qcow2, ... (probed when absent)")
    add_image_opts(p)
    p.add_argument("--backing-chain", action="store_true",
                   help="also describe every backing file")
    add_force_share(p)
    p.add_argument("file", metavar="FILE", help="the image to describe")
    p.set_defaults(func=run_info)
