"""``nbdqcow serve`` / ``nbdqcow-nbd``: qemu-nbd's command line, served by nbdqcow."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from nbdqcow import __version__
from nbdqcow.block.driver import BlockDriver, DirtyBitmapSource
from nbdqcow.block.locking import PERM_ALL, Access, Perm
from nbdqcow.cli.argtypes import nonneg_int as _int
from nbdqcow.cli.images import add_image_opts, check_format
from nbdqcow.errors import NbdqcowError
from nbdqcow.image import image_tree, open_image, probe_file
from nbdqcow.server.budget import DEFAULT_LIMIT
from nbdqcow.server.exports import CACHE_MODES, DETECT_ZEROES_MODES, DISCARD_MODES, Export

if TYPE_CHECKING:
    from nbdqcow.server.serve import NbdServer

DEFAULT_PORT = 10809
DEFAULT_BIND = "0.0.0.0"




def _size(text: str) -> int:
    from nbdqcow.cli.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _buffer_size(text: str) -> int:
    from nbdqcow.nbd.constants import MAX_REQUEST

    n = _size(text)
    if n < MAX_REQUEST:  # the largest request must fit, or it would wait for ever
        raise argparse.ArgumentTypeError(f"must be at least {MAX_REQUEST >> 20}M")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """qemu-nbd's options (same names, same meaning) plus nbdqcow's own."""
    a = parser.add_argument
    a("filename", nargs="?", metavar="FILE", help="image to serve")
    a("-p", "--port", type=_int, default=None, help=f"TCP port to listen on (default {DEFAULT_PORT})")
    a("-b", "--bind", default=None, help=f"interface to bind to (default {DEFAULT_BIND})")
    a("-k", "--socket", metavar="PATH", help="listen on a unix socket instead of TCP")
    a("-x", "--export-name", default="", metavar="NAME", help="export name (default empty)")
    a("-D", "--description", default="", metavar="TEXT", help="export description")
    a("-r", "--read-only", action="store_true", help="export read-only")
    a("--force-share", action="store_true",
      help="with -r: serve the image even while others write it, refusing no one "
           "(qemu's force-share=on); reads may be inconsistent")
    a("-t", "--persistent", action="store_true", help="don't exit after the last client")
    a("-e", "--shared", type=_int, default=1, metavar="NUM",
      help="clients served at once (default 1, 0 = unlimited)")
    a("-f", "--format", metavar="FORMAT",
      help="image format: raw, qcow2, ... (probed when absent, as qemu-nbd)")
    add_image_opts(parser)
    a("-o", "--offset", type=_int, default=0, help="offset into a raw image")
    a("-l", "--load-snapshot", metavar="SNAPSHOT",
      help="serve an internal snapshot read-only: NAME, ID, snapshot.name=NAME or "
           "snapshot.id=ID")
    a("-s", "--snapshot", action="store_true",
      help="serve a temporary qcow2 overlay; the image is not modified")
    a("-A", "--allocation-depth", action="store_true",
      help="expose the qemu:allocation-depth metadata context")
    a("-B", "--bitmap", action="append", default=[], metavar="NAME",
      help="expose a persistent dirty bitmap as qemu:dirty-bitmap:NAME (kept current by writes)")
    a("--discard", choices=(*DISCARD_MODES, "off", "on"), default="ignore",
      help="honour TRIM (unmap, or on) or not (ignore, or off)")
    a("--detect-zeroes", choices=DETECT_ZEROES_MODES, default="off",
      help="turn writes of zeroes into zero writes")
    a("--cache", choices=CACHE_MODES, default="writeback", help="cache mode")
    a("-n", "--nocache", action="store_const", const="none", dest="cache",
      help="same as --cache=none")
    a("--aio", choices=("threads", "native", "io_uring"), default="threads",
      help="accepted for compatibility")
    a("-T", "--trace", action="append", default=[], metavar="PATTERN",
      help="accepted for compatibility (qemu's trace events; nbdqcow has none)")
    a("--fork", action="store_true", help="fork into the background once ready")
    a("--pid-file", metavar="PATH", help="write the server's pid here")
    a("-v", "--verbose", action="count", default=0,
      help="as qemu-nbd: keep stderr open after --fork (nothing more is printed)")
    a("--log-connections", action="store_true",
      help="log each connection and disconnection to stderr (nbdqcow only)")
    a("-c", "--connect", metavar="DEV", help="attach the image to the kernel NBD device DEV")
    a("-d", "--disconnect", metavar="DEV", help="detach the kernel NBD device DEV")
    a("--selinux-label", metavar="LABEL", help="SELinux label of the unix socket")
    a("-V", "--version", action="version", version=f"nbdqcow {__version__}",
      help="print the version and exit")
    a("-L", "--list", action="store_true", help="list the exports of a server (client mode)")
    from nbdqcow.cli.tlsopts import add_tls_arguments

    add_tls_arguments(parser)
    a("--mapping", choices=("preserve", "release", "thin"), default=None,
      help="qcow2 mapping policy for discard and zero writes: preserve (keep mapping and "
           "space, erase the data), release (free the cluster, punch a hole), thin (keep "
           "the mapping, punch a hole)")
    a("--cache-size", type=_size, default=None, help="qcow2 metadata cache size")
    a("--export", action="append", default=[], metavar="NAME=FILE[,KEY=VALUE...]",
      help="serve FILE as export NAME (repeatable; KEY: the long name of a per-export "
           "option, e.g. read-only=on,description=TEXT,format=qcow2) (nbdqcow only)")
    a("--config", metavar="FILE", help="exports and server options from a TOML file; "
      "SIGHUP re-reads it (nbdqcow only)")
    a("--control", metavar="PATH", help="control socket for `nbdqcow ctl` (nbdqcow only)")
    a("--metrics", metavar="ADDR:PORT",
      help="serve OpenMetrics statistics at http://ADDR:PORT/metrics (nbdqcow only)")
    a("--max-buffer", type=_buffer_size, default=None, metavar="SIZE",
      help="memory for buffered request and reply data of all clients together "
           "(default 128M, at least 64M); clients over their share wait")
    parser.set_defaults(func=run_serve)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("serve", help="serve an image over NBD (qemu-nbd options)")
    add_arguments(p)


# --- -L ----------------------------------------------------------------------------------------
def _connect_for_list(args: argparse.Namespace) -> socket.socket:
    if args.socket:
        where = args.socket
    else:
        host = args.bind or "localhost"
        if host in ("0.0.0.0", "::"):
            host = "localhost"
        where = f"{host}:{args.port or DEFAULT_PORT}"
    try:
        if args.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(args.socket)
            except OSError:
                s.close()
                raise
            return s
        return socket.create_connection((host, args.port or DEFAULT_PORT))
    except OSError as e:  # qemu-nbd -L's words
        raise NbdqcowError(f"Failed to connect to '{where}': {e.strerror or e}") from None


def run_list(args: argparse.Namespace) -> int:
    from nbdqcow.cli.tlsopts import list_starttls
    from nbdqcow.server.listing import format_listing, list_exports

    with contextlib.closing(_connect_for_list(args)) as s:
        print(format_listing(list_exports(s, list_starttls(args))))
    return 0


# --- -s -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def temporary_overlay(name: str, fmt: str | None, image_opts: bool = False) -> Iterator[str]:
    """A qcow2 overlay backed by the image ``name`` in a temporary directory (qemu-nbd
    -s).  A ``json:`` or ``--image-opts`` image becomes a ``json:`` backing file name."""
    tmpdir = tempfile.mkdtemp(prefix="nbdqcow-snapshot-")
    overlay = os.path.join(tmpdir, "overlay.qcow2")
    try:
        _create_overlay(overlay, name, fmt, image_opts)
        yield overlay
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _create_overlay(overlay: str, name: str, fmt: str | None, image_opts: bool) -> None:
    import json

    from nbdqcow.qcow2.create import create_image

    base = open_image(name, fmt, writable=False, image_opts=image_opts)
    size = base.size
    base.close()
    if image_opts or name.startswith("json:"):
        backing = "json:" + json.dumps(image_tree(name, fmt, image_opts))
        bfmt = None
    else:
        backing, bfmt = os.path.abspath(name), fmt or probe_file(name)
    create_image(overlay, size, "qcow2", backing_file=backing, backing_fmt=bfmt,
                 check_backing=False)


# --- serve --------------------------------------------------------------------------------------
def _listeners(args: argparse.Namespace) -> list[socket.socket]:
    from nbdqcow.server import serve as srv

    if args.connect:
        # -c: a private socket that only nbd-client uses
        if args.socket is None:
            args.socket = os.path.join(tempfile.mkdtemp(prefix="nbdqcow-connect-"), "nbd.sock")
        return [srv.unix_listener(args.socket)]
    if args.socket:
        if args.port is not None or args.bind is not None:
            raise NbdqcowError("--socket cannot be combined with --port or --bind")
        return [srv.unix_listener(args.socket)]
    if args.port is None and args.bind is None and srv.socket_activation_requested():
        socks = srv.inherited_listeners()
        if socks:
            return socks
    return srv.tcp_listeners(args.bind or DEFAULT_BIND, DEFAULT_PORT if args.port is None
                             else args.port)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.log_connections else logging.WARNING,
        format="nbdqcow: %(message)s",
    )
    if args.disconnect:
        from nbdqcow.cli.kernel_nbd import disconnect

        return disconnect(args.disconnect)
    from nbdqcow.cli.tlsopts import tls_settings

    args.tls = tls_settings(args, "client" if args.list else "server")
    if args.list:
        return run_list(args)
    if args.selinux_label is not None:
        _check_selinux(args)
    if args.connect:
        from nbdqcow.cli.kernel_nbd import check_device

        check_device(args.connect)
    if args.export or args.config:
        from nbdqcow.cli.exports_config import run_multi

        return run_multi(args)
    if not args.filename:
        raise NbdqcowError("an image file is required (see --help)")
    with contextlib.ExitStack() as stack:
        export = open_export(args, stack)
        listeners = _listeners(args)
        return _serve(args, [export], listeners)
    return 0  # pragma: no cover - the with block always returns


def open_export(args: argparse.Namespace, stack: contextlib.ExitStack) -> Export:
    """Open the image of one export as the per-export options in ``args`` say; the
    driver is closed (and a -s overlay removed) when ``stack`` closes."""
    if args.load_snapshot:
        args.load_snapshot = snapshot_spec(args.load_snapshot)
    if args.detect_zeroes == "unmap" and args.discard not in ("unmap", "on"):
        raise NbdqcowError("--detect-zeroes=unmap needs --discard=unmap")
    args.discard = {"off": "ignore", "on": "unmap"}.get(args.discard, args.discard)
    readonly = args.read_only or bool(args.load_snapshot)
    force_share = bool(getattr(args, "force_share", False))
    if force_share and not readonly:
        raise NbdqcowError("force-share=on can only be used with read-only images")
    if readonly and not force_share:
        args.lock_hint = ("Use --force-share (with -r) to serve it anyway (reads may be "
                          "inconsistent).")
    # a qemu-nbd export lets others read and write the image but not resize it
    access = Access(write=not readonly, force_share=force_share,
                    shared=PERM_ALL & ~Perm.RESIZE)
    check_format(args, "-f")
    name, fmt = args.filename, args.format
    image_opts = getattr(args, "image_opts", False)
    if args.snapshot:
        name = stack.enter_context(temporary_overlay(name, fmt, image_opts))
        fmt, image_opts = "qcow2", False
    driver = open_image(
        name, fmt, writable=not readonly, image_opts=image_opts, offset=args.offset,
        snapshot=args.load_snapshot, cache_size=args.cache_size, mapping=args.mapping,
        access=access, warn=lambda text: print(text, file=sys.stderr, flush=True),
    )
    stack.callback(driver.close)
    return Export(
        name=args.export_name,
        driver=driver,
        description=args.description,
        readonly=readonly,
        allocation_depth=args.allocation_depth,
        discard=args.discard,
        detect_zeroes=args.detect_zeroes,
        cache=args.cache,
        multi_conn=args.shared != 1,
        bitmaps=_bitmaps(driver, args.bitmap),
        source=args.filename,
    )


def snapshot_spec(text: str) -> str:
    """``-l``'s value: a name or id, or qemu's ``snapshot.name=N`` / ``snapshot.id=I``."""
    if "=" in text:
        from nbdqcow.qemuopts import OptsError, parse_opts

        try:
            opts = parse_opts(text)
        except OptsError:
            return text
        if set(opts) <= {"snapshot.name", "snapshot.id"} and opts:
            return opts.get("snapshot.id") or opts["snapshot.name"]
    return text


def _check_selinux(args: argparse.Namespace) -> None:
    """qemu-nbd's rules for --selinux-label: unix sockets only, and SELinux must be there
    to set the label (this build cannot set one: refuse rather than serve unlabelled)."""
    if not args.socket:
        raise NbdqcowError("--selinux-label is not permitted without --socket")
    why = "SELinux is not enabled on this host" if not os.path.isdir("/sys/fs/selinux") \
        else "setting socket labels is not supported by nbdqcow"
    raise NbdqcowError(f"Cannot set SELinux socket create context to {args.selinux_label}: {why}")


def _bitmaps(driver: BlockDriver, names: list[str]) -> tuple[DirtyBitmapSource, ...]:
    """The -B bitmaps, in the order qemu-nbd 7.2 lists their contexts (last given first)."""
    if not names:
        return ()
    from nbdqcow.qcow2.bitmaps import find_dirty_bitmap

    return tuple(find_dirty_bitmap(driver, name) for name in reversed(dict.fromkeys(names)))


def _attach_in_background(dev: str, socket_path: str, name: str) -> None:
    """-c: nbd-client connects to this very server, so it must not run on the event loop;
    if it fails the server stops (as qemu-nbd exits when the device cannot be set up)."""
    import signal
    import threading

    from nbdqcow.cli.kernel_nbd import attach

    def work() -> None:
        from nbdqcow.block.signals import block_stop_signals

        block_stop_signals()
        try:
            attach(dev, socket_path, name)
        except NbdqcowError as e:
            print(f"nbdqcow: {e}", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=work, daemon=True).start()


def _serve(args: argparse.Namespace, exports: list[Export], listeners: list[socket.socket],
           setup: Callable[[NbdServer], None] | None = None) -> int:
    """Serve ``exports``; ``setup`` configures the server before it starts (several
    exports: default export, control socket, metrics, SIGHUP)."""
    from nbdqcow.server.serve import NbdServer, run

    ready_fd = -1
    if args.fork:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(wfd)
            ok = os.read(rfd, 1)
            os._exit(0 if ok == b"1" else 1)
        os.close(rfd)
        os.setsid()
        ready_fd = wfd
    if args.pid_file:  # complete when it appears (scripts wait for it, then read it)
        tmp = f"{args.pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.pid_file)

    def ready() -> None:
        if args.connect:
            _attach_in_background(args.connect, args.socket, exports[0].name)
        if ready_fd >= 0:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1) if args.verbose else (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)

    from nbdqcow.server.serve import HANDSHAKE_LIMIT, TlsConfig

    creds, authz = args.tls
    server = NbdServer(exports, shared=args.shared, persistent=args.persistent,
                       max_buffer=args.max_buffer or DEFAULT_LIMIT,
                       tls=TlsConfig(creds, authz) if creds is not None else None,
                       handshake_limit=HANDSHAKE_LIMIT if args.handshake_limit is None
                       else args.handshake_limit)
    if setup is not None:
        setup(server)
    try:
        run(server, listeners, ready)
    finally:
        if args.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)
    sys.stdout.flush()
    return 0
