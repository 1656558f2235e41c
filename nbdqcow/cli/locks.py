"""qemu's image locks on the command line: -U / --force-share, and the refusal message."""

from __future__ import annotations

import argparse

from nbdqcow.block.locking import Access, ImageLocked, parse_locking
from nbdqcow.errors import ImageOpenError

U_HINT = "Use -U (--force-share) to read it anyway (the result may be inconsistent)."


def add_force_share(p: argparse.ArgumentParser, short: bool = True) -> None:
    """qemu-img's -U / --force-share: open read-only, sharing everything."""
    flags = ("-U", "--force-share") if short else ("--force-share",)
    p.add_argument(*flags, dest="force_share", action="store_true",
                   help="open read-only without refusing anyone: share the image with "
                        "writers (qemu's force-share); results may be inconsistent")


def _spec_locks(args: argparse.Namespace) -> tuple[bool, bool]:
    """(force-share, locking enabled) as the image's own specification (``json:`` or
    ``--image-opts``) says: ``force-share=on`` on the format or file node, ``locking=
    on|off|auto`` on the file node, which qemu-img honours as -U and as no locks."""
    name = getattr(args, "file", None) or getattr(args, "filename", None)
    image_opts = bool(getattr(args, "image_opts", False))
    if not isinstance(name, str) or not (image_opts or name.startswith("json:")):
        return False, True
    from nbdqcow.image import image_tree
    from nbdqcow.qemuopts import OptsError, parse_bool

    try:
        tree = image_tree(name, None, image_opts)
        child = tree.get("file")
        child = child if isinstance(child, dict) else {}
        force = any(parse_bool(node.get("force-share", False), "force-share")
                    for node in (tree, child))
        locking = child.get("locking", "auto")
        return force, parse_locking(locking if isinstance(locking, str) else "?")
    except OptsError as e:
        raise ImageOpenError(f"Could not open '{name}': {e}") from None


def read_access(args: argparse.Namespace, io: bool = True, hint: str = U_HINT) -> Access:
    """How a read-only inspection opens its image; a refusal then suggests ``hint``."""
    spec_force, enabled = _spec_locks(args)
    force = bool(getattr(args, "force_share", False)) or spec_force
    if not force:
        args.lock_hint = hint
    return Access(io=io, force_share=force, enabled=enabled)


def locked_message(args: argparse.Namespace, e: ImageLocked) -> str:
    """qemu's text for a refused open: "Could not open 'FILE': Failed to get "write"
    lock / Is another process using the image [FILE]?", who holds it, and the -U hint for
    read-only inspections (qemu-img create says "FILE: ..." instead)."""
    file = getattr(args, "file", None) or getattr(args, "filename", None) or e.path
    text = str(e)
    if getattr(args, "command", None) == "create":
        text = f"{file}: {text}"
    elif not text.startswith("Could not open '"):
        text = f"Could not open '{file}': {text}"
    hint = getattr(args, "lock_hint", None)
    if hint:
        text += f"\n{hint}"
    return text


def write_access(args: argparse.Namespace) -> Access:
    """How a command that modifies its image opens it (refuses -U as qemu-img does)."""
    spec_force, enabled = _spec_locks(args)
    if getattr(args, "force_share", False) or spec_force:
        file = getattr(args, "file", None) or getattr(args, "filename", None)
        raise ImageOpenError(
            f"Could not open '{file}': force-share=on can only be used with read-only images")
    return Access(write=True, enabled=enabled)
