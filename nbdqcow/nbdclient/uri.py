"""NBD URIs (the NBD URI spec, doc/uri.md): nbd://host[:port]/export and
nbd+unix:///export?socket=PATH."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NbdAddress:
    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def uri(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_uri(uri: str) -> NbdAddress:
    """Parse an ``nbd://`` or ``nbd+unix://`` URI.  TLS schemes are refused."""
    parts = urlsplit(uri)
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise ValueError(f"{uri}: no host")
        return NbdAddress(export, parts.hostname, parts.port or DEFAULT_PORT)
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets:
            raise ValueError(f"{uri}: nbd+unix needs ?socket=PATH")
        return NbdAddress(export, socket=sockets[0])
    raise ValueError(f"{uri}: unsupported scheme {parts.scheme!r} (nbd, nbd+unix)")
