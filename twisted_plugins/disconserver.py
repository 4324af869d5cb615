"""``twistd disconserver``: the discon-server that runs inside controller containers."""

from twisted.application.service import ServiceMaker

disconserver = ServiceMaker(
    "discon-server",
    "discon_manager.controller.server",
    "Serve a Bladed-style controller library's DISCON calls over WebSocket",
    "disconserver",
)
