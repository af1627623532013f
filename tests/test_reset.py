"""``POST /v1/instances/{idOrName}/reset``: an instance back to its state (or to another state of
its image) in place: the same id, DSN, port and password; clients disconnected; a run on it or a
foreign state refused; a kill at any point leaves the old data or the new, never a mix."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import (
    HOST_IMAGE,
    PG_BIN,
    RUNTIMES,
    EngineProcess,
    assert_error,
    killed_at,
    poll,
    post_run,
    psql,
    sql_via_run,
    without_warm_pool,
)

pytestmark = RUNTIMES


def prepared(engine: EngineProcess, tmp_path: Path, name: str, sql: str,
             parent: str | None = None) -> dict[str, Any]:
    """A succeeded prepare of ``sql`` (after the script ``parent``, when given)."""
    script = tmp_path / f"{name}.sql"
    script.write_text(sql)
    args = ["-f", str(tmp_path / f"{parent}.sql")] if parent else []
    job = engine.prepare([*args, "-f", str(script)])
    assert job["status"] == "succeeded", job.get("error")
    return job


def reset(engine: EngineProcess, ref: str, body: Any = None) -> Any:
    result = engine.post(f"/v1/instances/{ref}/reset", body)
    assert result.status == 200, result.body
    return result.json()


def test_reset_brings_back_the_state_with_the_same_dsn(engine: EngineProcess,
                                                       tmp_path: Path) -> None:
    job = prepared(engine, tmp_path, "base", "create table t(x int); insert into t values (1);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    psql(dsn, "insert into t values (2); create table scratch(y int)")
    entry = reset(engine, instance_id)
    assert entry["instance_id"] == instance_id
    assert entry["dsn"] == dsn  # same port, same password
    assert entry["state_id"] == job["result"]["state_id"]
    assert psql(dsn, "select string_agg(x::text, ',') from t") == "1"
    assert psql(dsn, "select count(*) from pg_tables where tablename = 'scratch'") == "0"
    # again, by name and with the state given explicitly
    assert engine.request("PUT", "/v1/names/resettable",
                          {"instance_id": instance_id}).status in (200, 201)
    psql(dsn, "insert into t values (3)")
    again = reset(engine, "resettable", {"state_id": job["result"]["state_id"][:12]})
    assert again["dsn"] == dsn
    assert psql(dsn, "select count(*) from t") == "1"


def seeds_resets(engine: EngineProcess) -> bool:
    return engine.image == HOST_IMAGE and os.geteuid() == 0


def test_later_resets_start_from_a_seed_with_the_password(engine: EngineProcess,
                                                          tmp_path: Path) -> None:
    """As root on the host the first reset to a state keeps what its start and the password
    wrote (a seed); the next resets to that state start from it: the state's data, the same
    DSN, the password still required. A reset to another state forgets the seed."""
    if not seeds_resets(engine):
        pytest.skip("reset seeds are made for root's host overlays only")
    base = prepared(engine, tmp_path, "base", "create table t(x int); insert into t values (1);")
    branch = prepared(engine, tmp_path, "branch", "insert into t values (2);", parent="base")
    instance_id, dsn = base["result"]["instance_id"], base["result"]["dsn"]
    base_id, branch_id = base["result"]["state_id"], branch["result"]["state_id"]
    runtime = engine.store / "instances" / instance_id

    def seeds() -> list[str]:
        return sorted(path.name for path in runtime.glob("*seed-*"))

    assert seeds() == []
    reset(engine, instance_id)
    assert seeds() == [f"seed-{base_id}"]
    for _ in range(2):
        psql(dsn, "insert into t values (9); create table scratch(y int)")
        assert reset(engine, instance_id)["dsn"] == dsn
        assert psql(dsn, "select string_agg(x::text, ',') from t") == "1"
        assert psql(dsn, "select count(*) from pg_tables where tablename = 'scratch'") == "0"
    parts = urllib.parse.urlsplit(dsn)
    wrong = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(urllib.parse.urlunsplit(wrong)).close()
    reset(engine, instance_id, {"state_id": branch_id})
    assert seeds() == [f"seed-{branch_id}"]
    assert psql(dsn, "select string_agg(x::text, ',' order by x) from t") == "1,2"
    reset(engine, instance_id, {"state_id": base_id})
    assert seeds() == [f"seed-{base_id}"]
    assert psql(dsn, "select string_agg(x::text, ',') from t") == "1"


def test_the_seed_is_made_where_no_client_reaches(engine_factory: Any, tmp_path: Path) -> None:
    """While a first reset makes its seed (paused there), the instance's port is not served:
    a client with the DSN cannot connect, so nothing it writes can end up in every later
    reset; the reset then answers and the DSN works again."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    engine: EngineProcess = without_warm_pool(engine_factory(
        env={"SQLRS_TEST_HOOKS_DIR": str(hooks)}))
    if not seeds_resets(engine):
        pytest.skip("reset seeds are made for root's host overlays only")
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    (hooks / "reset-seed-server").touch()
    answer: list[Any] = []
    thread = threading.Thread(target=lambda: answer.append(
        engine.post(f"/v1/instances/{instance_id}/reset", None, timeout=300)), daemon=True)
    thread.start()
    try:
        poll(lambda: (hooks / "reset-seed-server.reached").exists(), 120,
             what="the seed's server")
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn, connect_timeout=5).close()
    finally:
        (hooks / "reset-seed-server.release").touch()
        thread.join(300)
    assert answer and answer[0].status == 200, answer
    psql(dsn, "insert into t values (1)")
    assert reset(engine, instance_id)["dsn"] == dsn
    assert psql(dsn, "select count(*) from t") == "0"


def test_reset_to_another_state_of_the_image_and_back(engine: EngineProcess,
                                                      tmp_path: Path) -> None:
    base = prepared(engine, tmp_path, "base", "create table t(x int);")
    branch = prepared(engine, tmp_path, "branch", "insert into t select generate_series(1, 5);",
                      parent="base")
    instance_id, dsn = base["result"]["instance_id"], base["result"]["dsn"]
    entry = reset(engine, instance_id, {"state_id": branch["result"]["state_id"]})
    assert entry["state_id"] == branch["result"]["state_id"]
    assert psql(dsn, "select count(*) from t") == "5"
    listed = engine.get(f"/v1/instances/{instance_id}").json()
    assert listed["state_id"] == branch["result"]["state_id"]
    back = reset(engine, instance_id, {"state_id": base["result"]["state_id"]})
    assert back["state_id"] == base["result"]["state_id"]
    assert psql(dsn, "select count(*) from t") == "0"
    # the branch's own instance never noticed
    assert psql(branch["result"]["dsn"], "select count(*) from t") == "5"


def test_an_open_session_is_disconnected_and_reconnects(engine: EngineProcess,
                                                        tmp_path: Path) -> None:
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("insert into t values (1)")
        entry = reset(engine, instance_id)
        assert entry["disconnected_sessions"] >= 1
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("select 1")
    finally:
        conn.close()
    with psycopg2.connect(dsn) as again, again.cursor() as cur:
        cur.execute("select count(*) from t")
        assert cur.fetchone() == (0,)


def test_a_reset_refuses_a_run_in_progress_and_bad_states(engine: EngineProcess,
                                                          tmp_path: Path) -> None:
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    psql(dsn, "insert into t values (1)")
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(post_run(
        engine, instance_id, "-XAt", "-c", "select pg_sleep(600)", timeout=900)))
    runner.start()
    try:
        poll(lambda: psql(dsn, "select count(*) from pg_stat_activity"
                               " where query like 'select pg_sleep%'") == "1",
             60, what="the run's query to be running")
        busy = engine.post(f"/v1/instances/{instance_id}/reset")
        assert_error(busy, 409, "conflict")
    finally:
        psql(dsn, "select pg_cancel_backend(pid) from pg_stat_activity"
                  " where query like 'select pg_sleep%'")
        runner.join(120)
    assert psql(dsn, "select count(*) from t") == "1", "a refused reset changed the data"
    assert_error(engine.post(f"/v1/instances/{instance_id}/reset", {"state_id": "xyz"}), 400)
    assert_error(engine.post(f"/v1/instances/{instance_id}/reset", {"state_id": "0" * 64}), 404)
    assert_error(engine.post(f"/v1/instances/{instance_id}/reset", {"state_id": 7}), 400)
    assert_error(engine.post(f"/v1/instances/{instance_id}/reset", raw=b"{"), 400)
    assert engine.post("/v1/instances/no-such-instance/reset").status == 404
    assert psql(dsn, "select count(*) from t") == "1"


def test_a_state_of_another_image_is_refused(engine_factory: Any, tmp_path: Path) -> None:
    """A state built on the other runtime's image is a 409 and changes nothing."""
    engine: EngineProcess = engine_factory()
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    other_image = "host:15" if engine.image != "host:15" else None
    if other_image is None:  # on the host: a state of the Docker image needs Docker; use
        other = engine.prepare(["-c", "create table u(x int)"],  # an absolute-bindir image
                               image="host:/usr/lib/postgresql/15/bin")
    else:
        other = engine.prepare(["-c", "create table u(x int)"], image=other_image)
    assert other["status"] == "succeeded", other.get("error")
    refused = engine.post(f"/v1/instances/{job['result']['instance_id']}/reset",
                          {"state_id": other["result"]["state_id"]})
    if engine.image == "host:15":  # the same binaries resolve to the same image id
        assert refused.status == 200, refused.body
    else:
        assert_error(refused, 409, "conflict")
        assert psql(job["result"]["dsn"], "select count(*) from t") == "0"


def server_pid(engine: EngineProcess, instance_id: str) -> int:
    runtime_id = engine.get(f"/v1/instances/{instance_id}").json()["runtime_id"]
    assert runtime_id.startswith("host:"), runtime_id
    return int(runtime_id.removeprefix("host:"))


def test_later_resets_keep_the_postmaster_and_its_port(engine: EngineProcess,
                                                        tmp_path: Path) -> None:
    """As root on the host, a reset with the instance's seed of the state is made in place:
    the postmaster stays (its pid, its listening socket) and restarts its processes on the
    new data, as after a crash; the open session is disconnected, the data is the state's,
    the password still required, and the server accepts sessions at the answer."""
    if not seeds_resets(engine):
        pytest.skip("resets in place are made for root's host overlays only")
    job = prepared(engine, tmp_path, "base", "create table t(x int); insert into t values (1);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    reset(engine, instance_id)  # the first makes the seed
    postmaster = server_pid(engine, instance_id)
    server_log = engine.store / "instances" / instance_id / "postgres.log"
    for round_ in range(2):
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("insert into t values (2); create table scratch(y int)")
            restarts = server_log.read_text(errors="replace").count("reinitializing")
            entry = reset(engine, instance_id)
            with psycopg2.connect(dsn, connect_timeout=5) as fresh, fresh.cursor() as cur:
                cur.execute("select string_agg(x::text, ','), to_regclass('scratch') from t")
                assert cur.fetchone() == ("1", None), f"round {round_}"
            assert entry["dsn"] == dsn and entry["disconnected_sessions"] >= 1
            assert server_pid(engine, instance_id) == postmaster, "a new postmaster started"
            assert server_log.read_text(errors="replace").count("reinitializing") == restarts + 1
            with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
                cur.execute("select 1")
        finally:
            conn.close()
    parts = urllib.parse.urlsplit(dsn)
    wrong = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(urllib.parse.urlunsplit(wrong)).close()


def test_a_changed_configuration_gets_a_new_postmaster(engine: EngineProcess,
                                                       tmp_path: Path) -> None:
    """ALTER SYSTEM changed the instance's configuration, which a postmaster reads only when
    it starts (or reloads): the reset starts a new one, and the state's settings are back;
    the next reset is made in place again."""
    if not seeds_resets(engine):
        pytest.skip("resets in place are made for root's host overlays only")
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    reset(engine, instance_id)
    before = server_pid(engine, instance_id)
    default = psql(dsn, "show work_mem")
    psql(dsn, "alter system set work_mem = '77MB'")
    psql(dsn, "select pg_reload_conf()")
    poll(lambda: psql(dsn, "show work_mem") == "77MB", 30, what="the reload")
    reset(engine, instance_id)
    assert psql(dsn, "show work_mem") == default
    after = server_pid(engine, instance_id)
    assert after != before, "the postmaster that read the changed configuration went on"
    reset(engine, instance_id)
    assert server_pid(engine, instance_id) == after


@pytest.mark.parametrize("point,in_place", [
    ("reset", False), ("reset-started", False), ("reset-seed-server", False),
    ("reset-seed", False), ("reset", True), ("reset-started", True)])
def test_a_kill_during_a_reset_finishes_it_on_restart(engine_factory: Any, tmp_path: Path,
                                                      point: str, in_place: bool) -> None:
    """The engine is killed (-9) at the pause point ``reset`` (the server stopped, the intent
    written, the data not yet replaced), ``reset-started`` (the server runs on the new data,
    without the instance's password, the row not updated), ``reset-seed-server`` (a first
    reset's seed server runs on a port of its own) or ``reset-seed`` (it stopped cleanly);
    ``in_place``: during a later reset, made in place (at ``reset`` its postmaster is
    stopped, SIGSTOP, and its processes killed): the next engine finishes the reset (and
    stops a seed server left behind, kills a postmaster left stopped); the instance holds
    the state's data (not a mix), its row says so, and it answers with the same DSN on the
    next run."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    engine: EngineProcess = without_warm_pool(engine_factory(
        env={"SQLRS_TEST_HOOKS_DIR": str(hooks)}))
    if (point.startswith("reset-seed") or in_place) and not seeds_resets(engine):
        pytest.skip("reset seeds are made for root's host overlays only")
    job = prepared(engine, tmp_path, "base", "create table t(x int);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    old_pid = None
    if in_place:
        reset(engine, instance_id)
        old_pid = server_pid(engine, instance_id)
    psql(dsn, "insert into t values (1)")
    killed_at(engine, hooks, point, "POST", f"/v1/instances/{instance_id}/reset")
    if old_pid and point == "reset":  # the postmaster is left stopped, holding the port
        assert Path(f"/proc/{old_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    again: EngineProcess = engine_factory(state_dir=engine.state_dir)
    entry = again.get(f"/v1/instances/{instance_id}").json()
    assert entry["state_id"] == job["result"]["state_id"]
    assert sql_via_run(again, instance_id, "select count(*) from t") == "0"
    restarted = again.get(f"/v1/instances/{instance_id}").json()
    assert restarted["dsn"] == dsn, "the restarted instance has another DSN"
    out = subprocess.run([f"{PG_BIN}/psql", "-XAt", dsn, "-c", "select 1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "1", out.stderr
    if old_pid and point == "reset":
        poll(lambda: not os.path.exists(f"/proc/{old_pid}")
             or "zombie" in Path(f"/proc/{old_pid}/status").read_text().lower(), 30,
             what="the stopped postmaster gone")


def test_a_reset_whose_old_server_is_slow_to_end_keeps_its_port(engine: EngineProcess,
                                                                 tmp_path: Path) -> None:
    """The old postmaster is stopped (SIGSTOP) by someone else, so that it holds the port
    through the reset and cannot end: the reset is not made in place (a stopped server is not
    the engine's to restart), the engine waits for it (SIGKILL after its grace) and starts a
    new server on the same port: the same DSN, the state's data."""
    if engine.image != HOST_IMAGE:
        pytest.skip("a Docker instance's server ends inside its container before the next")
    job = prepared(engine, tmp_path, "base", "create table t(x int); insert into t values (1);")
    instance_id, dsn = job["result"]["instance_id"], job["result"]["dsn"]
    reset(engine, instance_id)  # (as root, the first reset makes the seed of the next)
    psql(dsn, "insert into t values (2)")
    runtime_id = engine.get(f"/v1/instances/{instance_id}").json()["runtime_id"]
    old_pid = int(runtime_id.removeprefix("host:"))
    os.kill(old_pid, signal.SIGSTOP)
    try:
        entry = reset(engine, instance_id)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGCONT)
    assert entry["dsn"] == dsn and entry["runtime_id"] != runtime_id
    assert psql(dsn, "select string_agg(x::text, ',') from t") == "1"
    poll(lambda: not os.path.exists(f"/proc/{old_pid}")
         or "zombie" in Path(f"/proc/{old_pid}/status").read_text().lower(), 30,
         what="the old postmaster gone")
    again = reset(engine, instance_id)  # and the next reset is an ordinary one
    assert again["dsn"] == dsn
