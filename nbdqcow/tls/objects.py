"""``--object TYPE,id=ID,...``: qemu's user-creatable objects that nbdqcow knows.

Types: ``tls-creds-x509``, ``tls-creds-psk``, ``tls-creds-anon``, ``authz-simple``,
``authz-list``, ``authz-list-file`` and ``secret``.  Errors use qemu's wording
(``Parameter 'x' is unexpected``, ``Parameter 'qom-type' does not accept value 'y'``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from nbdqcow.qemuopts import OptsError, crumple, parse_bool, parse_opts
from nbdqcow.tls.authz import Authz, AuthzList, AuthzListFile, AuthzSimple, parse_rules
from nbdqcow.tls.creds import AnonCreds, PskCreds, TlsCreds, X509Creds
from nbdqcow.tls.session import TlsError


class Secret:
    """``secret``: data kept for the objects that name it; never printed."""

    def __init__(self, id: str, value: bytes) -> None:
        self.id = id
        self._value = value

    def value(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(id={self.id!r}, value=<hidden>)"


_CREDS_KEYS = {"dir", "endpoint", "verify-peer", "priority", "loaded"}
_SCHEMA: dict[str, tuple[set[str], set[str]]] = {
    # type: (allowed keys besides qom-type and id, required keys)
    "tls-creds-x509": (_CREDS_KEYS | {"sanity-check", "passwordid"}, set()),
    "tls-creds-psk": (_CREDS_KEYS | {"username"}, set()),
    "tls-creds-anon": (_CREDS_KEYS, set()),
    "authz-simple": ({"identity"}, {"identity"}),
    "authz-list": ({"policy", "rules"}, set()),
    "authz-list-file": ({"filename", "refresh"}, {"filename"}),
    "secret": ({"data", "file", "format", "keyid", "iv", "loaded"}, set()),
}


class ObjectRegistry:
    """The objects of one command line, by id, in creation order."""

    def __init__(self) -> None:
        self.objects: dict[str, object] = {}

    def add(self, text: str) -> object:
        opts: dict[str, Any] = dict(parse_opts(text, implied="qom-type"))
        qom_type = opts.pop("qom-type", None)
        if qom_type is None:
            raise OptsError("Parameter 'qom-type' is missing")
        if qom_type not in _SCHEMA:
            raise OptsError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        allowed, required = _SCHEMA[qom_type]
        tree = crumple(opts)
        oid = tree.pop("id", None)
        for key in tree:
            if key not in allowed:
                raise OptsError(f"Parameter '{key}' is unexpected")
        if not isinstance(oid, str) or not oid:
            raise OptsError("Parameter 'id' is missing")
        for key in sorted(required):
            if key not in tree:
                raise OptsError(f"Parameter '{key}' is missing")
        if oid in self.objects:
            raise OptsError(f"attempt to add duplicate property '{oid}' to object "
                            "(type 'container')")
        obj = _BUILDERS[qom_type](self, oid, tree)
        self.objects[oid] = obj
        return obj

    # --- lookups (qemu-nbd's messages) --------------------------------------------------------
    def creds(self, oid: str, endpoint: str) -> TlsCreds:
        obj = self.objects.get(oid)
        if obj is None:
            raise TlsError(f"Failed to get TLS creds: No TLS credentials with id '{oid}'")
        if not isinstance(obj, TlsCreds):
            raise TlsError(f"Failed to get TLS creds: Object with id '{oid}' is not "
                           "TLS credentials")
        if obj.endpoint != endpoint:
            raise TlsError(f"Failed to get TLS creds: Expected TLS credentials for a "
                           f"{endpoint} endpoint")
        return obj

    def authz(self, oid: str) -> Authz:
        obj = self.objects.get(oid)
        if obj is None:
            raise TlsError(f"No authorization object with id '{oid}'")
        if not isinstance(obj, Authz):
            raise TlsError(f"Object with id '{oid}' is not an authorization object")
        return obj

    def secret(self, oid: str) -> bytes:
        obj = self.objects.get(oid)
        if not isinstance(obj, Secret):
            raise TlsError(f"No secret with id '{oid}'")
        return obj.value()


# --- builders ---------------------------------------------------------------------------------
def _str(tree: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = tree.get(key, default)
    if value is not None and not isinstance(value, str):
        raise OptsError(f"Parameter '{key}' expects a string")
    return value


def _choice(tree: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(tree, key, default)
    if value not in choices:
        raise OptsError(f"Parameter '{key}' does not accept value '{value}'")
    return value


def _creds_common(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        "endpoint": _choice(tree, "endpoint", ("server", "client"), "client"),
        "verify_peer": parse_bool(tree.get("verify-peer", "on"), "verify-peer"),
        "priority": _str(tree, "priority"),
        "dir": _str(tree, "dir"),
    }


def _x509(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    if "sanity-check" in tree:
        parse_bool(tree["sanity-check"], "sanity-check")
    pid = _str(tree, "passwordid")
    password = reg.secret(pid).decode("utf-8", "surrogateescape") if pid else None
    return X509Creds(oid, **_creds_common(tree), password=password)


def _psk(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    return PskCreds(oid, **_creds_common(tree), username=_str(tree, "username", "qemu")
                    or "qemu")


def _anon(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    return AnonCreds(oid, **_creds_common(tree))


def _authz_simple(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    return AuthzSimple(oid, _str(tree, "identity") or "")


def _authz_list(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    default, rules = parse_rules(tree, oid)
    return AuthzList(oid, default, rules)


def _authz_list_file(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    refresh = parse_bool(tree.get("refresh", "on"), "refresh")
    return AuthzListFile(oid, _str(tree, "filename") or "", refresh)


def _secret(reg: ObjectRegistry, oid: str, tree: dict[str, Any]) -> object:
    data, path = _str(tree, "data"), _str(tree, "file")
    if data is not None and path is not None:
        raise OptsError("'file' and 'data' are mutually exclusive")
    if data is None and path is None:
        raise OptsError("Either 'file' or 'data' must be provided")
    if "keyid" in tree or "iv" in tree:
        raise OptsError("encrypted secrets (keyid=, iv=) are not supported by nbdqcow")
    fmt = _choice(tree, "format", ("raw", "base64"), "raw")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise OptsError(f"Unable to read {path}: {e.strerror}") from None
    else:
        assert data is not None
        raw = data.encode()
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            raise OptsError("Unable to decode the secret: not base64") from None
    return Secret(oid, raw)


_BUILDERS: dict[str, Callable[[ObjectRegistry, str, dict[str, Any]], object]] = {
    "tls-creds-x509": _x509,
    "tls-creds-psk": _psk,
    "tls-creds-anon": _anon,
    "authz-simple": _authz_simple,
    "authz-list": _authz_list,
    "authz-list-file": _authz_list_file,
    "secret": _secret,
}
