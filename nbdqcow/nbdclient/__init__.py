"""nbdqcow's asyncio NBD client library.

``client = await connect("nbd+unix:///?socket=/tmp/s")`` then ``await client.pread(0, 4096)``;
``await list_exports(uri)``; :class:`SyncClient` for scripts.
"""

from __future__ import annotations

from nbdqcow.nbdclient.client import (
    Client,
    Extents,
    connect,
    list_exports,
    list_meta_contexts,
)
from nbdqcow.nbdclient.sync import SyncClient, list_exports_sync
from nbdqcow.nbdclient.uri import NbdAddress, parse_uri

__all__ = [
    "Client",
    "Extents",
    "NbdAddress",
    "SyncClient",
    "connect",
    "list_exports",
    "list_exports_sync",
    "list_meta_contexts",
    "parse_uri",
]
