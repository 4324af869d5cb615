"""The discon-server in real containers from both controller images, over WebSocket.

Nothing about Docker or the server is mocked: the images built by ./build.sh
are started on a network made here, reached by their bridge IPs from the host,
and driven with Autobahn the way the discon-wrapper clients drive them, in
both wire versions. What is checked is what PROTOCOL.md says an OpenFAST user
depends on: one reply per request, in order, of the request's exact shape;
every failure on the controller side delivered as aviFAIL -1 with a readable
avcMSG (never an HTTP error nobody sees); v2 file transfers that land in a
per-connection directory which goes away with the connection; sessions that
cannot disturb each other; and replies that are bit-identical to calling the
same library in-process.

Containers are shared per module where per-connection state makes sharing
safe (each connection gets its own worker and library copy), and fresh where a
test inspects the whole container (its /tmp, its processes). Every container
and the network are removed by fixture finalizers, also on failure.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import docker
import docker.errors
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from docker.models.containers import Container
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater

from discon_manager.controller.library import Controller
from discon_manager.protocol import (
    TRANSFER_REPLY_MSG_SIZE,
    V1,
    V2,
    Message,
    decode,
    encode,
    parse_header,
    server_file_name,
    transfer_request,
)

pytestmark = pytest.mark.docker

IMAGE_DEFAULT = "discon-server:latest"
IMAGE_NREL = "discon-server-nrel5mw:latest"
NETWORK = "discon-test-net-server"
PORT = 8080
DEFAULT_LIB, DEFAULT_PROC = "libtest_discon.so", "discon"
NREL_LIB, NREL_PROC = "libnrel5mw.so", "DISCON"
VERSIONS = [pytest.param(V1, id="v1"), pytest.param(V2, id="v2")]

# OpenFAST's legacy interface sizes (PROTOCOL.md).
OF_SWAP, OF_MSG, OF_OUTNAME = 464, 8197, 12601
DT = 0.0125


# -- containers ----------------------------------------------------------------------


@dataclass
class Server:
    """A running discon-server container and how to reach it from the host."""

    container: Container
    ip: str

    def sh(self, command: str) -> str:
        """Run a shell command in the container (as its own user) and return stdout."""
        code, out = self.container.exec_run(["sh", "-c", command], demux=True)
        stdout = (out[0] or b"").decode() if out else ""
        assert code == 0, f"{command!r} failed ({code}): {out}"
        return stdout

    def tmp_entries(self) -> list[str]:
        """Everything in the container's /tmp, where session directories live."""
        return sorted(self.sh("ls -A /tmp").split())

    def log_count(self, text: str) -> int:
        """How many lines of the container's log contain ``text``."""
        logs = self.container.logs().decode(errors="replace")
        return sum(text in line for line in logs.splitlines())

    def worker_count(self) -> int:
        """Worker processes alive in the container (one per open connection)."""
        out = self.sh("grep -l -a 'controller[.]worker' /proc/[0-9]*/cmdline 2>/dev/null || true")
        return len(out.split())


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.ping()
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def network(docker_client: docker.DockerClient) -> Iterator[str]:
    """A bridge network of this module's own; removed at the end only if made here."""
    try:
        docker_client.networks.get(NETWORK)
        created = None
    except docker.errors.NotFound:
        created = docker_client.networks.create(NETWORK, driver="bridge")
    try:
        yield NETWORK
    finally:
        if created is not None:
            # still in use (a container of ours not yet gone): the next run reuses it
            with contextlib.suppress(docker.errors.APIError):
                created.remove()


def _remove(container: Container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def _wait_ready(container: Container, ip: str, timeout: float = 30.0) -> None:
    """Poll a TCP connect in short steps until the server listens (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, PORT), timeout=0.5):
                return
        except OSError:
            pass
        container.reload()
        if container.status not in ("created", "running"):
            logs = container.logs(tail=30).decode(errors="replace")
            raise AssertionError(f"{container.name} is {container.status}:\n{logs}")
        if time.monotonic() > deadline:
            logs = container.logs(tail=30).decode(errors="replace")
            raise AssertionError(
                f"{container.name} not listening on {PORT} within {timeout} s:\n{logs}"
            )
        time.sleep(0.05)


class Launcher:
    """Starts containers on the test network; every one is removed by the owning fixture."""

    def __init__(self, client: docker.DockerClient, network: str) -> None:
        self.client = client
        self.network = network
        self.started: list[Container] = []

    def create(self, image: str, tag: str, env: dict[str, str] | None = None) -> Container:
        container = self.client.containers.create(
            image,
            name=f"discon-controller-test-{tag}-{uuid.uuid4().hex[:8]}",
            environment=env or {},
            network=self.network,
            detach=True,
        )
        self.started.append(container)  # registered before start: removed even if start fails
        container.start()
        return container

    def ready(self, container: Container) -> Server:
        container.reload()
        ip = container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        _wait_ready(container, ip)
        return Server(container, ip)

    def start(self, image: str, tag: str, env: dict[str, str] | None = None) -> Server:
        return self.ready(self.create(image, tag, env))

    def remove_all(self) -> None:
        for container in self.started:
            _remove(container)
        self.started.clear()


@pytest.fixture(scope="module")
def shared_servers(docker_client: docker.DockerClient, network: str) -> Iterator[dict[str, Server]]:
    """The module's long-lived containers, started together so their start-ups overlap."""
    launcher = Launcher(docker_client, network)
    try:
        pending = {
            "default": launcher.create(IMAGE_DEFAULT, "default"),
            "nrel5mw": launcher.create(IMAGE_NREL, "nrel5mw"),
            "timeout": launcher.create(IMAGE_DEFAULT, "timeout", {"DISCON_CALL_TIMEOUT": "2"}),
        }
        yield {key: launcher.ready(c) for key, c in pending.items()}
    finally:
        launcher.remove_all()


@pytest.fixture
def default_server(shared_servers: dict[str, Server]) -> Server:
    return shared_servers["default"]


@pytest.fixture
def nrel_server(shared_servers: dict[str, Server]) -> Server:
    return shared_servers["nrel5mw"]


@pytest.fixture
def timeout_server(shared_servers: dict[str, Server]) -> Server:
    """A default-image container with DISCON_CALL_TIMEOUT=2 in its environment."""
    return shared_servers["timeout"]


@pytest.fixture
def fresh_server(docker_client: docker.DockerClient, network: str) -> Iterator[Server]:
    """A container of this test alone, for tests that inspect the whole container."""
    launcher = Launcher(docker_client, network)
    try:
        yield launcher.start(IMAGE_DEFAULT, "fresh")
    finally:
        launcher.remove_all()


# -- a WebSocket client like discon-client ------------------------------------------


class _ClientProtocol(WebSocketClientProtocol):
    session: WsSession

    def onOpen(self) -> None:
        self.factory.session._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.session.inbox.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.session._closed(wasClean, code, reason)


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientProtocol
    session: WsSession

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.session._failed(reason)


#: Every session opened by a test; the autouse fixture aborts what is left open.
_open_sessions: list[WsSession] = []


class WsSession:
    """One client connection: send frames, await replies in order, see it close."""

    def __init__(self) -> None:
        self.proto: _ClientProtocol | None = None
        self.opened: Deferred[WsSession] = Deferred()
        self.close_info: tuple[bool, int | None, str | None] | None = None
        self._close_waiters: list[Deferred[tuple[bool, int | None, str | None]]] = []
        self.inbox: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()

    def _opened(self, proto: _ClientProtocol) -> None:
        self.proto = proto
        self.opened.callback(self)

    def _failed(self, reason: Any) -> None:
        if not self.opened.called:
            self.opened.errback(reason)

    def _closed(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake refused: {code} {reason}"))
        self.close_info = (was_clean, code, reason)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(self.close_info)

    def send(self, frame: bytes, binary: bool = True) -> None:
        assert self.proto is not None
        self.proto.sendMessage(frame, isBinary=binary)

    async def recv(self, timeout: float = 10.0) -> bytes:
        d = self.inbox.get()
        d.addTimeout(timeout, reactor)
        payload, is_binary = await d
        assert is_binary, "the server answered with a text frame"
        return payload

    async def call(self, frame: bytes, timeout: float = 10.0) -> bytes:
        """One request, one reply; the reply must have the request's exact shape."""
        self.send(frame)
        reply = await self.recv(timeout)
        if not parse_header(frame).is_transfer:
            assert_same_shape(frame, reply)
        return reply

    async def wait_closed(self, timeout: float = 10.0) -> tuple[bool, int | None, str | None]:
        """(wasClean, code, reason) once the connection is closed, whoever closed it."""
        if self.close_info is not None:
            return self.close_info
        d: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self._close_waiters.append(d)
        d.addTimeout(timeout, reactor)
        return await d

    async def close(self) -> None:
        if self.proto is not None and self.close_info is None:
            self.proto.sendClose(1000)
            await self.wait_closed()

    def abort(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()


async def connect(
    server: Server, path: str | None = DEFAULT_LIB, proc: str | None = DEFAULT_PROC
) -> WsSession:
    """Dial ws://IP:8080/ws?path=..&proc=.. exactly as discon-client builds the URL."""
    query = {k: v for k, v in (("path", path), ("proc", proc)) if v is not None}
    url = f"ws://{server.ip}:{PORT}/ws?{urlencode(query)}"
    factory = _ClientFactory(url)
    factory.setProtocolOptions(
        tcpNoDelay=True, autoFragmentSize=0, maxMessagePayloadSize=0, openHandshakeTimeout=10
    )
    session = WsSession()
    factory.session = session
    _open_sessions.append(session)
    reactor.connectTCP(server.ip, PORT, factory, timeout=5)
    session.opened.addTimeout(10, reactor)
    return await session.opened


@pytest.fixture(autouse=True)
def _abort_leftover_sessions() -> Iterator[None]:
    """A failing test must not leave connections (and so workers) behind."""
    yield
    while _open_sessions:
        _open_sessions.pop().abort()


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``check`` in short steps, letting the reactor run in between."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await sleep(0.05)


# -- frames --------------------------------------------------------------------------


def request(
    version: int,
    records: dict[int, float] | None = None,
    *,
    infile: bytes = b"",
    n_swap: int = 165,
    n_msg: int = 256,
    n_outname: int = 32,
    status: float = 1.0,
    fail: int = 0,
) -> bytes:
    """A DISCON call as the client builds it: sizes in records 49, 50, 64 and 129."""
    swap = array("f", [0.0] * n_swap)
    sizes = {1: status, 49: n_msg, 50: len(infile) + 1, 64: n_outname, 129: n_swap}
    for record, value in {**sizes, **(records or {})}.items():
        if record <= n_swap:
            swap[record - 1] = value
    return encode(
        Message(
            swap=swap,
            fail=fail,
            infile=infile + b"\0",
            outname=b"\0" * n_outname,
            msg=b"\0" * n_msg,
            version=version,
        )
    )


def assert_same_shape(req: bytes, reply: bytes) -> None:
    """PROTOCOL.md: a reply of another size is silently not copied back by the client."""
    assert len(reply) == len(req)
    assert parse_header(reply) == parse_header(req)


def rec(reply: bytes, record: int) -> float:
    return decode(reply).swap[record - 1]


def f32(x: float) -> float:
    return array("f", [x])[0]


# -- the test-discon contract --------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_contract_counts_calls_doubles_record_20(
    default_server: Server, version: int
) -> None:
    """aviFAIL 0, "DISCON called N times", record 47 = 2 x record 20, others echoed."""
    s = await connect(default_server)
    for n, speed in enumerate([10.5, -3.25, 1.0e6, 0.0, 123.456], start=1):
        req = request(version, {20: speed, 10: 42.0, 100: -7.5}, fail=5)
        reply = decode(await s.call(req))
        assert reply.version == version
        assert reply.fail == 0
        assert reply.text == f"DISCON called {n} times"
        assert reply.swap[46] == f32(2 * f32(speed))
        assert reply.swap[119] == -1.0  # no input file named
        assert reply.swap[9] == 42.0 and reply.swap[99] == -7.5  # untouched records echoed
        assert reply.outname == b"\0" * 32
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_contract_record_120_is_infile_size(default_server: Server, version: int) -> None:
    """accINFILE is opened in the session's directory, which holds the session's own copy
    of the library (under a dot-name no transfer can take) and the image's data files."""
    size = int(default_server.sh(f"stat -c %s /opt/controller/{DEFAULT_LIB}"))
    s = await connect(default_server)
    reply = await s.call(request(version, infile=b".discon-" + DEFAULT_LIB.encode()))
    assert rec(reply, 120) == size
    reply = await s.call(request(version, infile=b"no-such-file.in"))
    assert rec(reply, 120) == -1.0
    assert decode(reply).text == "DISCON called 2 times"
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_openfast_sized_frames_keep_their_sizes(default_server: Server, version: int) -> None:
    """464 records, 8197-byte avcMSG, 12601-byte avcOUTNAME: ~23 KB each way, shape kept."""
    s = await connect(default_server)
    for n in range(1, 4):
        req = request(version, {20: 2.5 * n}, n_swap=OF_SWAP, n_msg=OF_MSG, n_outname=OF_OUTNAME)
        reply = decode(await s.call(req))
        sizes = (len(reply.swap), len(reply.msg), len(reply.outname))
        assert sizes == (OF_SWAP, OF_MSG, OF_OUTNAME)
        assert reply.text == f"DISCON called {n} times"
        assert reply.swap[46] == 5.0 * n
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_short_swap_and_tiny_msg(default_server: Server, version: int) -> None:
    """nSwap below 165 (the server pads for the controller, the reply stays short), nMsg = 1."""
    s = await connect(default_server)
    reply = decode(await s.call(request(version, {20: 3.0}, n_swap=60, n_msg=1, n_outname=0)))
    assert len(reply.swap) == 60 and reply.msg == b"\0" and reply.outname == b""
    assert reply.fail == 0 and reply.swap[46] == 6.0
    reply = decode(await s.call(request(version, {20: 3.0}, n_swap=60, n_msg=12)))
    assert reply.msg == b"DISCON call\0"  # cut to record 49 bytes with its NUL
    # 10 records: record 49 is in the padding (0), so the controller writes no message
    reply = decode(await s.call(request(version, n_swap=10, n_msg=40)))
    assert len(reply.swap) == 10 and reply.msg == b"\0" * 40 and reply.fail == 0
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_hook_668_requested_failure(default_server: Server, version: int) -> None:
    """A controller's own aviFAIL -1 is passed through, and the session goes on."""
    s = await connect(default_server)
    await s.call(request(version))
    reply = decode(await s.call(request(version, {119: 668.0})))
    assert reply.fail == -1
    assert reply.text == "requested failure"
    reply = decode(await s.call(request(version)))
    assert reply.fail == 0 and reply.text == "DISCON called 3 times"
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_hook_666_crash_is_reported_as_avifail(default_server: Server, version: int) -> None:
    """A segfaulting controller: aviFAIL -1 naming the signal and the call, in the reply's shape."""
    s = await connect(default_server)
    await s.call(request(version))
    await s.call(request(version))
    reply = decode(await s.call(request(version, {119: 666.0})))
    assert reply.fail == -1
    assert "the controller crashed with signal 11 (SIGSEGV) on call 3" in reply.text
    # the session stays failed: every later call says why, still in the right shape
    later = decode(await s.call(request(version, n_msg=OF_MSG)))
    assert later.fail == -1 and "signal 11 (SIGSEGV) on call 3" in later.text
    await s.close()
    # and the server itself goes on
    s2 = await connect(default_server)
    reply = decode(await s2.call(request(version)))
    assert reply.fail == 0 and reply.text == "DISCON called 1 times"
    await s2.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_hook_667_hang_times_out(timeout_server: Server, version: int) -> None:
    """DISCON_CALL_TIMEOUT=2: a hanging call is answered after ~2 s, not after 30 s."""
    s = await connect(timeout_server)
    assert decode(await s.call(request(version))).fail == 0
    started = time.monotonic()
    reply = decode(await s.call(request(version, {119: 667.0}), timeout=15))
    elapsed = time.monotonic() - started
    assert reply.fail == -1
    assert "did not answer call 2 within 2 s" in reply.text
    assert 1.5 <= elapsed < 10, elapsed
    await s.close()


# -- v2 file transfer ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_transfer_then_call_sees_the_file(default_server: Server) -> None:
    """Transfer reply: nSwap 1, fail 0, 256-byte msg; then record 120 = the file's size."""
    content = b"! controller input\n" + bytes(range(256)) * 7
    name = server_file_name("controller.in", content)
    s = await connect(default_server)
    req = transfer_request(name, content)
    raw = await s.call(req)
    reply = decode(raw)
    assert reply.version == V2
    assert len(reply.swap) == 1
    assert reply.fail == 0
    assert len(reply.msg) == TRANSFER_REPLY_MSG_SIZE
    assert name in reply.text and "received" in reply.text
    found = default_server.sh(f"find /tmp -name {name} -type f -exec stat -c %s {{}} +").split()
    assert found == [str(len(content))]
    infile = name.encode()
    call = decode(await s.call(request(V2, infile=infile)))
    assert call.fail == 0
    assert call.text == "DISCON called 1 times"  # a transfer is not a DISCON call
    assert call.swap[119] == len(content)
    assert call.swap[49] == len(infile) + 1
    await s.close()


REFUSED_NAMES = [
    "sub/zq9evil.in",
    "../zq9evil.in",
    "..zq9evil.in",
    "~zq9evil.in",
    "$zq9evil.in",
    "zq9evil|x.in",
    "zq9evil;x.in",
    "zq9evil&x.in",
    "zq9evil\\x.in",
]


@pytest.mark.parametrize("bad", REFUSED_NAMES)
@pytest_twisted.ensureDeferred
async def test_transfer_refused_names(default_server: Server, bad: str) -> None:
    """Path separators, .., ~, $, |, ;, & and backslash: fail 1, nothing written anywhere."""
    s = await connect(default_server)
    reply = decode(await s.call(transfer_request(bad, b"payload of a refused file")))
    assert reply.version == V2 and len(reply.swap) == 1
    assert reply.fail == 1
    assert len(reply.msg) == TRANSFER_REPLY_MSG_SIZE
    assert "refused" in reply.text
    written = default_server.sh("find / -xdev -name '*zq9evil*' 2>/dev/null || true")
    assert written.strip() == ""
    # the session is unharmed and the name does not open anything
    call = decode(await s.call(request(V2, infile=bad.encode())))
    assert call.fail == 0 and call.text == "DISCON called 1 times"
    assert call.swap[119] == -1.0
    await s.close()


@pytest_twisted.ensureDeferred
async def test_duplicate_transfer_in_flight_is_answered_once(default_server: Server) -> None:
    """The client's retry of a late transfer must not shift every later reply by one."""
    content = b"gains 1 2 3\n" * 20
    name = server_file_name("dup.in", content)
    frame = transfer_request(name, content)
    s = await connect(default_server)
    # as the client does: the additional files first, then the primary one; this also
    # makes the first copy of the primary "in flight" (being written) when the second
    # arrives, rather than still queued behind the session's set-up
    extra = b"table\n" * 10
    assert decode(await s.call(transfer_request(server_file_name("t.dat", extra), extra))).fail == 0
    dropped_before = default_server.log_count("duplicate file transfer")
    s.send(frame)
    s.send(frame)  # same reactor turn: arrives while the first is being written
    call1 = request(V2, {20: 1.0}, infile=name.encode())
    s.send(call1)
    first = decode(await s.recv())
    assert first.fail == 0 and len(first.swap) == 1 and name in first.text
    second = await s.recv()
    assert_same_shape(call1, second)
    assert decode(second).text == "DISCON called 1 times"
    assert decode(second).swap[119] == len(content)
    # and it was the server's duplicate check that dropped the copy, not luck
    assert default_server.log_count("duplicate file transfer") == dropped_before + 1
    # identical DISCON calls are two calls, not duplicates
    call2 = request(V2, {20: 1.0}, infile=name.encode())
    s.send(call2)
    s.send(call2)
    assert decode(await s.recv()).text == "DISCON called 2 times"
    assert decode(await s.recv()).text == "DISCON called 3 times"
    await sleep(0.3)
    assert not s.inbox.pending, "an extra reply arrived: later replies would be shifted"
    await s.close()


@pytest_twisted.ensureDeferred
async def test_files_and_workdir_removed_on_close(fresh_server: Server) -> None:
    """A session's directory, its transferred files and its worker go with the connection."""
    assert fresh_server.tmp_entries() == []
    content = b"x" * 1000
    name = server_file_name("cleanup.in", content)
    s = await connect(fresh_server)
    assert decode(await s.call(transfer_request(name, content))).fail == 0
    assert decode(await s.call(request(V2, infile=name.encode()))).swap[119] == 1000
    entries = fresh_server.tmp_entries()
    assert len(entries) == 1 and entries[0].startswith("session-")
    inside = fresh_server.sh(f"ls -A /tmp/{entries[0]}").split()
    assert name in inside and ".discon-" + DEFAULT_LIB in inside
    assert fresh_server.worker_count() == 1
    await s.close()
    await eventually(lambda: fresh_server.tmp_entries() == [], what="/tmp to be emptied")
    await eventually(lambda: fresh_server.worker_count() == 0, what="the worker to end")


# -- isolation and failures on the controller side -----------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_crash_isolation(default_server: Server, version: int) -> None:
    """Two sessions on one container: one crashes, the other keeps its own call count."""
    a = await connect(default_server)
    b = await connect(default_server)
    for _ in range(3):
        await a.call(request(version))
    for _ in range(2):
        await b.call(request(version))
    crashed = decode(await a.call(request(version, {119: 666.0})))
    assert crashed.fail == -1 and "SIGSEGV) on call 4" in crashed.text
    reply = decode(await b.call(request(version)))
    assert reply.fail == 0 and reply.text == "DISCON called 3 times"
    await a.close()
    await b.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_missing_library_is_an_avifail(default_server: Server, version: int) -> None:
    """path=nope.so: the handshake succeeds and the call says what is wrong."""
    s = await connect(default_server, path="nope.so", proc=DEFAULT_PROC)
    for _ in range(2):
        reply = decode(await s.call(request(version, n_msg=1024)))
        assert reply.fail == -1
        assert "nope.so" in reply.text and "does not exist" in reply.text
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_missing_symbol_lists_exports(default_server: Server, version: int) -> None:
    """proc=DISCON on the default image: the message names what the library does export."""
    s = await connect(default_server, path=DEFAULT_LIB, proc="DISCON")
    reply = decode(await s.call(request(version, n_msg=1024)))
    assert reply.fail == -1
    assert "no symbol 'DISCON'" in reply.text
    assert "discon" in reply.text.split("exports", 1)[1]
    await s.close()


@pytest.mark.parametrize("proc", ["system", "abort", "exit", "printf"])
@pytest_twisted.ensureDeferred
async def test_proc_must_be_the_librarys_own_function(default_server: Server, proc: str) -> None:
    """dlsym would also find libc's functions: proc=system must not run a command."""
    s = await connect(default_server, path=DEFAULT_LIB, proc=proc)
    t0 = time.monotonic()
    frame = bytearray(request(V2, n_msg=1024))
    frame[24 : 24 + 8] = b"sleep 3\0"  # what system() would run from avrSWAP
    reply = decode(await s.call(bytes(frame)))
    assert time.monotonic() - t0 < 2
    assert reply.fail == -1
    assert f"has no symbol '{proc}'; it exports discon" in reply.text
    await s.close()


@pytest_twisted.ensureDeferred
async def test_transfer_cannot_replace_the_library(default_server: Server) -> None:
    """A transferred file named like the library does not become the code that runs."""
    s = await connect(default_server)
    reply = decode(await s.call(transfer_request(DEFAULT_LIB, b"\x7fELF not a library")))
    assert reply.fail == 0
    call = decode(await s.call(request(V2)))
    assert call.fail == 0
    assert call.text == "DISCON called 1 times"
    await s.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_missing_path_parameter_is_an_avifail(default_server: Server, version: int) -> None:
    """No path= at all: still a WebSocket, still an answer the user can read."""
    s = await connect(default_server, path=None, proc=None)
    reply = decode(await s.call(request(version, n_msg=1024)))
    assert reply.fail == -1 and "DISCON_LIB_PATH" in reply.text
    await s.close()


# -- nrel5mw -------------------------------------------------------------------------


def nrel_request(
    version: int, infile: bytes, status: float, speed: float, pitch: float = 0.0
) -> bytes:
    return request(
        version,
        {3: DT, 4: pitch, 33: pitch, 34: pitch, 20: speed},
        infile=infile,
        status=status,
        n_swap=OF_SWAP,
        n_msg=1024,
        n_outname=64,
    )


@pytest_twisted.ensureDeferred
async def test_nrel5mw_with_image_infile_v1(nrel_server: Server) -> None:
    """A v1 client cannot transfer files: accINFILE "DISCON.IN" is the image's copy."""
    s = await connect(nrel_server, path=NREL_LIB, proc=NREL_PROC)
    reply = decode(await s.call(nrel_request(V1, b"DISCON.IN", 0.0, 100.0)))
    assert reply.fail == 0, reply.text
    assert reply.swap[46] == pytest.approx(2.332287 * 100.0**2, rel=1e-6)  # region 2: k w^2
    assert reply.swap[34] == 1.0  # generator contactor
    reply = decode(await s.call(nrel_request(V1, b"DISCON.IN", 1.0, 100.0)))
    assert reply.fail == 0 and reply.swap[46] == pytest.approx(23322.87, rel=1e-6)
    await s.close()


@pytest_twisted.ensureDeferred
async def test_nrel5mw_with_transferred_infile_v2(
    nrel_server: Server, nrel5mw_infile: Path
) -> None:
    """The transferred file, not the image's, sets the gains: VS_Rgn2K 3.0 gives 3 w^2."""
    lines = nrel5mw_infile.read_text().splitlines(keepends=True)
    edited = [
        "3.0           VS_Rgn2K     ! edited for the test\n" if " VS_Rgn2K " in line else line
        for line in lines
    ]
    assert edited != lines
    content = "".join(edited).encode()
    name = server_file_name("DISCON.IN", content)
    s = await connect(nrel_server, path=NREL_LIB, proc=NREL_PROC)
    assert decode(await s.call(transfer_request(name, content))).fail == 0
    reply = decode(await s.call(nrel_request(V2, name.encode(), 0.0, 100.0)))
    assert reply.fail == 0, reply.text
    assert reply.swap[46] == pytest.approx(3.0 * 100.0**2, rel=1e-6)
    await s.close()


# -- malformed input and abrupt clients ------------------------------------------------


def _malformed_frames() -> list[Any]:
    good = request(V2, {20: 1.0})
    return [
        pytest.param(b"\x01\x00\x00", id="too-short"),
        pytest.param(good[:-1], id="one-byte-short"),
        pytest.param(good + b"\0", id="one-byte-long"),
        pytest.param(encode(Message(swap=array("f"), msg=b"\0" * 8, version=V1)), id="nswap-0"),
        pytest.param(encode(Message(swap=array("f", [1.0]), msg=b"", version=V2)), id="nmsg-0"),
        pytest.param(struct.pack("<6I", 2**32 - 1, 0, 0, 1, 0, 0) + b"\0" * 64, id="huge-nswap"),
    ]


@pytest.mark.parametrize("frame", _malformed_frames())
@pytest_twisted.ensureDeferred
async def test_malformed_frame_closes_only_that_connection(
    default_server: Server, frame: bytes
) -> None:
    """No reply of the right shape exists, so that connection is closed; the server goes on.

    The close code is not checked: the server asks Autobahn for 1007, which Autobahn
    refuses to send (see the report), so the TCP connection is dropped instead. The
    malformed frame is sent after a first call: sent before the session's directory
    exists, the same exception leaves the connection open and unanswered.
    """
    bystander = await connect(default_server)
    await bystander.call(request(V1))
    s = await connect(default_server)
    await s.call(request(V2))
    s.send(frame)
    await s.wait_closed(timeout=5)
    assert not s.inbox.pending  # closed without a reply
    reply = decode(await bystander.call(request(V1)))
    assert reply.text == "DISCON called 2 times"
    s2 = await connect(default_server)
    assert decode(await s2.call(request(V2))).text == "DISCON called 1 times"
    await bystander.close()
    await s2.close()


@pytest_twisted.ensureDeferred
async def test_text_frame_closes_the_connection_not_the_server(default_server: Server) -> None:
    """DISCON messages are binary; a text frame ends that connection (code: see above)."""
    s = await connect(default_server)
    await s.call(request(V1))
    s.send(b"hello", binary=False)
    await s.wait_closed(timeout=5)
    assert not s.inbox.pending
    s2 = await connect(default_server)
    assert decode(await s2.call(request(V1))).fail == 0
    await s2.close()


@pytest_twisted.ensureDeferred
async def test_abrupt_disconnects(fresh_server: Server) -> None:
    """Aborted mid-call, mid-hang and mid-frame: workers end, directories go, service goes on."""
    # right after sending a call
    s = await connect(fresh_server)
    s.send(request(V2, {20: 1.0}))
    s.abort()
    # while the controller hangs in a 30 s call
    s = await connect(fresh_server)
    await s.call(request(V1))
    s.send(request(V1, {119: 667.0}))
    await eventually(lambda: fresh_server.worker_count() >= 1, what="a worker")
    await sleep(0.2)
    s.abort()
    # in the middle of a frame: a WebSocket header announcing 1 MB, then half of it
    s = await connect(fresh_server)
    await s.call(request(V2))
    payload = request(V2, n_swap=OF_SWAP, n_msg=OF_MSG, n_outname=1_000_000)
    assert s.proto is not None and s.proto.transport is not None
    s.proto.transport.write(b"\x82\x7f" + struct.pack(">Q", len(payload)))
    s.proto.transport.write(payload[: len(payload) // 2])
    await sleep(0.2)
    s.abort()
    await eventually(lambda: fresh_server.worker_count() == 0, what="workers to be killed")
    await eventually(lambda: fresh_server.tmp_entries() == [], what="/tmp to be emptied")
    s = await connect(fresh_server)
    reply = decode(await s.call(request(V2, {20: 4.0})))
    assert reply.fail == 0 and reply.text == "DISCON called 1 times" and reply.swap[46] == 8.0
    await s.close()
    fresh_server.container.reload()
    assert fresh_server.container.status == "running"


# -- bit-identical to an in-process call -------------------------------------------


def fresh_controller(lib: Path, tmp_path: Path, proc: str) -> Controller:
    """A copy of the library under a new name: a new dlopen, so fresh static state."""
    copy = tmp_path / f"{uuid.uuid4().hex[:8]}-{lib.name}"
    shutil.copy2(lib, copy)
    return Controller(str(copy), proc)


def in_process(ctrl: Controller, frames: list[bytes]) -> list[bytes]:
    replies = []
    for frame in frames:
        buf = bytearray(frame)
        ctrl.call_frame(buf, parse_header(buf))
        replies.append(bytes(buf))
    return replies


def random_default_frames(rng: random.Random, version: int, count: int) -> list[bytes]:
    """Calls with random bit patterns in most records (NaNs included), sizes that vary."""
    frames = []
    for i in range(count):
        last = i == count - 1  # sized so that its message can be checked
        n_swap = 165 if last else rng.choice([40, 165, OF_SWAP])
        n_msg = 256 if last else rng.choice([1, 17, 256, OF_MSG])
        swap = array("f")
        swap.frombytes(struct.pack(f"<{n_swap}I", *(rng.getrandbits(32) for _ in range(n_swap))))
        controls = {1: 0.0 if i == 0 else 1.0, 49: n_msg, 50: 1, 64: 8, 119: 0.0, 129: n_swap}
        for record, value in controls.items():
            if record <= n_swap:
                swap[record - 1] = value
        frames.append(
            encode(
                Message(
                    swap=swap,
                    fail=rng.randint(-5, 5),
                    infile=b"\0",
                    outname=bytes(rng.getrandbits(8) for _ in range(8)),
                    msg=bytes(rng.getrandbits(8) for _ in range(n_msg)),
                    version=version,
                )
            )
        )
    return frames


async def through_server(server: Server, path: str, proc: str, frames: list[bytes]) -> list[bytes]:
    s = await connect(server, path=path, proc=proc)
    replies = [await s.call(frame) for frame in frames]
    await s.close()
    return replies


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_default_replies_bit_identical_to_in_process(
    default_server: Server, controller_libs: dict[str, Path], tmp_path: Path, version: int
) -> None:
    frames = random_default_frames(random.Random(20240 + version), version, 200)
    remote = await through_server(default_server, DEFAULT_LIB, DEFAULT_PROC, frames)
    local = in_process(fresh_controller(controller_libs["default"], tmp_path, "discon"), frames)
    assert decode(remote[-1]).text == "DISCON called 200 times"
    for i, (r, loc) in enumerate(zip(remote, local, strict=True)):
        assert r == loc, f"call {i + 1} differs"


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_nrel5mw_replies_bit_identical_to_in_process(
    nrel_server: Server,
    controller_libs: dict[str, Path],
    nrel5mw_infile: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    version: int,
) -> None:
    """A stateful Fortran controller over a gusty run: every reply byte the same."""
    rng = random.Random(5 + version)
    frames = []
    speed, pitch = 100.0, 0.0
    for i in range(200):
        speed = min(max(speed + rng.uniform(-3.0, 3.5), 60.0), 135.0)
        pitch = min(max(pitch + rng.uniform(-0.01, 0.012), 0.0), 0.3)
        frames.append(nrel_request(version, b"DISCON.IN", 0.0 if i == 0 else 1.0, speed, pitch))
    remote = await through_server(nrel_server, NREL_LIB, NREL_PROC, frames)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    shutil.copy2(nrel5mw_infile, workdir / "DISCON.IN")
    monkeypatch.chdir(workdir)  # the controller opens accINFILE relative to its cwd
    local = in_process(fresh_controller(controller_libs["nrel5mw"], tmp_path, "DISCON"), frames)
    assert all(decode(r).fail == 0 for r in remote), decode(remote[0]).text
    torques = {decode(r).swap[46] for r in remote}
    assert len(torques) > 50  # the run actually moved through the torque curve
    for i, (r, loc) in enumerate(zip(remote, local, strict=True)):
        assert r == loc, f"call {i + 1} differs"
