"""``discon-check``: run a controller in closed loop, in process or through a server.

Users ask two questions before a long OpenFAST run: "does my controller work
behind DisconManager exactly as it does locally?" and "how much does the
network cost per step?". This command answers both with one closed-loop run
of the rigid NREL 5-MW plant (600 s through regions 1.5 to 3 by default):
``--library`` calls the library in this process, ``--server`` goes through a
discon-wrapper-compatible client, and ``--csv`` writes a trajectory that is
byte-identical between the two when the controller behaves the same.

Examples::

    discon-check --library build/controllers/libnrel5mw.so --proc DISCON \\
        --infile tests/data/nrel5mw/DISCON.IN --csv local.csv
    discon-check --server localhost:8080 --path libnrel5mw.so --proc DISCON \\
        --infile tests/data/nrel5mw/DISCON.IN --csv remote.csv
    cmp local.csv remote.csv

Network defaults: ``--path libdiscon.so --proc DISCON`` (the discon-client's
own defaults for DISCON_LIB_PATH / DISCON_LIB_PROC), ``--client-version 2``.

Exit codes: 0 ok; 1 the controller stopped the run (aviFAIL < 0, its message
on stderr); 2 usage, load or connection problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from discon_manager.check.driver import (
    DEFAULT_DT,
    DEFAULT_DURATION,
    CheckConnectionError,
    CheckResult,
    RunConfig,
    run_in_process,
)
from discon_manager.check.plant import REGIONS

EXIT_OK = 0
EXIT_CONTROLLER_ERROR = 1
EXIT_USAGE = 2


def _record_override(text: str) -> tuple[int, float, float]:
    """``N=VALUE[@T]`` -> (N, VALUE, T); argparse turns ValueError into a usage error."""
    try:
        rec, rest = text.split("=", 1)
        value, _, since = rest.partition("@")
        n = int(rec)
        if not 1 <= n <= 464:
            raise ValueError
        return n, float(value), float(since or 0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not N=VALUE[@T] with a record N from 1 to 464"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="discon-check",
        description="Run a Bladed-style controller in closed loop with a rigid NREL 5-MW "
        "plant, in this process (--library) or through a DisconManager/discon-server "
        "WebSocket endpoint (--server), and report latency, cold start and regions.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--library", metavar="PATH", help="controller library to load here")
    where.add_argument(
        "--server",
        metavar="ADDR",
        help="HOST:PORT[/PATH] of the /ws endpoint (ws://, wss://, http://, "
        "https:// prefixes accepted), like DISCON_SERVER_ADDR",
    )
    p.add_argument(
        "--proc",
        default=None,
        metavar="NAME",
        help="entry point symbol (in process; default DISCON) or proc= query (network; "
        "default empty, so that DisconManager uses the controller's proc_name)",
    )
    p.add_argument(
        "--path",
        default=None,
        metavar="PATH",
        help="path= query for --server, the library as the server sees it; default libdiscon.so",
    )
    p.add_argument(
        "--client-version",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: original client (v1 frames, one dial, no file transfer); "
        "2: newer client (v2 frames, 5 dials, file transfer); default 2",
    )
    p.add_argument(
        "--infile",
        default="",
        metavar="PATH",
        help="accINFILE, the controller's input file (default: empty); with "
        "--client-version 2 it is sent to the server when it exists here",
    )
    p.add_argument(
        "--additional-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a file to send before the input file (repeatable), like "
        "DISCON_ADDITIONAL_FILES; client version 2 only",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        metavar="S",
        help=f"simulated seconds (default {DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--dt",
        type=float,
        default=DEFAULT_DT,
        metavar="S",
        help=f"controller time step (default {DEFAULT_DT:g} = 80 calls per simulated second)",
    )
    p.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="write one row per call: time, rotor speed, pitch command, torque "
        "demand, aviFAIL, avcMSG (when it changed)",
    )
    p.add_argument(
        "--call-timeout",
        type=float,
        default=None,
        metavar="S",
        help="network: give up when one DISCON reply takes longer (default 120)",
    )
    p.add_argument(
        "--set-record",
        metavar="N=VALUE[@T]",
        action="append",
        default=[],
        type=_record_override,
        help="send record N (1-based) as VALUE from simulated time T on (default 0), "
        "e.g. 119=666@1 to trigger test-discon's crash hook after 1 s; repeatable",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    return p


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fmt_us(us: float) -> str:
    return f"{us:.1f} us"


def _table(result: CheckResult, args: argparse.Namespace) -> str:
    s = result.summary()
    lat = s["latency_us"]
    rows: list[tuple[str, str]] = []
    if args.server:
        net = result.transport_stats
        rows.append(("server", str(net.get("url", args.server))))
        rows.append(
            (
                "client",
                f"version {args.client_version}, {net.get('dial_attempts', 0)} dial attempt(s)",
            )
        )
        for t in net.get("transfers", []):
            rows.append(("file sent", f"{t['local']} as {t['server_name']}"))
    else:
        rows.append(("library", f"{args.library} ({args.proc}, in process)"))
    rows += [
        ("calls made", f"{result.calls} ({args.duration:g} s at dt {args.dt:g} s)"),
        ("latency p50", _fmt_us(lat["p50"])),
        ("latency p99", _fmt_us(lat["p99"])),
        ("latency max", _fmt_us(lat["max"])),
        ("cold start", f"{result.cold_start_s * 1000:.1f} ms"),
        ("wall time", f"{result.wall_time_s:.2f} s"),
        (
            "regions visited",
            (", ".join(result.regions_visited) or "none")
            + " ("
            + ", ".join(f"{r}: {result.regions.get(r, 0)}" for r in REGIONS)
            + " calls)",
        ),
    ]
    if result.calls:
        rows.append(
            ("rotor speed", f"{result.rotor_speed_min:.4f} .. {result.rotor_speed_max:.4f} rad/s")
        )
    rows.append(("final aviFAIL", str(result.final_fail)))
    if result.warnings:
        rows.append(("warnings", f"{result.warnings} call(s) with aviFAIL > 0"))
    if result.csv_path:
        rows.append(("csv", str(result.csv_path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _network_warnings(result: CheckResult) -> list[str]:
    """Things the real client would have hidden; said out loud here."""
    net = result.transport_stats
    out = []
    if net.get("replies_not_copied"):
        out.append(
            f"warning: {net['replies_not_copied']} repl(ies) had other sizes than their "
            "request and were not copied back (the simulation went on with stale values, "
            "as with the real client)"
        )
    if net.get("stale_replies_dropped"):
        out.append(
            f"warning: the server answered {net['stale_replies_dropped']} file-transfer "
            "retr(ies) as well as the original; discon-check dropped the extra repl(ies), "
            "but a real discon-client would have run every later step one reply late"
        )
    return out


def _run(args: argparse.Namespace) -> CheckResult:
    config = RunConfig(
        infile=args.infile,
        duration=args.duration,
        dt=args.dt,
        csv_path=args.csv,
        set_records=tuple(args.set_record),
    )
    if args.library:
        return run_in_process(args.library, args.proc, config)
    from discon_manager.check.client import run_network_blocking

    options: dict[str, Any] = {}
    if args.call_timeout is not None:
        options["call_timeout"] = args.call_timeout
    return run_network_blocking(
        args.server,
        config,
        path=args.path if args.path is not None else "libdiscon.so",
        proc=args.proc,
        client_version=args.client_version,
        additional_files=args.additional_file,
        **options,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``discon-check``; returns the exit code (0, 1 or 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.proc is None:
        args.proc = "DISCON" if args.library else ""
    if args.server and "?" in args.server:
        print(
            f"discon-check: the query in '{args.server}' is dropped, as the real client drops "
            "it from DISCON_SERVER_ADDR; choose a controller with HOST:PORT/ID",
            file=sys.stderr,
        )
    if args.library and (args.path is not None or args.additional_file):
        parser.error(
            "--path and --additional-file are for --server; with --library pass the library itself"
        )
    if args.additional_file and args.client_version == 1:
        parser.error(
            "--additional-file needs --client-version 2 (the original client transfers no files)"
        )
    if not (args.dt > 0.0) or not (args.duration > 0.0):
        parser.error("--dt and --duration must be positive numbers of seconds")

    from discon_manager.controller.library import ControllerLoadError

    try:
        result = _run(args)
    except (CheckConnectionError, ControllerLoadError) as e:
        print(f"discon-check: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"discon-check: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("discon-check: interrupted", file=sys.stderr)
        return 130

    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(_table(result, args))
    for line in _network_warnings(result):
        print(f"discon-check: {line}", file=sys.stderr)
    if result.error is not None:
        t = result.error_time if result.error_time is not None else 0.0
        msg = _one_line(result.error) or "(no message)"
        print(f"controller error at t={t:g} s: {msg}", file=sys.stderr)
        return EXIT_CONTROLLER_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
