"""Prepare jobs: a fully cached prepare, a cold prepare of a ~50 MB script, WAL segment size.

(a) Cached prepare (the state exists): POST /v1/prepare-jobs → result event → a psycopg2
    connection to the DSN is accepted. Baseline "floor", same run: overlay mount of the state's
    data dir + ``postgres`` start (``postmaster.pid`` line 8 == ready, polled every 2 ms) + one
    psycopg2 connect. Goals: median <= 0.1 s and <= 1.5x floor.
(b) Cold prepare of a generated ~50 MB script on a fresh engine state dir (nothing cached):
    POST → end of the events stream. Baseline, same run: initdb (the engine's options) + start
    + ``psql -X -v ON_ERROR_STOP=1 -f script`` + stop. Goal <= 1.3x baseline. Where the engine's
    time goes is read from the job's event timestamps.
(c) First single-row INSERT on an overlay clone, ``initdb --wal-segsize`` 16 vs 1: time from
    connect to commit, and the size of the upper layer after stop.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import (
    SMALL_SCRIPT,
    Goal,
    JsonDict,
    Options,
    PrepareOutcome,
    cleanup_engine,
    delete_instance,
    engine_session,
    event_time,
    fmt_delta,
    fmt_mb,
    fmt_s,
    fmt_x,
    get_state,
    median,
    parse_options,
    prepare,
    prepare_once,
    print_goals,
    print_table,
    ratio,
    run_main,
    spawn_engine,
    state_pgdata,
    stats_row,
    temp_dir,
    timed,
)
from _pg import (
    ENGINE_SETTINGS,
    Scratch,
    connect,
    dir_bytes,
    execute,
    initdb,
    mount_overlay,
    overlay_floor_once,
    run_psql,
    scratch,
    start_server,
)

COLD_MB = 50
QUICK_COLD_MB = 10
WAL_RUNS = 5
QUICK_WAL_RUNS = 2


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold-runs", type=int, default=None,
                        help="cold prepare repetitions (default 3, 1 with --quick)")
    parser.add_argument("--cold-mb", type=int, default=None,
                        help=f"size of the generated cold script (default {COLD_MB} MB, "
                             f"{QUICK_COLD_MB} with --quick)")


# --------------------------------------------------------------------------------------------
# (a) cached prepare vs the floor
# --------------------------------------------------------------------------------------------


def measure_cached(options: Options, area: Scratch, work: Path) -> list[Goal]:
    script = work / "small.sql"
    script.write_text(SMALL_SCRIPT)
    runtimes = work / "floor-runtimes"  # upper/work on the store's filesystem, like the engine
    runtimes.mkdir()
    samples: dict[str, list[float]] = {"engine": [], "floor": [], "floor-volatile": []}
    with engine_session(work / "engine-cached") as engine:
        first = prepare(engine, ["-f", str(script)])
        delete_instance(engine, first.instance_id)
        lower = state_pgdata(engine, first.state_id)
        size = int(get_state(engine, first.state_id).get("size_bytes") or 0)
        print(f"cached prepare: state {first.state_id[:12]} ({fmt_mb(size)}), "
              f"{options.runs} runs each, interleaved", flush=True)
        for _ in range(options.runs):
            samples["engine"].append(prepare_once(engine, ["-f", str(script)])[0])
            samples["floor"].append(overlay_floor_once(area, lower, runtimes, engine_like=False))
            samples["floor-volatile"].append(
                overlay_floor_once(area, lower, runtimes, engine_like=True))
    return report_cached(samples)


def report_cached(samples: dict[str, list[float]]) -> list[Goal]:
    labels = {
        "engine": "engine: cached prepare (POST -> DSN connect)",
        "floor": "floor: overlay mount + start + connect",
        "floor-volatile": "floor, engine options (volatile, engine -c settings)",
    }
    floor = median(samples["floor"])
    rows = [stats_row(labels[k], v, floor) for k, v in samples.items()]
    print_table("(a) Fully cached prepare vs floor", ["measurement", "runs", "median", "min",
                                                      "max", "vs floor"], rows)
    engine = median(samples["engine"])
    print(f"engine minus floor: {fmt_delta(engine - floor)}; minus engine-option floor: "
          f"{fmt_delta(engine - median(samples['floor-volatile']))}")
    return [Goal("cached prepare median", engine, 0.1, "s"),
            Goal("cached prepare / floor", ratio(engine, floor), 1.5, "x")]


# --------------------------------------------------------------------------------------------
# (b) cold prepare of a large script vs initdb + start + psql + stop
# --------------------------------------------------------------------------------------------


def write_cold_script(path: Path, megabytes: int) -> int:
    """``create table`` + ``copy ... from stdin`` rows (pg_dump style) totalling ``megabytes``."""
    target = megabytes * 1_000_000
    filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
    with open(path, "w", encoding="utf-8") as out:
        out.write("create table cold_data(id bigint primary key, n int not null, "
                  "label text not null, created timestamptz not null);\n"
                  "copy cold_data (id, n, label, created) from stdin;\n")
        written, row = 0, 0
        while written < target:
            lines = []
            for _ in range(10_000):
                row += 1
                lines.append(f"{row}\t{row * 7919 % 100_000}\t{filler} {row}\t"
                             f"2024-01-{row % 28 + 1:02d} 12:{row % 60:02d}:00+00\n")
            chunk = "".join(lines)
            out.write(chunk)
            written += len(chunk)
        out.write("\\.\n")
        out.write("create index cold_data_n on cold_data(n);\nanalyze cold_data;\n")
    return row


def baseline_cold_once(area: Scratch, script: Path) -> dict[str, float]:
    """initdb + start + psql -f script + stop (the engine's initdb options and settings)."""
    parent = area.new_dir("cold-base")
    data = area.pg_dir(parent)
    phases: dict[str, float] = {}
    began = time.perf_counter()
    phases["initdb"] = timed(lambda: initdb(data))
    started = time.perf_counter()
    server = start_server(area, data)
    phases["start (ready)"] = time.perf_counter() - started
    phases["psql script"] = timed(lambda: run_psql(server, script))
    phases["stop"] = timed(server.stop)
    phases["total"] = time.perf_counter() - began
    shutil.rmtree(parent, ignore_errors=True)
    return phases


@dataclass
class ColdRun:
    seconds: float
    outcome: PrepareOutcome
    state_bytes: int
    wal_bytes: int


def engine_cold_once(work: Path, script: Path, index: int) -> ColdRun:
    """A fresh engine state dir (nothing cached): POST → end of the events stream."""
    state_dir = work / f"engine-cold-{index}"
    engine = spawn_engine(state_dir)
    try:
        started = time.perf_counter()
        outcome = prepare(engine, ["-f", str(script)])
        elapsed = time.perf_counter() - started
        size = int(get_state(engine, outcome.state_id).get("size_bytes") or 0)
        wal = dir_bytes(state_pgdata(engine, outcome.state_id) / "pg_wal")[0]
        return ColdRun(elapsed, outcome, size, wal)
    finally:
        cleanup_engine(engine)
        shutil.rmtree(state_dir, ignore_errors=True)


MILESTONES: list[tuple[str, Callable[[JsonDict], bool]]] = [
    ("queued -> running", lambda e: e.get("status") == "queued"),
    ("plan (resolve image, hash script)", lambda e: e.get("status") == "running"),
    ("init base (initdb)", lambda e: "init base" in str(e.get("message"))),
    ("clone -> postgres ready", lambda e: "runtime cloned" in str(e.get("message"))),
    ("ready -> psql start", lambda e: "postgres ready" in str(e.get("message"))),
    ("psql script", lambda e: e.get("message") == "psql: start"),
    ("stop postgres", lambda e: "stop for snapshot" in str(e.get("message"))),
    ("snapshot (copy + fsync + publish)", lambda e: e.get("message") == "snapshot: start"),
    ("snapshot done -> instance start", lambda e: e.get("message") == "snapshot: complete"),
    ("instance: restart postgres", lambda e: e.get("task_id") == "prepare-instance"),
    ("register instance -> succeeded", lambda e: "instance created" in str(e.get("message"))),
    ("succeeded -> stream end (client)",
     lambda e: e.get("type") == "status" and e.get("status") == "succeeded"),
]


def breakdown(run: ColdRun) -> dict[str, float]:
    """Seconds between consecutive milestones, from the events' own timestamps."""
    events = run.outcome.events
    marks: list[tuple[str, float]] = [("POST -> queued", run.outcome.posted_wall)]
    start = 0
    for label, matches in MILESTONES:
        for pos in range(start, len(events)):
            if matches(events[pos]):
                marks.append((label, event_time(events[pos])))
                start = pos + 1
                break
    marks.append(("", run.outcome.ended_wall))
    return {label: following - at
            for (label, at), (_, following) in itertools.pairwise(marks)}


def measure_cold(options: Options, area: Scratch, work: Path) -> list[Goal]:
    megabytes = options.extra.cold_mb or (QUICK_COLD_MB if options.quick else COLD_MB)
    runs = options.extra.cold_runs or (1 if options.quick else 3)
    script = work / "cold.sql"
    rows = write_cold_script(script, megabytes)
    print(f"\ncold prepare: {script.stat().st_size / 1e6:.1f} MB script ({rows} rows via COPY), "
          f"{runs} runs each, interleaved", flush=True)
    engine_runs: list[ColdRun] = []
    base_runs: list[dict[str, float]] = []
    for index in range(runs):
        base_runs.append(baseline_cold_once(area, script))
        engine_runs.append(engine_cold_once(work, script, index))
    return report_cold(engine_runs, base_runs)


def report_cold(engine_runs: list[ColdRun], base_runs: list[dict[str, float]]) -> list[Goal]:
    engine_s = [r.seconds for r in engine_runs]
    base_s = [b["total"] for b in base_runs]
    base = median(base_s)
    rows = [stats_row("engine: cold prepare (POST -> stream end)", engine_s, base),
            stats_row("baseline: initdb + start + psql -f + stop", base_s, None)]
    print_table("(b) Cold prepare vs baseline", ["measurement", "runs", "median", "min", "max",
                                                 "vs baseline"], rows)
    print(f"published state: {fmt_mb(median([float(r.state_bytes) for r in engine_runs]))} "
          f"(size_bytes), of which pg_wal "
          f"{fmt_mb(median([float(r.wal_bytes) for r in engine_runs]))}")
    print_phases("Baseline phases", base_runs)
    print_phases("Where the engine's cold time goes (job event timestamps)",
                 [breakdown(run) for run in engine_runs])
    return [Goal("cold prepare / baseline", ratio(median(engine_s), base), 1.3, "x")]


def print_phases(title: str, phases: list[dict[str, float]]) -> None:
    labels = list(dict.fromkeys(label for p in phases for label in p))
    table = []
    for label in labels:
        values = [p.get(label, 0.0) for p in phases]
        table.append([label, *(fmt_s(v) for v in values), fmt_s(median(values))])
    print_table(title, ["phase", *(f"run {i + 1}" for i in range(len(phases))), "median"],
                table)


# --------------------------------------------------------------------------------------------
# (c) first insert on an overlay clone: WAL segment size 16 MB vs 1 MB
# --------------------------------------------------------------------------------------------

WAL_TABLE_SQL = (
    "create table t(id int primary key, v text)",
    "insert into t select g, repeat('v', 100) from generate_series(1, 10000) g",
    "checkpoint",
)


def wal_base(area: Scratch, segsize: int) -> Path:
    """A stopped cluster (engine options, given WAL segment size) holding a 10k-row table."""
    data = area.pg_dir(area.new_dir(f"wal{segsize}"))
    initdb(data, wal_segsize_mb=segsize)
    server = start_server(area, data, settings_for(segsize))
    execute(server.dsn(), *WAL_TABLE_SQL)
    server.stop()
    return data


@dataclass
class FirstInsert:
    start: float
    insert: float
    upper_du: int
    upper_apparent: int


def settings_for(wal_segsize_mb: int) -> tuple[str, ...]:
    """The engine's settings; min_wal_size must stay at least two segments."""
    floor = f"min_wal_size={2 * wal_segsize_mb}MB"
    return tuple(floor if s.startswith("min_wal_size=") else s for s in ENGINE_SETTINGS)


def first_insert_once(area: Scratch, lower: Path, runtime_parent: Path,
                      wal_segsize_mb: int) -> FirstInsert:
    """Overlay clone, start, one INSERT (connect → commit timed), stop; upper layer size."""
    runtime = runtime_parent / f"rt-{time.monotonic_ns()}"
    runtime.mkdir(mode=0o700)
    merged = area.new_dir("wal-clone") / "data"
    mounted = time.perf_counter()
    overlay = mount_overlay(lower, runtime, merged, volatile=True)
    try:
        server = start_server(area, merged, settings_for(wal_segsize_mb))
        started = time.perf_counter()
        conn = connect(server.dsn())
        with conn.cursor() as cur:
            cur.execute("insert into t values (-1, 'first')")
        conn.commit()
        committed = time.perf_counter()
        conn.close()
        server.stop()
        allocated, apparent = dir_bytes(overlay.upper)
    finally:
        overlay.unmount()
    shutil.rmtree(runtime, ignore_errors=True)
    return FirstInsert(started - mounted, committed - started, allocated, apparent)


def measure_wal(options: Options, area: Scratch, work: Path) -> None:
    runs = WAL_RUNS if not options.quick else QUICK_WAL_RUNS
    runtimes = work / "wal-runtimes"
    runtimes.mkdir()
    bases = {seg: wal_base(area, seg) for seg in (16, 1)}
    samples: dict[int, list[FirstInsert]] = {16: [], 1: []}
    for _ in range(runs):
        for seg, lower in bases.items():
            samples[seg].append(first_insert_once(area, lower, runtimes, seg))
    rows = []
    first16 = median([s.insert for s in samples[16]])
    for seg, values in samples.items():
        first = median([s.insert for s in values])
        rows.append([f"--wal-segsize={seg}", str(len(values)),
                     fmt_s(median([s.start for s in values])), fmt_s(first),
                     fmt_x(ratio(first, first16)),
                     fmt_mb(median([float(s.upper_du) for s in values])),
                     fmt_mb(median([float(s.upper_apparent) for s in values]))])
    print_table("(c) First single-row INSERT on an overlay clone (volatile, engine settings)",
                ["initdb", "runs", "mount->ready", "connect->commit", "insert vs 16 MB",
                 "upper after stop (du)", "(du -b)"], rows)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def bench(options: Options) -> None:
    work = temp_dir("prepare")
    try:
        with scratch() as area:
            goals = measure_cached(options, area, work)
            goals += measure_cold(options, area, work)
            print(f"\nWAL segment size: {WAL_RUNS if not options.quick else QUICK_WAL_RUNS} "
                  "runs each", flush=True)
            measure_wal(options, area, work)
        print_goals(goals)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=10, quick_runs=3,
                                           add=add_flags)))
