"""Management endpoints as twisted.web resources: /health, /metrics, /containers, /controllers.

They share the port of ``/ws``. Anything that needs the engine (``/health``)
asks it off the reactor thread and renders asynchronously.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource, server
from twisted.web.http import Request

from discon_manager import __version__

if TYPE_CHECKING:
    from discon_manager.service import Manager


def _json(request: Request, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body, indent=2).encode() + b"\n"


class Health(resource.Resource):
    """200 with status when the engine answers, 503 when it does not."""

    isLeaf = True

    def __init__(self, manager: Manager) -> None:
        super().__init__()
        self.manager = manager

    def render_GET(self, request: Request) -> Any:
        m = self.manager
        body: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(m.uptime(), 1),
            "sessions": len(m.sessions),
            "engine": {"reachable": True},
        }

        def ok(engine_version: str) -> None:
            body["engine"]["version"] = engine_version
            request.write(_json(request, body))
            request.finish()

        def down(failure: Any) -> None:
            body["status"] = "unavailable"
            body["engine"] = {"reachable": False, "error": failure.getErrorMessage()}
            request.write(_json(request, body, 503))
            request.finish()

        d = m.containers.ping()
        d.addCallbacks(ok, down)
        d.addErrback(lambda _: None)  # the client went away before we answered
        return server.NOT_DONE_YET


class Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, manager: Manager) -> None:
        super().__init__()
        self.manager = manager

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.manager.metrics.registry)


class Containers(resource.Resource):
    isLeaf = True

    def __init__(self, manager: Manager) -> None:
        super().__init__()
        self.manager = manager

    def render_GET(self, request: Request) -> bytes:
        return _json(request, [s.describe() for s in self.manager.sessions.values()])


class Controllers(resource.Resource):
    isLeaf = True

    def __init__(self, manager: Manager) -> None:
        super().__init__()
        self.manager = manager

    def render_GET(self, request: Request) -> bytes:
        reg = self.manager.registry
        return _json(
            request,
            {
                "default": reg.default_id or (reg.controllers[0].id if reg.controllers else None),
                "controllers": [c.as_json() for c in reg.controllers],
            },
        )


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(
            request,
            {
                "error": f"no such endpoint: {request.path.decode('utf-8', 'replace')}",
                "endpoints": [
                    "/ws",
                    "/{controller}/ws",
                    "/health",
                    "/metrics",
                    "/containers",
                    "/controllers",
                ],
            },
            404,
        )


class ControllerPath(resource.Resource):
    """``/{controller}/``: only ``ws`` lives below it."""

    def __init__(self, ws: resource.Resource) -> None:
        super().__init__()
        self.ws = ws

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return self.ws if path == b"ws" else NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class Root(resource.Resource):
    def __init__(self, manager: Manager, ws: resource.Resource) -> None:
        super().__init__()
        self.ws = ws
        self.putChild(b"ws", ws)
        self.putChild(b"health", Health(manager))
        self.putChild(b"metrics", Metrics(manager))
        self.putChild(b"containers", Containers(manager))
        self.putChild(b"controllers", Controllers(manager))

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        if path:
            return ControllerPath(self.ws)
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)
