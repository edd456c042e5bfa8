"""Pure-function tests of the NBD protocol: handshake state machine, request checks, encoders,
plus hypothesis fuzzing with garbage (only ProtocolError may come out, never a crash)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userdm.nbd import constants as C
from userdm.nbd.handshake import (ExportInfo, Refused, ServerHandshake, client_flags, decode_info, encode_go,
                                  encode_meta_context, encode_option)
from userdm.nbd.protocol import (Export, ProtocolError, RequestParser, block_status_chunk, clip_extents,
                                 data_chunk_header, decode_block_status_payload, decode_error_payload,
                                 decode_reply_header, encode_request, error_chunk, simple_reply)


class Catalog:
    """A fake export catalog: two exports, one read-only."""

    def __init__(self) -> None:
        self.exports = {"vol0": ExportInfo("vol0", 1 << 20, False),
                        "ro": ExportInfo("ro", 4096, True)}
        self.selected: list[str] = []

    def names(self) -> list[str]:
        return sorted(self.exports)

    def info(self, name: str) -> ExportInfo:
        if name not in self.exports:
            raise Refused(C.REP_ERR_UNKNOWN, f"no export {name}")
        return self.exports[name]

    def select(self, name: str) -> ExportInfo:
        info = self.info(name)
        self.selected.append(name)
        return info


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == C.OPT_REPLY_MAGIC
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def started(flags: int = C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES) -> ServerHandshake:
    hs = ServerHandshake(Catalog())
    assert hs.receive_data(struct.pack(">I", flags)) == b""
    return hs


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    hs = ServerHandshake(Catalog())
    assert hs.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)


def test_unknown_client_flags_are_a_protocol_error():
    hs = ServerHandshake(Catalog())
    with pytest.raises(ProtocolError):
        hs.receive_data(struct.pack(">I", 1 << 5))
    assert hs.state == "closed"


def test_options_answer_the_same_whatever_the_receives_cut():
    """The bytes of a whole negotiation (client flags, INFO, metadata contexts, GO, then an
    early transmission request) give the same replies and the same leftover bytes whether
    they come in one receive or a byte at a time."""
    flags = struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES)
    stream = (flags + encode_option(C.OPT_STRUCTURED_REPLY)
              + encode_go("vol0", (C.INFO_BLOCK_SIZE, C.INFO_NAME, C.INFO_DESCRIPTION), opt=C.OPT_INFO)
              + encode_meta_context("vol0", ["base:"], opt=C.OPT_LIST_META_CONTEXT)
              + encode_go("nope", opt=C.OPT_INFO) + encode_meta_context("vol0", [C.BASE_ALLOCATION])
              + encode_go("vol0"))
    early = b"early transmission bytes"
    whole = ServerHandshake(Catalog())
    at_once = whole.receive_data(stream + early)
    bytewise = ServerHandshake(Catalog())
    pieces = b"".join(bytewise.receive_data(stream[i:i + 1]) for i in range(len(stream)))
    assert bytewise.state == whole.state == "transmission"
    assert bytewise.receive_data(early) == b""
    assert pieces == at_once and bytewise.unused_data() == whole.unused_data() == early
    r = replies(at_once)
    assert [t for _, t, _ in r] == [
        C.REP_ACK,                                            # STRUCTURED_REPLY
        C.REP_INFO, C.REP_INFO, C.REP_INFO, C.REP_ACK,        # INFO: export, name, block size
        C.REP_META_CONTEXT, C.REP_ACK,                        # LIST_META_CONTEXT
        C.REP_ERR_UNKNOWN,                                    # INFO of an unknown export
        C.REP_META_CONTEXT, C.REP_ACK,                        # SET_META_CONTEXT
        C.REP_INFO, C.REP_INFO, C.REP_ACK]                    # GO: export, block size
    assert r[3][2] == struct.pack(">HIII", C.INFO_BLOCK_SIZE, 512, C.PREFERRED_BLOCK, C.MAX_PAYLOAD)
    assert whole.export().meta_context == 1


def test_list_and_unknown_option_keep_sync():
    hs = started()
    out = hs.receive_data(encode_option(99, b"junk") + encode_option(C.OPT_LIST))
    r = replies(out)
    assert r[0][:2] == (99, C.REP_ERR_UNSUP)
    assert [(t, p[4:]) for _, t, p in r[1:]] == [(C.REP_SERVER, b"ro"), (C.REP_SERVER, b"vol0"), (C.REP_ACK, b"")]
    assert hs.state == "options"


def test_list_with_data_is_invalid():
    assert replies(started().receive_data(encode_option(C.OPT_LIST, b"x")))[0][1] == C.REP_ERR_INVALID


def test_starttls_without_tls_is_refused_by_policy():
    """NOTLS mode (--tls=off): NBD_REP_ERR_POLICY, as nbdkit built with TLS answers; the
    negotiation goes on in plaintext."""
    hs = started()
    assert replies(hs.receive_data(encode_option(C.OPT_STARTTLS)))[0][1] == C.REP_ERR_POLICY
    assert hs.state == "options"


def test_info_unknown_export_then_go():
    hs = started()
    r = replies(hs.receive_data(encode_go("nope", opt=C.OPT_INFO)))
    assert r == [(C.OPT_INFO, C.REP_ERR_UNKNOWN, b"no export nope")]
    r = replies(hs.receive_data(encode_go("vol0", (C.INFO_BLOCK_SIZE, C.INFO_NAME))))
    assert [t for _, t, _ in r] == [C.REP_INFO, C.REP_INFO, C.REP_INFO, C.REP_ACK]
    info: dict[str, int] = {}
    for _, t, p in r[:-1]:
        decode_info(p, info)
    assert info["size"] == 1 << 20
    assert info["flags"] & C.TFLAG_HAS_FLAGS and not info["flags"] & C.TFLAG_READ_ONLY
    assert info["flags"] & C.TFLAG_CAN_MULTI_CONN
    assert (info["min_block"], info["preferred_block"], info["max_payload"]) == (512, 4096, C.MAX_PAYLOAD)
    assert r[1][2] == struct.pack(">H", C.INFO_NAME) + b"vol0"
    assert hs.state == "transmission" and hs.catalog.selected == ["vol0"]


def test_go_read_only_export_flags():
    hs = started()
    info: dict[str, int] = {}
    decode_info(replies(hs.receive_data(encode_go("ro")))[0][2], info)
    assert info["flags"] & C.TFLAG_READ_ONLY
    assert not info["flags"] & (C.TFLAG_SEND_TRIM | C.TFLAG_SEND_WRITE_ZEROES | C.TFLAG_SEND_FUA)
    assert hs.export().read_only


def test_malformed_go_is_invalid_and_negotiation_continues():
    hs = started()
    bad = encode_option(C.OPT_GO, struct.pack(">I", 100) + b"vol0")
    assert replies(hs.receive_data(bad))[0][1] == C.REP_ERR_INVALID
    assert replies(hs.receive_data(encode_go("vol0")))[-1][1] == C.REP_ACK


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    hs = started(C.FLAG_C_FIXED_NEWSTYLE | (C.FLAG_C_NO_ZEROES if no_zeroes else 0))
    out = hs.receive_data(encode_option(C.OPT_EXPORT_NAME, b"vol0"))
    assert len(out) == (10 if no_zeroes else 134)
    size, flags = struct.unpack_from(">QH", out)
    assert size == 1 << 20 and flags & C.TFLAG_HAS_FLAGS
    assert hs.state == "transmission"


def test_export_name_refused_hangs_up():
    hs = started()
    assert hs.receive_data(encode_option(C.OPT_EXPORT_NAME, b"nope")) == b""
    assert hs.state == "closed"


def test_abort():
    hs = started()
    assert replies(hs.receive_data(encode_option(C.OPT_ABORT))) == [(C.OPT_ABORT, C.REP_ACK, b"")]
    assert hs.state == "closed"


def test_meta_context_needs_structured_replies():
    hs = started()
    r = replies(hs.receive_data(encode_meta_context("vol0", [C.BASE_ALLOCATION])))
    assert r[0][1] == C.REP_ERR_INVALID


def test_structured_reply_and_base_allocation():
    hs = started()
    assert replies(hs.receive_data(encode_option(C.OPT_STRUCTURED_REPLY)))[0][1] == C.REP_ACK
    r = replies(hs.receive_data(encode_meta_context("vol0", ["base:"], C.OPT_LIST_META_CONTEXT)))
    assert r[0][1] == C.REP_META_CONTEXT and r[0][2][4:] == b"base:allocation" and r[-1][1] == C.REP_ACK
    r = replies(hs.receive_data(encode_meta_context("vol0", ["qemu:dirty-bitmap:x", C.BASE_ALLOCATION])))
    assert r[0][1] == C.REP_META_CONTEXT and struct.unpack_from(">I", r[0][2])[0] == 1
    hs.receive_data(encode_go("vol0"))
    exp = hs.export()
    assert exp.structured and exp.meta_context == 1


def test_meta_context_for_another_export_is_dropped_at_go():
    hs = started()
    hs.receive_data(encode_option(C.OPT_STRUCTURED_REPLY))
    hs.receive_data(encode_meta_context("ro", [C.BASE_ALLOCATION]))
    hs.receive_data(encode_go("vol0"))
    assert hs.export().meta_context == 0


def test_bytes_after_go_are_kept_for_transmission():
    hs = started()
    req = encode_request(C.CMD_READ, 7, 0, 512)
    hs.receive_data(encode_go("vol0") + req)
    assert hs.unused_data() == req


def test_option_byte_by_byte():
    hs = ServerHandshake(Catalog())
    out = b""
    for b in struct.pack(">I", 1) + encode_option(C.OPT_LIST):
        out += hs.receive_data(bytes([b]))
    assert replies(out)[-1][1] == C.REP_ACK


def test_huge_option_is_a_protocol_error():
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, 1 << 30))


def test_client_flags_require_fixed_newstyle():
    assert client_flags(3) == 3 and client_flags(1) == 1
    with pytest.raises(ProtocolError):
        client_flags(0)


# ---- transmission checks ----------------------------------------------------------------

SIZE = 1 << 20


@pytest.mark.parametrize("flags,cmd,offset,length,ro,meta,want", [
    (0, C.CMD_READ, 0, 4096, False, 0, 0),
    (0, C.CMD_READ, SIZE - 512, 1024, False, 0, C.NBD_EINVAL),
    (0, C.CMD_READ, 0, C.MAX_PAYLOAD + 512, False, 0, C.NBD_EINVAL),
    (0, C.CMD_READ, 0, 0, False, 0, C.NBD_EINVAL),
    (0, C.CMD_READ, 1, 512, False, 0, C.NBD_EINVAL),           # misaligned
    (0, C.CMD_WRITE, 0, 512, True, 0, C.NBD_EPERM),
    (0, C.CMD_TRIM, 0, 512, True, 0, C.NBD_EPERM),
    (0, C.CMD_WRITE, SIZE, 512, False, 0, C.NBD_ENOSPC),
    (C.CMD_FLAG_FUA, C.CMD_WRITE, 0, 512, False, 0, 0),
    (C.CMD_FLAG_NO_HOLE, C.CMD_WRITE_ZEROES, 0, 512, False, 0, 0),
    (C.CMD_FLAG_FAST_ZERO, C.CMD_WRITE_ZEROES, 0, 512, False, 0, C.NBD_ENOTSUP),
    (C.CMD_FLAG_NO_HOLE, C.CMD_READ, 0, 512, False, 0, C.NBD_EINVAL),   # flag not for READ
    (1 << 9, C.CMD_READ, 0, 512, False, 0, C.NBD_EINVAL),               # unknown flag
    (0, 42, 0, 512, False, 0, C.NBD_EINVAL),                              # unknown command
    (0, C.CMD_FLUSH, 0, 0, False, 0, 0),
    (0, C.CMD_FLUSH, 0, 512, False, 0, C.NBD_EINVAL),
    (0, C.CMD_BLOCK_STATUS, 0, 512, False, 0, C.NBD_EINVAL),            # no context
    (C.CMD_FLAG_REQ_ONE, C.CMD_BLOCK_STATUS, 0, 512, False, 1, 0),
    (0, C.CMD_BLOCK_STATUS, SIZE, 512, False, 1, C.NBD_EINVAL),
    (0, C.CMD_CACHE, 0, 512, False, 0, 0),
])
def test_check(flags, cmd, offset, length, ro, meta, want):
    exp = Export("vol0", SIZE, ro, structured=True, meta_context=meta, min_block=512)
    assert exp.check(flags, cmd, offset, length, SIZE) == want


def test_request_parser_write_and_disc():
    p = RequestParser()
    p.receive_data(encode_request(C.CMD_WRITE, 1, 512, 4, C.CMD_FLAG_FUA) + b"ab")
    assert p.next_request() is None
    p.receive_data(b"cd" + encode_request(C.CMD_DISC, 2))
    r = p.next_request()
    assert (r.cmd, r.cookie, r.offset, r.length, r.flags, r.payload) == (C.CMD_WRITE, 1, 512, 4, 1, b"abcd")
    assert p.next_request().cmd == C.CMD_DISC and p.closed


def test_request_parser_rejects_bad_magic_and_oversize_write():
    p = RequestParser()
    p.receive_data(b"\0" * 28)
    with pytest.raises(ProtocolError):
        p.next_request()
    p = RequestParser()
    p.receive_data(encode_request(C.CMD_WRITE, 1, 0, C.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        p.next_request()


def test_replies_round_trip():
    assert decode_reply_header(simple_reply(9, C.NBD_EIO)) == (False, 9, C.NBD_EIO, 1, 0, 0)
    h = decode_reply_header(data_chunk_header(5, 4096, 512))
    assert h.structured and h.cookie == 5 and h.type == C.REPLY_TYPE_OFFSET_DATA and h.length == 520
    chunk = error_chunk(3, C.NBD_EPERM, "read-only")
    h = decode_reply_header(chunk)
    assert h.type == C.REPLY_TYPE_ERROR and h.flags & C.REPLY_FLAG_DONE
    assert decode_error_payload(chunk[20:]) == (C.NBD_EPERM, "read-only")
    chunk = block_status_chunk(4, 1, [(4096, 3), (512, 0)])
    assert decode_block_status_payload(chunk[20:]) == (1, [(4096, 3), (512, 0)])


def test_clip_extents():
    assert clip_extents([(100, 0), (100, 0), (1000, 7)], 150, False) == [(150, 0)]
    assert clip_extents([(100, 3), (100, 0)], 1000, True) == [(100, 3)]
    assert clip_extents([], 512, False) == [(512, 0)]
    assert clip_extents([(100, 3), (50, 1)], 1000, False) == [(100, 3), (50, 1)]


def test_errno_mapping():
    assert C.errno_to_wire(errno.EACCES) == C.NBD_EPERM
    assert C.errno_to_wire(errno.EDQUOT) == C.NBD_ENOSPC
    assert C.errno_to_wire(errno.ENXIO) == C.NBD_ESHUTDOWN
    assert C.errno_to_wire(errno.EBUSY) == C.NBD_EIO
    assert C.wire_to_errno(C.NBD_ESHUTDOWN) == errno.ESHUTDOWN
    assert C.wire_to_errno(1234) == errno.EIO


# ---- fuzzing ----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_handshake_garbage(chunks):
    hs = ServerHandshake(Catalog())
    try:
        for chunk in chunks:
            out = hs.receive_data(chunk)
            assert isinstance(out, bytes)
    except ProtocolError:
        assert hs.state == "closed"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=64)), max_size=6))
def test_fuzz_options_stay_in_sync(options):
    """Well-framed options with garbage payloads: every non-EXPORT_NAME option gets a reply."""
    hs = started()
    for opt, payload in options:
        if hs.done:
            break
        out = hs.receive_data(encode_option(opt, payload))
        if opt != C.OPT_EXPORT_NAME:
            assert replies(out)[-1][0] == opt


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_request_parser(data):
    p = RequestParser(max_payload=1024)
    p.receive_data(data)
    try:
        while (r := p.next_request()) is not None:
            Export("x", SIZE, False, structured=True, meta_context=1, min_block=512).check(
                r.flags, r.cmd, r.offset, r.length, SIZE)
    except ProtocolError:
        pass
