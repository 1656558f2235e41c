#!/usr/bin/env python3
"""End-to-end benchmark: qemu-nbd against ``nbdqcow serve`` on copies of one qcow2 image.

fio's nbd engine (4k randread QD1/QD16, 4k randwrite QD16, 64k randread QD16, 1M
sequential read/write QD4) and nbdcopy (read to null:, write from a file), the two
servers interleaved workload by workload.  Server CPU comes from /proc/PID/stat.
Prints a table and writes bench/out/RESULTS.md (untracked; --results bench/RESULTS.md
updates the committed figures).  Speed is measured here, never asserted.

    make bench                     # 5 runs of 5 s per workload and server, 1 GiB image
    .venv/bin/python bench/run.py --quick
    .venv/bin/python bench/run.py --candidate qemu-nbd   # harness check: qemu-nbd twice
    .venv/bin/python bench/run.py --tls --results bench/RESULTS.md  # the TLS section
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tlsbench  # noqa: E402
from servers import (  # noqa: E402
    REPO,
    SERVER_OPTS,
    Server,
    load_average,
    machine_description,
    nbdqcow_serve_available,
)

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Workload:
    name: str
    tool: str  # "fio" or "nbdcopy"
    rw: str = ""  # fio --rw, or "read"/"write" for nbdcopy
    bs: str = ""
    qd: int = 1


WORKLOADS = (
    Workload("4k randread QD1", "fio", "randread", "4k", 1),
    Workload("4k randread QD16", "fio", "randread", "4k", 16),
    Workload("4k randwrite QD16", "fio", "randwrite", "4k", 16),
    Workload("64k randread QD16", "fio", "randread", "64k", 16),
    Workload("1M seq read QD4", "fio", "read", "1M", 4),
    Workload("1M seq write QD4", "fio", "write", "1M", 4),
    Workload("nbdcopy read", "nbdcopy", "read"),
    Workload("nbdcopy write", "nbdcopy", "write"),
)


@dataclass
class Result:
    workload: str
    server: str
    seconds: float
    nbytes: int
    ops: int  # 0 when unknown (nbdcopy)
    cpu: float  # server CPU seconds

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds if self.seconds else 0.0

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu * 1e6 / self.ops if self.ops else float("nan")

    @property
    def cpu_ms_per_gib(self) -> float:
        return self.cpu * 1e3 * GiB / self.nbytes if self.nbytes else float("nan")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    t = text.strip().lower().rstrip("ib").rstrip("b") if text[-1:].lower() == "b" else text.lower()
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def make_images(workdir: Path, size: int, labels: list[str]) -> tuple[Path, dict[str, Path]]:
    """A raw file of incompressible data, a fully allocated qcow2 of it, one copy per server."""
    raw = workdir / "data.raw"
    block = os.urandom(MiB)
    with open(raw, "wb") as f:
        for i in range(size // MiB):
            # vary each MiB a little so no two blocks are identical
            f.write(i.to_bytes(8, "little") + block[8:])
    base = workdir / "base.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True
    )
    copies = {}
    for i, label in enumerate(labels):
        copy = workdir / f"image{i}.qcow2"
        shutil.copyfile(base, copy)
        copies[label] = copy
    base.unlink()
    os.sync()  # no writeback of the fresh copies during the first measurements
    return raw, copies


def run_fio(w: Workload, server: Server, runtime: float) -> Result:
    argv = [
        "fio",
        f"--name={w.name.replace(' ', '_')}",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.qd}",
        f"--runtime={runtime}",
        "--time_based",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    cpu0 = server.cpu_seconds()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    cpu = server.cpu_seconds() - cpu0
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write" if "write" in w.rw else "read"]
    seconds = job["job_runtime"] / 1000.0
    return Result(w.name, server.label, seconds, side["io_bytes"], side["total_ios"], cpu)


def run_nbdcopy(w: Workload, server: Server, raw: Path) -> Result:
    src, dst = (server.uri, "null:") if w.rw == "read" else (str(raw), server.uri)
    argv = ["nbdcopy", src, dst]
    if w.rw == "write":
        argv.insert(1, "--flush")
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    seconds = time.monotonic() - t0
    cpu = server.cpu_seconds() - cpu0
    return Result(w.name, server.label, seconds, raw.stat().st_size, 0, cpu)


def median_result(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.mib_s)
    return ordered[len(ordered) // 2]


@dataclass
class Row:
    """One workload: each server's runs, paired by repetition (adjacent in time)."""

    ref: list[Result]
    cand: list[Result]

    def ratios(self, key: str) -> list[float]:
        out = []
        for a, b in zip(self.ref, self.cand, strict=True):
            x, y = float(getattr(a, key)), float(getattr(b, key))
            if x and x == x and y == y:
                out.append(y / x)
        return out


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"  # NaN -> "-"


def table(rows: list[Row], labels: list[str]) -> str:
    """Per server: the median run.  Ratios: median (and range) of the paired ratios."""
    ref, cand = labels
    head = (
        f"| workload | server | MiB/s | IOPS | CPU µs/op | CPU ms/GiB | {cand}/{ref} throughput "
        f"| range | {cand}/{ref} CPU per byte |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in rows:
        a, b = median_result(row.ref), median_result(row.cand)
        tput = row.ratios("mib_s")
        cpu = row.ratios("cpu_ms_per_gib")
        ratio = statistics.median(tput) if tput else float("nan")
        spread = f"{fmt(min(tput), 2)}-{fmt(max(tput), 2)}" if len(tput) > 1 else ""
        cpu_ratio = statistics.median(cpu) if cpu else float("nan")
        for r, extra in (
            (a, ("", "", "")),
            (b, (f"**{fmt(ratio, 2)}x**", spread, f"{fmt(cpu_ratio, 2)}x")),
        ):
            lines.append(
                f"| {r.workload} | {r.server} | {fmt(r.mib_s)} | "
                f"{fmt(r.iops, 0) if r.ops else '-'} | {fmt(r.cpu_us_per_op)} | "
                f"{fmt(r.cpu_ms_per_gib)} | {extra[0]} | {extra[1]} | {extra[2]} |"
            )
    return "\n".join(lines)


def write_results(
    path: Path, text: str, args: argparse.Namespace, labels: list[str], loads: tuple[str, str]
) -> None:
    machine = machine_description()
    machine["load average (1 min) before / after"] = f"{loads[0]} / {loads[1]}"
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `bench/run.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:",
        f"image {args.size} (fully allocated qcow2, 64 KiB clusters, incompressible data), "
        f"{args.runtime:g} s per fio run, {args.repeat} run(s) per workload and server, "
        "the two servers alternating run by run (the order flips every repetition). Each "
        "server's median run is shown; the ratio is the median of the paired ratios "
        "(run i of one server against run i of the other), with their range. Both servers "
        f"started with "
        f"`{' '.join(SERVER_OPTS)}` on a unix socket. Servers: {labels[0]} (reference) and "
        f"{labels[1]}.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "## Results",
        "",
        *(
            [
                f"**Caution**: the machine was busy (load average {max(loads, key=float)} on "
                f"{machine['nproc']} CPUs) while this ran; other processes competed with "
                "both servers and with fio, so these ratios are noisy.",
                "",
            ]
            if _busy(loads, machine["nproc"])
            else []
        ),
        "CPU is the server's utime+stime (all threads) during the run. CPU µs/op is per "
        "fio request; nbdcopy requests are not counted, so compare CPU ms/GiB there. "
        "Ratios above 1 are better for throughput, below 1 better for CPU.",
        "",
        text,
        "",
    ]
    if path.exists():  # keep the sections bench/memory.py and `run.py --tls` maintain
        old = path.read_text()
        found = [i for i in (old.find("\n## Memory\n"), old.find("\n## TLS\n")) if i >= 0]
        start = min(found) if found else -1
        if start >= 0:
            lines.append(old[start + 1 :].rstrip("\n"))
            lines.append("")
    # keep the section bench/speed.py owns in the same file
    old = path.read_text() if path.exists() else ""
    a, b = old.find("<!-- bench/speed.py -->"), old.find("<!-- /bench/speed.py -->")
    if 0 <= a < b and "<!-- bench/speed.py -->" not in "\n".join(lines):
        lines += ["", old[a:b + len("<!-- /bench/speed.py -->")], ""]
    path.write_text("\n".join(lines))


def tls_text(text: str, args: argparse.Namespace, labels: list[str],
             loads: tuple[str, str]) -> str:
    return "\n".join([
        f"`bench/run.py --tls` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"both servers with `{' '.join(SERVER_OPTS)}` and the same x509 credentials "
        "(`--object tls-creds-x509,id=tls0,dir=PKI,endpoint=server,verify-peer=off "
        "--tls-creds tls0`; ECDSA P-256 certificates from certtool); clients connect with "
        "`nbds+unix:///?socket=S&tls-verify-peer=false` (fio's nbd engine refuses URIs "
        "that name local certificate files), so both directions are encrypted (TLS 1.3, "
        "whatever cipher client and server agree). "
        f"Image {args.size}, {args.runtime:g} s per fio run, {args.repeat} run(s) per "
        "workload and server, interleaved as above (paired ratios, median and range). "
        f"Load average (1 min) before / after: {loads[0]} / {loads[1]} on "
        f"{os.cpu_count()} CPUs shared with other work, so the figures are noisy.",
        "",
        text,
    ])


def _busy(loads: tuple[str, str], nproc: str) -> bool:
    try:
        return max(float(x) for x in loads) > 0.5 * float(nproc) + 1.5
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s runs (same as --runtime 3)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (5)")
    p.add_argument("--size", default="1G", help="image size (1G)")
    p.add_argument("--repeat", type=int, help="runs per workload and server (5; 1 with --quick)")
    p.add_argument("--reference", default="qemu-nbd", help="reference server (qemu-nbd)")
    p.add_argument(
        "--candidate", default="nbdqcow", help="server compared to the reference (nbdqcow)"
    )
    p.add_argument(
        "--only", action="append", default=[], help="run only workloads containing this text"
    )
    p.add_argument("--workdir", type=Path, help="where images go (default: a temporary dir)")
    p.add_argument(
        "--results",
        type=str,
        default=str(REPO / "bench" / "out" / "RESULTS.md"),
        help="markdown output (default bench/out/RESULTS.md, untracked; pass "
        "bench/RESULTS.md to update the committed figures; '' for none)",
    )
    p.add_argument("--tls", action="store_true",
                   help="both servers over TLS (x509, same credentials): the TLS workload "
                   "set; writes the '## TLS' section of --results")
    args = p.parse_args(argv)
    if args.quick:
        args.runtime = 3.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    for tool in ("qemu-img", "qemu-nbd", "fio", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (run scripts/setup.sh)")
    if "nbdqcow" in (args.reference, args.candidate) and not nbdqcow_serve_available():
        raise SystemExit(
            "bench: `nbdqcow serve` is not available yet; "
            "use --candidate qemu-nbd to exercise the harness"
        )
    labels = [args.reference, args.candidate]
    if labels[0] == labels[1]:
        labels[1] += "#2"
    size = parse_size(args.size)
    workloads = [w for w in WORKLOADS if not args.only or any(o in w.name for o in args.only)]
    if args.tls:
        workloads = [w for w in workloads if w.name in tlsbench.TLS_WORKLOADS]

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nbdqcow-bench-", dir="/var/tmp")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        load_before = load_average()
        print(f"bench: creating a {args.size} image in {workdir}", flush=True)
        raw, images = make_images(workdir, size, labels)
        kinds = [args.reference, args.candidate]
        tls_args = tlsbench.server_args(tlsbench.make_server_certs(workdir)) if args.tls else []
        for i, (label, kind) in enumerate(zip(labels, kinds, strict=True)):
            servers.append(Server(label, kind, images[label], workdir / f"server{i}.sock",
                                  extra=list(tls_args), tls=args.tls))
        for s in servers:
            s.start()
            # warm-up, not measured: page cache and server caches in the same state for both
            subprocess.run(["nbdcopy", s.uri, "null:"], check=True, capture_output=True)
        rows: list[Row] = []
        for i, w in enumerate(workloads):
            per_server: dict[str, list[Result]] = {s.label: [] for s in servers}
            for rep in range(args.repeat):
                order = servers if (i + rep) % 2 == 0 else servers[::-1]
                for s in order:
                    if w.tool == "fio":
                        r = run_fio(w, s, args.runtime)
                    else:
                        r = run_nbdcopy(w, s, raw)
                    per_server[s.label].append(r)
                    print(
                        f"  {w.name:<20} {s.label:<12} {r.mib_s:9.1f} MiB/s "
                        f"{r.iops:10.0f} IOPS  cpu {r.cpu:6.2f} s",
                        flush=True,
                    )
            rows.append(Row(per_server[labels[0]], per_server[labels[1]]))
        text = table(rows, labels)
        print()
        print(text)
        if args.results and args.tls:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            tlsbench.replace_section(Path(args.results), "TLS", tls_text(
                text, args, labels, (load_before, load_average())))
            print(f"\nbench: wrote the TLS section of {args.results}")
        elif args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            write_results(Path(args.results), text, args, labels, (load_before, load_average()))
            print(f"\nbench: wrote {args.results}")
    finally:
        for s in servers:
            s.stop()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: servers stopped and images removed by main()
        sys.exit("bench: interrupted")
