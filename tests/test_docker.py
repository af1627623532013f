"""The Docker runtime against the real Docker engine and the locally built image (issue 5)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    HOST_IMAGE,
    EngineProcess,
    assert_error,
    containers_of,
    job_to_end,
    output,
    poll,
    post_run,
    psql,
    run_events,
    sql_via_run,
    without_warm_pool,
)

pytestmark = pytest.mark.parametrize("runtime_image", ["docker"], indirect=True)


def container_labels(container_id: str) -> dict[str, str]:
    out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                         check=True)
    labels: dict[str, str] = json.loads(out.stdout)[0]["Config"]["Labels"]
    return labels


def test_container_conventions(engine: EngineProcess, scripts: Path) -> None:
    without_warm_pool(engine)
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["image_id"].startswith("sqlrs-test/postgres@sha256:")
    instance = engine.get(f"/v1/instances/{result['instance_id']}").json()
    container = instance["runtime_id"]
    assert containers_of(engine.store) == [container[:12]]
    labels = container_labels(container)
    assert labels["sqlrs.runtime"] == result["instance_id"]
    assert labels["sqlrs.job"] == job["job_id"]
    ports = subprocess.run(["docker", "port", container, "5432/tcp"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    assert psql(result["dsn"], "select count(*) from items") == "100"


def test_container_removed_behind_our_back_is_recreated(engine: EngineProcess,
                                                        scripts: Path) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    instance_id = job["result"]["instance_id"]
    sql_via_run(engine, instance_id, "insert into items values (1000, 'written before')")
    old = engine.get(f"/v1/instances/{instance_id}").json()["runtime_id"]
    subprocess.run(["docker", "rm", "-f", old], check=True, capture_output=True)
    assert engine.get(f"/v1/instances/{instance_id}").json()["status"] == "orphaned"
    events = run_events(post_run(engine, instance_id, "-XAt", "-c", "select count(*) from items"))
    assert "run: runtime missing - restarting" in [e.get("data") for e in events]
    assert output(events).strip() == "101"
    entry = engine.get(f"/v1/instances/{instance_id}").json()
    assert entry["status"] == "active"
    assert entry["runtime_id"] != old
    assert psql(entry["dsn"], "select label from items where id = 1000") == "written before"


def test_no_container_leaks_across_restarts(engine_factory: Any, tmp_path: Path,
                                            scripts: Path) -> None:
    engine: EngineProcess = without_warm_pool(engine_factory())
    kept = engine.prepare(["-f", str(scripts / "schema.sql")])
    slow = tmp_path / "slow.sql"
    slow.write_text("select pg_sleep(30);\n")
    job_id = engine.submit(["-f", str(slow)])
    engine.events_until(job_id, lambda e: e.get("message") == "psql: start")
    before = set(containers_of(engine.store))
    assert len(before) == 2
    engine.proc.kill()
    engine.proc.wait(10)
    restarted: EngineProcess = engine_factory(state_dir=engine.state_dir)
    job = restarted.wait_job(job_id, 120)
    assert job["status"] == "succeeded"
    instances = {i["instance_id"]: i for i in restarted.get("/v1/instances").json()}
    assert set(instances) == {kept["result"]["instance_id"], job["result"]["instance_id"]}
    assert instances[kept["result"]["instance_id"]]["status"] == "active"
    after = set(containers_of(restarted.store))
    expected = {i["runtime_id"][:12] for i in instances.values()}
    assert after == expected
    for entry in instances.values():
        assert restarted.delete(f"/v1/instances/{entry['instance_id']}").status == 200
    assert containers_of(restarted.store) == []


def test_unreachable_daemon_is_a_clear_error(engine_factory: Any, scripts: Path) -> None:
    engine: EngineProcess = engine_factory(env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    job = engine.prepare(["-f", str(scripts / "schema.sql")], image=DOCKER_IMAGE)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "docker_unavailable"
    assert job["error"]["message"] == "docker is not running"
    assert engine.get("/v1/health", auth=False).status == 200
    works = engine.prepare(["-f", str(scripts / "schema.sql")], image=HOST_IMAGE)
    assert works["status"] == "succeeded"
    explain = engine.post("/v1/cache/explain/prepare", {
        "prepare_kind": "psql", "image_id": DOCKER_IMAGE,
        "psql_args": ["-f", str(scripts / "schema.sql")]})
    assert_error(explain, 503, message="docker is not running")


def test_the_start_up_sweep_spares_this_process_containers(engine_factory: Any,
                                                           tmp_path: Path) -> None:
    """The sweep of an earlier process's containers runs while the engine already serves:
    held at its pause point until a new job's runtime container exists (made by this
    process, its key unknown to the sweep), then let go, it removes only the leftover of
    the killed process, and the job succeeds (before, it removed the job's container:
    "container is marked for removal")."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = {"SQLRS_TEST_HOOKS_DIR": str(hooks)}
    first: EngineProcess = without_warm_pool(engine_factory(env=env))
    slow = tmp_path / "slow.sql"
    slow.write_text("select pg_sleep(30);\n")
    leftover_job = first.submit(["-f", str(slow)])
    first.events_until(leftover_job, lambda e: e.get("message") == "psql: start")
    assert first.delete(f"/v1/prepare-jobs/{leftover_job}?force=true").status == 200
    first.proc.kill()
    first.proc.wait(10)
    leftovers = set(containers_of(first.store))
    (hooks / "container-sweep").touch()
    again: EngineProcess = engine_factory(state_dir=first.state_dir, env=env)
    poll(lambda: (hooks / "container-sweep.reached").exists(), 60, what="the sweep's pause")
    quick = tmp_path / "quick.sql"
    quick.write_text("create table t(x int); select pg_sleep(3);\n")
    job_id = again.submit(["-f", str(quick)])
    again.events_until(job_id, lambda e: e.get("message") == "psql: start")
    (hooks / "container-sweep.release").touch()
    job = again.wait_job(job_id, 120)
    assert job["status"] == "succeeded", job.get("error")
    poll(lambda: not leftovers & set(containers_of(again.store)), 60,
         what="the earlier process's containers to be swept")


def test_psql_arguments_stdin_and_output_reach_the_container_exactly(
        engine: EngineProcess, tmp_path: Path) -> None:
    """A build's psql runs through the container's command agent: every argument (newlines,
    backslashes, quotes, a shell's specials, non-ASCII), a script on stdin and output that
    does not end in a newline arrive unchanged; a failing step's output is its error."""
    without_warm_pool(engine)
    tricky = "line one\nline 'two' \\ \"three\" $HOME `id` * ünïcødé\t"
    script = tmp_path / "script.sql"
    script.write_text("create table t(v text);\ninsert into t values (:'tricky');\n"
                      "\\echo -n no-newline-at-the-end\n")
    job = engine.prepare(["-v", f"tricky={tricky}", "-f", str(script),
                          "-c", f"insert into t values ($q${tricky}$q$)"])
    assert job["status"] == "succeeded", job
    values = psql(job["result"]["dsn"], "select encode(convert_to(v, 'UTF8'), 'hex') from t")
    assert [bytes.fromhex(row).decode() for row in values.split("\n")] == [tricky, tricky]
    logs = [event.get("message", "") for event in job_to_end(engine, job["job_id"], 60)[1]]
    assert "psql: no-newline-at-the-end" in logs, logs
    failing = engine.prepare(["-c", "select 1/0"])
    assert failing["status"] == "failed", failing
    assert "division by zero" in failing["error"]["details"], failing["error"]


def test_a_cancel_ends_a_running_psql_in_the_container(engine: EngineProcess) -> None:
    """A cancel kills the psql the agent runs: the job ends at once, not after the script."""
    without_warm_pool(engine)
    job_id = engine.submit(["-c", "select pg_sleep(600)"])
    engine.events_until(job_id, lambda event: event.get("message") == "psql: start", 120)
    assert engine.post(f"/v1/prepare-jobs/{job_id}/cancel").status == 202
    job = engine.wait_job(job_id, 60)
    assert job["status"] == "failed" and job["error"]["code"] == "cancelled", job
    assert engine.get("/v1/states").json() == []
    poll(lambda: containers_of(engine.store) == [], 60, what="the job's container to go")


def test_a_killed_command_agent_is_replaced(engine: EngineProcess, scripts: Path) -> None:
    """A DSN holder may kill the server user's command agent (it runs as that user): the
    engine's next command in the container goes to a new agent."""
    without_warm_pool(engine)
    job = engine.prepare(["-f", str(scripts / "schema.sql")])
    assert job["status"] == "succeeded", job
    container = engine.get(f"/v1/instances/{job['result']['instance_id']}").json()["runtime_id"]
    top = subprocess.run(["docker", "top", container, "-o", "pid,user,args"], check=True,
                         capture_output=True, text=True).stdout
    agents = [int(line.split()[0]) for line in top.splitlines()[1:] if "sqlrs-agent" in line
              and line.split()[1] != "root"]
    assert agents, top
    for pid in agents:
        subprocess.run(["kill", "-9", str(pid)], check=True)
    reset = engine.post(f"/v1/instances/{job['result']['instance_id']}/reset")
    assert reset.status == 200, reset.body
    assert psql(job["result"]["dsn"], "select count(*) from items") == "0"
