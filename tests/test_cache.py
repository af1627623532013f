"""Cache status, explain, bounded capacity and eviction (issue 6), over HTTP on real Postgres."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EngineProcess,
    OpenApiChecker,
    cleanup_store,
    leftover_servers,
    to_epoch,
    without_warm_pool,
)


def patch_config(engine: EngineProcess, **values: Any) -> None:
    for key, value in values.items():
        result = engine.request("PATCH", "/v1/config",
                                {"path": f"cache.capacity.{key}", "value": value})
        assert result.status == 200, result.body


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[0])


def state_ids(engine: EngineProcess) -> set[str]:
    return {s["state_id"] for s in engine.get("/v1/states").json()}


def script(tmp_path: Path, name: str, sql: str) -> str:
    path = tmp_path / name
    path.write_text(sql)
    return str(path)


def drop_instance(engine: EngineProcess, job: dict[str, Any]) -> None:
    result = engine.delete(f"/v1/instances/{job['result']['instance_id']}?force=true")
    assert result.status == 200


def cap_cache(engine: EngineProcess, max_bytes: int) -> None:
    """Bound the cache to ``max_bytes``: evict above 90 % of it, down to 80 %."""
    patch_config(engine, maxBytes=max_bytes, highWatermark=0.9, lowWatermark=0.8)


def backdate_state(engine: EngineProcess, state_id: str, age: timedelta) -> str:
    """Make a state ``age`` old in state.db (no engine may run on the store): created and last
    used then. Returns the new ``created_at``, in the engine's own format."""
    then = datetime.now(UTC) - age
    stamp = f"{then:%Y-%m-%dT%H:%M:%S}.{then.microsecond:06d}000Z"
    with contextlib.closing(sqlite3.connect(engine.store / "state.db")) as db, db:
        changed = db.execute("UPDATE states SET created_at = ?, last_used_at = ? "
                             "WHERE state_id = ?", (stamp, stamp, state_id)).rowcount
    assert changed == 1, state_id
    return stamp


# --- status and explain -------------------------------------------------------------------


def test_status_matches_the_store(engine: EngineProcess, scripts: Path,
                                  openapi: OpenApiChecker) -> None:
    without_warm_pool(engine)
    empty = engine.get("/v1/cache/status")
    assert empty.status == 200
    openapi.check("/v1/cache/status", "GET", empty)
    assert empty.json()["state_count"] == 0
    assert empty.json()["usage_bytes"] == 0
    assert "configured_max_bytes" not in empty.json()
    assert empty.json()["min_state_age"] == "10m0s"
    engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    status = engine.get("/v1/cache/status").json()
    states = engine.get("/v1/states").json()
    assert status["state_count"] == len(states) == 2
    on_disk = sum(du_bytes(Path(p)) for p in
                  engine.store.glob("engines/*/*/states/[0-9a-f]*"))
    assert status["usage_bytes"] == sum(s["size_bytes"] for s in states) == on_disk
    fs = os.statvfs(engine.store)
    assert status["store_total_bytes"] == fs.f_blocks * fs.f_frsize
    assert abs(status["store_free_bytes"] - fs.f_bavail * fs.f_frsize) < 64 << 20
    assert status["reserve_bytes"] == max(status["store_total_bytes"] // 10, 10 << 30)
    assert status["reclaimable_bytes"] == 0
    assert status["blocked_count"] == 2
    assert status["pressure_reasons"] == []
    patch_config(engine, maxBytes=123456789, minStateAge="90s")
    status = engine.get("/v1/cache/status").json()
    assert status["configured_max_bytes"] == 123456789
    assert status["effective_max_bytes"] == 123456789
    assert status["min_state_age"] == "1m30s"


def test_explain_hit_and_miss(engine: EngineProcess, tmp_path: Path,
                              openapi: OpenApiChecker) -> None:
    first = script(tmp_path, "a.sql", "create table a(x int);\n")
    second = script(tmp_path, "b.sql", "create table b(x int);\n")
    body = {"prepare_kind": "psql", "image_id": engine.image,
            "psql_args": ["-f", first, "-f", second]}
    miss = engine.post("/v1/cache/explain/prepare", body)
    assert miss.status == 200, miss.body
    openapi.check("/v1/cache/explain/prepare", "POST", miss)
    assert miss.json()["decision"] == "miss"
    assert miss.json()["reason_code"] == "no_matching_state"
    assert miss.json()["first_missing_step"] == 0
    assert engine.get("/v1/prepare-jobs").json() == []
    job = engine.prepare(["-f", first, "-f", second])
    hit = engine.post("/v1/cache/explain/prepare", body).json()
    assert hit["decision"] == "hit"
    assert hit["reason_code"] == "exact_state_match"
    assert hit["matched_state_id"] == job["result"]["state_id"]
    assert hit["signature"] == engine.get("/v1/prepare-jobs").json()[0]["signature"]
    Path(second).write_text("create table b(x int, y int);\n")
    changed = engine.post("/v1/cache/explain/prepare", body).json()
    assert changed["decision"] == "miss"
    assert changed["first_missing_step"] == 1
    assert "step 1" in changed["reason"]
    assert [s["cached"] for s in changed["steps"]] == [True, False]
    assert len(engine.get("/v1/instances").json()) == 1
    bad = engine.post("/v1/cache/explain/prepare", {"prepare_kind": "psql"})
    assert bad.status == 400


# --- eviction -----------------------------------------------------------------------------


def test_eviction_takes_exactly_the_eligible_states(engine_factory: Any,
                                                    tmp_path: Path) -> None:
    """Only ``lone`` may go: ``young`` has no instance and no child either, but is younger than
    minStateAge; the chain's parent has a child; the others have instances. Ages come from
    state.db, not from the clock during the test: minStateAge is an hour and ``lone`` is made
    two hours old while the engine is down, so a slow machine cannot age ``young`` past it."""
    first: EngineProcess = engine_factory()
    patch_config(first, reserveBytes=0, minStateAge="1h")
    lone = first.prepare(["-f", script(tmp_path, "lone.sql", "create table lone(x int);\n")])
    drop_instance(first, lone)
    chain = first.prepare(["-f", script(tmp_path, "p.sql", "create table p(x int);\n"),
                           "-f", script(tmp_path, "c.sql", "create table c(x int);\n")])
    parent_id = chain["tasks"][2]["output_state_id"]
    kept = first.prepare(["-f", script(tmp_path, "k.sql", "create table k(x int);\n")])
    young = first.prepare(["-f", script(tmp_path, "y.sql", "create table y(x int);\n")])
    drop_instance(first, young)
    assert first.stop() == 0
    lone_id = lone["result"]["state_id"]
    created = backdate_state(first, lone_id, timedelta(hours=2))
    engine: EngineProcess = engine_factory(state_dir=first.state_dir)
    states = {s["state_id"]: s for s in engine.get("/v1/states").json()}
    assert states[lone_id]["created_at"] == created
    assert to_epoch(created) < to_epoch(states[young["result"]["state_id"]]["created_at"]) - 3600
    status = engine.get("/v1/cache/status").json()
    assert status["reclaimable_bytes"] == states[lone_id]["size_bytes"], status
    assert status["blocked_count"] == len(states) - 1, status
    cap_cache(engine, int(max(s["size_bytes"] for s in states.values()) * 6.1))
    last = engine.prepare(["-f", script(tmp_path, "z.sql", "create table z(x int);\n")])
    assert last["status"] == "succeeded", last
    remaining = state_ids(engine)
    assert lone_id not in remaining
    protected = {parent_id, chain["result"]["state_id"], kept["result"]["state_id"],
                 young["result"]["state_id"], last["result"]["state_id"]}
    assert remaining == protected
    summary = engine.get("/v1/cache/status").json()["last_eviction"]
    assert summary["evicted_count"] == 1
    assert summary["trigger"] == "before_snapshot"
    assert summary["usage_bytes_after"] < summary["usage_bytes_before"]
    assert not list(engine.store.glob(f"engines/*/*/states/{lone_id}"))


def test_eviction_prefers_least_recently_used(engine: EngineProcess, tmp_path: Path) -> None:
    without_warm_pool(engine)
    patch_config(engine, reserveBytes=0, minStateAge="0s")
    jobs = []
    for name in ("old", "new"):
        sql = script(tmp_path, f"{name}.sql", f"create table {name}(x int);\n")
        job = engine.prepare(["-f", sql])
        drop_instance(engine, job)
        jobs.append(job)
    old, new = (job["result"]["state_id"] for job in jobs)
    reuse = engine.post("/v1/instances", {"state_id": old})
    assert reuse.status == 201
    assert engine.delete(f"/v1/instances/{reuse.json()['instance_id']}").status == 200
    cap_cache(engine, int(engine.get(f"/v1/states/{old}").json()["size_bytes"] * 2.6))
    third = engine.prepare(["-f", script(tmp_path, "third.sql", "create table t(x int);\n")])
    assert third["status"] == "succeeded"
    assert state_ids(engine) == {old, third["result"]["state_id"]}
    assert new not in state_ids(engine)


def test_full_cache_fails_before_building(engine: EngineProcess, tmp_path: Path) -> None:
    patch_config(engine, reserveBytes=0, minStateAge="1h")
    first = engine.prepare(["-f", script(tmp_path, "one.sql", "create table one(x int);\n")])
    size = engine.get(f"/v1/states/{first['result']['state_id']}").json()["size_bytes"]
    cap_cache(engine, int(size * 0.5))
    job = engine.prepare(["-f", script(tmp_path, "two.sql", "create table two(x int);\n")])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "cache_full_unreclaimable"
    assert '"effective_max_bytes"' in job["error"]["details"]
    assert state_ids(engine) == {first["result"]["state_id"]}


# --- full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs",
                    str(mount_point)], check=True)
    try:
        yield mount_point / "store"
    finally:
        cleanup_store(mount_point / "store")
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_enospc_during_a_build_fails_cleanly(engine_factory: Any, small_store: Path,
                                             tmp_path: Path) -> None:
    small_store.mkdir(mode=0o700)
    (small_store / "config.json").write_text(
        '{"cache": {"capacity": {"reserveBytes": 0}}}\n')
    engine: EngineProcess = engine_factory(env={"SQLRS_STATE_STORE": str(small_store)})
    big = script(tmp_path, "big.sql", "create table big as select g, repeat('x', 1000) as pad"
                                      " from generate_series(1, 120000) g;\n")
    job = engine.prepare(["-f", big])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "cache_limit_too_small", job["error"]
    assert engine.get("/v1/states").json() == []
    assert not [p for p in small_store.glob("engines/*/*/states/*") if p.name != ".build"]
    assert not list((small_store / "instances").iterdir())
    assert leftover_servers(small_store) == []
    assert engine.get("/v1/health", auth=False).status == 200
    small = engine.prepare(["-f", script(tmp_path, "small.sql", "create table s(x int);\n")])
    assert small["status"] == "succeeded", small
