"""Races and fail-open paths, each arranged deterministically: a slow script, a cache set-up
that forces an eviction, or a pause point inside the engine ($SQLRS_TEST_HOOKS_DIR)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    HOST_IMAGE,
    EngineProcess,
    HttpResult,
    expose_root,
    mounts_below,
    poll,
    post_run,
    postgres_pids_below,
    psql,
    spawn_engine,
    stop_engine,
)

HOOK_DEADLINE = 60.0


@dataclass
class Hooks:
    """Pause points of one engine: arm one, wait until a request reaches it, release it."""

    root: Path

    def arm(self, name: str) -> None:
        (self.root / name).touch()

    def wait_reached(self, name: str) -> None:
        poll(lambda: (self.root / f"{name}.reached").exists(), HOOK_DEADLINE,
             what=f"pause point {name}")

    def release(self, name: str) -> None:
        (self.root / f"{name}.release").touch()


@dataclass
class Background:
    """An HTTP call made on another thread; ``result()`` waits for it."""

    call: Callable[[], HttpResult]
    _out: list[HttpResult] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> Background:
        self._thread = threading.Thread(target=lambda: self._out.append(self.call()),
                                        daemon=True)
        self._thread.start()
        return self

    def result(self, deadline: float = 120.0) -> HttpResult:
        assert self._thread is not None
        self._thread.join(deadline)
        assert self._out, "the background request did not finish"
        return self._out[0]


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[EngineProcess, Hooks]]:
    hooks = Hooks(tmp_path / "hooks")
    hooks.root.mkdir()
    engine = spawn_engine(tmp_path / "state", env={"SQLRS_TEST_HOOKS_DIR": str(hooks.root)})
    try:
        yield engine, hooks
    finally:
        for name in ("cancel.after_check", "instances.before_name", "clone", "destroy",
                     "run-restart", "psql-spawned"):
            hooks.release(name)  # never leave a request paused
        stop_engine(engine)


def prepared_state(engine: EngineProcess, sql: str = "create table t(x int)") -> str:
    job = engine.prepare(["-c", sql])
    assert job["status"] == "succeeded", job
    return str(job["result"]["state_id"])


def create(engine: EngineProcess, state_id: str, **extra: Any) -> HttpResult:
    return engine.post("/v1/instances", {"state_id": state_id, **extra})


def created(engine: EngineProcess, state_id: str, **extra: Any) -> str:
    result = create(engine, state_id, **extra)
    assert result.status == 201, result.body
    return str(result.json()["instance_id"])


def patch_config(engine: EngineProcess, path: str, value: Any) -> None:
    result = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
    assert result.status == 200, result.body


# ----------------------------------------------------------------------------- races


def test_cancel_never_overwrites_a_finished_job(hooked: tuple[EngineProcess, Hooks]) -> None:
    engine, hooks = hooked
    job_id = engine.submit(["-c", "select pg_sleep(2)"], plan_only=False)
    hooks.arm("cancel.after_check")
    cancel = Background(lambda: engine.post(f"/v1/prepare-jobs/{job_id}/cancel")).start()
    hooks.wait_reached("cancel.after_check")  # the job was not finished when cancel looked
    poll(lambda: engine.get(f"/v1/prepare-jobs/{job_id}").json()["status"] == "succeeded",
         120, what="the job to succeed")
    hooks.release("cancel.after_check")
    answer = cancel.result()
    assert answer.status == 200, answer.body
    job = engine.get(f"/v1/prepare-jobs/{job_id}").json()
    assert job["status"] == "succeeded" and "error" not in job, job
    events = engine.get(f"/v1/prepare-jobs/{job_id}/events").ndjson()
    assert [e["type"] for e in events[-2:]] == ["status", "result"], events[-3:]
    assert not any(e["type"] == "error" for e in events)


def test_a_cancel_between_spawn_and_registration_kills_the_client(
        hooked: tuple[EngineProcess, Hooks], tmp_path: Path) -> None:
    """A cancel that arrives after psql was started but before the job registered it still
    kills it: the script never runs to its end (issue 19, defect 5)."""
    engine, hooks = hooked
    shared = Path(tempfile.mkdtemp(prefix="sqlrs-cancel-"))  # where the server user may write
    shared.chmod(0o777)
    marker = shared / "ran-to-the-end"
    script = tmp_path / "slow.sql"
    script.write_text(f"select pg_sleep(5);\n\\! touch {marker}\n")
    hooks.arm("psql-spawned")
    job_id = engine.submit(["-f", str(script)])
    hooks.wait_reached("psql-spawned")
    cancel = engine.post(f"/v1/prepare-jobs/{job_id}/cancel")
    assert cancel.status == 202, cancel.body
    hooks.release("psql-spawned")
    job = engine.wait_job(job_id, 60)
    assert job["status"] == "failed" and job["error"]["code"] == "cancelled", job
    assert engine.get("/v1/states").json() == []
    try:
        assert not marker.exists(), "the cancelled script ran to its end"
    finally:
        shutil.rmtree(shared)
    assert not [pid for pid in postgres_pids_below(engine.store)]


def test_a_name_held_by_a_live_instance_is_not_taken(
        hooked: tuple[EngineProcess, Hooks]) -> None:
    engine, hooks = hooked
    state_id = prepared_state(engine)
    hooks.arm("instances.before_name")
    first = Background(lambda: create(engine, state_id, name="shared")).start()
    hooks.wait_reached("instances.before_name")  # created, name not bound yet
    second = created(engine, state_id, name="shared")
    hooks.release("instances.before_name")
    loser = first.result()
    assert loser.status == 409, loser.body
    assert loser.json()["code"] == "conflict"
    assert engine.get("/v1/names/shared").json()["instance_id"] == second
    ids = {i["instance_id"] for i in engine.get("/v1/instances").json()}
    assert second in ids and len(ids) == 2, ids  # the prepare's instance and the winner
    rebind = engine.request("PUT", "/v1/names/shared",
                            {"instance_id": next(iter(ids - {second}))})
    assert rebind.status == 200, rebind.body  # an explicit rebind stays allowed


def test_a_slow_clone_or_stop_blocks_nothing_else(hooked: tuple[EngineProcess, Hooks]) -> None:
    engine, hooks = hooked
    state_id = prepared_state(engine)
    victim = created(engine, state_id)
    expiring = created(engine, state_id, ttl_seconds=1)
    hooks.arm("clone")
    slow_create = Background(lambda: create(engine, state_id)).start()
    hooks.wait_reached("clone")
    assert create(engine, state_id).status == 201
    assert engine.delete(f"/v1/instances/{victim}", timeout=30).status == 200
    poll(lambda: engine.get(f"/v1/instances/{expiring}").status == 404, 60,
         what="the TTL reaper to remove the expired instance")
    hooks.release("clone")
    slow = slow_create.result()
    assert slow.status == 201, slow.body

    hooks.arm("destroy")
    slow_delete = Background(lambda: engine.delete(
        f"/v1/instances/{slow.json()['instance_id']}")).start()
    hooks.wait_reached("destroy")
    other = created(engine, state_id)
    assert engine.delete(f"/v1/instances/{other}", timeout=30).status == 200
    hooks.release("destroy")
    assert slow_delete.result().status == 200


def test_eviction_never_removes_a_builds_input(engine: EngineProcess) -> None:
    patch_config(engine, "instances.warmPool.maxTotal", 0)  # only states count in the cache
    first = engine.prepare(["-c", "create table a(x int)"])
    assert first["status"] == "succeeded", first
    parent = first["result"]["state_id"]
    assert engine.delete(f"/v1/instances/{first['result']['instance_id']}").status == 200
    size = engine.get(f"/v1/states/{parent}").json()["size_bytes"]
    # Only the parent is cached and it is above the high watermark: before the child's build,
    # the cache is under pressure and the parent is the one eviction candidate.
    patch_config(engine, "cache.capacity.minStateAge", "0s")
    patch_config(engine, "cache.capacity.lowWatermark", 0.2)
    patch_config(engine, "cache.capacity.highWatermark", 0.3)
    patch_config(engine, "cache.capacity.maxBytes", size * 3)
    job = engine.prepare(["-c", "create table a(x int)", "-c", "create table b(x int)"])
    assert job["status"] == "succeeded", job.get("error")
    assert engine.get(f"/v1/states/{parent}").status == 200
    child = engine.get(f"/v1/states/{job['result']['state_id']}").json()
    assert child["parent_state_id"] == parent


# ------------------------------------------------------------------- failing closed


@pytest.mark.parametrize("runtime_image", ["docker"], indirect=True)
def test_delete_is_blocked_when_connections_cannot_be_counted(engine: EngineProcess) -> None:
    """On Docker sessions are counted in a session of the engine's own (the host runtime's
    are read from the kernel's socket tables: the next test)."""
    state_id = prepared_state(engine)
    instance = create(engine, state_id).json()
    psql(instance["dsn"], "ALTER ROLE sqlrs NOLOGIN")  # the engine's own session is refused
    blocked = engine.delete(f"/v1/instances/{instance['instance_id']}")
    assert blocked.status == 409, blocked.body
    assert blocked.json()["root"]["blocked"] == "connections_unknown"
    assert "conntrack failed" in (engine.state_dir / "logs" / "engine.log").read_text()
    assert engine.get(f"/v1/instances/{instance['instance_id']}").status == 200
    forced = engine.delete(f"/v1/instances/{instance['instance_id']}?force=true")
    assert forced.status == 200, forced.body


def test_host_sessions_are_counted_without_a_session(engine: EngineProcess) -> None:
    """On the host runtime the engine counts a server's sessions from /proc/net (no session
    of its own): a TCP client (the DSN) and a unix-socket client (a run's psql) are each one,
    and a session that ended is none."""
    import psycopg2

    instance = create(engine, prepared_state(engine)).json()
    instance_id = instance["instance_id"]

    def connections() -> int:
        dry = engine.delete(f"/v1/instances/{instance_id}?dry_run=true")
        return int(dry.json()["root"]["connections"])

    client = psycopg2.connect(instance["dsn"])
    with ThreadPoolExecutor(1) as pool:
        try:
            blocked = engine.delete(f"/v1/instances/{instance_id}")
            assert blocked.status == 409, blocked.body
            assert blocked.json()["root"]["blocked"] == "active_connections"
            assert blocked.json()["root"]["connections"] == 1
            run = pool.submit(post_run, engine, instance_id, "-XAt", "-c",
                              "select pg_sleep(120)")
            poll(lambda: connections() == 2, 60, what="the run's session to be counted")
        finally:
            client.close()
        poll(lambda: connections() == 1, 60, what="the closed session to go")
        forced = engine.delete(f"/v1/instances/{instance_id}?force=true")
        assert forced.status == 200, forced.body
        assert run.result(timeout=60).status == 200


def test_a_session_that_just_ended_does_not_block_a_deletion(engine: EngineProcess) -> None:
    """A session that has ended keeps its backend (and on the host its socket) for a moment:
    a deletion right after it waits for that instead of answering "active_connections" (the
    engine's own session of a create made DELETE-after-POST fail now and then). Arranged: a
    unix-socket client's backend is stopped (SIGSTOP) while the client disconnects, and goes
    on (SIGCONT) while the deletion is waiting."""
    import psycopg2

    if engine.image != HOST_IMAGE or os.geteuid() != 0:
        pytest.skip("the arrangement connects over the server's private socket, as root")
    instance = create(engine, prepared_state(engine)).json()
    instance_id, port = instance["instance_id"], urllib.parse.urlsplit(instance["dsn"]).port
    sockets = expose_root(engine.store) / instance_id / "sock"
    client = psycopg2.connect(host=str(sockets), port=port, user="sqlrs", dbname="postgres")
    backend = client.get_backend_pid()
    os.kill(backend, signal.SIGSTOP)
    try:
        client.close()  # the backend cannot see it: its socket stays connected
        with ThreadPoolExecutor(1) as pool:
            deletion = pool.submit(engine.delete, f"/v1/instances/{instance_id}")
            threading.Event().wait(0.15)  # (a delay inside the deletion's settle window,
            os.kill(backend, signal.SIGCONT)  # not a wait for readiness)
            deleted = deletion.result(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(backend, signal.SIGCONT)
    assert deleted.status == 200, deleted.body


# -------------------------------------------------------------------- bounded history


def test_job_history_is_bounded_by_count_and_age(engine: EngineProcess) -> None:
    patch_config(engine, "orchestrator.jobs.maxHistory", 3)
    done = [engine.prepare(["-c", f"select {n}"], plan_only=True)["job_id"] for n in range(5)]
    listed = [job["job_id"] for job in engine.get("/v1/prepare-jobs").json()]
    assert listed == done[-3:]
    patch_config(engine, "orchestrator.jobs.maxHistoryAge", "1ns")
    last = engine.prepare(["-c", "select 6"], plan_only=True)["job_id"]
    assert [job["job_id"] for job in engine.get("/v1/prepare-jobs").json()] == [last]


def test_heartbeats_slow_down_through_a_long_silent_step(engine: EngineProcess) -> None:
    job = engine.prepare(["-c", "select pg_sleep(16)"])
    assert job["status"] == "succeeded", job
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").ndjson()
    repeats = [e for e in events if e["type"] == "task" and e["task_id"] == "execute-0"
               and e["status"] == "running"][1:] + [
        e for e in events if e["type"] == "log" and e["message"] == "psql: start"][1:]
    # 0.5 s apart for the first 20 repeats (10 s), then 5 s apart: about 21, not 32
    assert 10 <= len(repeats) <= 24, len(repeats)


def test_rejected_config_patch_leaves_the_file_alone(engine: EngineProcess) -> None:
    patch_config(engine, "cache.capacity.maxBytes", 12345)
    config = engine.store / "config.json"
    before = config.read_bytes()
    for path, value in [("aaaa", 1), ("__proto__.polluted", True),
                        ("cache.capacity.minStateAge", "-5m"), ("cache.capacity.maxBytes", -1),
                        ("cache.capacity.maxBytes", "1"), ("cache.capacity", {"extra": 1}),
                        ("cache.capacity.highWatermark", 0.1), ("log.level", "loud")]:
        result = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
        assert result.status == 400, (path, result.body)
        assert result.json()["code"] == "invalid_argument"
    assert config.read_bytes() == before
    assert json.loads(before) == {"cache": {"capacity": {"maxBytes": 12345}}}


def test_log_level_applies_at_once(engine: EngineProcess) -> None:
    log_file = engine.state_dir / "logs" / "engine.log"

    def logged() -> int:
        return log_file.read_text().count("path=/v1/states ")

    patch_config(engine, "log.level", "error")
    quiet = logged()
    assert engine.get("/v1/states").status == 200
    assert logged() == quiet
    patch_config(engine, "log.level", "info")
    assert engine.get("/v1/states").status == 200
    poll(lambda: logged() == quiet + 1, 10, what="the request line at level info")


def test_head_and_options_are_served(engine: EngineProcess) -> None:
    head = engine.request("HEAD", "/v1/states")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-type"] == "application/json"
    options = engine.request("OPTIONS", "/v1/names/some-name")
    assert options.status == 204, options.body
    assert options.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"
    assert engine.request("OPTIONS", "/v1/runs").headers["allow"] == "OPTIONS, POST"
    assert engine.request("OPTIONS", "/v1/nowhere").status == 404
    assert engine.request("HEAD", "/v1/runs").status == 405


def kill_server(engine: EngineProcess, instance_id: str) -> None:
    """Kill an instance's server behind the engine's back (a superuser can: ``COPY … TO
    PROGRAM 'kill -9 …'``) and wait until the engine sees it gone."""
    entry = engine.get(f"/v1/instances/{instance_id}").json()
    runtime_id = str(entry["runtime_id"])
    if runtime_id.startswith("host:"):
        os.kill(int(runtime_id.split(":", 1)[1]), signal.SIGKILL)
    else:
        subprocess.run(["docker", "exec", "-u", "postgres", runtime_id, "pg_ctl", "-D",
                        "/var/lib/postgresql/data/pgdata", "stop", "-m", "immediate"],
                       check=True, capture_output=True)
    poll(lambda: engine.get(f"/v1/instances/{instance_id}").json()["status"] == "orphaned",
         30, what="the engine to see the server gone")


def dead_instance(engine: EngineProcess, image: str) -> str:
    """A prepared instance on ``image`` whose server was killed."""
    engine.image = image
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    instance_id = str(job["result"]["instance_id"])
    kill_server(engine, instance_id)
    return instance_id


RACE_RUNTIMES = pytest.mark.parametrize("image", [HOST_IMAGE, DOCKER_IMAGE],
                                        ids=["host", "docker"])


@RACE_RUNTIMES
def test_a_delete_waits_for_a_runs_restart(hooked: tuple[EngineProcess, Hooks],
                                           image: str) -> None:
    """A run restarting a dead server holds the instance's lock: a DELETE arriving meanwhile
    waits, then stops what the restart started; nothing is left mounted or running, and
    neither side answers 500 (issue 18, defect 7)."""
    engine, hooks = hooked
    instance_id = dead_instance(engine, image)
    hooks.arm("run-restart")
    run = Background(lambda: post_run(engine, instance_id, "-XAt", "-c", "select 1")).start()
    hooks.wait_reached("run-restart")
    deletion = Background(lambda: engine.delete(
        f"/v1/instances/{instance_id}?force=true", timeout=120)).start()
    hooks.release("run-restart")
    deleted, ran = deletion.result(), run.result()
    assert deleted.status == 200, deleted.body
    assert ran.status in (200, 404, 409), ran.body  # never 500: a clear answer either way
    assert engine.get(f"/v1/instances/{instance_id}").status == 404
    assert not [point for point in mounts_below(expose_root(engine.store))
                if instance_id in point]
    assert not postgres_pids_below(engine.store / "instances" / instance_id)
    if image == DOCKER_IMAGE:
        poll(lambda: not containers_of_instance(engine, instance_id), 30,
             what="the instance's container to go")


def containers_of_instance(engine: EngineProcess, instance_id: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=sqlrs.runtime={instance_id}"],
                         capture_output=True, text=True, check=False)
    return out.stdout.split()


@RACE_RUNTIMES
def test_concurrent_runs_share_one_restart(hooked: tuple[EngineProcess, Hooks],
                                           image: str) -> None:
    """Three runs on a dead server: one restarts it, the others wait for that restart and
    use it; all three succeed (issue 18, defect 7)."""
    engine, hooks = hooked
    instance_id = dead_instance(engine, image)
    hooks.arm("run-restart")
    runs = [Background(lambda: post_run(engine, instance_id, "-XAt", "-c", "select 41 + 1"))
            .start()]
    hooks.wait_reached("run-restart")  # the first holds the restart: the others queue up
    runs += [Background(lambda: post_run(engine, instance_id, "-XAt", "-c", "select 41 + 1"))
             .start() for _ in range(2)]
    hooks.release("run-restart")
    restarts = 0
    for background in runs:
        result = background.result()
        assert result.status == 200, result.body
        events = result.ndjson()
        assert events[-1] == {**events[-1], "type": "exit", "exit_code": 0}, events
        assert "42" in "".join(e.get("data", "") for e in events if e["type"] == "stdout")
        restarts += any("restarting" in e.get("data", "") for e in events if e["type"] == "log")
    assert restarts == 1
