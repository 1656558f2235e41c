"""GnuTLS priority strings (qemu's ``priority=`` property) mapped onto OpenSSL.

What is honoured: the protocol versions a string enables (``NORMAL``,
``-VERS-TLS1.3``, ``-VERS-ALL:+VERS-TLS1.2``, ...).  Cipher, key-exchange, MAC and
``%`` flag elements are accepted and leave OpenSSL's defaults (which GnuTLS's NORMAL
peers share); an unknown base keyword is refused.
"""

from __future__ import annotations

from nbdqcow.tls.session import TlsError

#: (min, max) as TLS minor numbers: 1.2 -> 2, 1.3 -> 3
Versions = tuple[int, int]

_BASES = {"NORMAL", "PERFORMANCE", "SECURE", "SECURE128", "SECURE192", "SECURE256",
          "SUITEB128", "SUITEB192", "LEGACY", "PFS", "NONE", "@SYSTEM", "SYSTEM"}
_VERS = {"VERS-TLS1.2": 2, "VERS-TLS1.3": 3, "VERS-TLS1.1": 1, "VERS-TLS1.0": 0}


def versions(priority: str | None) -> Versions:
    """The (min, max) TLS 1.x versions a priority string allows (1.2..1.3 by default;
    TLS 1.0/1.1 are never enabled)."""
    if not priority:
        return 2, 3
    elems = priority.split(":")
    base = elems[0]
    if base.split("@", 1)[0] not in _BASES and base not in _BASES:
        raise TlsError(f"Unable to set TLS session priority {priority}: "
                       f"unknown keyword '{base}'")
    enabled = set() if base == "NONE" else {2, 3}
    for e in elems[1:]:
        if not e or e[0] not in "+-!":
            continue
        on = e[0] == "+"
        name = e[1:]
        if name in ("VERS-ALL", "VERS-TLS-ALL"):
            enabled = {2, 3} if on else set()
        elif name in _VERS:
            v = _VERS[name]
            if v < 2:
                continue
            (enabled.add if on else enabled.discard)(v)
    if not enabled:
        raise TlsError(f"Unable to set TLS session priority {priority}: "
                       "no TLS version enabled")
    return min(enabled), max(enabled)
