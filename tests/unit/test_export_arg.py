"""``--export NAME=FILE[,KEY=VALUE...]``: qemu's option syntax, and a ``json:`` file
name taken whole (its own commas need no ``,,``)."""

from __future__ import annotations

import pytest

from nbdqcow.cli.exports_config import parse_export_arg
from nbdqcow.errors import NbdqcowError


def test_plain_file_and_options() -> None:
    spec = parse_export_arg("d1=disk,,1.qcow2,read-only=on,description=a,,b")
    assert spec.name == "d1"
    assert spec.file == "disk,1.qcow2"
    assert spec.options == (("read-only", "on"), ("description", "a,b"))


def test_json_file_name_keeps_its_commas() -> None:
    js = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"/x.qcow2"}}'
    spec = parse_export_arg(f"d1={js},read-only=on")
    assert spec.file == js
    assert spec.options == (("read-only", "on"),)
    assert parse_export_arg(f"d2={js}").file == js


@pytest.mark.parametrize("arg", [
    'd1=json:{"driver":"qcow2"',            # not closed
    'd1=json:{"driver":"qcow2"}x=1',        # no comma after the object
    "d1=",                                  # no file
    "d1=x.qcow2,bogus=1",                   # unknown key
])
def test_refused_with_one_line(arg: str) -> None:
    with pytest.raises(NbdqcowError) as e:
        parse_export_arg(arg)
    assert "\n" not in str(e.value)
