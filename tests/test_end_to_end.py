"""Real runs end to end: a closed-loop simulation through the manager equals the in-process one.

600 simulated seconds at 80 calls per second with the NREL 5-MW plant, driven
by ``discon-check``'s driver: once with the controller loaded in this process,
once through DisconManager (both client generations), once straight to a
discon-server container, and twice at the same time. The CSVs must be
byte-identical: anything else means a reply was changed, shifted or lost.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import docker
import pytest
import pytest_twisted
from twisted.internet import defer, threads

from discon_manager import protocol
from discon_manager.check.client import run_network
from discon_manager.check.driver import RunConfig, run_in_process
from tests.support import (
    PREFIX,
    TEST_NETWORK,
    ManagerProcess,
    containers_of,
    docker_client,
    eventually,
)

DURATION = 600.0
DT = 1 / 80


def _config(csv: Path, infile: str = "", **kw) -> RunConfig:
    return RunConfig(infile=infile, duration=DURATION, dt=DT, csv_path=csv, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, controller_libs, nrel5mw_infile):
    """In-process CSVs, each from a fresh copy of the library (fresh controller state)."""
    out = tmp_path_factory.mktemp("reference")
    refs: dict[str, bytes] = {}
    for name, proc, infile in (
        ("nrel5mw", "DISCON", str(nrel5mw_infile)),
        ("default", "discon", ""),
    ):
        lib = out / f"lib{name}-{uuid.uuid4().hex[:6]}.so"
        shutil.copy(controller_libs[name], lib)
        csv = out / f"{name}.csv"
        result = run_in_process(lib, proc, _config(csv, infile))
        assert result.ok, result.error
        refs[name] = csv.read_bytes()
    # the plant really goes through every torque region with the real controller
    assert refs["nrel5mw"].count(b"\n") == int(DURATION / DT) + 2  # header + steps + final
    return refs


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = ManagerProcess(workdir=tmp_path_factory.mktemp("e2e-manager"))
    m.start()
    yield m
    m.stop()
    left = containers_of(m.instance)
    for c in left:
        c.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


async def _run(server: str, csv: Path, infile: str = "", version: int = 2, **kw):
    return await run_network(
        server,
        _config(csv, infile, **kw.pop("config", {})),
        client_version=version,
        path=kw.pop("path", ""),
        proc=kw.pop("proc", ""),
        **kw,
    )


@pytest_twisted.ensureDeferred
async def test_nrel5mw_through_manager_v2(manager, reference, nrel5mw_infile, tmp_path):
    """v2: DISCON.IN reaches the container only by file transfer, as input_<hash>_DISCON.IN."""
    csv = tmp_path / "v2.csv"
    r = await _run(f"127.0.0.1:{manager.port}/nrel5mw", csv, str(nrel5mw_infile))
    assert r.ok, r.error
    assert [t["server_name"] for t in r.transport_stats["transfers"]] == [
        protocol.server_file_name("DISCON.IN", nrel5mw_infile.read_bytes())
    ]
    assert r.regions_visited == ["1.5", "2", "2.5", "3"]
    assert csv.read_bytes() == reference["nrel5mw"]


@pytest_twisted.ensureDeferred
async def test_nrel5mw_through_manager_v1(manager, reference, tmp_path):
    """v1 cannot transfer files: it names the DISCON.IN that ships in the image."""
    csv = tmp_path / "v1.csv"
    r = await _run(f"127.0.0.1:{manager.port}/nrel5mw", csv, "DISCON.IN", version=1)
    assert r.ok, r.error
    assert csv.read_bytes() == reference["nrel5mw"]


@pytest_twisted.ensureDeferred
async def test_default_through_manager_both_versions(manager, reference, tmp_path):
    for version in (1, 2):
        csv = tmp_path / f"default-v{version}.csv"
        r = await _run(f"127.0.0.1:{manager.port}", csv, version=version)
        assert r.ok, r.error
        assert csv.read_bytes() == reference["default"], f"client version {version}"


@pytest_twisted.ensureDeferred
async def test_two_sessions_at_once_share_no_state(manager, reference, nrel5mw_infile, tmp_path):
    runs = [
        defer.ensureDeferred(
            _run(f"127.0.0.1:{manager.port}/nrel5mw", tmp_path / f"c{i}.csv", str(nrel5mw_infile))
        )
        for i in range(2)
    ]
    results = await defer.gatherResults(runs, consumeErrors=True)
    for i, r in enumerate(results):
        assert r.ok, r.error
        assert (tmp_path / f"c{i}.csv").read_bytes() == reference["nrel5mw"]


@pytest.fixture
def direct_container():
    """A discon-server-nrel5mw container dialled without the manager."""
    client = docker_client()
    try:
        client.networks.get(TEST_NETWORK)
    except docker.errors.NotFound:
        client.networks.create(TEST_NETWORK)
    c = client.containers.run(
        "discon-server-nrel5mw:latest",
        detach=True,
        network=TEST_NETWORK,
        name=f"{PREFIX}e2e-direct-{uuid.uuid4().hex[:6]}",
    )
    try:
        c.reload()
        yield c.attrs["NetworkSettings"]["Networks"][TEST_NETWORK]["IPAddress"]
    finally:
        c.remove(force=True)


@pytest_twisted.ensureDeferred
async def test_nrel5mw_direct_to_container(direct_container, reference, nrel5mw_infile, tmp_path):
    csv = tmp_path / "direct.csv"
    r = await _run(
        f"{direct_container}:8080",
        csv,
        str(nrel5mw_infile),
        path="libnrel5mw.so",
        proc="DISCON",
    )
    assert r.ok, r.error
    assert csv.read_bytes() == reference["nrel5mw"]


@pytest.mark.parametrize(
    "hook, message",
    [
        (666, "the controller crashed with signal 11 (SIGSEGV) on call 81"),
        (667, "the controller did not answer call 81 within 3 s and was stopped"),
        (668, "requested failure"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_hooks_end_the_run_readably(tmp_path, hook, message):
    m = ManagerProcess(workdir=tmp_path / "m", overrides={"server.call_timeout": 3})
    await threads.deferToThread(m.start)
    try:
        csv = tmp_path / "hook.csv"
        r = await run_network(
            f"127.0.0.1:{m.port}/default",
            RunConfig(duration=5, dt=DT, csv_path=csv, set_records=((119, hook, 1.0),)),
            path="",
            proc="",
        )
        assert r.exit_code == 1
        assert r.error == message
        assert r.error_time == 1.0
        # the run stopped at the failing call: 80 good steps, then the error row
        assert csv.read_text().count("\n") == 1 + 81
        await eventually(lambda: not containers_of(m.instance), timeout=10)
    finally:
        await threads.deferToThread(m.stop)
