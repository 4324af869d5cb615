"""Autobahn protocol trimmed for the hot path, shared by every DISCON WebSocket endpoint.

Autobahn formats a debug log line (type names, peer) on every TCP read and
every write, whether or not debug logging is on; at one 23 KB message per
time step that is measurable work on each hop. These overrides do the same
I/O without it, and fall back to Autobahn's own code whenever its send queue
is in use.
"""

from __future__ import annotations

from typing import Any


class HotPath:
    """Mix in before an Autobahn Twisted protocol class."""

    def dataReceived(self: Any, data: bytes) -> None:
        self._dataReceived(data)

    def sendData(self: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            self.transport.write(data)
