"""The two real test controllers, called in-process through the project's loader.

libtest_discon.so (C) answers predictably so that end-to-end tests can check a
reply; libnrel5mw.so (Fortran) runs the published NREL 5-MW baseline law with
gains read from DISCON.IN. Both are called here the way OpenFAST calls them,
with OpenFAST-sized buffers, so a broken controller fails here and not deep
inside a container test.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from discon_manager import protocol
from discon_manager.controller.library import Controller

ROOT = Path(__file__).resolve().parent.parent

# OpenFAST's legacy interface sizes.
N_SWAP = 464
MSG_SIZE = 8197
OUTNAME_SIZE = 12601

# The published NREL 5-MW numbers (NREL5MW.md), independent of DISCON.IN.
CORNER_FREQ = 1.570796
VS_CTINSP = 70.16224
VS_RGN2SP = 91.21091
VS_RGN2K = 2.332287
VS_RTGNSP = 121.6805
VS_RTPWR = 5296610.0
VS_SLPC = 10.0
VS_RGN3MP = 0.01745329
VS_MAXTQ = 47402.91
VS_MAXRAT = 15000.0
PC_REFSPD = 122.9096
PC_KP = 0.01882681
PC_KI = 0.008068634
PC_KK = 0.1099965
PC_MINPIT = 0.0
PC_MAXPIT = 1.570796
PC_MAXRAT = 0.1396263

VS_SYSP = VS_RTGNSP / (1.0 + 0.01 * VS_SLPC)
VS_SLOPE15 = VS_RGN2K * VS_RGN2SP * VS_RGN2SP / (VS_RGN2SP - VS_CTINSP)
VS_SLOPE25 = (VS_RTPWR / VS_RTGNSP) / (VS_RTGNSP - VS_SYSP)
VS_TRGNSP = (VS_SLOPE25 - math.sqrt(VS_SLOPE25 * (VS_SLOPE25 - 4.0 * VS_RGN2K * VS_SYSP))) / (
    2.0 * VS_RGN2K
)

DT = 0.0125  # an 80 Hz controller step, as OpenFAST typically calls


def f32(x: float) -> float:
    """``x`` as the float32 a swap record holds, so expectations round like records do."""
    return array("f", [x])[0]


class Call:
    """One set of OpenFAST-shaped DISCON buffers, kept across calls like ServoDyn's."""

    def __init__(self, infile: str | os.PathLike[str] = "") -> None:
        name = os.fsencode(infile)
        self.swap = (ctypes.c_float * N_SWAP)()
        self.fail = ctypes.c_int(0)
        self.infile = ctypes.create_string_buffer(name)
        self.outname = ctypes.create_string_buffer(b"run.SrvD", OUTNAME_SIZE)
        self.msg = ctypes.create_string_buffer(MSG_SIZE)
        self[129] = N_SWAP
        self[49] = MSG_SIZE
        self[50] = len(name) + 1
        self[64] = OUTNAME_SIZE

    def __getitem__(self, record: int) -> float:
        return self.swap[record - 1]

    def __setitem__(self, record: int, value: float) -> None:
        self.swap[record - 1] = value

    def __call__(self, ctrl: Controller) -> int:
        """Call DISCON once and return aviFAIL."""
        ctrl.fn(
            ctypes.addressof(self.swap),
            ctypes.addressof(self.fail),
            ctypes.addressof(self.infile),
            ctypes.addressof(self.outname),
            ctypes.addressof(self.msg),
        )
        return self.fail.value

    @property
    def text(self) -> str:
        return self.msg.value.decode()


_copies = itertools.count()


def fresh(lib: Path, tmp_path: Path, proc: str) -> Controller:
    """A copy of ``lib`` under a new name: a library loaded twice shares its state."""
    copy = tmp_path / f"{lib.stem}_{next(_copies)}.so"
    shutil.copy(lib, copy)
    return Controller(str(copy), proc)


# --------------------------------------------------------------------------
# libtest_discon.so
# --------------------------------------------------------------------------


@pytest.fixture
def test_discon(controller_libs: dict[str, Path], tmp_path: Path) -> Controller:
    return fresh(controller_libs["default"], tmp_path, "discon")


def test_discon_counts_calls_and_doubles_record_20(test_discon: Controller) -> None:
    """End-to-end tests recognise a real reply by the count and record 47."""
    call = Call("whatever.IN")
    for n, speed in enumerate([0.0, 12.5, 100.25, -3.0], start=1):
        call[20] = speed
        call.fail.value = 7
        assert call(test_discon) == 0
        assert call.text == f"DISCON called {n} times"
        assert call[47] == 2.0 * speed


def test_discon_state_is_per_loaded_copy(controller_libs: dict[str, Path], tmp_path: Path) -> None:
    """Each loaded copy counts its own calls, as each container's server does."""
    a = fresh(controller_libs["default"], tmp_path, "discon")
    b = fresh(controller_libs["default"], tmp_path, "discon")
    call = Call()
    call(a)
    call(a)
    call(b)
    assert call.text == "DISCON called 1 times"
    call(a)
    assert call.text == "DISCON called 3 times"


def test_discon_record_120_is_input_file_size(
    test_discon: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record 120 proves which file the controller saw, relative to its working dir."""
    (tmp_path / "input_0123abcd_DISCON.IN").write_bytes(b"x" * 1234)
    monkeypatch.chdir(tmp_path)
    call = Call("input_0123abcd_DISCON.IN")
    assert call(test_discon) == 0
    assert call[120] == 1234.0

    call = Call("absent.IN")
    assert call(test_discon) == 0
    assert call[120] == -1.0

    (tmp_path / "empty.IN").write_bytes(b"")
    call = Call("empty.IN")
    call(test_discon)
    assert call[120] == 0.0


def test_discon_reads_infile_only_up_to_record_50(
    test_discon: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accINFILE is record 50 bytes long: bytes past it are not part of the name."""
    (tmp_path / "abc").write_bytes(b"12345")
    monkeypatch.chdir(tmp_path)
    call = Call("abcdef")
    call[50] = 4  # "abc" plus its NUL
    call(test_discon)
    assert call[120] == 5.0


def test_discon_message_fits_record_49(test_discon: Controller) -> None:
    """avcMSG is never written past record 49 bytes, the caller's buffer size."""
    call = Call()
    ctypes.memset(call.msg, ord("X"), MSG_SIZE)
    call[49] = 8
    call(test_discon)
    assert call.msg.raw[:8] == b"DISCON \0"
    assert call.msg.raw[8:16] == b"X" * 8


def test_discon_hook_668_fails_then_recovers(test_discon: Controller) -> None:
    """Hook 668 is the controlled error a user must see; later calls are normal again."""
    call = Call()
    call[119] = 668
    assert call(test_discon) == -1
    assert call.text == "requested failure"
    call[119] = 0
    assert call(test_discon) == 0
    assert call.text == "DISCON called 2 times"


_CALL_ONCE = textwrap.dedent(
    """
    import ctypes, sys
    from discon_manager.controller.library import Controller
    c = Controller(sys.argv[1], "discon")
    swap = (ctypes.c_float * 464)()
    swap[118] = float(sys.argv[2])
    swap[128], swap[48], swap[49], swap[63] = 464, 8197, 1, 12601
    fail = ctypes.c_int(0)
    infile = ctypes.create_string_buffer(1)
    outname = ctypes.create_string_buffer(12601)
    msg = ctypes.create_string_buffer(8197)
    print("calling", flush=True)
    c.fn(*(ctypes.addressof(x) for x in (swap, fail, infile, outname, msg)))
    print("returned", fail.value, msg.value.decode(), flush=True)
    """
)


def _call_once(lib: Path, hook: int) -> subprocess.Popen[str]:
    """Call the library once in a child process: a crash or hang must not take pytest."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return subprocess.Popen(
        [sys.executable, "-c", _CALL_ONCE, str(lib), str(hook)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_discon_in_subprocess_without_hook_returns(controller_libs: dict[str, Path]) -> None:
    """The control for the hook tests: the same child exits normally without a hook."""
    proc = _call_once(controller_libs["default"], 0)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["calling", "returned 0 DISCON called 1 times"]


def test_discon_hook_666_segfaults(controller_libs: dict[str, Path]) -> None:
    """Hook 666 kills its process with SIGSEGV, as a crashing controller would."""
    proc = _call_once(controller_libs["default"], 666)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGSEGV
    assert out.splitlines() == ["calling"]


def test_discon_hook_667_hangs(controller_libs: dict[str, Path]) -> None:
    """Hook 667 blocks inside DISCON (30 s), as a hung controller would."""
    proc = _call_once(controller_libs["default"], 667)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "calling"
        time.sleep(1.0)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate(timeout=20)


@pytest.mark.parametrize("version", [protocol.V1, protocol.V2])
def test_discon_through_call_frame(test_discon: Controller, version: int) -> None:
    """A wire frame answered in place keeps its version and sizes and carries the reply."""
    swap = array("f", [0.0] * N_SWAP)
    swap[128], swap[48], swap[49], swap[63], swap[19] = N_SWAP, MSG_SIZE, 1, OUTNAME_SIZE, 21.5
    request = protocol.encode(
        protocol.Message(
            swap=swap,
            infile=b"\0",
            outname=b"\0" * OUTNAME_SIZE,
            msg=b"\0" * MSG_SIZE,
            version=version,
        )
    )
    frame = bytearray(request)
    h = protocol.parse_header(frame)
    test_discon.call_frame(frame, h)
    assert len(frame) == len(request)
    reply = protocol.decode(frame)
    assert reply.version == version
    assert reply.fail == 0
    assert reply.text == "DISCON called 1 times"
    assert reply.swap[46] == 43.0
    assert reply.swap[119] == -1.0
    assert len(reply.msg) == MSG_SIZE and len(reply.outname) == OUTNAME_SIZE


# --------------------------------------------------------------------------
# libnrel5mw.so
# --------------------------------------------------------------------------


class Turbine:
    """Drive one fresh NREL 5-MW controller like OpenFAST: status 0, then steps."""

    def __init__(self, ctrl: Controller, infile: Path, dt: float = DT) -> None:
        self.ctrl = ctrl
        self.call = Call(infile)
        self.dt = dt
        self.time = 0.0
        self.status = 0

    def step(self, speed: float, pitch: float | tuple[float, float, float] = 0.0) -> None:
        """One call at generator speed ``speed`` and measured blade pitch ``pitch``."""
        pitches = pitch if isinstance(pitch, tuple) else (pitch, pitch, pitch)
        c = self.call
        c[1], c[2], c[3], c[20] = self.status, self.time, self.dt, speed
        c[4], c[33], c[34] = pitches
        assert c(self.ctrl) == 0, c.text
        self.status = 1
        self.time += self.dt

    def hold(self, speed: float, seconds: float, follow_pitch: bool = True) -> list[float]:
        """Steps at constant speed, blades following the command; returns the torques."""
        torques = []
        for _ in range(round(seconds / self.dt)):
            self.step(speed, self.pitch_command if follow_pitch else 0.0)
            torques.append(self.torque)
        return torques

    @property
    def torque(self) -> float:
        return self.call[47]

    @property
    def pitch_command(self) -> tuple[float, float, float]:
        return (self.call[42], self.call[43], self.call[44])


@pytest.fixture
def turbine(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path
) -> Callable[..., Turbine]:
    """A factory of controllers with fresh SAVE state, reading the real DISCON.IN."""

    def make(dt: float = DT, infile: Path | None = None) -> Turbine:
        ctrl = fresh(controller_libs["nrel5mw"], tmp_path, "DISCON")
        return Turbine(ctrl, infile or nrel5mw_infile, dt)

    return make


def test_nrel5mw_writes_the_fixed_outputs(turbine: Callable[..., Turbine]) -> None:
    """Contactor on, brake off, no overrides, no logging: what ServoDyn expects."""
    t = turbine()
    for record in (35, 36, 55, 56, 65):
        t.call[record] = 7.0
    t.step(100.0)
    assert (t.call[35], t.call[36], t.call[55], t.call[56], t.call[65]) == (1, 0, 0, 0, 0)
    assert t.call[45] == t.call[42] == t.call[43] == t.call[44]


def test_nrel5mw_region_1_zero_torque(turbine: Callable[..., Turbine]) -> None:
    t = turbine()
    assert t.hold(60.0, 1.0) == [0.0] * 80
    assert t.pitch_command == (0.0, 0.0, 0.0)


def test_nrel5mw_region_1_5_linear_ramp(turbine: Callable[..., Turbine]) -> None:
    t = turbine()
    t.hold(80.0, 1.0)
    assert t.torque == pytest.approx(VS_SLOPE15 * (f32(80.0) - VS_CTINSP), rel=1e-6)


def test_nrel5mw_region_2_torque_after_filter_settles(turbine: Callable[..., Turbine]) -> None:
    """Region 2 is k*w^2 on the filtered speed: it lags a speed step, then settles."""
    t = turbine()
    t.hold(95.0, 1.0)
    assert t.torque == pytest.approx(VS_RGN2K * 95.0**2, rel=1e-6)
    t.step(100.0)
    alpha = math.exp(-DT * CORNER_FREQ)
    filtered = (1 - alpha) * 100.0 + alpha * 95.0
    assert t.torque == pytest.approx(VS_RGN2K * filtered**2, rel=1e-6)
    t.hold(100.0, 15.0)
    assert t.torque == pytest.approx(VS_RGN2K * 100.0**2, rel=1e-6)
    assert t.pitch_command == (0.0, 0.0, 0.0)


def test_nrel5mw_region_2_5_induction_line(turbine: Callable[..., Turbine]) -> None:
    t = turbine()
    assert VS_TRGNSP < 120.0 < VS_RTGNSP
    t.hold(120.0, 1.0)
    assert t.torque == pytest.approx(VS_SLOPE25 * (120.0 - VS_SYSP), rel=1e-6)


def test_nrel5mw_region_3_constant_power(turbine: Callable[..., Turbine]) -> None:
    t = turbine()
    t.hold(125.0, 1.0)
    assert t.torque == pytest.approx(VS_RTPWR / 125.0, rel=1e-6)


def test_nrel5mw_region_3_by_pitch_saturates_torque(turbine: Callable[..., Turbine]) -> None:
    """Pitched out (>= 1 deg) below rated speed: rated power / speed, capped at max torque."""
    t = turbine()
    t.step(100.0, pitch=0.1)
    assert VS_RTPWR / 100.0 > VS_MAXTQ
    assert t.torque == f32(VS_MAXTQ)
    t2 = turbine()
    t2.step(115.0, pitch=VS_RGN3MP + 1e-4)
    assert t2.torque == pytest.approx(VS_RTPWR / 115.0, rel=1e-6)


def test_nrel5mw_torque_rate_limit(turbine: Callable[..., Turbine]) -> None:
    """A speed step moves the torque by at most 15000 N.m/s * dt per step."""
    t = turbine()
    t.hold(80.0, 0.5)
    start = t.torque
    torques = [start, *t.hold(125.0, 10.0, follow_pitch=False)]
    steps = [b - a for a, b in itertools.pairwise(torques)]
    limit = VS_MAXRAT * DT
    ulp = 0.01  # torques near 40 kN.m are float32 records: 0.004 N.m apart
    assert max(abs(s) for s in steps) <= limit + ulp
    assert steps[0] == pytest.approx(limit, abs=ulp)
    assert sum(1 for s in steps if s == pytest.approx(limit, abs=ulp)) > 100
    assert torques[-1] == pytest.approx(VS_RTPWR / 125.0, rel=1e-6)
    # Larger steps, same rate: dt = 1 s allows 15000 N.m in one call.
    t = turbine(dt=1.0)
    t.step(70.0)
    t.step(100.0)
    assert t.torque == pytest.approx(VS_MAXRAT, rel=1e-6)


def test_nrel5mw_pitch_rate_limit_above_rated(turbine: Callable[..., Turbine]) -> None:
    """Above rated speed the blades pitch up, by at most 0.1396263 rad/s * dt a step."""
    t = turbine()
    previous = 0.0
    for _ in range(40):
        t.step(135.0, previous)
        command = t.pitch_command[0]
        assert command == pytest.approx(previous + PC_MAXRAT * DT, rel=1e-5)
        assert t.pitch_command == (command, command, command)
        assert t.call[45] == command
        previous = command
    assert previous == pytest.approx(40 * PC_MAXRAT * DT, rel=1e-4)


def test_nrel5mw_pitch_rate_limited_from_each_blade(turbine: Callable[..., Turbine]) -> None:
    """Each blade's command is rate-limited from that blade's own measured pitch."""
    t = turbine()
    t.step(135.0, (0.0, 0.0, 0.0))
    t.step(135.0, (0.05, 0.0, 0.002))
    a, b, c = t.pitch_command
    assert a == pytest.approx(0.05 + PC_MAXRAT * DT, rel=1e-5)
    assert b == pytest.approx(PC_MAXRAT * DT, rel=1e-5)
    assert c == pytest.approx(0.002 + PC_MAXRAT * DT, rel=1e-5)


def test_nrel5mw_pitch_saturates(turbine: Callable[..., Turbine]) -> None:
    """Commands stay within 0 .. 1.570796 rad whatever the speed error."""
    t = turbine()
    t.hold(100.0, 2.0)
    assert t.pitch_command == (0.0, 0.0, 0.0)
    t = turbine()
    t.step(200.0, PC_MAXPIT)
    t.hold(200.0, 2.0)
    assert t.pitch_command == (f32(PC_MAXPIT),) * 3


@dataclass
class Reference:
    """The NREL 5-MW baseline law written from NREL5MW.md, in double precision."""

    speed_f: float
    last_torque: float
    int_err: float
    pitch: list[float]

    @classmethod
    def start(cls, speed: float, pitches: tuple[float, float, float]) -> Reference:
        gk = 1.0 / (1.0 + pitches[0] / PC_KK)
        return cls(speed, math.nan, pitches[0] / (gk * PC_KI), list(pitches))

    def step(self, first: bool, speed: float, blades: tuple[float, float, float]) -> None:
        dt = DT
        if not first:
            alpha = math.exp(-dt * CORNER_FREQ)
            self.speed_f = (1.0 - alpha) * speed + alpha * self.speed_f
        w = self.speed_f
        if w >= VS_RTGNSP or self.pitch[0] >= VS_RGN3MP:
            torque = VS_RTPWR / w
        elif w <= VS_CTINSP:
            torque = 0.0
        elif w < VS_RGN2SP:
            torque = VS_SLOPE15 * (w - VS_CTINSP)
        elif w < VS_TRGNSP:
            torque = VS_RGN2K * w * w
        else:
            torque = VS_SLOPE25 * (w - VS_SYSP)
        torque = min(torque, VS_MAXTQ)
        if first:
            self.last_torque = torque
        rate = min(max((torque - self.last_torque) / dt, -VS_MAXRAT), VS_MAXRAT)
        self.last_torque += rate * dt

        gk = 1.0 / (1.0 + self.pitch[0] / PC_KK)
        err = w - PC_REFSPD
        self.int_err += err * dt
        self.int_err = min(max(self.int_err, PC_MINPIT / (gk * PC_KI)), PC_MAXPIT / (gk * PC_KI))
        target = gk * PC_KP * err + gk * PC_KI * self.int_err
        target = min(max(target, PC_MINPIT), PC_MAXPIT)
        for k, blade in enumerate(blades):
            rate = min(max((target - blade) / dt, -PC_MAXRAT), PC_MAXRAT)
            self.pitch[k] = min(max(blade + rate * dt, PC_MINPIT), PC_MAXPIT)


def gust(seconds: float) -> Iterator[float]:
    """Generator speeds that sweep regions 1.5 to 3 and back, with a gust above rated."""
    for i in range(round(seconds / DT)):
        t = i * DT
        yield 105.0 + 28.0 * math.sin(2 * math.pi * t / 12.0) + 3.0 * math.sin(7.0 * t)


def test_nrel5mw_matches_the_published_law_over_a_run(turbine: Callable[..., Turbine]) -> None:
    """Torque and every blade's pitch follow an independent implementation of the law."""
    t = turbine()
    ref: Reference | None = None
    regions = set()
    pitched = 0
    blades = (0.0, 0.0, 0.0)
    for i, speed in enumerate(gust(30.0)):
        t.step(speed, blades)
        w = f32(speed)
        if ref is None:
            ref = Reference.start(w, blades)
        ref.step(i == 0, w, blades)
        assert t.torque == pytest.approx(ref.last_torque, rel=2e-6, abs=1e-3), i
        for got, want in zip(t.pitch_command, ref.pitch, strict=True):
            assert got == pytest.approx(want, rel=2e-6, abs=1e-7), i
        regions.add(
            "3"
            if ref.speed_f >= VS_RTGNSP
            else "2.5"
            if ref.speed_f >= VS_TRGNSP
            else "2"
            if ref.speed_f >= VS_RGN2SP
            else "1.5"
        )
        pitched += ref.pitch[0] > 0.0
        # Blades follow the command with a small lag on blade 3, as a real actuator would.
        c = t.pitch_command
        blades = (c[0], c[1], f32(0.5 * (c[2] + blades[2])))
    assert regions == {"1.5", "2", "2.5", "3"}
    assert pitched > 100


def test_nrel5mw_is_deterministic(turbine: Callable[..., Turbine]) -> None:
    """Same calls, bit-identical swap records: fresh copies and a re-initialised one."""

    def run(t: Turbine) -> bytes:
        out = bytearray()
        blades = 0.0
        for speed in gust(10.0):
            t.step(speed, blades)
            blades = t.pitch_command[0]
            out += bytes(t.call.swap)
        return bytes(out)

    first, second = turbine(), turbine()
    a, b = run(first), run(second)
    assert a == b
    first.status, first.time = 0, 0.0  # status 0 again: state starts over
    assert run(first) == a


def test_nrel5mw_missing_input_file(turbine: Callable[..., Turbine], tmp_path: Path) -> None:
    """A missing DISCON.IN stops the run with a message naming the file."""
    missing = tmp_path / "no_such_DISCON.IN"
    t = turbine(infile=missing)
    c = t.call
    c[1], c[3], c[20] = 0, DT, 100.0
    assert c(t.ctrl) == -1
    assert c.text.startswith(f"NREL5MW: cannot open input file '{missing}': no such file")
    assert "working directory" in c.text
    assert c[47] == 0.0  # nothing computed
    c[1] = 1
    assert c(t.ctrl) == -1
    assert "before a successful first call with status 0" in c.text


def test_nrel5mw_reads_infile_only_up_to_record_50(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path
) -> None:
    """accINFILE is record 50 - 1 characters; what follows in the buffer is not the name."""
    t = Turbine(fresh(controller_libs["nrel5mw"], tmp_path, "DISCON"), nrel5mw_infile)
    t.call = Call(f"{nrel5mw_infile}.garbage")
    t.call[50] = len(os.fsencode(nrel5mw_infile)) + 1
    t.step(125.0)
    assert t.torque == pytest.approx(VS_RTPWR / 125.0, rel=1e-6)


def test_nrel5mw_step_before_init(turbine: Callable[..., Turbine]) -> None:
    t = turbine()
    c = t.call
    c[1], c[3], c[20] = 1, DT, 100.0
    assert c(t.ctrl) == -1
    assert c.text.startswith("NREL5MW: called with status 1 (record 1) before a successful")


def test_nrel5mw_rejects_non_positive_time_step(turbine: Callable[..., Turbine]) -> None:
    t = turbine(dt=0.0)
    c = t.call
    c[1], c[3] = 0, 0.0
    assert c(t.ctrl) == -1
    assert "record 3 (communication interval) is 0" in c.text


def test_nrel5mw_error_message_fits_record_49(
    turbine: Callable[..., Turbine], tmp_path: Path
) -> None:
    """The error text is cut to record 49 bytes with its NUL, the buffer past it untouched."""
    t = turbine(infile=tmp_path / "missing.IN")
    c = t.call
    ctypes.memset(c.msg, ord("X"), MSG_SIZE)
    c[1], c[3], c[49] = 0, DT, 20
    assert c(t.ctrl) == -1
    assert c.msg.raw[:20] == b"NREL5MW: cannot ope\0"
    assert c.msg.raw[20:40] == b"X" * 20


def _broken(infile: Path, tmp_path: Path, edit: Callable[[list[str]], None]) -> Path:
    lines = infile.read_text().splitlines()
    edit(lines)
    out = tmp_path / "broken_DISCON.IN"
    out.write_text("\n".join(lines) + "\n")
    return out


def _index(lines: list[str], name: str) -> int:
    """0-based index of the line that sets parameter ``name``."""
    (i,) = [
        i
        for i, line in enumerate(lines)
        if line.split()[1:2] == [name] and not line.lstrip().startswith(("!", "#"))
    ]
    return i


def _line_of(infile: Path, name: str) -> int:
    """1-based line number of parameter ``name`` in the shipped DISCON.IN."""
    return _index(infile.read_text().splitlines(), name) + 1


def _replace(name: str, new_line: str) -> Callable[[list[str]], None]:
    def edit(lines: list[str]) -> None:
        lines[_index(lines, name)] = new_line

    return edit


def _delete(name: str) -> Callable[[list[str]], None]:
    def edit(lines: list[str]) -> None:
        del lines[_index(lines, name)]

    return edit


def _append(line: str) -> Callable[[list[str]], None]:
    return lambda lines: lines.append(line)


def _only_comments(lines: list[str]) -> None:
    lines[:] = ["! only comments", ""]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _replace("VS_Rgn2K", "2.33x287  VS_Rgn2K  ! typo"),
            "line {VS_Rgn2K}: value '2.33x287' of 'VS_Rgn2K' (region-2 torque gain k, "
            "N.m/(rad/s)^2) is not a number",
        ),
        (
            _delete("PC_KI"),
            "line {PC_KI}: expected parameter 'PC_KI' (integral pitch gain at zero pitch, -), "
            "found 'PC_KK'",
        ),
        (
            _replace("VS_MaxTq", "47402.91"),
            "line {VS_MaxTq}: '47402.91' has no parameter name; expected 'VS_MaxTq'",
        ),
        (
            _replace("PC_KP", "0.01882681  PC_KP  proportional gain"),
            "line {PC_KP}: unexpected text 'proportional gain' after PC_KP; start a "
            "description with '!'",
        ),
        (
            _delete("PC_MaxRat"),
            "ends after line {PC_MaxPit} with 16 of 17 parameters: 'PC_MaxRat' (maximum "
            "pitch rate, rad/s) is missing",
        ),
        (
            _append("1.0  Extra  ! one too many"),
            "unexpected line '1.0  Extra  ! one too many' after the 17 parameters",
        ),
        (
            _replace("VS_RtGnSp", "90.0  VS_RtGnSp"),
            "VS_RtGnSp must be greater than VS_Rgn2Sp; correct it in the input file",
        ),
        (
            _only_comments,
            "holds no parameters (2 lines, all blank or comments); expected 17",
        ),
    ],
    ids=[
        "not-a-number",
        "missing-line",
        "no-name",
        "stray-text",
        "truncated",
        "extra",
        "inconsistent",
        "empty",
    ],
)
def test_nrel5mw_malformed_input_file(
    turbine: Callable[..., Turbine],
    nrel5mw_infile: Path,
    tmp_path: Path,
    edit: Callable[[list[str]], None],
    expected: str,
) -> None:
    """A broken DISCON.IN stops the run at init, naming the line and what was expected."""
    broken = _broken(nrel5mw_infile, tmp_path, edit)
    names = ("VS_Rgn2K", "PC_KI", "VS_MaxTq", "PC_KP", "PC_MaxPit")
    want = expected.format(**{n: _line_of(nrel5mw_infile, n) for n in names})
    t = turbine(infile=broken)
    c = t.call
    c[1], c[3], c[20] = 0, DT, 100.0
    assert c(t.ctrl) == -1
    assert c.text.startswith(f"NREL5MW: input file '{broken}'")
    assert want in c.text
    c[1] = 1
    assert c(t.ctrl) == -1  # never initialised


def test_nrel5mw_accepts_reformatted_input(
    turbine: Callable[..., Turbine], nrel5mw_infile: Path, tmp_path: Path
) -> None:
    """Tabs, CRLF, case and exponents are layout, not errors; the law is unchanged."""

    def edit(lines: list[str]) -> None:
        lines[_index(lines, "VS_RtPwr")] = "5.29661E6\tvs_rtpwr\t! rated power"
        lines.insert(0, "# a shell-style comment")

    broken = _broken(nrel5mw_infile, tmp_path, edit)
    broken.write_bytes(broken.read_bytes().replace(b"\n", b"\r\n"))
    t = turbine(infile=broken)
    t.hold(125.0, 0.5)
    assert t.torque == pytest.approx(VS_RTPWR / 125.0, rel=1e-6)
