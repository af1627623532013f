"""Liquibase prepares (``prepare_kind: "lb"``) on both runtimes: the plan lists the pending
changesets, each changeset is one cached state, a failing changeset fails the job cleanly,
the cache explanation and the events stream; and the lb-specific request rejections.

Liquibase runs as the unprivileged ``postgres`` user, so changelogs live in a fresh
world-readable directory below /tmp (not below pytest's 0700 ``tmp_path``). Every Liquibase
run is a JVM start (~2-3 s on a busy 2-core machine) and a prepare runs one per pending
changeset plus one to plan, hence the generous deadlines.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HOST_IMAGE,
    RUNTIMES,
    EngineProcess,
    assert_error,
    expose_root,
    leftover_servers,
    psql,
)

LIQUIBASE = "/opt/sqlrs-test/liquibase/bin/liquibase"
JOB_DEADLINE = 600.0  #: a prepare of N changesets starts N + 1 JVMs
EXPLAIN_TIMEOUT = 300.0  #: an explanation plans: one JVM start

CHANGESETS = [
    ("alice", "1", "create table items(id int primary key, label text not null);"),
    ("bob", "2", "insert into items values (1, 'one');"),
    ("alice", "3", "insert into items values (2, 'two');"),
]
FOURTH = ("carol", "4", "update items set label = upper(label);")

YAML_CHANGELOG = """\
databaseChangeLog:
  - changeSet:
      id: create-pets
      author: yves
      changes:
        - createTable:
            tableName: pets
            columns:
              - column:
                  name: id
                  type: int
                  constraints:
                    primaryKey: true
              - column:
                  name: name
                  type: varchar(50)
  - changeSet:
      id: add-rex
      author: zoe
      changes:
        - insert:
            tableName: pets
            columns:
              - column:
                  name: id
                  valueNumeric: 7
              - column:
                  name: name
                  value: rex
"""


def formatted_sql(changesets: list[tuple[str, str, str]]) -> str:
    parts = ["--liquibase formatted sql\n"]
    parts += [f"--changeset {author}:{ident}\n{sql}\n" for author, ident, sql in changesets]
    return "\n".join(parts)


@pytest.fixture
def lb_dir() -> Iterator[Path]:
    """A fresh directory the ``postgres`` user can read (0755), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sqlrs-lb-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


def lb_body(engine: EngineProcess, work_dir: Path, *args: str, **extra: Any) -> dict[str, Any]:
    return {"prepare_kind": "lb", "image_id": engine.image,
            "liquibase_args": list(args) or ["update", f"--changelog-file={work_dir}/cl.sql"],
            "liquibase_exec": LIQUIBASE, "work_dir": str(work_dir), **extra}


def lb_prepare(engine: EngineProcess, work_dir: Path, *args: str,
               **extra: Any) -> dict[str, Any]:
    result = engine.post("/v1/prepare-jobs", lb_body(engine, work_dir, *args, **extra))
    assert result.status == 201, result.body
    return engine.wait_job(str(result.json()["job_id"]), JOB_DEADLINE)


def steps_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [task for task in job["tasks"] if task["type"] == "state_execute"]


def events_of(engine: EngineProcess, job_id: str) -> list[dict[str, Any]]:
    return engine.get(f"/v1/prepare-jobs/{job_id}/events", timeout=JOB_DEADLINE).ndjson()


def messages(events: list[dict[str, Any]]) -> list[str]:
    """Log messages with the heartbeat's repeats (the same event again) collapsed."""
    found: list[str] = []
    previous: dict[str, Any] | None = None
    for event in events:
        bare = {k: v for k, v in event.items() if k != "ts"}
        if bare != previous and event.get("type") == "log":
            found.append(str(event["message"]))
        previous = bare
    return found


def execs(events: list[dict[str, Any]], command: str) -> list[str]:
    """The ``liquibase: exec`` lines that ran ``command`` (step 0 run while planning too)."""
    return [m for m in messages(events)
            if m.startswith(("liquibase: exec ", "liquibase: [execute-0] exec "))
            and f" {command} " in f"{m} "]


def ran_ahead(events: list[dict[str, Any]]) -> list[str]:
    """What became of step 0 run while Liquibase planned."""
    return [m for m in messages(events) if m.startswith("liquibase: execute-0 ")]


def explain(engine: EngineProcess, body: dict[str, Any]) -> dict[str, Any]:
    result = engine.post("/v1/cache/explain/prepare", body, timeout=EXPLAIN_TIMEOUT)
    assert result.status == 200, result.body
    answer: dict[str, Any] = result.json()
    return answer


# --- plan, prepare, cache --------------------------------------------------------------------


@RUNTIMES
def test_plan_only_lists_pending_changesets(engine: EngineProcess, lb_dir: Path) -> None:
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS))
    job = lb_prepare(engine, lb_dir, plan_only=True)
    assert job["status"] == "succeeded", job.get("error")
    assert job["plan_only"] is True
    ids = [t["task_id"] for t in job["tasks"]]
    expected = ["plan", "execute-0", "execute-1", "execute-2", "prepare-instance"]
    if "@" not in engine.image:
        expected.insert(1, "resolve-image")
    assert ids == expected, ids
    assert job["tasks"][0]["planner_kind"] == "lb"
    steps = steps_of(job)
    assert [(s["changeset_id"], s["changeset_author"], s["changeset_path"]) for s in steps] == [
        ("1", "alice", "cl.sql"), ("2", "bob", "cl.sql"), ("3", "alice", "cl.sql")]
    assert [s["cached"] for s in steps] == [False, False, False]
    assert steps[0]["input"]["kind"] == "image"
    for before, after in itertools.pairwise(steps):
        assert after["input"] == {"kind": "state", "id": before["output_state_id"]}
    assert len({s["task_hash"] for s in steps}) == 3
    events = events_of(engine, job["job_id"])
    assert len(execs(events, "update-sql")) == 1
    assert execs(events, "update-count") == []
    assert "result" not in job
    assert engine.get("/v1/states").json() == []
    assert engine.get("/v1/instances").json() == []


@RUNTIMES
def test_prepare_caches_each_changeset(engine: EngineProcess, lb_dir: Path) -> None:
    changelog = write(lb_dir / "cl.sql", formatted_sql(CHANGESETS))
    first = lb_prepare(engine, lb_dir)
    assert first["status"] == "succeeded", first.get("error")
    assert first["prepare_kind"] == "lb"
    dsn = first["result"]["dsn"]
    assert psql(dsn, "select id, label from items order by id") == "1|one\n2|two"
    assert psql(dsn, "select id || ':' || author || ':' || filename from databasechangelog "
                     "order by orderexecuted") == "1:alice:cl.sql\n2:bob:cl.sql\n3:alice:cl.sql"
    steps = steps_of(first)
    assert [s["cached"] for s in steps] == [False, False, False]
    assert first["result"]["state_id"] == steps[-1]["output_state_id"]
    first_events = events_of(engine, first["job_id"])
    assert len(execs(first_events, "update-count")) == 3  # step 0 ran while planning
    assert ran_ahead(first_events) == ["liquibase: execute-0 ran while planning: 1::alice::cl.sql"]
    assert {s["state_id"] for s in engine.get("/v1/states").json()} == {
        s["output_state_id"] for s in steps}

    again = lb_prepare(engine, lb_dir)
    assert again["status"] == "succeeded", again.get("error")
    assert [s["cached"] for s in steps_of(again)] == [True, True, True]
    assert [s["output_state_id"] for s in steps_of(again)] == [
        s["output_state_id"] for s in steps]
    assert again["result"]["state_id"] == first["result"]["state_id"]
    again_messages = messages(events_of(engine, again["job_id"]))
    assert not [m for m in again_messages if m.startswith("liquibase: exec")]  # no JVM at all
    assert any(m.startswith("liquibase: plan unchanged") for m in again_messages)
    assert psql(again["result"]["dsn"], "select count(*) from items") == "2"

    write(changelog, formatted_sql([*CHANGESETS, FOURTH]))
    grown = lb_prepare(engine, lb_dir)
    assert grown["status"] == "succeeded", grown.get("error")
    grown_steps = steps_of(grown)
    assert [s["task_id"] for s in grown_steps if not s["cached"]] == ["execute-3"]
    assert [s["output_state_id"] for s in grown_steps[:3]] == [
        s["output_state_id"] for s in steps]
    assert grown_steps[3]["input"] == {"kind": "state", "id": steps[-1]["output_state_id"]}
    assert (grown_steps[3]["changeset_id"], grown_steps[3]["changeset_author"]) == ("4", "carol")
    grown_events = events_of(engine, grown["job_id"])
    assert len(execs(grown_events, "update-count")) == 1
    assert len(execs(grown_events, "update-sql")) == 1  # a file changed: planned again
    assert ran_ahead(grown_events) == []  # step 0 was built before: nothing run ahead
    assert psql(grown["result"]["dsn"], "select string_agg(label, ',' order by id) from items"
                ) == "ONE,TWO"
    assert psql(dsn, "select string_agg(label, ',' order by id) from items") == "one,two"
    assert len(engine.get("/v1/states").json()) == 4


@RUNTIMES
def test_a_step_run_ahead_that_cannot_be_checked_runs_again(engine: EngineProcess,
                                                              lb_dir: Path) -> None:
    """With its own changelog table the run made while planning cannot be checked against
    the plan: it is dropped, step 0 runs in order, and the result is the same."""
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS))
    job = lb_prepare(engine, lb_dir, "--database-changelog-table-name=applied", "update",
                     f"--changelog-file={lb_dir}/cl.sql")
    assert job["status"] == "succeeded", job.get("error")
    events = events_of(engine, job["job_id"])
    verdict = ran_ahead(events)
    assert len(verdict) == 1 and "does not match the plan" in verdict[0], verdict
    assert len(execs(events, "update-count")) == 4  # step 0 twice
    dsn = job["result"]["dsn"]
    assert psql(dsn, "select id, label from items order by id") == "1|one\n2|two"
    assert psql(dsn, "select string_agg(id, ',' order by orderexecuted) from applied") == "1,2,3"
    deleted = engine.delete(f"/v1/instances/{job['result']['instance_id']}")
    assert deleted.status == 200, deleted.body
    assert engine.stop() == 0
    assert leftover_servers(engine.store) == []  # the run made ahead is gone too


def test_a_changeset_outside_the_work_dir_is_planned_every_time(engine: EngineProcess,
                                                                 lb_dir: Path) -> None:
    """A changelog may include ``../shared/…``: the plan cannot be keyed by that file, so it is
    made by Liquibase again, and a change there is built, never served from a stale plan."""
    work, shared = lb_dir / "work", lb_dir / "shared"
    for directory in (work, shared):
        directory.mkdir(mode=0o755)
    write(work / "main.yaml", "databaseChangeLog:\n  - include:\n      file: ../shared/more.sql"
                              "\n      relativeToChangelogFile: true\n")
    write(shared / "more.sql", formatted_sql(CHANGESETS[:1]))
    args = ("update", f"--changelog-file={work}/main.yaml")
    first = lb_prepare(engine, work, *args)
    assert first["status"] == "succeeded", first.get("error")
    assert [s["changeset_path"] for s in steps_of(first)] == ["../shared/more.sql"]
    first_messages = messages(events_of(engine, first["job_id"]))
    assert any("reaches files outside work_dir" in m for m in first_messages), first_messages

    again = lb_prepare(engine, work, *args)
    assert [s["cached"] for s in steps_of(again)] == [True]
    assert len(execs(events_of(engine, again["job_id"]), "update-sql")) == 1  # planned again

    write(shared / "more.sql", formatted_sql([(
        "alice", "1", "create table items(id int primary key, label text not null, x int);")]))
    changed = lb_prepare(engine, work, *args)
    assert changed["status"] == "succeeded", changed.get("error")
    assert [s["cached"] for s in steps_of(changed)] == [False]
    assert psql(changed["result"]["dsn"], "select count(*) from information_schema.columns "
                                          "where table_name = 'items'") == "3"


SQL_FILE_CHANGELOG = """\
databaseChangeLog:
  - changeSet:
      id: body
      author: bob
      changes:
        - sqlFile:
            path: ../shared/body.sql
            relativeToChangelogFile: true
"""


def test_a_sql_file_outside_the_work_dir_is_planned_every_time(engine: EngineProcess,
                                                               lb_dir: Path) -> None:
    """A changeset in the work dir whose ``sqlFile`` lies elsewhere: a change of that file
    changes the checksum, so the plan is never taken from the cache."""
    work, shared = lb_dir / "work", lb_dir / "shared"
    for directory in (work, shared):
        directory.mkdir(mode=0o755)
    write(work / "main.yaml", SQL_FILE_CHANGELOG)
    write(shared / "body.sql", "create table items(id int);")
    args = ("update", f"--changelog-file={work}/main.yaml")
    first = lb_prepare(engine, work, *args)
    assert first["status"] == "succeeded", first.get("error")
    again = lb_prepare(engine, work, *args)
    assert [s["cached"] for s in steps_of(again)] == [True]
    assert len(execs(events_of(engine, again["job_id"]), "update-sql")) == 1  # planned again

    write(shared / "body.sql", "create table items(id int, label text);")
    changed = lb_prepare(engine, work, *args)
    assert changed["status"] == "succeeded", changed.get("error")
    assert [s["cached"] for s in steps_of(changed)] == [False]
    assert psql(changed["result"]["dsn"], "select count(*) from information_schema.columns "
                                          "where table_name = 'items'") == "2"


def test_liquibase_class_archive_is_recorded_once_and_a_bad_one_is_ignored(
        engine: EngineProcess, lb_dir: Path) -> None:
    """The store's first Liquibase run records its JVM's class archive where only the user
    Liquibase runs as can write; later runs map it, and a broken one costs nothing but speed."""
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS[:1]))
    assert lb_prepare(engine, lb_dir)["status"] == "succeeded"
    archive_dir = (expose_root(engine.store) if os.geteuid() == 0 else engine.store) / ".liquibase"
    archives = sorted(archive_dir.iterdir())
    assert [a.suffix for a in archives] == [".jsa"], archives  # one, no temporary file left
    info = archive_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    if os.geteuid() == 0:
        assert info.st_uid == pwd.getpwnam("postgres").pw_uid
    recorded = archives[0].stat().st_mtime_ns
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS[:2]))
    assert lb_prepare(engine, lb_dir)["status"] == "succeeded"
    assert archives[0].stat().st_mtime_ns == recorded  # mapped, not recorded again
    archives[0].chmod(0o600)
    archives[0].write_bytes(b"not a class archive" * 1000)
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS))
    job = lb_prepare(engine, lb_dir)
    assert job["status"] == "succeeded", job.get("error")
    assert psql(job["result"]["dsn"], "select count(*) from items") == "2"
    assert not [m for m in messages(events_of(engine, job["job_id"])) if "cds" in m.lower()]


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (Liquibase runs in the work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(entry / "cwd").resolve() == directory.resolve():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@RUNTIMES
def test_cancel_while_planning_stops_both_liquibase_runs(engine: EngineProcess,
                                                          lb_dir: Path) -> None:
    """Step 0 (a long changeset) still runs when the plan is made: a cancel kills it and
    leaves no state, server or JVM behind."""
    write(lb_dir / "cl.sql", formatted_sql([("alice", "1", "select pg_sleep(300);")]))
    created = engine.post("/v1/prepare-jobs", lb_body(engine, lb_dir))
    assert created.status == 201, created.body
    job_id = str(created.json()["job_id"])
    engine.events_until(job_id, lambda e: e.get("message") == "liquibase: 1 changesets in the plan",
                        deadline_s=JOB_DEADLINE)
    assert processes_in(lb_dir) != []  # step 0's JVM is in pg_sleep
    assert engine.post(f"/v1/prepare-jobs/{job_id}/cancel").status == 202
    job = engine.wait_job(job_id, 120)
    assert job["status"] == "failed" and job["error"]["code"] == "cancelled", job
    assert engine.get("/v1/states").json() == []
    assert processes_in(lb_dir) == []
    assert leftover_servers(engine.store) == []


@RUNTIMES
def test_yaml_changelog_with_a_relative_path(engine: EngineProcess, lb_dir: Path) -> None:
    write(lb_dir / "changelog.yaml", YAML_CHANGELOG)
    job = lb_prepare(engine, lb_dir, "update", "--changelog-file=changelog.yaml")
    assert job["status"] == "succeeded", job.get("error")
    assert job["prepare_args_normalized"] == f"update --changelog-file={lb_dir}/changelog.yaml"
    assert [(s["changeset_id"], s["changeset_author"], s["changeset_path"])
            for s in steps_of(job)] == [("create-pets", "yves", "changelog.yaml"),
                                        ("add-rex", "zoe", "changelog.yaml")]
    assert psql(job["result"]["dsn"], "select id, name from pets") == "7|rex"


# --- failure ---------------------------------------------------------------------------------


@RUNTIMES
def test_failing_changeset_fails_cleanly(engine: EngineProcess, lb_dir: Path) -> None:
    write(lb_dir / "cl.sql", formatted_sql([
        CHANGESETS[0], ("mallory", "broken", "insert into no_such_table values (1);")]))
    job = lb_prepare(engine, lb_dir)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == "internal_error", error
    assert error["message"] == "liquibase execution failed", error
    assert "no_such_table" in error["details"], error
    assert "does not exist" in error["details"], error
    steps = steps_of(job)
    assert [s["changeset_id"] for s in steps] == ["1", "broken"]
    failed = [t["task_id"] for t in engine.get(f"/v1/tasks?job={job['job_id']}").json()
              if t["status"] == "failed"]
    assert failed == ["execute-1"]
    states = engine.get("/v1/states").json()
    assert [s["state_id"] for s in states] == [steps[0]["output_state_id"]]
    assert engine.get("/v1/instances").json() == []
    events = events_of(engine, job["job_id"])
    assert [e["type"] for e in events[-2:]] == ["status", "error"]
    assert len(execs(events, "update-count")) == 2
    assert engine.stop() == 0
    assert leftover_servers(engine.store) == []


# --- explain, secrets ------------------------------------------------------------------------


@RUNTIMES
def test_explain_misses_then_hits(engine: EngineProcess, lb_dir: Path) -> None:
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS[:2]))
    body = lb_body(engine, lb_dir)
    before = explain(engine, body)
    assert before["decision"] == "miss", before
    assert before["reason_code"] == "no_matching_state"
    assert before["first_missing_step"] == 0
    assert [s["cached"] for s in before["steps"]] == [False, False]
    assert "matched_state_id" not in before
    job = lb_prepare(engine, lb_dir)
    assert job["status"] == "succeeded", job.get("error")
    last = steps_of(job)[-1]["output_state_id"]
    assert [s["state_id"] for s in before["steps"]] == [
        s["output_state_id"] for s in steps_of(job)]
    after = explain(engine, body)
    assert after["decision"] == "hit", after
    assert after["reason_code"] == "exact_state_match"
    assert after["matched_state_id"] == last == job["result"]["state_id"]
    assert [s["cached"] for s in after["steps"]] == [True, True]
    assert after["signature"] == before["signature"]
    assert len(engine.get("/v1/instances").json()) == 1  # the prepare's; explaining made none


@RUNTIMES
def test_password_stays_out_of_events(engine: EngineProcess, lb_dir: Path) -> None:
    write(lb_dir / "cl.sql", formatted_sql(CHANGESETS[:1]))
    job = lb_prepare(engine, lb_dir)
    assert job["status"] == "succeeded", job.get("error")
    password = urllib.parse.urlsplit(job["result"]["dsn"]).password
    assert password and len(password) >= 16, job["result"]["dsn"]
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").body.decode()
    assert "liquibase: exec " in events
    assert password not in events


# --- rejections (host runtime; validated at submit) -----------------------------------------


@pytest.fixture(scope="module")
def lb_files() -> Iterator[Path]:
    """A readable changelog and a file that is not executable, for the rejections."""
    path = Path(tempfile.mkdtemp(prefix="sqlrs-lb-", dir="/tmp"))
    path.chmod(0o755)
    write(path / "cl.sql", formatted_sql(CHANGESETS[:1]))
    write(path / "not-exec", "#!/bin/sh\n")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


LB_REJECTIONS: list[tuple[list[str] | None, dict[str, Any], str]] = [
    (["update", "--url=jdbc:postgresql://x/y"], {}, "connection flags are not allowed"),
    (["update", "--url", "jdbc:postgresql://x/y"], {}, "connection flags are not allowed"),
    (["update", "--username=bob"], {}, "connection flags are not allowed"),
    (["--username", "bob", "update"], {}, "connection flags are not allowed"),
    (["update", "--password=secret"], {}, "connection flags are not allowed"),
    (["update", "--password"], {}, "connection flags are not allowed"),
    (["update", "--classpath=/tmp/x.jar"], {}, "runtime flags are not allowed"),
    (["update", "--driver", "org.postgresql.Driver"], {}, "runtime flags are not allowed"),
    ([], {}, "lb command is required"),
    (["--changelog-file=/tmp/cl.sql"], {}, "lb command is required"),
    (["rollback", "--tag=v1"], {}, "unsupported lb command"),
    (["status"], {}, "unsupported lb command"),
    (["update", "--changelog-file"], {}, "missing value for flag"),
    (["update", "--changelog-file="], {}, "path is empty"),
    (["update", "--search-path="], {}, "searchPath is empty"),
    (None, {"liquibase_exec": "/no/such/liquibase"}, "liquibase_exec not found"),
    (None, {"liquibase_exec": "not-exec"}, "liquibase_exec is not executable"),
    (None, {"liquibase_exec_mode": "windows-bat"}, "unsupported liquibase_exec_mode"),
]


@pytest.mark.parametrize(("args", "fields", "message"), LB_REJECTIONS)
def test_lb_rejections(engine: EngineProcess, lb_files: Path, args: list[str] | None,
                       fields: dict[str, Any], message: str) -> None:
    assert engine.image == HOST_IMAGE
    body: dict[str, Any] = {
        "prepare_kind": "lb", "image_id": HOST_IMAGE, "liquibase_exec": LIQUIBASE,
        "work_dir": str(lb_files),
        "liquibase_args": (["update", f"--changelog-file={lb_files}/cl.sql"] if args is None
                           else args), **fields}
    if body["liquibase_exec"] == "not-exec":
        body["liquibase_exec"] = str(lb_files / "not-exec")
    for path in ("/v1/prepare-jobs", "/v1/cache/explain/prepare"):
        assert_error(engine.post(path, body), 400, "invalid_argument", message)
    assert engine.get("/v1/prepare-jobs").json() == []


def test_relative_changelog_is_normalised_against_work_dir(engine: EngineProcess,
                                                           lb_files: Path) -> None:
    body = {"prepare_kind": "lb", "image_id": HOST_IMAGE, "liquibase_exec": LIQUIBASE,
            "work_dir": str(lb_files), "plan_only": True,
            "liquibase_args": ["update", "--changelog-file", "./sub/../cl.sql"]}
    result = engine.post("/v1/prepare-jobs", body)
    assert result.status == 201, result.body
    job_id = result.json()["job_id"]
    status = engine.get(f"/v1/prepare-jobs/{job_id}").json()
    assert status["prepare_args_normalized"] == f"update --changelog-file={lb_files}/cl.sql"
    job = engine.wait_job(job_id, JOB_DEADLINE)
    assert job["status"] == "succeeded", job.get("error")
    assert [s["changeset_path"] for s in steps_of(job)] == ["cl.sql"]



# --- private workspaces and upstream's argument order (issue 19, defects 1 and 2) ------------


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    """A workspace below a directory only root may enter (what ``mktemp -d`` makes)."""
    outer = Path(tempfile.mkdtemp(prefix="sqlrs-private-", dir=tmp_path))
    assert stat.S_IMODE(outer.stat().st_mode) == 0o700
    work = outer / "work"
    (work / "changes").mkdir(parents=True)
    return work


@RUNTIMES
def test_liquibase_runs_in_a_private_workspace(engine: EngineProcess, private_dir: Path) -> None:
    (private_dir / "master.yaml").write_text(
        "databaseChangeLog:\n  - include:\n      file: changes/cl.sql\n")
    (private_dir / "changes" / "cl.sql").write_text(formatted_sql(CHANGESETS))
    (private_dir / "changes" / "cl.sql").chmod(0o600)
    job = lb_prepare(engine, private_dir, "update",
                     f"--changelog-file={private_dir}/master.yaml")
    assert job["status"] == "succeeded", job.get("error")
    dsn = job["result"]["dsn"]
    assert psql(dsn, "select id, label from items order by id") == "1|one\n2|two"
    # the staged copy keeps relative paths, so Liquibase records the same file names
    assert psql(dsn, "select distinct filename from databasechangelog") == "changes/cl.sql"
    events = events_of(engine, job["job_id"])
    assert any("staged" in m for m in messages(events))
    stages = [p for p in expose_root(engine.store).glob(".lb-stage-*")]
    assert stages == [], "a staged workspace outlived its run"


@RUNTIMES
def test_fifos_and_links_leading_out_of_a_private_workspace_are_not_staged(
        engine: EngineProcess, private_dir: Path) -> None:
    """A FIFO is skipped (never waited on) and a link to a file outside the workspace is not
    copied where the server user can read it; the prepare still plans."""
    write(private_dir / "cl.sql", formatted_sql(CHANGESETS))
    os.mkfifo(private_dir / "changes" / "pipe")  # not a changelog: skipped, never waited on
    (private_dir / "secret.sql").symlink_to("/etc/shadow")  # leads outside: never staged
    job = lb_prepare(engine, private_dir, plan_only=True)
    assert job["status"] == "succeeded", job.get("error")


def test_upstream_argument_order_prepares_the_same(engine: EngineProcess, lb_dir: Path,
                                                   tmp_path: Path) -> None:
    """``update --searchPath X --changelog-file Y`` (how upstream writes its examples) and
    ``--searchPath X --changelog-file Y update`` give the same states and data."""
    changes = lb_dir / "db"
    changes.mkdir()
    changes.chmod(0o755)
    write(changes / "cl.sql", formatted_sql(CHANGESETS))
    upstream = lb_prepare(engine, lb_dir, "update", "--searchPath", str(changes),
                          "--changelog-file", "cl.sql")
    assert upstream["status"] == "succeeded", upstream.get("error")
    ours = lb_prepare(engine, lb_dir, "--searchPath", str(changes), "--changelog-file",
                      "cl.sql", "update")
    assert ours["status"] == "succeeded", ours.get("error")
    assert [s["output_state_id"] for s in steps_of(ours)] == [
        s["output_state_id"] for s in steps_of(upstream)]
    assert [s["cached"] for s in steps_of(ours)] == [True, True, True]
    assert execs(events_of(engine, ours["job_id"]), "update-sql") == []  # one plan for both
    assert upstream["prepare_args_normalized"].startswith("update ")  # as written
    for job in (upstream, ours):
        assert psql(job["result"]["dsn"], "select count(*) from items") == "2"
