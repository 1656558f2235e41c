"""``nbdqcow info``: qemu-img info's facts and output formats."""

from __future__ import annotations

import argparse
import sys

from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.cli.sizes import format_size
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
    if args.backing_chain:
        chain = backing_chain(args.file, args.format, access)
    else:
        snaps: list[Snapshot] = []
        chain = [(image_info(args.file, args.format, snaps, access), snaps)]
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
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), default=None,
                   help="image format (probed when absent)")
    p.add_argument("--backing-chain", action="store_true",
                   help="also describe every backing file")
    add_force_share(p)
    p.add_argument("file", metavar="FILE", help="the image to describe")
    p.set_defaults(func=run_info)
