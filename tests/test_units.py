"""Unit tests of the manager's pure parts: configuration, catalogue, selection, socket options."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted

from discon_manager import config as cfgmod
from discon_manager.registry import CatalogueError, Registry, SelectionError, parse_catalogue
from discon_manager.server import controller_from_path

ROOT = Path(__file__).resolve().parent.parent


# -- configuration -------------------------------------------------------------------


def test_shipped_config_is_valid():
    c = cfgmod.load(ROOT / "config" / "config.yaml")
    assert c.docker.memory_limit == 512 * 1024 * 1024
    assert c.docker.container_prefix == "discon-controller-"
    assert c.server.port == 8080
    assert c.instance == "disconmanager-8080"


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        (
            "docker",
            "memory_limit",
            "512x",
            "docker.memory_limit: '512x' is not a size; use e.g. 512m or 1g",
        ),
        (
            "docker",
            "memory_limit",
            "1k",
            "docker.memory_limit: '1k' is below Docker's minimum of 6m",
        ),
        ("docker", "cpu_limit", "two", "docker.cpu_limit: 'two' is not a number"),
        ("docker", "pids_limit", 2.5, "docker.pids_limit: 2.5 is not a whole number"),
        (
            "docker",
            "ready_timeout",
            60,
            "docker.ready_timeout: 60 is out of range; use a number >= 1 and <= 40",
        ),
        ("docker", "container_prefix", "-bad/", "docker.container_prefix: '-bad/' is not a valid"),
        ("server", "port", 70000, "server.port: 70000 is out of range"),
        ("server", "debug_level", 3, "server.debug_level: 3 is not allowed; use 0, 1 or 2"),
        ("server", "memory", 1, "server.memory: unknown key; known keys are"),
    ],
)
def test_bad_values_name_key_value_and_fix(section, key, value, message):
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.parse({section: {key: value}})
    assert message in str(e.value)


def test_sizes_are_parsed_by_the_library():
    assert cfgmod.parse({"docker": {"memory_limit": "1g"}}).docker.memory_limit == 1 << 30
    assert cfgmod.parse({"docker": {"memory_limit": "64m"}}).docker.memory_limit == 64 << 20


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("server: [unclosed\n")
    with pytest.raises(cfgmod.ConfigError, match="c.yaml: not valid YAML"):
        cfgmod.load(p)
    with pytest.raises(cfgmod.ConfigError, match="cannot read configuration"):
        cfgmod.load(tmp_path / "missing.yaml")


# -- catalogue and selection ---------------------------------------------------------


def _registry(tmp_path, entries, default=None) -> Registry:
    p = tmp_path / "controllers.json"
    p.write_text(json.dumps({"controllers": entries}))
    r = Registry(p, default)
    r.load()
    return r


ENTRIES = [
    {
        "id": "default",
        "image": "a",
        "library_path": "liba.so",
        "proc_name": "discon",
        "version": "1.0",
    },
    {
        "id": "rosco",
        "image": "b",
        "library_path": "libb.so",
        "proc_name": "DISCON",
        "version": "2.9",
    },
    {
        "id": "open",
        "image": "c",
        "library_path": "libc.so",
        "proc_name": "DISCON",
        "allow_path_override": True,
    },
]


def test_shipped_catalogue_is_valid():
    entries = parse_catalogue((ROOT / "db" / "controllers.json").read_text(), "db")
    assert [c.id for c in entries] == ["default", "nrel5mw"]


@pytest.mark.parametrize(
    "params, path_id, expected",
    [
        ({"controller": ["rosco"]}, None, "rosco"),
        ({"controller": ["rosco"]}, "default", "rosco"),  # query before path form
        ({}, "rosco", "rosco"),
        ({"version": ["2.9"]}, None, "rosco"),
        ({"path": ["rosco"]}, None, "rosco"),
        ({"path": ["libdiscon.so"], "proc": [""]}, None, "default"),
        ({}, None, "default"),
    ],
)
def test_selection_order(tmp_path, params, path_id, expected):
    assert _registry(tmp_path, ENTRIES).select(params, path_id).controller.id == expected


def test_default_controller_setting(tmp_path):
    assert _registry(tmp_path, ENTRIES, "rosco").select({}, None).controller.id == "rosco"
    with pytest.raises(CatalogueError, match="server.default_controller: 'nope' is not in"):
        _registry(tmp_path, ENTRIES, "nope")


def test_explicit_choice_that_does_not_exist_is_an_error(tmp_path):
    r = _registry(tmp_path, ENTRIES)
    with pytest.raises(SelectionError) as e:
        r.select({"controller": ["x"]}, None)
    assert str(e.value) == "controller 'x' not found; available: default, rosco, open"
    with pytest.raises(SelectionError, match="controller 'x' not found"):
        r.select({}, "x")
    with pytest.raises(SelectionError, match="no controller has version '7'"):
        r.select({"version": ["7"]}, None)
    with pytest.raises(SelectionError, match="has version '1.0', not '2.9'"):
        r.select({"controller": ["default"], "version": ["2.9"]}, None)


def test_proc_and_path_override(tmp_path):
    r = _registry(tmp_path, ENTRIES)
    s = r.select({"proc": ["MYPROC"], "path": ["other.so"]}, None)
    assert (s.library_path, s.proc) == ("liba.so", "MYPROC")  # no override for 'default'
    s = r.select({"path": ["sub/other.so"]}, "open")
    assert (s.library_path, s.proc) == ("sub/other.so", "DISCON")
    for bad in ("../x.so", "/etc/x.so", "a/../../x.so"):
        with pytest.raises(SelectionError, match="is outside the controller"):
            r.select({"path": [bad]}, "open")


@pytest.mark.parametrize(
    "doc, message",
    [
        ("{", "not valid JSON at line 1"),
        ('{"controllers": []}', "the controllers list is empty"),
        ('{"controllers": [{"id": "a"}]}', "controllers[0] (id 'a'): 'image' is missing"),
        (
            '{"controllers": [{"id": "a", "image": "i", "library_path": "l", "proc_name": "p", '
            '"colour": 1}]}',
            "unknown field 'colour'",
        ),
        (
            '{"controllers": [{"id": "ws", "image": "i", "library_path": "l", "proc_name": "p"}]}',
            "cannot be used in a URL path",
        ),
    ],
)
def test_catalogue_errors_say_where(doc, message):
    with pytest.raises(CatalogueError) as e:
        parse_catalogue(doc, "db/controllers.json")
    assert message in str(e.value)
    assert str(e.value).startswith("db/controllers.json")


def test_broken_reload_keeps_last_good_copy(tmp_path):
    r = _registry(tmp_path, ENTRIES)
    r._apply(((1, 1), "{ broken"))
    assert [c.id for c in r.controllers] == ["default", "rosco", "open"]
    r._apply(((2, 2), json.dumps({"controllers": ENTRIES[:1]})))
    assert [c.id for c in r.controllers] == ["default"]


# -- the client-facing endpoint ------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [("/ws", None), ("/nrel5mw/ws", "nrel5mw"), ("/a/b/ws", "b"), ("/", None), ("/x", None)],
)
def test_controller_from_path(path, expected):
    assert controller_from_path(path) == expected


def test_hot_path_factories():
    from discon_manager.relay import ContainerLinkFactory
    from discon_manager.server import ClientFactory

    manager = SimpleNamespace(
        max_frame=1 << 20, config=SimpleNamespace(docker=SimpleNamespace(ready_timeout=30))
    )
    client_side = ClientFactory(manager)
    container_side = ContainerLinkFactory("ws://127.0.0.1:1/ws", session=None)
    # existing Go servers refuse unmasked client frames
    assert container_side.maskClientFrames is True
    # the held handshake outlives the readiness wait
    assert client_side.openHandshakeTimeout > 30


def test_every_hot_path_protocol_is_a_hot_path():
    from discon_manager.check.client import _Protocol
    from discon_manager.controller.server import ControllerSession
    from discon_manager.relay import ContainerLink
    from discon_manager.server import ClientProtocol
    from discon_manager.websocket import HotPath

    for cls in (ClientProtocol, ContainerLink, ControllerSession, _Protocol):
        assert issubclass(cls, HotPath), cls


@pytest_twisted.ensureDeferred
async def test_hot_path_sockets_have_tcp_nodelay():
    """Real sockets: Autobahn alone leaves TCP_NODELAY off; HotPath turns it on both ends."""
    import socket

    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )
    from twisted.internet import defer, reactor

    from discon_manager.websocket import HotPath

    seen: dict[str, int] = {}
    done = defer.Deferred()

    def nodelay(proto) -> int:
        return proto.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    class Server(HotPath, WebSocketServerProtocol):
        def onOpen(self) -> None:
            seen["server"] = nodelay(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary=True)

    class Client(HotPath, WebSocketClientProtocol):
        def onOpen(self) -> None:
            seen["client"] = nodelay(self)
            self.sendMessage(b"x" * 30000, isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            seen["echo"] = len(payload)
            self.sendClose(1000)
            done.callback(None)

    sf = WebSocketServerFactory()
    sf.protocol = Server
    port = reactor.listenTCP(0, sf, interface="127.0.0.1")
    try:
        cf = WebSocketClientFactory(f"ws://127.0.0.1:{port.getHost().port}/ws")
        cf.protocol = Client
        reactor.connectTCP("127.0.0.1", port.getHost().port, cf)
        await done.addTimeout(10, reactor)
    finally:
        await port.stopListening()
    assert seen == {"server": 1, "client": 1, "echo": 30000}


def test_ruff_is_clean():
    """The style the project keeps (pyproject.toml) holds for the whole tree."""
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ruff"), "check", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
