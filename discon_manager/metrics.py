"""Prometheus metrics of one manager, on a registry of its own.

Relay counters are read from the sessions at scrape time instead of being
incremented per message: the hot path only bumps plain integers, and a scrape
adds them up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _RelayCollector(Collector):
    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self.totals = totals

    def collect(self) -> Iterable[Any]:
        t = self.totals()
        msgs = CounterMetricFamily(
            "discon_messages_relayed", "DISCON messages relayed", labels=["direction"]
        )
        msgs.add_metric(["to_controller"], t["requests"])
        msgs.add_metric(["to_client"], t["replies"])
        yield msgs
        size = CounterMetricFamily(
            "discon_bytes_relayed", "Bytes of DISCON messages relayed", labels=["direction"]
        )
        size.add_metric(["to_controller"], t["bytes_in"])
        size.add_metric(["to_client"], t["bytes_out"])
        yield size


class Metrics:
    def __init__(
        self,
        sessions: Callable[[], int],
        containers: Callable[[], int],
        relay_totals: Callable[[], dict[str, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("discon_sessions_open", "Client sessions open", registry=r).set_function(sessions)
        Gauge(
            "discon_containers_running", "Controller containers owned by open sessions", registry=r
        ).set_function(containers)
        self.sessions_total = Counter("discon_sessions", "Client sessions accepted", registry=r)
        self.containers_started = Counter(
            "discon_containers_started", "Controller containers started", registry=r
        )
        self.start_seconds = Histogram(
            "discon_container_start_seconds",
            "From the client's connection to its container accepting the relay",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30),
            registry=r,
        )
        self.errors = Counter(
            "discon_errors", "Errors reported to clients, by kind", ["kind"], registry=r
        )
        r.register(_RelayCollector(relay_totals))
