"""The pytest plugin (pytest_sqlrs.py) from the outside: inner pytest sessions in subprocesses
(``pytester.runpytest_subprocess``), each with its own state dir through
``--sqlrs-engine-json``; every engine they start is stopped and its servers removed after the
test (``inner`` fixture)."""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import json
import os
import re
import shutil
import signal
import stat
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import ROOT, cleanup_store, leftover_servers, spawn_engine, stop_engine

pytest_plugins = ["pytester"]

LIQUIBASE = "/opt/sqlrs-test/liquibase/bin/liquibase"
INNER_TIMEOUT = 240.0  #: an inner session never hangs the suite
START_LINE = "sqlrs-engine version="
SCHEMA = ("create table items(id int primary key, label text not null);\n"
          "insert into items values (1, 'one'), (2, 'two');\n")
COUNT_TESTS = '''
import psycopg2

def count(dsn, sql="select count(*) from items"):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]
'''


def plugin_args() -> list[str]:
    """``-p pytest_sqlrs`` unless the ``pytest11`` entry point (an installed package) loads
    it already (loading it twice is an error)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    return [] if "sqlrs" in names else ["-p", "pytest_sqlrs"]


def engine_info(state_dir: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        info: dict[str, Any] = json.loads((state_dir / "engine.json").read_text())
        return info
    return None


def api(state_dir: Path, method: str, path: str) -> Any:
    """A JSON request to the engine of ``state_dir``."""
    info = engine_info(state_dir)
    assert info, f"no engine.json in {state_dir}"
    host, port = str(info["endpoint"]).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {info['authToken']}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (method, path, resp.status, body[:300])
        return json.loads(body)
    finally:
        conn.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an engine whose parent pytest has exited is
    reaped by whoever adopted it, maybe late)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def stop_engine_of(state_dir: Path) -> None:
    """Stop the engine an inner session started in ``state_dir`` (its instances deleted
    first), then kill whatever servers and mounts of its store are left."""
    info = engine_info(state_dir)
    if info and alive(int(info["pid"])):
        with contextlib.suppress(Exception):
            for inst in api(state_dir, "GET", "/v1/instances"):
                api(state_dir, "DELETE", f"/v1/instances/{inst['instance_id']}?force=true")
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(info["pid"]), signal.SIGTERM)
        end = time.monotonic() + 30
        while alive(int(info["pid"])) and time.monotonic() < end:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(info["pid"]), signal.SIGKILL)
    cleanup_store(state_dir / "state-store")


class Inner:
    """Runs inner pytest sessions in ``pytester``'s directory against ``state_dir``."""

    def __init__(self, pytester: pytest.Pytester, state_dir: Path) -> None:
        self.pytester = pytester
        self.state_dir = state_dir
        self.engine_json = state_dir / "engine.json"

    def run(self, *args: str, engine_json: Path | None = None) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(
            *plugin_args(), "-p", "no:cacheprovider", "-rA",
            # one token: pytest takes the rootdir from the existing paths among separate
            # argument tokens, option values included
            f"--sqlrs-engine-json={engine_json or self.engine_json}",
            "--sqlrs-idle-timeout", "60s", *args, timeout=INNER_TIMEOUT)

    def starts(self) -> int:
        """How many engines started in the state dir (their first log line)."""
        log = self.state_dir / "logs" / "engine.log"
        return log.read_text().count(START_LINE) if log.exists() else 0

    def instances(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = api(self.state_dir, "GET", "/v1/instances")
        return found


@pytest.fixture
def inner(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Inner]:
    """An inner-session runner with a fresh state dir (not yet created); its engine is
    stopped and its servers removed afterwards, whatever happened."""
    state_dir = tmp_path_factory.mktemp("sqlrs-plugin") / "state"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("SQLRS_DAEMON_PATH", raising=False)
    # an ini file fixes the rootdir (relative prepare paths are relative to it); without one,
    # pytest would take the common ancestor of every existing path among the arguments
    pytester.makeini("[pytest]\n")
    runner = Inner(pytester, state_dir)
    try:
        yield runner
    finally:
        stop_engine_of(state_dir)
        assert leftover_servers(state_dir / "state-store") == []


def one_line_errors(result: pytest.RunResult, needle: str) -> list[str]:
    """The ``ERROR``/``FAILED`` summary lines that carry ``needle``."""
    return [line for line in result.outlines
            if line.startswith(("ERROR ", "FAILED ")) and needle in line]


# --------------------------------------------------------------------------------------------


def test_nothing_starts_when_no_test_uses_a_fixture(inner: Inner) -> None:
    inner.pytester.makepyfile(test_plain="""
        def test_plain(pytestconfig):
            assert pytestconfig.getoption("sqlrs_prepare") == "psql -c 'select 1'"

        def test_other():
            pass
    """, test_uses="""
        def test_uses(sqlrs_dsn):
            pass
    """)
    result = inner.run("--sqlrs-prepare", "psql -c 'select 1'", "test_plain.py")
    result.assert_outcomes(passed=2)
    # collecting a test that uses a fixture costs nothing either
    collected = inner.run("--sqlrs-prepare", "psql -c 'select 1'", "--collect-only")
    assert collected.ret == 0
    assert "test_uses" in collected.stdout.str()
    assert not inner.state_dir.exists(), "the plugin touched the state dir"


def test_isolation_psql_form_cache_and_cleanup(inner: Inner) -> None:
    (inner.pytester.path / "db").mkdir()
    (inner.pytester.path / "db" / "schema.sql").write_text(SCHEMA)
    inner.pytester.makepyfile(test_iso=COUNT_TESTS + '''
import re

def test_writes(sqlrs_dsn):
    with psycopg2.connect(sqlrs_dsn) as conn, conn.cursor() as cur:
        cur.execute("insert into items values (3, 'three')")
    assert count(sqlrs_dsn) == 3

def test_does_not_see_it(sqlrs_dsn):
    assert count(sqlrs_dsn) == 2

def test_state(sqlrs_state, sqlrs_dsn):
    assert re.fullmatch("[0-9a-f]{64}", sqlrs_state)
    print("STATE", sqlrs_state)

def test_a_whole_server_each(sqlrs_instance):
    first, second = sqlrs_instance(), sqlrs_instance()
    assert first.split("@")[1] != second.split("@")[1]  # two servers (two ports)
    with psycopg2.connect(first) as conn, conn.cursor() as cur:
        cur.execute("drop table items")
    assert count(second) == 2
''')
    result = inner.run("--sqlrs-prepare", "psql -f db/schema.sql", "-s")
    result.assert_outcomes(passed=4)
    states = {s["state_id"] for s in api(inner.state_dir, "GET", "/v1/states")}
    printed = re.findall(r"STATE ([0-9a-f]{64})", result.stdout.str())
    assert printed and printed[0] in states
    # every instance (the tests' and the prepare's own) is gone when the session ends
    assert inner.instances() == []
    jobs = api(inner.state_dir, "GET", "/v1/prepare-jobs")
    # a second run hits the cache: same states, the same engine, nothing left behind
    again = inner.run("--sqlrs-prepare", "psql -f db/schema.sql", "-s")
    again.assert_outcomes(passed=4)
    assert {s["state_id"] for s in api(inner.state_dir, "GET", "/v1/states")} == states
    new_jobs = api(inner.state_dir, "GET", "/v1/prepare-jobs")
    assert len(new_jobs) == len(jobs) + 1
    tasks = api(inner.state_dir, "GET", f"/v1/tasks?job={new_jobs[-1]['job_id']}")
    assert [t["cached"] for t in tasks if t["type"] == "state_execute"] == [True]
    assert inner.starts() == 1
    assert inner.instances() == []
    assert stat.S_IMODE(inner.state_dir.stat().st_mode) == 0o700


def test_alias_file_ini_options_and_marker(inner: Inner) -> None:
    path = inner.pytester.path
    (path / "db" / "sql").mkdir(parents=True)
    (path / "db" / "sql" / "schema.sql").write_text(SCHEMA)
    (path / "db" / "app.prep.s9s.yaml").write_text(textwrap.dedent("""\
        # the CLI's prepare alias: paths relative to this file
        kind: psql
        image: host:15
        args:
          - -f
          - sql/schema.sql   # two rows
    """))
    (path / "other.prep.s9s.yaml").write_text(
        "kind: psql\nargs: [-c, \"create table other(x int); insert into other values (7)\"]\n")
    (path / "broken.prep.s9s.yaml").write_text("kind: psql\narg:\n  - -c\n  - select 1\n")
    (path / "tox.ini").unlink()
    inner.pytester.makepyprojecttoml(f"""
        [tool.pytest.ini_options]
        sqlrs_prepare = "db/app"
        sqlrs_image = "host:15"
        sqlrs_engine_json = "{inner.engine_json}"
        sqlrs_ttl = "600"
    """)
    inner.pytester.makepyfile(test_alias=COUNT_TESTS + '''
import pytest

def test_alias(sqlrs_dsn):
    assert count(sqlrs_dsn) == 2

@pytest.mark.sqlrs(prepare="other")
def test_marker(sqlrs_dsn, sqlrs_instance):
    assert count(sqlrs_dsn, "select x from other") == 7
    assert count(sqlrs_instance(prepare="db/app")) == 2
    assert count(sqlrs_instance(prepare="psql -c 'create table t(y int)'"),
                 "select count(*) from t") == 0

@pytest.mark.sqlrs(prepare="broken")
def test_broken(sqlrs_dsn):
    pass
''', test_module_marker=COUNT_TESTS + '''
import pytest

pytestmark = pytest.mark.sqlrs(prepare="other")

def test_module_marker(sqlrs_dsn):
    assert count(sqlrs_dsn, "select x from other") == 7
''')
    result = inner.pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider",
                                                 "-rA", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=3, errors=1)
    errors = one_line_errors(result, "test_broken")
    assert len(errors) == 1 and "bad prepare alias" in errors[0], result.outlines[-8:]
    assert "broken.prep.s9s.yaml:2: unknown key 'arg'" in result.stdout.str()
    assert "Traceback" not in result.stdout.str()
    assert inner.instances() == []


def test_failing_migration_fails_each_test_with_one_line(inner: Inner) -> None:
    path = inner.pytester.path
    (path / "schema.sql").write_text(SCHEMA)
    (path / "bad.sql").write_text("select 1;\nselect * from no_such_table;\n")
    inner.pytester.makepyfile(test_bad="""
        def test_one(sqlrs_dsn):
            pass

        def test_two(sqlrs_dsn):
            pass

        def test_without_database():
            pass
    """)
    result = inner.run("--sqlrs-prepare", "psql -f schema.sql -f bad.sql")
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    first = [line for line in result.outlines if line.startswith("sqlrs: prepare")]
    assert len(first) == 2, result.outlines
    assert "failed at step 2 of 2" in first[0] and "bad.sql" in first[0]
    assert 'relation "no_such_table" does not exist' in first[0]
    assert "Traceback" not in text and "pytest_sqlrs.py" not in text
    # prepared once: the second test reuses the remembered failure
    assert len(api(inner.state_dir, "GET", "/v1/prepare-jobs")) == 1
    assert inner.instances() == []


def test_keep_failed_keeps_the_instance_and_prints_how_to_connect(inner: Inner) -> None:
    (inner.pytester.path / "schema.sql").write_text(SCHEMA)
    inner.pytester.makepyfile(test_keep=COUNT_TESTS + '''
def test_passes(sqlrs_dsn):
    assert count(sqlrs_dsn) == 2

def test_fails(sqlrs_dsn):
    with psycopg2.connect(sqlrs_dsn) as conn, conn.cursor() as cur:
        cur.execute("insert into items values (42, 'evidence')")
    assert False, "look at the database"
''')
    result = inner.run("--sqlrs-prepare", "psql -f schema.sql", "--sqlrs-keep-failed")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "sqlrs: kept instances" in text
    kept = re.findall(r"instance ([0-9a-f]{32}) kept", text)
    assert len(kept) == 1
    instances = inner.instances()
    assert [i["instance_id"] for i in instances] == kept  # the passing test's is gone
    detail = api(inner.state_dir, "GET", f"/v1/instances/{kept[0]}")
    password = re.match(r"postgres://[^:]+:([^@]+)@", detail["dsn"])
    assert password and password[1] not in text  # neither in the section nor in reprs
    public = re.sub(r":[^:@/]+@", "@", detail["dsn"])
    assert f"dsn (no password): {public}" in text
    assert f"sqlrs run:psql --instance {kept[0]}" in text
    count_sql = "select count(*) from items where id = 42"
    with psycopg2.connect(detail["dsn"]) as conn, conn.cursor() as cur:
        cur.execute(count_sql)
        assert cur.fetchone() == (1,)
    conn.close()


def test_xdist_two_workers_start_one_engine(inner: Inner) -> None:
    (inner.pytester.path / "schema.sql").write_text(SCHEMA)
    tests = "\n".join(f"def test_{i}(sqlrs_dsn):\n    assert count(sqlrs_dsn) == 2\n"
                      for i in range(6))
    inner.pytester.makepyfile(test_many=COUNT_TESTS + "\n" + tests + '''
import os

def test_workers(sqlrs_dsn):
    assert os.environ["PYTEST_XDIST_WORKER"] in ("gw0", "gw1")
''')
    result = inner.run("--sqlrs-prepare", "psql -f schema.sql", "-n", "2")
    result.assert_outcomes(passed=7)
    assert "2 workers" in result.stdout.str()
    assert inner.starts() == 1
    assert inner.instances() == []


def test_uses_an_engine_that_is_already_running(inner: Inner, tmp_path: Path) -> None:
    engine = spawn_engine(tmp_path / "running")
    try:
        (inner.pytester.path / "schema.sql").write_text(SCHEMA)
        inner.pytester.makepyfile(test_running=COUNT_TESTS + '''
def test_it(sqlrs_dsn):
    assert count(sqlrs_dsn) == 2
''')
        log = engine.state_dir / "logs" / "engine.log"
        result = inner.run("--sqlrs-prepare", "psql -f schema.sql",
                           engine_json=engine.engine_json)
        result.assert_outcomes(passed=1)
        assert engine.proc.poll() is None
        assert log.read_text().count(START_LINE) == 1
        assert "POST /v1/instances" in log.read_text() or "path=/v1/instances" in log.read_text()
        assert engine.get("/v1/instances").json() == []
        assert not inner.state_dir.exists()
    finally:
        stop_engine(engine)


def test_no_engine_can_start_fails_fast_with_one_line(inner: Inner) -> None:
    inner.state_dir.mkdir(parents=True)
    inner.state_dir.chmod(0o777)  # the engine refuses a state dir others may write
    inner.pytester.makepyfile(test_none="""
        def test_one(sqlrs_dsn):
            pass

        def test_two(sqlrs_state):
            pass
    """)
    started = time.monotonic()
    result = inner.run("--sqlrs-prepare", "psql -c 'select 1'")
    assert time.monotonic() - started < 60
    result.assert_outcomes(errors=2)
    lines = [line for line in result.outlines if line.startswith("sqlrs: no engine at")]
    assert len(lines) == 2, result.outlines
    assert "exited with code 1" in lines[0] and str(inner.state_dir) in lines[0]
    assert "Traceback" not in result.stdout.str()
    assert stat.S_IMODE(inner.state_dir.stat().st_mode) == 0o777  # never chmodded


def test_missing_docker_image_is_one_line(inner: Inner) -> None:
    if os.environ.get("SQLRS_SKIP_DOCKER_TESTS") == "1" or not shutil.which("docker"):
        pytest.skip("no Docker")
    inner.pytester.makepyfile(test_image="""
        def test_one(sqlrs_dsn):
            pass
    """)
    result = inner.run("--sqlrs-prepare", "psql -c 'select 1'",
                       "--sqlrs-image=127.0.0.1:5000/sqlrs-no-such/image:1")
    result.assert_outcomes(errors=1)
    lines = [line for line in result.outlines if line.startswith("sqlrs: prepare")]
    assert len(lines) == 1 and "sqlrs-no-such/image:1" in lines[0], result.outlines


def test_reset_fixture_reuses_one_server_reset_before_each_test(inner: Inner) -> None:
    """``sqlrs_reset_dsn``: one instance for the run, the same DSN in every test, reset to
    the state before each (a row written in one test is gone in the next)."""
    (inner.pytester.path / "db").mkdir()
    (inner.pytester.path / "db" / "schema.sql").write_text(SCHEMA)
    inner.pytester.makepyfile(test_reset=COUNT_TESTS + '''
def test_writes(sqlrs_reset_dsn):
    with psycopg2.connect(sqlrs_reset_dsn) as conn, conn.cursor() as cur:
        cur.execute("insert into items values (3, 'three')")
    assert count(sqlrs_reset_dsn) == 3
    print("DSN", sqlrs_reset_dsn)

def test_does_not_see_it(sqlrs_reset_dsn):
    assert count(sqlrs_reset_dsn) == 2
    print("DSN", sqlrs_reset_dsn)

def test_drops_a_table(sqlrs_reset_dsn):
    with psycopg2.connect(sqlrs_reset_dsn) as conn, conn.cursor() as cur:
        cur.execute("drop table items")
    print("DSN", sqlrs_reset_dsn)

def test_has_it_again(sqlrs_reset_dsn):
    assert count(sqlrs_reset_dsn) == 2
''')
    result = inner.run("--sqlrs-prepare", "psql -f db/schema.sql", "-s")
    result.assert_outcomes(passed=4)
    dsns = set(re.findall(r"DSN (\S+)", result.stdout.str()))
    assert len(dsns) == 1, dsns  # one server, reset in place
    assert inner.instances() == []  # deleted when the session ends


def test_lb_form(inner: Inner) -> None:
    if not Path(LIQUIBASE).exists():
        pytest.skip(f"{LIQUIBASE} missing: run scripts/setup-liquibase.sh")
    (inner.pytester.path / "changelog.sql").write_text(
        "--liquibase formatted sql\n\n--changeset ann:1\n"
        "create table pets(id int primary key, name text);\n"
        "insert into pets values (1, 'rex');\n")
    inner.pytester.makepyfile(test_lb=COUNT_TESTS + '''
def test_lb(sqlrs_dsn):
    assert count(sqlrs_dsn, "select count(*) from pets") == 1
    assert count(sqlrs_dsn, "select count(*) from databasechangelog") == 1
''')
    result = inner.run("--sqlrs-prepare", "lb update --changelog-file changelog.sql",
                       f"--sqlrs-liquibase={LIQUIBASE}")
    result.assert_outcomes(passed=1)
    assert inner.instances() == []

