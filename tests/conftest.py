"""Shared fixtures: the real compiled controllers, built on this machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS_SRC = ROOT / "tests" / "controllers"
DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def controller_libs() -> dict[str, Path]:
    """Compile test-discon (C) and nrel5mw (Fortran) for in-process use.

    Returns {"default": path to libtest_discon.so, "nrel5mw": path to libnrel5mw.so}.
    The same Makefile builds them inside the controller images.
    """
    out = ROOT / "build" / "controllers"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["make", "-s", "-C", str(CONTROLLERS_SRC), f"OUT={out}"], check=True)
    return {"default": out / "libtest_discon.so", "nrel5mw": out / "libnrel5mw.so"}


@pytest.fixture(scope="session")
def nrel5mw_infile() -> Path:
    return DATA / "nrel5mw" / "DISCON.IN"


def pytest_report_header(config: pytest.Config) -> str:
    return f"docker host: {os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}"


@pytest.fixture
def manager_factory(tmp_path: Path):
    """Start real manager processes; each is stopped and checked for leaks afterwards."""
    from tests.support import ManagerProcess, containers_of

    started: list[ManagerProcess] = []

    def make(**kwargs) -> ManagerProcess:
        m = ManagerProcess(workdir=tmp_path / f"manager{len(started)}", **kwargs)
        started.append(m)
        return m

    yield make
    leaks = []
    for m in started:
        m.stop()
        left = containers_of(m.instance)
        if left:
            leaks.append((m.instance, [c.name for c in left]))
            m.force_cleanup()
    assert not leaks, f"containers left behind after the manager stopped: {leaks}"
