"""Random writes, write-zeroes, discards, compressed writes, flushes, reopens and bitmap
operations (add, remove, clear, enable, disable) on an engine with persistent bitmaps,
against a model of every bitmap's granules: the live bits always match, reopening
(store at close, load at open) loses nothing, and qemu-img finds the image clean with
the bitmaps it expects."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from tooling import require_tool

from nbdqcow.qcow2.compressing import CompressedWriteError
from nbdqcow.qcow2.driver import Qcow2Driver

SIZE = 4 << 20


def granules(d: Qcow2Driver, name: str) -> set[int]:
    live = d.live_bitmaps
    assert live is not None
    b = live.get(name)
    return {g for r in b.all_runs() if r.dirty
            for g in range(r.start // b.granularity, (r.start + r.length - 1) // b.granularity + 1)}


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512"])
def test_random_ops_with_bitmaps(tmp_path: Path, opts: str) -> None:
    require_tool("qemu-img")
    img = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE)],
                   check=True)
    rng = random.Random(opts)
    # name -> (granularity, enabled, dirty granules)
    model: dict[str, tuple[int, bool, set[int]]] = {}
    d = Qcow2Driver.open(str(img), writable=True)
    for step in range(400):
        live = d.live_bitmaps
        assert live is not None
        op = rng.random()
        off = rng.randrange(SIZE)
        n = rng.randint(1, min(300_000, SIZE - off))
        touched = True
        if op < 0.3:
            d.pwrite(rng.randbytes(n), off)
        elif op < 0.4:
            d.write_zeroes(off, n, may_unmap=True)
        elif op < 0.5:
            d.discard(off, n)
        elif op < 0.55:
            cs = d.cluster_size
            off -= off % cs
            n = min(cs, SIZE - off)
            try:
                d.write_compressed(b"z" * n, off)
            except CompressedWriteError:
                touched = True  # marked before the refusal, as qemu marks failed writes
        else:
            touched = False
            if op < 0.62:
                name = f"b{step}"
                gran = 1 << rng.randint(9, 17)
                live.add(name, gran)
                model[name] = (gran, True, set())
            elif model and op < 0.67:
                name = rng.choice(sorted(model))
                live.remove(name)
                del model[name]
            elif model and op < 0.72:
                name = rng.choice(sorted(model))
                live.get(name).clear()
                model[name][2].clear()
            elif model and op < 0.8:
                name = rng.choice(sorted(model))
                on = rng.random() < 0.5
                live.set_enabled(name, on)
                model[name] = (model[name][0], on, model[name][2])
            elif op < 0.9:
                d.flush()
            else:
                d.close()
                d = Qcow2Driver.open(str(img), writable=True)
        if touched:
            for gran, on, bits in model.values():
                if on:
                    bits.update(range(off // gran, (off + n - 1) // gran + 1))
        if rng.random() < 0.1:
            for name, (_, _, bits) in model.items():
                assert granules(d, name) == bits, (step, name)
    for name, (_, _, bits) in model.items():
        assert granules(d, name) == bits, name
    d.close()
    res = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                         text=True, timeout=60)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and not report.get("leaks") and not report.get("corruptions"), report
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                     capture_output=True, text=True, check=True).stdout)
    listed = info["format-specific"]["data"].get("bitmaps", [])
    assert {b["name"]: (b["granularity"], b["flags"]) for b in listed} == {
        name: (gran, ["auto"] if on else []) for name, (gran, on, _) in model.items()}
    d = Qcow2Driver.open(str(img), writable=False)
    from nbdqcow.qcow2.bitmaps import find_dirty_bitmap

    for name, (gran, _, bits) in model.items():
        b = find_dirty_bitmap(d, name)
        got = {g for r in b.dirty_runs(0, SIZE, 1 << 20) if r.dirty
               for g in range(r.start // gran, (r.start + r.length - 1) // gran + 1)}
        assert got == bits, name
    d.close()
