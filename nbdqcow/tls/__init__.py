"""TLS for NBD: qemu's ``--object`` credentials and authorization objects, and sans-I/O
TLS sessions (bytes in, bytes out) that the server and the client drive.

Python's :mod:`ssl` does x509 and anonymous credentials; PSK (absent from :mod:`ssl`
before Python 3.13) goes through pyOpenSSL with the PSK callbacks that pyca/cryptography's
OpenSSL bindings export (see :mod:`nbdqcow.tls.psk`).  Both are OpenSSL underneath; no
cryptography is implemented here.  This package imports neither ``server`` nor ``cli``.
"""
