"""Instances, names, runs, deletion, TTL and restart (§3.2, §3.3, §3.7, §6, §14 points 3-7, 9
and 10), against real PostgreSQL 15 on both runtimes: host binaries and Docker containers.

Every test runs once per runtime (``RUNTIMES`` parametrises ``runtime_image``). A "server" is a
host postmaster (``pid:<pid>``) or a container labelled with the engine (``container:<id>``), as
``leftover_servers`` lists them; ``server_of`` maps an instance entry onto that form.

Two kinds of engines are used:

* ``base``: one engine per runtime and module with one prepared state, started on first use;
  tests on it create their own instances (removed again by ``make_instance``) and never delete
  states;
* ``engine`` / ``engine_factory`` (conftest): a fresh engine per test, where a test counts
  servers, deletes states, waits for the reaper or restarts the engine.

Not covered: an ambiguous state id prefix (409). Two states sharing their first 8 hex
characters cannot be produced on purpose through the API, so that case is left out.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
from conftest import (
    HEX32_RE,
    RUNTIMES,
    UNKNOWN_INSTANCE,
    UNKNOWN_STATE,
    EngineProcess,
    HttpResult,
    OpenApiChecker,
    assert_error,
    container_postmaster_pid,
    exit_code,
    expose_root,
    leftover_servers,
    output,
    poll,
    post_run,
    psql,
    run_events,
    sql_via_run,
    start_prepared,
    state_dirs,
    stop_engine,
    to_epoch,
    without_warm_pool,
)

pytestmark = RUNTIMES

REF = "<instance>"  # placeholder in request tables, replaced by a real instance id
REAPER_DEADLINE = 15.0
INSTANCE_PATH = "/v1/instances/{idOrName}"
DEAD_CONNECTION = (psycopg2.OperationalError, psycopg2.InterfaceError)


# ------------------------------------------------------------------------------------ helpers


def created_entry(result: HttpResult) -> dict[str, Any]:
    """The entry of a ``POST /v1/instances`` answer; asserts 201 and the Location header."""
    assert result.status == 201, result.body
    entry: dict[str, Any] = result.json()
    assert result.headers["location"] == f"/v1/instances/{entry['instance_id']}"
    return entry


def create_instance(engine: EngineProcess, state_ref: str, **fields: Any) -> dict[str, Any]:
    return created_entry(engine.post("/v1/instances", {"state_id": state_ref, **fields}))


def get_instance(engine: EngineProcess, instance_id: str) -> dict[str, Any] | None:
    result = engine.get(f"/v1/instances/{instance_id}")
    if result.status == 404:
        return None
    assert result.status == 200, result.body
    entry: dict[str, Any] = result.json()
    return entry


def get_state(engine: EngineProcess, state_id: str) -> dict[str, Any]:
    result = engine.get(f"/v1/states/{state_id}")
    assert result.status == 200, result.body
    state: dict[str, Any] = result.json()
    return state


def port_of(dsn: str) -> int:
    port = urlsplit(dsn).port
    assert port is not None, dsn
    return port


def on_host(engine: EngineProcess) -> bool:
    return engine.image.startswith("host:")


def image_prefix(engine: EngineProcess) -> str:
    """How the resolved ``image_id`` of the engine's runtime begins: ``host:15`` on the host,
    ``<repository>@sha256:`` (the image pinned by digest) on Docker."""
    if on_host(engine):
        return engine.image
    name = engine.image.split("@", 1)[0]
    repository = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return f"{repository}@sha256:"


def assert_runtime_id(engine: EngineProcess, runtime_id: str) -> None:
    """``host:<pid>`` on the host runtime, a full (64 hex) container id on Docker."""
    pattern = r"host:[1-9]\d*" if on_host(engine) else r"[0-9a-f]{64}"
    assert re.fullmatch(pattern, runtime_id), (engine.image, runtime_id)


def server_of(engine: EngineProcess, entry: dict[str, Any]) -> str:
    """The instance's server in ``leftover_servers`` form: ``pid:<pid>`` or ``container:<id>``
    (``docker ps`` shows 12 characters of the id)."""
    runtime_id = str(entry["runtime_id"])
    assert_runtime_id(engine, runtime_id)
    if on_host(engine):
        return f"pid:{runtime_id.removeprefix('host:')}"
    return f"container:{runtime_id[:12]}"


def servers(engine: EngineProcess) -> list[str]:
    """Postmasters and containers running for the engine's store."""
    return leftover_servers(engine.store)


def postmaster_pid(engine: EngineProcess, entry: dict[str, Any]) -> int:
    """The host pid of the instance's postmaster (on Docker, the one inside its container)."""
    server = server_of(engine, entry)
    if on_host(engine):
        return int(server.removeprefix("pid:"))
    return container_postmaster_pid(entry["runtime_id"])


def kill_server(engine: EngineProcess, entry: dict[str, Any]) -> None:
    """Make the instance's server vanish behind the engine's back: SIGKILL the postmaster,
    or force-remove the container."""
    server = server_of(engine, entry)
    if on_host(engine):
        os.kill(int(server.removeprefix("pid:")), signal.SIGKILL)
    else:
        subprocess.run(["docker", "rm", "-f", entry["runtime_id"]], check=True,
                       capture_output=True, timeout=60)
    poll(lambda: server not in servers(engine), 10, what=f"{server} to go")


def instance_dirs(engine: EngineProcess) -> list[str]:
    root = engine.store / "instances"
    return sorted(os.listdir(root)) if root.is_dir() else []


@contextlib.contextmanager
def connected(dsn: str) -> Iterator[Any]:
    """A psycopg2 client session held open for the block, closed in any case."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        yield conn
    finally:
        conn.close()


def query_one(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def connection_is_dead(conn: Any) -> bool:
    try:
        query_one(conn, "select 1")
    except DEAD_CONNECTION:
        return True
    return False


def strip_runtime(engine: EngineProcess, node: dict[str, Any]) -> dict[str, Any]:
    """A delete node without ``runtime_id`` (checked to be the runtime's form), recursively."""
    out = {k: v for k, v in node.items() if k not in ("runtime_id", "children")}
    if "runtime_id" in node:
        assert_runtime_id(engine, node["runtime_id"])
    if "children" in node:
        out["children"] = [strip_runtime(engine, child) for child in node["children"]]
    return out


def stream_run(engine: EngineProcess, body: dict[str, Any],
               deadline_s: float = 60.0) -> list[tuple[float, dict[str, Any]]]:
    """Read a run's NDJSON stream line by line; each event with its arrival time."""
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=deadline_s)
    try:
        conn.request("POST", "/v1/runs", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {engine.token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return [(time.monotonic(), json.loads(line)) for line in iter(resp.readline, b"")]
    finally:
        conn.close()


# ----------------------------------------------------------------------------------- fixtures


@dataclass
class Base:
    engine: EngineProcess
    state_id: str
    instance_id: str
    doc: OpenApiChecker


def start_base(root: Path, image: str) -> Base:
    """An engine on ``image`` with one prepared state (``items`` table) and its instance."""
    proc, job = start_prepared(root, image)
    try:
        doc = OpenApiChecker(proc.get("/v1/openapi.json", auth=False).json())
    except BaseException:
        stop_engine(proc)
        raise
    return Base(proc, job["result"]["state_id"], job["result"]["instance_id"], doc)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Base | str]]:
    """The module's base engines by image, started on first use (``runtime_image`` is
    function-scoped, so a module-scoped fixture cannot depend on it); a failed start is
    remembered so that the other tests of that runtime fail fast instead of retrying."""
    started: dict[str, Base | str] = {}
    yield started
    for made in started.values():
        if isinstance(made, Base):
            stop_engine(made.engine)


@pytest.fixture
def base(bases: dict[str, Base | str], runtime_image: str,
         tmp_path_factory: pytest.TempPathFactory) -> Base:
    if runtime_image not in bases:
        try:
            bases[runtime_image] = start_base(tmp_path_factory.mktemp("instances"),
                                              runtime_image)
        except Exception as exc:
            bases[runtime_image] = f"{type(exc).__name__}: {exc}"
            raise
    made = bases[runtime_image]
    if isinstance(made, str):
        pytest.fail(f"the base engine for {runtime_image} failed to start: {made[:500]}")
    return made


@pytest.fixture
def doc(base: Base) -> OpenApiChecker:
    return base.doc


class InstanceMaker:
    """Creates instances of the base state for one test and force-deletes them afterwards."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.made: list[str] = []

    def post(self, body: dict[str, Any]) -> HttpResult:
        result = self.base.engine.post("/v1/instances", body)
        if result.status == 201:
            self.made.append(result.json()["instance_id"])
        return result

    def __call__(self, **fields: Any) -> dict[str, Any]:
        return created_entry(self.post({"state_id": self.base.state_id, **fields}))

    def cleanup(self) -> None:
        for instance_id in self.made:
            self.base.engine.delete(f"/v1/instances/{instance_id}?force=true")


@pytest.fixture
def make_instance(base: Base) -> Iterator[InstanceMaker]:
    maker = InstanceMaker(base)
    yield maker
    maker.cleanup()


def two_step_prepare(engine: EngineProcess, scripts: Path, **extra: Any) -> dict[str, Any]:
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")],
                         **extra)
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]
    return result


# ============================================================== POST /v1/instances (§14.3)


STATE_REFS: list[tuple[str, Callable[[str], str]]] = [
    ("full id", lambda s: s),
    ("full id upper case", lambda s: s.upper()),
    ("8 hex prefix", lambda s: s[:8]),
    ("12 hex prefix upper case", lambda s: s[:12].upper()),
]


@pytest.mark.parametrize("form", [f for _, f in STATE_REFS], ids=[n for n, _ in STATE_REFS])
def test_create_instance_from_state_ref(base: Base, doc: OpenApiChecker,
                                        make_instance: InstanceMaker,
                                        form: Callable[[str], str]) -> None:
    engine = base.engine
    before = get_state(engine, base.state_id)
    result = make_instance.post({"state_id": form(base.state_id)})
    entry = created_entry(result)
    doc.check("/v1/instances", "POST", result)
    assert HEX32_RE.match(entry["instance_id"])
    assert entry["state_id"] == base.state_id
    assert entry["image_id"].startswith(image_prefix(engine))
    assert entry["image_id"] == get_state(engine, base.state_id)["image_id"]
    assert entry["status"] == "active"
    assert "expires_at" not in entry and "name" not in entry
    assert re.fullmatch(r"postgres://sqlrs:[A-Za-z0-9_-]{32}@127\.0\.0\.1:\d+/postgres",
                        entry["dsn"]), entry["dsn"]
    assert server_of(engine, entry) in servers(engine)
    assert psql(entry["dsn"], "select count(*) from items") == "0"
    after = get_state(engine, base.state_id)
    assert after["use_count"] == before["use_count"] + 1
    assert after["last_used_at"] == entry["created_at"]
    assert to_epoch(after["last_used_at"]) > to_epoch(before["last_used_at"])
    assert after["refcount"] == before["refcount"] + 1
    assert entry in engine.get("/v1/instances").json()


CREATE_REJECTIONS = [
    ({"state_id": UNKNOWN_STATE}, 404, "not_found", "state not found"),
    ({"state_id": "00000000feedface"}, 404, "not_found", "state not found"),
    ({"state_id": "abc1234"}, 400, "invalid_argument", "invalid state_id"),
    ({"state_id": "zzzzzzzz"}, 400, "invalid_argument", "invalid state_id"),
    ({"state_id": "abcdefg1"}, 400, "invalid_argument", "invalid state_id"),
    ({}, 400, "invalid_argument", "state_id is required"),
    ({"state_id": "  "}, 400, "invalid_argument", "state_id is required"),
    ({"state_id": 5}, 400, "invalid_argument", "state_id is required"),
    ({"state_id": "<state>", "ttl_seconds": 0}, 400, "invalid_argument", "invalid ttl_seconds"),
    ({"state_id": "<state>", "ttl_seconds": -1}, 400, "invalid_argument", "invalid ttl_seconds"),
    ({"state_id": "<state>", "ttl_seconds": "5"}, 400, "invalid_argument",
     "invalid ttl_seconds"),
    ({"state_id": "<state>", "ttl_seconds": 1.5}, 400, "invalid_argument",
     "invalid ttl_seconds"),
    ({"state_id": "<state>", "name": "a b"}, 400, "invalid_argument", "invalid name"),
    ({"state_id": "<state>", "name": UNKNOWN_INSTANCE}, 400, "invalid_argument",
     "invalid name"),
    ({"state_id": "<state>", "name": 7}, 400, "invalid_argument", "invalid name"),
]


@pytest.mark.parametrize(("body", "status", "code", "message"), CREATE_REJECTIONS)
def test_create_instance_rejections(base: Base, doc: OpenApiChecker, body: dict[str, Any],
                                    status: int, code: str, message: str) -> None:
    engine = base.engine
    before = engine.get("/v1/instances").json()
    sent = {k: (base.state_id if v == "<state>" else v) for k, v in body.items()}
    result = engine.post("/v1/instances", sent)
    assert_error(result, status, code, message)
    doc.check("/v1/instances", "POST", result)
    assert engine.get("/v1/instances").json() == before


def test_name_at_creation_redirects_and_is_unique(base: Base, doc: OpenApiChecker,
                                                  make_instance: InstanceMaker
                                                  ) -> None:
    engine = base.engine
    entry = make_instance(name="created-with-name")
    assert entry["name"] == "created-with-name"
    redirect = engine.get("/v1/instances/created-with-name")
    assert redirect.status == 307
    assert redirect.headers["location"] == f"/v1/instances/{entry['instance_id']}"
    assert redirect.body == b""
    named = engine.get("/v1/names/created-with-name").json()
    assert (named["instance_id"], named["status"]) == (entry["instance_id"], "active")
    count = len(engine.get("/v1/instances").json())
    again = make_instance.post({"state_id": base.state_id, "name": "created-with-name"})
    assert_error(again, 409, "conflict", "name already in use")
    doc.check("/v1/instances", "POST", again)
    assert len(engine.get("/v1/instances").json()) == count


def test_instance_entries_match_the_schema(base: Base, doc: OpenApiChecker,
                                           make_instance: InstanceMaker) -> None:
    engine = base.engine
    entry = make_instance(name="shape-check", ttl_seconds=3600)
    listed = engine.get("/v1/instances")
    assert listed.status == 200
    doc.check("/v1/instances", "GET", listed)
    assert entry in listed.json()
    one = engine.get(f"/v1/instances/{entry['instance_id']}")
    doc.check(INSTANCE_PATH, "GET", one)
    assert one.json() == entry
    upper = engine.get(f"/v1/instances/{entry['instance_id'].upper()}")
    assert upper.status == 200 and upper.json() == entry
    assert to_epoch(entry["expires_at"]) - to_epoch(entry["created_at"]) == pytest.approx(
        3600, abs=1e-3)


# ============================================================ many instances from one state


def test_twenty_concurrent_instances_are_isolated(engine: EngineProcess, scripts: Path) -> None:
    without_warm_pool(engine)
    result = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]
    state_id = result["state_id"]
    with ThreadPoolExecutor(max_workers=20) as pool:
        entries = list(pool.map(lambda _: create_instance(engine, state_id), range(20)))
    ids = {e["instance_id"] for e in entries}
    ports = {port_of(e["dsn"]) for e in entries}
    assert len(ids) == 20 and len(ports) == 20
    assert port_of(result["dsn"]) not in ports
    assert len({server_of(engine, e) for e in entries}) == 20
    for entry in entries:
        with connected(entry["dsn"]) as conn:
            assert query_one(conn, "select count(*) from items") == 0
    psql(entries[0]["dsn"], "insert into items values (1, 'only here')")
    assert psql(entries[0]["dsn"], "select count(*) from items") == "1"
    for entry in entries[1:]:
        assert psql(entry["dsn"], "select count(*) from items") == "0"
    assert psql(result["dsn"], "select count(*) from items") == "0"
    later = create_instance(engine, state_id)
    assert psql(later["dsn"], "select count(*) from items") == "0"
    state = get_state(engine, state_id)
    assert state["use_count"] == 22
    assert state["refcount"] == 22
    listed = engine.get("/v1/instances").json()
    assert len(listed) == 22
    assert sorted(servers(engine)) == sorted(server_of(engine, e) for e in listed)


# ================================================================================ names (§14.4)


def test_bind_rebind_and_unbind_a_name(base: Base, doc: OpenApiChecker,
                                       make_instance: InstanceMaker) -> None:
    engine = base.engine
    first, second = make_instance(), make_instance()
    created = engine.request("PUT", "/v1/names/blue", {"instance_id": first["instance_id"]})
    assert created.status == 201, created.body
    doc.check("/v1/names/{name}", "PUT", created)
    assert created.json()["instance_id"] == first["instance_id"]
    assert created.json()["status"] == "active"
    listed = engine.get("/v1/names")
    doc.check("/v1/names", "GET", listed)
    assert "blue" in [n["name"] for n in listed.json()]
    one = engine.get("/v1/names/blue")
    doc.check("/v1/names/{name}", "GET", one)
    assert one.json()["status"] == "active"
    assert one.json()["state_id"] == base.state_id
    assert engine.get("/v1/instances/blue").headers["location"] == (
        f"/v1/instances/{first['instance_id']}")
    assert get_instance(engine, first["instance_id"])["name"] == "blue"  # type: ignore[index]

    rebound = engine.request("PUT", "/v1/names/blue", {"instance_id": second["instance_id"]})
    assert rebound.status == 200, rebound.body
    doc.check("/v1/names/{name}", "PUT", rebound)
    assert rebound.json()["instance_id"] == second["instance_id"]
    assert engine.get("/v1/instances/blue").headers["location"] == (
        f"/v1/instances/{second['instance_id']}")
    assert "name" not in get_instance(engine, first["instance_id"])  # type: ignore[operator]
    assert get_instance(engine, second["instance_id"])["name"] == "blue"  # type: ignore[index]
    by_instance = engine.get(f"/v1/names?instance={second['instance_id']}").json()
    assert [n["name"] for n in by_instance] == ["blue"]

    removed = engine.delete("/v1/names/blue")
    assert removed.status == 200
    doc.check("/v1/names/{name}", "DELETE", removed)
    assert engine.get("/v1/names/blue").status == 404
    assert engine.get("/v1/instances/blue").status == 404
    assert "blue" not in [n["name"] for n in engine.get("/v1/names").json()]
    again = engine.delete("/v1/names/blue")
    assert_error(again, 404, "not_found", "name not found")
    assert get_instance(engine, second["instance_id"]) is not None


def test_runs_accept_a_name(base: Base, make_instance: InstanceMaker) -> None:
    engine = base.engine
    entry = make_instance(name="run-by-name")
    events = run_events(post_run(engine, "run-by-name", "-XAt", "-c", "select 7"))
    assert events[0] == {**events[0], "type": "start", "instance_id": entry["instance_id"]}
    assert output(events).strip() == "7"
    assert exit_code(events) == 0


def test_deleting_an_instance_deletes_its_names(base: Base,
                                                make_instance: InstanceMaker
                                                ) -> None:
    engine = base.engine
    entry = make_instance(name="doomed")
    bound = engine.request("PUT", "/v1/names/doomed-too", {"instance_id": entry["instance_id"]})
    assert bound.status == 201
    deleted = engine.delete(f"/v1/instances/{entry['instance_id']}")
    assert deleted.status == 200, deleted.body
    for name in ("doomed", "doomed-too"):
        assert engine.get(f"/v1/names/{name}").status == 404
        assert engine.get(f"/v1/instances/{name}").status == 404
    assert engine.get(f"/v1/names?instance={entry['instance_id']}").json() == []


# ================================================================================= runs (§3.7)


@pytest.mark.parametrize("kind", ["psql", "PSQL"])
def test_psql_run_streams_stdout_and_exit(base: Base, doc: OpenApiChecker, kind: str) -> None:
    result = post_run(base.engine, base.instance_id, "-c", "select 42", kind=kind)
    doc.check("/v1/runs", "POST", result)
    events = run_events(result)
    assert events[0]["type"] == "start"
    assert events[0]["instance_id"] == base.instance_id
    assert "42" in output(events)
    assert exit_code(events) == 0
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


def test_failing_sql_exits_non_zero_with_stderr(base: Base, doc: OpenApiChecker) -> None:
    result = post_run(base.engine, base.instance_id, "-X", "-v", "ON_ERROR_STOP=1",
                 "-c", "select * from nope")
    doc.check("/v1/runs", "POST", result)
    events = run_events(result)
    assert exit_code(events) != 0
    assert 'relation "nope" does not exist' in output(events, "stderr")
    assert "nope" not in output(events)


def test_steps_run_in_order(base: Base, make_instance: InstanceMaker) -> None:
    engine = base.engine
    entry = make_instance()
    steps = [{"args": ["-c", "create table r(x int)"]},
             {"args": ["-f", "-"], "stdin": "insert into r values (1);"}]
    result = engine.post("/v1/runs", {"instance_ref": entry["instance_id"], "kind": "psql",
                                      "steps": steps})
    events = run_events(result)
    assert exit_code(events) == 0
    assert "CREATE TABLE" in output(events) and "INSERT 0 1" in output(events)
    assert output(events).index("CREATE TABLE") < output(events).index("INSERT 0 1")
    assert psql(entry["dsn"], "select count(*) from r") == "1"


def test_failing_step_stops_the_steps(base: Base,
                                      make_instance: InstanceMaker) -> None:
    engine = base.engine
    entry = make_instance()
    steps = [{"args": ["-v", "ON_ERROR_STOP=1", "-c", "select * from nope"]},
             {"args": ["-c", "create table never(x int)"]}]
    events = run_events(engine.post("/v1/runs", {"instance_ref": entry["instance_id"],
                                                 "kind": "psql", "steps": steps}))
    assert exit_code(events) != 0
    assert psql(entry["dsn"], "select count(*) from pg_tables where tablename = 'never'") == "0"


def test_stdin_is_fed_to_psql(base: Base) -> None:
    events = run_events(post_run(base.engine, base.instance_id, "-XAt", "-f", "-",
                            stdin="select 6 * 7;\nselect 'done';\n"))
    assert output(events).split() == ["42", "done"]
    assert exit_code(events) == 0


def test_pgbench_init_and_run(base: Base, make_instance: InstanceMaker) -> None:
    engine = base.engine
    entry = make_instance()
    init = run_events(post_run(engine, entry["instance_id"], "-i", "-s", "1", kind="pgbench"))
    assert exit_code(init) == 0, init
    assert psql(entry["dsn"], "select count(*) from pgbench_accounts") == "100000"
    bench = run_events(post_run(engine, entry["instance_id"], "-c", "2", "-t", "20", "-n",
                           kind="pgbench"))
    assert exit_code(bench) == 0, bench
    assert "number of transactions actually processed: 40/40" in output(bench)


RUN_REJECTIONS = [
    ({"kind": "psql", "args": ["-c", "select 1"]}, 400, "invalid_argument",
     "instance_ref is required"),
    ({"instance_ref": "  ", "kind": "psql"}, 400, "invalid_argument",
     "instance_ref is required"),
    ({"instance_ref": REF, "kind": "mysql"}, 400, "invalid_argument", "unknown run kind"),
    ({"instance_ref": REF}, 400, "invalid_argument", "unknown run kind"),
    ({"instance_ref": REF, "kind": "pgbench", "steps": [{"args": ["-n"]}]}, 400,
     "invalid_argument", "steps are only supported for run:psql"),
    ({"instance_ref": REF, "kind": "psql", "args": ["-c", "select 1"],
      "steps": [{"args": ["-c", "select 2"]}]}, 400, "invalid_argument",
     "steps cannot be combined with args"),
    ({"instance_ref": REF, "kind": "psql", "stdin": "select 1;",
      "steps": [{"args": ["-f", "-"]}]}, 400, "invalid_argument",
     "steps cannot be combined with stdin"),
    ({"instance_ref": UNKNOWN_INSTANCE, "kind": "psql", "args": ["-c", "select 1"]}, 404,
     "not_found", "instance not found"),
    ({"instance_ref": "no-such-name", "kind": "psql", "args": ["-c", "select 1"]}, 404,
     "not_found", "instance not found"),
    *[({"instance_ref": REF, "kind": "psql", "args": [*args, "-c", "select 1"]}, 409,
       "conflict", "conflicting psql connection arguments")
      for args in (["-h", "x"], ["--port=1"], ["-Usomeone"], ["--dbname", "x"],
                   ["postgres://x/y"], ["-p5432"], ["--host=x"])],
    ({"instance_ref": REF, "kind": "psql",
      "steps": [{"args": ["-c", "select 1"]}, {"args": ["-d", "x", "-c", "select 1"]}]}, 409,
     "conflict", "conflicting psql connection arguments"),
    *[({"instance_ref": REF, "kind": "pgbench", "args": [*args, "-n"]}, 409,
       "conflict", "conflicting pgbench connection arguments")
      for args in (["-h", "x"], ["-p5432"], ["--username=x"])],
]


@pytest.mark.parametrize(("body", "status", "code", "message"), RUN_REJECTIONS)
def test_invalid_runs_are_rejected(base: Base, doc: OpenApiChecker, body: dict[str, Any],
                                   status: int, code: str, message: str) -> None:
    sent = {k: (base.instance_id if v == REF else v) for k, v in body.items()}
    result = base.engine.post("/v1/runs", sent)
    assert_error(result, status, code, message)
    doc.check("/v1/runs", "POST", result)


def test_run_output_is_streamed_live(base: Base) -> None:
    body = {"instance_ref": base.instance_id, "kind": "psql",
            "args": ["-XAt", "-c", "select 1", "-c", "select pg_sleep(1.5)", "-c", "select 2"]}
    timed = stream_run(base.engine, body)
    events = [event for _, event in timed]
    assert events[-1] == {**events[-1], "type": "exit", "exit_code": 0}
    first = next(t for t, e in timed if e["type"] == "stdout" and e["data"].strip() == "1")
    second = next(t for t, e in timed if e["type"] == "stdout" and e["data"].strip() == "2")
    done = timed[-1][0]
    assert done - first >= 1.0, timed
    assert second - first >= 1.0, timed


# ================================================== connection tracking and deletion (§6.3, §6.4)


def test_delete_instance_with_a_client_connection(engine: EngineProcess, scripts: Path,
                                                  openapi: OpenApiChecker) -> None:
    without_warm_pool(engine)  # counts servers: no refill may start in between
    state_id = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]["state_id"]
    entry = create_instance(engine, state_id)
    instance_id, server = entry["instance_id"], server_of(engine, entry)
    alone = engine.delete(f"/v1/instances/{instance_id}?dry_run=true")
    assert alone.status == 200
    assert alone.json() == {"dry_run": True, "outcome": "would_delete",
                            "root": {"kind": "instance", "id": instance_id, "connections": 0,
                                     "runtime_id": entry["runtime_id"]}}
    before = servers(engine)
    assert server in before
    with connected(entry["dsn"]) as conn:
        blocked = engine.delete(f"/v1/instances/{instance_id}")
        assert blocked.status == 409
        openapi.check(INSTANCE_PATH, "DELETE", blocked)
        body = blocked.json()
        assert (body["dry_run"], body["outcome"]) == (False, "blocked")
        root = body["root"]
        assert (root["kind"], root["id"], root["blocked"]) == (
            "instance", instance_id, "active_connections")
        assert root["connections"] >= 1
        dry = engine.delete(f"/v1/instances/{instance_id}?dry_run=true")
        assert dry.status == 200
        openapi.check(INSTANCE_PATH, "DELETE", dry)
        assert (dry.json()["dry_run"], dry.json()["outcome"]) == (True, "blocked")
        assert query_one(conn, "select 1") == 1
        assert get_instance(engine, instance_id) is not None

        forced = engine.delete(f"/v1/instances/{instance_id}?force=true")
        assert forced.status == 200, forced.body
        openapi.check(INSTANCE_PATH, "DELETE", forced)
        assert forced.json()["outcome"] == "deleted"
        assert forced.json()["root"]["connections"] >= 1
        assert connection_is_dead(conn)
    after = servers(engine)
    assert sorted(after) == sorted(s for s in before if s != server)
    assert not (engine.store / "instances" / instance_id).exists()
    assert not (expose_root(engine.store) / instance_id).exists()
    assert engine.get(f"/v1/instances/{instance_id}").status == 404
    assert instance_id not in [i["instance_id"] for i in engine.get("/v1/instances").json()]
    assert get_state(engine, state_id)["refcount"] == 1


@pytest.mark.parametrize("ref", [UNKNOWN_INSTANCE, "not-an-id", "z" * 32])
def test_delete_unknown_instance_is_404(base: Base, doc: OpenApiChecker, ref: str) -> None:
    result = base.engine.delete(f"/v1/instances/{ref}?force=true")
    assert_error(result, 404, "not_found", "instance not found")
    doc.check(INSTANCE_PATH, "DELETE", result)


def test_delete_by_name_is_404(base: Base, make_instance: InstanceMaker) -> None:
    entry = make_instance(name="not-deletable-by-name")
    result = base.engine.delete("/v1/instances/not-deletable-by-name")
    assert_error(result, 404, "not_found", "instance not found")
    assert get_instance(base.engine, entry["instance_id"]) is not None


def test_recursive_state_deletion(engine: EngineProcess, scripts: Path,
                                  openapi: OpenApiChecker) -> None:
    result = two_step_prepare(engine, scripts)
    child, child_instance = result["state_id"], result["instance_id"]
    parent = get_state(engine, child)["parent_state_id"]
    extra = create_instance(engine, parent)
    instance_ids = {child_instance, extra["instance_id"]}
    assert sorted(state_dirs(engine)) == sorted([parent, child])

    plain = engine.delete(f"/v1/states/{parent}")
    assert plain.status == 409
    openapi.check("/v1/states/{stateId}", "DELETE", plain)
    assert plain.json() == {"dry_run": False, "outcome": "blocked",
                            "root": {"kind": "state", "id": parent,
                                     "blocked": "has_descendants"}}

    def tree(child_connections: int, blocked: bool) -> dict[str, Any]:
        inner: dict[str, Any] = {"kind": "instance", "id": child_instance,
                                 "connections": child_connections}
        child_node: dict[str, Any] = {"kind": "state", "id": child, "children": [inner]}
        root: dict[str, Any] = {"kind": "state", "id": parent, "children": [
            {"kind": "instance", "id": extra["instance_id"], "connections": 0}, child_node]}
        if blocked:
            inner["blocked"] = "active_connections"
            child_node["blocked"] = root["blocked"] = "blocked_by_descendant"
        return root

    dry = engine.delete(f"/v1/states/{parent}?recurse=true&dry_run=true")
    assert dry.status == 200
    openapi.check("/v1/states/{stateId}", "DELETE", dry)
    assert (dry.json()["dry_run"], dry.json()["outcome"]) == (True, "would_delete")
    assert strip_runtime(engine, dry.json()["root"]) == tree(0, blocked=False)

    with connected(result["dsn"]) as conn:
        blocked = engine.delete(f"/v1/states/{parent}?recurse=true")
        assert blocked.status == 409
        openapi.check("/v1/states/{stateId}", "DELETE", blocked)
        assert blocked.json()["outcome"] == "blocked"
        assert strip_runtime(engine, blocked.json()["root"]) == tree(1, blocked=True)
        for state_id in (parent, child):
            assert engine.get(f"/v1/states/{state_id}").status == 200
        for instance_id in instance_ids:
            assert get_instance(engine, instance_id)["status"] == "active"  # type: ignore[index]
        assert sorted(state_dirs(engine)) == sorted([parent, child])
        assert query_one(conn, "select count(*) from items") == 100

        forced = engine.delete(f"/v1/states/{parent}?recurse=true&force=true")
        assert forced.status == 200, forced.body
        assert forced.json()["outcome"] == "deleted"
        assert strip_runtime(engine, forced.json()["root"]) == tree(1, blocked=False)
        assert connection_is_dead(conn)
    assert engine.get("/v1/states").json() == []
    assert engine.get("/v1/instances").json() == []
    for state_id in (parent, child):
        assert engine.get(f"/v1/states/{state_id}").status == 404
    assert state_dirs(engine) == []
    assert instance_dirs(engine) == []
    assert servers(engine) == []
    missing = engine.delete(f"/v1/states/{parent}?recurse=true&force=true")
    assert_error(missing, 404, "not_found", "state not found")


def test_delete_unknown_state_is_404(base: Base, doc: OpenApiChecker) -> None:
    result = base.engine.delete(f"/v1/states/{UNKNOWN_STATE}?recurse=true")
    assert_error(result, 404, "not_found", "state not found")
    doc.check("/v1/states/{stateId}", "DELETE", result)


# ================================================================================== TTL (§14.6)


def test_expired_instance_is_reaped(engine: EngineProcess, scripts: Path) -> None:
    state_id = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]["state_id"]
    entry = create_instance(engine, state_id, ttl_seconds=1)
    assert to_epoch(entry["expires_at"]) - to_epoch(entry["created_at"]) == pytest.approx(
        1.0, abs=1e-3)
    assert entry["status"] == "active"
    server = server_of(engine, entry)
    assert server in servers(engine)
    poll(lambda: get_instance(engine, entry["instance_id"]) is None, REAPER_DEADLINE,
         interval=0.1, what="the reaper to remove the expired instance")
    assert server not in servers(engine)
    assert entry["instance_id"] not in instance_dirs(engine)
    assert get_state(engine, state_id)["refcount"] == 1


def test_reaper_waits_for_connections(engine: EngineProcess, scripts: Path) -> None:
    state_id = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]["state_id"]
    entry = create_instance(engine, state_id, ttl_seconds=1)
    instance_id = entry["instance_id"]
    with connected(entry["dsn"]) as conn:
        bound = engine.request("PUT", "/v1/names/late", {"instance_id": instance_id})
        assert bound.status == 201

        def expired() -> bool:
            current = get_instance(engine, instance_id)
            assert current is not None, "reaped while a client was connected"
            return bool(current["status"] == "expired")

        poll(expired, REAPER_DEADLINE, interval=0.1, what="status expired")
        assert engine.get("/v1/names/late").json()["status"] == "expired"
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert expired(), "status left expired while connected"
            time.sleep(0.1)
        assert query_one(conn, "select 1") == 1
    poll(lambda: get_instance(engine, instance_id) is None, REAPER_DEADLINE, interval=0.1,
         what="the reaper to remove the instance once the client left")
    assert engine.get("/v1/names/late").status == 404
    assert instance_id not in instance_dirs(engine)


def test_prepare_ttl_sets_expires_at(engine: EngineProcess, scripts: Path) -> None:
    kept = two_step_prepare(engine, scripts, ttl_seconds=3600)
    entry = get_instance(engine, kept["instance_id"])
    assert entry is not None
    assert to_epoch(entry["expires_at"]) - to_epoch(entry["created_at"]) == pytest.approx(
        3600, abs=1e-3)
    short = two_step_prepare(engine, scripts, ttl_seconds=1)
    poll(lambda: get_instance(engine, short["instance_id"]) is None, REAPER_DEADLINE,
         interval=0.1, what="the reaper to remove the prepared instance")
    assert get_instance(engine, kept["instance_id"]) is not None
    assert psql(kept["dsn"], "select count(*) from items") == "100"


# ============================================================================ restart (§14.10)


def test_killed_postmaster_is_orphaned_and_restarted_by_a_run(engine: EngineProcess,
                                                              scripts: Path) -> None:
    """The Postgres server dies while the engine runs (on Docker: inside a container that
    keeps running): the instance turns orphaned and the next run restarts it from its data,
    which keeps every commit made before the kill (no checkpoint needed)."""
    without_warm_pool(engine)
    state_id = engine.prepare(["-f", str(scripts / "schema.sql")])["result"]["state_id"]
    entry = create_instance(engine, state_id)
    instance_id = entry["instance_id"]
    psql(entry["dsn"], "insert into items values (1, 'kept')")
    os.kill(postmaster_pid(engine, entry), signal.SIGKILL)

    seen: list[dict[str, Any]] = []

    def orphaned() -> dict[str, Any] | None:
        current = get_instance(engine, instance_id)
        assert current is not None
        seen.append(current)
        return current if current["status"] == "orphaned" else None

    try:
        assert "dsn" not in poll(orphaned, 10, interval=0.1, what="status orphaned")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the dead server is still reported as {seen[-1]}") from None
    events = run_events(post_run(engine, instance_id, "-XAt", "-c", "select label from items"))
    logs = [e["data"] for e in events if e["type"] == "log"]
    assert logs and logs[0] == "run: runtime missing - restarting", events
    assert exit_code(events) == 0, events
    assert output(events).strip() == "kept"
    restarted = get_instance(engine, instance_id)
    assert restarted is not None
    assert restarted["status"] == "active"
    assert psql(restarted["dsn"], "select count(*) from items") == "1"
    listed = engine.get("/v1/instances").json()
    assert sorted(servers(engine)) == sorted(server_of(engine, e) for e in listed)


def test_restart_readopts_then_restarts_a_killed_runtime(engine_factory: Any,
                                                         scripts: Path) -> None:
    """A graceful engine stop leaves servers running and the next engine adopts them; a server
    that vanished while no engine watched (killed postmaster, removed container) leaves an
    orphaned instance that the next run restarts from its own data, with every commit."""
    first: EngineProcess = without_warm_pool(engine_factory())
    state_id = first.prepare(["-f", str(scripts / "schema.sql")])["result"]["state_id"]
    entry = create_instance(first, state_id, name="survivor")
    instance_id, server = entry["instance_id"], server_of(first, entry)
    psql(entry["dsn"], "insert into items values (1, 'before restart')")
    running = servers(first)
    assert server in running and len(running) == 2  # with the prepare job's instance
    assert first.stop() == 0
    assert sorted(servers(first)) == sorted(running)

    second: EngineProcess = engine_factory(state_dir=first.state_dir)
    adopted = get_instance(second, instance_id)
    assert adopted is not None
    assert adopted["status"] == "active"
    assert (adopted["dsn"], adopted["runtime_id"]) == (entry["dsn"], entry["runtime_id"])
    assert adopted["name"] == "survivor"
    assert sorted(servers(second)) == sorted(running)
    assert psql(entry["dsn"], "select label from items") == "before restart"
    psql(entry["dsn"], "insert into items values (2, 'after restart')")
    assert second.stop() == 0

    kill_server(second, adopted)
    third: EngineProcess = engine_factory(state_dir=first.state_dir)
    orphaned = get_instance(third, instance_id)
    assert orphaned is not None
    assert orphaned["status"] == "orphaned"
    assert "dsn" not in orphaned
    events = run_events(post_run(third, "survivor", "-XAt", "-c",
                            "select string_agg(label, ',' order by id) from items"))
    logs = [e["data"] for e in events if e["type"] == "log"]
    assert logs and logs[0] == "run: runtime missing - restarting", logs
    types = [e["type"] for e in events]
    assert types.index("log") < types.index("start")
    assert exit_code(events) == 0
    assert output(events).strip() == "before restart,after restart"
    restarted = get_instance(third, instance_id)
    assert restarted is not None
    assert restarted["status"] == "active"
    assert restarted["runtime_id"] != entry["runtime_id"]
    assert server_of(third, restarted) != server
    listed = third.get("/v1/instances").json()
    assert len(listed) == 2
    assert sorted(servers(third)) == sorted(server_of(third, e) for e in listed)
    assert sql_via_run(third, instance_id, "select count(*) from items") == "2"
    assert psql(restarted["dsn"], "select count(*) from items") == "2"
