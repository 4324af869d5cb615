"""Autobahn protocol trimmed for the hot path, shared by every DISCON WebSocket endpoint.

TCP_NODELAY first: Autobahn's Twisted adapter means to set it in
``connectionMade`` but reads the option before copying it from the factory, so
it never does (checked with getsockopt); a 23 KB reply would then wait on
Nagle's algorithm. ``connectionMade`` here sets it on every connection.

Then two costs per message that a 23 KB DISCON call per time step does not need:

- Autobahn formats a debug log line (type names, peer) on every TCP read and
  every write, whether or not debug logging is on.
- Twisted queues every write until the next reactor turn: an ``epoll_ctl``
  to ask for writability, an ``epoll_wait`` and an ``epoll_ctl`` to stop
  asking, per message. When nothing is queued, sending at once is the same
  bytes in the same order, minus those system calls.

Both overrides fall back to Autobahn's and Twisted's own code whenever
anything is queued, so ordering never changes.
"""

from __future__ import annotations

from typing import Any


class HotPath:
    """Mix in before an Autobahn Twisted protocol class."""

    def connectionMade(self: Any) -> None:
        super().connectionMade()  # type: ignore[misc]
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:  # not a TCP socket
                pass

    def dataReceived(self: Any, data: bytes) -> None:
        self._dataReceived(data)

    def sendData(self: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        t = self.transport
        sock = getattr(t, "socket", None)
        if sock is not None and t.connected and not t.dataBuffer and not t._tempDataBuffer:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # Twisted's own write below notices and reports the error
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)
