"""``nbdqcow create``: qemu-img create's command line (formats qcow2 and raw)."""

from __future__ import annotations

import argparse
import sys

from nbdqcow.cli.sizes import SizeError, parse_size
from nbdqcow.image import probe_file
from nbdqcow.qcow2.create import CreateError, create_image, option_help


def parse_o(values: list[str]) -> dict[str, str]:
    """``-o k=v,k2=v2`` (repeatable; ",," is a literal comma, later keys win)."""
    out: dict[str, str] = {}
    for text in values:
        items, cur, i = [], [], 0
        while i < len(text):
            if text[i] == ",":
                if text[i + 1 : i + 2] == ",":
                    cur.append(",")
                    i += 2
                    continue
                items.append("".join(cur))
                cur = []
            else:
                cur.append(text[i])
            i += 1
        items.append("".join(cur))
        for item in items:
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                if key == "help" or key == "?":
                    out["help"] = ""
                    continue
                raise CreateError(f"Invalid parameter '{key}'")
            out[key] = value
    return out


def run_create(args: argparse.Namespace) -> int:
    fmt = args.format
    opts = parse_o(args.options or [])
    if "help" in opts:
        sys.stdout.write(option_help(fmt))
        return 0
    if args.file is None:
        raise CreateError("Expecting image file name")
    size: int | None = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except SizeError:
            raise CreateError(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    try:
        create_image(
            args.file, size, fmt, opts, backing_file=args.backing,
            backing_fmt=args.backing_format, check_backing=not args.unsafe,
            require_backing_fmt=True,
            announce=None if args.quiet else (lambda line: print(line, flush=True)),
            probe=probe_file,
        )
    except CreateError as e:
        raise CreateError(f"{args.file}: {e}") from None
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("create", help="create a qcow2 or raw image (qemu-img create)")
    p.add_argument("-f", dest="format", default="raw", choices=("qcow2", "raw"),
                   help="image format (default raw, like qemu-img)")
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file")
    p.add_argument("-F", dest="backing_format", metavar="FMT", help="backing file format")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated k=v options; -o help lists them")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("file", nargs="?", metavar="FILE", help="the image to create")
    p.add_argument("size", nargs="?", metavar="SIZE", help="size with k/M/G/T/P/E suffix")
    p.set_defaults(func=run_create)
