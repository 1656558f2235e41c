"""Command line: argument parsing -> build the driver stack -> run.  No logic of its own.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module
sets ``func`` on its parser.  ``nbdqcow-nbd`` takes qemu-nbd's command line unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from nbdqcow import __version__
from nbdqcow.block.locking import ImageLocked
from nbdqcow.errors import NbdqcowError

# subcommand modules, in help order
_COMMANDS = ("serve", "create", "info", "map", "check", "snapshot", "bitmap", "layout",
             "relayout", "ctl")


class QemuStyleParser(argparse.ArgumentParser):
    """Usage errors the way qemu's tools report them: one line naming the option, exit
    status 1 -- never argparse's usage dump and status 2 (scripts test qemu-nbd's)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {_qemu_wording(message)}", file=sys.stderr)
        sys.exit(1)


def _qemu_wording(message: str) -> str:
    """argparse's message in the words getopt (and so qemu-nbd) uses, where they differ."""
    if message.startswith("unrecognized arguments: "):
        first = message[len("unrecognized arguments: "):].split(" ")[0]
        if first.startswith("-"):
            return f"unrecognized option '{first.split('=')[0]}' (see --help)"
        return f"unexpected argument '{first}' (see --help)"
    m = re.match(r"argument (-\w)?/?(--[\w-]+)?: expected one argument$", message)
    if m:
        short, long = m.group(1), m.group(2)
        if short:
            return f"option requires an argument -- '{short[1:]}'"
        return f"option '{long}' requires an argument"
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = QemuStyleParser(
        prog="nbdqcow",
        description="NBD server and qcow2 tools that never move a mapped cluster.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"nbdqcow {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=QemuStyleParser)
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(f"nbdqcow.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"nbdqcow.cli.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 1
    try:
        return int(func(args) or 0)
    except ImageLocked as e:
        from nbdqcow.cli.locks import locked_message

        print(f"{parser.prog}: {locked_message(args, e)}", file=sys.stderr)
        return 1
    except NbdqcowError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{parser.prog}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser())


def qemu_nbd_main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nbdqcow-nbd``: qemu-nbd's command line, no subcommand."""
    from nbdqcow.cli.serve import add_arguments

    parser = QemuStyleParser(prog="nbdqcow-nbd")
    add_arguments(parser)
    return run(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
