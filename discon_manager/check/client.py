"""The network transport of ``discon-check``: a discon-wrapper client in Python.

To tell whether DisconManager (or a discon-server) will work for an OpenFAST
user, the check has to talk to it exactly as the user's discon-client does
(shared/PROTOCOL.md): the same URL and query, no extra headers, the same
frames, the same dial retries and file transfers, and the same treatment of
replies (copied back onto the caller's buffers only when their sizes match
the request). Anything this client did more politely than the real one would
hide exactly the problems the check is for.

Two generations, chosen by ``client_version``:

* 1, the original client: v1 frames (four uint32 lengths), one dial, no file
  transfer.
* 2, the newer client: v2 frames (six lengths, the last two 0 on DISCON calls),
  up to 5 dials 1, 2, 4, 8 s apart, and before the first DISCON call one
  transfer request per file (the additional files, then the file named by
  accINFILE if it exists here, with the additional files' base names replaced
  by their server names), each waited for with a 5 s read deadline and tried
  up to 3 times (0.4 s, 0.8 s apart). DISCON calls then carry the primary
  file's server name in accINFILE and record 50 = len(name) + 1.

A transfer retry is sent while the first copy is still in flight, so a server
may answer both. Like the real client, this one takes the next transfer reply
after a retry as the answer (whichever copy it belongs to). Unlike the real
client, it does not let the other copy's reply shift every later reply by
one: while copies are outstanding, a reply that is shaped like a transfer
reply (nSwap = 1; for a transfer wait, naming another file) where a DISCON
reply (or another file's reply) is expected is dropped and counted in
``stats()["stale_replies_dropped"]``. The CLI reports that count, because a
real discon-client would have run one step late from then on.

Per call the client does no logging and no full decode: the request frame is
a persistent bytearray filled by memoryview slice assignment, and the reply is
checked with :func:`protocol.parse_header` and copied into the caller's
ctypes buffers by slice assignment too.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from discon_manager.check.driver import (
    MSG_SIZE,
    OUTNAME_SIZE,
    SWAP_SIZE,
    CallBuffers,
    CheckConnectionError,
    CheckResult,
    RunConfig,
    drive,
)
from discon_manager.protocol import (
    DEFAULT_MAX_FRAME,
    FrameError,
    parse_header,
    server_file_name,
    transfer_request,
)
from discon_manager.websocket import HotPath

__all__ = [
    "CheckConnectionError",
    "NetworkTransport",
    "TransferError",
    "run_network",
    "run_network_blocking",
    "server_url",
]

DEFAULT_PATH = "libdiscon.so"
DEFAULT_PROC = "DISCON"

#: The newer client's waits between its 5 dials, and its transfer back-off.
V2_DIAL_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
TRANSFER_DEADLINE = 5.0
TRANSFER_BACKOFF: tuple[float, ...] = (0.4, 0.8)
#: The WebSocket library's default handshake timeout in the real clients.
HANDSHAKE_TIMEOUT = 45.0
#: How long to wait for one DISCON reply before giving up (the real client
#: waits forever; a check should not). Longer than any sane controller step.
CALL_TIMEOUT = 120.0

_H1 = struct.Struct("<4I")
_H2 = struct.Struct("<6I")
_I32 = struct.Struct("<i")
_F32 = struct.Struct("<f")

if sys.byteorder != "little":  # the hot path copies float32 bytes as they are
    raise ImportError("discon_manager.check.client needs a little-endian host")


class TransferError(CheckConnectionError):
    """A file transfer was refused or never answered."""


def server_url(server: str, path: str = DEFAULT_PATH, proc: str = DEFAULT_PROC) -> str:
    """The URL the discon-wrapper clients dial for DISCON_SERVER_ADDR = ``server``.

    ``ws://`` and ``wss://`` are kept, ``http://`` becomes ``ws://`` and
    ``https://`` ``wss://``; no scheme means ``ws://``. A path in the address
    stays in front of ``/ws``; a query or fragment in it is dropped. The
    query is exactly ``path=...&proc=...``, URL-encoded.
    """
    s = server.strip()
    scheme = "ws"
    low = s.lower()
    for prefix, sch in (("ws://", "ws"), ("wss://", "wss"), ("http://", "ws"), ("https://", "wss")):
        if low.startswith(prefix):
            scheme, s = sch, s[len(prefix) :]
            break
    s = s.split("#", 1)[0].split("?", 1)[0]
    hostport, _, rest = s.partition("/")
    if not hostport:
        raise ValueError(f"server address '{server}' has no host; expected HOST:PORT[/PATH]")
    prefix_path = ("/" + rest).rstrip("/") if rest else ""
    return f"{scheme}://{hostport}{prefix_path}/ws?{urlencode({'path': path, 'proc': proc})}"


class _Protocol(HotPath, WebSocketClientProtocol):
    """Forwards everything to the :class:`NetworkTransport` that dialled it."""

    owner: NetworkTransport
    handshake_failure: str | None = None

    def onOpen(self) -> None:
        self.factory.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.owner._on_message(payload)

    def failHandshake(self, reason: str) -> None:
        # Keep the HTTP status and the first line of an error body: an existing
        # server explains a refused upgrade there (the real client never shows it).
        data = getattr(self, "data", b"") or b""
        end = data.find(b"\r\n\r\n")
        body = data[end + 4 :] if end >= 0 else b""
        line = body.decode("utf-8", "replace").strip().splitlines()
        self.handshake_failure = f"{reason} ({line[0].strip()[:300]})" if line else reason
        super().failHandshake(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        why = self.handshake_failure or reason or getattr(self, "wasNotCleanReason", None)
        self.factory.closed(self, wasClean, code, why)


class _Factory(WebSocketClientFactory):
    """One dial attempt: ``done`` fires with the open protocol or a failure text."""

    protocol = _Protocol

    def __init__(self, owner: NetworkTransport, url: str, reactor: Any) -> None:
        super().__init__(url, reactor=reactor)
        self.owner = owner
        self.done: Deferred[_Protocol] = Deferred()
        self.proto: _Protocol | None = None

    def buildProtocol(self, addr: Any) -> _Protocol:
        p = super().buildProtocol(addr)
        p.owner = self.owner
        return p

    def opened(self, proto: _Protocol) -> None:
        self.proto = proto
        if not self.done.called:
            self.done.callback(proto)

    def closed(self, proto: _Protocol, clean: bool, code: int | None, why: str | None) -> None:
        if not self.done.called:
            self.done.errback(ConnectionError(why or "connection closed during the handshake"))
        else:
            self.owner._on_closed(proto, clean, code, why)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.done.called:
            text = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
            self.done.errback(ConnectionError(text))


class NetworkTransport:
    """DISCON calls over a WebSocket, exactly as a discon-wrapper client makes them.

    ``dial_delays``, ``transfer_deadline`` and ``transfer_backoff`` default to
    the real clients' values for ``client_version``; tests pass shorter ones.
    Must be used under a running Twisted reactor (see :func:`run_network`).
    """

    name = "network"

    def __init__(
        self,
        server: str,
        path: str = DEFAULT_PATH,
        proc: str = DEFAULT_PROC,
        client_version: int = 2,
        additional_files: Sequence[str | Path] = (),
        *,
        dial_delays: Sequence[float] | None = None,
        transfer_deadline: float = TRANSFER_DEADLINE,
        transfer_backoff: Sequence[float] = TRANSFER_BACKOFF,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        call_timeout: float | None = CALL_TIMEOUT,
        max_frame: int = DEFAULT_MAX_FRAME,
        reactor: Any = None,
    ) -> None:
        if client_version not in (1, 2):
            raise ValueError(f"client version must be 1 or 2, not {client_version!r}")
        if client_version == 1 and additional_files:
            raise ValueError("the version-1 client transfers no files; drop the additional files")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server = server
        self.url = server_url(server, path, proc)
        try:  # the same parse the factory does, so a bad address fails here, readably
            parse_url(self.url)
        except Exception as e:
            raise ValueError(
                f"server address '{server}' is not usable ({e}); expected HOST:PORT[/PATH]"
            ) from None
        self.client_version = client_version
        self.additional_files = [str(p) for p in additional_files]
        if dial_delays is None:
            dial_delays = V2_DIAL_DELAYS if client_version == 2 else ()
        self.dial_delays = tuple(dial_delays)
        self.transfer_deadline = transfer_deadline
        self.transfer_backoff = tuple(transfer_backoff)
        self.handshake_timeout = handshake_timeout
        self.call_timeout = call_timeout
        self.max_frame = max_frame
        self.reactor = reactor

        self._proto: _Protocol | None = None
        self._closed: CheckConnectionError | None = None
        self._close_done: Deferred[None] | None = None
        self._waiter: Deferred[Any] | None = None
        self._waiter_is_call = False
        self._inbox: deque[bytes] = deque()
        #: Transfer copies sent but not answered (after a timed-out read).
        self._outstanding = 0
        #: serverfilepath (with NUL) of the transfer being waited for, else None.
        self._expect_path: bytes | None = None
        self._bufs: CallBuffers | None = None
        self._watchdog: task.LoopingCall | None = None
        self._calls_sent = 0
        self._calls_seen = 0
        self._layout_key: tuple[int, int, int, int] | None = None
        self._frame = bytearray()
        self._frame_mv = memoryview(self._frame)

        self.dial_attempts = 0
        self.transfers: list[tuple[str, str]] = []
        self.transfer_frames_sent = 0
        self.transfer_retries = 0
        self.stale_replies_dropped = 0
        self.replies_not_copied = 0
        self.infile_sent = b""

    # -- connection ------------------------------------------------------------

    def _hostport(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]

    def _advice(self) -> str:
        return (
            f"check that DisconManager or a discon-server is listening at "
            f"{self._hostport()} and that --server is HOST:PORT[/PATH] of its /ws endpoint"
        )

    async def _dial_once(self) -> _Protocol:
        factory = _Factory(self, self.url, self.reactor)
        factory.setProtocolOptions(
            tcpNoDelay=True,
            maxMessagePayloadSize=self.max_frame,
            maxFramePayloadSize=self.max_frame,
            openHandshakeTimeout=self.handshake_timeout,
            closeHandshakeTimeout=2,
        )
        if factory.isSecure:
            from twisted.internet import ssl

            options = ssl.optionsForClientTLS(factory.host)
            self.reactor.connectSSL(
                factory.host, factory.port, factory, options, timeout=self.handshake_timeout
            )
        else:
            self.reactor.connectTCP(
                factory.host, factory.port, factory, timeout=self.handshake_timeout
            )
        return await factory.done

    async def _dial(self) -> None:
        tries = 1 + len(self.dial_delays)
        last = ""
        for i in range(tries):
            if i:
                await task.deferLater(self.reactor, self.dial_delays[i - 1], lambda: None)
            self.dial_attempts += 1
            try:
                self._proto = await self._dial_once()
                return
            except ConnectionError as e:
                last = (str(e) or type(e).__name__).strip().rstrip(".")
        plural = "try" if tries == 1 else "tries"
        raise CheckConnectionError(
            f"cannot connect to {self.url} ({tries} {plural}): {last}; {self._advice()}"
        )

    def _on_closed(self, proto: _Protocol, clean: bool, code: int | None, why: str | None) -> None:
        if proto is not self._proto:
            return
        detail = f"code {code}" + (f", {why}" if why else "") if code is not None else (why or "")
        err = CheckConnectionError(
            f"connection to {self.url} closed by the server or the network"
            + (f" ({detail})" if detail else "")
            + "; check the server's log for the reason"
        )
        if self._closed is None:
            self._closed = err
        if self._close_done is not None and not self._close_done.called:
            self._close_done.callback(None)
        w, self._waiter = self._waiter, None
        if w is not None and not w.called:
            w.errback(err)

    # -- receiving -------------------------------------------------------------

    def _is_stale(self, payload: bytes) -> bool:
        """A late reply to a transfer copy that was already answered (see module doc)."""
        try:
            h = parse_header(payload, self.max_frame)
        except FrameError:
            return False
        if h.n_swap != 1:
            return False
        if self._expect_path is None:
            # Waiting for a DISCON reply: its nSwap is the request's (record 129).
            return self._layout_key is None or self._layout_key[0] != 1
        if h.n_serverpath == 0:
            return False  # cannot tell which file it answers: take it, like the real client
        return bytes(payload[h.serverpath_offset : h.size]) != self._expect_path

    def _on_message(self, payload: bytes) -> None:
        if self._outstanding > 0 and self._is_stale(payload):
            self._outstanding -= 1
            self.stale_replies_dropped += 1
            return
        w = self._waiter
        if w is None:
            self._inbox.append(payload)
            return
        self._waiter = None
        if self._waiter_is_call:
            self._apply(payload)
            self._calls_seen += 1
            w.callback(None)
        else:
            w.callback(payload)

    async def _read(self, timeout: float) -> bytes:
        """The next reply (not a stale one), or TimeoutError after ``timeout`` seconds."""
        if self._inbox:
            return self._inbox.popleft()
        if self._closed is not None:
            raise self._closed
        d: Deferred[bytes] = Deferred()
        self._waiter = d
        self._waiter_is_call = False

        def expire() -> None:
            if self._waiter is d:
                self._waiter = None
                d.errback(TimeoutError())

        timer = self.reactor.callLater(timeout, expire)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    # -- file transfer (v2) ----------------------------------------------------

    async def _transfer(self, local: str, name: str, content: bytes) -> None:
        frame = transfer_request(name, content)
        self._expect_path = name.encode() + b"\0"
        tries = 1 + len(self.transfer_backoff)
        try:
            for attempt in range(tries):
                if attempt:
                    self.transfer_retries += 1
                    await task.deferLater(
                        self.reactor, self.transfer_backoff[attempt - 1], lambda: None
                    )
                    if self._closed is not None:
                        raise self._closed
                assert self._proto is not None
                self._proto.sendMessage(frame, isBinary=True)
                self.transfer_frames_sent += 1
                try:
                    reply = await self._read(self.transfer_deadline)
                except TimeoutError:
                    self._outstanding += 1  # this copy may still be answered later
                    continue
                try:
                    h = parse_header(reply, self.max_frame)
                except FrameError as e:
                    raise TransferError(
                        f"malformed reply to the transfer of '{local}' as '{name}' from "
                        f"{self._hostport()}: {e}"
                    ) from None
                fail = _I32.unpack_from(reply, h.fail_offset)[0]
                if fail != 0:
                    raw = reply[h.msg_offset : h.filecontent_offset].split(b"\0", 1)[0]
                    msg = raw.decode("utf-8", "replace").strip() or "(no message)"
                    raise TransferError(
                        f"the server at {self._hostport()} refused the transfer of '{local}' "
                        f"as '{name}': {msg}"
                    )
                self.transfers.append((local, name))
                return
            raise TransferError(
                f"no reply to the transfer of '{local}' as '{name}' from {self._hostport()} "
                f"within {self.transfer_deadline:g} s ({tries} tries); check the server's log"
            )
        finally:
            self._expect_path = None

    async def _send_files(self, bufs: CallBuffers) -> bytes | None:
        """Transfer the files; return the primary file's server name, or None."""
        renames: list[tuple[bytes, bytes]] = []
        for p in self.additional_files:
            try:
                content = Path(p).read_bytes()
            except OSError as e:
                raise TransferError(f"cannot read additional file '{p}': {e.strerror}") from None
            base = os.path.basename(p)
            name = server_file_name(base, content)
            await self._transfer(p, name, content)
            renames.append((base.encode(), name.encode()))
        primary = bufs.infile_text
        if not primary or not os.path.isfile(primary):
            return None
        try:
            content = Path(primary).read_bytes()
        except OSError as e:
            raise TransferError(f"cannot read input file '{primary}': {e.strerror}") from None
        for base_b, name_b in renames:  # in list order, like the real client
            content = content.replace(base_b, name_b)
        base = os.path.basename(primary)
        name = server_file_name(base, content)
        await self._transfer(primary, name, content)
        return name.encode()

    # -- Transport interface ---------------------------------------------------

    async def _open(self, bufs: CallBuffers) -> None:
        self._bufs = bufs
        self._swap_mv = memoryview(bufs.swap).cast("B")
        self._infile_mv = memoryview(bufs.infile).cast("B")
        self._outname_mv = memoryview(bufs.outname).cast("B")
        self._msg_mv = memoryview(bufs.msg).cast("B")
        await self._dial()
        self._rewritten: bytes | None = None
        if self.client_version == 2:
            name = await self._send_files(bufs)
            if name is not None:
                self._rewritten = name + b"\0"
        if self.call_timeout:
            self._watchdog = task.LoopingCall(self._check_progress)
            self._watchdog.clock = self.reactor
            self._last_seen = (-1, 0.0)
            self._watchdog.start(min(1.0, self.call_timeout / 4), now=False)

    def open(self, bufs: CallBuffers) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open(bufs))

    def _check_progress(self) -> None:
        """Watchdog: fail the pending call when no reply came within call_timeout."""
        w = self._waiter
        if w is None or not self._waiter_is_call:
            self._last_seen = (-1, 0.0)
            return
        now = time.monotonic()
        if self._last_seen[0] != self._calls_sent:
            self._last_seen = (self._calls_sent, now)
        elif now - self._last_seen[1] >= (self.call_timeout or 0):
            self._waiter = None
            w.errback(
                CheckConnectionError(
                    f"no reply from {self._hostport()} to DISCON call {self._calls_sent} within "
                    f"{self.call_timeout:g} s; the controller may hang (check the server's log)"
                )
            )

    def _layout(self, n_swap: int, n_in: int, n_out: int, n_msg: int) -> None:
        """(Re)build the request frame for these sizes; the header is written once."""
        v1 = self.client_version == 1
        head = 16 if v1 else 24
        size = head + 4 * n_swap + 4 + n_in + n_out + n_msg
        self._frame = bytearray(size)
        self._frame_mv = memoryview(self._frame)
        if v1:
            _H1.pack_into(self._frame, 0, n_swap, n_in, n_out, n_msg)
        else:
            _H2.pack_into(self._frame, 0, n_swap, n_in, n_out, n_msg, 0, 0)
        self._fail_off = head + 4 * n_swap
        self._in_off = self._fail_off + 4
        self._out_off = self._in_off + n_in
        self._msg_off = self._out_off + n_out
        self._layout_key = (n_swap, n_in, n_out, n_msg)
        if self._rewritten is not None:
            self._frame[self._in_off : self._out_off] = self._rewritten
            self.infile_sent = self._rewritten
        self._n_swap, self._n_out, self._n_msg = n_swap, n_out, n_msg

    def call(self) -> Deferred[None]:
        if self._closed is not None:
            raise self._closed
        bufs = self._bufs
        assert bufs is not None and self._proto is not None
        swap = bufs.swap
        # Sizes as the real client takes them, bounded by the buffers it was handed.
        n_swap = min(max(int(swap[128]), 1), SWAP_SIZE)
        n_out = min(max(int(swap[63]), 0), OUTNAME_SIZE)
        n_msg = min(max(int(swap[48]), 1), MSG_SIZE)
        rewritten = self._rewritten
        if rewritten is not None:
            n_in = len(rewritten)
        else:
            n_in = min(max(int(swap[49]), 0), len(bufs.infile))
        if self._layout_key != (n_swap, n_in, n_out, n_msg):
            self._layout(n_swap, n_in, n_out, n_msg)
        fmv = self._frame_mv
        so = self._fail_off - 4 * n_swap
        fmv[so : self._fail_off] = self._swap_mv[: 4 * n_swap]
        if rewritten is not None:
            if n_swap >= 50:
                _F32.pack_into(self._frame, so + 4 * 49, float(n_in))
        elif n_in:
            fmv[self._in_off : self._out_off] = self._infile_mv[:n_in]
            if self._calls_sent == 0:
                self.infile_sent = bytes(fmv[self._in_off : self._out_off])
        _I32.pack_into(self._frame, self._fail_off, bufs.fail.value)
        fmv[self._out_off : self._msg_off] = self._outname_mv[:n_out]
        fmv[self._msg_off :] = self._msg_mv[:n_msg]
        d: Deferred[None] = Deferred()
        if self._inbox:
            # A reply nobody asked for is already waiting: the real client would
            # read it as this call's answer, and so does this one.
            self._calls_sent += 1
            self._proto.sendMessage(bytes(self._frame), isBinary=True)
            self._apply(self._inbox.popleft())
            self._calls_seen += 1
            d.callback(None)
            return d
        self._waiter = d
        self._waiter_is_call = True
        self._calls_sent += 1
        self._proto.sendMessage(bytes(self._frame), isBinary=True)
        return d

    def _apply(self, payload: bytes) -> None:
        """Copy a reply onto the caller's buffers, only if its sizes match the request."""
        try:
            h = parse_header(payload, self.max_frame)
        except FrameError:
            self.replies_not_copied += 1
            return
        if h.n_swap != self._n_swap or h.n_msg != self._n_msg or h.n_outname != self._n_out:
            self.replies_not_copied += 1
            return
        pmv = memoryview(payload)
        self._swap_mv[: 4 * h.n_swap] = pmv[h.swap_offset : h.fail_offset]
        assert self._bufs is not None
        self._bufs.fail.value = _I32.unpack_from(payload, h.fail_offset)[0]
        self._outname_mv[: h.n_outname] = pmv[h.outname_offset : h.msg_offset]
        self._msg_mv[: h.n_msg] = pmv[h.msg_offset : h.filecontent_offset]

    def close(self) -> None:
        """Stop the watchdog and start a clean WebSocket close (see :meth:`wait_closed`)."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        proto = self._proto
        if proto is not None and self._closed is None:
            self._close_done = Deferred()
            self._closed = CheckConnectionError(f"connection to {self.url} was closed")
            proto.sendClose(1000)

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the close handshake, so the server can clean up."""
        d = self._close_done
        if d is None or d.called:
            return
        timer = self.reactor.callLater(timeout, lambda: d.called or d.callback(None))
        await d
        if timer.active():
            timer.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "client_version": self.client_version,
            "dial_attempts": self.dial_attempts,
            "transfers": [{"local": a, "server_name": b} for a, b in self.transfers],
            "transfer_frames_sent": self.transfer_frames_sent,
            "transfer_retries": self.transfer_retries,
            "stale_replies_dropped": self.stale_replies_dropped,
            "replies_not_copied": self.replies_not_copied,
        }


async def run_network(
    server: str,
    config: RunConfig,
    *,
    path: str = DEFAULT_PATH,
    proc: str = DEFAULT_PROC,
    client_version: int = 2,
    additional_files: Sequence[str | Path] = (),
    **client_options: Any,
) -> CheckResult:
    """Run a check against ``server``; needs a running reactor (e.g. under pytest-twisted).

    ``client_options`` go to :class:`NetworkTransport` (``dial_delays``,
    ``transfer_deadline``, ``transfer_backoff``, ``call_timeout``, ...). Raises
    :class:`CheckConnectionError` (or :class:`TransferError`) when the server
    cannot be used; a controller error is reported in the result instead.
    """
    transport = NetworkTransport(
        server, path, proc, client_version, additional_files, **client_options
    )
    try:
        return await drive(transport, config)
    finally:
        await transport.wait_closed()


def run_network_blocking(server: str, config: RunConfig, **kwargs: Any) -> CheckResult:
    """:func:`run_network` with the global reactor started and stopped here.

    A Twisted reactor runs once per process, so this is for the CLI (and
    subprocesses); code that already runs a reactor awaits :func:`run_network`.
    """
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        d = defer.ensureDeferred(run_network(server, config, **kwargs))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:  # the reactor was stopped from outside (Ctrl-C)
        raise KeyboardInterrupt
    r = outcome[0]
    from twisted.python.failure import Failure

    if isinstance(r, Failure):
        r.raiseException()
    return r
