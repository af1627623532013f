"""The self-contained zipapp and the wheel/sdist (issue 7)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import (
    ROOT,
    STARTUP_DEADLINE,
    EngineProcess,
    cleanup_store,
    poll,
    psql,
    spawn_engine,
)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pyz") / "sqlrs-engine.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with none of the engine's libraries."""
    venv = tmp_path_factory.mktemp("venv") / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-I", "-c", "import docker"], capture_output=True,
                           check=False)
    assert probe.returncode != 0, "the bare venv must not see the docker SDK"
    return python


@pytest.fixture
def pyz_engines(tmp_path: Path) -> Iterator[list[EngineProcess]]:
    started: list[EngineProcess] = []
    yield started
    for engine in started:
        with contextlib.suppress(Exception):
            for inst in engine.get("/v1/instances").json():
                engine.delete(f"/v1/instances/{inst['instance_id']}?force=1")
        with contextlib.suppress(Exception):
            engine.stop()
        cleanup_store(engine.store)


def spawn_from_archive(pyz: Path, python: Path, state_dir: Path, cache: Path,
                       wait: bool = True) -> EngineProcess:
    """An engine run from the archive by ``python`` (isolated), unpacking into ``cache``."""
    return spawn_engine(state_dir, argv0=[str(python), "-I", str(pyz)],
                        env={"SQLRS_ENGINE_CACHE": str(cache)}, wait=wait)


def test_build_is_reproducible(pyz: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(again)],
                   check=True, capture_output=True)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(
        pyz.read_bytes()).digest()
    names = zipfile.ZipFile(pyz).namelist()
    assert "__main__.py" in names and "sqlrs_engine.py" in names
    assert any(n.startswith("vendor/docker/") for n in names)
    assert any(n.startswith("_native/psycopg2/") and n.endswith(".so") for n in names)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version(pyz: Path, bare_python: Path, flag: str) -> None:
    out = subprocess.run([str(bare_python), "-I", str(pyz), flag], capture_output=True,
                         text=True, check=True)
    assert "sqlrs-engine" in out.stdout


def test_full_cycle_from_the_archive_in_a_bare_venv(pyz: Path, bare_python: Path,
                                                    tmp_path: Path, scripts: Path,
                                                    pyz_engines: list[EngineProcess]) -> None:
    cache = tmp_path / "cache"
    engine = spawn_from_archive(pyz, bare_python, tmp_path / "state", cache)
    pyz_engines.append(engine)
    job = engine.prepare(["-f", str(scripts / "schema.sql"), "-f", str(scripts / "data.sql")])
    assert job["status"] == "succeeded", job
    state_id = job["result"]["state_id"]
    created = engine.post("/v1/instances", {"state_id": state_id[:12]})
    assert created.status == 201, created.body
    instance = created.json()
    run = engine.post("/v1/runs", {"instance_ref": instance["instance_id"], "kind": "psql",
                                   "args": ["-XAt", "-c", "select count(*) from items"]})
    assert [e["data"] for e in run.ndjson() if e["type"] == "stdout"] == ["100\n"]
    conn = psycopg2.connect(instance["dsn"])
    try:
        dry = engine.delete(f"/v1/instances/{instance['instance_id']}?dry_run=true")
        assert dry.json()["root"]["connections"] == 1
        assert dry.json()["outcome"] == "blocked"
    finally:
        conn.close()
    assert len(list(cache.glob("native-*/.complete"))) == 1
    gone = engine.delete(f"/v1/instances/{instance['instance_id']}")
    assert gone.status == 200
    assert gone.json()["outcome"] == "deleted"
    assert psql(job["result"]["dsn"], "select count(*) from items") == "100"


def test_two_engines_unpack_the_native_parts_at_once(pyz: Path, bare_python: Path,
                                                     tmp_path: Path, scripts: Path,
                                                     pyz_engines: list[EngineProcess]) -> None:
    """Both engines start (and unpack into the one cache) before either is waited for."""
    cache = tmp_path / "cache"
    engines = [spawn_from_archive(pyz, bare_python, tmp_path / f"state{i}", cache, wait=False)
               for i in range(2)]
    pyz_engines.extend(engines)
    poll(lambda: all([engine.healthy() for engine in engines]), STARTUP_DEADLINE,
         what="both engines healthy")
    jobs = [engine.prepare(["-f", str(scripts / "schema.sql")]) for engine in engines]
    results: list[int] = []

    def count(engine: EngineProcess, job: dict[str, Any]) -> None:
        result = engine.delete(f"/v1/instances/{job['result']['instance_id']}?dry_run=true")
        results.append(result.status)

    threads = [threading.Thread(target=count, args=pair) for pair in zip(engines, jobs,
                                                                          strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200, 200]
    assert len(list(cache.glob("native-*"))) == 1
    assert not list(cache.glob("*.tmp-*"))


def test_wheel_and_sdist(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("sqlrs_engine-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "sqlrs-engine = sqlrs_engine:main" in archive.read(entry_points).decode()
    assert "sqlrs_engine.py" in names
    sdist = next(tmp_path.glob("sqlrs_engine-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert any(m.endswith("/sqlrs_engine.py") for m in members)
    assert any(m.endswith("/pyproject.toml") for m in members)
