"""The engine as a developer runs it: an ordinary account (``sqlrs-dev``, in the ``docker``
group), its own Python, a 0700 workspace. Made by scripts/setup-nonroot.sh.

On the host runtime states are overlay layers mounted by each server in a user namespace of
its own (``overlay-userns``); on Docker the container's server runs as the engine's uid. Every
file the engine leaves is the user's own to delete."""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import secrets
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    HOST_IMAGE,
    ROOT,
    EngineProcess,
    cleanup_store,
    container_postmaster_pid,
    docker_available,
    exit_code,
    output,
    poll,
    psql,
    run_events,
    sql_via_run,
    without_warm_pool,
)

USER = os.environ.get("SQLRS_DEV_USER", "sqlrs-dev")
PYTHON = os.path.join(os.environ.get("SQLRS_DEV_VENV", "/opt/sqlrs-dev-venv"), "bin", "python")
RUNTIMES = pytest.mark.parametrize("image", ["host", "docker"])
#: loaded here: a child that is already the user may not read root's Python to import it
LIBC = ctypes.CDLL(None, use_errno=True)


def account() -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"no user {USER}: run scripts/setup-nonroot.sh")
    assert os.access(PYTHON, os.X_OK), f"{PYTHON} missing: run scripts/setup-nonroot.sh"
    return entry


class Workspace:
    """A 0700 directory of the ordinary user's, as ``mktemp -d`` makes it, and engines
    started in it as that user."""

    def __init__(self) -> None:
        self.user = account()
        self.root = Path(tempfile.mkdtemp(prefix="sqlrs-dev-"))
        os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.engines: list[EngineProcess] = []

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return str(path)

    def spawn(self, image: str, preexec: Any = None, name: str = "state") -> EngineProcess:
        state = self.root / name
        for path in (state, state / "logs"):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        cmd = [PYTHON, "-m", "sqlrs_engine", "--run-dir", str(state / "run"), "--listen",
               "127.0.0.1:0", "--write-engine-json", str(state / "engine.json"),
               "--idle-timeout", "0"]
        groups = [grp.getgrnam("docker").gr_gid] if image == DOCKER_IMAGE else []
        with open(state / "logs" / "spawn.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=out, start_new_session=True,
                user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=groups,
                env={"PATH": "/usr/bin:/bin", "HOME": self.user.pw_dir, "USER": USER},
                preexec_fn=preexec)
        engine = EngineProcess(proc, state, state / "engine.json", image=image)
        self.engines.append(engine)
        return engine.wait_ready()

    def close(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                if engine.proc.poll() is None:
                    for inst in engine.get("/v1/instances").json() or []:
                        engine.delete(f"/v1/instances/{inst['instance_id']}?force=true")
                    engine.stop()
            with contextlib.suppress(Exception):
                engine.proc.kill()
            cleanup_store(engine.store)
        # every file the engine left is the user's own to delete
        removal = subprocess.run(["rm", "-rf", str(self.root)], user=self.user.pw_uid,
                                 group=self.user.pw_gid, capture_output=True, text=True,
                                 check=False)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
        assert removal.returncode == 0, f"{USER} cannot delete what its engine left: " \
                                        f"{removal.stderr[-2000:]}"


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    space = Workspace()
    yield space
    space.close()


def image_for(kind: str) -> str:
    if kind == "host":
        return HOST_IMAGE
    if os.environ.get("SQLRS_SKIP_DOCKER_TESTS") == "1":
        pytest.skip("SQLRS_SKIP_DOCKER_TESTS=1")
    assert docker_available(), "docker image missing: run scripts/setup-docker.sh"
    return DOCKER_IMAGE


def server_uids(engine: EngineProcess, instance_id: str) -> int:
    """The uid the instance's postmaster runs as (seen from the host)."""
    runtime_id = engine.get(f"/v1/instances/{instance_id}").json()["runtime_id"]
    if runtime_id.startswith("host:"):
        return os.stat(f"/proc/{runtime_id[5:]}").st_uid
    return os.stat(f"/proc/{container_postmaster_pid(runtime_id)}").st_uid


def sizes(engine: EngineProcess, state_ids: list[str]) -> list[int]:
    return [int(engine.get(f"/v1/states/{sid}").json()["size_bytes"]) for sid in state_ids]


def chain_ids(job: dict[str, Any]) -> list[str]:
    return [task["output_state_id"] for task in job["tasks"] if task["type"] == "state_execute"]


@RUNTIMES
def test_prepare_instances_and_runs_as_yourself(workspace: Workspace, image: str) -> None:
    """A two-step prepare, its instance answering on its DSN, a second instance isolated from
    the first, the servers running as the user; on the host the states are layers."""
    engine = workspace.spawn(image_for(image))
    schema = workspace.write("schema.sql", "create table items(id int primary key, label text);\n")
    data = workspace.write("data.sql", "insert into items select g, 'item' from"
                                       " generate_series(1, 100) g;\n")
    job = engine.prepare(["-f", schema, "-f", data])
    assert job["status"] == "succeeded", job.get("error")
    dsn = job["result"]["dsn"]
    assert psql(dsn, "select count(*) from items") == "100"
    other = engine.post("/v1/instances", {"state_id": job["result"]["state_id"]})
    assert other.status == 201, other.body
    psql(dsn, "delete from items")
    assert psql(other.json()["dsn"], "select count(*) from items") == "100"
    user = pwd.getpwnam(USER).pw_uid
    assert server_uids(engine, job["result"]["instance_id"]) == user
    for root, dirs, files in os.walk(engine.store):
        for name in dirs + files:
            info = os.lstat(os.path.join(root, name))
            # a container's own overlay makes whiteouts (0/0 devices) and its work dir as
            # its root; both are removable by the user (tested when the workspace goes)
            whiteout = stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
            assert info.st_uid == user or whiteout or "/work/work" in root + "/" + name, \
                f"{os.path.join(root, name)} belongs to uid {info.st_uid}"
    status = engine.get("/v1/cache/status").json()
    assert status["snapshot_backend"] == "overlay-userns", status
    assert "snapshot_reason" not in status
    # on both runtimes the second state is a layer on the first (a few hundred kB of data
    # and WAL), not a 30 MB copy of the cluster
    first, second = sizes(engine, chain_ids(job))
    assert second < 6 * 1024 * 1024, (first, second)
    assert any(path.is_dir() for path in (engine.store / "engines").rglob("layer")), \
        "no layered state"


def test_a_small_step_on_a_large_state_is_a_small_layer(workspace: Workspace) -> None:
    engine = workspace.spawn(HOST_IMAGE)
    big = workspace.write("big.sql", "create table big as select g as id, repeat('x', 200) as"
                                     " pad from generate_series(1, 100000) g;\n")
    small = workspace.write("small.sql", "create table small(x int); insert into small"
                                         " values (1);\n")
    job = engine.prepare(["-f", big, "-f", small])
    assert job["status"] == "succeeded", job.get("error")
    big_size, small_size = sizes(engine, chain_ids(job))
    assert big_size > 20 * 1024 * 1024
    assert small_size < 6 * 1024 * 1024, (big_size, small_size)  # WAL and catalog pages
    assert psql(job["result"]["dsn"], "select count(*) from big") == "100000"


@RUNTIMES
def test_a_deep_chain_stays_flat(workspace: Workspace, image: str) -> None:
    """Past the overlay's stack limit a step's state is a full copy made through a
    read-only view of the runtime's layers (in a namespace of its own on the host, by the
    container as its root on Docker) and the chain starts again from it; every step's data
    is there at the end."""
    engine = workspace.spawn(image_for(image))
    args = []
    for step in range(30):
        args += ["-f", workspace.write(f"s{step:02}.sql", f"create table t{step}(x int);"
                                                          f" insert into t{step} values"
                                                          f" ({step});\n")]
    job = engine.wait_job(engine.submit(args), deadline_s=600)
    assert job["status"] == "succeeded", job.get("error")
    total = psql(job["result"]["dsn"], " + ".join(f"(select x from t{i})" for i in range(30))
                 .join(("select ", "")))
    assert total == str(sum(range(30)))
    assert len(engine.get("/v1/states").json()) == 30
    flat = [p for p in (engine.store / "engines").rglob("pgdata") if p.parent.parent.name
            == "states"]
    assert flat, "no step of a 30-deep chain was made flat"


@RUNTIMES
def test_deletion_and_eviction_leave_nothing(workspace: Workspace, image: str) -> None:
    engine = workspace.spawn(image_for(image))
    without_warm_pool(engine)
    first = engine.prepare(["-f", workspace.write("a.sql", "create table a(x int);\n")])
    assert first["status"] == "succeeded", first.get("error")
    state_id = first["result"]["state_id"]
    deleted = engine.delete(f"/v1/instances/{first['result']['instance_id']}")
    assert deleted.status == 200, deleted.body
    assert engine.delete(f"/v1/states/{state_id}").status == 200
    assert engine.get(f"/v1/states/{state_id}").status == 404
    assert not list((engine.store / "instances").iterdir())
    # eviction: the least recently used state goes when a new one needs the room
    for key, value in (("reserveBytes", 0), ("minStateAge", "0s")):
        engine.request("PATCH", "/v1/config", {"path": f"cache.capacity.{key}",
                                               "value": value})
    old = engine.prepare(["-f", workspace.write("old.sql", "create table old(x int);\n")])
    engine.delete(f"/v1/instances/{old['result']['instance_id']}")
    size = int(engine.get(f"/v1/states/{old['result']['state_id']}").json()["size_bytes"])
    engine.request("PATCH", "/v1/config", {"path": "cache.capacity.maxBytes",
                                           "value": int(size * 1.5)})
    new = engine.prepare(["-f", workspace.write("new.sql", "create table new(x int);\n")])
    assert new["status"] == "succeeded", new.get("error")
    assert engine.get(f"/v1/states/{old['result']['state_id']}").status == 404


@RUNTIMES
def test_instances_survive_an_engine_restart(workspace: Workspace, image: str) -> None:
    engine = workspace.spawn(image_for(image))
    job = engine.prepare(["-f", workspace.write("a.sql", "create table a(x int);\n")])
    assert job["status"] == "succeeded", job.get("error")
    dsn = job["result"]["dsn"]
    psql(dsn, "insert into a values (7)")
    assert engine.stop(signal.SIGTERM) == 0
    again = workspace.spawn(image_for(image))
    assert psql(dsn, "select x from a") == "7"
    entry = again.get(f"/v1/instances/{job['result']['instance_id']}").json()
    assert entry["status"] == "active", entry
    # a server that died is restarted from the instance's own data by a run
    runtime_id = entry["runtime_id"]
    if runtime_id.startswith("host:"):
        os.kill(int(runtime_id[5:]), signal.SIGKILL)
    else:
        subprocess.run(["docker", "rm", "-f", runtime_id], check=True, capture_output=True)
    instance_path = f"/v1/instances/{job['result']['instance_id']}"
    # SIGKILL is delivered, not finished, when kill returns: wait until the engine sees it
    poll(lambda: again.get(instance_path).json()["status"] == "orphaned", 30,
         what="the engine to see the server gone")
    assert sql_via_run(again, job["result"]["instance_id"], "select x from a") == "7"


@RUNTIMES
def test_the_warm_pool_hands_out_as_yourself(workspace: Workspace, image: str) -> None:
    engine = workspace.spawn(image_for(image))
    job = engine.prepare(["-f", workspace.write("a.sql", "create table a(x int);\n")])
    assert job["status"] == "succeeded", job.get("error")
    state_id = job["result"]["state_id"]
    poll(lambda: any(entry["state_id"] == state_id and entry["ready"] > 0
                     for entry in engine.get("/v1/pool").json()["entries"]), 60,
         what="a pooled server of the state")
    made = engine.post("/v1/instances", {"state_id": state_id})
    assert made.status == 201, made.body
    assert psql(made.json()["dsn"], "select count(*) from a") == "0"


def no_user_namespaces() -> None:
    """Between fork and exec of the engine (already the user): enter a user namespace of its
    own (its uid and gid mapped to themselves) and set ``user.max_user_namespaces=0`` there,
    so neither the engine nor its children may make another. The machine's own sysctl is not
    writable here (a sandbox), and this changes nothing outside the test."""
    uid, gid = os.geteuid(), os.getegid()
    LIBC.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it, /proc/self is root's
    if LIBC.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
    for path, line in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1"),
                       ("/proc/sys/user/max_user_namespaces", "0")):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def test_without_user_namespaces_the_engine_copies_and_says_why(workspace: Workspace) -> None:
    engine = workspace.spawn(HOST_IMAGE, preexec=no_user_namespaces)
    status = engine.get("/v1/cache/status").json()
    assert status["snapshot_backend"] in ("copy", "reflink"), status
    assert "user.max_user_namespaces=0" in status["snapshot_reason"], status
    log = "".join(path.read_text(errors="replace")
                  for path in (engine.state_dir / "logs").iterdir())
    assert "user.max_user_namespaces=0" in log
    job = engine.prepare(["-f", workspace.write("a.sql", "create table a(x int);\n")])
    assert job["status"] == "succeeded", job.get("error")
    assert psql(job["result"]["dsn"], "select count(*) from a") == "0"


@RUNTIMES
def test_liquibase_as_yourself(workspace: Workspace, image: str) -> None:
    """A Liquibase changelog in the user's 0700 workspace: one state per changeset, the
    second run all cache hits."""
    engine = workspace.spawn(image_for(image))
    changelog = workspace.write("cl.sql", "--liquibase formatted sql\n\n"
                                "--changeset dev:1\ncreate table pets(id int);\n\n"
                                "--changeset dev:2\ninsert into pets values (1), (2);\n")
    body = {"prepare_kind": "lb", "image_id": engine.image, "work_dir": str(workspace.root),
            "liquibase_exec": "/opt/sqlrs-test/liquibase/bin/liquibase",
            "liquibase_args": ["update", f"--changelog-file={changelog}"]}
    jobs = []
    for _ in range(2):
        made = engine.post("/v1/prepare-jobs", body)
        assert made.status == 201, made.body
        jobs.append(engine.wait_job(made.json()["job_id"], deadline_s=600))
    first, again = jobs
    assert first["status"] == "succeeded", first.get("error")
    assert psql(first["result"]["dsn"], "select count(*) from pets") == "2"
    steps = [task for task in again["tasks"] if task["type"] == "state_execute"]
    assert len(steps) == 2 and all(task["cached"] for task in steps), steps


@RUNTIMES
def test_snapshot_and_reset_as_yourself(workspace: Workspace, image: str) -> None:
    """A live snapshot (the overlay is the server's own namespace's, or the container's as
    its root) and resets, as the ordinary user; everything stays deletable by the user."""
    engine = workspace.spawn(image_for(image))
    job = engine.prepare(["-f", workspace.write("a.sql", "create table a(x int);\n")])
    assert job["status"] == "succeeded", job.get("error")
    dsn, instance_id = job["result"]["dsn"], job["result"]["instance_id"]
    psql(dsn, "insert into a select generate_series(1, 10); drop table if exists gone;"
              " create table b(y int); drop table b")
    made = engine.post(f"/v1/instances/{instance_id}/snapshot", {"name": "mine"})
    assert made.status == 201, made.body
    branch = engine.post("/v1/instances", {"state_id": made.json()["state_id"]})
    assert branch.status == 201, branch.body
    assert psql(branch.json()["dsn"], "select count(*) from a") == "10"
    assert psql(branch.json()["dsn"], "select count(*) from pg_tables where tablename = 'b'") \
        == "0"
    psql(dsn, "delete from a")
    reset = engine.post(f"/v1/instances/{instance_id}/reset",
                        {"state_id": made.json()["state_id"]})
    assert reset.status == 200, reset.body
    assert psql(dsn, "select count(*) from a") == "10"


@RUNTIMES
def test_states_travel_as_yourself(workspace: Workspace, image: str) -> None:
    """Two engines of the user's (two machines): one pushes what it built to the registry,
    the other pulls it instead of running the scripts; everything stays the user's."""
    kind = image_for(image)
    repository = f"127.0.0.1:5000/sqlrs-nonroot-test/{secrets.token_hex(4)}"
    builder, puller = workspace.spawn(kind, name="a"), workspace.spawn(kind, name="b")
    for engine, push in ((builder, True), (puller, False)):
        for path, value in (("cache.remote.url", repository), ("cache.remote.push", push)):
            answer = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
            assert answer.status == 200, answer.body
    args = ["-f", workspace.write("t1.sql", "create table t(x int);"
                                  " insert into t select generate_series(1, 100);\n"),
            "-f", workspace.write("t2.sql", "delete from t where x > 50;"
                                  " create table gone(y int); drop table gone;\n")]
    built = builder.prepare(args)
    assert built["status"] == "succeeded", built.get("error")
    state_id = built["result"]["state_id"]
    poll(lambda: builder.get(f"/v1/states/{state_id}").json().get("push_status") == "pushed",
         120, what="the push")
    job_id = puller.submit(args)
    pulled = puller.wait_job(job_id)
    assert pulled["status"] == "succeeded", pulled.get("error")
    messages = [event.get("message", "") for event in
                puller.get(f"/v1/prepare-jobs/{job_id}/events").ndjson()]
    assert any(message.startswith("remote: pull") for message in messages), messages
    assert not any(message.startswith("psql:") for message in messages), messages
    assert psql(pulled["result"]["dsn"], "select count(*) from t") == "50"
    origins = {state["state_id"]: state["origin"] for state in puller.get("/v1/states").json()}
    assert origins[state_id] == "pulled"


@RUNTIMES
def test_the_cli_flow_as_yourself(workspace: Workspace, image: str) -> None:
    """The HTTP calls the sqlrs CLI makes for its end-to-end flow (contract §8), in its
    order, against an engine of the ordinary user's: connect (health without the token,
    the auth probe with it), prepare:psql watched to its end, the same prepare again (every
    step a cache hit), run:psql with its exit codes and run:pgbench, ls, cache explain,
    prepare:lb, and rm by id prefix (dry run, then for real). The real CLI is not on this
    machine: this replays what it sends."""
    engine = workspace.spawn(image_for(image))
    assert engine.get("/v1/health", auth=False).status == 200
    assert engine.get("/v1/prepare-jobs", auth=False).status == 401
    assert engine.get("/v1/prepare-jobs").status == 200
    schema = workspace.write("schema.sql", "create table items(id int primary key);\n")
    data = workspace.write("data.sql", "insert into items select generate_series(1, 50);\n")
    body = {"prepare_kind": "psql", "image_id": engine.image,
            "psql_args": ["-v", "ON_ERROR_STOP=1", "-f", schema, "-f", data]}
    jobs = []
    for _ in range(2):  # prepare:psql, then the warm prepare
        made = engine.post("/v1/prepare-jobs", body)
        assert made.status == 201, made.body
        events = engine.get(made.json()["events_url"], timeout=600)
        assert events.status == 200 and events.ndjson()[-1]["type"] in ("status", "result")
        jobs.append(engine.get(made.json()["status_url"]).json())
    first, warm = jobs
    assert first["status"] == "succeeded" and warm["status"] == "succeeded", jobs
    steps = [task for task in warm["tasks"] if task["type"] == "state_execute"]
    assert len(steps) == 2 and all(task["cached"] for task in steps), steps
    instance_id = warm["result"]["instance_id"]
    ok = engine.post("/v1/runs", {"instance_ref": instance_id, "kind": "psql", "args": [],
                                  "steps": [
                                      {"args": ["-XAt", "-c", "select count(*) from items"]},
                                      {"args": ["-XAt", "-f", "-"], "stdin": "select 7;\n"}]})
    assert exit_code(run_events(ok)) == 0 and output(run_events(ok)).split() == ["50", "7"]
    failing = engine.post("/v1/runs", {"instance_ref": instance_id, "kind": "psql",
                                       "args": ["-v", "ON_ERROR_STOP=1", "-c",
                                                "select * from nope"]})
    assert exit_code(run_events(failing)) == 1  # psql's status for a failed -c
    assert 'relation "nope" does not exist' in output(run_events(failing), "stderr")
    bench = engine.post("/v1/runs", {"instance_ref": instance_id, "kind": "pgbench",
                                     "args": ["-i", "-s", "1", "-q"]})
    assert exit_code(run_events(bench)) == 0
    # ls: names, instances, states, jobs by prefix, tasks
    assert engine.get("/v1/names").status == 200
    listed = engine.get("/v1/instances").json()
    assert {entry["instance_id"] for entry in listed} == {first["result"]["instance_id"],
                                                          instance_id}
    assert {state["state_id"] for state in engine.get("/v1/states").json()} == \
        {task["output_state_id"] for task in steps}
    assert [job["job_id"] for job in
            engine.get(f"/v1/prepare-jobs?job={first['job_id'][:8]}").json()] == \
        [first["job_id"]]
    assert engine.get(f"/v1/tasks?job={first['job_id']}").json()
    explained = engine.post("/v1/cache/explain/prepare", body)
    assert explained.status == 200 and explained.json()["decision"] == "hit", explained.body
    changelog = workspace.write("cl.sql", "--liquibase formatted sql\n\n"
                                "--changeset dev:1\ncreate table pets(id int);\n")
    lb = engine.post("/v1/prepare-jobs", {
        "prepare_kind": "lb", "image_id": engine.image, "work_dir": str(workspace.root),
        "liquibase_exec": "/opt/sqlrs-test/liquibase/bin/liquibase",
        "liquibase_args": ["update", f"--changelog-file={changelog}"]})
    assert lb.status == 201, lb.body
    lb_job = engine.wait_job(lb.json()["job_id"], deadline_s=600)
    assert lb_job["status"] == "succeeded", lb_job.get("error")
    assert psql(lb_job["result"]["dsn"], "select count(*) from pets") == "0"
    # rm <prefix>: resolve the prefix, then the deletion (a dry run first)
    prefix = instance_id[:8]
    assert [entry["instance_id"] for entry in
            engine.get(f"/v1/instances?id_prefix={prefix}").json()] == [instance_id]
    dry = engine.delete(f"/v1/instances/{instance_id}?force=true&dry_run=true")
    assert dry.status == 200 and dry.json()["outcome"] == "would_delete", dry.body
    gone = engine.delete(f"/v1/instances/{instance_id}?force=true")
    assert gone.status == 200 and gone.json()["outcome"] == "deleted", gone.body
    assert engine.get(f"/v1/instances/{instance_id}").status == 404
