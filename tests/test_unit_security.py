"""Unit tests of the file, environment, output and include rules that keep a database
superuser (who can run programs as the server's OS user) from reaching root, and of the warm
pool's failure path (issue 18 and 19)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit


# files in directories other users control ---------------------------------------------------

def test_write_file_in_replaces_a_symlink_and_never_touches_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("root's file\n")
    target.chmod(0o644)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "pg_hba.conf").symlink_to(target)
    se.write_file_in(str(data_dir), "pg_hba.conf", b"new\n", 0o600)
    written = data_dir / "pg_hba.conf"
    assert not written.is_symlink()
    assert written.read_bytes() == b"new\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert target.read_text() == "root's file\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in data_dir.iterdir()) == ["pg_hba.conf"]  # no temporary left


def test_write_file_in_refuses_a_directory_that_is_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        se.write_file_in(str(tmp_path / "link"), "f", b"x", 0o600)
    assert not (tmp_path / "real" / "f").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_write_file_in_gives_the_owner_through_the_descriptor(tmp_path: Path) -> None:
    se.write_file_in(str(tmp_path), "f", b"x", 0o600, (65534, 65534))
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_read_regular_file_refuses_fifos_symlinks_and_devices(tmp_path: Path) -> None:
    fifo = tmp_path / "postmaster.pid"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # answered at once: a FIFO is never waited on
        se.read_regular_file(str(fifo))
    link = tmp_path / "link"
    link.symlink_to("/dev/zero")
    with pytest.raises(OSError):
        se.read_regular_file(str(link))
    with pytest.raises(OSError):
        se.read_regular_file("/dev/zero", follow=True)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 10_000)
    assert se.read_regular_file(str(big), 100) == b"x" * 100


def test_postmaster_pid_that_is_a_fifo_reads_as_missing(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "postmaster.pid")
    assert se.read_postmaster_pid(str(tmp_path)) == []


def test_a_state_whose_hba_is_a_symlink_to_dev_zero_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "pgdata").mkdir()
    (tmp_path / "pgdata" / "pg_hba.conf").symlink_to("/dev/zero")
    assert se._trusts_tcp(str(tmp_path)) is False


# directories the engine is given ----------------------------------------------------------

def test_private_dirs(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b"
    se.ensure_private_dir(str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ValueError, match="writable by others"):
        se.ensure_private_dir(str(shared))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # refused and left as it was
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    with pytest.raises(ValueError, match="writable by its group"):
        se.ensure_private_dir(str(group))
    link = tmp_path / "link"
    link.symlink_to(fresh)
    assert se.private_dir_problem(str(link)) is None
    assert "not a directory" in (se.private_dir_problem(str(link), follow=False) or "")


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory of another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(ValueError, match="owned by uid 65534"):
        se.ensure_private_dir(str(other))
    assert stat.S_IMODE(other.stat().st_mode) == 0o700


def test_database_is_private_and_vacuums_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old_umask = os.umask(0o022)
    try:
        db = se.SqlitePool(str(path))
        se.JobQueue(db)
    finally:
        os.umask(old_umask)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    with db.read() as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    db.close()


def test_a_full_disk_in_sqlite_is_a_full_disk(tmp_path: Path) -> None:
    db = se.SqlitePool(str(tmp_path / "state.db"))
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    with pytest.raises(OSError) as raised, db.write():
        raise full
    assert raised.value.errno == se.errno.ENOSPC
    db.close()


# children's environment ---------------------------------------------------------------------

def test_children_get_no_secret_of_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLRS_TEST_SECRET", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = se.child_env(EXTRA="1")
    assert "s3cret" not in env.values()
    assert env["LANG"] == "C.UTF-8" and env["EXTRA"] == "1" and env["PATH"]
    user = se.ServerUser(os.geteuid(), os.getegid(), "me")
    server = se.PostgresDbms(user).server_env(PGPORT="5432")
    assert "s3cret" not in server.values() and server["PGPORT"] == "5432"
    assert server["USER"] == "me"


# output lines -------------------------------------------------------------------------------

def test_a_long_line_keeps_its_head_and_says_how_much_was_cut() -> None:
    splitter = se.LineSplitter(limit=10)
    lines = splitter.feed(b"short\n" + b"x" * 25) + splitter.feed(b"y" * 5 + b"\nend")
    lines += splitter.finish()
    assert lines == [b"short\n", b"xxxxxxxxxx \xe2\x80\xa6 [20 more bytes cut]\n", b"end"]


def test_a_long_line_comes_in_pieces_when_shown_verbatim() -> None:
    splitter = se.LineSplitter(limit=10, cut=False)
    pieces = splitter.feed(b"a" * 25) + splitter.feed(b"b\nc") + splitter.finish()
    assert b"".join(pieces) == b"a" * 25 + b"b\nc"
    assert all(len(piece) <= 10 for piece in pieces if not piece.endswith(b"\n"))


class ScriptedClient(se.ClientProcess):
    def __init__(self, lines: list[bytes]) -> None:
        self.output = lines

    def _sources(self, cut: bool) -> list[tuple[str, Iterator[bytes]]]:
        return [("stdout", iter(self.output))]


def test_the_last_line_of_a_burst_always_arrives() -> None:
    burst = [f"line {n}\n".encode() for n in range(1, 1001)] + [b"DROP ROLE\n"]
    logged: list[str] = []
    se.collect_output(ScriptedClient(burst), logged.append, "psql: ")
    assert logged[-1].startswith("psql: DROP ROLE")
    assert len(logged) < 300  # still rate limited
    counted = sum(1 + int(line.rsplit("(+", 1)[1].split()[0]) if "(+" in line else 1
                  for line in logged)
    assert counted == len(burst)  # every line is forwarded or counted by one that is


def test_a_heartbeat_never_repeats_a_long_line() -> None:
    event = {"type": "log", "message": "psql: " + "x" * 70_000}
    assert len(se.heartbeat_of(event)["message"]) <= se.HEARTBEAT_MESSAGE_CHARS + 2
    assert se.heartbeat_of({"type": "log", "message": "short"}) == {"type": "log",
                                                                   "message": "short"}


# includes -----------------------------------------------------------------------------------

def test_includes_only_where_psql_runs_them() -> None:
    script = (b"select $q$\n\\i /etc/hostname\n$q$;\n\\i a.sql\nselect 'x\n\\i b\n';\n"
              b"/* /* \n\\i c\n*/ */\n\\i d\nselect E'\\'\n\\i e\n';\nselect \"x\n\\i g\n\";\n"
              b"-- x\n\\i f\n")
    assert [m.group(2) for m in se.psql_include_lines(script)] == [b"a.sql", b"d", b"f"]


def test_includes_outside_the_work_dir_are_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (tmp_path / "outside.sql").write_text("select 'outside';\n")
    (work / "sub" / "in.sql").write_text("select 'inside';\n")
    (work / "link.sql").symlink_to(tmp_path / "outside.sql")
    cases = {"\\ir ../outside.sql\n": False, f"\\i {tmp_path}/outside.sql\n": False,
             "\\i link.sql\n": False, "\\i /etc/hostname\n": False, "\\ir sub/in.sql\n": True,
             f"\\i {work}/sub/in.sql\n": True}
    for number, (text, allowed) in enumerate(cases.items()):
        main = work / f"main{number}.sql"
        main.write_text(text)
        hasher = se.ContentHasher(str(work), None)
        if allowed:
            assert b"inside" in hasher.input_text(se.PsqlInput("file", str(main)))
            continue
        with pytest.raises(se.ApiError) as raised:
            hasher.input_text(se.PsqlInput("file", str(main)))
        assert raised.value.message == "include outside the work dir", text
        assert "outside.sql" in str(raised.value.details) or "hostname" in str(
            raised.value.details)


# warm pool: a failed refill leaves nothing behind ------------------------------------------

class FailingInstances:
    """Instances whose runtime cannot be made (an error no one listed)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.pins: dict[str, set[str]] = {}

    def pin(self, owner: str, dirs: set[str]) -> None:
        self.pins[owner] = dirs

    def unpin(self, owner: str) -> None:
        self.pins.pop(owner, None)

    def source_of(self, state: se.StateRow) -> Any:
        return object(), state.state_dir

    def new_runtime(self, *args: Any) -> Any:
        raise self.error


class OneState:
    def __init__(self, row: se.StateRow) -> None:
        self.row = row

    def get_state(self, state_id: str) -> se.StateRow | None:
        return self.row


@pytest.mark.parametrize("error", [RuntimeError("docker.errors.APIError stand-in"),
                                   sqlite3.OperationalError("disk I/O error"),
                                   OSError(se.errno.ENOSPC, "full")])
def test_a_failed_refill_leaves_no_pin_and_no_start(tmp_path: Path, error: Exception) -> None:
    state_id = "a" * 64
    row = se.StateRow(state_id, None, "host:15", "psql", "", "t", 1, None, 0, str(tmp_path))
    instances = FailingInstances(error)
    config = se.ConfigManager(str(tmp_path / "config.json"))
    pool = se.WarmPool(cast(se.InstanceManager, instances), cast(se.MetadataStore, OneState(row)),
                       config)
    pool.used(state_id)
    assert pool._next_to_fill() == state_id
    pool._fill(state_id)
    assert instances.pins == {}
    assert pool.status()["entries"] == [] or all(
        entry["starting"] == 0 for entry in pool.status()["entries"])
    drained = threading.Event()
    threading.Thread(target=lambda: (pool.drain({state_id}, 30.0), drained.set()),
                     daemon=True).start()
    assert drained.wait(10.0), "drain waited for a start that had already failed"


# cache: pooled runtimes are reclaimed before eviction gives up ----------------------------

class DrainablePool:
    """A warm pool holding ``held`` bytes for one state until it is drained."""

    def __init__(self, state_id: str, held: int) -> None:
        self.state_id, self.held = state_id, held
        self.drained: list[set[str]] = []

    def states(self) -> set[str]:
        return {self.state_id} if self.held else set()

    def disk_bytes(self) -> int:
        return self.held

    def mount_points(self) -> set[str]:
        return set()

    def drain(self, state_ids: set[str]) -> None:
        self.drained.append(set(state_ids))
        if self.state_id in state_ids:
            self.held = 0


class NothingPinned:
    def pinned(self, state_dir: str) -> bool:
        return False


def test_eviction_stops_the_warm_pool_before_giving_up(tmp_path: Path) -> None:
    """Usage just over the limit, the only state held by an instance: stopping the pooled
    runtimes (counted in the usage) brings it under the watermark (issue 19, defect 7)."""
    db = se.SqlitePool(str(tmp_path / "state.db"))
    store = se.MetadataStore(db)
    state_id, size, pooled = "b" * 64, 80 << 20, 30 << 20
    store.insert_state(se.StateRow(state_id, None, "host:15", "psql", "", "2020-01-01T00:00:00Z",
                                   size, None, 0, str(tmp_path / "s")))
    store.insert_instance(se.InstanceRow("c" * 32, state_id, "host:15", "2020-01-01T00:00:00Z",
                                         None, None, None, "active", None, None))
    config = se.ConfigManager(str(tmp_path / "config.json"))
    config.set("cache.capacity.maxBytes", 100 << 20)  # high watermark at 90 MiB: 110 is over
    pool = DrainablePool(state_id, pooled)
    cache = se.CacheManager(db, store, config, str(tmp_path), cast(se.InstanceManager,
                            NothingPinned()), cast(se.WarmPool, pool))
    assert cache.measure().usage > 0.9 * (100 << 20)
    after = cache.enforce("test")
    assert pool.drained == [{state_id}]
    assert after.usage == size <= 0.9 * (100 << 20)
    assert store.get_state(state_id) is not None  # held by its instance: never evicted
    db.close()


# locks are not held over slow work (issue 19, defect 8) -------------------------------------

def test_a_build_does_not_wait_for_another_jobs_eviction_pass(tmp_path: Path) -> None:
    db = se.SqlitePool(str(tmp_path / "state.db"))
    store = se.MetadataStore(db)
    cache = se.CacheManager(db, store, se.ConfigManager(str(tmp_path / "config.json")),
                            str(tmp_path), cast(se.InstanceManager, NothingPinned()),
                            cast(se.WarmPool, DrainablePool("d" * 64, 0)))
    done = threading.Event()
    with cache._lock:  # another job's pass: draining a pool, removing a large state
        threading.Thread(target=lambda: (cache.before_build(), done.set()), daemon=True).start()
        assert done.wait(10.0), "before_build waited for an eviction pass"
    db.close()


def test_a_hung_docker_daemon_holds_no_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = se.DockerRuntime("label")
    release, connecting = threading.Event(), threading.Event()

    def hung_connect() -> Any:
        connecting.set()
        release.wait(30.0)
        return "client"

    monkeypatch.setattr(runtime, "_connect", hung_connect)
    first = threading.Thread(target=runtime.docker, daemon=True)
    first.start()
    try:
        assert connecting.wait(10.0)
        assert runtime._lock.acquire(timeout=5.0), "the client's creation held the lock"
        runtime._lock.release()
    finally:
        release.set()
        first.join(10.0)
    assert runtime.docker() == "client"


def test_a_full_disk_has_one_shape_however_it_showed() -> None:
    for failure in (se.disk_full("no space left for the build", "psql: could not extend file"),
                    se.disk_full("no space left for the new state", "ENOSPC", state_id="e" * 64)):
        body = failure.body()
        assert body["code"] == "cache_limit_too_small" and failure.status == 507
        assert "cause" in se.json.loads(body["details"])


# resources released by construction (issue 20, item 2) ------------------------------------

class KillCountingClient(se.ClientProcess):
    def __init__(self) -> None:
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1


def test_a_client_is_unregistered_and_killed_whatever_ends_its_block() -> None:
    run = se.JobRun("f" * 32)
    proc = KillCountingClient()
    with pytest.raises(KeyError), run.client(proc):
        assert run.processes == {proc}
        raise KeyError("an exception no one listed")
    assert run.processes == set() and proc.kills == 1
    finished = KillCountingClient()
    with run.client(finished):
        pass
    assert run.processes == set() and finished.kills == 0
    run.end()  # a cancel: a client registered afterwards is killed at once
    late = KillCountingClient()
    with run.client(late):
        assert late.kills == 1


class AliveRuntime:
    def alive(self, handle: Any) -> bool:
        return True


class PinningInstances:
    def __init__(self) -> None:
        self.pins: dict[str, set[str]] = {}
        self.discarded: list[str] = []

    def unpin(self, owner: str) -> None:
        self.pins.pop(owner, None)

    def discard(self, handle: Any) -> None:
        self.discarded.append(handle.key)


def test_a_handout_that_fails_leaves_no_pin_and_no_server(tmp_path: Path) -> None:
    instances = PinningInstances()
    pool = se.WarmPool(cast(se.InstanceManager, instances), cast(se.MetadataStore, None),
                       se.ConfigManager(str(tmp_path / "config.json")))
    handle = se.RuntimeHandle(key="k", image=cast(se.ResolvedImage, None),
                              runtime=cast(se.Runtime, AliveRuntime()), runtime_dir="",
                              data_dir="", socket_dir="")
    instances.pins[se.POOL_PIN + "k"] = {"/state"}
    pool._ready["s"] = [(handle, 0.0)]
    with pytest.raises(sqlite3.OperationalError), pool.handout("s") as taken:
        assert taken is handle
        raise sqlite3.OperationalError("the row could not be written")
    assert instances.pins == {} and instances.discarded == ["k"]
    assert pool._ready["s"] == []


def test_setpriv_is_used_only_when_root_alone_may_change_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The privilege-dropping trampoline is trusted only when it and the directories above it
    are root's and not group/other-writable; otherwise (or when missing) Popen switches
    users itself."""
    assert se.trusted_setpriv() == se.SETPRIV  # Debian's util-linux, root's
    fake = tmp_path / "bin" / "setpriv"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setattr(se, "SETPRIV", str(fake))
    if os.geteuid() == 0:
        fake.chmod(0o755)
        assert se.trusted_setpriv() == str(fake)  # root's alone (/tmp above is sticky)
        fake.parent.chmod(0o775)
        assert se.trusted_setpriv() is None  # its directory: group-writable
        fake.parent.chmod(0o755)
        fake.chmod(0o757)
        assert se.trusted_setpriv() is None  # itself: writable by others
        os.chown(fake, 65534, 0)
        fake.chmod(0o755)
        assert se.trusted_setpriv() is None  # another user's
    monkeypatch.setattr(se, "SETPRIV", str(tmp_path / "missing"))
    assert se.trusted_setpriv() is None
    user = se.ServerUser(uid=12345, gid=23456, name="someone")
    dbms = se.PostgresDbms(user)
    argv, keywords = dbms.as_server_user(["/bin/true", "-x"])
    assert (argv, keywords) == (["/bin/true", "-x"],
                                {"user": 12345, "group": 23456, "extra_groups": []})


def test_a_layer_is_copied_whole_and_nothing_is_followed(tmp_path: Path) -> None:
    """``copy_layer`` (reset seeds) keeps modes, owners, the overlay's opaque marks and its
    whiteouts, and refuses a symlink rather than follow it and a FIFO without hanging."""
    if os.geteuid() != 0:
        pytest.skip("layers with whiteouts and trusted xattrs are root's")
    source, dest = tmp_path / "upper", tmp_path / "seed"
    (source / "base" / "5").mkdir(parents=True)
    (source / "base" / "5" / "1259").write_bytes(b"x" * 70000)
    os.chmod(source / "base" / "5" / "1259", 0o600)
    os.chown(source / "base" / "5" / "1259", 65534, 65534)
    os.setxattr(source / "base", "trusted.overlay.opaque", b"y")
    os.mknod(source / "gone", stat.S_IFCHR | 0o000, 0)
    dest.mkdir()
    se.copy_layer(str(source), str(dest))
    copied = dest / "base" / "5" / "1259"
    assert copied.read_bytes() == b"x" * 70000
    assert (stat.S_IMODE(copied.stat().st_mode), copied.stat().st_uid) == (0o600, 65534)
    assert os.getxattr(dest / "base", "trusted.overlay.opaque") == b"y"
    gone = os.lstat(dest / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    (source / "base" / "link").symlink_to("/etc/shadow")
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(OSError):
        se.copy_layer(str(source), str(again))
    assert not (again / "base" / "link").exists()
    (source / "base" / "link").unlink()
    os.mkfifo(source / "base" / "fifo")  # opened without blocking, refused by fstat
    third = tmp_path / "third"
    third.mkdir()
    with pytest.raises(OSError, match="not a file"):
        se.copy_layer(str(source), str(third))
