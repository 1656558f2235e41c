"""TLS settings for bench/run.py --tls: the same x509 credentials for both servers.

fio's nbd engine refuses URIs that name local files (``tls-certificates``), so the
servers do not ask for client certificates (``verify-peer=off``) and the clients do not
check the server's (``tls-verify-peer=false``): every byte is still encrypted, which is
what is measured.  Certificates are made with certtool (GnuTLS).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

TLS_WORKLOADS = ("4k randread QD16", "1M seq read QD4", "1M seq write QD4", "nbdcopy read")


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def make_server_certs(workdir: Path) -> Path:
    """A CA and a server certificate for localhost in ``workdir/pki`` (qemu's layout)."""
    d = workdir / "pki"
    d.mkdir(exist_ok=True)
    ca_key, ca_cert = d / "ca-key.pem", d / "ca-cert.pem"
    _run("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", ca_key)
    (d / "ca.info").write_text("cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n")
    _run("certtool", "--generate-self-signed", "--load-privkey", ca_key, "--template",
         d / "ca.info", "--outfile", ca_cert)
    key = d / "server-key.pem"
    _run("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", key)
    (d / "server.info").write_text("cn = localhost\ndns_name = localhost\ntls_www_server\n"
                                   "signing_key\nencryption_key\nexpiration_days = 2\n")
    _run("certtool", "--generate-certificate", "--load-ca-certificate", ca_cert,
         "--load-ca-privkey", ca_key, "--load-privkey", key, "--template",
         d / "server.info", "--outfile", d / "server-cert.pem")
    return d


def server_args(pki: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
            "--tls-creds", "tls0"]


def uri(sock: Path) -> str:
    return f"nbds+unix:///?socket={sock}&tls-verify-peer=false"


def replace_section(path: Path, title: str, body: str) -> None:
    """Put ``## title`` + body into ``path``, replacing that section if present."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = f"\n## {title}\n"
    start = text.find(head)
    if start >= 0:
        # the section ends at the next heading or at the next section another script
        # owns (bench/speed.py marks its own with an HTML comment before its heading)
        ends = [i for i in (text.find("\n## ", start + len(head)),
                            text.find("\n<!-- ", start + len(head))) if i >= 0]
        end = min(ends) if ends else -1
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    path.write_text(text.rstrip("\n") + "\n" + head + "\n" + body.rstrip("\n") + "\n")
