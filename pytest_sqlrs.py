"""pytest plugin: every test gets a whole, disposable PostgreSQL server from sqlrs-engine.

Registered through the ``pytest11`` entry point ``sqlrs``. Loading it costs nothing: no engine
is looked for, started or asked anything until a test requests one of its fixtures.

Map of the module, top to bottom:

* **Settings** (``pytest_addoption``, :class:`Settings`): ``--sqlrs-prepare`` / ``sqlrs_prepare``,
  ``--sqlrs-image`` / ``sqlrs_image`` (default ``host:15``), ``--sqlrs-engine-json`` /
  ``sqlrs_engine_json`` (default: the CLI's ``$XDG_STATE_HOME/sqlrs/engine.json``),
  ``--sqlrs-keep-failed``, ``--sqlrs-ttl`` / ``sqlrs_ttl``, ``--sqlrs-idle-timeout`` /
  ``sqlrs_idle_timeout`` and ``--sqlrs-liquibase`` / ``sqlrs_liquibase``; the marker
  ``@pytest.mark.sqlrs(prepare=..., image=...)``.
* **What to prepare** (:func:`prepare_spec`, :func:`read_alias`): a prepare alias file
  (``<name>.prep.s9s.yaml`` with ``kind``, ``image``, ``args``; paths relative to the file), or
  ``psql <args>`` / ``lb <args>`` with paths relative to the rootdir, turned into the body of
  ``POST /v1/prepare-jobs``.
* **HTTP** (:class:`EngineClient`): JSON requests and the NDJSON events stream, bearer token,
  every call with a timeout, every failure a :class:`SqlrsError` with one clear line.
* **Finding or starting the engine** (:func:`connect_or_start`): as the sqlrs CLI does (contract
  §1.5): a healthy ``engine.json`` is used; otherwise, under ``<state dir>/run/daemon.lock``
  (``flock``, the CLI's spawn lock, so one engine per run even under pytest-xdist), the engine
  is spawned detached with the CLI's argv and polled until healthy.
* **Per-process session** (:class:`SqlrsSession`): the engine, the prepared states (successes
  and failures, each prepared at most once per process), a background thread that deletes
  instances (a test never waits for a delete) and a keep-alive ping.
* **Fixtures**: ``sqlrs_state``, ``sqlrs_dsn``, ``sqlrs_instance``, ``sqlrs_reset_dsn``.
* **Hooks**: the ``--sqlrs-keep-failed`` report section (``pytest_runtest_makereport``) and
  the final wait for pending deletes (``pytest_sessionfinish``).

Every instance carries ``ttl_seconds``, so a run that is killed (Ctrl-C twice, SIGKILL) leaves
no server behind for longer than the TTL. Errors a user can cause (no engine and none can
start, a bad alias file, a failing migration, a missing image) fail the tests that need a
database with one clear line (``pytest.fail(..., pytrace=False)``), never a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = ["EngineClient", "PrepareSpec", "Settings", "SqlrsError", "SqlrsSession",
           "prepare_spec", "read_alias"]

DEFAULT_IMAGE = "host:15"
DEFAULT_TTL_S = 900
DEFAULT_IDLE_TIMEOUT = "2m0s"  #: the CLI's orchestrator.idleTimeout
ALIAS_SUFFIX = ".prep.s9s.yaml"
STARTUP_TIMEOUT_S = 30.0  #: the CLI waits 5 s; a busy CI machine may need more
REQUEST_TIMEOUT_S = 60.0
EVENTS_READ_TIMEOUT_S = 300.0  #: silence allowed on a prepare's events stream (heartbeats)
DRAIN_TIMEOUT_S = 60.0  #: how long the end of a session waits for pending deletes
KEEPALIVE_S = 20.0
MAX_OUTPUT_LINES = 40
#: what marks the line that says why a step failed, best first (psql, Liquibase, others)
KEY_LINE_MARKERS = ("ERROR:  ", "Unexpected error", "ERROR:", "FATAL:", "error", "Error")

JsonDict = dict[str, Any]


class SqlrsError(Exception):
    """A failure a user can cause or fix; ``str()`` is one clear line (more lines, such as a
    failing step's output, may follow it)."""


def fail(error: SqlrsError) -> NoReturn:
    """Fail the current test (or its setup) with the error's text and no traceback (nor the
    plugin's exception as its context)."""
    raise pytest.fail.Exception(str(error), pytrace=False) from None


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlrs", "disposable PostgreSQL servers from sqlrs-engine")
    group.addoption("--sqlrs-prepare", default=None, metavar="WHAT",
                    help="what to prepare: a prepare alias name (<name>.prep.s9s.yaml), "
                         "'psql <args>' or 'lb <args>' (paths relative to the rootdir)")
    group.addoption("--sqlrs-image", default=None, metavar="IMAGE",
                    help=f"image of the prepare (default {DEFAULT_IMAGE})")
    group.addoption("--sqlrs-engine-json", default=None, metavar="PATH",
                    help="the engine's discovery file (default: the sqlrs CLI's)")
    group.addoption("--sqlrs-keep-failed", action="store_true", default=None,
                    help="keep the instances of failed tests and print how to connect")
    group.addoption("--sqlrs-ttl", default=None, type=int, metavar="SECONDS",
                    help=f"ttl_seconds of every instance (default {DEFAULT_TTL_S})")
    group.addoption("--sqlrs-idle-timeout", default=None, metavar="DURATION",
                    help=f"--idle-timeout of an engine the plugin starts "
                         f"(default {DEFAULT_IDLE_TIMEOUT})")
    group.addoption("--sqlrs-liquibase", default=None, metavar="PATH",
                    help="liquibase_exec for lb prepares (default: the engine's)")
    parser.addini("sqlrs_prepare", "what to prepare (see --sqlrs-prepare)", default="")
    parser.addini("sqlrs_image", f"image of the prepare (default {DEFAULT_IMAGE})", default="")
    parser.addini("sqlrs_engine_json", "the engine's discovery file", default="")
    parser.addini("sqlrs_keep_failed", "keep the instances of failed tests", type="bool",
                  default=False)
    parser.addini("sqlrs_ttl", "ttl_seconds of every instance", default="")
    parser.addini("sqlrs_idle_timeout", "--idle-timeout of an engine the plugin starts",
                  default="")
    parser.addini("sqlrs_liquibase", "liquibase_exec for lb prepares", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlrs(prepare=None, image=None): the state this test's (or module's) "
                   "sqlrs fixtures start instances of")


def default_engine_json() -> Path:
    """The sqlrs CLI's ``<StateDir>/engine.json`` (contract §1.5)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sqlrs" / "state" / "engine.json"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sqlrs" / "engine.json"


@dataclass(frozen=True)
class Settings:
    """The options of a run, command line first, then the ini file, then the defaults.

    ``image_option`` is the image given on the command line (it beats an alias file's image);
    ``image_ini`` the ini file's (an alias file's image beats it).
    """

    rootdir: Path
    prepare: str | None
    image_option: str | None
    image_ini: str | None
    engine_json: Path
    keep_failed: bool
    ttl_s: int
    idle_timeout: str
    liquibase: str | None

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        def ini(name: str) -> str | None:
            value = str(config.getini(name) or "").strip()
            return value or None

        ini_dir = config.inipath.parent if config.inipath else config.rootpath
        if config.getoption("sqlrs_engine_json"):
            engine_json = Path(os.path.expanduser(str(config.getoption("sqlrs_engine_json"))))
            engine_json = Path(config.invocation_params.dir, engine_json)
        elif ini("sqlrs_engine_json"):
            engine_json = ini_dir / os.path.expanduser(str(ini("sqlrs_engine_json")))
        else:
            engine_json = default_engine_json()
        ttl_text = config.getoption("sqlrs_ttl") or ini("sqlrs_ttl") or DEFAULT_TTL_S
        try:
            ttl = int(ttl_text)
        except ValueError:
            raise pytest.UsageError(f"sqlrs_ttl must be a number of seconds: {ttl_text!r}"
                                    ) from None
        if ttl <= 0:
            raise pytest.UsageError(f"sqlrs_ttl must be positive: {ttl}")
        keep = config.getoption("sqlrs_keep_failed")
        return cls(
            rootdir=Path(config.rootpath),
            prepare=config.getoption("sqlrs_prepare") or ini("sqlrs_prepare"),
            image_option=config.getoption("sqlrs_image"),
            image_ini=ini("sqlrs_image"),
            engine_json=Path(os.path.abspath(engine_json)),
            keep_failed=bool(keep if keep is not None else config.getini("sqlrs_keep_failed")),
            ttl_s=ttl,
            idle_timeout=(config.getoption("sqlrs_idle_timeout") or ini("sqlrs_idle_timeout")
                          or DEFAULT_IDLE_TIMEOUT),
            liquibase=config.getoption("sqlrs_liquibase") or ini("sqlrs_liquibase"),
        )


# --------------------------------------------------------------------------------------------
# what to prepare: alias files, psql and lb forms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSpec:
    """One prepare: ``body`` is the ``POST /v1/prepare-jobs`` request (without ``ttl_seconds``);
    ``label`` names it in messages. Two specs with equal keys give the same state."""

    label: str
    body: JsonDict

    @property
    def key(self) -> str:
        return json.dumps(self.body, sort_keys=True)


def _scalar(text: str, where: str) -> str:
    """A YAML scalar of the subset: plain, 'single' ('' escapes ') or "double" quoted."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            raise SqlrsError(f"{where}: bad double-quoted string {text}") from None
        return str(value)
    if text[:1] in ("'", '"', "[", "{", "&", "*", "!", "|", ">"):
        raise SqlrsError(f"{where}: unsupported YAML value {text!r}")
    return text


def _strip_comment(line: str) -> str:
    """``line`` without a ``#`` comment (one at the start or after a space, outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in ("'", '"') and (i == 0 or line[i - 1] in " \t-:["):
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _flow_list(text: str, where: str) -> list[str]:
    inner = text.strip()[1:-1]
    items: list[str] = []
    current, quote = "", ""
    for char in inner:
        if quote:
            current += char
            if char == quote:
                quote = ""
        elif char in ("'", '"'):
            quote = char
            current += char
        elif char == ",":
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    return [_scalar(item, where) for item in items]


def read_alias(path: Path) -> JsonDict:
    """Read a prepare alias file (``kind``, ``image``, ``args``) in the small YAML subset the
    CLI's files use: top-level ``key: value`` lines, a block list of ``- item`` lines or a flow
    list ``[a, b]`` for ``args``, plain or quoted scalars, ``#`` comments. Anything else, a
    missing ``kind`` or ``args``, a ``kind`` other than ``psql``/``lb`` or an unknown key raises
    :class:`SqlrsError` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SqlrsError(f"sqlrs: cannot read prepare alias {path}: {exc.strerror}") from None
    result: JsonDict = {}
    current_list: list[str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"sqlrs: bad prepare alias {path}:{number}"
        line = _strip_comment(raw).rstrip()
        if not line.strip() or line.strip() == "---":
            continue
        if line[0] in " \t-":
            item = line.strip()
            if current_list is None or not item.startswith("-"):
                raise SqlrsError(f"{where}: unexpected indented line {raw.strip()!r}")
            current_list.append(_scalar(item[1:], where))
            continue
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or not key:
            raise SqlrsError(f"{where}: expected 'key: value', got {raw.strip()!r}")
        if key not in ("kind", "image", "args"):
            raise SqlrsError(f"{where}: unknown key {key!r} (expected kind, image, args)")
        if key in result:
            raise SqlrsError(f"{where}: duplicate key {key!r}")
        value = value.strip()
        current_list = None
        if key == "args":
            if not value:
                current_list = []
                result[key] = current_list
            elif value.startswith("[") and value.endswith("]"):
                result[key] = _flow_list(value, where)
            else:
                raise SqlrsError(f"{where}: args must be a list")
        else:
            result[key] = _scalar(value, where)
    if result.get("kind") not in ("psql", "lb"):
        raise SqlrsError(f"sqlrs: bad prepare alias {path}: kind must be psql or lb, "
                         f"got {result.get('kind')!r}")
    if "args" not in result:
        raise SqlrsError(f"sqlrs: bad prepare alias {path}: args is missing")
    return result


def _absolute(path: str, base: Path) -> str:
    return path if path == "-" else os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def psql_paths(args: list[str], base: Path) -> list[str]:
    """``args`` with every ``-f``/``--file`` path made absolute against ``base`` (the engine
    needs absolute paths; ``-f -`` stays)."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-f", "--file"):
            out += [arg, _absolute(next(it, ""), base)]
        elif arg.startswith("--file="):
            out.append("--file=" + _absolute(arg[7:], base))
        elif arg.startswith("-f") and not arg.startswith("--"):
            out.append("-f" + _absolute(arg[2:], base))
        else:
            out.append(arg)
    return out


LB_PATH_OPTIONS = ("--changelog-file", "--defaults-file", "--searchPath", "--search-path")


def _lb_value(option: str, value: str, base: Path) -> str:
    if option in ("--searchPath", "--search-path"):
        return ",".join(p if "://" in p or p.startswith("classpath:") else _absolute(p, base)
                        for p in value.split(","))
    return _absolute(value, base)


def lb_paths(args: list[str], base: Path) -> list[str]:
    """``args`` with the values of Liquibase's path options made absolute against ``base``."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        option, eq, value = arg.partition("=")
        if option in LB_PATH_OPTIONS and eq:
            out.append(f"{option}={_lb_value(option, value, base)}")
        elif arg in LB_PATH_OPTIONS:
            out += [arg, _lb_value(arg, next(it, ""), base)]
        else:
            out.append(arg)
    return out


def _body(kind: str, args: list[str], base: Path, image: str, settings: Settings) -> JsonDict:
    if kind == "psql":
        return {"prepare_kind": "psql", "image_id": image, "psql_args": psql_paths(args, base)}
    body: JsonDict = {"prepare_kind": "lb", "image_id": image,
                      "liquibase_args": lb_paths(args, base), "work_dir": str(base)}
    if settings.liquibase:
        body["liquibase_exec"] = settings.liquibase
    return body


def prepare_spec(prepare: str | None, image: str | None, settings: Settings) -> PrepareSpec:
    """The prepare of ``prepare`` (the marker's or the settings') on ``image`` (the marker's,
    else ``--sqlrs-image``, else the alias file's, else ``sqlrs_image``, else ``host:15``).

    ``psql <args>`` and ``lb <args>`` take paths relative to the rootdir; anything else names
    an alias file ``<rootdir>/<prepare>.prep.s9s.yaml`` whose paths are relative to itself.
    """
    prepare = (prepare or settings.prepare or "").strip()
    if not prepare:
        raise SqlrsError("sqlrs: nothing to prepare: set --sqlrs-prepare, the ini key "
                         "sqlrs_prepare or @pytest.mark.sqlrs(prepare=...)")
    try:
        words = shlex.split(prepare)
    except ValueError as exc:
        raise SqlrsError(f"sqlrs: cannot split the prepare {prepare!r}: {exc}") from None
    chosen = image or settings.image_option
    if words[0] in ("psql", "lb"):
        body = _body(words[0], words[1:], settings.rootdir,
                     chosen or settings.image_ini or DEFAULT_IMAGE, settings)
        return PrepareSpec(f"{prepare!r} on {body['image_id']}", body)
    name = prepare if prepare.endswith(ALIAS_SUFFIX) else prepare + ALIAS_SUFFIX
    path = Path(settings.rootdir, name)
    alias = read_alias(path)
    args = alias["args"]
    alias_image = alias.get("image") or None
    body = _body(alias["kind"], args, path.parent,
                 chosen or alias_image or settings.image_ini or DEFAULT_IMAGE, settings)
    return PrepareSpec(f"{os.path.relpath(path, settings.rootdir)} on {body['image_id']}", body)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_text(self) -> str:
        """``message: details`` of a JSON error body, else the body's first line."""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            error = self.json()
            text = str(error["message"])
            return f"{text}: {error['details']}" if error.get("details") else text
        return self.body.decode(errors="replace").strip().splitlines()[0] if self.body else ""


@dataclass
class EngineClient:
    """Talks to one engine (``endpoint`` host:port, bearer ``token``); every request has a
    timeout and every transport failure raises :class:`SqlrsError`."""

    endpoint: str
    token: str
    engine_json: Path

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        host, _, port = self.endpoint.rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                timeout: float = REQUEST_TIMEOUT_S) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            return Answer(resp.status, resp.getheader("Content-Type", ""), resp.read())
        except (OSError, http.client.HTTPException) as exc:
            raise SqlrsError(f"sqlrs: engine at {self.endpoint} ({self.engine_json}) did not "
                             f"answer {method} {path}: {exc}") from None
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """A request that must answer ``expect``; its decoded JSON body."""
        answer = self.request(method, path, body)
        if answer.status != expect:
            raise SqlrsError(f"sqlrs: {method} {path} failed ({answer.status}): "
                             f"{answer.error_text()}")
        return answer.json()

    def events(self, job_id: str) -> Iterator[JsonDict]:
        """A job's events, live, to the end of the stream."""
        conn = self._connection(EVENTS_READ_TIMEOUT_S)
        try:
            conn.request("GET", f"/v1/prepare-jobs/{job_id}/events",
                         headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise SqlrsError(f"sqlrs: events of job {job_id}: {resp.status}")
            for line in iter(resp.readline, b""):
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SqlrsError(f"sqlrs: lost the events of prepare job {job_id}: {exc}"
                             ) from None
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------
# finding or starting the engine
# --------------------------------------------------------------------------------------------


def healthy_client(engine_json: Path) -> EngineClient | None:
    """A client of the engine ``engine_json`` names when it is healthy as the CLI checks it
    (contract §1.3: health answers with the file's ``instanceId``, ``pid`` is alive, the token
    is accepted), else None."""
    try:
        info = json.loads(engine_json.read_text())
        client = EngineClient(str(info["endpoint"]), str(info["authToken"]), engine_json)
        os.kill(int(info["pid"]), 0)
        health = client.request("GET", "/v1/health", auth=False, timeout=5)
        if health.status != 200 or health.json().get("instanceId") != info["instanceId"]:
            return None
        probe = client.request("GET", "/v1/prepare-jobs?job=sqlrs-pytest-probe", timeout=5)
    except (OSError, ValueError, KeyError, TypeError, SqlrsError):
        return None
    return client if probe.status not in (401, 403) else None


def _private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700; an existing one is left as it is
    (the engine refuses one not owned by its user or writable by group or others)."""
    missing = []
    walk = path
    while not walk.exists():
        missing.append(walk)
        walk = walk.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # the umask never widens it, but may narrow it oddly


def engine_argv() -> list[str]:
    """The engine's command: ``$SQLRS_DAEMON_PATH`` (the CLI's variable), else this Python's
    ``python -m sqlrs_engine``."""
    daemon = os.environ.get("SQLRS_DAEMON_PATH")
    return [daemon] if daemon else [sys.executable, "-m", "sqlrs_engine"]


_SPAWNED: list[subprocess.Popen[bytes]] = []  #: engines this process started (kept referenced)


def _log_tail(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    interesting = [line for line in lines if "error" in line.lower() or "refus" in line.lower()]
    return (interesting or lines or [""])[-1].strip()


def connect_or_start(engine_json: Path, idle_timeout: str,
                     startup_timeout: float = STARTUP_TIMEOUT_S) -> EngineClient:
    """The engine ``engine_json`` names, started first when none is healthy.

    As the CLI does (contract §1.5): the state dir (``engine_json``'s directory) and its
    ``run`` and ``logs`` directories are created 0700 when missing; ``run/daemon.lock`` is
    locked (``flock``, polled, so concurrent pytest-xdist workers and the CLI start at most
    one engine); health is checked again under the lock; the engine is spawned detached
    (its own session) with ``--run-dir --listen 127.0.0.1:0 --write-engine-json
    --idle-timeout``, its output appended to ``logs/engine.log``, and polled until healthy.
    Raises :class:`SqlrsError` (one line, the engine's last error line included) when it
    cannot start or does not become healthy within ``startup_timeout``.
    """
    client = healthy_client(engine_json)
    if client:
        return client
    state_dir = engine_json.parent
    run_dir, log_dir = state_dir / "run", state_dir / "logs"
    try:
        for directory in (state_dir, run_dir, log_dir):
            _private_dir(directory)
        lock = os.open(run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SqlrsError(f"sqlrs: no engine at {engine_json} and cannot create its state dir: "
                         f"{exc}") from None
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SqlrsError(f"sqlrs: no engine at {engine_json}: another process "
                                     f"holds {run_dir / 'daemon.lock'}") from None
                time.sleep(0.1)
        client = healthy_client(engine_json)
        if client:
            return client
        return _spawn(engine_json, run_dir, log_dir / "engine.log", idle_timeout, deadline)
    finally:
        os.close(lock)  # releases the flock


def _spawn(engine_json: Path, run_dir: Path, log: Path, idle_timeout: str,
           deadline: float) -> EngineClient:
    argv = [*engine_argv(), "--run-dir", str(run_dir), "--listen", "127.0.0.1:0",
            "--write-engine-json", str(engine_json), "--idle-timeout", idle_timeout]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    offset = os.fstat(fd).st_size
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        raise SqlrsError(f"sqlrs: no engine at {engine_json} and cannot start {argv[0]}: "
                         f"{exc.strerror}") from None
    finally:
        os.close(fd)
    _SPAWNED.append(proc)
    while True:
        code = proc.poll()
        if code is not None:
            raise SqlrsError(f"sqlrs: no engine at {engine_json} and the one started exited "
                             f"with code {code}: {_log_tail(log, offset)} (log: {log})")
        client = healthy_client(engine_json)
        if client:
            return client
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            raise SqlrsError(f"sqlrs: the engine started for {engine_json} did not become "
                             f"healthy in time (log: {log})")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# the per-process session: engine, states, instances, deletes
# --------------------------------------------------------------------------------------------


class Dsn(str):
    """A DSN whose ``repr`` hides the password: pytest prints fixture values in failure
    reports, and those end up in CI logs."""

    def __repr__(self) -> str:
        parts = urllib.parse.urlsplit(self)
        user, at, host = parts.netloc.rpartition("@")
        if at and ":" in user:
            user = user.split(":", 1)[0] + ":***"
        return repr(urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{at}{host}")))


@dataclass
class Instance:
    """An instance a test got: ``dsn`` carries its password; ``kept`` once it survives a
    failed test (``--sqlrs-keep-failed``)."""

    instance_id: str
    dsn: str
    expires_at: str | None
    kept: bool = False

    @property
    def public_dsn(self) -> str:
        """The DSN without its password."""
        parts = urllib.parse.urlsplit(self.dsn)
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].split(":", 1)[0]
        host = f"{user}@{netloc[2]}" if netloc[1] else netloc[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _step_failure(client: EngineClient, job_id: str, events: list[JsonDict],
                  job: JsonDict, spec: PrepareSpec) -> SqlrsError:
    """One clear line for a failed prepare (the failing step and its key output line), then
    the step's output."""
    error = job.get("error") or next((e.get("error") for e in reversed(events)
                                      if e.get("type") == "error"), None) or {}
    failed_task = next((e.get("task_id") for e in reversed(events)
                        if e.get("type") == "task" and e.get("status") == "failed"), None)
    step = ""
    if failed_task:
        with contextlib.suppress(SqlrsError, ValueError, TypeError):
            tasks = client.call("GET", f"/v1/tasks?job={job_id}")
            steps = [t for t in tasks if t.get("type") == "state_execute"]
            for index, task in enumerate(steps, 1):
                if task.get("task_id") == failed_task:
                    what = task.get("args_summary") or ":".join(
                        str(task.get(k, "")) for k in ("changeset_path", "changeset_id"))
                    step = f" at step {index} of {len(steps)} ({what})"
    details = str(error.get("details") or "")
    output = [line for line in details.splitlines() if line.strip()]
    if not output and failed_task:  # the step's own log lines
        output = [str(e.get("message", "")) for e in events
                  if e.get("type") == "log" and e.get("task_id") == failed_task]
    key = next((line for marker in KEY_LINE_MARKERS for line in output if marker in line),
               output[-1] if output else "")
    message = str(error.get("message") or "prepare failed")
    line = f"sqlrs: prepare {spec.label} failed{step}: {message}"
    if key:
        line += f": {key.strip()}"
    tail = output[-MAX_OUTPUT_LINES:]
    return SqlrsError(line + ("\n" + "\n".join(f"  | {o}" for o in tail) if tail else ""))


class SqlrsSession:
    """What one pytest process (one xdist worker) shares: the engine client (found or started
    on first use), the states prepared so far (each spec prepared at most once; a failure is
    remembered and raised again), a background deleter (tests never wait for a delete; the end
    of the session waits for the pending ones) and a keep-alive ping, so an engine started with
    an idle timeout does not exit during a long test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: EngineClient | SqlrsError | None = None
        self._states: dict[str, str | SqlrsError] = {}
        self._state_locks: dict[str, threading.Lock] = {}
        self._deletes: queue.Queue[str | None] = queue.Queue()
        self._deleter: threading.Thread | None = None
        self._stopped = threading.Event()
        self.reset_supported: bool | None = None
        self.reset_instances: dict[str, tuple[str, Instance]] = {}

    # engine ---------------------------------------------------------------------------------
    def client(self) -> EngineClient:
        """The engine (found or started once; a failure to is remembered and raised again)."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = connect_or_start(self.settings.engine_json,
                                                    self.settings.idle_timeout)
                    threading.Thread(target=self._keepalive, daemon=True,
                                     name="sqlrs-keepalive").start()
                except SqlrsError as exc:
                    self._client = exc
            if isinstance(self._client, SqlrsError):
                raise self._client
            return self._client

    def _keepalive(self) -> None:
        while not self._stopped.wait(KEEPALIVE_S):
            client = self._client
            if isinstance(client, EngineClient):
                with contextlib.suppress(SqlrsError):
                    client.request("GET", "/v1/health", auth=False, timeout=5)

    # states ---------------------------------------------------------------------------------
    def state(self, spec: PrepareSpec) -> str:
        """The state id of ``spec``, prepared on first use (a cache hit when the engine has
        it); raises the remembered :class:`SqlrsError` when it failed before."""
        with self._lock:
            lock = self._state_locks.setdefault(spec.key, threading.Lock())
        with lock:
            known = self._states.get(spec.key)
            if known is None:
                try:
                    known = self._prepare(spec)
                except SqlrsError as exc:
                    known = exc
                self._states[spec.key] = known
        if isinstance(known, SqlrsError):
            raise known
        return known

    def _prepare(self, spec: PrepareSpec) -> str:
        client = self.client()
        body = {**spec.body, "ttl_seconds": self.settings.ttl_s}
        answer = client.request("POST", "/v1/prepare-jobs", body)
        if answer.status not in (201, 202):
            raise SqlrsError(f"sqlrs: prepare {spec.label} refused ({answer.status}): "
                             f"{answer.error_text()}")
        job_id = str(answer.json()["job_id"])
        events = list(client.events(job_id))
        job = client.call("GET", f"/v1/prepare-jobs/{job_id}")
        if job.get("status") != "succeeded" or not job.get("result"):
            raise _step_failure(client, job_id, events, job, spec)
        result = job["result"]
        self.delete_later(str(result["instance_id"]))  # the prepare's own instance
        return str(result["state_id"])

    # instances ------------------------------------------------------------------------------
    def instance(self, state_id: str) -> Instance:
        """A fresh instance of ``state_id`` with the session's TTL."""
        entry = self.client().call("POST", "/v1/instances",
                                   {"state_id": state_id, "ttl_seconds": self.settings.ttl_s},
                                   expect=201)
        return Instance(str(entry["instance_id"]), Dsn(entry["dsn"]), entry.get("expires_at"))

    def delete_later(self, instance_id: str) -> None:
        """Delete an instance in the background (``force``: a test's leftover connections
        are ended); on any failure its TTL removes it."""
        with self._lock:
            if self._deleter is None:
                self._deleter = threading.Thread(target=self._delete_loop, daemon=True,
                                                 name="sqlrs-deleter")
                self._deleter.start()
        self._deletes.put(instance_id)

    def _delete_loop(self) -> None:
        while True:
            instance_id = self._deletes.get()
            try:
                if instance_id is None:
                    return
                client = self._client
                if isinstance(client, EngineClient):
                    with contextlib.suppress(SqlrsError):
                        client.request("DELETE", f"/v1/instances/{instance_id}?force=true")
            finally:
                self._deletes.task_done()

    def reset(self, instance: Instance, state_id: str) -> None:
        """Reset ``instance`` to ``state_id`` (``POST /v1/instances/{id}/reset``)."""
        self.client().call("POST", f"/v1/instances/{instance.instance_id}/reset",
                           {"state_id": state_id})

    def supports_reset(self) -> bool:
        """Whether the engine serves ``POST /v1/instances/{id}/reset``: asked once about an
        instance that does not exist; a missing route answers a plain-text 404 (or 405),
        the route itself a JSON error."""
        if self.reset_supported is None:
            answer = self.client().request("POST", f"/v1/instances/{'0' * 32}/reset",
                                           {"state_id": "0" * 64})
            route_missing = answer.status in (404, 405, 501) and \
                "json" not in answer.content_type
            self.reset_supported = not route_missing
        return self.reset_supported

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Wait (at most ``timeout``) for the pending deletes, then stop the threads."""
        self._stopped.set()
        if self._deleter is None:
            return
        for _, instance in self.reset_instances.values():
            if not instance.kept:
                self._deletes.put(instance.instance_id)
        self.reset_instances.clear()
        self._deletes.put(None)
        self._deleter.join(timeout)


SESSION_KEY = pytest.StashKey[SqlrsSession]()
INSTANCES_KEY = pytest.StashKey[list[Instance]]()


def _session(config: pytest.Config) -> SqlrsSession:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        session = SqlrsSession(Settings.from_config(config))
        config.stash[SESSION_KEY] = session
    return session


def _spec_for(request: pytest.FixtureRequest, session: SqlrsSession,
              prepare: str | None = None, image: str | None = None) -> PrepareSpec:
    """The spec of a test: explicit arguments, then the closest ``sqlrs`` marker, then the
    settings."""
    marker = request.node.get_closest_marker("sqlrs")
    if marker is not None:
        unknown = set(marker.kwargs) - {"prepare", "image"}
        if marker.args or unknown:
            raise SqlrsError("sqlrs: the sqlrs marker takes only prepare= and image= "
                             f"(got {marker.args or sorted(unknown)})")
        prepare = prepare or marker.kwargs.get("prepare")
        image = image or marker.kwargs.get("image")
    return prepare_spec(prepare, image, session.settings)


def _track(request: pytest.FixtureRequest, instance: Instance) -> None:
    request.node.stash.setdefault(INSTANCES_KEY, []).append(instance)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlrs_state(request: pytest.FixtureRequest) -> str:
    """The id of the state of the configured prepare (``--sqlrs-prepare``/``sqlrs_prepare``,
    ``--sqlrs-image``/``sqlrs_image``; markers do not apply to this session fixture), prepared
    once per process (a cache hit on later runs). A failing step fails every test that uses it
    with one line and the step's output."""
    session = _session(request.config)
    try:
        return session.state(prepare_spec(None, None, session.settings))
    except SqlrsError as exc:
        fail(exc)


@pytest.fixture
def sqlrs_instance(request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """A factory ``sqlrs_instance(prepare=None, image=None) -> dsn``: a fresh instance (a whole
    server) of the given prepare, else of the test's marker, else of the settings; every one
    is deleted after the test in the background (or kept with ``--sqlrs-keep-failed``)."""
    session = _session(request.config)
    mine: list[Instance] = []

    def make(prepare: str | None = None, image: str | None = None) -> str:
        try:
            instance = session.instance(session.state(_spec_for(request, session, prepare,
                                                                image)))
        except SqlrsError as exc:
            fail(exc)
        mine.append(instance)
        _track(request, instance)
        return instance.dsn

    yield make
    for instance in mine:
        if not instance.kept:
            session.delete_later(instance.instance_id)


@pytest.fixture
def sqlrs_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a fresh instance of the test's state (marker, else settings), deleted after
    the test without waiting (or kept with ``--sqlrs-keep-failed`` when the test failed)."""
    session = _session(request.config)
    try:
        instance = session.instance(session.state(_spec_for(request, session)))
    except SqlrsError as exc:
        fail(exc)
    _track(request, instance)
    yield instance.dsn
    if not instance.kept:
        session.delete_later(instance.instance_id)


@pytest.fixture
def sqlrs_reset_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of this process's (xdist worker's) instance of the test's state, reset to that
    state before the test through ``POST /v1/instances/{id}/reset``: one server per worker,
    same DSN every test. Fails the test with one line when the engine has no reset."""
    session = _session(request.config)
    try:
        spec = _spec_for(request, session)
        if not session.supports_reset():
            raise SqlrsError("sqlrs: the engine does not support reset yet "
                             "(POST /v1/instances/{id}/reset); use sqlrs_dsn")
        state_id = session.state(spec)
        known = session.reset_instances.get(spec.key)
        if known is None or known[1].kept:
            instance = session.instance(state_id)  # fresh: nothing to reset
            session.reset_instances[spec.key] = (state_id, instance)
        else:
            instance = known[1]
            session.reset(instance, state_id)
    except SqlrsError as exc:
        fail(exc)
    _track(request, instance)
    return instance.dsn


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


def _kept_section(instances: list[Instance], engine_json: Path) -> str:
    lines = []
    for instance in instances:
        expires = f", expires {instance.expires_at}" if instance.expires_at else ""
        lines += [f"instance {instance.instance_id} kept{expires} (--sqlrs-ttl sets how long)",
                  f"  dsn (no password): {instance.public_dsn}",
                  f"  connect: sqlrs run:psql --instance {instance.instance_id}",
                  f"  or get the DSN with its password: GET /v1/instances/"
                  f"{instance.instance_id} with the authToken of {engine_json}",
                  f"  remove: sqlrs rm {instance.instance_id}"]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    """With ``--sqlrs-keep-failed``: a failed test keeps its instances (teardown runs after
    this report) and its report gets a section with each one's id and DSN (no password)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and call.when != "teardown":
        instances = [i for i in item.stash.get(INSTANCES_KEY, []) if not i.kept]
        session = item.config.stash.get(SESSION_KEY, None)
        if instances and session is not None and session.settings.keep_failed:
            for instance in instances:
                instance.kept = True
            report.sections.append(("sqlrs: kept instances",
                                    _kept_section(instances, session.settings.engine_json)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture's teardown: wait for the pending deletes (bounded)."""
    sqlrs = session.config.stash.get(SESSION_KEY, None)
    if sqlrs is not None:
        sqlrs.close()
