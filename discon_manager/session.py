"""One client's path through the manager, top to bottom.

1. **select**: the registry picks the controller from the client's URL.
2. **container**: a fresh container of that controller's image is started.
3. **ready**: the manager dials the container's ``/ws`` until its server
   accepts; that connection is the relay. The client's WebSocket handshake is
   held open meanwhile, so no client deadline is spent on a cold start.
4. **relay**: every client message goes to the container and every reply
   back, unchanged and in order.
5. **cleanup**: whichever way the client goes, the container is removed.

Any failure on the way becomes one line that the user reads: the client's
handshake completes, its next DISCON call is answered with aviFAIL -1 and that
line in avcMSG (in the request's version and sizes), and the session closes.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, reactor
from twisted.logger import Logger

from discon_manager.containers import ContainerError, Started
from discon_manager.protocol import (
    CLOSE_IDLE,
    CLOSE_MALFORMED,
    CLOSE_NOT_BINARY,
    FrameError,
    error_reply,
    parse_header,
    transfer_reply,
)
from discon_manager.registry import Selection, SelectionError
from discon_manager.relay import ContainerLink, HandshakeRefused, dial_until_ready

if TYPE_CHECKING:
    from discon_manager.server import ClientProtocol
    from discon_manager.service import Manager

log = Logger(namespace="discon-manager.session")


class ClientGone(Exception):
    """The client left while its container was being prepared."""


class ContainerExited(Exception):
    """The container stopped before it became ready."""


class Session:
    """A client, its controller container and the relay between them."""

    def __init__(self, manager: Manager, client: ClientProtocol, peer: str) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.manager = manager
        self.client = client
        self.peer = peer
        self.started_at = reactor.seconds()
        self.selection: Selection | None = None
        self.container: Started | None = None
        self.link: ContainerLink | None = None
        self.error: str | None = None
        self.closed = False  # the client has gone
        self._opening = False
        self._torn_down = False
        self._diagnosing = False  # the container went; asking the engine why
        # relay counters: plain ints on the hot path, read by /metrics and the idle check
        self.requests = 0
        self.replies = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.outstanding = 0
        self.last_request: bytes | None = None
        self.last_activity = self.started_at
        self._seen_requests = 0

    @property
    def controller_id(self) -> str:
        return self.selection.controller.id if self.selection else "?"

    # -- 1-3: select, container, ready (while the client's handshake is held) ----------

    async def open(self, path_id: str | None, params: dict[str, list[str]]) -> None:
        """Prepare the relay; never raises: failures are kept for the client's first call."""
        self._opening = True
        mgr = self.manager
        try:
            self.selection = sel = mgr.registry.select(params, path_id)
            c = sel.controller
            t0 = reactor.seconds()
            self.container = await mgr.containers.start(c, self.id, self.peer)
            mgr.metrics.containers_started.inc()
            self._still_here()
            try:
                self.link = await dial_until_ready(
                    self,
                    self.container.address,
                    self.container.port,
                    sel.library_path,
                    sel.proc,
                    self.started_at + mgr.config.docker.ready_timeout,
                    self._waiting_check(),
                )
            except TimeoutError:
                why = await mgr.containers.exit_reason(self.container.name, wait=False)
                raise ContainerError(
                    "not_ready",
                    f"controller '{c.id}': container {self.container.name} did not accept a "
                    f"connection within {mgr.config.docker.ready_timeout:g} s"
                    + (f" ({why})" if why else "")
                    + f"; check that image '{c.image}' runs a discon-server on port {c.port}",
                ) from None
            mgr.metrics.start_seconds.observe(reactor.seconds() - t0)
            if mgr.config.server.debug_level:
                log.info(
                    "session {s}: {peer} -> controller '{c}' in {name} ({t:.2f} s)",
                    s=self.id,
                    peer=self.peer,
                    c=c.id,
                    name=self.container.name,
                    t=reactor.seconds() - t0,
                )
        except ClientGone:
            pass
        except SelectionError as e:
            self._fail("selection", str(e))
        except ContainerError as e:
            self._fail(e.kind, self._named(str(e)))
        except ContainerExited as e:
            self._fail("container_exited", str(e))
        except HandshakeRefused as e:
            self._fail(
                "handshake_refused",
                f"controller '{self.controller_id}': its server refused the connection ({e}); "
                "check library_path and proc_name in the controller database",
            )
        except Exception as e:  # a bug: still one clear line to the user, and the traceback here
            log.failure("session {s}: unexpected error while starting", s=self.id)
            self._fail("internal", f"DisconManager internal error while starting: {e}")
        finally:
            self._opening = False
            if self.closed:
                self._release_container()

    def _still_here(self) -> None:
        if self.closed:
            raise ClientGone()

    def _waiting_check(self) -> Any:
        """Between readiness attempts: stop if the client left or the container exited.

        The container's state is asked about every 0.3 s (one inspect off the
        reactor), so a container that exits is reported at once, not at the
        readiness deadline.
        """
        last = reactor.seconds()

        async def check() -> None:
            nonlocal last
            self._still_here()
            if reactor.seconds() - last >= 0.3 and self.container is not None:
                last = reactor.seconds()
                why = await self.manager.containers.exit_reason(self.container.name, wait=False)
                if why is not None:
                    raise ContainerExited(
                        f"controller '{self.controller_id}': container {self.container.name} "
                        f"exited while starting ({why})"
                    )
                self._still_here()

        return check

    def _named(self, text: str) -> str:
        return (
            text
            if text.startswith("controller '")
            else f"controller '{self.controller_id}': {text}"
        )

    # -- 4: relay (the hot path: nothing here that is not needed per message) ----------

    def client_message(self, payload: bytes) -> None:
        link = self.link
        if link is not None and self.error is None:
            if self.outstanding and payload == self.last_request and _is_transfer(payload):
                # The newer client re-sent a transfer whose reply is late: one reply only.
                return
            self.outstanding += 1
            self.requests += 1
            self.bytes_in += len(payload)
            self.last_request = payload
            link.sendMessage(payload, isBinary=True)
            return
        if self._diagnosing and self.error is None:
            # The container just went; its exit reason is being looked up. Keep the
            # call: _fail() answers it with that reason.
            self.outstanding += 1
            self.requests += 1
            self.last_request = payload
            return
        self._answer_with_error(payload)

    def container_message(self, payload: bytes, is_binary: bool) -> None:
        if self.outstanding <= 0:
            # A reply nobody asked for (or one after we already answered): forwarding it
            # would shift every later reply by one call.
            if self.error is None:
                log.error("session {s}: unrequested reply from the container dropped", s=self.id)
            return
        self.outstanding -= 1
        self.replies += 1
        self.bytes_out += len(payload)
        self.client.sendMessage(payload, isBinary=True)

    def container_closed(self, code: int | None, reason: str | None) -> None:
        """The container's side went away while the client is still here."""
        self.link = None
        if self.closed or self.error is not None:
            return
        if code in (CLOSE_MALFORMED, CLOSE_NOT_BINARY):
            # The container's server refused what the client sent: the client's
            # fault, not the container's. Pass the reason on, at once.
            self.error = reason or "malformed DISCON frame"
            self.manager.metrics.errors.labels(kind="malformed_frame").inc()
            self.client.sendClose(code, (reason or "")[:120])
            self._release_container()
            return
        self._diagnosing = True
        defer.ensureDeferred(self._container_died(code, reason))

    async def _container_died(self, code: int | None, reason: str | None) -> None:
        name = self.container.name if self.container else "?"
        why = None
        if self.container is not None:
            try:
                why = await self.manager.containers.exit_reason(name)
            except ContainerError as e:
                why = str(e)
        why = why or f"its server closed the connection (code {code}: {reason or 'no reason'})"
        self._fail(
            "container_died",
            f"controller '{self.controller_id}': container {name} stopped during the run "
            f"after {self.replies} calls ({why}); restart the simulation",
        )

    # -- failures: one readable line through aviFAIL -1 ----------------------------

    def _fail(self, kind: str, message: str) -> None:
        if self.error is not None:
            return
        self.error = message
        self.manager.metrics.errors.labels(kind=kind).inc()
        log.warn("session {s} ({peer}): {msg}", s=self.id, peer=self.peer, msg=message)
        if self.link is not None:
            self.link.abort()
            self.link = None
        if self.outstanding > 0 and self.last_request is not None:
            self.outstanding = 0
            self._answer_with_error(self.last_request)
        self._release_container()

    def fail_call_timeout(self, seconds: float) -> None:
        self._fail(
            "call_timeout",
            f"controller '{self.controller_id}' did not answer call {self.requests} within "
            f"{seconds:g} s; the session was stopped",
        )

    def _answer_with_error(self, request: bytes) -> None:
        if self.closed:
            return
        text = self.error or f"controller '{self.controller_id}' is not connected"
        try:
            header = parse_header(request, self.manager.max_frame)
        except FrameError as e:
            self.client.sendClose(CLOSE_MALFORMED, f"malformed DISCON frame: {e}"[:120])
            return
        if header.is_transfer:
            # A transfer reply carries 256 bytes of text; the DISCON call that follows
            # gets the error in avcMSG, which is what OpenFAST prints.
            self.client.sendMessage(transfer_reply(request, text, ok=False), isBinary=True)
            return
        self.client.sendMessage(error_reply(request, text), isBinary=True)
        self.client.sendClose(1000, "DisconManager session ended")

    # -- 5: cleanup --------------------------------------------------------------

    def client_gone(self) -> None:
        """The client's connection closed, cleanly or not."""
        if self.closed:
            return
        self.closed = True
        if self.manager.config.server.debug_level:
            log.info(
                "session {s}: client {peer} left after {n} calls",
                s=self.id,
                peer=self.peer,
                n=self.requests,
            )
        self.manager.session_ended(self)
        if not self._opening:
            self._release_container()
        # else: open() sees `closed` at its next step and releases the container itself

    def _release_container(self) -> None:
        """Remove the container; the session itself lasts until its client goes."""
        if self.link is not None:
            self.link.abort()
            self.link = None
        if self._torn_down:
            return
        self._torn_down = True
        if self.container is not None:
            self.manager.remove_container(self.container.name)

    @property
    def owns_container(self) -> bool:
        return self.container is not None and not self._torn_down

    def idle_check(self, now: float, idle_timeout: float, call_timeout: float) -> None:
        """Called every few seconds by the manager: idle clients and unanswered calls.

        Activity is noticed here, by comparing counters, so the hot path pays
        nothing for it (no clock read per message).
        """
        if self.requests != self._seen_requests:
            self._seen_requests = self.requests
            self.last_activity = now
        if self.closed or self._opening:
            return
        silent = now - self.last_activity
        if call_timeout and self.outstanding > 0 and self.error is None and silent > call_timeout:
            self.fail_call_timeout(call_timeout)
        elif silent > idle_timeout and self.outstanding == 0:
            log.info(
                "session {s}: client {peer} sent nothing for {t:.0f} s: closing",
                s=self.id,
                peer=self.peer,
                t=silent,
            )
            self.manager.metrics.errors.labels(kind="idle_timeout").inc()
            # A close with the reason; Autobahn drops the TCP connection itself if a
            # half-open peer never answers it.
            self.client.sendClose(CLOSE_IDLE, f"no DISCON call for {silent:.0f} s (idle_timeout)")
            self.client_gone()

    def describe(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "name": self.container.name if self.container else None,
            "id": self.container.id if self.container else None,
            "controller": self.controller_id,
            "client": self.peer,
            "started": self.started_at,
            "last_activity": self.last_activity,
            "calls": self.requests,
            "state": "failed" if self.error else ("relaying" if self.link else "starting"),
            "error": self.error,
        }


def _is_transfer(payload: bytes) -> bool:
    try:
        return parse_header(payload).is_transfer
    except FrameError:
        return False
