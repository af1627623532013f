"""Shared helpers of the benchmarks: spawn the engine, talk HTTP to it, time, report, clean up.

The benchmarks are run as scripts (``python bench/startup.py``), so this module is imported as
``_common`` from the ``bench`` directory. Nothing here asserts on timings: the scripts print
measurements, ratios against baselines measured in the same run, and PASS/MISS per goal.

The engine harness (the process, its health wait, HTTP, the cleanup helpers) is
``tests/harness.py``, shared with the tests; this module gives it the benchmarks' flavour
(:class:`Engine`) and re-exports the names the scripts import from here.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the shared harness, and the engine module it and _pg read, come from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import HOST_IMAGE as HOST_IMAGE
from harness import PG_BIN as PG_BIN
from harness import ROOT as ROOT
from harness import HttpResult as HttpResult
from harness import JsonDict as JsonDict
from harness import SpawnedEngine, engine_argv, send, sweep_store, to_epoch
from harness import kill_leftovers as kill_leftovers

POLL_S = 0.002
STARTUP_DEADLINE_S = 10.0
#: the small script whose state the cached-prepare and warm-pool benchmarks hand out
SMALL_SCRIPT = (
    "create table items(id int primary key, label text not null);\n"
    "insert into items select g, 'item ' || g from generate_series(1, 1000) g;\n"
)


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


class Client:
    """One keep-alive HTTP/1.1 connection to the engine with its bearer token."""

    def __init__(self, host: str, port: int, token: str, timeout: float = 60.0) -> None:
        self.token = token
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.reconnects = 0

    def request(self, method: str, path: str, body: Any = None, *,
                auth: bool = True) -> HttpResult:
        if self.conn.sock is None:
            self.reconnects += 1
        return send(self.conn, method, path, body, token=self.token if auth else None)

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------------
# the engine process
# --------------------------------------------------------------------------------------------


class Engine(SpawnedEngine):
    """A running engine in the benchmarks' flavour: output in ``bench-spawn.log``, long
    request timeouts, a :class:`BenchError` when it dies or is not healthy in time."""

    spawn_log = "bench-spawn.log"
    request_timeout_s = 600.0
    health_timeout_s = 2.0
    failure = BenchError

    def client(self, timeout: float = 600.0) -> Client:
        return Client(self.host, self.port, self.token, timeout)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """A JSON request that must answer ``expect``; its decoded body."""
        result = self.request(method, path, body)
        if result.status != expect:
            raise BenchError(f"{method} {path}: {result.status} {result.body[:500]!r}")
        return result.json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        try:
            return super().stop(sig, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def launch_engine(state_dir: Path, argv0: Sequence[str] | None = None) -> Engine:
    """Start the engine (cwd = repository root, idle timeout disabled) without waiting for it."""
    (state_dir / "engine.json").unlink(missing_ok=True)
    return Engine.launch(state_dir, engine_argv(state_dir, argv0=argv0), stdin=subprocess.DEVNULL)


def wait_healthy(engine: Engine, interval: float = POLL_S,
                 deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Poll for engine.json plus a 200 from ``GET /v1/health`` every ``interval`` seconds (the
    engine is stopped if it does not get there)."""
    try:
        engine.wait_ready(deadline_s, interval)
    except BenchError:
        engine.stop()
        raise


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
    with contextlib.closing(engine.stream(f"/v1/prepare-jobs/{job_id}/events", timeout)) as stream:
        for event in stream:
            events.append(event)
            if until_result and event.get("type") in ("result", "error"):
                break
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
    """Seconds since the epoch of an event's RFC 3339 UTC ``ts`` (to the microsecond)."""
    return to_epoch(str(event["ts"]))


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


# --------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------


def cleanup_engine(engine: Engine) -> None:
    """Delete the engine's instances, stop it, then kill anything it left behind."""
    engine.shut_down()
    sweep_store(engine.store)


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
