"""Raw PostgreSQL baselines for the benchmarks: initdb, overlay clones, start/stop, connect.

Everything runs the way the engine does it on this machine (the same ``initdb`` options and
server settings, imported from ``sqlrs_engine``; Postgres as the ``postgres`` user; readiness
read from ``postmaster.pid`` every 2 ms), so a baseline differs from the engine only in the
engine's own work. Scratch directories live under ``/run/sqlrs-bench``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from _common import PG_BIN, POLL_S, ROOT, BenchError, kill_leftovers

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Imported dynamically so that type-checking the benchmarks does not type-check the engine.
_ENGINE = importlib.import_module("sqlrs_engine")
INITDB_OPTIONS: tuple[str, ...] = tuple(str(o) for o in _ENGINE.INITDB_OPTIONS)
ENGINE_SETTINGS: tuple[str, ...] = tuple(str(o) for o in _ENGINE.SERVER_SETTINGS)
SUPERUSER = str(_ENGINE.SUPERUSER)
SCRATCH_ROOT = Path("/run/sqlrs-bench")
SERVER_USER = "postgres"
READY_DEADLINE_S = 60.0
Connection = psycopg2.extensions.connection


def server_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def as_server_user() -> dict[str, Any]:
    """Popen keywords that run a child as the server user (the benchmarks run as root)."""
    uid, gid = server_ids()
    return {"user": uid, "group": gid, "extra_groups": []}


def initdb_options(wal_segsize_mb: int | None = None) -> list[str]:
    """The engine's ``initdb`` options, optionally with another WAL segment size."""
    options = list(INITDB_OPTIONS)
    if wal_segsize_mb is not None:
        options = [o for o in options if not o.startswith("--wal-segsize")]
        options.append(f"--wal-segsize={wal_segsize_mb}")
    return options


def free_port() -> int:
    port: int = _ENGINE.free_port()
    return port


def dir_bytes(path: Path) -> tuple[int, int]:
    """(allocated bytes like ``du``, apparent bytes like ``du -b``) below ``path``."""
    allocated = apparent = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    allocated += st.st_blocks * 512
                    apparent += st.st_size
    return allocated, apparent


class Scratch:
    """A private directory under /run/sqlrs-bench; everything in it is removed on close."""

    def __init__(self) -> None:
        SCRATCH_ROOT.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(SCRATCH_ROOT, 0o711)
        self.root = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH_ROOT))
        os.chmod(self.root, 0o711)
        self.servers: list[Server] = []
        self._count = 0

    def new_dir(self, name: str) -> Path:
        self._count += 1
        path = self.root / f"{name}-{self._count}"
        path.mkdir(mode=0o711)
        return path

    def pg_dir(self, parent: Path, name: str = "pgdata") -> Path:
        """An empty directory owned by the server user, mode 0700."""
        path = parent / name
        path.mkdir(mode=0o700)
        os.chown(path, *server_ids())
        return path

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(OSError, BenchError):
                server.stop()
        kill_leftovers(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def scratch() -> Iterator[Scratch]:
    area = Scratch()
    try:
        yield area
    finally:
        area.close()


def initdb(data_dir: Path, wal_segsize_mb: int | None = None) -> None:
    proc = subprocess.run([f"{PG_BIN}/initdb", "-D", str(data_dir),
                           *initdb_options(wal_segsize_mb)],
                          capture_output=True, text=True, cwd="/", check=False,
                          **as_server_user())
    if proc.returncode != 0:
        raise BenchError(f"initdb failed: {proc.stdout}{proc.stderr}")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    log_path: Path
    sock_dir: Path

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (SIGINT) and wait for the postmaster to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise BenchError(f"postgres on {self.data_dir} did not stop") from None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"


def _ready(data_dir: Path, pid: int) -> bool:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError, UnicodeDecodeError):
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


#: Baseline servers let TCP clients in without a password: the floor the engine's
#: per-instance passwords are measured against (bench/instances.py measures their cost).
TRUST_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"


def start_server(area: Scratch, data_dir: Path, settings: Sequence[str] = ENGINE_SETTINGS
                 ) -> Server:
    """Start ``postgres`` on a free port (trust for TCP) and wait for ``postmaster.pid`` line
    8 == ready."""
    hba = data_dir / "pg_hba.conf"
    hba.write_text(TRUST_HBA)
    os.chown(hba, *server_ids())
    port = free_port()
    sock_dir = area.new_dir("sock")
    os.chown(sock_dir, *server_ids())
    argv = [f"{PG_BIN}/postgres", "-D", str(data_dir), "-p", str(port), "-k", str(sock_dir)]
    for setting in settings:
        argv += ["-c", setting]
    log_path = sock_dir.with_suffix(".log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=log_file, cwd="/", start_new_session=True,
                                **as_server_user())
    server = Server(proc, data_dir, port, log_path, sock_dir)
    area.servers.append(server)
    deadline = time.monotonic() + READY_DEADLINE_S
    while not _ready(data_dir, proc.pid):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"postgres did not start: {log_path.read_text()[-2000:]}")
        time.sleep(POLL_S)
    return server


def connect(dsn: str, deadline_s: float = 30.0) -> Connection:
    """A psycopg2 connection to ``dsn``, retried every 2 ms until it is accepted."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return psycopg2.connect(dsn, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            if time.monotonic() > end:
                raise BenchError(f"cannot connect to {dsn}: {exc}") from exc
            time.sleep(POLL_S)


def check_connection(dsn: str) -> None:
    """Connect to ``dsn`` (waiting until it accepts) and close again."""
    connect(dsn).close()


@dataclass
class Overlay:
    upper: Path
    work: Path
    merged: Path

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.merged)], check=True, capture_output=True)


def mount_overlay(lower: Path, runtime_dir: Path, merged: Path, volatile: bool) -> Overlay:
    """``mount -t overlay`` of ``lower`` with a fresh upper/work under ``runtime_dir``."""
    upper, work = runtime_dir / "upper", runtime_dir / "work"
    for path in (upper, work):
        path.mkdir(mode=0o700)
    os.chown(upper, *server_ids())
    merged.mkdir(mode=0o700, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if volatile:
        options += ",volatile"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"overlay mount failed: {proc.stderr.strip()}")
    return Overlay(upper, work, merged)


def overlay_floor_once(area: Scratch, lower: Path, runtime_parent: Path,
                       engine_like: bool) -> float:
    """The host floor: overlay mount of ``lower`` + postgres start (ready in postmaster.pid) +
    psycopg2 connect; the seconds all three take.

    ``engine_like`` mounts with ``volatile`` and uses the engine's server settings, as the
    engine itself does; otherwise it is the plain recipe (only ``listen_addresses``).
    """
    runtime = runtime_parent / f"rt-{time.monotonic_ns()}"
    runtime.mkdir(mode=0o700)
    merged = area.new_dir("floor") / "data"
    settings = ENGINE_SETTINGS if engine_like else ("listen_addresses=127.0.0.1",)
    started = time.perf_counter()
    overlay = mount_overlay(lower, runtime, merged, volatile=engine_like)
    try:
        server = start_server(area, merged, settings)
        try:
            check_connection(server.dsn())
            elapsed = time.perf_counter() - started
        finally:
            server.stop()
    finally:
        overlay.unmount()
    shutil.rmtree(runtime, ignore_errors=True)
    return elapsed


def run_psql(server: Server, script: Path) -> None:
    """The engine's psql call: the real binary, ``-X -v ON_ERROR_STOP=1 -f script``."""
    argv = [f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER,
            "-d", "postgres", "-f", str(script), "-X", "-v", "ON_ERROR_STOP=1"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=script.parent)
    if proc.returncode != 0:
        raise BenchError(f"psql failed: {proc.stdout[-1000:]}{proc.stderr[-1000:]}")


def execute(dsn: str, *statements: str) -> None:
    """Run statements in autocommit mode."""
    conn = connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()
