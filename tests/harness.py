"""The engine harness shared by the tests and the benchmarks: start the engine as the sqlrs CLI
does, wait until it is healthy, talk HTTP to it, and clean up what it leaves behind.

The tests reach it through ``tests/conftest.py`` (pytest fixtures and assertions on top), the
benchmarks through ``bench/_common.py`` (timing and reporting on top), which puts this directory
on ``sys.path``; both import it as ``harness``. It is a plain module: no pytest, and nothing
here judges a timing. Each side subclasses :class:`SpawnedEngine` to set its spawn log, its
timeouts and the exception it raises when the engine dies or does not become healthy.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Self

ROOT = Path(__file__).resolve().parent.parent
HOST_IMAGE = "host:15"
PG_BIN = "/usr/lib/postgresql/15/bin"
#: where the engine (as root) mounts the data directories of its instances, one dir per store
ENGINE_RUN_ROOT = Path("/run/sqlrs-engine")
# A start may sweep or adopt servers (and run a helper container) left by an earlier engine;
# on a busy 2-core machine that takes seconds. Polling still returns as soon as it is healthy.
STARTUP_DEADLINE = 30.0
TIMESTAMP_RE = re.compile(
    r"(?P<whole>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d{1,9}))?Z")

JsonDict = dict[str, Any]


def poll(predicate: Callable[[], Any], deadline_s: float, interval: float = 0.02,
         what: str = "condition", failure: type[Exception] = AssertionError) -> Any:
    """Call ``predicate`` until it returns something truthy (returned) or the deadline passes
    (``failure`` raised)."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise failure(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval)


def to_epoch(ts: str) -> float:
    """Seconds since the epoch of an engine timestamp, RFC 3339 in UTC with up to nine fraction
    digits (``2026-07-21T08:15:30.123456789Z``). The fraction is cut to the microseconds that
    ``datetime`` holds and the offset spelled ``+00:00``, so the value is read as UTC whatever
    the local time zone and its daylight saving time."""
    match = TIMESTAMP_RE.fullmatch(ts)
    if not match:
        raise ValueError(f"not an RFC 3339 UTC timestamp: {ts!r}")
    micros = (match["fraction"] or "")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{match['whole']}.{micros}+00:00").timestamp()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class HttpResult:
    """One answer of the engine: status, headers (names in lower case) and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


def send(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None, *,
         token: str | None = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> HttpResult:
    """One request on ``conn`` and its whole answer: ``body`` sent as JSON (or ``raw`` bytes as
    they are), with ``Authorization: Bearer <token>`` unless ``token`` is None or ``headers``
    name one. A connection the server is closing is closed, so a keep-alive caller reconnects."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if payload is not None:
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=payload, headers=hdrs)
    resp = conn.getresponse()
    result = HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    if resp.will_close:
        conn.close()
    return result


# --------------------------------------------------------------------------------------------
# the engine process
# --------------------------------------------------------------------------------------------


def engine_argv(state_dir: Path, *extra: str, argv0: Sequence[str] | None = None,
                idle: str = "0", run_dir: bool = False) -> list[str]:
    """The CLI's command line (contract §1.5) for an engine on ``state_dir``: ``argv0``
    (default: this Python's ``-m sqlrs_engine``), ``--run-dir <state dir>/run`` if ``run_dir``,
    a free loopback port, ``<state dir>/engine.json``, the idle timeout ``idle`` ("0": none),
    then ``extra``."""
    return [*(argv0 or [sys.executable, "-m", "sqlrs_engine"]),
            *(["--run-dir", str(state_dir / "run")] if run_dir else []),
            "--listen", "127.0.0.1:0", "--write-engine-json", str(state_dir / "engine.json"),
            "--idle-timeout", idle, *extra]


@dataclass
class SpawnedEngine:
    """An engine subprocess with its state dir and what it wrote to engine.json: one-shot HTTP
    requests with its bearer token, the health wait and the stop.

    The class attributes are the flavour a subclass sets: where :meth:`launch` sends the
    engine's output (relative to the state dir), the default request and health-probe
    timeouts, and the exception raised when the engine exits or is not healthy in time.
    ``engine_json`` defaults to ``<state dir>/engine.json`` (a relative path is below the state
    dir); ``info`` is its content, read by :meth:`healthy`.
    """

    spawn_log: ClassVar[str] = "logs/spawn.log"
    request_timeout_s: ClassVar[float] = 60.0
    health_timeout_s: ClassVar[float] = 1.0
    failure: ClassVar[type[Exception]] = AssertionError

    proc: subprocess.Popen[bytes]
    state_dir: Path
    engine_json: Path = Path("engine.json")
    info: JsonDict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine_json = self.state_dir / self.engine_json

    @classmethod
    def launch(cls, state_dir: Path, argv: list[str], *, env: dict[str, str] | None = None,
               stdin: int | None = None) -> Self:
        """Start ``argv`` in its own session with cwd = the repository, its output appended to
        the spawn log (directories made as needed); do not wait for it."""
        log = state_dir / cls.spawn_log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out, stdin=stdin,
                                    env=env, start_new_session=True)
        return cls(proc, state_dir)

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

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float | None = None) -> HttpResult:
        """One request on a connection of its own (see :func:`send`)."""
        conn = self.connect(self.request_timeout_s if timeout is None else timeout)
        try:
            return send(conn, method, path, body, token=self.token if auth else None,
                        headers=headers, raw=raw)
        finally:
            conn.close()

    def stream(self, path: str, timeout: float) -> Generator[Any, None, None]:
        """``GET path`` as an NDJSON stream: each value as its line arrives, to the stream's end
        (close the generator to hang up early); ``failure`` unless the answer is 200."""
        conn = self.connect(timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise self.failure(f"GET {path}: {resp.status} {resp.read()[:500]!r}")
            for line in iter(resp.readline, b""):
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    def healthy(self) -> bool:
        """engine.json is readable and ``GET /v1/health`` answers 200 from the engine it names
        (raises ``failure`` with the spawn log's tail if the process has exited)."""
        if self.proc.poll() is not None:
            tail = (self.state_dir / self.spawn_log).read_text(errors="replace")[-2000:]
            raise self.failure(f"engine exited with {self.proc.returncode}: {tail}")
        try:
            self.info = json.loads(self.engine_json.read_text())
            result = self.request("GET", "/v1/health", auth=False,
                                  timeout=self.health_timeout_s)
            return (result.status == 200
                    and result.json().get("instanceId") == self.info["instanceId"])
        except (OSError, ValueError, KeyError, http.client.HTTPException):
            return False

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE, interval: float = 0.02) -> Self:
        """Poll :meth:`healthy` every ``interval`` seconds; ``failure`` after ``deadline_s``."""
        poll(self.healthy, deadline_s, interval, "engine.json and /v1/health", self.failure)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` unless the engine has exited; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def shut_down(self) -> None:
        """Force-delete the engine's instances, stop it and kill it if it will not stop,
        whatever state it is in (errors ignored)."""
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                for inst in self.request("GET", "/v1/instances").json() or []:
                    self.request("DELETE", f"/v1/instances/{inst['instance_id']}?force=true")
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self.proc.kill()


# --------------------------------------------------------------------------------------------
# what an engine leaves behind
# --------------------------------------------------------------------------------------------


def engine_label(store: Path) -> str:
    """The engine's name for the store ``store``: its expose dir and its containers' label."""
    return hashlib.sha256(str(store).encode()).hexdigest()[:12]


def expose_root(store: Path) -> Path:
    """Where the engine (as root) mounts instance data dirs: /run/sqlrs-engine/<label>."""
    return ENGINE_RUN_ROOT / engine_label(store)


def mounts_below(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first, read as the engine reads them."""
    # imported when needed and dynamically, so that type-checking the benchmarks does not
    # type-check the engine
    points: list[str] = importlib.import_module("sqlrs_engine").mounts_under(str(prefix))
    return points


def postgres_pids_below(*prefixes: Path) -> list[int]:
    """Postgres processes whose command line names a path under one of ``prefixes``."""
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


def container_postmaster_pid(container_id: str) -> int:
    """The host pid of the postmaster running in a container (``postgres -D …``)."""
    top = subprocess.run(["docker", "top", container_id, "-o", "pid,args"], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    pids = [int(line.split()[0]) for line in top.splitlines()[1:]
            if len(line.split()) > 2 and line.split()[1].rsplit("/", 1)[-1] == "postgres"
            and line.split()[2] == "-D"]
    assert len(pids) == 1, top
    return pids[0]


def kill_leftovers(*roots: Path) -> None:
    """Last resort: SIGKILL postgres processes under ``roots`` and lazily unmount their mounts."""
    for pid in postgres_pids_below(*roots):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for root in roots:
        for point in mounts_below(root):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def sweep_store(store: Path) -> None:
    """Kill the servers and unmount the mounts an engine on ``store`` left (below the store and
    its expose root), then remove the expose root."""
    kill_leftovers(store, expose_root(store))
    shutil.rmtree(expose_root(store), ignore_errors=True)
