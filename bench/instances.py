"""Instances from a state: POST /v1/instances until the DSN accepts a connection.

States of ~10 MB and ~1 GB of table data (``--quick``: ~10 MB and ~200 MB) are built with
prepares; the state's ``size_bytes`` is printed. Each instance is deleted after its sample
(untimed). Goals: median <= 0.1 s for both, 1 GB / 10 MB <= 1.2.

Baselines, same run, on a running server holding the same data (an engine instance of the same
state, whose ``postgres`` database is the template; the admin session is on ``template1``):
``CREATE DATABASE … TEMPLATE postgres STRATEGY WAL_LOG`` and ``… FILE_COPY``, each until a
connection to the new database succeeds; and a fresh ``initdb`` + start + connect.
Also: 20 concurrent creations from the 10 MB state (wall time and per-instance latencies),
and what a per-instance password costs against the trust floor, on a scratch server: the
engine's hand-out (SCRAM verifier + ``ALTER ROLE`` over the unix socket) plus a first TCP
connection with the password, minus a first TCP connection with trust. Goal: <= 10 ms.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass

import psycopg2
from _common import (
    Engine,
    Goal,
    Options,
    create_instance,
    delete_instance,
    engine_session,
    fmt_mb,
    fmt_s,
    fmt_x,
    get_state,
    instance_once,
    median,
    parse_options,
    percentile,
    prepare,
    print_goals,
    print_table,
    ratio,
    run_main,
    temp_dir,
    timed,
)
from _pg import (
    _ENGINE,
    Scratch,
    check_connection,
    connect,
    execute,
    initdb,
    scratch,
    start_server,
)

ROW_BYTES = 546  # a row of (int, 500-byte text) takes ~546 bytes of heap (15 per 8 kB page)
SMALL_MB = 10
BIG_MB = 1000
QUICK_BIG_MB = 200
CONCURRENT = 20
QUICK_CONCURRENT = 8


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--big-mb", type=int, default=None,
                        help=f"table data of the big state (default {BIG_MB}, "
                             f"{QUICK_BIG_MB} with --quick)")
    parser.add_argument("--template-runs", type=int, default=None,
                        help="CREATE DATABASE repetitions on the big state (default 3, 1 quick)")
    parser.add_argument("--concurrent", type=int, default=None,
                        help=f"concurrent creations (default {CONCURRENT}, "
                             f"{QUICK_CONCURRENT} with --quick)")


@dataclass
class BuiltState:
    label: str
    state_id: str
    size_bytes: int
    table_bytes: int


def build_state(engine: Engine, label: str, megabytes: int) -> BuiltState:
    """A prepare that fills ``big`` with ``megabytes`` of rows; its own instance is deleted."""
    rows = max(1, megabytes * 1_000_000 // ROW_BYTES)
    sql = ("create table big(id int, payload text);\n"
           f"insert into big select g, repeat('x', 500) from generate_series(1, {rows}) g;\n")
    started = time.perf_counter()
    outcome = prepare(engine, ["-c", sql])
    built = time.perf_counter() - started
    conn = connect(outcome.dsn)
    with conn.cursor() as cur:
        cur.execute("select pg_total_relation_size('big')")
        row = cur.fetchone()
    conn.close()
    delete_instance(engine, outcome.instance_id)
    size = int(get_state(engine, outcome.state_id).get("size_bytes") or 0)
    state = BuiltState(label, outcome.state_id, size, int(row[0]) if row else 0)
    print(f"built {label}: table {fmt_mb(state.table_bytes)}, state size_bytes "
          f"{fmt_mb(size)}, prepare took {fmt_s(built)}", flush=True)
    return state


def template_samples(engine: Engine, state_id: str, strategy: str, runs: int) -> list[float]:
    """CREATE DATABASE … TEMPLATE postgres STRATEGY … on an instance of the state."""
    entry = create_instance(engine, state_id)
    dsn = str(entry["dsn"])
    admin_dsn = dsn.rsplit("/", 1)[0] + "/template1"
    samples = []
    try:
        for index in range(runs):
            name = f"bench_{strategy.lower()}_{index}"
            started = time.perf_counter()
            execute(admin_dsn, f"create database {name} template postgres strategy {strategy}")
            check_connection(dsn.rsplit("/", 1)[0] + f"/{name}")
            samples.append(time.perf_counter() - started)
            execute(admin_dsn, f"drop database {name}")
    finally:
        delete_instance(engine, str(entry["instance_id"]))
    return samples


def initdb_once(area: Scratch) -> float:
    """Fresh initdb (the engine's options) + start + connect."""
    parent = area.new_dir("initdb")
    data = area.pg_dir(parent)
    started = time.perf_counter()
    initdb(data)
    server = start_server(area, data)
    check_connection(server.dsn())
    elapsed = time.perf_counter() - started
    server.stop()
    shutil.rmtree(parent, ignore_errors=True)
    return elapsed


@dataclass
class Concurrent:
    wall: float
    latencies: list[float]
    errors: list[str]


def concurrent_creations(engine: Engine, state_id: str, count: int) -> Concurrent:
    """``count`` threads, each POST /v1/instances + connect, released together."""
    barrier = threading.Barrier(count + 1)
    latencies: list[float] = []
    created: list[str] = []
    errors: list[str] = []

    def worker() -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            entry = create_instance(engine, state_id)
            created.append(str(entry["instance_id"]))
            check_connection(str(entry["dsn"]))
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # reported below, the run goes on
            errors.append(str(exc)[:200])

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for instance_id in created:
        delete_instance(engine, instance_id)
    return Concurrent(wall, latencies, errors)


def report(states: list[BuiltState], engine_s: dict[str, list[float]],
           templates: dict[tuple[str, str], list[float]], fresh: list[float]) -> list[Goal]:
    rows = []
    for state in states:
        mine = median(engine_s[state.label])
        rows.append([f"engine instance, {state.label}", fmt_mb(state.size_bytes),
                     str(len(engine_s[state.label])), fmt_s(mine),
                     fmt_s(min(engine_s[state.label])), fmt_s(max(engine_s[state.label])), "-"])
        for strategy in ("WAL_LOG", "FILE_COPY"):
            values = templates[(state.label, strategy)]
            rows.append([f"CREATE DATABASE {strategy}, {state.label}", fmt_mb(state.table_bytes),
                         str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
                         fmt_s(max(values)), fmt_x(ratio(mine, median(values)))])
    rows.append(["fresh initdb + start + connect", "-", str(len(fresh)), fmt_s(median(fresh)),
                 fmt_s(min(fresh)), fmt_s(max(fresh)),
                 " / ".join(fmt_x(ratio(median(engine_s[s.label]), median(fresh)))
                            for s in states)])
    print_table("Instance from a state (POST -> DSN accepts a connection)",
                ["measurement", "size", "runs", "median", "min", "max", "engine vs this"], rows)
    small, big = (median(engine_s[s.label]) for s in states)
    print(f"{states[1].label} / {states[0].label}: {fmt_x(ratio(big, small))}")
    return [Goal(f"instance median, {states[0].label}", small, 0.1, "s"),
            Goal(f"instance median, {states[1].label}", big, 0.1, "s"),
            Goal(f"{states[1].label} / {states[0].label}", ratio(big, small), 1.2, "x")]


@dataclass
class PasswordCost:
    hand_out: list[float]
    trust_connect: list[float]
    scram_connect: list[float]

    @property
    def added(self) -> float:
        return (median(self.hand_out) + median(self.scram_connect)
                - median(self.trust_connect))


def password_cost(area: Scratch, runs: int) -> PasswordCost:
    data = area.pg_dir(area.new_dir("password"))
    initdb(data)
    server = start_server(area, data)
    cost = PasswordCost([], [], [])
    passwords = []
    for _ in range(runs):
        password = secrets.token_urlsafe(24)
        passwords.append(password)

        def hand_out(password: str = password) -> None:
            _ENGINE.admin_query((str(server.sock_dir), server.port), "bench",
                                f"ALTER ROLE {_ENGINE.SUPERUSER} PASSWORD %s",
                                _ENGINE.scram_verifier(password))

        cost.hand_out.append(timed(hand_out))
        cost.trust_connect.append(timed(lambda: psycopg2.connect(server.dsn()).close()))
    (data / "pg_hba.conf").write_bytes(_ENGINE.PG_HBA)
    execute(server.dsn(), "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while True:  # until the reload took effect: a passwordless client is refused
        try:
            psycopg2.connect(server.dsn()).close()
        except psycopg2.OperationalError:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("pg_hba.conf reload did not take effect")
        time.sleep(0.002)
    secret = server.dsn().replace("@", f":{passwords[-1]}@", 1)
    cost.scram_connect = [timed(lambda: psycopg2.connect(secret).close()) for _ in range(runs)]
    return cost


def report_password(cost: PasswordCost) -> Goal:
    rows = [[name, str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
             fmt_s(max(values))]
            for name, values in (("hand-out: verifier + ALTER ROLE over the socket",
                                  cost.hand_out),
                                 ("first TCP connection, trust (the floor)",
                                  cost.trust_connect),
                                 ("first TCP connection, scram-sha-256 password",
                                  cost.scram_connect))]
    print_table("Per-instance password", ["measurement", "runs", "median", "min", "max"], rows)
    print(f"added per instance: {fmt_s(cost.added)}")
    return Goal("password cost per instance (median)", cost.added, 0.010, "s")


def report_concurrent(result: Concurrent, count: int, single: float) -> None:
    lat = result.latencies or [0.0]
    print_table(f"{count} concurrent creations from the small state (threads)",
                ["instances ok", "errors", "wall", "per-instance median", "p99", "max",
                 "median vs sequential"],
                [[str(len(result.latencies)), str(len(result.errors)), fmt_s(result.wall),
                  fmt_s(median(lat)), fmt_s(percentile(lat, 99)), fmt_s(max(lat)),
                  fmt_x(ratio(median(lat), single))]])
    for error in result.errors[:3]:
        print(f"  error: {error}")


def bench(options: Options) -> None:
    big_mb = options.extra.big_mb or (QUICK_BIG_MB if options.quick else BIG_MB)
    template_runs = options.extra.template_runs or (1 if options.quick else 3)
    count = options.extra.concurrent or (QUICK_CONCURRENT if options.quick else CONCURRENT)
    work = temp_dir("instances")
    try:
        with scratch() as area, engine_session(work / "engine") as engine:
            states = [build_state(engine, f"~{SMALL_MB} MB", SMALL_MB),
                      build_state(engine, f"~{big_mb} MB", big_mb)]
            print(f"instances: {options.runs} runs per state, interleaved", flush=True)
            engine_s: dict[str, list[float]] = {s.label: [] for s in states}
            for _ in range(options.runs):
                for state in states:
                    engine_s[state.label].append(instance_once(engine, state.state_id))
            print("baselines: CREATE DATABASE ... TEMPLATE, fresh initdb", flush=True)
            templates = {(s.label, strategy): template_samples(
                engine, s.state_id, strategy, options.runs if s is states[0] else template_runs)
                for s in states for strategy in ("WAL_LOG", "FILE_COPY")}
            fresh = [initdb_once(area) for _ in range(min(options.runs, 5))]
            goals = report(states, engine_s, templates, fresh)
            print(f"\nconcurrency: {count} creations at once", flush=True)
            result = concurrent_creations(engine, states[0].state_id, count)
            report_concurrent(result, count, median(engine_s[states[0].label]))
            goals.append(Goal(f"failed creations of {count} concurrent",
                              float(len(result.errors)), 0, "n"))
            print("\nper-instance password against the trust floor", flush=True)
            goals.append(report_password(password_cost(area, max(options.runs, 20))))
        print_goals(goals)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=10, quick_runs=3,
                                           add=add_flags)))
