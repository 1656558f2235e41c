"""Server handshake state machine: every negotiation edge case, no sockets.

Expected bytes are built here with plain ``struct`` and the literal values of the NBD
spec (doc/proto.md), not with the codec under test.
"""

from __future__ import annotations

import struct

import pytest

from nbdqcow.nbd.handshake import OPTION_BUFFER_LIMIT, ExportInfo, ServerHandshake

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
NBDMAGIC = 0x4E42444D41474943

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META, OPT_EXT = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR + 1, ERR + 2, ERR + 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = ERR + 6, ERR + 9

FOO = ExportInfo("foo", 1 << 20, 0x1 | 0x4, "the foo disk",
                 contexts=("base:allocation", "qemu:allocation-depth"))
BAR = ExportInfo("bar", 4096, 0x1 | 0x2)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def s32(text: str) -> bytes:
    b = text.encode()
    return struct.pack(">I", len(b)) + b


def info_req(name: str, *infos: int) -> bytes:
    return s32(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_req(name: str, *queries: str) -> bytes:
    return s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Parse option replies: (option, type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC
        pos += 20
        out.append((option, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def hs(flags: int = 3, exports: tuple[ExportInfo, ...] = (FOO, BAR)) -> ServerHandshake:
    h = ServerHandshake(list(exports))
    greeting = h.start()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert h.receive(struct.pack(">I", flags)) == b""
    return h


def test_greeting_and_flags() -> None:
    h = hs(flags=1)
    assert not h.closed and not h.done


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFF])
def test_unknown_client_flags_close(flags: int) -> None:
    h = ServerHandshake([FOO])
    h.start()
    h.receive(struct.pack(">I", flags))
    assert h.closed and not h.done


def test_bad_option_magic_closes() -> None:
    h = hs()
    h.receive(struct.pack(">QII", 0x1234, OPT_LIST, 0))
    assert h.closed


def test_unknown_option_is_unsupported_and_negotiation_goes_on() -> None:
    h = hs()
    out = replies(h.receive(opt(99, b"junk") + opt(OPT_LIST)))
    assert out[0] == (99, REP_ERR_UNSUP, b"")
    assert [r[1] for r in out[1:]] == [REP_SERVER, REP_SERVER, REP_ACK]
    assert not h.closed


def test_starttls_policy() -> None:
    out = replies(hs().receive(opt(OPT_STARTTLS)))
    assert out[0] == (OPT_STARTTLS, REP_ERR_POLICY, b"TLS not configured")


REP_ERR_TLS_REQD = ERR + 5


def tls_hs() -> ServerHandshake:
    h = ServerHandshake([FOO, BAR], tls=True)
    h.start()
    h.receive(struct.pack(">I", 3))
    return h


def test_tls_required_before_starttls() -> None:
    h = tls_hs()
    out = replies(h.receive(opt(OPT_LIST) + opt(OPT_GO, info_req("foo"))
                            + opt(OPT_STRUCTURED)))
    assert [(o, t) for o, t, _ in out] == [(OPT_LIST, REP_ERR_TLS_REQD),
                                           (OPT_GO, REP_ERR_TLS_REQD),
                                           (OPT_STRUCTURED, REP_ERR_TLS_REQD)]
    assert not h.done and not h.closed and not h.starttls


def test_tls_export_name_before_starttls_closes() -> None:
    h = tls_hs()
    assert h.receive(opt(OPT_EXPORT_NAME, b"foo")) == b""
    assert h.closed and not h.done


def test_tls_abort_before_starttls() -> None:
    h = tls_hs()
    assert replies(h.receive(opt(OPT_ABORT))) == [(OPT_ABORT, REP_ACK, b"")]
    assert h.closed


def test_starttls_then_negotiation_restarts() -> None:
    h = tls_hs()
    # the client's first TLS bytes may already follow the option
    out = replies(h.receive(opt(OPT_STRUCTURED) + opt(OPT_STARTTLS) + b"\x16\x03"))
    assert [t for _, t, _ in out] == [REP_ERR_TLS_REQD, REP_ACK]
    assert h.starttls and h.leftover == b"\x16\x03"
    assert h.receive(b"\x01") == b"" and h.leftover == b"\x16\x03\x01"
    h.tls_started()
    assert not h.starttls and h.tls_active and h.leftover == b""
    out = replies(h.receive(opt(OPT_STARTTLS)))
    assert out[0][:2] == (OPT_STARTTLS, REP_ERR_INVALID)
    assert not h.structured  # nothing from before TLS carries over
    out = replies(h.receive(opt(OPT_GO, info_req("bar"))))
    assert out[-1][1] == REP_ACK and h.done and h.result is not None
    assert h.result.export.name == "bar"


def test_starttls_with_data_is_invalid() -> None:
    h = tls_hs()
    out = replies(h.receive(opt(OPT_STARTTLS, b"x")))
    assert out[0][:2] == (OPT_STARTTLS, REP_ERR_INVALID) and not h.starttls


def test_list_with_descriptions() -> None:
    out = replies(hs().receive(opt(OPT_LIST)))
    assert out[0] == (OPT_LIST, REP_SERVER, s32("foo") + b"the foo disk")
    assert out[1] == (OPT_LIST, REP_SERVER, s32("bar"))
    assert out[2] == (OPT_LIST, REP_ACK, b"")


def test_list_with_data_is_invalid() -> None:
    out = replies(hs().receive(opt(OPT_LIST, b"x")))
    assert [r[1] for r in out] == [REP_ERR_INVALID]


def test_abort_acks_and_closes() -> None:
    h = hs()
    out = replies(h.receive(opt(OPT_ABORT)))
    assert out == [(OPT_ABORT, REP_ACK, b"")]
    assert h.closed and not h.done


def test_export_name_no_zeroes() -> None:
    h = hs(flags=3)
    out = h.receive(opt(OPT_EXPORT_NAME, b"bar"))
    assert out == struct.pack(">QH", 4096, 0x3)
    assert h.done and h.result is not None and h.result.export is BAR


def test_export_name_with_zero_padding() -> None:
    h = hs(flags=1)
    out = h.receive(opt(OPT_EXPORT_NAME, b"foo"))
    assert out == struct.pack(">QH", 1 << 20, 0x5) + bytes(124)


def test_export_name_empty_selects_default() -> None:
    h = hs()
    h.receive(opt(OPT_EXPORT_NAME, b""))
    assert h.done and h.result is not None and h.result.export is FOO


def test_export_name_unknown_closes() -> None:
    h = hs()
    assert h.receive(opt(OPT_EXPORT_NAME, b"nope")) == b""
    assert h.closed and not h.done


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_info_go_replies(option: int) -> None:
    h = hs()
    out = replies(h.receive(opt(option, info_req("foo", 1, 2, 3))))
    types = [r[1] for r in out]
    assert types == [REP_INFO] * 4 + [REP_ACK]
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2][2:] for r in out[:-1]}
    assert infos[0] == struct.pack(">QH", 1 << 20, 0x5)
    assert infos[1] == b"foo"
    assert infos[2] == b"the foo disk"
    assert infos[3] == struct.pack(">III", 1, 4096, 32 << 20)
    # NBD_INFO_EXPORT comes first
    assert struct.unpack(">H", out[0][2][:2])[0] == 0
    assert h.done is (option == OPT_GO)


def test_info_without_requests_still_sends_export() -> None:
    out = replies(hs().receive(opt(OPT_INFO, info_req("bar"))))
    infos = [struct.unpack(">H", r[2][:2])[0] for r in out if r[1] == REP_INFO]
    assert infos[0] == 0 and 1 not in infos and 2 not in infos


def test_go_unknown_export() -> None:
    h = hs()
    out = replies(h.receive(opt(OPT_GO, info_req("nope"))))
    assert out[0][1] == REP_ERR_UNKNOWN
    assert not h.done and not h.closed


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\5ab", info_req("foo", 1)[:-1],
                                     info_req("foo") + b"x"])
def test_go_malformed_is_invalid(payload: bytes) -> None:
    h = hs()
    out = replies(h.receive(opt(OPT_GO, payload)))
    assert [r[1] for r in out] == [REP_ERR_INVALID]
    assert not h.done


def test_leftover_after_go_is_kept() -> None:
    h = hs()
    h.receive(opt(OPT_GO, info_req("foo")) + b"REQUEST")
    assert h.done and h.leftover == b"REQUEST"


def test_byte_by_byte_feeding() -> None:
    h = ServerHandshake([FOO])
    h.start()
    stream = struct.pack(">I", 3) + opt(OPT_STRUCTURED) + opt(OPT_GO, info_req("foo", 3))
    out = b"".join(h.receive(stream[i : i + 1]) for i in range(len(stream)))
    assert [r[1] for r in replies(out)] == [REP_ACK, REP_INFO, REP_INFO, REP_ACK]
    assert h.done and h.result is not None and h.result.structured


def test_structured_reply() -> None:
    h = hs()
    assert replies(h.receive(opt(OPT_STRUCTURED))) == [(OPT_STRUCTURED, REP_ACK, b"")]
    assert replies(h.receive(opt(OPT_STRUCTURED, b"x")))[0][1] == REP_ERR_INVALID
    h.receive(opt(OPT_GO, info_req("")))
    assert h.result is not None and h.result.structured and not h.result.extended


def test_no_structured_by_default() -> None:
    h = hs()
    h.receive(opt(OPT_GO, info_req("")))
    assert h.result is not None and not h.result.structured


def test_list_meta_context_all_and_namespaces() -> None:
    h = hs()
    out = replies(h.receive(opt(OPT_LIST_META, meta_req("foo"))))
    names = [r[2][4:] for r in out if r[1] == REP_META]
    assert names == [b"base:allocation", b"qemu:allocation-depth"]
    out = replies(h.receive(opt(OPT_LIST_META, meta_req("foo", "qemu:"))))
    assert [r[2][4:] for r in out if r[1] == REP_META] == [b"qemu:allocation-depth"]
    out = replies(h.receive(opt(OPT_LIST_META, meta_req("bar", "qemu:", "x:y"))))
    assert [r[1] for r in out] == [REP_ACK]  # bar has no qemu contexts


def test_set_meta_context_needs_structured() -> None:
    out = replies(hs().receive(opt(OPT_SET_META, meta_req("foo", "base:allocation"))))
    assert [r[1] for r in out] == [REP_ERR_INVALID]


def test_set_meta_context_selects_and_go_keeps_it() -> None:
    h = hs()
    h.receive(opt(OPT_STRUCTURED))
    out = replies(h.receive(opt(OPT_SET_META, meta_req(
        "foo", "qemu:allocation-depth", "base:allocation", "unknown:thing", "base:"))))
    metas = [(struct.unpack(">I", r[2][:4])[0], r[2][4:]) for r in out if r[1] == REP_META]
    assert [m[1] for m in metas] == [b"qemu:allocation-depth", b"base:allocation"]
    assert len({m[0] for m in metas}) == 2
    assert out[-1][1] == REP_ACK
    h.receive(opt(OPT_GO, info_req("foo")))
    assert h.result is not None
    assert h.result.contexts == {m[0]: m[1].decode() for m in metas}


def test_go_to_other_export_drops_contexts() -> None:
    h = hs()
    h.receive(opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_req("foo", "base:allocation")))
    h.receive(opt(OPT_GO, info_req("bar")))
    assert h.result is not None and h.result.contexts == {}


def test_set_meta_context_unknown_export() -> None:
    h = hs()
    h.receive(opt(OPT_STRUCTURED))
    out = replies(h.receive(opt(OPT_SET_META, meta_req("nope", "base:allocation"))))
    assert [r[1] for r in out] == [REP_ERR_UNKNOWN]


def test_meta_context_malformed() -> None:
    h = hs()
    h.receive(opt(OPT_STRUCTURED))
    bad = meta_req("foo", "base:allocation")[:-3]
    assert [r[1] for r in replies(h.receive(opt(OPT_LIST_META, bad)))] == [REP_ERR_INVALID]


def test_extended_headers() -> None:
    h = hs()
    assert replies(h.receive(opt(OPT_EXT)))[0][1] == REP_ACK
    # structured replies are implied; asking for them again is invalid
    assert replies(h.receive(opt(OPT_STRUCTURED)))[0][1] == REP_ERR_INVALID
    h.receive(opt(OPT_GO, info_req("foo")))
    assert h.result is not None and h.result.extended and h.result.structured


def test_extended_headers_can_be_refused() -> None:
    h = ServerHandshake([FOO], allow_extended=False)
    h.start()
    h.receive(struct.pack(">I", 3))
    assert replies(h.receive(opt(OPT_EXT)))[0][1] == REP_ERR_UNSUP


def test_huge_option_is_skipped_not_buffered() -> None:
    h = hs()
    n = OPTION_BUFFER_LIMIT + 10
    out = h.receive(struct.pack(">QII", IHAVEOPT, 99, n))
    assert out == b""
    chunk = bytes(65536)
    sent = 0
    while sent + len(chunk) <= n:
        assert h.receive(chunk) == b""
        sent += len(chunk)
        assert len(h._buf) < 2 * len(chunk)
    out = replies(h.receive(bytes(n - sent) + opt(OPT_LIST)))
    assert out[0][1] == REP_ERR_UNSUP
    assert out[-1][1] == REP_ACK


def test_absurd_option_length_closes() -> None:
    h = hs()
    h.receive(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFFF))
    assert h.closed


def test_meta_context_set_for_default_name_survives_go_by_name() -> None:
    h = hs()
    h.receive(opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_req("", "base:allocation")))
    h.receive(opt(OPT_GO, info_req("foo")))  # "" is foo, the default export
    assert h.result is not None and list(h.result.contexts.values()) == ["base:allocation"]


# --- peer-suite expectations (libnbd interop-qemu-block-size.sh, spec on SEND_DF) -------
SECTORED = ExportInfo("s", 1 << 20, 0x1 | 0x4 | 0x80, min_block=512)
REP_ERR_BLOCK_SIZE_REQD = ERR + 8


def _block_size(out: list[tuple[int, int, bytes]]) -> tuple[int, int, int]:
    for _, rtype, payload in out:
        if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 3:
            return struct.unpack(">III", payload[2:])
    raise AssertionError("no NBD_INFO_BLOCK_SIZE")


def test_info_without_block_size_request_on_sector_export_is_refused() -> None:
    h = hs(exports=(SECTORED,))
    out = replies(h.receive(opt(OPT_INFO, info_req("s"))))
    assert out[-1][1] == REP_ERR_BLOCK_SIZE_REQD
    assert _block_size(out)[0] == 512  # the constraint is sent first (the spec's SHOULD)
    out = replies(h.receive(opt(OPT_INFO, info_req("s", 3))))
    assert out[-1][1] == REP_ACK and _block_size(out)[0] == 512


def test_go_without_block_size_request_gets_minimum_one() -> None:
    h = hs(exports=(SECTORED,))
    out = replies(h.receive(opt(OPT_GO, info_req("s"))))
    assert out[-1][1] == REP_ACK and _block_size(out) == (1, 4096, 32 << 20)
    h = hs(exports=(SECTORED,))
    out = replies(h.receive(opt(OPT_GO, info_req("s", 3))))
    assert _block_size(out)[0] == 512


def test_info_without_request_on_byte_export_is_answered() -> None:
    out = replies(hs().receive(opt(OPT_INFO, info_req("foo"))))
    assert out[-1][1] == REP_ACK and _block_size(out)[0] == 1


def _export_flags(out: list[tuple[int, int, bytes]]) -> int:
    for _, rtype, payload in out:
        if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
            return int(struct.unpack(">QH", payload[2:])[1])
    raise AssertionError("no NBD_INFO_EXPORT")


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_send_df_only_after_structured_replies(option: int) -> None:
    h = hs(exports=(SECTORED,))
    assert not _export_flags(replies(h.receive(opt(option, info_req("s", 3))))) & 0x80
    h = hs(exports=(SECTORED,))
    h.receive(opt(OPT_STRUCTURED))
    assert _export_flags(replies(h.receive(opt(option, info_req("s", 3))))) & 0x80


def test_send_df_with_export_name() -> None:
    h = hs(exports=(SECTORED,))
    assert h.receive(opt(OPT_EXPORT_NAME, b"s")) == struct.pack(">QH", 1 << 20, 0x5)
    h = hs(exports=(SECTORED,))
    h.receive(opt(OPT_STRUCTURED))
    assert h.receive(opt(OPT_EXPORT_NAME, b"s"))[-2:] == struct.pack(">H", 0x85)
