"""The pytest plugin (pytest_sqlrs.py): per-test overhead of a whole server per test.

One generated suite of N small tests (default 200; each connects, writes three rows to one of
10 tables of 200 rows each, reads a count and checks it) runs in one pytest process with:

(a) pytest-postgresql: its ``postgresql`` fixture (a database per test, created from a
    template that holds the schema, dropped after) against one server of the same PostgreSQL
    15 binaries (``postgresql_noproc``: the bench starts it as ``postgres``, with the engine's
    settings, since Postgres refuses to run as root);
(b) this plugin's ``sqlrs_dsn`` (a whole server per test) on an engine that is running and
    has the state cached (as on every run after the first);
(c) for reference, the same tests on one shared database with no isolation, once on (a)'s
    server (c-pg) and once on one sqlrs instance for the session (c-sqlrs);
(d) testcontainers-python, a container of the local image sqlrs-test/postgres:15 per test
    (initdb + postgres started by the container's command, as the official image's
    entrypoint does, a wait for the ready log line, the schema loaded), on the first 20 tests,
    with (c-pg) on the same 20 tests as its reference.

Per-test overhead = (suite wall time - its reference's) / tests, each suite a fresh
``python -m pytest`` process (start-up and collection cancel out). Goals: (b) <= 0.25x (a)
and <= 0.05x (d). The engine's request log gives the cost of ``POST /v1/instances`` and
``DELETE /v1/instances/{id}`` during (b) (what bounds it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    ROOT,
    BenchError,
    Engine,
    Goal,
    Options,
    cleanup_engine,
    fmt_s,
    fmt_x,
    median,
    parse_options,
    percentile,
    print_goals,
    print_table,
    ratio,
    run_main,
    spawn_engine,
    temp_dir,
)
from _pg import SUPERUSER, initdb, scratch, start_server

DOCKER_IMAGE = os.environ.get("SQLRS_TEST_IMAGE", "sqlrs-test/postgres:15")
TABLES = 10
ROWS = 200
SUITE_TIMEOUT_S = 1800

SCHEMA = "".join(
    f"create table t{i}(id int primary key, label text not null, n int not null);\n"
    f"insert into t{i} select g, 'row ' || g, g % 7 from generate_series(1, {ROWS}) g;\n"
    for i in range(TABLES))

TEST_HEAD = '''
import os
import psycopg2

ISOLATED = os.environ.get("BENCH_ISOLATED") == "1"


def work(dsn, table):
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"insert into {table} select 100000 + g + (select coalesce(max(id), 0) "
                        f"from {table}), 'new', 1 from generate_series(1, 3) g")
            cur.execute(f"select count(*) from {table}")
            count = cur.fetchone()[0]
    finally:
        conn.close()
    assert count == %(rows)d + 3 if ISOLATED else count >= %(rows)d + 3
'''

CONFTESTS = {
    "pytest-postgresql": '''
from pathlib import Path

import pytest
from pytest_postgresql import factories

postgresql_noproc = factories.postgresql_noproc(
    host="127.0.0.1", port={port}, user="{user}", dbname="bench", load=[Path("{schema}")])
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def db(postgresql):
    return postgresql.info.dsn
''',
    "shared-pg": '''
import psycopg2
import pytest


@pytest.fixture(scope="session")
def db():
    admin = psycopg2.connect("host=127.0.0.1 port={port} user={user} dbname=postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("drop database if exists bench_shared")
        cur.execute("create database bench_shared")
    dsn = "host=127.0.0.1 port={port} user={user} dbname=bench_shared"
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(open("{schema}").read())
    yield dsn
    with admin.cursor() as cur:
        cur.execute("drop database bench_shared with (force)")
    admin.close()
''',
    "sqlrs": '''
import pytest


@pytest.fixture
def db(sqlrs_dsn):
    return sqlrs_dsn
''',
    "shared-sqlrs": '''
import pytest
import pytest_sqlrs


@pytest.fixture(scope="session")
def db(sqlrs_state, pytestconfig):
    session = pytest_sqlrs._session(pytestconfig)
    instance = session.instance(sqlrs_state)
    yield instance.dsn
    session.delete_later(instance.instance_id)
''',
    "testcontainers": '''
import time

import psycopg2
import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.waiting_utils import wait_for_logs

COMMAND = ("bash -c 'install -d -o postgres -m 700 /tmp/pg && "
           "runuser -u postgres -- initdb -D /tmp/pg -A trust -U postgres >/dev/null && "
           "echo host all all all trust >> /tmp/pg/pg_hba.conf && "
           "exec runuser -u postgres -- postgres -D /tmp/pg -c listen_addresses=* "
           "-c fsync=off'")


@pytest.fixture
def db():
    container = DockerContainer("{image}").with_command(COMMAND).with_exposed_ports(5432)
    container.start()
    try:
        wait_for_logs(container, "database system is ready to accept connections", timeout=60)
        dsn = (f"host={{container.get_container_host_ip()}} "
               f"port={{container.get_exposed_port(5432)}} user=postgres dbname=postgres")
        conn = None
        for _ in range(500):
            try:
                conn = psycopg2.connect(dsn)
                break
            except psycopg2.OperationalError:
                time.sleep(0.01)
        assert conn is not None, "the container's server refused connections"
        with conn, conn.cursor() as cur:
            cur.execute(open("{schema}").read())
        conn.close()
        yield dsn
    finally:
        container.stop()
''',
}


def write_suite(root: Path, variant: str, tests: int, fmt: dict[str, object]) -> Path:
    """A directory with the variant's conftest.py and the generated test module."""
    suite = root / variant
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(CONFTESTS[variant].format(**fmt))
    body = TEST_HEAD % {"rows": ROWS} + "".join(
        f"\n\ndef test_{k}(db):\n    work(db, 't{k % TABLES}')\n" for k in range(tests))
    (suite / "test_generated.py").write_text(body)
    return suite


def run_suite(suite: Path, isolated: bool, *extra: str) -> float:
    """Wall time of ``python -m pytest`` on ``suite``; raises unless every test passed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_ISOLATED": "1" if isolated else "0",
           "TESTCONTAINERS_RYUK_DISABLED": "true"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-x", *extra], cwd=suite, env=env, capture_output=True, text=True,
                          timeout=SUITE_TIMEOUT_S, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"suite {suite.name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return elapsed


def request_durations(engine: Engine, method: str, pattern: str, since: int) -> list[float]:
    """Durations of the engine's logged requests (``dur=``) after byte ``since`` of its log."""
    text = (engine.state_dir / "logs" / "engine.log").read_bytes()[since:].decode(errors="replace")
    regex = re.compile(rf"method={method} path={pattern} status=\d+ bytes=\d+ dur=([0-9.]+)s")
    return [float(m[1]) for m in regex.finditer(text)]


def log_size(engine: Engine) -> int:
    path = engine.state_dir / "logs" / "engine.log"
    return path.stat().st_size if path.exists() else 0


def docker_ready() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "image", "inspect", DOCKER_IMAGE], capture_output=True,
                          check=False).returncode == 0


def body(options: Options) -> None:
    tests = int(options.extra.tests or (40 if options.quick else 200))
    tc_tests = min(int(options.extra.tc_tests or (5 if options.quick else 20)), tests)
    root = temp_dir("pytest-plugin")
    root.chmod(0o755)
    schema = root / "schema.sql"
    schema.write_text(SCHEMA)
    schema.chmod(0o644)
    engine = spawn_engine(root / "state")
    try:
        with scratch() as area:
            data = area.pg_dir(area.new_dir("pg"))
            initdb(data)
            server = start_server(area, data)
            fmt: dict[str, object] = {"port": server.port, "user": SUPERUSER,
                                      "schema": str(schema), "image": DOCKER_IMAGE}
            sqlrs_args = (f"--sqlrs-engine-json={engine.engine_json}",
                          f"--sqlrs-prepare=psql -f {schema}")
            suites = {v: write_suite(root, v, tests, fmt) for v in CONFTESTS
                      if v != "testcontainers"}
            # warm-up: the engine prepares the state once (later runs are cache hits)
            run_suite(suites["sqlrs"], True, *sqlrs_args, "-k", "test_0 or test_1")
            times: dict[str, list[float]] = {v: [] for v in suites}
            post: list[float] = []
            delete: list[float] = []
            for _ in range(options.runs):
                times["shared-pg"].append(run_suite(suites["shared-pg"], False))
                times["pytest-postgresql"].append(run_suite(suites["pytest-postgresql"], True))
                times["shared-sqlrs"].append(run_suite(suites["shared-sqlrs"], False,
                                                       *sqlrs_args))
                since = log_size(engine)
                times["sqlrs"].append(run_suite(suites["sqlrs"], True, *sqlrs_args))
                post += request_durations(engine, "POST", "/v1/instances", since)
                delete += request_durations(engine, "DELETE", "/v1/instances/[0-9a-f]+", since)
            tc: dict[str, float] = {}
            if docker_ready():
                (root / "tc").mkdir()
                small = write_suite(root / "tc", "testcontainers", tc_tests, fmt)
                shared_small = write_suite(root / "tc", "shared-pg", tc_tests, fmt)
                tc["shared"] = run_suite(shared_small, False)
                tc["suite"] = run_suite(small, True)
            report(tests, tc_tests, {k: median(v) for k, v in times.items()}, tc, post, delete)
    finally:
        cleanup_engine(engine)
        shutil.rmtree(root, ignore_errors=True)


def report(tests: int, tc_tests: int, times: dict[str, float], tc: dict[str, float],
           post: list[float], delete: list[float]) -> None:
    pg_over = (times["pytest-postgresql"] - times["shared-pg"]) / tests
    our_over = (times["sqlrs"] - times["shared-sqlrs"]) / tests
    rows = [
        ["(c) shared database, pytest-postgresql's server", str(tests),
         fmt_s(times["shared-pg"]), "-", "reference of (a), (d)"],
        ["(c) shared database, one sqlrs instance", str(tests),
         fmt_s(times["shared-sqlrs"]), "-", "reference of (b)"],
        ["(a) pytest-postgresql, a database per test", str(tests),
         fmt_s(times["pytest-postgresql"]), fmt_s(pg_over), ""],
        ["(b) sqlrs_dsn, a server per test", str(tests), fmt_s(times["sqlrs"]),
         fmt_s(our_over), ""],
    ]
    goals = [Goal("(b) overhead / (a) overhead", ratio(our_over, pg_over), 0.25, "x")]
    if tc:
        tc_over = (tc["suite"] - tc["shared"]) / tc_tests
        rows += [["(c) shared database, pytest-postgresql's server", str(tc_tests),
                  fmt_s(tc["shared"]), "-", "reference of (d)"],
                 ["(d) testcontainers, a container per test", str(tc_tests),
                  fmt_s(tc["suite"]), fmt_s(tc_over), ""]]
        goals.append(Goal("(b) overhead / (d) overhead", ratio(our_over, tc_over), 0.05, "x"))
    else:
        print(f"\n(d) skipped: no docker or no {DOCKER_IMAGE}")
    print_table("Suites (wall time of one pytest process each)",
                ["suite", "tests", "wall", "per-test overhead", "note"], rows)
    if post:
        print_table("Engine requests during (b) (engine log dur=)",
                    ["request", "count", "median", "p90", "max", "sum / test"],
                    [[name, str(len(vals)), fmt_s(median(vals)), fmt_s(percentile(vals, 90)),
                      fmt_s(max(vals)), fmt_s(sum(vals) / tests)]
                     for name, vals in (("POST /v1/instances", post),
                                        ("DELETE /v1/instances/{id} (background)", delete))
                     if vals])
        fast = sum(1 for v in post if v < 0.02)
        print(f"POST /v1/instances under 20 ms (warm pool hand-outs): {fast} of {len(post)}")
    print_goals(goals)
    print(f"ratios: (b)/(a) {fmt_x(ratio(our_over, pg_over))}"
          + (f", (b)/(d) {fmt_x(ratio(our_over, (tc['suite'] - tc['shared']) / tc_tests))}"
             if tc else ""))


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tests", type=int, default=None, help="suite size (default 200)")
    parser.add_argument("--tc-tests", type=int, default=None,
                        help="testcontainers subset (default 20)")


if __name__ == "__main__":
    sys.exit(run_main(body, parse_options(__doc__ or "", 1, 1, add_flags)))
