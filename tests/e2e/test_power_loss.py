"""Power loss: crash states rebuilt from every write and sync the engine makes.

The SIGKILL tests (test_crash_safety.py) keep the page cache; a power cut keeps only
what was synced.  Here the engine runs in-process (``open_image`` / ``pwrite`` /
``write_zeroes`` / ``discard`` / ``flush`` / ``close``) a random operation sequence on a
small image while :class:`powerlog.Recorder` logs every change it makes to the image
file and every sync.  Then, before each sync, crash states are built: the file as of
its last sync plus none, all, every prefix and random subsets of the changes made
since, with writes torn at 512-byte sectors.  Each state must

* pass ``qemu-img check`` (no corruption, no check error; leaked clusters are allowed);
* read back the same through ``qemu-img convert -O raw`` and through the engine;
* keep the promises made to the client (:class:`powerlog.Promises`): everything a
  completed FLUSH or FUA write covered reads as it was then; bytes touched by later
  operations read one of the values they held since, never anything else;
* (a sample) open writable in the engine (repairing a dirty lazy-refcount image),
  close, and still pass ``qemu-img check`` with the same content.

The final image must equal the replay of the whole log (nothing changed the file
behind the recorder), and every change must have come from nbdqcow/block/hostfile.py.

NBDQCOW_POWER_STATES: crash states per image kind (default 90); NBDQCOW_POWER_OPS:
guest operations per run (default 40); NBDQCOW_POWER_SEED: the seed (default 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from crash_worker import Model, image_geometry, payload  # noqa: E402
from powerlog import (  # noqa: E402
    CrashPoint,
    Event,
    GuestOp,
    Promises,
    Recorder,
    build,
    crash_points,
    replay_all,
    selections,
)
from tooling import require_tool  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
STATES = int(os.environ.get("NBDQCOW_POWER_STATES", "90"))
OPS = int(os.environ.get("NBDQCOW_POWER_OPS", "40"))
SEED = int(os.environ.get("NBDQCOW_POWER_SEED", "1"))
SECTOR = 512


@dataclass(frozen=True)
class Kind:
    name: str
    opts: str
    size: int = 2 * MiB
    backing: bool = False
    mapping: str | None = None
    cache_size: int | None = None  # small: L2 / refcount-block evictions mid-operation
    prefill: int = 0  # bytes qemu-io writes first (pushes the host file towards growth)
    max_len: int = 0  # longest operation (default three clusters)
    snapshot: bool = False  # an internal snapshot taken after the prefill
    prefill_zeroed: bool = False  # then zeroed by qemu-io (zero clusters keeping their host)
    expect_growth: bool = False
    compress: bool = False  # some writes are compressed (Qcow2Driver.write_compressed)
    # lazy refcounts, left dirty by qemu (qemu-io aborted: refcounts missing); the
    # engine's first open repairs it.  A crash state still marked dirty is judged after
    # a repair (the dirty bit tells every opener to repair first), others strictly.
    dirty_start: bool = False
    data_file: bool = False  # an external data file (its own writes and syncs)


KINDS = [
    Kind("v3-64k", "cluster_size=65536"),
    Kind("extl2-64k", "cluster_size=65536,extended_l2=on"),
    Kind("lazy-64k", "cluster_size=65536,lazy_refcounts=on"),
    Kind("lazy-dirty-64k", "cluster_size=65536,lazy_refcounts=on", dirty_start=True),
    Kind("backed-v3-64k", "cluster_size=65536", backing=True),
    Kind("backed-lazy-extl2-64k", "cluster_size=65536,lazy_refcounts=on,extended_l2=on",
         backing=True),
    # 512-byte clusters: an L2 table per 32 KiB and a refcount block per 32 KiB of host
    # file; the refcount table (64 entries) grows past 2 MiB of host file.
    Kind("v3-512-rc64", "cluster_size=512,refcount_bits=64", size=4 * MiB,
         cache_size=2 * KiB, prefill=1970 * KiB, max_len=32 * KiB, expect_growth=True),
    Kind("v2-64k", "cluster_size=65536,compat=0.10"),
    Kind("v3-64k-release", "cluster_size=65536", mapping="release"),
    Kind("datafile-64k", "cluster_size=65536", data_file=True),
    Kind("v3-1k-release-smallcache", "cluster_size=1024,refcount_bits=16", mapping="release",
         cache_size=4 * KiB, max_len=8 * KiB),
    Kind("v3-64k-thin", "cluster_size=65536", mapping="thin", prefill=512 * KiB),
    # compressed clusters packed byte-wise into shared host clusters, freed and reused
    Kind("compress-4k-release", "cluster_size=4096", mapping="release", compress=True,
         max_len=16 * KiB),
    # internal snapshot: "preserve" moves the snapshot's copy (unshare.py), "release"
    # copies on write as qemu; the snapshot must read back unchanged in every state
    Kind("snapshot-v3-64k", "cluster_size=65536", prefill=1 * MiB, snapshot=True),
    Kind("snapshot-v3-64k-release", "cluster_size=65536", prefill=1 * MiB, snapshot=True,
         mapping="release"),
]


# --------------------------------------------------------------------------- tools
def run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=120)


def must(args: list[str]) -> bytes:
    proc = run(args)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr.decode()}"
    return proc.stdout


def qemu_check(img: Path) -> str | None:
    """None when ``qemu-img check`` finds no corruption (leaks allowed), else why."""
    proc = run(["qemu-img", "check", "--output=json", str(img)])
    if proc.returncode not in (0, 3):
        return f"qemu-img check exit {proc.returncode}: {proc.stdout.decode()}{proc.stderr.decode()}"
    report: dict[str, Any] = json.loads(proc.stdout)
    if report.get("corruptions") or report.get("check-errors"):
        return f"qemu-img check: {report}"
    return None


def is_dirty(img: Path) -> bool:
    with open(img, "rb") as f:
        head = f.read(80)
    return struct.unpack_from(">I", head, 4)[0] >= 3 and bool(
        struct.unpack_from(">Q", head, 72)[0] & 1)


def qemu_read(img: Path, out: Path) -> bytes | str:
    proc = run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)])
    if proc.returncode:
        return f"qemu-img convert exit {proc.returncode}: {proc.stderr.decode()}"
    data = out.read_bytes()
    out.unlink()
    return data


def engine_read(img: Path, writable: bool, snapshot: str | None = None) -> bytes | str:
    from nbdqcow.errors import NbdqcowError
    from nbdqcow.image import open_image

    try:
        drv = open_image(str(img), "qcow2", writable=writable, snapshot=snapshot)
        try:
            return bytes(drv.pread(0, drv.size))
        finally:
            drv.close()
    except (NbdqcowError, OSError) as e:
        return f"engine ({'writable' if writable else 'read-only'}): {e}"


# --------------------------------------------------------------------------- workload
def make_image(kind: Kind, tmp: Path) -> tuple[Path, bytes]:
    img = tmp / "img.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", kind.opts]
    if kind.backing:
        base = tmp / "base.qcow2"
        must(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
              str(base), str(kind.size)])
        must(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 640K",
              "-c", f"write -q -P 0x22 {kind.size // 2 + 3 * KiB} {300 * KiB + 1}", str(base)])
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    if kind.data_file:
        # named by its absolute path where the crash states are built (crash/): the
        # workload runs on it first, the crash states overwrite it afterwards
        (tmp / "crash").mkdir(exist_ok=True)
        args += ["-o", f"data_file={data_path(tmp)}"]
    must([*args, str(img), str(kind.size)])
    if kind.prefill:
        must(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {kind.prefill}",
              "-c", f"write -q -z {kind.prefill // 3} {kind.prefill // 5}", str(img)])
    if kind.prefill_zeroed:
        must(["qemu-io", "-f", "qcow2", "-c", f"write -q -z 0 {kind.prefill}", str(img)])
    if kind.snapshot:
        must(["qemu-img", "snapshot", "-c", "snap1", str(img)])
    if kind.dirty_start:
        run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x33 0 512k",
             "-c", f"write -q -P 0x44 {kind.size // 2} 128k", "-c", "abort", str(img)])
        assert is_dirty(img) and qemu_check(img) is not None, "qemu-io left no dirty image"
    content = qemu_read(img, tmp / "initial.raw")
    assert isinstance(content, bytes), content
    fd = os.open(img, os.O_RDONLY)
    os.fsync(fd)  # the starting point is durable
    os.close(fd)
    return img, content


def data_path(tmp: Path) -> Path:
    return tmp / "crash" / "img.data"


def random_range(rng: random.Random, size: int, cluster: int, unit: int, max_len: int
                 ) -> tuple[int, int]:
    """1 byte .. max_len, aligned or not, mostly around a few hot spots."""
    if rng.random() < 0.3:
        off = rng.randrange(size)
    else:
        anchors = [0, cluster, size // 2, size - 3 * cluster, size - cluster]
        off = rng.choice(anchors) + rng.randint(-3 * cluster, 3 * cluster)
    align = rng.choice([1, 1, 512, unit, cluster])
    length = rng.randint(1, max_len)
    off = min(max(off, 0), size - 1) // align * align
    if align > 1:
        length = max(align, length // align * align)
    return off, min(length, size - off)


@dataclass
class Run:
    """What the workload did: the log, the guest operations and the flushed contents."""

    rec: Recorder
    ops: list[GuestOp]
    flushed: list[bytes]  # guest content at each completed flush (index 0: the start)
    final: bytes
    compressed: int = 0  # compressed writes the engine took


def random_script(kind: Kind, img: Path, rng: random.Random) -> list[dict[str, Any]]:
    """OPS random operations: writes (some FUA), write-zeroes, discards, flushes, and a
    close + reopen half way."""
    unit, size, _ = image_geometry(str(img))
    with open(img, "rb") as f:
        cluster = 1 << struct.unpack_from(">I", f.read(24), 20)[0]
    max_len = kind.max_len or 3 * cluster
    script: list[dict[str, Any]] = []
    for i in range(OPS):
        r = rng.random()
        if i == OPS // 2:
            script.append({"op": "reopen"})
            continue
        if r < 0.15:
            script.append({"op": "flush"})
            continue
        off, length = random_range(rng, size, cluster, unit, max_len)
        opr: dict[str, Any] = {"off": off, "len": length}
        if kind.compress and r < 0.45:
            # whole clusters; the engine refuses allocated ones (then nothing changes)
            first = off // cluster if rng.random() < 0.3 else rng.randrange(size // cluster)
            n = min(rng.randint(1, 4), size // cluster - first)
            opr.update(op="compress", off=first * cluster, len=n * cluster, clusters=n,
                       seed=rng.getrandbits(32), fua=False)
        elif r < 0.6:
            opr.update(op="write", seed=rng.getrandbits(32), fua=rng.random() < 0.15)
        elif r < 0.8:
            opr.update(op="zero", unmap=rng.random() < 0.5, fua=False)
        else:
            opr.update(op="discard", fua=False)
        script.append(opr)
    return script


def settle_discard(model: Model, got: bytes, off: int) -> None:
    """After a discard (TRIM) of [off, off+len(got)): whole discard units read as zeros
    (the engine's promise); any other byte of the range is the client's to lose (NBD:
    its content is unspecified) and may read its old value or zero (the engine erases
    the trimmed bytes of data it holds alone), never anything else.  The model takes
    what the engine shows."""
    end = off + len(got)
    old = bytes(model.data[off:end])
    model.apply({"op": "discard", "off": off, "len": len(got)})
    want = bytes(model.data[off:end])
    if got != want:
        for i, (g, w, o) in enumerate(zip(got, want, old, strict=True)):
            if g != w and not (g == 0 and w == o):
                raise AssertionError(f"after a discard, guest byte {off + i} reads {g:#04x} "
                                     f"(neither its old value {o:#04x} nor zero)")
        model.data[off:end] = got


def compressible(seed: int, length: int) -> bytes:
    """Data that compresses well (runs of random bytes)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < length:
        out += bytes([rng.randrange(256)]) * rng.randint(1, 300)
    return bytes(out[:length])


def run_workload(kind: Kind, img: Path, content: bytes, script: list[dict[str, Any]]) -> Run:
    """Run ``script`` on the engine under the recorder, modelling what it promises."""
    from nbdqcow.image import open_image
    from nbdqcow.qcow2.compressing import CompressedWriteError
    from nbdqcow.qcow2.driver import Qcow2Driver

    unit, size, _ = image_geometry(str(img))
    model = Model(content, unit)
    ops: list[GuestOp] = []
    flushed = [bytes(content)]
    compressed = 0

    def open_drv() -> Qcow2Driver:
        drv = open_image(str(img), "qcow2", writable=True, mapping=kind.mapping,
                         cache_size=kind.cache_size)  # opens the backing chain too
        assert isinstance(drv, Qcow2Driver)
        return drv

    tracked = [str(img)] + ([str(data_path(img.parent))] if kind.data_file else [])
    with Recorder(tracked) as rec:
        rec.mark("open")
        drv = open_drv()
        for opr in [*script, {"op": "close"}]:
            if opr["op"] in ("flush", "close", "reopen"):
                rec.mark(opr["op"])
                if opr["op"] == "flush":
                    drv.flush()
                else:
                    drv.close()
                flushed.append(bytes(model.data))
                rec.mark("flushed", len(flushed) - 1)
                if opr["op"] == "reopen":
                    drv = open_drv()
                continue
            off, length = opr["off"], opr["len"]
            j = len(ops)
            rec.mark("op", j)
            if opr["op"] == "write":
                drv.pwrite(payload(opr["seed"], length), off, fua=opr["fua"])
            elif opr["op"] == "compress":
                data = compressible(opr["seed"], length)
                cs = length // opr["clusters"]
                for k in range(0, length, cs):  # cluster by cluster: a refusal is per cluster
                    try:
                        drv.write_compressed(data[k:k + cs], off + k)
                        model.data[off + k:off + k + cs] = data[k:k + cs]
                        compressed += 1
                    except CompressedWriteError:
                        pass  # already allocated: refused before anything changed
            elif opr["op"] == "zero":
                drv.write_zeroes(off, length, may_unmap=opr["unmap"])
            else:
                drv.discard(off, length)
            if opr["op"] == "discard":
                settle_discard(model, drv.pread(off, length), off)
            elif opr["op"] != "compress":
                model.apply(opr)
            s, e = off // SECTOR * SECTOR, min(size, -(-(off + length) // SECTOR) * SECTOR)
            ops.append(GuestOp(off, off + length, bool(opr.get("fua")), s,
                               bytes(model.data[s:e])))
            rec.mark("done", j)
    return Run(rec, ops, flushed, bytes(model.data), compressed)


def promises_at(run: Run, index: int) -> Promises:
    """What the client was promised at a crash just before log entry ``index``."""
    base = 0
    started: list[int] = []
    done: set[int] = set()
    for ev in run.rec.events[:index]:
        if ev.kind != "mark":
            continue
        if ev.mark[0] == "flushed":
            base = ev.mark[1]
            started, done = [], set()
        elif ev.mark[0] == "op":
            started.append(ev.mark[1])
        elif ev.mark[0] == "done":
            done.add(ev.mark[1])
    later = []
    for j in started:
        o = run.ops[j]
        later.append(GuestOp(o.start, o.end, o.fua_done and j in done, o.span_start, o.after))
    return Promises(run.flushed[base], later)


# --------------------------------------------------------------------------- checking
@dataclass
class Tally:
    points: int = 0
    states: int = 0
    unique: int = 0
    reopened: int = 0
    leaks: int = 0


class Checker:
    def __init__(self, tmp: Path, img: Path, size: int, snapshot: bytes | None = None,
                 repair_dirty: bool = False) -> None:
        self.snapshot = snapshot  # what snapshot "snap1" holds (never changes)
        self.repair_dirty = repair_dirty
        self.dir = tmp / "crash"
        self.dir.mkdir(exist_ok=True)
        self.img_name = img.name
        self.size = size
        self.cache: dict[str, tuple[str | None, bytes | None]] = {}
        if (img.parent / "base.qcow2").exists():
            os.symlink(img.parent / "base.qcow2", self.dir / "base.qcow2")

    def state(self, files: dict[str, bytearray], path: str, reopen: bool, t: Tally
              ) -> tuple[str | None, bytes | None]:
        """(error, guest content) of a crash state; qemu results cached by content."""
        data = files[path]
        digest = hashlib.sha256(data)
        for other in sorted(p for p in files if p != path):  # the data file
            digest.update(files[other])
        key = digest.hexdigest()
        if key in self.cache:
            return self.cache[key]
        t.unique += 1
        img = self.dir / self.img_name
        img.write_bytes(data)
        for other in (p for p in files if p != path):
            Path(other).write_bytes(files[other])
        result = self._examine(img, reopen, t)
        self.cache[key] = result
        return result

    def _examine(self, img: Path, reopen: bool, t: Tally) -> tuple[str | None, bytes | None]:
        repair = self.repair_dirty and is_dirty(img)
        if repair:
            reopen = True  # judged after the repair every opener makes
        else:
            err = qemu_check(img)
            if err:
                return err, None
        got = qemu_read(img, self.dir / "read.raw")
        if isinstance(got, str):
            return got, None
        mine = engine_read(img, writable=False)
        if isinstance(mine, str):
            return mine, got
        if mine != got:
            return "the engine and qemu-img convert read different content", got
        if self.snapshot is not None and engine_read(img, False, "snap1") != self.snapshot:
            return "the internal snapshot does not read as it was taken", got
        if reopen:
            t.reopened += 1
            mine = engine_read(img, writable=True)
            if isinstance(mine, str):
                return mine, got
            if mine != got:
                return "content changed after the engine reopened the image writable", got
            err = qemu_check(img)
            if err:
                return f"after the engine reopened it: {err}", got
        return None, got


def plan_states(points: list[CrashPoint], budget: int, rng: random.Random
                ) -> list[tuple[CrashPoint, str, Any]]:
    """Systematic states first (all / none at every crash point, then prefixes and "all
    but one", thinned out if they do not fit), then random subsets up to ``budget``."""
    plan: list[tuple[CrashPoint, str, Any]] = []
    for cp in points:
        for name, sel in selections(cp, rng, 0, prefixes=False):
            plan.append((cp, name, sel))
    prefixes = [(cp, n, s) for cp in points for n, s in selections(cp, rng, 0)[2:]]
    room = max(0, budget * 2 // 3 - len(plan))
    if len(prefixes) > room:
        prefixes = rng.sample(prefixes, room)
    plan += prefixes
    with_pending = [cp for cp in points if cp.pending]
    k = 0
    while len(plan) < budget and with_pending:
        cp = with_pending[k % len(with_pending)]
        name, sel = selections(cp, rng, 1, prefixes=False)[-1]
        plan.append((cp, f"{name}.{k}", sel))
        k += 1
    return plan


def describe(ev: Event) -> str:
    if ev.kind == "write":
        return f"write {len(ev.data)}@{ev.off:#x}"
    if ev.kind == "falloc":
        return f"fallocate mode {ev.mode:#x} {ev.length}@{ev.off:#x}"
    return f"{ev.kind} {ev.off:#x}"


def context(run: Run, index: int) -> str:
    marks = [ev.mark for ev in run.rec.events[:index] if ev.kind == "mark"][-4:]
    return f"log entry {index}, after marks {marks}"


def power_loss_run(kind: Kind, tmp: Path, budget: int, seed: int,
                   script: list[dict[str, Any]] | None = None) -> tuple[Tally, list[str]]:
    rng = random.Random(f"power-{kind.name}-{seed}")
    img, content = make_image(kind, tmp)
    start_header = img.read_bytes()[:104]
    run = run_workload(kind, img, content,
                       script if script is not None else random_script(kind, img, rng))
    rec = run.rec
    path = os.path.realpath(img)
    failures: list[str] = [f"not through hostfile.py: {v}" for v in rec.violations]

    # the recorder saw everything: replaying the whole log gives the real file
    real = img.read_bytes()
    replayed_files = replay_all(rec.base, rec.events)
    for p, content_now in replayed_files.items():
        if bytes(content_now) != Path(p).read_bytes():
            failures.append(f"replaying the log does not give the final {Path(p).name} "
                            "(something changed it behind the recorder)")
    final = qemu_read(img, tmp / "final.raw")
    if final != run.final:
        failures.append("the final image does not read as the model")
    if kind.snapshot:
        snap = tmp / "snap.raw"
        must(["qemu-img", "convert", "-l", "snap1", "-O", "raw", str(img), str(snap)])
        if snap.read_bytes() != content:
            failures.append("qemu-img reads the internal snapshot changed")
    if kind.compress:
        assert run.compressed, "no compressed write was taken"
    if kind.expect_growth:
        assert struct.unpack_from(">Q", real, 48) != struct.unpack_from(">Q", start_header, 48), (
            "the refcount table did not grow: the kind does not test what it claims")

    points = list(crash_points(rec.base, rec.events))
    t = Tally(points=len(points))
    checker = Checker(tmp, img, len(content), content if kind.snapshot else None,
                      kind.dirty_start)
    for n, (cp, name, sel) in enumerate(plan_states(points, budget, rng)):
        t.states += 1
        files = build(cp, sel)
        err, got = checker.state(files, path, reopen=n % 5 == 0, t=t)
        if err is None and got is not None:
            err = promises_at(run, cp.index).check(got)
        if err:
            applied = ", ".join(describe(e) + ("" if p is None else f" (sectors {sorted(p)})")
                                for e, p in sel)
            failures.append(f"{context(run, cp.index)}, state {name} "
                            f"[{len(cp.pending)} pending; applied: {applied[:400]}]: {err}")
            if len(failures) >= 5:
                break
    return t, failures


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_power_loss(kind: Kind, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    t, failures = power_loss_run(kind, tmp_path, STATES, SEED)
    print(f"{kind.name}: {t.points} crash points, {t.states} states "
          f"({t.unique} distinct images, {t.reopened} reopened), {len(failures)} failures")
    assert not failures, "\n".join(failures)
    assert t.states >= min(STATES, 20), "too few crash states: the workload wrote nothing?"


# ------------------------------------------------------------------ regressions
def _scripted(kind: Kind, tmp: Path, script: list[dict[str, Any]]) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    t, failures = power_loss_run(kind, tmp, 150, SEED, script)
    assert not failures, "\n".join(failures)
    assert t.states > 10


def test_new_refcount_block_is_on_disk_before_its_table_entry(tmp_path: Path) -> None:
    """Regression: Refcounts.flush wrote new refcount blocks and the refcount table
    entries pointing to them with no sync in between; a crash could keep the entry and
    lose the block (qemu-img check: "ERROR cluster N refcount=0 reference=1")."""
    # the first refcount block covers 64 clusters: the prefill nearly fills it
    kind = Kind("rc-block", "cluster_size=512,refcount_bits=64", size=1 * MiB,
                prefill=29 * KiB)
    _scripted(kind, tmp_path, [{"op": "write", "off": 512 * KiB, "len": 4 * KiB, "seed": 1,
                                "fua": False}, {"op": "flush"}])


def test_guest_data_is_on_disk_before_an_evicted_l2_table(tmp_path: Path) -> None:
    """Regression: an L2 table written back by a cache eviction in the middle of an
    operation was preceded by a sync only when refcounts were dirty; a write in place
    into a zero cluster that keeps its host cluster changes no refcount, so its L2 entry
    could reach the disk before its data (the guest then read the cluster's old
    contents)."""
    kind = Kind("evict", "cluster_size=512", size=1 * MiB, cache_size=2 * KiB,
                prefill=256 * KiB, prefill_zeroed=True)
    script = [{"op": "write", "off": k * 32 * KiB + 512, "len": 512, "seed": k, "fua": False}
              for k in range(6)]
    _scripted(kind, tmp_path, [*script, {"op": "flush"}])


# ------------------------------------------------------------------ the recorder's premise
def test_only_hostfile_touches_image_files(tmp_path: Path) -> None:
    """Every change to an image file -- creating it, opening and closing it, writes
    that allocate L2 tables and grow the refcount table, internal snapshots (create,
    writes that move the snapshot's copy, apply, delete), check -r, relayout (temporary
    file, rename) -- goes through nbdqcow/block/hostfile.py, and replaying what the
    recorder saw gives the files exactly."""
    require_tool("qemu-img")
    from nbdqcow.qcow2.check import check_image
    from nbdqcow.qcow2.create import Qcow2Options, create_qcow2
    from nbdqcow.qcow2.driver import Qcow2Driver
    from nbdqcow.qcow2.relayout import relayout, tmp_path_for
    from nbdqcow.qcow2.snapshot_ops import apply_snapshot, create_snapshot, delete_snapshot

    img, out = tmp_path / "img.qcow2", tmp_path / "out.qcow2"
    paths = [str(img), str(out), tmp_path_for(str(img)), tmp_path_for(str(out))]
    rng = random.Random(5)
    with Recorder(paths) as rec:
        create_qcow2(str(img), 4 * MiB, Qcow2Options(cluster_bits=9, refcount_order=6))
        drv = Qcow2Driver.open(str(img), writable=True, cache_size=2 * KiB)
        for k in range(70):  # 70 x 32 KiB at 512-byte clusters: past 2 MiB of host file
            drv.pwrite(rng.randbytes(32 * KiB), k * 32 * KiB % (4 * MiB - 32 * KiB))
        drv.flush()
        drv.close()
        create_snapshot(str(img), "s1")
        drv = Qcow2Driver.open(str(img), writable=True)  # preserve: moves the snapshot's copy
        drv.pwrite(b"x" * 700, 1000)
        drv.discard(64 * KiB, 64 * KiB)
        drv.write_zeroes(256 * KiB, 8 * KiB)
        drv.close()
        apply_snapshot(str(img), "s1")
        delete_snapshot(str(img), "s1")
        check_image(str(img), repair="all")
        relayout(str(img), str(out))
        relayout(str(img))
    assert not rec.violations, rec.violations
    replayed = replay_all(rec.base, rec.events)
    for p in (img, out):
        assert bytes(replayed[os.path.realpath(p)]) == p.read_bytes(), f"{p.name}: replay differs"
    assert struct.unpack_from(">Q", img.read_bytes(), 48)[0] > 0
    for p in (img, out):
        assert qemu_check(p) is None
    kinds = {e.kind for e in rec.events}
    assert {"write", "sync", "trunc", "rename"} <= kinds, kinds


def test_snapshot_copy_moves_without_a_window(tmp_path: Path) -> None:
    """Regression (unshare.py, ``preserve`` with an internal snapshot): the first write
    to a cluster shared with the snapshot moves the snapshot's copy.  It used to change
    the snapshot's L2 table while the live L1 on disk still reached it (qemu-img check:
    "refcount=1 reference=2") and to drop the old cluster's refcount before the live
    entry had its COPIED flag ("ERROR OFLAG_COPIED ... refcount=1")."""
    kind = Kind("unshare", "cluster_size=65536", prefill=1 * MiB, snapshot=True)
    _scripted(kind, tmp_path, [
        {"op": "write", "off": 64 * KiB + 100, "len": 3000, "seed": 1, "fua": False},
        {"op": "write", "off": 256 * KiB, "len": 128 * KiB, "seed": 2, "fua": True},
        {"op": "discard", "off": 512 * KiB, "len": 64 * KiB},
        {"op": "flush"}])


def test_the_tier_fails_an_engine_that_does_not_sync(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker is not vacuous: with every fdatasync of the engine dropped, some
    crash state must break an ordering rule (here: an L2 entry on disk without the data
    or refcount block it needs)."""
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    from nbdqcow.block.hostfile import HostFile

    monkeypatch.setattr(HostFile, "sync", lambda self: None)
    kind = Kind("nosync", "cluster_size=512,refcount_bits=64", size=1 * MiB, prefill=29 * KiB)
    _, failures = power_loss_run(kind, tmp_path, 150, SEED, [
        {"op": "write", "off": 512 * KiB, "len": 4 * KiB, "seed": 1, "fua": False},
        {"op": "flush"}])
    assert failures, "dropping every sync went unnoticed"


def test_refcount_table_growth_every_state(tmp_path: Path) -> None:
    """The refcount table moves (new table and blocks written and synced, then the
    header, then the old table freed): every prefix and "all but one" of every step."""
    kind = Kind("growth", "cluster_size=512,refcount_bits=64", size=4 * MiB,
                prefill=1975 * KiB, expect_growth=True)
    _scripted(kind, tmp_path, [
        {"op": "write", "off": 3 * MiB, "len": 64 * KiB, "seed": 3, "fua": False},
        {"op": "flush"}])
