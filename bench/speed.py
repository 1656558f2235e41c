#!/usr/bin/env python3
"""Metadata, cold-cache and start-up workloads: nbdqcow against qemu's tools, in the
same run, interleaved (the order flips every repetition), medians of the repetitions.

    .venv/bin/python bench/speed.py                      # everything
    .venv/bin/python bench/speed.py --only map --only check --repeat 5
    .venv/bin/python bench/speed.py --results bench/RESULTS.md   # update the section

Workloads (each against its qemu counterpart):

* ``map nbd``: ``nbdinfo --map`` of a 1 TiB qcow2 (64 KiB clusters, 4000 writes of
  4 KiB..1 MiB spread over it) through ``nbdqcow serve -r`` / ``qemu-nbd -r``;
* ``map offline``: ``nbdqcow map --output=json`` / ``qemu-img map --output=json``;
* ``check``: ``nbdqcow check`` / ``qemu-img check`` of the same image;
* ``start-up``: exec to a listening unix socket, ``nbdqcow serve -r`` / ``qemu-nbd -r``;
* ``cold 4k randread QD16`` and ``cold 1M seq read QD4``: fio (nbd engine) on a fully
  allocated 1 GiB image, the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``)
  before every run (needs root), after one unmeasured run per server (``--warmup``);
  the table also gives each server's CPU time per request (median over the runs);
* ``relayout``: ``nbdqcow relayout`` / ``qemu-img convert -O qcow2 -o
  preallocation=falloc`` of a fragmented image (random 64 KiB writes in random order);
  ``relayout flushed``: the same against ``qemu-img convert -t writeback`` (qemu-img's
  default cache mode, ``unsafe``, never syncs the new image; relayout syncs it before
  the rename, as ``-t writeback`` syncs once at the end); ``relayout unsafe``:
  ``nbdqcow relayout -t unsafe`` (nothing synced) against qemu-img's default;
* ``layout 8G fragmented``: ``nbdqcow layout -o x.png`` of a fragmented image
  (``--layout-size``, 8 GiB: every 64 KiB cluster written once in random order, so
  none is in place), time only: qemu has no counterpart ('-' in the table).

Times are wall-clock seconds (lower is better); the ratio is nbdqcow / qemu, per
repetition, median (below 1.00x nbdqcow is faster).  For fio workloads the figure is
MiB/s and the ratio nbdqcow / qemu-nbd (above 1.00x nbdqcow is faster).  Speed is
measured here, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import CLK_TCK, REPO, load_average, machine_description  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PY = [sys.executable]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = str(REPO)
BEGIN, END = "<!-- bench/speed.py -->", "<!-- /bench/speed.py -->"


def nbdqcow(*args: str) -> list[str]:
    return [*PY, "-m", "nbdqcow", *args]


def run(argv: list[str], out: int | None = subprocess.DEVNULL) -> None:
    subprocess.run(argv, check=True, stdout=out, stderr=subprocess.PIPE, env=ENV)


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    run(argv)
    return time.perf_counter() - t0


# --- images ------------------------------------------------------------------------------
#: qemu-io writes through by default (a flush after every write: 8.5 minutes for the
#: 131,072 writes of an 8 GiB fragmented image); writeback flushes once, at exit
QEMU_IO = ["qemu-io", "-t", "writeback", "-f", "qcow2"]


def sparse_image(path: Path, writes: int = 4000, seed: int = 11) -> None:
    """1 TiB qcow2, 64 KiB clusters, ``writes`` writes of 4 KiB..1 MiB spread over it."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), "1T"])
    r = random.Random(seed)
    cmds = []
    for i in range(writes):
        n = r.randrange(1, 257) * 4096
        off = r.randrange(0, (TiB - n) // 4096) * 4096
        cmds.append(f"write -P {i % 250 + 1} {off} {n}\n")
    subprocess.run([*QEMU_IO, str(path)], input="".join(cmds).encode(),
                   check=True, stdout=subprocess.DEVNULL)


def allocated_image(path: Path, size: int) -> None:
    """A fully allocated qcow2 of incompressible data."""
    raw = path.with_suffix(".raw")
    block = os.urandom(MiB)
    with open(raw, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()


def fragmented_image(path: Path, size: int, seed: int = 5) -> None:
    """Every 64 KiB cluster written once, in random order (so none is in place)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    order = list(range(size // 65536))
    random.Random(seed).shuffle(order)
    cmds = "".join(f"write -P {c % 255 + 1} {c * 65536} 65536\n" for c in order)
    subprocess.run([*QEMU_IO, str(path)], input=cmds.encode(), check=True,
                   stdout=subprocess.DEVNULL)


# --- servers -----------------------------------------------------------------------------
def until_listening(argv: list[str], sock: Path) -> tuple[float, subprocess.Popen[bytes]]:
    sock.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit(f"bench: {argv[0]} exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.0005)
    return time.perf_counter() - t0, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def server_argv(which: str, image: Path, sock: Path, *extra: str) -> list[str]:
    if which == "qemu":
        return ["qemu-nbd", "-f", "qcow2", *extra, "-k", str(sock), str(image)]
    return nbdqcow("serve", "-f", "qcow2", *extra, "-k", str(sock), str(image))


def nbd_map(which: str, image: Path, work: Path) -> float:
    sock = work / f"map-{which}.sock"
    _, proc = until_listening(server_argv(which, image, sock, "-r", "-t"), sock)
    try:
        return timed(["nbdinfo", "--map", f"nbd+unix:///?socket={sock}"])
    finally:
        stop(proc)


def startup(which: str, image: Path, work: Path) -> float:
    sock = work / f"start-{which}.sock"
    t, proc = until_listening(server_argv(which, image, sock, "-r", "-t"), sock)
    stop(proc)
    return t


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


#: server CPU seconds per request of every fio run, by server ("nbdqcow", "qemu")
CPU_PER_OP: dict[str, list[float]] = {"nbdqcow": [], "qemu": []}


def fio(which: str, image: Path, work: Path, rw: str, bs: str, qd: int,
        runtime: float | None, record: bool = True) -> float:
    sock = work / f"fio-{which}.sock"
    _, proc = until_listening(
        server_argv(which, image, sock, "-r", "-t", "--cache=writeback", "--aio=threads",
                    "-e", "16"), sock)
    try:
        drop_caches()
        argv = ["fio", "--name=cold", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--norandommap",
                "--randrepeat=0", "--output-format=json", "--readonly"]
        if runtime:
            argv += [f"--runtime={runtime}", "--time_based"]
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        cpu = cpu_seconds(proc.pid) - cpu0
        job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
        if record:
            CPU_PER_OP[which].append(cpu / max(1, job["total_ios"]))
        return job["io_bytes"] / MiB / (job["runtime"] / 1000.0)
    finally:
        stop(proc)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads, kernel workers included)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cold_fio(name: str, image: Path, work: Path, rw: str, bs: str, qd: int,
             runtime: float | None, repeat: int, warmup: int) -> dict[str, object]:
    """A cold fio workload: ``warmup`` unmeasured runs per server first (the first
    reads of an image after it was written, or after a while, wait for the host below
    this VM too, and would penalise whichever server goes first), then ``repeat``
    interleaved measured runs; the row gets the servers' CPU per request."""
    for _ in range(warmup):
        for which in ("nbdqcow", "qemu"):
            fio(which, image, work, rw, bs, qd, runtime, record=False)
    for v in CPU_PER_OP.values():
        v.clear()
    row = interleave(name, lambda w: fio(w, image, work, rw, bs, qd, runtime), repeat, True)
    row["cpu_us"] = {w: statistics.median(v) * 1e6 for w, v in CPU_PER_OP.items() if v}
    cpu = row["cpu_us"]
    assert isinstance(cpu, dict)
    if len(cpu) == 2:
        print(f"{'':28} server CPU per request: nbdqcow {cpu['nbdqcow']:.1f} us, "
              f"qemu-nbd {cpu['qemu']:.1f} us", flush=True)
    return row


# --- driver ------------------------------------------------------------------------------
Measure = Callable[[str], float]


def interleave(name: str, measure: Measure, repeat: int, higher_better: bool) -> dict[str, object]:
    got: dict[str, list[float]] = {"nbdqcow": [], "qemu": []}
    for i in range(repeat):
        order = ["nbdqcow", "qemu"] if i % 2 == 0 else ["qemu", "nbdqcow"]
        for which in order:
            got[which].append(measure(which))
    ratios = [a / b for a, b in zip(got["nbdqcow"], got["qemu"], strict=True) if b]
    row = {"workload": name, "unit": "MiB/s" if higher_better else "s",
           "nbdqcow": statistics.median(got["nbdqcow"]), "qemu": statistics.median(got["qemu"]),
           "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
           "runs": got}
    print(f"{name:28} nbdqcow {row['nbdqcow']:9.3f} qemu {row['qemu']:9.3f} {row['unit']:5}"
          f" ratio {row['ratio']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    return row


def solo(name: str, measure: Callable[[], float], repeat: int) -> dict[str, object]:
    """A workload qemu has no counterpart for: nbdqcow's time only."""
    got = [measure() for _ in range(repeat)]
    row = {"workload": name, "unit": "s", "nbdqcow": statistics.median(got), "qemu": None,
           "ratio": None, "low": None, "high": None, "runs": {"nbdqcow": got}}
    print(f"{name:28} nbdqcow {row['nbdqcow']:9.3f} (range {min(got):.3f}-{max(got):.3f})",
          flush=True)
    return row


def markdown(rows: list[dict[str, object]], load0: str, load1: str, repeat: int) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    m = machine_description()
    lines = [
        BEGIN,
        "## Metadata, cold cache, start-up (bench/speed.py)",
        "",
        f"Produced by `bench/speed.py` on {when}, {repeat} repetition(s) per workload, "
        "nbdqcow and qemu's tool alternating (the order flips every repetition); medians, "
        "and the median of the paired ratios with their range. Times in seconds (ratio "
        "below 1.00x: nbdqcow faster); fio figures in MiB/s (ratio above 1.00x: nbdqcow "
        "faster). Cold runs drop the page cache before every run.",
        "",
        f"Machine: {m.get('nproc', '?')} CPUs, {m.get('cpu', '?')}; load average before "
        f"{load0}, after {load1} (the machine is shared: ratios are the figure to read).",
        "",
        "| workload | nbdqcow | qemu | unit | ratio (range) | server CPU µs/request "
        "nbdqcow / qemu |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        cpu = r.get("cpu_us")
        cpu_text = (f"{cpu['nbdqcow']:.1f} / {cpu['qemu']:.1f}"
                    if isinstance(cpu, dict) and len(cpu) == 2 else "")
        if r["qemu"] is None:
            lines.append(f"| {r['workload']} | {r['nbdqcow']:.3f} | - | {r['unit']} | - | |")
            continue
        lines.append(f"| {r['workload']} | {r['nbdqcow']:.3f} | {r['qemu']:.3f} | {r['unit']} | "
                     f"{r['ratio']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) | {cpu_text} |")
    lines += ["", END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    path.write_text(text.rstrip("\n") + "\n")


WORKLOADS = ("map nbd", "map offline", "check", "start-up", "cold 4k randread QD16",
             "cold 1M seq read QD4", "relayout", "relayout flushed", "relayout unsafe",
             "layout 8G fragmented")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[],
                    help="run workloads whose name contains this text (repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per tool (3)")
    ap.add_argument("--cold-size", default="1G", help="image for cold reads (1G)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured runs per server before each cold workload (1)")
    ap.add_argument("--relayout-size", default="2G", help="fragmented image (2G)")
    ap.add_argument("--layout-size", default="8G", help="fragmented image for layout (8G)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per 4k fio run")
    ap.add_argument("--workdir", help="keep images here (default: a temporary directory)")
    ap.add_argument("--results", default=str(REPO / "bench" / "out" / "RESULTS-speed.md"),
                    help="markdown file whose bench/speed.py section is replaced "
                    "(bench/RESULTS.md to update the committed figures; '' for none)")
    a = ap.parse_args(argv)
    todo = [w for w in WORKLOADS if not a.only or any(o in w for o in a.only)]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="nbdqcow-speed-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    mult = {"G": GiB, "M": MiB}
    cold_size = int(a.cold_size[:-1]) * mult[a.cold_size[-1]]
    rel_size = int(a.relayout_size[:-1]) * mult[a.relayout_size[-1]]
    layout_size = int(a.layout_size[:-1]) * mult[a.layout_size[-1]]
    rows: list[dict[str, object]] = []
    load0 = load_average()
    try:
        sparse = work / "sparse1T.qcow2"
        if any(w in todo for w in ("map nbd", "map offline", "check", "start-up")) \
                and not sparse.exists():
            print("bench: writing the 1 TiB sparse image ...", flush=True)
            sparse_image(sparse)
        if "map nbd" in todo:
            rows.append(interleave("map nbd (1 TiB sparse)",
                                   lambda w: nbd_map(w, sparse, work), a.repeat, False))
        if "map offline" in todo:
            rows.append(interleave("map offline (1 TiB sparse)", lambda w: timed(
                nbdqcow("map", "--output=json", str(sparse)) if w == "nbdqcow" else
                ["qemu-img", "map", "--output=json", str(sparse)]), a.repeat, False))
        if "check" in todo:
            rows.append(interleave("check (1 TiB sparse)", lambda w: timed(
                nbdqcow("check", str(sparse)) if w == "nbdqcow" else
                ["qemu-img", "check", str(sparse)]), a.repeat, False))
        if "start-up" in todo:
            rows.append(interleave("start-up to listening",
                                   lambda w: startup(w, sparse, work), a.repeat, False))
        cold = work / "cold.qcow2"
        if any(w.startswith("cold") for w in todo) and not cold.exists():
            print("bench: writing the allocated image ...", flush=True)
            allocated_image(cold, cold_size)
        if "cold 4k randread QD16" in todo:
            rows.append(cold_fio("cold 4k randread QD16", cold, work, "randread", "4k", 16,
                                 a.runtime, a.repeat, a.warmup))
        if "cold 1M seq read QD4" in todo:
            rows.append(cold_fio("cold 1M seq read QD4", cold, work, "read", "1M", 4, None,
                                 a.repeat, a.warmup))
        if any(w.startswith("relayout") for w in todo):
            frag = work / "frag.qcow2"
            if not frag.exists():
                print("bench: writing the fragmented image ...", flush=True)
                fragmented_image(frag, rel_size)
            out = work / "out.qcow2"

            def relayout(w: str) -> float:
                out.unlink(missing_ok=True)
                if w == "nbdqcow":
                    return timed(nbdqcow("relayout", "-q", "-O", str(out), str(frag)))
                return timed(["qemu-img", "convert", "-O", "qcow2", "-o",
                              "preallocation=falloc", str(frag), str(out)])

            def unsafe() -> float:  # -t unsafe: nothing synced, as qemu-img's default
                out.unlink(missing_ok=True)
                return timed(nbdqcow("relayout", "-q", "-t", "unsafe", "-O", str(out),
                                     str(frag)))

            def flushed() -> float:  # -t writeback: qemu-img syncs once at the end, as we do
                out.unlink(missing_ok=True)
                return timed(["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", "-o",
                              "preallocation=falloc", str(frag), str(out)])

            if "relayout" in todo:
                rows.append(interleave(f"relayout ({a.relayout_size} fragmented)", relayout,
                                       a.repeat, False))
            if "relayout flushed" in todo:
                rows.append(interleave(f"relayout flushed ({a.relayout_size})", lambda w: (
                    relayout(w) if w == "nbdqcow" else flushed()), a.repeat, False))
            if "relayout unsafe" in todo:
                rows.append(interleave(f"relayout unsafe ({a.relayout_size})", lambda w: (
                    unsafe() if w == "nbdqcow" else relayout(w)), a.repeat, False))
        if "layout 8G fragmented" in todo:
            lframe = work / f"frag{a.layout_size}.qcow2"
            if not lframe.exists():
                print(f"bench: writing the {a.layout_size} fragmented image ...", flush=True)
                fragmented_image(lframe, layout_size)
            png = work / "layout.png"
            rows.append(solo(f"layout {a.layout_size} fragmented", lambda: timed(
                nbdqcow("layout", "-o", str(png), str(lframe))), a.repeat))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    load1 = load_average()
    print(f"load average before {load0}, after {load1}")
    if a.results:
        path = Path(a.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_section(path, markdown(rows, load0, load1, a.repeat))
        print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
