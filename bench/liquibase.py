"""Liquibase prepares (``prepare_kind: "lb"``) against bare Liquibase runs.

(a) Cold prepare of a 5-changeset formatted-SQL changelog (nothing of it cached):
    POST /v1/prepare-jobs → end of the events stream. The engine plans with one
    ``liquibase update-sql`` on a throw-away clone while it runs step 0's
    ``update-count --count=1`` on another (kept when it applied the plan's first changeset),
    then runs ``update-count --count=1`` and snapshots once per further changeset. Each run
    uses a fresh engine state dir whose first Liquibase job (a twin changelog by another
    author, reported on its own row) initialises the base cluster and records the JVM class
    archive that later runs map; the measured prepare is the store's second. Baseline, same
    run: five bare ``liquibase update-count --count=1`` calls against a plain, already running
    server (a fresh ``initdb`` + start per run, untimed). Goal <= 1.2x.
(b) Warm prepare of the same changelog (every changeset cached): POST → result event → a
    connection to the DSN is accepted; the instance is deleted afterwards (untimed). Baseline,
    same run: one bare ``liquibase update-sql`` on a plain running server. Goal <= 1.1x.

The bare runs are started as the engine starts Liquibase: as the ``postgres`` user, in the
changelog's directory, with the engine's JVM options
``JAVA_OPTS=-XX:TieredStopAtLevel=1 -XX:+UseSerialGC`` (not its class archive), no banner,
connection given in ``LIQUIBASE_COMMAND_URL`` / ``LIQUIBASE_COMMAND_USERNAME`` (the baseline
server trusts TCP clients, so no password). Liquibase with its default JVM options is slower
still; one such call is printed for reference. Where the engine's time goes is read from its
job events: from each ``liquibase: exec`` to that run's last output line (time with at least
one run going), the rest being the engine's own work.
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


def write_changelog(directory: Path, author: str = "bench") -> Path:
    """The formatted-SQL changelog, readable by the ``postgres`` user (another author makes
    other changesets, so other states)."""
    lines = ["--liquibase formatted sql", ""]
    for index, sql in enumerate(CHANGESETS, 1):
        lines += [f"--changeset {author}:{index}", sql, ""]
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


ENGINE_NOTES = ("changesets in the plan", "execute-0 ")  #: the engine's own liquibase: lines


def liquibase_runs(events: list[JsonDict]) -> list[tuple[float, float]]:
    """(start, end) of each Liquibase run read from the job's events: from its
    ``liquibase: exec`` line to its last output line. Step 0 run while Liquibase plans has
    its lines tagged ``liquibase: [execute-0] …``; an untagged run ends at the first line that
    is not Liquibase's."""
    runs: dict[str, list[list[float]]] = {}
    running: dict[str, bool] = {}
    for event in events:
        message = str(event.get("message", ""))
        if not message.startswith("liquibase: "):
            running[""] = False
            continue
        tag, rest = "", message[len("liquibase: "):]
        if rest.startswith("[") and "] " in rest:
            tag, rest = rest[1:].split("] ", 1)
        when = event_time(event)
        if rest.startswith("exec "):
            runs.setdefault(tag, []).append([when, when])
            running[tag] = True
        elif running.get(tag) and not rest.startswith(ENGINE_NOTES) \
                and not rest.endswith(ENGINE_NOTES[0]):
            runs[tag][-1][1] = when
    return sorted((start, end) for spans in runs.values() for start, end in spans)


def wall_time(spans: list[tuple[float, float]]) -> float:
    """Time covered by at least one span (runs made at once count once)."""
    total, reached = 0.0, float("-inf")
    for start, end in spans:
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


@dataclass
class EngineRun:
    seconds: float
    lb_spans: list[tuple[float, float]]

    @property
    def lb_seconds(self) -> float:
        return wall_time(self.lb_spans)


def engine_cold_once(work: Path, changelogs: tuple[Path, Path], index: int
                     ) -> tuple[EngineRun, EngineRun, Engine]:
    """A fresh engine state dir: POST → end of the events stream for a first changelog (the
    store's first Liquibase job: its JVM class archive is recorded then), then for the
    measured one (nothing of it cached either). The engine is returned."""
    engine = spawn_engine(work / f"engine-cold-{index}")
    try:
        first = cold_prepare(engine, changelogs[0])
        return first, cold_prepare(engine, changelogs[1]), engine
    except BaseException:
        cleanup_engine(engine)
        raise


def cold_prepare(engine: Engine, changelog: Path) -> EngineRun:
    started = time.perf_counter()
    outcome = lb_prepare(engine, changelog, until_result=False)
    elapsed = time.perf_counter() - started
    delete_instance(engine, outcome.instance_id)
    cached = [e for e in outcome.events if e.get("type") == "task" and e.get("cached")]
    if cached:
        raise BenchError(f"cold prepare hit the cache: {cached}")
    return EngineRun(elapsed, liquibase_runs(outcome.events))


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
    return EngineRun(elapsed, liquibase_runs(outcome.events))


# --------------------------------------------------------------------------------------------
# the bare Liquibase baselines
# --------------------------------------------------------------------------------------------


def liquibase_env(server: Server, java_opts: str = JAVA_OPTS) -> dict[str, str]:
    return {**os.environ, "JAVA_OPTS": java_opts, "LIQUIBASE_SHOW_BANNER": "false",
            "LIQUIBASE_COMMAND_URL": f"jdbc:postgresql://127.0.0.1:{server.port}/postgres",
            "LIQUIBASE_COMMAND_USERNAME": SUPERUSER, "HOME": tempfile.gettempdir(),
            "USER": "postgres"}


def bare_liquibase(server: Server, changelog: Path, *args: str,
                   java_opts: str = JAVA_OPTS) -> float:
    """One Liquibase process to its exit, as the engine starts it; its wall time."""
    argv = [LIQUIBASE, *args, f"--changelog-file={changelog.name}"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=changelog.parent, env=liquibase_env(server, java_opts),
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


def report(first: list[EngineRun], cold: list[EngineRun], cold_base: list[list[float]],
           warm: list[EngineRun], warm_bases: tuple[list[float], list[float]]) -> list[Goal]:
    warm_base, default_opts = warm_bases
    headers = ["measurement", "runs", "median", "min", "max", "vs baseline"]
    base_totals = [sum(calls) for calls in cold_base]
    base = median(base_totals)
    engine_cold = median([r.seconds for r in cold])
    print_table(f"(a) Cold prepare, {len(CHANGESETS)} changesets", headers, [
        stats_row("engine: cold lb prepare (POST -> stream end)", [r.seconds for r in cold],
                  base),
        stats_row("  the store's first lb job (base initdb, class archive recorded)",
                  [r.seconds for r in first], base),
        stats_row(f"baseline: {len(CHANGESETS)} x bare update-count --count=1", base_totals,
                  None),
        stats_row("  one bare update-count --count=1",
                  [call for calls in cold_base for call in calls], None),
    ])
    print_table("Where the engine's cold time goes (job event timestamps, medians)",
                ["part", "median", "share"], parts(cold))
    print_table("... and in the store's first lb job", ["part", "median", "share"],
                parts(first))
    engine_warm = median([r.seconds for r in warm])
    base_warm = median(warm_base)
    print_table("(b) Warm prepare, every changeset cached", headers, [
        stats_row("engine: warm lb prepare (POST -> result -> connect)",
                  [r.seconds for r in warm], base_warm),
        stats_row("baseline: one bare update-sql", warm_base, None),
        stats_row("  the same with Liquibase's default JVM options", default_opts, base_warm),
    ])
    print_table("Where the engine's warm time goes (job event timestamps, medians)",
                ["part", "median", "share"], parts(warm))
    return [Goal("cold lb prepare / bare update-count calls", ratio(engine_cold, base), 1.2,
                 "x"),
            Goal("warm lb prepare / bare update-sql", ratio(engine_warm, base_warm), 1.1, "x")]


def parts(runs: list[EngineRun]) -> list[list[str]]:
    total = median([r.seconds for r in runs])
    lb = median([r.lb_seconds for r in runs])
    summed = median([sum(end - start for start, end in r.lb_spans) for r in runs])
    count = int(median([float(len(r.lb_spans)) for r in runs]))
    return [[f"Liquibase ({count} runs, {fmt_s(summed)} summed; time with one running)",
             fmt_s(lb), f"{100 * lb / total:.0f} %"],
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
        other_dir = lb_dir / "other"
        other_dir.mkdir(mode=0o755)
        other = write_changelog(other_dir, "first")
        with scratch() as area:
            print(f"cold: {cold_runs} runs each, interleaved (fresh engine state dir per run)",
                  flush=True)
            first: list[EngineRun] = []
            cold: list[EngineRun] = []
            cold_base: list[list[float]] = []
            for index in range(cold_runs):
                cold_base.append(baseline_cold_once(area, changelog))
                if engine is not None:
                    cleanup_engine(engine)
                first_run, run, engine = engine_cold_once(work, (other, changelog), index)
                first.append(first_run)
                cold.append(run)
            assert engine is not None
            print(f"warm: {options.runs} runs each, interleaved (the last cold engine)",
                  flush=True)
            server = fresh_server(area, "lb-warm")
            warm: list[EngineRun] = []
            warm_base: list[float] = []
            default_opts: list[float] = []
            for _ in range(options.runs):
                warm_base.append(bare_liquibase(server, changelog, "update-sql"))
                default_opts.append(bare_liquibase(server, changelog, "update-sql",
                                                   java_opts=""))
                warm.append(engine_warm_once(engine, changelog))
            goals = report(first, cold, cold_base, warm, (warm_base, default_opts))
        print_goals(goals)
    finally:
        if engine is not None:
            cleanup_engine(engine)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(lb_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=5, quick_runs=3,
                                           add=add_flags)))
