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
from nbdqcow.cli.numpy_extras import defer
from nbdqcow.errors import ImageError, ImageOpenError, NbdqcowError

# subcommand modules, in help order, with their one-line help: a command line imports
# only the module of the command it names (start-up time; tests/unit/test_cli_help.py
# checks these lines against the modules')
_COMMANDS = {
    "serve": "serve an image over NBD (qemu-nbd options)",
    "create": "create a qcow2 or raw image (qemu-img create)",
    "info": "show image facts (qemu-img info)",
    "map": "show the image's allocation map (qemu-img map)",
    "check": "check (and repair) an image (qemu-img check)",
    "snapshot": "internal snapshots (qemu-img snapshot)",
    "bitmap": "persistent dirty bitmaps (qemu-img bitmap)",
    "convert": "copy an image, optionally compressed (qemu-img convert)",
    "layout": "draw the guest -> host layout (SVG or PNG)",
    "relayout": "rewrite an image so that host = guest + one constant",
    "ctl": "change or watch a running server (--control)",
}


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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; with ``only``, just that command's module is imported
    (the others are listed by name and help line)."""
    parser = QemuStyleParser(
        prog="nbdqcow",
        description="NBD server and qcow2 tools that never move a mapped cluster.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"nbdqcow {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=QemuStyleParser)
    for name, help_line in _COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_line)
            continue
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
        print(f"{parser.prog}: {_naming_the_file(args, e)}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{parser.prog}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _naming_the_file(args: argparse.Namespace, e: NbdqcowError) -> str:
    """Every error about an image names it, as qemu-img's do ("Could not open 'F': ...")."""
    msg = str(e)
    # (serve: the image layer names the file where qemu-nbd does; other refusals, e.g.
    # "Bitmap 'x' is not found", are worded as qemu-nbd words them)
    name = getattr(args, "file", None)
    names = getattr(args, "names", None)  # bitmap FILE NAME
    if name is None and isinstance(names, list) and names:
        name = names[0]
    if not isinstance(name, str) or not name or name in msg or not isinstance(e, ImageError):
        return msg
    if isinstance(e, ImageOpenError):
        return f"Could not open '{name}': {msg}"
    return f"'{name}': {msg}"


def main(argv: Sequence[str] | None = None) -> int:
    defer()  # numpy's unused parts are imported only if used (start-up time)
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    return run(args, build_parser(command if command in _COMMANDS else ""))


def qemu_nbd_main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nbdqcow-nbd``: qemu-nbd's command line, no subcommand."""
    defer()
    from nbdqcow.cli.serve import add_arguments

    parser = QemuStyleParser(prog="nbdqcow-nbd")
    add_arguments(parser)
    return run(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
