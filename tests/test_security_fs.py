"""Security of the files the engine touches in directories the server user controls (issue 18):
root never chowns through a symlink swapped in for pg_hba.conf (defect 1); a FIFO or a symlink
to a device in a data directory or a state never hangs the engine (defect 5); a crash during
the base initialisation leaves no ``.init-*`` directory behind (defect 8); and ``\\i``-style
includes are expanded only where psql would run them and only from the work dir or the
including script's own directory (defect 9).

The engine runs as root here, so the server user (``postgres`` on the host, the image's
``postgres`` uid in Docker) is another user; it is the attacker of the first two groups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    HOST_IMAGE,
    RUNTIMES,
    EngineProcess,
    assert_error,
    container_postmaster_pid,
    exit_code,
    expose_root,
    mounts_below,
    output,
    poll,
    post_run,
    psql,
    sql_via_run,
    without_warm_pool,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the engine must run as root")

#: server restarts under attack per runtime: on the host a restart takes ~0.2 s and the
#: current engine lost about one race in five; a Docker restart (a new container) takes ~1.5 s
#: and leaves the attacker a wider window
RESTARTS = {HOST_IMAGE: 30, DOCKER_IMAGE: 15}
RESTART_BUDGET_S = 120.0  #: the restart loop gives up (and checks) after this long
ATTACK_CAP_S = 180.0  #: the attacker exits by itself after this long, whatever happens
HEALTHY_DEADLINE = 60.0
HOOK_DEADLINE = 60.0
#: an address-space cap for engines that may read an endless file (/dev/zero): a defective
#: engine fails with MemoryError instead of eating the machine's memory (an engine maps ~0.7 GB)
LIMITED_ENGINE = ["prlimit", f"--as={3 << 30}", "--", sys.executable, "-m", "sqlrs_engine"]
#: pg_hba.conf content that Postgres accepts: the symlinked victim must let servers start, so
#: that restarts keep succeeding while the attacker swaps pg_hba.conf for a symlink to it
VICTIM = (b"# sqlrs test: a root-owned file the engine must never chown or rewrite\n"
          b"local all all trust\n"
          b"host all all 0.0.0.0/0 scram-sha-256\n"
          b"host all all ::/0 scram-sha-256\n")
#: the attacker, run as the server user, for argv[3] seconds at most (or until SIGTERM; it then
#: prints how many swaps it made): as fast as it can, it swaps pg_hba.conf for a symlink to
#: argv[2], and also every other file of the data dir with "hba" in its name that is not a
#: symlink yet (the engine's temporary copy of pg_hba.conf before its rename). Errors (while
#: a restart remounts the data dir) are skipped without a pause: the engine writes pg_hba.conf
#: within a millisecond of the remount.
SWAPPER = r"""
import os, signal, sys, time
hba, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
data, mine = os.path.dirname(hba), ".sqlrs-test-swap"
staged = os.path.join(data, mine)
swaps = 0
def report(*_):
    print(swaps, flush=True)
    os._exit(0)
def plant(name):
    global swaps
    try:
        os.symlink(target, staged)
    except FileExistsError:
        pass
    os.replace(staged, os.path.join(data, name))
    swaps += 1
signal.signal(signal.SIGTERM, report)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        plant("pg_hba.conf")
        with os.scandir(data) as entries:
            temps = [e.name for e in entries if "hba" in e.name and not e.is_symlink()
                     and e.name not in ("pg_hba.conf", mine)]
        for name in temps:
            plant(name)
    except OSError:
        pass
report()
"""


# ------------------------------------------------------------------------------------ helpers


def on_host(engine: EngineProcess) -> bool:
    return engine.image == HOST_IMAGE


def instance_entry(engine: EngineProcess, instance_id: str) -> dict[str, Any]:
    result = engine.get(f"/v1/instances/{instance_id}")
    assert result.status == 200, result.body
    entry: dict[str, Any] = result.json()
    return entry


def data_dir_of(engine: EngineProcess, instance_id: str) -> Path:
    """Where the engine reads and writes the instance's server files (root engine): the data
    directory mounted for the server user, or the upper layer of an overlay the container
    mounts itself (its ``mount`` file says ``container``)."""
    runtime = engine.store / "instances" / instance_id
    if (runtime / "mount").is_file() and (runtime / "mount").read_text() == "container":
        return runtime / "upper"
    return expose_root(engine.store) / instance_id / "data"


def postmaster_pid(engine: EngineProcess, instance_id: str) -> int | None:
    """The host pid of the instance's postmaster (in Docker: inside its container, which keeps
    running when it dies); None when the instance has no running server."""
    entry = instance_entry(engine, instance_id)
    if entry["status"] != "active":
        return None
    runtime_id = str(entry["runtime_id"])
    if on_host(engine):
        assert runtime_id.startswith("host:"), entry
        return int(runtime_id.removeprefix("host:"))
    return container_postmaster_pid(runtime_id)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: a container's ``sleep`` never reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def kill_postmaster(engine: EngineProcess, instance_id: str) -> bool:
    """SIGKILL the instance's postmaster behind the engine's back and wait until the engine
    reports the instance orphaned; False when there was no running server."""
    pid = postmaster_pid(engine, instance_id)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    poll(lambda: gone(pid), 30, what=f"postmaster {pid} to exit")
    poll(lambda: instance_entry(engine, instance_id)["status"] == "orphaned", 30,
         interval=0.05, what="the instance to turn orphaned")
    return True


def kill_engine(engine: EngineProcess) -> None:
    """kill -9 the engine and everything in its process group (servers have their own). Its
    engine.json goes too, so a later engine is never taken for healthy because some other
    process now answers on the dead engine's port."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.proc.pid, signal.SIGKILL)
    engine.proc.wait(30)
    engine.engine_json.unlink(missing_ok=True)


def prepared(engine: EngineProcess, *args: str) -> dict[str, Any]:
    job = engine.prepare(list(args))
    assert job["status"] == "succeeded", job.get("error")
    return job


@contextlib.contextmanager
def swapper(hba: Path, target: str, uid: int, gid: int) -> Iterator[subprocess.Popen[str]]:
    """The attacker loop as ``uid``:``gid``; always stopped again (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         "/usr/bin/python3", "-c", SWAPPER, str(hba), target, str(ATTACK_CAP_S)],
        cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def swaps_done(proc: subprocess.Popen[str]) -> int:
    """Stop the attacker and return how many swaps it made."""
    if proc.poll() is None:
        proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert out.strip().isdigit(), (out, err)
    return int(out.strip())


def init_leftovers(store: Path) -> list[str]:
    """Every path under the store named ``.init-*`` (a base initialisation's work dir)."""
    found = []
    for root, dirs, files in os.walk(store):
        found += [os.path.join(root, name) for name in [*dirs, *files]
                  if name.startswith(".init-")]
    return sorted(found)


def include_refusal(engine: EngineProcess, args: list[str]) -> dict[str, Any]:
    """The error of a prepare refused for its includes: a 400 at submission or a failed job,
    either way with code invalid_argument; nothing of it may have run (no state)."""
    result = engine.post("/v1/prepare-jobs", {"prepare_kind": "psql", "image_id": engine.image,
                                              "psql_args": args})
    if result.status != 201:
        error = assert_error(result, 400, "invalid_argument")
    else:
        job = engine.wait_job(str(result.json()["job_id"]))
        assert job["status"] == "failed", job
        error = job["error"]
        assert error["code"] == "invalid_argument", error
    assert engine.get("/v1/states").json() == []
    return error


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------- defect 1: no chown through a swapped symlink


@RUNTIMES
def test_root_never_chowns_through_a_symlinked_pg_hba(engine: EngineProcess) -> None:
    """The server user swaps pg_hba.conf (and the engine's temporary copy of it, whatever its
    name) for a symlink to a root-owned file in a tight loop while the instance's server is
    killed and restarted by runs, each restart writing pg_hba.conf afresh: the root-owned file
    keeps its owner, mode and content. (The engine before the fix lost the race about once in
    five host restarts: it chowned pg_hba.conf by path after the rename, and its temporary's
    name repeats, so a symlink left under that name also made it truncate and rewrite the
    victim.) The victim is valid pg_hba.conf content, so servers start on either file.

    On the host the symlink points at a file in a root-owned directory outside the store. A
    Docker server resolves the symlink inside its container, where that path does not exist,
    so there the victim is a root-owned file the test puts into the data directory itself and
    the symlink is relative (the same file for the engine on the host and for the server).
    There the container mounts its own overlay and the engine writes pg_hba.conf into its
    upper layer, in the root-owned store, while the overlay is unmounted: no process of the
    server's uid can reach it, so the attacker is a host process as root (stronger than any
    real one), racing the engine's writes all the same."""
    without_warm_pool(engine)
    instance_id = str(prepared(engine, "-c", "create table t(x int)")["result"]["instance_id"])
    data = data_dir_of(engine, instance_id)
    owner = os.stat(data)
    assert owner.st_uid != 0, "the data directory should belong to the server user"
    victim_dir = Path(tempfile.mkdtemp(prefix="sqlrs-victim-"))
    try:
        if on_host(engine):
            victim_dir.chmod(0o755)  # the server may read the victim, not write next to it
            victim = victim_dir / "victim.conf"
            target = str(victim)
        else:
            victim = data / "victim.conf"
            target = victim.name
        victim.write_bytes(VICTIM)
        os.chown(victim, 0, 0)
        victim.chmod(0o644)

        successes = 0
        attempts = 0
        attacker_ids = (owner.st_uid, owner.st_gid) if on_host(engine) else (0, 0)
        with swapper(data / "pg_hba.conf", target, *attacker_ids) as attacker:
            poll(lambda: (data / "pg_hba.conf").is_symlink() or attacker.poll() is not None,
                 30, what="the attacker's first swap")
            end = time.monotonic() + RESTART_BUDGET_S
            while attempts < RESTARTS[engine.image] and time.monotonic() < end:
                attempts += 1
                kill_postmaster(engine, instance_id)
                result = post_run(engine, instance_id, "-XAt", "-c", "select 1")
                if result.status != 200:
                    continue
                events = result.ndjson()
                if events and events[-1].get("type") == "exit" and exit_code(events) == 0 \
                        and output(events).strip() == "1":
                    successes += 1
            assert attacker.poll() is None, attacker.stderr.read() if attacker.stderr else ""
            swaps = swaps_done(attacker)
        assert swaps > 0, "the attacker never managed to swap pg_hba.conf"
        assert successes > 0, f"no restart of {attempts} succeeded: the race was not exercised"

        st = os.lstat(victim)
        assert stat.S_ISREG(st.st_mode), st
        assert (st.st_uid, st.st_gid) == (0, 0), f"the victim was chowned to {st.st_uid}"
        assert stat.S_IMODE(st.st_mode) == 0o644, oct(st.st_mode)
        assert victim.read_bytes() == VICTIM
    finally:
        shutil.rmtree(victim_dir, ignore_errors=True)


# ------------------------------------------------ defect 5: FIFOs and symlinks never hang it


@RUNTIMES
def test_a_fifo_for_postmaster_pid_does_not_hang_a_restart(engine_factory: Any) -> None:
    """The server replaces its postmaster.pid with a FIFO, then the engine and the server die:
    the next engine on the store becomes healthy and deletes the instance (before the fix,
    adopting the instance opened the FIFO and waited for a writer forever)."""
    engine: EngineProcess = without_warm_pool(engine_factory())
    instance_id = str(prepared(engine, "-c", "create table t(x int)")["result"]["instance_id"])
    pid = postmaster_pid(engine, instance_id)
    assert pid is not None
    sql_via_run(engine, instance_id,
                "copy (select 1) to program 'rm -f postmaster.pid; mkfifo postmaster.pid'")
    pid_file = Path(f"/proc/{pid}/cwd") / "postmaster.pid"  # its data or server directory
    assert stat.S_ISFIFO(os.lstat(pid_file).st_mode), "the server did not plant the FIFO"
    kill_engine(engine)
    os.kill(pid, signal.SIGKILL)
    poll(lambda: gone(pid), 30, what=f"postmaster {pid} to exit")

    again: EngineProcess = engine_factory(state_dir=engine.state_dir, wait=False)
    again.wait_ready(HEALTHY_DEADLINE)
    deleted = again.delete(f"/v1/instances/{instance_id}?force=true", timeout=HEALTHY_DEADLINE)
    assert deleted.status == 200, deleted.body
    assert again.get(f"/v1/instances/{instance_id}").status == 404


def test_a_lock_file_naming_another_server_does_not_get_it_killed(engine_factory: Any) -> None:
    """The server of instance A writes the pid of instance B's postmaster into its own lock
    file; A's server and the engine die; deleting A (which stops whatever server its lock
    file names) leaves B's server alone: a pid from a lock file is believed only for a
    postgres process whose command line names A's runtime."""
    engine: EngineProcess = without_warm_pool(engine_factory())
    if not on_host(engine):
        pytest.skip("a container's pids are not the engine's to signal")
    first = prepared(engine, "-c", "create table a(x int)")["result"]
    second = prepared(engine, "-c", "create table b(x int)")["result"]
    victim = postmaster_pid(engine, second["instance_id"])
    own = postmaster_pid(engine, first["instance_id"])
    assert victim and own
    sql_via_run(engine, first["instance_id"],
                f"copy (select 1) to program 'echo {victim} > postmaster.pid'")
    kill_engine(engine)
    os.kill(own, signal.SIGKILL)
    poll(lambda: gone(own), 30, what=f"postmaster {own} to exit")
    again: EngineProcess = engine_factory(state_dir=engine.state_dir, wait=False)
    again.wait_ready(HEALTHY_DEADLINE)
    deleted = again.delete(f"/v1/instances/{first['instance_id']}?force=true",
                           timeout=HEALTHY_DEADLINE)
    assert deleted.status == 200, deleted.body
    assert not gone(victim), "another instance's server was killed"
    assert psql(second["dsn"], "select count(*) from b") == "0"


@RUNTIMES
def test_hostile_top_level_files_neither_hang_nor_leak_a_snapshot_or_reset(
        engine_factory: Any) -> None:
    """The server replaces top-level files where it runs (as root on the host, its server
    directory, which the engine copies to and from) with a FIFO and a symlink to a root-only
    file: a snapshot (which writes them back into the data) and resets (which make the
    directory again) neither block on the FIFO nor copy the symlink's target; the instance
    and an instance of the snapshot work. (In a container the FIFO would be in the snapshot:
    Postgres itself then waits on it, until the engine's start deadline.)"""
    engine: EngineProcess = without_warm_pool(engine_factory())
    if engine.image != HOST_IMAGE:
        pytest.skip("the server directory is the host runtime's")
    job = prepared(engine, "-c", "create table t(x int)")
    instance_id = job["result"]["instance_id"]
    secret = Path(tempfile.mkdtemp()) / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    try:
        assert engine.post(f"/v1/instances/{instance_id}/reset").status == 200  # (a seed)
        sql_via_run(engine, instance_id, "copy (select 1) to program 'rm -f postgresql.auto.conf;"
                    f" mkfifo postgresql.auto.conf; ln -sf {secret} pg_ident.conf;"
                    f" ln -sf {secret} stolen'")
        made = engine.post(f"/v1/instances/{instance_id}/snapshot", timeout=HEALTHY_DEADLINE)
        assert made.status == 201, made.body
        branch = engine.post("/v1/instances", {"state_id": made.json()["state_id"]},
                             timeout=HEALTHY_DEADLINE)
        assert branch.status == 201, branch.body
        assert sql_via_run(engine, branch.json()["instance_id"], "select count(*) from t") == "0"
        for _ in range(2):
            reset = engine.post(f"/v1/instances/{instance_id}/reset", timeout=HEALTHY_DEADLINE)
            assert reset.status == 200, reset.body
            assert sql_via_run(engine, instance_id, "select count(*) from t") == "0"
        stolen = sql_via_run(engine, instance_id, "select count(*) from pg_ls_dir('.') d"
                             " where d in ('stolen', 'pg_ident.conf')")
        assert stolen in ("0", "1"), stolen  # pg_ident.conf again, no 'stolen'
        for path in engine.store.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                assert b"root's secret" not in path.read_bytes(), path
    finally:
        shutil.rmtree(secret.parent)


@RUNTIMES
def test_a_state_with_pg_hba_linked_to_a_device_neither_hangs_nor_breaks_a_start(
        engine_factory: Any) -> None:
    """A prepare step turns pg_hba.conf into a symlink to /dev/zero, and the full copy
    published as the state keeps it: an engine restarted on the store becomes healthy (it
    reads the unused full-copy states' pg_hba.conf at start) and a new instance of the state
    gets a regular pg_hba.conf and a working DSN. Engines run with an address-space cap, so a
    read of /dev/zero fails instead of exhausting the machine's memory."""
    engine: EngineProcess = engine_factory(argv0=LIMITED_ENGINE)
    result = engine.request("PATCH", "/v1/config",  # states are layers by default
                            {"path": "snapshot.backend", "value": "copy"})
    assert result.status == 200, result.body
    engine.stop()
    engine = engine_factory(state_dir=engine.state_dir, argv0=LIMITED_ENGINE)
    without_warm_pool(engine)
    job = prepared(engine, "-c", "copy (select 1) to program "
                   "'rm -f pg_hba.conf; ln -s /dev/zero pg_hba.conf'")
    state_id = job["result"]["state_id"]
    [hba] = list(engine.store.glob(f"engines/*/*/states/{state_id}/pgdata/pg_hba.conf"))
    assert hba.is_symlink() and os.readlink(hba) == "/dev/zero", "the state lost the symlink"
    deleted = engine.delete(f"/v1/instances/{job['result']['instance_id']}")
    assert deleted.status == 200, deleted.body  # an unused state is checked at start
    assert engine.stop() == 0

    again: EngineProcess = engine_factory(state_dir=engine.state_dir, argv0=LIMITED_ENGINE,
                                          wait=False)
    again.wait_ready(HEALTHY_DEADLINE)
    created = again.post("/v1/instances", {"state_id": state_id}, timeout=120)
    assert created.status == 201, created.body
    entry = created.json()
    assert psql(entry["dsn"], "select 1") == "1"
    written = os.lstat(data_dir_of(again, entry["instance_id"]) / "pg_hba.conf")
    assert stat.S_ISREG(written.st_mode), "the server started on a pg_hba.conf that is no file"


# ------------------------------------------------------ defect 8: no crash leftovers of init


@RUNTIMES
def test_a_crash_during_base_initialisation_leaves_no_init_dir(engine_factory: Any,
                                                               tmp_path: Path) -> None:
    """The engine dies (kill -9) while it initialises the base cluster (pause point
    ``init-base``: its ``.init-*`` work dir exists, initdb has not run): the next engine on
    the store leaves no ``.init-*`` path anywhere under it and prepares normally."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "init-base").touch()
    first: EngineProcess = engine_factory(env={"SQLRS_TEST_HOOKS_DIR": str(hooks)})
    job_id = first.submit(["-c", "create table t(x int)"])
    try:
        poll(lambda: (hooks / "init-base.reached").exists()
             or first.get(f"/v1/prepare-jobs/{job_id}").json()["status"] in ("succeeded",
                                                                             "failed"),
             HOOK_DEADLINE, interval=0.05, what="pause point init-base")
        assert (hooks / "init-base.reached").exists(), "the job never paused at init-base"
        assert init_leftovers(first.store), "paused at init-base without an .init-* directory"
    finally:
        kill_engine(first)
        (hooks / "init-base.release").touch()

    again: EngineProcess = engine_factory(state_dir=first.state_dir, wait=False)
    again.wait_ready(HEALTHY_DEADLINE)
    again.wait_job(job_id, 300)  # resumed or given up: either way no initialisation runs now
    assert init_leftovers(again.store) == []
    exposed = expose_root(again.store)
    assert [p for p in mounts_below(exposed) if "/init-" in p] == []
    assert not [n for n in os.listdir(exposed) if n.startswith("init-")]
    prepared(again, "-c", "create table u(x int)")
    assert init_leftovers(again.store) == []


# ---------------------------------------------------------------- defect 9: psql includes


@pytest.mark.parametrize("script, expected_body", [
    pytest.param("create table t as select $q$\n\\i /etc/hostname\n$q$::text as body;\n",
                 "\\i /etc/hostname", id="dollar-quote"),
    pytest.param("create table t as select $q$ $$\n\\i /etc/hostname\n$$ $q$::text as body;\n",
                 "$$\n\\i /etc/hostname\n$$", id="dollar-quote-holding-another-tag"),
    pytest.param("create table t as select '\n\\i /etc/hostname\n'::text as body;\n",
                 "\\i /etc/hostname", id="single-quote"),
    pytest.param("create table t as select E'it\\'s\n\\i /etc/hostname\n'::text as body;\n",
                 "it's\ni /etc/hostname", id="escape-string-with-escaped-quote"),
    pytest.param("create table t as select 'ok'::text as body /*\n\\i leak.sql\n*/;\n",
                 "ok", id="block-comment"),
    pytest.param("create table t as select 'ok'::text as body /* a /* b */\n\\i leak.sql\n*/;\n",
                 "ok", id="nested-block-comment"),
])
def test_an_include_line_inside_a_string_or_comment_is_not_expanded(
        engine: EngineProcess, tmp_path: Path, script: str, expected_body: str) -> None:
    """psql runs no backslash command inside a quoted string or a block comment, so the engine
    (which expands includes itself and feeds psql the result) must not expand one there:
    the string keeps the literal line, and a file that would close the comment and create a
    table is not read."""
    work = tmp_path / "work"
    write(work / "leak.sql", "*/; create table leaked(x int); /*\n")
    main = write(work / "main.sql", script)
    job = engine.prepare(["-f", str(main)])
    assert job["status"] == "succeeded", job.get("error")
    dsn = job["result"]["dsn"]
    body = psql(dsn, "select body from t")
    assert expected_body in body, body
    assert "sqlrs: include-boundary" not in body, body
    assert psql(dsn, "select count(*) from pg_class where relname = 'leaked'") == "0"


@pytest.mark.parametrize("layout", ["absolute-system-file", "absolute-outside", "relative-up",
                                    "include-relative-up", "nested-relative-up", "symlink"])
def test_an_include_outside_the_work_dir_and_its_own_dir_is_refused(
        engine: EngineProcess, tmp_path: Path, layout: str) -> None:
    """An include whose real path lies outside both the work dir (the first -f file's
    directory) and the including script's own directory is refused with invalid_argument
    naming the file, and nothing runs."""
    work = tmp_path / "work"
    outside = write(tmp_path / "outside.sql", "create table escaped(x int);\n")
    names: tuple[str, ...] = ("outside.sql",)
    if layout == "absolute-system-file":
        line, names = "\\i /etc/hostname", ("/etc/hostname",)
    elif layout == "absolute-outside":
        line = f"\\i {outside}"
    elif layout == "relative-up":
        line = "\\ir ../outside.sql"
    elif layout == "include-relative-up":
        line = "\\include_relative ../outside.sql"
    elif layout == "nested-relative-up":
        write(work / "sub" / "inner.sql", "\\ir ../../outside.sql\n")
        line = "\\i sub/inner.sql"
    else:
        work.mkdir()
        (work / "link.sql").symlink_to(outside)
        line, names = "\\i link.sql", ("link.sql", "outside.sql")
    main = write(work / "main.sql", f"create table before_include(x int);\n{line}\n")
    error = include_refusal(engine, ["-f", str(main)])
    text = f"{error['message']} {error.get('details', '')}"
    assert any(name in text for name in names), error


def test_includes_from_the_work_dir_or_the_scripts_own_dir_still_apply(
        engine: EngineProcess, tmp_path: Path) -> None:
    """``\\i`` below the work dir, ``\\ir`` next to the including script (also for a second -f
    script in another directory) are expanded and applied, also after quotes, identifiers,
    dollar quotes and comments that hold quote or comment characters and are closed."""
    work = tmp_path / "work"
    main = write(work / "main.sql",
                 "-- it's only a comment /* $x$ '\n"
                 "create table quoted(a text default 'C:\\', b text default $d$ ' /* $d$,"
                 " \"c'x\" int);\n"
                 "\\i sub/x.sql\n"
                 "\\ir y.sql\n"
                 "insert into from_x values (1);\n")
    write(work / "sub" / "x.sql", "create table from_x(x int);\n\\ir z.sql\n")
    write(work / "sub" / "z.sql", "create table from_z(x int);\n")
    write(work / "y.sql", "create table from_y(x int);\n")
    second = write(tmp_path / "other" / "second.sql", "\\ir helper.sql\n")
    write(tmp_path / "other" / "helper.sql", "create table from_helper(x int);\n")
    job = engine.prepare(["-f", str(main), "-f", str(second)])
    assert job["status"] == "succeeded", job.get("error")
    dsn = job["result"]["dsn"]
    tables = psql(dsn, "select string_agg(relname, ',' order by relname) from pg_class"
                       " where relname in ('quoted', 'from_x', 'from_y', 'from_z',"
                       " 'from_helper')")
    assert tables == "from_helper,from_x,from_y,from_z,quoted"
    assert psql(dsn, "select count(*) from from_x") == "1"
    assert psql(dsn, "select column_default from information_schema.columns"
                     " where table_name = 'quoted' and column_name = 'a'") == "'C:\\'::text"
