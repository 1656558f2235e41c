"""Fixtures for the differential tests: images built by qemu-img / qemu-io at test time."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent):  # imagegen (this folder) and tooling (tests/)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import imagegen  # noqa: E402
from tooling import require_tool  # noqa: E402


@pytest.fixture(scope="session")
def qemu_tools() -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)


@pytest.fixture(scope="session")
def image_factory(
    tmp_path_factory: pytest.TempPathFactory, qemu_tools: None
) -> Callable[[str], Path]:
    """Build (once per test session and worker) the image of a named matrix case."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            d = tmp_path_factory.mktemp(name)
            built[name] = imagegen.CASES_BY_NAME[name].build(d)
        return built[name]

    return get


@pytest.fixture(params=[c.name for c in imagegen.CASES])
def case_image(
    request: pytest.FixtureRequest, image_factory: Callable[[str], Path]
) -> tuple[imagegen.Case, Path]:
    """(case, path of its top image) for every case of the matrix."""
    case = imagegen.CASES_BY_NAME[request.param]
    return case, image_factory(case.name)
