"""Several exports in one server: ``--export NAME=FILE[,KEY=VALUE...]``, ``--config FILE``
(TOML), the control socket's ``add`` and SIGHUP reloads all come through here.

A per-export KEY is the long name of one of ``serve``'s per-export options; each export's
options are parsed by ``serve``'s own option parser, so ``--export d=x.qcow2,read-only=on``
means exactly what ``serve -r x.qcow2`` means.

Config file::

    [server]                 # any server-wide option, by its long name
    socket = "/run/nbd.sock"
    shared = 0
    persistent = true
    default = "disk1"        # the export the empty name selects (none if absent)
    control = "/run/nbdqcow.ctl"
    metrics = "127.0.0.1:9187"

    [exports.disk1]
    file = "disk1.qcow2"
    description = "the first disk"
    read-only = true
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from nbdqcow.errors import NbdqcowError
from nbdqcow.qemuopts import OptsError, parse_bool, parse_opts
from nbdqcow.server.exports import Export

log = logging.getLogger("nbdqcow.server")

#: options that describe one export (the rest are server-wide)
PER_EXPORT = frozenset({
    "format", "read-only", "description", "allocation-depth", "bitmap", "discard",
    "detect-zeroes", "mapping", "cache", "cache-size", "offset", "load-snapshot", "aio",
    "nocache", "image-opts", "force-share",
})
#: server-wide options a config file may set ([server] table), plus "default"
SERVER_KEYS = frozenset({
    "port", "bind", "socket", "shared", "persistent", "pid-file", "control", "metrics",
    "log-connections", "handshake-limit", "max-buffer", "tls-creds", "tls-authz", "object",
})


@dataclass(frozen=True)
class ExportSpec:
    name: str
    file: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass
class Config:
    server: dict[str, Any]
    exports: list[ExportSpec]
    default: str | None


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def parse_export_arg(text: str) -> ExportSpec:
    """``NAME=FILE[,KEY=VALUE...]`` (qemu's ``,,`` escapes a comma in FILE or a value)."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise NbdqcowError(f"--export: expected NAME=FILE[,KEY=VALUE...], got '{text}'")
    try:
        json_file, rest = _split_json(rest)
        opts = parse_opts(rest, implied=None if json_file else "file") if rest else {}
    except OptsError as e:
        raise NbdqcowError(f"--export {name}: {e}") from None
    file = json_file or opts.pop("file", "")
    spec = ExportSpec(name, file, tuple(opts.items()))
    _check_keys(spec)
    return spec


def _split_json(rest: str) -> tuple[str, str]:
    """``json:{...}[,KEY=VALUE...]`` -> (the ``json:`` file name, the options after it):
    the JSON object may hold commas of its own, so it is taken whole, not split on
    commas.  Anything else: ("", rest)."""
    if not rest.startswith("json:"):
        return "", rest
    try:
        _, end = json.JSONDecoder().raw_decode(rest, len("json:"))
    except ValueError as e:
        raise OptsError(f"Could not parse the JSON options: {e}") from None
    tail = rest[end:]
    if tail and not tail.startswith(","):
        raise OptsError(f"expected ',' after the JSON object, got '{tail[:20]}'")
    return rest[:end], tail[1:]


def _check_keys(spec: ExportSpec) -> None:
    if not spec.file:
        raise NbdqcowError(f"export '{spec.name}': no file given")
    for k, _ in spec.options:
        if k not in PER_EXPORT:
            raise NbdqcowError(f"export '{spec.name}': Invalid parameter '{k}'")


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise NbdqcowError(f"could not read config '{path}': {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise NbdqcowError(f"config '{path}': {e}") from None
    unknown = set(data) - {"server", "exports"}
    if unknown:
        raise NbdqcowError(f"config '{path}': unknown table '{sorted(unknown)[0]}'")
    server = dict(data.get("server", {}))
    default = server.pop("default", None)
    for k in server:
        if k not in SERVER_KEYS:
            raise NbdqcowError(f"config '{path}': Invalid parameter 'server.{k}'")
    exports = []
    for name, table in data.get("exports", {}).items():
        if not isinstance(table, dict):
            raise NbdqcowError(f"config '{path}': exports.{name} must be a table")
        table = dict(table)
        file = table.pop("file", "")
        opts: list[tuple[str, str]] = []
        for k, v in table.items():
            for item in v if isinstance(v, list) else [v]:
                opts.append((k, _value(item)))
        spec = ExportSpec(name, str(file), tuple(opts))
        _check_keys(spec)
        exports.append(spec)
    if default is not None and not any(e.name == default for e in exports):
        raise NbdqcowError(f"config '{path}': default export '{default}' is not defined")
    return Config(server, exports, default)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise NbdqcowError(message)


def _export_parser() -> argparse.ArgumentParser:
    from nbdqcow.cli.serve import add_arguments

    p = _RaisingParser(prog="export", add_help=False)
    add_arguments(p)
    return p


def _as_argv(parser: argparse.ArgumentParser, items: Iterable[tuple[str, str]],
             allowed: frozenset[str] | None, where: str, key_prefix: str = "") -> list[str]:
    """``serve`` options given as (long name, value) pairs, as a command line for
    ``parser``: a flag option takes a boolean value (present when true)."""
    flags = {s: a for a in parser._actions for s in a.option_strings}
    argv: list[str] = []
    for k, v in items:
        action = flags.get(f"--{k}")
        if action is None or (allowed is not None and k not in allowed):
            raise NbdqcowError(f"{where}Invalid parameter '{key_prefix}{k}'")
        if action.nargs != 0:
            argv.append(f"--{k}={v}")
            continue
        try:
            if parse_bool(v, k):
                argv.append(f"--{k}")
        except OptsError as e:
            raise NbdqcowError(f"{where}{e}") from None
    return argv


def export_namespace(spec: ExportSpec, shared: int) -> argparse.Namespace:
    """``serve``'s options for one export, parsed by ``serve``'s parser."""
    parser = _export_parser()
    where = f"export '{spec.name}': "
    argv = _as_argv(parser, spec.options, PER_EXPORT, where)
    try:
        ns = parser.parse_args([*argv, "-x", spec.name, "--", spec.file])
    except NbdqcowError as e:
        raise NbdqcowError(f"{where}{e}") from None
    ns.shared = shared
    return ns


def open_spec(spec: ExportSpec, shared: int, stack: contextlib.ExitStack) -> Export:
    from nbdqcow.cli.serve import open_export

    return open_export(export_namespace(spec, shared), stack)


def _apply_server_options(args: argparse.Namespace, server: Mapping[str, Any]) -> None:
    """Config values for server-wide options the command line left at their default;
    each is parsed by ``serve``'s parser, so it means what the option means."""
    parser = _export_parser()
    items = [(k, _value(item)) for k, v in server.items()
             for item in (v if isinstance(v, list) else [v])]
    argv = _as_argv(parser, items, None, "config: ", "server.")
    try:
        parsed = parser.parse_args(argv)
    except NbdqcowError as e:
        raise NbdqcowError(f"config: {e}") from None
    defaults = parser.parse_args([])
    for dest, value in vars(parsed).items():
        if value != getattr(defaults, dest) and getattr(args, dest, None) == getattr(defaults,
                                                                                     dest):
            setattr(args, dest, value)


def run_multi(args: argparse.Namespace) -> int:
    from nbdqcow.cli.serve import _listeners, _serve
    from nbdqcow.server.control import Control
    from nbdqcow.server.metrics_http import metrics_endpoint
    from nbdqcow.server.serve import NbdServer

    if args.filename:
        raise NbdqcowError("FILE cannot be combined with --export or --config")
    config = load_config(args.config) if args.config else Config({}, [], None)
    _apply_server_options(args, config.server)
    cli_specs = [parse_export_arg(t) for t in args.export]
    specs = config.exports + cli_specs
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise NbdqcowError(f"export '{dup}' is defined twice")
    if not specs and not args.control:
        raise NbdqcowError("no exports (give --export, exports in --config, or --control)")
    with contextlib.ExitStack() as stack:
        exports = [open_spec(s, args.shared, stack) for s in specs]
        listeners = _listeners(args)
        managed = {s.name: s for s in config.exports}  # what SIGHUP may change

        def opener(name: str, file: str, options: Mapping[str, str]) -> Export:
            spec = ExportSpec(name, file, tuple(options.items()))
            _check_keys(spec)
            with contextlib.ExitStack() as opened:
                export = open_spec(spec, args.shared, opened)
                opened.pop_all()  # success: closed by remove, or at exit
            stack.callback(export.driver.close)
            return export

        def setup(server: NbdServer) -> None:
            server.default = config.default
            control = Control(server, opener)
            if args.control:
                server.extras.append(control.endpoint(args.control))
            if args.metrics:
                server.extras.append(metrics_endpoint(args.metrics))
            if args.config:
                server.on_hup = lambda: reload(control, args.config, managed)

        return _serve(args, exports, listeners, setup)
    return 0  # pragma: no cover


async def reload(control: Any, path: str, managed: dict[str, ExportSpec]) -> None:
    """SIGHUP: apply the difference between the config file and what it said before."""
    try:
        new = load_config(path)
    except NbdqcowError as e:
        log.error("reload: %s; nothing changed", e)
        return
    control.server.default = new.default
    wanted = {s.name: s for s in new.exports}
    for name, spec in list(managed.items()):
        if wanted.get(name) != spec:
            try:
                await control.remove(name, force=False)
                del managed[name]
            except NbdqcowError as e:
                log.error("reload: %s", e)
    for name, spec in wanted.items():
        if name not in managed:
            try:
                await control.add(name, spec.file, dict(spec.options))
                managed[name] = spec
            except NbdqcowError as e:
                log.error("reload: %s", e)
