"""Managed identity and least privilege, on both runtimes: a password per instance, no trust
over TCP, unprivileged clients, no password in logs, events, job rows or argv, and refusal of
host binaries that someone else could swap."""

from __future__ import annotations

import os
import pwd
import re
import sqlite3
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import DOCKER_IMAGE, RUNTIMES, EngineProcess, poll, psql

DSN_RE = re.compile(r"postgres://sqlrs:(?P<password>[A-Za-z0-9_-]{32})@127\.0\.0\.1:(?P<port>\d+)"
                    r"/postgres")


def password_of(dsn: str) -> str:
    match = DSN_RE.fullmatch(dsn)
    assert match, dsn
    return urllib.parse.unquote(match["password"])


def with_password(dsn: str, password: str | None) -> str:
    parts = urllib.parse.urlsplit(dsn)
    auth = f"sqlrs:{password}" if password is not None else "sqlrs"
    return parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}").geturl()


def refused(dsn: str) -> str:
    """The server's refusal of ``dsn`` (fails the test when it lets the client in)."""
    assert "PGPASSWORD" not in os.environ
    try:
        psycopg2.connect(dsn, connect_timeout=10, passfile="/dev/null").close()
    except psycopg2.OperationalError as exc:
        return str(exc)
    raise AssertionError(f"{dsn} was let in")


def create_instance(engine: EngineProcess, state_id: str) -> dict[str, Any]:
    result = engine.post("/v1/instances", {"state_id": state_id})
    assert result.status == 201, result.body
    entry: dict[str, Any] = result.json()
    return entry


def server_uid(engine: EngineProcess) -> int:
    if engine.image.startswith("host:"):
        return pwd.getpwnam("postgres").pw_uid
    out = subprocess.run(["docker", "run", "--rm", DOCKER_IMAGE, "id", "-u", "postgres"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@RUNTIMES
def test_instances_need_their_own_password(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    from_prepare = job["result"]["dsn"]
    other = create_instance(engine, job["result"]["state_id"])["dsn"]
    assert psql(from_prepare, "select 1") == "1"
    assert psql(other, "select 1") == "1"
    assert password_of(from_prepare) != password_of(other)
    for dsn in (from_prepare, other):
        assert "password" in refused(with_password(dsn, None))
        assert "password authentication failed" in refused(with_password(dsn, "wrong"))
    assert "password authentication failed" in refused(
        with_password(other, password_of(from_prepare)))
    entry = engine.get(f"/v1/instances/{job['result']['instance_id']}").json()
    assert entry["dsn"] == from_prepare


@pytest.mark.parametrize("runtime_image", ["docker"], indirect=True)
def test_other_containers_cannot_get_in_without_a_password(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "select 1"])
    assert job["status"] == "succeeded", job
    container = engine.get(f"/v1/instances/{job['result']['instance_id']}").json()["runtime_id"]
    address = subprocess.run(
        ["docker", "inspect", "--format", "{{.NetworkSettings.IPAddress}}", container],
        capture_output=True, text=True, check=True).stdout.strip()
    assert address, "the instance container has no address on the default bridge"
    probe = subprocess.run(
        ["docker", "run", "--rm", DOCKER_IMAGE, "psql", "-w", "-h", address, "-U", "sqlrs",
         "-d", "postgres", "-c", "select 1"], capture_output=True, text=True, timeout=120,
        check=False)
    assert probe.returncode != 0, probe.stdout
    assert "password" in probe.stderr, probe.stderr


@RUNTIMES
def test_clients_do_not_run_as_root(engine: EngineProcess) -> None:
    uid = server_uid(engine)
    assert uid != 0
    job = engine.prepare(["-c", "\\! id -u"])
    assert job["status"] == "succeeded", job
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").ndjson()
    assert f"psql: {uid}" in [e.get("message") for e in events]
    run = engine.post("/v1/runs", {"instance_ref": job["result"]["instance_id"],
                                   "kind": "psql", "args": ["-XAt", "-c", "\\! id -u"]})
    lines = run.ndjson()
    assert lines[-1] == {**lines[-1], "type": "exit", "exit_code": 0}, lines
    assert str(uid) in "".join(e.get("data", "") for e in lines if e["type"] == "stdout")


@RUNTIMES
def test_scripts_unreadable_to_the_server_user_still_run(engine: EngineProcess,
                                                        tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "inc.sql").write_text("create table included(x int);\n")
    script = private / "main.sql"
    script.write_text("\\ir inc.sql\ninsert into included values (42);\n")
    job = engine.prepare(["-f", str(script)])
    assert job["status"] == "succeeded", job.get("error")
    assert psql(job["result"]["dsn"], "select x from included") == "42"


@RUNTIMES
def test_passwords_stay_out_of_logs_events_rows_and_argv(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    secrets = [password_of(job["result"]["dsn"]),
               password_of(create_instance(engine, job["result"]["state_id"])["dsn"])]
    seen_argv: list[str] = []
    stop = threading.Event()

    def watch_argv() -> None:
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    seen_argv.append((entry / "cmdline").read_bytes().decode("utf-8", "replace"))
                except OSError:
                    continue

    watcher = threading.Thread(target=watch_argv, daemon=True)
    watcher.start()
    try:
        run = engine.post("/v1/runs", {"instance_ref": job["result"]["instance_id"],
                                       "kind": "psql", "args": ["-c", "select pg_sleep(1)"]})
        assert run.status == 200
    finally:
        stop.set()
        watcher.join(30)
    assert any("pg_sleep" in argv for argv in seen_argv)  # the watcher saw the run's client
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").body.decode()
    log = (engine.state_dir / "logs" / "engine.log").read_text()
    with sqlite3.connect(engine.store / "state.db") as db:
        rows = " ".join(str(value) for row in db.execute(
            "SELECT * FROM prepare_jobs") for value in row)
        rows += " ".join(str(value) for row in db.execute(
            "SELECT * FROM prepare_events") for value in row)
    for secret in secrets:
        assert secret not in events
        assert secret not in log
        assert secret not in rows
        assert not [argv for argv in seen_argv if secret in argv]


@RUNTIMES
def test_dsns_survive_an_engine_restart(engine_factory: Any) -> None:
    engine: EngineProcess = engine_factory()
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    dsn = job["result"]["dsn"]
    engine.stop()
    again: EngineProcess = engine_factory(state_dir=engine.state_dir)
    assert again.get(f"/v1/prepare-jobs/{job['job_id']}").json()["result"]["dsn"] == dsn
    assert psql(dsn, "select count(*) from t") == "0"


@RUNTIMES
def test_connection_tracking_still_blocks_a_delete(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "select 1"])
    assert job["status"] == "succeeded", job
    instance = job["result"]["instance_id"]
    with psycopg2.connect(job["result"]["dsn"]) as client:
        blocked = engine.delete(f"/v1/instances/{instance}")
        assert blocked.status == 409, blocked.body
        assert blocked.json()["root"]["connections"] == 1
        assert blocked.json()["root"]["blocked"] == "active_connections"
    client.close()
    poll(lambda: engine.delete(f"/v1/instances/{instance}").status == 200, 30,
         what="the delete once the client left")


def test_writable_host_bindir_is_refused(engine: EngineProcess, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "marker"
    for name in ("postgres", "initdb"):
        (bindir / name).write_text(f"#!/bin/sh\ntouch {marker}\n")
        (bindir / name).chmod(0o755)
    bindir.chmod(0o777)
    body = {"prepare_kind": "psql", "image_id": f"host:{bindir}", "psql_args": ["-c", "select 1"]}
    for path in ("/v1/prepare-jobs", "/v1/cache/explain/prepare"):
        result = engine.post(path, body)
        assert result.status == 400, result.body
        error = result.json()
        assert error["message"] == "untrusted host binaries", error
        assert str(bindir) in error["details"]
    bindir.chmod(0o755)
    (bindir / "postgres").chmod(0o777)
    result = engine.post("/v1/prepare-jobs", body)
    assert result.status == 400 and "writable by others" in result.json()["details"]
    assert not marker.exists()


def test_states_that_trust_tcp_are_never_reused(engine_factory: Any) -> None:
    engine: EngineProcess = engine_factory()
    assert engine.request("PATCH", "/v1/config", {"path": "snapshot.backend",
                                                  "value": "copy"}).status == 200
    engine.stop()
    engine = engine_factory(state_dir=engine.state_dir)  # the backend is read at start
    job = engine.prepare(["-c", "create table t(x int)"])
    state_id = job["result"]["state_id"]
    assert engine.delete(f"/v1/instances/{job['result']['instance_id']}").status == 200
    [hba] = list(engine.store.glob(f"engines/*/*/states/{state_id}/pgdata/pg_hba.conf"))
    hba.write_text(hba.read_text() + "host all all 0.0.0.0/0 trust\n")  # as old engines did
    engine.stop()
    again: EngineProcess = engine_factory(state_dir=engine.state_dir)
    assert again.get(f"/v1/states/{state_id}").status == 404
    rebuilt = again.prepare(["-c", "create table t(x int)"])
    assert rebuilt["status"] == "succeeded"
    assert [t["cached"] for t in rebuilt["tasks"] if t["type"] == "state_execute"] == [False]
    assert "0.0.0.0/0 trust" not in hba.read_text()
