"""Docker runtime: a fully cached prepare against ``docker run`` + ``pg_ctl start`` + connect.

(a) Cached prepare on Docker: one prepare of a small script with image_id
    ``sqlrs-test/postgres:15`` builds the state; then the same prepare is repeated (interleaved
    with the floor): POST /v1/prepare-jobs → result event → a psycopg2 connection to the DSN is
    accepted. Each instance is deleted afterwards (untimed, ``?force=true``).
(b) Floor, same run: ``docker run`` of the same image (``sleep infinity``, the data dir bind
    mounted at PGDATA, 5432 published on 127.0.0.1) + ``pg_ctl start`` through exec as
    ``postgres`` + psycopg2 connects polled every 2 ms to the published port. The data dir is a
    fresh ``cp -a`` (untimed) of the prepared state's pgdata; the container is removed untimed.
    ``docker run`` alone (until the container is running) is an extra row, read from the same
    floor runs.
Goals: cached Docker prepare median <= 1.0 s and <= 1.3x the floor median.

Where the engine's cached-prepare time goes is read from the job's event timestamps merged
with Docker's own events for the engine's containers (helper container of the image
resolution, the instance container's create/start and its ``pg_ctl`` exec).

Needs a Docker daemon and the local image ``sqlrs-test/postgres:15``
(``scripts/setup-docker.sh``). Containers carry a label and are removed even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    PrepareOutcome,
    delete_instance,
    engine_session,
    fmt_delta,
    fmt_mb,
    fmt_s,
    fmt_x,
    follow_events,
    get_state,
    median,
    parse_options,
    print_goals,
    print_table,
    ratio,
    run_main,
    state_pgdata,
    temp_dir,
)
from _pg import SUPERUSER, check_connection

IMAGE = "sqlrs-test/postgres:15"
PGDATA_IN_CONTAINER = "/var/lib/postgresql/data/pgdata"
PG_CTL_START = ["pg_ctl", "-D", PGDATA_IN_CONTAINER, "-l", "/tmp/pg.log",
                "-o", "-c listen_addresses=* -p 5432", "start"]
BENCH_LABEL = "sqlrs.bench"
ENGINE_LABEL = "sqlrs.engine"  # the engine's containers: sha256(store root)[:12]
RUNTIME_LABEL = "sqlrs.runtime"  # the engine's runtime key (= instance id) of a container
RUNNING_DEADLINE_S = 30.0
SMALL_SCRIPT = (
    "create table items(id int primary key, label text not null);\n"
    "insert into items select g, 'item ' || g from generate_series(1, 1000) g;\n"
)


# --------------------------------------------------------------------------------------------
# the Docker SDK
# --------------------------------------------------------------------------------------------


def docker_sdk() -> Any:
    """The Docker SDK package. This script is itself named ``docker.py`` and its directory is
    ``sys.path[0]``, so a plain ``import docker`` would import the script: drop the directory
    from the path while importing (and from ``PYTHONPATH``, which the engine inherits)."""
    here = Path(__file__).resolve().parent
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in os.environ["PYTHONPATH"].split(os.pathsep)
            if Path(p or ".").resolve() != here)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        loaded = sys.modules.get("docker")
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent == here:
            del sys.modules["docker"]
        return importlib.import_module("docker")
    finally:
        sys.path[:] = saved


def docker_client(sdk: Any) -> Any:
    try:
        client = sdk.from_env(timeout=120)
        client.ping()
    except sdk.errors.DockerException as exc:
        raise BenchError(f"docker is not reachable: {exc}") from exc
    try:
        client.images.get(IMAGE)
    except sdk.errors.ImageNotFound:
        raise BenchError(f"image {IMAGE} is missing: run scripts/setup-docker.sh") from None
    return client


def remove_labelled(client: Any, label: str) -> int:
    """Force-remove every container carrying ``label`` (``key=value``); how many there were."""
    removed = 0
    with contextlib.suppress(Exception):
        for container in client.containers.list(all=True, filters={"label": [label]}):
            with contextlib.suppress(Exception):
                container.remove(force=True)
                removed += 1
    return removed


def engine_label(state_dir: Path) -> str:
    """The label value the engine puts on its containers (a hash of its store root)."""
    store_root = os.path.abspath(state_dir / "state-store")
    return hashlib.sha256(store_root.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# (a) the engine: cached prepare on Docker
# --------------------------------------------------------------------------------------------


def docker_prepare(engine: Engine, script: Path) -> tuple[PrepareOutcome, float]:
    """POST a psql prepare on the Docker image and follow events up to the result; the
    outcome and the wall time its result arrived."""
    posted = time.time()
    body: JsonDict = {"prepare_kind": "psql", "image_id": IMAGE, "psql_args": ["-f", str(script)]}
    job_id = str(engine.call("POST", "/v1/prepare-jobs", body, expect=201)["job_id"])
    events = follow_events(engine, job_id, until_result=True)
    ended = time.time()
    results = [e["result"] for e in events if e.get("type") == "result"]
    if not results:
        errors = [e.get("error") for e in events if e.get("type") == "error"]
        raise BenchError(f"docker prepare job {job_id} failed: {errors or events[-3:]}")
    return PrepareOutcome(job_id, events, posted, ended, results[0]), ended


@dataclass
class EngineRun:
    seconds: float
    outcome: PrepareOutcome
    result_wall: float
    connected_wall: float
    docker_events: list[JsonDict] = field(default_factory=list)


def engine_once(engine: Engine, client: Any, label: str, script: Path) -> EngineRun:
    """POST → result event → DSN accepts a connection; then (untimed) the instance is deleted
    and Docker's events of the engine's containers during the run are collected."""
    started = time.perf_counter()
    outcome, result_wall = docker_prepare(engine, script)
    check_connection(outcome.dsn)
    elapsed = time.perf_counter() - started
    connected = time.time()
    delete_instance(engine, outcome.instance_id)
    run = EngineRun(elapsed, outcome, result_wall, connected)
    run.docker_events = docker_events(client, label, outcome.posted_wall, connected)
    return run


def docker_events(client: Any, label: str, since: float, until: float) -> list[JsonDict]:
    """Container events of the engine's containers between two wall times (best effort)."""
    events: list[JsonDict] = []
    with contextlib.suppress(Exception):
        stream = client.api.events(since=f"{since - 0.05:.6f}", until=f"{until + 0.05:.6f}",
                                   decode=True, filters={"label": [f"{ENGINE_LABEL}={label}"],
                                                         "type": ["container"]})
        try:
            events = [e for e in stream if since <= docker_time(e) <= until]
        finally:
            stream.close()
    return events


# --------------------------------------------------------------------------------------------
# (b) the floor: docker run + pg_ctl start + connect
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloorRun:
    docker_run: float  # containers.run until the container reports "running"
    pg_ctl: float  # exec of pg_ctl start (pg_ctl waits for the server by default)
    connect: float  # psycopg2 connects polled until one is accepted
    total: float


class Floor:
    """Runs the floor's containers (labelled, named) and removes them again."""

    def __init__(self, client: Any, work: Path) -> None:
        self.client = client
        self.work = work
        self.tag = f"docker-{os.getpid()}-{time.monotonic_ns()}"
        self.label = f"{BENCH_LABEL}={self.tag}"
        self._count = 0

    def once(self, source: Path) -> FloorRun:
        self._count += 1
        data_parent = self.work / f"floor-{self._count}"
        data_parent.mkdir(mode=0o700)
        data = data_parent / "pgdata"
        copied = subprocess.run(["cp", "-a", str(source), str(data)], capture_output=True,
                                text=True, check=False)
        if copied.returncode != 0:
            raise BenchError(f"cp -a {source} failed: {copied.stderr.strip()}")
        container: Any = None
        try:
            started = time.perf_counter()
            container = self.client.containers.run(
                IMAGE, ["sleep", "infinity"], detach=True,
                ports={"5432/tcp": ("127.0.0.1", None)},
                volumes={str(data): {"bind": PGDATA_IN_CONTAINER, "mode": "rw"}},
                name=f"sqlrs-bench-floor-{self.tag}-{self._count}",
                labels={BENCH_LABEL: self.tag})
            wait_running(container)
            running = time.perf_counter()
            result = container.exec_run(PG_CTL_START, user="postgres")
            if result.exit_code not in (0, None):
                raise BenchError(f"pg_ctl start failed: {result.output!r}")
            pg_started = time.perf_counter()
            port = int(container.ports["5432/tcp"][0]["HostPort"])
            check_connection(f"postgres://{SUPERUSER}@127.0.0.1:{port}/postgres")
            ended = time.perf_counter()
        finally:
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            shutil.rmtree(data_parent, ignore_errors=True)
        return FloorRun(running - started, pg_started - running, ended - pg_started,
                        ended - started)

    def cleanup(self) -> None:
        remove_labelled(self.client, self.label)


def wait_running(container: Any) -> None:
    """Reload the container until Docker reports it running (``run`` returns the object as
    created, before its start)."""
    deadline = time.monotonic() + RUNNING_DEADLINE_S
    while True:
        container.reload()
        if container.status == "running":
            return
        if container.status in ("exited", "dead") or time.monotonic() > deadline:
            raise BenchError(f"container {container.name} is {container.status}")
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------
# where the engine's time goes: job events + Docker events
# --------------------------------------------------------------------------------------------


def event_time(event: JsonDict) -> float:
    """Seconds since the epoch of an RFC 3339 UTC ``ts`` with nanoseconds."""
    head, _, frac = str(event["ts"]).rstrip("Z").partition(".")
    whole = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return whole.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def docker_time(event: JsonDict) -> float:
    nano = event.get("timeNano")
    return int(nano) / 1e9 if nano else float(event.get("time") or 0)


def _action(event: JsonDict) -> str:
    return str(event.get("Action") or event.get("status") or "")


def _attributes(event: JsonDict) -> JsonDict:
    attributes: JsonDict = (event.get("Actor") or {}).get("Attributes") or {}
    return attributes


# (label of the phase that starts at the mark, matcher of the mark). Job events first.
JOB_MARKS: list[tuple[str, Callable[[JsonDict], bool]]] = [
    ("queued -> running (worker picks the job)", lambda e: e.get("status") == "queued"),
    ("running -> resolve starts", lambda e: e.get("status") == "running"),
    ("resolve: images.get, helper create call",
     lambda e: str(e.get("message", "")).startswith("resolve image")),
    ("plan + cached-step check", lambda e: str(e.get("message", "")).startswith("resolved image")),
    ("clone (discard leftovers, overlay mount)",
     lambda e: e.get("type") == "task" and e.get("task_id") == "prepare-instance"
     and e.get("status") == "running"),
    ("container: list + create call", lambda e: "runtime cloned" in str(e.get("message"))),
    ("register instance", lambda e: "postgres ready" in str(e.get("message"))),
    ("instance created -> succeeded", lambda e: "instance created" in str(e.get("message"))),
    ("succeeded -> result at the client",
     lambda e: e.get("type") == "status" and e.get("status") == "succeeded"),
]
HELPER_MARKS = {
    "create": "resolve: helper `id postgres` create -> start",
    "start": "resolve: helper runs `id postgres` (start -> die)",
    "die": "resolve: helper logs, wait, remove (die -> destroy)",
    "destroy": "resolve: helper gone -> resolved",
}
INSTANCE_MARKS = {
    "create": "container: create -> start",
    "start": "container: start -> pg_ctl exec_create",
    "exec_create": "pg_ctl: exec_create -> exec_start",
    "exec_start": "pg_ctl start (waits for the server)",
    "exec_die": "pg_ctl exit -> postgres ready event",
}


def breakdown(run: EngineRun) -> dict[str, float]:
    """Seconds between consecutive marks (job events, Docker events, client wall times)."""
    marks: list[tuple[float, str]] = [(run.outcome.posted_wall, "POST -> job queued")]
    start = 0
    events = run.outcome.events
    for label, matches in JOB_MARKS:
        for pos in range(start, len(events)):
            if matches(events[pos]):
                marks.append((event_time(events[pos]), label))
                start = pos + 1
                break
    seen: set[tuple[bool, str]] = set()
    for event in run.docker_events:
        attributes = _attributes(event)
        action = _action(event).split(":", 1)[0]
        instance = attributes.get(RUNTIME_LABEL) == run.outcome.instance_id
        table = INSTANCE_MARKS if instance else HELPER_MARKS
        if RUNTIME_LABEL in attributes and not instance:
            continue
        if action in table and (instance, action) not in seen:
            seen.add((instance, action))
            marks.append((docker_time(event), table[action]))
    marks.sort(key=lambda mark: mark[0])
    marks.append((run.result_wall, "result -> DSN accepts a connection"))
    marks.append((run.connected_wall, ""))
    phases: dict[str, float] = {}
    for (at, label), (following, _) in itertools.pairwise(marks):
        phases[label] = phases.get(label, 0.0) + (following - at)
    return phases


def print_breakdown(runs: list[EngineRun]) -> None:
    ordered = sorted(runs, key=lambda r: r.seconds)
    representative = ordered[(len(ordered) - 1) // 2]
    phases = [breakdown(run) for run in runs]
    shown, slowest = breakdown(representative), breakdown(ordered[-1])
    labels = list(dict.fromkeys(label for p in [shown, *phases] for label in p))
    rows = [[label, fmt_s(shown.get(label, 0.0)),
             fmt_s(median([p.get(label, 0.0) for p in phases])),
             fmt_s(slowest.get(label, 0.0))] for label in labels]
    rows.append(["total (POST -> DSN connect)", fmt_s(sum(shown.values())),
                 fmt_s(median([sum(p.values()) for p in phases])),
                 fmt_s(sum(slowest.values()))])
    print_table("Where the engine's cached Docker prepare goes (job events + Docker events; "
                f"representative = median run, job {representative.outcome.job_id[:12]})",
                ["phase", "representative", f"median of {len(runs)}", "slowest run"], rows)
    if not representative.docker_events:
        print("(no Docker events were available: container phases are merged)")


# --------------------------------------------------------------------------------------------
# measurement and report
# --------------------------------------------------------------------------------------------


def measure(options: Options, client: Any, work: Path) -> list[Goal]:
    script = work / "small.sql"
    script.write_text(SMALL_SCRIPT)
    state_dir = work / "engine"
    label = engine_label(state_dir)
    floor = Floor(client, work)
    engine_runs: list[EngineRun] = []
    floor_runs: list[FloorRun] = []
    try:
        with engine_session(state_dir) as engine:
            built = time.perf_counter()
            first, _ = docker_prepare(engine, script)
            built = time.perf_counter() - built
            delete_instance(engine, first.instance_id)
            source = state_pgdata(engine, first.state_id)
            size = int(get_state(engine, first.state_id).get("size_bytes") or 0)
            print(f"docker prepare: state {first.state_id[:12]} ({fmt_mb(size)}) on "
                  f"{first.result.get('image_id')}, first (building) prepare {fmt_s(built)}; "
                  f"{options.runs} runs each, interleaved", flush=True)
            for _ in range(options.runs):
                engine_runs.append(engine_once(engine, client, label, script))
                floor_runs.append(floor.once(source))
    finally:
        floor.cleanup()
        left = remove_labelled(client, f"{ENGINE_LABEL}={label}")
        if left:
            print(f"removed {left} container(s) the engine left behind", file=sys.stderr)
    return report(engine_runs, floor_runs)


def report(engine_runs: list[EngineRun], floor_runs: list[FloorRun]) -> list[Goal]:
    samples = {
        "engine: cached docker prepare (POST -> DSN connect)": [r.seconds for r in engine_runs],
        "floor: docker run + pg_ctl start + connect": [r.total for r in floor_runs],
        "  docker run alone (until running)": [r.docker_run for r in floor_runs],
    }
    floor = median([r.total for r in floor_runs])
    rows = [[label, str(len(values)), fmt_s(median(values)), fmt_s(min(values)),
             fmt_s(max(values)), fmt_x(ratio(median(values), floor))]
            for label, values in samples.items()]
    print_table("(a) Fully cached prepare on Docker vs floor", ["measurement", "runs", "median",
                                                                "min", "max", "vs floor"], rows)
    engine = median([r.seconds for r in engine_runs])
    print(f"engine minus floor: {fmt_delta(engine - floor)}")
    floor_phases = {
        "docker run (create + start, until running)": [r.docker_run for r in floor_runs],
        "exec pg_ctl start (waits for the server)": [r.pg_ctl for r in floor_runs],
        "psycopg2 connect (polled every 2 ms)": [r.connect for r in floor_runs],
        "total": [r.total for r in floor_runs],
    }
    print_table("Floor phases", ["phase", "median", "min", "max"],
                [[label, fmt_s(median(v)), fmt_s(min(v)), fmt_s(max(v))]
                 for label, v in floor_phases.items()])
    print_breakdown(engine_runs)
    return [Goal("cached docker prepare median", engine, 1.0, "s"),
            Goal("cached docker prepare / floor", ratio(engine, floor), 1.3, "x")]


@contextlib.contextmanager
def docker_errors(sdk: Any) -> Iterator[None]:
    """Docker SDK failures are benchmark errors (exit 1), not tracebacks."""
    try:
        yield
    except sdk.errors.DockerException as exc:
        raise BenchError(f"docker: {exc}") from exc


def bench(options: Options) -> None:
    sdk = docker_sdk()
    with docker_errors(sdk):
        client = docker_client(sdk)
        work = temp_dir("docker")
        try:
            goals = measure(options, client, work)
            print_goals(goals)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            client.close()


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=10, quick_runs=3)))
