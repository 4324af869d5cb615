"""DisconManager: on-demand controller containers behind one WebSocket endpoint."""

__version__ = "0.1.0"
