"""TLS credentials objects as qemu defines them (``tls-creds-x509``, ``tls-creds-psk``,
``tls-creds-anon``): files read from ``dir`` at creation, sessions made per connection.

x509 and anon use Python's :mod:`ssl`; PSK uses pyOpenSSL (:mod:`nbdqcow.tls.psk`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from nbdqcow.tls.priority import versions
from nbdqcow.tls.psk import PskContext, anon_context, anon_session, read_psk_file
from nbdqcow.tls.session import SslSession, TlsError, TlsSession

_TLS = {2: ssl.TLSVersion.TLSv1_2, 3: ssl.TLSVersion.TLSv1_3}


def _file(directory: str, name: str, required: bool) -> str | None:
    path = os.path.join(directory, name)
    try:
        os.stat(path)
    except OSError as e:
        if required or e.errno not in (2,):
            raise TlsError(f"Unable to access credentials {path}: {e.strerror}") from None
        return None
    return path


def peer_dn(obj: ssl.SSLObject) -> str | None:
    """The peer certificate's subject DN as qemu (GnuTLS) writes it: attributes in
    certificate order, ``O=nbq,CN=client1``."""
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return ",".join("+".join(a.rfc4514_string() for a in rdn) for rdn in cert.subject.rdns)


@dataclass
class TlsCreds:
    """Common properties (qemu's ``tls-creds`` base class)."""

    id: str
    endpoint: str = "client"
    verify_peer: bool = True
    priority: str | None = None
    dir: str | None = None
    kind: str = field(default="", init=False)

    def session(self, hostname: str | None = None) -> TlsSession:
        raise NotImplementedError

    def _ssl_context(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        lo, hi = versions(self.priority)
        ctx.minimum_version, ctx.maximum_version = _TLS[lo], _TLS[hi]
        return ctx


@dataclass
class X509Creds(TlsCreds):
    """``tls-creds-x509``: ``ca-cert.pem``, ``{server,client}-{cert,key}.pem``,
    optional ``ca-crl.pem`` and ``dh-params.pem`` in ``dir``."""

    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.kind = "x509"
        server = self.endpoint == "server"
        d = self.dir or "."
        ca = _file(d, "ca-cert.pem", True)
        crl = _file(d, "ca-crl.pem", False)
        side = "server" if server else "client"
        cert = _file(d, f"{side}-cert.pem", server)
        key = _file(d, f"{side}-key.pem", server)
        dh = _file(d, "dh-params.pem", False) if server else None
        ctx = self._ssl_context()
        try:
            ctx.load_verify_locations(cafile=ca)
            if crl:
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            if cert and key:
                try:
                    ctx.load_cert_chain(cert, key, password=self.password)
                except ssl.SSLError:
                    why = "wrong passwordid secret?" if self.password else "encrypted?"
                    raise TlsError(f"Cannot load {cert} with {key}: not a matching "
                                   f"certificate and private key ({why})") from None
            if dh:
                ctx.load_dh_params(dh)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"Cannot load the x509 credentials in {d}: "
                           f"{getattr(e, 'reason', None) or e}") from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        else:
            ctx.check_hostname = False  # checked per session when a hostname is known
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        self.ctx = ctx

    def session(self, hostname: str | None = None) -> TlsSession:
        if self.endpoint == "server":
            return SslSession(self.ctx, True, identity=peer_dn)
        ctx = self.ctx
        if hostname and self.verify_peer:
            ctx = self._client_ctx_checking(hostname)
        return SslSession(ctx, False, hostname=hostname, identity=peer_dn)

    def _client_ctx_checking(self, hostname: str) -> ssl.SSLContext:
        cached = getattr(self, "_checking", None)
        if cached is None:
            d = self.dir or "."
            ctx = self._ssl_context()
            ctx.load_verify_locations(cafile=os.path.join(d, "ca-cert.pem"))
            cert, key = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key, password=self.password)
            ctx.check_hostname = True
            self._checking = cached = ctx
        return cached


@dataclass
class PskCreds(TlsCreds):
    """``tls-creds-psk``: ``keys.psk`` (psktool's ``username:hexkey``) in ``dir``;
    a client uses the key of ``username`` (qemu's default ``qemu``)."""

    username: str = "qemu"

    def __post_init__(self) -> None:
        self.kind = "psk"
        from OpenSSL import SSL

        d = self.dir or "."
        path = _file(d, "keys.psk", True)
        assert path is not None
        keys = read_psk_file(path)
        dh = _file(d, "dh-params.pem", False) if self.endpoint == "server" else None
        lo, hi = versions(self.priority)
        ossl = {2: SSL.TLS1_2_VERSION, 3: getattr(SSL, "TLS1_3_VERSION", 0)}
        self.ctx = PskContext(self.endpoint == "server", keys, self.username,
                              ossl[lo], ossl[hi] or None, dh)

    def session(self, hostname: str | None = None) -> TlsSession:
        return self.ctx.session()


@dataclass
class AnonCreds(TlsCreds):
    """``tls-creds-anon``: no certificates, no identity (anonymous Diffie-Hellman, TLS
    1.2 only, as GnuTLS offers it: ``+ANON-DH``/``+ANON-ECDH``).  Encrypts but
    authenticates nobody."""

    def __post_init__(self) -> None:
        self.kind = "anon"
        dh = _file(self.dir, "dh-params.pem", False) if self.dir else None
        self.ctx = anon_context(self.endpoint == "server", dh)

    def session(self, hostname: str | None = None) -> TlsSession:
        return anon_session(self.ctx, self.endpoint == "server")
