"""``-c/--connect DEV`` and ``-d/--disconnect DEV``: the kernel NBD client.

qemu-nbd drives /dev/nbdN itself with ioctls; nbdqcow serves on a private unix socket
and lets ``nbd-client`` (the kernel's own user-space helper) attach the device to it.
Where the ``nbd`` module is not loaded (no /dev/nbdN) both fail with one line, as
qemu-nbd does, plus the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from nbdqcow.errors import NbdqcowError

_NO_MODULE = "No such file or directory (the kernel nbd module is not loaded: modprobe nbd)"


def _nbd_client() -> str:
    path = shutil.which("nbd-client")
    if path is None:
        raise NbdqcowError("nbd-client is needed to attach a kernel NBD device "
                           "(apt-get install nbd-client)")
    return path


def check_device(dev: str) -> None:
    """Refuse -c before anything is opened when the device cannot be attached."""
    if not os.path.exists(dev):
        raise NbdqcowError(f"Failed to open {dev}: {_NO_MODULE}")
    _nbd_client()


def attach(dev: str, socket_path: str, export: str) -> None:
    """Attach ``dev`` to the server listening on ``socket_path`` (called once ready)."""
    r = subprocess.run([_nbd_client(), "-unix", socket_path, dev, "-N", export],
                       capture_output=True, text=True)
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines() or ["failed"]
        raise NbdqcowError(f"Failed to set NBD socket for {dev}: {lines[-1]}")


def disconnect(dev: str) -> int:
    """qemu-nbd -d DEV."""
    if not os.path.exists(dev):
        raise NbdqcowError(f"Cannot open {dev}: {_NO_MODULE}")
    r = subprocess.run([_nbd_client(), "-d", dev], capture_output=True, text=True)
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines() or ["failed"]
        raise NbdqcowError(f"Cannot disconnect {dev}: {lines[-1]}")
    print(f"{dev} disconnected")
    return 0
