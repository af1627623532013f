"""Docker runtime: a fully cached prepare against ``docker run`` + ``pg_ctl start`` + connect.

(a) Cached prepare on Docker: one prepare of a small script with image_id
    ``sqlrs-test/postgres:15`` builds the state; then the same prepare is repeated (interleaved
    with the floor): POST /v1/prepare-jobs → result event → GET the job (the DSN with the
    instance's password, as the CLI does) → a psycopg2 connection to the DSN is accepted. Each
    instance is deleted afterwards (untimed, ``?force=true``).
(b) Floor, same run: ``docker run`` of the same image (``sleep infinity``, the data dir bind
    mounted at PGDATA, 5432 published on 127.0.0.1) + ``pg_ctl start`` through exec as
    ``postgres`` + psycopg2 connects polled every 2 ms to the published port. The data dir is a
    fresh ``cp -a`` (untimed) of the prepared state's pgdata, its pg_hba.conf trusting TCP
    clients like the host floor's; the container is removed untimed. ``docker run`` alone
    (until the container is running) is an extra row, read from the same floor runs.
Goals: cached Docker prepare median <= 1.0 s and <= 1.3x the floor median.

Where the engine's cached-prepare time goes is read from the job's event timestamps merged
with Docker's own events for the engine's containers (helper container of the image
resolution, the instance container's create/start and its ``pg_ctl`` exec).

Needs a Docker daemon and the local image ``sqlrs-test/postgres:15``
(``scripts/setup-docker.sh``). Containers carry a label and are removed even on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    SMALL_SCRIPT,
    Engine,
    Goal,
    JsonDict,
    Options,
    PrepareOutcome,
    delete_instance,
    engine_session,
    event_time,
    fmt_delta,
    fmt_mb,
    fmt_s,
    get_state,
    median,
    parse_options,
    prepare,
    print_goals,
    print_table,
    ratio,
    run_main,
    state_pgdata,
    stats_row,
    temp_dir,
)
from _docker import (
    DOCKER_IMAGE,
    ENGINE_LABEL,
    DockerFloor,
    FloorRun,
    docker_client,
    docker_errors,
    engine_label,
    remove_engine_leftovers,
)
from _pg import check_connection

RUNTIME_LABEL = "sqlrs.runtime"  # the engine's runtime key (= instance id) of a container


# --------------------------------------------------------------------------------------------
# (a) the engine: cached prepare on Docker
# --------------------------------------------------------------------------------------------


@dataclass
class EngineRun:
    seconds: float
    outcome: PrepareOutcome
    result_wall: float
    connected_wall: float
    docker_events: list[JsonDict] = field(default_factory=list)


def docker_prepare(engine: Engine, script: Path) -> PrepareOutcome:
    """A psql prepare of ``script`` on the Docker image, to its result and the job's DSN."""
    return prepare(engine, ["-f", str(script)], until_result=True, image=DOCKER_IMAGE)


def engine_once(engine: Engine, client: Any, label: str, script: Path) -> EngineRun:
    """POST → result event → GET the job → DSN accepts a connection; then (untimed) the
    instance is deleted and Docker's events of the engine's containers during the run are
    collected."""
    started = time.perf_counter()
    outcome = docker_prepare(engine, script)
    check_connection(outcome.dsn)
    elapsed = time.perf_counter() - started
    connected = time.time()
    delete_instance(engine, outcome.instance_id)
    run = EngineRun(elapsed, outcome, outcome.streamed_wall, connected)
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
# where the engine's time goes: job events + Docker events
# --------------------------------------------------------------------------------------------


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
    marks.append((run.result_wall, "result -> GET job -> DSN accepts a connection"))
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
    floor = DockerFloor(client, work, "docker")
    engine_runs: list[EngineRun] = []
    floor_runs: list[FloorRun] = []
    try:
        with engine_session(state_dir) as engine:
            built = time.perf_counter()
            first = docker_prepare(engine, script)
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
        remove_engine_leftovers(client, state_dir)
    return report(engine_runs, floor_runs)


def report(engine_runs: list[EngineRun], floor_runs: list[FloorRun]) -> list[Goal]:
    samples = {
        "engine: cached docker prepare (POST -> DSN connect)": [r.seconds for r in engine_runs],
        "floor: docker run + pg_ctl start + connect": [r.total for r in floor_runs],
        "  docker run alone (until running)": [r.docker_run for r in floor_runs],
    }
    floor = median([r.total for r in floor_runs])
    rows = [stats_row(label, values, floor) for label, values in samples.items()]
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


def bench(options: Options) -> None:
    client = docker_client()
    with docker_errors():
        work = temp_dir("docker")
        try:
            goals = measure(options, client, work)
            print_goals(goals)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            client.close()


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=10, quick_runs=3)))
