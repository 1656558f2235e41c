"""Power loss during ``relayout``: the new image is built in a temporary file and
renamed over the target.  Every write, sync, rename and folder sync is recorded
(:class:`powerlog.Recorder`) and every crash state rebuilt (:func:`powerlog.crash_points`
models the rename: durable once the folder is synced, maybe before).  At every state the
file at the target's path must be either exactly what was there before (the old image,
or nothing) or the complete new image: ``qemu-img check`` clean and reading the same
guest data as the old image (``qemu-img compare``).  The last test shows the checker is
not vacuous: a relayout that renames before syncing the new file fails it."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from powerlog import Recorder, build, crash_points, replay_all, selections  # noqa: E402
from tooling import require_tool  # noqa: E402

KiB = 1024
MiB = 1024 * KiB


def run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=60)


def fragmented(path: Path, opts: str, seed: int = 3) -> None:
    """2 MiB, 64 KiB clusters written in random order (none in place), one zero cluster
    and one discarded."""
    assert run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path),
                "2M"]).returncode == 0
    order = list(range(32))
    random.Random(seed).shuffle(order)
    cmds = [f"write -P {c + 1} {c * 64}k 64k" for c in order]
    cmds += ["write -z 320k 64k", "discard 640k 64k"]
    proc = run(["qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], str(path)])
    assert proc.returncode == 0, proc.stderr


class Judge:
    """Is the content found at the target's path the old one or the complete new one?"""

    def __init__(self, tmp: Path, ref: Path, before: bytes | None) -> None:
        self.tmp, self.ref, self.before = tmp, ref, before
        self.seen: dict[str, str | None] = {}
        self.old = self.new = 0

    def __call__(self, got: bytes | None) -> str | None:
        if got == self.before:
            self.old += 1
            return None
        if got is None:
            return "the target is gone"
        key = hashlib.sha256(got).hexdigest()
        if key not in self.seen:
            self.seen[key] = self._judge_new(got)
        if self.seen[key] is None:
            self.new += 1
        return self.seen[key]

    def _judge_new(self, got: bytes) -> str | None:
        state = self.tmp / "state.qcow2"
        state.write_bytes(got)
        check = run(["qemu-img", "check", str(state)])
        if check.returncode != 0:
            return f"neither old nor new: qemu-img check: {check.stdout.decode()[-300:]}"
        cmp = run(["qemu-img", "compare", str(self.ref), str(state)])
        if cmp.returncode != 0:
            return f"the new image reads differently: {cmp.stdout.decode()[-300:]}"
        mapped = run(["qemu-img", "map", "--output=json", str(state)]).stdout.decode()
        if mapped.count('"offset"') == 0:
            return "the new image maps nothing"
        return None


def relayout_states(tmp: Path, opts: str, to_new_file: bool, n_random: int = 3
                    ) -> tuple[Judge, list[str], int]:
    from nbdqcow.qcow2.relayout import relayout, tmp_path_for

    img = tmp / "img.qcow2"
    fragmented(img, opts)
    ref = tmp / "ref.qcow2"
    ref.write_bytes(img.read_bytes())
    target = tmp / "new.qcow2" if to_new_file else img
    if to_new_file:  # -O over an existing image: it is replaced whole or not at all
        fragmented(target, opts, seed=9)
    before = target.read_bytes()
    paths = [str(img), str(target), tmp_path_for(str(target))]
    with Recorder(paths) as rec:
        relayout(str(img), str(target) if to_new_file else None)
    failures = [f"not through hostfile.py: {v}" for v in rec.violations]
    replayed = replay_all(rec.base, rec.events)
    real = os.path.realpath(target)
    if bytes(replayed[real]) != target.read_bytes():
        failures.append("replaying the log does not give the final target")
    judge = Judge(tmp, ref, before)
    assert judge(target.read_bytes()) is None and judge.new == 1, "the result itself"
    rng = random.Random(11)
    points = list(crash_points(rec.base, rec.events))
    assert any(cp.dir_changes for cp in points), "no crash point has the rename"
    states = 0
    for cp in points:
        for name, sel in selections(cp, rng, n_random):
            states += 1
            files = build(cp, sel)
            got = files.get(real)
            err = judge(None if got is None else bytes(got))
            if err:
                failures.append(f"log entry {cp.index} ({cp.dir_changes} of "
                                f"{cp.dir_pending} folder changes), state {name}: {err}")
                if len(failures) >= 5:
                    return judge, failures, states
    return judge, failures, states


@pytest.mark.parametrize("opts,to_new_file", [
    ("cluster_size=65536", False),
    ("cluster_size=65536,extended_l2=on", False),
    ("cluster_size=65536", True),
], ids=["in-place", "in-place-extl2", "-O-over-an-image"])
def test_relayout_crash_states(tmp_path: Path, opts: str, to_new_file: bool) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    judge, failures, states = relayout_states(tmp_path, opts, to_new_file)
    assert not failures, "\n".join(failures)
    # both outcomes occur: crash states before the rename and after it
    assert judge.old > 10 and judge.new > 1, (judge.old, judge.new, states)


def test_the_checker_fails_a_relayout_that_renames_before_syncing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_tool(tool)
    from nbdqcow.block.hostfile import HostFile
    from nbdqcow.qcow2 import relayout

    monkeypatch.setattr(HostFile, "sync", lambda self: None)
    monkeypatch.setattr(relayout, "sync_path", lambda path: None)
    _, failures, _ = relayout_states(tmp_path, "cluster_size=65536", False, n_random=0)
    assert failures and any("neither old nor new" in f for f in failures), failures
