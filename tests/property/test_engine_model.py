"""Differential write test: the qcow2 engine against a plain bytearray model.

A hypothesis state machine runs random pwrite / write_zeroes / discard / flush /
reopen (and writes by qemu-io between a close and a reopen) on an image made by
``qemu-img create`` and applies the same operations to a bytearray.  After every step the touched ranges must read back equal to the model
(and block_status must tile them, never calling a run with data "zero");
at teardown the closed image must pass ``qemu-img check`` with no errors and no
leaks, and ``qemu-img compare`` against the model (written as a raw file) must say
identical.  The expected content comes from the model only, never from nbdqcow.

Discard semantics expected (see the engine brief): units fully covered by the range
(clusters, subclusters for extended L2) read as zeros afterwards, except in a
version-2 image with a backing file, where they read the backing file's data; bytes
of partially covered units are unchanged.  Under the default "preserve" mapping
policy a version-2 image (no zero flag) keeps discarded clusters mapped and erases the
data of those it holds alone: each fully covered unit reads either as before (nothing of
this image there) or as zeros.  Kinds with mapping="release" check the qemu-like policy.

NBDQCOW_PROPERTY_EXAMPLES / NBDQCOW_PROPERTY_STEPS scale the run (defaults keep the
whole file under 3 minutes on 2 cores); NBDQCOW_PROPERTY_SHRINK=1/0 turns shrinking
of failures on/off (default: on, off when $CI is set).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

KiB = 1024
MiB = 1024 * KiB

EXAMPLES = int(os.environ.get("NBDQCOW_PROPERTY_EXAMPLES", "15"))
STEPS = int(os.environ.get("NBDQCOW_PROPERTY_STEPS", "30"))
# Shrinking a failure can take hypothesis's full 5 minutes per kind; under CI the
# unshrunk steps (and the reproduce blob) are reported instead.
SHRINK = os.environ.get("NBDQCOW_PROPERTY_SHRINK", "0" if os.environ.get("CI") else "1") == "1"
# (the explain phase re-runs hundreds of variations of a failure: minutes, little value)
PHASES = [p for p in Phase if p is not Phase.explain and (SHRINK or p is not Phase.shrink)]


@dataclass(frozen=True)
class ImageKind:
    """One kind of qcow2 image the state machine runs against."""

    name: str
    size: int
    cluster: int
    opts: str = ""  # extra ``-o`` options for qemu-img create
    v2: bool = False
    extended_l2: bool = False
    backing: bool = False
    # Mapping policy passed to open_image (None: the engine's default, "preserve").
    mapping: str | None = None
    # qemu-io fills [0, prefill) with PREFILL_BYTE so that the host file ends just short
    # of what the first refcount table covers; the engine's first write makes it grow.
    prefill: int = 0

    @property
    def discard_is_noop(self) -> bool:
        """v2 has no zero flag: under "preserve" the engine keeps discarded clusters
        mapped (their data erased if this image holds it), so the model cannot say in
        advance what a discarded unit reads: the rule checks "as before or zeros"."""
        return self.v2 and self.mapping != "release"

    @property
    def unit(self) -> int:
        """Granularity of discard (a subcluster for extended L2 images)."""
        return self.cluster // 32 if self.extended_l2 else self.cluster

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table covers."""
        entry = 16 if self.extended_l2 else 8
        return self.cluster * (self.cluster // entry)

    def create_args(self, path: Path, backing: Path | None) -> list[str]:
        opts = [f"cluster_size={self.cluster}"]
        if self.v2:
            opts.append("compat=0.10")
        if self.extended_l2:
            opts.append("extended_l2=on")
        if self.opts:
            opts.append(self.opts)
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
        if backing is not None:
            args += ["-b", str(backing), "-F", "qcow2"]
        return [*args, str(path), str(self.size)]


PREFILL_BYTE = 0x55
GROW_WRITE = 32 * KiB  # > the host space left after the prefill (checked by the fixture)

KINDS = [
    ImageKind("v3-64k", 4 * MiB, 64 * KiB),
    ImageKind("v3-64k-rc1", 4 * MiB, 64 * KiB, opts="refcount_bits=1"),
    ImageKind("v3-64k-rc64", 4 * MiB, 64 * KiB, opts="refcount_bits=64"),
    ImageKind("v3-512-rc1", 4 * MiB, 512, opts="refcount_bits=1"),
    # 512-byte clusters, 64-bit refcounts: one refcount table cluster covers 2 MiB of host.
    ImageKind("v3-512-rc64-grow", 64 * MiB, 512, opts="refcount_bits=64", prefill=1950 * KiB),
    ImageKind("v3-4k", 8 * MiB, 4 * KiB),
    ImageKind("v2-64k", 4 * MiB, 64 * KiB, v2=True),
    ImageKind("extl2-64k", 4 * MiB, 64 * KiB, extended_l2=True),
    ImageKind("lazy-64k", 4 * MiB, 64 * KiB, opts="lazy_refcounts=on"),
    ImageKind("backed-v3-64k", 4 * MiB, 64 * KiB, backing=True),
    ImageKind("backed-v2-64k", 4 * MiB, 64 * KiB, v2=True, backing=True),
    ImageKind("backed-extl2-64k", 4 * MiB, 64 * KiB, extended_l2=True, backing=True),
    # qemu-like policy: discard / write-zeroes with MAY_UNMAP release host clusters.
    ImageKind("v3-64k-release", 4 * MiB, 64 * KiB, mapping="release"),
    ImageKind("extl2-64k-release", 4 * MiB, 64 * KiB, extended_l2=True, mapping="release"),
    ImageKind("backed-v2-64k-release", 4 * MiB, 64 * KiB, v2=True, backing=True,
              mapping="release"),
]


# --- helpers -----------------------------------------------------------------------
def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def qemu_check(path: Path) -> None:
    """``qemu-img check``: exit 0, no leaks, no corruptions, no check errors."""
    proc = run(["qemu-img", "check", "--output=json", str(path)])
    report: dict[str, Any] = {}
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pass
    assert proc.returncode == 0, f"qemu-img check exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert not report.get("leaks"), report
    assert not report.get("corruptions"), report
    assert not report.get("check-errors"), report


def qemu_compare(path: Path, raw: Path) -> None:
    """``qemu-img compare`` of the image (through its chain) with the raw model."""
    proc = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)])
    assert proc.returncode == 0, f"qemu-img compare exit {proc.returncode}: {proc.stdout}{proc.stderr}"


def refcount_table_clusters(path: Path) -> int:
    """Header field refcount_table_clusters (big-endian u32 at byte 56)."""
    with open(path, "rb") as f:
        head = f.read(60)
    value: int = struct.unpack_from(">I", head, 56)[0]
    return value


def payload(seed: int, length: int) -> bytes:
    """Deterministic, distinguishable write data (hypothesis draws only the seed)."""
    return random.Random(seed).randbytes(length)


def merge(ranges: list[tuple[int, int]], align: int, size: int) -> list[tuple[int, int]]:
    """Union of (offset, length) ranges widened to ``align``, as (start, end) pairs."""
    spans = sorted(
        (off // align * align, min(size, -(-(off + n) // align) * align)) for off, n in ranges
    )
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


@st.composite
def io_ranges(draw: st.DrawFn, kind: ImageKind) -> tuple[int, int]:
    """(offset, length) inside the image: 1 byte .. 3 clusters, aligned or not.

    Offsets gather around a few hot spots (start, L2 boundaries, middle, end) so that
    operations overlap, hit allocated clusters and straddle table boundaries.
    """
    size, cluster = kind.size, kind.cluster
    anchors = {0, cluster, size // 2, size - 3 * cluster, size - cluster}
    anchors.update(k * kind.l2_span for k in range(1, 4) if k * kind.l2_span < size)
    if draw(st.integers(0, 4)) == 0:
        off = draw(st.integers(0, size - 1))
    else:
        off = draw(st.sampled_from(sorted(anchors)))
        off += draw(st.integers(-3 * cluster, 3 * cluster))
    align = draw(st.sampled_from([1, 1, 512, kind.unit, cluster]))
    length = draw(st.integers(1, 3 * cluster))
    off = min(max(off, 0), size - 1) // align * align
    if align > 1:
        length = max(align, length // align * align)
    return off, min(length, size - off)


# --- the state machine ---------------------------------------------------------------
Step = TypeVar("Step", bound=Callable[..., None])


def step(fn: Step) -> Step:
    """Remember that an example failed, so teardown skips the slow qemu-img checks
    (they would only slow down shrinking; the failure is already reported)."""

    @functools.wraps(fn)
    def wrapper(self: EngineVsModel, *args: Any, **kwargs: Any) -> None:
        try:
            fn(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return cast(Step, wrapper)


class EngineVsModel(RuleBasedStateMachine):
    """Set up by :func:`machine_for`: ``kind``, ``workdir``, ``base`` (path, content)."""

    kind: ImageKind
    workdir: Path
    base: tuple[Path, bytes] | None = None
    template: Path | None = None
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        from nbdqcow.image import open_image

        self.open_image = open_image
        self.dir = self.workdir / f"ex{next(self.counter)}"
        self.dir.mkdir()
        self.path = self.dir / "img.qcow2"
        backing = self.base[0] if self.base else None
        self.backing_content = self.base[1] if self.base else bytes(self.kind.size)
        self.model = bytearray(self.backing_content)
        if self.template is not None:
            shutil.copyfile(self.template, self.path)
            self.model[:self.kind.prefill] = bytes([PREFILL_BYTE]) * self.kind.prefill
        else:
            proc = run(self.kind.create_args(self.path, backing))
            assert proc.returncode == 0, proc.stderr
        self.touched: list[tuple[int, int]] = []
        self.failed = False
        self.rc_table_before = refcount_table_clusters(self.path)
        self.drv: Any = None
        self.drv = open_image(
            str(self.path), "qcow2", writable=True, mapping=self.kind.mapping
        )
        assert self.drv.size == self.kind.size

    # -- model operations
    def _discard_model(self, off: int, length: int) -> None:
        if self.kind.discard_is_noop:
            return
        unit = self.kind.unit
        first = -(-off // unit) * unit
        last = (off + length) // unit * unit
        if last <= first:
            return
        if self.kind.v2 and self.kind.backing:
            self.model[first:last] = self.backing_content[first:last]
        else:
            self.model[first:last] = bytes(last - first)

    def _check(self, start: int, end: int) -> None:
        got = self.drv.pread(start, end - start)
        want = bytes(self.model[start:end])
        self._check_status(start, end, want)
        if got != want:
            bad = next(i for i in range(len(want)) if got[i] != want[i])
            raise AssertionError(
                f"{self.kind.name}: read [{start}, {end}) differs from the model; "
                f"first difference at guest offset {start + bad}: "
                f"got {got[bad:bad + 8].hex()} want {want[bad:bad + 8].hex()}"
            )

    def _check_status(self, start: int, end: int, want: bytes) -> None:
        """block_status tiles the range, and runs it calls zero read as zeros."""
        pos = start
        for ext in self.drv.block_status(start, end - start):
            assert ext.start == pos and ext.length > 0, (
                f"{self.kind.name}: block_status extents do not tile [{start}, {end}): {ext}"
            )
            if ext.zero:
                lo, hi = pos - start, min(end, pos + ext.length) - start
                # (no bare ``assert bytes == bytes``: pytest would diff megabytes)
                zeros = want[lo:hi] == bytes(hi - lo)
                assert zeros, (
                    f"{self.kind.name}: block_status says [{pos}, {pos + ext.length}) "
                    f"reads as zeros but the model has data there: {ext}"
                )
            pos += ext.length
            if pos >= end:
                break
        assert pos >= end, f"{self.kind.name}: block_status stops at {pos} < {end}"

    # -- setup
    @initialize(seed=st.integers(0, 2**32 - 1))
    @step
    def grow_refcount_table(self, seed: int) -> None:
        """For ``prefill`` kinds: one fresh-region write that needs more host space
        than the first refcount table covers."""
        if not self.kind.prefill:
            return
        off = self.kind.size // 2 + 3 * self.kind.cluster
        data = payload(seed, GROW_WRITE)
        self.drv.pwrite(data, off)
        self.model[off:off + GROW_WRITE] = data
        self.touched.append((off, GROW_WRITE))

    # -- rules
    def _range(self, rng: st.DataObject, reuse_label: str) -> tuple[int, int]:
        """A range written before (about half the time, once there is one) or a new one."""
        reuse = False
        if self.touched:
            reuse = rng.draw(st.booleans(), label=reuse_label)
        if reuse:
            return rng.draw(st.sampled_from(self.touched), label="previous")
        return rng.draw(io_ranges(self.kind), label="range")

    @rule(rng=st.data(), seed=st.integers(0, 2**32 - 1), fua=st.booleans())
    @step
    def pwrite(self, rng: st.DataObject, seed: int, fua: bool) -> None:
        off, length = rng.draw(io_ranges(self.kind), label="range")
        data = payload(seed, length)
        self.drv.pwrite(data, off, fua=fua)
        self.model[off:off + length] = data
        self.touched.append((off, length))

    @rule(rng=st.data(), seed=st.integers(0, 2**32 - 1))
    @step
    def pwrite_again(self, rng: st.DataObject, seed: int) -> None:
        """A second write rule: writes dominate the mix, and overwrite earlier ones."""
        off, length = self._range(rng, reuse_label="overwrite")
        data = payload(seed, length)
        self.drv.pwrite(data, off)
        self.model[off:off + length] = data
        self.touched.append((off, length))

    @rule(rng=st.data(), may_unmap=st.booleans())
    @step
    def write_zeroes(self, rng: st.DataObject, may_unmap: bool) -> None:
        off, length = rng.draw(io_ranges(self.kind), label="range")
        self.drv.write_zeroes(off, length, may_unmap=may_unmap)
        self.model[off:off + length] = bytes(length)
        self.touched.append((off, length))

    @rule(rng=st.data())
    @step
    def discard(self, rng: st.DataObject) -> None:
        off, length = self._range(rng, reuse_label="on-written")
        pieces = self._open_pieces(off, length)
        before = {u: bytes(self.model[u : u + n]) for u, n in pieces}
        self.drv.discard(off, length)
        self._discard_model(off, length)
        # the pieces the model cannot decide: each reads as before (nothing of this
        # image alone there) or as zeros (erased)
        for u, n in pieces:
            got = self.drv.pread(u, n)
            assert got in (before[u], bytes(n)), (
                f"{self.kind.name}: discarded piece [{u}, {u + n}) neither unchanged nor zero")
            self.model[u : u + n] = got
        self.touched.append((off, length))

    def _open_pieces(self, off: int, length: int) -> list[tuple[int, int]]:
        """The units whose content after a discard the model cannot decide: for v2
        under "preserve", every fully covered unit (partly covered ones are unchanged)."""
        unit = self.kind.unit
        end = min(off + length, self.kind.size)
        first = -(-off // unit) * unit
        last = end // unit * unit if end < self.kind.size else end
        if not self.kind.discard_is_noop:
            return []
        return [(u, min(unit, last - u)) for u in range(first, last, unit)]

    @rule()
    @step
    def flush(self) -> None:
        self.drv.flush()

    @rule()
    @step
    def reopen(self) -> None:
        self.drv.close()
        self.drv = None
        self.drv = self.open_image(
            str(self.path), "qcow2", writable=True, mapping=self.kind.mapping
        )
        assert self.drv.size == self.kind.size
        for start, end in merge(self.touched, self.kind.cluster, self.kind.size):
            self._check(start, end)
        if self.kind.prefill:
            self._check(0, self.kind.prefill)

    @rule(rng=st.data(), byte=st.integers(1, 255), zero=st.booleans(), unmap=st.booleans())
    @step
    def qemu_io_write(self, rng: st.DataObject, byte: int, zero: bool, unmap: bool) -> None:
        """Close; qemu-io writes a pattern (or zeroes) into the image; reopen.  The
        engine must read qemu's layout and keep writing on top of it."""
        off, length = self._range(rng, reuse_label="qemu-on-written")
        self.drv.close()
        self.drv = None
        if zero:
            cmd = f"write -q -z {'-u ' if unmap else ''}{off} {length}"
        else:
            cmd = f"write -q -P {byte:#x} {off} {length}"
        proc = run(["qemu-io", "-f", "qcow2", "-c", cmd, str(self.path)])
        assert proc.returncode == 0 and not proc.stdout.strip(), (
            f"qemu-io {cmd!r}: {proc.stdout}{proc.stderr}"
        )
        self.model[off:off + length] = bytes(length) if zero else bytes([byte]) * length
        self.touched.append((off, length))
        self.drv = self.open_image(
            str(self.path), "qcow2", writable=True, mapping=self.kind.mapping
        )

    # -- invariant
    @invariant()
    @step
    def touched_ranges_match_model(self) -> None:
        for start, end in merge(self.touched, self.kind.cluster, self.kind.size):
            self._check(start, end)

    def teardown(self) -> None:
        try:
            if self.failed:
                if self.drv is not None:
                    with contextlib.suppress(Exception):
                        self.drv.close()
                return
            if self.drv is not None:
                self.drv.close()
                self.drv = None
            qemu_check(self.path)
            raw = self.dir / "model.raw"
            raw.write_bytes(self.model)
            qemu_compare(self.path, raw)
            if self.kind.prefill:
                assert refcount_table_clusters(self.path) > self.rc_table_before, (
                    "the refcount table did not grow: this case no longer tests growth"
                )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def make_template(kind: ImageKind, workdir: Path) -> Path:
    """qemu-img create + qemu-io prefill, leaving the first refcount table almost full."""
    path = workdir / "template.qcow2"
    for args in (
        kind.create_args(path, None),
        ["qemu-io", "-f", "qcow2", "-c",
         f"write -q -P {PREFILL_BYTE:#x} 0 {kind.prefill}", str(path)],
    ):
        proc = run(args)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
    # One refcount table cluster covers this many host bytes:
    covered = kind.cluster * (kind.cluster // 8) * (kind.cluster * 8 // 64)
    left = covered - path.stat().st_size
    assert refcount_table_clusters(path) == 1, "qemu-io already grew the refcount table"
    assert 0 < left < GROW_WRITE, f"{left} host bytes left: the grow write would not grow"
    return path


def machine_for(
    kind: ImageKind, workdir: Path, base: tuple[Path, bytes] | None
) -> type[EngineVsModel]:
    template = make_template(kind, workdir) if kind.prefill else None
    return type(
        f"EngineVsModel_{kind.name.replace('-', '_')}",
        (EngineVsModel,),
        {"kind": kind, "workdir": workdir, "base": base, "template": template,
         "counter": itertools.count()},
    )


# Passing runs take seconds; a failure may shrink for up to 5 minutes (hypothesis's cap).
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_engine_matches_model(
    kind: ImageKind,
    tmp_path: Path,
    qemu_tools: None,
    backing_base: Callable[[int], tuple[Path, bytes]],
) -> None:
    base = backing_base(kind.size) if kind.backing else None
    machine = machine_for(kind, tmp_path, base)
    # The 64 MiB case compares a 64 MiB model per example: fewer examples.
    examples = max(1, EXAMPLES // 3) if kind.prefill else EXAMPLES
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
            phases=PHASES,
        ),
    )
