"""The per-connection controller process of the discon-server.

Run as ``python -m discon_manager.controller.worker LIBRARY PROC`` with the
connection's private directory as its working directory. Requests arrive and
replies leave on fd 3 (one end of a socketpair), each as a 4-byte
little-endian length and a wire frame; fds 1 and 2 stay the controller's own
(Fortran ``PRINT`` writes to unit 6), so nothing the controller prints can corrupt a reply.

One process per connection is what isolates sessions: a fresh copy of the
library in a fresh process has no state, no Fortran unit and no file in common
with any other session, and a controller that segfaults, aborts or calls
``exit`` ends only this process, which the server reports to its own client.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys

from discon_manager.controller.library import Controller, ControllerLoadError
from discon_manager.protocol import FrameError, error_reply, parse_header

CHANNEL_FD = 3
_LEN = struct.Struct("<I")


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


#: Data files copied from the library's directory: at most this many, this large.
SEED_MAX_FILES = 64
SEED_MAX_BYTES = 64 * 1024 * 1024


def seed_workdir(library: str) -> str:
    """Copy the library and its directory's data files into the cwd.

    The library's copy is what gives each session a library of its own; it
    goes under a dot-name, which a file transfer can never use, so a client
    cannot replace the code it runs. The data files (bounded in number and
    size) let a v1 client, which cannot transfer files, name an input file
    that ships in the image. Returns the path of the library's copy.
    """
    src = os.path.abspath(library)
    if not os.path.isfile(src):
        return src  # Controller() reports it
    own = os.path.abspath(".discon-" + os.path.basename(src))
    shutil.copy2(src, own)
    copied = 0
    for entry in os.scandir(os.path.dirname(src)):
        if copied >= SEED_MAX_FILES:
            break
        try:
            if (
                entry.is_file()
                and entry.path != src
                and entry.stat().st_size <= SEED_MAX_BYTES
                and not os.path.exists(entry.name)
            ):
                shutil.copy2(entry.path, entry.name)
                copied += 1
        except OSError:
            continue  # unreadable files are not the controller's data
    return own


def main(argv: list[str]) -> int:
    library, proc = argv[1], argv[2]
    fatal = None
    try:
        controller = Controller(seed_workdir(library), proc)
    except (ControllerLoadError, OSError) as e:
        fatal = str(e).replace(os.path.abspath(".discon-" + os.path.basename(library)), library)
        print(f"discon-worker: {fatal}", file=sys.stderr, flush=True)
    channel = socket.socket(fileno=CHANNEL_FD)
    while True:
        head = _read_exactly(channel, 4)
        if head is None:
            return 0
        frame = _read_exactly(channel, _LEN.unpack(head)[0])
        if frame is None:
            return 0
        try:
            header = parse_header(frame, max_size=len(frame))
        except FrameError:
            return 3  # the server validated this frame: a mismatch is a bug, not a reply
        if fatal is not None:
            reply = error_reply(frame, fatal)
        else:
            controller.call_frame(frame, header)
            reply = frame
        channel.sendall(_LEN.pack(len(reply)) + reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
