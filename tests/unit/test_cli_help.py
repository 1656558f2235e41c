"""Every option and argument of every command says in --help what it does."""

from __future__ import annotations

import argparse

from nbdqcow.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _walk(sub, f"{path} {name}")
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.help:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_is_documented() -> None:
    parser = build_parser()
    assert _walk(parser, "nbdqcow") == []


def test_every_command_is_listed() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "create", "info", "map", "check", "snapshot", "layout", "relayout",
            "ctl"} <= set(sub.choices)


def test_help_lines_match_the_modules() -> None:
    """The help lines the top-level parser lists without importing the command modules
    are the ones the modules register."""
    from nbdqcow.cli import _COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {c.dest: c.help for c in sub._choices_actions}
    assert listed == _COMMANDS
    light = next(a for a in build_parser("serve")._actions
                 if isinstance(a, argparse._SubParsersAction))
    assert {c.dest: c.help for c in light._choices_actions} == _COMMANDS
