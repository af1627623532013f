"""Load: concurrent readers, prepares and a client sending garbage on one engine (§2).

Sixteen threads read the lists for ``READ_SECONDS`` on keep-alive connections, four distinct
prepares run meanwhile and one thread sends the fuzz test's badly framed requests. Every read
must be a 200 and every prepare must succeed; throughput and latencies are printed.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from conftest import EngineProcess
from test_fuzz import Target, answer_problems, framing_case, send

READERS = 16
READ_SECONDS = 10.0
PREPARES = 4
PREPARE_DEADLINE = 180.0
READ_PATHS = ["/v1/instances", "/v1/states", "/v1/prepare-jobs", "/v1/health",
              "/v1/cache/status"]
MAX_REPORTED = 20


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    per_path: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    garbage: int = 0
    garbage_problems: list[str] = field(default_factory=list)

    def ok(self, path: str, elapsed: float) -> None:
        with self.lock:
            self.latencies.append(elapsed)
            self.per_path[path] = self.per_path.get(path, 0) + 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


class Reader:
    """One client thread with a keep-alive connection, retrying once on a fresh connection
    when the server closed a reused one (as Go's client does for idempotent requests)."""

    def __init__(self, engine: EngineProcess, seed: int, tally: Tally) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.tally = tally
        self.conn: http.client.HTTPConnection | None = None
        self.reused = False

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.engine.host, self.engine.port,
                                                   timeout=30)
            self.reused = False
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self._connection()
            reused = self.reused
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {self.engine.token}"})
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop()
                if reused and attempt == 1:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self._drop()
                raise
            self.reused = True
            if resp.will_close:
                self._drop()
            return resp.status, body
        raise AssertionError("unreachable")

    def run(self, stop_at: float) -> None:
        try:
            while time.monotonic() < stop_at:
                path = self.rng.choice(READ_PATHS)
                started = time.monotonic()
                try:
                    status, body = self.get(path)
                except (OSError, http.client.HTTPException) as exc:
                    self.tally.fail(f"GET {path}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.monotonic() - started
                if status != 200:
                    self.tally.fail(f"GET {path}: {status} {body[:200]!r}")
                    continue
                try:
                    json.loads(body)
                except ValueError:
                    self.tally.fail(f"GET {path}: 200 with a body that is not JSON: "
                                    f"{body[:200]!r}")
                    continue
                self.tally.ok(path, elapsed)
        finally:
            self._drop()


def send_garbage(engine: EngineProcess, stop_at: float, tally: Tally) -> None:
    rng = random.Random(7)
    target = Target.of(engine)
    while time.monotonic() < stop_at:
        case = framing_case(rng, target)
        answer = send(case, target.host, target.port)
        problems = answer_problems(case, answer, target)
        with tally.lock:
            tally.garbage += 1
            if problems:
                tally.garbage_problems.append(f"{case.label}: {'; '.join(problems)}")


def prepare(engine: EngineProcess, index: int) -> dict[str, Any]:
    return engine.prepare(["-c", f"create table load_{index}(id int primary key)",
                           "-c", f"insert into load_{index} select generate_series(1, {index})"])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def test_readers_prepares_and_garbage_at_once(engine: EngineProcess) -> None:
    tally = Tally()
    started = time.monotonic()
    stop_at = started + READ_SECONDS
    readers = [threading.Thread(target=Reader(engine, seed, tally).run, args=(stop_at,),
                                name=f"reader-{seed}", daemon=True) for seed in range(READERS)]
    garbage = threading.Thread(target=send_garbage, args=(engine, stop_at, tally),
                               name="garbage", daemon=True)
    with ThreadPoolExecutor(max_workers=PREPARES, thread_name_prefix="prepare") as pool:
        jobs = [pool.submit(prepare, engine, index) for index in range(1, PREPARES + 1)]
        for thread in [*readers, garbage]:
            thread.start()
        for thread in [*readers, garbage]:
            thread.join(READ_SECONDS + 60)
            assert not thread.is_alive(), f"{thread.name} still running"
        read_elapsed = time.monotonic() - started
        results = [job.result(timeout=PREPARE_DEADLINE) for job in jobs]
    total = len(tally.latencies)
    print(f"\nload: {total} reads in {read_elapsed:.1f}s = {total / read_elapsed:.0f} req/s "
          f"with {READERS} readers; latency p50={statistics.median(tally.latencies or [0]):.4f}s"
          f" p99={percentile(tally.latencies, 0.99):.4f}s "
          f"max={max(tally.latencies or [0]):.4f}s; per path {tally.per_path}")
    print(f"load: {tally.garbage} garbage requests, {len(tally.garbage_problems)} answered "
          f"outside the rules; {PREPARES} prepares done after "
          f"{time.monotonic() - started:.1f}s")
    for problem in tally.garbage_problems[:5]:
        print(f"  garbage: {problem[:300]}")
    assert not tally.failures, (f"{len(tally.failures)} good requests failed:\n"
                                + "\n".join(tally.failures[:MAX_REPORTED]))
    assert total > 0
    failed = [job for job in results if job["status"] != "succeeded"]
    assert not failed, failed
    assert len({job["result"]["state_id"] for job in results}) == PREPARES
    assert engine.get("/v1/health", auth=False).status == 200
