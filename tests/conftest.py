"""Shared fixtures: start the engine exactly as the sqlrs CLI does and talk to it over HTTP.

The engine harness itself (the process, its health wait, HTTP, the cleanup helpers) lives in
``tests/harness.py``, shared with the benchmarks; this module re-exports the names the tests
import from it and adds the fixtures and the assertions on the engine's answers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import HOST_IMAGE as HOST_IMAGE
from harness import PG_BIN as PG_BIN
from harness import ROOT as ROOT
from harness import STARTUP_DEADLINE as STARTUP_DEADLINE
from harness import HttpResult as HttpResult
from harness import SpawnedEngine, engine_argv, engine_label, sweep_store
from harness import container_postmaster_pid as container_postmaster_pid
from harness import expose_root as expose_root
from harness import mounts_below as mounts_below
from harness import poll as poll
from harness import postgres_pids_below as postgres_pids_below
from harness import to_epoch as to_epoch

DOCKER_IMAGE = os.environ.get("SQLRS_TEST_IMAGE", "sqlrs-test/postgres:15")
ITEMS_SCHEMA = "create table items(id int primary key, label text not null);\n"
HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
UNKNOWN_INSTANCE = "0123456789abcdef0123456789abcdef"
UNKNOWN_STATE = "f" * 64


def assert_json(result: HttpResult, status: int) -> Any:
    """A JSON answer with ``status`` (§2: ``application/json``, newline-terminated)."""
    assert result.status == status, (result.status, result.body[:500])
    assert result.headers.get("content-type", "").split(";")[0] == "application/json"
    assert result.body.endswith(b"\n"), result.body[-50:]
    return result.json()


def assert_error(result: HttpResult, status: int, code: str | None = None,
                 message: str | None = None, details: str | None = None) -> dict[str, Any]:
    """A JSON error body ``{code, message[, details]}`` (§2) with ``status``; each of ``code``,
    ``message`` and ``details`` that is given must match exactly."""
    body: dict[str, Any] = assert_json(result, status)
    assert set(body) <= {"code", "message", "details"}, body
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if "details" in body:
        assert isinstance(body["details"], str) and body["details"], body
    if code is not None:
        assert body["code"] == code, body
    if message is not None:
        assert body["message"] == message, body
    if details is not None:
        assert body.get("details") == details, body
    return body


@dataclass
class EngineProcess(SpawnedEngine):
    """A running engine subprocess (the shared harness with the tests' flavour: output in
    ``logs/spawn.log``, an ``AssertionError`` when it dies) and the requests the tests make;
    ``image`` is what its prepare jobs run on unless told otherwise."""

    image: str = HOST_IMAGE

    def get(self, path: str, **kw: Any) -> HttpResult:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> HttpResult:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> HttpResult:
        return self.request("DELETE", path, **kw)

    def submit(self, psql_args: list[str], image: str | None = None, **extra: Any) -> str:
        body = {"prepare_kind": "psql", "image_id": image or self.image, "psql_args": psql_args,
                **extra}
        result = self.post("/v1/prepare-jobs", body)
        assert result.status == 201, result.body
        return str(result.json()["job_id"])

    def wait_job(self, job_id: str, deadline_s: float = 120.0) -> dict[str, Any]:
        """Follow the events stream to its end, then return the job status."""
        return job_to_end(self, job_id, deadline_s)[0]

    def follow_events(self, job_id: str,
                      deadline_s: float = 60.0) -> Generator[dict[str, Any], None, None]:
        """The job's events from one live events request, each as it arrives, to the stream's
        end (close the generator to hang up early)."""
        return self.stream(f"/v1/prepare-jobs/{job_id}/events", deadline_s)

    def events_until(self, job_id: str, predicate: Any,
                     deadline_s: float = 60.0) -> list[dict[str, Any]]:
        """Read the live events stream until ``predicate(event)`` holds; return what was read."""
        seen: list[dict[str, Any]] = []
        with contextlib.closing(self.follow_events(job_id, deadline_s)) as events:
            for event in events:
                seen.append(event)
                if predicate(event):
                    return seen
        raise AssertionError(f"stream ended without the awaited event: {seen[-3:]}")

    def prepare(self, psql_args: list[str], image: str | None = None,
                **extra: Any) -> dict[str, Any]:
        return self.wait_job(self.submit(psql_args, image, **extra))


def spawn_engine(state_dir: Path, *extra: str, idle: str = "0", env: dict[str, str] | None = None,
                 argv0: list[str] | None = None, wait: bool = True) -> EngineProcess:
    """Start the engine with the CLI's argv (§1.5) and wait for a healthy engine.json (with
    ``wait=False``, return at once: call ``wait_ready`` later, to start several together)."""
    argv = engine_argv(state_dir, *extra, argv0=argv0, idle=idle, run_dir=True)
    engine = EngineProcess.launch(state_dir, argv, env={**os.environ, **(env or {})})
    return engine.wait_ready() if wait else engine


def start_prepared(root: Path, image: str = HOST_IMAGE) -> tuple[EngineProcess, dict[str, Any]]:
    """An engine below ``root`` that prepared one state (the ``items`` table) on ``image``:
    the engine and the succeeded job (its result holds the state and its instance). The engine
    is stopped and cleaned again if that fails."""
    script = root / "schema.sql"
    script.write_text(ITEMS_SCHEMA)
    engine = spawn_engine(root / "state")
    engine.image = image
    try:
        job = engine.prepare(["-f", str(script)])
        assert job["status"] == "succeeded", job
    except BaseException:
        stop_engine(engine)
        raise
    return engine, job


def state_dirs(engine: EngineProcess) -> list[str]:
    """Names of the state directories in the engine's store."""
    found = []
    for root, dirs, _files in os.walk(engine.store / "engines"):
        if os.path.basename(root) == "states":
            found += [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def stop_engine(proc: EngineProcess) -> None:
    """Delete the engine's instances, stop it and clean its store, whatever state it is in."""
    proc.shut_down()
    cleanup_store(proc.store)


def containers_of(store: Path) -> list[str]:
    """Ids of the containers an engine on ``store`` created (found by label)."""
    if not Path("/var/run/docker.sock").exists():
        return []
    out = subprocess.run(["docker", "ps", "-aq", "--filter",
                          f"label=sqlrs.engine={engine_label(store)}"],
                         capture_output=True, text=True, check=False)
    return out.stdout.split()


def leftover_servers(store: Path) -> list[str]:
    """Postgres processes and containers still running for ``store``."""
    pids = postgres_pids_below(store, expose_root(store))
    return [f"pid:{pid}" for pid in pids] + [f"container:{c}" for c in containers_of(store)]


def cleanup_store(store: Path) -> None:
    """Kill servers and remove containers and mounts a test left behind (even on failure)."""
    containers = containers_of(store)
    if containers:
        subprocess.run(["docker", "rm", "-f", *containers], check=False, capture_output=True)
    sweep_store(store)


def docker_available() -> bool:
    result = subprocess.run(["docker", "image", "inspect", DOCKER_IMAGE], capture_output=True,
                            check=False)
    return result.returncode == 0


@pytest.fixture
def runtime_image(request: pytest.FixtureRequest) -> str:
    """The image a test prepares on: host by default; modules parametrise it indirectly with
    ``RUNTIMES`` to run on both runtimes. Docker tests are skipped only when a developer sets
    SQLRS_SKIP_DOCKER_TESTS=1; otherwise a missing Docker fails them."""
    kind = getattr(request, "param", "host")
    if kind == "host":
        return HOST_IMAGE
    if os.environ.get("SQLRS_SKIP_DOCKER_TESTS") == "1":
        pytest.skip("SQLRS_SKIP_DOCKER_TESTS=1")
    assert docker_available(), f"docker or {DOCKER_IMAGE} missing: run scripts/setup-docker.sh"
    return DOCKER_IMAGE


RUNTIMES = pytest.mark.parametrize("runtime_image", ["host", "docker"], indirect=True)


@pytest.fixture
def engine_factory(tmp_path: Path, runtime_image: str) -> Iterator[Any]:
    started: list[EngineProcess] = []

    def start(*extra: str, state_dir: Path | None = None, **kw: Any) -> EngineProcess:
        proc = spawn_engine(state_dir or tmp_path / "state", *extra, **kw)
        proc.image = runtime_image
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_engine(proc)


@pytest.fixture
def engine(engine_factory: Any) -> EngineProcess:
    proc: EngineProcess = engine_factory()
    return proc


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A directory of small SQL scripts."""
    root = tmp_path / "sql"
    root.mkdir()
    (root / "schema.sql").write_text(ITEMS_SCHEMA)
    (root / "data.sql").write_text(
        "insert into items select g, 'item ' || g from generate_series(1, 100) g;\n")
    (root / "fail.sql").write_text("select 1;\nselect * from no_such_table;\n")
    return root


def without_warm_pool(engine: EngineProcess) -> EngineProcess:
    """Turn the warm pool off (config persists across restarts), for tests that count
    servers, containers or cached bytes exactly; tests/test_pool.py covers the pool."""
    result = engine.request("PATCH", "/v1/config",
                            {"path": "instances.warmPool.maxTotal", "value": 0})
    assert result.status == 200, result.body
    return engine


def psql(dsn: str, sql: str) -> str:
    out = subprocess.run([f"{PG_BIN}/psql", "-XAt", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def post_run(engine: EngineProcess, ref: str, *args: str, kind: str = "psql",
             **extra: Any) -> HttpResult:
    """``POST /v1/runs`` (§3.7) against the instance ``ref`` (an id or a name)."""
    return engine.post("/v1/runs", {"instance_ref": ref, "kind": kind, "args": list(args),
                                    **extra})


def run_events(result: HttpResult) -> list[dict[str, Any]]:
    """The events of a successful run stream: start first, exit last."""
    assert result.status == 200, result.body[:500]
    assert result.headers["content-type"].split(";")[0] == "application/x-ndjson"
    events = result.ndjson()
    types = [e["type"] for e in events]
    assert "start" in types and types[-1] == "exit", types
    assert types.count("start") == 1 and types.count("exit") == 1, types
    return events


def output(events: list[dict[str, Any]], stream: str = "stdout") -> str:
    return "".join(e["data"] for e in events if e["type"] == stream)


def exit_code(events: list[dict[str, Any]]) -> int:
    code: int = events[-1]["exit_code"]
    return code


def sql_via_run(engine: EngineProcess, ref: str, sql: str) -> str:
    """Run one SQL command through ``run:psql``; it must exit 0; its stdout, stripped."""
    events = run_events(post_run(engine, ref, "-XAt", "-v", "ON_ERROR_STOP=1", "-c", sql))
    assert exit_code(events) == 0, events
    return output(events).strip()


class OpenApiChecker:
    """Validates responses against the engine's own /v1/openapi.json."""

    def __init__(self, document: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.document = document
        self._validator_cls = Draft202012Validator
        self._registry = Registry().with_resource(
            "urn:sqlrs", Resource.from_contents(document, default_specification=DRAFT202012))

    def schema_for(self, path: str, method: str, status: int, media: str) -> dict[str, Any]:
        op = self.document["paths"][path][method.lower()]
        response = op["responses"][str(status)]
        schema: dict[str, Any] = response["content"][media]["schema"]
        return schema

    def check(self, path: str, method: str, result: HttpResult) -> None:
        media = result.headers.get("content-type", "").split(";")[0]
        schema = self._rebase(self.schema_for(path, method, result.status, media))
        values = result.ndjson() if media == "application/x-ndjson" else [result.json()]
        validator = self._validator_cls(schema, registry=self._registry,
                                        format_checker=self._validator_cls.FORMAT_CHECKER)
        for value in values:
            errors = list(validator.iter_errors(value))
            assert not errors, f"{method} {path} {result.status}: {errors[0].message}"

    def _rebase(self, schema: Any) -> Any:
        if isinstance(schema, dict):
            return {k: (f"urn:sqlrs{v}" if k == "$ref" and v.startswith("#") else self._rebase(v))
                    for k, v in schema.items()}
        if isinstance(schema, list):
            return [self._rebase(v) for v in schema]
        return schema


@pytest.fixture
def openapi(engine: EngineProcess) -> OpenApiChecker:
    return OpenApiChecker(engine.get("/v1/openapi.json", auth=False).json())


def job_to_end(engine: EngineProcess, job_id: str,
               deadline_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read the job's whole NDJSON events stream, then return (job status, events)."""
    events = engine.get(f"/v1/prepare-jobs/{job_id}/events", timeout=deadline_s)
    assert events.status == 200, events.body
    status = engine.get(f"/v1/prepare-jobs/{job_id}")
    assert status.status == 200, status.body
    job: dict[str, Any] = status.json()
    assert job["status"] in ("succeeded", "failed"), job
    return job, events.ndjson()


def killed_at(engine: EngineProcess, hooks: Path, point: str, method: str, path: str,
              body: Any = None) -> None:
    """Arm the pause point ``point`` (``hooks`` is the engine's SQLRS_TEST_HOOKS_DIR), send
    ``method path`` from a thread, wait until the engine is paused there and kill it (-9);
    the request gets no answer."""
    (hooks / point).touch()

    def call() -> None:
        with contextlib.suppress(OSError):  # the engine dies before it answers
            engine.request(method, path, body, timeout=300)

    caller = threading.Thread(target=call)
    caller.start()
    poll(lambda: (hooks / f"{point}.reached").exists(), 120, what=f"the pause point {point}")
    engine.proc.send_signal(signal.SIGKILL)
    engine.proc.wait(30)
    caller.join(60)
