"""TLS and access control, side by side: every scenario runs against nbdqcow and
qemu-nbd with the same ``--object`` lines, with GnuTLS clients (nbdinfo, nbdcopy, fio
through libnbd; qemu-io/qemu-img; nbd-client).  Certificates and PSK keys are made once
per module with certtool and psktool (tlspki.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tlspki import CLIENT1_DN, Pki, make_pki
from tooling import Served, ServerFactory, repo_env, require_tool

from nbdqcow.errors import NbdqcowError

SERVERS = ("nbdqcow", "qemu-nbd")
SIZE = 4 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), require_tool("certtool"),
                    require_tool("psktool"))


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> tuple[str, ServerFactory]:
    kind = request.param
    fixture = "nbdqcow_server" if kind == "nbdqcow" else "qemu_nbd_server"
    return kind, request.getfixturevalue(fixture)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(img),
                    str(SIZE)], check=True)
    return img


def x509(pki: Pki, verify: str = "on", extra: str = "") -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server,"
            f"verify-peer={verify}{extra}", "--tls-creds", "tls0"]


def psk(pki: Pki, extra: str = "") -> list[str]:
    return ["--object", f"tls-creds-psk,id=tls0,dir={pki.psk},endpoint=server{extra}",
            "--tls-creds", "tls0"]


def tls_uri(s: Served, certs: Path | None = None, user: str = "", pskfile: Path | None = None,
            extra: str = "") -> str:
    q = f"socket={s.socket}"
    if certs is not None:
        q += f"&tls-certificates={certs}"
    if pskfile is not None:
        q += f"&tls-psk-file={pskfile}"
    at = f"{user}@" if user else ""
    return f"nbds+unix://{at}/{s.name}?{q}{extra}"


def run(*cmd: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=repo_env())


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return run(require_tool("nbdinfo"), *args)


def qemu_blockdev(s: Served, tls_id: str = "tls1") -> str:
    return (f"driver=nbd,server.type=unix,server.path={s.socket},export={s.name},"
            f"tls-creds={tls_id},tls-hostname=localhost")


def client_object(d: Path, kind: str = "x509", extra: str = "") -> str:
    return f"tls-creds-{kind},id=tls1,dir={d},endpoint=client{extra}"


# --- x509 with verify-peer=on --------------------------------------------------------------------
def test_x509_nbdinfo_and_list(pki: Pki, server, image: Path) -> None:
    _, start = server
    s = start(image, *x509(pki), "-t", name="e")
    r = nbdinfo("--size", tls_uri(s, pki.client1))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(SIZE)
    r = nbdinfo("--list", "--json", tls_uri(s, pki.client1))
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert listing["protocol"] == "newstyle-fixed" and listing["TLS"] is True
    assert [e["export-name"] for e in listing["exports"]] == ["e"]


def test_x509_nbdcopy_both_ways(pki: Pki, server, image: Path, tmp_path: Path) -> None:
    _, start = server
    s = start(image, *x509(pki), "-t", name="e")
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    src.write_bytes(os.urandom(SIZE))
    nbdcopy = require_tool("nbdcopy")
    r = run(nbdcopy, src, tls_uri(s, pki.client1))
    assert r.returncode == 0, r.stderr
    back.write_bytes(b"")
    r = run(nbdcopy, tls_uri(s, pki.client1), back)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_x509_qemu_io_and_qemu_img(pki: Pki, server, image: Path) -> None:
    _, start = server
    s = start(image, *x509(pki), "-t", name="e")
    obj = client_object(pki.client1)
    r = run(require_tool("qemu-io"), "--object", obj, "--image-opts", qemu_blockdev(s),
            "-c", "write -P 0x5a 64k 1M", "-c", "read -P 0x5a 64k 1M", "-c", "read -P 0 0 64k")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    spec = {"driver": "nbd", "server": {"type": "unix", "path": str(s.socket)},
            "export": "e", "tls-creds": "tls1", "tls-hostname": "localhost"}
    r = run(require_tool("qemu-img"), "info", "--object", obj, "json:" + json.dumps(spec))
    assert r.returncode == 0, r.stderr
    assert f"({SIZE} bytes)" in r.stdout


def test_x509_fio(pki: Pki, server, image: Path) -> None:
    """fio's nbd engine refuses URIs naming local files (tls-certificates), so this
    server checks no client certificate and fio does not check the server's:
    the data still goes through TLS."""
    _, start = server
    s = start(image, *x509(pki, verify="off"), "-t", name="e")
    uri = tls_uri(s, extra="&tls-verify-peer=false")
    r = run(require_tool("fio"), "--name=tls", "--ioengine=nbd", f"--uri={uri}",
            "--rw=randrw", "--bs=4k", "--size=2M", "--iodepth=8", "--verify=crc32c",
            "--do_verify=1", "--output-format=json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_x509_nbd_client_negotiates(pki: Pki, server, image: Path) -> None:
    """nbd-client (GnuTLS, TLS 1.2 here) reaches the end of the negotiation; without
    the kernel's nbd module it stops there."""
    _, start = server
    s = start(image, *x509(pki), "-t", name="e")
    r = run(require_tool("nbd-client"), "-unix", str(s.socket), "-N", "e",
            "-certfile", pki.client1 / "client-cert.pem",
            "-keyfile", pki.client1 / "client-key.pem",
            "-cacertfile", pki.client1 / "ca-cert.pem", "-tlshostname", "localhost",
            "/dev/nbd0")
    assert "size = 4MB" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls12_and_tls13(pki: Pki, server, image: Path, kind: str) -> None:
    """The same priority string on both servers: TLS 1.2 only, then the default."""
    name, start = server
    for prio, version in ((",priority=NORMAL:-VERS-TLS1.3", "TLSv1.2"), ("", "TLSv1.3")):
        args = x509(pki, extra=prio) if kind == "x509" else psk(pki, prio)
        extra = ("--log-connections",) if name == "nbdqcow" else ()
        s = start(image, *args, *extra, "-t", "-r", name="e")
        uri = (tls_uri(s, pki.client1) if kind == "x509"
               else tls_uri(s, user="alice", pskfile=pki.psk / "keys.psk"))
        r = nbdinfo("--size", uri)
        assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
        if name == "nbdqcow":
            s.stop()
            assert f"TLS established ({version}" in s.log.read_text()
        else:
            s.stop()


# --- refusals ----------------------------------------------------------------------------------
def _stall_inside_tls(sock_path: Path) -> float:
    """Greeting, flags, STARTTLS, ACK -- then silence inside the TLS handshake.
    Returns how long the server took to hang up."""
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(str(sock_path))
        c.recv(18)
        c.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
        reply = c.recv(20)
        assert struct.unpack(">QIII", reply)[2] == 1  # ACK
        t0 = time.monotonic()
        c.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never finished
        assert c.recv(1) == b""
        return time.monotonic() - t0


def test_refusals_keep_serving(pki: Pki, server, image: Path) -> None:
    """Without -t: a plain client, a certificate from another CA, a DN authz does not
    list and a stalled TLS handshake are each refused, and none of them ends the
    server; the good client that follows is served and (one-shot) ends it."""
    name, start = server
    limit = ("--handshake-limit", "1") if name == "nbdqcow" else ()
    s = start(image, *x509(pki), "--object", f"authz-simple,id=auth0,identity="
              f"{CLIENT1_DN.replace(',', ',,')}", "--tls-authz", "auth0", *limit, name="e")
    r = nbdinfo("--size", f"nbd+unix:///e?socket={s.socket}")
    assert r.returncode != 0
    r = nbdinfo("--size", tls_uri(s, pki.rogue))
    assert r.returncode != 0
    r = nbdinfo("--size", tls_uri(s, pki.client2))
    assert r.returncode != 0
    if name == "nbdqcow":  # qemu-nbd 7.2 has no --handshake-limit (its fixed 10 s)
        waited = _stall_inside_tls(s.socket)
        assert 0.5 < waited < 8
    assert s.proc.poll() is None
    r = nbdinfo("--size", tls_uri(s, pki.client1))
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
    assert s.proc.wait(10) == 0
    if name == "nbdqcow":
        log = s.log.read_text()
        assert "TLS x509 authz check for O=nbq,CN=client2 is denied" in log
        assert "handshake not finished in 1s" in log


def test_authz_list_file(pki: Pki, server, image: Path, tmp_path: Path) -> None:
    name, start = server
    if name == "qemu-nbd":
        pytest.skip("Debian's qemu-nbd 7.2 does not build the authz-list-file object")
    rules = tmp_path / "authz.json"
    rules.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": CLIENT1_DN, "policy": "allow"}]}))
    s = start(image, *x509(pki), "--object", f"authz-list-file,id=auth0,filename={rules}",
              "--tls-authz", "auth0", "-t", "-r", name="e")
    assert nbdinfo("--size", tls_uri(s, pki.client1)).returncode == 0
    assert nbdinfo("--size", tls_uri(s, pki.client2)).returncode != 0
    # refresh (the default): the changed file applies to the next client
    rules.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": "O=nbq,CN=client*", "policy": "allow", "format": "glob"},
        {"match": CLIENT1_DN, "policy": "deny"}]}))
    assert nbdinfo("--size", tls_uri(s, pki.client2)).returncode == 0
    assert nbdinfo("--size", tls_uri(s, pki.client1)).returncode == 0  # first match wins
    rules.write_text("{not json")
    assert nbdinfo("--size", tls_uri(s, pki.client1)).returncode != 0  # broken: deny all


# --- PSK ---------------------------------------------------------------------------------------
def test_psk_nbdinfo_qemu_io_and_wrong_key(pki: Pki, server, image: Path) -> None:
    _, start = server
    s = start(image, *psk(pki), "-t", name="e")
    r = nbdinfo("--size", tls_uri(s, user="alice", pskfile=pki.psk / "keys.psk"))
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
    r = nbdinfo("--size", tls_uri(s, user="alice", pskfile=pki.psk_wrong / "keys.psk"))
    assert r.returncode != 0
    r = nbdinfo("--size", f"nbd+unix:///e?socket={s.socket}")
    assert r.returncode != 0
    r = run(require_tool("qemu-io"), "--object",
            client_object(pki.psk, "psk", ",username=alice"), "--image-opts",
            qemu_blockdev(s), "-c", "write -P 0x33 0 256k", "-c", "read -P 0x33 0 256k")
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr


def test_psk_authz_by_username(pki: Pki, server, image: Path) -> None:
    """nbdqcow checks --tls-authz against the PSK username; qemu-nbd ignores --tls-authz
    with PSK credentials (its check_credentials does nothing for PSK) and lets alice in:
    a difference listed in the README."""
    name, start = server
    s = start(image, *psk(pki), "--object", "authz-simple,id=a,identity=bob",
              "--tls-authz", "a", "-t", "-r", name="e")
    r = nbdinfo("--size", tls_uri(s, user="alice", pskfile=pki.psk / "keys.psk"))
    assert (r.returncode != 0) == (name == "nbdqcow")
    assert s.proc.poll() is None
    if name == "nbdqcow":
        s.stop()
        assert "TLS psk authz check for alice is denied" in s.log.read_text()


def test_anon_qemu_io(server, image: Path) -> None:
    """tls-creds-anon (anonymous DH, TLS 1.2): qemu-io's anon client reads and writes."""
    _, start = server
    s = start(image, "--object", "tls-creds-anon,id=tls0,endpoint=server", "--tls-creds",
              "tls0", "-t", name="e")
    r = run(require_tool("qemu-io"), "--object", "tls-creds-anon,id=tls1,endpoint=client",
            "--image-opts", qemu_blockdev(s).replace(",tls-hostname=localhost", ""),
            "-c", "write -P 0x77 0 128k", "-c", "read -P 0x77 0 128k")
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    assert nbdinfo("--size", f"nbd+unix:///e?socket={s.socket}").returncode != 0


# --- command line errors --------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--object", "foo,id=x"],
    ["--object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server"],
    ["--object", "tls-creds-x509,id=t,endpoint=bogus"],
    ["--object", "tls-creds-x509,id=t,bogus=1"],
    ["--object", "tls-creds-x509,dir=/tmp"],
    ["--object", "secret,id=s,data=x,file=y"],
    ["--object", "authz-simple,id=a"],
    ["--tls-creds", "nope"],
    ["--object", "secret,id=s,data=x", "--tls-creds", "s"],
    ["--tls-authz", "x"],
])
def test_object_errors_like_qemu_nbd(argv: list[str], image: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "x.sock")
    ours = run(sys.executable, "-m", "nbdqcow", "serve", "-k", sock, *argv, image)
    theirs = run(require_tool("qemu-nbd"), "-k", sock, *argv, image)
    assert ours.returncode == theirs.returncode == 1
    assert len(ours.stderr.splitlines()) == 1, ours.stderr
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]


def test_authz_needs_a_peer_identity(pki: Pki, image: Path, tmp_path: Path) -> None:
    """--tls-authz with x509 verify-peer=off (no client certificate asked for) is refused
    at start; qemu-nbd would start and skip the check for every client."""
    argv = ["--object", f"tls-creds-x509,id=t,dir={pki.server},endpoint=server,"
            "verify-peer=off", "--tls-creds", "t", "--object", "authz-simple,id=a,"
            "identity=x", "--tls-authz", "a"]
    ours = run(sys.executable, "-m", "nbdqcow", "serve", "-k", tmp_path / "s", *argv, image)
    assert ours.returncode == 1
    assert "--tls-authz needs credentials that identify the client" in ours.stderr


def test_encrypted_key_with_passwordid(pki: Pki, image: Path, tmp_path: Path) -> None:
    """tls-creds-x509,passwordid=SECRET reads an encrypted server key; a wrong secret is
    a one-line error at start."""
    from cryptography.hazmat.primitives import serialization

    d = tmp_path / "enc"
    d.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (d / name).write_bytes((pki.server / name).read_bytes())
    key = serialization.load_pem_private_key((pki.server / "server-key.pem").read_bytes(), None)
    (d / "server-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2")))
    from nbdqcow.tls.objects import ObjectRegistry

    reg = ObjectRegistry()
    reg.add("secret,id=pw,data=hunter2")
    reg.add(f"tls-creds-x509,id=t,dir={d},endpoint=server,passwordid=pw")
    argv = ["--object", "secret,id=pw,data=wrong", "--object",
            f"tls-creds-x509,id=t,dir={d},endpoint=server,passwordid=pw", "--tls-creds", "t"]
    ours = run(sys.executable, "-m", "nbdqcow", "serve", "-k", tmp_path / "s", *argv, image)
    assert ours.returncode == 1 and len(ours.stderr.splitlines()) == 1
    assert "wrong passwordid secret?" in ours.stderr and "hunter2" not in ours.stderr


def test_client_endpoint_refused(pki: Pki, image: Path, tmp_path: Path) -> None:
    argv = ["--object", f"tls-creds-x509,id=t,dir={pki.client1},endpoint=client",
            "--tls-creds", "t"]
    ours = run(sys.executable, "-m", "nbdqcow", "serve", "-k", tmp_path / "s", *argv, image)
    assert ours.returncode == 1
    assert "Expected TLS credentials for a server endpoint" in ours.stderr


# --- clients: nbdqcow.nbdclient and serve -L ----------------------------------------------
#: how a refused TLS client fails: the handshake (TlsError), or the server closing the
#: connection right after it (TLS 1.3 clients finish before the server checks them)
REFUSED = (NbdqcowError, OSError, asyncio.IncompleteReadError)


def _nbdclient_roundtrip(uri: str) -> tuple[bool, list[tuple[str, str]]]:
    from nbdqcow.nbdclient import connect, list_exports

    async def go() -> tuple[bool, list[tuple[str, str]]]:
        data = os.urandom(3 << 20)
        c = await connect(uri)
        await c.pwrite(data, 4096)
        same = await c.pread(4096, len(data)) == data
        await c.disconnect()
        return same, await list_exports(uri)

    return asyncio.run(go())


def test_nbdclient_x509_and_psk(pki: Pki, server, image: Path) -> None:
    _, start = server
    s = start(image, *x509(pki), "-t", name="e")
    same, exports = _nbdclient_roundtrip(tls_uri(s, pki.client1))
    assert same and [e[0] for e in exports] == ["e"]
    with pytest.raises(REFUSED):  # a certificate from another CA
        _nbdclient_roundtrip(tls_uri(s, pki.rogue))
    s.stop()
    s = start(image, *psk(pki), "-t", name="e")
    same, exports = _nbdclient_roundtrip(tls_uri(s, user="alice", pskfile=pki.psk / "keys.psk"))
    assert same and [e[0] for e in exports] == ["e"]
    with pytest.raises(REFUSED):
        _nbdclient_roundtrip(tls_uri(s, user="alice", pskfile=pki.psk_wrong / "keys.psk"))
    assert s.proc.poll() is None


def test_list_over_tls_like_qemu_nbd(pki: Pki, server, image: Path) -> None:
    """serve -L and qemu-nbd -L with the same client --object lines print the same."""
    _, start = server
    s = start(image, *x509(pki), "-t", "-r", name="e")
    argv = ["-L", "-k", str(s.socket), "--object",
            f"tls-creds-x509,id=tls1,dir={pki.client1},endpoint=client", "--tls-creds",
            "tls1", "--tls-hostname", "localhost"]
    ours = run(sys.executable, "-m", "nbdqcow", "serve", *argv)
    theirs = run(require_tool("qemu-nbd"), *argv)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout and "export: 'e'" in ours.stdout
    plain = run(sys.executable, "-m", "nbdqcow", "serve", "-L", "-k", str(s.socket))
    assert plain.returncode == 1 and "requires TLS" in plain.stderr
