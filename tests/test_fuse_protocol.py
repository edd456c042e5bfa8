"""The FUSE wire protocol module with plain byte strings, the request answers of
`DeviceOperations` without a kernel, and hypothesis fuzzing: garbage gives ProtocolError
(or an ENOSYS/errno reply), never a crash."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userdm import Mapper
from userdm.export.fuse import protocol as P
from userdm.export.fuse.files import DeviceFiles
from userdm.export.fuse.ops import MAX_WRITE, REPLY_BUFFER, WANT, DeviceOperations

MiB = 1 << 20


def header(opcode: int, body: bytes, unique: int = 7, nodeid: int = 1, extlen: int = 0) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 1234, extlen, 0) + body


# ---- decoding ---------------------------------------------------------------------------------

def test_init_is_decoded_with_its_second_flag_word():
    body = struct.pack("<IIIII44x", 7, 44, 131072, P.INIT_EXT | P.ASYNC_DIO, 1 << 5)
    req = P.decode(header(P.INIT, body))
    assert (req.opcode, req.unique, req.pid) == (P.INIT, 7, 1234)
    assert req.args == P.InitIn(7, 44, 131072, P.INIT_EXT | P.ASYNC_DIO | (1 << 37))


def test_lookup_name_stops_at_its_nul_and_must_have_one():
    assert P.decode(header(P.LOOKUP, b"vol1\0")).args == P.Name(b"vol1")
    with pytest.raises(P.ProtocolError, match="NUL"):
        P.decode(header(P.LOOKUP, b"vol1"))


def test_a_literal_read_request():
    msg = bytes.fromhex(
        "50000000" "0f000000" "0900000000000000" "0200000000000000" "00000000" "00000000" "01000000"
        "0000" "0000"                                           # in header: 80 bytes, READ, unique 9
        "0300000000000000" "0010000000000000" "00100000" "00000000" "0000000000000000" "00000000"
        "00000000")                                             # fh 3, offset 4096, size 4096
    req = P.decode(msg)
    assert (req.opcode, req.unique, req.nodeid) == (P.READ, 9, 2)
    assert req.args == P.ReadIn(3, 4096, 4096, 0)


def test_write_data_is_a_view_of_the_message_and_must_match_its_size():
    msg = bytearray(header(P.WRITE, P.WRITE_IN.pack(5, 512, 4, 0, 0, 0, 0) + b"data"))
    req = P.decode(msg)
    assert req.args.fh == 5 and req.args.offset == 512 and bytes(req.args.data) == b"data"
    msg[-1:] = b"!"
    assert bytes(req.args.data) == b"dat!"          # no copy
    with pytest.raises(P.ProtocolError, match="carries"):
        P.decode(header(P.WRITE, P.WRITE_IN.pack(5, 512, 8, 0, 0, 0, 0) + b"data"))


def test_truncated_and_inconsistent_messages_are_protocol_errors():
    with pytest.raises(P.ProtocolError, match="shorter than"):
        P.decode(b"\x28\0\0\0")
    with pytest.raises(P.ProtocolError, match="header says 48"):
        P.decode(header(P.FORGET, bytes(8))[:-1])          # 47 bytes while the header says 48
    bad_len = bytearray(header(P.GETATTR, bytes(16)))
    bad_len[0] = 99
    with pytest.raises(P.ProtocolError, match="header says 99"):
        P.decode(bad_len)
    with pytest.raises(P.ProtocolError, match="16-byte arguments"):
        P.decode(header(P.GETATTR, bytes(8)))
    with pytest.raises(P.ProtocolError, match="BATCH_FORGET of 3"):
        P.decode(header(P.BATCH_FORGET, struct.pack("<II", 3, 0) + bytes(16)))
    with pytest.raises(P.ProtocolError, match="extensions"):
        P.decode(header(P.STATFS, b"", extlen=1))


def test_extensions_after_the_arguments_are_not_part_of_them():
    # an OPEN with 16 bytes of extensions (e.g. supplementary groups) after fuse_open_in
    req = P.decode(header(P.OPEN, P.OPEN_IN.pack(2, 0) + bytes(16), extlen=2))
    assert req.args == P.OpenIn(2, 0)


def test_batch_forget_and_unknown_opcodes():
    body = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 5, 1, 6, 2)
    assert P.decode(header(P.BATCH_FORGET, body)).args == P.BatchForget(((5, 1), (6, 2)))
    req = P.decode(header(9999, b"anything"))
    assert req.args is None and req.name == "opcode 9999"


# ---- replies ----------------------------------------------------------------------------------

def test_reply_bytes():
    assert P.reply_error(7, errno.ENOENT) == bytes.fromhex("10000000" "feffffff" "0700000000000000")
    assert P.reply(8, P.write_out(4096)) == bytes.fromhex("18000000" "00000000" "0800000000000000"
                                                         "00100000" "00000000")
    assert P.reply_error(1, 0) == P.reply_error(1, errno.EIO)       # never a "successful" error
    assert P.notify_inval_inode(5) == bytes.fromhex("28000000" "02000000" "0000000000000000"
                                                    "0500000000000000" "ffffffffffffffff" "0000000000000000")


def test_init_reply_takes_the_lower_minor_and_only_offered_flags():
    offered = P.InitIn(7, 44, 65536, P.ASYNC_DIO | P.BIG_WRITES | P.INIT_EXT)
    out = P.init_out(offered, want=WANT, max_write=MAX_WRITE, max_pages=256, max_background=128,
                     congestion_threshold=96)
    major, minor, readahead, flags, bg, cong, max_write, gran, pages, _, flags2, depth = P.INIT_OUT.unpack(out)
    assert (major, minor, readahead) == (7, P.MINOR_VERSION, 65536)
    assert flags == P.ASYNC_DIO | P.BIG_WRITES and flags2 == 0     # MAX_PAGES was not offered
    assert depth == 0
    assert (bg, cong, max_write, gran, pages) == (128, 96, MAX_WRITE, 1, 256)
    old = P.InitIn(7, 31, 0, P.MAX_PAGES)
    assert P.INIT_OUT.unpack(P.init_out(old, want=WANT, max_write=MAX_WRITE, max_pages=256,
                                        max_background=1, congestion_threshold=1))[1] == 31


def test_dirents_are_aligned_and_resume_at_their_offset():
    entries = [(b".", 1, 4), (b"..", 1, 4), (b"a-long-device-name", 2, 8)]
    out = P.dirents(entries, 0, 4096)
    assert len(out) == 32 + 32 + 48                         # 24-byte records + names, 8-aligned
    ino, off, namelen, dtype = P.DIRENT.unpack_from(out, 64)
    assert (ino, off, namelen, dtype) == (2, 3, 18, 8) and out[88:106] == b"a-long-device-name"
    assert P.dirents(entries, 2, 4096) == out[64:]
    assert P.dirents(entries, 0, 70) == out[:64]           # only whole records that fit
    assert P.dirents(entries, 3, 4096) == b""
    plus = P.direntplus([(b".", None, 4)], 0, 4096)
    assert len(plus) == 128 + 32 and P.ENTRY_OUT.unpack_from(plus)[0] == 0   # nodeid 0: skipped


# ---- DeviceOperations without a kernel --------------------------------------------------------

@pytest.fixture
def ops(tmp_path):
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(MiB))
    m = Mapper()
    m.create("dev", f"0 {MiB // 512} linear {backing} 0")
    try:
        yield DeviceOperations(DeviceFiles(m))
    finally:
        m.close()


def answer(ops: DeviceOperations, msg: bytes) -> bytes | None:
    buf = memoryview(bytearray(REPLY_BUFFER))
    _, out = ops.serve(memoryview(msg), buf)
    return None if out is None else bytes(out)


def test_requests_answered_from_the_device_files(ops):
    entry = answer(ops, header(P.LOOKUP, b"dev\0", unique=1))
    length, error, unique = P.OUT_HEADER.unpack_from(entry)
    assert (length, error, unique) == (16 + 128, 0, 1)
    ino = P.ENTRY_OUT.unpack_from(entry, 16)[0]
    size = P.ATTR.unpack_from(entry, 16 + 40)[1]
    assert ino > 1 and size == MiB
    assert P.OUT_HEADER.unpack_from(answer(ops, header(P.LOOKUP, b"nope\0", unique=2)))[1] == -errno.ENOENT

    opened = answer(ops, header(P.OPEN, P.OPEN_IN.pack(2, 0), unique=3, nodeid=ino))
    fh, flags, _ = P.OPEN_OUT.unpack_from(opened, 16)
    assert flags & P.FOPEN_DIRECT_IO
    written = answer(ops, header(P.WRITE, P.WRITE_IN.pack(fh, 4096, 5, 0, 0, 0, 0) + b"hello", unique=4))
    assert written == P.reply(4, P.write_out(5))
    read = answer(ops, header(P.READ, P.READ_IN.pack(fh, 4096, 8, 0, 0, 0, 0), unique=5))
    assert read == P.reply(5, b"hello\0\0\0")
    past = answer(ops, header(P.READ, P.READ_IN.pack(fh, MiB, 8, 0, 0, 0, 0), unique=6))
    assert past == P.reply(6)                                            # EOF: no data
    size = answer(ops, header(P.SETATTR, P.SETATTR_IN.pack(P.FATTR_SIZE, 0, 0, 512, *([0] * 12)),
                              unique=7, nodeid=ino))
    assert P.OUT_HEADER.unpack_from(size)[1] == -errno.EINVAL           # a device's size is its table's
    assert answer(ops, header(P.RELEASE, P.RELEASE_IN.pack(fh, 0, 0, 0), unique=8)) == P.reply(8)
    gone = answer(ops, header(P.READ, P.READ_IN.pack(fh, 0, 8, 0, 0, 0, 0), unique=9))
    assert gone == P.reply_error(9, errno.EBADF)


def test_unknown_and_no_reply_requests(ops):
    assert answer(ops, header(9999, b"x" * 13, unique=3)) == P.reply_error(3, errno.ENOSYS)
    assert answer(ops, header(P.INTERRUPT, struct.pack("<Q", 3), unique=4)) is None
    assert ops.interrupts == 1
    assert answer(ops, header(P.FORGET, struct.pack("<Q", 1), unique=5, nodeid=2)) is None
    assert answer(ops, header(P.INIT, struct.pack("<IIII", 8, 0, 0, 0), unique=6))[:16] == \
        P.OUT_HEADER.pack(16 + 64, 0, 6)                                # a newer major: ours back


# ---- fuzzing ----------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_decodes_or_is_a_protocol_error(data):
    try:
        P.decode(data)
    except P.ProtocolError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([*P.OPCODE_NAMES, 0, 5, 35, 9999]), nodeid=st.integers(0, 5),
       body=st.binary(max_size=200), unique=st.integers(1, 2**64 - 1))
def test_well_framed_garbage_gets_a_reply_for_its_unique_or_none(ops, opcode, nodeid, body, unique):
    msg = header(opcode, body, unique=unique, nodeid=nodeid)
    if opcode == P.DESTROY:
        return
    try:
        out = answer(ops, msg)
    except P.ProtocolError:
        return
    if out is None:
        assert opcode in P.NO_REPLY
        return
    length, error, got = P.OUT_HEADER.unpack_from(out)
    assert length == len(out) and got == unique and -4096 < error <= 0


# ---- FUSE over io_uring entries (`DeviceOperations.serve_entry`) ------------------------------

def ring_answer(ops: DeviceOperations, opcode: int, arg0: bytes, rest: bytes = b"", unique: int = 7,
                nodeid: int = 1, length: int | None = None) -> tuple[int, int, int, bytes]:
    """Lay a request out in a ring entry as the kernel does (in header, the first argument in
    op_in, the others in the payload), serve it; (length, error, unique, reply body)."""
    header = memoryview(bytearray(P.RING_HEADER_SIZE))
    payload = memoryview(bytearray(MAX_WRITE))
    if length is None:
        length = P.IN_HEADER_SIZE + len(arg0) + len(rest)
    P.IN_HEADER.pack_into(header, 0, length, opcode, unique, nodeid, 0, 0, 0, 0, 0)
    header[P.RING_OP_IN:P.RING_OP_IN + len(arg0)] = arg0
    payload[:len(rest)] = rest
    P.RING_ENT.pack_into(header, P.RING_ENT_IN_OUT, 0, unique, len(rest), 0)
    got = ops.serve_entry(header, payload, memoryview(bytearray(REPLY_BUFFER)))
    out_len, error, out_unique = P.OUT_HEADER.unpack_from(header)
    body_len = P.RING_ENT.unpack_from(header, P.RING_ENT_IN_OUT)[2]
    assert got == out_unique
    return out_len, error, out_unique, bytes(payload[:body_len])


def test_ring_entries_are_answered_as_the_device_messages_are(ops):
    """The same requests, laid out in an entry, get the replies `serve` gives: the out header in
    the header buffer, the arguments or data in the payload with its size."""
    _, error, _, entry = ring_answer(ops, P.LOOKUP, b"", b"dev\0", unique=1)
    assert error == 0 and entry == answer(ops, header(P.LOOKUP, b"dev\0", unique=1))[16:]
    ino = P.ENTRY_OUT.unpack_from(entry)[0]
    _, error, _, opened = ring_answer(ops, P.OPEN, P.OPEN_IN.pack(2, 0), unique=3, nodeid=ino)
    fh = P.OPEN_OUT.unpack_from(opened)[0]
    write = P.WRITE_IN.pack(fh, 4096, 5, 0, 0, 0, 0)
    assert ring_answer(ops, P.WRITE, write, b"hello", unique=4) == (24, 0, 4, P.write_out(5))
    read = P.READ_IN.pack(fh, 4096, 8, 0, 0, 0, 0)
    assert ring_answer(ops, P.READ, read, unique=5) == (24, 0, 5, b"hello\0\0\0")
    assert ring_answer(ops, P.READ, P.READ_IN.pack(fh, MiB, 8, 0, 0, 0, 0), unique=6) == (16, 0, 6, b"")
    assert ring_answer(ops, 9999, b"", b"x" * 13, unique=8)[1] == -errno.ENOSYS
    assert ring_answer(ops, P.RELEASE, P.RELEASE_IN.pack(fh, 0, 0, 0), unique=9) == (16, 0, 9, b"")
    assert ring_answer(ops, P.READ, read, unique=10)[1] == -errno.EBADF


def test_malformed_ring_entries_get_an_error_for_their_unique(ops):
    """An entry whose in header disagrees with its payload size (a first argument longer than
    op_in, a length shorter than the header) is answered with EIO: an entry is always committed."""
    assert ring_answer(ops, P.GETATTR, b"", b"", length=P.IN_HEADER_SIZE + 300)[1:3] == (-errno.EIO, 7)
    assert ring_answer(ops, P.GETATTR, b"", b"abc", length=10)[1:3] == (-errno.EIO, 7)
    assert ring_answer(ops, P.LOOKUP, b"", b"no nul", unique=11)[1:3] == (-errno.EIO, 11)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([*P.OPCODE_NAMES, 0, 5, 35, 9999]), nodeid=st.integers(0, 5),
       arg0=st.binary(max_size=128), rest=st.binary(max_size=200), unique=st.integers(1, 2**64 - 1),
       extra=st.integers(-60, 60))
def test_garbage_in_ring_entries_gets_a_reply_for_its_unique(ops, opcode, nodeid, arg0, rest, unique, extra):
    if opcode in (P.DESTROY, P.INIT):
        return
    length = max(0, P.IN_HEADER_SIZE + len(arg0) + len(rest) + extra)
    out_len, error, got, body = ring_answer(ops, opcode, arg0, rest, unique=unique, nodeid=nodeid, length=length)
    assert got == unique and -4096 < error <= 0
    assert out_len == 16 + len(body) and (not error or not body)
