"""One exception hierarchy for the whole project, and ONE table mapping it to NBD errnos.

Layers raise these; only ``server/dispatch.py`` turns them into NBD error replies,
through :func:`nbd_errno`.
"""

from __future__ import annotations

import errno


class NbdqcowError(Exception):
    """Base of every error nbdqcow raises on purpose."""


# --- image / block layer -------------------------------------------------------------
class ImageError(NbdqcowError):
    """Something is wrong with an image (open failed, bad metadata, ...)."""


class ImageOpenError(ImageError):
    """The image cannot be opened (bad header, missing backing file, ...)."""


class UnsupportedFeature(ImageOpenError):
    """The image uses a feature this engine refuses (unknown incompatible bit, encryption)."""


class CorruptImage(ImageError):
    """Metadata is impossible; the image has been (or must be) marked corrupt."""


class ReadOnlyImage(ImageError):
    """A write was attempted on an image opened read-only (or marked corrupt)."""


class WriteRefused(ImageError):
    """A write the image refuses to protect data (block 0 of a probed raw image that
    would then probe as another format): EPERM, as qemu answers."""


class OutOfRange(ImageError):
    """A request lies (partly) outside the image."""


class NoSpace(ImageError):
    """The host ran out of space (or a write lies past the end of the image)."""


class NotSupported(NbdqcowError):
    """The operation is not supported (e.g. a FAST_ZERO request that cannot be fast)."""


class WouldBlock(NbdqcowError):
    """A read asked not to wait found its data outside the page cache (retry it where
    waiting is fine: a worker thread)."""


class NowaitUnsupported(WouldBlock):
    """The file system cannot tell cached data from data on disk (no RWF_NOWAIT, e.g.
    tmpfs): every read asked not to wait ends here, whatever the cache holds."""


class InvalidRequest(NbdqcowError):
    """A request is malformed (bad flags, bad alignment...)."""


# --- protocol layer ------------------------------------------------------------------
class ProtocolError(NbdqcowError):
    """The NBD peer violated the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class RemoteError(NbdqcowError):
    """The server answered a request with an NBD error (client side)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        super().__init__(message or f"NBD error {code} ({errno.errorcode.get(code, '?')})")


# The ONE table: exception class -> NBD error number (values from the NBD spec).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (ReadOnlyImage, NBD_EPERM),
    (WriteRefused, NBD_EPERM),
    (NoSpace, NBD_ENOSPC),
    (OutOfRange, NBD_EINVAL),
    (InvalidRequest, NBD_EINVAL),
    (NotSupported, NBD_ENOTSUP),
    (CorruptImage, NBD_EIO),
    (MemoryError, NBD_ENOMEM),
)

_OS_ERRNO = {
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
}


def nbd_errno(exc: BaseException) -> int:
    """Map any exception raised while serving a request to an NBD error number."""
    for cls, code in _ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno is not None:
        return _OS_ERRNO.get(exc.errno, NBD_EIO)
    return NBD_EIO
