"""The client-facing WebSocket endpoint and the site that serves it.

``/ws`` and ``/{controller}/ws`` are one Autobahn WebSocketResource inside the
twisted.web site that also serves the management endpoints, so one port does
everything. Each accepted connection is a :class:`ClientProtocol` that hands
its life to a :class:`~discon_manager.session.Session`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer
from twisted.web import server

from discon_manager.protocol import CLOSE_NOT_BINARY
from discon_manager.session import Session
from discon_manager.web import Root
from discon_manager.websocket import HotPath

if TYPE_CHECKING:
    from discon_manager.service import Manager


def controller_from_path(path: str) -> str | None:
    """``/nrel5mw/ws`` -> ``nrel5mw``; ``/ws`` -> None (the client appends ``/ws``)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[-1] == "ws":
        return parts[-2]
    return None


class ClientProtocol(HotPath, WebSocketServerProtocol):
    """A discon-client connection. Its handshake completes once its container is ready."""

    factory: ClientFactory
    session: Session | None = None

    def onConnect(self, request: Any) -> defer.Deferred:
        mgr = self.factory.manager
        self.session = Session(mgr, self, request.peer)
        mgr.session_opened(self.session)
        # Holding the handshake open until the container is ready: the client's
        # file-transfer deadlines only start after it completes.
        d = defer.ensureDeferred(
            self.session.open(controller_from_path(request.path), request.params)
        )
        d.addCallback(lambda _: None)  # accept, whatever happened: errors go out as aviFAIL -1
        mgr.track(d)
        return d

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.session.client_message(payload)
        else:
            self.sendClose(CLOSE_NOT_BINARY, "DISCON messages are binary frames")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.client_gone()


class ClientFactory(WebSocketServerFactory):
    protocol = ClientProtocol

    def __init__(self, manager: Manager) -> None:
        super().__init__()
        self.manager = manager
        self.setProtocolOptions(
            tcpNoDelay=True,
            maxMessagePayloadSize=manager.max_frame,
            maxFramePayloadSize=manager.max_frame,
            autoFragmentSize=0,
            # Session.open() bounds itself by docker.ready_timeout (<= 40 s, under the
            # client's own 45 s); this is only a backstop for a stuck handshake.
            openHandshakeTimeout=60,
            requireMaskedClientFrames=False,
            failByDrop=False,  # protocol violations get a close with a reason, not a reset
            closeHandshakeTimeout=2,
        )


def make_site(manager: Manager) -> server.Site:
    ws = WebSocketResource(ClientFactory(manager))
    site = server.Site(Root(manager, ws))
    site.displayTracebacks = False
    return site
