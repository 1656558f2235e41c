"""How every command names its image: FILE, a ``json:`` filename, or ``--image-opts``
with qemu's option string; ``-f`` names the format (any driver the image layer knows)."""

from __future__ import annotations

import argparse

from nbdqcow.errors import NbdqcowError
from nbdqcow.image import image_file


def add_image_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-opts", action="store_true",
        help="FILE is an option string, as qemu's --image-opts "
             "(e.g. driver=qcow2,file.driver=file,file.filename=disk.qcow2)")


def check_format(args: argparse.Namespace, format_flag: str = "--format") -> None:
    """qemu's rule: a format comes from ``-f`` or from the option string, not both."""
    if getattr(args, "image_opts", False) and getattr(args, "format", None):
        raise NbdqcowError(f"--image-opts and {format_flag} are mutually exclusive")


def qcow2_file_of(args: argparse.Namespace) -> str:
    """The qcow2 file the arguments name (commands that only work on qcow2)."""
    fmt, path = file_of(args)
    if fmt != "qcow2":
        raise NbdqcowError(f"'{path}' is not a qcow2 image (format {fmt})")
    return path


def file_of(args: argparse.Namespace, name: str | None = None) -> tuple[str, str]:
    """(format, host file) of the image named by the arguments, for commands that work
    on the image file itself."""
    check_format(args)
    return image_file(name if name is not None else args.file, getattr(args, "format", None),
                      getattr(args, "image_opts", False))
