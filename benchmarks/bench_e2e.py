#!/usr/bin/env python3
"""End to end with discon-check: in process, direct to a container, through the manager.

One table from one run (the issue): per-call p50/p99, cold start and wall
time of a closed-loop NREL 5-MW run (the nrel5mw controller, rigid plant,
``--duration`` simulated seconds at ``--dt``), for

* in process: build/controllers/libnrel5mw.so loaded by discon-check itself;
* direct: a discon-server-nrel5mw:latest container this script starts, dialled
  by its IP on discon-bench-net (the container is already running, so its cold
  start is connect + first call);
* manager: a real ``twistd disconmanager`` (tests.support.ManagerProcess), dialled
  as 127.0.0.1:PORT/nrel5mw, which starts a new container during the held
  handshake (so its cold start includes the container's);

each over the network for both wire versions: client version 1 (v1 frames, no
file transfer, accINFILE DISCON.IN: the image's own copy) and 2 (v2 frames,
tests/data/nrel5mw/DISCON.IN transferred first). Every run is its own
``discon-check --json --csv`` subprocess (its blocking network runner owns the
Twisted reactor, which runs once per process), one after the other. Every
row's CSV trajectory must be byte-identical to the in-process one.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_e2e.py [--duration 60] [--json PATH]

Containers (discon-controller-bench-*) and the network it makes are removed at
the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    PORT,
    ROOT,
    BenchDocker,
    bench_manager,
    host_info,
    print_table,
    wait_manager_containers,
    write_json,
)

IMAGE = "discon-server-nrel5mw:latest"
CONTROLLER = "nrel5mw"
LIBRARY = ROOT / "build" / "controllers" / "libnrel5mw.so"
INFILE = "tests/data/nrel5mw/DISCON.IN"  # relative to ROOT, where discon-check runs
IMAGE_INFILE = "DISCON.IN"  # the image's copy, in the server's working directory
PROC = "DISCON"


def build_library() -> None:
    out = LIBRARY.parent
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "tests" / "controllers"), f"OUT={out}"], check=True
    )


def discon_check(args: list[str], csv: Path, common: list[str]) -> dict[str, Any]:
    """One discon-check run in its own process; its JSON summary."""
    cmd = [sys.executable, "-m", "discon_manager.check.cli", *args, *common,
           "--csv", str(csv), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(
            f"discon-check exited with {p.returncode}: {' '.join(cmd)}\n{p.stderr.strip()}"
        )
    summary = json.loads(p.stdout)
    summary["stderr"] = p.stderr.strip()
    summary["argv"] = cmd[3:]
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds per run")
    ap.add_argument("--dt", type=float, default=0.0125, help="controller time step (s)")
    ap.add_argument("--csv-dir", type=Path, default=None,
                    help="keep the CSV trajectories here (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "e2e.json")
    args = ap.parse_args(argv)
    common = ["--duration", f"{args.duration:g}", "--dt", f"{args.dt:g}"]

    build_library()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="discon-e2e-") as tmp:
        csv_dir = args.csv_dir or Path(tmp)
        csv_dir.mkdir(parents=True, exist_ok=True)
        with BenchDocker() as bd, bench_manager() as mgr:
            host = host_info(bd.client)
            _, ip = bd.start_server(IMAGE, "direct-nrel5mw")
            runs: list[tuple[str, str, list[str]]] = [
                ("in-process", "-",
                 ["--library", str(LIBRARY), "--proc", PROC, "--infile", INFILE]),
            ]
            for version, infile in (("1", IMAGE_INFILE), ("2", INFILE)):
                runs.append(("direct", version,
                             ["--server", f"{ip}:{PORT}", "--path", LIBRARY.name, "--proc", PROC,
                              "--client-version", version, "--infile", infile]))
                runs.append(("manager", version,
                             ["--server", f"127.0.0.1:{mgr.port}/{CONTROLLER}",
                              "--client-version", version, "--infile", infile]))
            runs.sort(key=lambda r: ("in-process", "direct", "manager").index(r[0]))
            for path, version, cli in runs:
                name = f"{path}-v{version}" if version != "-" else path
                print(f"{name}: discon-check {args.duration:g} s ...", flush=True)
                csv = csv_dir / f"{name}.csv"
                summary = discon_check(cli, csv, common)
                if path == "manager":  # its container is removed after the session
                    summary["manager_containers_gone_s"] = wait_manager_containers(
                        bd.client, mgr.instance, 0
                    )
                rows.append({"path": path, "version": version, "csv_file": csv,
                             "summary": summary})
        reference = rows[0]["csv_file"].read_bytes()
        for r in rows:
            data = r["csv_file"].read_bytes()
            r["csv_identical"] = data == reference
            r["csv_bytes"] = len(data)
            r["csv_file"] = str(r["csv_file"]) if args.csv_dir else None

    table = []
    for r in rows:
        s = r["summary"]
        lat = s["latency_us"]
        table.append([
            r["path"],
            r["version"],
            f"{lat['p50']:.1f}",
            f"{lat['p99']:.1f}",
            f"{s['cold_start_s'] * 1000:.1f}",
            f"{s['wall_time_s']:.2f}",
            "reference" if r is rows[0] else ("identical" if r["csv_identical"] else "DIFFERS"),
        ])
    calls = rows[0]["summary"]["calls"]
    print(f"\nnrel5mw closed loop: {args.duration:g} s at dt {args.dt:g} s = {calls} calls per row"
          "\ndirect: container already running (cold start = connect + first call); "
          "manager: new container per run\n")
    print_table(["path", "version", "p50 us", "p99 us", "cold start ms", "wall s", "csv"], table)
    all_same = all(r["csv_identical"] for r in rows)
    if all_same:
        print(f"\nCSV trajectories: all {len(rows)} byte-identical to the in-process one "
              f"({rows[0]['csv_bytes']} bytes)")
    else:
        bad = [f"{r['path']} v{r['version']}" for r in rows if not r["csv_identical"]]
        print(f"\nCSV trajectories DIFFER from the in-process one: {', '.join(bad)}")
    for r in rows:
        if r["summary"].get("stderr"):
            print(f"note ({r['path']} v{r['version']}): {r['summary']['stderr']}")

    write_json(args.json, {
        "benchmark": "discon-check end to end: in process, direct, through the manager",
        "controller": CONTROLLER,
        "image": IMAGE,
        "duration_s": args.duration,
        "dt_s": args.dt,
        "calls_per_run": calls,
        "csv_all_identical": all_same,
        "rows": rows,
        "host": host,
    })
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
