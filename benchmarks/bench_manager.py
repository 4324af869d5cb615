#!/usr/bin/env python3
"""What DisconManager costs: per call, at a cold start, and in memory, in one run.

The issue's first targets:

* per call: through the manager at most 1.5x the p50 of calling the container
  directly. One manager (a real ``twistd disconmanager``, tests.support's
  ManagerProcess) and one directly started discon-server:latest container; the
  same minimal blocking client (bench_server.WsClient, pre-masked frames), the
  same OpenFAST-shaped v2 frames (464 floats, avcMSG 8197 and avcOUTNAME 12601
  bytes: about 23 KB each way); both connections open at once and measured in
  alternating blocks after a warm-up, so drift in the machine's load falls on
  both alike.
* cold start: at most 1.5x the floor. Manager: from the client's connect to
  the first DISCON reply, with a new container started during the held
  handshake. Floor: from ``docker run -d`` (SDK create + start, the same calls
  the manager makes) of the same image until its server accepts a WebSocket
  connection (polled every 10 ms) and answers a first call. Trials alternate
  which of the two goes first.
* memory: the manager's RSS (VmRSS of its process) under 100 MB with 50
  sessions open at once, each with its own container and one call made. They
  are opened in concurrent batches (default 10: 2 cores), then closed, and the
  run waits until the manager has removed every container.

Containers the benchmark starts itself get the limits and environment the
manager gives its own (256m, 1 CPU, 128 pids, DISCON_CALL_TIMEOUT), so the
ratios isolate the manager. Everything is named discon-controller-bench-* on
the network discon-bench-net, and removed at the end, also on error.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_manager.py \\
        [--calls 3000] [--trials 5] [--sessions 50] [--json PATH]

``--calls 0``, ``--trials 0`` or ``--sessions 0`` skips that part.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_server import Target
from common import (
    PORT,
    ROOT,
    BenchDocker,
    BenchWsClient,
    bench_manager,
    check_reply,
    container_ip,
    host_info,
    manager_container_names,
    median,
    openfast_frames,
    print_table,
    rss_kib,
    summarize,
    wait_manager_containers,
    write_json,
)

IMAGE = "discon-server:latest"
CONTROLLER = "default"  # the manager's catalogue id for IMAGE
QUERY = "path=libtest_discon.so&proc=discon"
TARGET_CALL_RATIO = 1.5
TARGET_COLD_RATIO = 1.5
TARGET_RSS_MB = 100.0
POLL_STEP = 0.01


def manager_resource() -> str:
    return f"/{CONTROLLER}/ws?{QUERY}"


# -- per call ------------------------------------------------------------------------


def per_call(bd: BenchDocker, mgr: Any, args: argparse.Namespace) -> dict[str, Any]:
    server, ip = bd.start_server(IMAGE, "direct")
    requests = openfast_frames(64)
    masked = [BenchWsClient.masked_frame(f) for f in requests]
    targets: list[Target] = []
    try:
        targets = [
            Target("direct", BenchWsClient(ip, PORT, f"/ws?{QUERY}"), masked, requests, []),
            Target(
                "manager",
                BenchWsClient("127.0.0.1", mgr.port, manager_resource()),
                masked,
                requests,
                [],
            ),
        ]
        for t in targets:
            t.run_block(args.warmup, record=False)
        remaining, turn = args.calls, 0
        while remaining > 0:
            n = min(args.block, remaining)
            for t in targets if turn % 2 == 0 else targets[::-1]:
                t.run_block(n, record=True)
            remaining -= n
            turn += 1
        # each controller really was called every time (test-discon counts its calls)
        probe = requests[1]
        for t in targets:
            _, reply = t.client.round_trip(BenchWsClient.masked_frame(probe))
            text = check_reply(probe, reply)
            want = f"DISCON called {args.warmup + args.calls + 1} times"
            if text != want:
                raise AssertionError(f"{t.name}: controller says {text!r}, expected {want!r}")
    finally:
        for t in targets:
            t.client.close_cleanly()
        bd.remove(server)
    wait_manager_containers(bd.client, mgr.instance, 0)
    results = {t.name: summarize(t.times) for t in targets}
    d, m = results["direct"], results["manager"]
    ratio = {k: m[k] / d[k] for k in ("p50_us", "p90_us", "p99_us", "mean_us")}
    return {
        "frame_bytes": len(requests[0]),
        "calls": args.calls,
        "warmup": args.warmup,
        "block": args.block,
        "results": results,
        "ratio_manager_over_direct": ratio,
        "target": {"p50_ratio_max": TARGET_CALL_RATIO, "met": ratio["p50_us"] <= TARGET_CALL_RATIO},
    }


# -- cold start ------------------------------------------------------------------------


def floor_trial(bd: BenchDocker, frame: bytes, masked: bytes) -> dict[str, float]:
    """docker run -d -> server answers a first call; seconds, with the steps."""
    t0 = time.perf_counter()
    c = bd.run(IMAGE, "floor")
    t_run = time.perf_counter()
    try:
        ip = container_ip(c)
        t_ip = time.perf_counter()
        deadline = t0 + 30.0
        attempts = 0
        while True:
            attempts += 1
            try:
                client = BenchWsClient(ip, PORT, f"/ws?{QUERY}", connect_timeout=0.5)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{c.name} did not accept within 30 s") from None
                time.sleep(POLL_STEP)
        t_open = time.perf_counter()
        try:
            _, reply = client.round_trip(masked)
            t1 = time.perf_counter()
            check_reply(frame, reply)
        finally:
            client.close_cleanly()
    finally:
        bd.remove(c)
    return {
        "total_s": t1 - t0,
        "run_s": t_run - t0,
        "inspect_s": t_ip - t_run,
        "accept_s": t_open - t_ip,
        "first_call_s": t1 - t_open,
        "connect_attempts": attempts,
    }


def manager_trial(bd: BenchDocker, mgr: Any, frame: bytes, masked: bytes) -> dict[str, float]:
    """Client connect -> first DISCON reply through the manager (new container)."""
    t0 = time.perf_counter()
    client = BenchWsClient("127.0.0.1", mgr.port, manager_resource(), connect_timeout=5.0)
    try:
        t_open = time.perf_counter()
        _, reply = client.round_trip(masked)
        t1 = time.perf_counter()
        text = check_reply(frame, reply)
        if text != "DISCON called 1 times":
            raise AssertionError(f"the container was not new: {text!r}")
    finally:
        client.close_cleanly()
    t_close = time.perf_counter()
    wait_manager_containers(bd.client, mgr.instance, 0)
    gone = time.perf_counter() - t_close
    return {
        "total_s": t1 - t0,
        "handshake_s": t_open - t0,
        "first_call_s": t1 - t_open,
        "container_gone_after_close_s": gone,
    }


def cold_start(bd: BenchDocker, mgr: Any, args: argparse.Namespace) -> dict[str, Any]:
    frame = openfast_frames(1)[0]
    masked = BenchWsClient.masked_frame(frame)
    floor: list[dict[str, float]] = []
    via: list[dict[str, float]] = []
    # one untimed round of each: image layers and the manager's Docker client warm
    floor_trial(bd, frame, masked)
    manager_trial(bd, mgr, frame, masked)
    for i in range(args.trials):
        order = ("floor", "manager") if i % 2 == 0 else ("manager", "floor")
        for which in order:
            if which == "floor":
                floor.append(floor_trial(bd, frame, masked))
            else:
                via.append(manager_trial(bd, mgr, frame, masked))

    def stats(trials: list[dict[str, float]]) -> dict[str, Any]:
        totals = [t["total_s"] * 1000 for t in trials]
        return {"median_ms": median(totals), "min_ms": min(totals), "max_ms": max(totals),
                "trials": trials}

    f, m = stats(floor), stats(via)
    ratio = {"median": m["median_ms"] / f["median_ms"], "min": m["min_ms"] / f["min_ms"]}
    return {
        "trials": args.trials,
        "floor": f,
        "manager": m,
        "ratio_manager_over_floor": ratio,
        "target": {"median_ratio_max": TARGET_COLD_RATIO,
                   "met": ratio["median"] <= TARGET_COLD_RATIO},
    }


# -- memory with many sessions ----------------------------------------------------------


def memory(bd: BenchDocker, mgr: Any, args: argparse.Namespace) -> dict[str, Any]:
    pid = mgr.proc.pid
    frame = openfast_frames(1)[0]
    masked = BenchWsClient.masked_frame(frame)
    before = rss_kib(pid)

    def open_one() -> tuple[BenchWsClient, float]:
        t0 = time.perf_counter()
        c = BenchWsClient("127.0.0.1", mgr.port, manager_resource(), connect_timeout=10.0)
        try:
            _, reply = c.round_trip(masked)
            check_reply(frame, reply)
        except BaseException:
            c.close_cleanly()
            raise
        return c, time.perf_counter() - t0

    sessions: list[BenchWsClient] = []
    open_s: list[float] = []
    batch_s: list[float] = []
    try:
        with ThreadPoolExecutor(max_workers=args.batch) as ex:
            while len(sessions) < args.sessions:
                n = min(args.batch, args.sessions - len(sessions))
                t0 = time.perf_counter()
                futures = [ex.submit(open_one) for _ in range(n)]
                errors = []
                for fut in futures:
                    try:
                        c, dt = fut.result()
                        sessions.append(c)
                        open_s.append(dt)
                    except Exception as e:  # keep the others to close them
                        errors.append(e)
                batch_s.append(time.perf_counter() - t0)
                if errors:
                    raise RuntimeError(f"{len(errors)} of {n} sessions failed: {errors[0]!r}")
        containers = len(manager_container_names(bd.client, mgr.instance))
        if containers != args.sessions:
            raise AssertionError(f"{args.sessions} sessions open but {containers} containers")
        time.sleep(1.0)  # let the reactor settle (thread pool, GC) before reading
        with_open = rss_kib(pid)
        # every session is still live: a second call on each, in turn
        for c in sessions:
            _, reply = c.round_trip(masked)
            if check_reply(frame, reply) != "DISCON called 2 times":
                raise AssertionError("a session's second call did not reach its own container")
        after_calls = rss_kib(pid)
    finally:
        t_close = time.perf_counter()
        for c in sessions:
            c.close_cleanly()
    wait_manager_containers(bd.client, mgr.instance, 0, timeout=120.0)
    cleanup_s = time.perf_counter() - t_close
    time.sleep(1.0)
    after_close = rss_kib(pid)
    rss_mb = max(with_open["VmRSS"], after_calls["VmRSS"]) * 1024 / 1e6
    return {
        "sessions": args.sessions,
        "batch": args.batch,
        "rss_kib": {
            "before": before["VmRSS"],
            "with_sessions_open": with_open["VmRSS"],
            "after_second_call_each": after_calls["VmRSS"],
            "after_close": after_close["VmRSS"],
            "peak_vmhwm": after_close["VmHWM"],
        },
        "rss_mb_with_sessions": rss_mb,
        "session_open_s": {"median": median(open_s), "max": max(open_s)},
        "batch_open_s": batch_s,
        "all_containers_gone_after_close_s": cleanup_s,
        "target": {"rss_mb_max": TARGET_RSS_MB, "met": rss_mb < TARGET_RSS_MB},
    }


# -- report -----------------------------------------------------------------------------


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def report_table(out: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    pc = out.get("per_call")
    if pc:
        d, m, r = pc["results"]["direct"], pc["results"]["manager"], pc["ratio_manager_over_direct"]
        for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("mean_us", "mean")):
            target = f"<= {TARGET_CALL_RATIO:g}x" if key == "p50_us" else ""
            met = _yes(pc["target"]["met"]) if key == "p50_us" else ""
            rows.append([f"per call {label} (us)", f"{d[key]:.1f}", f"{m[key]:.1f}",
                         f"{r[key]:.2f}x", target, met])
    cs = out.get("cold_start")
    if cs:
        f, m, r = cs["floor"], cs["manager"], cs["ratio_manager_over_floor"]
        rows.append(["cold start median (ms)", f"{f['median_ms']:.0f}", f"{m['median_ms']:.0f}",
                     f"{r['median']:.2f}x", f"<= {TARGET_COLD_RATIO:g}x",
                     _yes(cs["target"]["met"])])
        rows.append(["cold start min (ms)", f"{f['min_ms']:.0f}", f"{m['min_ms']:.0f}",
                     f"{r['min']:.2f}x", "", ""])
    mem = out.get("memory")
    if mem:
        kib = mem["rss_kib"]
        rows.append([f"manager RSS, {mem['sessions']} sessions (MB)", "",
                     f"{mem['rss_mb_with_sessions']:.1f}", "", f"< {TARGET_RSS_MB:g} MB",
                     _yes(mem["target"]["met"])])
        rows.append(["manager RSS idle / after close (MB)", "",
                     f"{kib['before'] * 1024 / 1e6:.1f} / {kib['after_close'] * 1024 / 1e6:.1f}",
                     "", "", ""])
    print()
    if pc:
        print(f"per call: OpenFAST-shaped v2 frames ({pc['frame_bytes']} bytes each way), "
              f"{pc['calls']} timed calls each, alternating blocks of {pc['block']}")
    if cs:
        print(f"cold start: {cs['trials']} trials each; floor = docker run -d of {IMAGE} "
              "until a first call is answered")
    if mem:
        print(f"memory: VmRSS of the manager with {mem['sessions']} sessions/containers open "
              f"(1 MB = 10^6 bytes); opened in batches of {mem['batch']}, "
              f"all containers gone {mem['all_containers_gone_after_close_s']:.1f} s "
              "after closing")
    print()
    print_table(["measure", "direct/floor", "manager", "ratio", "target", "met"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per path (0: skip)")
    ap.add_argument("--warmup", type=int, default=300, help="untimed calls per path first")
    ap.add_argument("--block", type=int, default=50, help="calls per alternating block")
    ap.add_argument("--trials", type=int, default=5, help="cold-start trials each (0: skip)")
    ap.add_argument("--sessions", type=int, default=50, help="concurrent sessions (0: skip)")
    ap.add_argument("--batch", type=int, default=10, help="sessions opened at once")
    ap.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "manager.json"
    )
    args = ap.parse_args(argv)
    if min(args.calls, args.trials, args.sessions) < 0 or args.batch < 1 or args.block < 1:
        ap.error("counts must be >= 0, --batch and --block >= 1")

    out: dict[str, Any] = {"benchmark": "DisconManager overhead: per call, cold start, memory",
                           "image": IMAGE, "controller": CONTROLLER}
    with BenchDocker() as bd, bench_manager() as mgr:
        out["host"] = host_info(bd.client)
        if args.calls:
            print(f"per call: {args.warmup} + {args.calls} calls on each path ...", flush=True)
            out["per_call"] = per_call(bd, mgr, args)
        if args.trials:
            print(f"cold start: {args.trials} trials each ...", flush=True)
            out["cold_start"] = cold_start(bd, mgr, args)
        if args.sessions:
            print(f"memory: {args.sessions} sessions in batches of {args.batch} ...", flush=True)
            out["memory"] = memory(bd, mgr, args)
        with contextlib.suppress(OSError):
            out["manager_log_tail"] = mgr.logs().splitlines()[-20:]
    report_table(out)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
