"""``POST /v1/instances/{idOrName}/snapshot``: a live branch. The new state holds every
transaction committed before the call and nothing that was not committed, while the instance's
clients stay connected; it is a full citizen (instances, branches of branches, resets to it,
deletion trees); a kill -9 during one leaves no half state."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
from conftest import (
    HOST_IMAGE,
    PG_BIN,
    RUNTIMES,
    EngineProcess,
    assert_error,
    killed_at,
    poll,
    psql,
    sql_via_run,
    state_dirs,
    without_warm_pool,
)

pytestmark = RUNTIMES


def instance_of(engine: EngineProcess, sql: str) -> dict[str, Any]:
    job = engine.prepare(["-c", sql])
    assert job["status"] == "succeeded", job.get("error")
    result: dict[str, Any] = job["result"]
    return result


def snapshot(engine: EngineProcess, ref: str, body: Any = None) -> dict[str, Any]:
    made = engine.post(f"/v1/instances/{ref}/snapshot", body, timeout=300)
    assert made.status == 201, made.body
    state: dict[str, Any] = made.json()
    return state


def new_instance(engine: EngineProcess, state_id: str) -> dict[str, Any]:
    made = engine.post("/v1/instances", {"state_id": state_id}, timeout=300)
    assert made.status == 201, made.body
    entry: dict[str, Any] = made.json()
    return entry


class SequencedWriter:
    """Commits ``insert into log values (n)`` for n = 1, 2, … one at a time (autocommit)
    until stopped; ``acked`` is the highest n whose commit returned."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.acked = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            conn.autocommit = True  # (``with conn`` would open a transaction even so)
            try:
                with conn.cursor() as cur:
                    n = 0
                    while not self._stop.is_set():
                        n += 1
                        cur.execute("insert into log values (%s)", (n,))
                        self.acked = n
            finally:
                conn.close()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> SequencedWriter:
        self._thread.start()
        poll(lambda: self.acked > 20 or self.error is not None, 60, what="the writer to run")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_snapshot_under_pgbench_holds_exactly_what_was_acknowledged(
        engine: EngineProcess, tmp_path: Path) -> None:
    """pgbench -c 4 writes throughout and ends without an error; a sequenced writer shows
    the new state holds 1..k with no gap, every row acknowledged before the call and none
    written after it returned."""
    source = instance_of(engine, "create table log(seq int primary key);"
                                 " create table noise(id bigserial primary key, v float8);")
    dsn = source["dsn"]
    script = tmp_path / "noise.sql"
    script.write_text("insert into noise(v) values (random());\n"
                      "update noise set v = v + 1 where id = (select max(id) from noise);\n")
    bench = subprocess.Popen([f"{PG_BIN}/pgbench", "-n", "-c", "4", "-T", "8", "-f",
                              str(script), dsn], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        with SequencedWriter(dsn) as writer:
            time.sleep(0.5)  # let pgbench load the server (a workload, not a readiness wait)
            before = writer.acked
            state = snapshot(engine, source["instance_id"], {"name": "under-load"})
            after = writer.acked + 1  # the next one cannot have been acknowledged yet
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert writer.error is None, writer.error
    assert bench.returncode == 0, err
    assert "number of failed transactions: 0" in out or "failed" not in out, out
    assert state["prepare_kind"] == "snapshot" and state["name"] == "under-load"
    assert state["parent_state_id"] == engine.get(
        f"/v1/instances/{source['instance_id']}").json()["state_id"]
    assert state["source_instance_id"] == source["instance_id"]
    branch = new_instance(engine, state["state_id"])
    count, top = psql(branch["dsn"], "select count(*), coalesce(max(seq), 0) from log").split("|")
    assert int(count) == int(top), f"a gap: {count} rows up to {top}"
    assert before <= int(top) < after + 50, (before, top, after)
    assert int(psql(branch["dsn"], "select count(*) from noise")) > 0


def test_open_transactions_carry_on_and_stay_out(engine: EngineProcess) -> None:
    source = instance_of(engine, "create table t(x int);")
    conn = psycopg2.connect(source["dsn"])
    try:
        with conn.cursor() as cur:
            cur.execute("insert into t values (1)")  # open, not committed
            state = snapshot(engine, source["instance_id"])
            cur.execute("insert into t values (2)")
        conn.commit()
    finally:
        conn.close()
    assert psql(source["dsn"], "select count(*) from t") == "2"
    branch = new_instance(engine, state["state_id"])
    assert psql(branch["dsn"], "select count(*) from t") == "0"


def test_ddl_during_a_snapshot_and_branches_of_branches(engine: EngineProcess) -> None:
    source = instance_of(engine, "create table base(x int);")
    stop = threading.Event()
    made: list[int] = []

    def ddl() -> None:
        conn = psycopg2.connect(source["dsn"])
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute(f"create table t{len(made)}(x int primary key, y text)")
                    cur.execute(f"create index on t{len(made)}(y)")
                    made.append(len(made))
        finally:
            conn.close()

    worker = threading.Thread(target=ddl)
    worker.start()
    try:
        poll(lambda: len(made) > 5, 60, what="the DDL to run")
        first = snapshot(engine, source["instance_id"])
    finally:
        stop.set()
        worker.join(60)
    one = new_instance(engine, first["state_id"])
    tables = int(psql(one["dsn"], "select count(*) from pg_tables where tablename ~ '^t[0-9]+$'"))
    assert 5 <= tables <= len(made)
    assert psql(one["dsn"], f"select count(*) from t{tables - 1}") == "0"  # usable, indexed
    psql(one["dsn"], "create table second_level(x int); insert into second_level values (2)")
    second = snapshot(engine, one["instance_id"])
    assert second["parent_state_id"] == first["state_id"]
    two = new_instance(engine, second["state_id"])
    assert psql(two["dsn"], "select x from second_level") == "2"
    assert int(psql(two["dsn"], "select count(*) from pg_tables where tablename ~ '^t[0-9]+$'")) \
        == tables
    # resets to the branch and back to the prepared state
    reset = engine.post(f"/v1/instances/{source['instance_id']}/reset",
                        {"state_id": second["state_id"]})
    assert reset.status == 200, reset.body
    assert psql(source["dsn"], "select x from second_level") == "2"
    back = engine.post(f"/v1/instances/{source['instance_id']}/reset",
                       {"state_id": engine.get(f"/v1/states/{first['parent_state_id']}")
                        .json()["state_id"]})
    assert back.status == 200, back.body
    assert psql(source["dsn"], "select count(*) from pg_tables where tablename = 'base'") == "1"


def test_a_snapshot_keeps_alter_system_and_its_instances_restart(
        engine: EngineProcess) -> None:
    """What ALTER SYSTEM wrote (postgresql.auto.conf, a top-level file of the data) is in the
    snapshot and in its branches; an instance of a snapshot whose server died (the first
    start of which recovered the backup and set its label aside) starts again from its own
    data, not from the backup again (whose WAL is gone by then)."""
    source = instance_of(engine, "create table t(x int)")
    psql(source["dsn"], "alter system set work_mem = '77MB'")
    psql(source["dsn"], "insert into t values (1)")
    child = new_instance(engine, snapshot(engine, source["instance_id"])["state_id"])
    assert psql(child["dsn"], "show work_mem") == "77MB"
    psql(child["dsn"], "insert into t values (2)")
    if engine.image == HOST_IMAGE:
        runtime_id = engine.get(f"/v1/instances/{child['instance_id']}").json()["runtime_id"]
        pid = int(runtime_id.removeprefix("host:"))
        for _ in range(4):  # the WAL from the backup's start goes
            psql(child["dsn"], "select pg_switch_wal()")
            psql(child["dsn"], "checkpoint")
        os.kill(pid, signal.SIGKILL)
        poll(lambda: not os.path.exists(f"/proc/{pid}")
             or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), 30,
             what="the child's postmaster gone")
        assert sql_via_run(engine, child["instance_id"],
                           "select string_agg(x::text, ',' order by x) from t") == "1,2"
        assert sql_via_run(engine, child["instance_id"], "show work_mem") == "77MB"
    grandchild = new_instance(engine, snapshot(engine, child["instance_id"])["state_id"])
    assert psql(grandchild["dsn"], "show work_mem") == "77MB"
    assert psql(grandchild["dsn"], "select string_agg(x::text, ',' order by x) from t") == "1,2"


def test_snapshots_in_deletion_trees(engine: EngineProcess) -> None:
    without_warm_pool(engine)
    source = instance_of(engine, "create table t(x int);")
    parent_id = engine.get(f"/v1/instances/{source['instance_id']}").json()["state_id"]
    psql(source["dsn"], "insert into t values (1)")
    state = snapshot(engine, source["instance_id"], {"name": "kept"})
    assert_error(engine.post(f"/v1/instances/{source['instance_id']}/snapshot",
                             {"name": "kept"}), 409, "conflict")
    assert_error(engine.post(f"/v1/instances/{source['instance_id']}/snapshot",
                             {"name": "no spaces"}), 400)
    assert engine.post("/v1/instances/no-such/snapshot").status == 404
    # the source instance goes; the snapshot stays
    assert engine.delete(f"/v1/instances/{source['instance_id']}").status == 200
    branch = new_instance(engine, state["state_id"])
    assert psql(branch["dsn"], "select count(*) from t") == "1"
    # the parent has a child: deleting it alone is blocked
    blocked = engine.delete(f"/v1/states/{parent_id}")
    assert blocked.status == 409, blocked.body
    assert engine.delete(f"/v1/instances/{branch['instance_id']}").status == 200
    assert engine.delete(f"/v1/states/{state['state_id']}").status == 200
    assert engine.delete(f"/v1/states/{parent_id}").status == 200
    assert engine.get(f"/v1/states/{state['state_id']}").status == 404


def test_a_kill_during_a_snapshot_leaves_no_half_state(engine_factory: Any,
                                                       tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    engine: EngineProcess = without_warm_pool(engine_factory(
        env={"SQLRS_TEST_HOOKS_DIR": str(hooks)}))
    source = instance_of(engine, "create table t(x int); insert into t values (1);")
    states = state_dirs(engine)
    killed_at(engine, hooks, "snapshot-copy", "POST",
              f"/v1/instances/{source['instance_id']}/snapshot")
    again: EngineProcess = engine_factory(state_dir=engine.state_dir)
    assert state_dirs(again) == states
    assert [s["prepare_kind"] for s in again.get("/v1/states").json()] == ["psql"]
    assert not list(again.store.rglob(".tmp-*"))
    # the instance works and the interrupted backup is over: a new snapshot succeeds
    assert psql(source["dsn"], "select count(*) from t") == "1"
    state = snapshot(again, source["instance_id"])
    assert psql(new_instance(again, state["state_id"])["dsn"], "select count(*) from t") == "1"


def test_a_snapshot_answers_before_its_flush_and_a_reboot_drops_an_unflushed_one(
        engine_factory: Any) -> None:
    """A snapshot answers before its files are flushed; the flush follows in the background
    and is recorded. A state still recorded unflushed from another boot (a machine crash came
    first) is removed at start, as a half state; its parent stays."""
    engine: EngineProcess = without_warm_pool(engine_factory())
    source = instance_of(engine, "create table t(x int);")
    state = snapshot(engine, source["instance_id"])
    db = engine.store / "state.db"

    def unflushed() -> Any:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return conn.execute("select unflushed_boot from states where state_id = ?",
                                (state["state_id"],)).fetchone()[0]

    poll(lambda: unflushed() is None, 60, what="the background flush")
    assert engine.delete(f"/v1/instances/{source['instance_id']}").status == 200
    assert engine.stop() == 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("update states set unflushed_boot = 'another-boot' where state_id = ?",
                     (state["state_id"],))
    again: EngineProcess = engine_factory(state_dir=engine.state_dir)
    assert again.get(f"/v1/states/{state['state_id']}").status == 404
    assert state["state_id"] not in state_dirs(again)
    assert again.get(f"/v1/states/{state['parent_state_id']}").status == 200


def test_eviction_during_a_snapshot_takes_only_what_nothing_uses(engine_factory: Any,
                                                                 tmp_path: Path) -> None:
    """Cache pressure while a snapshot copies (arranged with a pause point): a prepare
    publishes under a cache far too small, so eviction runs and takes the state nothing uses,
    never the instance's (its row protects it) nor the prepare's own new state (its instance
    is made from it next: on Docker that once failed the prepare); the snapshot then answers
    with a whole state, and every listed state has its files and every state directory its
    row."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    engine: EngineProcess = without_warm_pool(engine_factory(
        env={"SQLRS_TEST_HOOKS_DIR": str(hooks)}))
    source = instance_of(engine, "create table t(x int); insert into t values (1);")
    parent_id = engine.get(f"/v1/instances/{source['instance_id']}").json()["state_id"]
    spare = instance_of(engine, "create table spare(x int);")
    assert engine.delete(f"/v1/instances/{spare['instance_id']}").status == 200
    size = int(engine.get(f"/v1/states/{parent_id}").json()["size_bytes"])
    (hooks / "snapshot-copy").touch()
    with ThreadPoolExecutor(1) as pool:
        made = pool.submit(engine.post, f"/v1/instances/{source['instance_id']}/snapshot",
                           None, timeout=300)
        try:
            poll(lambda: (hooks / "snapshot-copy.reached").exists(), 120,
                 what="the snapshot to reach its copy")
            for path, value in (("cache.capacity.minStateAge", "0s"),
                                ("cache.capacity.lowWatermark", 0.2),
                                ("cache.capacity.highWatermark", 0.3),
                                ("cache.capacity.maxBytes", size * 3)):
                patched = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
                assert patched.status == 200, patched.body
            job = engine.prepare(["-c", "create table other(x int)"])
            assert job["status"] == "succeeded", job.get("error")
            assert engine.get(f"/v1/states/{spare['state_id']}").status == 404, \
                "eviction did not run: the test arranged nothing"
            assert engine.get(f"/v1/states/{parent_id}").status == 200
        finally:
            (hooks / "snapshot-copy.release").touch()
        answer = made.result(timeout=300)
    assert answer.status == 201, answer.body
    branch = new_instance(engine, answer.json()["state_id"])
    assert psql(branch["dsn"], "select count(*) from t") == "1"
    listed = {s["state_id"] for s in engine.get("/v1/states").json()}
    assert {Path(d).name for d in state_dirs(engine)} == listed
