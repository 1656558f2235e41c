"""``nbdqcow check``: qemu-img check's verdicts, figures, output formats and exit codes."""

from __future__ import annotations

import argparse
import sys

from nbdqcow.block.driver import BlockDriver
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.cli.images import add_image_opts, file_of
from nbdqcow.cli.locks import add_force_share, read_access, write_access
from nbdqcow.errors import ImageOpenError, NbdqcowError
from nbdqcow.qcow2.check import CheckResult, check_file
from nbdqcow.qcow2.info import qemu_order, to_json

EXIT_NOT_SUPPORTED = 63


def human_report(res: CheckResult, repaired: bool) -> str:
    """qemu-img check's human output (stdout part)."""
    out: list[str] = []
    if repaired:
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n"
                   f"    {res.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    if res.total_clusters and res.allocated_clusters:
        a, t = res.allocated_clusters, res.total_clusters
        out.append(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
                   f"{res.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                   f"{res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n")
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)


def run_check(args: argparse.Namespace) -> int:
    fmt, path = file_of(args)
    if fmt != "qcow2":
        if fmt == "raw":
            print("nbdqcow: This image format does not support checks", file=sys.stderr)
            return EXIT_NOT_SUPPORTED
        raise ImageOpenError(f"image format '{fmt}' is not supported by nbdqcow")
    access = write_access(args) if args.repair is not None else read_access(args)
    try:
        file = HostFile(path, writable=args.repair is not None,
                        lock=access.image("qcow2"))
    except OSError as e:
        raise ImageOpenError(f"Could not open '{path}': {e.strerror}") from None
    try:
        backing = _open_backing_chain(file, path, access)
        try:
            res = check_file(file, args.file, args.repair)  # qemu-img names it as given
        finally:
            if backing is not None:
                backing.close()
    finally:
        file.close()
    for line in res.messages:
        print(line, file=sys.stderr)
    if res.failure:
        print(f"nbdqcow: Check failed: {res.failure}", file=sys.stderr)
        return 1
    if args.output == "json":
        sys.stdout.write(to_json(qemu_order(res.to_dict())) + "\n")
    elif not args.quiet:
        sys.stdout.write(human_report(res, bool(res.leaks_fixed or res.corruptions_fixed)))
        sys.stdout.write(mapping_line(path, Access(force_share=access.force_share), res))
    return res.exit_code


def _open_backing_chain(file: HostFile, path: str, access: Access) -> BlockDriver | None:
    """qemu-img check opens the backing chain with the image, so the chain's locks are
    taken and tested too (a layer another process writes refuses the check, in qemu's
    words).  A chain that cannot be opened for any other reason is left alone: the check
    itself reads only the image."""
    from nbdqcow.image import open_backing_file
    from nbdqcow.qcow2.check.stored import read_header

    try:
        h = read_header(file)
        if not h.backing_file:
            return None
        return open_backing_file(path, h.backing_file, h.backing_format, access)
    except ImageLocked:
        raise
    except (NbdqcowError, OSError, ValueError):
        return None


def mapping_line(path: str, access: Access | None = None,
                 res: CheckResult | None = None) -> str:
    """nbdqcow's own last line: the guest->host mapping in words (issue 4), e.g.
    "Mapping: constant: host = guest + 0x50000"; empty if the image cannot be walked.
    A clean check's walk already knows where every cluster lies: no second walk then."""
    if (res is not None and res.guest_map is not None and not res.corruptions
            and not res.check_errors and not res.failure):
        return f"Mapping: {res.guest_map.summary().verdict}\n"
    from nbdqcow.qcow2.layout_view import mapping_verdict

    verdict = mapping_verdict(path, access)
    return f"Mapping: {verdict}\n" if verdict else ""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("check", help="check (and repair) an image (qemu-img check)")
    p.add_argument("-r", "--repair", choices=("leaks", "all"),
                   help="repair leaked clusters, or everything that can be repaired")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default) or json: qemu-img check's formats")
    p.add_argument("-f", "--format", metavar="FORMAT",
                   help="image format: raw, qcow2, ... (probed when absent)")
    add_image_opts(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    add_force_share(p)
    p.add_argument("file", metavar="FILE", help="the image to check")
    p.set_defaults(func=run_check)
