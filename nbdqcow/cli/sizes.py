"""Sizes on the command line: the parser lives in :mod:`nbdqcow.sizes` (the qcow2 engine
and the image layer use it too); this name stays for the commands."""

from nbdqcow.sizes import MAX_SIZE, SizeError, format_size, parse_size

__all__ = ["MAX_SIZE", "SizeError", "format_size", "parse_size"]
