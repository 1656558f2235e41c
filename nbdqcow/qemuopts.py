"""qemu's option-string syntax and ``json:`` filenames, parsed into plain dicts.

Facts from qemu's documentation (``qemu-options``, ``--object``, ``--image-opts``):

- ``key=value,key2=value2``; a literal comma inside a value is written ``,,``;
- with an *implied key* (``--object TYPE,...`` implies ``qom-type``), a first element
  without ``=`` is that key's value;
- a later element without ``=`` is the boolean ``key=on`` (``nokey`` means ``key=off``);
- dotted keys (``file.driver=file``) describe nested objects; :func:`crumple` nests them;
- ``json:{...}`` holds the same tree as JSON (values of any JSON type; dotted keys are
  allowed there too and nest the same way).

Every error is an :class:`OptsError` with one line of text in qemu's wording.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from nbdqcow.errors import NbdqcowError


class OptsError(NbdqcowError):
    """A malformed option string, ``json:`` filename or option value."""


def _split_escaped(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for one literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """``a=1,b=x,,y`` -> ``{'a': '1', 'b': 'x,y'}`` (insertion order kept).

    A key given twice keeps its last value (qemu's QemuOpts does the same for plain
    options). An empty element (``a=1,,`` aside, which is an escaped comma) is refused.
    """
    out: dict[str, str] = {}
    parts = _split_escaped(text)
    if parts == [""]:
        return out
    for i, part in enumerate(parts):
        if "=" in part:
            key, value = part.split("=", 1)
        elif i == 0 and implied is not None:
            key, value = implied, part
        elif part.startswith("no") and len(part) > 2:
            key, value = part[2:], "off"
        else:
            key, value = part, "on"
        if not key:
            raise OptsError(f"Invalid parameter '{part}'" if part else "Invalid parameter ''")
        out[key] = value
    return out


def crumple(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest dotted keys: ``{'file.driver': 'file'}`` -> ``{'file': {'driver': 'file'}}``.

    Values that are themselves mappings are crumpled too. A key that is both a value and
    a prefix (``file=x`` and ``file.driver=y``) is refused, as qemu refuses it.
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Mapping):
            value = crumple(value)
        parts = key.split(".")
        if any(p == "" for p in parts):
            raise OptsError(f"Invalid parameter '{key}'")
        node = out
        for depth, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise OptsError(
                    f"Cannot mix scalar and non-scalar keys: '{'.'.join(parts[: depth + 1])}'"
                )
            node = nxt
        last = parts[-1]
        if last in node and isinstance(node[last], dict) and isinstance(value, dict):
            node[last].update(value)
        elif last in node and (isinstance(node[last], dict) or isinstance(value, dict)):
            raise OptsError(f"Cannot mix scalar and non-scalar keys: '{key}'")
        else:
            node[last] = value
    return out


def parse_json_filename(name: str) -> dict[str, Any]:
    """``json:{"driver": "raw", "file.filename": "x"}`` -> a nested dict."""
    if not name.startswith("json:"):
        raise OptsError(f"'{name}' is not a json: filename")
    try:
        tree = json.loads(name[5:])
    except json.JSONDecodeError as e:
        raise OptsError(f"Could not parse the JSON options: {e.msg}") from None
    if not isinstance(tree, dict):
        raise OptsError("Invalid JSON object given")
    return crumple(tree)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`crumple` (used for messages: qemu names nested options
    with dots, e.g. ``file.filename``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(value: object, name: str) -> bool:
    """A boolean option value as qemu takes it (``on``/``off``, also yes/no/true/false;
    JSON booleans)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise OptsError(f"Parameter '{name}' expects 'on' or 'off'")
