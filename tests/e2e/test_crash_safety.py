"""Crash safety: SIGKILL the engine at random moments, then check the image.

``crash_worker.py`` writes, zeroes, discards and flushes forever and journals what it
does (see its docstring).  Each cycle kills it after a random delay, then:

* ``qemu-img check`` finds no corruption (exit 0, or 3 = leaks only; leaks are
  counted).  A lazy-refcounts image left dirty is checked after the engine repaired it;
* the content read by ``qemu-img convert`` (and, identically, by the engine) is what
  the journal allows: bytes no operation after the last completed flush touched are
  exactly the model as of that flush (every range recorded at that flush whose bytes
  were not touched later hashes as recorded); bytes touched after it hold one of the
  values they had since (the flush state or the state after one of those operations);
* the engine reopens the image writable (repairing a dirty lazy-refcount image),
  reads the same content, and the next cycle keeps writing on it.

NBDQCOW_CRASH_CYCLES sets the cycles per image kind (default 6 for v3, extended L2,
lazy refcounts and backed images, two thirds of that for two more kinds).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from crash_worker import Model, image_geometry, merge, sha  # noqa: E402
from tooling import require_tool  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
CYCLES = int(os.environ.get("NBDQCOW_CRASH_CYCLES", "6"))
INCOMPAT_DIRTY = 1


@dataclass(frozen=True)
class Kind:
    name: str
    opts: str
    backing: bool = False
    lazy: bool = False
    mapping: str | None = None  # the worker's open_image(mapping=...); None: default
    cycles: int = CYCLES


KINDS = [
    Kind("v3-64k", "cluster_size=65536"),
    Kind("extl2-64k", "cluster_size=65536,extended_l2=on"),
    Kind("lazy-64k", "cluster_size=65536,lazy_refcounts=on", lazy=True),
    Kind("backed-v3-64k", "cluster_size=65536", backing=True),
    # Many metadata allocations (an L2 table per 32 KiB, a refcount block per 32 KiB).
    Kind("v3-512-rc64", "cluster_size=512,refcount_bits=64", cycles=max(1, CYCLES * 2 // 3)),
    # Freed clusters get reused: a reused cluster must never show through an old L2.
    Kind("v3-64k-release", "cluster_size=65536", mapping="release",
         cycles=max(1, CYCLES * 2 // 3)),
]
SIZE = 4 * MiB


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def must(args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = run(args)
    assert proc.returncode == 0, f"{' '.join(args)} -> {proc.returncode}: {proc.stderr}"
    return proc


def is_dirty(img: Path) -> bool:
    with open(img, "rb") as f:
        head = f.read(80)
    version = struct.unpack_from(">I", head, 4)[0]
    return version >= 3 and bool(struct.unpack_from(">Q", head, 72)[0] & INCOMPAT_DIRTY)


def qemu_check(img: Path) -> int:
    """qemu-img check: exit 0 or 3 (leaks only); returns the number of leaked clusters."""
    proc = run(["qemu-img", "check", "--output=json", str(img)])
    assert proc.returncode in (0, 3), (
        f"qemu-img check exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    )
    report: dict[str, Any] = json.loads(proc.stdout)
    assert not report.get("corruptions"), report
    assert not report.get("check-errors"), report
    leaks: int = report.get("leaks", 0)
    return leaks


def qemu_read(img: Path, tmp: Path) -> bytes:
    raw = tmp / "read.raw"
    must(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)])
    data = raw.read_bytes()
    raw.unlink()
    return data


def engine_read(img: Path, writable: bool) -> bytes:
    from nbdqcow.image import open_image

    drv = open_image(str(img), "qcow2", writable=writable)
    try:
        assert drv.size == SIZE
        return bytes(drv.pread(0, SIZE))
    finally:
        drv.close()


def parse_journal(path: Path) -> list[dict[str, Any]]:
    """Journal records; an unterminated last line (killed mid-write) is dropped."""
    text = path.read_bytes().decode()
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1]]  # lines[-1]: "" or a partial line


@dataclass
class Verdict:
    ops: int = 0
    flushes: int = 0
    after_flush: int = 0
    notes: list[str] = field(default_factory=list)


def first_diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def assert_same(got: bytes, want: bytes, what: str) -> None:
    """Compare big buffers without pytest's assertion diff (slow on megabytes)."""
    if got != want:
        i = first_diff(got, want)
        raise AssertionError(
            f"{what}: first difference at guest offset {i} "
            f"(got {got[i:i + 8].hex()}, want {want[i:i + 8].hex()}; "
            f"lengths {len(got)}/{len(want)})"
        )


def verify(before: bytes, records: list[dict[str, Any]], got: bytes, unit: int) -> Verdict:
    """Check ``got`` (the image after the crash) against the journal replayed on
    ``before`` (the content when the worker started)."""
    v = Verdict()
    if not records:
        # killed before it had opened the image (maybe while repairing it):
        # the guest content must not have changed at all
        assert_same(got, before, "killed during open")
        v.notes.append("killed during open")
        return v
    assert records[0]["t"] == "start", f"bad journal start {records[0]}"
    assert records[0]["sha"] == sha(before), "worker's starting content differs"
    model = Model(before, unit)
    last_flush = max((k for k, r in enumerate(records) if r["t"] == "flush"), default=0)
    recorded: list[list[Any]] = []
    for rec in records[1:last_flush + 1]:
        if rec["t"] == "op":
            model.apply(rec)
            v.ops += 1
        elif rec["t"] == "settle":
            model.apply(rec)
        elif rec["t"] == "flush":
            v.flushes += 1
            for start, end, digest in rec["ranges"]:  # the journal agrees with the replay
                assert sha(model.data[start:end]) == digest, f"journal/replay [{start},{end})"
            recorded = rec["ranges"]
    at_flush = bytes(model.data)
    later = [r for r in records[last_flush + 1:] if r["t"] in ("op", "settle")]
    v.after_flush = sum(1 for r in later if r["t"] == "op")
    dirty = merge([(r["off"], r["off"] + r["len"]) for r in later if r["t"] == "op"])

    # 1. ranges recorded at the last flush and untouched since: exactly as recorded
    for start, end, digest in recorded:
        if not any(s < end and start < e for s, e in dirty):
            assert sha(got[start:end]) == digest, (
                f"range [{start},{end}) recorded at flush {v.flushes} reads back "
                f"differently (first diff at {start + first_diff(got[start:end], at_flush[start:end])})"
            )

    # 2. every byte outside the post-flush operations: the flush state
    pos = 0
    for start, end in [*dirty, (len(got), len(got))]:
        if got[pos:start] != at_flush[pos:start]:
            bad = pos + first_diff(got[pos:start], at_flush[pos:start])
            raise AssertionError(
                f"guest byte {bad} changed although no operation after the last flush "
                f"touched it: got {got[bad]:#x}, flushed {at_flush[bad]:#x}"
            )
        pos = end

    # 3. bytes touched after the flush: one of the values they have had since
    versions = [at_flush]
    for rec in later:
        if rec.get("op") == "discard":
            # killed before its settle record: any byte of the range may read zero
            erased = bytearray(model.data)
            erased[rec["off"]:rec["off"] + rec["len"]] = bytes(rec["len"])
            versions.append(bytes(erased))
        model.apply(rec)
        versions.append(bytes(model.data))
    for start, end in dirty:
        if any(ver[start:end] == got[start:end] for ver in versions):
            continue
        for i in range(start, end):
            if not any(ver[i] == got[i] for ver in versions):
                raise AssertionError(
                    f"guest byte {i} holds {got[i]:#x}, a value it never had since the "
                    f"last flush ({sorted({ver[i] for ver in versions})})"
                )
        v.notes.append(f"[{start},{end}) mixes versions")
    return v


def make_image(kind: Kind, tmp: Path) -> tuple[Path, bytes]:
    img = tmp / "img.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", kind.opts]
    content = bytes(SIZE)
    if kind.backing:
        base = tmp / "base.qcow2"
        must(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
              str(base), str(SIZE)])
        must(["qemu-io", "-f", "qcow2",
              "-c", "write -q -P 0x11 0 1M",
              "-c", f"write -q -P 0x22 {1 * MiB + 3 * KiB} {700 * KiB + 1}",
              "-c", f"write -q -P 0x44 {3 * MiB - 512} {1 * MiB + 512}",
              str(base)])
        expect = bytearray(SIZE)
        expect[0:MiB] = b"\x11" * MiB
        expect[MiB + 3 * KiB:MiB + 3 * KiB + 700 * KiB + 1] = b"\x22" * (700 * KiB + 1)
        expect[3 * MiB - 512:] = b"\x44" * (MiB + 512)
        content = bytes(expect)
        args += ["-b", str(base), "-F", "qcow2"]
    must([*args, str(img), str(SIZE)])
    assert_same(qemu_read(img, tmp), content, "qemu-io did not write the backing pattern")
    return img, content


def run_worker_and_kill(
    img: Path, seed: int, journal: Path, delay: float, early: bool, mapping: str | None
) -> str:
    """Start the worker and SIGKILL it ``delay`` seconds after it has opened the image
    (its journal starts), or, if ``early``, ``delay`` seconds after it was spawned."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, str(HERE / "crash_worker.py"), str(img), str(seed), str(journal)]
    if mapping:
        args.append(f"--mapping={mapping}")
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(REPO)
    )
    try:
        deadline = time.monotonic() + 30
        while not early and not (journal.exists() and journal.stat().st_size > 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert alive, f"the worker died on its own (exit {proc.returncode}): {err.decode()}"
    return err.decode()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_crash_safety(kind: Kind, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    rng = random.Random(f"crash-{kind.name}")
    img, content = make_image(kind, tmp_path)
    unit = image_geometry(str(img))[0]
    current = content
    leaks: list[int] = []
    dirty_seen = repaired = 0
    log: list[str] = []
    for cycle in range(kind.cycles):
        journal = tmp_path / f"journal.{cycle}"
        # Short runs (kills land early: first allocations, first flushes), longer ones
        # (many flushes, overwrites, discards of written data), and kills timed from
        # the spawn that may land while the engine opens (and repairs) the image.
        mode = rng.choice(["short", "long", "long", "spawn"])
        delay = {"short": (0.0, 0.3), "long": (0.2, 1.5), "spawn": (0.05, 0.6)}[mode]
        journal.touch()
        run_worker_and_kill(img, rng.getrandbits(32), journal, rng.uniform(*delay),
                            early=mode == "spawn", mapping=kind.mapping)

        dirty = is_dirty(img)
        if dirty:
            assert kind.lazy, "dirty bit set on an image without lazy refcounts"
            dirty_seen += 1
        else:
            leaks.append(qemu_check(img))

        got = qemu_read(img, tmp_path)
        v = verify(current, parse_journal(journal), got, unit)
        log.append(f"cycle {cycle} ({mode}): {v.ops} ops, {v.flushes} flushes, {v.after_flush} "
                   f"ops after the last flush, dirty={dirty} {' '.join(v.notes)}")
        assert_same(engine_read(img, writable=False), got, "engine vs qemu-img convert")
        # Reopen writable: a dirty lazy-refcount image must be repaired here.  Every
        # other cycle a dirty image is left to the next worker, whose open repairs it
        # (and may be killed while doing so).
        if not (dirty and cycle % 2):
            assert_same(engine_read(img, writable=True), got, "engine after writable reopen")
            assert not is_dirty(img), "the engine left the dirty bit set after a clean close"
            if dirty:
                repaired += 1
                leaks.append(qemu_check(img))
        current = got

    # Keep writing after the last crash, close cleanly: still consistent.
    from nbdqcow.image import open_image

    drv = open_image(str(img), "qcow2", writable=True)  # repairs a dirty image
    tail = random.Random(7).randbytes(3 * 64 * KiB + 77)
    drv.pwrite(tail, 64 * KiB - 33)
    drv.close()
    leaks.append(qemu_check(img))
    expect = bytearray(current)
    expect[64 * KiB - 33:64 * KiB - 33 + len(tail)] = tail
    assert_same(qemu_read(img, tmp_path), bytes(expect), "after the last reopen and write")

    assert not is_dirty(img), "the engine left the dirty bit set after a clean close"
    if kind.lazy:
        assert dirty_seen, "no cycle left the lazy-refcount image dirty: repair not tested"
    print(f"{kind.name}: leaked clusters per check {leaks}; dirty after kill {dirty_seen}, "
          f"repaired by the test's reopen {repaired}")
    print("\n".join(log))
