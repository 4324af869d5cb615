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
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
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


async def first_error(m: ManagerProcess, version: int = V2, timeout: float = 45.0, **q: str) -> Message:
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


@pytest.fixture
def main(mgr: ManagerProcess) -> Iterator[ManagerProcess]:
    """The shared manager, checked empty before and after each test."""
    assert not ours(mgr.instance), "a previous test left a container"
    yield mgr


@pytest.fixture(scope="module")
def test_images() -> Iterator[None]:
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
def xmgr(tmp_path_factory: pytest.TempPathFactory, test_images: None) -> Iterator[ManagerProcess]:
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
    assert not ours(xmgr.instance), "a previous test left a container"
    yield xmgr


# == selection ========================================================================


@pytest_twisted.ensureDeferred
async def test_default_is_the_first_entry_when_unset(main: ManagerProcess) -> None:
    """No controller, no version, a path that is no id: the catalogue's first entry."""
    c = await connect(main, lib="libtest_discon.so", proc="")
    assert is_test_discon(await c.decoded(openfast_frame(r20=3.0)), 1)
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
    assert "'DISCON'" in reply.text and "discon" in reply.text.replace("'DISCON'", "")
    assert "\n" not in reply.text
    c = await connect(main, lib="libtest_discon.so", proc="discon")  # explicit, the same
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


# == errors a user can read =============================================================


@pytest_twisted.ensureDeferred
async def test_image_missing(extras: ManagerProcess) -> None:
    reply = await first_error(extras, controller="ghost")
    assert reply.text.startswith("controller 'ghost': image 'discon-no-such-image:latest'")
    assert "not on the Docker engine" in reply.text and "build it" in reply.text
    await none_left(extras)


@pytest_twisted.ensureDeferred
async def test_container_exits_at_once(extras: ManagerProcess) -> None:
    t0 = time.monotonic()
    reply = await first_error(extras, controller="exits")
    print(time.monotonic() - t0, reply.text)
    assert reply.text.startswith("controller 'exits':")
    assert "exit code 3" in reply.text
    await none_left(extras)


@pytest_twisted.ensureDeferred
async def test_container_never_ready(extras: ManagerProcess) -> None:
    t0 = time.monotonic()
    reply = await first_error(extras, controller="sleeper")
    print(time.monotonic() - t0, reply.text)
    assert reply.text.startswith("controller 'sleeper': container ")
    assert "did not accept a connection within 3 s" in reply.text
    await none_left(extras)


@pytest_twisted.ensureDeferred
async def test_container_killed_mid_run(main: ManagerProcess) -> None:
    c = await connect(main)
    for n in (1, 2, 3):
        assert is_test_discon(await c.decoded(openfast_frame()), n)
    await threads.deferToThread(container_of(main, c).kill)
    t0 = time.monotonic()
    reply = await c.decoded(openfast_frame())
    print(time.monotonic() - t0, reply.text)
    assert reply.fail == -1
    assert "stopped during the run" in reply.text
    assert "exit code 137" in reply.text and "killed" in reply.text
    await none_left(main)


@pytest_twisted.ensureDeferred
async def test_zz_experiment(extras: ManagerProcess) -> None:
    async def one() -> str:
        t0 = time.monotonic()
        try:
            r = await first_error(extras, controller="sleeper")
            return f"{time.monotonic() - t0:.2f} {r.text[:60]}"
        except Exception as e:
            return f"{time.monotonic() - t0:.2f} EXC {e!r}"
    print(await gather(*(one() for _ in range(4))))
    await none_left(extras)
