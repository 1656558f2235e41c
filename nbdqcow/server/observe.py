"""What the control socket's ``stats`` and the ``/metrics`` endpoint report: counters of
each export plus gauges read from the live connections."""

from __future__ import annotations

from typing import Any

from nbdqcow.server.serve import NbdServer
from nbdqcow.server.stats import ExportStats, Gauges, ServerGauges, render_openmetrics


def gather(server: NbdServer) -> tuple[list[tuple[str, ExportStats, Gauges]], ServerGauges]:
    rows = []
    for e in server.exports:
        g = Gauges()
        for p in server.clients_of(e):
            g.connections += 1
            if p.flow is not None:
                g.inflight_requests += p.flow.requests
                g.inflight_bytes += p.flow.bytes
        rows.append((e.name, e.stats, g))
    sg = ServerGauges(
        exports=len(server.exports),
        connections=len(server.active) + len(server.waiting),
        connections_total=server.connections_total,
        handshakes_failed=server.handshakes_failed,
    )
    budget = getattr(server, "budget", None)
    if budget is not None:
        sg.memory_used = getattr(budget, "used", None)
        sg.memory_limit = getattr(budget, "limit", None)
    return rows, sg


def metrics_text(server: NbdServer) -> str:
    rows, sg = gather(server)
    return render_openmetrics(rows, sg)


def stats_dict(server: NbdServer, name: str | None = None) -> dict[str, Any]:
    rows, sg = gather(server)
    exports = {}
    for ename, st, g in rows:
        if name is not None and ename != name:
            continue
        d = st.to_dict()
        d.update(connections=g.connections, inflight_requests=g.inflight_requests,
                 inflight_bytes=g.inflight_bytes)
        exports[ename] = d
    server_d: dict[str, Any] = {
        "exports": sg.exports, "connections": sg.connections,
        "connections_total": sg.connections_total, "handshakes_failed": sg.handshakes_failed,
    }
    if sg.memory_used is not None:
        server_d["memory_budget_used"] = sg.memory_used
    if sg.memory_limit is not None:
        server_d["memory_budget_limit"] = sg.memory_limit
    return {"server": server_d, "exports": exports}
