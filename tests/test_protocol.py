"""The wire format of discon_manager/protocol.py against PROTOCOL.md.

Every reply the manager or the discon-server sends is built from these
functions, and a reply of the wrong shape is silently dropped by the client
(the simulation then runs on stale values), so the properties here are the
ones the sheet makes load-bearing: exact round trips in both versions (swap
records compared as raw bytes, so NaN payloads and -0.0 survive), a single
way to read any frame, malformed input reported as :class:`FrameError` and
nothing else, and error/transfer replies of exactly the request's shape.
"""

from __future__ import annotations

import hashlib
import re
import struct
from array import array

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from discon_manager import protocol
from discon_manager.protocol import (
    TRANSFER_REPLY_MSG_SIZE,
    V1,
    V2,
    FrameError,
    Message,
    decode,
    encode,
    error_reply,
    parse_header,
    server_file_name,
    transfer_reply,
    transfer_request,
)

settings.register_profile(
    "protocol", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("protocol")

# -- strategies ------------------------------------------------------------------

#: Any float32 bit pattern, NaNs with payloads and signed zeros included: a
#: controller's records are raw memory to the wire, never re-rounded.
swap_bits = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200)


def swap_from_bits(bits: list[int]) -> array:
    """A float32 array holding exactly these bit patterns (no float conversion on the way)."""
    swap = array("f")
    swap.frombytes(struct.pack(f"<{len(bits)}I", *bits))
    return swap


@st.composite
def messages(draw: st.DrawFn, version: int | None = None) -> Message:
    """A well-formed message of either version (nSwap >= 1, nMsg >= 1)."""
    v = draw(st.sampled_from([V1, V2])) if version is None else version
    return Message(
        swap=swap_from_bits(draw(swap_bits)),
        fail=draw(st.integers(-(2**31), 2**31 - 1)),
        infile=draw(st.binary(max_size=80)),
        outname=draw(st.binary(max_size=80)),
        msg=draw(st.binary(min_size=1, max_size=300)),
        filecontent=draw(st.binary(max_size=300)) if v == V2 else b"",
        serverpath=draw(st.binary(max_size=60)) if v == V2 else b"",
        version=v,
    )


@st.composite
def header_shaped(draw: st.DrawFn) -> bytes:
    """Bytes that start like a header (small or huge lengths) with a random body.

    Plain random bytes almost never get past the length check; these reach
    every branch of the parser, including lengths that overflow 32 bits when
    added up and bodies one byte short or long.
    """
    small = st.integers(0, 40)
    any_u32 = st.integers(0, 2**32 - 1)
    lengths = draw(st.lists(st.one_of(small, small, any_u32), min_size=6, max_size=6))
    n_words = draw(st.sampled_from([4, 6]))
    head = struct.pack(f"<{n_words}I", *lengths[:n_words])
    n_swap, n_in, n_out, n_msg = lengths[:4]
    body = 4 * n_swap + 4 + n_in + n_out + n_msg + (sum(lengths[4:]) if n_words == 6 else 0)
    if body < 4096:
        size = body + draw(st.sampled_from([-1, 0, 0, 0, 1]))
    else:
        size = draw(st.integers(0, 400))
    return head + draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))


def raw_fields(m: Message) -> tuple[bytes, int, bytes, bytes, bytes, bytes, bytes, int]:
    """A message as plain bytes, so NaN records compare by bit pattern."""
    return (
        m.swap.tobytes(),
        m.fail,
        m.infile,
        m.outname,
        m.msg,
        m.filecontent,
        m.serverpath,
        m.version,
    )


# -- round trips -------------------------------------------------------------------


@given(messages())
def test_round_trip_message_to_frame_and_back(m: Message) -> None:
    """decode(encode(m)) gives m back field for field, swap records bit for bit."""
    frame = encode(m)
    back = decode(frame)
    assert raw_fields(back) == raw_fields(m)
    assert encode(back) == frame


@given(messages(V1))
def test_v1_frame_layout(m: Message) -> None:
    """Version 1 is four lengths, swap, fail, then the three strings: nothing more."""
    frame = encode(m)
    n = len(m.swap)
    assert struct.unpack_from("<4I", frame) == (n, len(m.infile), len(m.outname), len(m.msg))
    assert len(frame) == 16 + 4 * n + 4 + len(m.infile) + len(m.outname) + len(m.msg)
    assert frame[16 : 16 + 4 * n] == m.swap.tobytes()
    assert struct.unpack_from("<i", frame, 16 + 4 * n)[0] == m.fail
    assert frame[16 + 4 * n + 4 :] == m.infile + m.outname + m.msg
    h = parse_header(frame)
    assert h.version == V1 and h.size == len(frame) and not h.is_transfer


@given(messages(V2))
def test_v2_frame_layout(m: Message) -> None:
    """Version 2 adds two lengths to the header and the file fields at the end."""
    frame = encode(m)
    n = len(m.swap)
    assert struct.unpack_from("<6I", frame) == (
        n,
        len(m.infile),
        len(m.outname),
        len(m.msg),
        len(m.filecontent),
        len(m.serverpath),
    )
    assert frame[24 : 24 + 4 * n] == m.swap.tobytes()
    assert struct.unpack_from("<i", frame, 24 + 4 * n)[0] == m.fail
    assert frame[24 + 4 * n + 4 :] == (
        m.infile + m.outname + m.msg + m.filecontent + m.serverpath
    )
    h = parse_header(frame)
    assert h.version == V2 and h.size == len(frame)
    assert h.is_transfer == (len(m.serverpath) > 0)


@given(messages())
def test_header_offsets_point_at_the_fields(m: Message) -> None:
    """The hot path answers from offsets alone: they must slice out exactly the fields."""
    frame = encode(m)
    h = parse_header(frame)
    assert (h.n_swap, h.n_infile, h.n_outname, h.n_msg) == (
        len(m.swap),
        len(m.infile),
        len(m.outname),
        len(m.msg),
    )
    assert frame[h.swap_offset : h.fail_offset] == m.swap.tobytes()
    assert frame[h.infile_offset : h.outname_offset] == m.infile
    assert frame[h.outname_offset : h.msg_offset] == m.outname
    assert frame[h.msg_offset : h.filecontent_offset] == m.msg
    assert frame[h.filecontent_offset : h.serverpath_offset] == m.filecontent
    assert frame[h.serverpath_offset : h.size] == m.serverpath


def test_nan_payloads_and_signed_zero_survive() -> None:
    """Quiet/signalling NaNs with payloads, -0.0 and infinities come back bit for bit."""
    bits = [0x7FC00000, 0x7F800001, 0xFFC12345, 0x7FBFFFFF, 0x80000000, 0x7F800000, 0xFF800000]
    for version in (V1, V2):
        m = Message(swap=swap_from_bits(bits), msg=b"\0", version=version)
        back = decode(encode(m))
        assert struct.unpack(f"<{len(bits)}I", back.swap.tobytes()) == tuple(bits)


def test_encode_refuses_file_fields_in_v1() -> None:
    """A v1 frame has nowhere to put a file: silently dropping one would lose it."""
    with pytest.raises(ValueError):
        encode(Message(swap=array("f", [1.0]), msg=b"\0", filecontent=b"x", version=V1))
    with pytest.raises(ValueError):
        encode(Message(swap=array("f", [1.0]), msg=b"\0", serverpath=b"x\0", version=V1))


def test_message_text_stops_at_first_nul() -> None:
    """avcMSG is a C string in a fixed buffer: what follows the NUL is not the message."""
    m = Message(msg=b"hello\0world\0\0")
    assert m.text == "hello"
    assert Message(msg=b"no nul").text == "no nul"
    assert Message(msg=b"\xff\xfe\0").text == "\ufffd\ufffd"


# -- any bytes: a message or FrameError ------------------------------------------


@given(st.one_of(st.binary(max_size=300), header_shaped()))
def test_any_bytes_decode_or_raise_frame_error(data: bytes) -> None:
    """Whatever arrives, the parser answers with a Message or FrameError, never a crash.

    A decoded frame re-encodes to the very same bytes: there is one reading of it.
    """
    try:
        m = decode(data)
    except FrameError as e:
        assert str(e)  # says why
        with pytest.raises(FrameError):
            parse_header(data)
        return
    assert encode(m) == data
    assert parse_header(data).size == len(data)


@given(st.one_of(st.binary(max_size=300), header_shaped()))
def test_any_bytes_error_reply_or_frame_error(data: bytes) -> None:
    """error_reply also accepts anything: a reply of the right shape, or FrameError."""
    try:
        reply = error_reply(data, "boom")
    except FrameError:
        return
    assert len(reply) == len(data)
    assert parse_header(reply) == parse_header(data)


# -- version detection ---------------------------------------------------------------


@given(messages())
def test_version_is_told_apart_by_length(m: Message) -> None:
    """Exactly one of the v1 and v2 size formulas matches a well-formed frame."""
    frame = encode(m)
    n_swap, n_in, n_out, n_msg = struct.unpack_from("<4I", frame)
    v1_size = 16 + 4 * n_swap + 4 + n_in + n_out + n_msg
    matches = [v1_size == len(frame)]
    if len(frame) >= 24:
        n_fc, n_sp = struct.unpack_from("<6I", frame)[4:]
        matches.append(v1_size + 8 + n_fc + n_sp == len(frame))
    assert matches.count(True) == 1
    assert decode(frame).version == (V1 if matches[0] else V2) == m.version


def test_v2_without_file_fields_is_still_v2() -> None:
    """The common v2 DISCON call carries empty file fields: 8 bytes of zero lengths."""
    swap = array("f", [0.0] * 3)
    v2 = encode(Message(swap=swap, msg=b"\0", version=V2))
    v1 = encode(Message(swap=swap, msg=b"\0", version=V1))
    assert len(v2) == len(v1) + 8
    assert parse_header(v2).version == V2
    assert parse_header(v1).version == V1


# -- rejections ----------------------------------------------------------------------


@pytest.mark.parametrize("n", range(24))
def test_too_short(n: int) -> None:
    with pytest.raises(FrameError, match="too short"):
        parse_header(b"\x01" * n)


@pytest.mark.parametrize("version", [V1, V2])
@pytest.mark.parametrize("delta", [-1, 1, 7, 9])
def test_lengths_that_do_not_add_up(version: int, delta: int) -> None:
    """A frame one byte short or long (or a v2 frame cut at the file fields) is refused."""
    frame = encode(
        Message(
            swap=array("f", [1.0, 2.0]),
            infile=b"in\0",
            outname=b"out\0",
            msg=b"msg\0",
            filecontent=b"content" if version == V2 else b"",
            serverpath=b"name\0" if version == V2 else b"",
            version=version,
        )
    )
    bad = frame[:delta] if delta < 0 else frame + b"\0" * delta
    with pytest.raises(FrameError, match="do not add up"):
        parse_header(bad)


def test_header_lengths_larger_than_the_frame() -> None:
    """Huge lengths (a garbage header) are refused, not allocated."""
    frame = struct.pack("<6I", 2**32 - 1, 2**32 - 1, 0, 1, 2**32 - 1, 0) + b"\0" * 40
    with pytest.raises(FrameError, match="do not add up"):
        decode(frame)


@pytest.mark.parametrize("version", [V1, V2])
def test_nswap_zero(version: int) -> None:
    frame = encode(Message(swap=array("f"), msg=b"\0\0\0\0", version=version))
    with pytest.raises(FrameError, match="nSwap is 0"):
        parse_header(frame)


@pytest.mark.parametrize("version", [V1, V2])
def test_nmsg_zero(version: int) -> None:
    frame = encode(Message(swap=array("f", [1.0, 2.0]), infile=b"x", msg=b"", version=version))
    with pytest.raises(FrameError, match="nMsg is 0"):
        parse_header(frame)


@given(messages())
def test_max_size(m: Message) -> None:
    """A frame of exactly max_size is fine; one byte over is refused before parsing."""
    frame = encode(m)
    assert decode(frame, max_size=len(frame)).version == m.version
    with pytest.raises(FrameError, match="over the limit"):
        decode(frame, max_size=len(frame) - 1)
    with pytest.raises(FrameError, match="over the limit"):
        parse_header(frame, max_size=len(frame) - 1)


def test_default_max_size_is_64_mib() -> None:
    assert protocol.DEFAULT_MAX_FRAME == 64 * 1024 * 1024


# -- error_reply ----------------------------------------------------------------------


@given(messages(), st.text(max_size=400), st.integers(-(2**31), 2**31 - 1))
def test_error_reply_changes_only_fail_and_msg(m: Message, text: str, fail: int) -> None:
    """Same version, same sizes, same bytes everywhere except aviFAIL and avcMSG."""
    request = encode(m)
    reply = error_reply(request, text, fail)
    h = parse_header(request)
    assert len(reply) == len(request)
    assert parse_header(reply) == h
    assert reply[: h.fail_offset] == request[: h.fail_offset]
    assert reply[h.infile_offset : h.msg_offset] == request[h.infile_offset : h.msg_offset]
    assert reply[h.filecontent_offset :] == request[h.filecontent_offset :]
    out = decode(reply)
    assert out.fail == fail
    expected = text.encode("utf-8", "replace")[: h.n_msg - 1].ljust(h.n_msg, b"\0")
    assert out.msg == expected
    assert out.msg[-1:] == b"\0"  # always NUL-terminated within nMsg


def test_error_reply_default_fail_is_minus_one() -> None:
    request = encode(Message(swap=array("f", [5.0]), fail=0, msg=b"\0" * 32, version=V2))
    out = decode(error_reply(request, "the controller crashed"))
    assert out.fail == -1
    assert out.text == "the controller crashed"


def test_error_reply_truncates_to_nmsg() -> None:
    """A long reason is cut to leave room for the NUL, never grown past nMsg."""
    request = encode(Message(swap=array("f", [5.0]), msg=b"\0" * 8, version=V1))
    out = decode(error_reply(request, "0123456789"))
    assert out.msg == b"0123456\0"
    one = encode(Message(swap=array("f", [5.0]), msg=b"x", version=V1))
    assert decode(error_reply(one, "anything")).msg == b"\0"


@pytest.mark.parametrize("frame", [b"", b"\0" * 10, struct.pack("<4I", 1, 0, 0, 1) + b"\0" * 3])
def test_error_reply_of_malformed_request_raises_frame_error(frame: bytes) -> None:
    with pytest.raises(FrameError):
        error_reply(frame, "x")


# -- file transfer --------------------------------------------------------------------


@given(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
        min_size=1,
        max_size=60,
    ),
    st.binary(max_size=2000),
)
def test_transfer_request_matches_the_sheet(name: str, content: bytes) -> None:
    """nSwap 1, fail 0, one-NUL strings, filecontent = the bytes, serverfilepath = name + NUL."""
    frame = transfer_request(name, content)
    h = parse_header(frame)
    assert h.version == V2 and h.is_transfer
    assert (h.n_swap, h.n_infile, h.n_outname, h.n_msg) == (1, 1, 1, 1)
    m = decode(frame)
    assert m.swap.tobytes() == struct.pack("<f", 0.0)
    assert m.fail == 0
    assert m.infile == m.outname == m.msg == b"\0"
    assert m.filecontent == content
    assert m.serverpath == name.encode() + b"\0"
    assert len(frame) == 24 + 4 + 4 + 3 + len(content) + len(name.encode()) + 1


@given(st.binary(max_size=500), st.text(max_size=300), st.booleans())
def test_transfer_reply_matches_the_sheet(content: bytes, text: str, ok: bool) -> None:
    """nSwap 1, fail 0 or 1, a 256-byte NUL-padded message, the server name echoed."""
    request = transfer_request("input_0000abcd_x.in", content)
    reply = decode(transfer_reply(request, text, ok))
    assert reply.version == V2
    assert len(reply.swap) == 1
    assert reply.fail == (0 if ok else 1)
    assert len(reply.msg) == TRANSFER_REPLY_MSG_SIZE
    assert reply.msg == text.encode()[: TRANSFER_REPLY_MSG_SIZE - 1].ljust(
        TRANSFER_REPLY_MSG_SIZE, b"\0"
    )
    assert reply.serverpath == b"input_0000abcd_x.in\0"
    assert reply.filecontent == b""


def test_server_file_name_known_value() -> None:
    """SHA-256 over content then base name (sha256sum of 'abcDISCON.IN' starts c5c91796)."""
    assert server_file_name("DISCON.IN", b"abc") == "input_c5c91796_DISCON.IN"
    # the other order would give ce9d6741: the order matters to match the client
    assert server_file_name("DISCON.IN", b"abc") != "input_ce9d6741_DISCON.IN"


@given(
    st.from_regex(r"[A-Za-z0-9_.\-]{1,40}", fullmatch=True),
    st.binary(max_size=1000),
)
def test_server_file_name_formula(base: str, content: bytes) -> None:
    name = server_file_name(base, content)
    h = hashlib.sha256(content + base.encode()).hexdigest()[:8]
    assert name == f"input_{h}_{base}"
    assert re.fullmatch(r"input_[0-9a-f]{8}_" + re.escape(base), name)


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_server_file_name_depends_on_content(a: bytes, b: bytes) -> None:
    """Different contents (almost always) land under different names: no stale reuse."""
    assume(a != b)
    assert server_file_name("f.in", a) == server_file_name("f.in", a)
    assert server_file_name("f.in", a) != server_file_name("f.in", b)
