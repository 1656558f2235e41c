"""Test certificates and PSK keys, made with GnuTLS's certtool and psktool.

Directories laid out as qemu and libnbd read them:

- ``server/``: ca-cert.pem, server-cert.pem, server-key.pem (CN=localhost)
- ``client1/``, ``client2/``: ca-cert.pem, client-cert.pem, client-key.pem
  (DN ``O=nbq,CN=client1`` / ``O=nbq,CN=client2``)
- ``rogue/``: the real CA's ca-cert.pem (so the server is trusted) but a client
  certificate from another CA
- ``psk/keys.psk`` (alice), ``psk-wrong/keys.psk`` (alice with another key)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT1_DN = "O=nbq,CN=client1"
CLIENT2_DN = "O=nbq,CN=client2"


@dataclass(frozen=True)
class Pki:
    root: Path
    server: Path
    client1: Path
    client2: Path
    rogue: Path
    psk: Path
    psk_wrong: Path


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def _key(certtool: str, path: Path) -> None:
    _run(certtool, "--generate-privkey", "--key-type=ecdsa", "--outfile", path)


def _template(path: Path, *lines: str) -> Path:
    path.write_text("\n".join((*lines, "expiration_days = 30", "")))
    return path


def _ca(certtool: str, d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    _key(certtool, key)
    tpl = _template(d / f"{name}.info", f"cn = {name}", "ca", "cert_signing_key")
    _run(certtool, "--generate-self-signed", "--load-privkey", key, "--template", tpl,
         "--outfile", cert)
    return key, cert


def _signed(certtool: str, ca: tuple[Path, Path], out: Path, side: str,
            *lines: str) -> None:
    out.mkdir()
    key, cert = out / f"{side}-key.pem", out / f"{side}-cert.pem"
    _key(certtool, key)
    usage = "tls_www_server" if side == "server" else "tls_www_client"
    tpl = _template(out.parent / f"{out.name}.info", *lines, usage, "signing_key",
                    "encryption_key")
    _run(certtool, "--generate-certificate", "--load-ca-certificate", ca[1],
         "--load-ca-privkey", ca[0], "--load-privkey", key, "--template", tpl,
         "--outfile", cert)


def make_pki(root: Path, certtool: str, psktool: str) -> Pki:
    ca = _ca(certtool, root, "ca")
    other = _ca(certtool, root, "otherca")
    server, c1, c2, rogue = (root / n for n in ("server", "client1", "client2", "rogue"))
    _signed(certtool, ca, server, "server", "organization = nbq", "cn = localhost",
            "dns_name = localhost", "ip_address = 127.0.0.1")
    _signed(certtool, ca, c1, "client", "organization = nbq", "cn = client1")
    _signed(certtool, ca, c2, "client", "organization = nbq", "cn = client2")
    _signed(certtool, other, rogue, "client", "organization = nbq", "cn = client1")
    for d in (server, c1, c2, rogue):
        shutil.copy(ca[1], d / "ca-cert.pem")
    psk, wrong = root / "psk", root / "psk-wrong"
    psk.mkdir()
    wrong.mkdir()
    _run(psktool, "-u", "alice", "-p", psk / "keys.psk")
    _run(psktool, "-u", "alice", "-p", wrong / "keys.psk")
    return Pki(root, server, c1, c2, rogue, psk, wrong)
