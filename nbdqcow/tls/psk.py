"""TLS-PSK through pyOpenSSL: the key file psktool writes and OpenSSL's PSK callbacks.

pyOpenSSL has no PSK methods; pyca/cryptography's OpenSSL bindings export
``SSL_CTX_set_psk_server_callback``/``..._client_callback`` for this purpose (its
changelog: "Add bindings for PSK", so that users can add PSK to pyOpenSSL contexts).
We register a cffi callback on the pyOpenSSL context's ``SSL_CTX``.  OpenSSL uses these
callbacks for TLS 1.2 PSK cipher suites and for TLS 1.3 external PSKs (SHA-256), which
is what GnuTLS peers (qemu, libnbd) offer.

``keys.psk`` (psktool): one ``username:hexkey`` per line.
"""

from __future__ import annotations

import binascii
import tempfile
from typing import Any

from nbdqcow.tls.session import OpenSslSession, TlsError

#: TLS 1.2 suites (GnuTLS's "+ECDHE-PSK:+DHE-PSK:+PSK" in qemu's PSK priority)
PSK_CIPHERS = b"ECDHE-PSK:DHE-PSK:PSK:!NULL:!3DES"
#: TLS 1.3 suites in the server's order of preference when the CPU has AES
#: instructions.  A PSK from OpenSSL's PSK callbacks is bound to SHA-256, which leaves
#: AES-128-GCM and ChaCha20-Poly1305; GnuTLS clients list ChaCha20 first, and OpenSSL
#: would follow them: with AES-NI that costs both ends several times the CPU per byte
#: (nbdcopy over PSK: 2.5 s of client CPU per GiB against 0.5 s with AES-GCM).
#: Every suite stays enabled: a client that offers only ChaCha20 still gets it.
PSK_SUITES_AES_FIRST = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: The ffdhe2048 group of RFC 7919 (a published constant, as ``certtool --get-dh-params``
#: prints it): the DH parameters used when ``dir`` has no ``dh-params.pem``, as GnuTLS
#: servers do.  OpenSSL's automatic DH choice is not reachable from Python.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBDAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAgICAQA=
-----END DH PARAMETERS-----
"""


def load_dh(ctx: Any, dh_params: str | None) -> None:
    """DH parameters for a pyOpenSSL server context: ``dh-params.pem`` or ffdhe2048."""
    if dh_params:
        ctx.load_tmp_dh(dh_params.encode())
        return
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(FFDHE2048_PEM)
        f.flush()
        ctx.load_tmp_dh(f.name.encode())


def read_psk_file(path: str) -> dict[str, bytes]:
    """``{username: key}`` from a psktool file; a bad line is an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TlsError(f"Unable to access credentials {path}: {e.strerror}") from None
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.rpartition(":")
        try:
            if not sep or not user:
                raise ValueError
            keys[user] = binascii.unhexlify(hexkey)
        except (ValueError, binascii.Error):
            raise TlsError(f"{path}:{n}: not a 'username:hexkey' line") from None
    return keys


def _aes_instructions() -> bool:
    """The CPU has AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def _binding() -> tuple[Any, Any]:
    from cryptography.hazmat.bindings.openssl.binding import Binding

    return Binding.ffi, Binding.lib


def _ptr_key(ffi: Any, ssl_ptr: Any) -> int:
    return int(ffi.cast("uintptr_t", ssl_ptr))


def anon_context(server: bool, dh_params: str | None = None) -> Any:
    """A pyOpenSSL context for anonymous Diffie-Hellman (TLS 1.2; qemu's ``+ANON-DH``):
    Python's ssl cannot switch on OpenSSL's automatic DH parameters, pyOpenSSL's context
    can (through the same bindings)."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
    if server:
        load_dh(ctx, dh_params)
    return ctx


def anon_session(ctx: Any, server: bool) -> OpenSslSession:
    from OpenSSL import SSL

    conn = SSL.Connection(ctx, None)
    if server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return OpenSslSession(conn, lambda: None)


class PskContext:
    """A pyOpenSSL context with a PSK callback (server: key by identity; client: one
    identity and key)."""

    def __init__(self, server: bool, keys: dict[str, bytes], username: str,
                 min_version: int | None, max_version: int | None,
                 dh_params: str | None = None) -> None:
        from OpenSSL import SSL

        ffi, lib = _binding()
        if not getattr(lib, "Cryptography_HAS_PSK", False):
            raise TlsError("this OpenSSL build has no TLS-PSK support")
        self.server = server
        self.keys = keys
        self.username = username
        self._ffi = ffi
        self._identities: dict[int, str] = {}
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(min_version or SSL.TLS1_2_VERSION)
        if max_version:
            ctx.set_max_proto_version(max_version)
        ctx.set_cipher_list(PSK_CIPHERS)
        raw = ctx._context  # the SSL_CTX* pyOpenSSL wraps
        if server:
            load_dh(ctx, dh_params)
            if _aes_instructions() and getattr(lib, "SSL_CTX_set_ciphersuites", None):
                lib.SSL_CTX_set_ciphersuites(raw, PSK_SUITES_AES_FIRST)
                ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
            self._cb = ffi.callback(
                "unsigned int(SSL *, char *, unsigned char *, unsigned int)",
                self._server_cb, error=0)
            lib.SSL_CTX_set_psk_server_callback(raw, self._cb)
        else:
            if username not in keys:
                raise TlsError(f"no key for username '{username}' in the PSK file")
            self._cb = ffi.callback(
                "unsigned int(SSL *, char *, char *, unsigned int, unsigned char *,"
                " unsigned int)", self._client_cb, error=0)
            lib.SSL_CTX_set_psk_client_callback(raw, self._cb)
        self.ctx = ctx

    def _server_cb(self, ssl_ptr: Any, identity: Any, psk: Any, max_len: int) -> int:
        ffi = self._ffi
        if identity == ffi.NULL:
            return 0
        name = ffi.string(identity).decode("utf-8", "replace")
        key = self.keys.get(name)
        if key is None or len(key) > max_len:
            return 0
        ffi.memmove(psk, key, len(key))
        self._identities[_ptr_key(ffi, ssl_ptr)] = name
        return len(key)

    def _client_cb(self, ssl_ptr: Any, hint: Any, identity: Any, max_id: int, psk: Any,
                   max_psk: int) -> int:
        ffi = self._ffi
        name = self.username.encode()
        key = self.keys[self.username]
        if len(name) + 1 > max_id or len(key) > max_psk:
            return 0
        ffi.memmove(identity, name + b"\0", len(name) + 1)
        ffi.memmove(psk, key, len(key))
        return len(key)

    def session(self) -> OpenSslSession:
        from OpenSSL import SSL

        conn = SSL.Connection(self.ctx, None)
        if self.server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        key = _ptr_key(self._ffi, conn._ssl)

        def identity() -> str | None:
            if not self.server:
                return self.username
            name = self._identities.pop(key, None)
            if name is not None:
                cache.append(name)
            return cache[-1] if cache else None

        cache: list[str] = []
        return OpenSslSession(conn, identity)
