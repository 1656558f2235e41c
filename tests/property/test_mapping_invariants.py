"""A hypothesis state machine over NBD: on preallocated images, nothing the client does
moves a mapped guest cluster.

Each example: ``qemu-img create`` a preallocated image (64 KiB clusters, 4 MiB, full or
metadata, standard or extended L2), record its map with ``qemu-img map``, serve it with
``nbdqcow serve --discard=unmap -t`` (default policy: preserve), then run random
writes (aligned and not, with and without FUA), write-zeroes (with and without NO_HOLE
and FAST_ZERO), trims, flushes, reconnects and one server restart.  After every step the
whole disk read back over NBD equals a bytearray model.  At the end, with the server
stopped: every guest cluster has the host offset it had before, the file did not grow,
its allocated blocks did not drop, ``qemu-img check`` is clean (0.00% fragmented), and
``qemu-img convert`` / ``qemu-io`` read the model's data.

MAPPING_EXAMPLES / MAPPING_STEPS in the environment raise the effort; MAPPING_SHRINK=0
reports the first failing sequence without shrinking it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))

from seedlib import (  # noqa: E402
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    ImageKind,
    KiB,
    MiB,
    Snapshot,
    Timed,
    assert_preserved,
    connect,
    serving,
)

EXAMPLES = int(os.environ.get("MAPPING_EXAMPLES", "6"))
STEPS = int(os.environ.get("MAPPING_STEPS", "25"))
SHRINK = os.environ.get("MAPPING_SHRINK", "1") != "0"

CLUSTER = 64 * KiB
SIZE = 4 * MiB
KINDS = [
    ImageKind("full", cluster=CLUSTER, size=SIZE),
    ImageKind("metadata", cluster=CLUSTER, size=SIZE),
    ImageKind("full", extended_l2=True, cluster=CLUSTER, size=SIZE),
    ImageKind("metadata", extended_l2=True, cluster=CLUSTER, size=SIZE),
]

N_CLUSTERS = SIZE // CLUSTER
# byte k*512..k*512+511 of the cycle holds k: written data carries (a function of) its
# own guest sector number, so a cluster served from another cluster's place shows
_CYCLE = b"".join(bytes([k]) * 512 for k in range(256))
_PATTERN = _CYCLE * 3  # long enough for any slice of <= 2 cycles from any start


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    """(offset, length) inside the disk: whole clusters, 4 KiB-aligned, or any bytes."""
    how = draw(st.sampled_from(["clusters", "4k", "bytes"]))
    if how == "clusters":
        c = draw(st.integers(0, N_CLUSTERS - 1))
        n = draw(st.integers(1, min(4, N_CLUSTERS - c)))
        return c * CLUSTER, n * CLUSTER
    if how == "4k":
        b = draw(st.integers(0, SIZE // 4096 - 1))
        n = draw(st.integers(1, min(48, SIZE // 4096 - b)))
        return b * 4096, n * 4096
    off = draw(st.integers(0, SIZE - 1))
    n = draw(st.integers(1, min(3 * CLUSTER, SIZE - off)))
    return off, n


def machine_for(kind: ImageKind, workdir: Path) -> type[RuleBasedStateMachine]:
    class MappingMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="ex", dir=workdir))
            self.img = kind.create(self.dir / "img.qcow2")
            self.before = Snapshot.take(self.img, kind)
            self.model = bytearray(SIZE)
            # 1 where the data may read either as the model says or as zeros (the
            # parts of a TRIM that do not cover whole clusters: the NBD spec leaves
            # trimmed data unspecified; a server may ignore partial-cluster trims)
            self.maybe_zero = bytearray(SIZE)
            self.stack = ExitStack()
            self.h: Any = None
            self.uri = ""
            self.restarts = 0
            self.counter = 0

        # --- server and connection -------------------------------------------------
        def _start(self) -> None:
            srv = self.stack.enter_context(
                serving(self.img, "--discard=unmap", logdir=self.dir))
            self.uri = srv.uri
            self.h = Timed(connect(self.uri))

        def _stop(self) -> None:
            if self.h is not None:
                self.h.shutdown()
                self.h = None
            self.stack.close()

        @initialize()
        def start(self) -> None:
            self._start()

        # --- operations --------------------------------------------------------------
        @rule(r=ranges(), fua=st.booleans())
        def write(self, r: tuple[int, int], fua: bool) -> None:
            off, n = r
            self.counter += 1
            # a per-write byte mixed with the position: a cluster landing in another
            # guest cluster's place shows in the data
            first = ((off >> 9) + self.counter * 7 + 1) & 0xFF
            start = first * 512 + (off & 511)
            data = _PATTERN[start:start + n]
            self.h.pwrite(data, off, FLAG_FUA if fua else 0)
            self.model[off:off + n] = data
            self.maybe_zero[off:off + n] = bytes(n)

        @rule(r=ranges(), no_hole=st.booleans(), fast=st.booleans())
        def zero(self, r: tuple[int, int], no_hole: bool, fast: bool) -> None:
            import nbd

            off, n = r
            flags = (FLAG_NO_HOLE if no_hole else 0)
            if fast and self.h.can_fast_zero():
                try:
                    self.h.zero(n, off, flags | FLAG_FAST_ZERO)
                except nbd.Error as e:  # allowed: "not fast", then the client falls back
                    assert e.args[1] == errno.ENOTSUP, e
                    self.h.zero(n, off, flags)
            else:
                self.h.zero(n, off, flags)
            self.model[off:off + n] = bytes(n)
            self.maybe_zero[off:off + n] = bytes(n)

        @rule(r=ranges())
        def trim(self, r: tuple[int, int]) -> None:
            off, n = r
            self.h.trim(n, off)
            # preserve keeps every wholly trimmed cluster and marks it zero: it reads
            # as zeros; the partial clusters at the edges may or may not read as zeros
            a = -(-off // CLUSTER) * CLUSTER
            b = (off + n) // CLUSTER * CLUSTER
            if a < b:
                self.model[a:b] = bytes(b - a)
                self.maybe_zero[a:b] = bytes(b - a)
                self.maybe_zero[off:a] = b"\1" * (a - off)
                self.maybe_zero[b:off + n] = b"\1" * (off + n - b)
            else:
                self.maybe_zero[off:off + n] = b"\1" * n

        @rule()
        def flush(self) -> None:
            self.h.flush()

        @rule()
        def reconnect(self) -> None:
            self.h.shutdown()
            self.h = Timed(connect(self.uri))

        @precondition(lambda self: self.restarts < 1)
        @rule()
        def restart_server(self) -> None:
            self.restarts += 1
            self._stop()
            self._start()

        # --- checks ------------------------------------------------------------------
        @invariant()
        def data_matches_model(self) -> None:
            if self.h is None:
                return
            got = self.h.pread(SIZE, 0)
            if got != self.model:
                for base in range(0, SIZE, 4096):
                    g, m = got[base:base + 4096], self.model[base:base + 4096]
                    if g == m:
                        continue
                    for i, (x, y) in enumerate(zip(g, m, strict=True)):
                        ok = x == y or (x == 0 and self.maybe_zero[base + i])
                        assert ok, f"NBD read at {base + i:#x}: {x:#x}, model {y:#x}"
                self.model[:] = got  # every "maybe zero" byte is now known
            self.maybe_zero[:] = bytes(SIZE)

        def teardown(self) -> None:
            try:
                self._stop()
                if self.uri:  # the example ran: offline checks of the promise
                    assert_preserved(self.before, self.img, kind, self.model, self.dir)
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    MappingMachine.__name__ = f"MappingMachine_{kind.id.replace('-', '_')}"
    return MappingMachine


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.id)
def test_mapping_invariants(kind: ImageKind, tmp_path: Path, qemu_tools: None) -> None:
    pytest.importorskip("nbd")
    run_state_machine_as_test(
        machine_for(kind, tmp_path),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
            # no "explain" phase: its line tracing makes a failing run crawl
            phases=[Phase.explicit, Phase.reuse, Phase.generate,
                    *([Phase.shrink] if SHRINK else [])],
        ),
    )
