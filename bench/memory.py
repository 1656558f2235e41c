#!/usr/bin/env python3
"""Server memory under load: 16 clients, each keeping 32 requests of 1 MiB in flight.

Uses nbdqcow's own client library.  For each server (qemu-nbd and nbdqcow by default)
and each phase (reads, then writes) it reports the idle RSS after connecting and the
peak RSS (VmHWM of /proc/PID/status, reset between phases) and writes a "Memory"
section into bench/RESULTS.md.

    .venv/bin/python bench/memory.py [--seconds 5] [--servers qemu-nbd,nbdqcow]

With ``--abuse`` it runs bench/abuse.py's traffic instead, on the same terms for every
server: 8 connections flooding 32 MiB READs without reading a reply, 4 sending part of a
64 MiB WRITE and then nothing, 2 sending garbage after the greeting over and over, and a
good client verifying what it writes and reads; peak RSS (VmRSS sampled every 50 ms, and
VmHWM) and the good client's figures go to a "Memory under abuse" section.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import abuse  # noqa: E402
from servers import REPO, SERVER_OPTS, Server, nbdqcow_serve_available  # noqa: E402

from nbdqcow.nbdclient import Client, connect  # noqa: E402

MiB = 1 << 20
CLIENTS = 16
DEPTH = 32
REQUEST = MiB


async def _worker(c: Client, phase: str, size: int, stop: float, rng: random.Random) -> int:
    payload = b"\x5a" * REQUEST
    done = 0
    while time.monotonic() < stop:
        off = rng.randrange(size // REQUEST) * REQUEST
        if phase == "read":
            await c.pread(off, REQUEST)
        else:
            await c.pwrite(payload, off)
        done += 1
    return done


async def _sampler(server: Server, stop: float, peak: list[int]) -> None:
    while time.monotonic() < stop:
        peak[0] = max(peak[0], server.status("VmRSS"))
        await asyncio.sleep(0.05)


async def measure(server: Server, size: int, seconds: float) -> dict[str, int | float]:
    clients = [await connect(server.uri, meta_contexts=()) for _ in range(CLIENTS)]
    out: dict[str, int | float] = {}
    try:
        await asyncio.sleep(0.2)
        out["idle_kib"] = server.status("VmRSS")
        for phase in ("read", "write"):
            server.reset_peak_rss()
            stop = time.monotonic() + seconds
            peak = [0]
            t0 = time.monotonic()
            rng = random.Random(phase)
            counts = await asyncio.gather(
                _sampler(server, stop, peak),
                *(
                    _worker(c, phase, size, stop, random.Random(rng.random()))
                    for c in clients
                    for _ in range(DEPTH)
                ),
            )
            elapsed = time.monotonic() - t0
            ops = sum(n for n in counts if isinstance(n, int))
            out[f"{phase}_hwm_kib"] = max(server.status("VmHWM"), peak[0])
            out[f"{phase}_mib_s"] = ops * REQUEST / MiB / elapsed
    finally:
        for c in clients:
            await c.disconnect()
    return out


def update_results(path: Path, section: str, title: str = "Memory") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"\n## " + re.escape(title) + r"\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: "\n" + section.rstrip("\n") + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per phase (5)")
    p.add_argument("--size", type=int, default=512, help="image size in MiB (512)")
    p.add_argument("--servers", default="qemu-nbd,nbdqcow", help="comma-separated list")
    p.add_argument(
        "--results", type=str, default=str(REPO / "bench" / "out" / "RESULTS.md"),
        help="default bench/out/RESULTS.md (untracked); bench/RESULTS.md updates the committed "
        "figures; '' for none"
    )
    p.add_argument("--abuse", action="store_true", help="the abuse scenario (see above)")
    args = p.parse_args(argv)
    kinds = [k for k in args.servers.split(",") if k]
    if "nbdqcow" in kinds and not nbdqcow_serve_available():
        print("memory: `nbdqcow serve` is not available yet; skipping it", file=sys.stderr)
        kinds.remove("nbdqcow")
    if args.abuse:
        return abuse_main(kinds, args.size * MiB, args.seconds, args.results)
    size = args.size * MiB
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbdqcow-mem-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for i, kind in enumerate(kinds):
            image = work / f"image{i}.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True
            )
            # real data everywhere: reads must move bytes, not holes
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x3c 0 {size}", str(image)],
                check=True,
                capture_output=True,
            )
            server = Server(kind, kind, image, work / f"s{i}.sock")
            server.start()
            try:
                r = asyncio.run(measure(server, size, args.seconds))
            finally:
                server.stop()
            rows.append((kind, r))
            print(
                f"{kind:<10} idle {r['idle_kib'] / 1024:7.1f} MiB   "
                f"read peak {r['read_hwm_kib'] / 1024:7.1f} MiB ({r['read_mib_s']:.0f} MiB/s)   "
                f"write peak {r['write_hwm_kib'] / 1024:7.1f} MiB ({r['write_mib_s']:.0f} MiB/s)",
                flush=True,
            )
    lines = [
        "## Memory",
        "",
        f"`bench/memory.py`: {CLIENTS} clients (nbdqcow.nbdclient, one process) each keeping "
        f"{DEPTH} requests of 1 MiB in flight ({CLIENTS * DEPTH} MiB in flight), "
        f"{args.seconds:g} s of random reads then {args.seconds:g} s of random writes on a "
        f"{args.size} MiB qcow2; servers started with `{' '.join(SERVER_OPTS)}`. RSS from "
        "/proc/PID/status: VmRSS after the clients connected, VmHWM per phase (reset between "
        "phases with clear_refs).",
        "",
        "| server | idle RSS MiB | peak RSS reads MiB | peak RSS writes MiB | "
        "reads MiB/s | writes MiB/s |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in rows:
        lines.append(
            f"| {kind} | {r['idle_kib'] / 1024:.1f} | {r['read_hwm_kib'] / 1024:.1f} | "
            f"{r['write_hwm_kib'] / 1024:.1f} | {r['read_mib_s']:.0f} | {r['write_mib_s']:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    print()
    print(section)
    if args.results:
        update_results(Path(args.results), section)
        print(f"memory: updated {args.results}")
    return 0


def _image(work: Path, name: str, size: int) -> Path:
    image = work / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    # real data everywhere: reads must move bytes, not holes
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x3c 0 {size}", str(image)],
                   check=True, capture_output=True)
    return image


def abuse_main(kinds: list[str], size: int, seconds: float, results: str) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbdqcow-abuse-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for i, kind in enumerate(kinds):
            image = _image(work, f"image{i}.qcow2", size)
            server = Server(kind, kind, image, work / f"s{i}.sock")
            server.start()
            try:
                time.sleep(0.3)
                idle = server.status("VmRSS")
                r = abuse.run_abuse(server.pid, server.sock, size, seconds, flooders=8,
                                    stallers=4, garbage=2, request_size=32 * MiB,
                                    write_size=64 * MiB, good_large=128 * 1024)
                time.sleep(1.5)
                r["idle_kib"] = idle
                r["settled_kib"] = server.status("VmRSS")
                r["alive"] = server.proc is not None and server.proc.poll() is None
            finally:
                server.stop()
            rows.append((kind, r))
            peak = max(int(str(r["peak_rss_kib"])), int(str(r["hwm_kib"])))
            print(f"{kind:<10} idle {idle / 1024:6.1f} MiB  peak {peak / 1024:7.1f} MiB  "
                  f"2 s after {int(str(r['settled_kib'])) / 1024:6.1f} MiB  good client: "
                  f"{r['good_ops']} rounds, max {float(str(r['good_max_latency'])):.2f} s, "
                  f"errors {r['good_errors'] or 'none'}", flush=True)
    lines = [
        "## Memory under abuse",
        "",
        f"`bench/memory.py --abuse`: {seconds:g} s of bench/abuse.py's traffic on a "
        f"{size // MiB} MiB qcow2 (servers started with `{' '.join(SERVER_OPTS)}`): 8 "
        "connections flooding 32 MiB READs without reading a reply, 4 sending 1 MiB of a "
        "64 MiB WRITE and then nothing, 2 sending garbage after the greeting over and over, "
        "and a good client (64 KiB write + read back + 128 KiB read, verified) all the while. "
        "Peak RSS: the larger of VmRSS sampled every 50 ms and VmHWM.",
        "",
        "| server | idle RSS MiB | peak RSS MiB | RSS 2 s after MiB | flood requests taken | "
        "good client rounds | good client max latency s | good client errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in rows:
        peak = max(int(str(r["peak_rss_kib"])), int(str(r["hwm_kib"])))
        lines.append(
            f"| {kind} | {int(str(r['idle_kib'])) / 1024:.1f} | {peak / 1024:.1f} | "
            f"{int(str(r['settled_kib'])) / 1024:.1f} | {r['flood_requests']} | "
            f"{r['good_ops']} | {float(str(r['good_max_latency'])):.2f} | "
            f"{len(r['good_errors']) if isinstance(r['good_errors'], list) else 0} |")
    section = "\n".join(lines) + "\n"
    print()
    print(section)
    if results:
        update_results(Path(results), section, "Memory under abuse")
        print(f"memory: updated {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
