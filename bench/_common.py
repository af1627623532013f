"""Shared helpers of the benchmarks: spawn the engine, talk HTTP to it, time, report, clean up.

The benchmarks are run as scripts (``python bench/startup.py``), so this module is imported as
``_common`` from the ``bench`` directory. Nothing here asserts on timings: the scripts print
measurements, ratios against baselines measured in the same run, and PASS/MISS per goal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST_IMAGE = "host:15"
PG_BIN = "/usr/lib/postgresql/15/bin"
POLL_S = 0.002
STARTUP_DEADLINE_S = 10.0
ENGINE_RUN_ROOT = Path("/run/sqlrs-engine")
#: the small script whose state the cached-prepare and warm-pool benchmarks hand out
SMALL_SCRIPT = (
    "create table items(id int primary key, label text not null);\n"
    "insert into items select g, 'item ' || g from generate_series(1, 1000) g;\n"
)

JsonDict = dict[str, Any]


class BenchError(Exception):
    """Something the benchmark needs did not work (not a missed goal): exit non-zero."""


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    runs: int
    quick: bool
    extra: argparse.Namespace


def parse_options(description: str, default_runs: int, quick_runs: int,
                  add: Callable[[argparse.ArgumentParser], None] | None = None) -> Options:
    """``--runs N`` and ``--quick`` (fewer runs, smaller data) plus script-specific flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=None,
                        help=f"repetitions per measurement (default {default_runs}, "
                             f"{quick_runs} with --quick)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    if add:
        add(parser)
    ns = parser.parse_args()
    runs = ns.runs if ns.runs is not None else (quick_runs if ns.quick else default_runs)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return Options(runs=int(runs), quick=bool(ns.quick), extra=ns)


def revision() -> str:
    """The repository's commit, ``+dirty`` when sqlrs_engine.py has local changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "sqlrs_engine.py") else "")


def run_main(body: Callable[[Options], None], options: Options) -> int:
    """Run a benchmark body; 0 whatever the goals say, 1 on an error."""
    print(f"sqlrs-engine {revision()}, {os.cpu_count()} CPUs, runs={options.runs}"
          f"{' (quick)' if options.quick else ''}", flush=True)
    try:
        body(options)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"\nbenchmark error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------------------------
# statistics and reporting
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no samples")
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else float("inf")


def fmt_s(seconds: float) -> str:
    """Seconds as ms below 10 s, else as s."""
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def fmt_delta(seconds: float) -> str:
    return f"{seconds * 1000:+.1f} ms"


def fmt_x(value: float) -> str:
    return f"{value:.2f}x"


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                        strict=False)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


@dataclass(frozen=True)
class Goal:
    """One goal: ``actual`` must be at most ``limit`` (``unit`` "s", "x" or "n" for a count)."""

    name: str
    actual: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        return self.actual <= self.limit

    def _fmt(self, value: float) -> str:
        if self.unit == "n":
            return f"{value:.0f}"
        return fmt_s(value) if self.unit == "s" else fmt_x(value)

    def row(self) -> list[str]:
        return [self.name, self._fmt(self.actual), f"<= {self._fmt(self.limit)}",
                "PASS" if self.passed else "MISS"]


def stats_row(label: str, values: Sequence[float], baseline: float | None) -> list[str]:
    """label, runs, median, min, max and the median against ``baseline`` (None: the baseline's
    own row, 1.00x)."""
    versus = "1.00x" if baseline is None else fmt_x(ratio(median(values), baseline))
    return [label, str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
            fmt_s(max(values)), versus]


def print_goals(goals: Sequence[Goal]) -> None:
    print_table("Goals", ["goal", "measured", "target", "result"], [g.row() for g in goals])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class HttpResult:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection to the engine with its bearer token."""

    def __init__(self, host: str, port: int, token: str, timeout: float = 60.0) -> None:
        self.token = token
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.reconnects = 0

    def request(self, method: str, path: str, body: Any = None, *,
                auth: bool = True) -> HttpResult:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.conn.sock is None:
            self.reconnects += 1
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()
        return HttpResult(resp.status, data)

    def stream(self, path: str) -> Iterator[JsonDict]:
        """An NDJSON stream, one decoded object per line, until the server ends it."""
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"GET {path}: {resp.status} {resp.read()[:500]!r}")
        try:
            for line in iter(resp.readline, b""):
                if line.strip():
                    yield json.loads(line)
        finally:
            self.conn.close()

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------------
# the engine process
# --------------------------------------------------------------------------------------------


def engine_argv(state_dir: Path, argv0: Sequence[str] | None = None) -> list[str]:
    """The CLI's command line (contract §1.5), idle timeout disabled."""
    return [*(argv0 or [sys.executable, "-m", "sqlrs_engine"]),
            "--listen", "127.0.0.1:0", "--write-engine-json", str(state_dir / "engine.json"),
            "--idle-timeout", "0"]


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    info: JsonDict = field(default_factory=dict)

    @property
    def engine_json(self) -> Path:
        return self.state_dir / "engine.json"

    @property
    def host(self) -> str:
        return str(self.info["endpoint"]).rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(str(self.info["endpoint"]).rsplit(":", 1)[1])

    @property
    def store(self) -> Path:
        return self.state_dir / "state-store"

    def client(self, timeout: float = 600.0) -> Client:
        return Client(self.host, self.port, str(self.info["authToken"]), timeout)

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                timeout: float = 600.0) -> HttpResult:
        client = self.client(timeout)
        try:
            return client.request(method, path, body, auth=auth)
        finally:
            client.close()

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """A JSON request that must answer ``expect``; its decoded body."""
        result = self.request(method, path, body)
        if result.status != expect:
            raise BenchError(f"{method} {path}: {result.status} {result.body[:500]!r}")
        return result.json()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def launch_engine(state_dir: Path, argv0: Sequence[str] | None = None) -> Engine:
    """Start the engine (cwd = repository root) without waiting for it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "engine.json").unlink()
    log_path = state_dir / "bench-spawn.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(engine_argv(state_dir, argv0), cwd=ROOT, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Engine(proc, state_dir)


def _healthy(engine: Engine) -> bool:
    if engine.proc.poll() is not None:
        tail = (engine.state_dir / "bench-spawn.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"engine exited with {engine.proc.returncode}: {tail}")
    try:
        engine.info = json.loads(engine.engine_json.read_text())
        result = engine.request("GET", "/v1/health", auth=False, timeout=2)
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return False
    return result.status == 200 and result.json().get("instanceId") == engine.info["instanceId"]


def wait_healthy(engine: Engine, interval: float = POLL_S,
                 deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Poll for engine.json plus a 200 from ``GET /v1/health`` every ``interval`` seconds."""
    end = time.monotonic() + deadline_s
    while not _healthy(engine):
        if time.monotonic() > end:
            engine.stop()
            raise BenchError(f"engine not healthy within {deadline_s}s")
        time.sleep(interval)


def spawn_engine(state_dir: Path, argv0: Sequence[str] | None = None) -> Engine:
    engine = launch_engine(state_dir, argv0)
    wait_healthy(engine, interval=0.01)
    return engine


# --------------------------------------------------------------------------------------------
# prepare jobs and instances
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareOutcome:
    job_id: str
    events: list[JsonDict]
    posted_wall: float  #: wall time of the POST
    streamed_wall: float  #: the events were read (to the result event or the stream's end)
    ended_wall: float  #: the job's status (with the DSN's password) was read
    result: JsonDict

    @property
    def instance_id(self) -> str:
        return str(self.result["instance_id"])

    @property
    def state_id(self) -> str:
        return str(self.result["state_id"])

    @property
    def dsn(self) -> str:
        return str(self.result["dsn"])


def follow_events(engine: Engine, job_id: str, until_result: bool = False,
                  timeout: float = 900.0) -> list[JsonDict]:
    """The job's events to the end of the stream (or to its ``result`` event)."""
    events: list[JsonDict] = []
    client = engine.client(timeout)
    for event in client.stream(f"/v1/prepare-jobs/{job_id}/events"):
        events.append(event)
        if until_result and event.get("type") in ("result", "error"):
            break
    client.close()
    return events


def run_job(engine: Engine, body: JsonDict, until_result: bool = False) -> PrepareOutcome:
    """POST a prepare job and follow its events; raise unless it succeeded."""
    posted = time.time()
    job_id = str(engine.call("POST", "/v1/prepare-jobs", body, expect=201)["job_id"])
    events = follow_events(engine, job_id, until_result)
    streamed = time.time()
    if not any(e.get("type") == "result" for e in events):
        errors = [e.get("error") for e in events if e.get("type") == "error"]
        raise BenchError(f"{body['prepare_kind']} prepare job {job_id} on {body['image_id']} "
                         f"failed: {errors or events[-3:]}")
    # as the CLI does: the DSN with the instance's password comes from the job's status
    result: JsonDict = engine.call("GET", f"/v1/prepare-jobs/{job_id}")["result"]
    return PrepareOutcome(job_id, events, posted, streamed, time.time(), result)


def prepare(engine: Engine, psql_args: Sequence[str], stdin: str | None = None,
            until_result: bool = False, image: str = HOST_IMAGE) -> PrepareOutcome:
    """A psql prepare job on ``image`` (see :func:`run_job`)."""
    body: JsonDict = {"prepare_kind": "psql", "image_id": image, "psql_args": list(psql_args)}
    if stdin is not None:
        body["stdin"] = stdin
    return run_job(engine, body, until_result)


def event_time(event: JsonDict) -> float:
    """Seconds since the epoch of an event's RFC 3339 UTC ``ts`` with nanoseconds."""
    head, _, frac = str(event["ts"]).rstrip("Z").partition(".")
    whole = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return whole.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def create_instance(engine: Engine, state_id: str) -> JsonDict:
    entry: JsonDict = engine.call("POST", "/v1/instances", {"state_id": state_id}, expect=201)
    return entry


def delete_instance(engine: Engine, instance_id: str) -> None:
    engine.call("DELETE", f"/v1/instances/{instance_id}?force=true")


def prepare_once(engine: Engine, psql_args: Sequence[str], image: str = HOST_IMAGE
                 ) -> tuple[float, PrepareOutcome]:
    """A (cached) prepare timed from POST through its result event and the job's DSN until
    the DSN accepts a connection; the instance is deleted afterwards (untimed)."""
    from _pg import check_connection  # here: _pg imports this module

    started = time.perf_counter()
    outcome = prepare(engine, psql_args, until_result=True, image=image)
    check_connection(outcome.dsn)
    elapsed = time.perf_counter() - started
    delete_instance(engine, outcome.instance_id)
    return elapsed, outcome


def instance_once(engine: Engine, state_id: str) -> float:
    """POST /v1/instances → DSN accepts a connection; the instance is deleted afterwards."""
    from _pg import check_connection  # here: _pg imports this module

    started = time.perf_counter()
    entry = create_instance(engine, state_id)
    check_connection(str(entry["dsn"]))
    elapsed = time.perf_counter() - started
    delete_instance(engine, str(entry["instance_id"]))
    return elapsed


def get_state(engine: Engine, state_id: str) -> JsonDict:
    state: JsonDict = engine.call("GET", f"/v1/states/{state_id}")
    return state


def state_pgdata(engine: Engine, state_id: str) -> Path:
    """What an overlay clone of a published state mounts: its ``pgdata`` directory, or for a
    layered state its stack of layers (``layer:lower:…``, usable as a ``lowerdir``)."""
    found = sorted(engine.store.glob(f"engines/*/*/states/{state_id}/pgdata"))
    layered = sorted(engine.store.glob(f"engines/*/*/states/{state_id}/layer"))
    if layered:
        lowers = (layered[0].parent / "lowers").read_text()
        return Path(f"{layered[0]}:{lowers}")
    if not found:
        raise BenchError(f"no data directory for state {state_id}")
    return found[0]


def delete_all_instances(engine: Engine) -> None:
    if engine.proc.poll() is not None:
        return
    for inst in engine.call("GET", "/v1/instances") or []:
        with contextlib.suppress(BenchError, OSError):
            delete_instance(engine, str(inst["instance_id"]))


# --------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------


def expose_root(store: Path) -> Path:
    """Where the engine (as root) mounts instance data dirs: /run/sqlrs-engine/<hash>."""
    return ENGINE_RUN_ROOT / hashlib.sha256(str(store).encode()).hexdigest()[:12]


def mounts_below(prefix: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(prefix) or point.startswith(str(prefix) + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def postgres_pids_below(*prefixes: Path) -> list[int]:
    """Postmasters whose command line names a path under one of ``prefixes``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if not args or not args[0].endswith(b"postgres"):
                continue
            if any(str(p).encode() in arg for arg in args for p in prefixes):
                pids.append(int(entry.name))
    return pids


def kill_leftovers(*roots: Path) -> None:
    """Last resort: SIGKILL postgres processes under ``roots`` and lazily unmount their mounts."""
    for pid in postgres_pids_below(*roots):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for root in roots:
        for point in mounts_below(root):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def cleanup_engine(engine: Engine) -> None:
    """Delete the engine's instances, stop it, then kill anything it left behind."""
    with contextlib.suppress(BenchError, OSError, http.client.HTTPException):
        delete_all_instances(engine)
    with contextlib.suppress(OSError):
        engine.stop()
    kill_leftovers(engine.store, expose_root(engine.store))
    shutil.rmtree(expose_root(engine.store), ignore_errors=True)


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"sqlrs-bench-{prefix}-"))


@contextlib.contextmanager
def engine_session(state_dir: Path | None = None, keep_dir: bool = False) -> Iterator[Engine]:
    """A healthy engine on a fresh (or given) state dir, cleaned up on exit."""
    owned = state_dir is None
    state_dir = state_dir or temp_dir("engine")
    engine = spawn_engine(state_dir)
    try:
        yield engine
    finally:
        cleanup_engine(engine)
        if owned and not keep_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
