"""The discon-wrapper wire format (see ../shared/PROTOCOL.md), both generations.

A frame is a header of ``uint32`` lengths followed by the data of one DISCON
call. Version 1 has four lengths (swap, infile, outname, msg); version 2 adds
two (filecontent, serverfilepath) and their bytes at the end. The version is
told apart by the frame length alone: a v2 frame is always at least 8 bytes
longer than the v1 reading of its own first four lengths, so at most one
reading fits a given frame.

Every reply keeps its request's version and sizes: the client copies a reply
back onto OpenFAST's buffers only when the sizes match, so a reply of another
shape silently leaves the simulation on stale values.

The hot path only ever needs :func:`parse_header` (two ``struct`` unpacks, no
per-element loops); whole-message decoding is for tools and tests.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass, field

V1 = 1
V2 = 2

#: Default largest frame accepted (64 MiB); configurable wherever frames arrive.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

_H1 = struct.Struct("<4I")
_H2 = struct.Struct("<6I")
_I32 = struct.Struct("<i")

#: WebSocket close codes for frames that are not DISCON messages (Autobahn lets
#: applications send 1000 and 3000-4999 only).
CLOSE_NOT_BINARY = 4003
CLOSE_MALFORMED = 4007
CLOSE_IDLE = 4008

#: Size of the NUL-padded message in a file-transfer reply, as existing servers send it.
TRANSFER_REPLY_MSG_SIZE = 256


class FrameError(ValueError):
    """A frame that is not a well-formed DISCON message; the text says why."""


@dataclass(frozen=True, slots=True)
class Header:
    """Lengths and offsets of one frame; enough to answer it without decoding it."""

    version: int
    n_swap: int
    n_infile: int
    n_outname: int
    n_msg: int
    n_filecontent: int = 0
    n_serverpath: int = 0

    @property
    def swap_offset(self) -> int:
        return 16 if self.version == V1 else 24

    @property
    def fail_offset(self) -> int:
        return self.swap_offset + 4 * self.n_swap

    @property
    def infile_offset(self) -> int:
        return self.fail_offset + 4

    @property
    def outname_offset(self) -> int:
        return self.infile_offset + self.n_infile

    @property
    def msg_offset(self) -> int:
        return self.outname_offset + self.n_outname

    @property
    def filecontent_offset(self) -> int:
        return self.msg_offset + self.n_msg

    @property
    def serverpath_offset(self) -> int:
        return self.filecontent_offset + self.n_filecontent

    @property
    def size(self) -> int:
        return self.serverpath_offset + self.n_serverpath

    @property
    def is_transfer(self) -> bool:
        """A v2 file-transfer request: it names a file for the server to write."""
        return self.version == V2 and self.n_serverpath > 0


def parse_header(
    frame: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_FRAME
) -> Header:
    """Read a frame's header and check that its lengths add up to the frame.

    Raises :class:`FrameError` naming what is wrong; never anything else.
    """
    n = len(frame)
    if n > max_size:
        raise FrameError(f"frame of {n} bytes is over the limit of {max_size} bytes")
    if n < 16 + 4 + 4:
        raise FrameError(f"frame of {n} bytes is too short for a DISCON message (at least 24)")
    n_swap, n_in, n_out, n_msg = _H1.unpack_from(frame, 0)
    v1_size = 16 + 4 * n_swap + 4 + n_in + n_out + n_msg
    if v1_size == n:
        header = Header(V1, n_swap, n_in, n_out, n_msg)
    else:
        n_fc, n_sp = _H2.unpack_from(frame, 0)[4:]
        if v1_size + 8 + n_fc + n_sp != n:
            raise FrameError(
                f"lengths in the header (swap {n_swap}, infile {n_in}, outname {n_out}, "
                f"msg {n_msg}) do not add up to the frame's {n} bytes as version 1 "
                f"({v1_size}) or version 2 ({v1_size + 8 + n_fc + n_sp})"
            )
        header = Header(V2, n_swap, n_in, n_out, n_msg, n_fc, n_sp)
    if n_swap == 0:
        raise FrameError("nSwap is 0: a DISCON message carries at least one avrSWAP record")
    if n_msg == 0:
        raise FrameError("nMsg is 0: a DISCON message carries an avcMSG buffer of at least 1 byte")
    return header


def _cstr(data: bytes) -> bytes:
    """Bytes up to the first NUL: how C reads a Fortran/C string buffer."""
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def _padded(text: bytes, size: int) -> bytes:
    """``text`` cut to leave room for a NUL, then NUL-padded to exactly ``size`` bytes."""
    if size <= 0:
        return b""
    return text[: size - 1].ljust(size, b"\0")


@dataclass(slots=True)
class Message:
    """One decoded DISCON request or reply."""

    swap: array = field(default_factory=lambda: array("f"))
    fail: int = 0
    infile: bytes = b""
    outname: bytes = b""
    msg: bytes = b""
    filecontent: bytes = b""
    serverpath: bytes = b""
    version: int = V2

    @property
    def text(self) -> str:
        """avcMSG as the user sees it: up to the first NUL, decoded leniently."""
        return _cstr(self.msg).decode("utf-8", "replace")


_BIG_ENDIAN = sys.byteorder == "big"


def decode(frame: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_FRAME) -> Message:
    """Decode a whole frame; raises :class:`FrameError` when it is malformed."""
    h = parse_header(frame, max_size)
    mv = memoryview(frame)
    swap = array("f")
    swap.frombytes(mv[h.swap_offset : h.fail_offset])
    if _BIG_ENDIAN:
        swap.byteswap()
    return Message(
        swap=swap,
        fail=_I32.unpack_from(frame, h.fail_offset)[0],
        infile=bytes(mv[h.infile_offset : h.outname_offset]),
        outname=bytes(mv[h.outname_offset : h.msg_offset]),
        msg=bytes(mv[h.msg_offset : h.filecontent_offset]),
        filecontent=bytes(mv[h.filecontent_offset : h.serverpath_offset]),
        serverpath=bytes(mv[h.serverpath_offset : h.size]),
        version=h.version,
    )


def encode(m: Message) -> bytes:
    """Encode a message in its own version; v1 has no file fields to carry."""
    swap = m.swap if isinstance(m.swap, array) and m.swap.typecode == "f" else array("f", m.swap)
    if _BIG_ENDIAN:
        swap = array("f", swap)
        swap.byteswap()
    lengths = (len(swap), len(m.infile), len(m.outname), len(m.msg))
    if m.version == V1:
        if m.filecontent or m.serverpath:
            raise ValueError("version 1 frames have no filecontent or serverfilepath")
        head = _H1.pack(*lengths)
        tail = b""
    else:
        head = _H2.pack(*lengths, len(m.filecontent), len(m.serverpath))
        tail = m.filecontent + m.serverpath
    return b"".join((head, swap.tobytes(), _I32.pack(m.fail), m.infile, m.outname, m.msg, tail))


def error_reply(request: bytes | bytearray | memoryview, text: str, fail: int = -1) -> bytes:
    """Answer ``request`` with ``fail`` and ``text`` in avcMSG, keeping its version and sizes.

    Everything else (swap, strings, file fields) is echoed, so the client's
    buffers keep their values and only aviFAIL and avcMSG change. Raises
    :class:`FrameError` if the request itself is malformed: then no reply of
    the right shape exists.
    """
    h = parse_header(request, max_size=len(request))
    out = bytearray(request)
    _I32.pack_into(out, h.fail_offset, fail)
    out[h.msg_offset : h.filecontent_offset] = _padded(text.encode("utf-8", "replace"), h.n_msg)
    return bytes(out)


def transfer_reply(request: bytes | bytearray | memoryview, text: str, ok: bool) -> bytes:
    """The reply an existing server gives a file transfer: fail 0 or 1 and a 256-byte message."""
    h = parse_header(request, max_size=len(request))
    mv = memoryview(request)
    reply = Message(
        swap=array("f", [0.0] * h.n_swap),
        fail=0 if ok else 1,
        infile=b"\0",
        outname=b"\0",
        msg=_padded(text.encode("utf-8", "replace"), TRANSFER_REPLY_MSG_SIZE),
        serverpath=bytes(mv[h.serverpath_offset : h.size]),
        version=V2,
    )
    return encode(reply)


def transfer_request(server_name: str, content: bytes) -> bytes:
    """A v2 file-transfer request exactly as the newer client builds it."""
    return encode(
        Message(
            swap=array("f", [0.0]),
            fail=0,
            infile=b"\0",
            outname=b"\0",
            msg=b"\0",
            filecontent=content,
            serverpath=server_name.encode() + b"\0",
            version=V2,
        )
    )


def server_file_name(base: str, content: bytes) -> str:
    """The name the newer client gives a transferred file: ``input_<h>_<base>``.

    ``<h>`` is the first 8 hex digits of SHA-256 over the content followed by
    the base name, so the same file always lands under the same name.
    """
    digest = hashlib.sha256(content + base.encode()).hexdigest()[:8]
    return f"input_{digest}_{base}"
