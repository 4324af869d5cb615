"""Calling a controller the way OpenFAST's ServoDyn does, over any transport.

The point of ``discon-check`` is to tell a user whether a controller behind
DisconManager behaves exactly like the same library loaded by OpenFAST. So
the driver reproduces ServoDyn's legacy Bladed interface (BladedInterface.f90,
``Fill_avrSWAP`` and ``CallBladedLegacyDLL``): the same buffer sizes, the same
records filled before each call, aviFAIL and avcMSG reset before each call,
status 0 / 1 / -1, warnings printed and errors fatal. The transport (a ctypes
call in this process, or a WebSocket round trip) is the only thing that
differs between two runs, and the CSV holds nothing that depends on it, so two
runs can be compared byte for byte.

Records filled on every call (1-based, as Bladed numbers them): 1 status,
2 time, 3 dt, 4/33/34 blade pitch, 5 below-rated pitch set-point (0), 6/7
minimum/maximum pitch (0 / 1.570796 rad), 8/9 minimum/maximum pitch rate
(-/+0.1396263 rad/s), 10 pitch actuator type (0, position), 11 last pitch
command, 12 demanded pitch rate (0), 14 shaft power, 15 electrical power,
20 generator speed, 21 rotor speed, 23 measured generator torque, 24 yaw error
(0), 25/26 torque table start and size (0, no table), 27 hub wind speed,
28 pitch control (0, collective), 29 yaw control (0), 37 nacelle yaw (0),
49 avcMSG size (8197), 50 len(accINFILE) + 1, 51 len(avcOUTNAME root) + 1,
60 rotor azimuth, 61 blades (3), 62 logging channels (300), 63 start of
logging output (165), 64 avcOUTNAME size (12601), 129 avrSWAP size (464).
Records 5-9 and 23/24 follow current OpenFAST (5 is the set-point, 6/7 the
pitch limits, 8/9 the rate limits; 23 is the measured torque and 24 the yaw
error), not older layouts that put the yaw error in 23. Record 35 (generator
contactor) starts at 1 and, like every output record, keeps whatever the
controller last wrote, because the swap array persists between calls.
"""

from __future__ import annotations

import ctypes
import math
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from discon_manager.check.plant import REGIONS, Plant, PlantParams, classify_region

#: OpenFAST's legacy-interface sizes (shared/PROTOCOL.md).
SWAP_SIZE = 464
MSG_SIZE = 8197
OUTNAME_SIZE = 12601
LOGGING_START = 165
MAX_LOGGING_CHANNELS = 300
NUM_BLADES = 3

#: What ServoDyn puts in avcOUTNAME: the simulation's root name.
ROOT_NAME = b"discon-check.SrvD"

DEFAULT_DT = 0.0125
DEFAULT_DURATION = 600.0

CSV_HEADER = "time,rotor_speed,pitch_command,torque_demand,aviFAIL,avcMSG\n"


class CheckConnectionError(Exception):
    """A transport cannot reach the controller or lost it; the text is one readable line.

    Defined here, not in the network client, so the CLI can catch it without
    importing Twisted for an in-process run.
    """


class CallBuffers:
    """The five DISCON arguments as persistent ctypes buffers, like ServoDyn's.

    They live for the whole run: the swap array keeps the controller's outputs
    between calls (as ``dll_data%avrSWAP`` does), and the transports get fixed
    addresses to hand to the library or to copy replies into.
    """

    def __init__(self, infile: str = "", root_name: bytes = ROOT_NAME) -> None:
        self.infile_text = infile
        infile_bytes = infile.encode()
        if b"\0" in infile_bytes:
            raise ValueError("the input file name contains a NUL byte")
        self.swap = (ctypes.c_float * SWAP_SIZE)()
        self.fail = ctypes.c_int(0)
        #: Exactly len + 1 bytes, as ServoDyn sizes accINFILE.
        self.infile = ctypes.create_string_buffer(infile_bytes, len(infile_bytes) + 1)
        self.outname = ctypes.create_string_buffer(OUTNAME_SIZE)
        self.msg = ctypes.create_string_buffer(MSG_SIZE)
        self.root_name = root_name[: OUTNAME_SIZE - 1]
        self.swap_addr = ctypes.addressof(self.swap)
        self.fail_addr = ctypes.addressof(self.fail)
        self.infile_addr = ctypes.addressof(self.infile)
        self.outname_addr = ctypes.addressof(self.outname)
        self.msg_addr = ctypes.addressof(self.msg)

    @property
    def infile_bytes(self) -> bytes:
        """accINFILE's content without the terminating NUL."""
        return self.infile.raw[:-1]

    def reset_strings(self) -> None:
        """Per-call reset of avcOUTNAME and avcMSG, as ServoDyn does before each call.

        ServoDyn rebuilds avcOUTNAME (root name + NUL) and avcMSG (a NUL) for
        every call. Both buffers are cleared whole so what travels on the wire
        never depends on what an earlier call left behind the NUL.
        """
        ctypes.memset(self.outname_addr, 0, OUTNAME_SIZE)
        ctypes.memmove(self.outname_addr, self.root_name, len(self.root_name))
        ctypes.memset(self.msg_addr, 0, MSG_SIZE)

    def message(self) -> str:
        """avcMSG up to its first NUL, as OpenFAST would print it."""
        return self.msg.value.decode("utf-8", "replace")


class Transport(Protocol):
    """How one DISCON call reaches the controller.

    ``open`` and ``call`` return None when they completed synchronously (the
    in-process library) or an awaitable (a network round trip); the driver
    awaits only in the second case, so the in-process hot path has no
    coroutine overhead inside the timed region.
    """

    name: str

    def open(self, bufs: CallBuffers) -> Awaitable[None] | None: ...

    def call(self) -> Awaitable[None] | None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class InProcessTransport:
    """The controller library loaded into this process, called through ctypes.

    A library loaded twice in one process is one copy with one state, so two
    independent in-process runs need two files (or two processes).
    """

    name = "in-process"

    def __init__(self, library: str | Path, proc: str) -> None:
        self.library = str(library)
        self.proc = proc
        self.controller: Any = None
        self._fn: Any = None
        self._args: tuple[ctypes.c_void_p, ...] = ()

    def open(self, bufs: CallBuffers) -> None:
        from discon_manager.controller.library import Controller

        self.controller = Controller(self.library, self.proc)
        self._fn = self.controller.fn
        # Pre-built c_void_p arguments: no conversion per call.
        self._args = tuple(
            ctypes.c_void_p(a)
            for a in (
                bufs.swap_addr,
                bufs.fail_addr,
                bufs.infile_addr,
                bufs.outname_addr,
                bufs.msg_addr,
            )
        )
        return None

    def call(self) -> None:
        self._fn(*self._args)
        return None

    def close(self) -> None:
        self._fn = None

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass
class RunConfig:
    """What to simulate; nothing here depends on the transport."""

    infile: str = ""
    duration: float = DEFAULT_DURATION
    dt: float = DEFAULT_DT
    csv_path: str | Path | None = None
    plant_params: PlantParams = field(default_factory=PlantParams)
    #: Extra records to send: (1-based record, value, from time) - e.g. test hooks.
    set_records: tuple[tuple[int, float, float], ...] = ()
    #: Called with (time, message) for each aviFAIL > 0; default prints to stderr.
    on_warning: Callable[[float, str], None] | None = None

    @property
    def steps(self) -> int:
        """Number of regular steps (status 0 and 1); a final status -1 call follows."""
        return max(1, int(round(self.duration / self.dt)))


@dataclass
class CheckResult:
    """What a run did, for the CLI table, the JSON summary and tests."""

    transport: str
    calls: int = 0
    latencies_ns: array = field(default_factory=lambda: array("q"))
    cold_start_s: float = 0.0
    wall_time_s: float = 0.0
    regions: dict[str, int] = field(default_factory=dict)
    final_fail: int = 0
    final_msg: str = ""
    #: The controller's message when it stopped the run with aviFAIL < 0.
    error: str | None = None
    error_time: float | None = None
    warnings: int = 0
    rotor_speed_min: float = math.inf
    rotor_speed_max: float = 0.0
    nonfinite_commands: int = 0
    csv_path: Path | None = None
    transport_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else 1

    @property
    def regions_visited(self) -> list[str]:
        return [r for r in REGIONS if self.regions.get(r, 0) > 0]

    def latency_us(self, q: float) -> float:
        """Latency quantile ``q`` (0..1) in microseconds (nearest rank); 0 without calls."""
        if not self.latencies_ns:
            return 0.0
        ordered = sorted(self.latencies_ns)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank] / 1000.0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (latencies in microseconds)."""
        return {
            "transport": self.transport,
            "ok": self.ok,
            "calls": self.calls,
            "latency_us": {
                "p50": self.latency_us(0.50),
                "p99": self.latency_us(0.99),
                "max": self.latency_us(1.0),
            },
            "cold_start_s": self.cold_start_s,
            "wall_time_s": self.wall_time_s,
            "regions": {r: self.regions.get(r, 0) for r in REGIONS},
            "regions_visited": self.regions_visited,
            "final_aviFAIL": self.final_fail,
            "final_avcMSG": self.final_msg,
            "error": self.error,
            "error_time": self.error_time,
            "warnings": self.warnings,
            "rotor_speed_min": self.rotor_speed_min if self.calls else None,
            "rotor_speed_max": self.rotor_speed_max if self.calls else None,
            "nonfinite_commands": self.nonfinite_commands,
            "csv": str(self.csv_path) if self.csv_path else None,
            **({"network": self.transport_stats} if self.transport_stats else {}),
        }


def _csv_text(s: str) -> str:
    """A CSV field (RFC 4180 quoting only when needed)."""
    if any(c in s for c in ',"\r\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


def _print_warning(t: float, msg: str) -> None:
    print(f"controller warning at t={t:g} s: {msg}", file=sys.stderr)


class _Recorder:
    """CSV rows: floats as repr() so identical computations give identical files."""

    def __init__(self, path: str | Path | None) -> None:
        self.f: TextIO | None = None
        if path is not None:
            # Kept open for the whole run and closed by drive()'s finally.
            self.f = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self.f.write(CSV_HEADER)
        self.last_msg = ""

    def row(self, t: float, speed: float, pitch: float, torque: float, fail: int, msg: str) -> None:
        if self.f is None:
            return
        shown = _csv_text(msg) if msg != self.last_msg else ""
        self.last_msg = msg
        self.f.write(f"{t!r},{speed!r},{pitch!r},{torque!r},{fail},{shown}\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


async def drive(transport: Transport, config: RunConfig) -> CheckResult:
    """Run the closed loop over ``transport``; the one implementation of a run.

    Written as a coroutine so a network transport can await its replies;
    with a synchronous transport nothing ever suspends (see :func:`run_sync`).
    Raises whatever the transport raises on a connection or load problem; a
    controller error (aviFAIL < 0) is not an exception but ends the run with
    :attr:`CheckResult.error` set, without the final status -1 call.
    """
    dt = config.dt
    if not (dt > 0.0 and math.isfinite(dt)):
        raise ValueError(f"time step must be a positive number of seconds, not {dt!r}")
    steps = config.steps
    warn = config.on_warning or _print_warning
    result = CheckResult(transport=transport.name)
    result.latencies_ns = array("q", bytes(8 * (steps + 1)))
    result.csv_path = Path(config.csv_path) if config.csv_path is not None else None
    regions = {r: 0 for r in REGIONS}
    bufs = CallBuffers(config.infile)
    plant = Plant(config.plant_params)
    gearbox = plant.params.gearbox_ratio
    pp = plant.params
    swap = bufs.swap
    lat = result.latencies_ns
    perf = time.perf_counter_ns

    # Records that never change (and the contactor's initial state).
    swap[4] = 0.0
    swap[5] = pp.min_pitch
    swap[6] = pp.max_pitch
    swap[7] = -pp.max_pitch_rate
    swap[8] = pp.max_pitch_rate
    swap[9] = 0.0
    swap[11] = 0.0
    swap[23] = 0.0
    swap[24] = 0.0
    swap[25] = 0.0
    swap[27] = 0.0
    swap[28] = 0.0
    swap[34] = 1.0
    swap[36] = 0.0
    swap[48] = MSG_SIZE
    swap[50] = len(bufs.root_name) + 1
    swap[60] = NUM_BLADES
    swap[61] = MAX_LOGGING_CHANNELS
    swap[62] = LOGGING_START
    swap[63] = OUTNAME_SIZE
    swap[128] = SWAP_SIZE
    infile_len = len(bufs.infile_bytes) + 1
    last_pitch_cmd = plant.pitch

    rec = _Recorder(config.csv_path)
    last_warning: str | None = None
    wall0 = perf()
    try:
        t_open = perf()
        opened = transport.open(bufs)
        if opened is not None:
            await opened
        k = 0
        while k <= steps:
            final = k == steps
            t = k * dt
            status = -1 if final else (0 if k == 0 else 1)
            # Fill_avrSWAP
            swap[0] = status
            swap[1] = t
            swap[2] = dt
            pitch = plant.pitch
            swap[3] = pitch
            swap[32] = pitch
            swap[33] = pitch
            swap[10] = last_pitch_cmd
            speed = plant.rotor_speed
            gen_speed = speed * gearbox
            swap[13] = plant.aero_torque * speed
            swap[14] = plant.electrical_power
            swap[19] = gen_speed
            swap[20] = speed
            swap[22] = plant.gen_torque
            swap[26] = plant.wind(t)
            swap[49] = infile_len
            swap[59] = plant.azimuth
            for record, value, since in config.set_records:
                if t >= since:
                    swap[record - 1] = value
            bufs.fail.value = 0
            bufs.reset_strings()

            t0 = perf()
            pending = transport.call()
            if pending is not None:
                await pending
            t1 = perf()
            lat[k] = t1 - t0
            if k == 0:
                result.cold_start_s = (t1 - t_open) / 1e9
            result.calls = k + 1

            fail = bufs.fail.value
            msg = bufs.message()
            pitch_cmd = swap[44]
            torque = swap[46]
            last_pitch_cmd = pitch_cmd
            rec.row(t, speed, pitch_cmd, torque, fail, msg)
            regions[classify_region(gen_speed, pitch_cmd)] += 1
            if speed < result.rotor_speed_min:
                result.rotor_speed_min = speed
            if speed > result.rotor_speed_max:
                result.rotor_speed_max = speed
            result.final_fail = fail
            result.final_msg = msg
            if fail < 0:
                result.error = msg
                result.error_time = t
                break
            if fail > 0:
                result.warnings += 1
                if msg != last_warning:
                    warn(t, msg)
                last_warning = msg
            if not final:
                plant.step(t, dt, pitch_cmd, torque)
            k += 1
    finally:
        rec.close()
        result.wall_time_s = (perf() - wall0) / 1e9
        del result.latencies_ns[result.calls :]
        result.regions = regions
        result.nonfinite_commands = plant.nonfinite_commands
        try:
            result.transport_stats = transport.stats()
        finally:
            transport.close()
    return result


def run_sync(coro: Coroutine[Any, Any, CheckResult]) -> CheckResult:
    """Run a :func:`drive` coroutine whose transport never suspends.

    The in-process transport completes every call synchronously, so the
    coroutine runs to the end on its first ``send``; no event loop is needed.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the transport suspended; run it under the Twisted reactor instead")


def run_in_process(library: str | Path, proc: str, config: RunConfig) -> CheckResult:
    """Load ``library`` here and run the check; raises ControllerLoadError if it cannot load."""
    return run_sync(drive(InProcessTransport(library, proc), config))
