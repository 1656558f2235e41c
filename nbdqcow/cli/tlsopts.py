"""``--object``, ``--tls-creds``, ``--tls-authz`` and ``--handshake-limit`` checked and
turned into the server's (or ``-L``'s) TLS settings, with qemu-nbd's messages."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from nbdqcow.cli.argtypes import nonneg_int as _int
from nbdqcow.errors import NbdqcowError

if TYPE_CHECKING:  # ssl and the TLS code are imported only when TLS is used
    from nbdqcow.tls.authz import Authz
    from nbdqcow.tls.client import BlockingTls
    from nbdqcow.tls.creds import TlsCreds
    from nbdqcow.tls.objects import ObjectRegistry




def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """qemu-nbd's --object, --tls-creds, --tls-authz, --tls-hostname, --handshake-limit."""
    a = parser.add_argument
    a("--object", action="append", default=[], metavar="TYPE,id=ID,...",
      help="define an object: tls-creds-x509, tls-creds-psk, tls-creds-anon, "
           "authz-simple, authz-list, authz-list-file, secret (qemu's syntax)")
    a("--tls-creds", metavar="ID", help="serve over TLS with this --object's credentials")
    a("--tls-authz", metavar="ID", help="admit only the TLS clients this --object allows")
    a("--tls-hostname", metavar="NAME",
      help="with -L: the server name its certificate must carry")
    a("--handshake-limit", type=_int, default=None, metavar="SECONDS",
      help="seconds a client has to finish the handshake, TLS included "
           "(default 10, 0 = no limit)")


def objects(args: argparse.Namespace) -> ObjectRegistry:
    from nbdqcow.tls.objects import ObjectRegistry

    reg = ObjectRegistry()
    for text in args.object:
        reg.add(text)
    return reg


def tls_settings(args: argparse.Namespace, endpoint: str
                 ) -> tuple[TlsCreds | None, Authz | None]:
    """The credentials and authorization object the command line names."""
    reg = objects(args)
    if args.tls_authz and not args.tls_creds:
        raise NbdqcowError("--tls-authz is not permitted without --tls-creds")
    if args.tls_hostname and not args.list:
        raise NbdqcowError("--tls-hostname is only permitted with --list")
    if args.tls_hostname and not args.tls_creds:
        raise NbdqcowError("--tls-hostname is not permitted without --tls-creds")
    if not args.tls_creds:
        return None, None
    creds = reg.creds(args.tls_creds, endpoint)
    authz = reg.authz(args.tls_authz) if args.tls_authz else None
    if authz is not None and (creds.kind == "anon" or
                              (creds.kind == "x509" and not creds.verify_peer)):
        # qemu-nbd would start and then skip the check for every client
        raise NbdqcowError("--tls-authz needs credentials that identify the client "
                           "(tls-creds-x509 with verify-peer=on, or tls-creds-psk)")
    return creds, authz


def list_starttls(args: argparse.Namespace) -> Callable[[socket.socket], BlockingTls] | None:
    """For ``-L`` with ``--tls-creds`` (endpoint=client): the TLS upgrade of the listing
    connection; the server's certificate must name ``--tls-hostname``, else the host
    connected to (no name check over a unix socket without ``--tls-hostname``)."""
    creds, _ = args.tls
    if creds is None:
        return None
    host = args.tls_hostname
    if host is None and not args.socket:
        host = args.bind if args.bind not in (None, "0.0.0.0", "::") else "localhost"
    if host is None and creds.kind == "x509" and creds.verify_peer:
        raise NbdqcowError("No hostname for certificate validation")  # qemu-nbd's words

    def upgrade(sock: socket.socket) -> BlockingTls:
        from nbdqcow.tls.client import BlockingTls

        return BlockingTls(sock, creds.session(host))

    return upgrade
