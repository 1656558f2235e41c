"""--object parsing, authorization rules and priority strings: no sockets, no files
beyond a temporary rule list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbdqcow.qemuopts import OptsError
from nbdqcow.tls.authz import AuthzListFile
from nbdqcow.tls.objects import ObjectRegistry, Secret
from nbdqcow.tls.priority import versions
from nbdqcow.tls.psk import read_psk_file
from nbdqcow.tls.session import TlsError


@pytest.mark.parametrize("text, message", [
    ("foo,id=x", "Parameter 'qom-type' does not accept value 'foo'"),
    ("authz-simple,identity=x", "Parameter 'id' is missing"),
    ("authz-simple,id=a", "Parameter 'identity' is missing"),
    ("authz-simple,id=a,identity=x,bogus=1", "Parameter 'bogus' is unexpected"),
    ("tls-creds-anon,id=t,endpoint=middle", "Parameter 'endpoint' does not accept value 'middle'"),
    ("tls-creds-anon,id=t,verify-peer=maybe", "Parameter 'verify-peer' expects 'on' or 'off'"),
    ("secret,id=s,data=x,file=y", "'file' and 'data' are mutually exclusive"),
    ("secret,id=s", "Either 'file' or 'data' must be provided"),
])
def test_bad_objects(text: str, message: str) -> None:
    with pytest.raises(OptsError) as e:
        ObjectRegistry().add(text)
    assert str(e.value) == message


def test_duplicate_id_and_lookups() -> None:
    reg = ObjectRegistry()
    reg.add("secret,id=s,data=hunter2")
    with pytest.raises(OptsError, match="duplicate property 's'"):
        reg.add("authz-simple,id=s,identity=x")
    with pytest.raises(TlsError, match="No TLS credentials with id 'nope'"):
        reg.creds("nope", "server")
    with pytest.raises(TlsError, match="Object with id 's' is not TLS credentials"):
        reg.creds("s", "server")
    reg.add("tls-creds-anon,id=an,endpoint=client")
    with pytest.raises(TlsError, match="Expected TLS credentials for a server endpoint"):
        reg.creds("an", "server")


def test_secret_never_printed(tmp_path: Path) -> None:
    reg = ObjectRegistry()
    obj = reg.add("secret,id=s,data=aHVudGVyMg==,format=base64")
    assert isinstance(obj, Secret) and reg.secret("s") == b"hunter2"
    assert "hunter2" not in repr(obj) and "aHVudGVy" not in repr(reg.objects)
    f = tmp_path / "pw"
    f.write_bytes(b"from-file")
    reg.add(f"secret,id=f,file={f}")
    assert reg.secret("f") == b"from-file"


def test_authz_simple_with_escaped_comma() -> None:
    a = ObjectRegistry().add("authz-simple,id=a,identity=O=nbq,,CN=client1")
    assert a.is_allowed("O=nbq,CN=client1")  # type: ignore[attr-defined]
    assert not a.is_allowed("O=nbq,CN=client2")  # type: ignore[attr-defined]


def test_authz_list_inline_rules() -> None:
    a = ObjectRegistry().add(
        "authz-list,id=a,policy=allow,rules.0.match=CN=bad*,rules.0.policy=deny,"
        "rules.0.format=glob")
    assert a.is_allowed("CN=good") and not a.is_allowed("CN=bad1")  # type: ignore[attr-defined]


def test_authz_list_file_refresh(tmp_path: Path) -> None:
    f = tmp_path / "rules.json"
    f.write_text(json.dumps({"rules": [{"match": "alice", "policy": "allow"}]}))
    a = AuthzListFile("a", str(f))
    assert a.is_allowed("alice") and not a.is_allowed("bob")  # default deny
    f.write_text(json.dumps({"policy": "allow", "rules": []}) + " ")
    assert a.is_allowed("bob")
    f.write_text("[")
    assert not a.is_allowed("alice")  # unreadable: deny everyone
    with pytest.raises(OptsError, match="Unable to read"):
        AuthzListFile("c", str(tmp_path / "missing.json"))


def test_authz_list_file_bad_rule(tmp_path: Path) -> None:
    f = tmp_path / "rules.json"
    f.write_text(json.dumps({"rules": [{"match": "x", "format": "regex"}]}))
    with pytest.raises(OptsError, match="format must be 'exact' or 'glob'"):
        AuthzListFile("a", str(f))


@pytest.mark.parametrize("prio, expect", [
    (None, (2, 3)), ("NORMAL", (2, 3)), ("NORMAL:-VERS-TLS1.3", (2, 2)),
    ("NORMAL:-VERS-ALL:+VERS-TLS1.3", (3, 3)), ("@SYSTEM", (2, 3)),
    ("SECURE256:+SECURE128:-VERS-TLS1.2", (3, 3)),
])
def test_priority_versions(prio: str | None, expect: tuple[int, int]) -> None:
    assert versions(prio) == expect


@pytest.mark.parametrize("prio", ["BOGUS", "NORMAL:-VERS-ALL"])
def test_priority_refused(prio: str) -> None:
    with pytest.raises(TlsError):
        versions(prio)


def test_psk_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff10\n\nbob:abcd\n")
    assert read_psk_file(str(f)) == {"alice": b"\x00\xff\x10", "bob": b"\xab\xcd"}
    f.write_text("alice:zz\n")
    with pytest.raises(TlsError, match="keys.psk:1"):
        read_psk_file(str(f))


# --- nbds URIs (libnbd's query parameters) -------------------------------------------------
def test_nbds_uris() -> None:
    from nbdqcow.nbdclient.uri import parse_uri

    a = parse_uri("nbds+unix://alice@/disk?socket=/s&tls-psk-file=/k/keys.psk")
    assert (a.tls, a.socket, a.export, a.tls_username, a.tls_psk_file) == (
        True, "/s", "disk", "alice", "/k/keys.psk")
    b = parse_uri("nbds://host:1234/e?tls-certificates=/pki&tls-verify-peer=false")
    assert (b.tls, b.host, b.port, b.tls_certificates, b.tls_verify_peer) == (
        True, "host", 1234, "/pki", False)
    assert b.uri().startswith("nbds://host:1234/")
    plain = parse_uri("nbd+unix:///?socket=/s&tls-certificates=/ignored")
    assert not plain.tls and plain.tls_certificates is None
    with pytest.raises(ValueError, match="tls-verify-peer"):
        parse_uri("nbds://h/?tls-verify-peer=maybe")
