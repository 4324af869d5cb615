"""The manager as a Twisted service, and ``twistd disconmanager``'s entry point.

:class:`Manager` owns what outlives a session: the configuration, the
controller registry, the container provider, the live sessions and the
metrics. Starting it removes containers an earlier run of the same instance
left behind (after ``kill -9``); stopping it (SIGTERM) closes every session
and removes every container before the process exits.
"""

from __future__ import annotations

import time
import uuid

from twisted.application import internet, service
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.python import usage

from discon_manager.config import Config, ConfigError, load
from discon_manager.containers import ContainerError, DockerContainers
from discon_manager.metrics import Metrics
from discon_manager.protocol import DEFAULT_MAX_FRAME
from discon_manager.registry import CatalogueError, Registry
from discon_manager.session import Session

log = Logger(namespace="discon-manager")

#: Seconds between sweeps for containers no session owns (a safety net).
SWEEP_INTERVAL = 30.0
#: A container this young may still be on its way to its session: never swept.
SWEEP_MIN_AGE = 60.0


class Manager(service.Service):
    """Everything one DisconManager instance shares between its sessions."""

    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.max_frame = DEFAULT_MAX_FRAME
        self.run_id = uuid.uuid4().hex[:12]
        env = {"DISCON_SERVER_DEBUG": str(config.server.debug_level)}
        if config.server.call_timeout:
            env["DISCON_CALL_TIMEOUT"] = f"{config.server.call_timeout:g}"
        self.containers = DockerContainers(config.docker, config.instance, self.run_id, env)
        self.sessions: dict[str, Session] = {}
        self._removals: set[defer.Deferred] = set()  # container work under way
        self._closed_totals = {"requests": 0, "replies": 0, "bytes_in": 0, "bytes_out": 0}
        self._started = time.monotonic()
        self.metrics = Metrics(
            sessions=lambda: len(self.sessions),
            containers=lambda: sum(1 for s in self.sessions.values() if s.owns_container),
            relay_totals=self.relay_totals,
        )
        self._loops: list[task.LoopingCall] = []

    def uptime(self) -> float:
        return time.monotonic() - self._started

    # -- service life cycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        reactor.suggestThreadPoolSize(32)  # Docker calls of 20+ concurrent cold starts
        self.registry.watch()
        d = self.containers.ensure_network()
        d.addErrback(lambda f: log.error("cannot create network: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: defer.ensureDeferred(self.sweep(startup=True)))
        check = min(5.0, self.config.docker.idle_timeout / 4)
        if self.config.server.call_timeout:
            check = min(check, max(0.5, self.config.server.call_timeout / 4))
        for fn, every in (
            (self._idle_check, check),
            (lambda: defer.ensureDeferred(self.sweep()), SWEEP_INTERVAL),
        ):
            loop = task.LoopingCall(fn)
            loop.start(every, now=False)
            self._loops.append(loop)
        log.info(
            "DisconManager {instance} ready: controllers {ids}",
            instance=self.config.instance,
            ids=self.registry.ids(),
        )

    async def _stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self.registry.stop()
        for s in list(self.sessions.values()):
            s.client.sendClose(1000, "DisconManager is shutting down")
            s.client_gone()
        while self._removals:
            await defer.DeferredList(list(self._removals))
        await self.sweep(everything=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        log.info(
            "stopping: closing {n} sessions and removing their containers", n=len(self.sessions)
        )
        return defer.ensureDeferred(self._stop())

    # -- sessions ----------------------------------------------------------------------

    def session_opened(self, s: Session) -> None:
        self.sessions[s.id] = s
        self.metrics.sessions_total.inc()

    def session_ended(self, s: Session) -> None:
        if self.sessions.pop(s.id, None) is not None:
            for k in self._closed_totals:
                self._closed_totals[k] += getattr(s, k)

    def relay_totals(self) -> dict[str, int]:
        totals = dict(self._closed_totals)
        for s in self.sessions.values():
            for k in totals:
                totals[k] += getattr(s, k)
        return totals

    def track(self, d: defer.Deferred) -> None:
        """Keep a Deferred that creates or removes a container until it is done,
        so that shutdown can wait for every one of them."""
        self._removals.add(d)
        d.addBoth(lambda result: (self._removals.discard(d), result)[1])

    def remove_container(self, name: str) -> None:
        """Remove a finished session's container, retrying until cleanup_timeout."""
        self.track(defer.ensureDeferred(self._remove(name)))

    async def _remove(self, name: str) -> None:
        deadline = reactor.seconds() + self.config.docker.cleanup_timeout
        delay = 0.2
        while True:
            try:
                await self.containers.remove(name)
                return
            except ContainerError as e:
                if reactor.seconds() + delay > deadline:
                    log.error(
                        "could not remove container {name} within {t:g} s: {e}; "
                        "the periodic sweep will retry",
                        name=name,
                        t=self.config.docker.cleanup_timeout,
                        e=str(e),
                    )
                    return
            await task.deferLater(reactor, delay, lambda: None)
            delay = min(delay * 2, 2.0)

    def _idle_check(self) -> None:
        now = reactor.seconds()
        cfg = self.config
        backstop = cfg.server.call_timeout + 5 if cfg.server.call_timeout else 0
        for s in list(self.sessions.values()):
            s.idle_check(now, cfg.docker.idle_timeout, backstop)

    async def sweep(self, startup: bool = False, everything: bool = False) -> None:
        """Remove containers of this instance that no live session owns.

        At start-up: everything an earlier run left (another run label). Later:
        also this run's containers that no session owns and that are older than
        SWEEP_MIN_AGE, so a container still on its way to its session is never
        taken. ``everything``: all of them, at shutdown.
        """
        try:
            found = await self.containers.list_ours()
        except ContainerError as e:
            if startup:
                log.error("cannot look for leftover containers: {e}", e=str(e))
            return
        owned = {s.container.name for s in self.sessions.values() if s.owns_container}
        now = time.time()
        doomed = [
            name
            for name, created, run in found
            if name not in owned
            and (
                everything or run != self.run_id or (not startup and now - created > SWEEP_MIN_AGE)
            )
        ]
        if doomed:
            log.info(
                "removing {n} containers no session owns: {names}",
                n=len(doomed),
                names=", ".join(doomed),
            )
        for name in doomed:
            self.remove_container(name)
        if startup or everything:
            while self._removals:
                await defer.DeferredList(list(self._removals))


class Options(usage.Options):
    optParameters = [
        ["config", "c", "config/config.yaml", "path of the YAML configuration"],
    ]


def makeService(options: Options) -> service.MultiService:
    """Load and check everything before the reactor runs: a bad file stops the start."""
    try:
        config = load(options["config"])
        registry = Registry(config.database_path, config.server.default_controller)
        registry.load()
    except (ConfigError, CatalogueError) as e:
        raise SystemExit(f"disconmanager: {e}") from None
    from discon_manager.server import make_site

    top = service.MultiService()
    manager = Manager(config, registry)
    manager.setServiceParent(top)
    site = make_site(manager)
    internet.TCPServer(config.server.port, site, interface=config.server.host).setServiceParent(top)
    return top
