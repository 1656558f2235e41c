"""``nbdqcow info``: qemu-img info's facts and output formats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nbdqcow.block.locking import Access
from nbdqcow.cli.images import add_image_opts, file_of
from nbdqcow.cli.locks import add_force_share, read_access
from nbdqcow.cli.sizes import format_size
from nbdqcow.image import NotPlainImage, image_tree, open_image, probe_file
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
    try:
        fmt, path = file_of(args)
    except NotPlainImage:  # a raw window, null-co, ...: described from the open stack
        chain = [(_stack_info(args, access), [])]
    else:
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


def _stack_info(args: argparse.Namespace, access: Access) -> Info:
    """What qemu-img info says of a driver stack that is more than a format over a file
    (a raw window, null-co): its size and format, named by qemu's canonical json:
    filename (keys in qemu's order, a ``file`` node's implied driver written out)."""
    tree = _with_file_drivers(image_tree(args.file, args.format, args.image_opts))
    drv = open_image(args.file, args.format, writable=False, image_opts=args.image_opts,
                     access=access)
    try:
        size = drv.size
    finally:
        drv.close()
    fmt = str(tree.get("driver", "raw"))
    info: Info = {"virtual-size": size,
                  "filename": "json:" + json.dumps(qemu_order(tree), separators=(", ", ": "),
                                                   ensure_ascii=False),
                  "format": fmt, "actual-size": _allocated(tree)}
    if not _on_null(tree):  # qemu shows it where the stack reports image facts
        info["dirty-flag"] = False
    return info


def _with_file_drivers(tree: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, child in tree.items():
        if isinstance(child, dict):
            out[key] = _with_file_drivers(child)
            if "filename" in child and "driver" not in child:
                out[key] = {"driver": "file", **out[key]}
    return out


def _on_null(tree: dict[str, Any]) -> bool:
    """The stack ends in null-co (which has no image facts for qemu to report)."""
    child = tree.get("file")
    if isinstance(child, dict):
        return _on_null(child)
    return tree.get("driver") == "null-co"


def _allocated(tree: dict[str, Any]) -> int:
    """Host bytes allocated to the first file of the stack (qemu-img's disk size)."""
    child = tree.get("file")
    if isinstance(child, dict):
        if child.get("driver") in ("file", "host_device") and isinstance(
                child.get("filename"), str):
            try:
                return os.stat(child["filename"]).st_blocks * 512
            except OSError:
                return 0
        return _allocated(child)
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
