"""Test support: a real WebSocket client, OpenFAST-shaped frames, a real manager process.

Integration tests run the manager exactly as an operator does (``twistd -n
disconmanager`` in a subprocess, against the real Docker engine), and talk to
it with a real Autobahn client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import yaml
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor

from discon_manager import protocol as wire

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "discon-controller-"  # what the before-stop hook looks for: leaks show up
TEST_NETWORK = "discon-test-net"

SWAP_SIZE, MSG_SIZE, OUTNAME_SIZE = 464, 8197, 12601


def openfast_frame(version: int = wire.V2, infile: bytes = b"DISCON.IN", **records: float) -> bytes:
    """A DISCON request shaped like OpenFAST's: 464 floats, 8197/12601-byte strings.

    ``records`` are 1-based Bladed record numbers, e.g. ``r20=120.0``.
    """
    swap = array("f", [0.0] * SWAP_SIZE)
    swap[128] = SWAP_SIZE
    swap[48] = MSG_SIZE
    swap[63] = OUTNAME_SIZE
    swap[49] = len(infile) + 1
    swap[2] = 0.0125
    for key, value in records.items():
        swap[int(key[1:]) - 1] = value
    return wire.encode(
        wire.Message(
            swap=swap,
            infile=infile + b"\0",
            outname=b"\0" * OUTNAME_SIZE,
            msg=b"\0" * MSG_SIZE,
            version=version,
        )
    )


class _Proto(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._message(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(code, reason)


class WsClient:
    """A sequential DISCON client: ``await call(frame)`` returns the one reply."""

    def __init__(self) -> None:
        self.proto: _Proto | None = None
        self.replies: list[bytes] = []
        self._waiting: defer.Deferred | None = None
        self._open = defer.Deferred()
        self.closed = defer.Deferred()
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @classmethod
    async def connect(cls, url: str, timeout: float = 45.0) -> WsClient:
        self = cls()
        factory = WebSocketClientFactory(url)
        factory.protocol = _Proto
        factory.client = self
        factory.setProtocolOptions(
            tcpNoDelay=True, openHandshakeTimeout=timeout, maxMessagePayloadSize=0
        )
        host, port = factory.host, factory.port
        reactor.connectTCP(host, port, factory, timeout=timeout)
        self._open.addTimeout(timeout + 1, reactor)
        await self._open
        return self

    def _opened(self, proto: _Proto) -> None:
        self.proto = proto
        self._open.callback(self)

    def _message(self, payload: bytes) -> None:
        self.replies.append(payload)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(payload)

    def _closed(self, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self._open.called:
            self._open.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(ConnectionError(f"closed while waiting for a reply: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send(self, frame: bytes) -> None:
        assert self.proto is not None
        self.proto.sendMessage(frame, isBinary=True)

    async def call(self, frame: bytes, timeout: float = 30.0) -> bytes:
        self._waiting = defer.Deferred()
        d = self._waiting
        self.send(frame)
        d.addTimeout(timeout, reactor)
        return await d

    async def decoded(self, frame: bytes, timeout: float = 30.0) -> wire.Message:
        return wire.decode(await self.call(frame, timeout))

    def close(self) -> None:
        if self.proto is not None:
            self.proto.sendClose(1000)

    def abort(self) -> None:
        """A TCP reset: no close handshake."""
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()


async def sleep(seconds: float) -> None:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def eventually(check: Callable[[], Any], timeout: float = 15.0, step: float = 0.1) -> Any:
    """Poll ``check`` (blocking calls off the reactor) until it returns a truthy value."""
    from twisted.internet import threads

    deadline = time.monotonic() + timeout
    while True:
        value = await threads.deferToThread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await sleep(step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_client() -> docker.DockerClient:
    return docker.from_env()


def containers_of(instance: str) -> list[Any]:
    """This manager instance's containers, running or not."""
    return docker_client().containers.list(
        all=True, filters={"label": f"org.discon.manager={instance}"}
    )


def http_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        body, code = e.read(), e.code
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body.decode()


DEFAULT_CATALOGUE = json.loads((ROOT / "db" / "controllers.json").read_text())


@dataclass
class ManagerProcess:
    """A real ``twistd -n disconmanager`` with its own config, catalogue and instance."""

    workdir: Path
    port: int = field(default_factory=free_port)
    instance: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    overrides: dict[str, Any] = field(default_factory=dict)
    controllers: list[dict[str, Any]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def db_path(self) -> Path:
        return self.workdir / "controllers.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "manager.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.port, "debug_level": 0,
                       "call_timeout": 30},
            "docker": {
                "network_name": TEST_NETWORK,
                "container_prefix": PREFIX,
                "memory_limit": "256m",
                "cpu_limit": 1.0,
                "pids_limit": 128,
                "cleanup_timeout": 5,
                "idle_timeout": 60,
                "ready_timeout": 20,
                "instance": self.instance,
            },
            "database": {"path": str(self.db_path)},
        }
        for dotted, value in self.overrides.items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        self.config_path.write_text(yaml.safe_dump(cfg))
        if not self.db_path.exists() or self.controllers is not None:
            catalogue = {"controllers": self.controllers or DEFAULT_CATALOGUE["controllers"]}
            self.db_path.write_text(json.dumps(catalogue, indent=2))

    def start(self, wait: bool = True) -> ManagerProcess:
        self.write_files()
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format=text", "disconmanager",
             "--config", str(self.config_path)],
            cwd=str(ROOT), env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"manager exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"manager did not listen within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the manager removes its containers before it exits."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def force_cleanup(self) -> None:
        """Last resort for a failed test: no container of this instance survives it."""
        for c in containers_of(self.instance):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
