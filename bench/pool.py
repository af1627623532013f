"""Warm pool: instances and cached prepares handed out from started, unclaimed instances.

(1) Host runtime (``host:15``), a state built by one prepare of a small ``-c`` script:
    POST /v1/instances → a psycopg2 connection to the returned DSN is accepted, from the warm
    pool (before each sample ``GET /v1/pool`` is polled, untimed, until the state's pooled
    instance is ready again) and with the pool off (``instances.warmPool.maxTotal`` 0, the
    pool emptied first, untimed). Floor, same run, as bench/prepare.py measures it: overlay
    mount of the state's data dir from the engine's store + ``postgres`` start
    (``postmaster.pid`` line 8 == ready, polled every 2 ms) + one psycopg2 connect; the same
    with the engine's options (volatile, the engine's -c settings) is an extra row.
    Goals: pooled median <= 15 ms and <= 0.2x the floor.
(2) The fully cached prepare of the same script (its last step is cached, so the engine takes
    a pooled instance): POST /v1/prepare-jobs → result event → GET the job (the DSN with its
    password) → the DSN accepts. Goal <= 0.35x the floor; with the pool off as a comparison.
(3) (1) and (2) on Docker (``sqlrs-test/postgres:15``) against bench/docker_prepare.py's floor:
    ``docker run`` (``sleep infinity``, a fresh ``cp -a`` of the state's pgdata bind-mounted,
    copied untimed, its pg_hba.conf trusting TCP like the host floor's) + ``pg_ctl start``
    through exec as ``postgres`` + connect to the published port. Goals: the same ratios
    (0.2x, 0.35x). Skipped with a note without Docker or the image.
(4) Deep chains: an uncached prepare of 80 ``-c 'create table tN(x int)'`` steps and one of
    10 (``--quick``: 40 vs 10), POST → result → DSN accepts, per step = wall time / steps, each
    on a fresh engine whose base was built by an untimed warm-up prepare. Goal: per-step cost
    80 / 10 <= 1.2.

Each instance is deleted after its sample (untimed); the pool is waited for before every timed
sample, so its refill never runs during one. Load averages are printed (the machine may be
shared).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import (
    HOST_IMAGE,
    SMALL_SCRIPT,
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    cleanup_engine,
    delete_instance,
    engine_session,
    event_time,
    fmt_delta,
    fmt_mb,
    fmt_s,
    fmt_x,
    get_state,
    instance_once,
    median,
    parse_options,
    prepare,
    prepare_once,
    print_goals,
    print_table,
    ratio,
    run_main,
    spawn_engine,
    state_pgdata,
    stats_row,
    temp_dir,
)
from _docker import (
    DOCKER_IMAGE,
    DockerFloor,
    docker_client,
    docker_errors,
    remove_engine_leftovers,
)
from _pg import Scratch, check_connection, overlay_floor_once, scratch

MAX_TOTAL = "instances.warmPool.maxTotal"
FROM_POOL = "instance: from the warm pool"  # the job's log line when a pooled one is taken
POOL_POLL_S = 0.02  # GET /v1/pool reads /proc for the servers' memory: do not hammer it
POOL_DEADLINE_S = 120.0
CHAIN_STEPS = 80
QUICK_CHAIN_STEPS = 40
SHORT_CHAIN_STEPS = 10
CHAIN_RUNS = 3
QUICK_CHAIN_RUNS = 2
WARM_UP_ARGS = ("-c", "select 1")

# sample keys
POOL_INSTANCE = "instance, pool"
COLD_INSTANCE = "instance, pool off"
POOL_PREPARE = "prepare, pool"
COLD_PREPARE = "prepare, pool off"
FLOOR = "floor"
FLOOR_EXTRA = "floor extra"


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain-steps", type=int, default=None,
                        help=f"steps of the deep chain (default {CHAIN_STEPS}, "
                             f"{QUICK_CHAIN_STEPS} with --quick; the short one has "
                             f"{SHORT_CHAIN_STEPS})")
    parser.add_argument("--chain-runs", type=int, default=None,
                        help=f"prepares per chain length (default {CHAIN_RUNS}, "
                             f"{QUICK_CHAIN_RUNS} with --quick)")
    parser.add_argument("--no-docker", action="store_true", help="skip the Docker runtime")


def mean(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no samples")
    return sum(values) / len(values)


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min), "
            f"{os.cpu_count()} CPUs")


# --------------------------------------------------------------------------------------------
# the warm pool
# --------------------------------------------------------------------------------------------


def pool_status(engine: Engine) -> JsonDict:
    status: JsonDict = engine.call("GET", "/v1/pool")
    return status


def set_max_total(engine: Engine, value: int) -> None:
    engine.call("PATCH", "/v1/config", {"path": MAX_TOTAL, "value": value})


def wait_pool(engine: Engine, state_id: str | None) -> None:
    """Until the pool holds ``per_state`` ready instances of ``state_id`` and starts none of
    it, or (``state_id`` None) until it holds nothing at all."""
    deadline = time.monotonic() + POOL_DEADLINE_S
    while True:
        status = pool_status(engine)
        entries = status["entries"]
        if state_id is None:
            if not entries:
                return
        else:
            mine = [e for e in entries if e["state_id"] == state_id]
            wanted = max(1, int(status["per_state"]))
            if mine and mine[0]["ready"] >= wanted and not mine[0]["starting"]:
                return
        if time.monotonic() > deadline:
            what = "empty" if state_id is None else f"ready for {state_id[:12]}"
            raise BenchError(f"warm pool not {what} within {POOL_DEADLINE_S:.0f}s: {status}")
        time.sleep(POOL_POLL_S)


@contextlib.contextmanager
def pool_off(engine: Engine) -> Iterator[None]:
    """``maxTotal`` 0 and the pool emptied (untimed); the previous limit restored after."""
    previous = int(pool_status(engine)["max_total"])
    set_max_total(engine, 0)
    try:
        wait_pool(engine, None)
        yield
    finally:
        set_max_total(engine, previous)


# --------------------------------------------------------------------------------------------
# samples: instances and cached prepares
# --------------------------------------------------------------------------------------------


def pooled_prepare_once(engine: Engine, image: str) -> tuple[float, bool]:
    """A cached prepare of SMALL_SCRIPT: POST → DSN accepts; whether its instance came from
    the pool. The instance is deleted afterwards."""
    seconds, outcome = prepare_once(engine, ["-c", SMALL_SCRIPT], image)
    return seconds, any(e.get("message") == FROM_POOL for e in outcome.events)


@dataclass
class Rounds:
    """Samples of one runtime, keyed as above, plus how many cached prepares the pool served."""

    samples: dict[str, list[float]]
    pool_hits: int = 0

    @classmethod
    def new(cls) -> Rounds:
        keys = (POOL_INSTANCE, COLD_INSTANCE, POOL_PREPARE, COLD_PREPARE, FLOOR, FLOOR_EXTRA)
        return cls({key: [] for key in keys})


def engine_round(engine: Engine, image: str, state_id: str, rounds: Rounds) -> None:
    """One sample of each engine measurement; the pool is ready again when it returns."""
    with pool_off(engine):
        rounds.samples[COLD_INSTANCE].append(instance_once(engine, state_id))
        rounds.samples[COLD_PREPARE].append(pooled_prepare_once(engine, image)[0])
    wait_pool(engine, state_id)
    rounds.samples[POOL_INSTANCE].append(instance_once(engine, state_id))
    wait_pool(engine, state_id)
    seconds, from_pool = pooled_prepare_once(engine, image)
    rounds.samples[POOL_PREPARE].append(seconds)
    rounds.pool_hits += from_pool
    wait_pool(engine, state_id)  # no refill during the floor that follows


def build_state(engine: Engine, image: str, runs: int) -> str:
    """The first (building) prepare of SMALL_SCRIPT; its instance is deleted, the pool waited
    for."""
    started = time.perf_counter()
    first = prepare(engine, ["-c", SMALL_SCRIPT], until_result=True, image=image)
    built = time.perf_counter() - started
    delete_instance(engine, first.instance_id)
    size = int(get_state(engine, first.state_id).get("size_bytes") or 0)
    wait_pool(engine, first.state_id)
    pooled = [e for e in pool_status(engine)["entries"] if e["state_id"] == first.state_id]
    rss = float(pooled[0]["rss_bytes"]) if pooled else 0.0
    print(f"{image}: state {first.state_id[:12]} ({fmt_mb(size)}), building prepare "
          f"{fmt_s(built)}; pooled instance ready (rss {fmt_mb(rss)}); {runs} runs each, "
          "interleaved", flush=True)
    return first.state_id


def report_runtime(runtime: str, rounds: Rounds, floor_labels: tuple[str, str]) -> list[Goal]:
    samples = rounds.samples
    labels = {
        POOL_INSTANCE: "engine: POST /v1/instances, warm pool",
        COLD_INSTANCE: "engine: POST /v1/instances, pool off",
        POOL_PREPARE: "engine: cached prepare, warm pool",
        COLD_PREPARE: "engine: cached prepare, pool off",
        FLOOR: floor_labels[0],
        FLOOR_EXTRA: floor_labels[1],
    }
    floor = median(samples[FLOOR])
    rows = [stats_row(labels[k], v, floor) for k, v in samples.items()]
    print_table(f"{runtime}: hand-outs (POST -> DSN accepts a connection) vs floor",
                ["measurement", "runs", "median", "min", "max", "vs floor"], rows)
    instance, prepared = median(samples[POOL_INSTANCE]), median(samples[POOL_PREPARE])
    runs = len(samples[POOL_PREPARE])
    print(f"pool saves: instance {fmt_delta(median(samples[COLD_INSTANCE]) - instance)}, "
          f"cached prepare {fmt_delta(median(samples[COLD_PREPARE]) - prepared)}; "
          f"cached prepares served from the pool: {rounds.pool_hits} of {runs}")
    return [Goal(f"{runtime}: pooled instance / floor", ratio(instance, floor), 0.2, "x"),
            Goal(f"{runtime}: pooled cached prepare / floor", ratio(prepared, floor), 0.35,
                 "x"),
            Goal(f"{runtime}: cached prepares not from the pool", float(runs - rounds.pool_hits),
                 0, "n")]


# --------------------------------------------------------------------------------------------
# (1), (2) host runtime and its floor
# --------------------------------------------------------------------------------------------


def measure_host(options: Options, area: Scratch, work: Path) -> list[Goal]:
    runtimes = work / "floor-runtimes"  # upper/work on the store's filesystem, like the engine
    runtimes.mkdir()
    rounds = Rounds.new()
    print(f"\nhost runtime ({load_note()})", flush=True)
    with engine_session(work / "engine-host") as engine:
        state_id = build_state(engine, HOST_IMAGE, options.runs)
        lower = state_pgdata(engine, state_id)
        for _ in range(options.runs):
            engine_round(engine, HOST_IMAGE, state_id, rounds)
            rounds.samples[FLOOR].append(overlay_floor_once(area, lower, runtimes, False))
            rounds.samples[FLOOR_EXTRA].append(overlay_floor_once(area, lower, runtimes, True))
    goals = report_runtime("host", rounds, (
        "floor: overlay mount + start + connect",
        "floor, engine options (volatile, engine -c settings)"))
    return [Goal("host: pooled instance median", median(rounds.samples[POOL_INSTANCE]),
                 0.015, "s"), *goals]


# --------------------------------------------------------------------------------------------
# (3) Docker runtime and its floor
# --------------------------------------------------------------------------------------------


def measure_docker(options: Options, work: Path) -> list[Goal]:
    if options.extra.no_docker:
        print("\nDocker runtime: skipped (--no-docker)", flush=True)
        return []
    try:
        client = docker_client()
    except BenchError as exc:
        print(f"\nDocker runtime: SKIPPED, {exc}", flush=True)
        return []
    state_dir = work / "engine-docker"
    floor = DockerFloor(client, work, "pool")
    rounds = Rounds.new()
    print(f"\nDocker runtime ({load_note()})", flush=True)
    try:
        with docker_errors(), engine_session(state_dir) as engine:
            state_id = build_state(engine, DOCKER_IMAGE, options.runs)
            source = state_pgdata(engine, state_id)
            for _ in range(options.runs):
                engine_round(engine, DOCKER_IMAGE, state_id, rounds)
                run = floor.once(source)
                rounds.samples[FLOOR].append(run.total)
                rounds.samples[FLOOR_EXTRA].append(run.docker_run)
    finally:
        floor.cleanup()
        remove_engine_leftovers(client, state_dir)
        client.close()
    return report_runtime("docker", rounds, ("floor: docker run + pg_ctl start + connect",
                                             "  docker run alone (until running)"))


# --------------------------------------------------------------------------------------------
# (4) deep chains
# --------------------------------------------------------------------------------------------


def chain_args(steps: int) -> list[str]:
    return [arg for n in range(1, steps + 1) for arg in ("-c", f"create table t{n}(x int)")]


#: a step's phases, each starting at the first event matching it (other events fall within)
STEP_PHASES: list[tuple[str, Callable[[JsonDict], bool]]] = [
    ("start postgres (task start -> ready)", lambda e: e.get("type") == "task"),
    ("ready -> psql start", lambda e: "postgres ready" in str(e.get("message"))),
    ("psql", lambda e: e.get("message") == "psql: start"),
    ("stop postgres", lambda e: e.get("message") == "pg_ctl: stop for snapshot"),
    ("snapshot (publish layer)", lambda e: e.get("message") == "snapshot: start"),
    ("snapshot done -> task done", lambda e: e.get("message") == "snapshot: complete"),
]


def step_phases(events: Sequence[JsonDict]) -> list[dict[str, float]]:
    """Seconds per phase of each ``execute-N`` task (running → succeeded), in step order."""
    by_step: dict[int, list[JsonDict]] = {}
    current: int | None = None
    for event in events:
        task = str(event.get("task_id") or "")
        if event.get("type") == "task":
            running = task.startswith("execute-") and event.get("status") == "running"
            if running:
                current = int(task.removeprefix("execute-"))
                by_step[current] = [event]
            elif current is not None and task == f"execute-{current}":
                by_step[current].append(event)  # its end
                current = None
        elif current is not None:
            by_step[current].append(event)
    phases = []
    for index in sorted(by_step):
        marks: list[tuple[float, str]] = []
        step_events = by_step[index]
        pending = list(STEP_PHASES)
        for event in step_events[:-1]:
            for pos, (label, matches) in enumerate(pending):
                if matches(event):
                    marks.append((event_time(event), label))
                    del pending[:pos + 1]
                    break
        marks.append((event_time(step_events[-1]), ""))
        phases.append({label: following - at
                       for (at, label), (following, _) in itertools.pairwise(marks)})
    return phases


@dataclass(frozen=True)
class ChainRun:
    steps: int
    seconds: float
    phases: list[dict[str, float]]  #: per step

    @property
    def step_seconds(self) -> list[float]:
        return [sum(step.values()) for step in self.phases]

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps


def chain_once(work: Path, steps: int, index: int) -> ChainRun:
    """A fresh engine, its base built by an untimed warm-up prepare (pool settled); then an
    uncached prepare of ``steps`` steps: POST → result → DSN accepts."""
    state_dir = work / f"engine-chain-{steps}-{index}"
    engine = spawn_engine(state_dir)
    try:
        warm = prepare(engine, WARM_UP_ARGS, until_result=True)
        delete_instance(engine, warm.instance_id)
        wait_pool(engine, warm.state_id)
        started = time.perf_counter()
        outcome = prepare(engine, chain_args(steps), until_result=True)
        check_connection(outcome.dsn)
        elapsed = time.perf_counter() - started
        delete_instance(engine, outcome.instance_id)
        return ChainRun(steps, elapsed, step_phases(outcome.events))
    finally:
        cleanup_engine(engine)
        shutil.rmtree(state_dir, ignore_errors=True)


def measure_chains(options: Options, work: Path) -> list[Goal]:
    deep = options.extra.chain_steps or (QUICK_CHAIN_STEPS if options.quick else CHAIN_STEPS)
    runs = options.extra.chain_runs or (QUICK_CHAIN_RUNS if options.quick else CHAIN_RUNS)
    lengths = (deep, SHORT_CHAIN_STEPS)
    print(f"\ndeep chains: {deep} vs {SHORT_CHAIN_STEPS} steps, {runs} runs each, interleaved, "
          f"a fresh engine each ({load_note()})", flush=True)
    results: dict[int, list[ChainRun]] = {steps: [] for steps in lengths}
    for index in range(runs):
        for steps in lengths:
            results[steps].append(chain_once(work, steps, index))
    rows = []
    for steps in lengths:
        chain = results[steps]
        firsts = [s for run in chain for s in run.step_seconds[:SHORT_CHAIN_STEPS]]
        lasts = [s for run in chain for s in run.step_seconds[-SHORT_CHAIN_STEPS:]]
        outside = [run.seconds - sum(run.step_seconds) for run in chain]
        rows.append([f"{steps}-step prepare", str(len(chain)),
                     fmt_s(median([r.seconds for r in chain])),
                     fmt_s(median([r.per_step for r in chain])),
                     fmt_s(mean(firsts)), fmt_s(mean(lasts)), fmt_s(max(firsts + lasts)),
                     fmt_s(median(outside))])
    print_table("(4) Uncached prepare of N steps (POST -> DSN accepts); per step = wall / N",
                ["measurement", "runs", "wall median", "per step", "step mean, first 10",
                 "last 10", "slowest step", "outside steps"], rows)
    per_step = {steps: median([r.per_step for r in results[steps]]) for steps in lengths}
    value = ratio(per_step[deep], per_step[SHORT_CHAIN_STEPS])
    print(f"per step, {deep} / {SHORT_CHAIN_STEPS}: {fmt_x(value)} "
          "(step columns: execute tasks, from the job's event timestamps)")
    print_chain_phases(results[deep], results[SHORT_CHAIN_STEPS])
    return [Goal(f"per-step cost, {deep} / {SHORT_CHAIN_STEPS} steps", value, 1.2, "x")]


def print_chain_phases(deep: list[ChainRun], short: list[ChainRun]) -> None:
    """Mean seconds per phase of a step (means add up to wall / steps, and a few slow steps
    show): the deep chain's first and last ten, the short chain's."""
    groups = {
        f"{deep[0].steps} steps: first {SHORT_CHAIN_STEPS}":
            [p for run in deep for p in run.phases[:SHORT_CHAIN_STEPS]],
        f"{deep[0].steps} steps: last {SHORT_CHAIN_STEPS}":
            [p for run in deep for p in run.phases[-SHORT_CHAIN_STEPS:]],
        f"{short[0].steps} steps: all": [p for run in short for p in run.phases],
    }
    labels = [label for label, _ in STEP_PHASES]
    rows = [[label, *(fmt_s(mean([p.get(label, 0.0) for p in steps]))
                      for steps in groups.values())] for label in labels]
    rows.append(["step (execute task)", *(fmt_s(mean([sum(p.values()) for p in steps]))
                                          for steps in groups.values())])
    print_table("Where a step's time goes (job event timestamps, mean per step)",
                ["phase", *groups], rows)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def bench(options: Options) -> None:
    work = temp_dir("pool")
    try:
        with scratch() as area:
            goals = measure_host(options, area, work)
        goals += measure_docker(options, work)
        goals += measure_chains(options, work)
        print(f"\nat the end: {load_note()}")
        print_goals(goals)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=20, quick_runs=5,
                                           add=add_flags)))
