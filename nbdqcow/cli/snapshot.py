"""``nbdqcow snapshot``: qemu-img snapshot's command line.

Each action is one entry of ``_ACTIONS`` (flag -> handler): ``-l`` lists, ``-c`` creates,
``-d`` deletes, ``-a`` applies (reverts to) a snapshot, on a closed image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from nbdqcow.block.hostfile import HostFile
from nbdqcow.cli.images import add_image_opts, file_of
from nbdqcow.cli.locks import add_force_share, read_access, write_access
from nbdqcow.cli.sizes import format_size
from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2.info import check_open_limits, read_header, snapshot_table_lines
from nbdqcow.qcow2.snapshot import read_snapshot_table
from nbdqcow.qcow2.snapshot_ops import apply_snapshot, create_snapshot, delete_snapshot


def list_snapshots(args: argparse.Namespace) -> int:
    path = _qcow2_only(args, write=False)
    f = HostFile(path, writable=False, lock=read_access(args).image("qcow2"))
    try:
        header = read_header(f)
        check_open_limits(header)
        snaps = read_snapshot_table(f, header)
    finally:
        f.close()
    if snaps:
        sys.stdout.write("Snapshot list:\n")
        sys.stdout.write("\n".join(snapshot_table_lines(snaps, format_size)) + "\n")
    return 0


def _qcow2_only(args: argparse.Namespace, write: bool = True) -> str:
    """The qcow2 file the arguments name."""
    if write:
        write_access(args)  # -U only reads
    fmt, path = file_of(args)
    if fmt != "qcow2":
        raise ImageOpenError(f"'{path}': {fmt} images have no internal snapshots")
    return path


def create(args: argparse.Namespace) -> int:
    create_snapshot(_qcow2_only(args), args.act_create, access=write_access(args))
    return 0


def delete(args: argparse.Namespace) -> int:
    delete_snapshot(_qcow2_only(args), args.act_delete, access=write_access(args))
    return 0


def apply(args: argparse.Namespace) -> int:
    apply_snapshot(_qcow2_only(args), args.act_apply, access=write_access(args))
    return 0


# action name -> (flag, takes a snapshot name, handler)
_HELP = {
    "list": "list the snapshots (qemu-img snapshot -l's table)",
    "create": "create snapshot SNAPSHOT of the current state",
    "delete": "delete snapshot SNAPSHOT (a name or an id)",
    "apply": "revert the disk to snapshot SNAPSHOT (a name or an id)",
}
_ACTIONS: dict[str, tuple[str, bool, Callable[[argparse.Namespace], int]]] = {
    "list": ("-l", False, list_snapshots),
    "create": ("-c", True, create),
    "delete": ("-d", True, delete),
    "apply": ("-a", True, apply),
}


def run_snapshot(args: argparse.Namespace) -> int:
    chosen = [name for name in _ACTIONS if getattr(args, f"act_{name}") not in (None, False)]
    if len(chosen) != 1:
        flags = "|".join(flag for flag, _, _ in _ACTIONS.values())
        raise ImageOpenError(f"choose exactly one of {flags}")
    return _ACTIONS[chosen[0]][2](args)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("snapshot", help="internal snapshots (qemu-img snapshot)")
    for name, (flag, takes_name, _) in _ACTIONS.items():
        if takes_name:
            p.add_argument(flag, dest=f"act_{name}", metavar="SNAPSHOT", default=None,
                           help=_HELP[name])
        else:
            p.add_argument(flag, dest=f"act_{name}", action="store_true", help=_HELP[name])
    p.add_argument("-f", dest="format", metavar="FORMAT", default=None,
                   help="image format (probed when absent)")
    add_image_opts(p)
    add_force_share(p)
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("file", metavar="FILE", help="the qcow2 image")
    p.set_defaults(func=run_snapshot)
