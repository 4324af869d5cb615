"""``twistd disconmanager``: on-demand controller containers behind one WebSocket endpoint."""

from twisted.application.service import ServiceMaker

disconmanager = ServiceMaker(
    "DisconManager",
    "discon_manager.service",
    "Start a controller container per client and relay its DISCON calls",
    "disconmanager",
)
