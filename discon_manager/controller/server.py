"""The discon-server: a drop-in for the existing Go server inside controller images.

It serves ``/ws?path=LIB&proc=SYMBOL`` on one port and answers both wire
versions. Each connection gets a private working directory and its own worker
process (:mod:`discon_manager.controller.worker`) that loads a fresh copy of
the library; v2 file transfers are written into that directory by this
process, off the reactor thread, and the directory goes when the connection
does.

Every request gets exactly one reply, in order. Whatever goes wrong on the
controller side (missing library or symbol, a crash, a hang) comes back as
aviFAIL -1 with a readable avcMSG sized to the request: the HTTP error body
of a refused handshake never reaches an OpenFAST user, avcMSG does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections import deque
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import abstract, main, protocol, reactor, task, threads
from twisted.logger import Logger

from discon_manager.protocol import (
    CLOSE_MALFORMED,
    CLOSE_NOT_BINARY,
    DEFAULT_MAX_FRAME,
    FrameError,
    Header,
    error_reply,
    parse_header,
    transfer_reply,
)
from discon_manager.websocket import HotPath

log = Logger(namespace="discon-server")
_LEN = struct.Struct("<I")
_RECV_SIZE = 1 << 20

#: Characters and sequences that a transferred file name may not contain (PROTOCOL.md).
_FORBIDDEN = ("/", "..", "~", "$", "|", ";", "&", "\\")


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def check_transfer_name(raw: bytes) -> str:
    """The file name of a transfer, or ValueError saying why it is refused."""
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if not name:
        raise ValueError("empty server file name")
    for bad in _FORBIDDEN:
        if bad in name:
            raise ValueError(f"file name '{name}' contains '{bad}'")
    if name.startswith(".") or len(name.encode()) > 255:
        raise ValueError(f"file name '{name}' is not a plain file name")
    return name


def write_transfer(workdir: str, name: str, content: bytes) -> None:
    """Write a transferred file atomically (no reader ever sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, os.path.join(workdir, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class WorkerChannel(abstract.FileDescriptor):
    """Our end of the socketpair to a worker: length-prefixed frames both ways.

    A request is sent at once (no wait for the next reactor turn) and a reply
    is normally read in one ``recv``: this hop is on every DISCON call.
    """

    def __init__(self, sock: socket.socket, on_reply: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.on_reply = on_reply
        self.rbuf = bytearray()
        self.pending = b""  # request bytes the socket did not take yet

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        data = _LEN.pack(len(frame)) + frame
        if not self.pending:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the worker is gone; processEnded reports it
            if sent == len(data):
                return
            data = data[sent:]
            self.startWriting()
        self.pending += data

    def doWrite(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return None
        except OSError:
            self.pending = b""
            self.stopWriting()
            return None
        self.pending = self.pending[sent:]
        if not self.pending:
            self.stopWriting()
        return None

    def doRead(self) -> Any:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        if not self.rbuf and len(data) >= 4 and _LEN.unpack_from(data)[0] == len(data) - 4:
            self.on_reply(data[4:])  # the usual case: exactly one whole reply
            return None
        self.rbuf += data
        while len(self.rbuf) >= 4:
            need = _LEN.unpack_from(self.rbuf)[0]
            if len(self.rbuf) < 4 + need:
                break
            reply = bytes(self.rbuf[4 : 4 + need])
            del self.rbuf[: 4 + need]
            self.on_reply(reply)
        return None

    def connectionLost(self, reason: Any) -> None:
        self.stopReading()
        self.stopWriting()
        self.sock.close()


class WorkerProcess(protocol.ProcessProtocol):
    """A worker's life: started with one end of a socketpair as its fd 3.

    The controller's own stdout/stderr stay pipes to us, so what it prints is
    logged and its last line can explain a crash.
    """

    def __init__(self, session: ControllerSession) -> None:
        self.session = session
        self.tail: deque[str] = deque(maxlen=5)  # last lines of the controller's own output
        self.ended = False
        self.channel: WorkerChannel | None = None

    def spawn(self, library: str, proc: str, workdir: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ours.setblocking(False)
        try:
            reactor.spawnProcess(
                self,
                sys.executable,
                [sys.executable, "-m", "discon_manager.controller.worker", library, proc],
                env=os.environ.copy(),
                path=workdir,
                childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()},
            )
        finally:
            theirs.close()
        self.channel = WorkerChannel(ours, self.session.worker_replied)
        self.channel.startReading()

    def send(self, frame: bytes) -> None:
        self.channel.send(frame)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.tail.append(line.strip())
                log.info("controller output: {line}", line=line.rstrip())

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        if self.channel is not None:
            self.channel.connectionLost(reason)
        value = reason.value
        self.session.worker_ended(getattr(value, "exitCode", None), getattr(value, "signal", None))

    def kill(self) -> None:
        if not self.ended:
            try:
                self.transport.signalProcess("KILL")
            except Exception:  # already gone
                pass


class ControllerSession(HotPath, WebSocketServerProtocol):
    """One client connection: a working directory, a worker, a queue of requests."""

    factory: DisconServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.library = ""
        self.proc = ""
        self.workdir: str | None = None
        self.worker: WorkerProcess | None = None
        self.queue: deque[bytes] = deque()
        self.current: bytes | None = None  # the request being answered
        self.current_header: Header | None = None
        self.calls = 0
        self.fatal: str | None = None  # once set, every request is answered with it
        self.call_started = 0.0  # when the worker got the call it is answering
        self.gone = False

    # -- connection life cycle ------------------------------------------------

    def onConnect(self, request: Any) -> None:
        params = request.params
        self.library = (params.get("path") or [""])[0]
        self.proc = (params.get("proc") or [""])[0] or "DISCON"
        if not self.library:
            self.fatal = (
                "no controller library given: the client must send path=<library> "
                "(set DISCON_LIB_PATH)"
            )
        if self.factory.debug_level:
            log.info(
                "connect from {peer}: library={lib!r} proc={proc!r}",
                peer=request.peer,
                lib=self.library,
                proc=self.proc,
            )

    def onOpen(self) -> None:
        self.factory.sessions.add(self)
        d = threads.deferToThread(
            tempfile.mkdtemp, prefix="session-", dir=self.factory.workdir_base
        )
        d.addCallbacks(self._workdir_ready, self._workdir_failed)

    def _workdir_ready(self, path: str) -> None:
        self.workdir = path
        if self.gone:
            self._cleanup()
            return
        if self.fatal is None:
            self.worker = WorkerProcess(self)
            library = os.path.join(self.factory.library_base, self.library)
            self.worker.spawn(library, self.proc, path)
        self._next()

    def _workdir_failed(self, failure: Any) -> None:
        self.fatal = f"discon-server cannot create a working directory: {failure.value}"
        log.error("{msg}", msg=self.fatal)
        self._next()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.gone = True
        self.factory.sessions.discard(self)
        self._cleanup()

    def _cleanup(self) -> None:
        """Stop the worker, then remove the directory once nothing writes to it."""
        if self.worker is not None and not self.worker.ended:
            self.worker.kill()
            return  # worker_ended() comes back here
        if self.workdir is not None:
            path, self.workdir = self.workdir, None
            threads.deferToThread(shutil.rmtree, path, True)

    # -- requests ---------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            log.warn("text frame from {peer}: closing", peer=self.peer)
            self.sendClose(CLOSE_NOT_BINARY, "DISCON messages are binary frames")
            return
        if self._is_duplicate_transfer(payload):
            # The newer client re-sends a transfer whose reply is late; answering
            # both copies would shift every later reply by one call.
            log.info("duplicate file transfer while the first is in flight: answered once")
            return
        self.queue.append(payload)
        if self.current is None:
            self._next()

    def _is_duplicate_transfer(self, payload: bytes) -> bool:
        """An identical transfer already in flight or queued: the client's retry."""
        last = self.queue[-1] if self.queue else self.current
        if last is None or payload != last:
            return False
        try:
            return parse_header(payload, self.factory.max_frame).is_transfer
        except FrameError:
            return False

    def _next(self) -> None:
        if self.current is not None or not self.queue or self.gone:
            return
        if self.workdir is None and self.fatal is None:
            return  # _workdir_ready() calls again
        frame = self.current = self.queue.popleft()
        try:
            h = self.current_header = parse_header(frame, self.factory.max_frame)
        except FrameError as e:
            log.warn("malformed frame from {peer}: {why}", peer=self.peer, why=str(e))
            self.current = None
            self.queue.clear()
            self.sendClose(CLOSE_MALFORMED, f"malformed DISCON frame: {e}"[:120])
            return
        if self.factory.debug_level >= 2:
            log.info("request {h}: {data}", h=h, data=frame.hex())
        if h.is_transfer:
            self._transfer(frame, h)
        elif self.fatal is not None:
            self._reply(error_reply(frame, self.fatal))
        else:
            self.calls += 1
            if self.factory.debug_level:
                log.info("call {n} ({size} bytes)", n=self.calls, size=len(frame))
            self.call_started = reactor.seconds()
            self.worker.send(frame)

    def _transfer(self, frame: bytes, h: Header) -> None:
        try:
            name = check_transfer_name(frame[h.serverpath_offset : h.size])
        except ValueError as e:
            self._reply(transfer_reply(frame, f"refused: {e}", ok=False))
            return
        if self.workdir is None:
            self._reply(transfer_reply(frame, f"refused: {self.fatal}", ok=False))
            return
        content = frame[h.filecontent_offset : h.serverpath_offset]
        d = threads.deferToThread(write_transfer, self.workdir, name, content)
        d.addCallbacks(
            lambda _: transfer_reply(frame, f"file {name} received ({len(content)} bytes)", True),
            lambda f: transfer_reply(frame, f"cannot write {name}: {f.value}", False),
        )
        d.addCallback(self._reply)

    def _reply(self, reply: bytes) -> None:
        self.current = self.current_header = None
        if self.gone:
            return
        if self.factory.debug_level >= 2:
            log.info("reply: {data}", data=reply.hex())
        self.sendMessage(reply, isBinary=True)
        self._next()

    # -- the worker's side ------------------------------------------------------

    def worker_replied(self, reply: bytes) -> None:
        if self.current is None:
            log.error("worker reply with no request outstanding: dropped")
            return
        self._reply(reply)

    def worker_ended(self, exit_code: int | None, sig: int | None) -> None:
        if self.gone:
            self._cleanup()
            return
        where = f"on call {self.calls}" if self.calls else "while loading"
        if sig is not None:
            what = f"the controller crashed with signal {sig} ({signal_name(sig)}) {where}"
        else:
            what = f"the controller exited with code {exit_code} {where}"
        tail = self.worker.tail[-1] if self.worker and self.worker.tail else ""
        if tail:
            what += f"; its last output: {tail}"
        self._fail(what)

    def check_call_time(self, now: float, limit: float) -> None:
        """Called every half second by the factory: a call over the limit fails the session."""
        h = self.current_header
        if (
            self.current is not None
            and h is not None
            and not h.is_transfer
            and self.fatal is None
            and now - self.call_started > limit
        ):
            self._call_timed_out()

    def _call_timed_out(self) -> None:
        self._fail(
            f"the controller did not answer call {self.calls} within "
            f"{self.factory.call_timeout:g} s and was stopped"
        )

    def _fail(self, why: str) -> None:
        """From now on every request, the pending one first, is answered with ``why``."""
        if self.fatal is None:
            self.fatal = why
            log.error("{peer}: {why}", peer=self.peer, why=why)
        if self.worker is not None:
            self.worker.kill()
        if self.current is not None and not (
            self.current_header and self.current_header.is_transfer
        ):
            self._reply(error_reply(self.current, self.fatal))


class DisconServerFactory(WebSocketServerFactory):
    """Holds the server's settings; one :class:`ControllerSession` per connection.

    Call timeouts are checked here twice a second for all sessions, rather than
    with a timer per call: the per-call path only stores a timestamp.
    """

    protocol = ControllerSession

    def __init__(
        self,
        *,
        debug_level: int = 0,
        call_timeout: float = 20.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        workdir_base: str | None = None,
        library_base: str | None = None,
    ) -> None:
        super().__init__()
        self.debug_level = debug_level
        self.call_timeout = call_timeout
        self.max_frame = max_frame
        self.workdir_base = workdir_base or tempfile.gettempdir()
        self.library_base = library_base or os.getcwd()
        self.sessions: set[ControllerSession] = set()
        self._timeouts = task.LoopingCall(self._check_call_times)
        self.setProtocolOptions(
            maxMessagePayloadSize=max_frame,
            maxFramePayloadSize=max_frame,
            tcpNoDelay=True,
            autoFragmentSize=0,
            openHandshakeTimeout=30,
            requireMaskedClientFrames=False,
            failByDrop=False,
        )

    def startFactory(self) -> None:
        super().startFactory()
        if self.call_timeout and not self._timeouts.running:
            self._timeouts.start(min(0.5, self.call_timeout / 4), now=False)

    def stopFactory(self) -> None:
        if self._timeouts.running:
            self._timeouts.stop()
        super().stopFactory()

    def _check_call_times(self) -> None:
        now = reactor.seconds()
        for session in list(self.sessions):
            session.check_call_time(now, self.call_timeout)


# -- twistd plugin entry (twisted_plugins/disconserver.py) ---------------------

from twisted.python import usage  # noqa: E402


class Options(usage.Options):
    """``twistd -n disconserver`` options; defaults can come from the environment
    so that a container's settings need no command line."""

    optParameters = [
        [
            "port",
            "p",
            int(os.environ.get("DISCON_SERVER_PORT", "8080")),
            "TCP port to listen on",
            int,
        ],
        ["host", None, os.environ.get("DISCON_SERVER_HOST", "0.0.0.0"), "interface to listen on"],
        [
            "debug-level",
            "d",
            int(os.environ.get("DISCON_SERVER_DEBUG", "0")),
            "0 quiet, 1 connections and calls, 2 every payload",
            int,
        ],
        [
            "call-timeout",
            None,
            float(os.environ.get("DISCON_CALL_TIMEOUT", "20")),
            "seconds a controller call may take before the session fails (0: no limit)",
            float,
        ],
        ["max-frame", None, DEFAULT_MAX_FRAME, "largest frame accepted, bytes", int],
    ]

    def postOptions(self) -> None:
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"--port {self['port']} is not a TCP port (1-65535)")
        if self["debug-level"] not in (0, 1, 2):
            raise usage.UsageError(f"--debug-level {self['debug-level']} is not 0, 1 or 2")
        if self["call-timeout"] < 0:
            raise usage.UsageError("--call-timeout must be >= 0 seconds")


def makeService(options: Options) -> Any:
    from twisted.application import internet

    factory = DisconServerFactory(
        debug_level=options["debug-level"],
        call_timeout=options["call-timeout"],
        max_frame=options["max-frame"],
    )
    return internet.TCPServer(options["port"], factory, interface=options["host"])
