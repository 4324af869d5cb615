"""discon-check: the plant, the OpenFAST-style driver and the discon-wrapper client.

The real compiled controllers run in closed loop. Network runs go to a small
in-test WebSocket server that answers frames with ``Controller.call_frame``
(a stand-in for a discon-server), so the tests see exactly the bytes the
client puts on the wire and can compare network and in-process trajectories
byte for byte.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import protocol as tx_protocol
from twisted.internet import reactor

from discon_manager.check import cli
from discon_manager.check.client import (
    CheckConnectionError,
    TransferError,
    run_network,
    server_url,
)
from discon_manager.check.driver import (
    MSG_SIZE,
    OUTNAME_SIZE,
    SWAP_SIZE,
    CallBuffers,
    InProcessTransport,
    RunConfig,
    drive,
    run_in_process,
    run_sync,
)
from discon_manager.check.plant import (
    RATED_GEN_SPEED,
    REGION_25_GEN_SPEED,
    Plant,
    classify_region,
    power_coefficient,
    wind_speed,
)
from discon_manager.controller.library import Controller
from discon_manager.protocol import (
    V1,
    V2,
    Message,
    decode,
    encode,
    parse_header,
    server_file_name,
    transfer_reply,
    transfer_request,
)

ROOT = Path(__file__).resolve().parent.parent
RATED_ROTOR_SPEED = RATED_GEN_SPEED / 97.0
NET_DURATION = 30.0  # simulated seconds for network runs: 2401 calls


def lib_copy(libs: dict[str, Path], which: str, tmp_path: Path, name: str) -> Path:
    """A private copy: one loaded file is one controller state per process."""
    dst = tmp_path / f"{name}_{libs[which].name}"
    shutil.copyfile(libs[which], dst)
    return dst


def run_local(lib: Path, proc: str, infile: str, csv: Path, duration: float) -> Any:
    return run_in_process(lib, proc, RunConfig(infile=infile, duration=duration, csv_path=csv))


class RecordingInProcess(InProcessTransport):
    """In-process calls that also build the frame a client must send for each call.

    The expected frame is made with protocol.encode from the very buffers the
    library is handed, so comparing it with what the server received checks
    the client byte for byte: header, every swap record, aviFAIL, strings.
    ``server_name`` is the v2 client's rewrite of accINFILE (and record 50).
    """

    def __init__(self, library: Path, proc: str, version: int,
                 server_name: str | None = None) -> None:
        super().__init__(library, proc)
        self.version = version
        self.server_name = server_name
        self.expected: list[bytes] = []

    def open(self, bufs: CallBuffers) -> None:
        super().open(bufs)
        self.bufs = bufs

    def call(self) -> None:
        b = self.bufs
        swap = array("f", bytes(b.swap))
        infile = b.infile.raw
        if self.server_name is not None:
            infile = self.server_name.encode() + b"\0"
            swap[49] = len(infile)
        self.expected.append(encode(Message(
            swap=swap, fail=b.fail.value, infile=infile, outname=b.outname.raw,
            msg=b.msg.raw, version=self.version)))
        return super().call()


def record_local(lib: Path, proc: str, infile: str, csv: Path, duration: float, version: int,
                 server_name: str | None = None) -> tuple[Any, list[bytes]]:
    t = RecordingInProcess(lib, proc, version, server_name)
    r = run_sync(drive(t, RunConfig(infile=infile, duration=duration, csv_path=csv)))
    return r, t.expected


# -- plant ------------------------------------------------------------------------


def test_plant_helpers_are_sane() -> None:
    # Cp peaks near 0.48 at lambda ~ 8 and falls with pitch; never negative.
    best = max(power_coefficient(lam / 10, 0.0) for lam in range(10, 150))
    assert 0.45 < best < 0.50
    assert power_coefficient(8.0, 10.0) < power_coefficient(8.0, 0.0)
    assert power_coefficient(30.0, 0.0) == 0.0
    assert power_coefficient(0.0, 0.0) >= 0.0
    assert wind_speed(0.0) == pytest.approx(5.5)
    assert wind_speed(300.0) == pytest.approx(18.0)
    assert wind_speed(600.0) == pytest.approx(5.5)
    assert classify_region(60.0, 0.0) == "1"
    assert classify_region(80.0, 0.0) == "1.5"
    assert classify_region(100.0, 0.0) == "2"
    assert classify_region(REGION_25_GEN_SPEED + 0.1, 0.0) == "2.5"
    assert classify_region(RATED_GEN_SPEED, 0.0) == "3"
    assert classify_region(100.0, 0.02) == "3"
    assert 118.0 < REGION_25_GEN_SPEED < 120.0


def test_plant_guards_nan_and_negative_speed() -> None:
    plant = Plant()
    plant.step(0.0, 0.0125, math.nan, math.inf)
    assert plant.nonfinite_commands == 2
    assert math.isfinite(plant.rotor_speed)
    plant.step(0.0125, 0.0125, 0.0, 1e12)  # absurd torque brakes past zero
    assert plant.rotor_speed == 0.0
    plant.step(0.025, 0.0125, 0.0, 0.0)  # a standing rotor still gets starting torque
    assert plant.rotor_speed > 0.0


# -- driver (in process) ---------------------------------------------------------


def test_nrel5mw_600s_visits_all_regions_and_stays_physical(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path
) -> None:
    lib = lib_copy(controller_libs, "nrel5mw", tmp_path, "regions")
    r = run_local(lib, "DISCON", str(nrel5mw_infile), tmp_path / "run.csv", 600.0)
    assert r.ok and r.final_fail == 0
    assert r.calls == 48001  # 48000 steps + the final status -1 call
    assert r.regions_visited[-4:] == ["1.5", "2", "2.5", "3"]
    for region in ("1.5", "2", "2.5", "3"):
        assert r.regions[region] >= 800, (region, r.regions)  # at least 10 s each
    assert r.rotor_speed_min > 0.75 and r.rotor_speed_max < 1.15 * RATED_ROTOR_SPEED
    rows = (tmp_path / "run.csv").read_text().splitlines()
    assert rows[0] == "time,rotor_speed,pitch_command,torque_demand,aviFAIL,avcMSG"
    assert len(rows) == 1 + 48001
    for row in rows[1:]:
        t, speed, pitch, torque, fail, _ = row.split(",")
        assert 0.0 <= float(pitch) <= 1.570796 + 1e-6
        assert 0.0 <= float(torque) <= 47402.91 + 1e-2
        assert fail == "0"
    assert float(rows[-1].split(",")[0]) == 600.0
    assert max(float(row.split(",")[2]) for row in rows[1:]) > 0.3  # pitching at 18 m/s


def test_two_in_process_runs_are_byte_identical(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path
) -> None:
    a = lib_copy(controller_libs, "nrel5mw", tmp_path, "a")
    b = lib_copy(controller_libs, "nrel5mw", tmp_path, "b")
    run_local(a, "DISCON", str(nrel5mw_infile), tmp_path / "a.csv", 600.0)
    run_local(b, "DISCON", str(nrel5mw_infile), tmp_path / "b.csv", 600.0)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    # And through the command line in a fresh process (the console script's code path).
    proc = subprocess.run(
        [sys.executable, "-m", "discon_manager.check.cli", "--library",
         str(controller_libs["nrel5mw"]), "--proc", "DISCON", "--infile", str(nrel5mw_infile),
         "--csv", str(tmp_path / "c.csv")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "calls made       48001" in proc.stdout
    assert "regions visited  1.5, 2, 2.5, 3" in proc.stdout
    assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def test_test_discon_messages_only_when_changed(
    controller_libs: dict[str, Path], tmp_path: Path
) -> None:
    lib = lib_copy(controller_libs, "default", tmp_path, "msg")
    r = run_local(lib, "discon", "", tmp_path / "m.csv", 1.0)
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert r.calls == 81 and r.final_msg == "DISCON called 81 times"
    assert rows[0].endswith(",0,DISCON called 1 times")
    assert rows[80].endswith(",0,DISCON called 81 times")
    for row in rows:  # record 47 = 2 x record 20 (generator speed, as float32)
        _, speed, _, torque, _, _ = row.split(",")
        assert float(torque) == pytest.approx(2 * 97 * float(speed), rel=1e-6)


def test_controller_error_exits_1_with_message(
    controller_libs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = lib_copy(controller_libs, "nrel5mw", tmp_path, "err")
    csv = tmp_path / "e.csv"
    code = cli.main(["--library", str(lib), "--proc", "DISCON", "--infile",
                     str(tmp_path / "missing.in"), "--csv", str(csv)])
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("controller error at t=0 s: NREL5MW: cannot open input file")
    assert "missing.in" in lines[0]
    assert "final aviFAIL    -1" in out
    rows = csv.read_text().splitlines()
    assert len(rows) == 2 and ",-1,NREL5MW: cannot open input file" in rows[1]


def test_load_errors_exit_2(tmp_path: Path, controller_libs: dict[str, Path],
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--library", str(tmp_path / "nope.so")]) == 2
    assert "does not exist" in capsys.readouterr().err
    lib = lib_copy(controller_libs, "default", tmp_path, "sym")
    assert cli.main(["--library", str(lib), "--proc", "DISCON"]) == 2
    err = capsys.readouterr().err
    assert "no symbol 'DISCON'" in err and "discon" in err and len(err.splitlines()) == 1


def test_json_summary(controller_libs: dict[str, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    lib = lib_copy(controller_libs, "default", tmp_path, "json")
    assert cli.main(["--library", str(lib), "--proc", "discon", "--duration", "2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["ok"] and s["calls"] == 161 and s["final_aviFAIL"] == 0
    assert s["final_avcMSG"] == "DISCON called 161 times"
    assert s["latency_us"]["p50"] <= s["latency_us"]["p99"] <= s["latency_us"]["max"]
    assert s["cold_start_s"] > 0 and set(s["regions"]) == {"1", "1.5", "2", "2.5", "3"}


class ScriptedTransport:
    """A transport that plays a controller from Python, to pin the driver's contract."""

    name = "scripted"

    def __init__(self, script: dict[int, tuple[int, str]]) -> None:
        self.script = script  # call index -> (aviFAIL, avcMSG)
        self.seen: list[dict[str, Any]] = []

    def open(self, bufs: CallBuffers) -> None:
        self.bufs = bufs

    def call(self) -> None:
        s = self.bufs.swap
        self.seen.append({
            "rec": {r: s[r - 1] for r in (1, 2, 3, 4, 6, 7, 10, 28, 33, 34, 49, 50, 51, 61, 62,
                                          63, 64, 129)},
            "fail": self.bufs.fail.value, "msg": self.bufs.msg.raw[:1],
            "infile": self.bufs.infile.raw, "outname": self.bufs.outname.value,
        })
        fail, msg = self.script.get(len(self.seen) - 1, (0, ""))
        self.bufs.fail.value = fail
        self.bufs.msg.value = msg.encode()
        s[44] = 0.0
        s[46] = 1000.0

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


def test_driver_fills_records_like_servodyn_and_handles_avifail(tmp_path: Path) -> None:
    warnings: list[tuple[float, str]] = []
    t = ScriptedTransport({3: (1, "gusty"), 4: (1, "gusty"), 6: (1, "other")})
    r = run_sync(drive(t, RunConfig(infile="my.in", duration=0.1, dt=0.0125,
                                    on_warning=lambda tt, m: warnings.append((tt, m)))))
    assert r.ok and r.calls == 9 and r.warnings == 3
    assert warnings == [(3 * 0.0125, "gusty"), (6 * 0.0125, "other")]  # repeats are not re-printed
    statuses = [c["rec"][1] for c in t.seen]
    assert statuses == [0, 1, 1, 1, 1, 1, 1, 1, -1]
    first = t.seen[0]
    assert first["rec"][3] == pytest.approx(0.0125) and first["rec"][2] == 0.0
    assert first["rec"][6] == 0.0 and first["rec"][7] == pytest.approx(1.570796)
    assert first["rec"][49] == MSG_SIZE and first["rec"][50] == len("my.in") + 1
    assert first["rec"][64] == OUTNAME_SIZE and first["rec"][129] == SWAP_SIZE
    assert (first["rec"][61], first["rec"][62], first["rec"][63]) == (3, 300, 165)
    assert first["rec"][51] == len(first["outname"]) + 1
    assert first["infile"] == b"my.in\0"
    for c in t.seen:  # aviFAIL and avcMSG are reset before every call
        assert c["fail"] == 0 and c["msg"] == b"\0"
    assert t.seen[8]["rec"][2] == pytest.approx(0.1)

    t = ScriptedTransport({2: (-1, "broken\nbadly")})
    r = run_sync(drive(t, RunConfig(duration=1.0, csv_path=tmp_path / "x.csv")))
    assert not r.ok and r.calls == 3 and r.error == "broken\nbadly"
    assert r.error_time == 2 * 0.0125 and r.exit_code == 1
    assert [c["rec"][1] for c in t.seen] == [0, 1, 1]  # no final call after an error
    with open(tmp_path / "x.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 4 and rows[-1][4:] == ["-1", "broken\nbadly"]
    assert rows[1][5] == rows[2][5] == ""


# -- network: a minimal discon-server stand-in -------------------------------------


class FakeServer:
    """Answers DISCON frames with Controller.call_frame and file transfers like a server.

    Records every frame, request URI and header set. ``delay_first_transfer``
    holds the first transfer reply back (to force a client retry);
    ``refuse_transfers`` answers transfers with fail = 1; ``mangle`` may
    rewrite DISCON replies.
    """

    def __init__(self, library: Path | None, proc: str, workdir: Path, *,
                 delay_first_transfer: float = 0.0, refuse_transfers: bool = False,
                 mangle: Any = None) -> None:
        self.controller = Controller(str(library), proc) if library else None
        self.workdir = workdir
        self.delay_first_transfer = delay_first_transfer
        self.refuse_transfers = refuse_transfers
        self.mangle = mangle
        self.frames: list[bytes] = []
        self.uris: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.transfers_answered = 0
        server = self

        class Proto(WebSocketServerProtocol):
            def onConnect(self, request: Any) -> None:
                server.uris.append(self.http_request_uri)
                server.headers.append(dict(self.http_headers))

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                server.frames.append(payload)
                h = parse_header(payload)
                if h.is_transfer:
                    name = payload[h.serverpath_offset : h.size].rstrip(b"\0").decode()
                    assert "/" not in name and ".." not in name
                    if server.refuse_transfers:
                        self.sendMessage(transfer_reply(payload, "disk full", False), True)
                        return
                    (server.workdir / name).write_bytes(
                        payload[h.filecontent_offset : h.serverpath_offset])
                    reply = transfer_reply(payload, f"wrote {name}", True)
                    first = server.transfers_answered == 0
                    server.transfers_answered += 1
                    if first and server.delay_first_transfer:
                        reactor.callLater(server.delay_first_transfer, self.sendMessage,
                                          reply, True)
                    else:
                        self.sendMessage(reply, True)
                    return
                frame = bytearray(payload)
                assert server.controller is not None
                server.controller.call_frame(frame, h)
                out = bytes(frame)
                if server.mangle:
                    out = server.mangle(out)
                self.sendMessage(out, True)

        self.factory = WebSocketServerFactory()
        self.factory.protocol = Proto
        self.factory.setProtocolOptions(maxMessagePayloadSize=64 << 20, tcpNoDelay=True)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    def discon_frames(self) -> list[bytes]:
        return [f for f in self.frames if not parse_header(f).is_transfer]

    def transfer_frames(self) -> list[bytes]:
        return [f for f in self.frames if parse_header(f).is_transfer]

    async def stop(self) -> None:
        await self.port.stopListening()


def nrel_infile_with_reference(nrel5mw_infile: Path, tmp_path: Path) -> tuple[Path, Path]:
    """DISCON.IN plus a comment naming an additional file, and that file."""
    extra = tmp_path / "client" / "extra.dat"
    extra.parent.mkdir(exist_ok=True)
    extra.write_bytes(b"a file the controller reads besides its input file\n")
    primary = tmp_path / "client" / "DISCON.IN"
    primary.write_bytes(nrel5mw_infile.read_bytes() + b"! tables in extra.dat (extra.dat)\n")
    return primary, extra


@pytest_twisted.ensureDeferred
async def test_v1_client_frames_query_and_csv(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path
) -> None:
    local, expected = record_local(
        lib_copy(controller_libs, "nrel5mw", tmp_path, "local"), "DISCON", str(nrel5mw_infile),
        tmp_path / "local.csv", NET_DURATION, V1)
    server = FakeServer(lib_copy(controller_libs, "nrel5mw", tmp_path, "srv"), "DISCON", tmp_path)
    try:
        r = await run_network(
            server.address + "/rosco?ignored=1",
            RunConfig(infile=str(nrel5mw_infile), duration=NET_DURATION,
                      csv_path=tmp_path / "net.csv"),
            path="controllers/lib nrel5mw.so", proc="DISCON", client_version=1,
        )
    finally:
        await server.stop()
    assert server.uris == ["/rosco/ws?path=controllers%2Flib+nrel5mw.so&proc=DISCON"]
    assert set(server.headers[0]) <= {"host", "upgrade", "connection", "sec-websocket-key",
                                      "sec-websocket-version", "user-agent", "pragma",
                                      "cache-control"}
    assert not server.transfer_frames()
    frames = server.frames
    assert len(frames) == r.calls == local.calls == int(NET_DURATION * 80) + 1
    infile = str(nrel5mw_infile).encode() + b"\0"
    for i, f in enumerate(frames):
        n = struct.unpack_from("<4I", f, 0)
        assert n == (SWAP_SIZE, len(infile), OUTNAME_SIZE, MSG_SIZE)
        assert len(f) == 16 + 4 * SWAP_SIZE + 4 + len(infile) + OUTNAME_SIZE + MSG_SIZE
        m = decode(f)
        assert m.version == V1 and m.infile == infile and m.fail == 0
        assert m.swap[0] == (0 if i == 0 else -1 if i == len(frames) - 1 else 1)
        assert m.swap[49] == len(infile) and m.swap[128] == SWAP_SIZE
        assert m.msg == b"\0" * MSG_SIZE and m.outname.startswith(b"discon-check.SrvD\0")
    assert frames == expected  # byte for byte what OpenFAST's buffers held, as v1 frames
    assert r.transport_stats["replies_not_copied"] == 0
    assert (tmp_path / "net.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


@pytest_twisted.ensureDeferred
async def test_v2_client_transfers_rewrites_and_matches_in_process(
    controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    primary, extra = nrel_infile_with_reference(nrel5mw_infile, tmp_path)
    extra_content = extra.read_bytes()
    extra_name = server_file_name("extra.dat", extra_content)
    rewritten = primary.read_bytes().replace(b"extra.dat", extra_name.encode())
    assert rewritten.count(extra_name.encode()) == 2
    primary_name = server_file_name("DISCON.IN", rewritten)
    local, expected = record_local(
        lib_copy(controller_libs, "nrel5mw", tmp_path, "local"), "DISCON", str(primary),
        tmp_path / "local.csv", NET_DURATION, V2, server_name=primary_name)
    workdir = tmp_path / "server"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the controller opens the transferred file by its bare name
    server = FakeServer(lib_copy(controller_libs, "nrel5mw", tmp_path, "srv"), "DISCON", workdir)
    try:
        r = await run_network(
            "http://" + server.address,
            RunConfig(infile=str(primary), duration=NET_DURATION, csv_path=tmp_path / "net.csv"),
            path="libnrel5mw.so", proc="DISCON", additional_files=[str(extra)],
        )
    finally:
        await server.stop()
    assert server.uris == ["/ws?path=libnrel5mw.so&proc=DISCON"]
    assert primary_name.startswith("input_") and primary_name.endswith("_DISCON.IN")
    # The first two frames are the transfers, byte for byte, in this order.
    assert server.frames[0] == transfer_request(extra_name, extra_content)
    assert server.frames[1] == transfer_request(primary_name, rewritten)
    assert (workdir / primary_name).read_bytes() == rewritten
    discon = server.frames[2:]
    assert not any(parse_header(f).is_transfer for f in discon)
    name = primary_name.encode() + b"\0"
    for f in discon:
        assert struct.unpack_from("<6I", f, 0) == (SWAP_SIZE, len(name), OUTNAME_SIZE,
                                                   MSG_SIZE, 0, 0)
        assert len(f) == 24 + 4 * SWAP_SIZE + 4 + len(name) + OUTNAME_SIZE + MSG_SIZE
        m = decode(f)
        assert m.version == V2 and m.infile == name and m.swap[49] == len(name)
    assert len(discon) == r.calls == local.calls
    assert discon == expected  # byte for byte, with accINFILE and record 50 rewritten
    net = r.transport_stats
    assert net["transfers"] == [
        {"local": str(extra), "server_name": extra_name},
        {"local": str(primary), "server_name": primary_name},
    ]
    assert net["transfer_retries"] == net["stale_replies_dropped"] == 0
    assert net["replies_not_copied"] == 0 and net["dial_attempts"] == 1
    assert r.cold_start_s > 0 and len(r.latencies_ns) == r.calls
    assert (tmp_path / "net.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


@pytest.mark.parametrize("delay", [0.5, 0.8])
@pytest_twisted.ensureDeferred
async def test_v2_transfer_retry_does_not_shift_replies(
    delay: float, controller_libs: dict[str, Path], nrel5mw_infile: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first transfer reply later than the deadline: the same transfer is sent again.

    The client takes the next transfer reply as the answer to the retry (0.5 s:
    the late reply arrives during the 0.4 s back-off; 0.8 s: the retry's own
    reply comes first and the late one turns up between DISCON replies) and
    drops the other one, so every DISCON reply still answers its own call.
    """
    primary = tmp_path / "DISCON.IN"
    primary.write_bytes(nrel5mw_infile.read_bytes())
    duration = 2 * NET_DURATION  # the run must outlast the late reply
    run_local(lib_copy(controller_libs, "nrel5mw", tmp_path, "local"), "DISCON", str(primary),
              tmp_path / "local.csv", duration)
    workdir = tmp_path / "server"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    server = FakeServer(lib_copy(controller_libs, "nrel5mw", tmp_path, "srv"), "DISCON", workdir,
                        delay_first_transfer=delay)
    try:
        r = await run_network(
            server.address,
            RunConfig(infile=str(primary), duration=duration, csv_path=tmp_path / "net.csv"),
            transfer_deadline=0.3,
        )
    finally:
        await server.stop()
    transfers = server.transfer_frames()
    assert len(transfers) == 2 and transfers[0] == transfers[1]
    assert server.frames[:2] == transfers
    net = r.transport_stats
    assert net["transfer_retries"] == 1 and net["transfer_frames_sent"] == 2
    assert net["stale_replies_dropped"] == 1 and net["replies_not_copied"] == 0
    assert r.ok and r.calls == len(server.discon_frames())
    assert (tmp_path / "net.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


@pytest_twisted.ensureDeferred
async def test_replies_of_other_sizes_are_not_copied_back(
    controller_libs: dict[str, Path], tmp_path: Path
) -> None:
    def shorter_msg(reply: bytes) -> bytes:
        m = decode(reply)
        m.swap[46] = 12345.0
        m.msg = m.msg[:100]
        return encode(m)

    server = FakeServer(lib_copy(controller_libs, "default", tmp_path, "srv"), "discon", tmp_path,
                        mangle=shorter_msg)
    try:
        r = await run_network(server.address, RunConfig(duration=0.5, csv_path=tmp_path / "n.csv"),
                              client_version=1)
    finally:
        await server.stop()
    assert r.calls == 41 and r.transport_stats["replies_not_copied"] == 41
    for row in (tmp_path / "n.csv").read_text().splitlines()[1:]:
        assert row.split(",")[3] == "0.0"  # record 47 never reached the caller's buffer


@pytest_twisted.ensureDeferred
async def test_v2_transfer_refused_is_an_error(tmp_path: Path, nrel5mw_infile: Path) -> None:
    server = FakeServer(None, "DISCON", tmp_path, refuse_transfers=True)
    try:
        with pytest.raises(TransferError, match="refused the transfer.*disk full"):
            await run_network(server.address, RunConfig(infile=str(nrel5mw_infile),
                                                        duration=1.0))
    finally:
        await server.stop()
    assert len(server.frames) == 1  # no DISCON call after a refused transfer


class RefusingHTTP(tx_protocol.Protocol):
    """Answers any request with HTTP 500 and a one-line body, like a discon-server error."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            body = b"cannot load 'libnope.so': no such file\n"
            self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_v2_dials_five_times_and_reports_the_refusal(tmp_path: Path) -> None:
    attempts = []
    factory = tx_protocol.Factory()

    def build(addr: Any) -> RefusingHTTP:
        attempts.append(addr)
        return RefusingHTTP()

    factory.buildProtocol = build  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        with pytest.raises(CheckConnectionError) as e:
            await run_network(f"127.0.0.1:{port.getHost().port}", RunConfig(duration=1.0),
                              dial_delays=(0.01, 0.01, 0.01, 0.01))
    finally:
        await port.stopListening()
    assert len(attempts) == 5
    text = str(e.value)
    assert "5 tries" in text and "500" in text and "libnope.so" in text and "\n" not in text


def test_unreachable_server_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "discon_manager.check.cli", "--server", f"127.0.0.1:{free}",
         "--client-version", "1", "--duration", "1"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"127.0.0.1:{free}" in lines[0] and "refused" in lines[0] and "check" in lines[0]


def test_server_url_like_the_discon_wrapper_clients() -> None:
    q = "path=libdiscon.so&proc=DISCON"
    assert server_url("host:8080") == f"ws://host:8080/ws?{q}"
    assert server_url("http://host:8080") == f"ws://host:8080/ws?{q}"
    assert server_url("https://host") == f"wss://host/ws?{q}"
    assert server_url("ws://host:8080/rosco/") == f"ws://host:8080/rosco/ws?{q}"
    assert server_url("host:8080/a/b?controller=x") == f"ws://host:8080/a/b/ws?{q}"
    assert server_url("h:1", "dir/lib a&b.so", "DIS CON") == (
        "ws://h:1/ws?path=dir%2Flib+a%26b.so&proc=DIS+CON")
    with pytest.raises(ValueError):
        server_url("http:///x")
