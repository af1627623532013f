"""Security of the engine's own files, of its HTTP front door and of what its children see
(issue 18): a state dir someone else controls is refused, never repaired (defect 2); a client
without the token cannot make the engine buffer bodies or hold connections (defect 3); one
long output line neither floods the store nor is repeated by heartbeats (defect 4); and no
client or server the engine starts inherits the engine's environment (defect 6)."""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import re
import secrets
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    RUNTIMES,
    STARTUP_DEADLINE,
    EngineProcess,
    HttpResult,
    cleanup_store,
    exit_code,
    expose_root,
    output,
    poll,
    post_run,
    postgres_pids_below,
    run_events,
)

NOBODY = pwd.getpwnam("nobody")
MIB = 1024 * 1024
#: what "answered at once" means where the old engine waited for the 30 s read timeout
AT_ONCE_S = 5.0
#: how long a raw socket waits for an answer before the test calls it missing
ANSWER_WAIT_S = 15.0
SECRET_VAR = "SQLRS_TEST_SECRET"
ENV_LINE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=", re.MULTILINE)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block (and the engines it starts) with ``mask``: the engine's files must be
    private whatever umask it inherits."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------- engines that should refuse


@dataclass
class Launched:
    """An engine started without the harness's layout: stderr goes to a file outside the
    state dir, so the harness creates nothing inside the directory under test."""

    proc: subprocess.Popen[bytes]
    engine_json: Path
    store: Path
    stderr: Path

    def refused(self, deadline_s: float = STARTUP_DEADLINE) -> str:
        """Wait for the engine to exit; it must exit 1 without having written engine.json.
        Returns its stderr."""
        poll(lambda: self.proc.poll() is not None or self.engine_json.exists(), deadline_s,
             what="the engine to exit")
        if self.proc.poll() is None:
            raise AssertionError("the engine started (wrote engine.json) instead of refusing")
        text = self.stderr.read_text()
        assert self.proc.returncode == 1, (self.proc.returncode, text[-2000:])
        return text


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start engines with the CLI's argv; stop them and clean their stores afterwards."""
    started: list[Launched] = []

    def start(engine_json: Path, env: dict[str, str] | None = None) -> Launched:
        env = env or {}
        store = Path(env.get("SQLRS_STATE_STORE") or engine_json.parent / "state-store")
        stderr = tmp_path / f"engine-{len(started)}.stderr"
        cmd = [sys.executable, "-m", "sqlrs_engine", "--run-dir", str(tmp_path / "run"),
               "--listen", "127.0.0.1:0", "--write-engine-json", str(engine_json),
               "--idle-timeout", "0"]
        with open(stderr, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out,
                                    env={**os.environ, **env}, start_new_session=True)
        started.append(Launched(proc, engine_json, store, stderr))
        return started[-1]

    yield start
    for item in started:
        if item.proc.poll() is None:
            item.proc.terminate()
            try:
                item.proc.wait(30)
            except subprocess.TimeoutExpired:
                item.proc.kill()
                item.proc.wait(30)
        cleanup_store(item.store)


def give_to_nobody(*paths: Path) -> None:
    for path in paths:
        os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)


# ----------------------------------------------------------------------- raw HTTP


def request_head(engine: EngineProcess, method: str, path: str, *, host: str | None = None,
                 token: str | None = None, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{engine.port}'}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(engine: EngineProcess, timeout: float = ANSWER_WAIT_S) -> socket.socket:
    return socket.create_connection((engine.host, engine.port), timeout=timeout)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def read_answer(sock: socket.socket) -> HttpResult:
    """One HTTP answer from ``sock`` (each read waits for the socket's timeout): its status
    line, headers and Content-Length body (as much of it as came before the connection
    closed)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = _recv(sock)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head, "the connection closed without an answer"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
        assert match, f"not an HTTP status line: {status_line!r}"
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(body) < length:
            chunk = _recv(sock)
            if not chunk:
                break
            body += chunk
    except TimeoutError:
        raise AssertionError(f"no complete answer within the socket's timeout: {data[:200]!r}"
                             ) from None
    return HttpResult(int(match[1]), headers, body[:length])


def memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


# ============================================================ A. state dir (defect 2)


def test_a_state_dir_owned_by_another_user_is_refused(launch: Callable[..., Launched],
                                                      tmp_path: Path) -> None:
    """Issue 18 defect 2: a state dir another user owns is refused before anything in it is
    used: its ``state-store/instances`` could be a symlink into root's files, and the root
    engine's clean-up of leftover runtimes would delete there. Nothing is chowned back."""
    state = tmp_path / "state"
    store = state / "state-store"
    store.mkdir(parents=True)
    precious = tmp_path / "precious"
    (precious / "data").mkdir(parents=True)
    marker = precious / "data" / "marker"  # in a directory: rmtree would take it
    marker.write_text("root's file\n")
    (store / "instances").symlink_to(precious)
    state.chmod(0o700)
    store.chmod(0o700)
    give_to_nobody(state, store, store / "instances")
    message = launch(state / "engine.json").refused()
    assert "owned by" in message, message[-2000:]
    assert marker.exists()
    assert os.stat(state).st_uid == NOBODY.pw_uid
    assert mode_of(state) == 0o700


def test_a_state_dir_writable_by_others_is_refused_and_left_alone(
        launch: Callable[..., Launched], tmp_path: Path) -> None:
    """Issue 18 defect 2: a root-owned state dir that everyone may write (no sticky bit) is
    refused, and its mode stays: the engine never chmods a directory it did not create."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    message = launch(state / "engine.json").refused()
    assert "writable by" in message, message[-2000:]
    assert mode_of(state) == 0o777


def test_engine_json_in_a_sticky_shared_dir_is_refused(launch: Callable[..., Launched],
                                                       tmp_path: Path) -> None:
    """Issue 18 defect 2: ``--write-engine-json`` straight inside a sticky world-writable
    directory (like /tmp) would make that directory the state dir: refused, mode unchanged."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    launch(shared / "engine.json").refused()
    assert mode_of(shared) == 0o1777


def test_a_state_store_owned_by_another_user_is_refused(launch: Callable[..., Launched],
                                                        tmp_path: Path) -> None:
    """Issue 18 defect 2: ``SQLRS_STATE_STORE`` naming a directory another user owns is
    refused, and that directory is not taken over."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    give_to_nobody(store)
    launch(tmp_path / "state" / "engine.json", {"SQLRS_STATE_STORE": str(store)}).refused()
    assert os.stat(store).st_uid == NOBODY.pw_uid
    assert mode_of(store) == 0o700


def test_engine_files_are_private(engine_factory: Any) -> None:
    """Issue 18 defect 2: the metadata database (with its WAL and shared-memory files), the
    config file and the engine's log are readable by the engine's user only, even when the
    engine inherits a permissive umask."""
    with umask(0o022):
        engine: EngineProcess = engine_factory()
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job
    result = engine.request("PATCH", "/v1/config", {"path": "log.level", "value": "info"})
    assert result.status == 200, result.body
    files = [engine.store / name for name in
             ("state.db", "state.db-wal", "state.db-shm", "config.json")]
    files.append(engine.state_dir / "logs" / "engine.log")
    modes = {str(path.relative_to(engine.state_dir)): mode_of(path) for path in files}
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert not loose, loose


# ===================================================== B. pre-auth memory (defect 3)

FLOOD_CONNECTIONS = 40
FLOOD_BODY = 16 * MIB
FLOOD_GROWTH_LIMIT_KB = 150 * 1024


def test_bodies_of_foreign_host_requests_are_never_buffered(engine: EngineProcess) -> None:
    """Issue 18 defect 3: 40 clients with a foreign Host and no token, each announcing and
    sending a 16 MiB body, get an error each and grow the engine by far less than the 640 MiB
    their bodies hold; the engine keeps serving."""
    pid = engine.proc.pid
    baseline = memory_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts from here
    payload = b"x" * FLOOD_BODY
    head = request_head(engine, "POST", "/v1/prepare-jobs", host="evil.example",
                        length=FLOOD_BODY)
    answers: dict[int, HttpResult | str] = {}
    all_connected = threading.Barrier(FLOOD_CONNECTIONS, timeout=120)

    def read_into(index: int, sock: socket.socket) -> None:
        try:
            answers[index] = read_answer(sock)
        except (OSError, AssertionError) as exc:
            answers[index] = repr(exc)
        finally:  # answered (or not): stop sending
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def flood(index: int) -> None:
        try:
            with connect(engine, timeout=120) as sock:
                sock.sendall(head)
                reader = threading.Thread(target=read_into, args=(index, sock), daemon=True)
                reader.start()
                with contextlib.suppress(threading.BrokenBarrierError):
                    all_connected.wait()  # the bodies come all at once
                with contextlib.suppress(OSError):  # an engine may cut the body off
                    sock.sendall(payload)
                reader.join(180)
        except OSError as exc:
            answers.setdefault(index, repr(exc))

    threads = [threading.Thread(target=flood, args=(n,), daemon=True)
               for n in range(FLOOD_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not any(thread.is_alive() for thread in threads), "a flooding client hung"
    growth = memory_kb(pid, "VmHWM") - baseline
    assert growth < FLOOD_GROWTH_LIMIT_KB, f"the engine grew by {growth // 1024} MiB"
    statuses = {n: a.status if isinstance(a, HttpResult) else a for n, a in answers.items()}
    assert len(statuses) == FLOOD_CONNECTIONS, statuses
    assert all(isinstance(s, int) and 400 <= s < 500 for s in statuses.values()), statuses
    assert engine.get("/v1/health", auth=False).status == 200


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_an_unauthorised_body_is_answered_before_it_arrives(engine: EngineProcess,
                                                            token: str | None) -> None:
    """Issue 18 defect 3: a request without the right token that announces a 16 MiB body gets
    its 401 at once, without the engine waiting for (and holding) the body."""
    with connect(engine) as sock:
        started = time.monotonic()
        sock.sendall(request_head(engine, "POST", "/v1/prepare-jobs", token=token,
                                  length=16 * MIB))
        answer = read_answer(sock)
        elapsed = time.monotonic() - started
    assert answer.status == 401, (answer.status, answer.body[:200])
    assert elapsed < AT_ONCE_S, f"answered after {elapsed:.1f}s"


def test_an_oversized_body_is_refused_at_once(engine: EngineProcess) -> None:
    """Issue 18 defect 3: an authorised request announcing a 1 GiB body gets a JSON 413 at
    once, before any of the body is sent."""
    with connect(engine) as sock:
        started = time.monotonic()
        sock.sendall(request_head(engine, "POST", "/v1/prepare-jobs", token=engine.token,
                                  length=1024 * MIB))
        answer = read_answer(sock)
        elapsed = time.monotonic() - started
    assert answer.status == 413, (answer.status, answer.body[:200])
    error = answer.json()
    assert isinstance(error, dict) and isinstance(error.get("code"), str), error
    assert elapsed < AT_ONCE_S, f"answered after {elapsed:.1f}s"


def test_connections_are_bounded(engine_factory: Any) -> None:
    """Issue 18 defect 3: with SQLRS_ENGINE_MAX_CONNECTIONS=8, eight idle connections take
    every slot: a ninth is answered 503 ``too_many_connections`` (not served, not left
    hanging), and the engine serves again once the eight are gone."""
    engine: EngineProcess = engine_factory(env={"SQLRS_ENGINE_MAX_CONNECTIONS": "8",
                                                "SQLRS_ENGINE_READ_TIMEOUT": "60"})
    with contextlib.ExitStack() as idle:
        for _ in range(8):
            idle.enter_context(connect(engine))
        with connect(engine) as ninth:
            with contextlib.suppress(OSError):  # an engine may answer before the request
                ninth.sendall(request_head(engine, "GET", "/v1/health"))
            answer = read_answer(ninth)
        assert answer.status == 503, (answer.status, answer.body[:200])
        assert answer.json()["code"] == "too_many_connections", answer.body[:200]
    poll(engine.healthy, 30, what="/v1/health once the idle connections closed")


# ================================================ C. long lines, heartbeats (defect 4)

LONG_LINE = 10_000_000
MAX_EVENT_MESSAGE = 100_000


def test_a_long_output_line_is_cut_and_never_repeated(engine: EngineProcess,
                                                      tmp_path: Path) -> None:
    """Issue 18 defect 4: a step printing one 10 MB line and then staying silent for 12 s
    stores that line cut to its head with a note of what was cut, and heartbeats through the
    silence never store the output again; the store reclaims freed pages (incremental
    auto-vacuum)."""
    script = tmp_path / "long.sql"
    # unaligned: the long line is the last output before the silence (aligned output would
    # end with a blank line, and an engine repeating the last line would repeat that)
    script.write_text(f"\\pset tuples_only on\n\\pset format unaligned\n"
                      f"select repeat('x', {LONG_LINE});\nselect pg_sleep(12);\n")
    job_id = engine.submit(["-f", str(script)])
    job = engine.wait_job(job_id, deadline_s=600)
    assert job["status"] == "succeeded", job.get("error")

    db_path = engine.store / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        longest = db.execute("SELECT max(length(message)) FROM prepare_events").fetchone()[0]
        logs = [row[0] for row in db.execute(
            "SELECT message FROM prepare_events WHERE job_id = ? AND type = 'log'"
            " ORDER BY seq", (job_id,))]
        auto_vacuum = db.execute("PRAGMA auto_vacuum").fetchone()[0]
    assert longest <= MAX_EVENT_MESSAGE, f"a stored message of {longest} characters"
    assert any("xxxxxxxx" in m and "cut" in m for m in logs if m), [
        (m or "")[:120] for m in logs]
    repeated = {m[:80]: n for m, n in collections.Counter(
        m for m in logs if m and len(m) > 1000).items() if n > 1}
    assert not repeated, repeated
    assert auto_vacuum == 2

    events = engine.get(f"/v1/prepare-jobs/{job_id}/events", timeout=300).ndjson()
    messages = [str(e.get("message") or "") for e in events]
    assert max(len(m) for m in messages) <= MAX_EVENT_MESSAGE
    assert any(e["type"] == "log" and "xxxxxxxx" in m and "cut" in m
               for e, m in zip(events, messages, strict=True))


# ====================================================== D. environment (defect 6)


@dataclass
class SecretSetup:
    engine: EngineProcess
    secret: str
    job: dict[str, Any]

    @property
    def instance(self) -> str:
        return str(self.job["result"]["instance_id"])

    def assert_clean(self, text: str) -> None:
        leaks = [line[:200] for line in text.splitlines()
                 if self.secret in line or SECRET_VAR in line]
        assert not leaks, leaks


@pytest.fixture
def secret_setup(engine_factory: Any) -> SecretSetup:
    """An engine whose environment holds a secret, and a prepare whose step ran ``\\! env``."""
    secret = f"s3cret-{secrets.token_hex(16)}"
    engine: EngineProcess = engine_factory(env={SECRET_VAR: secret})
    job = engine.prepare(["-c", "\\! env"])
    assert job["status"] == "succeeded", job.get("error")
    return SecretSetup(engine, secret, job)


@RUNTIMES
def test_prepare_clients_do_not_inherit_the_engine_environment(
        secret_setup: SecretSetup) -> None:
    """Issue 18 defect 6: psql run for a prepare step gets an environment of its own: its
    ``\\! env`` shows variables, none of them the engine's."""
    events = secret_setup.engine.get(
        f"/v1/prepare-jobs/{secret_setup.job['job_id']}/events").ndjson()
    text = "\n".join(str(e.get("message") or "") for e in events)
    assert re.search(r"^psql: [A-Za-z_][A-Za-z0-9_]*=", text, re.MULTILINE), text[-2000:]
    secret_setup.assert_clean(text)


@RUNTIMES
def test_servers_do_not_inherit_the_engine_environment(secret_setup: SecretSetup) -> None:
    """Issue 18 defect 6: the server's environment (seen through ``copy from program``) holds
    none of the engine's variables."""
    sql = ("create temp table e(l text); copy e from program 'env';"
           " select string_agg(l, E'\\n') from e")
    events = run_events(post_run(secret_setup.engine, secret_setup.instance,
                                 "-XAt", "-v", "ON_ERROR_STOP=1", "-c", sql))
    text = output(events) + output(events, "stderr")
    assert exit_code(events) == 0, text[-2000:]
    assert ENV_LINE_RE.search(text), text[-2000:]
    secret_setup.assert_clean(text)


@RUNTIMES
def test_run_clients_do_not_inherit_the_engine_environment(secret_setup: SecretSetup) -> None:
    """Issue 18 defect 6: psql started by ``POST /v1/runs`` gets an environment of its own."""
    events = run_events(post_run(secret_setup.engine, secret_setup.instance,
                                 "-XAt", "-c", "\\! env"))
    text = output(events) + output(events, "stderr")
    assert exit_code(events) == 0, text[-2000:]
    assert ENV_LINE_RE.search(text), text[-2000:]
    secret_setup.assert_clean(text)


def test_no_server_user_process_holds_the_engine_environment(
        secret_setup: SecretSetup) -> None:
    """Issue 18 defect 6 (host runtime): while a run is in progress, no process of the
    ``postgres`` user (the server, its backends, the run's psql) has the engine's variables
    in its environment."""
    engine = secret_setup.engine
    uid = pwd.getpwnam("postgres").pw_uid
    tag = f"wait_{secrets.token_hex(8)}"  # this run's psql, not another test's
    done: list[HttpResult] = []
    runner = threading.Thread(target=lambda: done.append(post_run(
        engine, secret_setup.instance, "-XAt", "-c", f"select pg_sleep(3) as {tag}")),
        daemon=True)

    def server_user_pids() -> list[Path]:
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and entry.stat().st_uid == uid:
                    found.append(entry)
        return found

    def the_client() -> bool:
        for entry in server_user_pids():
            with contextlib.suppress(OSError):
                if tag.encode() in (entry / "cmdline").read_bytes():
                    return True
        return False

    runner.start()
    try:
        poll(the_client, 60, what="the run's psql")
        scanned: dict[int, tuple[str, bytes]] = {}
        for entry in server_user_pids():
            with contextlib.suppress(OSError):
                scanned[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().decode("utf-8", "replace"),
                    (entry / "environ").read_bytes())
    finally:
        runner.join(120)
    assert done and exit_code(run_events(done[0])) == 0
    cmdlines = [cmdline for cmdline, _environ in scanned.values()]
    assert any(tag in cmdline for cmdline in cmdlines), cmdlines
    assert len(scanned) >= 2, cmdlines  # the client and at least its server
    holders = [cmdline.replace("\0", " ")[:200] for cmdline, environ in scanned.values()
               if secret_setup.secret.encode() in environ or SECRET_VAR.encode() in environ]
    assert not holders, holders


def test_servers_and_clients_run_as_the_server_user_alone(engine: EngineProcess) -> None:
    """A root engine runs Postgres and its clients as ``postgres`` (real, effective and saved
    ids), with no supplementary groups and no capabilities: through util-linux's setpriv when
    root owns it, else Popen's own switch."""
    if os.geteuid() != 0:
        pytest.skip("the engine drops privileges only as root")
    server_user = pwd.getpwnam("postgres")
    job = engine.prepare(["-c", "create table t(x int)"])
    assert job["status"] == "succeeded", job.get("error")
    pids = postgres_pids_below(engine.store, expose_root(engine.store))
    assert pids, "no server of the engine found"
    for pid in pids:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        assert status["Uid"].split() == [str(server_user.pw_uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(server_user.pw_gid)] * 4, status["Gid"]
        assert status["Groups"].split() == [], status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    events = run_events(post_run(engine, job["result"]["instance_id"], "-XAt", "-c",
                                 "select current_user, pg_backend_pid()"))
    assert exit_code(events) == 0, events
    # the client (psql) ran as the server user too: its whoami through the server
    whoami = run_events(post_run(engine, job["result"]["instance_id"], "-XAt", "-c",
                                 r"\! id -u; id -G"))
    assert output(whoami).split() == [str(server_user.pw_uid), str(server_user.pw_gid)], \
        output(whoami, "stderr")
