"""Foundation of the engine contract: process and discovery (§1), HTTP conventions (§2),
the read endpoints for names, instances and states (§3.1-§3.4), config (§3.8), ids (§4) and the
OpenAPI self-description (§14.13).

Three kinds of engines are used:

* ``engine`` / ``engine_factory`` (conftest): a fresh engine per test, for anything that changes
  state or the process itself;
* ``shared``: one engine per module that is only ever *read* (auth, routing, validation errors);
* ``prepared``: one engine per module with a single prepared instance (host runtime), for the
  read endpoints that need data. Tests on it only add names.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

import pytest
from conftest import (
    HEX32_RE,
    ROOT,
    STARTUP_DEADLINE,
    UNKNOWN_INSTANCE,
    UNKNOWN_STATE,
    EngineProcess,
    HttpResult,
    OpenApiChecker,
    assert_error,
    assert_json,
    cleanup_store,
    expose_root,
    poll,
    spawn_engine,
    start_prepared,
    stop_engine,
    to_epoch,
)
from jsonschema import Draft202012Validator

HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
RFC3339_NANO_UTC_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
UNKNOWN_JOB = "fedcba9876543210fedcba9876543210"
BODY_LIMIT = 16 * 1024 * 1024
ENGINE_JSON_KEYS = {"endpoint", "pid", "startedAt", "authToken", "version", "instanceId"}
CONFIG_DEFAULTS: dict[str, Any] = {
    "log": {"level": "debug"},
    "cache": {"capacity": {"maxBytes": 0, "reserveBytes": None, "highWatermark": 0.90,
                           "lowWatermark": 0.80, "minStateAge": "10m"},
              # beyond the contract: the remote cache (off)
              "remote": {"url": "", "pull": True, "push": False, "insecure": False}},
    "container": {"runtime": "auto"},
    "snapshot": {"backend": "auto"},
    # the contract's defaults plus our job-history bounds and warm pool
    "orchestrator": {"jobs": {"maxIdentical": 2, "maxHistory": 200, "maxHistoryAge": "168h"}},
    "instances": {"warmPool": {"perState": 1, "maxTotal": 4, "idleTimeout": "10m"}},
}


# ------------------------------------------------------------------------------------ helpers


def url(base: str, /, **params: str) -> str:
    return f"{base}?{urlencode(params)}" if params else base


def assert_empty(result: HttpResult, status: int) -> None:
    assert result.status == status, (result.status, result.body[:500])
    assert result.body == b"", result.body[:500]


def assert_text_404(result: HttpResult) -> None:
    assert result.status == 404, (result.status, result.body[:500])
    assert result.headers.get("content-type", "").startswith("text/plain"), result.headers
    assert result.body.strip() == b"404 page not found", result.body[:500]


def assert_not_found(result: HttpResult) -> None:
    """A 404, either the bare text one or a JSON ``not_found`` error."""
    if result.headers.get("content-type", "").startswith("text/plain"):
        assert_text_404(result)
    else:
        assert_error(result, 404, "not_found")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(root: Path) -> set[str]:
    """Every path below ``root`` (SQLite side files excluded: they come and go)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "state.db" not in p.name}


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqlrs_engine", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def port_closed(engine: EngineProcess) -> bool:
    try:
        socket.create_connection((engine.host, engine.port), timeout=1).close()
    except OSError:
        return True
    return False


def send_headers_only(engine: EngineProcess, method: str, path: str,
                      headers: dict[str, str]) -> HttpResult:
    """Send a request head (no body bytes) and read the answer, for oversized Content-Length."""
    conn = http.client.HTTPConnection(engine.host, engine.port, timeout=10)
    try:
        conn.putrequest(method, path)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def engine_log(engine: EngineProcess) -> str:
    return (engine.state_dir / "logs" / "engine.log").read_text(errors="replace")


def landing_spots(engine: EngineProcess, ident: str) -> set[str]:
    """Where ``ident``, percent-decoded, lands when joined as a path onto any directory of the
    engine (its state dir and all below, and its expose root): the files a traversal through
    the id would write, most of them outside the engine's own tree."""
    name = unquote(ident)
    bases = [engine.state_dir, expose_root(engine.store),
             *(p for p in engine.state_dir.rglob("*") if p.is_dir())]
    return {os.path.normpath(os.path.join(base, name)) for base in bases}


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """A module-wide engine that tests only read from (never mutate)."""
    proc = spawn_engine(tmp_path_factory.mktemp("shared") / "state")
    yield proc
    proc.stop()
    cleanup_store(proc.store)


@pytest.fixture(scope="module")
def api_doc(shared: EngineProcess) -> OpenApiChecker:
    return OpenApiChecker(shared.get("/v1/openapi.json", auth=False).json())


@dataclass
class Prepared:
    engine: EngineProcess
    job: dict[str, Any]
    instance_id: str
    state_id: str
    image: str


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    """An engine with one prepared psql state and its instance (host runtime, Postgres 15)."""
    proc, job = start_prepared(tmp_path_factory.mktemp("prepared"))
    try:
        result = job["result"]
        yield Prepared(proc, job, result["instance_id"], result["state_id"], result["image_id"])
    finally:
        stop_engine(proc)


# ============================================================ §1 process, discovery and files


def test_engine_json_describes_the_running_engine(engine: EngineProcess) -> None:
    text = engine.engine_json.read_text()
    info = json.loads(text)
    assert set(info) == ENGINE_JSON_KEYS, info
    assert '\n  "endpoint": ' in text, "engine.json must be indented with two spaces"
    assert re.fullmatch(r"127\.0\.0\.1:\d{1,5}", info["endpoint"]), info["endpoint"]
    assert 0 < engine.port < 65536
    assert info["pid"] == engine.proc.pid
    os.kill(info["pid"], 0)  # alive
    assert RFC3339_NANO_UTC_RE.match(info["startedAt"]), info["startedAt"]
    assert abs(to_epoch(info["startedAt"]) - time.time()) < 120, info["startedAt"]
    assert HEX64_RE.match(info["authToken"]), info["authToken"]
    assert HEX32_RE.match(info["instanceId"]), info["instanceId"]
    assert info["version"] == "dev"


def test_health_without_auth_matches_engine_json(engine: EngineProcess,
                                                 openapi: OpenApiChecker) -> None:
    result = engine.get("/v1/health", auth=False)
    body = assert_json(result, 200)
    assert body == {"ok": True, "version": engine.info["version"],
                    "instanceId": engine.info["instanceId"], "pid": engine.info["pid"]}
    openapi.check("/v1/health", "GET", result)


def test_auth_probe_lists_no_jobs(engine: EngineProcess, openapi: OpenApiChecker) -> None:
    result = engine.get("/v1/prepare-jobs")
    assert assert_json(result, 200) == []
    openapi.check("/v1/prepare-jobs", "GET", result)


@pytest.mark.parametrize(("relative", "mode"), [
    ("engine.json", 0o600),
    (".", 0o700),
    ("state-store", 0o700),
    ("run", 0o700),
    ("logs/engine.log", 0o600),
])
def test_files_and_directories_are_private(shared: EngineProcess, relative: str,
                                           mode: int) -> None:
    assert mode_of(shared.state_dir / relative) == mode


def test_nested_run_dir_is_created_private(engine_factory: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "deep" / "er" / "run"
    engine_factory("--run-dir", str(run_dir))
    assert run_dir.is_dir()
    assert mode_of(run_dir) == 0o700


def test_version_flag_is_reported(engine_factory: Any) -> None:
    proc: EngineProcess = engine_factory("--version", "1.2.3-test")
    assert proc.info["version"] == "1.2.3-test"
    assert proc.get("/v1/health", auth=False).json()["version"] == "1.2.3-test"


def test_every_start_has_a_fresh_identity(engine_factory: Any) -> None:
    first: EngineProcess = engine_factory()
    assert first.stop() == 0
    second: EngineProcess = engine_factory(state_dir=first.state_dir)
    assert second.info["instanceId"] != first.info["instanceId"]
    assert second.info["authToken"] != first.info["authToken"]
    assert second.info["pid"] == second.proc.pid != first.proc.pid
    stale = second.get("/v1/prepare-jobs", auth=False,
                       headers={"Authorization": f"Bearer {first.token}"})
    assert_empty(stale, 401)


def test_state_store_env_moves_the_store(engine_factory: Any, tmp_path: Path) -> None:
    store = tmp_path / "elsewhere" / "store"
    proc: EngineProcess = engine_factory(env={"SQLRS_STATE_STORE": str(store)})
    assert (store / "state.db").is_file()
    assert mode_of(store) == 0o700
    assert not (proc.state_dir / "state-store" / "state.db").exists()
    patched = proc.request("PATCH", "/v1/config",
                           {"path": "cache.capacity.maxBytes", "value": 7})
    assert_json(patched, 200)
    assert json.loads((store / "config.json").read_text()) == {
        "cache": {"capacity": {"maxBytes": 7}}}


def test_requests_are_logged(engine: EngineProcess) -> None:
    assert engine.get("/v1/health", auth=False).status == 200
    assert engine.get("/v1/names", auth=False).status == 401
    expected = ["method=GET path=/v1/health status=200", "method=GET path=/v1/names status=401"]
    poll(lambda: all(line in engine_log(engine) for line in expected), 5,
         what="request lines in logs/engine.log")
    assert "sqlrs-engine version=dev" in engine_log(engine)


# ------------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly(engine: EngineProcess, sig: int) -> None:
    assert engine.stop(sig) == 0
    assert not engine.engine_json.exists()
    assert port_closed(engine)


# Short enough to wait for, long against a request's latency on a busy 2-core machine.
IDLE_SECONDS = 3.0
# Accepted --idle-timeout spellings that all mean IDLE_SECONDS (Go's "3s").
SHORT_IDLE_SPELLINGS = ["3s", "3000ms", "2s1000ms", "0.05m", "+3s", "3000000us"]
# Accepted spellings of a long timeout, and of none ("0" and, as in Go, a negative one).
LONG_OR_NO_IDLE_SPELLINGS = ["30s", "2m0s", "1h30m", "1h0m0s", "1.5h", "0", "-5s"]
IDLE_EXIT_DEADLINE = 60.0


def start_together(engine_factory: Any, tmp_path: Path,
                   idles: list[str]) -> list[tuple[EngineProcess, float]]:
    """Engines with these --idle-timeout values, started together and health-checked in one
    loop (so none idles out unwatched while another starts); each with the moment its health
    check was answered: its last request, from which its idle time counts."""
    engines: list[EngineProcess] = [
        engine_factory(state_dir=tmp_path / f"idle-{i}", idle=idle, wait=False)
        for i, idle in enumerate(idles)]
    ready: dict[int, float] = {}

    def all_ready() -> bool:
        for index, engine in enumerate(engines):
            if index not in ready and engine.healthy():
                ready[index] = time.monotonic()
        return len(ready) == len(engines)

    poll(all_ready, STARTUP_DEADLINE, what="all engines healthy")
    return [(engine, ready[index]) for index, engine in enumerate(engines)]


def test_short_idle_timeout_spellings_exit_by_themselves(engine_factory: Any,
                                                         tmp_path: Path) -> None:
    """Each spelling must be parsed to its value: the engine exits on its own (a timeout read
    as disabled or as hours would not), not before that long (one read as milliseconds would),
    and says it waited 3s."""
    started = start_together(engine_factory, tmp_path, SHORT_IDLE_SPELLINGS)
    exited_at: dict[int, float] = {}

    def all_exited() -> bool:
        for index, (engine, _ready) in enumerate(started):
            if index not in exited_at and engine.proc.poll() is not None:
                exited_at[index] = time.monotonic()
        return len(exited_at) == len(started)

    try:
        poll(all_exited, IDLE_EXIT_DEADLINE, interval=0.05, what="idle shutdowns")
    except AssertionError as exc:
        alive = [SHORT_IDLE_SPELLINGS[i] for i in range(len(started)) if i not in exited_at]
        raise AssertionError(f"{exc}; still running: {alive}") from None
    for index, (engine, ready) in enumerate(started):
        spelling = SHORT_IDLE_SPELLINGS[index]
        assert engine.proc.returncode == 0, spelling
        assert not engine.engine_json.exists(), spelling
        assert exited_at[index] - ready >= IDLE_SECONDS - 0.5, (spelling, exited_at[index] - ready)
        assert "idle for 3s: shutting down" in engine_log(engine), spelling


def test_long_or_no_idle_timeout_spellings_keep_running(engine_factory: Any,
                                                        tmp_path: Path) -> None:
    """Accepted, and not read as a short timeout: idle for twice the short one, all still run
    (a long timeout cannot be told from none without waiting it out)."""
    started = start_together(engine_factory, tmp_path, LONG_OR_NO_IDLE_SPELLINGS)
    time.sleep(2 * IDLE_SECONDS)  # staying idle is the point: nothing to poll for
    for spelling, (engine, _ready) in zip(LONG_OR_NO_IDLE_SPELLINGS, started, strict=True):
        assert engine.proc.poll() is None, f"--idle-timeout {spelling} made the engine exit"
        assert "shutting down" not in engine_log(engine), spelling
        assert engine.get("/v1/health", auth=False).status == 200


def test_requests_keep_an_idle_engine_alive(engine_factory: Any) -> None:
    proc: EngineProcess = engine_factory(idle=f"{IDLE_SECONDS:g}s")
    until = time.monotonic() + 2 * IDLE_SECONDS
    while time.monotonic() < until:
        assert proc.proc.poll() is None, "engine exited although requests kept coming"
        assert proc.get("/v1/health", auth=False).status == 200
        time.sleep(0.2)  # pacing between requests, not waiting for readiness
    poll(lambda: proc.proc.poll() is not None, IDLE_EXIT_DEADLINE, interval=0.1,
         what="idle shutdown")
    assert proc.proc.returncode == 0
    assert not proc.engine_json.exists()


# ------------------------------------------------------------------------------ CLI flags


def _required(engine_json: Path) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--write-engine-json", str(engine_json),
            "--idle-timeout", "1s"]


@pytest.mark.parametrize(("drop", "extra", "message"), [
    ("--listen", [], "missing --listen"),
    ("--write-engine-json", [], "missing --write-engine-json"),
    (None, ["--bogus"], None),
    (None, ["--state-dir", "/tmp/x"], None),
    (None, ["--listen"], None),
    ("--listen", ["--lis", "127.0.0.1:0"], None),
], ids=["no-listen", "no-engine-json", "unknown-flag", "no-state-dir-flag", "flag-no-value",
        "abbreviated-flag"])
def test_usage_errors_exit_2(tmp_path: Path, drop: str | None, extra: list[str],
                             message: str | None) -> None:
    engine_json = tmp_path / "state" / "engine.json"
    args = _required(engine_json)
    if drop:
        index = args.index(drop)
        del args[index:index + 2]
    done = run_cli(*args, *extra)
    assert done.returncode == 2, (done.returncode, done.stderr)
    if message:
        assert message in done.stderr
    assert not engine_json.exists()


@pytest.mark.parametrize("idle", ["soon", "10", "1x", "", "s", "1h-5m"])
def test_bad_idle_timeout_exits_2(tmp_path: Path, idle: str) -> None:
    engine_json = tmp_path / "engine.json"
    done = run_cli("--listen", "127.0.0.1:0", "--write-engine-json", str(engine_json),
                   "--idle-timeout", idle)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "idle-timeout" in done.stderr
    assert not engine_json.exists()


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version_alone_prints_a_version(flag: str) -> None:
    done = run_cli(flag)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d+\.\d+", done.stdout), done.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0(flag: str) -> None:
    done = run_cli(flag)
    assert done.returncode == 0, done.stderr
    assert "--listen" in done.stdout + done.stderr


# ============================================================================ §2 HTTP conventions

PROTECTED: list[tuple[str, str]] = [
    ("GET", "/v1/names"),
    ("GET", "/v1/names/x"),
    ("PUT", "/v1/names/x"),
    ("DELETE", "/v1/names/x"),
    ("GET", "/v1/instances"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances/x"),
    ("DELETE", "/v1/instances/x"),
    ("GET", "/v1/states"),
    ("GET", "/v1/states/x"),
    ("DELETE", "/v1/states/x"),
    ("GET", "/v1/prepare-jobs"),
    ("POST", "/v1/prepare-jobs"),
    ("GET", "/v1/prepare-jobs/x"),
    ("DELETE", "/v1/prepare-jobs/x"),
    ("POST", "/v1/prepare-jobs/x/cancel"),
    ("GET", "/v1/prepare-jobs/x/events"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/config"),
    ("PATCH", "/v1/config"),
    ("DELETE", "/v1/config"),
    ("GET", "/v1/config/schema"),
]

BAD_AUTH: dict[str, Callable[[str], str | None]] = {
    "missing": lambda token: None,
    "wrong-token": lambda token: "Bearer " + "0" * 64,
    "lowercase-scheme": lambda token: f"bearer {token}",
    "no-scheme": lambda token: token,
    "token-prefix": lambda token: f"Bearer {token[:-1]}",
    "token-suffix": lambda token: f"Bearer {token}0",
}


@pytest.mark.parametrize("auth", list(BAD_AUTH))
@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_paths_need_the_exact_token(shared: EngineProcess, method: str, path: str,
                                              auth: str) -> None:
    value = BAD_AUTH[auth](shared.token)
    headers = {} if value is None else {"Authorization": value}
    result = shared.request(method, path, auth=False, headers=headers,
                            raw=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    assert_empty(result, 401)


def test_token_is_compared_after_trimming(shared: EngineProcess) -> None:
    result = shared.get("/v1/names", auth=False,
                        headers={"Authorization": f"Bearer {shared.token}  "})
    assert assert_json(result, 200) == []


WRONG_METHOD: list[tuple[str, str]] = [
    ("POST", "/v1/names"),
    ("DELETE", "/v1/names"),
    ("POST", "/v1/names/x"),
    ("PUT", "/v1/instances"),
    ("PATCH", "/v1/instances/x"),
    ("POST", "/v1/states"),
    ("PUT", "/v1/states/x"),
    ("DELETE", "/v1/prepare-jobs"),
    ("PUT", "/v1/prepare-jobs/x"),
    ("GET", "/v1/prepare-jobs/x/cancel"),
    ("POST", "/v1/prepare-jobs/x/events"),
    ("POST", "/v1/tasks"),
    ("POST", "/v1/config"),
    ("PUT", "/v1/config/schema"),
]


@pytest.mark.parametrize(("method", "path"), WRONG_METHOD)
def test_auth_is_checked_before_the_method(shared: EngineProcess, method: str,
                                           path: str) -> None:
    assert_empty(shared.request(method, path, auth=False), 401)
    result = shared.request(method, path)
    assert_empty(result, 405)
    assert "allow" not in result.headers


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/health"), ("DELETE", "/v1/health"), ("PUT", "/v1/openapi.json")])
def test_open_endpoints_reject_other_methods(shared: EngineProcess, method: str,
                                             path: str) -> None:
    assert_empty(shared.request(method, path, auth=False), 405)


@pytest.mark.parametrize("auth", [False, True], ids=["no-token", "token"])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/users/me"),
    ("GET", "/v1/users/by-identity"),
    ("GET", "/v1/organizations"),
    ("GET", "/v1/organizations/acme"),
    ("PUT", "/v1/source-blobs/sha256/x"),
    ("GET", "/nope"),
    ("GET", "/"),
    ("GET", "/v1"),
    ("GET", "/v2/health"),
])
def test_unknown_paths_are_plain_404(shared: EngineProcess, method: str, path: str,
                                     auth: bool) -> None:
    assert_text_404(shared.request(method, path, auth=auth))


@pytest.mark.parametrize("path", [
    "/v1/prepare-jobs/x/y", "/v1/prepare-jobs/x/events/y", "/v1/instances/a/b",
    "/v1/states/a/b", "/v1/names/a/b"])
def test_nested_resource_paths_are_404(shared: EngineProcess, path: str) -> None:
    assert_text_404(shared.get(path))


@pytest.mark.parametrize(("method", "path", "auth", "status"), [
    ("POST", "/v1/names", False, 401),
    ("POST", "/v1/names", True, 405),
    ("POST", "/v1/users/me", True, 404),
    ("PUT", "/v1/names/a%2Fb", True, 400),
])
def test_early_answers_keep_the_connection_usable(shared: EngineProcess, method: str, path: str,
                                                  auth: bool, status: int) -> None:
    """A keep-alive client (like Go's) sends its next request on the same connection, so a
    body the handler did not read must not be taken for the next request."""
    conn = http.client.HTTPConnection(shared.host, shared.port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {shared.token}"} if auth else {}
        conn.request(method, path, body=b'{"instance_id": "x"}', headers=headers)
        first = conn.getresponse()
        first.read()
        assert first.status == status
        conn.request("GET", "/v1/health")
        second = conn.getresponse()
        body = second.read()
        assert second.status == 200, (second.status, body[:200])
        assert json.loads(body)["ok"] is True
    finally:
        conn.close()


LISTS = ["/v1/names", "/v1/instances", "/v1/states", "/v1/prepare-jobs", "/v1/tasks"]


@pytest.mark.parametrize("path", LISTS)
def test_empty_lists_are_json_arrays(shared: EngineProcess, api_doc: OpenApiChecker,
                                     path: str) -> None:
    result = shared.get(path)
    assert assert_json(result, 200) == []
    api_doc.check(path, "GET", result)


@pytest.mark.parametrize("accept", [
    "application/x-ndjson", "Application/X-NDJSON", "application/json, application/x-ndjson"])
@pytest.mark.parametrize("path", LISTS)
def test_empty_lists_as_ndjson(shared: EngineProcess, path: str, accept: str) -> None:
    result = shared.get(path, headers={"Accept": accept})
    assert result.status == 200
    assert result.headers["content-type"].split(";")[0] == "application/x-ndjson"
    assert result.body.strip() == b""


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"prepare_kind": "psql",', b"\xff\xfe"],
                         ids=["garbage", "empty", "truncated", "not-utf8"])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/prepare-jobs"),
                                              ("PATCH", "/v1/config")])
def test_malformed_json_is_400(engine: EngineProcess, method: str, path: str,
                               raw: bytes) -> None:
    result = engine.request(method, path, raw=raw)
    body = assert_error(result, 400, "invalid_argument", "invalid json payload")
    assert body.get("details"), "the decoder error belongs in details"
    assert engine.get("/v1/prepare-jobs").json() == []
    assert engine.get("/v1/config").json() == {}


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/prepare-jobs"), ("PATCH", "/v1/config"), ("PUT", "/v1/names/big"),
    ("POST", "/v1/instances")])
def test_body_over_the_limit_is_413(shared: EngineProcess, method: str, path: str) -> None:
    result = send_headers_only(shared, method, path, {
        "Authorization": f"Bearer {shared.token}", "Content-Type": "application/json",
        "Content-Length": str(BODY_LIMIT + 1024 * 1024)})
    assert_error(result, 413)


FOREIGN_HOSTS = ["evil.example.com", "attacker.com:{port}", "localhost.attacker.com:{port}",
                 "127.0.0.1.nip.io:{port}"]
LOOPBACK_HOSTS = ["localhost:{port}", "127.0.0.1:{port}", "LOCALHOST:{port}", "localhost",
                  "127.0.0.1"]
HOST_PATHS = ["/v1/health", "/v1/openapi.json", "/v1/names"]


@pytest.mark.parametrize("path", HOST_PATHS)
@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_foreign_host_header_is_403(shared: EngineProcess, api_doc: OpenApiChecker, host: str,
                                    path: str) -> None:
    result = shared.get(path, headers={"Host": host.format(port=shared.port)})
    assert_error(result, 403)
    if path == "/v1/health":
        api_doc.check(path, "GET", result)


@pytest.mark.parametrize("path", HOST_PATHS)
@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_loopback_host_header_is_served(shared: EngineProcess, host: str, path: str) -> None:
    result = shared.get(path, headers={"Host": host.format(port=shared.port)})
    assert_json(result, 200)


# ----------------------------------------------------------------------------- Go booleans

BOOL_TARGETS = [f"/v1/instances/{UNKNOWN_INSTANCE}", f"/v1/states/{UNKNOWN_STATE}",
                f"/v1/prepare-jobs/{UNKNOWN_JOB}"]


@pytest.mark.parametrize(("path", "name"), [
    (f"/v1/instances/{UNKNOWN_INSTANCE}", "force"),
    (f"/v1/instances/{UNKNOWN_INSTANCE}", "dry_run"),
    (f"/v1/states/{UNKNOWN_STATE}", "recurse"),
    (f"/v1/states/{UNKNOWN_STATE}", "force"),
    (f"/v1/states/{UNKNOWN_STATE}", "dry_run"),
    (f"/v1/prepare-jobs/{UNKNOWN_JOB}", "force"),
    (f"/v1/prepare-jobs/{UNKNOWN_JOB}", "dry_run"),
])
@pytest.mark.parametrize("value", ["maybe", "yes", "2", "tRuE"])
def test_invalid_boolean_is_400(shared: EngineProcess, path: str, name: str, value: str) -> None:
    body = assert_error(shared.delete(url(path, **{name: value})), 400, "invalid_argument",
                        f"invalid {name}")
    assert value in body.get("details", ""), body


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE",
                                   "false", "False", ""])
@pytest.mark.parametrize("path", BOOL_TARGETS)
def test_go_boolean_spellings_are_accepted(shared: EngineProcess, path: str, value: str) -> None:
    names = ("recurse", "force", "dry_run") if "/states/" in path else ("force", "dry_run")
    result = shared.delete(url(path, **dict.fromkeys(names, value)))
    assert_error(result, 404, "not_found")  # the flags parsed; the id is unknown


@pytest.mark.parametrize(("value", "effective"), [
    ("T", True), ("1", True), ("true", True), ("FALSE", False), ("0", False), ("", False)])
def test_effective_flag_uses_go_booleans(shared: EngineProcess, value: str,
                                         effective: bool) -> None:
    body = assert_json(shared.get(url("/v1/config", effective=value)), 200)
    assert body == (CONFIG_DEFAULTS if effective else {})


def test_error_bodies_omit_empty_details(shared: EngineProcess) -> None:
    cases = {f"/v1/instances/{UNKNOWN_INSTANCE}": "instance not found",
             f"/v1/states/{UNKNOWN_STATE}": "state not found",
             f"/v1/prepare-jobs/{UNKNOWN_JOB}": "job not found"}
    for path, message in cases.items():
        assert assert_json(shared.delete(path), 404) == {"code": "not_found", "message": message}
    cancel = shared.post(f"/v1/prepare-jobs/{UNKNOWN_JOB}/cancel")
    assert assert_json(cancel, 404) == {"code": "not_found", "message": "job not found"}


# =================================================================================== §4 ids

PREFIX_LISTS = ["/v1/instances", "/v1/states"]


@pytest.mark.parametrize("prefix", ["a", "abc", "1234567", " 1234567 ", "DEADBEE"])
@pytest.mark.parametrize("path", PREFIX_LISTS)
def test_short_id_prefix_is_400(shared: EngineProcess, api_doc: OpenApiChecker, path: str,
                                prefix: str) -> None:
    result = shared.get(url(path, id_prefix=prefix))
    assert_error(result, 400, "invalid_argument", "invalid id_prefix",
                 "id_prefix must be at least 8 hex characters")
    api_doc.check(path, "GET", result)


@pytest.mark.parametrize("prefix", ["zzzzzzzz", "1234567g", "12345678-", "../../../etc",
                                    "1234 5678", "%%%%%%%%"])
@pytest.mark.parametrize("path", PREFIX_LISTS)
def test_non_hex_id_prefix_is_400(shared: EngineProcess, path: str, prefix: str) -> None:
    assert_error(shared.get(url(path, id_prefix=prefix)), 400, "invalid_argument",
                 "invalid id_prefix", "id_prefix must be hex")


@pytest.mark.parametrize("prefix", ["deadbeef", "DEADBEEF", " deadbeef ", "0123456789abcdef"])
@pytest.mark.parametrize("path", PREFIX_LISTS)
def test_valid_id_prefix_without_match_is_empty(shared: EngineProcess, path: str,
                                                prefix: str) -> None:
    assert assert_json(shared.get(url(path, id_prefix=prefix)), 200) == []


HOSTILE_IDS = ["..%2F..%2Fetc", "..%2F..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..", "x%00y",
               "a" * 4096, "%2Ftmp%2Fevil", "..%5C..%5Cwindows"]
HOSTILE_TARGETS = [
    ("GET", "/v1/instances/{}"),
    ("DELETE", "/v1/instances/{}?force=true"),
    ("GET", "/v1/states/{}"),
    ("DELETE", "/v1/states/{}?recurse=true&force=true"),
    ("GET", "/v1/prepare-jobs/{}"),
    ("DELETE", "/v1/prepare-jobs/{}?force=true"),
    ("POST", "/v1/prepare-jobs/{}/cancel"),
    ("GET", "/v1/prepare-jobs/{}/events"),
    ("GET", "/v1/names/{}"),
    ("DELETE", "/v1/names/{}"),
]


@pytest.mark.parametrize("ident", HOSTILE_IDS, ids=lambda s: s[:24])
@pytest.mark.parametrize(("method", "template"), HOSTILE_TARGETS)
def test_hostile_ids_are_404_and_touch_nothing(shared: EngineProcess, method: str,
                                               template: str, ident: str) -> None:
    root = shared.state_dir.parent
    before = tree(root)
    spots = landing_spots(shared, ident)
    existing = {spot for spot in spots if os.path.lexists(spot)}
    assert_not_found(shared.request(method, template.format(ident)))
    created = tree(root) - before
    assert not created, f"{method} {template} created {sorted(created)}"
    landed = sorted(spot for spot in spots - existing if os.path.lexists(spot))
    assert not landed, f"{method} {template} created {landed}"


# ===================================================== §3.2-§3.4 names, instances and states


def test_instance_list_and_get(prepared: Prepared, api_doc: OpenApiChecker) -> None:
    engine = prepared.engine
    listed = engine.get("/v1/instances")
    api_doc.check("/v1/instances", "GET", listed)
    entries = assert_json(listed, 200)
    assert [e["instance_id"] for e in entries] == [prepared.instance_id]
    entry = entries[0]
    assert entry["state_id"] == prepared.state_id
    assert entry["image_id"] == prepared.image
    assert entry["status"] == "active"
    assert RFC3339_NANO_UTC_RE.match(entry["created_at"])

    for ref in (prepared.instance_id, prepared.instance_id.upper()):
        one = engine.get(f"/v1/instances/{ref}")
        api_doc.check("/v1/instances/{idOrName}", "GET", one)
        got = assert_json(one, 200)
        assert got["instance_id"] == prepared.instance_id
        assert got["state_id"] == prepared.state_id


@pytest.mark.parametrize("ref", [UNKNOWN_INSTANCE, UNKNOWN_INSTANCE.upper(), "no-such-name", ""])
def test_unknown_instance_is_plain_404(prepared: Prepared, ref: str) -> None:
    assert_text_404(prepared.engine.get(f"/v1/instances/{ref}"))


@pytest.mark.parametrize("shape", [
    lambda i: i[:8], lambda i: i[:8].upper(), lambda i: i[:12].upper(), lambda i: i,
    lambda i: f" {i[:9]} "], ids=["8-lower", "8-upper", "12-upper", "full", "padded"])
def test_instance_id_prefix_finds_the_instance(prepared: Prepared,
                                               shape: Callable[[str], str]) -> None:
    result = prepared.engine.get(url("/v1/instances", id_prefix=shape(prepared.instance_id)))
    assert [e["instance_id"] for e in assert_json(result, 200)] == [prepared.instance_id]


def _other_hex(value: str) -> str:
    return ("1" if value[0] != "1" else "2") + value[1:]


@pytest.mark.parametrize(("query", "found"), [
    (lambda p: {"state": p.state_id}, True),
    (lambda p: {"image": p.image}, True),
    (lambda p: {"state": p.state_id, "image": p.image}, True),
    (lambda p: {"state": UNKNOWN_STATE}, False),
    (lambda p: {"image": "nope:1"}, False),
    (lambda p: {"id_prefix": _other_hex(p.instance_id)[:8]}, False),
], ids=["state", "image", "state+image", "other-state", "other-image", "other-prefix"])
def test_instance_filters(prepared: Prepared, query: Callable[[Prepared], dict[str, str]],
                          found: bool) -> None:
    result = prepared.engine.get(url("/v1/instances", **query(prepared)))
    expected = [prepared.instance_id] if found else []
    assert [e["instance_id"] for e in assert_json(result, 200)] == expected


def test_state_list_and_get(prepared: Prepared, api_doc: OpenApiChecker) -> None:
    engine = prepared.engine
    listed = engine.get("/v1/states")
    api_doc.check("/v1/states", "GET", listed)
    assert [s["state_id"] for s in assert_json(listed, 200)] == [prepared.state_id]
    one = engine.get(f"/v1/states/{prepared.state_id}")
    api_doc.check("/v1/states/{stateId}", "GET", one)
    state = assert_json(one, 200)
    assert state["state_id"] == prepared.state_id
    assert HEX64_RE.match(state["state_id"])
    assert state["image_id"] == prepared.image
    assert state["prepare_kind"] == "psql"
    assert state["refcount"] == 1
    assert "parent_state_id" not in state


@pytest.mark.parametrize("ref", [UNKNOWN_STATE, "abc", "x" * 300])
def test_unknown_state_is_plain_404(prepared: Prepared, ref: str) -> None:
    assert_text_404(prepared.engine.get(f"/v1/states/{ref}"))


@pytest.mark.parametrize(("query", "found"), [
    (lambda p: {"kind": "psql"}, True),
    (lambda p: {"kind": "lb"}, False),
    (lambda p: {"image": p.image}, True),
    (lambda p: {"image": "nope:1"}, False),
    (lambda p: {"kind": "psql", "image": p.image}, True),
    (lambda p: {"id_prefix": p.state_id[:8].upper()}, True),
    (lambda p: {"id_prefix": _other_hex(p.state_id)[:10]}, False),
], ids=["kind", "other-kind", "image", "other-image", "kind+image", "prefix", "other-prefix"])
def test_state_filters(prepared: Prepared, query: Callable[[Prepared], dict[str, str]],
                       found: bool) -> None:
    result = prepared.engine.get(url("/v1/states", **query(prepared)))
    expected = [prepared.state_id] if found else []
    assert [s["state_id"] for s in assert_json(result, 200)] == expected


@pytest.mark.parametrize(("value", "dry_run"), [("T", True), ("1", True), ("FALSE", False)])
def test_state_delete_dry_run_spellings(prepared: Prepared, value: str, dry_run: bool) -> None:
    """The state has an instance, so without recurse it is blocked: 200 on a dry run, else 409."""
    result = prepared.engine.delete(url(f"/v1/states/{prepared.state_id}", dry_run=value))
    body = assert_json(result, 200 if dry_run else 409)
    assert body["dry_run"] is dry_run
    assert body["outcome"] == "blocked"
    assert body["root"] == {"kind": "state", "id": prepared.state_id,
                            "blocked": "has_descendants"}
    assert prepared.engine.get(f"/v1/states/{prepared.state_id}").status == 200


@pytest.mark.parametrize("path", ["/v1/instances", "/v1/states", "/v1/prepare-jobs",
                                  "/v1/tasks"])
def test_lists_as_ndjson(prepared: Prepared, api_doc: OpenApiChecker, path: str) -> None:
    engine = prepared.engine
    array = assert_json(engine.get(path), 200)
    assert array, f"{path} should not be empty after a prepare"
    result = engine.get(path, headers={"Accept": "application/x-ndjson"})
    assert result.status == 200
    assert result.headers["content-type"].split(";")[0] == "application/x-ndjson"
    lines = result.body.decode().split("\n")
    assert lines[-1] == "", "NDJSON must end with a newline"
    assert [json.loads(line) for line in lines[:-1]] == array
    assert all(isinstance(json.loads(line), dict) for line in lines[:-1])
    api_doc.check(path, "GET", result)


def test_jobs_and_tasks_lists(prepared: Prepared, api_doc: OpenApiChecker) -> None:
    engine = prepared.engine
    jobs = engine.get("/v1/prepare-jobs")
    api_doc.check("/v1/prepare-jobs", "GET", jobs)
    assert [j["job_id"] for j in assert_json(jobs, 200)] == [prepared.job["job_id"]]
    tasks = engine.get(url("/v1/tasks", job=prepared.job["job_id"]))
    api_doc.check("/v1/tasks", "GET", tasks)
    assert {t["job_id"] for t in assert_json(tasks, 200)} == {prepared.job["job_id"]}


# ---------------------------------------------------------------------------------- names


def test_bind_name_and_redirect(prepared: Prepared, api_doc: OpenApiChecker) -> None:
    engine, inst = prepared.engine, prepared.instance_id
    first = engine.request("PUT", "/v1/names/alpha", {"instance_id": inst})
    api_doc.check("/v1/names/{name}", "PUT", first)
    entry = assert_json(first, 201)
    assert entry["name"] == "alpha"
    assert entry["instance_id"] == inst
    assert entry["state_id"] == prepared.state_id
    assert entry["status"] == "active"
    again = engine.request("PUT", "/v1/names/alpha", {"instance_id": inst})
    api_doc.check("/v1/names/{name}", "PUT", again)
    assert assert_json(again, 200)["instance_id"] == inst

    redirect = engine.get("/v1/instances/alpha")
    assert_empty(redirect, 307)
    assert redirect.headers["location"] == f"/v1/instances/{inst}"
    followed = engine.get(redirect.headers["location"])
    assert assert_json(followed, 200)["instance_id"] == inst

    one = engine.get("/v1/names/alpha")
    api_doc.check("/v1/names/{name}", "GET", one)
    assert assert_json(one, 200)["instance_id"] == inst
    listed = engine.get("/v1/names")
    api_doc.check("/v1/names", "GET", listed)
    assert "alpha" in [n["name"] for n in assert_json(listed, 200)]
    by_instance = assert_json(engine.get(url("/v1/names", instance=inst)), 200)
    assert "alpha" in [n["name"] for n in by_instance]
    assert assert_json(engine.get(url("/v1/names", instance=UNKNOWN_INSTANCE)), 200) == []
    # DELETE /v1/instances/{x} takes ids only: a name is 404 (a dry run, to be safe).
    assert_error(engine.delete("/v1/instances/alpha?dry_run=true"), 404, "not_found")


@pytest.mark.parametrize("name", ["n" + "._-Az9" * 10 + "xy", "n" * 62 + "."],
                         ids=["mixed", "dot-last"])
def test_longest_valid_name_is_accepted(prepared: Prepared, name: str) -> None:
    assert len(name) == 63
    result = prepared.engine.request("PUT", f"/v1/names/{name}",
                                     {"instance_id": prepared.instance_id})
    assert assert_json(result, 201)["name"] == name
    assert prepared.engine.get(f"/v1/instances/{name}").status == 307


@pytest.mark.parametrize("segment", [
    UNKNOWN_INSTANCE, UNKNOWN_INSTANCE.upper(), "", "a%2Fb", "a%20b", "x" * 64, "caf%C3%A9",
    "..%2F..%2Fetc", "a%00b", "name%3Bls", "a@b", "a%40b"],
    ids=["hex32", "HEX32", "empty", "slash", "space", "64-chars", "non-ascii", "traversal",
         "nul", "semicolon", "at", "at-encoded"])
def test_invalid_names_are_400(prepared: Prepared, api_doc: OpenApiChecker,
                               segment: str) -> None:
    """Rejected for a live instance, and for an unknown one (the name is checked first)."""
    engine = prepared.engine
    before = assert_json(engine.get("/v1/names"), 200)
    for instance_id in (prepared.instance_id, UNKNOWN_INSTANCE):
        result = engine.request("PUT", f"/v1/names/{segment}", {"instance_id": instance_id})
        assert_error(result, 400, "invalid_argument", "invalid name")
        api_doc.check("/v1/names/{name}", "PUT", result)
    assert assert_json(engine.get("/v1/names"), 200) == before


def test_name_for_unknown_instance_is_404(shared: EngineProcess) -> None:
    result = shared.request("PUT", "/v1/names/ghost", {"instance_id": UNKNOWN_INSTANCE})
    assert_error(result, 404, "not_found", "instance not found")
    assert_text_404(shared.get("/v1/names/ghost"))


@pytest.mark.parametrize("body", [{}, {"instance_id": ""}, {"instance_id": 5}],
                         ids=["missing", "empty", "number"])
def test_name_without_instance_is_400(shared: EngineProcess, body: dict[str, Any]) -> None:
    assert_error(shared.request("PUT", "/v1/names/ghost", body), 400, "invalid_argument")


@pytest.mark.parametrize("name", ["ghost", ""])
def test_unknown_name_is_plain_404(shared: EngineProcess, name: str) -> None:
    assert_text_404(shared.get(f"/v1/names/{name}"))


# ================================================================================ §3.8 config

CONFIG_PATH = "cache.capacity.maxBytes"


def test_config_starts_empty(engine: EngineProcess, openapi: OpenApiChecker) -> None:
    result = engine.get("/v1/config")
    assert assert_json(result, 200) == {}
    openapi.check("/v1/config", "GET", result)
    assert not (engine.store / "config.json").exists()


def test_effective_config_is_the_defaults(shared: EngineProcess) -> None:
    assert assert_json(shared.get("/v1/config?effective=true"), 200) == CONFIG_DEFAULTS


@pytest.mark.parametrize(("path", "value"), [
    ("orchestrator.jobs.maxIdentical", 2),
    ("cache.capacity.minStateAge", "10m"),
    ("cache.capacity.maxBytes", 0),
    ("cache.capacity.reserveBytes", None),
    ("cache.capacity.highWatermark", 0.9),
    ("cache.capacity.lowWatermark", 0.8),
    ("log.level", "debug"),
    ("container.runtime", "auto"),
    ("snapshot.backend", "auto"),
    ("cache.capacity", CONFIG_DEFAULTS["cache"]["capacity"]),
])
def test_effective_default_by_path(shared: EngineProcess, api_doc: OpenApiChecker, path: str,
                                   value: Any) -> None:
    result = shared.get(url("/v1/config", path=path, effective="true"))
    assert assert_json(result, 200) == {"path": path, "value": value}
    api_doc.check("/v1/config", "GET", result)
    assert_error(shared.get(url("/v1/config", path=path)), 404, "not_found", "path not found")


def test_config_set_get_delete(engine: EngineProcess, openapi: OpenApiChecker) -> None:
    patched = engine.request("PATCH", "/v1/config", {"path": CONFIG_PATH, "value": 123})
    openapi.check("/v1/config", "PATCH", patched)
    assert assert_json(patched, 200) == {"path": CONFIG_PATH, "value": 123}
    for effective in ("false", "true"):
        got = engine.get(url("/v1/config", path=CONFIG_PATH, effective=effective))
        assert assert_json(got, 200) == {"path": CONFIG_PATH, "value": 123}
    assert assert_json(engine.get("/v1/config"), 200) == {"cache": {"capacity": {"maxBytes": 123}}}

    config_file = engine.store / "config.json"
    assert mode_of(config_file) == 0o600
    assert json.loads(config_file.read_text()) == {"cache": {"capacity": {"maxBytes": 123}}}

    deleted = engine.delete(url("/v1/config", path=CONFIG_PATH))
    openapi.check("/v1/config", "DELETE", deleted)
    assert assert_json(deleted, 200) == {"path": CONFIG_PATH, "value": 0}
    assert_error(engine.get(url("/v1/config", path=CONFIG_PATH)), 404, "not_found",
                 "path not found")
    on_disk = json.loads(config_file.read_text())
    assert "maxBytes" not in on_disk.get("cache", {}).get("capacity", {})
    assert_error(engine.delete(url("/v1/config", path=CONFIG_PATH)), 404, "not_found",
                 "path not found")


def test_config_survives_a_restart(engine_factory: Any) -> None:
    first: EngineProcess = engine_factory()
    patched = first.request("PATCH", "/v1/config", {"path": CONFIG_PATH, "value": 4096})
    assert_json(patched, 200)
    assert first.stop() == 0
    second: EngineProcess = engine_factory(state_dir=first.state_dir)
    got = second.get(url("/v1/config", path=CONFIG_PATH))
    assert assert_json(got, 200) == {"path": CONFIG_PATH, "value": 4096}


@pytest.mark.parametrize(("path", "value"), [
    ("cache.capacity.highWatermark", 1),
    ("cache.capacity.lowWatermark", 0.5),
    ("cache.capacity.maxBytes", None),
    ("cache.capacity.reserveBytes", 1024),
    ("cache.capacity.minStateAge", "1h30m"),
    ("cache.capacity.minStateAge", "0"),
    # Stored and served back, nothing more: no part of the engine reads log.level yet (it
    # logs at debug whatever the value), so this shows no filtering of logs/engine.log. The
    # engine is to make log.level real; a test of its effect belongs with that change.
    pytest.param("log.level", "warn", id="log.level-round-trip-only"),
    ("container.runtime", "podman"),
    ("snapshot.backend", "copy"),
    ("orchestrator.jobs.maxIdentical", 0),
])
def test_valid_config_values(engine: EngineProcess, path: str, value: Any) -> None:
    patched = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
    assert assert_json(patched, 200) == {"path": path, "value": value}
    got = engine.get(url("/v1/config", path=path, effective="true"))
    assert assert_json(got, 200)["value"] == value


@pytest.mark.parametrize(("path", "value"), [
    ("log.level", "loud"),
    ("cache.capacity.highWatermark", 0),
    ("cache.capacity.highWatermark", 1.5),
    ("cache.capacity.highWatermark", 0.5),
    ("cache.capacity.lowWatermark", 0),
    ("cache.capacity.lowWatermark", 0.9),
    ("cache.capacity.lowWatermark", 0.95),
    ("cache.capacity.lowWatermark", "0.5"),
    ("cache.capacity.maxBytes", -1),
    ("cache.capacity.maxBytes", "x"),
    ("cache.capacity.maxBytes", 1.5),
    ("cache.capacity.maxBytes", True),
    ("cache.capacity.reserveBytes", -1),
    ("cache.capacity.minStateAge", "soon"),
    ("cache.capacity.minStateAge", 600),
    ("snapshot.backend", "zfs"),
    ("container.runtime", "lxc"),
    ("orchestrator.jobs.maxIdentical", -1),
    ("cache.capacity", "big"),
])
def test_invalid_config_values_are_400(engine: EngineProcess, openapi: OpenApiChecker,
                                       path: str, value: Any) -> None:
    result = engine.request("PATCH", "/v1/config", {"path": path, "value": value})
    assert_error(result, 400, "invalid_argument", "invalid config value")
    openapi.check("/v1/config", "PATCH", result)
    assert engine.get("/v1/config").json() == {}
    assert not (engine.store / "config.json").exists()


@pytest.mark.parametrize("body", [{"value": 1}, {"path": "", "value": 1},
                                  {"path": None, "value": 1}, {"path": 3, "value": 1}],
                         ids=["missing", "empty", "null", "number"])
def test_config_patch_requires_a_path(shared: EngineProcess, body: dict[str, Any]) -> None:
    result = shared.request("PATCH", "/v1/config", body)
    assert_error(result, 400, "invalid_argument", "path is required")


@pytest.mark.parametrize("path", ["a..b", "a[", ".a", "a]", "a[x]", "a[-1]"])
def test_invalid_config_path_syntax_is_400(shared: EngineProcess, path: str) -> None:
    patched = shared.request("PATCH", "/v1/config", {"path": path, "value": 1})
    assert_error(patched, 400, "invalid_argument", "invalid path")
    assert_error(shared.get(url("/v1/config", path=path)), 400, "invalid_argument",
                 "invalid path")
    assert_error(shared.delete(url("/v1/config", path=path)), 400, "invalid_argument",
                 "invalid path")


@pytest.mark.parametrize("effective", ["false", "true"])
@pytest.mark.parametrize("path", ["no.such.key", "log.level.deeper", "cache[0]"])
def test_unknown_config_path_is_404(shared: EngineProcess, path: str, effective: str) -> None:
    result = shared.get(url("/v1/config", path=path, effective=effective))
    assert_error(result, 404, "not_found", "path not found")


@pytest.mark.parametrize("query", ["", "?path="])
def test_config_delete_requires_a_path(shared: EngineProcess, query: str) -> None:
    assert_error(shared.delete(f"/v1/config{query}"), 400, "invalid_argument",
                 "path is required")


@pytest.mark.parametrize("value", ["maybe", "yes", "2"])
def test_config_invalid_effective_is_400(shared: EngineProcess, value: str) -> None:
    assert_error(shared.get(url("/v1/config", effective=value)), 400, "invalid_argument",
                 "invalid effective")


def test_config_schema(shared: EngineProcess, api_doc: OpenApiChecker) -> None:
    result = shared.get("/v1/config/schema")
    api_doc.check("/v1/config/schema", "GET", result)
    schema = assert_json(result, 200)
    assert "2020-12" in schema["$schema"]
    assert schema["type"] == "object"
    assert set(CONFIG_DEFAULTS) <= set(schema["properties"])
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    assert not list(validator.iter_errors(CONFIG_DEFAULTS))
    assert list(validator.iter_errors({"snapshot": {"backend": "zfs"}}))
    assert list(validator.iter_errors({"cache": {"capacity": {"maxBytes": -1}}}))


# ============================================================================ §14.13 OpenAPI

SERVED_ROUTES: list[tuple[str, str]] = [
    ("/v1/health", "get"),
    ("/v1/openapi.json", "get"),
    ("/v1/config", "get"),
    ("/v1/config", "patch"),
    ("/v1/config", "delete"),
    ("/v1/config/schema", "get"),
    ("/v1/names", "get"),
    ("/v1/names/{name}", "get"),
    ("/v1/names/{name}", "put"),
    ("/v1/names/{name}", "delete"),
    ("/v1/instances", "get"),
    ("/v1/instances", "post"),
    ("/v1/instances/{idOrName}", "get"),
    ("/v1/instances/{idOrName}", "delete"),
    ("/v1/states", "get"),
    ("/v1/states/{stateId}", "get"),
    ("/v1/states/{stateId}", "delete"),
    ("/v1/prepare-jobs", "get"),
    ("/v1/prepare-jobs", "post"),
    ("/v1/prepare-jobs/{jobId}", "get"),
    ("/v1/prepare-jobs/{jobId}", "delete"),
    ("/v1/prepare-jobs/{jobId}/cancel", "post"),
    ("/v1/prepare-jobs/{jobId}/events", "get"),
    ("/v1/tasks", "get"),
]


@pytest.fixture(scope="module")
def openapi_document(shared: EngineProcess) -> dict[str, Any]:
    result = shared.get("/v1/openapi.json", auth=False)
    document: dict[str, Any] = assert_json(result, 200)
    return document


def test_openapi_is_served_without_auth(openapi_document: dict[str, Any]) -> None:
    assert openapi_document["openapi"] == "3.1.0"
    assert isinstance(openapi_document["paths"], dict)
    assert openapi_document["components"]["schemas"]


@pytest.mark.parametrize(("path", "method"), SERVED_ROUTES)
def test_openapi_documents_every_served_route(openapi_document: dict[str, Any], path: str,
                                              method: str) -> None:
    operation = openapi_document["paths"].get(path, {}).get(method)
    assert operation, f"{method.upper()} {path} is served but not documented"
    assert operation["responses"], f"{method.upper()} {path} documents no responses"


@pytest.mark.parametrize(("path", "method"), [
    (p, m) for p, m in SERVED_ROUTES if p not in ("/v1/health", "/v1/openapi.json")])
def test_openapi_documents_401_on_protected_routes(openapi_document: dict[str, Any], path: str,
                                                   method: str) -> None:
    assert "401" in openapi_document["paths"][path][method]["responses"]
