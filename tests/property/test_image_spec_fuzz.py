"""Any ``--image-opts`` string or ``json:`` filename, however wrong, opens or fails with
one line of NbdqcowError -- never another exception (a traceback for the user)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.errors import NbdqcowError
from nbdqcow.image import open_image

KEYS = ["driver", "file", "file.driver", "file.filename", "filename", "offset", "size",
        "backing", "backing.driver", "backing.file.filename", "data-file", "read-zeroes",
        "cache-size", "l2-cache-size", "refcount-cache-size", "locking", "file.locking",
        "read-only", "force-share", "node-name", "discard-no-unref", "latency-ns", "x"]
VALUES = ["raw", "qcow2", "file", "null-co", "compress", "vmdk", "", "on", "off", "1M", "-1",
          "512", "4k", "abc", "RAW", "QCOW2", "nonexistent.raw", "null"]


def _check(name: str, image_opts: bool, writable: bool) -> None:
    try:
        drv = open_image(name, writable=writable, image_opts=image_opts)
    except NbdqcowError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        assert "\n" not in str(e).strip() or "lock" in str(e), str(e)
    else:
        drv.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=6),
       writable=st.booleans())
def test_image_opts_never_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                pairs: list[tuple[str, str]], writable: bool) -> None:
    (tmp_path / "img.raw").write_bytes(bytes(65536))
    monkeypatch.chdir(tmp_path)
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    _check(text.replace("nonexistent.raw", "img.raw" if len(pairs) % 2 else "nope"),
           True, writable)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 21) | st.sampled_from(VALUES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                max_size=4),
    max_leaves=10)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=5),
       writable=st.booleans())
def test_json_filenames_never_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    tree: dict[str, object], writable: bool) -> None:
    (tmp_path / "nonexistent.raw").write_bytes(bytes(65536))
    monkeypatch.chdir(tmp_path)
    _check("json:" + json.dumps(tree), False, writable)
