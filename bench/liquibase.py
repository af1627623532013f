"""Liquibase prepares (``prepare_kind: "lb"``) against bare Liquibase runs.

(a) Cold prepare of a 5-changeset formatted-SQL changelog on a fresh engine state dir
    (nothing cached): POST /v1/prepare-jobs → end of the events stream. The engine plans with
    one ``liquibase update-sql`` on a throw-away clone, then runs ``update-count --count=1``
    and snapshots once per changeset. Baseline, same run: five bare
    ``liquibase update-count --count=1`` calls against a plain, already running server (a fresh
    ``initdb`` + start per run, untimed). Goal <= 1.2x.
(b) Warm prepare of the same changelog (every changeset cached): POST → result event → a
    connection to the DSN is accepted; the instance is deleted afterwards (untimed). Baseline,
    same run: one bare ``liquibase update-sql`` on a plain running server. Goal <= 1.1x.

Liquibase runs as the engine runs it: as the ``postgres`` user, in the changelog's directory,
with ``JAVA_OPTS=-XX:TieredStopAtLevel=1 -XX:+UseSerialGC``, no banner, connection given in
``LIQUIBASE_COMMAND_URL`` / ``LIQUIBASE_COMMAND_USERNAME`` (the baseline server trusts TCP
clients, so no password). Where the engine's time goes is read from its job events: time from
each ``liquibase: exec`` to that run's last output line, the rest being the engine's own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    HOST_IMAGE,
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    PrepareOutcome,
    cleanup_engine,
    delete_instance,
    event_time,
    fmt_s,
    median,
    parse_options,
    print_goals,
    print_table,
    ratio,
    run_job,
    run_main,
    spawn_engine,
    stats_row,
    temp_dir,
)
from _pg import (
    SUPERUSER,
    Scratch,
    Server,
    as_server_user,
    check_connection,
    initdb,
    scratch,
    start_server,
)

LIQUIBASE = os.environ.get("SQLRS_LIQUIBASE", "/opt/sqlrs-test/liquibase/bin/liquibase")
JAVA_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"  #: what the engine sets
CHANGELOG = "changelog.sql"
CHANGESETS = (
    "create table accounts(id int primary key, owner text not null, balance numeric not null);",
    "insert into accounts select g, 'owner ' || g, g * 10 from generate_series(1, 1000) g;",
    "create index accounts_owner on accounts(owner);",
    "alter table accounts add column created timestamptz not null default now();",
    "create view rich as select id, owner from accounts where balance > 5000;",
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold-runs", type=int, default=None,
                        help="cold prepare repetitions (default 3, 1 with --quick)")


def write_changelog(directory: Path) -> Path:
    """The formatted-SQL changelog, readable by the ``postgres`` user."""
    lines = ["--liquibase formatted sql", ""]
    for index, sql in enumerate(CHANGESETS, 1):
        lines += [f"--changeset bench:{index}", sql, ""]
    path = directory / CHANGELOG
    path.write_text("\n".join(lines))
    path.chmod(0o644)
    return path


# --------------------------------------------------------------------------------------------
# the engine side
# --------------------------------------------------------------------------------------------


def lb_prepare(engine: Engine, changelog: Path, until_result: bool) -> PrepareOutcome:
    """POST an lb prepare job and follow its events; raise unless it succeeded."""
    body: JsonDict = {"prepare_kind": "lb", "image_id": HOST_IMAGE,
                      "liquibase_args": ["update", f"--changelog-file={changelog}"],
                      "liquibase_exec": LIQUIBASE, "work_dir": str(changelog.parent)}
    return run_job(engine, body, until_result)


def liquibase_seconds(events: list[JsonDict]) -> tuple[int, float]:
    """(Liquibase runs, their summed time from ``liquibase: exec`` to the run's last output
    line) read from the job's events."""
    runs, total = 0, 0.0
    for pos, event in enumerate(events):
        if not str(event.get("message", "")).startswith("liquibase: exec "):
            continue
        runs += 1
        last = event
        for later in events[pos + 1:]:
            message = str(later.get("message", ""))
            if not message.startswith("liquibase: ") or message.startswith("liquibase: exec ") \
                    or message.endswith("changesets in the plan"):
                break
            last = later
        total += event_time(last) - event_time(event)
    return runs, total


@dataclass
class EngineRun:
    seconds: float
    lb_runs: int
    lb_seconds: float


def engine_cold_once(work: Path, changelog: Path, index: int) -> tuple[EngineRun, Engine]:
    """A fresh engine state dir: POST → end of the events stream. The engine is returned."""
    engine = spawn_engine(work / f"engine-cold-{index}")
    try:
        started = time.perf_counter()
        outcome = lb_prepare(engine, changelog, until_result=False)
        elapsed = time.perf_counter() - started
        delete_instance(engine, outcome.instance_id)
    except BaseException:
        cleanup_engine(engine)
        raise
    cached = [e for e in outcome.events if e.get("type") == "task" and e.get("cached")]
    if cached:
        raise BenchError(f"cold prepare hit the cache: {cached}")
    return EngineRun(elapsed, *liquibase_seconds(outcome.events)), engine


def engine_warm_once(engine: Engine, changelog: Path) -> EngineRun:
    """POST → result event → DSN connect; the instance is deleted afterwards (untimed)."""
    started = time.perf_counter()
    outcome = lb_prepare(engine, changelog, until_result=True)
    check_connection(outcome.dsn)
    elapsed = time.perf_counter() - started
    delete_instance(engine, outcome.instance_id)
    status = engine.call("GET", f"/v1/prepare-jobs/{outcome.job_id}")
    uncached = [t["task_id"] for t in status.get("tasks", [])
                if t["type"] == "state_execute" and not t.get("cached")]
    if uncached:
        raise BenchError(f"warm prepare was not fully cached: {uncached}")
    return EngineRun(elapsed, *liquibase_seconds(outcome.events))


# --------------------------------------------------------------------------------------------
# the bare Liquibase baselines
# --------------------------------------------------------------------------------------------


def liquibase_env(server: Server) -> dict[str, str]:
    return {**os.environ, "JAVA_OPTS": JAVA_OPTS, "LIQUIBASE_SHOW_BANNER": "false",
            "LIQUIBASE_COMMAND_URL": f"jdbc:postgresql://127.0.0.1:{server.port}/postgres",
            "LIQUIBASE_COMMAND_USERNAME": SUPERUSER, "HOME": tempfile.gettempdir(),
            "USER": "postgres"}


def bare_liquibase(server: Server, changelog: Path, *args: str) -> float:
    """One Liquibase process to its exit, as the engine starts it; its wall time."""
    argv = [LIQUIBASE, *args, f"--changelog-file={changelog.name}"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=changelog.parent, env=liquibase_env(server),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                          **as_server_user())
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed: {proc.stdout[-1000:]}{proc.stderr[-1000:]}")
    return elapsed


def fresh_server(area: Scratch, name: str) -> Server:
    data = area.pg_dir(area.new_dir(name))
    initdb(data)
    return start_server(area, data)


def baseline_cold_once(area: Scratch, changelog: Path) -> list[float]:
    """Five ``update-count --count=1`` calls on a fresh running server (setup untimed)."""
    server = fresh_server(area, "lb-cold")
    try:
        return [bare_liquibase(server, changelog, "update-count", "--count=1")
                for _ in CHANGESETS]
    finally:
        server.stop()
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def report(cold: list[EngineRun], cold_base: list[list[float]], warm: list[EngineRun],
           warm_base: list[float]) -> list[Goal]:
    headers = ["measurement", "runs", "median", "min", "max", "vs baseline"]
    base_totals = [sum(calls) for calls in cold_base]
    base = median(base_totals)
    engine_cold = median([r.seconds for r in cold])
    print_table(f"(a) Cold prepare, {len(CHANGESETS)} changesets", headers, [
        stats_row("engine: cold lb prepare (POST -> stream end)", [r.seconds for r in cold],
                  base),
        stats_row(f"baseline: {len(CHANGESETS)} x bare update-count --count=1", base_totals,
                  None),
        stats_row("  one bare update-count --count=1",
                  [call for calls in cold_base for call in calls], None),
    ])
    print_table("Where the engine's cold time goes (job event timestamps, medians)",
                ["part", "median", "share"], parts(cold))
    engine_warm = median([r.seconds for r in warm])
    base_warm = median(warm_base)
    print_table("(b) Warm prepare, every changeset cached", headers, [
        stats_row("engine: warm lb prepare (POST -> result -> connect)",
                  [r.seconds for r in warm], base_warm),
        stats_row("baseline: one bare update-sql", warm_base, None),
    ])
    print_table("Where the engine's warm time goes (job event timestamps, medians)",
                ["part", "median", "share"], parts(warm))
    return [Goal("cold lb prepare / bare update-count calls", ratio(engine_cold, base), 1.2,
                 "x"),
            Goal("warm lb prepare / bare update-sql", ratio(engine_warm, base_warm), 1.1, "x")]


def parts(runs: list[EngineRun]) -> list[list[str]]:
    total = median([r.seconds for r in runs])
    lb = median([r.lb_seconds for r in runs])
    count = int(median([float(r.lb_runs) for r in runs]))
    return [[f"Liquibase ({count} runs, exec -> last output line)", fmt_s(lb),
             f"{100 * lb / total:.0f} %"],
            ["the rest (engine, JVM exits, HTTP)", fmt_s(total - lb),
             f"{100 * (total - lb) / total:.0f} %"]]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def bench(options: Options) -> None:
    if not os.access(LIQUIBASE, os.X_OK):
        raise BenchError(f"{LIQUIBASE} missing: run scripts/setup-liquibase.sh")
    cold_runs = options.extra.cold_runs or (1 if options.quick else 3)
    work = temp_dir("liquibase")
    lb_dir = Path(tempfile.mkdtemp(prefix="sqlrs-bench-lb-", dir="/tmp"))
    lb_dir.chmod(0o755)  # Liquibase runs as the postgres user
    engine: Engine | None = None
    try:
        changelog = write_changelog(lb_dir)
        with scratch() as area:
            print(f"cold: {cold_runs} runs each, interleaved (fresh engine state dir per run)",
                  flush=True)
            cold: list[EngineRun] = []
            cold_base: list[list[float]] = []
            for index in range(cold_runs):
                cold_base.append(baseline_cold_once(area, changelog))
                if engine is not None:
                    cleanup_engine(engine)
                run, engine = engine_cold_once(work, changelog, index)
                cold.append(run)
            assert engine is not None
            print(f"warm: {options.runs} runs each, interleaved (the last cold engine)",
                  flush=True)
            server = fresh_server(area, "lb-warm")
            warm: list[EngineRun] = []
            warm_base: list[float] = []
            for _ in range(options.runs):
                warm_base.append(bare_liquibase(server, changelog, "update-sql"))
                warm.append(engine_warm_once(engine, changelog))
            goals = report(cold, cold_base, warm, warm_base)
        print_goals(goals)
    finally:
        if engine is not None:
            cleanup_engine(engine)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(lb_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=5, quick_runs=3,
                                           add=add_flags)))
