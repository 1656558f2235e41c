"""qemu option strings and json: filenames (nbdqcow.qemuopts)."""

from __future__ import annotations

import pytest

from nbdqcow.qemuopts import (
    OptsError,
    crumple,
    flatten,
    parse_bool,
    parse_json_filename,
    parse_opts,
)


def test_plain_and_escaped_commas() -> None:
    assert parse_opts("a=1,b=x,,y,c=") == {"a": "1", "b": "x,y", "c": ""}


def test_implied_key_and_bare_booleans() -> None:
    opts = parse_opts("tls-creds-x509,id=tls0,verify-peer,noexport", implied="qom-type")
    assert opts == {"qom-type": "tls-creds-x509", "id": "tls0", "verify-peer": "on",
                    "export": "off"}


def test_last_value_wins_and_empty_string() -> None:
    assert parse_opts("a=1,a=2") == {"a": "2"}
    assert parse_opts("") == {}


def test_empty_key_refused() -> None:
    with pytest.raises(OptsError):
        parse_opts("=1")
    with pytest.raises(OptsError):
        parse_opts("a=1,")


def test_crumple_nests_dotted_keys() -> None:
    flat = parse_opts("driver=compress,file.driver=qcow2,file.file.driver=file,"
                      "file.file.filename=/x,,y")
    assert crumple(flat) == {"driver": "compress", "file": {
        "driver": "qcow2", "file": {"driver": "file", "filename": "/x,y"}}}
    assert flatten(crumple(flat)) == flat


def test_crumple_refuses_scalar_and_object() -> None:
    with pytest.raises(OptsError, match="Cannot mix"):
        crumple({"file": "x", "file.driver": "file"})


def test_json_filename() -> None:
    tree = parse_json_filename(
        'json:{"driver": "raw", "offset": 512, "size": 1024, "file": {"driver": "file",'
        ' "filename": "/a"}, "file.locking": "off", "backing": null}')
    assert tree == {"driver": "raw", "offset": 512, "size": 1024, "backing": None,
                    "file": {"driver": "file", "filename": "/a", "locking": "off"}}
    with pytest.raises(OptsError, match="Could not parse"):
        parse_json_filename("json:{")
    with pytest.raises(OptsError):
        parse_json_filename("json:[1]")


def test_parse_bool() -> None:
    assert parse_bool("on", "x") and parse_bool(True, "x") and not parse_bool("off", "x")
    with pytest.raises(OptsError, match="expects 'on' or 'off'"):
        parse_bool("maybe", "x")
