"""Precompiled ``struct.Struct`` codecs for every fixed-size NBD wire structure.

All integers are big-endian (network byte order), as the NBD spec (doc/proto.md) says.
Names are stable: the server codec and the client codec both import them.
"""

from __future__ import annotations

import struct

from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

# --- plain integers ---------------------------------------------------------------------
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# --- handshake --------------------------------------------------------------------------
#: server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes)
SERVER_GREETING = struct.Struct(">QQH")
#: client flags sent right after the greeting (4 bytes)
CLIENT_FLAGS = U32
#: option request header: IHAVEOPT, option, length of data (16 bytes)
OPTION_REQUEST = struct.Struct(">QII")
#: option reply header: reply magic, option, reply type, length of data (20 bytes)
OPTION_REPLY = struct.Struct(">QIII")
#: reply to NBD_OPT_EXPORT_NAME: export size, transmission flags (10 bytes, +124 zero
#: bytes unless NO_ZEROES was negotiated)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
#: NBD_INFO_EXPORT payload of NBD_REP_INFO: info type (0), size, flags (12 bytes)
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: info type (3), minimum, preferred, maximum (14 bytes)
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: the 16-bit information type that starts every NBD_REP_INFO payload
INFO_TYPE = U16
#: NBD_REP_META_CONTEXT payload starts with the 32-bit context id, then the name
META_CONTEXT_ID = U32
#: length prefix of names / queries in option payloads
STRING_LENGTH = U32
#: count of information requests in NBD_OPT_INFO / NBD_OPT_GO
INFO_REQUEST_COUNT = U16

# --- transmission: requests ---------------------------------------------------------------
#: compact request: magic, command flags, type, cookie, offset, 32-bit length (28 bytes)
REQUEST = struct.Struct(">IHHQQI")
#: extended request: magic, command flags, type, cookie, offset, 64-bit length (32 bytes)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")

# --- transmission: replies ----------------------------------------------------------------
#: simple reply: magic, error, cookie (16 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")
#: structured reply chunk header: magic, flags, type, cookie, payload length (20 bytes)
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: extended reply chunk header: magic, flags, type, cookie, offset, 64-bit length (32 bytes)
EXTENDED_REPLY = struct.Struct(">IHHQQQ")

#: structured header immediately followed by the 64-bit offset of OFFSET_DATA (28 bytes)
STRUCTURED_OFFSET_DATA = struct.Struct(">IHHQIQ")
#: structured header + OFFSET_HOLE payload (offset, 32-bit hole length) (32 bytes)
STRUCTURED_OFFSET_HOLE = struct.Struct(">IHHQIQI")
#: extended header + OFFSET_DATA offset (40 bytes)
EXTENDED_OFFSET_DATA = struct.Struct(">IHHQQQQ")
#: extended header + OFFSET_HOLE payload (44 bytes)
EXTENDED_OFFSET_HOLE = struct.Struct(">IHHQQQQI")

#: chunk payloads on their own
OFFSET_DATA = U64
OFFSET_HOLE = struct.Struct(">QI")
#: NBD_REPLY_TYPE_BLOCK_STATUS: context id, then descriptors
BLOCK_STATUS_HEADER = U32
#: one block descriptor: 32-bit length, 32-bit status flags
BLOCK_DESCRIPTOR = struct.Struct(">II")
#: NBD_REPLY_TYPE_BLOCK_STATUS_EXT: context id, descriptor count, then descriptors
BLOCK_STATUS_EXT_HEADER = struct.Struct(">II")
#: one extended descriptor: 64-bit length, 64-bit status flags
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")
#: NBD_REPLY_TYPE_ERROR payload: error, message length (then message)
ERROR_HEADER = struct.Struct(">IH")
#: NBD_REPLY_TYPE_ERROR_OFFSET adds the 64-bit offset after the message
ERROR_OFFSET = U64

# --- sizes ----------------------------------------------------------------------------------
GREETING_SIZE = SERVER_GREETING.size  # 18
OPTION_REQUEST_SIZE = OPTION_REQUEST.size  # 16
OPTION_REPLY_SIZE = OPTION_REPLY.size  # 20
REQUEST_SIZE = REQUEST.size  # 28
EXTENDED_REQUEST_SIZE = EXTENDED_REQUEST.size  # 32
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size  # 20
EXTENDED_REPLY_SIZE = EXTENDED_REPLY.size  # 32

assert REQUEST_SIZE == 28 and EXTENDED_REQUEST_SIZE == 32
assert SIMPLE_REPLY_SIZE == 16 and STRUCTURED_REPLY_SIZE == 20 and EXTENDED_REPLY_SIZE == 32


# --- tiny helpers (cold paths: handshake) ---------------------------------------------------
def pack_greeting(handshake_flags: int) -> bytes:
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def pack_option_request(option: int, data: bytes = b"") -> bytes:
    return OPTION_REQUEST.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def pack_string(s: bytes) -> bytes:
    """32-bit length-prefixed string (names, queries)."""
    return STRING_LENGTH.pack(len(s)) + s


def pack_simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_structured_header(flags: int, reply_type: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def pack_extended_header(
    flags: int, reply_type: int, cookie: int, offset: int, length: int
) -> bytes:
    return EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, offset, length)
