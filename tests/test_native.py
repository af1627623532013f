"""dist/sqlrs-engine: one file that is a native executable (a C launcher) and the zipapp."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, EngineProcess, psql, spawn_engine, stop_engine

ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}
NO_PYTHON = ("sqlrs-engine: no Python >= 3.11 found; install python3 (3.11+) "
             "or set SQLRS_ENGINE_PYTHON")
COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(sys.platform != "linux" or COMPILER is None,
                                reason="the native launcher needs Linux and a C compiler")


def build(out_dir: Path) -> Path:
    """Build the .pyz and the native executable into ``out_dir``; return the executable."""
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--native",
                    "--output", str(out_dir / "sqlrs-engine.pyz")], check=True,
                   capture_output=True)
    return out_dir / "sqlrs-engine"


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("native"))


@pytest.fixture
def native_engine(tmp_path: Path) -> Iterator[list[EngineProcess]]:
    started: list[EngineProcess] = []
    yield started
    for engine in started:
        stop_engine(engine)


def launcher_size(path: Path) -> int:
    """Bytes before the archive: the first local file header starts right after the launcher."""
    with zipfile.ZipFile(path) as archive:
        return min(info.header_offset for info in archive.infolist())


def test_elf_for_this_machine_and_a_valid_zip(native: Path) -> None:
    raw = native.read_bytes()
    assert raw[:4] == b"\x7fELF"
    expected = ELF_MACHINES.get(platform.machine())
    if expected is None:
        pytest.skip(f"no ELF machine number known for {platform.machine()}")
    assert int.from_bytes(raw[18:20], "little" if raw[5] == 1 else "big") == expected  # e_machine
    assert os.access(native, os.X_OK) and native.stat().st_mode & 0o111 == 0o111
    with zipfile.ZipFile(native) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        # Offsets count from the start of the file, launcher included: no prefix fix-up needed.
        assert all(raw[i.header_offset:i.header_offset + 4] == b"PK\x03\x04"
                   for i in archive.infolist())
    assert "__main__.py" in names and "sqlrs_engine.py" in names
    assert launcher_size(native) < 64 * 1024
    pyz = native.with_suffix(".pyz").read_bytes()
    assert raw[launcher_size(native):].startswith(b"PK\x03\x04")
    assert len(raw) - launcher_size(native) == len(pyz) - pyz.index(b"\n") - 1


def test_runs_as_executable_and_with_python(native: Path) -> None:
    env = {**os.environ, "SQLRS_ENGINE_PYTHON": sys.executable}
    direct = subprocess.run([str(native), "--version"], capture_output=True, text=True,
                            env=env, check=True, timeout=30)
    via_python = subprocess.run([sys.executable, str(native), "--version"], capture_output=True,
                                text=True, check=True, timeout=30)
    assert direct.stdout.startswith("sqlrs-engine ") and direct.stdout == via_python.stdout
    usage = subprocess.run([str(native), "--no-such-option", "two words"], capture_output=True,
                           text=True, env=env, check=False, timeout=30)
    assert usage.returncode == 2
    assert "unrecognized arguments: --no-such-option two words" in usage.stderr


def test_spawned_like_the_cli_full_cycle(native: Path, tmp_path: Path,
                                         native_engine: list[EngineProcess]) -> None:
    engine = spawn_engine(tmp_path / "state", argv0=[str(native)],
                          env={"SQLRS_ENGINE_CACHE": str(tmp_path / "cache")})
    native_engine.append(engine)
    assert engine.info["pid"] == engine.proc.pid
    assert Path(f"/proc/{engine.proc.pid}/exe").resolve().name.startswith("python")
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    created = engine.post("/v1/instances", {"state_id": job["result"]["state_id"]})
    assert created.status == 201, created.body
    instance = created.json()
    assert psql(instance["dsn"], "select count(*) from t") == "0"
    gone = engine.delete(f"/v1/instances/{instance['instance_id']}")
    assert gone.status == 200, gone.body
    assert gone.json()["outcome"] == "deleted"


@pytest.mark.parametrize("case", ["missing", "explicit-too-old", "path-too-old"])
def test_no_suitable_python(native: Path, tmp_path: Path, case: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho 3.8\n")  # what our version probe gets from Python 3.8
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SQLRS_ENGINE_PYTHON"}
    env["PATH"] = str(bin_dir)
    if case == "missing":
        env["SQLRS_ENGINE_PYTHON"] = str(tmp_path / "no-such-python")
    elif case == "explicit-too-old":
        env["SQLRS_ENGINE_PYTHON"] = str(fake)
    state = tmp_path / "state"
    started = time.monotonic()
    result = subprocess.run([str(native), "--run-dir", str(state / "run"), "--listen",
                             "127.0.0.1:0", "--write-engine-json", str(state / "engine.json")],
                            capture_output=True, text=True, env=env, check=False, timeout=30)
    assert time.monotonic() - started < 5
    assert result.returncode == 127
    assert NO_PYTHON in result.stderr
    reason = "No such file" if case == "missing" else "is Python 3.8"
    assert reason in result.stderr, result.stderr
    assert not (state / "engine.json").exists()


def test_launcher_compiles_without_warnings(tmp_path: Path) -> None:
    assert COMPILER is not None
    result = subprocess.run([*COMPILER.split(), "-std=c11", "-Wall", "-Wextra", "-Werror",
                             "-O2", "-o", str(tmp_path / "launcher"),
                             str(ROOT / "native" / "launcher.c")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_two_builds_are_identical(native: Path, tmp_path: Path) -> None:
    again = build(tmp_path)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(
        native.read_bytes()).digest()
