"""The layering of /work/shared/ARCHITECTURE.md, enforced on every import in the package
(module level and inside functions): imports point downward only.

    cli -> {server, image} -> {nbd, block};  image -> {qcow2, block};  qcow2 -> block
    nbd/ imports no asyncio and no sockets; lower layers never import upper ones.

``errors``, ``sizes`` and ``qemuopts`` are the foundation every layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "nbdqcow"

FOUNDATION = {"errors", "sizes", "qemuopts", "__init__"}
#: layer -> the layers (besides itself and the foundation) it may import
ALLOWED: dict[str, set[str]] = {
    "__main__": {"cli"},
    "cli": {"*"},
    "server": {"nbd", "block", "tls"},
    "tls": {"nbd"},
    "image": {"qcow2", "block"},
    "qcow2": {"block"},
    "block": set(),
    "nbd": set(),
    "nbdclient": {"nbd", "tls"},
}
#: standard modules a layer may not import
FORBIDDEN_STDLIB = {"nbd": {"asyncio", "socket", "ssl", "selectors", "uvloop"}}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = ["nbdqcow", *path.relative_to(PKG).parts[:-1]]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def _violations() -> list[str]:
    bad: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        allowed: set[str] = set()
        if layer in ALLOWED:
            allowed = ALLOWED[layer]
        elif layer not in FOUNDATION:
            bad.append(f"{path.relative_to(PKG.parent)}: package nbdqcow.{layer} has no place "
                       "in the layering: add it to ALLOWED in tests/unit/test_layering.py")
            continue
        for line, mod in _imports(path):
            parts = mod.split(".")
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if parts[0] in FORBIDDEN_STDLIB.get(layer, set()):
                bad.append(f"{where}: nbdqcow.{layer} must not import {mod}")
            if parts[0] != "nbdqcow" or len(parts) < 2:
                continue
            target = parts[1]
            if target in FOUNDATION or target == layer or "*" in allowed:
                continue
            if target not in allowed:
                bad.append(f"{where}: nbdqcow.{layer} imports nbdqcow.{target} "
                           f"({mod}) against the layering")
    return bad


def test_imports_point_downward_only() -> None:
    bad = _violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, layer, expect", [
    ("from nbdqcow.qcow2.driver import Qcow2Driver\n", "block", True),
    ("from nbdqcow.image import open_image\n", "qcow2", True),
    ("import asyncio\n", "nbd", True),
    ("from nbdqcow.block.raw import RawDriver\n", "image", False),
    ("from ..block import raw\n", "qcow2", False),
    ("from ..image import open\n", "qcow2", True),
])
def test_the_checker_sees_violations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     source: str, layer: str, expect: bool) -> None:
    """The checker itself: a planted import is reported exactly when it breaks a rule."""
    fake = tmp_path / "nbdqcow"
    (fake / layer).mkdir(parents=True)
    (fake / layer / "mod.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert bool(_violations()) is expect
