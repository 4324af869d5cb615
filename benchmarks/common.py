"""Shared pieces of bench_manager.py and bench_e2e.py.

The minimal blocking WebSocket client, the OpenFAST-shaped frames and the
statistics come from bench_server.py (imported, not copied); what is added
here: a client with a short connect timeout and a clean close (for polling a
starting container), containers started with the same limits and environment
as the manager gives its own, a manager process configured for benchmarks,
and table/JSON output.

Everything a benchmark creates is named ``discon-controller-bench-*`` and
lives on the ``discon-bench-net`` network; :class:`BenchDocker` removes its
containers (and the network, when it made it) on exit, also on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for p in (str(ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_server import (  # noqa: E402
    NETWORK,
    PORT,
    WsClient,
    container_ip,
    openfast_frames,
    percentile,
    summarize,
    wait_listening,
)

from discon_manager.protocol import decode, parse_header  # noqa: E402

__all__ = [
    "BENCH_PREFIX",
    "CONTAINER_LIMITS",
    "NETWORK",
    "PORT",
    "ROOT",
    "BenchDocker",
    "BenchWsClient",
    "WsClient",
    "bench_manager",
    "check_reply",
    "container_ip",
    "host_info",
    "manager_container_names",
    "median",
    "openfast_frames",
    "percentile",
    "print_table",
    "rss_kib",
    "summarize",
    "wait_listening",
    "wait_manager_containers",
    "write_json",
]

BENCH_PREFIX = "discon-controller-bench-"
#: The limits ManagerProcess configures for the manager's containers; containers the
#: benchmarks start themselves get the same, so that a comparison isolates the manager.
MEMORY_LIMIT = "256m"
CPU_LIMIT = 1.0
PIDS_LIMIT = 128
CALL_TIMEOUT = 30
CONTAINER_LIMITS: dict[str, Any] = {
    "mem_limit": MEMORY_LIMIT,
    "memswap_limit": MEMORY_LIMIT,
    "nano_cpus": int(CPU_LIMIT * 1e9),
    "pids_limit": PIDS_LIMIT,
    # what the manager passes its containers (service.Manager)
    "environment": {"DISCON_SERVER_DEBUG": "0", "DISCON_CALL_TIMEOUT": f"{CALL_TIMEOUT:g}"},
    "init": False,
}
LABEL_BENCH = "org.discon.bench"


# -- a WebSocket client for polling a starting server --------------------------------


#: bench_server's client (connect timeout, clean close on a refused handshake).
BenchWsClient = WsClient


def check_reply(request: bytes, reply: bytes) -> str:
    """A DISCON reply of the request's size with aviFAIL 0; returns its avcMSG text."""
    if len(reply) != len(request):
        raise AssertionError(f"reply of {len(reply)} bytes to a {len(request)}-byte request")
    h = parse_header(reply)
    fail = struct.unpack_from("<i", reply, h.fail_offset)[0]
    text = decode(reply).text
    if fail != 0:
        raise AssertionError(f"server replied aviFAIL {fail}: {text}")
    return text


# -- Docker: our own containers and network ----------------------------------------


class BenchDocker:
    """The engine, the bench network and every container a benchmark started itself."""

    def __init__(self) -> None:
        self.client = docker.from_env(timeout=120)
        self.tag = uuid.uuid4().hex[:8]
        self.made_network = False
        self.started: list[Container] = []
        self._n = 0

    def __enter__(self) -> BenchDocker:
        try:
            self.client.networks.get(NETWORK)
        except docker.errors.NotFound:
            try:
                self.client.networks.create(NETWORK, driver="bridge")
                self.made_network = True
            except docker.errors.APIError as e:
                if e.status_code != 409:  # someone else made it meanwhile
                    raise
        return self

    def name(self, role: str) -> str:
        self._n += 1
        return f"{BENCH_PREFIX}{role}-{self.tag}-{self._n}"

    def run(self, image: str, role: str) -> Container:
        """``docker run -d`` (create + start), with the manager's limits; IP not looked up."""
        container = self.client.containers.run(
            image,
            name=self.name(role),
            network=NETWORK,
            detach=True,
            labels={LABEL_BENCH: self.tag},
            **CONTAINER_LIMITS,
        )
        self.started.append(container)
        return container

    def start_server(self, image: str, role: str) -> tuple[Container, str]:
        """A container of ``image`` whose server listens; (container, IP)."""
        c = self.run(image, role)
        ip = container_ip(c)
        wait_listening(c, ip)
        return c, ip

    def remove(self, container: Container) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        with contextlib.suppress(ValueError):
            self.started.remove(container)

    def remove_network(self) -> None:
        """Remove the network if we made it; waits a little for other endpoints to leave."""
        if not self.made_network:
            return
        for _ in range(20):
            try:
                self.client.networks.get(NETWORK).remove()
                self.made_network = False
                return
            except docker.errors.NotFound:
                self.made_network = False
                return
            except docker.errors.APIError:
                time.sleep(0.5)  # still in use (a manager container being removed)
        print(f"warning: could not remove network {NETWORK} (still in use)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for c in list(self.started):
            self.remove(c)
        # anything of ours the list missed (a run() that failed half-way)
        ours = {"label": f"{LABEL_BENCH}={self.tag}"}
        for c in self.client.containers.list(all=True, filters=ours):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
        self.remove_network()
        self.client.close()


# -- the manager -------------------------------------------------------------------------


@contextlib.contextmanager
def bench_manager(env: dict[str, str] | None = None, **overrides: Any) -> Iterator[Any]:
    """A real ``twistd disconmanager`` (tests.support.ManagerProcess) set up for benchmarks.

    Its containers are named ``discon-controller-bench-mgr-*``, live on the bench
    network and get the limits in CONTAINER_LIMITS; idle sessions are not closed
    for 10 minutes. Stopped (SIGTERM: it removes its containers) at the end, and any
    container of its instance that survived that is removed too. ``overrides`` are
    ManagerProcess's ("docker.idle_timeout": 60, ...), ``env`` extra environment
    (not PYTHONPATH: ManagerProcess.start sets that itself and fails on a second one).
    """
    from tests.support import ManagerProcess

    settings: dict[str, Any] = {
        "docker.network_name": NETWORK,
        "docker.container_prefix": f"{BENCH_PREFIX}mgr-",
        "docker.memory_limit": MEMORY_LIMIT,
        "docker.cpu_limit": CPU_LIMIT,
        "docker.pids_limit": PIDS_LIMIT,
        "docker.idle_timeout": 600,
        "docker.ready_timeout": 30,
        "docker.cleanup_timeout": 10,
        "server.call_timeout": CALL_TIMEOUT,
    }
    settings.update(overrides)
    with tempfile.TemporaryDirectory(prefix="discon-bench-") as tmp:
        m = ManagerProcess(
            workdir=Path(tmp),
            instance=f"bench-{uuid.uuid4().hex[:8]}",
            overrides=settings,
            env=dict(env or {}),
        )
        try:
            m.start()
            yield m
        except BaseException:
            log = m.logs()
            if log:
                print("--- manager log (last 40 lines) ---", file=sys.stderr)
                print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
            raise
        finally:
            m.stop()
            client = docker.from_env()
            try:
                for c in client.containers.list(
                    all=True, filters={"label": f"org.discon.manager={m.instance}"}
                ):
                    print(f"warning: manager left {c.name} behind; removing it", file=sys.stderr)
                    with contextlib.suppress(docker.errors.NotFound):
                        c.remove(force=True)
            finally:
                client.close()


def manager_container_names(client: docker.DockerClient, instance: str) -> list[str]:
    found = client.api.containers(all=True, filters={"label": f"org.discon.manager={instance}"})
    return [c["Names"][0].lstrip("/") for c in found]


def wait_manager_containers(
    client: docker.DockerClient, instance: str, count: int = 0, timeout: float = 60.0
) -> float:
    """Wait until the manager has exactly ``count`` containers; seconds waited."""
    t0 = time.monotonic()
    while True:
        n = len(manager_container_names(client, instance))
        if n == count:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"manager still has {n} containers (expected {count}) "
                               f"after {timeout:g} s")
        time.sleep(0.1)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# -- output ------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
        )

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def host_info(client: docker.DockerClient) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "docker": client.version().get("Version"),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report.setdefault("when", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")
