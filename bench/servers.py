"""Start and watch the servers the benchmarks compare (qemu-nbd and ``nbdqcow serve``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_OPTS = ["--cache=writeback", "--aio=threads", "-t", "-e", "16"]


def server_argv(kind: str) -> list[str]:
    """The command (without options) that starts server ``kind``."""
    if kind == "qemu-nbd":
        path = shutil.which("qemu-nbd")
        if path is None:
            raise SystemExit("bench: qemu-nbd is not installed (run scripts/setup.sh)")
        return [path]
    if kind == "nbdqcow" or kind.startswith("nbdqcow@"):
        return [sys.executable, "-m", "nbdqcow", "serve"]
    raise SystemExit(f"bench: unknown server {kind!r} (qemu-nbd, nbdqcow, nbdqcow@CHECKOUT)")


def server_tree(kind: str) -> Path:
    """Where the server's code comes from: ``nbdqcow@DIR`` runs the nbdqcow checkout in
    DIR (e.g. a ``git worktree`` of an older commit), to measure one change."""
    return Path(kind.split("@", 1)[1]).resolve() if kind.startswith("nbdqcow@") else REPO


def nbdqcow_serve_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import nbdqcow.cli.serve"], cwd=REPO, capture_output=True
    )
    return probe.returncode == 0


@dataclass
class Server:
    """One running server on a unix socket."""

    label: str
    kind: str
    image: Path
    sock: Path
    fmt: str = "qcow2"
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    tls: bool = False  # extra holds the TLS options; clients use an nbds+unix URI

    @property
    def uri(self) -> str:
        if self.tls:
            return f"nbds+unix:///?socket={self.sock}&tls-verify-peer=false"
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        argv = [*server_argv(self.kind), "-f", self.fmt, *SERVER_OPTS, *self.extra]
        argv += ["-k", str(self.sock), str(self.image)]
        self.sock.unlink(missing_ok=True)
        tree = server_tree(self.kind)
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen(
            argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"bench: {self.label} exited ({self.proc.returncode}): {err}")
            if self.sock.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.sock))
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise SystemExit(f"bench: {self.label} did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat

    def status(self, key: str) -> int:
        """A /proc/PID/status value in KiB (VmRSS, VmHWM...)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (clear_refs 5, Linux >= 4.0)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def load_average() -> str:
    """The 1-minute load average: other work on the machine disturbs every number."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def machine_description() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    qemu = subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True).stdout
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": " ".join(os.uname()[2:4]),
        "python": sys.version.split()[0],
        "qemu-nbd": qemu.splitlines()[0] if qemu else "?",
        "fio": fio.strip() or "?",
    }
