"""layout's progress bar: nothing before a second has passed since the process
started, then one line redrawn in place through the phases up to 100%."""

from __future__ import annotations

import time

import pytest

from nbdqcow.cli import layout


def test_started_is_before_now() -> None:
    now = time.monotonic()
    assert now - 60.0 <= layout._started() <= time.monotonic()


def test_quiet_within_the_first_second(capsys: pytest.CaptureFixture[str]) -> None:
    bar = layout.Bar(True, after=1000.0)
    bar.phase(0, 60)(5, 10)
    bar.at(100)
    bar.close()
    assert capsys.readouterr().err == ""


def test_phases_past_the_delay(capsys: pytest.CaptureFixture[str]) -> None:
    bar = layout.Bar(True, after=0.0)
    walk = bar.phase(0, 60)
    for done in (0, 1, 2, 4):
        walk(done, 4)
    bar.at(75)
    bar.at(100)
    bar.close()
    err = capsys.readouterr().err
    shown = [p.split("/")[0].strip("( ") for p in err.split("\r") if p]
    assert shown == ["0", "15", "30", "60", "75", "100"]
    assert err.endswith("]\n") and "(100/100%) [" + "#" * 40 + "]" in err


def test_disabled_bar_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bar = layout.Bar(False, after=0.0)
    bar.at(50)
    bar.close()
    assert capsys.readouterr().err == ""
