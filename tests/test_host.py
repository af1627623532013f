"""Host-runtime specifics: the copy snapshot backend and the unprivileged server user."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Any

from conftest import EngineProcess, expose_root, mounts_below, psql


def test_copy_backend_builds_full_states(engine_factory: Any, tmp_path: Path,
                                         scripts: Path) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "state-store").mkdir(parents=True, mode=0o700)
    (state_dir / "state-store" / "config.json").write_text('{"snapshot": {"backend": "copy"}}')
    engine: EngineProcess = engine_factory(state_dir=state_dir)
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    assert job["status"] == "succeeded", job
    for state in engine.get("/v1/states").json():
        found = list(engine.store.glob(f"engines/*/*/states/{state['state_id']}"))
        assert [p.name for p in found[0].iterdir() if p.is_dir()] == ["pgdata"]
    assert mounts_below(expose_root(engine.store)) and all(
        "overlay" not in line for line in Path("/proc/self/mounts").read_text().splitlines()
        if str(expose_root(engine.store)) in line)
    instance = engine.post("/v1/instances", {"state_id": job["result"]["state_id"]}).json()
    assert psql(instance["dsn"], "select count(*) from items") == "100"
    psql(instance["dsn"], "delete from items")
    assert psql(job["result"]["dsn"], "select count(*) from items") == "100"


def test_host_servers_run_as_the_postgres_user(engine: EngineProcess, scripts: Path) -> None:
    job = engine.prepare(["-f", str(scripts / "schema.sql")])
    pid = int(engine.get(f"/v1/instances/{job['result']['instance_id']}").json()[
        "runtime_id"].split(":")[1])
    assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("postgres").pw_uid
    assert stat.S_IMODE(os.stat(engine.store).st_mode) == 0o700
