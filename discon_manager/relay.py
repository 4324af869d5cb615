"""The manager's WebSocket link to a controller container.

An Autobahn client protocol per session. It masks its frames (existing Go
discon-servers refuse unmasked client frames) and sets TCP_NODELAY, and it
does nothing per message but hand the payload to its session: relaying is
byte for byte, with no decoding on the hot path.

:func:`dial_until_ready` is also the readiness probe: a container is ready
exactly when its server accepts this very connection, so there is no separate
health poll, no sleep and no log scraping, and no second connection for an
existing server to mistake for a client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred

from discon_manager.protocol import DEFAULT_MAX_FRAME
from discon_manager.websocket import HotPath

if TYPE_CHECKING:
    from discon_manager.session import Session

#: Steps between connection attempts while a container starts.
POLL_STEP = 0.025
#: One attempt's TCP connect timeout (an exited container's address never answers).
CONNECT_TIMEOUT = 1.0


class HandshakeRefused(Exception):
    """The container's server answered but refused the WebSocket upgrade."""


class ContainerLink(HotPath, WebSocketClientProtocol):
    """One session's connection to its container."""

    factory: ContainerLinkFactory

    def onOpen(self) -> None:
        self.factory.opened = True
        self.factory.ready.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.session.container_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened:
            if not self.factory.ready.called:
                self.factory.ready.errback(HandshakeRefused(reason or f"close code {code}"))
            return
        self.factory.session.container_closed(code, reason)

    def abort(self) -> None:
        """Drop the link at once (its container is being removed anyway)."""
        if self.transport is not None:
            self.transport.abortConnection()


class ContainerLinkFactory(WebSocketClientFactory):
    protocol = ContainerLink
    noisy = False  # one factory per connection attempt: no start/stop log lines

    def __init__(self, url: str, session: Session) -> None:
        super().__init__(url)
        self.session = session
        self.opened = False
        self.ready: Deferred = Deferred()
        self.setProtocolOptions(
            tcpNoDelay=True,
            maxMessagePayloadSize=DEFAULT_MAX_FRAME,
            maxFramePayloadSize=DEFAULT_MAX_FRAME,
            autoFragmentSize=0,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
        )

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(reason.value)


def container_url(address: str, port: int, library_path: str, proc: str) -> str:
    return f"ws://{address}:{port}/ws?" + urlencode({"path": library_path, "proc": proc})


async def dial_until_ready(
    session: Session,
    address: str,
    port: int,
    library_path: str,
    proc: str,
    deadline: float,
    still_wanted: Any,
) -> ContainerLink:
    """Connect to a starting container, retrying refused connections in short steps.

    ``still_wanted()`` is asked between attempts so that a client that left,
    or a container that exited, ends the wait at once. ``deadline`` is a
    reactor time. Raises TimeoutError, HandshakeRefused, or whatever
    ``still_wanted`` raises.
    """
    url = container_url(address, port, library_path, proc)
    while True:
        await still_wanted()
        factory = ContainerLinkFactory(url, session)
        reactor.connectTCP(address, port, factory, timeout=CONNECT_TIMEOUT)
        try:
            return await factory.ready
        except HandshakeRefused:
            raise
        except (error.ConnectionRefusedError, error.TimeoutError, error.ConnectError):
            pass
        if reactor.seconds() >= deadline:
            raise TimeoutError(f"no WebSocket server answered on {address}:{port}")
        await _sleep(POLL_STEP)


def _sleep(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
