"""qemu's authorization objects: ``authz-simple`` (one identity), ``authz-list``
(rules given inline) and ``authz-list-file`` (the same rules in a JSON file).

The identity is the client certificate's distinguished name as qemu writes it
(attributes in certificate order, ``O=nbq,CN=client1``) or the PSK username.  A rule
list: ``{"policy": "deny", "rules": [{"match": "O=nbq,CN=*", "policy": "allow",
"format": "glob"}]}``; the first rule that matches decides, else the list's policy
(deny when absent); ``format`` is ``exact`` (default) or ``glob`` (``*``, ``?``).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any

from nbdqcow.qemuopts import OptsError


@dataclass(frozen=True)
class Rule:
    match: str
    allow: bool
    glob: bool = False

    def matches(self, identity: str) -> bool:
        if self.glob:
            return fnmatch.fnmatchcase(identity, self.match)
        return identity == self.match


def _policy(value: object, where: str) -> bool:
    if value not in ("allow", "deny"):
        raise OptsError(f"{where}: policy must be 'allow' or 'deny', not {value!r}")
    return value == "allow"


def parse_rules(tree: Any, where: str) -> tuple[bool, tuple[Rule, ...]]:
    """``(default_allow, rules)`` from qemu's rule-list structure."""
    if not isinstance(tree, dict):
        raise OptsError(f"{where}: a JSON object with 'policy' and 'rules' is expected")
    unknown = set(tree) - {"policy", "rules"}
    if unknown:
        raise OptsError(f"{where}: Parameter '{sorted(unknown)[0]}' is unexpected")
    default = _policy(tree.get("policy", "deny"), where)
    raw = tree.get("rules", [])
    if isinstance(raw, dict):  # from dotted keys: rules.0.match=...
        try:
            raw = [raw[k] for k in sorted(raw, key=int)]
        except ValueError:
            raise OptsError(f"{where}: 'rules' must be a list") from None
    if not isinstance(raw, list):
        raise OptsError(f"{where}: 'rules' must be a list")
    rules = []
    for r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("match"), str):
            raise OptsError(f"{where}: each rule needs a 'match' string")
        fmt = r.get("format", "exact")
        if fmt not in ("exact", "glob"):
            raise OptsError(f"{where}: format must be 'exact' or 'glob', not {fmt!r}")
        rules.append(Rule(r["match"], _policy(r.get("policy", "deny"), where),
                          fmt == "glob"))
    return default, tuple(rules)


def decide(default: bool, rules: tuple[Rule, ...], identity: str) -> bool:
    for rule in rules:
        if rule.matches(identity):
            return rule.allow
    return default


class Authz:
    """Base: ``is_allowed(identity)``."""

    id: str

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


@dataclass
class AuthzSimple(Authz):
    id: str
    identity: str

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


@dataclass
class AuthzList(Authz):
    id: str
    default: bool
    rules: tuple[Rule, ...]

    def is_allowed(self, identity: str) -> bool:
        return decide(self.default, self.rules, identity)


@dataclass
class AuthzListFile(Authz):
    """Rules from a JSON file.  With ``refresh`` (qemu's default where inotify exists)
    the file is read again when it changed; while it cannot be read or parsed every
    client is denied, as qemu does."""

    id: str
    filename: str
    refresh: bool = True
    _default: bool = False
    _rules: tuple[Rule, ...] = ()
    _stamp: tuple[int, int, int] | None = None
    _broken: bool = field(default=False)

    def __post_init__(self) -> None:
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        try:
            st = os.stat(self.filename)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            with open(self.filename, encoding="utf-8") as f:
                tree = json.load(f)
            self._default, self._rules = parse_rules(tree, self.filename)
            self._stamp, self._broken = stamp, False
        except (OSError, ValueError, OptsError) as e:
            if strict:
                msg = e.strerror if isinstance(e, OSError) else str(e)
                raise OptsError(f"Unable to read '{self.filename}': {msg}") from None
            self._stamp, self._broken = None, True

    def is_allowed(self, identity: str) -> bool:
        if self.refresh:
            self._load(strict=False)
        if self._broken:
            return False
        return decide(self._default, self._rules, identity)
