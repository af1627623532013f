"""Engine start-up time and HTTP throughput.

1. Spawn → healthy (engine.json exists and ``GET /v1/health`` answers 200, polled every 2 ms)
   for ``python -m sqlrs_engine`` and for the zipapp ``dist/sqlrs-engine.pyz``, next to
   ``python -c pass`` measured in the same run. Goals: pyz / python -m <= 1.2, python -m
   <= 0.3 s, pyz <= 0.5 s.
2. ``GET /v1/instances`` from 16 concurrent keep-alive clients (req/s, p50, p99), against
   ``GET /v1/health`` in the same run as the baseline.

All interpreters are ``sys.executable`` (``python3`` on PATH may be a pyenv shim, a bash script
that would add its own start-up time to every row).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import (
    ROOT,
    BenchError,
    Client,
    Engine,
    Goal,
    Options,
    cleanup_engine,
    fmt_delta,
    fmt_s,
    fmt_x,
    launch_engine,
    median,
    parse_options,
    percentile,
    print_goals,
    print_table,
    ratio,
    run_main,
    spawn_engine,
    temp_dir,
    timed,
    wait_healthy,
)

CLIENTS = 16
LOAD_SECONDS = 3.0
QUICK_LOAD_SECONDS = 1.0


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pyz", type=Path, default=ROOT / "dist" / "sqlrs-engine.pyz",
                        help="zipapp to measure (built with build_zipapp.py when missing)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per client in the HTTP test (default: time-bound)")


def ensure_pyz(path: Path) -> Path:
    if path.exists():
        return path
    print(f"building {path} with build_zipapp.py ...", flush=True)
    subprocess.run([sys.executable, "build_zipapp.py"], cwd=ROOT, check=True)
    if not path.exists():
        raise BenchError(f"{path} still missing after build_zipapp.py")
    return path


# --------------------------------------------------------------------------------------------
# spawn → healthy
# --------------------------------------------------------------------------------------------


def engine_start_time(state_dir: Path, argv0: Sequence[str]) -> float:
    """Seconds from spawn until engine.json + /v1/health; the engine is stopped afterwards."""
    started = time.perf_counter()
    engine = launch_engine(state_dir, argv0)
    try:
        wait_healthy(engine)
        return time.perf_counter() - started
    finally:
        cleanup_engine(engine)


def process_time(argv: Sequence[str]) -> float:
    return timed(lambda: subprocess.run(list(argv), cwd=ROOT, check=True))


@dataclass
class Variant:
    label: str
    sample: Callable[[], float]
    samples: list[float]


def measure_startup(runs: int, pyz: Path, work: Path) -> dict[str, list[float]]:
    """Interleaved samples of every variant (one unrecorded warm-up round first)."""
    python = sys.executable
    variants = [
        Variant("python -c pass", lambda: process_time([python, "-c", "pass"]), []),
        Variant("python -c 'import sqlrs_engine'",
                lambda: process_time([python, "-c", "import sqlrs_engine"]), []),
        Variant("python -m sqlrs_engine",
                lambda: engine_start_time(work / "m", [python, "-m", "sqlrs_engine"]), []),
        Variant(f"python {pyz.name}",
                lambda: engine_start_time(work / "pyz", [python, str(pyz)]), []),
    ]
    for round_no in range(runs + 1):
        for variant in variants:
            value = variant.sample()
            if round_no:
                variant.samples.append(value)
    return {v.label: v.samples for v in variants}


def report_startup(samples: dict[str, list[float]], pyz_label: str) -> list[Goal]:
    base = median(samples["python -c pass"])
    rows = []
    for label, values in samples.items():
        rows.append([label, str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
                     fmt_s(max(values)), fmt_x(ratio(median(values), base))])
    print_table("Spawn -> healthy (engine.json + GET /v1/health 200, polled every 2 ms)",
                ["command", "runs", "median", "min", "max", "vs python -c pass"], rows)
    m_median = median(samples["python -m sqlrs_engine"])
    pyz_median = median(samples[pyz_label])
    print(f"pyz / python -m: {fmt_x(ratio(pyz_median, m_median))}; "
          f"engine minus bare interpreter start: python -m {fmt_delta(m_median - base)}, "
          f"pyz {fmt_delta(pyz_median - base)}")
    return [
        Goal("pyz / python -m start-up", ratio(pyz_median, m_median), 1.2, "x"),
        Goal("python -m spawn -> healthy", m_median, 0.3, "s"),
        Goal("pyz spawn -> healthy", pyz_median, 0.5, "s"),
    ]


# --------------------------------------------------------------------------------------------
# HTTP throughput
# --------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    path: str
    requests: int
    errors: int
    reconnects: int
    wall: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall > 0 else 0.0


def client_loop(engine: Engine, path: str, seconds: float, limit: int,
                barriers: tuple[threading.Barrier, threading.Barrier], out: list[LoadResult],
                connects: list[float]) -> None:
    """One client: one keep-alive connection, requests back to back until time or count."""
    connect_barrier, start = barriers
    client: Client = engine.client(timeout=30)
    latencies: list[float] = []
    errors = 0
    connect_barrier.wait()
    began = time.perf_counter()
    client.request("GET", "/v1/health", auth=False)  # connect (and warm up) before timing
    connects.append(time.perf_counter() - began)
    client.reconnects = 0
    start.wait()
    deadline = time.perf_counter() + seconds
    while len(latencies) + errors < limit if limit else time.perf_counter() < deadline:
        began = time.perf_counter()
        try:
            status = client.request("GET", path).status
        except OSError:
            status = 0
            client.close()
        if status == 200:
            latencies.append(time.perf_counter() - began)
        else:
            errors += 1
    client.close()
    out.append(LoadResult(path, len(latencies), errors, client.reconnects, 0.0,
                          latencies))


def run_load(engine: Engine, path: str, seconds: float, per_client: int,
             connects: list[float]) -> LoadResult:
    """``CLIENTS`` threads, each with one keep-alive connection, hammering ``path``.

    The connections are opened all at once before timing; their connect + first request
    latencies go to ``connects``.
    """
    barriers = (threading.Barrier(CLIENTS), threading.Barrier(CLIENTS + 1))
    parts: list[LoadResult] = []
    threads = [threading.Thread(target=client_loop,
                                args=(engine, path, seconds, per_client, barriers, parts,
                                      connects))
               for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    barriers[1].wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = [x for part in parts for x in part.latencies]
    return LoadResult(path, len(latencies), sum(p.errors for p in parts),
                      sum(p.reconnects for p in parts), wall, latencies)


def measure_load(work: Path, seconds: float, per_client: int) -> list[LoadResult]:
    """Health (baseline) and instances, alternating twice, on one engine; then the
    connection bursts (``CLIENTS`` connects at once, before each load) as a third result."""
    engine = spawn_engine(work / "load")
    connects: list[float] = []
    try:
        results = []
        for path in ("/v1/health", "/v1/instances") * 2:
            results.append(run_load(engine, path, seconds / 2, per_client // 2 or per_client,
                                    connects))
        merged = [merge_loads([r for r in results if r.path == p])
                  for p in ("/v1/health", "/v1/instances")]
        return [*merged, LoadResult("connect", len(connects), 0, 0, 0.0, connects)]
    finally:
        cleanup_engine(engine)


def merge_loads(parts: list[LoadResult]) -> LoadResult:
    return LoadResult(parts[0].path, sum(p.requests for p in parts), sum(p.errors for p in parts),
                      sum(p.reconnects for p in parts), sum(p.wall for p in parts),
                      [x for p in parts for x in p.latencies])


def report_load(results: list[LoadResult]) -> None:
    health, _instances, connects = results
    rows = []
    for res in results[:2]:
        rows.append([f"GET {res.path}", str(res.requests), str(res.errors), str(res.reconnects),
                     f"{res.rate:.0f}", fmt_s(percentile(res.latencies, 50)),
                     fmt_s(percentile(res.latencies, 99)),
                     fmt_x(ratio(res.rate, health.rate)),
                     fmt_x(ratio(percentile(res.latencies, 99), percentile(health.latencies, 99)))])
    rows.append([f"connect + first GET /v1/health, {CLIENTS} at once", str(connects.requests),
                 "0", "-", "-", fmt_s(percentile(connects.latencies, 50)),
                 fmt_s(percentile(connects.latencies, 99)), "-",
                 fmt_x(ratio(percentile(connects.latencies, 99),
                             percentile(health.latencies, 99)))])
    print_table(f"HTTP load: {CLIENTS} concurrent keep-alive clients (threads in this process; "
                "connections opened before timing)",
                ["request", "ok", "errors", "reconnects", "req/s", "p50", "p99",
                 "req/s vs health", "p99 vs health"], rows)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def bench(options: Options) -> None:
    pyz = ensure_pyz(Path(options.extra.pyz).resolve())
    work = temp_dir("startup")
    try:
        cache = "off (PYTHONDONTWRITEBYTECODE)" if sys.dont_write_bytecode else "on"
        print(f"start-up: {options.runs} runs per command (+1 warm-up), "
              f"interpreter {sys.executable}, bytecode cache {cache}", flush=True)
        samples = measure_startup(options.runs, pyz, work)
        goals = report_startup(samples, f"python {pyz.name}")
        seconds = QUICK_LOAD_SECONDS if options.quick else LOAD_SECONDS
        print(f"\nHTTP load: {CLIENTS} clients, {seconds:.0f} s per endpoint", flush=True)
        report_load(measure_load(work, seconds, int(options.extra.requests)))
        print_goals(goals)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=10, quick_runs=3,
                                           add=add_flags)))
