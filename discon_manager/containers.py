"""Controller containers on the Docker engine, through the docker SDK.

Every SDK call is blocking HTTP to the engine, so every one runs in the
reactor's thread pool (``deferToThread``); the reactor thread never waits on
Docker. Each public method returns a Deferred and turns engine failures into
:class:`ContainerError`, whose text is what the user reads in avcMSG.

A method that creates something also removes it when a later step fails, so
no path through here leaves a container behind.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions
from twisted.internet import threads
from twisted.internet.defer import Deferred

from discon_manager.config import DockerConfig
from discon_manager.registry import Controller

LABEL_MANAGER = "org.discon.manager"
LABEL_SESSION = "org.discon.session"
LABEL_CONTROLLER = "org.discon.session.controller"
LABEL_CLIENT = "org.discon.session.client"
LABEL_RUN = "org.discon.manager.run"


class ContainerError(RuntimeError):
    """A Docker step failed; ``kind`` labels the error metric, the text is for the user."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Started:
    """A running container and where its server listens."""

    id: str
    name: str
    address: str
    port: int


def _human(n: int) -> str:
    for unit, size in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class DockerContainers:
    """Creates, inspects and removes this manager's controller containers."""

    def __init__(
        self, cfg: DockerConfig, instance: str, run: str, extra_env: dict[str, str] | None = None
    ) -> None:
        self.cfg = cfg
        self.instance = instance
        self.run = run
        self.extra_env = extra_env or {}
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._numbers = itertools.count(1)

    # -- plumbing ------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = docker.from_env(max_pool_size=64, timeout=60)
                except docker.errors.DockerException as e:
                    raise ContainerError("engine_unreachable", _engine_down(e)) from None
            return self._client

    @staticmethod
    def _run(fn: Any, *args: Any) -> Deferred:
        """Run a blocking SDK function in the thread pool, mapping engine errors."""

        def call() -> Any:
            try:
                return fn(*args)
            except ContainerError:
                raise
            except (requests.exceptions.ConnectionError, docker.errors.DockerException) as e:
                if isinstance(e, docker.errors.APIError) and e.response is not None:
                    raise ContainerError(
                        "engine_error", f"Docker engine error: {e.explanation}"
                    ) from None
                raise ContainerError("engine_unreachable", _engine_down(e)) from None

        return threads.deferToThread(call)

    # -- the engine ----------------------------------------------------------------

    def ping(self) -> Deferred:
        """Deferred[str]: the engine's version; fails with ContainerError when unreachable."""
        return self._run(lambda: self._docker().version().get("Version", "unknown"))

    def ensure_network(self) -> Deferred:
        def sync() -> None:
            client = self._docker()
            try:
                client.networks.get(self.cfg.network_name)
            except docker.errors.NotFound:
                try:
                    client.networks.create(self.cfg.network_name, driver="bridge")
                except docker.errors.APIError as e:
                    if e.status_code != 409:  # created by someone else meanwhile
                        raise

        return self._run(sync)

    # -- one container ---------------------------------------------------------------

    def start(self, controller: Controller, session: str, client: str) -> Deferred:
        """Deferred[Started]: create and start a container for ``controller``."""
        return self._run(self._start_sync, controller, session, client)

    def _start_sync(self, controller: Controller, session: str, client_addr: str) -> Started:
        client = self._docker()
        labels = {
            LABEL_MANAGER: self.instance,
            LABEL_RUN: self.run,
            LABEL_SESSION: session,
            LABEL_CONTROLLER: controller.id,
            LABEL_CLIENT: client_addr,
        }
        kwargs: dict[str, Any] = dict(
            labels=labels,
            detach=True,
            network=self.cfg.network_name,
            mem_limit=self.cfg.memory_limit,
            memswap_limit=self.cfg.memory_limit,  # no swap on top of the limit
            nano_cpus=int(self.cfg.cpu_limit * 1e9),
            pids_limit=self.cfg.pids_limit,
            environment=dict(self.extra_env),
            init=False,
        )
        for _ in range(20):
            name = f"{self.cfg.container_prefix}{controller.id}-{next(self._numbers)}"
            try:
                container = client.containers.create(controller.image, name=name, **kwargs)
                break
            except docker.errors.ImageNotFound:
                raise ContainerError(
                    "image_missing",
                    f"controller '{controller.id}': image '{controller.image}' is not on the "
                    "Docker engine; build it (./build.sh) or load it, then try again",
                ) from None
            except docker.errors.NotFound as e:
                if "network" in str(e.explanation).lower():
                    raise ContainerError(
                        "network_missing",
                        f"Docker network '{self.cfg.network_name}' is missing; restart the manager "
                        "or create it (docker network create " + self.cfg.network_name + ")",
                    ) from None
                raise
            except docker.errors.APIError as e:
                if e.status_code == 409:  # a leftover with that name: take the next number
                    continue
                raise
        else:
            raise ContainerError("name_conflict", "no free container name after 20 tries")
        try:
            container.start()
            container.reload()
            net = container.attrs["NetworkSettings"]["Networks"].get(self.cfg.network_name) or {}
            address = net.get("IPAddress")
            if not address:
                why = self._why_stopped(container)
                if why is not None:  # it exited before we could even look
                    raise ContainerError(
                        "container_exited",
                        f"controller '{controller.id}': container {name} exited while "
                        f"starting ({why})",
                    )
                raise ContainerError(
                    "no_address",
                    f"controller '{controller.id}': container {name} has no address on "
                    f"network '{self.cfg.network_name}'",
                )
        except BaseException:
            try:
                container.remove(force=True)
            except docker.errors.DockerException:
                pass  # the sweep removes it by label
            raise
        return Started(id=container.id, name=name, address=address, port=controller.port)

    def exit_reason(self, name: str, wait: bool = True) -> Deferred:
        """Deferred[str | None]: why a container stopped ("exit code 137, out of memory"...).

        None while it is still running. With ``wait``, waits up to 3 s for the
        engine to record an exit, which lags the connection drop that made us ask.
        """

        def sync() -> str | None:
            try:
                c = self._docker().containers.get(name)
                if wait and c.status == "running":
                    try:
                        c.wait(timeout=3)
                    except Exception:  # still running after 3 s
                        pass
                    c.reload()
            except docker.errors.NotFound:
                return "the container was removed"
            return self._why_stopped(c)

        return self._run(sync)

    def _why_stopped(self, c: Any) -> str | None:
        state = c.attrs.get("State", {})
        if state.get("Running"):
            return None
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            return (
                f"exit code {code}: killed for running out of memory (limit "
                f"{_human(self.cfg.memory_limit)}); raise docker.memory_limit"
            )
        if code == 137:
            return "exit code 137: killed (SIGKILL) from outside the manager"
        logs = c.logs(tail=3).decode("utf-8", "replace").strip().splitlines()
        tail = f"; last log line: {logs[-1][:200]}" if logs else ""
        return f"exit code {code}{tail}"

    def remove(self, name: str) -> Deferred:
        """Deferred[None]: kill and remove; a container already gone is not an error."""

        def sync() -> None:
            try:
                self._docker().api.remove_container(name, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code == 409 and "in progress" in str(e.explanation):
                    return  # another removal of it is under way
                raise

        return self._run(sync)

    # -- all of ours -------------------------------------------------------------------

    def list_ours(self) -> Deferred:
        """Deferred[list[(name, created, run)]]: every container labelled with this instance."""

        def sync() -> list[tuple[str, float, str]]:
            found = self._docker().api.containers(
                all=True, filters={"label": f"{LABEL_MANAGER}={self.instance}"}
            )
            return [
                (
                    c["Names"][0].lstrip("/"),
                    float(c.get("Created", 0)),
                    (c.get("Labels") or {}).get(LABEL_RUN, ""),
                )
                for c in found
            ]

        return self._run(sync)


def _engine_down(e: Exception) -> str:
    return (
        f"the Docker engine is not reachable ({type(e).__name__}: {str(e)[:160]}); "
        "start it, or check DOCKER_HOST and the mounted /var/run/docker.sock"
    )
