"""Statistics per export and per server, as OpenMetrics text and as JSON.

Counting sits on the request path, so it is a few list increments per request: counts
and bytes by command (lists indexed by the command number), latency histograms for
read, write, flush and block status (a ``bisect`` into fixed bucket bounds), errors by
errno (a dict, touched only on errors).  Gauges (in-flight requests and bytes,
connections, memory budget use) are read from the live connections when rendered.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nbdqcow.nbd.constants import Cmd

now_ns = time.perf_counter_ns

#: command number -> name used in labels and JSON
COMMANDS: dict[int, str] = {
    Cmd.READ: "read", Cmd.WRITE: "write", Cmd.DISC: "disc", Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim", Cmd.CACHE: "cache", Cmd.WRITE_ZEROES: "write_zeroes",
    Cmd.BLOCK_STATUS: "block_status",
}
N_CMDS = max(COMMANDS) + 2  # room for unknown commands (counted in the last slot)
#: latency classes: command number -> histogram index (-1: no histogram)
LATENCY_OPS = ("read", "write", "flush", "block_status")
LATENCY_CLASS = [-1] * N_CMDS
for _i, _op in enumerate(LATENCY_OPS):
    LATENCY_CLASS[next(c for c, n in COMMANDS.items() if n == _op)] = _i
#: bucket upper bounds in seconds (OpenMetrics ``le``), then in ns for bisect
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(int(b * 1e9) for b in BUCKETS)

CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class ExportStats:
    """Counters of one export (all its connections)."""

    __slots__ = ("requests", "bytes", "errors", "buckets", "lat_sum_ns", "connections_total")

    def __init__(self) -> None:
        self.requests = [0] * N_CMDS
        self.bytes = [0] * N_CMDS
        self.errors: dict[int, int] = {}
        self.buckets = [[0] * (len(BUCKETS) + 1) for _ in LATENCY_OPS]
        self.lat_sum_ns = [0] * len(LATENCY_OPS)
        self.connections_total = 0

    def observe(self, cls: int, ns: int) -> None:
        self.buckets[cls][bisect_left(_BOUNDS_NS, ns)] += 1
        self.lat_sum_ns[cls] += ns

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        lat = {}
        for i, op in enumerate(LATENCY_OPS):
            count = sum(self.buckets[i])
            lat[op] = {"count": count, "sum_seconds": self.lat_sum_ns[i] / 1e9,
                       "buckets": dict(zip([*map(str, BUCKETS), "+Inf"],
                                           _cumulative(self.buckets[i]), strict=True))}
        return {
            "requests": {n: self.requests[c] for c, n in COMMANDS.items()},
            "bytes": {n: self.bytes[c] for c, n in COMMANDS.items()},
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "latency": lat,
            "connections_total": self.connections_total,
        }


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


@dataclass
class Gauges:
    """Live figures of one export, read when rendering."""

    connections: int = 0
    inflight_requests: int = 0
    inflight_bytes: int = 0


@dataclass
class ServerGauges:
    exports: int = 0
    connections: int = 0
    connections_total: int = 0
    handshakes_failed: int = 0
    memory_used: int | None = None
    memory_limit: int | None = None


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_openmetrics(
    exports: Iterable[tuple[str, ExportStats, Gauges]], server: ServerGauges
) -> str:
    """The OpenMetrics text exposition of every export and the server."""
    rows = list(exports)
    out: list[str] = []
    emit = out.append

    def family(name: str, kind: str, text: str) -> None:
        emit(f"# TYPE {name} {kind}")
        emit(f"# HELP {name} {text}")

    family("nbdqcow_requests", "counter", "Requests received, by export and command.")
    for name, st, _ in rows:
        for c, cmd in COMMANDS.items():
            emit(f'nbdqcow_requests_total{{export="{_esc(name)}",command="{cmd}"}} '
                 f"{st.requests[c]}")
    family("nbdqcow_request_bytes", "counter",
           "Bytes requested (READ/WRITE data, TRIM/WRITE_ZEROES/CACHE/BLOCK_STATUS length).")
    for name, st, _ in rows:
        for c, cmd in COMMANDS.items():
            emit(f'nbdqcow_request_bytes_total{{export="{_esc(name)}",command="{cmd}"}} '
                 f"{st.bytes[c]}")
    family("nbdqcow_errors", "counter", "Error replies, by export and errno.")
    for name, st, _ in rows:
        for code, n in sorted(st.errors.items()):
            emit(f'nbdqcow_errors_total{{export="{_esc(name)}",errno="{code}"}} {n}')
    family("nbdqcow_request_latency_seconds", "histogram",
           "Time from a request's arrival to its reply being queued.")
    for name, st, _ in rows:
        for i, op in enumerate(LATENCY_OPS):
            lab = f'export="{_esc(name)}",op="{op}"'
            cum = _cumulative(st.buckets[i])
            for b, n in zip(BUCKETS, cum, strict=False):
                emit(f'nbdqcow_request_latency_seconds_bucket{{{lab},le="{b}"}} {n}')
            emit(f'nbdqcow_request_latency_seconds_bucket{{{lab},le="+Inf"}} {cum[-1]}')
            emit(f"nbdqcow_request_latency_seconds_count{{{lab}}} {cum[-1]}")
            emit(f"nbdqcow_request_latency_seconds_sum{{{lab}}} {st.lat_sum_ns[i] / 1e9}")
    gauges: list[tuple[str, str, Callable[[Gauges], int]]] = [
        ("nbdqcow_inflight_requests", "Requests being served now.",
         lambda g: g.inflight_requests),
        ("nbdqcow_inflight_bytes", "READ/WRITE bytes being served now.",
         lambda g: g.inflight_bytes),
        ("nbdqcow_export_connections", "Clients connected to the export now.",
         lambda g: g.connections),
    ]
    for metric, text, get in gauges:
        family(metric, "gauge", text)
        for name, _, g in rows:
            emit(f'{metric}{{export="{_esc(name)}"}} {get(g)}')
    family("nbdqcow_export_connections_opened", "counter", "Clients that opened the export.")
    for name, st, _ in rows:
        emit(f'nbdqcow_export_connections_opened_total{{export="{_esc(name)}"}} '
             f"{st.connections_total}")
    family("nbdqcow_exports", "gauge", "Exports served.")
    emit(f"nbdqcow_exports {server.exports}")
    family("nbdqcow_connections", "gauge", "Open connections (any state).")
    emit(f"nbdqcow_connections {server.connections}")
    family("nbdqcow_connections_accepted", "counter", "Connections accepted.")
    emit(f"nbdqcow_connections_accepted_total {server.connections_total}")
    family("nbdqcow_handshakes_failed", "counter", "Connections closed before transmission.")
    emit(f"nbdqcow_handshakes_failed_total {server.handshakes_failed}")
    if server.memory_used is not None:
        family("nbdqcow_memory_budget_used_bytes", "gauge",
               "Request and reply bytes buffered, all connections.")
        emit(f"nbdqcow_memory_budget_used_bytes {server.memory_used}")
    if server.memory_limit is not None:
        family("nbdqcow_memory_budget_limit_bytes", "gauge", "The memory budget.")
        emit(f"nbdqcow_memory_budget_limit_bytes {server.memory_limit}")
    emit("# EOF")
    return "\n".join(out) + "\n"
