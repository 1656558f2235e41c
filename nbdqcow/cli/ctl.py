"""``nbdqcow ctl -c PATH COMMAND``: talk to a running server's control socket."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from nbdqcow.errors import NbdqcowError


def request(path: str, req: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Send one request, return the reply (raises with the server's one-line error)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise NbdqcowError(f"{path}: the server closed the control connection")
                buf += chunk
    except OSError as e:
        raise NbdqcowError(f"cannot reach the control socket {path}: "
                           f"{e.strerror or e}") from None
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise NbdqcowError(f"{path}: unexpected reply")
    if not reply.pop("ok", False):
        raise NbdqcowError(str(reply.get("error", "failed")))
    return reply


def _options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise NbdqcowError(f"expected KEY=VALUE, got '{item}'")
        out[k] = v
    return out


def _human(cmd: str, reply: dict[str, Any]) -> str:
    if cmd == "list":
        lines = [f"{'NAME':<16} {'SIZE':>14} {'MODE':<4} {'CLIENTS':>7}  SOURCE"]
        for e in reply["exports"]:
            lines.append(f"{e['name'] or '(empty)':<16} {e['size']:>14} "
                         f"{'ro' if e['readonly'] else 'rw':<4} {e['clients']:>7}  {e['source']}")
        return "\n".join(lines)
    if cmd == "stats":
        srv = reply["server"]
        lines = [f"server: {srv['exports']} exports, {srv['connections']} connections "
                 f"({srv['connections_total']} accepted, {srv['handshakes_failed']} without "
                 "transmission)"]
        if "memory_budget_used" in srv:
            lines.append(f"memory budget: {srv['memory_budget_used']} of "
                         f"{srv.get('memory_budget_limit', '?')} bytes")
        for name, st in reply["exports"].items():
            reqs = ", ".join(f"{k} {v}" for k, v in st["requests"].items() if v)
            lines.append(f"export {name!r}: {st['connections']} clients, "
                         f"{st['inflight_requests']} in flight; requests: {reqs or 'none'}")
            errs = ", ".join(f"errno {k}: {v}" for k, v in st["errors"].items())
            if errs:
                lines.append(f"  errors: {errs}")
        return "\n".join(lines)
    if cmd == "add":
        e = reply["export"]
        return f"added export {e['name']!r} ({e['source']}, {e['size']} bytes)"
    return ""


def run_ctl(args: argparse.Namespace) -> int:
    cmd = args.ctl_command
    req: dict[str, Any] = {"cmd": cmd}
    if cmd == "add":
        req.update(name=args.name, file=args.file, options=_options(args.options))
    elif cmd == "remove":
        req.update(name=args.name, force=args.force)
    elif cmd in ("stats", "flush"):
        req.update(name=args.name)
    reply = request(args.control, req)
    if args.json:
        json.dump(reply, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        text = _human(cmd, reply)
        if text:
            print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("ctl", help="change or watch a running server (--control)")
    p.add_argument("-c", "--control", required=True, metavar="PATH",
                   help="the server's control socket (serve --control PATH)")
    p.add_argument("--json", action="store_true", help="print the server's JSON reply")
    sub = p.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True,
                           parser_class=type(p))
    sub.add_parser("list", help="the exports, their size, mode, clients and source")
    a = sub.add_parser("add", help="open FILE and serve it as export NAME")
    a.add_argument("name", metavar="NAME", help="the new export's name")
    a.add_argument("file", metavar="FILE", help="the image to serve")
    a.add_argument("options", nargs="*", metavar="KEY=VALUE",
                   help="per-export options by their serve long names (read-only=on, ...)")
    r = sub.add_parser("remove", help="stop serving NAME")
    r.add_argument("name", metavar="NAME", help="the export to remove")
    r.add_argument("--force", action="store_true",
                   help="disconnect its clients (after their in-flight requests, and a flush)")
    s = sub.add_parser("stats", help="request, byte, error and latency counters")
    s.add_argument("name", nargs="?", metavar="NAME", help="one export (default: all)")
    f = sub.add_parser("flush", help="flush export NAME's image to disk")
    f.add_argument("name", metavar="NAME", help="the export to flush")
    p.set_defaults(func=run_ctl)
