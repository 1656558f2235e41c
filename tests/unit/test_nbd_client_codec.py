"""The client side of the NBD codec, byte for byte against doc/proto.md (no sockets).

Expected bytes are written out by hand from the spec's field lists, not produced by the
codec's own structs.
"""

from __future__ import annotations

import struct

import pytest

from nbdqcow.errors import RemoteError, RemoteProtocolError
from nbdqcow.nbd import client as c
from nbdqcow.nbd.constants import (
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)

IHAVEOPT_BYTES = b"IHAVEOPT"


# --- handshake ------------------------------------------------------------------------
def test_greeting_parsed() -> None:
    data = b"NBDMAGIC" + IHAVEOPT_BYTES + b"\x00\x03"
    assert c.parse_greeting(data) == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def test_greeting_ignores_unknown_handshake_flags() -> None:
    data = b"NBDMAGIC" + IHAVEOPT_BYTES + b"\x80\x01"
    assert c.parse_greeting(data) == HandshakeFlag.FIXED_NEWSTYLE


@pytest.mark.parametrize(
    "data",
    [
        b"NBDMAGIX" + IHAVEOPT_BYTES + b"\x00\x03",  # bad magic
        b"NBDMAGIC" + bytes.fromhex("0000420281861253") + b"\x00\x03",  # oldstyle
        b"NBDMAGIC" + IHAVEOPT_BYTES + b"\x00\x02",  # not fixed newstyle
        b"NBDMAGIC" + IHAVEOPT_BYTES,  # short
    ],
)
def test_bad_greeting_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        c.parse_greeting(data)


def test_client_flags_follow_server() -> None:
    both = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    assert c.client_flags(both) == ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
    assert c.client_flags(HandshakeFlag.FIXED_NEWSTYLE) == ClientFlag.FIXED_NEWSTYLE
    assert c.build_client_flags(3) == b"\x00\x00\x00\x03"


def test_build_option_layout() -> None:
    assert c.build_option(Opt.STRUCTURED_REPLY) == IHAVEOPT_BYTES + bytes.fromhex(
        "00000008 00000000"
    )
    assert (
        c.build_option(Opt.ABORT, b"xy")
        == IHAVEOPT_BYTES + bytes.fromhex("00000002 00000002") + b"xy"
    )


def test_build_go_with_info_requests() -> None:
    got = c.build_info_request(Opt.GO, "disk", (Info.BLOCK_SIZE, Info.NAME))
    payload = bytes.fromhex("00000004") + b"disk" + bytes.fromhex("0002 0003 0001")
    assert (
        got
        == IHAVEOPT_BYTES + bytes.fromhex("00000007") + struct.pack(">I", len(payload)) + payload
    )


def test_build_info_rejects_other_options() -> None:
    with pytest.raises(ValueError):
        c.build_info_request(Opt.LIST, "")


def test_build_export_name_and_long_names() -> None:
    assert c.build_export_name("ab") == IHAVEOPT_BYTES + bytes.fromhex("00000001 00000002") + b"ab"
    with pytest.raises(ValueError):
        c.build_export_name("x" * 4097)


def test_build_set_meta_context() -> None:
    got = c.build_meta_context(Opt.SET_META_CONTEXT, "", ["base:allocation", "qemu:"])
    payload = (
        bytes.fromhex("00000000")  # export name length, empty name
        + bytes.fromhex("00000002")  # two queries
        + bytes.fromhex("0000000f")
        + b"base:allocation"
        + bytes.fromhex("00000005")
        + b"qemu:"
    )
    assert (
        got
        == IHAVEOPT_BYTES + bytes.fromhex("0000000a") + struct.pack(">I", len(payload)) + payload
    )


def test_option_reply_header() -> None:
    raw = bytes.fromhex("0003e889045565a9 00000007 00000003 0000000c")
    reply = c.parse_option_reply_header(raw)
    assert (reply.option, reply.reply, reply.length) == (7, Rep.INFO, 12)
    assert not reply.is_error
    err = c.parse_option_reply_header(bytes.fromhex("0003e889045565a9 00000063 80000001 00000000"))
    assert err.is_error and err.reply == Rep.ERR_UNSUP


def test_option_reply_bad_magic() -> None:
    with pytest.raises(RemoteProtocolError):
        c.parse_option_reply_header(bytes.fromhex("0003e889045565aa 00000007 00000001 00000000"))


def test_option_error_carries_code_and_text() -> None:
    reply = c.OptionReply(7, Rep.ERR_UNKNOWN, 7)
    err = c.option_error(reply, b"no such")
    assert isinstance(err, RemoteError) and err.code == Rep.ERR_UNKNOWN
    assert "ERR_UNKNOWN" in str(err) and "no such" in str(err)


def test_parse_info_variants() -> None:
    kind, value = c.parse_info(bytes.fromhex("0000 0000000040000000 0d05"))
    assert kind == Info.EXPORT
    assert value == (1 << 30, TransmissionFlag(0x0D05))
    kind, value = c.parse_info(bytes.fromhex("0003 00000001 00001000 02000000"))
    assert value == c.BlockSizes(1, 4096, 32 << 20)
    assert c.parse_info(b"\x00\x01disk") == (Info.NAME, "disk")
    assert c.parse_info(b"\x00\x02a disk") == (Info.DESCRIPTION, "a disk")
    assert c.parse_info(b"\x00\x09??") == (9, b"??")


@pytest.mark.parametrize("raw", ["00", "0000 0000000040000000", "0003 00000001 00001000"])
def test_parse_info_bad_length(raw: str) -> None:
    with pytest.raises(RemoteProtocolError):
        c.parse_info(bytes.fromhex(raw))


def test_parse_export_name_reply() -> None:
    info = c.parse_export_name_reply(bytes.fromhex("0000000000100000 0003") + bytes(124))
    assert (
        info.size == 1 << 20
        and info.flags == TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
    )


def test_parse_server_and_meta_context() -> None:
    assert c.parse_server(bytes.fromhex("00000003") + b"abcdescr") == ("abc", "descr")
    assert c.parse_server(bytes.fromhex("00000000")) == ("", "")
    with pytest.raises(RemoteProtocolError):
        c.parse_server(bytes.fromhex("00000009") + b"abc")
    assert c.parse_meta_context(bytes.fromhex("00000005") + b"base:allocation") == (
        5,
        "base:allocation",
    )
    with pytest.raises(RemoteProtocolError):
        c.parse_meta_context(b"\x00")


# --- transmission requests ------------------------------------------------------------
def test_request_header_compact() -> None:
    got = c.build_request(Cmd.WRITE, CmdFlag.FUA, 0x0102030405060708, 4096, 512)
    assert got == bytes.fromhex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    assert len(got) == 28


def test_request_header_extended() -> None:
    got = c.build_request(Cmd.TRIM, 0, 7, 1 << 33, 1 << 32, extended=True)
    assert got == bytes.fromhex(
        "21e41c71 0000 0004 0000000000000007 0000000200000000 0000000100000000"
    )


def test_compact_request_length_is_32_bits() -> None:
    with pytest.raises(struct.error):
        c.build_request(Cmd.TRIM, 0, 1, 0, 1 << 32)


# --- replies ----------------------------------------------------------------------------
def test_simple_reply() -> None:
    raw = bytes.fromhex("67446698 00000016 00000000000000ff")
    assert c.reply_header_size(raw) == 16
    h = c.parse_reply_header(raw)
    assert h.simple and h.done and h.error == 22 and h.cookie == 255 and h.length == 0


def test_structured_reply_header() -> None:
    raw = bytes.fromhex("668e33ef 0001 0002 0000000000000009 0000000c")
    assert c.reply_header_size(raw[:16]) == 20
    h = c.parse_reply_header(raw)
    assert not h.simple and h.done and h.type == ReplyType.OFFSET_HOLE
    assert (h.cookie, h.length) == (9, 12)


def test_extended_reply_header() -> None:
    raw = bytes.fromhex("6e8a278c 0000 0001 0000000000000003 0000000000001000 0000000000000208")
    assert c.reply_header_size(raw[:16]) == 32
    h = c.parse_reply_header(raw, extended=True)
    assert (h.type, h.cookie, h.offset, h.length, h.done) == (1, 3, 4096, 520, False)


def test_header_style_must_match_negotiation() -> None:
    ext = bytes.fromhex("6e8a278c 0000 0001 0000000000000003 0000000000001000 0000000000000208")
    with pytest.raises(RemoteProtocolError):
        c.parse_reply_header(ext, extended=False)
    simple = bytes.fromhex("67446698 00000000 0000000000000001")
    with pytest.raises(RemoteProtocolError):
        c.parse_reply_header(simple, extended=True)


def test_unknown_reply_magic() -> None:
    with pytest.raises(RemoteProtocolError):
        c.reply_header_size(bytes.fromhex("25609513") + bytes(12))


def test_chunk_payloads() -> None:
    off, data = c.parse_offset_data(bytes.fromhex("0000000000000200") + b"abc")
    assert off == 512 and bytes(data) == b"abc"
    with pytest.raises(RemoteProtocolError):
        c.parse_offset_data(bytes(8))
    assert c.parse_offset_hole(bytes.fromhex("0000000000000200 00010000")) == (512, 65536)
    with pytest.raises(RemoteProtocolError):
        c.parse_offset_hole(bytes.fromhex("0000000000000200 00000000"))
    with pytest.raises(RemoteProtocolError):
        c.parse_offset_hole(bytes(11))


def test_block_status_payloads() -> None:
    raw = bytes.fromhex("00000001 00001000 00000003 00002000 00000000")
    assert c.parse_block_status(raw, ReplyType.BLOCK_STATUS) == (1, [(4096, 3), (8192, 0)])
    ext = bytes.fromhex("00000002 00000001 0000000100000000 0000000000000001")
    assert c.parse_block_status(ext, ReplyType.BLOCK_STATUS_EXT) == (2, [(1 << 32, 1)])
    for bad, rtype in (
        (bytes.fromhex("00000001"), ReplyType.BLOCK_STATUS),  # no extent
        (bytes.fromhex("00000001 00001000 000000"), ReplyType.BLOCK_STATUS),  # ragged
        (
            bytes.fromhex("00000002 00000002 0000000100000000 0000000000000001"),
            ReplyType.BLOCK_STATUS_EXT,
        ),
        (raw, ReplyType.OFFSET_DATA),
    ):
        with pytest.raises(RemoteProtocolError):
            c.parse_block_status(bad, rtype)


def test_check_extents() -> None:
    c.check_extents([(4096, 0), (8192, 3)], 8192, False)  # the last may run past the end
    c.check_extents([(4096, 0)], 8192, True)
    for extents, length, req_one in (
        ([], 4096, False),
        ([(0, 0)], 4096, False),
        ([(4096, 0), (4096, 3)], 4096, False),  # a second extent after the request's end
        ([(4096, 0), (4096, 3)], 8192, True),  # REQ_ONE: exactly one
        ([(8192, 0)], 4096, True),  # REQ_ONE: not past the request
    ):
        with pytest.raises(RemoteProtocolError):
            c.check_extents(extents, length, req_one)


def test_error_chunks() -> None:
    raw = bytes.fromhex("0000001c 0003") + b"bad"
    assert c.parse_error_chunk(raw, ReplyType.ERROR) == (28, "bad", None)
    raw_off = bytes.fromhex("00000005 0000 0000000000001000")
    assert c.parse_error_chunk(raw_off, ReplyType.ERROR_OFFSET) == (5, "", 4096)
    with pytest.raises(RemoteProtocolError):
        c.parse_error_chunk(bytes.fromhex("00000000 0000"), ReplyType.ERROR)
    with pytest.raises(RemoteProtocolError):
        c.parse_error_chunk(bytes.fromhex("00000005 0009") + b"x", ReplyType.ERROR)
    assert c.is_error_type(ReplyType.ERROR) and not c.is_error_type(ReplyType.OFFSET_HOLE)


# --- read assembly ------------------------------------------------------------------------
def test_read_assembler_out_of_order_chunks() -> None:
    a = c.ReadAssembler(1000, 10)
    a.data(1006, b"wxyz")
    a.hole(1002, 4)
    a.data(1000, b"ab")
    assert a.finish() == b"ab\0\0\0\0wxyz"


@pytest.mark.parametrize(
    "chunks",
    [
        [("d", 1000, b"abcdef"), ("h", 1004, 6)],  # overlap
        [("d", 1000, b"abc")],  # gap at the end
        [("d", 1000, b"ab"), ("h", 1004, 6)],  # gap inside
    ],
)
def test_read_assembler_rejects_bad_coverage(chunks: list[tuple[str, int, object]]) -> None:
    a = c.ReadAssembler(1000, 10)
    for kind, off, val in chunks:
        if kind == "d":
            assert isinstance(val, bytes)
            a.data(off, val)
        else:
            assert isinstance(val, int)
            a.hole(off, val)
    with pytest.raises(RemoteProtocolError):
        a.finish()


def test_read_assembler_rejects_chunk_outside_request() -> None:
    a = c.ReadAssembler(1000, 10)
    with pytest.raises(RemoteProtocolError):
        a.data(998, b"abcd")
    with pytest.raises(RemoteProtocolError):
        a.hole(1008, 4)


def test_read_assembler_error_wins() -> None:
    a = c.ReadAssembler(0, 4)
    a.data(0, b"ab")
    a.fail(5, "media error")
    with pytest.raises(RemoteError) as info:
        a.finish()
    assert info.value.code == 5 and "media error" in str(info.value)
