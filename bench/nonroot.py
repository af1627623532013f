"""Root vs an ordinary user: the same work on engines started as root and as ``sqlrs-dev``.

Run as root after ``scripts/setup-nonroot.sh`` (the account ``sqlrs-dev``, in the ``docker``
group, and the venv ``/opt/sqlrs-dev-venv`` it can run). For each runtime (``host:15`` and the
Docker image ``sqlrs-test/postgres:15``) and each user, one engine is started with the CLI's
argv (§1.5): root's as ``sys.executable -m sqlrs_engine``, the user's as the venv's python with
the user's uid, gid and the docker group and a minimal environment. Every engine has a
workspace of its own (``mkdtemp``, owned by the engine's user, mode 0700) holding its state
dir and its SQL scripts. The warm pool is off (``instances.warmPool.maxTotal`` 0) until (4).
Before anything is timed, a throwaway prepare of ``select 1`` on the same image builds the
base cluster.

(1) 6-step prepare: one psql prepare with six ``-f`` files (six steps, six states): step 1
    creates a ~110 MB table (``pg_total_relation_size`` is printed), steps 2-6 are small.
    Timed from POST /v1/prepare-jobs to the end of its events stream (the job succeeded).
    Repeated ``--prepare-runs`` times, each with a new comment on the table in step 1 so no
    step is cached; the engines take turns (root first, then the user first, ...).
(2) Instance from the cached final state, warm pool off: POST /v1/instances -> psycopg2
    connects to the DSN -> ``select 1``; the instance is deleted (untimed). ``--runs`` times,
    engines interleaved.
(3) Store on disk after the first prepare: ``du -s -x --block-size=1`` of the state store,
    with the prepare's instance deleted (the goal) and while it still ran.
(4) Host only: the warm pool back on (its default size); before each sample GET /v1/pool is
    polled (untimed) until the state's pooled instance is ready; POST /v1/instances is timed
    to its answer (the goal), and on to a ``select 1`` through the DSN (shown too).

Goals (PASS/MISS): sqlrs-dev / root on host: 6-step prepare <= 1.3x, instance <= 1.3x,
store <= 1.2x; pooled hand-out as sqlrs-dev <= 15 ms; Docker / host for each user: 6-step
prepare <= 2x, store <= 1.2x. ``snapshot_backend`` of GET /v1/cache/status is printed per
engine. Instances, engines (SIGTERM), labelled containers and workspaces are cleaned up even
on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HOST_IMAGE,
    ROOT,
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    cleanup_engine,
    create_instance,
    delete_instance,
    fmt_mb,
    fmt_s,
    fmt_x,
    median,
    parse_options,
    prepare,
    print_goals,
    print_table,
    ratio,
    run_main,
    wait_healthy,
)
from _docker import DOCKER_IMAGE, ENGINE_LABEL, engine_label
from _pg import connect

DEV_USER = "sqlrs-dev"
DEV_PYTHON = "/opt/sqlrs-dev-venv/bin/python"
DOCKER_GROUP = "docker"
RUNTIMES = {"host": HOST_IMAGE, "docker": DOCKER_IMAGE}
MAX_TOTAL = "instances.warmPool.maxTotal"
STARTUP_DEADLINE_S = 60.0  # a start may sweep containers; polling returns once it is healthy
POOL_POLL_S = 0.02  # GET /v1/pool reads /proc for the servers' memory: do not hammer it
POOL_DEADLINE_S = 120.0
LOG_TAIL_LINES = 40
DEFAULT_PREPARE_RUNS = 3

BIG_ROWS = 450_000  # x (200-byte pad + id + tuple overhead) = ~110 MB
WARM_UP_SQL = "select 1;\n"
STEP_SQL = (
    "create table big as select g as id, repeat('x', 200) as pad "
    f"from generate_series(1, {BIG_ROWS}) g;\ncomment on table big is 'round {{round}}';\n",
    "create table s2(id int primary key, label text not null);\n"
    "insert into s2 select g, 'row ' || g from generate_series(1, 100) g;\n",
    "insert into s2 select g, 'more ' || g from generate_series(101, 200) g;\n",
    "create table s4 as select g as n from generate_series(1, 100) g;\n",
    "create index s4_n on s4(n);\n",
    "create view v6 as select count(*) as rows from s2;\n",
)
#: goals: (limit of sqlrs-dev / root on host), (limit of Docker / host for one user)
DEV_VS_ROOT = {"prepare": 1.3, "instance": 1.3, "store": 1.2}
DOCKER_VS_HOST = {"prepare": 2.0, "store": 1.2}
POOLED_LIMIT_S = 0.015


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=sorted(RUNTIMES), default=None,
                        help="measure one runtime only (default: both)")
    parser.add_argument("--prepare-runs", type=int, default=DEFAULT_PREPARE_RUNS,
                        help=f"6-step prepares per engine (default {DEFAULT_PREPARE_RUNS})")


# --------------------------------------------------------------------------------------------
# the two users
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Who an engine runs as, and how it is started."""

    name: str
    uid: int
    gid: int
    python: str
    popen: dict[str, Any]

    @classmethod
    def root(cls) -> Account:
        return cls("root", 0, 0, sys.executable, {})

    @classmethod
    def developer(cls) -> Account:
        try:
            entry = pwd.getpwnam(DEV_USER)
        except KeyError:
            raise BenchError(f"no user {DEV_USER}: run scripts/setup-nonroot.sh") from None
        if not os.access(DEV_PYTHON, os.X_OK):
            raise BenchError(f"{DEV_PYTHON} is missing: run scripts/setup-nonroot.sh")
        extra = []
        with contextlib.suppress(KeyError):
            extra.append(grp.getgrnam(DOCKER_GROUP).gr_gid)
        env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "USER": DEV_USER}
        return cls(DEV_USER, entry.pw_uid, entry.pw_gid, DEV_PYTHON,
                   {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": extra,
                    "env": env})

    def own(self, path: Path, mode: int) -> None:
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)


# --------------------------------------------------------------------------------------------
# one engine: a user and a runtime
# --------------------------------------------------------------------------------------------


@dataclass
class Subject:
    account: Account
    runtime: str
    workspace: Path
    engine: Engine | None = None
    failure: str | None = None
    backend: str = "?"
    state_id: str = ""
    table_bytes: int = 0
    store_bytes: int = 0
    store_with_instance_bytes: int = 0
    prepare_s: list[float] = field(default_factory=list)
    instance_s: list[float] = field(default_factory=list)
    pooled_post_s: list[float] = field(default_factory=list)
    pooled_query_s: list[float] = field(default_factory=list)
    pool_max_total: int = 0

    @property
    def label(self) -> str:
        return f"{self.runtime}/{self.account.name}"

    @property
    def image(self) -> str:
        return RUNTIMES[self.runtime]

    @property
    def state_dir(self) -> Path:
        return self.workspace / "state"

    @property
    def ok(self) -> bool:
        return self.failure is None

    def running(self) -> Engine:
        if self.engine is None:
            raise BenchError(f"{self.label}: no engine")
        return self.engine

    def script(self, name: str, text: str) -> Path:
        """A SQL file in the workspace that the engine's user owns and can read."""
        path = self.workspace / "sql" / name
        path.write_text(text)
        self.account.own(path, 0o600)
        return path

    def fail(self, what: str, exc: BaseException) -> None:
        self.failure = f"{what}: {exc}"
        print(f"\n{self.label}: {self.failure}", file=sys.stderr)
        print(f"--- {self.label}: tail of {self.state_dir / 'logs' / 'engine.log'} ---\n"
              f"{log_tail(self)}", file=sys.stderr, flush=True)


def log_tail(subject: Subject) -> str:
    parts = []
    for path in (subject.state_dir / "logs" / "engine.log",
                 subject.state_dir / "bench-spawn.log"):
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            if lines:
                parts.append(f"[{path.name}]\n" + "\n".join(lines))
    return "\n".join(parts) or "(no log)"


def new_subject(account: Account, runtime: str) -> Subject:
    """A workspace (owned by the account, 0700) with its state dir, script dir and spawn log."""
    # a short name: a server's Unix socket lives in its data dir below the workspace, and
    # a socket path has at most 107 bytes
    workspace = Path(tempfile.mkdtemp(prefix="sqlrs-nr-"))
    account.own(workspace, 0o700)
    subject = Subject(account, runtime, workspace)
    for directory in (subject.state_dir, workspace / "sql"):
        directory.mkdir()
        account.own(directory, 0o700)
    spawn_log = subject.state_dir / "bench-spawn.log"  # where _common.wait_healthy looks
    spawn_log.touch()
    account.own(spawn_log, 0o600)
    return subject


def start_engine(subject: Subject) -> None:
    """The CLI's argv (§1.5) as the subject's user, cwd = the repository; then wait until
    healthy, turn the warm pool off and build the base cluster with a throwaway prepare."""
    state = subject.state_dir
    argv = [subject.account.python, "-m", "sqlrs_engine", "--run-dir", str(state / "run"),
            "--listen", "127.0.0.1:0", "--write-engine-json", str(state / "engine.json"),
            "--idle-timeout", "0"]
    with open(state / "bench-spawn.log", "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                **subject.account.popen)
    subject.engine = Engine(proc, state)
    wait_healthy(subject.engine, interval=0.01, deadline_s=STARTUP_DEADLINE_S)
    engine = subject.engine
    status = engine.call("GET", "/v1/cache/status")
    reason = status.get("snapshot_reason")
    subject.backend = str(status.get("snapshot_backend")) + (f" ({reason})" if reason else "")
    subject.pool_max_total = int(engine.call("GET", "/v1/pool")["max_total"])
    set_max_total(engine, 0)
    warm_up = subject.script("warm-up.sql", WARM_UP_SQL)
    started = time.perf_counter()
    outcome = prepare(engine, ["-f", str(warm_up)], image=subject.image)
    delete_instance(engine, outcome.instance_id)
    warm = time.perf_counter() - started
    print(f"{subject.label}: engine pid {proc.pid} ({subject.account.name}), snapshots "
          f"{subject.backend}; base cluster + warm-up prepare {fmt_s(warm)}", flush=True)


def stop_subject(subject: Subject) -> None:
    """Delete instances, SIGTERM the engine, remove what it left (processes, mounts,
    labelled containers) and the workspace."""
    if subject.engine is not None:
        with contextlib.suppress(Exception):
            cleanup_engine(subject.engine)
    label = f"{ENGINE_LABEL}={engine_label(subject.state_dir)}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"],
                               capture_output=True, text=True, check=False, timeout=60)
        if found.stdout.split():
            print(f"{subject.label}: removing {len(found.stdout.split())} leftover "
                  "container(s)", file=sys.stderr)
            subprocess.run(["docker", "rm", "-f", *found.stdout.split()], capture_output=True,
                           check=False, timeout=120)
    shutil.rmtree(subject.workspace, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# engine calls
# --------------------------------------------------------------------------------------------


def set_max_total(engine: Engine, value: int) -> None:
    engine.call("PATCH", "/v1/config", {"path": MAX_TOTAL, "value": value})


def wait_pool_ready(engine: Engine, state_id: str) -> None:
    """Until the pool holds ``per_state`` ready instances of ``state_id`` and starts none."""
    deadline = time.monotonic() + POOL_DEADLINE_S
    while True:
        status: JsonDict = engine.call("GET", "/v1/pool")
        mine = [e for e in status["entries"] if e["state_id"] == state_id]
        if mine and mine[0]["ready"] >= max(1, int(status["per_state"])) and \
                not mine[0]["starting"]:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"warm pool not ready for {state_id[:12]} within "
                             f"{POOL_DEADLINE_S:.0f}s: {status}")
        time.sleep(POOL_POLL_S)


def select_one(dsn: str) -> None:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            if cur.fetchone() != (1,):
                raise BenchError("select 1 did not answer 1")
    finally:
        conn.close()


def table_bytes(dsn: str) -> int:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_total_relation_size('big')")
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def du_bytes(path: Path) -> int:
    """``du -s -x --block-size=1`` (as root; -x: never into a mount below the store)."""
    out = subprocess.run(["du", "-s", "-x", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0 and not out.stdout:
        raise BenchError(f"du {path}: {out.stderr.strip()}")
    return int(out.stdout.split()[0])


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def six_step_prepare(subject: Subject, run: int) -> None:
    """(1) the 6-step prepare, timed POST -> succeeded; after the first one (3) the store."""
    engine = subject.running()
    args: list[str] = []
    for step, text in enumerate(STEP_SQL, start=1):
        path = subject.script(f"r{run}-step{step}.sql", text.replace("{round}", str(run)))
        args += ["-f", str(path)]
    started = time.perf_counter()
    outcome = prepare(engine, args, image=subject.image)
    subject.prepare_s.append(time.perf_counter() - started)
    steps = sum(1 for e in outcome.events if str(e.get("task_id", "")).startswith("execute-")
                and e.get("status") == "succeeded")
    print(f"  {subject.label}: 6-step prepare {fmt_s(subject.prepare_s[-1])} "
          f"({steps} execute tasks)", flush=True)
    if run == 0:
        subject.state_id = outcome.state_id
        subject.table_bytes = table_bytes(outcome.dsn)
        subject.store_with_instance_bytes = du_bytes(engine.store)
    delete_instance(engine, outcome.instance_id)
    if run == 0:
        subject.store_bytes = du_bytes(engine.store)


def instance_sample(subject: Subject) -> None:
    """(2) POST /v1/instances -> connect -> select 1 (pool off); delete untimed."""
    engine = subject.running()
    started = time.perf_counter()
    entry = create_instance(engine, subject.state_id)
    select_one(str(entry["dsn"]))
    subject.instance_s.append(time.perf_counter() - started)
    delete_instance(engine, str(entry["instance_id"]))


def pooled_samples(subject: Subject, runs: int) -> None:
    """(4) the pool back on; one untimed hand-out makes the state the pool's; then ``runs``
    timed POSTs, each when the pool is ready again."""
    engine = subject.running()
    set_max_total(engine, subject.pool_max_total or 4)
    delete_instance(engine, str(create_instance(engine, subject.state_id)["instance_id"]))
    for _ in range(runs):
        wait_pool_ready(engine, subject.state_id)
        started = time.perf_counter()
        entry = create_instance(engine, subject.state_id)
        posted = time.perf_counter()
        select_one(str(entry["dsn"]))
        subject.pooled_post_s.append(posted - started)
        subject.pooled_query_s.append(time.perf_counter() - started)
        delete_instance(engine, str(entry["instance_id"]))


def each(subjects: Sequence[Subject], what: str, action: Callable[[Subject], None]) -> None:
    """``action(subject)`` for every subject still fine; a failure marks only that one."""
    for subject in subjects:
        if subject.ok:
            try:
                action(subject)
            except (BenchError, OSError, subprocess.SubprocessError, KeyError,
                    ValueError) as exc:
                subject.fail(what, exc)


def measure(options: Options, subjects: list[Subject]) -> None:
    prepare_runs = max(1, int(options.extra.prepare_runs))
    print(f"\nstarting {len(subjects)} engines (warm pool off, base cluster built untimed)",
          flush=True)
    each(subjects, "engine start / warm-up prepare", start_engine)
    print(f"\n(1) 6-step prepare: {prepare_runs} run(s) per engine, engines take turns",
          flush=True)
    for run in range(prepare_runs):
        order = subjects if run % 2 == 0 else sorted(
            subjects, key=lambda s: (s.runtime, s.account.name != DEV_USER))
        each(order, "6-step prepare", functools.partial(six_step_prepare, run=run))
    print(f"\n(2) instance from the cached state, pool off: {options.runs} runs, interleaved",
          flush=True)
    for _ in range(options.runs):
        each(subjects, "instance (pool off)", instance_sample)
    host = [s for s in subjects if s.runtime == "host"]
    if host:
        print(f"\n(4) pooled hand-out on host: {options.runs} runs per engine", flush=True)
        each(host, "pooled hand-out", lambda s: pooled_samples(s, options.runs))


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt_s(values[0])
    return f"{fmt_s(median(values))} ({fmt_s(min(values))}-{fmt_s(max(values))})"


#: the samples a comparison reads from a subject
SAMPLES: dict[str, Callable[[Subject], list[float]]] = {
    "prepare": lambda s: s.prepare_s,
    "instance": lambda s: s.instance_s,
    "store": lambda s: [float(s.store_bytes)] if s.store_bytes else [],
}


def report(subjects: list[Subject]) -> list[Goal]:
    rows = []
    for s in subjects:
        rows.append([s.runtime, s.account.name, s.backend if s.engine else "-",
                     spread(s.prepare_s), spread(s.instance_s),
                     fmt_mb(s.store_bytes) if s.store_bytes else "-",
                     fmt_mb(s.store_with_instance_bytes) if s.store_with_instance_bytes else "-",
                     fmt_mb(s.table_bytes) if s.table_bytes else "-",
                     spread(s.pooled_post_s), spread(s.pooled_query_s),
                     "FAILED" if s.failure else "ok"])
    print_table("Root vs sqlrs-dev (medians, min-max in brackets)",
                ["runtime", "user", "snapshot_backend", "6-step prepare", "instance (pool off)",
                 "store", "store + instance", "table big", "pooled POST", "pooled + select 1",
                 "status"], rows)
    by_key = {(s.runtime, s.account.name): s for s in subjects}
    goals: list[Goal] = []
    comparisons: list[list[str]] = []

    def compare(name: str, value: Subject | None, base: Subject | None, what: str,
                limit: float | None) -> None:
        samples = SAMPLES[what]
        if value is None or base is None:
            return
        if not samples(value) or not samples(base):
            comparisons.append([name, "n/a (failed)"])
            if limit is not None:
                goals.append(Goal(f"{name} (no data)", float("inf"), limit, "x"))
            return
        x = ratio(median(samples(value)), median(samples(base)))
        comparisons.append([name, fmt_x(x)])
        if limit is not None:
            goals.append(Goal(name, x, limit, "x"))

    root_host, dev_host = by_key.get(("host", "root")), by_key.get(("host", DEV_USER))
    for what, limit in DEV_VS_ROOT.items():
        compare(f"host: {what}, {DEV_USER} / root", dev_host, root_host, what, limit)
    for account in ("root", DEV_USER):
        for what, limit in DOCKER_VS_HOST.items():
            compare(f"{account}: {what}, docker / host", by_key.get(("docker", account)),
                    by_key.get(("host", account)), what, limit)
        compare(f"{account}: instance, docker / host", by_key.get(("docker", account)),
                by_key.get(("host", account)), "instance", None)
    for what in ("prepare", "instance", "store"):
        compare(f"docker: {what}, {DEV_USER} / root", by_key.get(("docker", DEV_USER)),
                by_key.get(("docker", "root")), what, None)
    if comparisons:
        print_table("Ratios (of medians)", ["comparison", "ratio"], comparisons)
    if dev_host is not None:
        goals.append(Goal(f"host: pooled hand-out (POST /v1/instances) as {DEV_USER}",
                          median(dev_host.pooled_post_s) if dev_host.pooled_post_s
                          else float("inf"), POOLED_LIMIT_S, "s"))
    return goals


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def docker_usable() -> str | None:
    """None when Docker answers and has the image, else why not."""
    try:
        out = subprocess.run(["docker", "image", "inspect", DOCKER_IMAGE], capture_output=True,
                             text=True, check=False, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if out.returncode == 0 else (out.stderr.strip() or "docker image inspect failed")


@contextlib.contextmanager
def subjects_for(runtimes: Sequence[str]) -> Iterator[list[Subject]]:
    accounts = [Account.root(), Account.developer()]
    subjects: list[Subject] = []
    try:
        for runtime in runtimes:
            for account in accounts:
                subjects.append(new_subject(account, runtime))
        yield subjects
    finally:
        for subject in subjects:
            stop_subject(subject)


def bench(options: Options) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (it starts engines as root and as sqlrs-dev)")
    runtimes = [options.extra.only] if options.extra.only else list(RUNTIMES)
    if "docker" in runtimes and (why := docker_usable()):
        print(f"Docker runtime SKIPPED: {why}", flush=True)
        runtimes.remove("docker")
    one, five, _ = os.getloadavg()
    print(f"runtimes {', '.join(runtimes)}; users root, {DEV_USER} ({DEV_PYTHON}); "
          f"load {one:.2f} / {five:.2f}", flush=True)
    with subjects_for(runtimes) as subjects:
        measure(options, subjects)
        goals = report(subjects)
        print_goals(goals)
        failed = [s for s in subjects if s.failure]
        for subject in failed:
            print(f"FAILED {subject.label}: {subject.failure}", file=sys.stderr)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}", flush=True)
        if failed:
            raise BenchError(f"{len(failed)} engine(s) failed: "
                             + ", ".join(s.label for s in failed))


if __name__ == "__main__":
    sys.exit(run_main(bench, parse_options(__doc__ or "", default_runs=7, quick_runs=3,
                                           add=add_flags)))
