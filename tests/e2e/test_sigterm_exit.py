"""SIGTERM while a one-shot server is ending (its client just left) must not kill it in
the middle of closing the image: the exit status stays 0 and the image is clean."""

from __future__ import annotations

import json
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
