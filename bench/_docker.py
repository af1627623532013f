"""Shared Docker helpers of the benchmarks: the SDK, a client, labels, and the Docker floor.

The floor is ``docker run`` of the test image (``sleep infinity``, a fresh ``cp -a`` of a
state's pgdata bind-mounted at PGDATA, 5432 published on 127.0.0.1) + ``pg_ctl start`` through
exec as ``postgres`` + psycopg2 connects polled every 2 ms to the published port. The copy (and
its pg_hba.conf, which lets TCP clients in without a password like the host floor's
``start_server``) is made untimed; the container is removed untimed.

No module in bench/ is named ``docker``, so the Docker SDK imports as itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import BenchError
from _pg import SUPERUSER, check_connection

DOCKER_IMAGE = "sqlrs-test/postgres:15"
PGDATA_IN_CONTAINER = "/var/lib/postgresql/data/pgdata"
PG_CTL_START = ["pg_ctl", "-D", PGDATA_IN_CONTAINER, "-l", "/tmp/pg.log",
                "-o", "-c listen_addresses=* -p 5432", "start"]
BENCH_LABEL = "sqlrs.bench"
ENGINE_LABEL = "sqlrs.engine"  # the engine's containers: sha256(store root)[:12]
RUNNING_DEADLINE_S = 30.0
#: the host floor's trust, for any TCP peer: Docker's port proxy connects from the bridge
DOCKER_TRUST_HBA = "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n"


# --------------------------------------------------------------------------------------------
# the Docker SDK and a client
# --------------------------------------------------------------------------------------------


def docker_sdk() -> Any:
    """The Docker SDK package (imported on first use: most benchmarks never need it)."""
    return importlib.import_module("docker")


def docker_client() -> Any:
    """A connected client with the image present, or BenchError saying why not."""
    try:
        sdk = docker_sdk()
    except ImportError as exc:
        raise BenchError(f"the Docker SDK is not installed: {exc}") from exc
    try:
        client = sdk.from_env(timeout=120)
        client.ping()
    except sdk.errors.DockerException as exc:
        raise BenchError(f"docker is not reachable: {exc}") from exc
    try:
        client.images.get(DOCKER_IMAGE)
    except sdk.errors.ImageNotFound:
        client.close()
        raise BenchError(f"image {DOCKER_IMAGE} is missing: run scripts/setup-docker.sh"
                         ) from None
    except sdk.errors.DockerException as exc:
        client.close()
        raise BenchError(f"docker: {exc}") from exc
    return client


@contextlib.contextmanager
def docker_errors() -> Iterator[None]:
    """Docker SDK failures are benchmark errors (exit 1), not tracebacks."""
    sdk = docker_sdk()
    try:
        yield
    except sdk.errors.DockerException as exc:
        raise BenchError(f"docker: {exc}") from exc


# --------------------------------------------------------------------------------------------
# labels and leftovers
# --------------------------------------------------------------------------------------------


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
    return hashlib.sha256(os.path.abspath(state_dir / "state-store").encode()).hexdigest()[:12]


def remove_engine_leftovers(client: Any, state_dir: Path) -> None:
    """Remove (and say so) any container the engine on ``state_dir`` left behind."""
    left = remove_labelled(client, f"{ENGINE_LABEL}={engine_label(state_dir)}")
    if left:
        print(f"removed {left} container(s) the engine left behind", file=sys.stderr)


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
# the floor: docker run + pg_ctl start + connect
# --------------------------------------------------------------------------------------------


def trust_tcp(data: Path) -> None:
    """Let TCP clients in without a password, as the host floor's ``start_server`` does (a
    state's pg_hba.conf wants the instance's password, which a floor does not have)."""
    hba = data / "pg_hba.conf"
    owner = hba.stat()
    hba.write_text(DOCKER_TRUST_HBA)
    os.chown(hba, owner.st_uid, owner.st_gid)


@dataclass(frozen=True)
class FloorRun:
    docker_run: float  # containers.run until the container reports "running"
    pg_ctl: float  # exec of pg_ctl start (pg_ctl waits for the server by default)
    connect: float  # psycopg2 connects polled until one is accepted
    total: float


class DockerFloor:
    """Runs the floor's containers (labelled, named) and removes them again."""

    def __init__(self, client: Any, work: Path, prefix: str) -> None:
        self.client = client
        self.work = work
        self.tag = f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"
        self._count = 0

    def once(self, source: Path) -> FloorRun:
        """One floor run on a fresh copy of ``source`` (a state's pgdata)."""
        self._count += 1
        parent = self.work / f"docker-floor-{self._count}"
        parent.mkdir(mode=0o700)
        data = parent / "pgdata"
        copied = subprocess.run(["cp", "-a", str(source), str(data)], capture_output=True,
                                text=True, check=False)
        if copied.returncode != 0:
            raise BenchError(f"cp -a {source} failed: {copied.stderr.strip()}")
        trust_tcp(data)
        container: Any = None
        try:
            started = time.perf_counter()
            container = self.client.containers.run(
                DOCKER_IMAGE, ["sleep", "infinity"], detach=True,
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
            shutil.rmtree(parent, ignore_errors=True)
        return FloorRun(running - started, pg_started - running, ended - pg_started,
                        ended - started)

    def cleanup(self) -> None:
        remove_labelled(self.client, f"{BENCH_LABEL}={self.tag}")
