"""Resources are released by construction: an exception nobody listed, raised between an
acquire and its release, leaves no pin, no pooled runtime handed out, no heartbeat thread and
no registered client process (small fakes stand in for the runtimes and the job table)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit

STATE = "5" * 64


class Injected(BaseException):
    """Raised inside a block: not an Exception, so no ``except Exception`` swallows it."""


class FakeRuntime:
    """A runtime whose servers are alive as long as the test says."""

    def __init__(self) -> None:
        self.alive_now = True

    def alive(self, _handle: Any) -> bool:
        return self.alive_now


class RecordingInstances(se.InstanceManager):
    """The real pins and claims; discards are recorded instead of stopping servers."""

    def __init__(self) -> None:
        super().__init__(None, None, None, None, None)  # type: ignore[arg-type]
        self.discarded: list[str] = []

    def discard(self, handle: se.RuntimeHandle) -> None:
        self.discarded.append(handle.key)

    def owners(self) -> set[str]:
        with self._lock:
            return set(self._pins)


class FakeJobs:
    """The job table as the executor's event emitter uses it: every update is recorded."""

    def __init__(self) -> None:
        self.updates: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def update_job(self, _job_id: str, *events: Any, **fields: Any) -> bool:
        self.updates.append((events, fields))
        return True

    def append_event(self, _job_id: str, _event: Any) -> None:
        pass

    def list_tasks(self, _job_id: str | None = None) -> list[Any]:
        return []


def heartbeats() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]


def handle(key: str, runtime: FakeRuntime) -> se.RuntimeHandle:
    return se.RuntimeHandle(key=key, image=None, runtime=runtime,  # type: ignore[arg-type]
                            runtime_dir="/nonexistent", data_dir="/nonexistent",
                            socket_dir="/nonexistent")


def test_a_pin_held_by_a_block_ends_with_it() -> None:
    instances = RecordingInstances()
    with pytest.raises(Injected), instances.holding("job", {"/s/a"}):
        assert instances.pinned("/s/a")
        instances.pin("job", {"/s/b"})  # replaced inside the block: released all the same
        raise Injected
    assert not instances.pinned("/s/a") and not instances.pinned("/s/b")
    assert instances.owners() == set()


def test_a_claimed_state_cannot_be_held() -> None:
    instances = RecordingInstances()
    with instances.claiming({"/s/a"}) as claimed:
        assert claimed
        with pytest.raises(se.ApiError) as raised, instances.holding("job", {"/s/a"}):
            pytest.fail("a state being deleted was pinned")
    assert raised.value.status == 404 and instances.owners() == set()


def test_the_heartbeat_thread_ends_with_its_block() -> None:
    emit = se.EventEmitter(FakeJobs(), "j" * 32)  # type: ignore[arg-type]
    with pytest.raises(Injected), emit.heartbeat():
        assert any(t.name == f"heartbeat-{'j' * 8}" for t in heartbeats())
        raise Injected
    assert heartbeats() == []


def test_a_pooled_runtime_whose_hand_out_fails_is_discarded_and_unpinned(
        tmp_path: Path) -> None:
    instances, runtime = RecordingInstances(), FakeRuntime()
    pool = se.WarmPool(instances, None, se.ConfigManager(str(tmp_path / "c.json")))  # type: ignore[arg-type]
    pooled = handle("k" * 32, runtime)
    instances.pin(se.POOL_PIN + pooled.key, {"/s/a"})
    pool._ready[STATE] = [(pooled, time.monotonic())]
    with pytest.raises(Injected), pool.handout(STATE) as got:
        assert got is pooled
        raise Injected
    assert instances.discarded == [pooled.key] and instances.owners() == set()
    assert pool.status()["entries"] == []


def test_a_pooled_runtime_that_died_is_never_handed_out(tmp_path: Path) -> None:
    instances, runtime = RecordingInstances(), FakeRuntime()
    pool = se.WarmPool(instances, None, se.ConfigManager(str(tmp_path / "c.json")))  # type: ignore[arg-type]
    dead = handle("d" * 32, runtime)
    instances.pin(se.POOL_PIN + dead.key, {"/s/a"})
    pool._ready[STATE] = [(dead, time.monotonic())]
    runtime.alive_now = False
    with pool.handout(STATE) as got:
        assert got is None
    assert instances.discarded == [dead.key] and instances.owners() == set()


def executor(instances: se.InstanceManager, jobs: FakeJobs, tmp_path: Path) -> se.Executor:
    return se.Executor(jobs, None, None, None, instances,  # type: ignore[arg-type]
                       None, None, None, None, None, "test")  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(28, "No space left")])
def test_a_job_that_crashes_mid_step_leaves_no_pin_and_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    instances, jobs = RecordingInstances(), FakeJobs()
    runner = executor(instances, jobs, tmp_path)
    job = SimpleNamespace(job_id="j" * 32, attempts=0)

    def crash(job: Any, *_args: Any) -> None:
        instances.pin(job.job_id, {"/s/input"})
        assert heartbeats()
        raise error

    monkeypatch.setattr(runner, "_run_tasks", crash)
    runner.run(job, SimpleNamespace(normalized="psql -f a.sql"),  # type: ignore[arg-type]
               se.JobRun(job.job_id), lambda _signature, _done: None)
    assert instances.owners() == set() and heartbeats() == []
    _events, last = jobs.updates[-1]
    assert last["status"] == "failed"
    code = "cache_limit_too_small" if isinstance(error, OSError) else "internal_error"
    assert f'"code": "{code}"' in last["error_json"]


def test_a_client_registered_on_a_job_is_killed_when_its_block_raises() -> None:
    class Client(se.ClientProcess):
        killed = 0

        def kill(self) -> None:
            self.killed += 1

    run, client = se.JobRun("j" * 32), Client()
    with pytest.raises(Injected), run.client(client) as registered:
        assert registered is client and run.processes == {client}
        raise Injected
    assert run.processes == set() and client.killed == 1


def test_a_job_runner_that_crashes_leaves_no_run_behind(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever escapes the executor, the prepare manager forgets the job's run (the engine
    is not kept busy by it), marks it done and logs why."""

    class CrashingExecutor:
        def check_image(self, _image_id: str) -> None:
            pass

        def run(self, *_args: Any) -> None:
            raise RuntimeError("a bug in the executor")

    class Jobs:
        def __init__(self) -> None:
            self.created: list[se.JobRow] = []

        def create_job(self, job: se.JobRow) -> None:
            self.created.append(job)

        def jobs_in(self, _statuses: Any) -> list[se.JobRow]:
            return []

    jobs = Jobs()
    manager = se.PrepareManager(jobs, CrashingExecutor(), None, None,  # type: ignore[arg-type]
                                workers=1)
    with caplog.at_level("ERROR", logger="sqlrs-engine"):
        job = manager.submit({"prepare_kind": "psql", "image_id": "host:15",
                              "psql_args": ["-c", "select 1"]})
        manager._pool.shutdown(wait=True)
    assert [j.job_id for j in jobs.created] == [job.job_id]
    assert not manager.busy()
    assert f"job {job.job_id} runner failed" in caplog.text
    assert "a bug in the executor" in caplog.text


def test_a_build_server_is_discarded_whatever_ends_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception no one listed (not even an Exception) raised while a job holds a build
    server and a step run ahead discards both and unpins the job."""
    instances, jobs = RecordingInstances(), FakeJobs()
    runner = executor(instances, jobs, tmp_path)
    job = SimpleNamespace(job_id="j" * 32, attempts=0)
    run = se.JobRun(job.job_id)

    def crash(job: Any, *_args: Any) -> None:
        run.runtime = handle("r" * 32, FakeRuntime())
        run.ahead = handle("a" * 32, FakeRuntime())
        instances.pin(job.job_id, {"/s/input"})
        raise Injected

    monkeypatch.setattr(runner, "_run_tasks", crash)
    with pytest.raises(Injected):
        runner.run(job, SimpleNamespace(normalized="psql -f a.sql"),  # type: ignore[arg-type]
                   run, lambda _signature, _done: None)
    assert sorted(instances.discarded) == ["a" * 32, "r" * 32]
    assert run.runtime is None and run.ahead is None
    assert instances.owners() == set() and heartbeats() == []
