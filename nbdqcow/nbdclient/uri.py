"""NBD URIs (the NBD URI spec, doc/uri.md): ``nbd://host[:port]/export``,
``nbd+unix:///export?socket=PATH`` and their TLS forms ``nbds://``, ``nbds+unix://``
with libnbd's query parameters ``tls-certificates=DIR``, ``tls-psk-file=FILE``
(the PSK username is the URI's user part) and ``tls-verify-peer=false``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 10809
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class NbdAddress:
    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_psk_file: str | None = None
    tls_username: str | None = None
    tls_verify_peer: bool = True

    def uri(self) -> str:
        s = "s" if self.tls else ""
        if self.socket is not None:
            return f"nbd{s}+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}/{self.export}"


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def parse_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI (``nbd``, ``nbd+unix``, ``nbds``, ``nbds+unix``, ``+tcp`` forms)."""
    parts = urlsplit(uri)
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    scheme = parts.scheme
    tls = scheme.startswith("nbds")
    base = {"nbds": "nbd", "nbds+tcp": "nbd+tcp", "nbds+unix": "nbd+unix"}.get(scheme, scheme)
    verify_text = (_one(query, "tls-verify-peer") or "true").lower()
    if verify_text not in _TRUE + _FALSE:
        raise ValueError(f"{uri}: tls-verify-peer must be true or false")
    extra: dict[str, Any] = {}
    if tls:
        extra = {
            "tls": True,
            "tls_certificates": _one(query, "tls-certificates"),
            "tls_psk_file": _one(query, "tls-psk-file"),
            "tls_username": unquote(parts.username) if parts.username else None,
            "tls_verify_peer": verify_text in _TRUE,
        }
    if base in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise ValueError(f"{uri}: no host")
        return NbdAddress(export, parts.hostname, parts.port or DEFAULT_PORT, **extra)
    if base == "nbd+unix":
        sockets = query.get("socket")
        if not sockets:
            raise ValueError(f"{uri}: {scheme} needs ?socket=PATH")
        return NbdAddress(export, socket=sockets[0], **extra)
    raise ValueError(f"{uri}: unsupported scheme {scheme!r} (nbd, nbd+unix, nbds, nbds+unix)")
