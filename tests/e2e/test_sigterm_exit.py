"""SIGTERM while a one-shot server is ending (its client just left) must not kill it in
the middle of closing the image: the exit status stays 0 and the image is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tooling import ServerFactory, require_tool

from nbdqcow.nbdclient.sync import SyncClient


def test_sigterm_during_shutdown_exits_0(nbdqcow_server: ServerFactory, tmp_path: Path) -> None:
    require_tool("qemu-img")
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                    str(image), "64M"], check=True)
    for i in range(4):
        served = nbdqcow_server(image, "-f", "qcow2")  # one-shot: ends when the client leaves
        with SyncClient(served.uri) as c:
            c.pwrite(bytes([i + 1]) * (512 * 1024), i * 1024 * 1024)
        time.sleep(0.002 * i)
        assert served.stop(signal.SIGTERM) == 0, served.log.read_text()[-2000:]
    p = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert not report.get("leaks") and not report.get("corruptions"), report
    info = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                          text=True, check=True)
    assert not json.loads(info.stdout)["format-specific"]["data"].get("corrupt")


def test_helper_threads_never_take_sigterm(nbdqcow_server: ServerFactory, tmp_path: Path) -> None:
    """Only the event loop's thread may take SIGTERM/SIGINT: while the server ends it holds
    them off (the loop's handler gone, SIG_IGN not yet set), and one delivered to a worker
    thread with the default action would kill the process (a one-shot server SIGTERMed as
    its client left exited -15 about once in a hundred runs under load)."""
    require_tool("qemu-img")
    image = tmp_path / "img.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"], check=True)
    served = nbdqcow_server(image, "-f", "raw", "-t")
    with SyncClient(served.uri) as c:  # large writes, flushes: the writer and worker threads
        for i in range(4):
            c.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
            c.flush()
        for i in range(40):  # a 32 MiB stretch written whole: the write-behind thread
            c.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
        c.flush()
    pid = served.proc.pid
    tids = [t for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert tids, "the server started no helper thread"
    stop_bits = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    for tid in tids:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        assert blocked & stop_bits == stop_bits, f"thread {tid} ({name}) takes SIGTERM/SIGINT"
    assert served.stop(signal.SIGTERM) == 0
