"""Branching a running instance: online snapshots under write load, and resets in place.

Host runtime (``host:15``), as root, the warm pool off (``instances.warmPool.maxTotal`` 0, the
pool emptied first) so that nothing starts in the background. Two states are built by prepares
of ``create table big as select g as id, repeat('x', 900) as pad from generate_series(1, N) g``
plus ``vacuum (freeze, analyze) big`` (so that no instance rewrites the table, hint bits or a
vacuum of its own, which would copy its 1 GB segment files up into the instance's overlay):
~10 MB (10,000 rows) and ~1 GB (1,000,000 rows; ``--quick``: ~200 MB).

(1) Snapshot under load. Each sample is a fresh instance of the state that gets ~10 MB of
    changes (``create table changes`` of 10,000 rows of 900 bytes, untimed; the ``du`` of its
    overlay upper directory is printed), then ``pgbench -n -c 2 -T <s>`` with a small custom
    script (an update and an insert a transaction) against the instance's DSN, started before
    and ending after the timed part; every pgbench run must exit 0 with no failed transaction.
    Timed: ``POST /v1/instances/{id}/snapshot`` until its answer. The floor, on another such
    instance under the same load: the same work by hand in one psycopg2 session,
    ``SELECT pg_backup_start('x', true)``, ``cp -a`` of the instance's upper directory
    (``<state-store>/instances/<id>/upper``) into a scratch directory on the store's
    filesystem, ``SELECT * FROM pg_backup_stop(false)``, timed from the start call to the stop's
    answer. Afterwards (untimed, for the breakdown) the rest of what the engine does is timed by
    hand as well: ``cp -a`` of ``pg_wal`` again and a ``syncfs`` of the copy. The first snapshot
    of each state is checked: an instance of it holds the changes and pgbench's table.
    Goals: median <= 0.25 s and <= 1.5x the floor on the ~1 GB state; ~1 GB / ~10 MB <= 1.3x.
(2) Reset in place, on the ~10 MB state: ``POST /v1/instances/{id}/reset`` until its answer
    (the instance had a table created since, which must be gone; ``select 1`` on the same DSN
    must work, also timed as a second row), against ``POST /v1/instances`` with the pool off
    until its answer (its ``select 1`` likewise). Goals: reset median <= 50 ms and <= 0.6x the
    new instance. The instance's server log splits each reset into phases, by kind: in place
    (its postmaster stays and restarts its processes on the new data: every reset after the
    first) or with a new server (the first, which makes the instance's seed of the state).

The resets are measured first, on a machine not yet loaded by the snapshots' pgbench runs.
Snapshot states are deleted after their sample; everything runs on a throw-away engine that is
cleaned up at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    PG_BIN,
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    create_instance,
    delete_instance,
    engine_session,
    fmt_mb,
    fmt_s,
    fmt_x,
    get_state,
    median,
    parse_options,
    prepare,
    print_goals,
    print_table,
    ratio,
    run_main,
    stats_row,
    temp_dir,
)
from _pg import Connection, connect, dir_bytes, execute

MAX_TOTAL = "instances.warmPool.maxTotal"
POOL_DEADLINE_S = 120.0
PAD = 900  # bytes of padding a row: 8 rows per 8 kB page, ~1 kB of heap a row
SMALL_ROWS = 10_000  # ~10 MB
BIG_ROWS = 1_000_000  # ~1 GB
QUICK_BIG_ROWS = 200_000  # ~200 MB
CHANGE_ROWS = 10_000  # ~10 MB of changes on an instance
PGBENCH = f"{PG_BIN}/pgbench"
PGBENCH_CLIENTS = 2
PGBENCH_SECONDS = 5
PGBENCH_WARM_S = 0.5  # pgbench writes this long before the timed part starts
PGBENCH_ROWS = 100
PGBENCH_SCRIPT = (
    f"\\set id random(1, {PGBENCH_ROWS})\n"
    "update bench_counter set n = n + 1 where id = :id;\n"
    "insert into bench_log(id, at) values (:id, now());\n"
)
CHANGES_SQL = (
    f"create table changes as select g as id, repeat('y', {PAD}) as pad"
    f" from generate_series(1, {CHANGE_ROWS}) g",
    "create table bench_counter(id int primary key, n bigint not null default 0)",
    f"insert into bench_counter(id) select g from generate_series(1, {PGBENCH_ROWS}) g",
    "create table bench_log(id int not null, at timestamptz not null)",
)
FLOOR_PHASES = ("pg_backup_start (checkpoint)", "cp -a upper", "pg_backup_stop")
EXTRA_PHASES = ("cp -a pg_wal again", "syncfs of the copy")
#: a line of an instance's server log (the default log_line_prefix '%m [%p] ')
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC \[\d+\] \w+:  (.*)$")
CHECKPOINT_MARKS = ("checkpoint starting:", "checkpoint complete:")
SNAPSHOT_PHASES = ("POST -> checkpoint starts", "checkpoint", "checkpoint done -> answer")
#: the log lines of each kind of reset, and the phases between them: in place (the postmaster
#: stays, its processes restart on the new data) or with a new server (the first reset to a
#: state, which makes its seed, and any that cannot be made in place)
RESET_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "in place": (
        (r".* was terminated by signal 9", "all server processes terminated; reinitializing",
         "database system was shut down", "database system is ready to accept connections"),
        ("POST -> processes killed", "killed -> shared memory anew",
         "shared memory -> startup process", "startup -> ready", "ready -> answer")),
    "new server": (
        ("received .*shutdown request", "database system is shut down", "starting PostgreSQL",
         "database system is ready to accept connections"),
        ("POST -> shutdown request", "shutdown", "shut down -> postgres starts",
         "postgres start -> ready", "ready -> answer")),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--big-rows", type=int, default=None,
                        help=f"rows of the big state (default {BIG_ROWS}, ~1 GB; "
                             f"{QUICK_BIG_ROWS} with --quick)")
    parser.add_argument("--pgbench-seconds", type=int, default=PGBENCH_SECONDS,
                        help=f"pgbench -T of each snapshot sample (default {PGBENCH_SECONDS}); "
                             "it must outlast the snapshot")
    parser.add_argument("--resets-only", action="store_true",
                        help="measure only the resets (no big state, no snapshots)")


# --------------------------------------------------------------------------------------------
# states, instances, the pool
# --------------------------------------------------------------------------------------------


@dataclass
class BuiltState:
    label: str
    state_id: str
    size_bytes: int
    table_bytes: int


def pool_off(engine: Engine) -> None:
    """``maxTotal`` 0, then until the pool holds nothing."""
    engine.call("PATCH", "/v1/config", {"path": MAX_TOTAL, "value": 0})
    deadline = time.monotonic() + POOL_DEADLINE_S
    while engine.call("GET", "/v1/pool")["entries"]:
        if time.monotonic() > deadline:
            raise BenchError(f"warm pool not empty within {POOL_DEADLINE_S:.0f}s")
        time.sleep(0.02)


def query_one(dsn: str, sql: str) -> object:
    """The first column of the first row of ``sql`` on a new connection to ``dsn``."""
    conn = connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone() if cur.description else None
    finally:
        conn.close()
    return row[0] if row else None


def select_one(dsn: str) -> None:
    if query_one(dsn, "select 1") != 1:
        raise BenchError(f"select 1 on {dsn} did not answer 1")


def build_state(engine: Engine, label: str, rows: int) -> BuiltState:
    """A prepare that fills ``big`` with ``rows`` rows and vacuums it; its instance is
    deleted."""
    started = time.perf_counter()
    outcome = prepare(engine, [
        "-c", f"create table big as select g as id, repeat('x', {PAD}) as pad"
              f" from generate_series(1, {rows}) g",
        "-c", "vacuum (freeze, analyze) big"])
    built = time.perf_counter() - started
    table = int(str(query_one(outcome.dsn, "select pg_total_relation_size('big')")))
    delete_instance(engine, outcome.instance_id)
    size = int(get_state(engine, outcome.state_id).get("size_bytes") or 0)
    state = BuiltState(label, outcome.state_id, size, table)
    print(f"built {label}: table big {fmt_mb(table)} (pg_total_relation_size), state "
          f"size_bytes {fmt_mb(size)}, prepare took {fmt_s(built)}", flush=True)
    return state


def upper_dir(engine: Engine, instance_id: str) -> Path:
    path = engine.store / "instances" / instance_id / "upper"
    if not path.is_dir():
        raise BenchError(f"no overlay upper directory {path} (not an overlay instance?)")
    return path


def server_log(engine: Engine, instance_id: str) -> list[tuple[float, str]]:
    """(seconds since the epoch, message) of each line of an instance's server log."""
    log_path = engine.store / "instances" / instance_id / "postgres.log"
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found:
            at = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
            events.append((at.timestamp(), found.group(2)))
    return events


def log_phases(events: Sequence[tuple[float, str]], started: float, ended: float,
               marks: Sequence[str]) -> list[float] | None:
    """Seconds from ``started`` (wall clock) to the first log line matching ``marks[0]``, from
    there to the next matching ``marks[1]``, … and from the last to ``ended``; None unless all
    are found in between (the log has milliseconds: 1 ms of slack)."""
    times = [started]
    pending = list(marks)
    for at, message in events:
        if pending and started - 0.001 <= at <= ended + 0.001 and at >= times[-1] - 0.001 \
                and re.match(pending[0], message):
            times.append(at)
            pending.pop(0)
    if pending:
        return None
    times.append(ended)
    return [max(0.0, after - before) for before, after in itertools.pairwise(times)]


def add_phases(into: dict[str, list[float]], names: Sequence[str],
               values: Sequence[float] | None) -> None:
    for name, value in zip(names, values or (), strict=False):
        into.setdefault(name, []).append(value)


# --------------------------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------------------------


@dataclass
class Pgbench:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self, seconds: int) -> tuple[int, str | None]:
        """Wait for the end; (transactions processed, what was wrong or None)."""
        try:
            code = self.proc.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return 0, "pgbench did not end"
        text = self.output()
        done = re.search(r"number of transactions actually processed: (\d+)", text)
        failed = re.search(r"number of failed transactions: (\d+)", text)
        processed = int(done.group(1)) if done else 0
        if code != 0:
            return processed, f"pgbench exited {code}: {text.strip()[-300:]}"
        if failed and int(failed.group(1)) > 0:
            return processed, f"pgbench: {failed.group(0)}"
        errors = [line for line in text.splitlines() if re.search(r"error|abort", line, re.I)]
        if errors:
            return processed, f"pgbench: {errors[0][:300]}"
        if not done or processed == 0:
            return processed, "pgbench processed no transaction"
        return processed, None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_pgbench(dsn: str, work: Path, seconds: int) -> Pgbench:
    """``pgbench -n -c 2 -T seconds`` with PGBENCH_SCRIPT, until all its clients are connected
    and have written for PGBENCH_WARM_S."""
    script = work / "pgbench.sql"
    if not script.exists():
        script.write_text(PGBENCH_SCRIPT)
    log_path = work / f"pgbench-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([PGBENCH, "-n", "-c", str(PGBENCH_CLIENTS), "-T", str(seconds),
                                 "-f", str(script), dsn], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, cwd=work)
    bench = Pgbench(proc, log_path)
    deadline = time.monotonic() + 30
    sql = "select count(*) from pg_stat_activity where application_name = 'pgbench'"
    while int(str(query_one(dsn, sql))) < PGBENCH_CLIENTS:
        if proc.poll() is not None or time.monotonic() > deadline:
            bench.stop()
            raise BenchError(f"pgbench did not get going: {bench.output()[-500:]}")
        time.sleep(0.01)
    time.sleep(PGBENCH_WARM_S)
    return bench


# --------------------------------------------------------------------------------------------
# (1) snapshot samples
# --------------------------------------------------------------------------------------------


@dataclass
class Busy:
    """A fresh instance with ~10 MB of changes and pgbench writing to it."""

    instance_id: str
    dsn: str
    upper: Path
    upper_bytes: int
    bench: Pgbench


@dataclass
class SnapshotRuns:
    """Samples of one state: the engine's and the floor's, and what came along."""

    engine_s: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    upper_bytes: list[int] = field(default_factory=list)
    snapshot_bytes: list[int] = field(default_factory=list)
    engine_phases: dict[str, list[float]] = field(default_factory=dict)
    checkpoint_floor: list[float] = field(default_factory=list)
    transactions: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verified: str = ""


@contextlib.contextmanager
def busy_instance(engine: Engine, state: BuiltState, work: Path, seconds: int,
                  runs: SnapshotRuns) -> Iterator[Busy]:
    """Yields while pgbench writes; afterwards pgbench must still be running, then end well.
    The instance is deleted at the end."""
    entry = create_instance(engine, state.state_id)
    instance_id, dsn = str(entry["instance_id"]), str(entry["dsn"])
    bench: Pgbench | None = None
    try:
        execute(dsn, *CHANGES_SQL)
        upper = upper_dir(engine, instance_id)
        busy_bytes = dir_bytes(upper)[0]
        runs.upper_bytes.append(busy_bytes)
        bench = start_pgbench(dsn, work, seconds)
        yield Busy(instance_id, dsn, upper, busy_bytes, bench)
        if bench.proc.poll() is not None:
            runs.problems.append("pgbench ended before the snapshot did "
                                 "(raise --pgbench-seconds)")
        processed, problem = bench.finish(seconds)
        runs.transactions.append(processed)
        if problem:
            runs.problems.append(problem)
    finally:
        if bench is not None:
            bench.stop()
        delete_instance(engine, instance_id)


def verify_snapshot(engine: Engine, state_id: str) -> str:
    """An instance of the snapshot: the changes and pgbench's counter table are there."""
    entry = create_instance(engine, state_id)
    try:
        dsn = str(entry["dsn"])
        changes = int(str(query_one(dsn, "select count(*) from changes")))
        counted = int(str(query_one(dsn, "select coalesce(sum(n), 0) from bench_counter")))
    finally:
        delete_instance(engine, str(entry["instance_id"]))
    if changes != CHANGE_ROWS:
        raise BenchError(f"snapshot {state_id[:12]} holds {changes} rows of changes, "
                         f"not {CHANGE_ROWS}")
    return f"an instance of it has the {changes} changed rows and {counted} pgbench updates"


def engine_sample(engine: Engine, state: BuiltState, work: Path, seconds: int,
                  runs: SnapshotRuns) -> None:
    """POST .../snapshot under pgbench; the new state is checked (first time) and deleted."""
    with busy_instance(engine, state, work, seconds, runs) as busy:
        wall = time.time()
        started = time.perf_counter()
        made: JsonDict = engine.call("POST", f"/v1/instances/{busy.instance_id}/snapshot",
                                     None, expect=201)
        runs.engine_s.append(time.perf_counter() - started)
        add_phases(runs.engine_phases, SNAPSHOT_PHASES,
                   log_phases(server_log(engine, busy.instance_id), wall,
                              wall + runs.engine_s[-1], CHECKPOINT_MARKS))
    state_id = str(made["state_id"])
    runs.snapshot_bytes.append(int(made.get("size_bytes") or 0))
    if not runs.verified:
        runs.verified = verify_snapshot(engine, state_id)
    engine.call("DELETE", f"/v1/states/{state_id}")


def copy_live(source: Path, dest: Path) -> None:
    """``cp -a`` of a tree a running server changes: only files that vanished may fail."""
    proc = subprocess.run(["cp", "-a", "--", str(source), str(dest)], capture_output=True,
                          text=True, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if line.strip() and "No such file or directory" not in line]
    if proc.returncode != 0 and (problems or not proc.stderr.strip()):
        raise BenchError(f"cp -a {source} {dest}: {(problems or [proc.stderr])[0].strip()}")


def backup_by_hand(conn: Connection, upper: Path, dest: Path) -> list[float]:
    """pg_backup_start, cp -a of the upper directory, pg_backup_stop: seconds of each."""
    marks = [time.perf_counter()]
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backup_start('x', true)")
        cur.fetchone()
        marks.append(time.perf_counter())
        copy_live(upper, dest)
        marks.append(time.perf_counter())
        cur.execute("SELECT * FROM pg_backup_stop(false)")
        cur.fetchone()
        marks.append(time.perf_counter())
    return [after - before for before, after in itertools.pairwise(marks)]


def floor_sample(engine: Engine, state: BuiltState, work: Path, seconds: int,
                 runs: SnapshotRuns) -> None:
    """The floor under pgbench, then (untimed for it) the engine's remaining steps by hand."""
    target = work / f"floor-{time.monotonic_ns()}"
    target.mkdir()
    try:
        with busy_instance(engine, state, work, seconds, runs) as busy:
            conn = connect(busy.dsn)
            try:
                conn.autocommit = True
                wall = time.time()
                phases = backup_by_hand(conn, busy.upper, target / "layer")
            finally:
                conn.close()
            wal = time.perf_counter()
            if (busy.upper / "pg_wal").is_dir():
                copy_live(busy.upper / "pg_wal", target / "pg_wal-again")
            synced = time.perf_counter()
            subprocess.run(["sync", "-f", str(target)], check=True)
            phases += [synced - wal, time.perf_counter() - synced]
            checkpoint = log_phases(server_log(engine, busy.instance_id), wall,
                                    wall + sum(phases[:len(FLOOR_PHASES)]), CHECKPOINT_MARKS)
        runs.floor_s.append(sum(phases[:len(FLOOR_PHASES)]))
        for name, value in zip(FLOOR_PHASES + EXTRA_PHASES, phases, strict=True):
            runs.phases.setdefault(name, []).append(value)
        if checkpoint is not None:
            runs.checkpoint_floor.append(checkpoint[1])
    finally:
        shutil.rmtree(target, ignore_errors=True)


def measure_snapshots(engine: Engine, states: Sequence[BuiltState], work: Path, seconds: int,
                      runs_per_state: int) -> dict[str, SnapshotRuns]:
    """Engine snapshots and the floor by hand, interleaved (the order alternates per run)."""
    print(f"snapshots: {runs_per_state} runs per state and method, interleaved, "
          f"pgbench -c {PGBENCH_CLIENTS} -T {seconds} each; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = {s.label: SnapshotRuns() for s in states}
    for index in range(runs_per_state):
        for state in states:
            order = (engine_sample, floor_sample) if index % 2 == 0 else \
                (floor_sample, engine_sample)
            for sample in order:
                sample(engine, state, work, seconds, results[state.label])
    return results


def report_snapshots(states: Sequence[BuiltState], results: dict[str, SnapshotRuns],
                     server_s: list[float]) -> None:
    rows = []
    for state in states:
        runs = results[state.label]
        floor = median(runs.floor_s)
        upper = fmt_mb(median([float(b) for b in runs.upper_bytes]))
        rows.append([*stats_row(f"engine: POST snapshot, {state.label} state", runs.engine_s,
                                floor), upper])
        rows.append([*stats_row(f"floor: by hand, {state.label} state", runs.floor_s, None),
                     upper])
    print_table("(1) Snapshot of an instance with ~10 MB of changes while pgbench writes "
                "(a fresh instance each)",
                ["measurement", "runs", "median", "min", "max", "vs floor", "upper du"], rows)
    phase_rows = [[name, *(fmt_s(median(results[s.label].phases[name])) for s in states)]
                  for name in FLOOR_PHASES + EXTRA_PHASES]
    phase_rows.append(["floor + the engine's extra steps (sum of medians)",
                       *(fmt_s(sum(median(results[s.label].phases[name])
                                   for name in FLOOR_PHASES + EXTRA_PHASES))
                         for s in states)])
    phase_rows.append(["by hand: its checkpoint (server log)",
                       *(fmt_s(median(results[s.label].checkpoint_floor))
                         if results[s.label].checkpoint_floor else "-" for s in states)])
    for name in SNAPSHOT_PHASES:
        values = [results[s.label].engine_phases.get(name) for s in states]
        phase_rows.append([f"engine: {name} (server log)",
                           *(fmt_s(median(v)) if v else "-" for v in values)])
    phase_rows.append(["engine: snapshot state size_bytes",
                       *(fmt_mb(median([float(b) for b in results[s.label].snapshot_bytes]))
                         for s in states)])
    print_table("Where a snapshot's time goes (medians; the rows below the floor's three are "
                "the engine's remaining steps, by hand)",
                ["phase", *(f"{s.label} state" for s in states)], phase_rows)
    if server_s:
        print(f"engine.log: POST snapshot handled in {fmt_s(median(server_s))} (median of "
              f"{len(server_s)}, server side)")
    for state in states:
        runs = results[state.label]
        print(f"{state.label} state: pgbench runs {len(runs.transactions)}, transactions "
              f"median {median([float(t) for t in runs.transactions]):.0f} per run, "
              f"problems {len(runs.problems)}; first snapshot checked: {runs.verified}")
        for problem in runs.problems[:3]:
            print(f"  problem: {problem}")


# --------------------------------------------------------------------------------------------
# (2) resets
# --------------------------------------------------------------------------------------------


@dataclass
class ResetRuns:
    reset_s: list[float] = field(default_factory=list)
    reset_ready_s: list[float] = field(default_factory=list)
    create_s: list[float] = field(default_factory=list)
    create_ready_s: list[float] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  #: wall clock of resets
    #: kind of reset -> phase -> seconds
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def create_sample(engine: Engine, state_id: str, runs: ResetRuns) -> None:
    started = time.perf_counter()
    entry = create_instance(engine, state_id)
    runs.create_s.append(time.perf_counter() - started)
    select_one(str(entry["dsn"]))
    runs.create_ready_s.append(time.perf_counter() - started)
    delete_instance(engine, str(entry["instance_id"]))


def reset_sample(engine: Engine, instance_id: str, dsn: str, runs: ResetRuns) -> None:
    """A table is created (untimed), then the reset must take it away."""
    query_one(dsn, "create table since_reset as select 1 as x")
    wall = time.time()
    started = time.perf_counter()
    answer = engine.call("POST", f"/v1/instances/{instance_id}/reset", None)
    runs.reset_s.append(time.perf_counter() - started)
    runs.windows.append((wall, wall + runs.reset_s[-1]))
    select_one(dsn)
    runs.reset_ready_s.append(time.perf_counter() - started)
    if answer.get("dsn") != dsn:
        runs.problems.append(f"reset answered another DSN: {answer.get('dsn')}")
    if query_one(dsn, "select to_regclass('since_reset') is null") is not True:
        runs.problems.append("the table created after the state survived the reset")


def measure_resets(engine: Engine, state: BuiltState, count: int) -> ResetRuns:
    runs = ResetRuns()
    entry = create_instance(engine, state.state_id)
    instance_id, dsn = str(entry["instance_id"]), str(entry["dsn"])
    try:
        select_one(dsn)
        for _ in range(count):
            create_sample(engine, state.state_id, runs)
            reset_sample(engine, instance_id, dsn, runs)
        events = server_log(engine, instance_id)
        for started, ended in runs.windows:
            for kind, (marks, names) in RESET_KINDS.items():
                found = log_phases(events, started, ended, marks)
                if found:
                    add_phases(runs.phases.setdefault(kind, {}), names, found)
                    break
    finally:
        delete_instance(engine, instance_id)
    return runs


def report_resets(state: BuiltState, runs: ResetRuns, server_s: list[float]) -> None:
    create = median(runs.create_s)
    rows = [stats_row("engine: POST reset, until the answer", runs.reset_s, create),
            stats_row("engine: POST reset, until select 1 works", runs.reset_ready_s, create),
            stats_row("engine: POST /v1/instances, pool off, until the answer", runs.create_s,
                      None),
            stats_row("engine: POST /v1/instances, pool off, until select 1 works",
                      runs.create_ready_s, create)]
    print_table(f"(2) Reset in place vs a new instance, {state.label} state",
                ["measurement", "runs", "median", "min", "max", "vs new instance"], rows)
    for kind, phases in runs.phases.items():
        print_table(f"Where a reset's time goes, {kind} (the instance's server log, ms"
                    " resolution)", ["phase", "runs", "median", "min", "max"],
                    [[name, str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
                      fmt_s(max(values))] for name, values in phases.items()])
    if server_s:
        print(f"engine.log: POST reset handled in {fmt_s(median(server_s))} (median of "
              f"{len(server_s)}, server side)")
    print(f"reset problems: {len(runs.problems)}")
    for problem in runs.problems[:3]:
        print(f"  problem: {problem}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def served_in(engine: Engine, suffix: str) -> list[float]:
    """Server-side durations of ``POST /v1/instances/<id>/<suffix>`` from the engine's log."""
    pattern = re.compile(r"method=POST path=/v1/instances/[0-9a-f]+/" + suffix +
                         r" status=2\d\d .*dur=([0-9.]+)s")
    try:
        text = (engine.state_dir / "logs" / "engine.log").read_text(errors="replace")
    except OSError:
        return []
    return [float(m) for m in pattern.findall(text)]


def size_label(rows: int) -> str:
    """About how much table data ``rows`` rows are (~1 kB each)."""
    megabytes = rows // 1000
    return f"~{megabytes / 1000:g} GB" if megabytes >= 1000 else f"~{megabytes} MB"


def bench(options: Options) -> None:
    big_rows = options.extra.big_rows or (QUICK_BIG_ROWS if options.quick else BIG_ROWS)
    seconds = int(options.extra.pgbench_seconds)
    work = temp_dir("branch")
    try:
        with engine_session(work / "engine") as engine:
            small = build_state(engine, size_label(SMALL_ROWS), SMALL_ROWS)
            big = None if options.extra.resets_only else \
                build_state(engine, size_label(big_rows), big_rows)
            pool_off(engine)
            os.sync()  # the builds' writes are not flushed under the resets
            print(f"resets: {options.runs} runs, interleaved with new instances", flush=True)
            resets = measure_resets(engine, small, options.runs)  # (before pgbench's load)
            results = {} if big is None else \
                measure_snapshots(engine, (small, big), work, seconds, options.runs)
            snapshot_server, reset_server = served_in(engine, "snapshot"), served_in(engine,
                                                                                      "reset")
        reset, create = median(resets.reset_s), median(resets.create_s)
        reset_goals = [
            Goal(f"reset median, {small.label} state", reset, 0.05, "s"),
            Goal("reset / new instance (pool off)", ratio(reset, create), 0.6, "x"),
            Goal("reset problems", float(len(resets.problems)), 0, "n"),
        ]
        if big is None:
            report_resets(small, resets, reset_server)
            print_goals(reset_goals)
            return
        report_snapshots((small, big), results, snapshot_server)
        report_resets(small, resets, reset_server)
        big_runs, small_runs = results[big.label], results[small.label]
        snap_big, snap_small = median(big_runs.engine_s), median(small_runs.engine_s)
        print(f"snapshot {big.label} / {small.label}: {fmt_x(ratio(snap_big, snap_small))}; "
              f"load average at the end {os.getloadavg()[0]:.2f}")
        print_goals([
            Goal(f"snapshot median, {big.label} state, under pgbench", snap_big, 0.25, "s"),
            Goal(f"snapshot / floor, {big.label} state", ratio(snap_big,
                                                               median(big_runs.floor_s)),
                 1.5, "x"),
            Goal(f"snapshot {big.label} / {small.label} state", ratio(snap_big, snap_small),
                 1.3, "x"),
            Goal("pgbench runs with a problem", float(len(big_runs.problems) +
                                                       len(small_runs.problems)), 0, "n"),
            *reset_goals,
        ])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=7, quick_runs=3,
                                           add=add_flags)))
