"""Prepare jobs end to end on the host runtime against real PostgreSQL (issue 3)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import (
    HOST_IMAGE,
    RUNTIMES,
    EngineProcess,
    OpenApiChecker,
    assert_error,
    expose_root,
    leftover_servers,
    mounts_below,
    poll,
    psql,
    state_dirs,
    without_warm_pool,
)

pytestmark = RUNTIMES


def steps_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [task for task in job["tasks"] if task["type"] == "state_execute"]


def events_of(engine: EngineProcess, job_id: str) -> list[dict[str, Any]]:
    return engine.get(f"/v1/prepare-jobs/{job_id}/events").ndjson()


def stored_job(engine: EngineProcess, job_id: str) -> tuple[str, int]:
    """The job's status and crash attempts as state.db holds them (read with no engine up)."""
    with contextlib.closing(sqlite3.connect(engine.store / "state.db")) as db:
        row = db.execute("SELECT status, attempts FROM prepare_jobs WHERE job_id = ?",
                         (job_id,)).fetchone()
    assert row is not None, job_id
    return str(row[0]), int(row[1])


# --- success, cache hits, DSN ------------------------------------------------------------


def test_two_step_prepare_and_cache_hit(engine: EngineProcess, scripts: Path,
                                        openapi: OpenApiChecker) -> None:
    args = ["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")]
    job = engine.prepare(args)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert psql(result["dsn"], "select count(*) from items") == "100"
    with psycopg2.connect(result["dsn"]) as conn, conn.cursor() as cur:
        cur.execute("select label from items where id = 7")
        assert cur.fetchone() == ("item 7",)
    conn.close()
    assert [s["cached"] for s in steps_of(job)] == [False, False]
    assert result["prepare_args_normalized"] == " ".join([*args, "-X", "-v", "ON_ERROR_STOP=1"])
    states = engine.get("/v1/states").json()
    assert {s["state_id"] for s in states} == {s["output_state_id"] for s in steps_of(job)}
    child = next(s for s in states if s["state_id"] == result["state_id"])
    assert child["parent_state_id"] == steps_of(job)[0]["output_state_id"]
    status = engine.get(f"/v1/prepare-jobs/{job['job_id']}")
    openapi.check("/v1/prepare-jobs/{jobId}", "GET", status)
    openapi.check("/v1/prepare-jobs", "GET", engine.get("/v1/prepare-jobs"))
    openapi.check("/v1/tasks", "GET", engine.get(f"/v1/tasks?job={job['job_id']}"))

    again = engine.prepare(args)
    assert again["status"] == "succeeded"
    assert [s["cached"] for s in steps_of(again)] == [True, True]
    assert len(engine.get("/v1/states").json()) == 2
    assert again["result"]["state_id"] == result["state_id"]
    assert again["result"]["instance_id"] != result["instance_id"]
    assert psql(again["result"]["dsn"], "select count(*) from items") == "100"


def test_partly_cached_chain_starts_from_deepest_state(engine: EngineProcess,
                                                       scripts: Path) -> None:
    first = engine.prepare(["-f", str(scripts / "schema.sql")])
    both = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    assert [s["cached"] for s in steps_of(both)] == [True, False]
    assert steps_of(both)[1]["input"] == {"kind": "state", "id": first["result"]["state_id"]}
    assert psql(both["result"]["dsn"], "select count(*) from items") == "100"


def test_instances_are_isolated_from_each_other(engine: EngineProcess, scripts: Path) -> None:
    one = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]
    two = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]
    psql(one["dsn"], "insert into items values (1, 'only in one')")
    assert psql(one["dsn"], "select count(*) from items") == "1"
    assert psql(two["dsn"], "select count(*) from items") == "0"


def test_command_and_stdin_inputs(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "create table c(x int)", "-f", "-"],
                         stdin="insert into c values (42);\n")
    assert job["status"] == "succeeded", job
    assert [s.get("args_summary") for _i, s in enumerate(steps_of(job))] == [None, None]
    tasks = engine.get(f"/v1/tasks?job={job['job_id']}").json()
    assert [t.get("args_summary") for t in tasks if t["type"] == "state_execute"] == [
        "-c create table c(x int)", "-f -"]
    assert psql(job["result"]["dsn"], "select x from c") == "42"


def test_includes_enter_the_hash(engine: EngineProcess, tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "part.sql").write_text("create table part(x int);\n")
    main = tmp_path / "main.sql"
    main.write_text("\\ir inc/part.sql\ncreate table after_part(y int);\n")
    job = engine.prepare(["-f", str(main)])
    assert job["status"] == "succeeded", job
    assert psql(job["result"]["dsn"], "select count(*) from part") == "0"
    (tmp_path / "inc" / "part.sql").write_text("create table part(x int, z int);\n")
    changed = engine.prepare(["-f", str(main)])
    assert steps_of(changed)[0]["cached"] is False
    assert changed["result"]["state_id"] != job["result"]["state_id"]


def test_recursive_include_is_rejected(engine: EngineProcess, tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("\\ir b.sql\n")
    (tmp_path / "b.sql").write_text("\\ir a.sql\n")
    job = engine.prepare(["-f", str(tmp_path / "a.sql")])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_argument"
    assert job["error"]["message"] == "recursive include"
    assert engine.get("/v1/states").json() == []


# --- events ------------------------------------------------------------------------------


def test_events_are_complete_ordered_and_resumable(engine: EngineProcess, scripts: Path,
                                                   openapi: OpenApiChecker) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql")])
    events = events_of(engine, job["job_id"])
    assert events[0] == {**events[0], "type": "status", "status": "queued"}
    assert events[1]["status"] == "running"
    assert [e["type"] for e in events[-2:]] == ["status", "result"]
    assert events[-2]["status"] == "succeeded"
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    running = [e["task_id"] for e in events if e["type"] == "task" and e["status"] == "running"]
    # a heartbeat may repeat a running task's event: compare first occurrences
    assert list(dict.fromkeys(running)) == ["plan", "resolve-image", "execute-0",
                                            "prepare-instance"]
    messages = [e.get("message", "") for e in events if e["type"] == "log"]
    assert "psql: CREATE TABLE" in messages
    assert "snapshot: complete" in messages
    resumed = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events",
                         headers={"Range": "events=3-"})
    assert resumed.status == 206
    assert resumed.headers["content-range"].startswith("events 3-")
    assert resumed.ndjson() == events[3:]
    openapi.check("/v1/prepare-jobs/{jobId}/events", "GET", resumed)


def test_heartbeat_repeats_the_running_event(engine: EngineProcess, tmp_path: Path) -> None:
    script = tmp_path / "slow.sql"
    script.write_text("select pg_sleep(1.6);\n")
    job = engine.prepare(["-f", str(script)])
    assert job["status"] == "succeeded"
    logs = [e.get("message") for e in events_of(engine, job["job_id"]) if e["type"] == "log"]
    psql_start = [m for m in logs if m == "psql: start"]
    assert len(psql_start) >= 2, logs


# --- plan only, failures, validation -----------------------------------------------------


def test_plan_only_builds_nothing(engine: EngineProcess, scripts: Path) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")],
                         plan_only=True)
    assert job["status"] == "succeeded"
    assert job["plan_only"] is True
    assert "result" not in job
    assert [t["task_id"] for t in job["tasks"]] == [
        "plan", "resolve-image", "execute-0", "execute-1", "prepare-instance"]
    assert engine.get("/v1/states").json() == []
    assert engine.get("/v1/instances").json() == []


def test_sql_error_fails_cleanly(engine: EngineProcess, scripts: Path) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "fail.sql")])
    assert job["status"] == "failed"
    error = job["error"]
    assert error["message"] == "psql execution failed"
    assert "no_such_table" in error["details"]
    failed = [t for t in engine.get(f"/v1/tasks?job={job['job_id']}").json()
              if t["status"] == "failed"]
    assert [t["task_id"] for t in failed] == ["execute-1"]
    states = engine.get("/v1/states").json()
    assert [s["state_id"] for s in states] == [steps_of(job)[0]["output_state_id"]]
    assert state_dirs(engine) == [steps_of(job)[0]["output_state_id"]]
    assert engine.get("/v1/instances").json() == []
    assert not os.listdir(engine.store / "instances")
    assert leftover_servers(engine.store) == []
    events = events_of(engine, job["job_id"])
    assert [e["type"] for e in events[-2:]] == ["status", "error"]


REJECTIONS = [
    ({"image_id": HOST_IMAGE, "psql_args": []}, "prepare_kind is required"),
    ({"prepare_kind": "mysql", "image_id": HOST_IMAGE}, "unsupported prepare_kind"),
    ({"prepare_kind": "lb", "image_id": HOST_IMAGE}, "lb command is required"),
    ({"prepare_kind": "psql", "image_id": "  "}, "image_id is required"),
    ({"psql_args": ["-h", "localhost", "-c", "select 1"]}, "connection flags are not allowed"),
    ({"psql_args": ["-p5432", "-c", "select 1"]}, "connection flags are not allowed"),
    ({"psql_args": ["--dbname=x", "-c", "select 1"]}, "connection flags are not allowed"),
    ({"psql_args": ["--username", "x", "-c", "select 1"]}, "connection flags are not allowed"),
    ({"psql_args": ["-c", "select 1", "--", "db"]}, "positional arguments are not allowed"),
    ({"psql_args": ["-c", "select 1", "mydb"]}, "positional database arguments are not allowed"),
    ({"psql_args": ["-v", "ON_ERROR_STOP=0", "-c", "select 1"]}, "ON_ERROR_STOP must be set to 1"),
    ({"psql_args": ["-c", "select 1", "-v"]}, "missing value for variable flag"),
    ({"psql_args": ["-f", "relative.sql"]}, "file path must be absolute"),
    ({"psql_args": ["-f", "/no/such/file.sql"]}, "cannot read file"),
    ({"psql_args": ["-f", "-"]}, "stdin is required when using -f -"),
    ({"psql_args": ["-c", "select 1"], "stdin": "x"}, "stdin is only valid with -f -"),
    ({"psql_args": "-c select 1"}, "invalid psql_args"),
    ({"psql_args": ["-c", "select 1"], "plan_only": "yes"}, "invalid plan_only"),
    ({"psql_args": ["-c", "select 1"], "ttl_seconds": -5}, "invalid ttl_seconds"),
]


@pytest.mark.parametrize(("fields", "message"), REJECTIONS)
def test_invalid_requests_are_rejected(engine: EngineProcess, fields: dict[str, Any],
                                       message: str) -> None:
    body = {"prepare_kind": "psql", "image_id": HOST_IMAGE, **fields}
    if "prepare_kind" not in fields and fields.get("image_id") == HOST_IMAGE:
        body.pop("prepare_kind")
    result = engine.post("/v1/prepare-jobs", body)
    assert_error(result, 400, "invalid_argument", message)
    assert engine.get("/v1/prepare-jobs").json() == []


def test_unknown_fields_are_ignored_and_args_normalised(engine: EngineProcess) -> None:
    job = engine.prepare(["--set=ON_ERROR_STOP=1", "--no-psqlrc", "-c", "select 1"],
                         source_manifest={"x": 1})
    assert job["status"] == "succeeded"
    assert job["prepare_args_normalized"] == "-c select 1 -v ON_ERROR_STOP=1 --no-psqlrc"


# --- cancel, delete, retention, concurrency ----------------------------------------------


def slow_job(engine: EngineProcess, tmp_path: Path, seconds: int = 30) -> str:
    script = tmp_path / f"sleep{seconds}.sql"
    script.write_text(f"create table s(x int);\nselect pg_sleep({seconds});\n")
    job_id = engine.submit(["-f", str(script)])
    engine.events_until(job_id, lambda e: e.get("message") == "psql: start")
    return job_id


def test_cancel_running_job(engine: EngineProcess, tmp_path: Path,
                            openapi: OpenApiChecker) -> None:
    job_id = slow_job(engine, tmp_path)
    result = engine.post(f"/v1/prepare-jobs/{job_id}/cancel")
    assert result.status == 202
    openapi.check("/v1/prepare-jobs/{jobId}/cancel", "POST", result)
    job = engine.wait_job(job_id, 30)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "cancelled"
    assert engine.get("/v1/states").json() == []
    assert not os.listdir(engine.store / "instances")
    assert leftover_servers(engine.store) == []
    again = engine.post(f"/v1/prepare-jobs/{job_id}/cancel")
    assert again.status == 200
    assert engine.post("/v1/prepare-jobs/" + "0" * 32 + "/cancel").status == 404


def test_delete_job_blocked_dry_run_force(engine: EngineProcess, tmp_path: Path,
                                          openapi: OpenApiChecker) -> None:
    job_id = slow_job(engine, tmp_path)
    blocked = engine.delete(f"/v1/prepare-jobs/{job_id}")
    assert blocked.status == 409
    assert blocked.json() == {"dry_run": False, "outcome": "blocked",
                              "root": {"kind": "job", "id": job_id, "blocked": "active_tasks"}}
    openapi.check("/v1/prepare-jobs/{jobId}", "DELETE", blocked)
    dry = engine.delete(f"/v1/prepare-jobs/{job_id}?dry_run=true&force=true")
    assert dry.status == 200
    assert dry.json()["outcome"] == "would_delete"
    forced = engine.delete(f"/v1/prepare-jobs/{job_id}?force=true")
    assert forced.status == 200
    assert forced.json()["outcome"] == "deleted"
    assert engine.get(f"/v1/prepare-jobs/{job_id}").status == 404
    assert engine.get(f"/v1/tasks?job={job_id}").json() == []
    assert leftover_servers(engine.store) == []
    assert_error(engine.delete(f"/v1/prepare-jobs/{job_id}"), 404, "not_found", "job not found")


def test_delete_finished_job_keeps_its_instance(engine: EngineProcess, scripts: Path) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql")])
    result = engine.delete(f"/v1/prepare-jobs/{job['job_id']}")
    assert result.status == 200
    assert result.json()["outcome"] == "deleted"
    assert psql(job["result"]["dsn"], "select count(*) from items") == "0"


def test_retention_keeps_max_identical(engine: EngineProcess, scripts: Path) -> None:
    args = ["-f", str(scripts / "schema.sql")]
    ids = [engine.prepare(args)["job_id"] for _ in range(4)]
    remaining = [job["job_id"] for job in engine.get("/v1/prepare-jobs").json()]
    assert remaining == ids[-2:]
    assert engine.request("PATCH", "/v1/config", {"path": "orchestrator.jobs.maxIdentical",
                                                  "value": 1}).status == 200
    last = engine.prepare(args)["job_id"]
    assert [job["job_id"] for job in engine.get("/v1/prepare-jobs").json()] == [last]
    assert len(engine.get("/v1/instances").json()) == 5


def test_identical_prepares_together_build_each_state_once(engine: EngineProcess,
                                                           scripts: Path) -> None:
    args = ["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")]
    job_ids = [engine.submit(args), engine.submit(args)]
    jobs = [engine.wait_job(job_id) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    assert len(engine.get("/v1/states").json()) == 2
    snapshots = [e for job_id in job_ids for e in events_of(engine, job_id)
                 if e.get("message") == "snapshot: complete"]
    assert len(snapshots) == 2
    for job in jobs:
        assert psql(job["result"]["dsn"], "select count(*) from items") == "100"


# --- crash recovery ----------------------------------------------------------------------


def test_kill_9_during_a_job_then_restart_completes_it(engine_factory: Any, tmp_path: Path,
                                                       scripts: Path) -> None:
    engine: EngineProcess = without_warm_pool(engine_factory())
    slow = tmp_path / "slow.sql"
    slow.write_text("create table slow(x int);\nselect pg_sleep(5);\n")
    job_id = engine.submit(["-f", str(scripts / "schema.sql"), "-f", str(slow)])
    step_two = [False]

    def second_psql(event: dict[str, Any]) -> bool:
        step_two[0] |= event.get("task_id") == "execute-1"
        return step_two[0] and event.get("message") == "psql: start"

    engine.events_until(job_id, second_psql)
    engine.proc.send_signal(signal.SIGKILL)
    engine.proc.wait(10)
    assert engine.engine_json.exists()
    assert stored_job(engine, job_id)[0] == "running", "the job ended before the kill"
    restarted: EngineProcess = engine_factory(state_dir=engine.state_dir)
    job = restarted.wait_job(job_id)
    assert job["status"] == "succeeded", job
    states = restarted.get("/v1/states").json()
    assert len(states) == 2
    assert sorted(state_dirs(restarted)) == sorted(s["state_id"] for s in states)
    instances = restarted.get("/v1/instances").json()
    assert [i["instance_id"] for i in instances] == [job["result"]["instance_id"]]
    assert psql(job["result"]["dsn"], "select count(*) from slow") == "0"
    # the instance's data: mounted here on the host; a container mounts its own overlay
    assert len(mounts_below(expose_root(restarted.store))) == \
        (1 if restarted.image == HOST_IMAGE else 0)
    assert len(leftover_servers(restarted.store)) == 1
    assert sorted(os.listdir(restarted.store / "instances")) == [job["result"]["instance_id"]]


def test_job_that_keeps_crashing_the_engine_fails(engine_factory: Any, tmp_path: Path) -> None:
    engine: EngineProcess = engine_factory()
    job_id = slow_job(engine, tmp_path)
    engine.proc.send_signal(signal.SIGKILL)
    engine.proc.wait(10)
    with sqlite3.connect(engine.store / "state.db") as db:
        db.execute("UPDATE prepare_jobs SET attempts = 3 WHERE job_id = ?", (job_id,))
    restarted: EngineProcess = engine_factory(state_dir=engine.state_dir)
    job = restarted.wait_job(job_id)
    assert job["status"] == "failed"
    assert job["error"]["message"] == "job aborted after repeated engine crashes"
    poll(lambda: leftover_servers(restarted.store) == [], 30, 0.1,
         what="the interrupted job's server to be removed")


def test_graceful_stop_requeues_running_job(engine_factory: Any, tmp_path: Path) -> None:
    """SIGTERM while the step sleeps (``slow_job`` returns once its psql started, seconds
    before it could end): the job goes back to the queue without counting as a crash, and
    the next engine runs it to the end."""
    engine: EngineProcess = engine_factory()
    job_id = slow_job(engine, tmp_path, seconds=8)
    assert engine.stop() == 0
    assert not engine.engine_json.exists()
    assert leftover_servers(engine.store) == []
    assert stored_job(engine, job_id) == ("queued", 0)
    restarted: EngineProcess = engine_factory(state_dir=engine.state_dir)
    job = restarted.wait_job(job_id)
    assert job["status"] == "succeeded", job


def test_events_stream_follows_a_running_job(engine: EngineProcess, tmp_path: Path) -> None:
    """One events request, opened while the job runs, hands out each event as it comes (the
    job still runs when its psql start arrives) and ends after the result."""
    script = tmp_path / "s.sql"
    script.write_text("select pg_sleep(3);\n")
    job_id = engine.submit(["-f", str(script)])
    lines: list[dict[str, Any]] = []
    status_at_psql_start = None
    for event in engine.follow_events(job_id):
        lines.append(event)
        if status_at_psql_start is None and event.get("message") == "psql: start":
            status_at_psql_start = engine.get(f"/v1/prepare-jobs/{job_id}").json()["status"]
    assert status_at_psql_start == "running", lines
    assert lines[-1]["type"] == "result"
    assert lines[-1]["result"]["dsn"].startswith("postgres://sqlrs@127.0.0.1:")
    assert lines == events_of(engine, job_id)


def test_state_under_a_running_build_cannot_be_deleted(engine: EngineProcess, scripts: Path,
                                                       tmp_path: Path) -> None:
    base = engine.prepare(["-f", str(scripts / "schema.sql")])
    assert engine.delete(f"/v1/instances/{base['result']['instance_id']}").status == 200
    state_id = base["result"]["state_id"]
    slow = tmp_path / "slow.sql"
    slow.write_text("select pg_sleep(30);\n")
    job_id = engine.submit(["-f", str(scripts / "schema.sql"), "-f", str(slow)])
    engine.events_until(job_id, lambda e: e.get("message") == "psql: start")
    for query in ("", "?recurse=true&force=true"):
        blocked = engine.delete(f"/v1/states/{state_id}{query}")
        assert blocked.status == 409, blocked.body
        assert blocked.json()["root"]["blocked"] == "active_tasks"
    assert engine.post(f"/v1/prepare-jobs/{job_id}/cancel").status == 202
    assert engine.wait_job(job_id)["status"] == "failed"
    assert engine.delete(f"/v1/states/{state_id}").status == 200
    assert state_dirs(engine) == []
