"""DisconManager end to end: a real ``twistd disconmanager``, the real Docker engine.

Nothing about Docker is mocked. Every test starts (or shares) a manager
subprocess from :class:`tests.support.ManagerProcess`, dials it with a real
Autobahn client the way the discon-wrapper clients do, and checks what a user
or an operator would see: which controller answered, the aviFAIL -1 line in
avcMSG when something goes wrong, the containers on the engine (their labels,
limits and removal) and the management endpoints.

Managers are shared per module where the tests only add and remove sessions
of their own (each test waits until its containers are gone, so the next one
starts from an empty instance), and started per test where the configuration
or the process itself is what is tested.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import docker
import docker.errors
import pytest
import pytest_twisted
from docker.models.containers import Container
from twisted.internet import defer, reactor, threads

from discon_manager.protocol import (
    V1,
    V2,
    Message,
    decode,
    parse_header,
    server_file_name,
    transfer_request,
)
from tests.support import (
    DEFAULT_CATALOGUE,
    PREFIX,
    TEST_NETWORK,
    ManagerProcess,
    WsClient,
    eventually,
    http_json,
    openfast_frame,
    sleep,
)

pytestmark = pytest.mark.docker

VERSIONS = [pytest.param(V1, id="v1"), pytest.param(V2, id="v2")]

EXITS_IMAGE = "discon-test-exits:latest"
SLEEPS_IMAGE = "discon-test-sleeps:latest"
NO_IMAGE = "discon-no-such-image:latest"

L_MANAGER = "org.discon.manager"
L_SESSION = "org.discon.session"
L_CONTROLLER = "org.discon.session.controller"
L_CLIENT = "org.discon.session.client"
L_RUN = "org.discon.manager.run"

#: docker.cleanup_timeout of ManagerProcess's test configuration.
CLEANUP_TIMEOUT = 5.0
#: nrel5mw in region 2 answers generator torque k * w^2 with k = 2.332287 (its DISCON.IN).
NREL_K = 2.332287


def entry(cid: str, image: str = "discon-server:latest", **extra: Any) -> dict[str, Any]:
    """A catalogue entry running test-discon (or ``image``) under another id."""
    return {
        "id": cid,
        "name": f"test entry {cid}",
        "version": "1.0.0",
        "image": image,
        "library_path": "libtest_discon.so",
        "proc_name": "discon",
        "ports": {"internal": 8080, "external": 0},
        **extra,
    }


# -- Docker ------------------------------------------------------------------------

_client: docker.DockerClient | None = None


def engine() -> docker.DockerClient:
    """One SDK client for the whole module (docker.from_env asks the engine its version)."""
    global _client
    if _client is None:
        _client = docker.from_env()
    return _client


def ours(instance: str, **labels: str) -> list[dict[str, Any]]:
    """Containers of a manager instance (running or not), as the engine lists them.

    The plain list call (one request, no per-container inspect) cannot trip over
    a container that is being removed meanwhile.
    """
    wanted = [f"{L_MANAGER}={instance}"] + [f"{k}={v}" for k, v in labels.items()]
    return engine().api.containers(all=True, filters={"label": wanted})


def name_of(listed: dict[str, Any]) -> str:
    return listed["Names"][0].lstrip("/")


def address(client: WsClient) -> str:
    """The client's own ``host:port``, as the manager sees it (its peer)."""
    assert client.proto is not None and client.proto.transport is not None
    host = client.proto.transport.getHost()
    return f"{host.host}:{host.port}"


def same_client(label: str, client_address: str) -> bool:
    """The org.discon.session.client label is Autobahn's peer: ``tcp4:HOST:PORT``."""
    return label.split(":", 1)[-1] == client_address


def containers_for(m: ManagerProcess, client_address: str) -> list[dict[str, Any]]:
    return [c for c in ours(m.instance) if same_client(c["Labels"][L_CLIENT], client_address)]


def container_of(m: ManagerProcess, client: WsClient) -> Container:
    """The one container of a live session, inspected."""
    found = containers_for(m, address(client))
    assert len(found) == 1, f"expected one container for {address(client)}, found {found}"
    return engine().containers.get(found[0]["Id"])


async def none_left(m: ManagerProcess, timeout: float = 15.0, **labels: str) -> None:
    await eventually(lambda: not ours(m.instance, **labels), timeout=timeout)


async def removal_time(m: ManagerProcess, client_address: str, since: float) -> float:
    """Seconds from ``since`` until the client's container is gone from the engine."""
    await eventually(lambda: not containers_for(m, client_address), timeout=30, step=0.05)
    return time.monotonic() - since


# -- HTTP and metrics ---------------------------------------------------------------


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent: a counter not yet touched)."""
    for line in text.splitlines():
        hit = _SAMPLE.match(line)
        if not hit or hit.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', hit.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(hit.group(3))
    return 0.0


def scrape(m: ManagerProcess) -> str:
    return http_text(f"{m.http}/metrics")


# -- clients ------------------------------------------------------------------------


def url(m: ManagerProcess, where: str = "/ws", lib: str = "", proc: str = "", **extra: str) -> str:
    """What the discon-client dials: ``path`` and ``proc`` always, then manager extras."""
    return f"{m.url}{where}?" + urlencode({"path": lib, "proc": proc, **extra})


async def connect(m: ManagerProcess, where: str = "/ws", **query: str) -> WsClient:
    return await WsClient.connect(url(m, where, **query))


async def gather(*coroutines: Any) -> list[Any]:
    """Run coroutines concurrently on the reactor; the first failure fails the lot."""
    return await defer.gatherResults(
        [defer.ensureDeferred(c) for c in coroutines], consumeErrors=True
    )


async def closed_by_manager(client: WsClient, timeout: float = 10.0) -> int | None:
    d: defer.Deferred = defer.Deferred()
    client.closed.addBoth(lambda code: (d.callback(code), code)[1])
    d.addTimeout(timeout, reactor)
    return await d


async def first_error(
    m: ManagerProcess, version: int = V2, timeout: float = 45.0, **q: str
) -> Message:
    """Connect, make one call, expect aviFAIL -1, and return the decoded reply."""
    c = await WsClient.connect(url(m, **q), timeout=timeout)
    request = openfast_frame(version, r20=1.0)
    raw = await c.call(request)
    reply = decode(raw)
    assert reply.fail == -1, reply.text
    assert_same_shape(request, raw)
    c.close()
    await c.closed
    return reply


def assert_same_shape(request: bytes, reply: bytes) -> None:
    """A reply the discon-client copies back: same version and every size the same."""
    assert len(reply) == len(request)
    assert parse_header(reply) == parse_header(request)


def is_test_discon(reply: Message, n: int) -> bool:
    return reply.fail == 0 and reply.text == f"DISCON called {n} times"


async def nrel_call(c: WsClient) -> Message:
    """The first call of a simulation for nrel5mw: its image ships DISCON.IN."""
    return await c.decoded(openfast_frame(V2, b"DISCON.IN", r1=0.0, r20=100.0))


def assert_nrel5mw(reply: Message) -> None:
    assert reply.fail == 0, reply.text
    assert "DISCON called" not in reply.text
    assert reply.swap[46] == pytest.approx(NREL_K * 100.0**2, rel=1e-5)


# -- managers shared by a module -------------------------------------------------------


def stop_and_check(m: ManagerProcess) -> None:
    """What manager_factory does for function-scoped managers: stop, then no leaks."""
    m.stop()
    left = [name_of(c) for c in ours(m.instance)]
    if left:
        m.force_cleanup()
    assert not left, f"containers of {m.instance} left behind after the manager stopped: {left}"


@pytest.fixture(scope="module")
def mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    """The shipped catalogue (default, nrel5mw), no default_controller, test limits."""
    m = ManagerProcess(workdir=tmp_path_factory.mktemp("main")).start()
    try:
        yield m
    finally:
        stop_and_check(m)


def wait_empty(m: ManagerProcess, timeout: float = CLEANUP_TIMEOUT + 5) -> None:
    """Before a test on a shared manager: the previous test's containers are gone."""
    deadline = time.monotonic() + timeout
    while ours(m.instance):
        assert time.monotonic() < deadline, f"a previous test left {ours(m.instance)}"
        time.sleep(0.1)


@pytest.fixture
def main(mgr: ManagerProcess) -> Iterator[ManagerProcess]:
    """The shared manager; each test starts with none of its containers left."""
    wait_empty(mgr)
    yield mgr


@pytest.fixture(scope="module")
def odd_images() -> Iterator[None]:
    """Images that misbehave: one exits at once (code 3), one never listens."""
    client = engine()
    for tag, cmd in (
        (EXITS_IMAGE, '["sh", "-c", "echo boom >&2; exit 3"]'),
        (SLEEPS_IMAGE, '["sleep", "600"]'),
    ):
        dockerfile = f"FROM discon-server:latest\nCMD {cmd}\n".encode()
        client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True)
    try:
        yield
    finally:
        for tag in (EXITS_IMAGE, SLEEPS_IMAGE):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(tag)


EXTRAS_CATALOGUE = [
    *DEFAULT_CATALOGUE["controllers"],
    entry("v2ctl", version="2.0.0"),
    entry("open", allow_path_override=True),
    entry("ghost", image=NO_IMAGE),
    entry("exits", image=EXITS_IMAGE),
    entry("sleeper", image=SLEEPS_IMAGE),
]


@pytest.fixture(scope="module")
def xmgr(tmp_path_factory: pytest.TempPathFactory, odd_images: None) -> Iterator[ManagerProcess]:
    """More catalogue entries, default_controller nrel5mw, 3 s ready and call timeouts."""
    m = ManagerProcess(
        workdir=tmp_path_factory.mktemp("extras"),
        controllers=EXTRAS_CATALOGUE,
        overrides={
            "server.default_controller": "nrel5mw",
            "server.call_timeout": 3,
            "docker.ready_timeout": 3,
        },
    ).start()
    try:
        yield m
    finally:
        stop_and_check(m)


@pytest.fixture
def extras(xmgr: ManagerProcess) -> Iterator[ManagerProcess]:
    wait_empty(xmgr)
    yield xmgr


# == selection ========================================================================


@pytest_twisted.ensureDeferred
async def test_default_is_the_first_entry_when_unset(main: ManagerProcess) -> None:
    """No controller, no version, a path that is no id: the catalogue's first entry."""
    c = await connect(main, lib="libtest_discon.so", proc="")
    reply = await c.decoded(openfast_frame(r20=3.0))
    assert is_test_discon(reply, 1) and reply.swap[46] == 6.0  # record 47 = 2 x record 20
    assert container_of(main, c).labels[L_CONTROLLER] == "default"
    c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_default_controller_setting(extras: ManagerProcess) -> None:
    """server.default_controller (nrel5mw here) wins over the first entry."""
    code, body = http_json(f"{extras.http}/controllers")
    assert code == 200 and body["default"] == "nrel5mw"
    c = await connect(extras, lib="libsomething.so", proc="")
    assert_nrel5mw(await nrel_call(c))
    assert container_of(extras, c).labels[L_CONTROLLER] == "nrel5mw"
    c.close()
    await none_left(extras)


@pytest.mark.parametrize(
    ("where", "query"),
    [
        pytest.param("/ws", {"lib": "libtest_discon.so", "controller": "nrel5mw"}, id="query"),
        # an unmodified client with DISCON_SERVER_ADDR=host:port/nrel5mw
        pytest.param("/nrel5mw/ws", {"lib": "libnrel5mw.so", "proc": "DISCON"}, id="path-form"),
        pytest.param("/ws", {"lib": "nrel5mw"}, id="path-is-id"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_select_nrel5mw(main: ManagerProcess, where: str, query: dict[str, str]) -> None:
    c = await connect(main, where, **query)
    assert_nrel5mw(await nrel_call(c))
    container = container_of(main, c)
    assert container.labels[L_CONTROLLER] == "nrel5mw"
    assert container.image.tags == ["discon-server-nrel5mw:latest"]
    code, sessions = http_json(f"{main.http}/containers")
    assert code == 200 and [s["controller"] for s in sessions] == ["nrel5mw"]
    c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_select_by_version(extras: ManagerProcess) -> None:
    """version=2.0.0 is only v2ctl's; version=1.0.0 is the first entry that has it."""
    c2 = await connect(extras, lib="libtest_discon.so", version="2.0.0")
    c1 = await connect(extras, lib="libtest_discon.so", version="1.0.0")
    assert is_test_discon(await c2.decoded(openfast_frame()), 1)
    assert is_test_discon(await c1.decoded(openfast_frame()), 1)
    assert container_of(extras, c2).labels[L_CONTROLLER] == "v2ctl"
    assert container_of(extras, c1).labels[L_CONTROLLER] == "default"
    c1.close()
    c2.close()
    await none_left(extras)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("where", "query"),
    [
        pytest.param("/ws", {"controller": "rosco"}, id="query"),
        pytest.param("/rosco/ws", {}, id="path-form"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_controller(
    main: ManagerProcess, version: int, where: str, query: dict[str, str]
) -> None:
    """Handshake completes, first call: aviFAIL -1 and the line; then the manager closes."""
    started = metric(scrape(main), "discon_containers_started_total")
    c = await WsClient.connect(url(main, where, lib="libdiscon.so", proc="DISCON", **query))
    request = openfast_frame(version, r20=1.0)
    raw = await c.call(request)
    reply = decode(raw)
    assert reply.fail == -1
    assert reply.text == "controller 'rosco' not found; available: default, nrel5mw"
    assert reply.version == version
    assert_same_shape(request, raw)
    assert await closed_by_manager(c) == 1000
    assert not ours(main.instance)
    assert metric(scrape(main), "discon_containers_started_total") == started


@pytest_twisted.ensureDeferred
async def test_client_proc_replaces_proc_name(main: ManagerProcess) -> None:
    """proc=DISCON on default (whose symbol is 'discon'): the missing symbol, and 'discon'."""
    reply = await first_error(main, lib="libtest_discon.so", proc="DISCON")
    # "controller library 'libtest_discon.so' has no symbol 'DISCON'; it exports discon"
    assert "has no symbol 'DISCON'" in reply.text
    exports = reply.text.split("exports", 1)[1]
    assert "discon" in re.split(r"[ ,]+", exports.strip()), reply.text
    assert "\n" not in reply.text
    # the right name given explicitly, and an empty proc (proc_name 'discon' is used)
    clients = await gather(
        *(connect(main, lib="libtest_discon.so", proc=p) for p in ("discon", ""))
    )
    for c in clients:
        assert is_test_discon(await c.decoded(openfast_frame()), 1)
        c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_client_path_ignored_without_override(main: ManagerProcess) -> None:
    """default has no allow_path_override: the client's path does not reach the container."""
    clients = await gather(*(connect(main, lib=lib) for lib in ("../x.so", "/etc/x.so", "a.so")))
    for c in clients:
        assert is_test_discon(await c.decoded(openfast_frame()), 1)
        c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_client_path_with_override(extras: ManagerProcess) -> None:
    """allow_path_override: a relative path is used (a missing one says so by name)."""
    c = await connect(extras, lib="./libtest_discon.so", controller="open")
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    c.close()
    reply = await first_error(extras, lib="sub/missing.so", controller="open")
    assert "sub/missing.so" in reply.text and "does not exist" in reply.text
    await none_left(extras)


@pytest.mark.parametrize("lib", ["../x.so", "/etc/x.so"])
@pytest_twisted.ensureDeferred
async def test_client_path_escaping_is_refused(extras: ManagerProcess, lib: str) -> None:
    started = metric(scrape(extras), "discon_containers_started_total")
    reply = await first_error(extras, lib=lib, controller="open")
    assert reply.text.startswith("controller 'open': library path")
    assert f"'{lib}' is outside the controller" in reply.text
    assert metric(scrape(extras), "discon_containers_started_total") == started
    assert not ours(extras.instance)


# == errors a user can read ===========================================================


@pytest_twisted.ensureDeferred
async def test_unknown_controller_counts_a_selection_error(main: ManagerProcess) -> None:
    before = metric(scrape(main), "discon_errors_total", kind="selection")
    reply = await first_error(main, controller="rosco")
    assert reply.text == "controller 'rosco' not found; available: default, nrel5mw"
    assert metric(scrape(main), "discon_errors_total", kind="selection") == before + 1


@pytest_twisted.ensureDeferred
async def test_engine_down(manager_factory: Callable[..., ManagerProcess]) -> None:
    """No engine behind DOCKER_HOST: /health says 503, a client reads why in avcMSG."""
    m = manager_factory(env={"DOCKER_HOST": "unix:///tmp/nonexistent.sock"}).start()
    code, body = await threads.deferToThread(http_json, f"{m.http}/health")
    assert code == 503
    assert body["status"] != "ok" and body["engine"]["reachable"] is False
    assert body["engine"]["error"]
    for version in (V1, V2):
        reply = await first_error(m, version)
        assert reply.text.startswith("controller 'default': the Docker engine is not reachable")
        assert "DOCKER_HOST" in reply.text and "\n" not in reply.text
    assert not ours(m.instance)


@pytest_twisted.ensureDeferred
async def test_image_missing(extras: ManagerProcess) -> None:
    reply = await first_error(extras, controller="ghost")
    assert reply.text.startswith("controller 'ghost': image 'discon-no-such-image:latest'")
    assert "is not on the Docker engine" in reply.text and "build it" in reply.text
    await none_left(extras)


async def kill_after_three_calls(m: ManagerProcess) -> WsClient:
    c = await connect(m)
    for n in (1, 2, 3):
        assert is_test_discon(await c.decoded(openfast_frame()), n)
    await threads.deferToThread(container_of(m, c).kill)  # docker kill: SIGKILL
    return c


@pytest_twisted.ensureDeferred
async def test_container_killed_mid_run_message(main: ManagerProcess) -> None:
    """Once the manager has noticed the kill, the next call reads why the run stopped.

    (A call made at once after the kill: test_call_right_after_kill_reads_why, at the end.)
    """
    c = await kill_after_three_calls(main)

    def noticed() -> bool:
        sessions = http_json(f"{main.http}/containers")[1]
        return all(s["state"] == "failed" for s in sessions)

    # the manager has found out why (the session is failed) and removed the container
    await eventually(noticed, timeout=10)
    await none_left(main, timeout=CLEANUP_TIMEOUT)
    reply = await c.decoded(openfast_frame())
    assert reply.fail == -1
    assert reply.text.startswith("controller 'default': container discon-controller-default-")
    assert "stopped during the run after 3 calls" in reply.text
    assert "exit code 137: killed" in reply.text and "restart the simulation" in reply.text
    assert await closed_by_manager(c) == 1000
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_controller_crash_is_relayed(main: ManagerProcess) -> None:
    c = await connect(main)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    assert is_test_discon(await c.decoded(openfast_frame()), 2)
    request = openfast_frame(r119=666.0)
    raw = await c.call(request)
    reply = decode(raw)
    assert reply.fail == -1
    assert reply.text.startswith("the controller crashed with signal 11 (SIGSEGV) on call 3")
    assert_same_shape(request, raw)
    c.close()
    await none_left(main)


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_requested_failure_is_relayed(main: ManagerProcess, version: int) -> None:
    c = await connect(main)
    reply = await c.decoded(openfast_frame(version, r119=668.0))
    assert reply.fail == -1 and reply.text == "requested failure" and reply.version == version
    assert is_test_discon(await c.decoded(openfast_frame(version)), 2)  # the session goes on
    c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_malformed_frame_is_refused_at_once_with_the_reason(main: ManagerProcess) -> None:
    """The container's server refuses it (4007); the manager passes that on at once,
    without blaming the container, and removes it."""
    c = await connect(main)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    log_start = len(main.logs())
    t0 = time.monotonic()
    c.send(b"\x05\x00\x00\x00" + b"\x00" * 30)  # lengths that do not add up
    code = await c.closed
    assert time.monotonic() - t0 < 2
    assert code == 4007
    assert "malformed DISCON frame" in (c.close_reason or "")
    assert "stopped during the run" not in main.logs()[log_start:]
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_call_timeout(extras: ManagerProcess) -> None:
    """server.call_timeout 3 reaches the container: a hung call is answered after 3 s."""
    c = await connect(extras, controller="default")
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    t0 = time.monotonic()
    reply = await c.decoded(openfast_frame(r119=667.0))
    took = time.monotonic() - t0
    assert reply.fail == -1
    assert "did not answer call 2 within 3 s" in reply.text
    assert 2.5 < took < 8, took
    c.close()
    await none_left(extras)


# == nothing leaks ======================================================================


def raw_upgrade(m: ManagerProcess, where: str = "/ws", **query: str) -> socket.socket:
    """A bare TCP connection that has sent a WebSocket upgrade request, nothing more."""
    target = f"{where}?" + urlencode({"path": "", "proc": "", **query})
    s = socket.create_connection(("127.0.0.1", m.port), timeout=5)
    s.sendall(
        (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{m.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return s


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_container_removed_after_client_leaves(main: ManagerProcess, how: str) -> None:
    """A clean close or a TCP reset: the container is gone within docker.cleanup_timeout."""
    c = await connect(main)
    for n in (1, 2, 3):
        assert is_test_discon(await c.decoded(openfast_frame()), n)
    who = address(c)
    assert len(containers_for(main, who)) == 1
    t0 = time.monotonic()
    c.close() if how == "close" else c.abort()
    took = await removal_time(main, who, t0)
    assert took < CLEANUP_TIMEOUT, took
    assert http_json(f"{main.http}/containers")[1] == []


@pytest_twisted.ensureDeferred
async def test_client_leaves_during_creation(main: ManagerProcess) -> None:
    """Gone before its container exists: the container is made, then removed."""
    text = scrape(main)
    sessions, started = (
        metric(text, "discon_sessions_total"),
        metric(text, "discon_containers_started_total"),
    )
    raw_upgrade(main).close()
    await eventually(lambda: metric(scrape(main), "discon_sessions_total") == sessions + 1)
    # the container was created and started for nobody, and then removed
    await eventually(lambda: metric(scrape(main), "discon_containers_started_total") == started + 1)
    await none_left(main, timeout=CLEANUP_TIMEOUT)
    assert metric(scrape(main), "discon_sessions_open") == 0


@pytest_twisted.ensureDeferred
async def test_client_leaves_during_readiness_wait(extras: ManagerProcess) -> None:
    s = raw_upgrade(extras, controller="sleeper")
    await eventually(lambda: any(c["State"] == "running" for c in ours(extras.instance)))
    await sleep(1.0)
    assert ours(extras.instance), "the container went before the client did"
    s.close()
    t0 = time.monotonic()
    await none_left(extras, timeout=CLEANUP_TIMEOUT)
    assert time.monotonic() - t0 < CLEANUP_TIMEOUT
    assert metric(scrape(extras), "discon_sessions_open") == 0


@pytest_twisted.ensureDeferred
async def test_two_clients_same_controller(main: ManagerProcess) -> None:
    a, b = await gather(connect(main), connect(main))
    for n in (1, 2, 3):
        assert is_test_discon(await a.decoded(openfast_frame()), n)
    assert is_test_discon(await b.decoded(openfast_frame()), 1)
    assert is_test_discon(await a.decoded(openfast_frame()), 4)
    assert is_test_discon(await b.decoded(openfast_frame()), 2)
    ca, cb = container_of(main, a), container_of(main, b)
    assert ca.name != cb.name and ca.id != cb.id
    assert ca.labels[L_SESSION] != cb.labels[L_SESSION]
    a.close()
    b.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_sessions(main: ManagerProcess) -> None:
    t0 = time.monotonic()
    clients: list[WsClient] = await gather(*(connect(main) for _ in range(20)))

    async def run(i: int, c: WsClient) -> None:
        for n in range(1, 6):
            reply = await c.decoded(openfast_frame(r20=float(i)))
            assert is_test_discon(reply, n), reply.text
            assert reply.swap[46] == 2.0 * i  # its own reply, not a neighbour's

    await gather(*(run(i, c) for i, c in enumerate(clients)))
    listed = ours(main.instance)
    assert len({name_of(x) for x in listed}) == 20
    for c in clients:
        assert len(containers_for(main, address(c))) == 1
    _, sessions = http_json(f"{main.http}/containers")
    assert len(sessions) == 20 and {s["calls"] for s in sessions} == {5}
    for c in clients:
        c.close()
    await none_left(main, timeout=30)
    took = time.monotonic() - t0
    assert took < 60, took


@pytest.fixture(scope="module")
def idle_mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    """docker.idle_timeout 3 s (and a call_timeout above it)."""
    m = ManagerProcess(
        workdir=tmp_path_factory.mktemp("idle"),
        overrides={"docker.idle_timeout": 3, "server.call_timeout": 10},
    ).start()
    try:
        yield m
    finally:
        stop_and_check(m)


@pytest_twisted.ensureDeferred
async def test_silent_client_closed_by_idle_timeout(idle_mgr: ManagerProcess) -> None:
    m = idle_mgr
    c = await connect(m)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    last = time.monotonic()
    who = address(c)
    await closed_by_manager(c, timeout=15)  # the manager closes the connection
    closed = time.monotonic()
    assert c.close_code == 4008 and "idle_timeout" in (c.close_reason or "")
    assert 2.9 < closed - last < 6, closed - last
    took = await removal_time(m, who, closed)
    assert took < CLEANUP_TIMEOUT, took
    assert metric(scrape(m), "discon_errors_total", kind="idle_timeout") >= 1


# == orphans and shutdown ===============================================================


@pytest_twisted.ensureDeferred
async def test_kill9_orphan_removed_by_next_start(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    m = manager_factory().start()
    c = await connect(m)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    orphan = name_of(ours(m.instance)[0])
    assert m.proc is not None
    m.proc.kill()
    await threads.deferToThread(m.proc.wait)
    await closed_by_manager(c)
    await sleep(1.0)
    left = ours(m.instance)
    assert [name_of(x) for x in left] == [orphan] and left[0]["State"] == "running"
    again = manager_factory(instance=m.instance).start()
    await none_left(again, timeout=15)  # removed at start-up, no session needed
    assert orphan in again.logs()
    c2 = await connect(again)  # and the new run works
    assert is_test_discon(await c2.decoded(openfast_frame()), 1)
    c2.close()
    await none_left(again)


@pytest_twisted.ensureDeferred
async def test_sigterm_with_live_session(manager_factory: Callable[..., ManagerProcess]) -> None:
    m = manager_factory().start()
    c = await connect(m)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    assert len(ours(m.instance)) == 1
    t0 = time.monotonic()
    rc = await threads.deferToThread(m.stop)  # SIGTERM, then wait for the exit
    assert m.proc is not None and m.proc.poll() is not None
    # twistd ends a SIGTERM shutdown by re-raising the signal on itself: -15 is its clean exit
    assert rc in (0, -signal.SIGTERM), rc
    assert time.monotonic() - t0 < CLEANUP_TIMEOUT
    assert "closing 1 sessions" in m.logs() and "Main loop terminated" in m.logs()
    assert not ours(m.instance)  # removed before the process exited
    assert await closed_by_manager(c) is not None


# == endpoints ==========================================================================


@pytest_twisted.ensureDeferred
async def test_health(main: ManagerProcess) -> None:
    from discon_manager import __version__

    code, body = http_json(f"{main.http}/health")
    assert code == 200
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["engine"]["reachable"] is True
    assert body["engine"]["version"] == engine().version()["Version"]
    assert isinstance(body["uptime_s"], (int, float)) and body["uptime_s"] >= 0


@pytest_twisted.ensureDeferred
async def test_metrics(main: ManagerProcess) -> None:
    before = scrape(main)
    c = await connect(main)
    frames = [openfast_frame(V2, r20=1.0), openfast_frame(V1, r20=2.0), openfast_frame(V2)]
    for n, f in enumerate(frames, 1):
        assert is_test_discon(await c.decoded(f), n)
    during = scrape(main)
    assert metric(during, "discon_sessions_open") == 1
    assert metric(during, "discon_containers_running") == 1
    c.close()
    await none_left(main)
    after = scrape(main)
    assert metric(after, "discon_sessions_open") == 0
    size = sum(len(f) for f in frames)
    for name, value in (
        ("discon_messages_relayed_total", 3),
        ("discon_bytes_relayed_total", size),
    ):
        for direction in ("to_controller", "to_client"):
            delta = metric(after, name, direction=direction) - metric(
                before, name, direction=direction
            )
            assert delta == value, (name, direction)
    hist = "discon_container_start_seconds"
    assert f'{hist}_bucket{{le="+Inf"}}' in after and f'{hist}_bucket{{le="1.0"}}' in after
    assert metric(after, f"{hist}_count") == metric(before, f"{hist}_count") + 1
    assert metric(after, f"{hist}_sum") > metric(before, f"{hist}_sum")
    # errors by kind
    selection = metric(after, "discon_errors_total", kind="selection")
    await first_error(main, controller="rosco")
    assert metric(scrape(main), "discon_errors_total", kind="selection") == selection + 1


@pytest_twisted.ensureDeferred
async def test_containers_endpoint(main: ManagerProcess) -> None:
    t0 = time.time()
    c = await connect(main, controller="nrel5mw")
    assert_nrel5mw(await nrel_call(c))
    code, sessions = http_json(f"{main.http}/containers")
    assert code == 200 and len(sessions) == 1
    s = sessions[0]
    real = container_of(main, c)
    assert s["name"] == real.name and s["id"] == real.id
    assert s["controller"] == "nrel5mw" and same_client(s["client"], address(c))
    assert s["session"] == real.labels[L_SESSION]
    assert t0 - 1 <= s["started"] <= s["last_activity"] <= time.time() + 1
    assert s["calls"] == 1 and s["state"] == "relaying"
    c.close()
    await eventually(lambda: http_json(f"{main.http}/containers")[1] == [])
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_controllers_endpoint(main: ManagerProcess) -> None:
    code, body = http_json(f"{main.http}/controllers")
    assert code == 200 and body["default"] == "default"
    shipped = DEFAULT_CATALOGUE["controllers"]
    assert [c["id"] for c in body["controllers"]] == [c["id"] for c in shipped]
    for served, entry_ in zip(body["controllers"], shipped, strict=True):
        for key in ("image", "library_path", "proc_name", "version", "name", "ports"):
            assert served[key] == entry_[key], key


# == catalogue reload =====================================================================


@pytest_twisted.ensureDeferred
async def test_catalogue_reload(manager_factory: Callable[..., ManagerProcess]) -> None:
    m = manager_factory().start()
    live = await connect(m)
    for n in (1, 2):
        assert is_test_discon(await live.decoded(openfast_frame()), n)

    catalogue = json.loads(m.db_path.read_text())
    catalogue["controllers"].append(entry("extra", version="3.0.0"))
    m.db_path.write_text(json.dumps(catalogue, indent=2))

    def ids() -> list[str]:
        return [c["id"] for c in http_json(f"{m.http}/controllers")[1]["controllers"]]

    await eventually(lambda: "extra" in ids(), timeout=10)
    new = await connect(m, controller="extra")
    assert is_test_discon(await new.decoded(openfast_frame()), 1)
    assert container_of(m, new).labels[L_CONTROLLER] == "extra"
    assert is_test_discon(await live.decoded(openfast_frame()), 3)  # not disturbed

    m.db_path.write_text('{\n  "controllers": [\n    {"id": "x",\n     "image" "y"}\n  ]\n}\n')
    await eventually(lambda: "not valid JSON at line 4" in m.logs(), timeout=10)
    line = next(x for x in m.logs().splitlines() if "not valid JSON" in x)
    assert str(m.db_path) in line and "last good copy" in line
    assert ids() == ["default", "nrel5mw", "extra"]
    c = await connect(m, controller="extra")  # still selectable from the last good copy
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    assert is_test_discon(await live.decoded(openfast_frame()), 4)
    for x in (live, new, c):
        x.close()
    await none_left(m)


# == configuration ========================================================================


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"docker.memory_limit": "512x"},
            "docker.memory_limit: '512x' is not a size; use e.g. 512m or 1g",
            id="bad-size",
        ),
        pytest.param(
            {"docker.memroy_limit": "1g"},
            "docker.memroy_limit: unknown key; known keys are",
            id="unknown-key",
        ),
    ],
)
def test_config_errors_stop_the_start(
    manager_factory: Callable[..., ManagerProcess], overrides: dict[str, Any], expected: str
) -> None:
    m = manager_factory(overrides=overrides).start(wait=False)
    assert m.proc is not None
    rc = m.proc.wait(timeout=30)
    assert rc != 0
    assert expected in m.logs()


# == container limits =====================================================================


@pytest_twisted.ensureDeferred
async def test_container_limits_labels_and_network(main: ManagerProcess) -> None:
    c = await connect(main)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    real = container_of(main, c)
    hc = real.attrs["HostConfig"]
    assert hc["Memory"] == 256 * 1024 * 1024
    assert hc["MemorySwap"] == 256 * 1024 * 1024  # no swap on top
    assert hc["NanoCpus"] == 1_000_000_000
    assert hc["PidsLimit"] == 128
    assert not hc["PortBindings"] and not hc["PublishAllPorts"]
    assert all(not bound for bound in (real.attrs["NetworkSettings"]["Ports"] or {}).values())
    assert list(real.attrs["NetworkSettings"]["Networks"]) == [TEST_NETWORK]
    assert real.name.startswith(f"{PREFIX}default-")
    labels = real.labels
    assert labels[L_MANAGER] == main.instance and labels[L_CONTROLLER] == "default"
    assert same_client(labels[L_CLIENT], address(c)) and labels[L_SESSION] and labels[L_RUN]
    c.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_name_conflict_with_leftover(
    manager_factory: Callable[..., ManagerProcess], request: pytest.FixtureRequest
) -> None:
    """An unlabelled container holds the first name: the manager takes the next one.

    A prefix of this test's own keeps other managers on this engine (which number
    their containers from 1 too) from taking or freeing the name meanwhile.
    """
    prefix = f"{PREFIX}{uuid.uuid4().hex[:6]}-"
    leftover = engine().containers.create("discon-server:latest", name=f"{prefix}default-1")
    request.addfinalizer(lambda: leftover.remove(force=True))
    m = manager_factory(overrides={"docker.container_prefix": prefix}).start()
    c = await connect(m)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    real = container_of(m, c)
    assert real.name == f"{prefix}default-2" and real.id != leftover.id
    c.close()
    await none_left(m)
    leftover.reload()  # not the manager's: left alone
    assert leftover.name == f"{prefix}default-1"


# == relaying ============================================================================


@pytest.fixture
def direct_server(main: ManagerProcess) -> Iterator[str]:
    """A discon-server container of our own on the test network; its address."""
    client = engine()
    c = client.containers.run(
        "discon-server:latest",
        name=f"{PREFIX}test-direct-{uuid.uuid4().hex[:8]}",
        network=TEST_NETWORK,
        environment={"DISCON_CALL_TIMEOUT": "30"},
        detach=True,
    )
    try:
        c.reload()
        ip = c.attrs["NetworkSettings"]["Networks"][TEST_NETWORK]["IPAddress"]
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((ip, 8080), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "direct container not listening"
                time.sleep(0.05)
        yield f"{ip}:8080"
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)


def call_sequence(version: int) -> list[bytes]:
    frames = [openfast_frame(version, r1=0.0, r20=10.0)]
    frames += [openfast_frame(version, r1=1.0, r20=10.0 + k, r119=float(k)) for k in range(1, 6)]
    frames += [openfast_frame(version, r1=1.0, r20=3.5, r119=668.0)]
    frames += [openfast_frame(version, b"no-such-file.in", r1=-1.0, r20=1.25)]
    return frames


@pytest.mark.parametrize("version", VERSIONS)
@pytest_twisted.ensureDeferred
async def test_replies_byte_identical_to_direct(
    main: ManagerProcess, direct_server: str, version: int
) -> None:
    frames = call_sequence(version)
    direct = await WsClient.connect(f"ws://{direct_server}/ws?path=libtest_discon.so&proc=discon")
    via = await connect(main)
    from_direct = [await direct.call(f) for f in frames]
    from_manager = [await via.call(f) for f in frames]
    assert decode(from_direct[-2]).text == "requested failure"  # the sequence is not trivial
    assert from_manager == from_direct
    direct.close()
    via.close()
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_v2_file_transfer(main: ManagerProcess) -> None:
    content = b"! a controller input file\n" * 77
    name = server_file_name("DISCON.IN", content)
    c = await connect(main)
    ack = await c.decoded(transfer_request(name, content))
    assert ack.fail == 0 and "received" in ack.text
    reply = await c.decoded(openfast_frame(V2, name.encode()))
    assert is_test_discon(reply, 1)
    assert reply.swap[119] == len(content)
    c.close()
    await none_left(main)


# == manager defects ======================================================================
#
# These tests state what the issue asks for and fail against the current manager
# (the last one intermittently); each docstring names the defect. They come last
# so that ``-x`` runs everything else first.


@pytest_twisted.ensureDeferred
async def test_call_right_after_kill_reads_why(main: ManagerProcess) -> None:
    """OpenFAST calls again within milliseconds of a container's death.

    Defect: Session.container_closed() drops the link at once but only sets the
    error after exit_reason() has asked the engine; a call arriving in between is
    answered "controller 'default' is not connected" and the session is closed,
    so the user never reads that the container was killed.
    """
    clients = await gather(*(connect(main) for _ in range(4)))  # the race, four times over

    async def kill_then_call(c: WsClient) -> str:
        for n in (1, 2, 3):
            assert is_test_discon(await c.decoded(openfast_frame()), n)
        await threads.deferToThread(container_of(main, c).kill)
        reply = await c.decoded(openfast_frame())  # OpenFAST's next time step
        assert reply.fail == -1
        return reply.text

    texts = await gather(*(kill_then_call(c) for c in clients))
    await none_left(main)
    for text in texts:
        assert "stopped during the run after 3 calls" in text, texts
        assert "exit code 137" in text, texts


@pytest_twisted.ensureDeferred
async def test_container_exiting_at_once_is_reported(extras: ManagerProcess) -> None:
    """A container that exits at once: its exit code, promptly, every time.

    Defects: (1) when the container has already exited by the time
    DockerContainers._start_sync() reloads it, it has no IP and the user reads
    "has no address on network ..." with no exit code; (2) otherwise the exit is
    only looked for every 20 connection attempts, and an attempt to the address
    of an exited container takes up to the 2 s connect timeout, so the exit is
    only found at docker.ready_timeout and reported as "did not accept a
    connection within 3 s (exit code 3 ...)" instead of "exited while starting".
    """
    seen: list[tuple[float, str]] = []
    for _ in range(3):
        t0 = time.monotonic()
        reply = await first_error(extras, controller="exits")
        seen.append((round(time.monotonic() - t0, 2), reply.text))
    await none_left(extras)
    for took, text in seen:
        assert text.startswith("controller 'exits': container discon-controller-exits-"), seen
        assert "exit code 3" in text and "boom" in text, seen
        assert "exited while starting" in text, seen
        assert took < 3, seen  # well before docker.ready_timeout


@pytest_twisted.ensureDeferred
async def test_never_ready_error_reaches_every_client(extras: ManagerProcess) -> None:
    """Six clients of a never-ready image at once: each reads the readiness error.

    Defect: the client handshake is held for ClientFactory's openHandshakeTimeout
    = ready_timeout + 4 s, but Session.open() takes the container's create/start
    time + ready_timeout + up to 3 s more in exit_reason() (it waits for a still
    running container to stop). With one client that leaves ~0.5 s to spare;
    with a few at once Autobahn drops every handshake ("opening handshake
    timeout") and the users get a bare connection error instead of the line.
    """

    async def one() -> str:
        return (await first_error(extras, controller="sleeper")).text

    texts = await gather(*(one() for _ in range(6)))
    await none_left(extras)
    assert all("did not accept a connection within 3 s" in t for t in texts), texts


@pytest_twisted.ensureDeferred
async def test_idle_timeout_spares_a_client_waiting_for_its_reply(
    idle_mgr: ManagerProcess,
) -> None:
    """A client blocked in a slow call is not idle: call_timeout (10 s) answers it.

    Defect: Session.idle_check() closes the client when nothing was *sent* for
    idle_timeout (3 s) even while a call is outstanding, with dropConnection and
    no aviFAIL line: a controller call longer than idle_timeout (or any with
    call_timeout 0) ends in a bare connection error.
    """
    c = await connect(idle_mgr)
    assert is_test_discon(await c.decoded(openfast_frame()), 1)
    reply = await c.decoded(openfast_frame(r119=667.0))
    assert reply.fail == -1 and "did not answer call 2 within 10 s" in reply.text
    c.close()
    await none_left(idle_mgr)


@pytest_twisted.ensureDeferred
async def test_container_never_ready(extras: ManagerProcess) -> None:
    """A container that never listens: the readiness error, in avcMSG.

    Passes only while the container starts in under about half a second: see
    test_never_ready_error_reaches_every_client for the defect that makes it flaky.
    """
    reply = await first_error(extras, controller="sleeper")
    assert reply.text.startswith("controller 'sleeper': container discon-controller-sleeper-")
    assert "did not accept a connection within 3 s" in reply.text
    assert "discon-test-sleeps:latest" in reply.text and "port 8080" in reply.text
    await none_left(extras)
