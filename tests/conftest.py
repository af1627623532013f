"""Shared fixtures: start the engine exactly as the sqlrs CLI does and talk to it over HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sqlrs_engine import mounts_under

ROOT = Path(__file__).resolve().parent.parent
HOST_IMAGE = "host:15"
DOCKER_IMAGE = os.environ.get("SQLRS_TEST_IMAGE", "sqlrs-test/postgres:15")
PG_BIN = "/usr/lib/postgresql/15/bin"
# A start may sweep or adopt servers (and run a helper container) left by an earlier engine;
# on a busy 2-core machine that takes seconds. Polling still returns as soon as it is healthy.
STARTUP_DEADLINE = 30.0
ITEMS_SCHEMA = "create table items(id int primary key, label text not null);\n"
HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
UNKNOWN_INSTANCE = "0123456789abcdef0123456789abcdef"
UNKNOWN_STATE = "f" * 64
TIMESTAMP_RE = re.compile(
    r"(?P<whole>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d{1,9}))?Z")


def poll(predicate: Any, deadline_s: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Call ``predicate`` until it returns something truthy or the deadline passes."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval)


def to_epoch(ts: str) -> float:
    """Seconds since the epoch of an engine timestamp, RFC 3339 in UTC with up to nine fraction
    digits (``2026-07-21T08:15:30.123456789Z``). The fraction is cut to the microseconds that
    ``datetime`` holds and the offset spelled ``+00:00``, so the value is read as UTC whatever
    the local time zone and its daylight saving time."""
    match = TIMESTAMP_RE.fullmatch(ts)
    assert match, f"not an RFC 3339 UTC timestamp: {ts!r}"
    micros = (match["fraction"] or "")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{match['whole']}.{micros}+00:00").timestamp()


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


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
class EngineProcess:
    """A running engine subprocess and a small HTTP client for it."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    engine_json: Path
    info: dict[str, Any] = field(default_factory=dict)
    image: str = HOST_IMAGE

    @property
    def host(self) -> str:
        return str(self.info["endpoint"]).rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(str(self.info["endpoint"]).rsplit(":", 1)[1])

    @property
    def token(self) -> str:
        return str(self.info["authToken"])

    @property
    def store(self) -> Path:
        return self.state_dir / "state-store"

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float = 60.0) -> HttpResult:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if auth:
                hdrs.setdefault("Authorization", f"Bearer {self.token}")
            payload = raw if raw is not None else (
                json.dumps(body).encode() if body is not None else None)
            if payload is not None:
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=payload, headers=hdrs)
            resp = conn.getresponse()
            return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                              resp.read())
        finally:
            conn.close()

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
        events = self.get(f"/v1/prepare-jobs/{job_id}/events", timeout=deadline_s)
        assert events.status == 200, events.body
        status = self.get(f"/v1/prepare-jobs/{job_id}")
        assert status.status == 200
        job: dict[str, Any] = status.json()
        assert job["status"] in ("succeeded", "failed"), job
        return job

    def follow_events(self, job_id: str,
                      deadline_s: float = 60.0) -> Generator[dict[str, Any], None, None]:
        """The job's events from one live events request, each as it arrives, to the stream's
        end (close the generator to hang up early)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=deadline_s)
        try:
            conn.request("GET", f"/v1/prepare-jobs/{job_id}/events",
                         headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            assert resp.status == 200
            for line in iter(resp.readline, b""):
                yield json.loads(line)
        finally:
            conn.close()

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def healthy(self) -> bool:
        """engine.json is readable and ``/v1/health`` answers 200 (raises if the engine died)."""
        if self.proc.poll() is not None:
            log = self.state_dir / "logs" / "spawn.log"
            raise AssertionError(f"engine exited with {self.proc.returncode}: "
                                 f"{log.read_text()[-2000:]}")
        try:
            self.info = json.loads(self.engine_json.read_text())
            return self.get("/v1/health", auth=False, timeout=1).status == 200
        except (OSError, ValueError, KeyError):
            return False

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE) -> EngineProcess:
        poll(self.healthy, deadline_s, what="engine.json and /v1/health")
        return self


def spawn_engine(state_dir: Path, *extra: str, idle: str = "0", env: dict[str, str] | None = None,
                 argv0: list[str] | None = None, wait: bool = True) -> EngineProcess:
    """Start the engine with the CLI's argv (§1.5) and wait for a healthy engine.json (with
    ``wait=False``, return at once: call ``wait_ready`` later, to start several together)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    engine_json = state_dir / "engine.json"
    log_dir = state_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    cmd = [*(argv0 or [sys.executable, "-m", "sqlrs_engine"]),
           "--run-dir", str(state_dir / "run"), "--listen", "127.0.0.1:0",
           "--write-engine-json", str(engine_json), "--idle-timeout", idle, *extra]
    with open(log_dir / "spawn.log", "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    engine = EngineProcess(proc, state_dir, engine_json)
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


def expose_root(store: Path) -> Path:
    digest = hashlib.sha256(str(store).encode()).hexdigest()[:12]
    return Path("/run/sqlrs-engine") / digest


def mounts_below(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first."""
    return mounts_under(str(prefix))


def state_dirs(engine: EngineProcess) -> list[str]:
    """Names of the state directories in the engine's store."""
    found = []
    for root, dirs, _files in os.walk(engine.store / "engines"):
        if os.path.basename(root) == "states":
            found += [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def stop_engine(proc: EngineProcess) -> None:
    """Delete the engine's instances, stop it and clean its store, whatever state it is in."""
    with contextlib.suppress(Exception):
        if proc.proc.poll() is None:
            for inst in proc.get("/v1/instances").json() or []:
                proc.delete(f"/v1/instances/{inst['instance_id']}?force=true")
    with contextlib.suppress(Exception):
        proc.stop()
    with contextlib.suppress(Exception):
        proc.proc.kill()
    cleanup_store(proc.store)


def postgres_pids_below(*prefixes: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if not args or not args[0].endswith(b"postgres"):
                continue
            if any(str(prefix).encode() in arg for arg in args for prefix in prefixes):
                pids.append(int(entry.name))
    return pids


def engine_label(store: Path) -> str:
    return hashlib.sha256(str(store).encode()).hexdigest()[:12]


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
    roots = [store, expose_root(store)]
    for pid in postgres_pids_below(*roots):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for root in roots:
        for point in mounts_below(root):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", str(expose_root(store))], check=False)


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
