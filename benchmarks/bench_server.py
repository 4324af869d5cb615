#!/usr/bin/env python3
"""Round-trip cost of one DISCON call through the discon-server, against a bare echo.

The issue's target: the server's median round trip at most 2x that of a plain
Autobahn WebSocket echo server. The echo runs from the SAME image with the
same Twisted/Autobahn stack and the same protocol options as the server
(tcpNoDelay, no fragmentation, no compression, unmasked frames accepted), so
the ratio isolates what the server adds on top of WebSocket itself: parsing,
the pipe hop to the per-connection worker process and the controller call.

Frames are shaped like OpenFAST's legacy interface (464 swap records with
record 129 = 464, avcMSG 8197 bytes with record 49 = 8197, avcOUTNAME 12601
bytes with record 64 = 12601; version 2), about 23 KB each way.

The client is a minimal blocking WebSocket client on a raw socket, not a
Twisted one: its own cost is paid equally by both targets, and a leaner client
makes the ratio stricter rather than flattering. Frames are masked like a real
client's, masked ahead of time so masking is not timed. Both connections stay
open and are measured in alternating blocks, so drift in machine load (other
work on the host) falls on both alike.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_server.py [--calls 3000] [--json PATH]

Containers and the network it makes are removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import socket
import statistics
import struct
import sys
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from discon_manager.protocol import V2, Message, decode, encode, parse_header  # noqa: E402

IMAGE = "discon-server:latest"
NETWORK = "discon-bench-net"
PORT = 8080
N_SWAP, N_MSG, N_OUTNAME = 464, 8197, 12601
TARGET_RATIO = 2.0

#: The echo server, run with the image's own Python; options as DisconServerFactory sets them.
ECHO_SERVER = """
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary=isBinary)

limit = 64 * 1024 * 1024
factory = WebSocketServerFactory()
factory.protocol = Echo
factory.setProtocolOptions(
    maxMessagePayloadSize=limit,
    maxFramePayloadSize=limit,
    tcpNoDelay=True,
    autoFragmentSize=0,
    openHandshakeTimeout=30,
    requireMaskedClientFrames=False,
)
reactor.listenTCP(8080, factory)
reactor.run()
"""


# -- a minimal blocking WebSocket client -------------------------------------------


class WsClient:
    """Just enough RFC 6455 for binary request/reply over one connection."""

    def __init__(
        self,
        host: str,
        port: int,
        resource: str,
        connect_timeout: float = 30.0,
        timeout: float = 60.0,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        try:
            self.sock.sendall(
                (
                    f"GET {resource} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("connection closed during the handshake")
                head += chunk
        except BaseException:
            self.close()
            raise
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            self.close()
            raise ConnectionError(f"handshake refused: {status.decode(errors='replace')}")
        self.pending = bytearray(head.split(b"\r\n\r\n", 1)[1])
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)

    @staticmethod
    def masked_frame(payload: bytes) -> bytes:
        """A complete masked binary frame (masking done here, outside the timed loop)."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        key = (mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
        return head + mask + body

    def _read_exactly(self, n: int) -> memoryview:
        if n > len(self.buf):
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        got = min(len(self.pending), n)
        if got:
            self.buf[:got] = self.pending[:got]
            del self.pending[:got]
        while got < n:
            k = self.sock.recv_into(self.view[got:n])
            if k == 0:
                raise ConnectionError("connection closed while reading a reply")
            got += k
        return self.view[:n]

    def recv_message(self) -> bytes:
        """One unmasked, unfragmented binary message from the server."""
        b0, b1 = self._read_exactly(2)
        if b0 & 0x0F == 0x8:
            raise ConnectionError("the server closed the connection")
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exactly(8))[0]
        return bytes(self._read_exactly(n))

    def round_trip(self, frame: bytes) -> tuple[int, bytes]:
        """Send one pre-masked frame, wait for the reply: (nanoseconds, reply)."""
        t0 = time.perf_counter_ns()
        self.sock.sendall(frame)
        reply = self.recv_message()
        return time.perf_counter_ns() - t0, reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def close_cleanly(self) -> None:
        """A masked close frame (1000), then the socket, like a polite client."""
        with contextlib.suppress(OSError):
            mask = os.urandom(4)
            body = struct.pack("!H", 1000)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
            self.sock.sendall(bytes([0x88, 0x80 | len(body)]) + mask + masked)
        self.close()


# -- containers -------------------------------------------------------------------


def wait_listening(container: Container, ip: str, timeout: float = 30.0) -> None:
    """Poll a TCP connect in short steps until the container listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, PORT), timeout=0.5):
                return
        except OSError:
            pass
        container.reload()
        if container.status not in ("created", "running") or time.monotonic() > deadline:
            logs = container.logs(tail=20).decode(errors="replace")
            raise RuntimeError(f"{container.name} did not come up ({container.status}):\n{logs}")
        time.sleep(0.05)


def container_ip(container: Container) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]


# -- frames and statistics ----------------------------------------------------------


def openfast_frames(count: int) -> list[bytes]:
    """OpenFAST-shaped v2 DISCON calls, with a generator speed that varies per frame."""
    frames = []
    for i in range(count):
        swap = array("f", [0.0] * N_SWAP)
        swap[0] = 0.0 if i == 0 else 1.0
        swap[2] = 0.0125
        swap[19] = 100.0 + (i % 50) * 0.5
        swap[48], swap[49], swap[63], swap[128] = N_MSG, 1, N_OUTNAME, N_SWAP
        frames.append(
            encode(
                Message(
                    swap=swap,
                    infile=b"\0",
                    outname=b"\0" * N_OUTNAME,
                    msg=b"\0" * N_MSG,
                    version=V2,
                )
            )
        )
    return frames


def percentile(sorted_us: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_us) - 1, int(round(q / 100.0 * len(sorted_us) + 0.5)) - 1))
    return sorted_us[k]


def summarize(ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1000.0 for x in ns)
    return {
        "calls": len(us),
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "mean_us": statistics.fmean(us),
        "min_us": us[0],
        "max_us": us[-1],
    }


@dataclass
class Target:
    name: str
    client: WsClient
    frames: list[bytes]  # pre-masked
    requests: list[bytes]  # the same, unmasked, to check replies against
    times: list[int]
    done: int = 0

    def run_block(self, n: int, record: bool) -> None:
        for _ in range(n):
            i = self.done % len(self.frames)
            dt, reply = self.client.round_trip(self.frames[i])
            self.check(self.requests[i], reply)
            self.done += 1
            if record:
                self.times.append(dt)

    def check(self, request: bytes, reply: bytes) -> None:
        if self.name == "echo":
            if reply != request:
                raise AssertionError("the echo server changed a frame")
            return
        if len(reply) != len(request):
            raise AssertionError(f"reply of {len(reply)} bytes to a {len(request)}-byte request")
        h = parse_header(reply)
        fail = struct.unpack_from("<i", reply, h.fail_offset)[0]
        if fail != 0:
            raise AssertionError(f"server replied aviFAIL {fail}: {decode(reply).text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per target")
    ap.add_argument("--warmup", type=int, default=300, help="untimed calls per target first")
    ap.add_argument("--block", type=int, default=50, help="calls per alternating block")
    ap.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "server.json"
    )
    args = ap.parse_args(argv)

    client = docker.from_env()
    tag = uuid.uuid4().hex[:8]
    started: list[Container] = []
    made_network = None
    targets: list[Target] = []
    try:
        try:
            client.networks.get(NETWORK)
        except docker.errors.NotFound:
            made_network = client.networks.create(NETWORK, driver="bridge")
        server = client.containers.create(
            IMAGE, name=f"discon-controller-bench-server-{tag}", network=NETWORK, detach=True
        )
        started.append(server)
        echo = client.containers.create(
            IMAGE,
            command=["python", "-c", ECHO_SERVER],
            name=f"discon-controller-bench-echo-{tag}",
            network=NETWORK,
            detach=True,
        )
        started.append(echo)
        for c in started:
            c.start()
        server_ip, echo_ip = container_ip(server), container_ip(echo)
        wait_listening(server, server_ip)
        wait_listening(echo, echo_ip)

        requests = openfast_frames(64)
        masked = [WsClient.masked_frame(f) for f in requests]
        resource = "/ws?path=libtest_discon.so&proc=discon"
        targets = [
            Target("server", WsClient(server_ip, PORT, resource), masked, requests, []),
            Target("echo", WsClient(echo_ip, PORT, resource), masked, requests, []),
        ]
        for t in targets:  # JIT-free Python still warms caches, pools and the worker
            t.run_block(args.warmup, record=False)
        remaining = args.calls
        turn = 0
        while remaining > 0:
            n = min(args.block, remaining)
            # alternate which target goes first in each round
            order = targets if turn % 2 == 0 else targets[::-1]
            for t in order:
                t.run_block(n, record=True)
            remaining -= n
            turn += 1
        # the server really called the controller every time
        last = targets[0]
        probe = openfast_frames(2)[1]
        _, reply = last.client.round_trip(WsClient.masked_frame(probe))
        expected_calls = args.warmup + args.calls + 1
        text = decode(reply).text
        if text != f"DISCON called {expected_calls} times":
            raise AssertionError(f"unexpected controller state: {text!r}")
    finally:
        for t in targets:
            t.client.close()
        for c in started:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
        if made_network is not None:
            with contextlib.suppress(docker.errors.APIError):
                made_network.remove()

    results = {t.name: summarize(t.times) for t in targets}
    s, e = results["server"], results["echo"]
    ratio = {k: s[k] / e[k] for k in ("p50_us", "p90_us", "p99_us", "mean_us")}
    met = ratio["p50_us"] <= TARGET_RATIO

    print(f"\nDISCON round trip, OpenFAST-shaped v2 frames ({len(requests[0])} bytes each way)")
    print(f"{args.calls} timed calls per target in alternating blocks of {args.block}\n")
    cols = ("p50_us", "p90_us", "p99_us", "mean_us")
    print(f"{'target':<16}" + "".join(f"{c.replace('_us', ' (us)'):>14}" for c in cols))
    for name, row in results.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>14.1f}" for c in cols))
    print(f"{'server / echo':<16}" + "".join(f"{ratio[c]:>13.2f}x" for c in cols))
    verdict = "MET" if met else "NOT MET"
    print(f"\ntarget: server p50 <= {TARGET_RATIO:g} x echo p50 -> {verdict} "
          f"({ratio['p50_us']:.2f}x)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "discon-server round trip vs Autobahn echo, same image",
        "image": IMAGE,
        "frame": {
            "version": 2,
            "n_swap": N_SWAP,
            "n_msg": N_MSG,
            "n_outname": N_OUTNAME,
            "bytes": len(requests[0]),
        },
        "calls": args.calls,
        "warmup": args.warmup,
        "block": args.block,
        "results": results,
        "ratio_server_over_echo": ratio,
        "target": {"p50_ratio_max": TARGET_RATIO, "met": met},
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "docker": client.version().get("Version"),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
