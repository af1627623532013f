"""sqlrs-engine: disposable PostgreSQL databases from cached, content-addressed states.

The local engine behind the ``sqlrs`` CLI. It turns psql scripts into immutable states (snapshots
of a Postgres data directory), caches them by content, and starts instances (live Postgres
servers with a DSN) from any state. It speaks the HTTP/JSON/NDJSON contract of the reference
engine on loopback, authenticated by a bearer token it writes to ``engine.json``.

Trust model: the engine listens on loopback only. Whoever holds the bearer token from
``engine.json`` (0600, in a 0700 directory) controls it: they can build and delete states and
instances, run SQL as superuser in every instance and read every DSN. Without the token only
``/v1/health`` and ``/v1/openapi.json`` answer, and only to a loopback ``Host``. Instances
take TCP clients only with their own password; the engine's own sessions use each server's
unix socket, in a directory only the server's OS user (never root) may enter.

Sections, in dependency order (later sections use earlier ones, never the reverse):
ids, errors, config, store, queue, registry, auth, stream, snapshot, dbms, runtime, conntrack,
instances, deletion, cache, remote, planner, executor, prepare manager, runs, httpapi, cli/main.
Every section may call ids and errors; each banner names what else it may call, and
tests/test_layers.py holds the module to that.

Where things happen:

- A request: ``HttpHandler._serve`` checks Host, route and token from the headers
  (``_route``), only then reads the body, calls the route's handler (``Api``, route table in
  ``Api._routes``) and renders any ``EngineError`` at its one catch point (``_answer``).
- A prepare: ``PrepareManager.submit`` validates (``PrepareRequest``; psql arguments in
  ``plan_psql``, Liquibase's in ``plan_liquibase``) and queues a job row; a worker runs
  ``Executor.run``: plan (``plan_steps``; for Liquibase ``plan_lb_steps`` on the changesets
  ``LiquibasePlanner.changesets`` gets from Liquibase, step 0 run meanwhile), then per
  step: cached state? else clone the input (``InstanceManager.new_runtime`` →
  ``SnapshotManager.clone``), start, run psql or Liquibase
  (``_run_psql`` / ``LiquibaseRunner``), stop, publish (``Executor._snapshot`` →
  ``SnapshotManager.publish`` or ``publish_layer``), record the state row; last, an instance
  (``_prepare_instance``, from the warm pool when one is ready). Every change is a job event
  (``EventEmitter``), persisted before it is announced.
- A state id: ``state_id_for`` (the recipe, for psql and Liquibase, is its docstring).
- An instance: ``InstanceManager.create`` (clone + start + row) or ``WarmPool.instance`` (a
  pooled runtime + row); a run (``RunManager``) restarts a dead one (``ensure_running``);
  ``InstanceManager.snapshot`` makes a state of a live one (an online backup,
  ``SnapshotManager.publish_online``), ``InstanceManager.reset`` gives it a state's data
  again in place (from the second reset to a state on, with a seed: ``InstanceManager._seed``,
  ``SnapshotManager.reset_seed``; as root on the host its postmaster stays and restarts its
  processes on a new overlay, ``HostRuntime.freeze``/``thaw``, for it runs in a server
  directory, ``SnapshotManager.make_server_dir``); client sessions are counted by
  ``ConnectionTracker``;
  deletion trees (``DeletionManager``) and eviction (``CacheManager``) never
  remove what a row, a pin or a claim protects.
- Whose overlay: ``SnapshotManager`` (its docstring): the engine mounts it as root; when not
  root each host server mounts its own in a user namespace (``NamespaceMount``, run between
  fork and exec); a Docker container mounts its own as its root (``DockerRuntime.start``).
- Commands in a container (mount, the postmaster, a build's psql, umount): a command agent
  kept open per container and user (``ExecAgent``, ``AgentPool``), not an exec
  each; a run's clients are execs (``DockerClient``).
- Foreign errors become the engine's at one place per library: Docker SDK and its
  ``requests`` in ``DockerRuntime._call``, the registry's ``requests`` in
  ``RegistryClient._send``, psycopg2 in the engine's sessions (``admin_session``).
- States that travel: ``RemoteCache`` (its docstring). On a miss ``Executor._pulled`` asks
  it for the deepest missing step (``RemoteCache.pull``: ``RegistryClient``, ``scan_layer``,
  ``apply_layer``, ``_materialize``); a published state is queued for a push
  (``queue_push``); bundles are ``RemoteCache.export`` / ``import_bundle``.
- Background threads (``Engine.running`` starts them and stops them with the server;
  resources are taken in ``with`` blocks that release them on every path: pins
  ``InstanceManager.holding``, claims ``claiming``, pooled hand-outs ``WarmPool.handout``,
  a job's clients ``JobRun.client``, its build servers ``Executor._building``, its
  heartbeat ``EventEmitter.heartbeat``, a container's command agent
  ``AgentPool.use``): the warm pool's refill (``WarmPool.run``), the remote cache's
  pushes (``RemoteCache.run_pushes``), the read watchdog that cuts slow clients
  (``ReadWatch.run``), the TTL reaper
  (``Reaper.run``), the idle timer (``watch_idle``), per job a heartbeat
  (``EventEmitter._beat``), and the job workers (``PrepareManager``'s pool).
- Start-up: ``run_engine`` checks the state dir, store and run dir are the engine's own,
  builds ``Engine`` (every manager, in dependency order), recovers (``Engine.recover``:
  re-adopt live instances, sweep half-built states and crash leftovers, resume jobs), then
  writes ``engine.json``.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import copy
import dataclasses
import errno
import fcntl
import gzip
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import math
import os
import pwd
import queue
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
import typing
import urllib.parse
import zlib
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import (
    Annotated,
    Any,
    NotRequired,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
)

__version__ = "0.1.0"

log = logging.getLogger("sqlrs-engine")

JsonDict = dict[str, Any]

###############################################################################
# ids: identifier formats, validation, timestamps, Go durations, and the file-system helpers
# every layer shares (atomic writes, locks, tree removal, background work, the system calls
# made through ctypes). Owns nothing; may call only the standard library.
###############################################################################

HEX32_RE = re.compile(r"^[0-9a-fA-F]{32}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
LOWER_HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
GO_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")
GO_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


class Doc:
    """JSON Schema keywords refining a field of an API shape (a TypedDict next to its
    producer, the one declaration the OpenAPI document is generated from)."""

    def __init__(self, description: str = "", **keywords: Any) -> None:
        self.keywords = {**keywords, **({"description": description} if description else {})}


Hex32 = Annotated[str, Doc(pattern="^[0-9a-f]{32}$")]
Hex64 = Annotated[str, Doc(pattern="^[0-9a-f]{64}$")]
Timestamp = Annotated[str, Doc(format="date-time")]
Count = Annotated[int, Doc(minimum=0)]
Shape = TypeVar("Shape", bound=Mapping[str, Any])
T = TypeVar("T")
P = ParamSpec("P")


def omit_none(values: Shape) -> Shape:
    """``values`` without its None entries: an optional field is omitted, never null."""
    return cast(Shape, {key: value for key, value in values.items() if value is not None})


def random_hex(n_bytes: int) -> str:
    return secrets.token_hex(n_bytes)


def is_instance_id(value: str) -> bool:
    """True for the instance id shape (32 hex characters, any case)."""
    return bool(HEX32_RE.match(value))


def is_job_id(value: str) -> bool:
    return bool(LOWER_HEX32_RE.match(value))


def is_canonical_instance_id(value: str) -> bool:
    """An instance id as the engine makes them (lower case): the only form that names a
    directory."""
    return bool(LOWER_HEX32_RE.match(value))


def is_state_id(value: str) -> bool:
    return bool(HEX64_RE.match(value))


def derived_instance_id(job_id: str) -> str:
    return hashlib.sha256(f"instance\x00{job_id}\x00".encode()).hexdigest()[:32]


def format_ts(ns: int | None = None) -> str:
    """RFC 3339 UTC timestamp with nanoseconds (always nine digits, so strings sort)."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"



def parse_go_duration(text: str) -> float:
    """Parse a Go duration (``30s``, ``2m0s``, ``1h30m``, ``0``, one optional sign) into
    seconds, as strictly as Go's ``time.ParseDuration`` (no spaces, at most 2^63-1 ns)."""
    sign = -1 if text[:1] == "-" else 1
    value = text[1:] if text[:1] in ("-", "+") else text
    if value == "0":
        return 0.0
    if not value:
        raise ValueError(f"invalid duration {text!r}")
    total_ns = 0.0
    pos = 0
    for match in GO_DURATION_RE.finditer(value):
        if match.start() != pos or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total_ns += float(match.group(1)) * GO_DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or total_ns > 2**63 - 1:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total_ns / 1e9


def format_go_duration(seconds: float) -> str:
    """Format seconds the way Go's ``time.Duration.String`` does (``10m0s``, ``1.5s``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim_fraction(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return sign + out + _trim_fraction(rest, 1_000_000_000) + "s"


def _trim_fraction(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def parse_go_bool(value: str) -> bool:
    """Go's ``strconv.ParseBool``."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f'strconv.ParseBool: parsing "{value}": invalid syntax')


def pause_point(name: str) -> None:
    """Where tests arrange races: when ``$SQLRS_TEST_HOOKS_DIR/<name>`` exists, the first
    thread to get here removes it, creates ``<name>.reached`` and waits (at most 120 s) for
    ``<name>.release``. Without that variable (every real use) it does nothing."""
    root = os.environ.get("SQLRS_TEST_HOOKS_DIR")
    if not root:
        return
    try:
        os.unlink(os.path.join(root, name))
    except FileNotFoundError:
        return
    with open(os.path.join(root, f"{name}.reached"), "w", encoding="utf-8"):
        pass
    log.info("test hook %s: paused", name)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(root, f"{name}.release")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)


def atomic_write(path: str, data: bytes, mode: int, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, fsynced first unless
    it need not outlive the boot (``durable=False``: a kill still never leaves half a file)."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


#: what a child (server, client, Liquibase) takes from the engine's environment: locale and
#: time zone; everything else it gets is set explicitly (no secret of the engine's reaches the
#: server user, who can read its environment with ``COPY … FROM PROGRAM 'env'``)
CHILD_ENV_PASSED = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def child_env(**extra: str) -> dict[str, str]:
    """A minimal, explicit environment for a child process: a fixed PATH (the engine's own
    when it is not root: the same user, whose tools may live elsewhere), the locale and time
    zone, and ``extra``."""
    env = {"PATH": CHILD_PATH if os.geteuid() == 0 else os.environ.get("PATH", CHILD_PATH)}
    env.update({key: os.environ[key] for key in CHILD_ENV_PASSED if key in os.environ})
    env.update(extra)
    return env


def read_regular_file(path: str, limit: int = 1 << 20, follow: bool = False) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, never blocking on a FIFO or
    device (OSError for anything but a regular file) and, unless ``follow``, never following
    a final symlink: how the engine reads files in directories other users control."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        chunks = []
        left = limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file_in(dir_path: str, name: str, data: bytes, mode: int,
                  owner: tuple[int, int] | None = None) -> None:
    """Replace ``dir_path/name`` with ``data`` through the directory's descriptor: a fresh
    temporary (``O_EXCL|O_NOFOLLOW``) is given its mode and owner through its own descriptor
    before it is renamed into place, so nothing is ever followed, chowned or chmodded by path
    in a directory someone else may control."""
    dir_fd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tmp = f".{name}.sqlrs-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def private_dir_problem(path: str, follow: bool = True) -> str | None:
    """Why ``path`` (an existing directory) is not the engine's own: not a directory (a
    symlink to one only counts with ``follow``, for a path the user named), owned by another
    user, or writable by group or others. None when it is."""
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by the engine's user ({os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by {'others' if st.st_mode & 0o002 else 'its group'}"
    return None


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check that it is the engine's own directory and make it
    0700; a directory that someone else owns or may write is refused (ValueError) and left as
    it is."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    problem = private_dir_problem(path)
    if problem:
        raise ValueError(f"refusing an unsafe directory: {problem}")
    os.chmod(path, 0o700)


SMALL_FILE_LIMIT = 16 << 20  #: a server's top-level files the engine copies (configuration)


def read_small_file(dir_path: str, name: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``dir_path/name`` (see ``read_regular_file``); one over
    ``limit`` (``SMALL_FILE_LIMIT``) is an OSError, not a truncated copy."""
    limit = SMALL_FILE_LIMIT if limit is None else limit
    content = read_regular_file(os.path.join(dir_path, name), limit + 1)
    if len(content) > limit:
        raise OSError(errno.EFBIG, f"{os.path.join(dir_path, name)}: top-level files over"
                      f" {SMALL_FILE_LIMIT} bytes (in all)")
    return content


def remove_untrusted(dir_fd: int, name: str) -> None:
    """Remove ``name`` in the directory ``dir_fd`` and all below it, in a directory another
    user controls and may change meanwhile: never following a link nor opening anything
    but a directory (``O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK``: a FIFO or a link swapped in is
    unlinked, not opened); the walk is iterative (no depth limit) and gives up (OSError)
    after a million steps of someone racing it."""
    stack: list[tuple[int, str, int | None]] = [(dir_fd, name, None)]  # parent, name, own fd
    try:
        for _step in range(1_000_000):
            if not stack:
                return
            parent, entry, fd = stack[-1]
            if fd is None:
                try:
                    os.unlink(entry, dir_fd=parent)
                    stack.pop()
                    continue
                except FileNotFoundError:
                    stack.pop()
                    continue
                except IsADirectoryError:
                    pass
                try:
                    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                 | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
                except (NotADirectoryError, OSError) as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        continue  # swapped for a file or a link meanwhile: unlinked next time
                    raise
                stack[-1] = (parent, entry, fd)
                stack += [(fd, child, None) for child in os.listdir(fd)]
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(entry, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as exc:  # filled (or swapped) meanwhile: again
                if exc.errno not in (errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                stack.append((parent, entry, None))
        raise OSError(errno.EBUSY, f"{name} keeps changing: not removed")
    finally:
        for _parent, _entry, fd in stack:
            if fd is not None:
                os.close(fd)


def _entry_at(dir_fd: int, name: str) -> str | bytes | None:
    """What ``name`` in the directory ``dir_fd`` is, in ``make_server_dir``'s terms: a
    symlink's target, a regular file's bytes, None for anything else."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(name, dir_fd=dir_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > SMALL_FILE_LIMIT:
        return None
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(SMALL_FILE_LIMIT + 1)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it without following links. As root (whose
    trees hold the server user's, who may change them meanwhile) nothing but a directory
    is ever opened (``remove_untrusted``); otherwise (the engine's own user's trees) a
    directory we may not list (an overlay's ``work/work`` is mode 000) is opened up first."""
    if not os.path.lexists(path):
        return
    if os.geteuid() == 0:
        parent = os.open(os.path.dirname(os.path.abspath(path)),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_untrusted(parent, os.path.basename(os.path.abspath(path)))
        finally:
            os.close(parent)
    else:
        shutil.rmtree(path, onerror=_open_up_and_retry)
    if os.path.lexists(path):
        raise OSError(errno.EBUSY, f"cannot remove {path}")


def _open_up_and_retry(function: Callable[..., Any], path: str, exc_info: Any) -> None:
    """``rmtree``'s error hook for what we may remove but not list or change: a directory of
    our own we may not enter (an overlay's work directory is mode 000) is opened up and
    removed; an empty one of another's (a container root's) is removed from our directory;
    a file in a directory of ours we may not write is removed once it is opened up. Anything
    else stays, and ``remove_tree`` says so."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if function in (os.open, os.scandir) and stat.S_ISDIR(st.st_mode):
            if st.st_uid == os.geteuid():
                os.chmod(path, 0o700)
                shutil.rmtree(path, onerror=_open_up_and_retry)
            else:
                os.rmdir(path)
        elif function in (os.unlink, os.rmdir) and getattr(exc_info[1], "errno", None) \
                == errno.EACCES and os.lstat(os.path.dirname(path)).st_uid == os.geteuid():
            os.chmod(os.path.dirname(path), 0o700)
            function(path)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: released by the kernel if the engine dies."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def try_file_lock(path: str) -> Iterator[bool]:
    """``file_lock`` without waiting: yields whether the lock was taken."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def in_background(name: str, work: Callable[P, T], *args: P.args,
                  **kwargs: P.kwargs) -> Future[T]:
    """Run ``work`` on a thread of its own; its result or exception in the future."""
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(work(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def printable(text: str) -> str:
    """``text`` with control characters escaped, for a log line (which also reaches
    terminals): a request path or a client's output can not forge lines or escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def safe_path_component(value: str) -> str:
    """Map an arbitrary string (an image id) to one safe path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", value).strip(".")
    return cleaned[:120] or "_"


MNT_DETACH = 2


class Libc:
    """``mount(2)``, ``umount2(2)`` and ``unshare(2)`` through ctypes: no process spawn on
    the hot path. The bound functions are looked up once, so a child between
    fork and exec (``NamespaceMount``) only makes the calls."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self.c_ulong = ctypes.c_ulong
        libc = ctypes.CDLL(None, use_errno=True)
        self.mount_fn = libc.mount
        self.umount2_fn = libc.umount2
        self.unshare_fn = libc.unshare

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        ok = self.mount_fn(source.encode(), target.encode(), fstype.encode(),
                           self._ctypes.c_ulong(flags), data.encode())
        if ok != 0:
            err = self._ctypes.get_errno()
            raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")

    def umount(self, target: str, lazy: bool = True) -> None:
        if self.umount2_fn(target.encode(), MNT_DETACH if lazy else 0) != 0:
            err = self._ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise OSError(err, f"umount {target}: {os.strerror(err)}")

    def errno(self) -> int:
        return int(self._ctypes.get_errno())


###############################################################################
# errors: the JSON error type every layer raises and the HTTP layer renders.
# Owns nothing; may call only the standard library.
###############################################################################


class ErrorBody(TypedDict):
    """Every JSON error."""
    code: Annotated[str, Doc("invalid_argument, not_found, conflict, internal_error, "
                             "cancelled, cache_* ...", minLength=1)]
    message: str
    details: NotRequired[Annotated[str, Doc("Omitted when empty.")]]


class EngineError(Exception):
    """The one root of every failure the engine reports: an HTTP status and a JSON body
    ``{code, message[, details]}``. The HTTP layer renders any of them at its one catch point
    (``HttpHandler._answer``); a job records its body as the job's error."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> ErrorBody:
        out = ErrorBody(code=self.code, message=self.message)
        if self.details not in (None, ""):
            out["details"] = (
                self.details if isinstance(self.details, str) else json.dumps(self.details)
            )
        return out

    @property
    def error(self) -> ErrorBody:
        return self.body()


class ApiError(EngineError):
    """A request the engine refuses or cannot serve."""


def internal_error(details: Any = None, message: str = "internal error",
                   code: str = "internal_error") -> ApiError:
    return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, code, message, details)


def invalid_argument(message: str, details: Any = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, "invalid_argument", message, details)


def not_found(message: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, "not_found", message)


def conflict(message: str, details: Any = None) -> ApiError:
    return ApiError(HTTPStatus.CONFLICT, "conflict", message, details)


#: the HTTP status of a failure by its code, when one reaches a request (500 otherwise)
FAILURE_STATUS = {
    "image_not_found": HTTPStatus.NOT_FOUND, "unsupported_image": HTTPStatus.BAD_REQUEST,
    "registry_unavailable": HTTPStatus.SERVICE_UNAVAILABLE, "cancelled": HTTPStatus.CONFLICT,
    "cache_limit_too_small": HTTPStatus.INSUFFICIENT_STORAGE,
    "cache_full_unreclaimable": HTTPStatus.INSUFFICIENT_STORAGE,
    "cache_enforcement_unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
}


class JobFailure(EngineError):
    """A prepare job ends in ``failed`` with this error; raised on a request path (a
    runtime or the cache refusing), it answers with the status its code calls for."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(FAILURE_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR), code,
                         message, details)


def disk_full(message: str, cause: str, **context: str) -> JobFailure:
    """The one failure for a full disk, however it showed (a client's "No space left on
    device", ``ENOSPC`` from the file system, SQLite's "database or disk is full"): details
    ``{"cause": what reported it, ...context}``."""
    return JobFailure("cache_limit_too_small", message, {"cause": cause, **context})


class JobCancelled(JobFailure):
    def __init__(self, message: str = "job cancelled") -> None:
        super().__init__("cancelled", message)


class EngineStopping(Exception):
    """The engine is shutting down: the job stops here and resumes at the next start."""


###############################################################################
# config: engine settings persisted in <store>/config.json.
# Owns config.json; may call nothing but ids and errors.
###############################################################################

CONFIG_DEFAULTS: JsonDict = {
    "log": {"level": "debug"},
    "cache": {
        "capacity": {
            "maxBytes": 0,
            "reserveBytes": None,
            "highWatermark": 0.90,
            "lowWatermark": 0.80,
            "minStateAge": "10m",
        },
        "remote": {"url": "", "pull": True, "push": False, "insecure": False},
    },
    "container": {"runtime": "auto"},
    "snapshot": {"backend": "auto"},
    "orchestrator": {"jobs": {"maxIdentical": 2, "maxHistory": 200, "maxHistoryAge": "168h"}},
    "instances": {"warmPool": {"perState": 1, "maxTotal": 4, "idleTimeout": "10m"}},
}

MAX_CONFIG_INT = (1 << 63) - 1
_NON_NEGATIVE_INT = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_CONFIG_INT}
_WATERMARK = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_DURATION = {"type": "string", "format": "go-duration",
             "description": "non-negative Go duration, e.g. 10m or 1h30m"}


#: ``HOST[:PORT]/PATH`` of an OCI repository (the distribution spec's name grammar)
REPOSITORY_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_FLAG = {"type": "boolean"}


def _settings(**properties: JsonDict) -> JsonDict:
    return {"type": "object", "properties": properties, "additionalProperties": False}


#: The one declaration of every setting: served as the schema and enforced on every change.
CONFIG_SCHEMA: JsonDict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sqlrs engine configuration",
    **_settings(
        log=_settings(level={"enum": ["debug", "info", "warn", "error"]}),
        cache=_settings(capacity=_settings(
            maxBytes=_NON_NEGATIVE_INT, reserveBytes=_NON_NEGATIVE_INT,
            highWatermark=_WATERMARK, lowWatermark=_WATERMARK, minStateAge=_DURATION,
        ), remote=_settings(
            url={"type": "string", "format": "repository", "description":
                 "OCI repository HOST[:PORT]/PATH sharing states; empty: no remote cache"},
            pull={**_FLAG, "description": "a missing step comes from the remote when it has it"},
            push={**_FLAG, "description": "built states are pushed to the remote (background)"},
            insecure={**_FLAG, "description": "plain HTTP to a registry that is not loopback"},
        )),
        container=_settings(runtime={"enum": ["auto", "docker", "podman"]}),
        snapshot=_settings(backend={"enum": ["auto", "overlay", "btrfs", "copy"]}),
        instances=_settings(warmPool=_settings(
            perState={"type": "integer", "minimum": 0, "maximum": 64,
                      "description": "ready instances kept per recently used state"},
            maxTotal={"type": "integer", "minimum": 0, "maximum": 1024,
                      "description": "ready instances in all; 0 turns the warm pool off"},
            idleTimeout={**_DURATION, "description": "an unclaimed instance idle this long "
                         "is stopped; 0: never"},
        )),
        orchestrator=_settings(jobs=_settings(
            maxIdentical=_NON_NEGATIVE_INT,
            maxHistory={**_NON_NEGATIVE_INT, "description":
                        "completed jobs kept in all (oldest deleted first); null: no limit"},
            maxHistoryAge={**_DURATION, "description":
                           "completed jobs older than this are deleted; 0: no limit"},
        )),
    ),
}

_PATH_RE = re.compile(r"[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*")
_PATH_TOKEN_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_config_path(path: str) -> list[str | int]:
    """Split ``a.b[0].c`` into keys and indices; raise ValueError when malformed."""
    if not _PATH_RE.fullmatch(path) or path.strip() != path:
        raise ValueError("a path is dot-separated keys with optional [n] indices")
    return [key if key else int(index) for key, index in _PATH_TOKEN_RE.findall(path)]


def schema_at(parts: Sequence[str | int]) -> JsonDict:
    """The schema of the setting at ``parts``; KeyError when the schema has no such path."""
    node = CONFIG_SCHEMA
    for part in parts:
        properties = node.get("properties", {})
        if not isinstance(part, str) or part not in properties:
            raise KeyError(part)
        node = properties[part]
    return node


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``; the result shares nothing with either."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return copy.deepcopy(merged)
    return copy.deepcopy(override)


def _lookup(tree: Any, parts: Sequence[str | int]) -> Any:
    node = tree
    for part in parts:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(part)
    return node


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float) and math.isfinite(v),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
}


def check_schema(value: Any, schema: JsonDict, where: str) -> None:
    """Raise ValueError unless ``value`` fits ``schema`` (the JSON Schema subset that
    CONFIG_SCHEMA uses: type, enum, bounds, properties, go-duration)."""
    types = schema.get("type")
    allowed = [types] if isinstance(types, str) else types or []
    if allowed and not any(_JSON_TYPES[name](value) for name in allowed):
        raise ValueError(f"{where} must be {' or '.join(allowed)}, not {json.dumps(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where} must be one of {', '.join(schema['enum'])}")
    if type(value) in (int, float):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise ValueError(f"{where} is out of range")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ValueError(f"{where} must be above {schema['exclusiveMinimum']}")
    if schema.get("format") == "go-duration" and parse_go_duration(value) < 0:
        raise ValueError(f"{where} must not be negative")
    if schema.get("format") == "repository" and value and not REPOSITORY_RE.fullmatch(value):
        raise ValueError(f"{where} must be a repository HOST[:PORT]/PATH (lower-case path),"
                         " e.g. 127.0.0.1:5000/team/sqlrs-states")
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in schema.get("properties", {}):
                raise ValueError(f"{where}.{key} is not a setting")
            check_schema(item, schema["properties"][key], f"{where}.{key}")


def validate_config(effective: JsonDict) -> None:
    """Raise ValueError when the effective configuration breaks the schema or a rule that
    spans settings."""
    check_schema(effective, CONFIG_SCHEMA, "config")
    capacity = effective["cache"]["capacity"]
    if capacity["lowWatermark"] >= capacity["highWatermark"]:
        raise ValueError("lowWatermark must be below highWatermark")


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}


class ConfigManager:
    """Engine configuration: defaults overlaid by overrides persisted atomically in config.json.

    Thread-safe. Every change is validated on the resulting effective configuration before it
    is written; a rejected change leaves file and memory untouched.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: serialises changes: read, validate, write config.json, swap ``_overrides``
        self._lock = threading.Lock()
        self._overrides: JsonDict = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                loaded = json.load(handle)
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: config must be a JSON object")
            validate_config(deep_merge(CONFIG_DEFAULTS, loaded))
            self._overrides = loaded

    def overrides(self) -> JsonDict:
        with self._lock:
            return copy.deepcopy(self._overrides)

    def effective(self) -> JsonDict:
        with self._lock:
            merged: JsonDict = deep_merge(CONFIG_DEFAULTS, self._overrides)
            return merged

    def value(self, path: str) -> Any:
        return _lookup(self.effective(), parse_config_path(path))

    def get(self, path: str, effective: bool) -> Any:
        tree = self.effective() if effective else self.overrides()
        return _lookup(tree, parse_config_path(path))

    def set(self, path: str, value: Any) -> Any:
        """Set one setting of the schema; 400 for an unknown path or a value the schema or a
        cross-setting rule rejects (config.json is then left as it was)."""
        parts = parse_config_path(path)
        try:
            schema_at(parts)
        except KeyError:
            raise invalid_argument("invalid path", f"{path} is not a setting") from None
        with self._lock:
            updated = copy.deepcopy(self._overrides)
            _assign(updated, [str(part) for part in parts], value)
            try:
                validate_config(deep_merge(CONFIG_DEFAULTS, updated))
            except ValueError as exc:
                raise invalid_argument("invalid config value", str(exc)) from None
            self._write(updated)
            return value

    def delete(self, path: str) -> Any:
        parts = parse_config_path(path)
        with self._lock:
            updated = copy.deepcopy(self._overrides)
            parent = _lookup(updated, parts[:-1])
            last = parts[-1]
            if isinstance(parent, dict) and isinstance(last, str) and last in parent:
                del parent[last]
            elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
                parent.pop(last)
            else:
                raise KeyError(last)
            effective = deep_merge(CONFIG_DEFAULTS, updated)
            try:
                validate_config(effective)
            except ValueError as exc:
                raise invalid_argument("invalid config value", str(exc)) from None
            self._write(updated)
        try:
            return _lookup(effective, parts)
        except KeyError:
            return None

    def _write(self, overrides: JsonDict) -> None:
        atomic_write(self.path, json.dumps(overrides, indent=2).encode() + b"\n", 0o600)
        self._overrides = overrides
        self._apply_log_level(overrides)

    def apply_log_level(self) -> None:
        """``log.level`` takes effect (at start; every change applies it at once)."""
        with self._lock:
            self._apply_log_level(self._overrides)

    @staticmethod
    def _apply_log_level(overrides: JsonDict) -> None:
        log.setLevel(LOG_LEVELS[deep_merge(CONFIG_DEFAULTS, overrides)["log"]["level"]])


def _assign(tree: JsonDict, keys: Sequence[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value





###############################################################################
# store: SQLite metadata for states, instances and names.
# Owns state.db and its connections; may call nothing but ids and errors.
###############################################################################

STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    state_id TEXT PRIMARY KEY,
    parent_state_id TEXT,
    image_id TEXT NOT NULL,
    prepare_kind TEXT NOT NULL,
    prepare_args_normalized TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    size_bytes INTEGER,
    last_used_at TEXT,
    use_count INTEGER NOT NULL DEFAULT 0,
    state_dir TEXT NOT NULL,
    name TEXT,
    source_instance_id TEXT,
    unflushed_boot TEXT,
    origin TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    state_id TEXT NOT NULL REFERENCES states(state_id),
    image_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    runtime_id TEXT,
    runtime_dir TEXT,
    status TEXT NOT NULL DEFAULT 'active',
    port INTEGER,
    job_id TEXT,
    password TEXT
);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state_id);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    instance_id TEXT,
    state_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    last_used_at TEXT,
    is_primary INTEGER NOT NULL DEFAULT 0
);
"""


WAL_KEPT_BYTES = 4 << 20  #: a checkpointed WAL is truncated to this


class SqlitePool:
    """A pool of SQLite connections to one file (created 0600, as SQLite then creates its WAL
    and shared-memory files): WAL, busy timeout, foreign keys, incremental vacuum.

    ``read()`` lends a connection in autocommit mode; ``write()`` wraps the block in
    ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any exception). A full disk is reported
    as the file system reports it (``OSError`` with ``ENOSPC``), whichever layer hit it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        with self.read() as conn:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # freed pages go back
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")         # to the file system
                conn.execute("VACUUM")
            conn.execute("PRAGMA journal_mode=WAL")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
        return conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise OSError(errno.ENOSPC, f"{self.path}: {exc}") from exc
            raise
        finally:
            if conn.in_transaction:
                conn.rollback()
            self._idle.put(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        with self.read() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def shrink(self) -> None:
        """Give pages freed by deletions back to the file system."""
        with self.read() as conn:
            conn.execute("PRAGMA incremental_vacuum").fetchall()  # each row frees pages

    def migrate(self, script: str) -> None:
        with self.read() as conn:
            conn.executescript(script)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _prefix_like(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


STATE_KINDS = ("psql", "lb", "snapshot")
Kind = Annotated[str, Doc(enum=list(STATE_KINDS))]


class StateEntry(TypedDict):
    """A cached state (``GET /v1/states``)."""
    state_id: Hex64
    parent_state_id: NotRequired[Annotated[Hex64 | None, Doc("Absent for root states.")]]
    image_id: str
    prepare_kind: Kind
    prepare_args_normalized: str
    created_at: Timestamp
    size_bytes: NotRequired[Count | None]
    last_used_at: NotRequired[Timestamp | None]
    use_count: Count
    refcount: Annotated[Count, Doc("Instances running from this state.")]
    name: NotRequired[Annotated[str | None, Doc("A snapshot's name, when it was given one.")]]
    source_instance_id: NotRequired[Annotated[str | None, Doc(
        "The instance a snapshot was taken of (kind snapshot).")]]
    origin: Annotated[str, Doc("Where the state came from.",
                               enum=["built", "snapshot", "pulled", "imported"])]
    push_status: NotRequired[Annotated[str | None, Doc(
        "Its push to the remote cache; omitted when it is not to be pushed.",
        enum=["pending", "pushed", "failed"])]]
    push_error: NotRequired[Annotated[str | None, Doc("Why the last push attempt failed.")]]


class NameEntry(TypedDict):
    """A name bound to an instance (``GET /v1/names``)."""
    name: Annotated[str, Doc(minLength=1)]
    instance_id: NotRequired[Hex32 | None]
    image_id: str
    state_id: Hex64
    state_fingerprint: Annotated[Hex64, Doc("The state id again (the contract's fingerprint of"
                                           " a state; ours is its content address).")]
    status: Annotated[str, Doc(enum=["active", "expired"])]
    last_used_at: NotRequired[Timestamp | None]


@dataclass
class StateRow:
    state_id: str
    parent_state_id: str | None
    image_id: str
    prepare_kind: str
    prepare_args_normalized: str
    created_at: str
    size_bytes: int | None
    last_used_at: str | None
    use_count: int
    state_dir: str
    refcount: int = 0
    children: int = 0
    name: str | None = None
    source_instance_id: str | None = None  #: a snapshot's instance
    #: the boot a state was published in, until its files are flushed (a snapshot answers
    #: first); a state still unflushed after a reboot may be incomplete and is removed
    unflushed_boot: str | None = None
    origin: str | None = None  #: pulled or imported; None: made here

    def to_json(self) -> StateEntry:
        return omit_none(StateEntry(
            state_id=self.state_id, parent_state_id=self.parent_state_id,
            image_id=self.image_id, prepare_kind=self.prepare_kind,
            prepare_args_normalized=self.prepare_args_normalized, created_at=self.created_at,
            size_bytes=self.size_bytes, last_used_at=self.last_used_at,
            use_count=self.use_count, refcount=self.refcount, name=self.name,
            source_instance_id=self.source_instance_id,
            origin=self.origin or ("snapshot" if self.prepare_kind == "snapshot" else "built"),
        ))


@dataclass
class InstanceRow:
    instance_id: str
    state_id: str
    image_id: str
    created_at: str
    expires_at: str | None
    runtime_id: str | None
    runtime_dir: str | None
    status: str
    port: int | None
    job_id: str | None
    name: str | None = None
    password: str | None = field(default=None, repr=False)  #: never logged


@dataclass
class NameRow:
    name: str
    instance_id: str | None
    state_id: str
    image_id: str
    last_used_at: str | None
    instance_expires_at: str | None

    def to_json(self) -> NameEntry:
        expired = bool(self.instance_expires_at and self.instance_expires_at < format_ts())
        return omit_none(NameEntry(
            name=self.name, instance_id=self.instance_id, image_id=self.image_id,
            state_id=self.state_id, state_fingerprint=self.state_id,
            status="expired" if expired else "active", last_used_at=self.last_used_at,
        ))


_STATE_SELECT = """
SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.state_id = s.state_id) AS refcount,
       (SELECT COUNT(*) FROM states c WHERE c.parent_state_id = s.state_id) AS children
FROM states s
"""
_INSTANCE_SELECT = """
SELECT i.*, (SELECT n.name FROM names n WHERE n.instance_id = i.instance_id
             ORDER BY n.is_primary DESC, n.name LIMIT 1) AS name
FROM instances i
"""
_NAME_SELECT = """
SELECT n.*, i.expires_at AS instance_expires_at
FROM names n LEFT JOIN instances i ON i.instance_id = n.instance_id
"""


def _state_from(row: sqlite3.Row) -> StateRow:
    return StateRow(
        **{k: row[k] for k in StateRow.__dataclass_fields__ if k in row.keys()}  # noqa: SIM118
    )


def _instance_from(row: sqlite3.Row) -> InstanceRow:
    return InstanceRow(**{k: row[k] for k in InstanceRow.__dataclass_fields__})


def _name_from(row: sqlite3.Row) -> NameRow:
    return NameRow(**{k: row[k] for k in NameRow.__dataclass_fields__})


def _where(filters: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
    clauses = [clause for clause, value in filters if value is not None]
    params = [value for _, value in filters if value is not None]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class MetadataStore:
    """States, instances and names in SQLite. Every write is one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, db: SqlitePool) -> None:
        self.db = db
        db.migrate(STORE_SCHEMA)
        with db.read() as conn:  # stores of engines from before per-instance passwords
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(instances)")}
        if "password" not in columns:
            db.migrate("ALTER TABLE instances ADD COLUMN password TEXT")
        with db.read() as conn:  # stores of engines from before snapshots of instances
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(states)")}
        for column in ("name", "source_instance_id", "unflushed_boot", "origin"):
            if column not in columns:
                db.migrate(f"ALTER TABLE states ADD COLUMN {column} TEXT")
        db.migrate("CREATE UNIQUE INDEX IF NOT EXISTS states_name ON states(name)"
                   " WHERE name IS NOT NULL")
        with db.read() as conn:  # stores of engines that kept a copy of the state id
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(names)")}
        if "state_fingerprint" in columns:  # (the one of states is UNIQUE: it stays, NULL)
            db.migrate("BEGIN IMMEDIATE; UPDATE names SET state_id = state_fingerprint"
                       " WHERE state_id IS NULL; ALTER TABLE names DROP COLUMN"
                       " state_fingerprint; COMMIT")

    # states -------------------------------------------------------------------------------
    def insert_state(self, state: StateRow) -> None:
        verb = "INSERT" if state.name else "INSERT OR IGNORE"  # a named one is new
        with self.db.write() as conn:
            try:
                conn.execute(
                    f"{verb} INTO states (state_id, parent_state_id,"
                    " image_id, prepare_kind, prepare_args_normalized, created_at, size_bytes,"
                    " last_used_at, use_count, state_dir, name, source_instance_id,"
                    " unflushed_boot, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        state.state_id, state.parent_state_id, state.image_id,
                        state.prepare_kind, state.prepare_args_normalized, state.created_at,
                        state.size_bytes, state.created_at, 0, state.state_dir, state.name,
                        state.source_instance_id, state.unflushed_boot, state.origin,
                    ),
                )
            except sqlite3.IntegrityError:
                raise conflict("state name already in use", state.name) from None

    def mark_flushed(self, state_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE states SET unflushed_boot = NULL WHERE state_id = ?",
                         (state_id,))

    def state_named(self, name: str) -> StateRow | None:
        with self.db.read() as conn:
            row = conn.execute(_STATE_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return _state_from(row) if row else None

    def get_state(self, state_id: str) -> StateRow | None:
        with self.db.read() as conn:
            row = conn.execute(_STATE_SELECT + " WHERE s.state_id = ?", (state_id,)).fetchone()
        return _state_from(row) if row else None

    def list_states(
        self,
        kind: str | None = None,
        image: str | None = None,
        id_prefix: str | None = None,
        parent: str | None = None,
    ) -> list[StateRow]:
        where, params = _where(
            [
                ("s.prepare_kind = ?", kind),
                ("s.image_id = ?", image),
                ("lower(s.state_id) LIKE ? ESCAPE '\\'", id_prefix and _prefix_like(id_prefix)),
                ("s.parent_state_id = ?", parent),
            ]
        )
        with self.db.read() as conn:
            rows = conn.execute(_STATE_SELECT + where + " ORDER BY s.rowid", params).fetchall()
        return [_state_from(row) for row in rows]

    def delete_state(self, state_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM states WHERE state_id = ?", (state_id,))

    # instances ----------------------------------------------------------------------------
    def insert_instance(self, inst: InstanceRow) -> None:
        """Insert the instance and bump its state's use in the same transaction."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO instances (instance_id, state_id, image_id, created_at, expires_at,"
                " runtime_id, runtime_dir, status, port, job_id, password)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    inst.instance_id, inst.state_id, inst.image_id, inst.created_at,
                    inst.expires_at, inst.runtime_id, inst.runtime_dir, inst.status, inst.port,
                    inst.job_id, inst.password,
                ),
            )
            conn.execute(
                "UPDATE states SET last_used_at = ?, use_count = use_count + 1"
                " WHERE state_id = ?",
                (inst.created_at, inst.state_id),
            )

    def get_instance(self, instance_id: str) -> InstanceRow | None:
        with self.db.read() as conn:
            row = conn.execute(
                _INSTANCE_SELECT + " WHERE i.instance_id = ?", (instance_id.lower(),)
            ).fetchone()
        return _instance_from(row) if row else None

    def list_instances(
        self, state: str | None = None, image: str | None = None, id_prefix: str | None = None
    ) -> list[InstanceRow]:
        where, params = _where(
            [
                ("i.state_id = ?", state),
                ("i.image_id = ?", image),
                ("lower(i.instance_id) LIKE ? ESCAPE '\\'", id_prefix and _prefix_like(id_prefix)),
            ]
        )
        with self.db.read() as conn:
            rows = conn.execute(_INSTANCE_SELECT + where + " ORDER BY i.rowid", params).fetchall()
        return [_instance_from(row) for row in rows]

    def update_instance_runtime(self, instance_id: str, runtime_id: str | None, port: int | None,
                                status: str, state_id: str | None = None) -> None:
        """Record where the instance's server runs (and, after a reset, its new state)."""
        with self.db.write() as conn:
            conn.execute(
                "UPDATE instances SET runtime_id = ?, port = ?, status = ?,"
                " state_id = COALESCE(?, state_id) WHERE instance_id = ?",
                (runtime_id, port, status, state_id, instance_id),
            )

    def update_instance_state(self, instance_id: str, state_id: str) -> None:
        """The instance now holds ``state_id``'s data (a reset)."""
        with self.db.write() as conn:
            conn.execute("UPDATE instances SET state_id = ? WHERE instance_id = ?",
                         (state_id, instance_id))

    def delete_instance(self, instance_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM names WHERE instance_id = ?", (instance_id,))
            conn.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))

    # names --------------------------------------------------------------------------------
    def list_names(
        self, instance: str | None = None, state: str | None = None, image: str | None = None
    ) -> list[NameRow]:
        where, params = _where(
            [
                ("n.instance_id = ?", instance),
                ("n.state_id = ?", state),
                ("n.image_id = ?", image),
            ]
        )
        with self.db.read() as conn:
            rows = conn.execute(_NAME_SELECT + where + " ORDER BY n.rowid", params).fetchall()
        return [_name_from(row) for row in rows]

    def get_name(self, name: str) -> NameRow | None:
        with self.db.read() as conn:
            row = conn.execute(_NAME_SELECT + " WHERE n.name = ?", (name,)).fetchone()
        return _name_from(row) if row else None

    def bind_name(self, name: str, inst: InstanceRow, only_if_free: bool = False) -> bool:
        """Bind ``name`` to the instance; True when the name is new. With ``only_if_free``
        nothing changes when a live instance holds the name (then False)."""
        with self.db.write() as conn:
            holder = conn.execute(
                "SELECT i.instance_id FROM names n LEFT JOIN instances i"
                " ON i.instance_id = n.instance_id WHERE n.name = ?", (name,)).fetchone()
            if only_if_free and holder and holder[0]:
                return False
            conn.execute("UPDATE names SET is_primary = 0 WHERE instance_id = ?",
                         (inst.instance_id,))
            conn.execute(
                "INSERT INTO names (name, instance_id, state_id, image_id, last_used_at,"
                " is_primary) VALUES (?,?,?,?,?,1) ON CONFLICT(name) DO UPDATE"
                " SET instance_id = excluded.instance_id, state_id = excluded.state_id,"
                " image_id = excluded.image_id, last_used_at = excluded.last_used_at,"
                " is_primary = 1",
                (name, inst.instance_id, inst.state_id, inst.image_id, format_ts()),
            )
        return holder is None or only_if_free

    def unbind_name(self, name: str) -> bool:
        with self.db.write() as conn:
            return conn.execute("DELETE FROM names WHERE name = ?", (name,)).rowcount > 0


###############################################################################
# queue: prepare jobs, their tasks and events in SQLite, plus the wake-up signal
# for event streams. Owns the prepare_* tables; may call store (SqlitePool).
###############################################################################

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS prepare_jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    prepare_kind TEXT NOT NULL,
    image_id TEXT NOT NULL,
    plan_only INTEGER NOT NULL DEFAULT 0,
    snapshot_mode TEXT NOT NULL DEFAULT 'always',
    prepare_args_normalized TEXT,
    signature TEXT,
    request_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    result_json TEXT,
    error_json TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS prepare_tasks (
    job_id TEXT NOT NULL REFERENCES prepare_jobs(job_id) ON DELETE CASCADE,
    task_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    planner_kind TEXT,
    input_kind TEXT,
    input_id TEXT,
    image_id TEXT,
    resolved_image_id TEXT,
    args_summary TEXT,
    task_hash TEXT,
    output_state_id TEXT,
    cached INTEGER,
    instance_mode TEXT,
    changeset_id TEXT,
    changeset_author TEXT,
    changeset_path TEXT,
    started_at TEXT,
    finished_at TEXT,
    error_json TEXT,
    PRIMARY KEY (job_id, task_id)
);
CREATE TABLE IF NOT EXISTS prepare_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES prepare_jobs(job_id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    ts TEXT NOT NULL,
    status TEXT,
    task_id TEXT,
    message TEXT,
    result_json TEXT,
    error_json TEXT
);
CREATE INDEX IF NOT EXISTS prepare_events_job ON prepare_events(job_id, seq);
CREATE TABLE IF NOT EXISTS lb_plans (
    plan_key TEXT PRIMARY KEY,
    changesets_json TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
LB_PLANS_KEPT = 200

TERMINAL_STATUSES = ("succeeded", "failed")
TASK_FIELDS = (
    "task_id", "type", "status", "planner_kind", "input_kind", "input_id", "image_id",
    "resolved_image_id", "args_summary", "task_hash", "output_state_id", "cached",
    "instance_mode", "changeset_id", "changeset_author", "changeset_path", "started_at",
    "finished_at", "error_json",
)


JobStatus = Annotated[str, Doc(enum=["queued", "running", "succeeded", "failed"])]


class TaskInput(TypedDict):
    kind: Annotated[str, Doc(enum=["image", "state"])]
    id: str


class TaskEntry(TypedDict):
    """A task of a job's plan; ``job_id``, ``status`` and ``args_summary`` only in
    ``GET /v1/tasks``."""
    task_id: Annotated[str, Doc(pattern="^(plan|resolve-image|execute-[0-9]+|prepare-instance)$")]
    job_id: NotRequired[Hex32 | None]
    type: Annotated[str, Doc(enum=["plan", "resolve_image", "state_execute",
                                   "prepare_instance"])]
    status: NotRequired[JobStatus | None]
    planner_kind: NotRequired[str | None]
    input: NotRequired[TaskInput | None]
    image_id: NotRequired[str | None]
    resolved_image_id: NotRequired[str | None]
    args_summary: NotRequired[Annotated[str | None, Doc("e.g. `-f /abs/x.sql`.")]]
    task_hash: NotRequired[Hex64 | None]
    output_state_id: NotRequired[Hex64 | None]
    cached: NotRequired[bool | None]
    instance_mode: NotRequired[str | None]
    changeset_id: NotRequired[str | None]
    changeset_author: NotRequired[str | None]
    changeset_path: NotRequired[str | None]


class PrepareJobResult(TypedDict):
    """What a succeeded prepare hands out."""
    dsn: Annotated[str, Doc("With the instance's password in a job's status; without it in "
                            "the events stream.", minLength=1)]
    instance_id: Hex32
    state_id: Hex64
    image_id: Annotated[str, Doc("Resolved image id.")]
    prepare_kind: Kind
    prepare_args_normalized: str


class PrepareJobEvent(TypedDict):
    """One line of a job's NDJSON events stream."""
    type: Annotated[str, Doc(enum=["status", "task", "log", "result", "error"])]
    ts: Timestamp
    status: NotRequired[JobStatus | None]
    task_id: NotRequired[str | None]
    message: NotRequired[str | None]
    result: NotRequired[PrepareJobResult | None]
    error: NotRequired[ErrorBody | None]


@dataclass
class JobRow:
    job_id: str
    status: str
    prepare_kind: str
    image_id: str
    plan_only: bool
    prepare_args_normalized: str | None
    signature: str | None
    request_json: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    result_json: str | None
    error_json: str | None
    attempts: int

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass
class PlanTask:
    """One task of a prepare plan; ``to_json`` gives the wire shape."""

    task_id: str
    type: str
    status: str = "queued"
    planner_kind: str | None = None
    input_kind: str | None = None
    input_id: str | None = None
    image_id: str | None = None
    resolved_image_id: str | None = None
    args_summary: str | None = None
    task_hash: str | None = None
    output_state_id: str | None = None
    cached: bool | None = None
    instance_mode: str | None = None
    changeset_id: str | None = None
    changeset_author: str | None = None
    changeset_path: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error_json: str | None = None
    #: the index of the step a ``state_execute`` task runs (the plan's, in memory only: a
    #: resumed job plans again)
    step: int | None = field(default=None, compare=False)

    def to_json(self, job_id: str | None = None) -> TaskEntry:
        listed = job_id is not None  # GET /v1/tasks carries the job's view of the task
        return omit_none(TaskEntry(
            task_id=self.task_id, job_id=job_id, type=self.type,
            status=self.status if listed else None, planner_kind=self.planner_kind,
            input=TaskInput(kind=self.input_kind, id=self.input_id or "")
            if self.input_kind else None,
            image_id=self.image_id, resolved_image_id=self.resolved_image_id,
            args_summary=self.args_summary if listed else None, task_hash=self.task_hash,
            output_state_id=self.output_state_id, cached=self.cached,
            instance_mode=self.instance_mode, changeset_id=self.changeset_id,
            changeset_author=self.changeset_author, changeset_path=self.changeset_path,
        ))


def _job_from(row: sqlite3.Row) -> JobRow:
    values = {k: row[k] for k in JobRow.__dataclass_fields__}
    values["plan_only"] = bool(values["plan_only"])
    return JobRow(**values)


def _task_from(row: sqlite3.Row) -> PlanTask:
    values = {k: row[k] for k in TASK_FIELDS}
    if values["cached"] is not None:
        values["cached"] = bool(values["cached"])
    return PlanTask(**values)


def event_to_json(row: sqlite3.Row) -> PrepareJobEvent:
    return omit_none(PrepareJobEvent(
        type=row["type"], ts=row["ts"], status=row["status"], task_id=row["task_id"],
        message=row["message"],
        result=json.loads(row["result_json"]) if row["result_json"] else None,
        error=json.loads(row["error_json"]) if row["error_json"] else None,
    ))



class JobColumns(TypedDict, total=False):
    """The ``prepare_jobs`` columns a job's progress changes: what ``update_job`` and
    ``EventEmitter.emit`` take, and nothing else."""

    status: str
    signature: str
    prepare_args_normalized: str
    started_at: str
    finished_at: str
    result_json: str
    error_json: str
    attempts: int


class TaskColumns(TypedDict, total=False):
    """The ``prepare_tasks`` columns a task's progress changes (``update_task``)."""

    status: str
    started_at: str
    finished_at: str
    error_json: str | None
    cached: int


def _assignments(fields: Mapping[str, Any], columns: type) -> str:
    """``col = ?, …`` for ``fields``, each one a column ``columns`` (a TypedDict) declares:
    column names never come from anywhere else."""
    unknown = set(fields) - set(columns.__annotations__)
    if unknown:
        raise ValueError(f"not a column of {columns.__name__}: {sorted(unknown)}")
    return ", ".join(f"{key} = ?" for key in fields)


class JobQueue:
    """Prepare jobs, tasks and events in SQLite; wakes event-stream readers on every append."""

    def __init__(self, db: SqlitePool) -> None:
        self.db = db
        db.migrate(QUEUE_SCHEMA)
        #: guards ``version``, bumped on every append; event streams wait on it
        self.changed = threading.Condition()
        self.version = 0

    def _notify(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    def wait_for_change(self, since: int, timeout: float) -> None:
        """Block until something changed after ``version`` was ``since`` (or timeout)."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != since, timeout)

    # jobs ---------------------------------------------------------------------------------
    def create_job(self, job: JobRow) -> None:
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO prepare_jobs (job_id, status, prepare_kind, image_id, plan_only,"
                " prepare_args_normalized, signature, request_json, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (job.job_id, job.status, job.prepare_kind, job.image_id, int(job.plan_only),
                 job.prepare_args_normalized, job.signature, job.request_json, job.created_at),
            )
            self._insert_event(conn, job.job_id, {"type": "status", "status": job.status})
        self._notify()

    def get_job(self, job_id: str) -> JobRow | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM prepare_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job_from(row) if row else None

    def list_jobs(self, prefix: str | None = None) -> list[JobRow]:
        where, params = _where([("job_id LIKE ? ESCAPE '\\'", prefix and _prefix_like(prefix))])
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM prepare_jobs" + where + " ORDER BY created_at, rowid", params
            ).fetchall()
        return [_job_from(row) for row in rows]

    def jobs_in(self, statuses: Sequence[str]) -> list[JobRow]:
        marks = ",".join("?" * len(statuses))
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT * FROM prepare_jobs WHERE status IN ({marks}) ORDER BY created_at",
                list(statuses),
            ).fetchall()
        return [_job_from(row) for row in rows]

    def expired_history(self, current_job: str, keep: int | None, cutoff: str) -> list[str]:
        """Completed jobs (other than ``current_job``, which counts as the newest) beyond the
        ``keep`` newest or finished before ``cutoff``."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT job_id, COALESCE(finished_at, created_at) AS done FROM prepare_jobs"
                " WHERE status IN ('succeeded','failed') AND job_id <> ?"
                " ORDER BY done DESC, rowid DESC", (current_job,)).fetchall()
        limit = len(rows) if keep is None else max(keep - 1, 0)
        return [row["job_id"] for index, row in enumerate(rows)
                if index >= limit or (cutoff and row["done"] < cutoff)]

    def completed_with_signature(self, signature: str) -> list[JobRow]:
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM prepare_jobs WHERE signature = ? AND status IN"
                " ('succeeded','failed') ORDER BY COALESCE(finished_at, created_at) DESC",
                (signature,),
            ).fetchall()
        return [_job_from(row) for row in rows]

    def update_job(self, job_id: str, *events: JsonDict, **fields: Unpack[JobColumns]) -> bool:
        """Update job columns and append ``events`` in the same transaction. A terminal status
        is final: a change of ``status`` applies (with its events) only to a job that has not
        ended yet; False when it did not apply."""
        guard = " AND status NOT IN ('succeeded', 'failed')" if "status" in fields else ""
        with self.db.write() as conn:
            if fields:
                sets = _assignments(fields, JobColumns)
                changed = conn.execute(f"UPDATE prepare_jobs SET {sets} WHERE job_id = ?{guard}",
                                       [*fields.values(), job_id]).rowcount
                if guard and not changed:
                    return False
            for event in events:
                self._insert_event(conn, job_id, event)
        self._notify()
        return True

    def delete_job(self, job_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM prepare_jobs WHERE job_id = ?", (job_id,))
        self.db.shrink()
        self._notify()

    # Liquibase plans, by what they depend on --------------------------------------------
    def lb_plan(self, key: str) -> list[JsonDict] | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT changesets_json FROM lb_plans WHERE plan_key = ?",
                               (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def save_lb_plan(self, key: str, changesets: list[JsonDict]) -> None:
        with self.db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO lb_plans VALUES (?, ?, ?)",
                         (key, json.dumps(changesets), format_ts()))
            conn.execute("DELETE FROM lb_plans WHERE plan_key NOT IN (SELECT plan_key FROM"
                         " lb_plans ORDER BY created_at DESC LIMIT ?)", (LB_PLANS_KEPT,))

    # tasks --------------------------------------------------------------------------------
    def replace_tasks(self, job_id: str, tasks: Sequence[PlanTask]) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM prepare_tasks WHERE job_id = ?", (job_id,))
            for position, task in enumerate(tasks):
                values = [getattr(task, name) for name in TASK_FIELDS]
                marks = ",".join("?" * (len(TASK_FIELDS) + 2))
                conn.execute(
                    f"INSERT INTO prepare_tasks (job_id, position, {', '.join(TASK_FIELDS)})"
                    f" VALUES ({marks})",
                    [job_id, position, *values],
                )

    def update_task(self, job_id: str, task_id: str, event: JsonDict | None = None,
                    **fields: Unpack[TaskColumns]) -> None:
        with self.db.write() as conn:
            sets = _assignments(fields, TaskColumns)
            conn.execute(f"UPDATE prepare_tasks SET {sets} WHERE job_id = ? AND task_id = ?",
                         [*fields.values(), job_id, task_id])
            if event:
                self._insert_event(conn, job_id, event)
        self._notify()

    def list_tasks(self, job_id: str | None = None) -> list[tuple[str, PlanTask]]:
        where, params = _where([("job_id = ?", job_id)])
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM prepare_tasks" + where + " ORDER BY job_id, position", params
            ).fetchall()
        return [(row["job_id"], _task_from(row)) for row in rows]

    # events -------------------------------------------------------------------------------
    def append_event(self, job_id: str, event: JsonDict) -> None:
        with self.db.write() as conn:
            self._insert_event(conn, job_id, event)
        self._notify()

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, job_id: str, event: JsonDict) -> None:
        conn.execute(
            "INSERT INTO prepare_events (job_id, type, ts, status, task_id, message,"
            " result_json, error_json) VALUES (?,?,?,?,?,?,?,?)",
            (
                job_id, event["type"], event.get("ts") or format_ts(), event.get("status"),
                event.get("task_id"), event.get("message"),
                json.dumps(event["result"]) if event.get("result") else None,
                json.dumps(event["error"]) if event.get("error") else None,
            ),
        )

    def events(self, job_id: str, start: int) -> list[PrepareJobEvent]:
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM prepare_events WHERE job_id = ? ORDER BY seq LIMIT -1 OFFSET ?",
                (job_id, start),
            ).fetchall()
        return [event_to_json(row) for row in rows]


###############################################################################
# registry: resolves instance references (id, else name: a name answers with a redirect) and
# state references (id or unique prefix).
# Owns nothing; may call store.
###############################################################################


@dataclass
class Resolution:
    instance: InstanceRow
    by_name: bool


class Registry:
    """Maps an instance reference (32-hex id, else a name) to an instance row, and a state
    reference (id, or a unique prefix of 8+ hex digits) to a state row."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    def resolve(self, ref: str) -> Resolution | None:
        if not ref:
            return None
        if is_instance_id(ref):
            found = self.store.get_instance(ref)
            if found:
                return Resolution(found, by_name=False)
        name = self.store.get_name(ref)
        if name and name.instance_id:
            target = self.store.get_instance(name.instance_id)
            if target:
                return Resolution(target, by_name=True)
        return None

    def resolve_state(self, ref: str) -> StateRow:
        """A state by full id or 8+ hex prefix (ambiguous → 409 listing the candidates)."""
        lowered = ref.lower()
        if is_state_id(lowered):
            state = self.store.get_state(lowered)
            if state:
                return state
            raise not_found("state not found")
        if len(lowered) < 8 or not re.fullmatch(r"[0-9a-f]+", lowered):
            raise invalid_argument("invalid state_id",
                                   "state_id must be a state id or at least 8 hex characters")
        matches = self.store.list_states(id_prefix=lowered)
        if not matches:
            raise not_found("state not found")
        if len(matches) > 1:
            raise conflict("ambiguous state id prefix", [row.state_id for row in matches])
        return matches[0]


def validate_name(name: str) -> None:
    if not name:
        raise invalid_argument("invalid name", "name is empty")
    if is_instance_id(name):
        raise invalid_argument("invalid name", "name must not look like an instance id")
    if not NAME_RE.match(name):
        raise invalid_argument(
            "invalid name", "name must be 1-63 characters of [A-Za-z0-9._-]"
        )


###############################################################################
# auth: bearer token and Host header checks (both made from the headers, before a body is
# read). Owns the token and the allowed host names; may call only the standard library.
###############################################################################


class Guard:
    """Checks a request's ``Authorization`` (constant time) and ``Host`` (DNS rebinding)."""

    LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")

    def __init__(self, token: str, listen_host: str, listen_port: int) -> None:
        self.token = token
        self._expected = f"Bearer {token}".encode()
        self._hosts = {name.lower() for name in self.LOOPBACK_NAMES}
        self._hosts.add(listen_host.lower())
        self.listen_port = listen_port

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest((header or "").strip().encode(), self._expected)

    def host_allowed(self, header: str | None) -> bool:
        if header is None:
            return True
        host = header.strip().lower()
        if host.startswith("["):
            bracket = host.find("]")
            name, rest = host[: bracket + 1], host[bracket + 1 :]
        else:
            name, _, port = host.partition(":")
            rest = f":{port}" if port else ""
        if rest and rest != f":{self.listen_port}":
            return False
        return name in self._hosts or name.rstrip(".") == "localhost"


###############################################################################
# stream: NDJSON encoding for list negotiation and event streams, and their Range header.
# Owns nothing; may call errors.
###############################################################################


def json_line(value: Any, compact: bool = True) -> bytes:
    """One JSON document and a newline, as UTF-8 (a lone surrogate, which UTF-8 cannot carry,
    becomes its JSON escape)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":") if compact else None)
    return (text + "\n").encode("utf-8", "backslashreplace")


def wants_ndjson(accept: str | None) -> bool:
    return "application/x-ndjson" in (accept or "").lower()


MAX_EVENT_INDEX = 1 << 62


def parse_events_range(header: str | None) -> str | None:
    """``Range: events=N-`` → N as decimal digits; None when absent; 416 for any other form."""
    if header is None:
        return None
    match = re.fullmatch(r"\s*events\s*=\s*(\d+)\s*-\s*", header)
    if not match:
        raise ApiError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "invalid_range",
                       "unsupported Range", "only Range: events=<n>- is supported")
    return match.group(1).lstrip("0") or "0"


def event_index(digits: str) -> int:
    """A Range start as an event index (any start past MAX_EVENT_INDEX is past the end)."""
    return int(digits) if len(digits) < 19 else MAX_EVENT_INDEX


###############################################################################
# snapshot: writable clones of immutable directories and atomic publication of states.
# Owns mounts under the expose root, instances' server directories beside them and the
# directories it is handed; may call nothing but ids and errors.
###############################################################################

MS_RDONLY = 1
MS_BIND = 4096
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
FICLONE = 0x40049409
#: an instance's server directory (``SnapshotManager.make_server_dir``) and what in it is the
#: postmaster's own (never copied into or out of its data)
SERVER_DIR_NAME = "pgdata"
SERVER_OWN_FILES = ("postmaster.pid", "postmaster.opts")
#: the top-level files a server renames away (a recovered backup's)
RENAMED_BY_SERVER = ("backup_label", "tablespace_map")
#: what a postmaster reads when it starts (and reloads): a reset in place keeps what it read
SERVER_CONFIG_FILES = ("PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "pg_hba.conf",
                       "pg_ident.conf")
#: a line that makes a server read other files: ``include``, ``include_dir``... in its
#: configuration, ``@file`` in pg_hba.conf and pg_ident.conf
INCLUDE_DIRECTIVES = {"postgresql.conf": re.compile(rb"(?m)^[ \t]*include(?:_dir|_if_exists)?\b"),
                      "pg_hba.conf": re.compile(rb"(?m)^[^#\n]*@"),
                      "pg_ident.conf": re.compile(rb"(?m)^[^#\n]*@")}
INCLUDE_DIRECTIVES["postgresql.auto.conf"] = INCLUDE_DIRECTIVES["postgresql.conf"]
MAX_LOWER_CHARS = 3000  # mount options must fit in one page, upper and work dirs included
#: written into a published state's directory last: a state without it is half-built
STATE_MARKER = ".build.ok"
#: written into an initialised base cluster's directory last (``Runtimes.ensure_base``)
BASE_MARKER = ".init.ok"


def is_published(directory: str, marker: str = STATE_MARKER) -> bool:
    """Whether a state (or, with ``BASE_MARKER``, a base cluster) was published whole."""
    return os.path.exists(os.path.join(directory, marker))


def mark_published(directory: str, marker: str = STATE_MARKER, durable: bool = True) -> None:
    """Write a directory's marker: the last step of publishing it (see ``is_published``)."""
    atomic_write(os.path.join(directory, marker), b"ok\n", 0o600, durable=durable)


def remove_published(directory: str) -> None:
    """Remove a state's directory, its marker first, so a crash mid-way never leaves a
    complete-looking half state."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, STATE_MARKER))
    remove_tree(directory)


class NamespaceMount:
    """What a process does between fork and exec to see an overlay when the engine is not
    root: enter a user and mount namespace of its own, map the engine's uid and gid to
    themselves (so Postgres runs as the engine's user, never as uid 0 of the namespace, and
    loses every capability at exec), and mount the overlay there (``userxattr``: whiteouts
    are 0/0 character devices and opaque directories carry ``user.overlay.opaque``). The
    mount dies with the last process of the namespace. Everything is computed before the
    fork; the child makes only system calls and, on failure, writes one line to its stderr."""

    def __init__(self, libc: Libc, target: str, options: str, flags: int = 0) -> None:
        self._libc = libc
        self._target = target.encode()
        self._options = options.encode()
        self._flags = libc.c_ulong(flags)
        uid, gid = os.geteuid(), os.getegid()
        self._maps = ((b"/proc/self/setgroups", b"deny"),
                      (b"/proc/self/uid_map", f"{uid} {uid} 1".encode()),
                      (b"/proc/self/gid_map", f"{gid} {gid} 1".encode()))

    def __call__(self) -> None:
        if self._libc.unshare_fn(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            self._fail("unshare(CLONE_NEWUSER|CLONE_NEWNS)")
        for path, line in self._maps:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        if self._libc.mount_fn(b"overlay", self._target, b"overlay", self._flags,
                               self._options) != 0:
            self._fail("mount overlay")

    def _fail(self, what: str) -> None:
        err = self._libc.errno()
        message = f"sqlrs-engine: {what}: {os.strerror(err)}"
        with contextlib.suppress(OSError):
            os.write(2, message.encode() + b"\n")
        raise OSError(err, message)


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, deepest first."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def dir_size(path: str) -> int:
    """Bytes allocated on disk below ``path`` (hard links counted once)."""
    total = os.lstat(path).st_blocks * 512
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def fsync_tree(path: str) -> None:
    """Flush ``path``'s filesystem (one ``syncfs`` instead of an fsync per file)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def copy_tree(source: str, dest: str, enter: Callable[[], None] | None = None) -> None:
    """``cp -a`` with reflinks where the filesystem has them (ownership and modes kept);
    ``enter`` runs in the child before ``cp`` (a ``NamespaceMount`` that makes ``source``)."""
    proc = subprocess.run(["cp", "-a", "--reflink=auto", "--", source, dest],
                          capture_output=True, text=True, check=False, env=child_env(),
                          preexec_fn=enter)
    if proc.returncode != 0:
        code = errno.ENOSPC if "No space left" in proc.stderr else errno.EIO
        raise OSError(code, f"copy {source} -> {dest}: {proc.stderr.strip()}")


def copy_live(sources: Sequence[str], dest: str) -> None:
    """``cp -a`` of files and trees a running server is changing into the directory ``dest``:
    a file that vanishes meanwhile is skipped, as ``pg_basebackup`` skips it (replaying the
    WAL recreates what it held); any other failure raises."""
    if not sources:
        return
    proc = subprocess.run(["cp", "-a", "--reflink=auto", "-t", dest, "--", *sources],
                          capture_output=True, text=True, check=False, env=child_env())
    check_live_copy(proc.returncode, proc.stderr, sources[0], dest)


def check_live_copy(code: int, errors: str, source: str, dest: str) -> None:
    """Raise unless a live copy succeeded but for files that vanished while it ran."""
    problems = [line for line in errors.splitlines()
                if line.strip() and "No such file or directory" not in line]
    if code != 0 and (problems or not errors.strip()):
        err = errno.ENOSPC if "No space left" in errors else errno.EIO
        raise OSError(err, f"copy {source} -> {dest}: {(problems or [errors])[0].strip()}")


def reflinks_work(directory: str) -> bool:
    """Whether files in ``directory`` can share their blocks (``FICLONE``: btrfs, XFS)."""
    probe = os.path.join(directory, f".reflink-probe-{random_hex(4)}")
    try:
        with open(probe, "wb") as source, open(probe + ".clone", "wb") as clone:
            source.write(b"x")
            source.flush()
            fcntl.ioctl(clone.fileno(), FICLONE, source.fileno())
        return True
    except OSError:
        return False
    finally:
        for path in (probe, probe + ".clone"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def userns_off_reason() -> str | None:
    """The kernel setting that forbids unprivileged user namespaces here, if one does."""
    settings = (("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces=0"),
                ("/proc/sys/kernel/unprivileged_userns_clone", "0",
                 "kernel.unprivileged_userns_clone=0"),
                ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
                 "kernel.apparmor_restrict_unprivileged_userns=1 (AppArmor)"))
    for path, value, setting in settings:
        with contextlib.suppress(OSError), open(path, encoding="ascii") as handle:
            if handle.read().strip() == value:
                return f"unprivileged user namespaces are switched off ({setting})"
    return None


def _remove_logged(path: str) -> None:
    try:
        remove_tree(path)
    except OSError as exc:
        log.warning("cannot remove %s yet: %s", path, exc)


def _runtime_file(runtime_dir: str, name: str, text: str) -> None:
    """Write a runtime's own file (its layers, mount mode, boot, a reset's intent): atomic,
    not fsynced (a runtime is only trusted within the boot that wrote it)."""
    atomic_write(os.path.join(runtime_dir, name), text.encode(), 0o600, durable=False)


def runtime_source(runtime_dir: str) -> str:
    """What a runtime's data is made from (its ``source`` file): the overlay's lower dirs,
    top first, joined by ``:``, or the one state directory it copied."""
    with open(os.path.join(runtime_dir, "source"), encoding="utf-8") as handle:
        return handle.read()


class SnapshotManager:
    """Clones states into writable data directories and publishes immutable states.

    Backends (``backend``; ``reason`` says why when it is not the best one here):

    - ``overlay`` (root): the state is the lower layer of an overlay mounted under
      ``expose_root`` (0711; the store stays 0700), a step's state is its upper layer.
    - ``overlay-userns`` (not root, Linux 5.11+): the same layers, but the overlay is mounted
      by the server process itself in a user and mount namespace of its own
      (``NamespaceMount``).
    - ``reflink`` / ``copy``: ``cp -a --reflink=auto`` (blocks shared where the filesystem can).

    How one runtime's data is made (its ``mount`` file; no file: a private copy):

    - ``engine``: an overlay mounted here, as root (a layer per step).
    - ``engine-flat``: the same, for a container that binds it: a remount would not reach the
      container, so its steps are published as copies.
    - ``namespace``: mounted by the host server in its own namespace (``namespace_for``).
    - ``container``: mounted by the container, as its root, from the layers bound into it
      (``container_mount``); the Docker daemon needs no help from the engine's user.

    In the last two the runtime's ``data`` directory stays empty outside: the engine reads
    and writes server files (``pg_hba.conf``, ``postmaster.pid``) in the upper layer while
    the overlay is not mounted (``files_dir_for``).
    """

    def __init__(self, wanted: str, expose_root: str | None, store_root: str) -> None:
        self.expose_root = expose_root
        self.wanted = wanted
        self._libc = Libc()
        self._root = os.geteuid() == 0
        self.backend, self.reason = self._choose_backend(wanted, store_root)

    # backends -----------------------------------------------------------------------------
    def _choose_backend(self, wanted: str, store_root: str) -> tuple[str, str | None]:
        reason = None
        if wanted == "copy":
            reason = "snapshot.backend is copy"
        elif self._root:
            reason = self._probe(self._probe_root)
            if reason is None:
                return "overlay", None
        else:
            reason = userns_off_reason() or self._probe(self._probe_userns)
            if reason is None:
                return "overlay-userns", None
        if reflinks_work(store_root):
            return "reflink", reason
        return "copy", f"{reason}; the store's filesystem has no reflinks"

    def _probe(self, mount: Callable[[str], None]) -> str | None:
        """Why an overlay cannot be mounted here (None when one can): one tried for real."""
        parent = self.expose_root or tempfile.gettempdir()
        probe = tempfile.mkdtemp(prefix=".probe-", dir=parent)
        try:
            for sub in ("lower", "upper", "work", "merged"):
                os.makedirs(os.path.join(probe, sub))
            mount(probe)
            return None
        except (OSError, subprocess.SubprocessError) as exc:
            return f"overlay cannot be mounted: {exc}"
        finally:
            remove_tree(probe)

    def _probe_root(self, probe: str) -> None:
        merged = os.path.join(probe, "merged")
        self._mount_overlay(os.path.join(probe, "lower"), probe, merged)
        self._libc.umount(merged)

    def _probe_userns(self, probe: str) -> None:
        enter = NamespaceMount(self._libc, os.path.join(probe, "merged"),
                               self._overlay_options(os.path.join(probe, "lower"), probe))
        proc = subprocess.run(["true"], capture_output=True, text=True, check=False,
                              env=child_env(), preexec_fn=enter)
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.strip())

    @staticmethod
    def mount_mode(runtime_dir: str) -> str:
        """How the runtime's data is made (see the class docstring); "" for a private copy."""
        try:
            with open(os.path.join(runtime_dir, "mount"), encoding="ascii") as handle:
                return handle.read().strip()
        except FileNotFoundError:
            return ""

    def _in_namespace(self, runtime_dir: str) -> bool:
        """Whether this runtime's overlay is mounted by its own processes, not here."""
        return self.mount_mode(runtime_dir) in ("namespace", "container")

    def _overlay_options(self, lower: str, runtime_dir: str | None) -> str:
        options = f"lowerdir={lower}"
        if runtime_dir:
            options += f",upperdir={runtime_dir}/upper,workdir={runtime_dir}/work"
        if not self._root:
            options += ",userxattr"
        return options

    def _mount_overlay(self, lower: str, runtime_dir: str, target: str) -> None:
        base = self._overlay_options(lower, runtime_dir)
        try:
            self._libc.mount("overlay", target, "overlay", 0, base + ",volatile")
        except OSError:
            self._libc.mount("overlay", target, "overlay", 0, base)

    def namespace_for(self, runtime_dir: str, data_dir: str) -> Callable[[], None] | None:
        """What a server process of this runtime does before exec (see ``NamespaceMount``);
        None when its data directory is already there. Called before every start: the work
        directory of the last mount goes first (a volatile overlay refuses a used one)."""
        if self.mount_mode(runtime_dir) != "namespace":
            return None
        work = os.path.join(runtime_dir, "work")
        remove_tree(work)
        os.makedirs(work, mode=0o700)
        lower = runtime_source(runtime_dir)
        return NamespaceMount(self._libc, data_dir,
                              self._overlay_options(lower, runtime_dir) + ",volatile")

    def container_mount(self, runtime_dir: str) -> str:
        """The overlay options a container mounts this runtime's data with (a fresh work
        directory each time; no ``volatile``: its leftovers would be root's)."""
        work = os.path.join(runtime_dir, "work")
        remove_tree(work)
        os.makedirs(work, mode=0o700)
        return f"lowerdir={runtime_source(runtime_dir)},upperdir={runtime_dir}/upper,workdir={work}"

    def container_view(self, runtime_dir: str) -> str:
        """The options of a read-only overlay of a stopped container runtime's layers."""
        return f"ro,lowerdir={runtime_dir}/upper:{runtime_source(runtime_dir)}"

    def files_dir_for(self, runtime_dir: str, data_dir: str) -> str:
        """Where the engine reads and writes the server's own files from outside."""
        if self._in_namespace(runtime_dir):
            return os.path.join(runtime_dir, "upper")
        server_dir = os.path.join(os.path.dirname(data_dir), SERVER_DIR_NAME)
        if self.uses_server_dir(runtime_dir) and os.path.isdir(server_dir):
            return server_dir
        return data_dir

    def exposed_path(self, key: str) -> str:
        return os.path.join(self.expose_root, key) if self.expose_root else ""

    # clones -------------------------------------------------------------------------------
    def _mode_for(self, mounter: str) -> str:
        """How a runtime whose server is started by ``mounter`` gets its data: ``host`` (a
        process exec'd here), ``container`` (a container that can mount an overlay itself) or
        ``bind`` (a container that can only bind a directory)."""
        if self.wanted == "copy":
            return ""
        if mounter == "container":
            return "container"
        if self.backend == "overlay":
            return "engine" if mounter == "host" else "engine-flat"
        return "namespace" if self.backend == "overlay-userns" and mounter == "host" else ""

    def clone(self, source: str, runtime_dir: str, key: str, owner: tuple[int, int],
              mounter: str = "host") -> str:
        """Make a writable copy of ``source`` for runtime ``key``; return its data dir."""
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
        _runtime_file(runtime_dir, "source", source)
        _runtime_file(runtime_dir, "boot_id", boot_id())
        mode = self._mode_for(mounter)
        if mode:
            _runtime_file(runtime_dir, "mount", mode)
            for sub in ("upper", "work"):
                os.makedirs(os.path.join(runtime_dir, sub), mode=0o700, exist_ok=True)
            upper = os.path.join(runtime_dir, "upper")
            if owner != (os.geteuid(), os.getegid()):
                os.chown(upper, *owner)
            os.chmod(upper, 0o700)
            if mode in ("namespace", "container"):
                target = os.path.join(runtime_dir, "data")
                os.makedirs(target, mode=0o700, exist_ok=True)
                return target
            target = self._mount_point(key)
            self._mount_overlay(source, runtime_dir, target)
            return target
        private = os.path.join(runtime_dir, "data")
        if ":" in source:
            self._copy_layers(source, private, key, runtime_dir)
        else:
            copy_tree(source, private)
        return self.expose(private, key)

    def _copy_layers(self, lowers: str, dest: str, key: str, runtime_dir: str) -> None:
        """Copy a layered state through a read-only overlay of its layers (mounted here when
        root, in the copying process's own namespace when not)."""
        view = os.path.join(self.exposed_path(key) or runtime_dir, "view")
        os.makedirs(view, mode=0o700, exist_ok=True)
        if not self._root:
            copy_tree(view, dest, NamespaceMount(
                self._libc, view, self._overlay_options(lowers, None), MS_RDONLY))
            os.rmdir(view)
            return
        self._libc.mount("overlay", view, "overlay", MS_RDONLY, f"lowerdir={lowers}")
        try:
            copy_tree(view, dest)
        finally:
            self._libc.umount(view, lazy=False)

    def reattach(self, runtime_dir: str, key: str) -> str:
        """Mount an existing runtime again (after its mount went away); return its data dir.
        A volatile overlay is only trusted within the boot that wrote it."""
        with open(os.path.join(runtime_dir, "boot_id"), encoding="utf-8") as handle:
            if handle.read() != boot_id():
                raise conflict("instance data did not survive a reboot",
                               "the instance's writes were never flushed; delete it")
        self.sync_server_dir(key)  # (its server directory goes: made again at its start)
        self.unexpose(key)
        if self._in_namespace(runtime_dir):
            return os.path.join(runtime_dir, "data")  # mounted by the server's next start
        if os.path.isdir(os.path.join(runtime_dir, "upper")):
            source = runtime_source(runtime_dir)
            work = os.path.join(runtime_dir, "work")
            remove_tree(work)  # a volatile mount leaves work/incompat behind; overlay refuses it
            os.makedirs(work, mode=0o700)
            target = self._mount_point(key)
            self._mount_overlay(source, runtime_dir, target)
            return target
        return self.expose(os.path.join(runtime_dir, "data"), key)

    def expose(self, private: str, key: str) -> str:
        """Make ``private`` reachable by the server user (bind mount when root)."""
        if not self.expose_root:
            return private
        target = self._mount_point(key)
        self._libc.mount(private, target, "", MS_BIND, "")
        return target

    @contextlib.contextmanager
    def exposed(self, private: str, key: str) -> Iterator[str]:
        """``private`` reachable by the server user during the block (``expose``), and
        no longer after it however it ends."""
        try:
            yield self.expose(private, key)
        finally:  # also after a half-made exposure
            self.unexpose(key)

    def _mount_point(self, key: str) -> str:
        target = os.path.join(self.exposed_path(key), "data")
        os.makedirs(target, mode=0o700, exist_ok=True)
        os.chmod(self.exposed_path(key), 0o711)
        return target

    def unmount(self, target: str) -> None:
        if self._root:
            self._libc.umount(target)

    def data_dir_for(self, runtime_dir: str, key: str) -> str:
        if not self.expose_root or self._in_namespace(runtime_dir):
            return os.path.join(runtime_dir, "data")
        return os.path.join(self.exposed_path(key), "data")

    def socket_dir_for(self, key: str) -> str:
        if self.expose_root:
            return os.path.join(self.exposed_path(key), "sock")
        return os.path.join(tempfile.gettempdir(), f"sqlrs-{key[:24]}")

    def unexpose(self, key: str) -> None:
        if self.expose_root:
            for point in mounts_under(self.exposed_path(key)):
                self.unmount(point)
            remove_tree(self.exposed_path(key))
        else:
            remove_tree(self.socket_dir_for(key))

    def release(self, runtime_dir: str, key: str) -> None:
        """Unmount and remove everything of runtime ``key``."""
        self.unexpose(key)
        remove_tree(runtime_dir)

    # publication --------------------------------------------------------------------------
    def content_size(self, runtime_dir: str, data_dir: str) -> int:
        """Bytes a full copy of a stopped runtime's data would take (at most)."""
        if not self._in_namespace(runtime_dir):
            return dir_size(data_dir)
        lowers = runtime_source(runtime_dir).split(":")
        return sum(dir_size(path) for path in [os.path.join(runtime_dir, "upper"), *lowers])

    def publish(self, runtime_dir: str, data_dir: str, final_dir: str,
                copy_out: Callable[[str], None] | None = None) -> int:
        """Copy a stopped runtime's data into ``final_dir/pgdata`` atomically; return its size
        in bytes. A namespaced overlay is copied through a read-only view of its layers in a
        namespace; a container's by ``copy_out`` (the runtime: it fills a new directory in
        the runtime's directory, which is then moved into place)."""
        enter = None
        if self.mount_mode(runtime_dir) == "namespace":
            lowers = f"{runtime_dir}/upper:{runtime_source(runtime_dir)}"
            enter = NamespaceMount(self._libc, data_dir, self._overlay_options(lowers, None),
                                   MS_RDONLY)

        def fill(tmp: str) -> None:
            if self.mount_mode(runtime_dir) == "container":
                assert copy_out, "a container's runtime is copied by its runtime"
                flat = os.path.join(runtime_dir, f"flat-{random_hex(4)}")
                try:
                    copy_out(flat)
                    os.rename(flat, os.path.join(tmp, "pgdata"))
                finally:
                    remove_tree(flat)
            else:
                copy_tree(data_dir, os.path.join(tmp, "pgdata"), enter)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp, "pgdata", "postmaster.pid"))

        return self._publish_atomically(final_dir, fill)

    @staticmethod
    def _publish_atomically(final_dir: str, fill: Callable[[str], None],
                            flush: bool = True) -> int:
        """Build a state in a temporary sibling directory, flush it, rename it into place, then
        write the marker; a crash at any point leaves no complete-looking half state. Without
        ``flush`` the caller flushes it later (``flush_state``) and records meanwhile that a
        machine crash may have left it incomplete."""
        parent = os.path.dirname(final_dir)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}-{random_hex(4)}")
        try:
            os.makedirs(tmp, mode=0o700)
            fill(tmp)
            if flush:
                fsync_tree(tmp)
            os.rename(tmp, final_dir)
        except BaseException:
            remove_tree(tmp)
            raise
        if flush:
            fsync_dir(parent)
        mark_published(final_dir, durable=flush)
        return dir_size(final_dir)

    def publish_tree(self, pgdata: str, final_dir: str, move: bool,
                     flush: bool = True) -> int:
        """Publish a full data directory made elsewhere (moved when ``move``, else copied;
        ``flush`` as for ``_publish_atomically``)."""
        def fill(tmp: str) -> None:
            (os.rename if move else copy_tree)(pgdata, os.path.join(tmp, "pgdata"))

        return self._publish_atomically(final_dir, fill, flush)

    @property
    def stacks_layers(self) -> bool:
        """Whether layers can be made here from elsewhere (``publish_upper``): root's overlay,
        whose whiteouts and opaque marks need root."""
        return self.backend == "overlay"

    def publish_upper(self, final_dir: str, lowers: str,
                      make: Callable[[str, Callable[[str], None], Callable[[str], None]], None],
                      flush: bool = True) -> int:
        """Publish a layer over ``lowers`` made by ``make(layer_dir, whiteout, opaque)``: it
        fills an empty directory and calls ``whiteout(path)`` for what the layer deletes and
        ``opaque(directory)`` for a directory that hides what lies below it (the overlay's
        own marks: a 0/0 character device, the ``trusted.overlay.opaque`` attribute)."""
        def whiteout(path: str) -> None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))

        def opaque(directory: str) -> None:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.setxattr(directory, "trusted.overlay.opaque", b"y", follow_symlinks=False)

        def fill(tmp: str) -> None:
            layer = os.path.join(tmp, "layer")
            os.makedirs(layer, mode=0o700)
            make(layer, whiteout, opaque)
            atomic_write(os.path.join(tmp, "lowers"), lowers.encode(), 0o600, durable=flush)

        return self._publish_atomically(final_dir, fill, flush)

    @staticmethod
    def flush_state(final_dir: str) -> None:
        """Flush a state published without it (its files, its directory, its marker)."""
        fsync_tree(final_dir)
        fsync_dir(os.path.dirname(final_dir))

    @staticmethod
    def source_of(state_dir: str) -> str:
        """What a clone of a state mounts (or copies): a layered state stacks its own layer on
        the layers below it (``a:b:…:base``), a flat state is one directory."""
        layer = os.path.join(state_dir, "layer")
        if os.path.isdir(layer):
            with open(os.path.join(state_dir, "lowers"), encoding="utf-8") as handle:
                return f"{layer}:{handle.read()}"
        return os.path.join(state_dir, "pgdata")

    def layer_size(self, runtime_dir: str) -> int | None:
        """Bytes a layered publication of this runtime would add; None when it can't layer
        (no overlay, or a stack of lower layers too long for one mount)."""
        upper = os.path.join(runtime_dir, "upper")
        if self.mount_mode(runtime_dir) in ("", "engine-flat") or not os.path.isdir(upper):
            return None
        if len(runtime_source(runtime_dir)) > MAX_LOWER_CHARS:
            return None
        return dir_size(upper)

    def publish_layer(self, runtime_dir: str, key: str, owner: tuple[int, int],
                      final_dir: str) -> int:
        """Publish a stopped overlay runtime's upper layer as a state without copying it, and
        mount the runtime again on top of the new state; return the layer's size."""
        lowers = runtime_source(runtime_dir)
        if not self._in_namespace(runtime_dir):  # a namespace's mount died with its server
            self._libc.umount(os.path.join(self.exposed_path(key), "data"), lazy=False)

        def fill(tmp: str) -> None:
            os.rename(os.path.join(runtime_dir, "upper"), os.path.join(tmp, "layer"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp, "layer", "postmaster.pid"))
            atomic_write(os.path.join(tmp, "lowers"), lowers.encode(), 0o600)

        size = self._publish_atomically(final_dir, fill)
        self._remount(runtime_dir, key, owner, self.source_of(final_dir))
        return size

    def rebase(self, runtime_dir: str, key: str, owner: tuple[int, int], state_dir: str) -> None:
        """Mount a stopped overlay runtime afresh on the flat state just copied from it (the
        same content): its stack of layers starts again from one directory, so a long chain
        costs one copy every so many steps instead of one at every step. Nothing to do for
        a runtime that is not layered."""
        if self.mount_mode(runtime_dir) in ("", "engine-flat"):
            return
        if not self._in_namespace(runtime_dir):
            self._libc.umount(os.path.join(self.exposed_path(key), "data"), lazy=False)
        self._remount(runtime_dir, key, owner, self.source_of(state_dir))

    # snapshots of live runtimes ------------------------------------------------------------
    def publish_online(self, runtime_dir: str, data_dir: str, final_dir: str,
                       backup_start: Callable[[], None],
                       backup_stop: Callable[[], tuple[str, str]],
                       copy: Callable[[Sequence[str], str], None] = copy_live) -> int:
        """Publish a running runtime's data as a state, consistently, while its server goes
        on: between ``backup_start`` and ``backup_stop`` (an online backup: the server writes
        full pages to the WAL meanwhile) the files it changed are copied (its upper layer,
        a layer on the states below it; or, not layered, all of its data), then its WAL up to
        the backup's end, and the backup label that makes the first start of a clone
        replay it. Any version of a file read in between is right once the WAL is replayed,
        as in any base backup. ``copy(sources, dest)`` copies live files and trees into a
        directory. Returns the state's size."""
        mode = self.mount_mode(runtime_dir)
        layered = mode in ("engine", "namespace", "container")
        source = os.path.join(runtime_dir, "upper") if layered else data_dir

        def fill(tmp: str) -> None:
            dest = os.path.join(tmp, "layer" if layered else "pgdata")
            st = os.stat(source)
            os.mkdir(dest, 0o700)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(dest, st.st_uid, st.st_gid)
            backup_start()
            pause_point("snapshot-copy")
            copy([os.path.join(source, name) for name in os.listdir(source)
                  if name not in ("pg_wal", "postmaster.pid", "postmaster.opts")], dest)
            label, tablespaces = backup_stop()
            copy([path for path in [os.path.join(source, "pg_wal")] if os.path.lexists(path)],
                 dest)  # the WAL up to the backup's end (and what followed), after it
            for name, content in (("backup_label", label), ("tablespace_map", tablespaces)):
                if content:
                    write_file_in(dest, name, content.encode(), 0o600, (st.st_uid, st.st_gid))
            if layered:
                atomic_write(os.path.join(tmp, "lowers"), runtime_source(runtime_dir).encode(),
                             0o600)

        return self._publish_atomically(final_dir, fill, flush=False)

    # resets -------------------------------------------------------------------------------
    @staticmethod
    def begin_reset(runtime_dir: str, intent: str) -> None:
        """Record that a stopped runtime's data is being replaced (``intent``: the caller's
        note of what by); from here on an interrupted reset is finished, never undone."""
        _runtime_file(runtime_dir, "reset", intent)

    @staticmethod
    def reset_intent(runtime_dir: str) -> str | None:
        """The note of a reset that was begun and not finished, if any."""
        try:
            with open(os.path.join(runtime_dir, "reset"), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def finish_reset(self, runtime_dir: str, key: str, owner: tuple[int, int],
                     source: str, seed: str | None = None) -> bool:
        """Make a stopped runtime's data the state at ``source``: a fresh upper layer on it (an
        overlay runtime; starting as a copy of ``seed``, see ``reset_seed``: True when it
        does), or its copy in place of the old one (the directory itself stays: a container
        or a bind mount holds it). Idempotent, so an interrupted reset is finished by doing
        it again; the intent stays until ``end_reset``. The old upper layer is left for
        ``remove_trash``, which the caller runs once its server is up."""
        mode = self.mount_mode(runtime_dir)
        if mode in ("engine", "engine-flat"):
            self._libc.umount(os.path.join(self.exposed_path(key), "data"))
        if mode:
            return self._remount(runtime_dir, key, owner, source, seed, keep_trash=True)
        else:
            data = os.path.join(runtime_dir, "data")
            fresh = os.path.join(runtime_dir, "data.reset")
            remove_tree(fresh)
            if ":" in source:
                self._copy_layers(source, fresh, key, runtime_dir)
            else:
                copy_tree(source, fresh)
            for name in os.listdir(data):
                remove_tree(os.path.join(data, name))
            for name in os.listdir(fresh):
                os.rename(os.path.join(fresh, name), os.path.join(data, name))
            os.rmdir(fresh)
            _runtime_file(runtime_dir, "source", source)
        return False

    # reset seeds: what a start, the instance's password and a clean stop write over a state,
    # kept in the runtime (``seed-<state id>``, one at a time) and copied into the fresh upper
    # layer of each later reset to that state, whose server then starts with its password.
    # Root's overlays only (``copy_layer`` remakes the layer's whiteouts and overlay xattrs).
    def reset_seed(self, runtime_dir: str, state_id: str) -> str | None:
        """The runtime's seed for ``state_id``, if it has one."""
        path = os.path.join(runtime_dir, f"seed-{state_id}")
        return path if self.can_seed(runtime_dir) and os.path.isdir(path) else None

    def swaps_data(self, runtime_dir: str) -> bool:
        """Whether a reset gives the runtime new data beside the old (a new overlay on a fresh
        upper layer), so its old server may still be ending meanwhile; False when the data
        is replaced in place."""
        return self.mount_mode(runtime_dir) in ("engine", "engine-flat", "namespace")

    def can_seed(self, runtime_dir: str) -> bool:
        return self.mount_mode(runtime_dir) == "engine"

    @staticmethod
    def drop_seeds(runtime_dir: str) -> None:
        """Forget every seed (and a half-made one): the caller's state is about to change."""
        for name in os.listdir(runtime_dir):
            if name.startswith(("seed-", ".seed-")):
                remove_tree(os.path.join(runtime_dir, name))

    def save_seed(self, runtime_dir: str, state_id: str) -> None:
        """Keep the upper layer of a runtime stopped cleanly over ``state_id`` as its seed (the
        only one it keeps); made aside and renamed into place, so a seed is whole or absent."""
        self.drop_seeds(runtime_dir)
        staged = os.path.join(runtime_dir, f".seed-{random_hex(4)}")
        os.mkdir(staged, 0o700)
        try:
            copy_layer(os.path.join(runtime_dir, "upper"), staged)
            os.rename(staged, os.path.join(runtime_dir, f"seed-{state_id}"))
        except BaseException:
            remove_tree(staged)
            raise

    def stage_seed(self, runtime_dir: str, state_id: str) -> None:
        """Copy the runtime's seed for ``state_id`` ahead of its next reset (``seed-<id>.staged``,
        made aside and renamed: whole or absent), which then renames it into place instead of
        copying. Nothing to do without a seed or when a copy is staged already."""
        seed = self.reset_seed(runtime_dir, state_id)
        if seed is None or os.path.isdir(f"{seed}.staged"):
            return
        making = os.path.join(runtime_dir, f".seed-{random_hex(4)}")
        os.mkdir(making, 0o700)
        try:
            copy_layer(seed, making)
            os.rename(making, f"{seed}.staged")
        except BaseException:
            remove_tree(making)
            raise

    @staticmethod
    def remove_trash(runtime_dir: str) -> None:
        """Remove the upper layers resets moved aside (``.trash-*``); a runtime removed
        meanwhile has none."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(runtime_dir):
                if name.startswith(".trash-"):
                    _remove_logged(os.path.join(runtime_dir, name))

    @staticmethod
    def end_reset(runtime_dir: str) -> None:
        """The reset is recorded everywhere: its intent goes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(runtime_dir, "reset"))

    def _remount(self, runtime_dir: str, key: str, owner: tuple[int, int], source: str,
                 seed: str | None = None, keep_trash: bool = False) -> bool:
        """A fresh upper layer on ``source`` (a copy of ``seed``, made before the mount, when
        given: True when it was; the copy ``stage_seed`` made ahead is taken when there is
        one); the old one (what an instance wrote before a reset) is moved aside and removed
        in the background, or with ``keep_trash`` left for ``remove_trash`` (a removal that
        fails is logged and the runtime's own removal takes it later)."""
        trash = os.path.join(runtime_dir, f".trash-{random_hex(4)}")
        os.mkdir(trash, 0o700)
        for sub in ("upper", "work"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(os.path.join(runtime_dir, sub), os.path.join(trash, sub))
        upper, seeded = os.path.join(runtime_dir, "upper"), False
        if seed and os.path.isdir(f"{seed}.staged"):
            os.rename(f"{seed}.staged", upper)
            seeded = True
        else:
            os.mkdir(upper, 0o700)
        os.mkdir(os.path.join(runtime_dir, "work"), 0o700)
        if not keep_trash:
            in_background("remove-old-layer", _remove_logged, trash)
        if owner != (os.geteuid(), os.getegid()):
            os.chown(upper, *owner)
        if seed and not seeded:
            try:
                copy_layer(seed, os.path.join(runtime_dir, "upper"))
                seeded = True
            except OSError as exc:  # the reset goes on as without a seed (and forgets it)
                log.warning("reset seed %s not used: %s", seed, exc)
                self.drop_seeds(runtime_dir)
                for name in os.listdir(os.path.join(runtime_dir, "upper")):
                    remove_tree(os.path.join(runtime_dir, "upper", name))
        _runtime_file(runtime_dir, "source", source)
        if not self._in_namespace(runtime_dir):
            self._mount_overlay(source, runtime_dir, self._mount_point(key))
        if self.uses_server_dir(runtime_dir) and os.path.isdir(self.server_dir_for(key)):
            self.make_server_dir(key, owner)
        return seeded

    # server directories: an instance's host server as root does not run in its overlay but
    # in a directory of its own beside it (``<exposed>/pgdata``): a symlink to each top-level
    # directory of the data and its own copy of each top-level file. Its working directory is
    # then not the overlay, so a reset can put a new overlay under a running postmaster
    # (``HostRuntime.freeze``). The server writes its top-level files there (its lock file,
    # ALTER SYSTEM's postgresql.auto.conf, a recovered backup's backup_label.old):
    # ``sync_server_dir`` writes them back into the data before its upper layer is copied.
    def server_dir_for(self, key: str) -> str:
        return os.path.join(self.exposed_path(key), SERVER_DIR_NAME)

    def uses_server_dir(self, runtime_dir: str) -> bool:
        """Whether an instance's server of this runtime runs in a server directory."""
        return self.mount_mode(runtime_dir) == "engine"

    def make_server_dir(self, key: str, owner: tuple[int, int]) -> None:
        """Make runtime ``key``'s server directory (mode 0700, ``owner``'s) match its mounted
        data: a symlink for each top-level directory, a copy of each top-level file (what is
        the same already stays); the postmaster's own files (``SERVER_OWN_FILES``) stay and
        anything else goes. A new one is made aside and renamed into place, so one that
        exists is whole. Nothing is followed or waited on: the server user owns both, and
        its top-level files may take ``SMALL_FILE_LIMIT`` bytes in all (they are configuration)."""
        data = os.path.join(self.exposed_path(key), "data")
        path = self.server_dir_for(key)
        wanted: dict[str, str | bytes] = {}  # name -> a symlink's target or a file's bytes
        budget = SMALL_FILE_LIMIT
        with os.scandir(data) as entries:
            for entry in entries:
                if entry.name in SERVER_OWN_FILES:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    wanted[entry.name] = entry.path
                elif entry.is_file(follow_symlinks=False):
                    content = read_small_file(data, entry.name, budget)
                    budget -= len(content)
                    wanted[entry.name] = content
                else:
                    log.warning("%s is neither a directory nor a file: not in the server's"
                                " directory", entry.path)
        fresh = not os.path.isdir(path)
        making = os.path.join(self.exposed_path(key), f".{SERVER_DIR_NAME}-{random_hex(4)}")
        if fresh:
            os.mkdir(making, 0o700)  # root's until it is whole
        dir_fd = os.open(making if fresh else path,
                         os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(dir_fd):
                if name in SERVER_OWN_FILES:
                    continue
                if name in wanted and _entry_at(dir_fd, name) == wanted[name]:
                    del wanted[name]
                else:
                    remove_untrusted(dir_fd, name)
            for name, target in wanted.items():
                if isinstance(target, str):
                    os.symlink(target, name, dir_fd=dir_fd)  # (whose it is does not matter)
                else:
                    write_file_in(making if fresh else path, name, target, 0o600, owner)
            os.fchown(dir_fd, *owner)
            os.fchmod(dir_fd, 0o700)
        finally:
            os.close(dir_fd)
        if fresh:
            os.rename(making, path)

    def server_files(self, key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        """The bytes of the server directory's files ``names`` (None: not a file there)."""
        path = self.server_dir_for(key)
        found: dict[str, bytes | None] = {}
        for name in names:
            try:
                found[name] = read_small_file(path, name)
            except OSError:
                found[name] = None
        return found

    def sync_server_dir(self, key: str) -> None:
        """Write back into runtime ``key``'s data what its server changed among the top-level
        files of its server directory (a file whose bytes differ; the removal of a file the
        server renames away, ``RENAMED_BY_SERVER``, such as a recovered backup's label), so
        that a copy of the data's upper layer holds them. Nothing to do without a server
        directory or a mounted overlay."""
        path, data = self.server_dir_for(key), os.path.join(self.exposed_path(key), "data")
        if not self.expose_root or not os.path.isdir(path) or not os.path.ismount(data):
            return
        st = os.lstat(path)
        owner = (st.st_uid, st.st_gid)
        with os.scandir(path) as entries:
            ours = {entry.name for entry in entries if entry.name not in SERVER_OWN_FILES
                    and entry.is_file(follow_symlinks=False)}
        for name in ours:
            content = read_small_file(path, name)
            with contextlib.suppress(OSError):
                if read_small_file(data, name) == content:
                    continue
            write_file_in(data, name, content, 0o600, owner)
        for name in RENAMED_BY_SERVER:
            if name not in ours and os.path.isfile(os.path.join(data, name)):
                os.unlink(os.path.join(data, name))


def copy_layer(source: str, dest: str) -> None:
    """Copy the overlay layer ``source`` into the existing, empty directory ``dest`` (as
    root): modes, owners and extended attributes (the overlay's opaque marks) kept, whiteouts
    (0/0 character devices) made again, bytes copied in the kernel, times not (Postgres never
    reads them). Nothing is followed: directories are walked by descriptor (``os.fwalk``),
    files opened ``O_NOFOLLOW`` and checked with ``fstat``; a symlink or any other kind of
    file is an OSError (a layer of Postgres's data holds neither)."""
    for root, _dirs, files, root_fd in os.fwalk(source):
        relative = os.path.relpath(root, source)
        target = os.path.normpath(os.path.join(dest, relative))
        if relative != ".":
            os.mkdir(target, 0o700)
        target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                            | os.O_CLOEXEC)
        try:
            _copy_attributes(root_fd, target_fd)
        finally:
            os.close(target_fd)
        for name in files:
            path = os.path.join(target, name)
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout
                os.mknod(path, stat.S_IFCHR | stat.S_IMODE(st.st_mode), 0)
                os.lchown(path, st.st_uid, st.st_gid)
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=root_fd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, f"not a file: {os.path.join(root, name)}")
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600)
                try:
                    while os.copy_file_range(fd, out, 1 << 30):
                        pass
                    _copy_attributes(fd, out)
                finally:
                    os.close(out)
            finally:
                os.close(fd)


def _copy_attributes(source: int, dest: int) -> None:
    """Owner, mode and extended attributes of the open file ``source`` onto ``dest``."""
    st = os.fstat(source)
    os.fchown(dest, st.st_uid, st.st_gid)
    os.fchmod(dest, stat.S_IMODE(st.st_mode))
    for attribute in os.listxattr(source):
        os.setxattr(dest, attribute, os.getxattr(source, attribute))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


###############################################################################
# dbms: the Postgres server lifecycle through its own binaries (initdb, start, fast stop),
# its authentication set-up and the engine's private sessions. Owns the server processes it
# starts and the OS user they run as; may call nothing but ids and errors.
###############################################################################

@dataclass(frozen=True)
class ServerUser:
    """The OS user Postgres runs as (``postgres`` when the engine is root, else ourselves)."""

    uid: int
    gid: int
    name: str

    @classmethod
    def detect(cls) -> ServerUser:
        if os.geteuid() == 0:
            for candidate in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(candidate)
                    return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def can_enter(self, path: str) -> bool:
        """Whether this user may search every directory down to ``path``."""
        current = "/"
        for part in [p for p in os.path.abspath(path).split("/") if p] + [""]:
            try:
                st = os.stat(current)
            except OSError:
                return False
            bit = (stat.S_IXUSR if st.st_uid == self.uid else
                   stat.S_IXGRP if st.st_gid == self.gid else stat.S_IXOTH)
            if not st.st_mode & bit:
                return False
            current = os.path.join(current, part)
        return True


SUPERUSER = "sqlrs"
INITDB_OPTIONS = (
    f"--username={SUPERUSER}", "--auth-local=trust", "--auth-host=scram-sha-256",
    "--encoding=UTF8", "--locale=C", "--wal-segsize=1", "--no-sync",
)
#: Written over a data directory's pg_hba.conf before every start, whatever state it came
#: from: the unix socket (in a directory only the server user may enter) is trusted, every TCP
#: client needs the instance's password.
PG_HBA = (
    b"# written by sqlrs-engine before every start\n"
    b"local all all trust\n"
    b"host all all 0.0.0.0/0 scram-sha-256\n"
    b"host all all ::/0 scram-sha-256\n"
)
SERVER_SETTINGS = (
    "listen_addresses=127.0.0.1", "fsync=off", "full_page_writes=off", "logging_collector=off",
    "max_wal_size=1GB", "min_wal_size=2MB", "wal_recycle=off", "wal_level=minimal",
    "max_wal_senders=0",
)
READY_POLL_SECONDS = 0.002


def server_settings(serving: bool) -> tuple[str, ...]:
    """The settings of a server: a build's writes the least WAL (``wal_level=minimal``); an
    instance's (``serving``) enough for an online backup, which a snapshot of it takes, and
    a restart of its processes after a crash (which a reset in place is, see
    ``HostRuntime.freeze``) that neither ALTER SYSTEM can turn off nor spends time looking
    for the temporary files of data that is thrown away."""
    if not serving:
        return SERVER_SETTINGS
    return (*("wal_level=replica" if s == "wal_level=minimal" else s for s in SERVER_SETTINGS),
            "restart_after_crash=on", "remove_temp_files_after_crash=off")


def write_hba(data_dir: str, owner: tuple[int, int]) -> None:
    """Replace the data directory's pg_hba.conf (the server user's directory: written through
    its descriptor, never by path)."""
    write_file_in(data_dir, "pg_hba.conf", PG_HBA, 0o600, owner)


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for ``password`` (RFC 5802/7677): what the
    engine sends instead of the password itself."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    encode = base64.b64encode
    return (f"SCRAM-SHA-256${iterations}:{encode(salt).decode()}"
            f"${encode(stored_key).decode()}:{encode(server_key).decode()}")


def admin_query(endpoint: tuple[str, int], application: str, sql: str, *params: Any) -> Any:
    """Run one statement as superuser over a server's private unix socket (``endpoint``: its
    directory and port) in a session of its own; its first row, if it returns rows. Any
    failure is a DbmsError. psycopg2 is imported here, on first use."""
    with admin_session(endpoint, application) as query:
        return query(sql, *params)


@contextlib.contextmanager
def admin_session(endpoint: tuple[str, int], application: str
                  ) -> Iterator[Callable[..., Any]]:
    """One superuser session over a server's private socket for the block (statements that
    belong together, such as an online backup's start and stop): it yields ``query(sql,
    *params)``, which returns the first row, if any. Any failure is a DbmsError."""
    import psycopg2

    try:
        conn = psycopg2.connect(host=endpoint[0], port=endpoint[1], user=SUPERUSER,
                                dbname="postgres", connect_timeout=10,
                                application_name=application)
    except psycopg2.Error as exc:
        raise DbmsError(f"cannot connect: {str(exc).strip()}") from exc
    conn.autocommit = True

    def query(sql: str, *params: Any) -> Any:
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone() if cur.description else None
        except psycopg2.Error as exc:
            raise DbmsError(f"{sql.split()[0]} failed: {str(exc).strip()}") from exc

    try:
        yield query
    finally:
        conn.close()


class DbmsError(Exception):
    """Postgres could not be initialised, started or stopped; the message says why."""


def read_postmaster_pid(data_dir: str) -> list[str]:
    """The lines of the server's lock file; [] when it is missing or not a small regular
    file (the server user controls the data directory)."""
    try:
        data = read_regular_file(os.path.join(data_dir, "postmaster.pid"), 4096)
        return data.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` stopped, ``Z``...); "" when
    there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def works_in(pid: int, directory: str) -> bool:
    """Whether process ``pid``'s working directory is ``directory`` (the same inode)."""
    try:
        here, there = os.stat(f"/proc/{pid}/cwd"), os.stat(directory)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def process_cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read(1 << 16)
    except OSError:
        return b""


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def signal_checked(pid: int, signum: int, check: Callable[[int], bool]) -> bool:
    """Send ``signum`` to process ``pid`` when ``check(pid)`` holds, through a pidfd taken
    before the check, so that a pid reused meanwhile is never signalled. False when not
    sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not check(pid):
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def process_children(pid: int) -> list[int]:
    """The children of process ``pid`` (of each of its threads)."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
            children += [int(word) for word in handle.read().split()]
    return children


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail_file(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


SETPRIV = "/usr/bin/setpriv"


def trusted_setpriv() -> str | None:
    """util-linux's ``setpriv`` when root owns it and the directories above it and no one
    else may change them (a sticky directory such as /tmp is fine); None otherwise, and the
    engine switches users in Popen."""
    path = SETPRIV
    try:
        while True:
            st = os.stat(path)
            writable = st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode)
                                                   and st.st_mode & stat.S_ISVTX)
            if st.st_uid != 0 or writable:
                log.info("not using %s: %s is not root's alone", SETPRIV, path)
                return None
            if path == "/":
                return SETPRIV
            path = os.path.dirname(path)
    except OSError:
        return None


class PostgresDbms:
    """Starts and stops Postgres servers without ``pg_ctl -w`` pacing (readiness polled every 2 ms).

    Readiness is read from ``postmaster.pid`` (line 8 becomes ``ready``) every 2 ms and
    confirmed with one TCP connection; stop is SIGINT (fast shutdown) and a wait for the pid.
    """

    def __init__(self, user: ServerUser) -> None:
        self.user = user
        self._setpriv = trusted_setpriv() if not user.is_self else None
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: guards ``_children`` (servers started by this process, reaped on stop)
        self._lock = threading.Lock()

    def server_env(self, **extra: str) -> dict[str, str]:
        """The whole environment of a process run as the server user (see ``child_env``)."""
        home = "/" if not self.user.is_self else os.environ.get("HOME", "/")
        return child_env(HOME=home, USER=self.user.name, LOGNAME=self.user.name, **extra)

    def as_server_user(self, argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
        """``argv`` and the Popen keywords that run it as the server user: as is when that is
        the engine's own user; else through util-linux's ``setpriv`` (root's, see
        ``trusted_setpriv``), so that Popen can vfork (a user switch in Popen forks, which
        copies the engine's page tables: ≈ 7 ms a process at 150 MB resident, on every server
        start and client); else with Popen's own user switch."""
        if self.user.is_self:
            return list(argv), {}
        if self._setpriv:
            return [self._setpriv, f"--reuid={self.user.uid}", f"--regid={self.user.gid}",
                    "--clear-groups", "--", *argv], {}
        return list(argv), {"user": self.user.uid, "group": self.user.gid, "extra_groups": []}

    def initdb(self, bindir: str, data_dir: str) -> None:
        argv, as_user = self.as_server_user(
            [os.path.join(bindir, "initdb"), "-D", data_dir, *INITDB_OPTIONS])
        proc = subprocess.run(argv, capture_output=True, text=True, cwd="/", check=False,
                              env=self.server_env(), **as_user)
        if proc.returncode != 0:
            raise DbmsError(f"initdb failed: {proc.stdout}{proc.stderr}".strip())

    def start(self, bindir: str, data_dir: str, files_dir: str, socket_dir: str,
              log_path: str, enter: Callable[[], None] | None = None,
              port: int | None = None, settings: Sequence[str] = SERVER_SETTINGS,
              deadline_s: float = 60.0,
              port_freed: Callable[[], None] | None = None) -> tuple[int, int]:
        """Start a server on a free loopback port (``port`` first, when given: a reset keeps
        the instance's); return (pid, port) once it accepts. ``files_dir`` is where the
        engine sees the server's own files (its data dir, unless ``enter``, run in the server
        process before exec, mounts that in a namespace). ``port_freed`` waits for an earlier
        server that may still hold ``port``: called before the port is tried again."""
        os.makedirs(socket_dir, mode=0o700, exist_ok=True)
        os.chown(socket_dir, self.user.uid, self.user.gid)
        write_hba(files_dir, (self.user.uid, self.user.gid))
        last_error = ""
        for attempt in range(5):
            port = port if port and attempt < 3 else free_port()
            pid = self._spawn(bindir, data_dir, socket_dir, log_path, port, enter, settings)
            outcome = self.wait_ready(pid, files_dir, port, deadline_s)
            if outcome == "ready":
                return pid, port
            last_error = tail_file(log_path)
            self.kill(pid)
            if "could not bind" not in last_error and "already in use" not in last_error:
                break
            if port_freed:
                port_freed()
                port_freed = None
        raise DbmsError(f"postgres did not start: {last_error.strip()[-2000:]}")

    def _spawn(self, bindir: str, data_dir: str, socket_dir: str, log_path: str,
               port: int, enter: Callable[[], None] | None, settings: Sequence[str]) -> int:
        argv, as_user = self.as_server_user([
            os.path.join(bindir, "postgres"), "-D", data_dir, "-p", str(port), "-k", socket_dir,
            *(arg for setting in settings for arg in ("-c", setting))])
        with open(log_path, "ab") as log_file:
            os.chmod(log_path, 0o600)
            try:
                proc: subprocess.Popen[bytes] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd="/",
                    start_new_session=True, env=self.server_env(), preexec_fn=enter, **as_user,
                )
            except subprocess.SubprocessError as exc:  # ``enter`` failed; its line is logged
                raise DbmsError(f"postgres could not be started: {tail_file(log_path, 400)}"
                                .strip()) from exc
        with self._lock:
            self._children[proc.pid] = proc
        return proc.pid

    def wait_ready(self, pid: int, data_dir: str, port: int | None = None,
                   deadline_s: float = 60.0) -> str:
        """``ready`` once the server's lock file says so (and its ``port`` takes a TCP
        connection, when given), else ``exited`` or ``timeout``."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            lines = read_postmaster_pid(data_dir)
            if len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready":
                if port is None:
                    return "ready"
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1
                ):
                    return "ready"
            if not self.alive(pid):
                return "exited"
            time.sleep(READY_POLL_SECONDS)
        return "timeout"

    def alive(self, pid: int) -> bool:
        with self._lock:
            child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        return pid_alive(pid)

    def stop(self, pid: int, timeout_s: float = 60.0) -> None:
        """Fast shutdown (SIGINT) and wait for the postmaster to exit."""
        self._signal_and_wait(pid, signal.SIGINT, timeout_s)
        if self.alive(pid):
            self.kill(pid)

    def kill(self, pid: int) -> None:
        """Immediate shutdown (SIGQUIT), then SIGKILL; for runtimes that are thrown away."""
        self._signal_and_wait(pid, signal.SIGQUIT, 5.0)
        if self.alive(pid):
            self._signal_and_wait(pid, signal.SIGKILL, 5.0)

    def _signal_and_wait(self, pid: int, signum: int, timeout_s: float) -> None:
        """Signal the postmaster and wait for its end: a server this process started is
        waited for (woken the moment it exits), any other polled."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            child = self._children.get(pid)
        if child is not None and child.poll() is None:  # (Popen.wait polls, backing off)
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:
                    select.select([pidfd], [], [], timeout_s)  # readable once it has exited
                finally:
                    os.close(pidfd)
        while self.alive(pid) and time.monotonic() < deadline:
            time.sleep(READY_POLL_SECONDS)
        with self._lock:
            child = self._children.get(pid)
            if child is not None and child.poll() is not None:
                del self._children[pid]

    def stop_by_data_dir(self, data_dir: str) -> None:
        """Stop whatever server holds ``data_dir`` (used when cleaning up after a crash). The
        lock file is the server user's, so its pid is believed only for a postgres process
        whose command line names the runtime (the directory above ``data_dir``, a random
        key): never another instance's server, nor a container's (whose pids are not ours)."""
        lines = read_postmaster_pid(data_dir)
        if lines and lines[0].strip().isdigit():
            pid = int(lines[0].strip())
            key = os.path.basename(os.path.dirname(os.path.abspath(data_dir))).encode()
            if pid_alive(pid) and self.is_postgres(pid) and key in process_cmdline(pid):
                self.kill(pid)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(data_dir, "postmaster.pid"))

    @staticmethod
    def is_postgres(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
                return handle.read().strip() in ("postgres", "postmaster")
        except OSError:
            return False


###############################################################################
# runtime: where Postgres runs: ``host`` (this machine's binaries) or ``docker``.
# Owns image resolution, containers and the base cluster per image; may call snapshot, dbms.
###############################################################################

HOST_IMAGE_PREFIX = "host:"
DEBIAN_BINDIR = "/usr/lib/postgresql/{major}/bin"


@dataclass(frozen=True)
class ResolvedImage:
    """An image id resolved to something exact: the cache key of every state built on it."""

    requested: str
    resolved_id: str
    runtime_kind: str
    engine_dir: str
    bindir: str = ""
    version: str = ""
    owner: tuple[int, int] = (0, 0)
    local_id: str = ""  #: the image id containers are started from (docker only)


@dataclass
class RuntimeHandle:
    """One live (or stopped) Postgres runtime: the runtime it lives in (``runtime``: every
    operation on it goes there), its data, socket dir, process and port."""

    key: str
    image: ResolvedImage
    runtime: Runtime
    runtime_dir: str
    data_dir: str
    socket_dir: str
    #: where the engine reads and writes the server's own files (the data dir, or the upper
    #: layer when the overlay is mounted in the server's own namespace)
    files_dir: str = ""
    pid: int | None = None
    port: int | None = None
    content_id: str = ""
    container_id: str | None = None
    job_id: str | None = None
    password: str | None = field(default=None, repr=False)  #: a pooled runtime's, set ahead
    #: whether a container's own overlay is mounted (None: not known, e.g. after a restart)
    mounted: bool | None = None
    #: an instance's server (its WAL allows an online backup), not a build's
    serving: bool = False
    #: the wait for this runtime's previous server, still ending (``Runtime.abandon``): a
    #: start that finds the port still taken calls it before trying the port again
    ending: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def runtime_id(self) -> str | None:
        if self.container_id:
            return self.container_id
        return f"host:{self.pid}" if self.pid else None

    @property
    def log_path(self) -> str:
        return os.path.join(self.runtime_dir, "postgres.log")

    def dsn(self, password: str | None) -> str:
        """The client DSN; without a password it names no credential (for events)."""
        secret = f":{urllib.parse.quote(password, safe='')}" if password else ""
        return f"postgres://{SUPERUSER}{secret}@127.0.0.1:{self.port}/postgres"


MAX_LINE_BYTES = 64 * 1024  #: a longer line of client output keeps its head and says the rest


class LineSplitter:
    """Splits a byte stream into lines as they complete, holding at most ``limit`` bytes of
    a line: past that, a line is ``cut`` (it keeps its first ``limit`` bytes and a note of
    how many were cut: a client printing one huge line costs ``limit`` bytes) or handed on in
    pieces of ``limit`` bytes without a newline (for output shown verbatim)."""

    def __init__(self, limit: int = MAX_LINE_BYTES, cut: bool = True) -> None:
        self.limit = limit
        self.cut = cut
        self._head = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The lines (each ending in a newline) and pieces ``data`` completes."""
        out: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            out += self._take(data[start:end])
            out.append(self._line(b"\n"))
            start = end + 1
        return out + self._take(data[start:])

    def finish(self) -> list[bytes]:
        """The last line, when the stream did not end with a newline."""
        return [self._line(b"")] if self._head or self._cut else []

    def _take(self, piece: bytes) -> list[bytes]:
        room = max(self.limit - len(self._head), 0)
        self._head += piece[:room]
        rest = piece[room:]
        if not rest:
            return []
        if self.cut:
            self._cut += len(rest)
            return []
        pieces = [bytes(self._head), *(rest[at:at + self.limit]
                                       for at in range(0, len(rest), self.limit))]
        self._head[:] = pieces.pop()
        return pieces

    def _line(self, end: bytes) -> bytes:
        note = f" … [{self._cut} more bytes cut]".encode() if self._cut else b""
        line = bytes(self._head) + note + end
        self._head.clear()
        self._cut = 0
        return line


def split_lines(chunks: Iterator[bytes], cut: bool) -> Iterator[bytes]:
    """The lines of a stream read in chunks (see ``LineSplitter``)."""
    splitter = LineSplitter(cut=cut)
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.finish()


class ClientProcess:
    """A client program running against a runtime; ``lines`` yields (stream, line) as they come.

    Subclasses provide ``_sources`` (line readers for stdout and stderr), ``wait`` and
    ``kill``. A line longer than MAX_LINE_BYTES is ``cut`` (for logs) or comes in pieces (for
    output shown verbatim); see ``LineSplitter``.
    """

    def _sources(self, cut: bool) -> list[tuple[str, Iterator[bytes]]]:
        raise NotImplementedError

    def lines(self, cut: bool = True) -> Iterator[tuple[str, bytes]]:
        chunks: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        sources = self._sources(cut)
        for name, source in sources:
            threading.Thread(target=_pump, args=(source, name, chunks), daemon=True).start()
        open_sources = len(sources)
        while open_sources:
            item = chunks.get()
            if item is None:
                open_sources -= 1
            else:
                yield item

    def wait(self) -> int:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


def _pump(source: Iterator[bytes], name: str,
          chunks: queue.Queue[tuple[str, bytes] | None]) -> None:
    try:
        for line in source:
            chunks.put((name, line))
    finally:
        chunks.put(None)


class HostClient(ClientProcess):
    """A client subprocess on this machine, started in a session of its own: a kill reaches
    what it started too (a ``liquibase`` script's JVM, a psql ``\\!`` command)."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes | None) -> None:
        self.proc = proc
        if stdin is not None:
            threading.Thread(target=_feed_stdin, args=(proc, stdin), daemon=True).start()

    def _sources(self, cut: bool) -> list[tuple[str, Iterator[bytes]]]:
        assert self.proc.stdout and self.proc.stderr
        return [(name, split_lines(iter(partial(os.read, stream.fileno(), 1 << 16), b""), cut))
                for name, stream in (("stdout", self.proc.stdout),
                                     ("stderr", self.proc.stderr))]

    def wait(self) -> int:
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:  # not reaped yet: its pid is still its group's id
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin
    with contextlib.suppress(BrokenPipeError, OSError):  # the client stopped reading: its exit
        proc.stdin.write(data)                          # status says why
    with contextlib.suppress(BrokenPipeError, OSError):
        proc.stdin.close()


class HostRuntime:
    """Postgres from this machine's binaries: ``host:<major>`` or ``host:<absolute bindir>``."""

    kind = "host"
    #: its server is exec'd here: its data is mounted here or in a namespace of its own
    mounter = "host"
    #: its server's sockets are in the engine's network namespace (``ConnectionTracker``)
    sockets_visible = True

    def __init__(self, dbms: PostgresDbms, snapshots: SnapshotManager) -> None:
        self.dbms = dbms
        self.snapshots = snapshots
        self._fingerprints: dict[tuple[str, float, int], str] = {}
        #: guards ``_fingerprints`` (binary fingerprints by path, mtime and size)
        self._lock = threading.Lock()

    def bindir_for(self, image_id: str) -> str:
        spec = image_id[len(HOST_IMAGE_PREFIX):].split("@", 1)[0]
        if re.fullmatch(r"\d+(\.\d+)*", spec):
            return DEBIAN_BINDIR.format(major=spec.split(".")[0])
        if os.path.isabs(spec):
            bindir = os.path.normpath(spec)
            problem = untrusted_path_problem(bindir)
            if problem:
                raise invalid_argument("untrusted host binaries",
                                       f"{problem}: only root or the engine's own user may"
                                       " be able to change the binaries the engine runs")
            return bindir
        raise invalid_argument("invalid image_id",
                               "host images are host:<major> or host:<absolute bindir>")

    def resolve(self, image_id: str, note: Callable[[str], None] | None = None) -> ResolvedImage:
        bindir = self.bindir_for(image_id)
        postgres = os.path.join(bindir, "postgres")
        if not os.access(postgres, os.X_OK):
            raise JobFailure("image_not_found", f"no PostgreSQL server binaries in {bindir}",
                             image_id)
        version, fingerprint = self._fingerprint(bindir)
        resolved = f"{HOST_IMAGE_PREFIX}{version}@sha256:{fingerprint}"
        if "@" in image_id and image_id.split("@", 1)[1] != f"sha256:{fingerprint}":
            raise JobFailure("image_not_found", "host binaries do not match the image digest",
                             f"requested {image_id}, found {resolved}")
        return ResolvedImage(
            requested=image_id, resolved_id=resolved, runtime_kind=self.kind,
            engine_dir=os.path.join("host", f"{safe_path_component(version)}_{fingerprint[:16]}"),
            bindir=bindir, version=version, owner=(self.dbms.user.uid, self.dbms.user.gid),
        )

    def _fingerprint(self, bindir: str) -> tuple[str, str]:
        postgres = os.path.join(bindir, "postgres")
        st = os.stat(postgres)
        cache_key = (bindir, st.st_mtime, st.st_size)
        with self._lock:
            cached = self._fingerprints.get(cache_key)
        if cached:
            return cached.split("|", 1)[0], cached.split("|", 1)[1]
        out = subprocess.run([postgres, "--version"], capture_output=True, text=True,
                             check=True, env=child_env()).stdout.strip()
        version = out.split()[2] if len(out.split()) > 2 else out
        digest = hashlib.sha256()
        with open(postgres, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(out.encode())
        digest.update("\x00".join(INITDB_OPTIONS).encode())
        fingerprint = digest.hexdigest()
        with self._lock:
            self._fingerprints[cache_key] = f"{version}|{fingerprint}"
        return version, fingerprint

    def init_base(self, image: ResolvedImage, pgdata: str) -> None:
        self.dbms.initdb(image.bindir, pgdata)

    def start(self, handle: RuntimeHandle) -> None:
        """Start the server; one started while the previous server of the runtime was still
        ending (``abandon``) gets the port once that has exited, and is started again in the
        unlikely case that the old one removed their shared socket files after it."""
        data_dir = handle.data_dir
        if handle.serving and self.snapshots.uses_server_dir(handle.runtime_dir):
            data_dir = self.snapshots.server_dir_for(handle.key)
            if not os.path.isdir(data_dir):
                self.snapshots.make_server_dir(handle.key, handle.image.owner)
            handle.files_dir = data_dir
        while True:
            pid, port = self.dbms.start(
                handle.image.bindir, data_dir, handle.files_dir, handle.socket_dir,
                handle.log_path,
                self.snapshots.namespace_for(handle.runtime_dir, handle.data_dir),
                handle.port, server_settings(handle.serving), port_freed=handle.ending)
            handle.pid, handle.port = pid, port
            ending, handle.ending = handle.ending, None
            if ending is None:
                return
            ending()  # at once: it has exited, the new server has the port
            if os.path.exists(os.path.join(handle.socket_dir, f".s.PGSQL.{port}")):
                return
            log.warning("server %d lost its socket to the one it replaced: starting again", pid)
            self.dbms.kill(pid)

    def stop(self, handle: RuntimeHandle, immediate: bool = False) -> None:
        if handle.pid:
            (self.dbms.kill if immediate else self.dbms.stop)(handle.pid)
        handle.pid = None

    def abandon(self, handle: RuntimeHandle) -> None:
        """SIGQUIT now; the wait (and SIGKILL after 5 s) is ``handle.ending``. A server
        whose data is replaced in place (not layered), or whose server directory the next
        one uses, is waited for here."""
        if handle.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGQUIT)
            handle.ending = partial(self.dbms.kill, handle.pid)
            handle.pid = None
        if handle.ending and (not self.snapshots.swaps_data(handle.runtime_dir) or
                              self._in_server_dir(handle)):
            handle.ending()
            handle.ending = None

    def _in_server_dir(self, handle: RuntimeHandle) -> bool:
        return bool(self.snapshots.expose_root) and \
            handle.files_dir == self.snapshots.server_dir_for(handle.key)

    # resets in place ----------------------------------------------------------------------
    def freeze(self, handle: RuntimeHandle) -> bool:
        """Stop the server's postmaster (SIGSTOP) and kill every process it started (client
        sessions, auxiliary processes), so that nothing of the server runs while its data is
        replaced; its listening sockets stay open (connections wait in their backlog) and
        ``thaw`` lets it start its processes again on the new data, the restart Postgres
        makes after a crash, which re-reads the control file and makes its shared memory
        anew. Only a server in its server directory can (its working directory is not the
        data's overlay). False, with the server untouched, when it cannot be done: not in a
        server directory, stopped already by someone else, or its processes not listed."""
        pid, server_dir = handle.pid, handle.files_dir
        if not pid or not self._in_server_dir(handle) or not signal_checked(
                pid, signal.SIGSTOP, lambda p: process_state(p) in ("R", "S", "D")
                and works_in(p, server_dir) and self.dbms.is_postgres(p)):
            return False
        try:
            deadline = time.monotonic() + 5
            while process_state(pid) not in ("T", "t"):
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "the postmaster did not stop")
                time.sleep(0.0002)
            children = process_children(pid)
            if not children:
                raise OSError(errno.ESRCH, "the postmaster has no processes to restart")
        except OSError as exc:
            log.warning("server %d not reset in place: %s", pid, exc)
            os.kill(pid, signal.SIGCONT)
            return False
        for child in children:  # (the server user may let it go on meanwhile: only its own)
            signal_checked(child, signal.SIGKILL, lambda c: parent_of(c) == pid)
        return True

    def thaw(self, handle: RuntimeHandle, restart: bool = True) -> bool:
        """Let a postmaster ``freeze`` stopped go on: it finds its processes gone and starts
        them again on the data now under it. True once it accepts sessions (its lock file,
        marked ``starting`` first, says ``ready`` again); False when it does not, or without
        ``restart``: it is then killed and the caller starts a server."""
        pid = handle.pid
        assert pid, "only a frozen server thaws"
        ready = False
        try:
            lines = read_postmaster_pid(handle.files_dir) if restart else []
            if len(lines) >= 8 and lines[0].strip() == str(pid):
                lines[7] = "starting"
                write_file_in(handle.files_dir, "postmaster.pid",
                              "".join(f"{line}\n" for line in lines).encode(), 0o600,
                              handle.image.owner)
                os.kill(pid, signal.SIGCONT)
                ready = self.dbms.wait_ready(pid, handle.files_dir) == "ready"
        finally:
            if not ready:
                log.warning("server %d not restarted in place: it is killed", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.dbms.kill(pid)
                handle.pid = None
        return ready

    def discard(self, handle: RuntimeHandle) -> None:
        if handle.pid:
            self.dbms.kill(handle.pid)
        else:
            self.dbms.stop_by_data_dir(handle.files_dir)
        handle.pid = None

    def alive(self, handle: RuntimeHandle) -> bool:
        return bool(handle.pid) and self.dbms.alive(handle.pid or 0)

    def client(self, handle: RuntimeHandle, program: str, args: Sequence[str],
               stdin: bytes | None, workdir: str, merged: bool = False) -> ClientProcess:
        """A client binary (psql, pgbench) from the same bindir, run as the server's OS user
        and connected over the private socket; ``workdir`` is used when that user may enter
        it, "/" otherwise."""
        env = self.dbms.server_env(PGHOST=handle.socket_dir, PGPORT=str(handle.port),
                                   PGUSER=SUPERUSER, PGDATABASE="postgres",
                                   PGAPPNAME=f"sqlrs-{program}")
        argv, as_user = self.dbms.as_server_user([os.path.join(handle.image.bindir, program),
                                                   *args])
        proc = subprocess.Popen(
            argv, cwd=workdir if self.dbms.user.is_self or self.dbms.user.can_enter(workdir)
            else "/", env=env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **as_user,
        )
        return HostClient(proc, stdin)

    def admin_endpoint(self, handle: RuntimeHandle) -> tuple[str, int]:
        return handle.socket_dir, handle.port or 0

    def copy_out(self, handle: RuntimeHandle, dest: str) -> None:
        """Never needed: the engine sees (or mounts a view of) a host runtime's data."""
        raise DbmsError(f"runtime {handle.key} has no data the engine cannot reach")

    def copy_live(self, handle: RuntimeHandle, sources: Sequence[str], dest: str) -> None:
        copy_live(sources, dest)

    def adopt(self, handle: RuntimeHandle, runtime_id: str | None) -> bool:
        """Re-attach to a server left running by an earlier engine process; one it left
        stopped (killed during a reset in place, see ``freeze``) is killed instead."""
        lines = read_postmaster_pid(handle.files_dir)
        if not runtime_id or not lines or f"host:{lines[0].strip()}" != runtime_id:
            return False
        pid = int(lines[0].strip())
        if process_state(pid) in ("T", "t"):  # never adopted; the instance's own is killed
            log.warning("server %d was left stopped: not adopted", pid)
            if self._in_server_dir(handle):
                signal_checked(pid, signal.SIGKILL, lambda p: process_state(p) in ("T", "t")
                               and works_in(p, handle.files_dir) and self.dbms.is_postgres(p))
            return False
        if not pid_alive(pid) or len(lines) < 8 or lines[7].strip() != "ready":
            return False
        handle.pid, handle.port = pid, int(lines[3].strip())
        return True



HOST_BINARIES = ("postgres", "initdb", "pg_ctl", "psql", "pgbench")


def untrusted_path_problem(bindir: str) -> str | None:
    """Why the binaries in ``bindir`` could be swapped by someone else (None when they can
    not): the directory, a directory above it or a binary owned by another user, or writable
    by group or others (a sticky directory above, such as /tmp, is fine)."""
    checks = [(bindir, False)]
    for name in HOST_BINARIES:
        real = os.path.realpath(os.path.join(bindir, name))
        if os.path.exists(real):
            checks.append((real, False))
    seen: set[str] = set()
    for path, sticky_ok in checks:
        while path not in seen:
            seen.add(path)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None  # resolving the image reports missing binaries
            if st.st_uid not in (0, os.geteuid()):
                return f"{path} belongs to uid {st.st_uid}"
            if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
                return f"{path} is writable by {'others' if st.st_mode & 0o002 else 'its group'}"
            path, sticky_ok = os.path.dirname(path), True
    return None


class RuntimeUnavailable(ApiError):
    """The container engine cannot be reached; jobs fail and requests get 503 with this."""

    def __init__(self, details: str) -> None:
        super().__init__(HTTPStatus.SERVICE_UNAVAILABLE, "docker_unavailable",
                         "docker is not running",
                         f"{details} (start Docker and retry)")


class DockerRefused(ApiError):
    """The container engine answered a call with an error (its message says why)."""

    def __init__(self, explanation: str) -> None:
        super().__init__(HTTPStatus.BAD_GATEWAY, "docker_error", "docker refused a call",
                         explanation)


class DockerNotFound(DockerRefused):
    """What a call named (a container, an image, an exec) does not exist."""


class Runtime(Protocol):
    """What the engine needs from a place where Postgres runs (host or container)."""

    kind: str
    #: whether its server's sockets are in the engine's network namespace
    sockets_visible: bool

    @property
    def mounter(self) -> str:
        """Who makes its server's data directory (``SnapshotManager._mode_for``)."""

    def resolve(self, image_id: str, note: Callable[[str], None] | None = None
                ) -> ResolvedImage: ...
    def init_base(self, image: ResolvedImage, pgdata: str) -> None: ...
    def start(self, handle: RuntimeHandle) -> None: ...
    def stop(self, handle: RuntimeHandle, immediate: bool = False) -> None:
        """Stop the server (fast shutdown, a checkpoint; ``immediate``: no checkpoint, for data
        about to be thrown away); its data stays."""
    def abandon(self, handle: RuntimeHandle) -> None:
        """Begin the immediate shutdown of a server whose data is thrown away; the next
        ``start`` may begin before it has ended (``handle.ending`` waits for that). A runtime
        that cannot overlap them waits here."""
    def freeze(self, handle: RuntimeHandle) -> bool:
        """Stop the server's processes for its data to be replaced under it, its port kept
        (a reset in place); False, the server untouched, where it cannot be done."""
    def thaw(self, handle: RuntimeHandle, restart: bool = True) -> bool:
        """Restart a frozen server on its new data; False when it did not (or without
        ``restart``): it is then gone."""
    def discard(self, handle: RuntimeHandle) -> None: ...
    def alive(self, handle: RuntimeHandle) -> bool: ...
    def adopt(self, handle: RuntimeHandle, runtime_id: str | None) -> bool: ...
    def client(self, handle: RuntimeHandle, program: str, args: Sequence[str],
               stdin: bytes | None, workdir: str, merged: bool = False) -> ClientProcess:
        """A client program; ``merged``: its stdout and stderr may come as one stream."""
    def admin_endpoint(self, handle: RuntimeHandle) -> tuple[str, int]:
        """(unix socket directory, port) of the engine's own sessions, seen from here."""
    def copy_out(self, handle: RuntimeHandle, dest: str) -> None:
        """Copy a stopped runtime's data, whose overlay only it can mount, to the new
        directory ``dest`` inside its runtime directory."""
    def copy_live(self, handle: RuntimeHandle, sources: Sequence[str], dest: str) -> None:
        """Copy files and trees of the running runtime (``sources``) into the directory
        ``dest``, skipping files that vanish meanwhile (see ``copy_live``)."""


PGDATA_IN_CONTAINER = "/var/lib/postgresql/data/pgdata"
#: the runtime's socket directory (0700, the server user's) is bound here: private to the
#: server user inside the container, reachable from the host (a socket made inside an
#: overlay could not be reached through its upper layer)
SOCKET_IN_CONTAINER = "/var/run/sqlrs"
LABEL_ENGINE = "sqlrs.engine"
LABEL_KEY = "sqlrs.runtime"
LABEL_JOB = "sqlrs.job"
#: the engine process that made a container: the start-up sweep (which runs while the engine
#: already serves) never removes one of its own process's
LABEL_PROCESS = "sqlrs.process"
CLIENT_ENV = {"PGHOST": SOCKET_IN_CONTAINER, "PGPORT": "5432", "PGUSER": SUPERUSER,
              "PGDATABASE": "postgres"}
#: what a container that mounts its own overlay may do: mount (CAP_SYS_ADMIN, used only by
#: the engine's own execs as the container's root), and nothing may gain privileges
#: (no-new-privileges: a setuid binary run by the server user gains nothing)
MOUNTING_CONTAINER: dict[str, Any] = {"cap_add": ["SYS_ADMIN"],
                                      "security_opt": ["no-new-privileges"]}


#: a call into the Docker SDK through its runtime's one translation point
#: (``DockerRuntime._call``: the SDK's errors become the engine's)
DockerCall = Callable[..., Any]


class DockerClient(ClientProcess):
    """A client program run with ``docker exec`` over an attached socket (stdin supported)."""

    def __init__(self, call: DockerCall, api: Any, exec_id: str, sock: Any,
                 stdin: bytes | None) -> None:
        self.call = call
        self.api = api
        self.exec_id = exec_id
        self.sock = sock
        raw = getattr(sock, "_sock", sock)
        with contextlib.suppress(OSError):
            if stdin is not None:
                raw.sendall(stdin)
            raw.shutdown(socket.SHUT_WR)

    def lines(self, cut: bool = True) -> Iterator[tuple[str, bytes]]:
        from docker.utils import socket as docker_socket

        frames: Callable[..., Iterator[tuple[int, bytes]]] = docker_socket.frames_iter
        streams = {1: ("stdout", LineSplitter(cut=cut)), 2: ("stderr", LineSplitter(cut=cut))}
        for stream, data in frames(self.sock, tty=False):
            name, splitter = streams.get(stream, streams[1])
            for line in splitter.feed(data):
                yield name, line
        for name, splitter in streams.values():
            for line in splitter.finish():
                yield name, line

    #: how long a client may run on after its output ended before it counts as hung
    linger_seconds = 30.0

    def wait(self) -> int:
        deadline = time.monotonic() + self.linger_seconds
        while True:
            info = self.call(self.api.exec_inspect, self.exec_id)
            if not info.get("Running"):
                return int(info.get("ExitCode") or 0)
            if time.monotonic() > deadline:
                self.kill()
                raise DbmsError(f"the client kept running {self.linger_seconds:g} s after"
                                " closing its output; it was killed")
            time.sleep(0.01)

    def kill(self) -> None:
        signal_exec(self.call, self.api, self.exec_id, signal.SIGKILL)


def signal_exec(call: DockerCall, api: Any, exec_id: str, signum: int) -> bool:
    """Send ``signum`` to a ``docker exec``'s process (by its pid as seen from here); False
    when it has ended or cannot be signalled (logged)."""
    try:
        pid = int(call(api.exec_inspect, exec_id).get("Pid") or 0)
        if pid > 0:
            os.kill(pid, signum)
        return pid > 0
    except ProcessLookupError:
        return False  # it has ended by itself
    except (OSError, EngineError) as exc:
        log.warning("cannot signal docker exec %s: %s", exec_id[:12], exc)
        return False


#: the shell an ``ExecAgent`` keeps running in a container (POSIX sh; a constant: what it
#: runs arrives as data, never as shell text). It reads a nonce, then per command its word
#: count, mode and path, and the words (a word with a backslash holds ``\0ooo`` escapes,
#: decoded by printf's %b). ``fg``: the command runs with stdin from the path and its output
#: merged into the agent's; ``bg``: it runs on, its output appended to the path. The agent
#: writes "<nonce> pid <pid>" once the command started and "<nonce> rc <status>" once it
#: ended (``bg``: at once). SIGTERM to the agent kills its foreground command.
AGENT_SCRIPT = r"""
IFS= read -r nonce || exit 0
child=
trap '[ -n "$child" ] && kill -9 "$child"' TERM
while IFS= read -r count && IFS= read -r mode && IFS= read -r path; do
  set --
  while [ "$count" -gt 0 ]; do
    IFS= read -r word || exit 0
    case $word in *\\*) word=$(printf '%bx' "$word"); word=${word%x} ;; esac
    set -- "$@" "$word"
    count=$((count - 1))
  done
  if [ "$mode" = bg ]; then
    "$@" </dev/null >>"$path" 2>&1 &
    printf '%s pid %s\n%s rc 0\n' "$nonce" "$!" "$nonce"
  else
    "$@" <"$path" 2>&1 &
    child=$!
    printf '%s pid %s\n' "$nonce" "$child"
    wait "$child"; rc=$?
    wait "$child" 2>/dev/null; again=$?
    [ "$again" -ne 127 ] && rc=$again
    child=
    printf '%s rc %s\n' "$nonce" "$rc"
  fi
done
"""


def agent_word(word: str) -> bytes:
    """``word`` as one line an agent reads: bytes other than printable ASCII, and the
    backslash, become ``\\0ooo`` escapes."""
    return b"".join(bytes([byte]) if 0x20 <= byte < 0x7F and byte != 0x5C
                    else f"\\0{byte:03o}".encode() for byte in word.encode()) + b"\n"


class AgentOutput:
    """Reads what an agent (AGENT_SCRIPT) writes for one command after another: ``feed``
    returns the command's output (lines, and a held-back piece of a long one) and notes the
    agent's marks, which end in a newline and may follow output that did not."""

    #: how much output without a newline is held back while looking for a mark
    HOLD_BYTES = 64 * 1024

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self._pending = bytearray()
        self.ns_pid = 0  #: the in-container pid of the current command
        self.exit_code: int | None = None  #: the current command's status, once it ended

    def expect(self) -> None:
        """A new command was sent."""
        self.ns_pid, self.exit_code = 0, None

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        out: list[bytes] = []
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[:end + 1])
            del self._pending[:end + 1]
            at = line.find(self.nonce)
            if at < 0:
                out.append(line)
                continue
            if at:  # output that did not end in a newline
                out.append(line[:at])
            word, _, value = line[at + len(self.nonce) + 1:].decode().partition(" ")
            if word == "pid":
                self.ns_pid = int(value)
            else:
                self.exit_code = int(value)
        if len(self._pending) > self.HOLD_BYTES:
            keep = len(self.nonce) + 32
            out.append(bytes(self._pending[:-keep]))
            del self._pending[:-keep]
        return out


class ExecAgent:
    """One ``docker exec`` of AGENT_SCRIPT kept running in a container as one user: it runs
    the engine's commands one at a time, each for the cost of a fork in there instead of a
    ``docker exec`` (≈60 ms each here). Only the engine can reach it (its stdin is the
    exec's attached socket). One caller at a time uses it (``AgentPool`` hands it
    out); after any failure to talk to it, it is ``broken`` and is dropped."""

    def __init__(self, call: DockerCall, api: Any, container_id: str, user: str,
                 environment: Mapping[str, str]) -> None:
        self.call = call
        self.api = api
        self.container_id = container_id
        self.user = user
        created = call(api.exec_create, container_id, ["sh", "-c", AGENT_SCRIPT, "sqlrs-agent"],
                       stdin=True, user=user, workdir="/", environment=dict(environment))
        self.exec_id: str = created["Id"]
        sock: Any = call(api.exec_start, self.exec_id, socket=True)
        self._socket: socket.socket = sock._sock if hasattr(sock, "_sock") else sock
        self.marks = AgentOutput(random_hex(16).encode())
        self.broken = False
        try:
            self._send(self.marks.nonce + b"\n")
        except BaseException:
            self.close()
            raise

    def _send(self, data: bytes) -> None:
        try:
            self._socket.sendall(data)
        except OSError as exc:
            self.broken = True
            raise DbmsError(f"the container's command channel is gone: {exc}") from None

    def submit(self, argv: Sequence[str], mode: str, path: str) -> None:
        """Send a command (see AGENT_SCRIPT); its output and marks are read by ``output``."""
        self.marks.expect()
        self._send(f"{len(argv)}\n{mode}\n{path}\n".encode()
                   + b"".join(agent_word(word) for word in argv))

    def output(self, timeout: float | None) -> Iterator[bytes]:
        """The command's output as it comes, until its exit status (``marks.exit_code``)."""
        from docker.utils import socket as docker_socket

        self._socket.settimeout(timeout)
        try:
            while self.marks.exit_code is None:
                kind, size = docker_socket.next_frame_header(self._socket)
                if kind < 0:
                    raise DbmsError("the container's command channel closed (the container"
                                    " stopped?)")
                yield from self.marks.feed(docker_socket.read_exactly(self._socket, size))
        except (OSError, docker_socket.SocketError) as exc:
            self.broken = True
            raise DbmsError(f"the container's command channel failed: {exc}") from None
        except BaseException:
            self.broken = True
            raise

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> tuple[int, str]:
        """Run a command to its end (stdin: nothing); its status and merged output."""
        self.submit(argv, "fg", "/dev/null")
        output = b"".join(self.output(timeout))
        return self.marks.exit_code or 0, output.decode("utf-8", "replace")

    def background(self, argv: Sequence[str], log_path: str) -> int:
        """Start a command that runs on (its output appended to ``log_path``); its pid."""
        self.submit(argv, "bg", log_path)
        for _ in self.output(30.0):
            pass
        return self.marks.ns_pid

    def idle_and_alive(self) -> bool:
        """Whether an idle agent can still be used: its channel is open with nothing unread
        (a DSN holder may have killed the server user's agent; the container may be gone)."""
        if self.broken:
            return False
        try:
            self._socket.setblocking(False)
            self._socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # open, and nothing to read
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                self._socket.setblocking(True)
        return False  # closed, or output that no command waits for

    def interrupt(self) -> None:
        """Kill the running foreground command (SIGTERM to the agent, which kills it)."""
        if not signal_exec(self.call, self.api, self.exec_id, signal.SIGTERM):
            self.broken = True

    def close(self) -> None:
        """End the agent (it reads the end of its input and exits)."""
        self.broken = True
        with contextlib.suppress(OSError):
            self._socket.close()


class AgentClient(ClientProcess):
    """A client run by an ``ExecAgent``: its stdout and stderr come merged (as "stdout");
    the agent goes back to its runtime (``release``) once the client has ended."""

    def __init__(self, agent: ExecAgent, release: Callable[[ExecAgent], None],
                 stdin_file: str | None) -> None:
        self.agent = agent
        self.release = release
        self.stdin_file = stdin_file
        self._ended = False

    def lines(self, cut: bool = True) -> Iterator[tuple[str, bytes]]:
        for line in split_lines(self._output(), cut):
            yield "stdout", line

    def _output(self) -> Iterator[bytes]:
        try:
            yield from self.agent.output(None)
        finally:
            self.finish()

    def finish(self) -> None:
        """The client's end: its stdin file goes, and its agent back to the pool (closed,
        its command killed, when the command's end was not seen)."""
        if self._ended:
            return
        self._ended = True
        if self.agent.marks.exit_code is None:  # its output was left unread: the command is ended
            self.agent.interrupt()
            self.agent.close()
        if self.stdin_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stdin_file)
        self.release(self.agent)

    def wait(self) -> int:
        if not self._ended:
            for _ in self._output():
                pass
        if self.agent.marks.exit_code is None:
            raise DbmsError("the client's end was not seen (its container's command channel"
                            " failed)")
        return self.agent.marks.exit_code

    def kill(self) -> None:
        if not self._ended:
            self.agent.interrupt()


class AgentPool:
    """The idle command agents of containers (``ExecAgent``), by container and user: one is
    handed out to one caller at a time (``use`` for a block; ``checkout`` and ``checkin``
    for a client that outlives a block), a new one made (``new``) when none is idle, a dead
    or broken one closed instead of being handed out or kept."""

    def __init__(self, new: Callable[[str, str], ExecAgent]) -> None:
        self.new = new
        #: guards ``_idle`` (taken alone)
        self._lock = threading.Lock()
        #: idle agents by (container id, user)
        self._idle: dict[tuple[str, str], list[ExecAgent]] = {}

    def checkout(self, container_id: str, user: str) -> ExecAgent:
        """An idle agent of the container running as ``user``, or a new one."""
        while True:
            with self._lock:
                idle = self._idle.get((container_id, user))
                found = idle.pop() if idle else None
            if found is None:
                return self.new(container_id, user)
            if found.idle_and_alive():
                return found
            found.close()

    def checkin(self, agent: ExecAgent) -> None:
        """An agent back to the idle ones (a broken one is closed instead)."""
        if agent.broken:
            agent.close()
            return
        with self._lock:
            self._idle.setdefault((agent.container_id, agent.user), []).append(agent)

    @contextlib.contextmanager
    def use(self, container_id: str, user: str) -> Iterator[ExecAgent]:
        """An agent of the container for the block; one the block raised through is closed."""
        agent = self.checkout(container_id, user)
        try:
            yield agent
        except BaseException:
            agent.close()
            raise
        finally:
            self.checkin(agent)

    def forget(self, container_id: str | None) -> None:
        """Close the idle agents of a container that is going away."""
        with self._lock:
            gone = [agent for (owner, _user), agents in self._idle.items()
                    if owner == container_id for agent in agents]
            self._idle = {key: agents for key, agents in self._idle.items()
                          if key[0] != container_id}
        for agent in gone:
            agent.close()


class DockerRuntime:
    """Postgres in containers through the Docker SDK.

    One container per runtime runs ``sleep infinity`` with the runtime's data directory bind
    mounted at PGDATA (or mounting its own overlay there) and port 5432 published on
    127.0.0.1 only. The engine's commands in it (mount, the postmaster, a build's psql,
    umount) go through command agents (``ExecAgent``: one ``docker exec`` kept open per
    container and user, ≈1 ms a command instead of ≈60 ms), so a step needs no container
    restart and no exec; a run's clients, whose stdout and stderr stay apart, are execs.
    """

    kind = "docker"
    #: its server listens in the container's own network namespace
    sockets_visible = False

    def __init__(self, engine_label: str, engine_kind: str = "auto",
                 passwd_dir: str | None = None, snapshots: SnapshotManager | None = None,
                 layers_dir: str | None = None) -> None:
        self.engine_label = engine_label
        self.process_label = random_hex(8)
        #: the store's states, bound read-only into a container that mounts its own overlay
        self.snapshots = snapshots
        self.layers_dir = layers_dir
        #: whether containers may mount an overlay (tried once, at the first image resolved)
        self._mounts: bool | None = None
        #: when the engine is not root, the container's server runs as the engine's own uid
        #: and gid (so every file it writes in the bind-mounted data directory is the engine
        #: user's to copy, layer and delete); ``passwd_dir`` holds the /etc/passwd mounted
        #: over the image's, naming that uid ``postgres`` (initdb needs a name for it)
        self.as_self = os.geteuid() != 0
        self.passwd_dir = passwd_dir
        #: the container engine's API socket: DOCKER_HOST wins; ``container.runtime=podman``
        #: means Podman's Docker-compatible socket; otherwise Docker's default socket
        self.socket_path = "/var/run/docker.sock"
        if engine_kind == "podman":
            run = "/run" if os.geteuid() == 0 else os.environ.get(
                "XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
            self.socket_path = f"{run}/podman/podman.sock"
        self._client: Any = None
        #: guards ``_client`` (created on first use, dropped when the daemon goes away)
        self._lock = threading.Lock()
        self._resolved: dict[str, ResolvedImage] = {}
        self._owners: dict[str, tuple[int, int]] = {}
        #: the command agents of this process's containers
        self.agents = AgentPool(lambda container_id, user: ExecAgent(
            self._call, self.docker().api, container_id, user,
            {**CLIENT_ENV, "PGAPPNAME": "sqlrs-engine"}))

    # plumbing -----------------------------------------------------------------------------
    def configured(self) -> bool:
        """Whether a container engine may be there at all (no call is made)."""
        return bool(os.environ.get("DOCKER_HOST")) or os.path.exists(self.socket_path)

    def docker(self) -> Any:
        """The SDK client, created on first use (the import is slow and often not needed).
        It is made and pinged without the lock, so a hung daemon holds up only the callers
        that need Docker, never one that merely checks for a client; two first uses at once
        may both make one, and the first kept wins."""
        with self._lock:
            if self._client is not None:
                return self._client
        client = self._connect()
        with self._lock:
            if self._client is None:
                self._client = client
            return self._client

    def _connect(self) -> Any:
        import docker
        from docker.utils import kwargs_from_env

        def connect() -> Any:
            options: dict[str, Any] = {"timeout": 60, "num_pools": 256, "max_pool_size": 64,
                                       "base_url": f"unix://{self.socket_path}",
                                       **kwargs_from_env()}
            client = docker.DockerClient(**options)
            client.ping()
            return client

        try:
            return self._call(connect)
        except ValueError as exc:  # a malformed DOCKER_HOST or TLS setting
            log.warning("docker client: %s", exc)
            raise ApiError(HTTPStatus.BAD_GATEWAY, "docker_error", "cannot talk to docker",
                           str(exc)) from None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a call into the Docker SDK: the one place its errors (and
        those of ``requests`` below it) become the engine's. A daemon that cannot be reached
        is ``RuntimeUnavailable`` (and the client is made again next time), an error answer
        ``DockerRefused`` (``DockerNotFound`` for a missing object), a helper container that
        failed a ``DbmsError`` with its stderr."""
        import docker.errors
        import requests.exceptions

        try:
            return fn(*args, **kwargs)
        except docker.errors.ContainerError as exc:
            command = " ".join(exc.command) if isinstance(exc.command, list) else exc.command
            raise DbmsError(f"{command} failed: {exc.stderr!r}") from None
        except docker.errors.NotFound as exc:  # a missing image too
            raise DockerNotFound(str(exc.explanation or exc)) from None
        except docker.errors.APIError as exc:
            raise DockerRefused(str(exc.explanation or exc)) from None
        except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
            with self._lock:
                self._client = None
            raise RuntimeUnavailable(str(exc)) from None
        except requests.exceptions.RequestException as exc:
            raise ApiError(HTTPStatus.BAD_GATEWAY, "docker_error", "docker call failed",
                           str(exc)) from None

    def _container(self, container_id: str | None) -> Any:
        if not container_id:
            return None
        try:
            return self._call(self.docker().containers.get, container_id)
        except DockerNotFound:
            return None

    @property
    def mounter(self) -> str:
        """``container`` when its containers mount their own overlay (a step's state is a
        layer), else ``bind`` (they bind a directory made by the engine)."""
        return "container" if self._mounts and self.snapshots and self.layers_dir else "bind"

    def _probe_mounts(self, image_ref: str) -> None:
        """Whether a container of this image may mount an overlay (an AppArmor profile or an
        old kernel may forbid it): tried once, logged either way."""
        if self._mounts is not None or not self.snapshots or not self.layers_dir:
            return
        try:
            self._run_helper(image_ref, ["mount", "-t", "overlay", "overlay", "-o",
                                         "lowerdir=/etc:/usr", "/mnt"], None,
                             **MOUNTING_CONTAINER)
            self._mounts = True
            log.info("docker: containers mount their own overlay: states are layers")
        except DbmsError as exc:
            self._mounts = False
            log.warning("docker: containers cannot mount an overlay, states are copies: %s",
                        exc)

    # images -------------------------------------------------------------------------------
    def resolve(self, image_id: str, note: Callable[[str], None] | None = None) -> ResolvedImage:
        cached = self._resolved.get(image_id)
        if cached:
            return cached
        image = self._find_or_pull(image_id, note)
        self._probe_mounts(image.id)
        name = image_id.split("@", 1)[0]
        repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        digests = [digest for digest in image.attrs.get("RepoDigests") or []
                   if digest.split("@", 1)[0] == repo]
        resolved = digests[0] if digests else f"{repo}@{image.id}"
        digest = resolved.split("@", 1)[1]
        owner = self._postgres_owner(image.id)
        result = ResolvedImage(
            requested=image_id, resolved_id=resolved, runtime_kind=self.kind,
            engine_dir=os.path.join(safe_path_component(repo.rsplit("/", 1)[-1]),
                                    safe_path_component(digest)),
            version=digest, owner=owner, local_id=image.id,
        )
        if "@" in image_id:
            self._resolved[image_id] = result
        return result

    def _find_or_pull(self, image_id: str, note: Callable[[str], None] | None) -> Any:
        images = self.docker().images
        candidates = [image_id]
        if "@" in image_id:
            candidates.append(image_id.split("@", 1)[1])
        for ref in candidates:
            with contextlib.suppress(DockerRefused):
                return self._call(images.get, ref)
        if note:
            note(f"docker: pull {image_id}")
        repo, _, tag = image_id.partition("@")[0].rpartition(":")
        if not repo or "/" in tag:
            repo, tag = image_id, "latest"

        def pull() -> Any:
            last = 0.0
            for progress in self.docker().api.pull(repo, tag=tag, stream=True, decode=True):
                if note and time.monotonic() - last > 0.5:
                    note(f"docker: {progress.get('status', '')} {progress.get('progress', '')}"
                         .strip())
                    last = time.monotonic()
            return images.get(image_id)

        try:
            return self._call(pull)
        except DockerRefused as exc:
            if re.search(r"connection refused|no such host|i/o timeout|dial tcp",
                         str(exc.details)):
                raise JobFailure("registry_unavailable",
                                 f"cannot reach the registry of image {image_id}",
                                 exc.details) from None
            raise JobFailure("image_not_found", f"cannot pull image {image_id}",
                             exc.details) from None

    def _postgres_owner(self, image_ref: str) -> tuple[int, int]:
        """The uid/gid the container's server runs as: the engine's own when it is not root,
        else the image's postgres user (cached: an image id never changes)."""
        if self.as_self:
            return os.geteuid(), os.getegid()
        cached = self._owners.get(image_ref)
        if cached:
            return cached
        output = self._run_helper(image_ref, ["id", "postgres"], None).decode()
        match = re.search(r"uid=(\d+).*?gid=(\d+)", output)
        if not match:
            raise JobFailure("unsupported_image", "the image has no postgres user", output)
        self._owners[image_ref] = (int(match.group(1)), int(match.group(2)))
        return self._owners[image_ref]

    def _server_user(self, image: ResolvedImage) -> str:
        """Who the server and its clients run as in the container (``uid:gid``)."""
        return f"{image.owner[0]}:{image.owner[1]}"

    def _volumes(self, pgdata: str | None) -> dict[str, dict[str, str]]:
        """The bind mounts of a container: its data directory and, when the engine is not
        root, the passwd file that names the engine's uid."""
        volumes = {pgdata: {"bind": PGDATA_IN_CONTAINER, "mode": "rw"}} if pgdata else {}
        if self.as_self:
            volumes[self._passwd_file()] = {"bind": "/etc/passwd", "mode": "ro"}
        return volumes

    def _passwd_file(self) -> str:
        assert self.passwd_dir, "a docker runtime for a non-root engine needs passwd_dir"
        path = os.path.join(self.passwd_dir, "docker-passwd")
        content = (f"root:x:0:0:root:/root:/bin/sh\n"
                   f"postgres:x:{os.geteuid()}:{os.getegid()}:sqlrs-engine:/tmp:/bin/sh\n")
        if not os.path.exists(path):
            write_file_in(self.passwd_dir, "docker-passwd", content.encode(), 0o644, None)
        return path

    def _run_helper(self, image_ref: str, command: list[str], pgdata: str | None,
                    user: str = "root", binds: Mapping[str, str] | None = None,
                    **options: Any) -> bytes:
        volumes = self._volumes(pgdata)
        volumes.update({source: {"bind": target, "mode": "rw"}
                        for source, target in (binds or {}).items()})
        output: bytes = self._call(
            self.docker().containers.run, image_ref, command, user=user, remove=True,
            volumes=volumes, labels=self._labels(), stdout=True, stderr=True, **options)
        return output

    def init_base(self, image: ResolvedImage, pgdata: str) -> None:
        self._run_helper(self._image_ref(image),
                         ["initdb", "-D", PGDATA_IN_CONTAINER, *INITDB_OPTIONS], pgdata,
                         user=self._server_user(image))

    # lifecycle ----------------------------------------------------------------------------
    def _mounts_own(self, handle: RuntimeHandle) -> bool:
        """Whether the runtime's container mounts its own overlay."""
        return self.snapshots is not None and \
            self.snapshots.mount_mode(handle.runtime_dir) == "container"

    def _create(self, handle: RuntimeHandle) -> Any:
        volumes = self._volumes(handle.data_dir)
        volumes[handle.socket_dir] = {"bind": SOCKET_IN_CONTAINER, "mode": "rw"}
        options: dict[str, Any] = {}
        if self._mounts_own(handle):  # its layers and its upper layer, at the same paths
            assert self.layers_dir
            volumes[handle.runtime_dir] = {"bind": handle.runtime_dir, "mode": "rw"}
            volumes[self.layers_dir] = {"bind": self.layers_dir, "mode": "ro"}
            options = MOUNTING_CONTAINER
        labels = self._labels(**{LABEL_KEY: handle.key})
        if handle.job_id:
            labels[LABEL_JOB] = handle.job_id
        # the instance's port first (a restart keeps its DSN), any free one if it is taken
        for port in dict.fromkeys((handle.port, None)):
            name = f"sqlrs-{handle.key[:12]}-{random_hex(4)}"
            try:
                container = self._call(
                    self.docker().containers.run, self._image_ref(handle.image),
                    ["sleep", "infinity"], detach=True, name=name, labels=labels,
                    volumes=volumes, ports={"5432/tcp": ("127.0.0.1", port)},
                    environment={"PGDATA": PGDATA_IN_CONTAINER}, **options)
                break
            except DockerRefused as exc:
                taken = "port is already allocated" in exc.details or \
                    "address already in use" in exc.details
                if port is None or not taken:
                    raise
                with contextlib.suppress(DockerRefused):
                    self._call(self.docker().api.remove_container, name, force=True)
        handle.container_id = container.id
        return container

    @staticmethod
    def _image_ref(image: ResolvedImage) -> str:
        return image.local_id or image.resolved_id.split("@", 1)[1]

    def start(self, handle: RuntimeHandle) -> None:
        os.makedirs(handle.socket_dir, mode=0o700, exist_ok=True)
        if handle.image.owner != (os.geteuid(), os.getegid()):
            os.chown(handle.socket_dir, *handle.image.owner)
        container = self._container(handle.container_id)
        if container is None or container.status != "running":
            if container is not None:
                self.agents.forget(container.id)
                self._call(container.remove, force=True)
            container = self._create(handle)
            handle.mounted = False
            with contextlib.suppress(FileNotFoundError):  # left by a killed container
                os.unlink(os.path.join(handle.files_dir, "postmaster.pid"))
        if self._mounts_own(handle):
            assert self.snapshots
            if handle.mounted is not False:  # after a crash of the server alone
                self._unmount(container, handle, check=False)
            options = self.snapshots.container_mount(handle.runtime_dir)
            self._exec(container, handle.image, ["mount", "-t", "overlay", "overlay", "-o",
                                                 options, PGDATA_IN_CONTAINER], user="root")
            handle.mounted = True
        write_hba(handle.files_dir, handle.image.owner)
        settings = [word for setting in server_settings(handle.serving)
                    if not setting.startswith("listen") for word in ("-c", setting)]
        with self.agents.use(container.id, self._server_user(handle.image)) as agent:
            ns_pid = agent.background(
                ["postgres", "-D", PGDATA_IN_CONTAINER, "-c", "listen_addresses=*", "-p",
                 "5432", "-k", SOCKET_IN_CONTAINER, *settings], "/tmp/postgres.log")
        host_pid = self._postmaster_host_pid(container, ns_pid)
        deadline = time.monotonic() + 60
        while True:
            lines = read_postmaster_pid(handle.files_dir)
            if len(lines) >= 8 and lines[7].strip() == "ready" and host_pid and \
                    lines[0].strip() == str(ns_pid):
                handle.pid = host_pid
                break
            if time.monotonic() > deadline or not (host_pid and pid_alive(host_pid)):
                log_tail = self._exec(container, handle.image,
                                      ["tail", "-n", "20", "/tmp/postgres.log"], check=False)
                raise DbmsError(f"postgres did not start in the container: {log_tail}")
            time.sleep(READY_POLL_SECONDS)
        if not container.ports.get("5432/tcp"):  # not known at its creation
            self._call(container.reload)
        handle.port = int(container.ports["5432/tcp"][0]["HostPort"])

    def _exec(self, container: Any, image: ResolvedImage, command: list[str],
              check: bool = True, user: str | None = None) -> str:
        """Run ``command`` in the container as the server's user (or ``user``); its output.
        A failure raises DbmsError, or with ``check=False`` is logged and its output
        returned."""
        with self.agents.use(container.id, user or self._server_user(image)) as agent:
            exit_code, output = agent.run(command)
        if exit_code:
            if check:
                raise DbmsError(f"{' '.join(command[:2])} failed: {output.strip()}")
            log.warning("docker exec %s exited %s: %s", command[0], exit_code,
                        output.strip()[-500:])
        return output

    def abandon(self, handle: RuntimeHandle) -> None:
        """A container's server ends before anything else (its overlay is the container's)."""
        self.stop(handle, immediate=True)

    def freeze(self, handle: RuntimeHandle) -> bool:
        """Never: a container's data is its own overlay, which the engine cannot replace
        under its server (see ``HostRuntime.freeze``)."""
        return False

    def thaw(self, handle: RuntimeHandle, restart: bool = True) -> bool:
        raise AssertionError("a container's server is never frozen")

    def stop(self, handle: RuntimeHandle, immediate: bool = False) -> None:
        """The postmaster is signalled from here (SIGINT fast, SIGQUIT immediate: the engine
        sees its host pid, and may signal it as root or as its uid), else through
        ``pg_ctl`` in the container; then the wait for its lock file to go."""
        container = self._container(handle.container_id)
        if container is not None:
            try:
                if not (handle.pid and PostgresDbms.is_postgres(handle.pid)):
                    raise ProcessLookupError(handle.pid)
                os.kill(handle.pid, signal.SIGQUIT if immediate else signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                self._exec(container, handle.image,
                           ["pg_ctl", "-D", PGDATA_IN_CONTAINER, "-m",
                            "immediate" if immediate else "fast", "-W", "stop"], check=False)
            deadline = time.monotonic() + 60
            while (read_postmaster_pid(handle.files_dir) or  # it ends just after its lock file
                   (handle.pid and pid_alive(handle.pid))) and time.monotonic() < deadline:
                time.sleep(READY_POLL_SECONDS)
            if self._mounts_own(handle):  # its upper layer is then the engine's to publish
                self._unmount(container, handle, check=True)
        handle.pid = None

    def _unmount(self, container: Any, handle: RuntimeHandle, check: bool) -> None:
        """Unmount a container's own overlay (``check=False``: it may not be mounted). When
        the engine is not root the overlay's work directory, root's and holding a shared
        whiteout, is emptied by the container too, so the engine can remove it."""
        self._exec(container, handle.image, ["umount", PGDATA_IN_CONTAINER], check=check,
                   user="root")
        if self.as_self:
            self._exec(container, handle.image,
                       ["rm", "-rf", os.path.join(handle.runtime_dir, "work", "work")],
                       user="root")
        handle.mounted = False

    def copy_out(self, handle: RuntimeHandle, dest: str) -> None:
        """The container mounts a read-only view of the stopped runtime's layers and copies
        it (as its root, keeping owners) into ``dest``, bound at the same path."""
        container = self._container(handle.container_id)
        if container is None or not self.snapshots:
            raise DbmsError("the runtime's container is gone: its data cannot be copied")
        view = self.snapshots.container_view(handle.runtime_dir)
        self._exec(container, handle.image, ["mount", "-t", "overlay", "overlay", "-o", view,
                                             PGDATA_IN_CONTAINER], user="root")
        try:
            self._exec(container, handle.image, ["cp", "-a", f"{PGDATA_IN_CONTAINER}/.", dest],
                       user="root")
        finally:
            self._exec(container, handle.image, ["umount", PGDATA_IN_CONTAINER], user="root")

    def copy_live(self, handle: RuntimeHandle, sources: Sequence[str], dest: str) -> None:
        """A non-root engine cannot copy what a container's own overlay wrote as root (its
        opaque directories are ``trusted.*`` attributes): the container copies it, as its
        root, into the runtime's directory, and it is moved from there."""
        container = self._container(handle.container_id)
        if not (self.as_self and self._mounts_own(handle)) or container is None:
            copy_live(sources, dest)
            return
        if not sources:
            return
        staged = os.path.join(handle.runtime_dir, f".copy-{random_hex(4)}")
        os.mkdir(staged, 0o700)
        try:
            result = self._call(container.exec_run, ["cp", "-a", "-t", staged, "--", *sources],
                                user="root", demux=True)
            errors = (result.output[1] or b"").decode("utf-8", "replace")
            check_live_copy(result.exit_code or 0, errors, sources[0], dest)
            for name in os.listdir(staged):
                os.rename(os.path.join(staged, name), os.path.join(dest, name))
        finally:
            remove_tree(staged)

    def discard(self, handle: RuntimeHandle) -> None:
        ids = {handle.container_id} if handle.container_id else set()
        try:
            ids |= {c.id for c in self._labelled({LABEL_KEY: handle.key})}
            if self.as_self and self._mounts_own(handle):
                self._empty_work_dir(handle, ids)
            for container_id in ids:
                self.agents.forget(container_id)
                with contextlib.suppress(DockerNotFound):
                    self._call(self.docker().api.remove_container, container_id, force=True)
        except RuntimeUnavailable as exc:
            if ids:  # nothing to remove when there was never a container
                log.warning("docker unavailable: containers of runtime %s are left for the"
                            " next start's sweep: %s", handle.key, exc.details)
        handle.container_id = None
        handle.pid = None

    def _empty_work_dir(self, handle: RuntimeHandle, container_ids: set[str]) -> None:
        """Before a runtime of a non-root engine goes: its container (or, when that is gone,
        a short-lived one) empties the overlay work directory only root may empty."""
        work = os.path.join(handle.runtime_dir, "work", "work")
        if not os.path.lexists(work):
            return
        for container_id in container_ids:
            container = self._container(container_id)
            if container is not None and container.status == "running":
                self._exec(container, handle.image, ["umount", "-l", PGDATA_IN_CONTAINER],
                           check=False, user="root")
                self._exec(container, handle.image, ["rm", "-rf", work], check=False,
                           user="root")
                return
        try:
            self._run_helper(self._image_ref(handle.image), ["rm", "-rf", work], None,
                             binds={handle.runtime_dir: handle.runtime_dir})
        except DbmsError as exc:
            log.warning("runtime %s: its overlay work directory stays: %s", handle.key, exc)

    def _labelled(self, labels: Mapping[str, str]) -> list[Any]:
        filters = [f"{LABEL_ENGINE}={self.engine_label}"]
        filters += [f"{key}={value}" for key, value in labels.items()]
        found: list[Any] = self._call(self.docker().containers.list, all=True,
                                      filters={"label": filters})
        return found

    @staticmethod
    def _postmaster_host_pid(container: Any, ns_pid: int) -> int | None:
        """The host pid of the container's postmaster (its pid inside is ``ns_pid``): the
        process whose innermost pid is ``ns_pid`` in the container's cgroup (both readable
        by any user, so an engine that is not root finds it too)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/status", encoding="utf-8") as status:
                    if not any(line.startswith("NSpid:") and len(line.split()) > 2
                               and line.split()[-1] == str(ns_pid) for line in status):
                        continue
                with open(f"/proc/{entry}/cgroup", encoding="utf-8") as cgroup:
                    if container.id in cgroup.read():
                        return int(entry)
        return None

    def alive(self, handle: RuntimeHandle) -> bool:
        """The postmaster process itself, seen from the host: no Docker call needed."""
        return bool(handle.container_id and handle.pid and pid_alive(handle.pid)
                    and PostgresDbms.is_postgres(handle.pid))

    def adopt(self, handle: RuntimeHandle, runtime_id: str | None) -> bool:
        container = self._container(runtime_id)
        if container is None or container.status != "running":
            return False
        handle.container_id = container.id
        lines = read_postmaster_pid(handle.files_dir)
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        handle.port = int(container.ports["5432/tcp"][0]["HostPort"])
        handle.pid = self._postmaster_host_pid(container, int(lines[0].strip()))
        return self.alive(handle)

    def _labels(self, **more: str) -> dict[str, str]:
        return {LABEL_ENGINE: self.engine_label, LABEL_PROCESS: self.process_label, **more}

    def sweep(self, keep: set[str]) -> list[str]:
        """Remove containers an earlier process of this engine left whose runtime key is not
        in ``keep`` (this process's own are never touched: the sweep runs while it serves)."""
        removed = []
        for container in self._labelled({}):
            if container.labels.get(LABEL_KEY) in keep or \
                    container.labels.get(LABEL_PROCESS) == self.process_label:
                continue
            try:
                self._call(container.remove, force=True)
            except DockerNotFound:
                continue
            except ApiError as exc:
                log.warning("sweep: cannot remove container %s: %s", container.id[:12],
                            exc.details)
                continue
            removed.append(container.id)
        return removed

    # clients ------------------------------------------------------------------------------
    def client(self, handle: RuntimeHandle, program: str, args: Sequence[str],
               stdin: bytes | None, workdir: str, merged: bool = False) -> ClientProcess:
        """A client in the container, as its postgres user, over the private socket (the
        host's ``workdir`` does not exist in there: it runs in /). ``merged``: its stdout
        and stderr may come as one stream, and it is run by an agent (see ``ExecAgent``:
        its stdin goes through a file in the runtime's socket directory)."""
        assert handle.container_id, "a client needs the runtime's container"
        if merged:
            return self._agent_client(handle, program, args, stdin)
        api = self.docker().api
        created = self._call(api.exec_create, handle.container_id, [program, *args],
                             stdin=True, user=self._server_user(handle.image), workdir="/",
                             environment={**CLIENT_ENV, "PGAPPNAME": f"sqlrs-{program}"})
        sock = self._call(api.exec_start, created["Id"], socket=True)
        return DockerClient(self._call, api, created["Id"], sock, stdin)

    def _agent_client(self, handle: RuntimeHandle, program: str, args: Sequence[str],
                      stdin: bytes | None) -> AgentClient:
        """A client run by an agent of the server user's; its stdin goes through a file in
        the runtime's socket directory (removed when the client ends)."""
        stdin_name = f".stdin-{random_hex(8)}" if stdin is not None else None
        if stdin is not None and stdin_name:
            write_file_in(handle.socket_dir, stdin_name, stdin, 0o600, handle.image.owner)
        stdin_file = os.path.join(handle.socket_dir, stdin_name) if stdin_name else None
        assert handle.container_id
        agent = self.agents.checkout(handle.container_id, self._server_user(handle.image))
        client = AgentClient(agent, self.agents.checkin, stdin_file)
        try:
            agent.submit(["env", f"PGAPPNAME=sqlrs-{program}", program, *args], "fg",
                         f"{SOCKET_IN_CONTAINER}/{stdin_name}" if stdin_name else "/dev/null")
        except BaseException:
            client.finish()
            raise
        return client

    def admin_endpoint(self, handle: RuntimeHandle) -> tuple[str, int]:
        return handle.socket_dir, 5432


@dataclass(frozen=True)
class StoreLayout:
    """Paths inside the state store; every id is validated before it becomes a path."""

    root: str

    def engines_root(self) -> str:
        return os.path.join(self.root, "engines")

    def engine_dir(self, image: ResolvedImage) -> str:
        return os.path.join(self.engines_root(), image.engine_dir)

    def base_dir(self, image: ResolvedImage) -> str:
        return os.path.join(self.engine_dir(image), "base")

    def states_dir(self, image: ResolvedImage) -> str:
        return os.path.join(self.engine_dir(image), "states")

    def state_dir(self, image: ResolvedImage, state_id: str) -> str:
        if not is_state_id(state_id):
            raise invalid_argument("invalid state id", state_id)
        return os.path.join(self.states_dir(image), state_id)

    def instances_dir(self) -> str:
        return os.path.join(self.root, "instances")

    def instance_dir(self, instance_id: str) -> str:
        if not is_canonical_instance_id(instance_id):
            raise invalid_argument("invalid instance id", instance_id)
        return os.path.join(self.instances_dir(), instance_id)





class Runtimes:
    """Chooses the runtime for an image id and keeps one base cluster per resolved image."""

    def __init__(self, host: HostRuntime, docker: DockerRuntime, layout: StoreLayout,
                 snapshots: SnapshotManager) -> None:
        self.host = host
        self.docker = docker
        self.layout = layout
        self.snapshots = snapshots

    def check_image(self, image_id: str) -> None:
        """Refuse at once (400) an image id no job could use: host binaries others may swap."""
        if image_id.startswith(HOST_IMAGE_PREFIX):
            self.host.bindir_for(image_id)

    def for_image(self, image_id: str) -> Runtime:
        return self.host if image_id.startswith(HOST_IMAGE_PREFIX) else self.docker

    def resolve(self, image_id: str, note: Callable[[str], None] | None = None) -> ResolvedImage:
        return self.for_image(image_id).resolve(image_id, note)

    def ensure_base(self, image: ResolvedImage, emit: Callable[[str], None]) -> str:
        """Initialise the base cluster of ``image`` once (under a lock); return its pgdata."""
        base = self.layout.base_dir(image)
        pgdata = os.path.join(base, "pgdata")
        if is_published(base, BASE_MARKER):
            return pgdata
        with file_lock(os.path.join(self.layout.engine_dir(image), ".init.lock")):
            if is_published(base, BASE_MARKER):
                return pgdata
            emit(f"{image.runtime_kind}: init base {image.resolved_id}")
            remove_tree(base)
            work = os.path.join(self.layout.engine_dir(image), f".init-{random_hex(4)}")
            os.makedirs(os.path.join(work, "pgdata"), mode=0o700)
            pause_point("init-base")
            try:
                with self.snapshots.exposed(work, f"init-{random_hex(8)}") as exposed:
                    os.chown(os.path.join(work, "pgdata"), *image.owner)
                    self.for_image(image.requested).init_base(image,
                                                              os.path.join(exposed, "pgdata"))
            except BaseException:
                remove_tree(work)
                raise
            fsync_tree(work)
            os.rename(work, base)
            mark_published(base, BASE_MARKER)
            return pgdata


###############################################################################
# conntrack: active client connections of an instance: from the kernel's socket tables when
# its server shares the engine's network namespace, else from pg_stat_activity.
# Owns nothing; may call dbms (its private sessions) and runtime (a handle's runtime says
# where its sockets are). psycopg2 is imported on first use.
###############################################################################

COUNT_CONNECTIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    " AND pid <> pg_backend_pid()"
)
#: netlink socket diagnostics (linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h)
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED = 4, 20, 1
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
UNIX_CONNECTED = "03"  # /proc/net/unix: SS_CONNECTED


class ConntrackError(Exception):
    """Client sessions could not be counted."""


class ConnectionTracker:
    """Counts client sessions of a running instance (not the engine's own).

    A server whose sockets are the engine's (``Runtime.sockets_visible``: the host runtime)
    is counted from the kernel's socket tables: every established TCP connection to its
    port and every connected stream on its private unix socket is one session, with no
    session of its own (a new backend costs the server a fork and the engine a connection).
    Otherwise a session over the server's private socket asks pg_stat_activity."""

    def _query(self, handle: RuntimeHandle, sql: str) -> int:
        try:
            row = admin_query(handle.runtime.admin_endpoint(handle), "sqlrs-engine-conntrack",
                              sql)
        except DbmsError as exc:
            raise ConntrackError(str(exc)) from exc
        return int(row[0]) if row else 0

    def active(self, handle: RuntimeHandle) -> int:
        if not handle.runtime.sockets_visible or not handle.port:
            return self._query(handle, COUNT_CONNECTIONS_SQL)
        try:
            return (tcp_sessions(handle.port)
                    + unix_sessions(os.path.join(handle.socket_dir, f".s.PGSQL.{handle.port}")))
        except (OSError, ValueError, IndexError, struct.error) as exc:
            raise ConntrackError(f"cannot read the socket tables: {exc}") from exc


def tcp_sessions(port: int) -> int:
    """Established IPv4 TCP connections (servers listen on 127.0.0.1 only) whose local end is
    ``port``, from the kernel's socket diagnostics over netlink, as ``ss`` asks
    (``/proc/net/tcp`` prints every TIME_WAIT socket of the machine and takes milliseconds)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(5)
        request = struct.pack("=BBBBI48x", socket.AF_INET, socket.IPPROTO_TCP, 0, 0,
                              1 << TCP_ESTABLISHED)  # inet_diag_req_v2, any socket id
        diag.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                    NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        return sum(local_port == port for local_port in _diag_local_ports(diag))


def _diag_local_ports(diag: socket.socket) -> Iterator[int]:
    """The local ports of one sock_diag dump's answers, until its end."""
    while True:
        data = diag.recv(1 << 16)
        offset = 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, kind, _flags, _sequence, _pid = NLMSG_HEADER.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR or length < NLMSG_HEADER.size:
                errno_value = -struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)[0]
                raise OSError(errno_value, f"sock_diag: {os.strerror(errno_value)}")
            yield struct.unpack_from("!H", data, offset + NLMSG_HEADER.size + 4)[0]
            offset += (length + 3) & ~3


def unix_sessions(path: str) -> int:
    """Connected streams accepted on the unix socket at ``path`` (the listener has another
    state, so it is not one)."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as rows:
        next(rows, None)
        return sum(1 for row in rows
                   if row.rstrip("\n").endswith(" " + path) and row.split()[5] == UNIX_CONNECTED)



###############################################################################
# instances: live databases cloned from states.
# Owns <store>/instances/<id>, the runtime of each instance and the warm pool; may call
# config, store, snapshot, dbms, runtime, conntrack.
###############################################################################


POOL_PIN = "pool:"  #: pin owners of pooled runtimes
#: how long a deletion waits for sessions that have just ended to leave (``connections``)
SESSION_SETTLE_S, SESSION_SETTLE_POLL_S = 0.5, 0.01


class InstanceEntry(TypedDict):
    """A live database (``GET /v1/instances``)."""
    instance_id: Hex32
    image_id: str
    state_id: Hex64
    name: NotRequired[Annotated[str | None, Doc("Primary name, if bound.", minLength=1)]]
    created_at: Timestamp
    expires_at: NotRequired[Timestamp | None]
    runtime_id: NotRequired[Annotated[str | None, Doc("Container id or host:<pid>.")]]
    status: Annotated[str, Doc(enum=["active", "expired", "orphaned"])]
    dsn: NotRequired[Annotated[str | None, Doc(
        "postgres://sqlrs:<password>@127.0.0.1:<port>/postgres while it runs")]]


class InstanceManager:
    """Creates, tracks, adopts and destroys instances; each has its own clone and server.

    Live runtime handles are cached in memory; the truth is the ``instances`` table plus the
    processes and mounts it points at, so a restart re-adopts or marks rows ``orphaned``.
    """

    def __init__(self, store: MetadataStore, layout: StoreLayout, snapshots: SnapshotManager,
                 runtimes: Runtimes, conntrack: ConnectionTracker) -> None:
        self.store = store
        self.layout = layout
        self.snapshots = snapshots
        self.runtimes = runtimes
        self.conntrack = conntrack
        #: Guards the five tables below; held only for dictionary work, never across I/O.
        #: Lock order: an instance's lock (``locked``) before ``_lock``.
        self._lock = threading.Lock()
        #: instance id → runs streaming on it now (a reset waits for none: it refuses)
        self._runs: dict[str, int] = {}
        #: instance id → its live runtime handle (a cache; the truth is the instances table)
        self._handles: dict[str, RuntimeHandle] = {}
        #: owner (job or instance id) → state dirs it is reading and no row protects yet
        self._pins: dict[str, set[str]] = {}
        #: state dirs claimed by a deletion or an eviction in progress
        self._claimed: set[str] = set()
        #: instance id → [its lock, number of threads using or waiting for it]
        self._instance_locks: dict[str, list[Any]] = {}

    # pins and claims: a state is either read (pinned) or deleted (claimed), never both -------
    def pin(self, owner: str, state_dirs: set[str]) -> None:
        """Protect ``state_dirs`` for ``owner`` (replacing what it pinned before); a state
        being deleted cannot be pinned (404)."""
        with self._lock:
            if state_dirs & self._claimed:
                raise not_found("state not found")
            self._pins[owner] = state_dirs

    def pin_runtime(self, owner: str, handle: RuntimeHandle) -> None:
        """Pin the states a runtime is layered on (its ``source`` file lists them)."""
        try:
            paths = {os.path.dirname(path)
                     for path in runtime_source(handle.runtime_dir).split(":")}
        except FileNotFoundError:
            return
        self.pin(owner, paths)

    def unpin(self, owner: str) -> None:
        with self._lock:
            self._pins.pop(owner, None)

    @contextlib.contextmanager
    def holding(self, owner: str, state_dirs: set[str]) -> Iterator[None]:
        """``state_dirs`` pinned for ``owner`` during the block (``pin`` inside it replaces
        them), unpinned however the block ends."""
        self.pin(owner, state_dirs)
        try:
            yield
        finally:
            self.unpin(owner)

    def pinned(self, state_dir: str) -> bool:
        """Whether a build or clone reads the state (warm-pool pins do not count: a pooled
        runtime is stopped before its state is deleted or evicted)."""
        with self._lock:
            return any(state_dir in paths for owner, paths in self._pins.items()
                       if not owner.startswith(POOL_PIN))

    @contextlib.contextmanager
    def claiming(self, state_dirs: set[str]) -> Iterator[bool]:
        """``state_dirs`` reserved for deletion during the block, which gets True; False
        (and no claim) when one of them is pinned or claimed."""
        with self._lock:
            claimed = not (state_dirs & self._claimed or any(
                state_dirs & paths for paths in self._pins.values()))
            if claimed:
                self._claimed |= state_dirs
        try:
            yield claimed
        finally:
            if claimed:
                with self._lock:
                    self._claimed -= state_dirs

    @contextlib.contextmanager
    def locked(self, instance_id: str) -> Iterator[None]:
        """Serialise the slow work (connection checks, stop, removal) on one instance
        without holding up any other."""
        with self._lock:
            entry = self._instance_locks.setdefault(instance_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._instance_locks[instance_id]

    @contextlib.contextmanager
    def running(self, instance_id: str) -> Iterator[None]:
        """Mark the instance in use by a run for the block (a reset refuses it meanwhile)."""
        with self._lock:
            self._runs[instance_id] = self._runs.get(instance_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._runs[instance_id] -= 1
                if not self._runs[instance_id]:
                    del self._runs[instance_id]

    # runtimes -----------------------------------------------------------------------------
    def _handle(self, key: str, image: ResolvedImage) -> RuntimeHandle:
        runtime_dir = self.layout.instance_dir(key)
        runtime = self.runtimes.for_image(image.requested)
        data_dir = self.snapshots.data_dir_for(runtime_dir, key)
        return RuntimeHandle(
            key=key, image=image, runtime=runtime, runtime_dir=runtime_dir, data_dir=data_dir,
            socket_dir=self.snapshots.socket_dir_for(key),
            files_dir=self.snapshots.files_dir_for(runtime_dir, data_dir),
        )

    def new_runtime(self, key: str, image: ResolvedImage, source_pgdata: str,
                    content_id: str, job_id: str | None = None) -> RuntimeHandle:
        """Clone ``source_pgdata`` into a fresh (stopped) runtime named ``key``; whatever an
        interrupted earlier attempt left under that key goes first."""
        handle = self._handle(key, image)
        handle.job_id = job_id
        handle.runtime.discard(handle)
        self.snapshots.release(handle.runtime_dir, key)
        pause_point("clone")
        try:
            handle.data_dir = self.snapshots.clone(source_pgdata, handle.runtime_dir, key,
                                                   image.owner, handle.runtime.mounter)
            handle.files_dir = self.snapshots.files_dir_for(handle.runtime_dir, handle.data_dir)
        except BaseException:
            self.snapshots.release(handle.runtime_dir, key)
            raise
        handle.content_id = content_id
        return handle

    def start(self, handle: RuntimeHandle) -> None:
        handle.runtime.start(handle)

    def stop(self, handle: RuntimeHandle) -> None:
        handle.runtime.stop(handle)

    def discard(self, handle: RuntimeHandle) -> None:
        """Kill the server and remove every trace of the runtime."""
        handle.runtime.discard(handle)
        self.snapshots.release(handle.runtime_dir, handle.key)
        with self._lock:
            self._handles.pop(handle.key, None)

    def _admin_endpoint(self, handle: RuntimeHandle) -> tuple[str, int]:
        return handle.runtime.admin_endpoint(handle)

    def set_password(self, handle: RuntimeHandle,
                     query: Callable[..., Any] | None = None) -> str:
        """Give a started runtime its own random superuser password (over the private
        socket, in ``query``'s session when given; only the SCRAM verifier is sent) and
        return it. Never part of a state."""
        password = secrets.token_urlsafe(24)
        (query or partial(self.admin_sql, handle))(f"ALTER ROLE {SUPERUSER} PASSWORD %s",
                                                   scram_verifier(password))
        return password

    def admin_session(self, handle: RuntimeHandle) -> contextlib.AbstractContextManager[
            Callable[..., Any]]:
        """The engine's own session on a runtime, for statements that go together."""
        return admin_session(self._admin_endpoint(handle), "sqlrs-engine")

    def clear_password(self, handle: RuntimeHandle) -> None:
        """Remove a runtime's password before it becomes a state."""
        self.admin_sql(handle, f"ALTER ROLE {SUPERUSER} PASSWORD %s", None)

    def admin_sql(self, handle: RuntimeHandle, sql: str, *params: Any) -> Any:
        """Run one statement in the engine's own session over the runtime's private socket;
        its first row, if it returns rows."""
        return admin_query(self._admin_endpoint(handle), "sqlrs-engine", sql, *params)

    def source_of(self, state: StateRow) -> tuple[ResolvedImage, str]:
        image = self.runtimes.resolve(state.image_id)
        return image, self.snapshots.source_of(state.state_dir)

    # instances ----------------------------------------------------------------------------
    def register(self, handle: RuntimeHandle, state_id: str, job_id: str | None,
                 ttl_seconds: int | None, password: str) -> InstanceRow:
        now = time.time_ns()
        row = InstanceRow(
            instance_id=handle.key, state_id=state_id, image_id=handle.image.resolved_id,
            created_at=format_ts(now),
            expires_at=format_ts(now + ttl_seconds * 1_000_000_000) if ttl_seconds else None,
            runtime_id=handle.runtime_id, runtime_dir=handle.runtime_dir, status="active",
            port=handle.port, job_id=job_id, password=password,
        )
        self.store.insert_instance(row)
        with self._lock:
            self._handles[handle.key] = handle
        return row

    def create(self, state: StateRow, ttl_seconds: int | None) -> InstanceRow:
        """A new instance from ``state``: clone, start, register."""
        image, source = self.source_of(state)
        key = random_hex(16)
        with self.holding(key, {state.state_dir}):  # until the row protects the state
            if self.store.get_state(state.state_id) is None:
                raise not_found("state not found")
            handle = self.new_runtime(key, image, source, state.state_id)
            handle.serving = True
            try:
                self.start(handle)
                return self.register(handle, state.state_id, None, ttl_seconds,
                                     self.set_password(handle))
            except BaseException:
                self.discard(handle)
                raise

    def live_handle(self, row: InstanceRow) -> RuntimeHandle | None:
        with self._lock:
            handle = self._handles.get(row.instance_id)
        if handle and handle.runtime.alive(handle):
            return handle
        return None

    @staticmethod
    def status(row: InstanceRow, handle: RuntimeHandle | None) -> str:
        if row.expires_at and row.expires_at < format_ts():
            return "expired"
        return "active" if handle else "orphaned"

    def entry(self, row: InstanceRow) -> InstanceEntry:
        """The wire form; the runtime is checked once for both status and DSN."""
        handle = self.live_handle(row)
        return omit_none(InstanceEntry(
            instance_id=row.instance_id, image_id=row.image_id, state_id=row.state_id,
            name=row.name, created_at=row.created_at, expires_at=row.expires_at,
            runtime_id=row.runtime_id, status=self.status(row, handle),
            dsn=handle.dsn(row.password) if handle else None,
        ))

    def dsn(self, instance_id: str) -> str | None:
        """The DSN (with its password) of a running instance; None otherwise."""
        row = self.store.get_instance(instance_id)
        return self.entry(row).get("dsn") if row else None

    def written_bytes(self, handle: RuntimeHandle) -> int:
        """What a runtime's own writes take on disk (0 when it is a full copy)."""
        return self.snapshots.layer_size(handle.runtime_dir) or 0

    def ensure_running(self, row: InstanceRow, note: Callable[[str], None]) -> RuntimeHandle:
        """The instance's live runtime, restarted from its own data if the server is gone.
        The restart holds the instance's lock, so a deletion waits for it (and then finds a
        server to stop) and concurrent runs share one restart."""
        handle = self.live_handle(row)
        if handle:
            return handle
        with self.locked(row.instance_id):
            current = self.store.get_instance(row.instance_id)
            if current is None:
                raise not_found("instance not found")
            return self.live_handle(current) or self._restart(current, note)

    def _restart(self, row: InstanceRow, note: Callable[[str], None]) -> RuntimeHandle:
        pause_point("run-restart")
        if not row.runtime_dir or not os.path.isdir(row.runtime_dir):
            raise conflict("instance runtime_dir is missing")
        image = self.runtimes.resolve(row.image_id)
        handle = self._handle(row.instance_id, image)
        handle.port = row.port  # the DSN stays the same when the port is still free
        handle.serving = True
        note("run: runtime missing - restarting")
        handle.runtime.discard(handle)
        self._finish_reset(row, handle)
        self.snapshots.reattach(handle.runtime_dir, handle.key)
        note("run: restoring runtime")
        handle.runtime.start(handle)
        self._restore_password(handle, row)  # a reset finished above left the state's none
        self.store.update_instance_runtime(row.instance_id, handle.runtime_id, handle.port,
                                           "active")
        with self._lock:
            self._handles[row.instance_id] = handle
        note("run: runtime started")
        return handle

    # snapshots ----------------------------------------------------------------------------
    def snapshot(self, row: InstanceRow, name: str | None) -> StateRow:
        """A new state of what the instance holds now, taken while its server runs on and its
        clients stay connected (``SnapshotManager.publish_online``): every transaction
        committed before the call, nothing it did not commit. Its id is random (never a
        content address of scripts); it is a child of the instance's state and records the
        instance it came from. An orphaned instance is started first."""
        if name is not None and self.store.state_named(name):
            raise conflict("state name already in use", name)
        self.ensure_running(row, lambda _note: None)
        with self.locked(row.instance_id):
            current = self.store.get_instance(row.instance_id)
            handle = self.live_handle(current) if current else None
            if current is None or handle is None:
                raise not_found("instance not found")
            parent = self.store.get_state(current.state_id)
            assert parent is not None, "an instance's row protects its state"
            state_id = random_hex(32)
            final_dir = self.layout.state_dir(handle.image, state_id)
            layers = self.snapshots.source_of(parent.state_dir)
            if len(os.path.join(final_dir, "layer")) + len(layers) + 1 > MAX_LOWER_CHARS:
                raise conflict("branch too deep to snapshot",
                               "its layers no longer fit one mount; snapshot a new instance"
                               " of a prepared state instead")
            try:
                size = self._take_snapshot(handle, state_id, final_dir)
                state = StateRow(
                    state_id=state_id, parent_state_id=parent.state_id,
                    image_id=current.image_id, prepare_kind="snapshot",
                    prepare_args_normalized=f"snapshot of instance {current.instance_id}",
                    created_at=format_ts(), size_bytes=size, last_used_at=None, use_count=0,
                    state_dir=final_dir, name=name, source_instance_id=current.instance_id,
                    unflushed_boot=boot_id())
                self.store.insert_state(state)
            except BaseException:
                remove_tree(final_dir)  # no state directory without its row
                raise
        in_background("flush-snapshot", self.flush_state, state)
        made = self.store.get_state(state_id)
        assert made is not None
        return made

    def flush_state(self, state: StateRow) -> None:
        """Flush a state that answered before its files were on disk, then say so."""
        try:
            self.snapshots.flush_state(state.state_dir)
            self.store.mark_flushed(state.state_id)
        except (OSError, sqlite3.Error) as exc:
            log.warning("state %s is not flushed yet (a reboot would drop it): %s",
                        state.state_id, exc)

    def _take_snapshot(self, handle: RuntimeHandle, state_id: str, final_dir: str) -> int:
        with admin_session(self._admin_endpoint(handle), "sqlrs-engine-snapshot") as query:
            if query("SHOW wal_level")[0] == "minimal":
                raise conflict("the instance cannot be snapshotted while it runs",
                               "its server was started by an older engine with"
                               " wal_level=minimal; a reset or a restart of it allows it")

            def stop() -> tuple[str, str]:
                label, tablespaces = query("SELECT labelfile, spcmapfile FROM"
                                           " pg_backup_stop(false)")
                return str(label), str(tablespaces or "")

            self.snapshots.sync_server_dir(handle.key)  # its top-level files, into its layer

            return self.snapshots.publish_online(
                handle.runtime_dir, handle.data_dir, final_dir,
                lambda: query("SELECT pg_backup_start(%s, true)", f"sqlrs {state_id}"), stop,
                partial(handle.runtime.copy_live, handle))

    # resets -------------------------------------------------------------------------------
    def reset(self, row: InstanceRow, state: StateRow) -> tuple[InstanceRow, int]:
        """Give a live or orphaned instance ``state``'s data (its own or another state of its
        image): the server stops (its clients are disconnected), the data is replaced and the
        server starts again with the same port and password. Returns the instance's row and
        how many client sessions were disconnected. A run on the instance, or a state of
        another image, is a 409 and changes nothing; a kill at any point leaves the old data
        (before the intent is written) or finishes to the new (``_finish_reset``)."""
        with self.locked(row.instance_id):
            current = self.store.get_instance(row.instance_id)
            if current is None:
                raise not_found("instance not found")
            with self._lock:
                if self._runs.get(row.instance_id):
                    raise conflict("instance is in use by a run",
                                   "wait for the run to end, then reset")
            if state.image_id != current.image_id:
                raise conflict("state belongs to another image",
                               f"the instance runs {current.image_id}, the state is of"
                               f" {state.image_id}")
            with self.holding(f"reset-{row.instance_id}", {state.state_dir}):
                return self._reset(current, state)  # (the row protects it after)

    def _reset(self, row: InstanceRow, state: StateRow) -> tuple[InstanceRow, int]:
        image, source = self.source_of(state)
        handle = self.live_handle(row)
        disconnected, frozen = 0, False
        if handle is not None:
            with contextlib.suppress(ConntrackError):
                disconnected = self.conntrack.active(handle)
            # every session ends; no checkpoint: the data is thrown away. With a seed of the
            # state, the server's processes restart on the new data under its postmaster (a
            # reset in place); else the new server starts while the old one is still ending
            # (it binds the port after it)
            with self._lock:  # not live meanwhile: a run that starts now waits for the lock
                self._handles.pop(row.instance_id, None)
            frozen = state.state_id == row.state_id and \
                self.snapshots.reset_seed(handle.runtime_dir, state.state_id) is not None and \
                handle.runtime.freeze(handle)
            if not frozen:
                handle.runtime.abandon(handle)
        else:
            handle = self._handle(row.instance_id, image)
            handle.runtime.discard(handle)
            self.snapshots.reattach(handle.runtime_dir, handle.key)
        try:
            handle.port, handle.serving = row.port, True
            if state.state_id != row.state_id:  # a seed is only sure while the row protects its
                self.snapshots.drop_seeds(handle.runtime_dir)  # state (the same id, same bytes)
            seed = self.snapshots.reset_seed(handle.runtime_dir, state.state_id)
            self.snapshots.begin_reset(handle.runtime_dir, state.state_id)  # from here on: the
            pause_point("reset")                                             # new state's data
            config = self.snapshots.server_files(handle.key, SERVER_CONFIG_FILES) if frozen \
                else None
            seeded = self.snapshots.finish_reset(handle.runtime_dir, handle.key, image.owner,
                                                 source, seed)
            if frozen:  # the postmaster keeps the configuration it read: only the same goes on
                after = self.snapshots.server_files(handle.key, SERVER_CONFIG_FILES)
                same = after == config and not any(  # (and not files it names)
                    pattern.search(after.get(name) or b"")
                    for name, pattern in INCLUDE_DIRECTIVES.items())
                frozen = False  # (a thaw that fails kills the server)
                restarted = handle.runtime.thaw(handle, restart=same)
            else:
                restarted = False
            if not restarted:
                if not seeded and row.password and self.snapshots.can_seed(handle.runtime_dir):
                    seeded = self._seed(handle, row, state)
                handle.runtime.start(handle)
            self.store.update_instance_runtime(row.instance_id, handle.runtime_id, handle.port,
                                               "active")  # a restart finds (adopts) this server
            pause_point("reset-started")
            if not seeded:
                self._restore_password(handle, row)
            self.store.update_instance_runtime(row.instance_id, handle.runtime_id, handle.port,
                                               "active", state.state_id)
            self.snapshots.end_reset(handle.runtime_dir)
            with self._lock:
                self._handles[row.instance_id] = handle
            reset = self.store.get_instance(row.instance_id)
            assert reset is not None
            in_background("after-reset", self._after_reset, row.instance_id, handle.runtime_dir,
                          state.state_id)
            return reset, disconnected
        except BaseException:
            if frozen:  # a failure while its processes were stopped: the server goes
                handle.runtime.thaw(handle, restart=False)
            raise
        finally:
            if handle.ending:  # a reset that failed before its start: the old server's end
                handle.ending()  # is waited for all the same
                handle.ending = None

    def _after_reset(self, instance_id: str, runtime_dir: str, state_id: str) -> None:
        """Off a reset's path, once its server runs: the old layer is removed and the seed's
        copy for the next reset is staged (under the instance's lock, which resets and
        deletions take: never beside them, never for a state the instance has left)."""
        self.snapshots.remove_trash(runtime_dir)
        try:
            with self.locked(instance_id):
                row = self.store.get_instance(instance_id)
                if row is not None and row.state_id == state_id:
                    self.snapshots.stage_seed(runtime_dir, state_id)
        except OSError as exc:  # the next reset copies the seed itself
            log.warning("instance %s: no reset seed staged: %s", instance_id, exc)

    def _seed(self, handle: RuntimeHandle, row: InstanceRow, state: StateRow) -> bool:
        """The first reset of an instance to ``state``, its fresh layer mounted: the server
        starts on a port of its own (the instance's clients know only the instance's, so none
        can write what would then come back at every reset), gets the password and stops
        cleanly; what it wrote is kept as the runtime's seed for the next resets (which then
        need no session for the password). True when the data now has the password; any
        failure is logged and the reset goes on without a seed."""
        handle.port = None
        try:
            handle.runtime.start(handle)
            self._restore_password(handle, row)
            pause_point("reset-seed-server")
            handle.runtime.stop(handle)
            pause_point("reset-seed")
            self.snapshots.sync_server_dir(handle.key)
            self.snapshots.save_seed(handle.runtime_dir, state.state_id)
            return True
        except (DbmsError, OSError) as exc:  # its resets keep setting the password
            log.warning("instance %s: no reset seed: %s", row.instance_id, exc)
            handle.runtime.stop(handle, immediate=True)
            return False
        finally:
            handle.port = row.port

    def _restore_password(self, handle: RuntimeHandle, row: InstanceRow) -> None:
        """Give a started runtime the instance's password again (states hold none)."""
        if row.password:
            self.admin_sql(handle, f"ALTER ROLE {SUPERUSER} PASSWORD %s",
                           scram_verifier(row.password))

    def _finish_reset(self, row: InstanceRow, handle: RuntimeHandle,
                      data_done: bool = False) -> None:
        """Finish a reset a kill interrupted: its state becomes the instance's data (unless
        ``data_done``: its server was started again, which happens only once the data is the
        state's), and its row says so."""
        state_id = self.snapshots.reset_intent(handle.runtime_dir)
        if state_id is None:
            return
        state = self.store.get_state(state_id.strip()) if is_state_id(state_id.strip()) else None
        if state is None:  # cannot be: the instance's row protected it since the intent
            raise conflict("an interrupted reset cannot be finished",
                           f"state {state_id} is gone; delete the instance")
        log.info("instance %s: finishing an interrupted reset to %s", row.instance_id,
                 state.state_id)
        if data_done:  # its server started on the new data; maybe not with its password
            self._restore_password(handle, row)
        else:
            handle.runtime.discard(handle)  # whatever server may still hold the data
            self.snapshots.finish_reset(handle.runtime_dir, handle.key, handle.image.owner,
                                        self.snapshots.source_of(state.state_dir))
            self.snapshots.remove_trash(handle.runtime_dir)
        self.store.update_instance_state(row.instance_id, state.state_id)
        self.snapshots.end_reset(handle.runtime_dir)

    def connections(self, row: InstanceRow) -> int | None:
        """Client sessions of a live instance (0 when it is not running); None when they
        cannot be counted, which callers must treat as "maybe in use". A count above 0 is
        taken again for up to ``SESSION_SETTLE_S``: a session that has just ended (the
        engine's own, after a create, or a client's) keeps its backend and its socket for a
        moment, and a deletion right after it must not be refused for it."""
        handle = self.live_handle(row)
        if handle is None:
            return 0
        settled = time.monotonic() + SESSION_SETTLE_S
        try:
            while (count := self.conntrack.active(handle)) and time.monotonic() < settled:
                time.sleep(SESSION_SETTLE_POLL_S)
            return count
        except ConntrackError as exc:
            log.warning("conntrack failed for %s: %s", row.instance_id, exc)
            return None

    def destroy(self, row: InstanceRow) -> None:
        """Stop the server (an immediate shutdown: its sessions end with it), remove the clone
        and delete the row (and its names)."""
        handle = self.live_handle(row)
        pause_point("destroy")
        if handle is None:
            image = self.runtimes.resolve(row.image_id)
            handle = self._handle(row.instance_id, image)
        self.discard(handle)
        self.store.delete_instance(row.instance_id)

    # recovery -----------------------------------------------------------------------------
    def recover(self) -> None:
        """Re-adopt live instances, mark dead ones orphaned, remove runtimes nobody owns."""
        rows = self.store.list_instances()
        for row in rows:
            try:
                image = self.runtimes.resolve(row.image_id)
            except EngineError:
                self.store.update_instance_runtime(row.instance_id, None, None, "orphaned")
                continue
            handle = self._handle(row.instance_id, image)
            handle.serving = True  # whenever it starts again
            if handle.runtime.adopt(handle, row.runtime_id):
                with self._lock:
                    self._handles[row.instance_id] = handle
                self.store.update_instance_runtime(row.instance_id, handle.runtime_id,
                                                   handle.port, "active")
            else:  # its port is kept: a restart tries it first, so its DSN stays the same
                self.store.update_instance_runtime(row.instance_id, None, row.port, "orphaned")
            try:
                self._finish_reset(row, handle, data_done=handle.pid is not None)
            except (OSError, EngineError, DbmsError) as exc:
                log.warning("instance %s: an interrupted reset is not finished yet: %s",
                            row.instance_id, exc)
        self.remove_unowned({row.instance_id for row in rows})

    def remove_unowned(self, keep: set[str]) -> list[str]:
        """Kill servers, unmount and delete runtime dirs that no instance row owns."""
        removed = []
        root = self.layout.instances_dir()
        keys = set(os.listdir(root)) if os.path.isdir(root) else set()
        if self.snapshots.expose_root and os.path.isdir(self.snapshots.expose_root):
            keys |= set(os.listdir(self.snapshots.expose_root))
        for key in sorted(keys - keep):
            if key.startswith("."):  # a probe, Liquibase's class archives: not a runtime
                continue
            data_dir = os.path.join(self.snapshots.exposed_path(key) or
                                    os.path.join(root, key), "data")
            for files_dir in {data_dir, self.snapshots.files_dir_for(os.path.join(root, key),
                                                                     data_dir)}:
                self.runtimes.host.dbms.stop_by_data_dir(files_dir)
            self.snapshots.release(os.path.join(root, key), key)
            removed.append(key)
        return removed



class PoolEntry(TypedDict):
    state_id: Hex64
    ready: Count
    starting: Count
    rss_bytes: Annotated[Count, Doc("Resident memory of the ready servers.")]


class PoolStatus(TypedDict):
    """``GET /v1/pool``: started, unclaimed instances kept for recently used states."""
    per_state: Count
    max_total: Count
    idle_timeout: Annotated[str, Doc("Go duration, e.g. 10m0s.")]
    entries: list[PoolEntry]


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children, in bytes (0 when it is gone)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return total


#: a refill waits this long after a pooled hand-out, so that starting a server does not
#: compete with the client's first connection and statements (on two cores it adds ≈ 40 %)
REFILL_PAUSE_S = 0.05
#: how many pooled runtimes start at once (each start is mostly one core's work)
FILL_PARALLEL = max(1, min(2, os.cpu_count() or 1))
#: a state whose hand-out found the pool empty this recently keeps twice ``perState`` ready
STARVED_WINDOW_S = 10.0


class WarmPool:
    """Started, unclaimed runtimes of the most recently handed-out states, each ready to
    become an instance in a few milliseconds (password, row, answer).

    Pooled runtimes are the engine's, never the user's: they have no instance row (so a
    restart removes them as unowned), pin their state (nothing deletes it under them) and are
    stopped first when their state is deleted or evicted. A background thread refills them
    shortly after each hand-out (``REFILL_PAUSE_S``, none when the state ran out), up to
    ``FILL_PARALLEL`` at once, and stops those idle past ``instances.warmPool.idleTimeout``.
    A state handed out faster than it refills (a hand-out found none ready in the last
    ``STARVED_WINDOW_S``) keeps twice ``perState`` ready, within ``maxTotal``.
    """

    def __init__(self, instances: InstanceManager, store: MetadataStore,
                 config: ConfigManager) -> None:
        self.instances = instances
        self.store = store
        self.config = config
        #: guards the four tables below; waited on by ``drain``; never held across I/O
        self._changed = threading.Condition()
        #: state id → ready runtimes, each with the monotonic time it became ready
        self._ready: dict[str, list[tuple[RuntimeHandle, float]]] = {}
        #: state id → how many runtimes are being started for it
        self._starting: dict[str, int] = {}
        #: state id → how many of its runtimes are being stopped (they still pin it)
        self._stopping: dict[str, int] = {}
        #: state ids by last hand-out, most recent last (the ones the pool fills)
        self._recent: dict[str, None] = {}
        #: monotonic time before which no refill starts (set by a pooled hand-out)
        self._quiet_until = 0.0
        #: state id → monotonic time of its last hand-out that found none ready
        self._starved: dict[str, float] = {}
        self._wake = threading.Event()

    def settings(self) -> tuple[int, int, float]:
        pool = self.config.value("instances.warmPool")
        return pool["perState"], pool["maxTotal"], parse_go_duration(pool["idleTimeout"])

    # hand-out -------------------------------------------------------------------------------
    def take(self, state_id: str) -> RuntimeHandle | None:
        """A ready runtime of ``state_id`` (still pinned: unpin it once its row exists), or
        None; either way the state counts as used and the pool refills."""
        self.used(state_id)
        with self._changed:
            ready = self._ready.get(state_id) or []
            handle = ready.pop(0)[0] if ready else None
            if handle is None:
                self._starved[state_id] = time.monotonic()
            elif ready:  # more are ready: the client's first queries go first
                self._quiet_until = time.monotonic() + REFILL_PAUSE_S
        if handle and not handle.runtime.alive(
                handle):
            self._discard(handle)
            return None
        return handle

    def used(self, state_id: str) -> None:
        """``state_id`` was handed out: it becomes the most recent state the pool fills."""
        per_state, max_total, _idle = self.settings()
        if per_state and max_total:
            with self._changed:
                self._recent.pop(state_id, None)
                self._recent[state_id] = None
        self._wake.set()

    def instance(self, state: StateRow, ttl_seconds: int | None) -> InstanceRow:
        """A new instance of ``state``: a pooled runtime when one is ready, else a fresh one."""
        with self.handout(state.state_id) as handle:
            if handle is None:
                return self.instances.create(state, ttl_seconds)
            return self.instances.register(handle, state.state_id, None, ttl_seconds,
                                           handle.password or self.instances.set_password(handle))

    @contextlib.contextmanager
    def handout(self, state_id: str, take: bool = True) -> Iterator[RuntimeHandle | None]:
        """The one way a pooled runtime leaves the pool: a ready runtime of ``state_id`` (None
        when none is ready, or without ``take``) for the block, which makes it an instance
        (its row then protects the state). If the block raises, the runtime is discarded;
        either way the pool's own pin on it ends with the block. The state counts as used."""
        handle = self.take(state_id) if take else None
        if handle is None:
            self.used(state_id)
            yield None
            return
        try:
            yield handle
        except BaseException:
            self._discard(handle)
            raise
        finally:
            self.instances.unpin(POOL_PIN + handle.key)

    # upkeep ---------------------------------------------------------------------------------
    def run(self, stopped: threading.Event) -> None:
        """The refill thread: starts runtimes (``FILL_PARALLEL`` at once, each in a thread of
        its own) for the most recent states short of their target."""
        while not stopped.is_set():
            self._wake.clear()
            try:
                self._expire()
                with self._changed:
                    pause = self._quiet_until - time.monotonic()
                if pause > 0:
                    stopped.wait(pause)
                    continue
                state_id = self._next_to_fill()
                if state_id:
                    threading.Thread(target=self._fill, args=(state_id,), daemon=True,
                                     name="warm-pool-fill").start()
                    continue
            except Exception:
                log.exception("warm pool upkeep failed")
            self._wake.wait(1.0)

    def _target(self, state_id: str, per_state: int) -> int:
        """How many ready runtimes ``state_id`` should have (caller holds ``_changed``)."""
        starved = time.monotonic() - self._starved.get(state_id, -math.inf) < STARVED_WINDOW_S
        return per_state * 2 if starved else per_state

    def _next_to_fill(self) -> str | None:
        per_state, max_total, _idle = self.settings()
        with self._changed:
            starting = sum(self._starting.values())
            pooled = sum(map(len, self._ready.values())) + starting
            if starting >= FILL_PARALLEL:
                return None
            for state_id in reversed(self._recent):
                have = len(self._ready.get(state_id, [])) + self._starting.get(state_id, 0)
                if have < self._target(state_id, per_state) and pooled < max_total:
                    self._starting[state_id] = self._starting.get(state_id, 0) + 1
                    return state_id
        return None

    def _fill(self, state_id: str) -> None:
        """Start one runtime of ``state_id`` for the pool; whatever happens (any exception),
        the start is no longer counted and nothing stays pinned for it."""
        handle: RuntimeHandle | None = None
        try:
            handle = self._start_pooled(state_id)
        except Exception as exc:
            log.warning("warm pool: cannot start a runtime of %s: %s", state_id, exc)
        finally:
            with self._changed:
                keep = handle is not None and state_id in self._recent
                if keep and handle:
                    self._ready.setdefault(state_id, []).append((handle, time.monotonic()))
                elif handle is None:  # gone or failing: not filled again until handed out
                    self._recent.pop(state_id, None)
            if handle and not keep:  # drained meanwhile: gone (and unpinned) before drain
                self._discard(handle)  # returns
            with self._changed:
                self._starting[state_id] -= 1
                self._changed.notify_all()
            self._wake.set()  # the refill thread may start the next one

    def _start_pooled(self, state_id: str) -> RuntimeHandle | None:
        """A started runtime of the state (pinned by the pool), or None when the state is
        gone; on any failure nothing is left running or pinned."""
        state = self.store.get_state(state_id)
        if state is None:
            return None
        key = random_hex(16)
        self.instances.pin(POOL_PIN + key, {state.state_dir})
        handle: RuntimeHandle | None = None
        try:
            image, source = self.instances.source_of(state)
            handle = self.instances.new_runtime(key, image, source, state_id)
            handle.serving = True
            pause_point("pool-start")
            self.instances.start(handle)
            # a fresh server's first session loads the catalog caches: the engine's own,
            # not the client's (no client ever connected to a pooled runtime); the same
            # session sets its password ahead of the hand-out
            with self.instances.admin_session(handle) as query:
                query("SELECT count(*) FROM pg_class")
                handle.password = self.instances.set_password(handle, query)
            return handle
        except BaseException:
            if handle is not None:
                self._discard(handle)
            else:
                self.instances.unpin(POOL_PIN + key)
            raise

    def _expire(self) -> None:
        """Stop runtimes idle too long, of states no longer among the most recent, or over
        the limits (the least recent states lose theirs first)."""
        per_state, max_total, idle = self.settings()
        now, surplus = time.monotonic(), []
        with self._changed:
            room = max_total
            for state_id in reversed(list(self._recent)):
                ready = self._ready.get(state_id, [])
                fresh = [e for e in ready if not idle or now - e[1] < idle]
                target = self._target(state_id, per_state)
                keep = fresh[:max(0, min(target, room - self._starting.get(state_id, 0)))]
                surplus += [(state_id, e[0]) for e in ready if e not in keep]
                self._ready[state_id] = keep
                room -= len(keep) + self._starting.get(state_id, 0)
            for state_id in set(self._ready) - set(self._recent):
                surplus += [(state_id, e[0]) for e in self._ready.pop(state_id)]
            for state_id, _handle in surplus:
                self._stopping[state_id] = self._stopping.get(state_id, 0) + 1
        for state_id, handle in surplus:
            self._discard(handle)
            with self._changed:
                self._stopping[state_id] -= 1
                self._changed.notify_all()

    def drain(self, state_ids: set[str], deadline_s: float = 60.0) -> None:
        """Stop the pooled runtimes of ``state_ids`` (and wait for ones starting) so that the
        states can be deleted."""
        with self._changed:
            for state_id in state_ids:
                self._recent.pop(state_id, None)
            handles = [e[0] for s in state_ids for e in self._ready.pop(s, [])]
            self._changed.wait_for(lambda: not any(
                self._starting.get(s) or self._stopping.get(s) for s in state_ids), deadline_s)
        for handle in handles:
            self._discard(handle)

    def close(self) -> None:
        with self._changed:
            everything = set(self._ready) | set(self._recent)
        self.drain(everything)

    def _discard(self, handle: RuntimeHandle) -> None:
        try:
            self.instances.discard(handle)
        except Exception:
            log.exception("warm pool: cannot stop runtime %s", handle.key)
        finally:
            self.instances.unpin(POOL_PIN + handle.key)

    # reporting ------------------------------------------------------------------------------
    def status(self) -> PoolStatus:
        per_state, max_total, idle = self.settings()
        with self._changed:
            states = list(dict.fromkeys([*self._recent, *self._ready, *self._starting]))
            entries = [(s, [e[0] for e in self._ready.get(s, [])], self._starting.get(s, 0))
                       for s in reversed(states)]
        return PoolStatus(per_state=per_state, max_total=max_total,
                          idle_timeout=format_go_duration(idle),
                          entries=[PoolEntry(state_id=s, ready=len(ready), starting=starting,
                                             rss_bytes=sum(tree_rss(h.pid or 0) for h in ready))
                                   for s, ready, starting in entries if ready or starting])

    def states(self) -> set[str]:
        """The states with pooled runtimes, ready or starting."""
        with self._changed:
            return {s for s, ready in self._ready.items() if ready} | {
                s for s, count in self._starting.items() if count}

    def mount_points(self) -> set[str]:
        """Where the ready pooled runtimes' data dirs are mounted."""
        with self._changed:
            return {e[0].data_dir for entries in self._ready.values() for e in entries}

    def disk_bytes(self) -> int:
        """What the pooled runtimes' own writes take on disk (counted in the cache's usage)."""
        with self._changed:
            handles = [e[0] for entries in self._ready.values() for e in entries]
        return sum(map(self.instances.written_bytes, handles))



###############################################################################
# deletion: deletion trees for instances and states, and the TTL reaper;
# nothing is deleted unless the whole tree may be. Owns nothing; may call store, snapshot,
# instances.
###############################################################################


class DeleteNode(TypedDict):
    """One node of a deletion tree, deepest first when carried out."""
    kind: Annotated[str, Doc(enum=["state", "instance", "job"])]
    id: Annotated[str, Doc(pattern="^([0-9a-f]{32}|[0-9a-f]{64})$")]
    connections: NotRequired[Annotated[Count, Doc("Client sessions (instances only).")]]
    runtime_id: NotRequired[str]
    blocked: NotRequired[Annotated[str, Doc(enum=[
        "active_connections", "connections_unknown", "active_tasks", "has_descendants",
        "blocked_by_descendant"])]]
    children: NotRequired[list[DeleteNode]]


class DeleteResult(TypedDict):
    """The answer of every DELETE of an instance, state or job."""
    dry_run: bool
    outcome: Annotated[str, Doc(enum=["deleted", "would_delete", "blocked"])]
    root: DeleteNode


def delete_result(dry_run: bool, root: DeleteNode) -> tuple[int, DeleteResult]:
    blocked = "blocked" in root
    outcome = "blocked" if blocked else ("would_delete" if dry_run else "deleted")
    status = HTTPStatus.CONFLICT if blocked and not dry_run else HTTPStatus.OK
    return status, DeleteResult(dry_run=dry_run, outcome=outcome, root=root)


class DeletionManager:
    """Plans and carries out deletions of instances and states, post-order, all or nothing.

    Nothing global is held across slow work: an instance is deleted under its own lock, and a
    state tree is claimed (``InstanceManager.claim``) so no clone or build can start on it.
    """

    def __init__(self, store: MetadataStore, instances: InstanceManager,
                 pool: WarmPool) -> None:
        self.store = store
        self.instances = instances
        self.pool = pool

    def _instance_node(self, row: InstanceRow, force: bool) -> DeleteNode:
        connections = self.instances.connections(row)
        node: DeleteNode = {"kind": "instance", "id": row.instance_id,
                          "connections": connections or 0}
        if row.runtime_id:
            node["runtime_id"] = row.runtime_id
        if connections is None and not force:
            node["blocked"] = "connections_unknown"
        elif connections and not force:
            node["blocked"] = "active_connections"
        return node

    def _state_node(self, state: StateRow, recurse: bool, force: bool) -> DeleteNode:
        node: DeleteNode = {"kind": "state", "id": state.state_id}
        instances = self.store.list_instances(state=state.state_id)
        children = self.store.list_states(parent=state.state_id)
        if self.instances.pinned(state.state_dir):
            node["blocked"] = "active_tasks"
            return node
        if not recurse:
            if instances or children:
                node["blocked"] = "has_descendants"
            return node
        kids = [self._instance_node(row, force) for row in instances]
        kids += [self._state_node(child, True, force) for child in children]
        if kids:
            node["children"] = kids
        if any("blocked" in kid for kid in kids):
            node["blocked"] = "blocked_by_descendant"
        return node

    def delete_instance(self, instance_id: str, force: bool,
                        dry_run: bool) -> tuple[int, DeleteResult]:
        if not is_instance_id(instance_id):
            raise not_found("instance not found")
        with self.instances.locked(instance_id):
            row = self.store.get_instance(instance_id)
            if row is None:
                raise not_found("instance not found")
            node = self._instance_node(row, force)
            status, result = delete_result(dry_run, node)
            if result["outcome"] == "deleted":
                self.instances.destroy(row)
            return status, result

    def delete_state(self, state_id: str, recurse: bool, force: bool,
                     dry_run: bool) -> tuple[int, DeleteResult]:
        state = self.store.get_state(state_id) if is_state_id(state_id) else None
        if state is None:
            raise not_found("state not found")
        node = self._state_node(state, recurse, force)
        status, result = delete_result(dry_run, node)
        if result["outcome"] != "deleted":
            return status, result
        states = self._states_in(node)
        self.pool.drain({row.state_id for row in states})  # pooled servers go first
        dirs = {row.state_dir for row in states}
        with self.instances.claiming(dirs) as claimed:
            if not claimed:
                node["blocked"] = "active_tasks"
                return delete_result(dry_run, node)
            again = self._state_node(state, recurse, force)  # what changed before the claim
            if "blocked" in again or _tree_ids(again) != _tree_ids(node):
                again.setdefault("blocked", "active_tasks")
                return delete_result(dry_run, again)
            self._carry_out(again, force)
        return status, result

    def _states_in(self, node: DeleteNode) -> list[StateRow]:
        rows = [self.store.get_state(node["id"])] if node["kind"] == "state" else []
        for child in node.get("children", []):
            rows += self._states_in(child)
        return [row for row in rows if row is not None]

    def _carry_out(self, node: DeleteNode, force: bool) -> None:
        for child in node.get("children", []):
            self._carry_out(child, force)
        if node["kind"] == "instance":
            with self.instances.locked(node["id"]):
                row = self.store.get_instance(node["id"])
                if row:
                    self.instances.destroy(row)
            return
        state = self.store.get_state(node["id"])
        if state:
            remove_published(state.state_dir)
            self.store.delete_state(state.state_id)


def _tree_ids(node: DeleteNode) -> set[str]:
    ids = {node["id"]}
    for child in node.get("children", []):
        ids |= _tree_ids(child)
    return ids


class Reaper:
    """Deletes expired instances; one with active connections waits until they end."""

    def __init__(self, store: MetadataStore, deletion: DeletionManager,
                 interval: float = 1.0) -> None:
        self.store = store
        self.deletion = deletion
        self.interval = interval

    def sweep(self) -> list[str]:
        now = format_ts()
        removed = []
        for row in self.store.list_instances():
            if not row.expires_at or row.expires_at >= now:
                continue
            try:
                status, result = self.deletion.delete_instance(row.instance_id, False, False)
            except ApiError as exc:
                log.warning("ttl: cannot remove expired instance %s: %s %s", row.instance_id,
                            exc.message, exc.details or "")
                continue
            if status == HTTPStatus.OK:
                log.info("ttl: removed expired instance %s", row.instance_id)
                removed.append(row.instance_id)
            else:
                log.debug("ttl: expired instance %s waits: %s", row.instance_id,
                         result["root"].get("blocked"))
        return removed

    def run(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.interval):
            try:
                self.sweep()
            except Exception:
                log.exception("ttl reaper failed")



###############################################################################
# cache: status, capacity and eviction of the state cache.
# Owns the cache_evictions table and .evict.lock; may call store, config, snapshot,
# instances, deletion.
###############################################################################

CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_evictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    summary_json TEXT NOT NULL
);
"""
GIB = 1 << 30


Fraction = Annotated[float, Doc(exclusiveMinimum=0, maximum=1)]


class CacheEvictionSummary(TypedDict):
    """What the last eviction run did."""
    completed_at: Timestamp
    trigger: str
    evicted_count: Count
    freed_bytes: Count
    blocked_count: Count
    reclaimable_bytes: Count
    usage_bytes_before: Count
    usage_bytes_after: Count
    free_bytes_before: Count
    free_bytes_after: Count


class CacheStatus(TypedDict):
    """``GET /v1/cache/status``."""
    usage_bytes: Count
    configured_max_bytes: NotRequired[Annotated[Count | None, Doc("Omitted when maxBytes=0.")]]
    effective_max_bytes: int
    reserve_bytes: Count
    high_watermark: Fraction
    low_watermark: Fraction
    min_state_age: Annotated[str, Doc("Go duration, e.g. 10m0s.")]
    store_total_bytes: Count
    store_free_bytes: Count
    state_count: Count
    reclaimable_bytes: Count
    blocked_count: Count
    pressure_reasons: list[Annotated[str, Doc(enum=["usage_above_high_watermark",
                                                      "physical_free_below_reserve"])]]
    last_eviction: NotRequired[CacheEvictionSummary | None]
    snapshot_backend: Annotated[str, Doc(
        "How states are stored: overlay layers (mounted by the engine as root, or by each"
        " server in a user namespace of its own), reflinked or plain copies.",
        enum=["overlay", "overlay-userns", "reflink", "copy"])]
    snapshot_reason: NotRequired[Annotated[str | None, Doc(
        "Why the backend is not overlay layers (a kernel setting, the configuration);"
        " omitted when it is.")]]
    remote_url: NotRequired[Annotated[str | None, Doc(
        "The remote cache's repository (cache.remote.url); omitted when off.")]]
    remote_pushes_pending: NotRequired[Count]
    remote_pushes_failed: NotRequired[Count]


@dataclass
class CacheUsage:
    usage: int
    total: int
    free: int
    reserve: int
    effective_max: int
    high: float
    low: float

    @property
    def reasons(self) -> list[str]:
        reasons = []
        if self.usage > self.effective_max * self.high:
            reasons.append("usage_above_high_watermark")
        if self.free < self.reserve:
            reasons.append("physical_free_below_reserve")
        return reasons


def overlay_lower_dirs(ignored_mounts: Collection[str] = ()) -> set[str]:
    """Directories that some overlay mount (other than those at ``ignored_mounts``) uses as a
    lower layer right now."""
    lowers: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            if " - overlay " not in line or line.split(" ", 5)[4] in ignored_mounts:
                continue
            for option in line.rsplit(" ", 1)[-1].strip().split(","):
                if option.startswith("lowerdir="):
                    lowers.update(option[len("lowerdir="):].split(":"))
    return lowers


class CacheManager:
    """Measures the state cache and evicts unreferenced, childless, old-enough states by last
    use, down to the low watermark, whenever usage or free space crosses its limits."""

    def __init__(self, db: SqlitePool, store: MetadataStore, config: ConfigManager,
                 root: str, instances: InstanceManager, pool: WarmPool,
                 snapshot_backend: tuple[str, str | None] = ("copy", None)) -> None:
        self.db = db
        #: the snapshot backend in use and why it is not overlay layers (for the status)
        self.snapshot_backend = snapshot_backend
        self.pool = pool
        self.store = store
        self.config = config
        self.root = root
        self.instances = instances
        #: one eviction pass at a time in this process (``.evict.lock`` across processes);
        #: taken before InstanceManager's locks
        self._lock = threading.Lock()
        db.migrate(CACHE_SCHEMA)

    def measure(self) -> CacheUsage:
        capacity = self.config.value("cache.capacity")
        fs = os.statvfs(self.root)
        total, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
        reserve = capacity["reserveBytes"]
        if reserve is None:
            reserve = max(total // 10, 10 * GIB)
        effective = total - reserve
        if capacity["maxBytes"]:
            effective = min(effective, capacity["maxBytes"])
        usage = sum(state.size_bytes or 0 for state in self.store.list_states())
        usage += self.pool.disk_bytes()
        return CacheUsage(usage, total, free, reserve, effective, capacity["highWatermark"],
                          capacity["lowWatermark"])

    def _classify(self) -> tuple[list[StateRow], list[StateRow]]:
        """(eviction candidates in eviction order, blocked states)."""
        min_age = parse_go_duration(self.config.value("cache.capacity.minStateAge"))
        oldest_allowed = format_ts(time.time_ns() - int(min_age * 1e9))
        lowers = overlay_lower_dirs(self.pool.mount_points())  # the pool is drained first
        eligible: list[StateRow] = []
        blocked: list[StateRow] = []
        for state in self.store.list_states():
            ok = (state.refcount == 0 and state.children == 0
                  and state.created_at <= oldest_allowed
                  and not {os.path.join(state.state_dir, sub) for sub in ("pgdata", "layer")}
                  & lowers
                  and not self.instances.pinned(state.state_dir))
            (eligible if ok else blocked).append(state)
        eligible.sort(key=lambda s: (s.last_used_at or s.created_at, -(s.size_bytes or 0),
                                     s.state_id))
        return eligible, blocked

    def status(self) -> CacheStatus:
        usage = self.measure()
        eligible, blocked = self._classify()
        capacity = self.config.value("cache.capacity")
        return omit_none(CacheStatus(
            usage_bytes=usage.usage, configured_max_bytes=capacity["maxBytes"] or None,
            effective_max_bytes=usage.effective_max, reserve_bytes=usage.reserve,
            high_watermark=usage.high, low_watermark=usage.low,
            min_state_age=format_go_duration(parse_go_duration(capacity["minStateAge"])),
            store_total_bytes=usage.total, store_free_bytes=usage.free,
            state_count=len(eligible) + len(blocked),
            reclaimable_bytes=sum(s.size_bytes or 0 for s in eligible),
            blocked_count=len(blocked), pressure_reasons=usage.reasons,
            last_eviction=self.last_eviction(), snapshot_backend=self.snapshot_backend[0],
            snapshot_reason=self.snapshot_backend[1],
        ))

    def last_eviction(self) -> CacheEvictionSummary | None:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT summary_json FROM cache_evictions ORDER BY seq DESC LIMIT 1").fetchone()
        return json.loads(row["summary_json"]) if row else None

    def enforce(self, trigger: str, incoming: int = 0, wait: bool = True) -> CacheUsage:
        """Evict while under pressure (counting ``incoming`` bytes about to be added)."""
        try:
            return self._enforce(trigger, incoming, wait)
        except OSError as exc:
            raise JobFailure("cache_enforcement_unavailable", "cannot measure the cache",
                             {"trigger": trigger, "error": str(exc)}) from exc

    def _enforce(self, trigger: str, incoming: int, wait: bool = True) -> CacheUsage:
        """One eviction pass: the warm pool's runtimes first (the cheapest to give back: a
        server, not a build), then unused states by last use, down to the low watermark.
        With ``wait`` false, a pass already running elsewhere is not waited for (its result
        is what this caller would get)."""
        if not self._lock.acquire(blocking=wait):
            usage = self.measure()
            usage.usage += incoming
            return usage
        try:
            with file_lock(os.path.join(self.root, ".evict.lock")):
                return self._evict_down(trigger, incoming)
        finally:
            self._lock.release()

    def _evict_down(self, trigger: str, incoming: int) -> CacheUsage:
        before = self.measure()
        before.usage += incoming
        if not before.reasons:
            return before
        target = before.effective_max * before.low

        def under_target() -> bool:
            current = self.measure()
            current.usage += incoming
            return current.usage <= target and current.free >= current.reserve

        pooled = self.pool.states()
        if pooled:
            held = self.pool.disk_bytes()
            self.pool.drain(pooled)
            log.info("cache pressure: warm pool of %d states stopped (%d bytes)", len(pooled),
                     held)
        eligible, blocked = self._classify()
        evicted = freed = 0
        for state in eligible:
            if under_target():
                break
            if self._evict(state):
                evicted, freed = evicted + 1, freed + (state.size_bytes or 0)
        after = self.measure()
        after.usage += incoming
        self._record(trigger, before, after, evicted, freed, blocked, eligible)
        return after

    def _evict(self, state: StateRow) -> bool:
        """Remove one candidate, unless something started to use it since it was chosen."""
        self.pool.drain({state.state_id})
        with self.instances.claiming({state.state_dir}) as claimed:
            current = self.store.get_state(state.state_id) if claimed else None
            if current is None or current.refcount or current.children:
                return False
            remove_published(current.state_dir)
            self.store.delete_state(current.state_id)
            return True

    def _record(self, trigger: str, before: CacheUsage, after: CacheUsage, evicted: int,
                freed: int, blocked: list[StateRow], eligible: list[StateRow]) -> None:
        summary = CacheEvictionSummary(
            completed_at=format_ts(), trigger=trigger, evicted_count=evicted,
            freed_bytes=freed, blocked_count=len(blocked),
            reclaimable_bytes=sum(s.size_bytes or 0 for s in eligible) - freed,
            usage_bytes_before=before.usage, usage_bytes_after=after.usage,
            free_bytes_before=before.free, free_bytes_after=after.free,
        )
        with self.db.write() as conn:
            conn.execute("INSERT INTO cache_evictions (summary_json) VALUES (?)",
                         (json.dumps(summary),))
            conn.execute("DELETE FROM cache_evictions WHERE seq < (SELECT MAX(seq) - 99 FROM"
                         " cache_evictions)")
        log.info("cache eviction trigger=%s evicted=%d freed=%d", trigger, evicted, freed)

    def before_build(self) -> None:
        """Fail the job early when the cache cannot take another state (without waiting for
        an eviction pass another job runs: the snapshot waits for it)."""
        usage = self.enforce("before_build", wait=False)
        details = {"usage_bytes": usage.usage, "effective_max_bytes": usage.effective_max,
                   "reserve_bytes": usage.reserve, "store_free_bytes": usage.free}
        if usage.effective_max <= 0:
            raise JobFailure("cache_limit_too_small",
                             "cache limit leaves no room for states", details)
        if usage.usage > usage.effective_max:
            raise JobFailure("cache_full_unreclaimable",
                             "cache is full and nothing can be evicted", details)

    def before_snapshot(self, incoming: int) -> None:
        usage = self.enforce("before_snapshot", incoming)
        if usage.usage > usage.effective_max or usage.free < incoming:
            raise JobFailure("cache_limit_too_small", "the new state does not fit in the cache",
                             {"state_bytes": incoming, "usage_bytes": usage.usage - incoming,
                              "effective_max_bytes": usage.effective_max,
                              "store_free_bytes": usage.free})


###############################################################################
# remote: states that travel. An OCI registry as a shared cache (pull on a miss, push after a
# build, in the background) and OCI image layouts as files (export, import) for machines
# without one. Owns the remote_* tables, <store>/remote and the registry sessions; may call
# config, store, snapshot, runtime, instances (pins), cache.
###############################################################################

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"  #: as skopeo copy makes them
OCI_REF_NAME = "org.opencontainers.image.ref.name"
STATE_LABEL = "dev.sqlrs.state"  #: label and annotation prefix of our artifacts
WHITEOUT = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
REMOTE_TIMEOUTS = (5.0, 30.0)  #: connect, read (each socket read) in seconds
MAX_MANIFEST_BYTES = 4 << 20
BLOB_CHUNK = 1 << 20
BLOB_MIN_RATE = 1 << 20  #: bytes a second a blob transfer may not stay below …
BLOB_GRACE_S = 60.0  #: … after this many seconds (a manifest gets this long in all)
MAX_LAYER_MEMBERS = 250_000
MAX_TAR_HEADER = 64 << 10  #: a pax or GNU long-name header larger than this is refused
MAX_BUNDLE_MANIFESTS = 1000
PUSH_MAX_ATTEMPTS = 8
PUSH_BACKOFF_MAX_S = 600.0
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

REMOTE_SCHEMA = """
CREATE TABLE IF NOT EXISTS remote_layers (
    dir TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS remote_pushes (
    state_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    error TEXT
);
"""


class RemoteError(EngineError):
    """A remote that cannot be used. ``refused``: the artifact itself must not get in
    (hostile or broken; 400 when it came in a request); otherwise the registry cannot be
    reached or refuses us (503). A prepare builds the step locally in both cases."""

    def __init__(self, message: str, details: Any = None, refused: bool = False) -> None:
        super().__init__(HTTPStatus.BAD_REQUEST if refused else HTTPStatus.SERVICE_UNAVAILABLE,
                         "remote_refused" if refused else "remote_unavailable", message,
                         details)
        self.refused = refused


def refused(message: str, details: Any = None) -> RemoteError:
    return RemoteError(message, details, refused=True)


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {realm: …, …})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in
              re.findall(r'([A-Za-z_]+)\s*=\s*"([^"]*)"', rest)}
    return scheme.lower(), params


def is_loopback_host(host: str) -> bool:
    """Whether ``HOST[:PORT]`` names this machine (where Docker, too, allows plain HTTP)."""
    name = host[1:host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def remote_credentials(host: str) -> tuple[str, str] | None:
    """Credentials for a registry: ``SQLRS_REMOTE_USERNAME``/``SQLRS_REMOTE_PASSWORD``, else
    Docker's client config (``$DOCKER_CONFIG/config.json``, credential helpers included) as
    ``docker login`` leaves it; None: anonymous."""
    user = os.environ.get("SQLRS_REMOTE_USERNAME")
    password = os.environ.get("SQLRS_REMOTE_PASSWORD")
    if user and password is not None:
        return user, password
    import docker.auth

    try:
        found = docker.auth.load_config().resolve_authconfig(host) or {}
    except Exception as exc:  # a broken config file or helper: anonymous, said in the log
        log.warning("remote: docker client config unusable for %s: %s", host, exc)
        return None
    found = {key.lower(): value for key, value in found.items()}
    if found.get("username") and found.get("password") is not None:
        return str(found["username"]), str(found["password"])
    return None


class _Hashing:
    """A write-only file that hashes and counts what passes through to ``out``."""

    def __init__(self, out: typing.BinaryIO) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class RegistryClient:
    """The few calls of the OCI distribution protocol the remote cache needs, for one
    repository: manifests by tag, blobs by digest, monolithic uploads. Basic auth and the
    registry token flow (``WWW-Authenticate: Bearer``) answer a 401 from the registry itself;
    credentials go only to the registry's own origin (and Basic ones to a token realm only
    over HTTPS or on the registry's host), never into a log or an error. Every call is
    bounded: connect and read timeouts, a whole-call deadline (a blob's grows with its size),
    and at most ``MAX_MANIFEST_BYTES`` read of any body that is not a blob. Any failure to
    talk is a ``RemoteError`` (never refused). Plain HTTP only for loopback registries or with
    ``insecure``."""

    def __init__(self, url: str, insecure: bool) -> None:
        import requests

        self.host, _, self.repository = url.partition("/")
        self._plain = insecure or is_loopback_host(self.host)
        self._session = requests.Session()
        self._credentials: tuple[str, str] | None = None
        self._authorization: str | None = None
        self._base: str | None = None

    def base(self) -> str:
        """``https://host``, or ``http://host`` when plain HTTP is allowed and TLS does not
        answer there."""
        if self._base is None:
            base = f"https://{self.host}"
            if self._plain:
                probe = self._send("GET", f"{base}/v2/", tls_probe=True, allow_redirects=False)
                if probe is None:
                    base = f"http://{self.host}"
                else:
                    probe.close()
            self._base = base
        return self._base

    def _send(self, method: str, url: str, tls_probe: bool = False, **options: Any) -> Any:
        """One streamed, bounded request: the one place the remote cache turns ``requests``'
        errors into ``RemoteError`` (with ``tls_probe``, a TLS failure is None instead)."""
        import requests

        try:
            return self._session.request(method, url, stream=True, timeout=REMOTE_TIMEOUTS,
                                         **options)
        except requests.exceptions.SSLError as exc:
            if tls_probe:
                return None
            raise RemoteError(f"registry {self.host} unreachable", str(exc)) from None
        except requests.RequestException as exc:
            raise RemoteError(f"registry {self.host} unreachable", str(exc)) from None

    def _own(self, url: str) -> bool:
        """Whether ``url`` is on the registry's own origin (scheme, host and port)."""
        ours, theirs = urllib.parse.urlsplit(self.base()), urllib.parse.urlsplit(url)
        return (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc)

    def _call(self, method: str, path: str, ok: Collection[int], *,
              headers: Mapping[str, str] | None = None, data: Any = None,
              missing_ok: bool = False) -> Any:
        """One request, streamed (again once after answering the registry's 401); None for
        a 404 when ``missing_ok``. The caller reads (and closes) the response."""
        url = path if path.startswith(("http://", "https://")) else self.base() + path
        for attempt in (1, 2):
            sent = dict(headers or {})
            if self._authorization and self._own(url):
                sent["Authorization"] = self._authorization
            if hasattr(data, "seek"):
                data.seek(0)
            response = self._send(method, url, headers=sent, data=data)
            if response.status_code == 401 and attempt == 1 and self._own(response.url):
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authenticate(challenge, method)
                continue
            break
        if response.status_code == 404 and missing_ok:
            response.close()
            return None
        if response.status_code not in ok:
            detail = printable(_bounded_body(response, 300).decode("utf-8", "replace"))
            raise RemoteError(f"registry {self.host} answered {response.status_code} to "
                              f"{method} {urllib.parse.urlsplit(url).path}", detail)
        return response

    def _authenticate(self, challenge: str, method: str) -> None:
        self._credentials = remote_credentials(self.host)  # a docker login since counts
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self._credentials:
                raise RemoteError(f"registry {self.host} needs credentials",
                                  "set them with docker login or SQLRS_REMOTE_USERNAME/"
                                  "SQLRS_REMOTE_PASSWORD")
            pair = ":".join(self._credentials).encode()
            self._authorization = "Basic " + base64.b64encode(pair).decode()
            return
        realm = params.get("realm", "")
        if scheme != "bearer" or not realm.startswith(("https://", "http://")):
            raise RemoteError(f"registry {self.host} asks for an unknown authentication",
                              scheme)
        where = urllib.parse.urlsplit(realm)
        trusted = where.scheme == "https" or where.hostname == urllib.parse.urlsplit(
            self.base()).hostname
        actions = "pull" if method in ("GET", "HEAD") else "pull,push"
        query = {"service": params.get("service", ""),
                 "scope": params.get("scope") or f"repository:{self.repository}:{actions}"}
        answer = self._send("GET", realm, params=query, allow_redirects=False,
                            auth=self._credentials if trusted else None)
        try:
            body = _bounded_body(answer, MAX_MANIFEST_BYTES)
            token = json.loads(body).get("token") or json.loads(body).get("access_token") \
                if answer.status_code == 200 else None
        except (ValueError, AttributeError) as exc:
            raise RemoteError(f"registry {self.host}: no token", str(exc)) from None
        if not isinstance(token, str) or not token:
            raise RemoteError(f"registry {self.host} refused a token", answer.status_code)
        self._authorization = f"Bearer {token}"

    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.repository}/{kind}/{ref}"

    def has_manifest(self, tag: str) -> bool:
        response = self._call("HEAD", self._path("manifests", tag), (200,), missing_ok=True,
                              headers={"Accept": OCI_MANIFEST})
        if response is not None:
            response.close()
        return response is not None

    def manifest(self, tag: str) -> bytes | None:
        """The manifest tagged ``tag`` (None: not there), at most MAX_MANIFEST_BYTES."""
        response = self._call("GET", self._path("manifests", tag), (200,), missing_ok=True,
                              headers={"Accept": OCI_MANIFEST})
        if response is None:
            return None
        with _deadline(response, BLOB_GRACE_S, lambda: None):
            body = _bounded_body(response, MAX_MANIFEST_BYTES + 1)
        if len(body) > MAX_MANIFEST_BYTES:
            raise refused("manifest too large")
        return body

    def put_manifest(self, tag: str, body: bytes) -> None:
        self._call("PUT", self._path("manifests", tag), (200, 201),
                   headers={"Content-Type": OCI_MANIFEST}, data=body).close()

    def has_blob(self, digest: str) -> bool:
        response = self._call("HEAD", self._path("blobs", digest), (200,), missing_ok=True)
        if response is not None:
            response.close()
        return response is not None

    def fetch_blob(self, digest: str, size: int, dest: str,
                   check: Callable[[], None] = lambda: None) -> None:
        """Download a blob into ``dest``, refusing one larger than ``size`` or whose content
        does not match ``digest``; slower than BLOB_MIN_RATE (after a minute) is a
        RemoteError, and ``check`` (a cancel) ends it at once."""
        response = self._call("GET", self._path("blobs", digest), (200,))
        with response, open(dest, "wb") as out, _deadline(
                response, BLOB_GRACE_S + size / BLOB_MIN_RATE, check):
            hashing = _Hashing(out)
            try:
                for chunk in response.iter_content(BLOB_CHUNK):
                    if hashing.size + len(chunk) > size:
                        raise refused(f"blob {digest[:19]} is larger than its declared size",
                                      size)
                    hashing.write(chunk)
            except RemoteError:
                raise
            except Exception as exc:  # the connection dropped, or the deadline closed it
                check()
                raise RemoteError(f"registry {self.host}: blob {digest[:19]} not received",
                                  str(exc) or type(exc).__name__) from None
        if hashing.digest != digest or hashing.size != size:
            raise refused(f"blob {digest[:19]} does not match its digest or size",
                          f"got {hashing.digest} ({hashing.size} bytes)")

    def upload_blob(self, digest: str, size: int, source: typing.BinaryIO | bytes) -> None:
        started = self._call("POST", f"/v2/{self.repository}/blobs/uploads/", (202,))
        started.close()
        location = urllib.parse.urljoin(self.base() + "/", started.headers["Location"])
        if not self._own(location):
            raise RemoteError(f"registry {self.host} sends uploads elsewhere", location)
        joiner = "&" if "?" in location else "?"
        self._call("PUT", f"{location}{joiner}digest={digest}", (201,), data=source,
                   headers={"Content-Type": "application/octet-stream",
                            "Content-Length": str(size)}).close()


def _bounded_body(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a streamed response's body; the response is closed."""
    with response:
        return bytes(response.raw.read(limit, decode_content=True) or b"")


def _cut(response: Any) -> None:
    """End a streamed response from another thread: its socket is shut down, so a read
    blocked in it returns at once (closing the response alone does not wake it)."""
    stream = response.raw._fp  # http.client's response (requests and urllib3 keep it there)
    sock = getattr(getattr(getattr(stream, "fp", None), "raw", None), "_sock", None)
    fd = sock.fileno() if isinstance(sock, socket.socket) else -1
    if fd >= 0:  # the reader's file still holds the socket: shut down a duplicate of it
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    response.close()


@contextlib.contextmanager
def _deadline(response: Any, seconds: float, check: Callable[[], None]) -> Iterator[None]:
    """Cut ``response`` (so a read blocked in it fails) after ``seconds`` or once ``check``
    raises (a cancel, the engine stopping)."""
    done = threading.Event()
    ends = time.monotonic() + seconds

    def watch() -> None:
        while not done.wait(0.25):
            try:
                check()
            except BaseException:  # the reader raises it again itself
                _cut(response)
                return
            if time.monotonic() > ends:
                log.warning("remote: a transfer took over %.0f s: cut off", seconds)
                _cut(response)
                return

    watcher = threading.Thread(target=watch, name="remote-deadline", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


# layers ---------------------------------------------------------------------------------
def _opaque(path: str) -> bool:
    """Whether an overlay upper directory hides what lies below it (root's trusted xattr or,
    in a user namespace, the user one)."""
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:  # ENODATA: not set; EPERM: trusted.* is root's to read
            continue
    return False


def write_layer(directory: str, out: typing.BinaryIO | _Hashing) -> None:
    """Write ``directory`` (a full data directory or an overlay upper layer) as an OCI layer:
    an uncompressed tar, sorted, owned by 0:0, no hard links; an overlay whiteout (a 0/0
    character device) becomes ``.wh.NAME``, an opaque directory gets ``.wh..wh..opq``. A link
    or any other special file makes the state non-portable (refused)."""
    with tarfile.open(fileobj=cast(typing.BinaryIO, out), mode="w|",
                      format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = BLOB_CHUNK  # type: ignore[attr-defined]  # (typeshed lacks it)

        def entry(name: str, st: os.stat_result | None = None, kind: bytes = tarfile.REGTYPE
                  ) -> tarfile.TarInfo:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = stat.S_IMODE(st.st_mode) & 0o777 if st else 0o600
            info.mtime = int(st.st_mtime) if st else 0
            return info

        def walk(rel: str) -> None:
            full = os.path.join(directory, rel) if rel else directory
            for name in sorted(os.listdir(full)):
                child = f"{rel}/{name}" if rel else name
                path = os.path.join(full, name)
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    tar.addfile(entry(child, st, tarfile.DIRTYPE))
                    if _opaque(path):
                        tar.addfile(entry(f"{child}/{OPAQUE_WHITEOUT}"))
                    walk(child)
                elif stat.S_ISREG(st.st_mode):
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    with os.fdopen(fd, "rb") as handle:
                        st = os.fstat(fd)
                        info = entry(child, st)
                        info.size = st.st_size
                        tar.addfile(info, handle)
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    tar.addfile(entry(f"{rel}/{WHITEOUT}{name}" if rel else WHITEOUT + name))
                else:
                    raise refused(f"{child} is a link or a special file: the state is not "
                                  "portable")

        walk("")


@dataclass
class LayerScan:
    """A checked layer: the paths it deletes below it, in order, and its files and
    directories (whiteout markers left out)."""
    whiteouts: list[str]
    opaque_dirs: list[str]
    members: list[tarfile.TarInfo]


def check_tar_headers(path: str) -> None:
    """Walk a tar's raw 512-byte headers before ``tarfile`` parses it (it reads a pax or
    long-name header whole into memory and keeps every member): refuse a header over
    MAX_TAR_HEADER, more than MAX_LAYER_MEMBERS members, or a size field that is not one."""
    members = 0
    with open(path, "rb") as handle:
        while len(block := handle.read(512)) == 512 and block.strip(b"\0"):
            field = block[124:136]
            try:
                size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else \
                    int(field.strip(b"\0 ") or b"0", 8)
            except ValueError:
                raise refused("a layer has a malformed tar header") from None
            if block[156:157] in (b"x", b"g", b"L", b"K") and size > MAX_TAR_HEADER:
                raise refused("a layer has an oversized tar header", size)
            members += 1
            if members > 2 * MAX_LAYER_MEMBERS:  # a pax header and its member count twice
                raise refused("a layer has too many members")
            handle.seek((size + 511) // 512 * 512, os.SEEK_CUR)


def scan_layer(path: str) -> LayerScan:
    """Check every member header of a downloaded layer before a byte of it is unpacked:
    refused are absolute or ``..`` paths, links of any kind, devices and FIFOs, set-id or
    sticky bits, sparse members, names tar would treat specially."""
    check_tar_headers(path)
    whiteouts: list[str] = []
    opaque_dirs: list[str] = []
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = member.name
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name or "\0" in name:
                    raise refused(f"layer member {name!r}: path outside the state")
                if any(part.startswith(WHITEOUT) for part in parts[:-1]):
                    raise refused(f"layer member {name!r}: a whiteout is not a directory")
                if member.issym() or member.islnk():
                    raise refused(f"layer member {name!r}: links are not accepted",
                                  member.linkname)
                if member.issparse() or not (member.isfile() or member.isdir()):
                    raise refused(f"layer member {name!r}: not a plain file or directory")
                if member.mode & 0o7000:
                    raise refused(f"layer member {name!r}: set-id or sticky bit")
                base = parts[-1]
                if base == OPAQUE_WHITEOUT:
                    opaque_dirs.append("/".join(parts[:-1]))
                elif base.startswith(WHITEOUT):
                    target = base[len(WHITEOUT):]
                    if target in ("", ".", ".."):
                        raise refused(f"layer member {name!r}: invalid whiteout")
                    whiteouts.append("/".join([*parts[:-1], target]))
                elif name.rstrip("/") not in ("", "."):
                    members.append(member)
    except tarfile.TarError as exc:
        raise refused("a layer is not a valid tar", str(exc)) from None
    return LayerScan(whiteouts, opaque_dirs, members)


def _inside(root: str, rel: str) -> str:
    """``root/rel`` after checking no existing component of it is a link (so a deletion
    never leaves ``root``)."""
    path = root
    for part in [p for p in rel.split("/") if p not in ("", ".")]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise refused(f"{rel}: a link in the way")
    return path


def remove_path(path: str) -> None:
    """Remove a file, link or directory tree (nothing when it is not there)."""
    if os.path.isdir(path) and not os.path.islink(path):
        remove_tree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(blob: str, scan: LayerScan, target: str,
                owner: tuple[int, int] | None = None) -> None:
    """Lay a checked layer over the full data directory ``target`` the OCI way: opaque
    directories are emptied and whiteouts deleted first, then the files are unpacked (modes
    and times kept, owner 0 until ``chown_tree``) by the same parser that checked them."""
    for rel in scan.opaque_dirs:
        directory = _inside(target, rel)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                remove_path(os.path.join(directory, name))
    for rel in scan.whiteouts:
        remove_path(_inside(target, rel))
    unpack_files(blob, scan, target, owner)


def unpack_files(blob: str, scan: LayerScan, target: str,
                 owner: tuple[int, int] | None = None) -> None:
    """Unpack a checked layer's files and directories (``scan.members``) into ``target``,
    owned by ``owner`` (else by the engine), modes kept, times not (Postgres
    never reads them). A file's bytes are copied in the kernel from the layer
    (``copy_file_range``); nothing is opened through a link; a directory's mode is set last,
    so a read-only one is still filled."""
    owner = owner if owner and owner != (os.geteuid(), os.getegid()) else None
    directories: list[tuple[str, int]] = []
    with open(blob, "rb") as source:
        for member in scan.members:
            name = member.name.rstrip("/")
            path = os.path.join(target, name)
            _make_parents(target, name, owner)
            if member.isdir():
                if not os.path.isdir(path) or os.path.islink(path):
                    remove_path(path)
                    os.mkdir(path, 0o700)
                directories.append((path, member.mode & 0o777))
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                raise refused(f"layer member {name!r}: a file where a directory is")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                _copy_range(source.fileno(), fd, member.offset_data, member.size)
                os.fchmod(fd, member.mode & 0o777)
                if owner:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
    for path, mode in reversed(directories):
        os.chmod(path, mode, follow_symlinks=False)
        if owner:
            os.lchown(path, *owner)


def _make_parents(target: str, name: str, owner: tuple[int, int] | None) -> None:
    """Make the directories above ``target/name`` that a layer did not list (0700, owned by
    ``owner``)."""
    if os.path.isdir(os.path.dirname(os.path.join(target, name))):
        return
    parts = name.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        path = os.path.join(target, *parts[:depth])
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
            if owner:
                os.lchown(path, *owner)


def _copy_range(source: int, dest: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes at ``offset`` of ``source`` to ``dest`` in the kernel."""
    done = 0
    while done < size:
        try:
            copied = os.copy_file_range(source, dest, size - done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = os.write(dest, os.pread(source, min(size - done, BLOB_CHUNK),
                                             offset + done))
        if copied == 0:
            raise refused("a layer ends inside a member")
        done += copied


def chown_tree(root: str, owner: tuple[int, int]) -> None:
    """Give a tree the engine unpacked to the server's user (as root: nothing in it is the
    server user's yet, so no link can be planted in it)."""
    if owner == (os.geteuid(), os.getegid()):
        return
    os.lchown(root, *owner)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(parent, name), *owner)


# artifacts ------------------------------------------------------------------------------
@dataclass
class ChainEntry:
    """One state of an artifact's chain, as its config records it."""
    state_id: str
    parent_state_id: str | None
    prepare_kind: str
    prepare_args_normalized: str
    created_at: str

    @classmethod
    def of(cls, row: StateRow) -> ChainEntry:
        return cls(row.state_id, row.parent_state_id, row.prepare_kind,
                   row.prepare_args_normalized, row.created_at)


@dataclass
class Artifact:
    """A state as an OCI artifact: its chain bottom first (None: the image's base cluster),
    one layer per entry, and the resolved image it runs on."""
    image_id: str
    chain: list[ChainEntry | None]
    layers: list[tuple[str, int]]  #: (digest, size) per chain entry
    #: each layer's uncompressed digest (the config's ``rootfs.diff_ids``); empty: the
    #: layers are not compressed
    diff_ids: list[str] = field(default_factory=list)

    def gzipped(self, index: int) -> bool:
        return bool(self.diff_ids) and self.diff_ids[index] != self.layers[index][0]

    @property
    def state_id(self) -> str:
        top = self.chain[-1]
        assert top is not None
        return top.state_id

    def config(self, engine_version: str) -> bytes:
        top = self.chain[-1]
        assert top is not None
        labels = {
            f"{STATE_LABEL}.id": top.state_id, f"{STATE_LABEL}.parent": top.parent_state_id or "",
            f"{STATE_LABEL}.image": self.image_id, f"{STATE_LABEL}.kind": top.prepare_kind,
            f"{STATE_LABEL}.args": top.prepare_args_normalized,
            f"{STATE_LABEL}.size": str(sum(size for _, size in self.layers)),
            "dev.sqlrs.engine.version": engine_version,
            f"{STATE_LABEL}.chain": json.dumps(
                [dataclasses.asdict(entry) if entry else None for entry in self.chain]),
        }
        machine = os.uname().machine
        return _canonical_json({
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine),
            "os": "linux", "created": top.created_at, "config": {"Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": [digest for digest, _ in self.layers]},
        })

    def manifest(self, config: bytes) -> bytes:
        return _canonical_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest, "size": size,
                        **({"annotations": {f"{STATE_LABEL}.id": entry.state_id}}
                           if entry else {})}
                       for entry, (digest, size) in zip(self.chain, self.layers, strict=True)],
            "annotations": {f"{STATE_LABEL}.id": self.state_id},
        })

    def sub(self, depth: int) -> Artifact:
        """The artifact of the chain's state at ``depth`` (its own ancestors only)."""
        return Artifact(self.image_id, self.chain[:depth + 1], self.layers[:depth + 1])


def gunzip_layer(path: str, diff_id: str, limit: int) -> str:
    """Decompress a gzipped layer next to itself (removed), refusing one that expands past
    ``limit`` bytes or whose content is not ``diff_id``; the uncompressed file's path."""
    out_path = f"{path}.tar"
    try:
        with gzip.open(path, "rb") as packed, open(out_path, "wb") as out:
            hashing = _Hashing(out)
            while chunk := packed.read(BLOB_CHUNK):
                if hashing.size + len(chunk) > limit:
                    raise refused("a compressed layer expands past what the store can take",
                                  limit)
                hashing.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        raise refused("a compressed layer does not decompress", str(exc)) from None
    finally:
        os.unlink(path)
    if hashing.digest != diff_id:
        raise refused("a compressed layer is not what its config says", hashing.digest)
    return out_path


def _json_object(data: bytes, what: str) -> JsonDict:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise refused(f"{what} is not JSON", str(exc)) from None
    if not isinstance(value, dict):
        raise refused(f"{what} is not a JSON object")
    return value


def parse_manifest(data: bytes) -> tuple[tuple[str, int], list[tuple[str, int]], list[bool]]:
    """A manifest's config descriptor, layer descriptors and which layers are gzipped,
    checked for shape."""
    manifest = _json_object(data, "the manifest")

    def descriptor(value: Any, *media: str) -> tuple[str, int]:
        if not isinstance(value, dict) or value.get("mediaType") not in media:
            raise refused(f"the manifest has a descriptor that is not {' or '.join(media)}")
        digest, size = value.get("digest"), value.get("size")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest) \
                or type(size) is not int or size < 0:
            raise refused("the manifest has an invalid digest or size")
        return digest, size

    if manifest.get("schemaVersion") != 2 or not isinstance(manifest.get("layers"), list) \
            or not manifest["layers"]:
        raise refused("not an OCI image manifest with layers")
    config = descriptor(manifest.get("config"), OCI_CONFIG)
    if config[1] > MAX_MANIFEST_BYTES:
        raise refused("the config is too large", config[1])
    layers = [descriptor(layer, OCI_LAYER, OCI_LAYER_GZIP) for layer in manifest["layers"]]
    return config, layers, [layer.get("mediaType") == OCI_LAYER_GZIP
                            for layer in manifest["layers"]]


def parse_artifact(config_data: bytes, layers: list[tuple[str, int]], gzipped: list[bool],
                   expect_state: str | None, expect_image: str | None) -> Artifact:
    """Check an artifact's config against its layers and what the caller looks for: the
    state it must be, the image it must run on, a chain whose parents follow each other. A
    gzipped layer's uncompressed digest is checked when it is unpacked."""
    config = _json_object(config_data, "the config")
    labels = (config.get("config") or {}).get("Labels") or {}
    if not isinstance(labels, dict):
        raise refused("the config has no labels")
    image = labels.get(f"{STATE_LABEL}.image")
    if not isinstance(image, str) or not image:
        raise refused("the config names no image")
    if expect_image is not None and image != expect_image:
        raise refused("the artifact is for another image", image)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or any(
            not isinstance(diff_id, str) or not DIGEST_RE.fullmatch(diff_id)
            or (not packed and diff_id != digest)
            for diff_id, (digest, _), packed in zip(diff_ids, layers, gzipped, strict=True)):
        raise refused("the config's layers are not the manifest's")
    try:
        raw = json.loads(labels.get(f"{STATE_LABEL}.chain", ""))
        chain = [ChainEntry(**entry) if entry is not None else None for entry in raw]
    except (ValueError, TypeError) as exc:
        raise refused("the config's chain is invalid", str(exc)) from None
    if len(chain) != len(layers) or chain[-1] is None:
        raise refused("the config's chain does not match its layers")
    for index, entry in enumerate(chain):
        below = chain[index - 1] if index else None
        if entry is None:
            if index:
                raise refused("a base layer above the bottom")
            continue
        if not all(isinstance(value, str) for value in (
                entry.state_id, entry.prepare_kind, entry.prepare_args_normalized,
                entry.created_at)) or not is_state_id(entry.state_id) \
                or entry.prepare_kind not in STATE_KINDS:
            raise refused("the config's chain has an invalid state")
        if entry.parent_state_id is not None and not (
                isinstance(entry.parent_state_id, str) and is_state_id(entry.parent_state_id)):
            raise refused("the config's chain has an invalid parent")
        if index and (below.state_id if below else None) != entry.parent_state_id:
            raise refused("the config's chain is not a chain of parents")
    artifact = Artifact(image, chain, layers, diff_ids if any(gzipped) else [])
    if expect_state is not None and artifact.state_id != expect_state:
        raise refused("the artifact is another state", artifact.state_id)
    return artifact


@dataclass
class PushStatus:
    status: str
    error: str | None


class RemoteCache:
    """Shares states through an OCI registry (``cache.remote.*``, read at every use, so a
    change applies at once) and through OCI image layouts as files.

    - ``pull``: on a prepare's miss, the deepest of its missing steps the registry has comes
      down with its chain, every blob checked (digest, size, member headers) before a byte of
      it is unpacked; each missing state of the chain is published flat (layers applied in
      order, the OCI way), atomically, with its row (origin ``pulled``). Any failure leaves
      nothing published and the step is built locally.
    - ``push``: states queue in ``remote_pushes`` (SQLite: a restart resumes them) and one
      background thread pushes them, blobs the registry lacks first, then the manifest tagged
      with the state id; failures retry with backoff and never touch a prepare.
    - ``export``/``import_bundle``: the same artifacts in an OCI image layout (a tar).

    A layer's digest is memoised per directory (``remote_layers``: a state's layer is
    immutable), so a chain's shared layers are packed once.
    """

    def __init__(self, config: ConfigManager, store: MetadataStore, db: SqlitePool,
                 layout: StoreLayout, runtimes: Runtimes, snapshots: SnapshotManager,
                 instances: InstanceManager, cache: CacheManager, engine_version: str) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.layout = layout
        self.runtimes = runtimes
        self.snapshots = snapshots
        self.instances = instances
        self.cache = cache
        self.engine_version = engine_version
        self.work_root = os.path.join(layout.root, "remote")
        db.migrate(REMOTE_SCHEMA)
        #: wakes the push thread when a state is queued
        self._wake = threading.Event()
        #: guards ``_clients`` (one registry session per url and insecure setting)
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, bool], RegistryClient] = {}

    # settings -------------------------------------------------------------------------------
    def client(self, purpose: str) -> RegistryClient | None:
        """The registry to ``pull`` from or ``push`` to; None when that is off."""
        settings = self.config.value("cache.remote")
        if not settings["url"] or not settings[purpose]:
            return None
        key = (settings["url"], bool(settings["insecure"]))
        with self._lock:
            if key not in self._clients:
                self._clients[key] = RegistryClient(*key)
            return self._clients[key]

    def room(self) -> int:
        """Bytes the store could take now (an upload larger than this is refused at once)."""
        limit = self.config.value("cache.capacity.maxBytes") or MAX_CONFIG_INT
        return min(shutil.disk_usage(self.layout.root).free, limit)

    def _work_dir(self) -> str:
        path = os.path.join(self.work_root, f"tmp-{random_hex(6)}")
        os.makedirs(path, mode=0o700)
        return path

    def sweep(self) -> None:
        """Remove what interrupted pulls, pushes and imports left (start-up)."""
        if os.path.isdir(self.work_root):
            for name in os.listdir(self.work_root):
                remove_tree(os.path.join(self.work_root, name))

    # pull -----------------------------------------------------------------------------------
    def lookup(self, state_ids: Sequence[str]) -> str | None:
        """The deepest of ``state_ids`` (in chain order) the registry has; None when pull is
        off or it has none (RemoteError when it cannot be asked)."""
        client = self.client("pull")
        if client is None:
            return None
        for state_id in reversed(state_ids):
            if client.has_manifest(state_id):
                return state_id
        return None

    def pull(self, image: ResolvedImage, state_ids: Sequence[str],
             note: Callable[[str], None], held: Collection[str] = (),
             check: Callable[[], None] = lambda: None) -> bool:
        """Bring the deepest of ``state_ids`` the registry has, with its missing ancestors
        (the build locks of ``held`` are the caller's); False (said through ``note``) when
        nothing came: pull off, not there, registry unusable, or the artifact refused."""
        if self.client("pull") is None:
            return False
        try:
            found = self.lookup(state_ids)
            if found is None:
                return False
            client = self.client("pull")
            assert client is not None
            started = time.monotonic()
            manifest = client.manifest(found)
            if manifest is None:
                return False
            config_ref, layers, gzipped = parse_manifest(manifest)
            work = self._work_dir()
            try:
                config_path = os.path.join(work, "config")
                client.fetch_blob(*config_ref, config_path)
                with open(config_path, "rb") as handle:
                    artifact = parse_artifact(handle.read(), layers, gzipped, found,
                                              image.resolved_id)
                size = sum(size for _, size in layers)
                note(f"remote: pull {found} {size / 1e6:.1f} MB from {client.host}")

                def fetch(index: int) -> str:
                    check()  # a cancel or an engine stop ends the pull
                    path = os.path.join(work, f"layer-{index}")
                    client.fetch_blob(*artifact.layers[index], path, check)
                    pause_point("remote-pull-blob")
                    return path

                published = self._materialize(image, artifact, fetch, "pulled", work, held)
            finally:
                remove_tree(work)
        except RemoteError as exc:
            what = f"refused {state_ids[-1]}" if exc.refused else "unavailable"
            note(f"remote: {what}: {exc.message}"
                 + (f" ({exc.details})" if exc.details not in (None, "") else "")
                 + ": building locally")
            log.warning("remote: %s: %s %s", what, exc.message, exc.details or "")
            return False
        except (EngineStopping, JobCancelled):
            raise
        except Exception as exc:  # a full disk, a bug: the step is still built here
            log.exception("remote: pull failed")
            note(f"remote: pull failed: {exc}: building locally")
            return False
        elapsed = max(time.monotonic() - started, 1e-6)
        note(f"remote: pull {found} {size / 1e6:.1f} MB … done in {elapsed:.2f} s "
             f"({size / 1e6 / elapsed:.0f} MB/s; {len(published)} state(s) published)")
        return True

    def _materialize(self, image: ResolvedImage, artifact: Artifact,
                     fetch: Callable[[int], str], origin: str, work: str,
                     held: Collection[str] = ()) -> list[str]:
        """Publish every state of ``artifact``'s chain that is not here: its layers are laid
        one over the other in a work directory, and each missing state is published flat
        from it when its layer is in. Returns the ids published."""
        missing = [index for index, entry in enumerate(artifact.chain)
                   if entry and not self._ready(entry.state_id)]
        if not missing:
            return []
        declared = sum(size for _, size in artifact.layers[:missing[-1] + 1])
        bound = self.room()
        if declared > bound:  # checked before eviction makes room for a claim
            raise refused("the artifact is larger than the store could ever take",
                          f"{declared} bytes declared; {bound} free or allowed")
        self.cache.before_snapshot(declared)
        pgdata = os.path.join(work, "pgdata")
        os.makedirs(pgdata, mode=0o700)
        published = []
        layered = self._can_stack(image, artifact, missing)
        below: str | None = None  #: what the state this pull published last mounts (layered)
        for index in range(missing[-1] + 1):
            blob = fetch(index)
            if artifact.gzipped(index):
                blob = gunzip_layer(blob, artifact.diff_ids[index], bound)
            scan = scan_layer(blob)
            entry = artifact.chain[index]
            if below is not None:
                assert entry is not None
                below = self._publish_stacked(image, artifact.image_id, entry, blob, scan,
                                              below, origin, entry.state_id in held)
                os.unlink(blob)
                if below is None:  # built here meanwhile: what lies above it is built here
                    break
                published.append(entry.state_id)
                continue
            apply_layer(blob, scan, pgdata, image.owner)
            os.unlink(blob)
            if entry is None or index not in missing:
                continue
            os.chmod(pgdata, 0o700)
            if image.owner != (os.geteuid(), os.getegid()):
                os.lchown(pgdata, *image.owner)
            if self._publish(image, artifact.image_id, entry, pgdata,
                             index == missing[-1] or layered, origin, entry.state_id in held):
                published.append(entry.state_id)
                if layered:
                    below = self.snapshots.source_of(
                        self.layout.state_dir(image, entry.state_id))
            else:
                layered = False  # the work directory is still whole: go on flat
        return published

    def _can_stack(self, image: ResolvedImage, artifact: Artifact, missing: list[int]) -> bool:
        """Whether the missing states after the first can be published as layers on it: root's
        overlay, missing states one after the other up to the top, and a stack of lower
        layers that fits one mount."""
        if not self.snapshots.stacks_layers or missing != list(range(missing[0],
                                                                     missing[-1] + 1)):
            return False
        paths = [self.layout.state_dir(image, entry.state_id) for entry in
                 artifact.chain[missing[0]:] if entry]
        return sum(len(path) + len("/layer:") for path in paths) <= MAX_LOWER_CHARS

    def _publish_stacked(self, image: ResolvedImage, image_id: str, entry: ChainEntry,
                         blob: str, scan: LayerScan, lowers: str, origin: str,
                         held: bool) -> str | None:
        """Publish one state as its layer over ``lowers`` (the pulled state below it); what
        it mounts, or None when it is here already or being built (that build wins)."""
        def make(layer: str, whiteout: Callable[[str], None],
                 opaque: Callable[[str], None]) -> None:
            unpack_files(blob, scan, layer, image.owner)
            for rel in scan.opaque_dirs:
                opaque(_inside(layer, rel))
            for rel in scan.whiteouts:
                if os.path.lexists(_inside(layer, rel)):
                    raise refused(f"layer member {rel!r} is both deleted and written")
                whiteout(_inside(layer, rel))
            chown_tree(layer, image.owner)

        final_dir = self.layout.state_dir(image, entry.state_id)

        def publish() -> int:
            return self.snapshots.publish_upper(final_dir, lowers, make, flush=False)

        return self.snapshots.source_of(final_dir) if self._publish(
            image, image_id, entry, publish, False, origin, held) else None

    def _ready(self, state_id: str) -> bool:
        row = self.store.get_state(state_id)
        return bool(row and is_published(row.state_dir))

    def _publish(self, image: ResolvedImage, image_id: str, entry: ChainEntry,
                 pgdata: str | Callable[[], int], move: bool, origin: str, held: bool) -> bool:
        """Publish one state from the work directory (``move``: moved, not copied) or by a
        function of its own, under its build lock (``held``: the caller's), with its row;
        False when it is here already or being built (that build wins)."""
        final_dir = self.layout.state_dir(image, entry.state_id)
        lock = os.path.join(self.layout.states_dir(image), ".build", f"{entry.state_id}.lock")
        with contextlib.nullcontext(True) if held else try_file_lock(lock) as locked:
            if not locked or self._ready(entry.state_id):
                return False
            remove_tree(final_dir)
            try:  # flushed in the background, recorded until then (as a snapshot is)
                size = pgdata() if callable(pgdata) else self.snapshots.publish_tree(
                    pgdata, final_dir, move=move, flush=False)
                row = StateRow(
                    state_id=entry.state_id, parent_state_id=entry.parent_state_id,
                    image_id=image_id, prepare_kind=entry.prepare_kind,
                    prepare_args_normalized=entry.prepare_args_normalized,
                    created_at=format_ts(), size_bytes=size, last_used_at=None, use_count=0,
                    state_dir=final_dir, origin=origin, unflushed_boot=boot_id())
                self.store.insert_state(row)
            except BaseException:
                remove_tree(final_dir)
                raise
        in_background("flush-pulled", self.instances.flush_state, row)
        return True

    # artifacts of local states --------------------------------------------------------------
    def _chain(self, row: StateRow) -> list[tuple[str, ChainEntry | None]]:
        """A state's layers on disk, bottom first, each with the state it belongs to (None:
        the image's base cluster)."""
        by_dir = {state.state_dir: state for state in self.store.list_states(image=row.image_id)}
        chain: list[tuple[str, ChainEntry | None]] = []
        for directory in reversed(self.snapshots.source_of(row.state_dir).split(":")):
            owner = by_dir.get(os.path.dirname(directory))
            chain.append((directory, ChainEntry.of(owner) if owner else None))
        return chain

    def _layer(self, directory: str, work: str) -> tuple[str, int, str | None]:
        """A layer's (digest, size) and, when it had to be packed now, the packed file."""
        st = os.stat(directory)
        identity = f"{st.st_ino}:{st.st_ctime_ns}"
        with self.db.read() as conn:
            known = conn.execute("SELECT digest, size FROM remote_layers WHERE dir = ? AND"
                                 " identity = ?", (directory, identity)).fetchone()
        if known:
            return known["digest"], known["size"], None
        path = os.path.join(work, f"layer-{random_hex(4)}")
        with open(path, "wb") as out:
            hashing = _Hashing(out)
            write_layer(directory, hashing)
        with self.db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO remote_layers (dir, identity, digest, size)"
                         " VALUES (?,?,?,?)", (directory, identity, hashing.digest,
                                               hashing.size))
        return hashing.digest, hashing.size, path

    def _pack(self, row: StateRow, work: str, packed: dict[str, str] | None = None
              ) -> tuple[Artifact, list[str]]:
        """The artifact of a local state and its layers' directories (packed files of the
        layers packed now go into ``packed``, by digest)."""
        chain = self._chain(row)
        layers = []
        for directory, _entry in chain:
            digest, size, path = self._layer(directory, work)
            if path and packed is not None:
                packed[digest] = path
            elif path:
                os.unlink(path)
            layers.append((digest, size))
        return (Artifact(row.image_id, [entry for _, entry in chain], layers),
                [directory for directory, _ in chain])

    def _packed(self, directory: str, digest: str, work: str,
                packed: dict[str, str]) -> str:
        """The packed file of a layer (packing it again when needed: the same bytes)."""
        if digest not in packed:
            path = os.path.join(work, f"layer-{random_hex(4)}")
            with open(path, "wb") as out:
                hashing = _Hashing(out)
                write_layer(directory, hashing)
            if hashing.digest != digest:
                raise internal_error(f"layer {directory} changed since it was packed")
            packed[digest] = path
        return packed[digest]

    # push -----------------------------------------------------------------------------------
    def queue_push(self, state_id: str) -> None:
        """Push ``state_id`` in the background when push is on (nothing waits for it)."""
        if self.client("push") is None:
            return
        with self.db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO remote_pushes (state_id, status, attempts,"
                         " next_at, error) VALUES (?, 'pending', 0, 0, NULL)", (state_id,))
        self._wake.set()

    def push_status(self, state_id: str) -> PushStatus | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT status, error FROM remote_pushes WHERE state_id = ?",
                               (state_id,)).fetchone()
        return PushStatus(row["status"], row["error"]) if row else None

    def counts(self) -> dict[str, int]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT status, COUNT(*) AS n FROM remote_pushes"
                                " GROUP BY status").fetchall()
        return {row["status"]: row["n"] for row in rows}

    def run_pushes(self, stopped: threading.Event) -> None:
        """The push thread: pushes due states one at a time until ``stopped``."""
        while not stopped.is_set():
            self._wake.clear()
            with self.db.read() as conn:
                due = conn.execute("SELECT state_id, attempts FROM remote_pushes WHERE"
                                   " status = 'pending' ORDER BY next_at LIMIT 1").fetchone()
                wait = conn.execute("SELECT MIN(next_at) AS at FROM remote_pushes WHERE"
                                    " status = 'pending'").fetchone()["at"]
            if due is None or wait > time.time():
                self._wake.wait(60.0 if wait is None else max(0.05, wait - time.time()))
                continue
            self._push_one(due["state_id"], due["attempts"], stopped)

    def _push_one(self, state_id: str, attempts: int, stopped: threading.Event) -> None:
        row = self.store.get_state(state_id)
        client = self.client("push")
        if row is None or client is None:
            with self.db.write() as conn:
                conn.execute("DELETE FROM remote_pushes WHERE state_id = ?", (state_id,))
            return
        try:
            with self.instances.holding(f"push-{state_id}", {row.state_dir}):
                self.push(row, client)
        except Exception as exc:
            message = exc.message if isinstance(exc, EngineError) else str(exc)
            if not isinstance(exc, (RemoteError, OSError)):
                log.exception("remote: push of %s crashed", state_id)
            attempts += 1
            failed = attempts >= PUSH_MAX_ATTEMPTS
            log.warning("remote: push of %s failed (attempt %d): %s", state_id, attempts,
                        message)
            with self.db.write() as conn:
                conn.execute("UPDATE remote_pushes SET status = ?, attempts = ?, next_at = ?,"
                             " error = ? WHERE state_id = ?",
                             ("failed" if failed else "pending", attempts,
                              time.time() + min(PUSH_BACKOFF_MAX_S, 2.0 ** attempts),
                              message[:500], state_id))
            return
        with self.db.write() as conn:
            conn.execute("UPDATE remote_pushes SET status = 'pushed', error = NULL WHERE"
                         " state_id = ?", (state_id,))
        log.info("remote: pushed %s to %s/%s", state_id, client.host, client.repository)

    def push(self, row: StateRow, client: RegistryClient) -> None:
        """Push one state: the blobs the registry lacks, its config, then its manifest."""
        work = self._work_dir()
        try:
            packed: dict[str, str] = {}
            artifact, directories = self._pack(row, work, packed)
            for directory, (digest, size) in zip(directories, artifact.layers, strict=True):
                if not client.has_blob(digest):
                    with open(self._packed(directory, digest, work, packed), "rb") as blob:
                        client.upload_blob(digest, size, blob)
            config = artifact.config(self.engine_version)
            if not client.has_blob(sha256_digest(config)):
                client.upload_blob(sha256_digest(config), len(config), config)
            pause_point("remote-push-manifest")
            client.put_manifest(row.state_id, artifact.manifest(config))
        finally:
            remove_tree(work)

    # bundles --------------------------------------------------------------------------------
    def export(self, row: StateRow) -> tuple[str, Callable[[], None]]:
        """An OCI image layout holding ``row`` and its ancestors (a manifest each, named by
        its state id) as a tar file, and how to remove it once sent."""
        work = self._work_dir()
        try:
            with self.instances.holding(f"export-{random_hex(4)}", {row.state_dir}):
                bundle = self._write_bundle(row, work)
        except BaseException:
            remove_tree(work)
            raise
        return bundle, partial(remove_tree, work)

    def _write_bundle(self, row: StateRow, work: str) -> str:
        """The tar of ``export`` written in ``work``; its path."""
        packed: dict[str, str] = {}
        artifact, directories = self._pack(row, work, packed)
        blobs = os.path.join(work, "layout", "blobs", "sha256")
        os.makedirs(blobs, mode=0o700)
        for directory, (digest, _size) in zip(directories, artifact.layers, strict=True):
            os.rename(self._packed(directory, digest, work, packed),
                      os.path.join(blobs, digest.split(":")[1]))
        manifests = []
        for depth, entry in enumerate(artifact.chain):
            if entry is None:
                continue
            part = artifact.sub(depth)
            config = part.config(self.engine_version)
            manifest = part.manifest(config)
            for data in (config, manifest):
                atomic_write(os.path.join(blobs, sha256_digest(data).split(":")[1]), data,
                             0o600, durable=False)
            manifests.append({"mediaType": OCI_MANIFEST, "digest": sha256_digest(manifest),
                              "size": len(manifest),
                              "annotations": {OCI_REF_NAME: entry.state_id}})
        layout = os.path.join(work, "layout")
        atomic_write(os.path.join(layout, "oci-layout"),
                     _canonical_json({"imageLayoutVersion": "1.0.0"}), 0o600, durable=False)
        atomic_write(os.path.join(layout, "index.json"), _canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
            0o600, durable=False)
        bundle = os.path.join(work, "bundle.tar")
        with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = BLOB_CHUNK  # type: ignore[attr-defined]  # (typeshed lacks it)
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(os.path.join(layout, name), name, filter=_anonymous)
        remove_tree(layout)
        return bundle

    def import_bundle(self, source: Callable[[typing.BinaryIO], int]
                      ) -> tuple[list[str], list[str]]:
        """Take an OCI image layout tar (written by ``source`` into a file here) and publish
        the states it holds that are not here; (imported, present)."""
        work = self._work_dir()
        try:
            bundle = os.path.join(work, "bundle.tar")
            with open(bundle, "wb") as out:
                source(out)
            blobs = self._unpack_bundle(bundle, os.path.join(work, "blobs"))
            os.unlink(bundle)
            index = _json_object(_read_blob(blobs, *_index_entry(work)), "index.json")
            entries = index.get("manifests")
            if not isinstance(entries, list) or len(entries) > MAX_BUNDLE_MANIFESTS:
                raise refused("index.json lists no manifests, or too many")
            artifacts = []
            seen: set[str] = set()
            for item in entries:
                if not isinstance(item, dict) or item.get("mediaType") != OCI_MANIFEST:
                    raise refused("index.json holds something other than image manifests")
                digest, size = item.get("digest"), item.get("size")
                if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest) \
                        or type(size) is not int:
                    raise refused("index.json has an invalid descriptor")
                if digest in seen:
                    continue
                seen.add(digest)
                config_ref, layers, gzipped = parse_manifest(_read_blob(blobs, digest, size))
                artifacts.append(parse_artifact(_read_blob(blobs, *config_ref), layers, gzipped,
                                                None,
                                                None))
            imported: list[str] = []
            present: list[str] = []
            for artifact in sorted(artifacts, key=lambda item: len(item.chain)):
                image = self._image_for(artifact.image_id)
                if self._ready(artifact.state_id):
                    present.append(artifact.state_id)
                    continue

                def fetch(index: int, art: Artifact = artifact) -> str:
                    digest, size = art.layers[index]
                    path = os.path.join(work, f"layer-{random_hex(4)}")
                    _check_blob(blobs, digest, size)
                    shutil.copyfile(os.path.join(blobs, digest.split(":")[1]), path)
                    return path

                sub_work = os.path.join(work, f"m-{random_hex(4)}")
                os.makedirs(sub_work, mode=0o700)
                try:
                    published = self._materialize(image, artifact, fetch, "imported",
                                                  sub_work)
                except OSError as exc:  # a layer that does not unpack (a file where a
                    if exc.errno == errno.ENOSPC:  # directory is, …) is the bundle's fault
                        raise disk_full("no space left for the import", str(exc)) from None
                    raise refused("a layer of the bundle does not unpack", str(exc)) from None
                remove_tree(sub_work)
                imported.extend(state for state in published if state not in imported)
                if artifact.state_id not in published and self._ready(artifact.state_id) \
                        and artifact.state_id not in imported:
                    present.append(artifact.state_id)
            return imported, [state for state in present if state not in imported]
        finally:
            remove_tree(work)

    def _image_for(self, image_id: str) -> ResolvedImage:
        try:
            image = self.runtimes.resolve(image_id)
        except EngineError as exc:
            raise refused(f"the bundle's image {image_id} is not available here",
                          exc.message) from None
        if image.resolved_id != image_id:
            raise refused(f"the bundle's image {image_id} is not this machine's",
                          image.resolved_id)
        return image

    @staticmethod
    def _unpack_bundle(bundle: str, blobs: str) -> str:
        """Extract a bundle's ``index.json`` and ``blobs/sha256/*`` (plain files only, by
        hex name) next to it; anything else in it is refused."""
        os.makedirs(blobs, mode=0o700)
        try:
            check_tar_headers(bundle)
            with tarfile.open(bundle, mode="r:") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isdir() and name in ("", "blobs", "blobs/sha256"):
                        continue
                    if not member.isfile():
                        raise refused(f"bundle member {name!r} is not a plain file")
                    if name in ("oci-layout", "index.json"):
                        target = os.path.join(os.path.dirname(blobs), name)
                    elif re.fullmatch(r"blobs/sha256/[0-9a-f]{64}", name):
                        target = os.path.join(blobs, name.rsplit("/", 1)[1])
                    else:
                        raise refused(f"bundle member {name!r} is not part of an OCI layout")
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    with extracted, open(target, "xb") as out:
                        shutil.copyfileobj(extracted, out, BLOB_CHUNK)
        except FileExistsError:
            raise refused("the bundle holds a file twice") from None
        except tarfile.TarError as exc:
            raise refused("the bundle is not a valid tar", str(exc)) from None
        return blobs


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _index_entry(work: str) -> tuple[str, int]:
    """index.json as a pseudo-blob of the bundle's work dir (it is no blob of its own)."""
    path = os.path.join(work, "index.json")
    if not os.path.isfile(path):
        raise refused("the bundle has no index.json")
    size = os.path.getsize(path)
    if size > MAX_MANIFEST_BYTES:
        raise refused("index.json too large")
    with open(path, "rb") as handle:
        data = handle.read()
    os.makedirs(os.path.join(work, "blobs"), exist_ok=True)
    digest = sha256_digest(data)
    target = os.path.join(work, "blobs", digest.split(":")[1])
    if not os.path.exists(target):
        atomic_write(target, data, 0o600, durable=False)
    return digest, size


def _check_blob(blobs: str, digest: str, size: int) -> str:
    path = os.path.join(blobs, digest.split(":")[1])
    if not os.path.isfile(path):
        raise refused(f"the bundle lacks blob {digest[:19]}")
    hashing = hashlib.sha256()
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(BLOB_CHUNK):
            hashing.update(chunk)
            total += len(chunk)
    if "sha256:" + hashing.hexdigest() != digest or total != size:
        raise refused(f"blob {digest[:19]} does not match its digest or size")
    return path


def _read_blob(blobs: str, digest: str, size: int) -> bytes:
    if size > MAX_MANIFEST_BYTES:
        raise refused(f"blob {digest[:19]} is too large for a manifest or config")
    with open(_check_blob(blobs, digest, size), "rb") as handle:
        return handle.read()


###############################################################################
# planner: psql and Liquibase argument validation and normalisation, content hashing,
# update-sql parsing and task lists. Pure logic apart from reading script files; may call
# queue (PlanTask).
###############################################################################

PSQL_TASK_HASH_SCHEMA = "psql-task-hash-v2"
MAX_SCRIPT_BYTES = 1 << 30  #: a script (or included file) larger than this is cut there
INPUT_BOUNDARY = b"\n-- sqlrs: input-boundary\n"
INCLUDE_BOUNDARY = b"\n-- sqlrs: include-boundary\n"
CONNECTION_FLAGS = ("-h", "-p", "-U", "-d")
CONNECTION_LONG = ("--host", "--port", "--username", "--dbname", "--database")
VALUE_FLAGS_SHORT = ("-c", "-f", "-v", "-L", "-o", "-P", "-F", "-R", "-T")
VALUE_FLAGS_LONG = (
    "--command", "--file", "--set", "--variable", "--log-file", "--output", "--pset",
    "--field-separator", "--record-separator", "--table-attr",
)
INCLUDE_LINE_RE = re.compile(
    rb"^[ \t\r\f\v]*\\(i|ir|include|include_relative)[ \t]+(.+?)[ \t\r\f\v]*$", re.MULTILINE)


def hash_records(*records: tuple[str, str]) -> str:
    """SHA-256 over ``key=<byte length>:<value>\\n`` records, hex (the reference hasher)."""
    digest = hashlib.sha256()
    for key, value in records:
        data = value.encode()
        digest.update(f"{key}={len(data)}:".encode() + data + b"\n")
    return digest.hexdigest()


@dataclass
class PsqlInput:
    kind: str  # file | stdin | command
    value: str

    @property
    def args(self) -> list[str]:
        return ["-c", self.value] if self.kind == "command" else ["-f", self.value]

    @property
    def summary(self) -> str:
        return " ".join(self.args)


@dataclass
class PsqlPlan:
    """Validated psql arguments: shared flags, inputs (one step each) and the include dir."""

    normalized: list[str]
    shared: list[str]
    inputs: list[PsqlInput]
    work_dir: str
    stdin: str | None

    def step_args(self, index: int) -> list[str]:
        if not self.inputs:
            return list(self.shared)
        return [*self.shared, *self.inputs[index].args]

    @property
    def step_count(self) -> int:
        return max(1, len(self.inputs))


def split_flag(token: str, short: Sequence[str], long: Sequence[str]) -> tuple[str, str | None]:
    """Return (flag, attached value) when ``token`` is one of the flags, else ("", None)."""
    for flag in long:
        if token == flag:
            return flag, None
        if token.startswith(flag + "="):
            return flag, token[len(flag) + 1:]
    for flag in short:
        if token == flag:
            return flag, None
        if token.startswith(flag) and len(token) > 2:
            return flag, token[2:]
    return "", None


#: psql's long options (getopt_long: any unique prefix works) → the short option they mean
PSQL_LONG_OPTIONS = {
    "echo-all": "-a", "no-align": "-A", "command": "-c", "dbname": "-d", "echo-queries": "-e",
    "echo-errors": "-b", "echo-hidden": "-E", "file": "-f", "field-separator": "-F",
    "field-separator-zero": "-z", "host": "-h", "html": "-H", "list": "-l", "log-file": "-L",
    "no-readline": "-n", "single-transaction": "-1", "output": "-o", "port": "-p",
    "pset": "-P", "quiet": "-q", "record-separator": "-R", "record-separator-zero": "-0",
    "single-step": "-s", "single-line": "-S", "tuples-only": "-t", "table-attr": "-T",
    "username": "-U", "set": "-v", "variable": "-v", "version": "-V", "no-password": "-w",
    "password": "-W", "expanded": "-x", "no-psqlrc": "-X", "help": "-?", "csv": "--csv",
}
PSQL_VALUE_OPTIONS = "cdfFhLopPRTUv"  #: short options that take a value


def expand_psql_option(token: str) -> list[str]:
    """``token`` as psql's getopt reads it, one option per item: an unambiguous prefix of a
    long option becomes that option (``--hos=x`` → ``--host=x``), and a group of short options
    is split where one takes a value (``-Xh/tmp`` → ``-X``, ``-h/tmp``)."""
    if token.startswith("--") and len(token) > 2:
        name, sep, value = token[2:].partition("=")
        found = [long for long in PSQL_LONG_OPTIONS if long.startswith(name)]
        if name not in PSQL_LONG_OPTIONS and len(found) == 1:
            return [f"--{found[0]}{sep}{value}"]
        return [token]
    if not token.startswith("-") or len(token) <= 2:
        return [token]
    for index, letter in enumerate(token[1:], start=1):
        if letter in PSQL_VALUE_OPTIONS and index > 1:
            return [token[:index], f"-{token[index:]}"]
        if letter in PSQL_VALUE_OPTIONS:
            return [token]
    return [token]


def plan_psql(args: Sequence[str], stdin: str | None, cwd: str) -> PsqlPlan:
    """Validate and normalise psql arguments as the sqlrs CLI expects (anything else: 400)."""
    shared: list[str] = []
    inputs: list[PsqlInput] = []
    has_no_psqlrc = has_on_error_stop = False
    args = [option for token in args for option in expand_psql_option(token)]
    pos = 0
    while pos < len(args):
        token = args[pos]
        pos += 1
        if token == "--":
            if pos < len(args):
                raise invalid_argument("positional arguments are not allowed")
            continue
        if split_flag(token, CONNECTION_FLAGS, CONNECTION_LONG)[0]:
            raise invalid_argument("connection flags are not allowed", token)
        if not token.startswith("-") or token == "-":
            raise invalid_argument("positional database arguments are not allowed", token)
        flag, value = split_flag(token, VALUE_FLAGS_SHORT, VALUE_FLAGS_LONG)
        if flag and value is None:
            if pos >= len(args):
                if flag in ("-v", "--set", "--variable"):
                    raise invalid_argument("missing value for variable flag", token)
                raise invalid_argument(f"missing value for {flag}", token)
            value = args[pos]
            pos += 1
        if flag in ("-f", "--file"):
            inputs.append(_file_input(value or ""))
        elif flag in ("-c", "--command"):
            inputs.append(PsqlInput("command", value or ""))
        elif flag in ("-v", "--set", "--variable"):
            name, _, var_value = (value or "").partition("=")
            if name == "ON_ERROR_STOP":
                if var_value != "1":
                    raise invalid_argument("ON_ERROR_STOP must be set to 1", value)
                has_on_error_stop = True
            shared += ["-v", value or ""]
        elif flag:
            shared += [flag, value or ""]
        else:
            has_no_psqlrc |= token in ("-X", "--no-psqlrc")
            shared.append(token)
    uses_stdin = any(item.kind == "stdin" for item in inputs)
    if sum(item.kind == "stdin" for item in inputs) > 1:
        raise invalid_argument("-f - may appear only once", "stdin can be read once")
    if uses_stdin and stdin is None:
        raise invalid_argument("stdin is required when using -f -")
    if stdin is not None and not uses_stdin:
        raise invalid_argument("stdin is only valid with -f -")
    if not has_no_psqlrc:
        shared.append("-X")
    if not has_on_error_stop:
        shared += ["-v", "ON_ERROR_STOP=1"]
    files = [item.value for item in inputs if item.kind == "file"]
    work_dir = os.path.dirname(files[0]) if files else cwd
    normalized = [arg for item in inputs for arg in item.args] + shared
    return PsqlPlan(normalized, shared, inputs, work_dir, stdin)


def _file_input(path: str) -> PsqlInput:
    if path == "-":
        return PsqlInput("stdin", "-")
    if not os.path.isabs(path):
        raise invalid_argument("file path must be absolute", path)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise invalid_argument("cannot read file", path)
    return PsqlInput("file", os.path.normpath(path))


class ContentHasher:
    """Expands ``\\i``-style includes and hashes script content as the reference engine does.

    Works on bytes; a script without a backslash-i is never split into lines. An include is
    expanded only where psql would run it (a line of its own, outside quotes, dollar quotes
    and comments), and only from inside the work dir or the directory of a script the request
    names: the engine may read files its client's user may not (it often runs as root), so a
    script can not pull in ``/etc/shadow`` or ``../../other-project``. Expanded inputs and
    hashes are memoised, so planning a job reads each script once.
    """

    def __init__(self, work_dir: str, stdin: str | None) -> None:
        self.work_dir = work_dir
        self.stdin = stdin
        self._roots = {os.path.realpath(work_dir)}
        self._texts: dict[tuple[str, str], bytes] = {}
        self._hashes: dict[tuple[tuple[str, str], ...], str] = {}

    def input_text(self, item: PsqlInput) -> bytes:
        key = (item.kind, item.value)
        if key not in self._texts:
            if item.kind == "command":
                self._texts[key] = self._expand(os.fsencode(item.value), self.work_dir, [])
            elif item.kind == "stdin":
                self._texts[key] = self._expand(os.fsencode(self.stdin or ""), self.work_dir, [])
            else:
                self._roots.add(os.path.realpath(os.path.dirname(item.value)))
                self._texts[key] = self._expand_file(item.value, [])
        return self._texts[key]

    def _expand_file(self, path: str, stack: list[str]) -> bytes:
        real = os.path.realpath(path)
        if real in stack:
            raise invalid_argument("recursive include", " -> ".join([*stack, real]))
        if stack and not any(real == root or real.startswith(root.rstrip("/") + "/")
                             for root in self._roots):
            raise invalid_argument(
                "include outside the work dir",
                f"{path} (resolved: {real}) is neither under the work dir nor next to a"
                f" script of the request: {', '.join(sorted(self._roots))}")
        try:
            data = read_regular_file(path, MAX_SCRIPT_BYTES + 1, follow=True)
        except OSError as exc:
            raise invalid_argument("cannot read file",
                                   f"{path}: {exc.strerror or exc}") from None
        if len(data) > MAX_SCRIPT_BYTES:
            raise invalid_argument("script too large",
                                   f"{path} is larger than {MAX_SCRIPT_BYTES} bytes")
        return self._expand(data, os.path.dirname(path), [*stack, real])

    def _expand(self, data: bytes, file_dir: str, stack: list[str]) -> bytes:
        """Each line plus a newline (a trailing CR dropped); include lines replaced by the
        included file between boundary markers."""
        if b"\\i" not in data:
            return _normalise_lines(data)
        out = []
        pos = 0
        for match in psql_include_lines(data):
            out.append(_normalise_lines(data[pos:match.start()]))
            target = os.fsdecode(match.group(2).strip().strip(b"'\""))
            base = file_dir if match.group(1) in (b"ir", b"include_relative") else self.work_dir
            resolved = target if os.path.isabs(target) else os.path.join(base, target)
            out.append(INCLUDE_BOUNDARY + self._expand_file(resolved, stack) + INCLUDE_BOUNDARY)
            pos = match.end() + 1
        out.append(_normalise_lines(data[pos:]))
        return b"".join(out)

    def content_hash(self, items: Sequence[PsqlInput]) -> str:
        key = tuple((item.kind, item.value) for item in items)
        if key not in self._hashes:
            digest = hashlib.sha256()
            for index, item in enumerate(items):
                if index:
                    digest.update(INPUT_BOUNDARY)
                digest.update(self.input_text(item))
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]


#: where a quoted string, dollar quote or comment opens (E'' strings before plain quotes)
_SQL_OPENER_RE = re.compile(
    rb"--|/\*|(?<![A-Za-z0-9_$])[Ee]'|'|\"|\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_BLOCK_COMMENT_RE = re.compile(rb"/\*|\*/")
_E_STRING_REST_RE = re.compile(rb"(?:[^'\\]|\\.|'')*'", re.DOTALL)


def psql_include_lines(data: bytes) -> list[re.Match[bytes]]:
    """The include lines of a script that psql would run: those starting outside a quoted
    string, quoted identifier, dollar quote and comment."""
    found = []
    pos = 0
    for match in INCLUDE_LINE_RE.finditer(data):
        if match.start() < pos:
            continue
        pos = _skip_quoted(data, pos, match.start())
        if pos <= match.start():
            found.append(match)
            pos = match.end()
    return found


def _skip_quoted(data: bytes, pos: int, limit: int) -> int:
    """Scan SQL from ``pos`` (outside any quote) towards ``limit``: ``limit`` when it is
    reached outside quotes and comments, else where the quote or comment around it ends."""
    while (opener := _SQL_OPENER_RE.search(data, pos, limit)) is not None:
        pos = _quote_end(data, opener)
        if pos > limit:
            return pos
    return limit


def _quote_end(data: bytes, opener: re.Match[bytes]) -> int:
    """Where the quote or comment that ``opener`` opens ends (the end of data if it never
    does)."""
    token, at = opener.group(), opener.end()
    if token == b"--":
        end = data.find(b"\n", at)
        return len(data) if end < 0 else end
    if token == b"/*":
        depth = 1
        while depth and (mark := _BLOCK_COMMENT_RE.search(data, at)) is not None:
            depth += 1 if mark.group() == b"/*" else -1
            at = mark.end()
        return at if not depth else len(data)
    if token.startswith(b"$"):
        end = data.find(token, at)
        return len(data) if end < 0 else end + len(token)
    if token[:1] in (b"E", b"e"):
        end_match = _E_STRING_REST_RE.match(data, at)
        return end_match.end() if end_match else len(data)
    while (end := data.find(token, at)) >= 0:  # '' or "" inside is the quote itself
        if data[end + 1:end + 2] != token:
            return end + 1
        at = end + 2
    return len(data)


def _normalise_lines(data: bytes) -> bytes:
    """What reading ``data`` line by line and writing each line plus a newline gives."""
    if not data:
        return b""
    if b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    if data.endswith(b"\r"):
        data = data[:-1]
    return data if data.endswith(b"\n") else data + b"\n"


def psql_task_hash(content_hash: str, engine_version: str) -> str:
    return hash_records(
        ("prepare_kind", "psql"), ("content_hash", content_hash),
        ("engine_version", engine_version), ("psql_task_hash_schema", PSQL_TASK_HASH_SCHEMA),
    )


def state_id_for(input_kind: str, input_id: str, task_hash: str) -> str:
    """The id of the state a step builds: a content address of what went in, so the same
    step on the same input is the same state everywhere.

    ``state_id = H(input_kind, input_id, task_hash)`` where H is ``hash_records`` (SHA-256 over
    ``key=<length>:<value>`` lines) and the input is the resolved image id (``image``) for the
    first step, else the previous state's id (``state``), so a state id covers its whole chain.

    - psql: ``task_hash = psql_task_hash(content_hash, engine_version)``; the content hash is
      the step's script text with its includes expanded (``ContentHasher``), so an edited
      include is a new state, and the engine version is mixed in (a new engine may build
      differently).
    - Liquibase: ``task_hash = lb_task_hash(previous state id, changeset)``: the changeset's
      own checksum and its ``path::id::author``, as Liquibase records them. No engine version
      and no argument order: Liquibase itself decides whether a changeset ran, by checksum,
      so the reference engine's ids (and states already built) stay valid across engines.
    """
    return hash_records(("input_kind", input_kind), ("input_id", input_id),
                        ("task_hash", task_hash))


def job_signature(all_inputs_task_hash: str, resolved_image: str, plan_only: bool) -> str:
    return hash_records(("task_hash", all_inputs_task_hash), ("image_id", resolved_image),
                        ("plan_only", "true" if plan_only else "false"))


class PrepareBody(TypedDict):
    """``POST /v1/prepare-jobs`` and ``/v1/cache/explain/prepare`` (unknown fields, such as
    ``source_manifest``, are ignored)."""
    prepare_kind: Annotated[str, Doc("psql or lb (Liquibase); trimmed.")]
    image_id: Annotated[str, Doc("Container image, or host:<major> / host:<absolute bindir>.")]
    psql_args: NotRequired[list[str] | None]
    liquibase_args: NotRequired[list[str] | None]
    liquibase_exec: NotRequired[str]
    liquibase_exec_mode: NotRequired[Annotated[str, Doc("native | windows-bat")]]
    liquibase_env: NotRequired[dict[str, str]]
    work_dir: NotRequired[str]
    stdin: NotRequired[str | None]
    plan_only: NotRequired[bool]
    ttl_seconds: NotRequired[Annotated[int, Doc("Sets expires_at of the instance.", minimum=1,
                                                maximum=MAX_TTL_SECONDS)]]


@dataclass
class PrepareRequest:
    """A validated ``POST /v1/prepare-jobs`` body: a psql plan or a Liquibase plan."""

    prepare_kind: str
    image_id: str
    plan_only: bool
    ttl_seconds: int | None
    body: JsonDict  #: the fields that were validated, kept to restore the job after a restart
    plan: PsqlPlan | None = None
    lb: LiquibasePlan | None = None

    @classmethod
    def parse(cls, body: Any, cwd: str) -> PrepareRequest:
        if not isinstance(body, dict):
            raise invalid_argument("invalid json payload", "body must be a JSON object")
        kind = _opt_str(body, "prepare_kind").strip()
        if not kind:
            raise invalid_argument("prepare_kind is required")
        if kind not in ("psql", "lb"):
            raise invalid_argument("unsupported prepare_kind", kind)
        image = _opt_str(body, "image_id").strip()
        if not image:
            raise invalid_argument("image_id is required")
        plan_only = body.get("plan_only", False)
        if not isinstance(plan_only, bool):
            raise invalid_argument("invalid plan_only", "plan_only must be a boolean")
        ttl = parse_ttl(body.get("ttl_seconds"))
        kept = {key: body.get(key) for key in PrepareBody.__annotations__ if key in body}
        request = cls(kind, image, plan_only, ttl, kept)
        if kind == "lb":
            request.lb = plan_liquibase(body, cwd)
            return request
        args = body.get("psql_args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise invalid_argument("invalid psql_args", "psql_args must be an array of strings")
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise invalid_argument("invalid stdin", "stdin must be a string or null")
        request.plan = plan_psql(args, stdin, cwd)
        return request

    @property
    def normalized(self) -> str:
        plan = self.lb or self.plan
        assert plan is not None
        return " ".join(plan.normalized)

    def to_json(self) -> JsonDict:
        return self.body


def _opt_str(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid_argument(f"invalid {key}", f"{key} must be a string")
    return value


MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def parse_ttl(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= MAX_TTL_SECONDS:
        raise invalid_argument("invalid ttl_seconds", "ttl_seconds must be a positive integer"
                               f" of at most {MAX_TTL_SECONDS} (ten years)")
    return value


@dataclass
class StepPlan:
    index: int
    input_kind: str
    input_id: str
    task_hash: str
    state_id: str
    args: list[str]
    summary: str
    normalized: str
    #: for a file or stdin input: the expanded text the step was hashed from, which psql is
    #: fed on stdin (so it runs exactly what was hashed and needs no access to the files)
    script: bytes | None = field(default=None, repr=False)
    changeset: Changeset | None = None  #: for lb: the changeset the step applies


def plan_steps(request: PrepareRequest, resolved_image: str,
               engine_version: str) -> tuple[list[StepPlan], str]:
    """The chain of states of a psql request and its job signature."""
    plan = request.plan
    assert plan is not None
    hasher = ContentHasher(plan.work_dir, plan.stdin)
    steps: list[StepPlan] = []
    input_kind, input_id = "image", resolved_image
    for index in range(plan.step_count):
        items = plan.inputs[index:index + 1]
        task_hash = psql_task_hash(hasher.content_hash(items), engine_version)
        state_id = state_id_for(input_kind, input_id, task_hash)
        summary = items[0].summary if items else ""
        normalized = " ".join([*(items[0].args if items else []), *plan.shared])
        script = hasher.input_text(items[0]) if items and items[0].kind != "command" else None
        steps.append(StepPlan(index, input_kind, input_id, task_hash, state_id,
                              plan.step_args(index), summary, normalized, script))
        input_kind, input_id = "state", state_id
    whole = psql_task_hash(hasher.content_hash(plan.inputs), engine_version)
    return steps, job_signature(whole, resolved_image, request.plan_only)


LB_CONNECTION_FLAGS = ("--url", "--username", "--password")
LB_RUNTIME_FLAGS = ("--classpath", "--driver")
LB_PATH_FLAGS = ("--changelog-file", "--defaults-file")
LB_SEARCH_FLAGS = ("--searchPath", "--search-path")
LB_COUNTING_FLAGS = ("--count", "--tag")  #: belong to update-count/update-to-tag, not to steps
LB_INSERT_RE = re.compile(r"INSERT INTO \S*databasechangelog\s*\(.*\)\s*VALUES\s*\((.*)\);?\s*$",
                          re.IGNORECASE)
SQL_STRING_RE = re.compile(r"'((?:[^']|'')*)'")


@dataclass
class LiquibasePlan:
    """Validated Liquibase arguments (options before the command, the command, the rest), the
    executable, its extra environment and the directory it runs in."""

    before: list[str]
    command: str
    after: list[str]
    exec_path: str
    env: dict[str, str]
    work_dir: str

    @property
    def normalized(self) -> list[str]:
        return [*self.before, self.command, *self.after]

    def args_for(self, command: str, *extra: str) -> list[str]:
        """The arguments with ``command`` instead of the user's: files under the work dir
        relative to it (Liquibase keeps a changeset's path as given, and it is part of the
        changeset's identity), options that select how many changesets to run dropped."""
        def local(token: str) -> str:
            name, eq, value = token.partition("=")
            if eq and name in LB_PATH_FLAGS and value.startswith(self.work_dir.rstrip("/") + "/"):
                return f"{name}={os.path.relpath(value, self.work_dir)}"
            return token

        def option(token: str) -> str:
            return token.partition("=")[0]

        moved = [t for t in self.after if option(t) in LB_PATH_FLAGS + LB_SEARCH_FLAGS]
        after = [t for t in self.after if t not in moved and option(t) not in LB_COUNTING_FLAGS]
        # global options go in front of the command wherever they were written (Liquibase
        # 4.28 refuses --searchPath after it; upstream's examples put it there)
        return [*map(local, self.before), *map(local, moved), command, *map(local, after),
                *extra]


def plan_liquibase(body: Mapping[str, Any], cwd: str) -> LiquibasePlan:
    """Validate ``liquibase_*`` fields as the sqlrs CLI expects (anything else: 400)."""
    work_dir = _opt_str(body, "work_dir") or cwd
    if not os.path.isabs(work_dir) or not os.path.isdir(work_dir):
        raise invalid_argument("invalid work_dir", "work_dir must be an existing absolute dir")
    args = body.get("liquibase_args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise invalid_argument("invalid liquibase_args",
                               "liquibase_args must be an array of strings")
    tokens = [token for token in args if token.strip() and token != "--"]
    before: list[str] = []
    after: list[str] = []
    command = ""
    while tokens:
        token = tokens.pop(0)
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in LB_CONNECTION_FLAGS:
            raise invalid_argument("connection flags are not allowed", token)
        if name in LB_RUNTIME_FLAGS:
            raise invalid_argument("runtime flags are not allowed", token)
        if name in LB_PATH_FLAGS + LB_SEARCH_FLAGS:
            if not eq:
                if not tokens:
                    raise invalid_argument("missing value for flag", name)
                value = tokens.pop(0)
            token = _absolute_lb_option(name, value, work_dir)
        elif not token.startswith("-") and not command:
            command = token
            continue
        (after if command else before).append(token)
    if not command:
        raise invalid_argument("lb command is required")
    if not command.lower().startswith("update"):
        raise invalid_argument("unsupported lb command", command)
    return LiquibasePlan(before, command, after, _liquibase_exec(body), _lb_env(body), work_dir)


def _absolute_lb_option(name: str, value: str, work_dir: str) -> str:
    if name in LB_SEARCH_FLAGS:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise invalid_argument("searchPath is empty", name)
        absolute = [item if "://" in item or item.startswith("classpath:") else
                    os.path.normpath(os.path.join(work_dir, item)) for item in items]
        return f"--searchPath={','.join(absolute)}"
    if not value.strip():
        raise invalid_argument("path is empty", name)
    return f"{name}={os.path.normpath(os.path.join(work_dir, value))}"


def _liquibase_exec(body: Mapping[str, Any]) -> str:
    mode = _opt_str(body, "liquibase_exec_mode").strip().lower()
    if mode not in ("", "auto", "native"):
        raise invalid_argument("unsupported liquibase_exec_mode",
                               f"{mode}: this engine runs Liquibase natively")
    wanted = _opt_str(body, "liquibase_exec").strip() or "liquibase"
    found = wanted if os.path.isabs(wanted) else shutil.which(wanted)
    if not found or not os.path.isfile(found):
        raise invalid_argument("liquibase_exec not found", wanted)
    if not os.access(found, os.X_OK):
        raise invalid_argument("liquibase_exec is not executable", found)
    return found


def _lb_env(body: Mapping[str, Any]) -> dict[str, str]:
    env = body.get("liquibase_env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise invalid_argument("invalid liquibase_env", "liquibase_env must map strings")
    return dict(env)


LB_PLAN_CACHE_LIMITS = (5000, 64 << 20)  #: files and bytes hashed at most to reuse a plan


def lb_plan_keys(lb: LiquibasePlan, resolved_image: str) -> tuple[str | None, str]:
    """What a Liquibase plan depends on: the image, the executable, the arguments and
    environment, and the content of every file under the work dir and search paths (None
    when there is too much to hash: the plan is then always made by Liquibase); second, the
    same without the files' content (the command's latest plan, whatever its files held)."""
    records = [("image", resolved_image), *lb_install_records(lb),
               ("args", "\0".join(lb.args_for("update-sql"))), ("work_dir", lb.work_dir)]
    return _hash_lb_files(lb, list(records)), hash_records(*records)


def lb_install_records(lb: LiquibasePlan) -> list[tuple[str, str]]:
    """The Liquibase a plan runs: its executable (path, size, mtime) and environment."""
    exe = os.stat(lb.exec_path)
    return [("exec", f"{lb.exec_path}:{exe.st_size}:{exe.st_mtime_ns}"),
            ("env", json.dumps(lb.env, sort_keys=True))]


def lb_roots(lb: LiquibasePlan) -> list[str]:
    """The directories whose files a Liquibase plan is keyed by: the work dir and the
    search paths on this file system."""
    roots = [lb.work_dir] + [item for token in lb.normalized if token.startswith("--searchPath=")
                             for item in token.split("=", 1)[1].split(",") if "://" not in item
                             and not item.startswith("classpath:")]
    return list(dict.fromkeys(roots))


LB_FILE_REF_RE = re.compile(r"""\b(?:path|file)\s*[=:]\s*["']?([^"'\s<>,}]+)""")


def lb_plan_files_hashed(lb: LiquibasePlan, changesets: Sequence[Changeset]) -> bool:
    """Whether the files a plan depends on lie under the roots its key hashed: every
    changeset's file, and every file those name (``sqlFile path=``, ``loadData file:``), read
    relative to the changelog or to a root. A changelog may reach ``../shared/x.sql``: its
    plan is then made by Liquibase every time (a stray match only costs that)."""
    roots = [os.path.realpath(root) for root in lb_roots(lb)]

    def under(real: str) -> bool:
        return any(real.startswith(root.rstrip("/") + "/") for root in roots)

    def found(bases: Sequence[str], path: str) -> list[str]:
        return [real for real in (os.path.realpath(os.path.join(base, path)) for base in bases)
                if os.path.isfile(real)]

    files = set()
    for changeset in changesets:
        located = found(roots, changeset.path)
        if not located or not all(map(under, located)):
            return False
        files.update(located)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as changelog:
            text = changelog.read(LB_PLAN_CACHE_LIMITS[1])
        for ref in LB_FILE_REF_RE.findall(text):
            if not all(map(under, found([os.path.dirname(path), *roots], ref))):
                return False
    return True


def lb_files(root: str) -> Iterator[str]:
    """The files under ``root`` a Liquibase plan depends on (its key hashes them, a staged
    workspace copies them): every file outside dot-directories, in a stable order."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            yield os.path.join(directory, name)


def _hash_lb_files(lb: LiquibasePlan, records: list[tuple[str, str]]) -> str | None:
    files, total = 0, 0
    for root in lb_roots(lb):
        for path in lb_files(root):
            try:  # a FIFO or socket is skipped, never waited on
                data = read_regular_file(path, LB_PLAN_CACHE_LIMITS[1] + 1, follow=True)
            except OSError:
                continue
            files, total = files + 1, total + len(data)
            if files > LB_PLAN_CACHE_LIMITS[0] or total > LB_PLAN_CACHE_LIMITS[1]:
                return None
            records.append((path, hashlib.sha256(data).hexdigest()))
    return hash_records(*records)


@dataclass(frozen=True)
class Changeset:
    """One pending changeset, as ``update-sql`` announces it."""

    id: str
    author: str
    path: str
    checksum: str

    @property
    def summary(self) -> str:
        return f"{self.id}::{self.author}::{self.path}"


def parse_update_sql(stdout: str) -> list[Changeset]:
    """The pending changesets of an ``update-sql`` run, in order: each starts at a
    ``-- Changeset`` line; id, author, path and checksum come from the values it would record
    in DATABASECHANGELOG (the header is ambiguous when an id contains ``::``)."""
    blocks: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if line.startswith("-- Changeset "):
            blocks.append((line[len("-- Changeset "):].strip(), []))
        elif blocks:
            blocks[-1][1].append(line)
    found = []
    for header, lines in blocks:
        insert = next((m for m in map(LB_INSERT_RE.match, lines) if m), None)
        values = [v.replace("''", "'") for v in SQL_STRING_RE.findall(insert.group(1))
                  ] if insert else []
        if len(values) >= 4:
            found.append(Changeset(values[0], values[1], values[2], values[3]))
            continue
        path, _, rest = header.partition("::")
        ident, _, author = rest.rpartition("::")
        stable = "\n".join(line for line in lines if "databasechangelog" not in line.lower())
        found.append(Changeset(ident, author, path,
                               "sha256:" + hashlib.sha256(stable.encode()).hexdigest()))
    return found


def lb_task_hash(prev_state_id: str, changeset: Changeset | None) -> str:
    """A changeset's step: its checksum and identity (path::id::author, which Liquibase
    records) on top of the state before it."""
    if changeset is None:
        return hash_records(("prepare_kind", "lb"), ("prev_state_id", prev_state_id),
                            ("changeset_hash", ""))
    return hash_records(("prepare_kind", "lb"), ("prev_state_id", prev_state_id),
                        ("changeset_hash", changeset.checksum),
                        ("changeset", f"{changeset.path}::{changeset.id}::{changeset.author}"))


def plan_lb_steps(request: PrepareRequest, resolved_image: str, engine_version: str,
                  changesets: Sequence[Changeset]) -> tuple[list[StepPlan], str]:
    """One step per pending changeset (one, doing nothing, when none is pending) and the lb
    job signature."""
    assert request.lb is not None
    steps: list[StepPlan] = []
    records = [("image_id", resolved_image), ("plan_only", str(request.plan_only).lower()),
               ("engine_version", engine_version)]
    input_kind, input_id = "image", resolved_image
    for index, changeset in enumerate(changesets or [None]):
        task_hash = lb_task_hash(input_id, changeset)
        state_id = state_id_for(input_kind, input_id, task_hash)
        steps.append(StepPlan(index, input_kind, input_id, task_hash, state_id,
                              request.lb.args_for("update-count", "--count=1"),
                              changeset.summary if changeset else "",
                              " ".join(request.lb.normalized), changeset=changeset))
        records += [("task_id", f"execute-{index}"), ("task_type", "state_execute"),
                    ("input_kind", input_kind), ("input_id", input_id),
                    ("task_hash", task_hash)]
        if changeset:
            records += [("changeset_id", changeset.id), ("changeset_author", changeset.author),
                        ("changeset_path", changeset.path)]
        input_kind, input_id = "state", state_id
    return steps, hash_records(*records)


def build_tasks(request: PrepareRequest, resolved_image: str, steps: Sequence[StepPlan],
                cached: Callable[[str], bool]) -> list[PlanTask]:
    tasks = [PlanTask("plan", "plan", planner_kind=request.prepare_kind)]
    if "@" not in request.image_id:
        tasks.append(PlanTask("resolve-image", "resolve_image", image_id=request.image_id,
                              resolved_image_id=resolved_image))
    for step in steps:
        tasks.append(PlanTask(
            f"execute-{step.index}", "state_execute", step=step.index,
            input_kind=step.input_kind,
            input_id=step.input_id, task_hash=step.task_hash, output_state_id=step.state_id,
            cached=cached(step.state_id), args_summary=step.summary,
            changeset_id=step.changeset.id if step.changeset else None,
            changeset_author=step.changeset.author if step.changeset else None,
            changeset_path=step.changeset.path if step.changeset else None,
        ))
    tasks.append(PlanTask("prepare-instance", "prepare_instance", input_kind="state",
                          input_id=steps[-1].state_id, instance_mode="ephemeral"))
    return tasks



###############################################################################
# executor: runs one job's tasks in order and records every step as events.
# Owns the job's runtime and its Liquibase process while it runs; may call queue, store,
# snapshot, dbms, runtime, instances, cache, remote, planner.
###############################################################################

HEARTBEAT_SECONDS = 0.5
HEARTBEATS_AT_FULL_RATE = 20  #: repeats per quiet stretch before they slow down ten-fold
LOG_LINES_IN_FULL = 200
HEARTBEAT_MESSAGE_CHARS = 200
OUTPUT_TAIL_BYTES = 64 * 1024


class EventEmitter:
    """Appends a job's events; re-appends the last running-task/log event as a heartbeat."""

    def __init__(self, jobs: JobQueue, job_id: str) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self._last: JsonDict | None = None
        self._last_at = time.monotonic()
        self._repeats = 0
        #: orders appends with their timestamps; guards ``_last``, ``_last_at``, ``_repeats``,
        #: ``_closed`` (the heartbeat thread shares them)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False

    def emit(self, event: JsonDict, *more: JsonDict, **job_fields: Unpack[JobColumns]) -> None:
        """Append events (with job column updates) in one transaction; nothing is appended
        after the terminal status, whatever thread still reports."""
        with self._lock:
            if self._closed:
                return
            event = {**event, "ts": format_ts()}
            applied = self.jobs.update_job(self.job_id, event,
                                           *({**e, "ts": event["ts"]} for e in more),
                                           **job_fields)
            self._closed = not applied or job_fields.get("status") in TERMINAL_STATUSES
            if event["type"] == "log" or (event["type"] == "task" and
                                          event.get("status") == "running"):
                self._last = heartbeat_of(event)
            elif event["type"] == "task":
                self._last = None
            self._last_at, self._repeats = time.monotonic(), 0

    def log(self, message: str) -> None:
        self.emit({"type": "log", "message": message})

    def task(self, task_id: str, status: str, error: ErrorBody | None = None,
             cached: bool | None = None) -> None:
        event: JsonDict = {"type": "task", "task_id": task_id, "status": status}
        if error:
            event["error"] = error
            event["message"] = error.get("message")
        with self._lock:  # timestamps are taken under the lock, so they follow event order
            if self._closed:
                return
            now = format_ts()
            columns: TaskColumns = {"status": status,
                                    "error_json": json.dumps(error) if error else None}
            columns["started_at" if status == "running" else "finished_at"] = now
            if cached is not None:
                columns["cached"] = int(cached)
            self.jobs.update_task(self.job_id, task_id, {**event, "ts": now}, **columns)
            self._last = event if status == "running" else None
            self._last_at, self._repeats = time.monotonic(), 0

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """The heartbeat thread runs during the block and is stopped and joined after it."""
        beat = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id[:8]}",
                                daemon=True)
        beat.start()
        try:
            yield
        finally:
            self._stop.set()
            beat.join()

    def _beat(self) -> None:
        """Repeat the last event through a quiet stretch: every HEARTBEAT_SECONDS at first,
        ten times less often after HEARTBEATS_AT_FULL_RATE repeats (a long silent step must
        not flood the store)."""
        while not self._stop.wait(HEARTBEAT_SECONDS / 5):
            with self._lock:
                slow = self._repeats >= HEARTBEATS_AT_FULL_RATE
                interval = HEARTBEAT_SECONDS * (10 if slow else 1)
                due = time.monotonic() - self._last_at >= interval
                if due and self._last is not None and not self._closed:
                    self.jobs.append_event(self.job_id, {**self._last, "ts": format_ts()})
                    self._last_at, self._repeats = time.monotonic(), self._repeats + 1


def heartbeat_of(event: JsonDict) -> JsonDict:
    """What a heartbeat repeats of ``event``: the event with its message cut to its first
    HEARTBEAT_MESSAGE_CHARS characters (a heartbeat says "still here", it never stores a
    long line of output again)."""
    message = event.get("message")
    if isinstance(message, str) and len(message) > HEARTBEAT_MESSAGE_CHARS:
        return {**event, "message": message[:HEARTBEAT_MESSAGE_CHARS] + " …"}
    return event


@dataclass
class JobRun:
    """In-memory companion of a running job (lost on restart, where the job row resumes):
    its cancel and stop flags, its end, the runtime it builds in, step 0 run ahead while
    Liquibase planned, its client processes (``client``), the base cluster being initialised
    and its signature."""

    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    runtime: RuntimeHandle | None = None
    #: Liquibase's run of step 0 made while it planned, checked against the plan
    ahead: RuntimeHandle | None = None
    #: clients running for the job, killed on cancel (planning and step 0 may run at once)
    processes: set[ClientProcess] = field(default_factory=set)
    #: the image's base cluster, initialised while the job plans (only jobs that build)
    base: Future[str] | None = None
    signature: str | None = None
    #: states the remote cache was asked for and did not give (asked once per job)
    remote_missing: set[str] = field(default_factory=set)
    #: guards ``processes`` and orders a registration against a cancel or stop: a client
    #: registered after one is killed at once, one registered before is killed by it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self) -> None:
        if self.stopping.is_set():
            raise EngineStopping()
        if self.cancel.is_set():
            raise JobCancelled()

    @contextlib.contextmanager
    def client(self, proc: ClientProcess) -> Iterator[ClientProcess]:
        """Register a client process of the job for the block; on any exit from it the
        process is unregistered, and killed unless the block ran to its end. A cancel or stop
        before or during the block kills it."""
        with self._lock:
            self.processes.add(proc)
            ended = self.cancel.is_set() or self.stopping.is_set()
        if ended:
            proc.kill()
        finished = False
        try:
            yield proc
            finished = True
        finally:
            with self._lock:
                self.processes.discard(proc)
            if not finished:
                proc.kill()

    def end(self, stopping: bool = False) -> None:
        """Cancel the job (or stop it for a restart) and kill its client processes."""
        with self._lock:
            (self.stopping if stopping else self.cancel).set()
            running = list(self.processes)
        for proc in running:
            proc.kill()


#: ~40 % less JVM start; the JVM's own warnings about its class archive stay quiet
LIQUIBASE_JAVA_OPTS = ("-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xlog:cds=off"
                       " -Xlog:cds+dynamic=off")


LB_STAGE_PREFIX = ".lb-stage-"
LB_STAGE_LIMITS = (20_000, 256 << 20)  #: files and bytes a staged workspace may hold


def stage_files(root: str, target: str, roots: Sequence[str]) -> int:
    """Copy the files of ``root`` a plan depends on (``lb_files``) to ``target``, readable
    by everyone but writable by no one else (the stage itself is private to the server
    user); a symlink is copied as its target's content only when that lies under ``roots``.
    Returns how many files were copied; a file that cannot be read is named in the error."""
    real_roots = [os.path.realpath(r).rstrip("/") + "/" for r in roots]
    copied, total = 0, 0
    for path in lb_files(root):
        real = os.path.realpath(path)
        if not any(real.startswith(r) for r in real_roots):
            log.info("liquibase stage: %s leads outside the workspace: not staged", path)
            continue
        try:
            data = read_regular_file(path, LB_STAGE_LIMITS[1] + 1, follow=True)
        except OSError as exc:
            if os.path.exists(real) and not os.path.isfile(real):
                continue  # a FIFO or socket is no changelog
            raise invalid_argument("cannot read a Liquibase file",
                                   f"{path}: {exc.strerror or exc}") from None
        copied, total = copied + 1, total + len(data)
        if copied > LB_STAGE_LIMITS[0] or total > LB_STAGE_LIMITS[1]:
            raise invalid_argument(
                "workspace too large to stage for Liquibase",
                f"{root} holds more than {LB_STAGE_LIMITS[0]} files or {LB_STAGE_LIMITS[1]}"
                " bytes; make it readable by the server user instead")
        dest = os.path.join(target, os.path.relpath(path, root))
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        write_file_in(os.path.dirname(dest), os.path.basename(dest), data, 0o644)
    os.makedirs(target, mode=0o755, exist_ok=True)
    for directory, subdirs, _names in os.walk(target):
        for name in [directory, *(os.path.join(directory, d) for d in subdirs)]:
            os.chmod(name, 0o755)
    return copied


def relocate_lb_option(token: str, moved: Mapping[str, str]) -> str:
    """``token`` with the paths of its workspace options moved to their staged copies."""
    name, eq, value = token.partition("=")
    if not eq or name not in LB_PATH_FLAGS + LB_SEARCH_FLAGS:
        return token

    def move(path: str) -> str:
        for root in sorted(moved, key=len, reverse=True):
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return moved[root] + path[len(root):]
        return path

    return f"{name}={','.join(map(move, value.split(',')))}"


def state_ready(store: MetadataStore, state_id: str) -> bool:
    """Whether the state has a row and was published whole."""
    state = store.get_state(state_id)
    return bool(state and is_published(state.state_dir))


def discard_quietly(instances: InstanceManager, run: JobRun, handle: RuntimeHandle) -> None:
    """Discard a job's runtime; a failure is logged (the job's outcome stands; the next
    start sweeps what is left)."""
    try:
        instances.discard(handle)
    except Exception:
        log.exception("job %s: cannot discard its runtime %s", run.job_id, handle.key)


class LiquibaseRunner:
    """Runs Liquibase on this machine against a started runtime: as the server's OS user
    when the engine is root, in the request's work dir, connected over JDBC to 127.0.0.1 with
    a password that only its environment sees (set on the runtime for the run).

    The first run of an installation records the classes its JVM loads in an archive under
    ``archive_dir`` (owned by the user Liquibase runs as); later runs map it instead of
    loading them again (≈ 15 % less JVM start). A JVM that cannot use it ignores it."""

    def __init__(self, instances: InstanceManager, dbms: PostgresDbms, archive_dir: str,
                 stage_root: str | None = None) -> None:
        self.instances = instances
        self.dbms = dbms
        self.archive_dir = archive_dir
        #: where workspaces the server user may not enter are staged (None: never needed)
        self.stage_root = stage_root
        #: guards ``_recording`` (archive paths a run is writing right now)
        self._lock = threading.Lock()
        self._recording: set[str] = set()

    def _java_opts(self, lb: LiquibasePlan) -> tuple[str, str, str | None]:
        """JAVA_OPTS for a run, the archive, and the temporary file the run records it in
        (None: the archive exists or another run records it)."""
        key = hash_records(*lb_install_records(lb))
        archive = os.path.join(self.archive_dir, f"{key[:32]}.jsa")
        if os.path.exists(archive):
            return f"{LIQUIBASE_JAVA_OPTS} -XX:SharedArchiveFile={archive}", archive, None
        with self._lock:
            if archive in self._recording or not self._archive_dir_ready():
                return LIQUIBASE_JAVA_OPTS, archive, None
            self._recording.add(archive)
        recording = f"{archive}.{random_hex(4)}.tmp"
        return f"{LIQUIBASE_JAVA_OPTS} -XX:ArchiveClassesAtExit={recording}", archive, recording

    def _archive_dir_ready(self) -> bool:
        try:
            os.makedirs(self.archive_dir, mode=0o700, exist_ok=True)
            os.chown(self.archive_dir, self.dbms.user.uid, self.dbms.user.gid)
            return True
        except OSError as exc:
            log.warning("no class archive for Liquibase: %s", exc)
            return False

    def _keep_archive(self, archive: str, recording: str, succeeded: bool) -> None:
        try:
            if succeeded and os.path.exists(recording):
                os.replace(recording, archive)
            elif os.path.lexists(recording):
                os.unlink(recording)
        except OSError as exc:
            log.warning("cannot keep Liquibase's class archive %s: %s", archive, exc)
        with self._lock:
            self._recording.discard(archive)

    def run(self, lb: LiquibasePlan, handle: RuntimeHandle, args: Sequence[str],
            note: Callable[[str], None], run: JobRun | None) -> str:
        """Run it to the end, forwarding its output as ``liquibase:`` lines; its stdout."""
        java_opts, archive, recording = self._java_opts(lb)
        code = -1
        try:
            with self._staged(lb, args, note) as (cwd, staged_args):
                output, code = self._run(lb, handle, staged_args, cwd, java_opts, note, run)
        finally:
            if recording:
                self._keep_archive(archive, recording, succeeded=code == 0)
        if code != 0:
            raise JobFailure("internal_error", "liquibase execution failed", output)
        return output

    @contextlib.contextmanager
    def _staged(self, lb: LiquibasePlan, args: Sequence[str], note: Callable[[str], None]
                ) -> Iterator[tuple[str, list[str]]]:
        """The directory Liquibase runs in and its arguments. When the server user may not
        enter the work dir or a search path (a private workspace of a root engine), they are
        a read-only copy, made for this run, of exactly the files the plan key hashes, with
        their relative paths (so the paths Liquibase records do not change)."""
        roots = lb_roots(lb)
        if self.stage_root is None or all(map(self.dbms.user.can_enter, roots)):
            yield lb.work_dir, list(args)
            return
        stage = os.path.join(self.stage_root, f"{LB_STAGE_PREFIX}{random_hex(8)}")
        os.mkdir(stage, 0o700)
        try:
            moved = {root: os.path.join(stage, str(index)) for index, root in enumerate(roots)}
            count = sum(stage_files(root, target, roots) for root, target in moved.items())
            os.chown(stage, self.dbms.user.uid, self.dbms.user.gid)  # only it may enter
            note(f"liquibase: staged {count} files of a workspace the server user can not"
                 " read")
            yield moved[lb.work_dir], [relocate_lb_option(token, moved) for token in args]
        finally:
            remove_tree(stage)

    def _run(self, lb: LiquibasePlan, handle: RuntimeHandle, args: Sequence[str], cwd: str,
             java_opts: str, note: Callable[[str], None], run: JobRun | None
             ) -> tuple[str, int]:
        """Liquibase's exit status and its stdout, or its output's tail when it failed."""
        password = self.instances.set_password(handle)
        env = self.dbms.server_env(**{
            **{key: os.environ[key] for key in ("JAVA_HOME",) if key in os.environ},
            "JAVA_OPTS": java_opts, **lb.env, "LIQUIBASE_SHOW_BANNER": "false",
            "LIQUIBASE_COMMAND_URL": f"jdbc:postgresql://127.0.0.1:{handle.port}/postgres",
            "LIQUIBASE_COMMAND_USERNAME": SUPERUSER, "LIQUIBASE_COMMAND_PASSWORD": password})
        if not self.dbms.user.is_self:
            env["HOME"] = tempfile.gettempdir()
        note(f"liquibase: exec {shlex.join([lb.exec_path, *args])}")
        note("liquibase: start")
        argv, as_user = self.dbms.as_server_user([lb.exec_path, *args])
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, **as_user)
        stdout: list[str] = []
        lines: list[str] = []
        with run.client(HostClient(proc, None)) if run else contextlib.nullcontext(
                HostClient(proc, None)) as client:
            for stream, raw in client.lines():
                line = raw.decode("utf-8", "replace").rstrip("\n").replace(password, "*****")
                (stdout if stream == "stdout" else lines).append(line)
                if line.strip():
                    note(f"liquibase: {line.strip()}")
            code = client.wait()
        if run:
            run.check()
        if code != 0:
            return "\n".join([*stdout, *lines])[-OUTPUT_TAIL_BYTES:], code
        return "\n".join(stdout), code


class LiquibasePlanner:
    """What a Liquibase prepare needs before its steps run: the changesets its changelog
    would apply to a fresh cluster (``changesets``: one ``update-sql`` run on a throw-away
    clone of the image's base, remembered by the hashes of the files it read), and step 0
    run ahead meanwhile when it is probably not cached (``run.ahead``, kept only if it applied
    exactly the plan's first changeset). ``run_changeset`` runs one step's changesets."""

    def __init__(self, jobs: JobQueue, store: MetadataStore, runtimes: Runtimes,
                 instances: InstanceManager, cache: CacheManager,
                 liquibase: LiquibaseRunner) -> None:
        self.jobs = jobs
        self.store = store
        self.runtimes = runtimes
        self.instances = instances
        self.cache = cache
        self.liquibase = liquibase

    def changesets(self, lb: LiquibasePlan, image: ResolvedImage,
                            emit: EventEmitter | None, run: JobRun | None) -> list[Changeset]:
        """Every changeset the changelog would apply to a fresh cluster of ``image``, by one
        ``update-sql`` run against a throw-away clone of its base. A job that will likely
        build its first step runs that step meanwhile (see ``_run_ahead``)."""
        note = emit.log if emit else (lambda _message: None)
        key, command_key = lb_plan_keys(lb, image.resolved_id)
        cached = self.jobs.lb_plan(key) if key else None
        if cached is not None:
            note(f"liquibase: plan unchanged since its files were hashed ({len(cached)}"
                 " changesets): no Liquibase run")
            return [Changeset(**item) for item in cached]
        base = run.base.result() if run and run.base else self.runtimes.ensure_base(image, note)
        ahead = None
        if run and run.base and emit and self._worth_running_ahead(command_key, image):
            ahead = in_background("lb-ahead", self._run_ahead, lb, image, base, run, emit)
        handle = self.instances.new_runtime(random_hex(16), image, base, "plan")
        try:
            self.instances.start(handle)
            stdout = self.liquibase.run(lb, handle, lb.args_for("update-sql"), note, run)
            changesets = parse_update_sql(stdout)
            note(f"liquibase: {len(changesets)} changesets in the plan")
        finally:
            self.instances.discard(handle)
            if run and ahead:
                run.ahead = ahead.result()  # dropped with the job's runtime if anything fails
        if run and run.ahead:
            self._check_ahead(run, changesets[0] if changesets else None, note)
        plan = [dataclasses.asdict(c) for c in changesets]
        if key and lb_plan_files_hashed(lb, changesets):
            self.jobs.save_lb_plan(key, plan)
        elif key:
            note("liquibase: the changelog reaches files outside work_dir and the search"
                 " paths: the plan is made again next time")
        self.jobs.save_lb_plan(command_key, plan)
        return changesets

    def _worth_running_ahead(self, command_key: str, image: ResolvedImage) -> bool:
        """Whether step 0 is probably not cached: unless the command's latest plan began with
        a step that is (a changeset appended to a known changelog), running it ahead of the
        plan saves a whole Liquibase run."""
        latest = self.jobs.lb_plan(command_key)
        if not latest:
            return True
        first = lb_task_hash(image.resolved_id, Changeset(**latest[0]))
        return not state_ready(self.store, state_id_for("image", image.resolved_id, first))

    def _run_ahead(self, lb: LiquibasePlan, image: ResolvedImage, base: str, run: JobRun,
                   emit: EventEmitter) -> RuntimeHandle | None:
        """Step 0 while Liquibase plans: ``update-count --count=1`` on the job's runtime, a
        clone of the base. The started runtime, or None when that run failed (step 0 then
        runs again in order and reports)."""
        def note(message: str) -> None:
            emit.log(message.replace("liquibase: ", "liquibase: [execute-0] ", 1))

        self.cache.before_build()
        handle = self.instances.new_runtime(derived_instance_id(run.job_id), image, base,
                                            image.resolved_id, run.job_id)
        try:
            self.instances.start(handle)
            self.run_changeset(lb, handle, lb.args_for("update-count", "--count=1"), run, note)
            return handle
        except BaseException as exc:
            discard_quietly(self.instances, run, handle)
            if not isinstance(exc, Exception):
                raise
            log.info("job %s: step 0 run ahead of the plan failed: %s", run.job_id, exc)
            return None

    def _check_ahead(self, run: JobRun, first: Changeset | None,
                     note: Callable[[str], None]) -> None:
        """Keep the run ahead only if it applied exactly the plan's first changeset."""
        assert run.ahead is not None
        try:
            row = self.instances.admin_sql(
                run.ahead, "SELECT count(*), min(id), min(author), min(filename), min(md5sum)"
                           " FROM databasechangelog")
        except DbmsError as exc:
            row = (0, str(exc))
        if first and row == (1, first.id, first.author, first.path, first.checksum):
            note(f"liquibase: execute-0 ran while planning: {first.summary}")
            return
        note(f"liquibase: execute-0 run while planning does not match the plan ({row}):"
             " it runs again")
        discard_quietly(self.instances, run, run.ahead)
        run.ahead = None

    def run_changeset(self, lb: LiquibasePlan, handle: RuntimeHandle, args: Sequence[str],
                       run: JobRun, note: Callable[[str], None]) -> None:
        self.liquibase.run(lb, handle, args, note, run)
        self.instances.clear_password(handle)  # the state must not keep a credential


class Executor:
    """Plans and executes prepare jobs; every change is persisted before it is announced."""

    def __init__(self, jobs: JobQueue, store: MetadataStore, layout: StoreLayout,
                 runtimes: Runtimes, instances: InstanceManager, snapshots: SnapshotManager,
                 cache: CacheManager, pool: WarmPool, remote: RemoteCache,
                 lb_planner: LiquibasePlanner, engine_version: str) -> None:
        self.jobs = jobs
        self.cache = cache
        self.remote = remote
        self.pool = pool
        self.store = store
        self.layout = layout
        self.runtimes = runtimes
        self.instances = instances
        self.snapshots = snapshots
        self.engine_version = engine_version
        self.lb_planner = lb_planner

    # planning -----------------------------------------------------------------------------
    def check_image(self, image_id: str) -> None:
        """Refuse at submission an image id no job could use (see ``Runtimes.check_image``)."""
        self.runtimes.check_image(image_id)

    def state_ready(self, state_id: str) -> bool:
        return state_ready(self.store, state_id)

    def plan(self, request: PrepareRequest, emit: EventEmitter | None,
             run: JobRun | None = None
             ) -> tuple[ResolvedImage, list[StepPlan], str, list[PlanTask]]:
        """Resolve the image and hash the scripts; a job's base cluster is initialised
        meanwhile, in the background, since it does not depend on the scripts."""
        if emit:
            emit.log(f"resolve image {request.image_id}")
        image = self.runtimes.resolve(request.image_id, emit.log if emit else None)
        if emit:
            emit.log(f"resolved image {image.resolved_id}")
        if emit and run and not request.plan_only and self.remote.client("pull") is None:
            # with a remote cache the base may never be needed: a build initialises it then
            run.base = in_background("base-init", self.runtimes.ensure_base, image, emit.log)
        if request.lb is None:
            steps, signature = plan_steps(request, image.resolved_id, self.engine_version)
        else:
            changesets = self.lb_planner.changesets(request.lb, image, emit, run)
            steps, signature = plan_lb_steps(request, image.resolved_id, self.engine_version,
                                             changesets)
        tasks = build_tasks(request, image.resolved_id, steps, self.state_ready)
        return image, steps, signature, tasks

    # execution ----------------------------------------------------------------------------
    def run(self, job: JobRow, request: PrepareRequest, run: JobRun,
            retain: Callable[[str, bool], None]) -> None:
        emit = EventEmitter(self.jobs, job.job_id)
        emit.emit({"type": "status", "status": "running"}, status="running",
                  started_at=format_ts(), attempts=job.attempts + 1,
                  prepare_args_normalized=request.normalized)
        # the job's pin (``_pin_state`` replaces what it holds) and its build servers end
        # with the job (the failure paths drop the servers first, before saying so)
        with emit.heartbeat(), self.instances.holding(job.job_id, set()), \
                self._building(run):
            try:
                result = self._run_tasks(job, request, run, emit, retain)
                self._retain_finishing(run, retain)
                fields: JobColumns = {"status": "succeeded", "finished_at": format_ts()}
                if result:
                    fields["result_json"] = json.dumps(result)
                more = [{"type": "result", "result": result}] if result else []
                emit.emit({"type": "status", "status": "succeeded"}, *more, **fields)
            except EngineStopping:
                self._interrupt(job, run, emit)
            except EngineError as exc:
                self._retain_finishing(run, retain)
                self._fail(job.job_id, run, emit, exc.body())
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    log.exception("job %s crashed", job.job_id)
                failure = disk_full("no space left for the build", str(exc)) \
                    if exc.errno == errno.ENOSPC else internal_error(str(exc))
                self._fail(job.job_id, run, emit, failure.body())
            except Exception as exc:
                log.exception("job %s crashed", job.job_id)
                self._fail(job.job_id, run, emit,
                           internal_error(str(exc)).body())

    @staticmethod
    def _retain_finishing(run: JobRun, retain: Callable[[str, bool], None]) -> None:
        """Retention before the terminal event, so a client that saw it sees the result."""
        if run.signature:
            try:
                retain(run.signature, True)
            except Exception:
                log.exception("retention failed for job %s", run.job_id)

    def _drop_ahead(self, run: JobRun) -> None:
        """Drop step 0 run ahead of the plan (another job built that state, or this one
        ends)."""
        if run.ahead:
            discard_quietly(self.instances, run, run.ahead)
            run.ahead = None

    @contextlib.contextmanager
    def _building(self, run: JobRun) -> Iterator[None]:
        """The job's build servers (its runtime and step 0 run ahead) are discarded when the
        block ends, on every path: a successful job has handed its last one to its
        instance."""
        try:
            yield
        finally:
            self._drop_runtime(run)

    def _drop_runtime(self, run: JobRun) -> None:
        self._drop_ahead(run)
        if run.runtime:
            discard_quietly(self.instances, run, run.runtime)
            run.runtime = None

    def _interrupt(self, job: JobRow, run: JobRun, emit: EventEmitter) -> None:
        """A graceful stop: no half state, the job stays queued and does not count as a crash."""
        self._drop_runtime(run)
        emit.emit({"type": "log", "message": "engine stopping: the job resumes at the next start"},
                  status="queued", attempts=job.attempts)

    def _fail(self, job_id: str, run: JobRun, emit: EventEmitter, error: ErrorBody) -> None:
        self._drop_runtime(run)
        for _job, task in self.jobs.list_tasks(job_id):
            if task.status == "running":
                emit.task(task.task_id, "failed", error)
        emit.emit({"type": "status", "status": "failed"}, {"type": "error", "error": error},
                  status="failed", finished_at=format_ts(), error_json=json.dumps(error))

    def _run_tasks(self, job: JobRow, request: PrepareRequest, run: JobRun, emit: EventEmitter,
                   retain: Callable[[str, bool], None]) -> JsonDict | None:
        image, steps, signature, tasks = self.plan(request, emit, run)
        self.jobs.replace_tasks(job.job_id, tasks)
        self.jobs.update_job(job.job_id, signature=signature)
        run.signature = signature
        retain(signature, False)
        for task in tasks:
            run.check()
            emit.task(task.task_id, "running")
            if request.plan_only or task.type in ("plan", "resolve_image"):
                emit.task(task.task_id, "succeeded")
            elif task.step is not None:  # a state_execute task
                cached = self._execute_step(job, request, image, steps[task.step:], run, emit)
                emit.task(task.task_id, "succeeded", cached=cached)
            else:
                return self._prepare_instance(job, request, image, steps[-1], run, emit)
        return None

    def _execute_step(self, job: JobRow, request: PrepareRequest, image: ResolvedImage,
                      ahead: Sequence[StepPlan], run: JobRun, emit: EventEmitter) -> bool:
        """Make the state of ``ahead[0]`` (the steps after it are what the remote cache may
        bring at once); True when it was not built here."""
        step = ahead[0]
        if self.state_ready(step.state_id):
            self._drop_ahead(run)
            return True
        lock = os.path.join(self.layout.states_dir(image), ".build", f"{step.state_id}.lock")
        with file_lock(lock):
            if self.state_ready(step.state_id) or self._pulled(image, ahead, run, emit):
                self._drop_ahead(run)
                return True
            run.check()
            if step.input_kind == "state":
                self._pin_state(job.job_id, step.input_id)
            if run.ahead:  # step 0, already run while Liquibase planned
                run.runtime, run.ahead = run.ahead, None
                handle = run.runtime
            else:
                self.cache.before_build()
                handle = self._runtime_for(job, request, image, step.input_kind,
                                           step.input_id, run, emit)
                if request.lb is None:
                    self._run_psql(request, handle, step, run, emit)
                elif step.changeset is not None:
                    self.lb_planner.run_changeset(request.lb, handle, step.args, run, emit.log)
            run.check()
            self._snapshot(image, handle, step, request.prepare_kind, emit)
            self.instances.pin_runtime(job.job_id, handle)  # the new state: the job's next
            self.cache.enforce("after_snapshot")             # input, never an eviction's
            return False

    def _pulled(self, image: ResolvedImage, ahead: Sequence[StepPlan], run: JobRun,
                emit: EventEmitter) -> bool:
        """Whether the remote cache brought ``ahead[0]``'s state (the deepest of ``ahead``
        it has comes with its chain); the registry is asked once per job and state."""
        wanted = [step.state_id for step in ahead if step.state_id not in run.remote_missing]
        if not wanted or wanted[0] != ahead[0].state_id:
            return False
        if not self.remote.pull(image, wanted, emit.log, {ahead[0].state_id}, run.check):
            run.remote_missing.update(wanted)
        return self.state_ready(ahead[0].state_id)  # a pull cut short may have brought it

    def remote_has(self, state_ids: Sequence[str]) -> set[str]:
        """Which of ``state_ids`` the remote cache has (none when pull is off or it cannot
        be asked)."""
        try:
            found = {state_id for state_id in state_ids if self.remote.lookup([state_id])}
        except Exception as exc:  # an explain never fails for the remote's sake
            log.info("remote: cannot tell what it has: %s", exc)
            return set()
        return found

    def _pin_state(self, job_id: str, state_id: str) -> StateRow:
        """Protect a job's input state from deletion and eviction before it is used."""
        state = self.store.get_state(state_id)
        if state is not None:
            self.instances.pin(job_id, {state.state_dir})
        if state is None or self.store.get_state(state_id) is None:
            raise JobFailure("internal_error", "input state disappeared", state_id)
        return state

    def _runtime_for(self, job: JobRow, request: PrepareRequest, image: ResolvedImage,
                     input_kind: str, input_id: str, run: JobRun, emit: EventEmitter,
                     serving: bool = False) -> RuntimeHandle:
        """The job's runtime holding ``input_id``'s content, started (as an instance's server
        when ``serving``)."""
        if run.runtime and run.runtime.content_id != input_id:
            self.instances.discard(run.runtime)
            run.runtime = None
        if run.runtime is None:
            if input_kind == "image":
                source = (run.base.result() if run.base
                          else self.runtimes.ensure_base(image, emit.log))
            else:
                state = self._pin_state(job.job_id, input_id)
                source = self.snapshots.source_of(state.state_dir)
            run.runtime = self.instances.new_runtime(
                derived_instance_id(job.job_id), image, source, input_id, job.job_id)
            self.instances.pin_runtime(job.job_id, run.runtime)
            emit.log(f"{image.runtime_kind}: runtime cloned ({self.snapshots.backend})")
        if not run.runtime.runtime.alive(run.runtime):
            run.runtime.serving = serving
            self.instances.start(run.runtime)
            emit.log(f"{image.runtime_kind}: postgres ready on port {run.runtime.port}")
        return run.runtime

    def _run_psql(self, request: PrepareRequest, handle: RuntimeHandle, step: StepPlan,
                  run: JobRun, emit: EventEmitter) -> None:
        runtime = handle.runtime
        args = list(step.args)
        if step.script is not None:  # ends with -f <path or ->
            args[-1] = "-"
        emit.log("psql: start")
        assert request.plan is not None
        spawned = runtime.client(handle, "psql", args, step.script, request.plan.work_dir,
                                 merged=True)
        pause_point("psql-spawned")
        with run.client(spawned) as proc:
            output = collect_output(proc, emit.log, "psql: ")
            code = proc.wait()
        run.check()
        if code != 0 and re.search(r"No space left on device|could not extend file", output):
            raise disk_full("no space left for the build", output[-4000:])
        if code != 0:
            raise JobFailure("internal_error", "psql execution failed", output)

    def _snapshot(self, image: ResolvedImage, handle: RuntimeHandle, step: StepPlan,
                  kind: str, emit: EventEmitter) -> None:
        emit.log("pg_ctl: stop for snapshot")
        self.instances.stop(handle)
        layer = self.snapshots.layer_size(handle.runtime_dir)  # None: a copy is published
        self.cache.before_snapshot(
            self.snapshots.content_size(handle.runtime_dir, handle.data_dir) if layer is None
            else layer)
        emit.log("snapshot: start")
        final_dir = self.layout.state_dir(image, step.state_id)
        remove_tree(final_dir)
        try:
            if layer is None:
                size = self.snapshots.publish(handle.runtime_dir, handle.data_dir, final_dir,
                                              partial(handle.runtime.copy_out, handle))
                self.snapshots.rebase(handle.runtime_dir, handle.key, image.owner, final_dir)
            else:
                size = self.snapshots.publish_layer(handle.runtime_dir, handle.key, image.owner,
                                                    final_dir)
            self.store.insert_state(StateRow(
                state_id=step.state_id,
                parent_state_id=step.input_id if step.input_kind == "state" else None,
                image_id=image.resolved_id, prepare_kind=kind,
                prepare_args_normalized=step.normalized, created_at=format_ts(),
                size_bytes=size, last_used_at=None, use_count=0,
                state_dir=final_dir,
            ))
            self.remote.queue_push(step.state_id)
        except BaseException as exc:  # a full disk (files or SQLite) or anything else:
            remove_tree(final_dir)      # no state directory without its row
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise disk_full("no space left for the new state", str(exc),
                                state_id=step.state_id) from exc
            raise
        handle.content_id = step.state_id
        emit.log("snapshot: complete")

    def _prepare_instance(self, job: JobRow, request: PrepareRequest, image: ResolvedImage,
                          last: StepPlan, run: JobRun, emit: EventEmitter) -> JsonDict:
        with self.pool.handout(last.state_id, take=run.runtime is None) as pooled:
            if pooled:
                emit.log("instance: from the warm pool")
            handle = pooled or self._runtime_for(job, request, image, "state", last.state_id,
                                                 run, emit, serving=True)
            row = self.instances.register(handle, last.state_id, job.job_id,
                                          request.ttl_seconds,
                                          handle.password or self.instances.set_password(handle))
        run.runtime = None
        emit.log(f"instance created {row.instance_id}")
        emit.task("prepare-instance", "succeeded")
        return {
            "dsn": handle.dsn(None),  # stored and streamed without the password
            "instance_id": row.instance_id, "state_id": last.state_id,
            "image_id": image.resolved_id, "prepare_kind": request.prepare_kind,
            "prepare_args_normalized": request.normalized,
        }


def collect_output(proc: ClientProcess, log_line: Callable[[str], None], prefix: str) -> str:
    """Forward output lines as log events (every line at first, then at most two a second,
    each forwarded line saying how many it stands for; the last line is always forwarded)
    and return the output's tail for error details."""
    tail = bytearray()
    skipped = 0
    last_flush = time.monotonic()
    line = ""
    for count, (_stream, raw) in enumerate(proc.lines(), start=1):
        tail += raw
        if len(tail) > OUTPUT_TAIL_BYTES:
            del tail[: len(tail) - OUTPUT_TAIL_BYTES]
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if count <= LOG_LINES_IN_FULL or time.monotonic() - last_flush >= 0.5:
            log_line(prefix + line + (f" (+{skipped} lines)" if skipped else ""))
            skipped, last_flush = 0, time.monotonic()
        else:
            skipped += 1
    if skipped:  # the end of a step's output always arrives
        log_line(prefix + line + (f" (+{skipped - 1} lines)" if skipped > 1 else ""))
    return tail.decode("utf-8", "replace")



###############################################################################
# prepare manager: submit, status, cancel, list, delete, retention and restart recovery of
# prepare jobs. Owns the worker pool and the in-memory JobRun table; may
# call config, queue, store, runtime, instances, deletion, planner, executor.
###############################################################################

MAX_CRASH_ATTEMPTS = 3


class JobFields(TypedDict):
    """What every view of a prepare job shows."""
    job_id: Hex32
    status: JobStatus
    prepare_kind: Kind
    image_id: Annotated[str, Doc("As requested.")]
    prepare_args_normalized: NotRequired[str | None]
    created_at: Timestamp
    started_at: NotRequired[Timestamp | None]
    finished_at: NotRequired[Timestamp | None]


class PrepareJobStatus(JobFields):
    """``GET /v1/prepare-jobs/{id}``: a job, its plan and its outcome."""
    plan_only: NotRequired[Annotated[bool | None, Doc("Omitted when false.")]]
    tasks: NotRequired[list[TaskEntry] | None]
    result: NotRequired[PrepareJobResult | None]
    error: NotRequired[ErrorBody | None]


class PrepareJobEntry(JobFields):
    """``GET /v1/prepare-jobs`` items."""
    resolved_image_id: NotRequired[str | None]
    signature: NotRequired[Hex64 | None]
    plan_only: bool


class ExplainStep(TypedDict):
    index: Count
    state_id: Hex64
    cached: bool
    remote: NotRequired[Annotated[bool | None, Doc(
        "Not here, but the remote cache has it: a prepare pulls it instead of building it.")]]


class CacheExplain(TypedDict):
    """Would this prepare be a cache hit? (nothing is run)"""
    decision: Annotated[str, Doc(enum=["hit", "miss"])]
    reason_code: Annotated[str, Doc(enum=["exact_state_match", "no_matching_state"])]
    signature: Hex64
    matched_state_id: NotRequired[Annotated[Hex64, Doc("Only on a hit.")]]
    resolved_image_id: str
    reason: NotRequired[Annotated[str, Doc("On a miss: where the chain stops.")]]
    first_missing_step: NotRequired[Annotated[Count, Doc("On a miss: first uncached step.")]]
    steps: list[ExplainStep]


class PrepareManager:
    """Accepts prepare jobs and runs them on a thread pool, several at once."""

    def __init__(self, jobs: JobQueue, executor: Executor, config: ConfigManager,
                 instances: InstanceManager, workers: int = 4) -> None:
        self.jobs = jobs
        self.executor = executor
        self.config = config
        self.instances = instances
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._runs: dict[str, JobRun] = {}
        #: guards ``_runs`` (job id → its in-memory JobRun while a worker runs it)
        self._lock = threading.Lock()
        self.cwd = os.getcwd()

    # submit / run -------------------------------------------------------------------------
    def submit(self, body: Any) -> JobRow:
        request = PrepareRequest.parse(body, self.cwd)
        self.executor.check_image(request.image_id)
        job = JobRow(
            job_id=random_hex(16), status="queued", prepare_kind=request.prepare_kind,
            image_id=request.image_id, plan_only=request.plan_only,
            prepare_args_normalized=request.normalized, signature=None,
            request_json=json.dumps(request.to_json()), created_at=format_ts(),
            started_at=None, finished_at=None, result_json=None, error_json=None, attempts=0,
        )
        self.jobs.create_job(job)
        self._start(job, request)
        return job

    def _start(self, job: JobRow, request: PrepareRequest) -> None:
        run = JobRun(job.job_id)
        with self._lock:
            self._runs[job.job_id] = run
        self._pool.submit(self._run, job, request, run)

    def _run(self, job: JobRow, request: PrepareRequest, run: JobRun) -> None:
        try:
            self.executor.run(job, request, run, lambda sig, finishing: self.apply_retention(
                sig, job.job_id, finishing))
        except Exception:
            log.exception("job %s runner failed", job.job_id)
        finally:
            with self._lock:
                self._runs.pop(job.job_id, None)
            run.done.set()

    def explain(self, body: Any) -> CacheExplain:
        """Plan without running anything: would this prepare be a cache hit?"""
        request = PrepareRequest.parse(body, self.cwd)
        image, steps, signature, _tasks = self.executor.plan(request, None)
        ready = [self.executor.state_ready(step.state_id) for step in steps]
        out = CacheExplain(
            decision="hit", reason_code="exact_state_match", signature=signature,
            resolved_image_id=image.resolved_id,
            steps=[ExplainStep(index=step.index, state_id=step.state_id, cached=cached)
                   for step, cached in zip(steps, ready, strict=True)])
        remote = self.executor.remote_has(
            [step.state_id for step, cached in zip(steps, ready, strict=True) if not cached])
        for item in out["steps"]:
            if item["state_id"] in remote:
                item["remote"] = True
        if ready[-1]:
            out["matched_state_id"] = steps[-1].state_id
            return out
        first = ready.index(False)
        out["decision"], out["reason_code"] = "miss", "no_matching_state"
        out["first_missing_step"] = first
        out["reason"] = ("no state for the first step" if first == 0 else
                         f"the chain stops at step {first}: steps before it are cached")
        if remote:
            out["reason"] += f"; {len(remote)} missing step(s) would come from the remote cache"
        return out

    def busy(self) -> bool:
        with self._lock:
            if self._runs:
                return True
        return bool(self.jobs.jobs_in(("queued", "running")))

    def shutdown(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.end(stopping=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # queries ------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRow | None:
        return self.jobs.get_job(job_id) if is_job_id(job_id) else None

    def result_json(self, job: JobRow) -> PrepareJobResult | None:
        """The stored result, its DSN completed with the instance's password (kept only with
        the instance, never in job rows or events) while the instance exists."""
        if not job.result_json:
            return None
        result: PrepareJobResult = json.loads(job.result_json)
        dsn = self.instances.dsn(result["instance_id"])
        if dsn:
            result["dsn"] = dsn
        return result

    def status_json(self, job: JobRow) -> PrepareJobStatus:
        tasks = [task.to_json() for _job, task in self.jobs.list_tasks(job.job_id)]
        return omit_none(PrepareJobStatus(
            job_id=job.job_id, status=job.status, prepare_kind=job.prepare_kind,
            image_id=job.image_id, plan_only=True if job.plan_only else None,
            prepare_args_normalized=job.prepare_args_normalized or None,
            created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, tasks=tasks or None, result=self.result_json(job),
            error=json.loads(job.error_json) if job.error_json else None,
        ))

    def entry_json(self, job: JobRow) -> PrepareJobEntry:
        resolved = next((task.resolved_image_id for _j, task in self.jobs.list_tasks(job.job_id)
                         if task.resolved_image_id), None)
        return omit_none(PrepareJobEntry(
            job_id=job.job_id, status=job.status, prepare_kind=job.prepare_kind,
            image_id=job.image_id, resolved_image_id=resolved,
            prepare_args_normalized=job.prepare_args_normalized or None,
            signature=job.signature, plan_only=job.plan_only, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at,
        ))

    # cancel / delete / retention ------------------------------------------------------------

    def cancel(self, job_id: str) -> tuple[int, PrepareJobStatus]:
        job = self.get(job_id)
        if job is None:
            raise not_found("job not found")
        if job.terminal:
            return HTTPStatus.OK, self.status_json(job)
        pause_point("cancel.after_check")
        with self._lock:
            run = self._runs.get(job_id)
        if run:
            run.end()
        elif not self._fail_stored(job_id, JobCancelled().error):
            log.info("cancel of job %s came after it ended", job_id)
        current = self.get(job_id)
        assert current
        ended = current.status == "succeeded"
        return (HTTPStatus.OK if ended else HTTPStatus.ACCEPTED), self.status_json(current)

    def delete(self, job_id: str, force: bool, dry_run: bool) -> tuple[int, DeleteResult]:
        job = self.get(job_id)
        if job is None:
            raise not_found("job not found")
        node: DeleteNode = {"kind": "job", "id": job_id}
        running = any(task.status == "running" for _j, task in self.jobs.list_tasks(job_id))
        if (running or not job.terminal) and not force:
            node["blocked"] = "active_tasks"
        status, result = delete_result(dry_run, node)
        if result["outcome"] == "deleted":
            self._delete_job(job_id)
        return status, result

    def _delete_job(self, job_id: str) -> None:
        with self._lock:
            run = self._runs.get(job_id)
        if run:
            run.end()
            run.done.wait(60)
        self.jobs.delete_job(job_id)

    def apply_retention(self, signature: str, current_job: str, finishing: bool) -> None:
        """Delete completed jobs with this signature beyond ``maxIdentical`` (a finishing job
        counts as the newest of them), then any beyond ``maxHistory`` or ``maxHistoryAge``."""
        settings = self.config.value("orchestrator.jobs")
        keep = settings["maxIdentical"]
        if keep is not None:
            others = [job for job in self.jobs.completed_with_signature(signature)
                      if job.job_id != current_job]
            for job in others[max(keep - 1 if finishing else keep, 0):]:
                self._delete_job(job.job_id)
        if finishing:
            max_age = parse_go_duration(settings["maxHistoryAge"])
            cutoff = format_ts(time.time_ns() - int(max_age * 1e9)) if max_age else ""
            kept = settings["maxHistory"]
            for job_id in self.jobs.expired_history(current_job, kept, cutoff):
                self._delete_job(job_id)

    def _fail_stored(self, job_id: str, error: ErrorBody) -> bool:
        """Fail a job that has no runner (status, then error event, in one transaction);
        False when it had ended already."""
        return self.jobs.update_job(job_id, {"type": "status", "status": "failed"},
                             {"type": "error", "error": error}, status="failed",
                             finished_at=format_ts(), error_json=json.dumps(error))

    # recovery -----------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Resume queued/running jobs after a restart (their ids are returned); give up on
        repeat offenders."""
        resumed = []
        for job in self.jobs.jobs_in(("queued", "running")):
            if job.attempts >= MAX_CRASH_ATTEMPTS:
                self._fail_stored(job.job_id, ApiError(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error",
                    "job aborted after repeated engine crashes",
                    f"the engine stopped {job.attempts} times while running this job").body())
                continue
            try:
                request = PrepareRequest.parse(json.loads(job.request_json), self.cwd)
            except (ApiError, ValueError) as exc:
                detail = exc.message if isinstance(exc, ApiError) else str(exc)
                self._fail_stored(job.job_id, ApiError(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error",
                    "cannot restore job request", detail).body())
                continue
            self.jobs.append_event(job.job_id, {"type": "log",
                                                "message": "engine restarted: resuming job"})
            self._start(job, request)
            resumed.append(job.job_id)
        return resumed



###############################################################################
# runs: psql and pgbench against an instance, output streamed live as NDJSON.
# Owns the client processes of a run; may call stream, registry, instances, runtime, planner.
###############################################################################

RUN_KINDS = ("psql", "pgbench")
PSQL_CONNECTION_FLAGS = (("-h", "-p", "-U", "-d"),
                         ("--host", "--port", "--username", "--dbname", "--database"))
PGBENCH_CONNECTION_FLAGS = (("-h", "-p", "-U", "-d"), ("--host", "--port", "--username"))


@dataclass
class RunStep:
    args: list[str]
    stdin: str | None


class RunStepBody(TypedDict):
    args: NotRequired[list[str] | None]
    stdin: NotRequired[str | None]


class RunBody(TypedDict):
    """``POST /v1/runs``: what to run on which instance (unknown fields are ignored)."""
    instance_ref: Annotated[str, Doc("Instance id or name.", minLength=1)]
    kind: Annotated[str, Doc("psql | pgbench (any case).")]
    command: NotRequired[Annotated[str | None, Doc("The kind again, or omitted.")]]
    args: NotRequired[list[str] | None]
    stdin: NotRequired[str | None]
    steps: NotRequired[Annotated[list[RunStepBody] | None, Doc("psql only: one run per step.")]]


class RunEvent(TypedDict):
    """One line of a run's NDJSON stream: start, stdout/stderr lines as they come, exit."""
    type: Annotated[str, Doc(enum=["start", "stdout", "stderr", "exit", "log", "error"])]
    ts: Timestamp
    instance_id: NotRequired[Hex32]
    data: NotRequired[str]
    exit_code: NotRequired[Annotated[int, Doc("The client's real exit code.")]]
    error: NotRequired[ErrorBody]


@dataclass
class RunRequest:
    """A validated ``POST /v1/runs`` body."""

    instance_ref: str
    kind: str
    steps: list[RunStep]

    @classmethod
    def parse(cls, body: JsonDict) -> RunRequest:
        ref = body.get("instance_ref")
        if not isinstance(ref, str) or not ref.strip():
            raise invalid_argument("instance_ref is required")
        kind = body.get("kind")
        if not isinstance(kind, str) or kind.strip().lower() not in RUN_KINDS:
            raise invalid_argument("unknown run kind", kind if isinstance(kind, str) else None)
        kind = kind.strip().lower()
        command = body.get("command")
        if command not in (None, "", kind):
            raise invalid_argument("invalid command", f"command must be {kind} or omitted")
        args = _string_list(body.get("args"), "args")
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise invalid_argument("invalid stdin", "stdin must be a string or null")
        raw_steps = body.get("steps")
        if raw_steps in (None, []):
            return cls(ref.strip(), kind, [RunStep(args, stdin)])
        if kind != "psql":
            raise invalid_argument("steps are only supported for run:psql")
        if args:
            raise invalid_argument("steps cannot be combined with args")
        if stdin is not None:
            raise invalid_argument("steps cannot be combined with stdin")
        if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
            raise invalid_argument("invalid steps", "steps must be an array of objects")
        steps = []
        for raw in raw_steps:
            step_stdin = raw.get("stdin")
            if step_stdin is not None and not isinstance(step_stdin, str):
                raise invalid_argument("invalid steps", "step stdin must be a string or null")
            steps.append(RunStep(_string_list(raw.get("args"), "steps.args"), step_stdin))
        return cls(ref.strip(), kind, steps)

    def check_connection_args(self) -> None:
        short, long = PSQL_CONNECTION_FLAGS if self.kind == "psql" else PGBENCH_CONNECTION_FLAGS
        for step in self.steps:
            args = ([option for arg in step.args for option in expand_psql_option(arg)]
                    if self.kind == "psql" else step.args)
            for arg in args:
                is_flag = bool(split_flag(arg, short, long)[0])
                if is_flag or (self.kind == "psql" and not arg.startswith("-") and "://" in arg):
                    raise conflict(f"conflicting {self.kind} connection arguments", arg)


def _string_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid_argument(f"invalid {name}", f"{name} must be an array of strings")
    return list(value)


class RunManager:
    """Executes runs (psql, pgbench) where the instance's server runs (this machine, or the
    instance's container on Docker) and streams their output live."""

    def __init__(self, registry: Registry, instances: InstanceManager) -> None:
        self.registry = registry
        self.instances = instances

    def start(self, body: JsonDict) -> Iterator[bytes]:
        """Validate and resolve (raising ApiError) before the stream begins."""
        request = RunRequest.parse(body)
        found = self.registry.resolve(request.instance_ref)
        if found is None:
            raise not_found("instance not found")
        request.check_connection_args()
        notes: list[str] = []
        handle = self.instances.ensure_running(found.instance, notes.append)
        return self._stream(request, found.instance.instance_id, handle, notes)

    def _stream(self, request: RunRequest, instance_id: str, handle: RuntimeHandle,
                notes: list[str]) -> Iterator[bytes]:
        for note in notes:
            yield json_line(RunEvent(type="log", ts=format_ts(), data=note))
        with self.instances.running(instance_id):
            yield json_line(RunEvent(type="start", ts=format_ts(), instance_id=instance_id))
            exit_code = 0
            for step in request.steps:
                exit_code = yield from self._run_step(request.kind, step, handle)
                if exit_code != 0:
                    break
            yield json_line(RunEvent(type="exit", ts=format_ts(), exit_code=exit_code))

    def _run_step(self, kind: str, step: RunStep,
                  handle: RuntimeHandle) -> Generator[bytes, None, int]:
        runtime = handle.runtime
        try:
            stdin = step.stdin.encode() if step.stdin is not None else None
            proc = runtime.client(handle, kind, step.args, stdin, "/")
        except (OSError, ApiError) as exc:
            yield json_line(RunEvent(type="error", ts=format_ts(), error=ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "run failed", str(exc)).body()))
            return 127
        finished = False
        try:
            decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                        for name in ("stdout", "stderr")}  # a long line comes in pieces
            for stream, line in proc.lines(cut=False):
                yield json_line(RunEvent(type=stream, ts=format_ts(),
                                         data=decoders[stream].decode(line)))
            finished = True
        finally:
            if not finished:
                proc.kill()
        return proc.wait()


###############################################################################
# httpapi: routing, request parsing, responses and the OpenAPI self-description.
# Owns the HTTP server and per-request state; may call every section above.
###############################################################################

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
READ_TIMEOUT_SECONDS = 30.0
LINGER_SECONDS = 2.0
DEFAULT_MAX_CONNECTIONS = 128
NOT_FOUND_TEXT = b"404 page not found\n"
STREAM_POLL_SECONDS = 0.5


@dataclass
class Response:
    """What a route answers: a complete body, or a stream of chunks sent as they come."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None


def json_response(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json_line(value, compact=False), "application/json", headers or {})


def text_not_found() -> Response:
    return Response(HTTPStatus.NOT_FOUND, NOT_FOUND_TEXT, "text/plain; charset=utf-8")


@dataclass
class Request:
    """One parsed HTTP request: method, path, query and a lazily read body."""

    method: str
    path: str
    query: dict[str, list[str]]
    header: Callable[[str], str | None]
    body: bytes
    #: copies a streamed body (an upload route's) into a file; returns its length
    upload: Callable[[typing.BinaryIO], int] | None = None

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def flag(self, name: str) -> bool:
        value = self.arg(name)
        if not value:
            return False
        try:
            return parse_go_bool(value)
        except ValueError as exc:
            raise invalid_argument(f"invalid {name}", str(exc)) from None

    def json(self) -> Any:
        return parse_json_body(self.body)

    def json_object(self) -> JsonDict:
        body = self.json()
        if not isinstance(body, dict):
            raise invalid_argument("invalid json payload", "body must be a JSON object")
        return body


def id_prefix_arg(req: Request) -> str | None:
    prefix = (req.arg("id_prefix") or "").strip()
    if not prefix:
        return None
    if len(prefix) < 8:
        raise invalid_argument("invalid id_prefix", "id_prefix must be at least 8 hex characters")
    if not re.fullmatch(r"[0-9a-fA-F]+", prefix):
        raise invalid_argument("invalid id_prefix", "id_prefix must be hex")
    return prefix.lower()


def list_response(req: Request, items: Sequence[Mapping[str, Any]]) -> Response:
    if wants_ndjson(req.header("Accept")):
        return Response(HTTPStatus.OK, b"".join(json_line(item) for item in items),
                        "application/x-ndjson")
    return json_response(HTTPStatus.OK, list(items))


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON; 400 for anything but UTF-8 JSON nested at most
    MAX_JSON_DEPTH levels (no NaN or Infinity, integers of at most 4300 digits)."""
    try:
        value = json.loads(raw.decode("utf-8") if raw else "",
                           parse_constant=_reject_json_constant, parse_float=_finite_float)
        too_deep = _nested_deeper(value, MAX_JSON_DEPTH)
        if not too_deep:  # a lone surrogate ("\ud800") is no text: nothing could store it
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError) as exc:
        raise invalid_argument("invalid json payload", str(exc)) from None
    except RecursionError:
        too_deep = True
    if too_deep:
        raise invalid_argument("invalid json payload",
                               f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _nested_deeper(value: Any, limit: int) -> bool:
    level = [value]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, dict | list)
                 for child in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


def body_length(headers: Any, limit: int = MAX_BODY_BYTES) -> int:
    """The request body's length from its framing headers; only a single non-negative
    decimal Content-Length frames a body (411 for a body without one, 413 above the limit)."""
    if headers.get("Transfer-Encoding") is not None:
        raise ApiError(HTTPStatus.LENGTH_REQUIRED, "length_required",
                       "a request body needs a Content-Length",
                       "Transfer-Encoding is not accepted")
    values = {value.strip() for value in headers.get_all("Content-Length") or []}
    if not values:
        return 0
    text = values.pop()
    if values or not re.fullmatch(r"[0-9]{1,19}", text):
        raise invalid_argument("invalid Content-Length",
                               "Content-Length must be one non-negative decimal integer")
    if int(text) > limit:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "payload_too_large",
                       "request body too large", f"limit is {limit} bytes")
    return int(text)


Handler = Callable[..., Response]


class Activity:
    """Counts requests in flight and remembers when the last one finished (idle shutdown)."""

    def __init__(self) -> None:
        #: guards ``in_flight`` and ``last_finished``
        self._lock = threading.Lock()
        self.in_flight = 0
        self.last_finished = time.monotonic()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.last_finished = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.in_flight else time.monotonic() - self.last_finished


class HealthResponse(TypedDict):
    """``GET /v1/health`` (no token needed)."""
    ok: bool
    version: str
    instanceId: Hex32
    pid: Annotated[int, Doc(minimum=1)]


class JobAccepted(TypedDict):
    """A prepare job was queued."""
    job_id: Hex32
    status_url: Annotated[str, Doc(pattern="^/v1/prepare-jobs/[0-9a-f]{32}$")]
    events_url: Annotated[str, Doc(pattern="^/v1/prepare-jobs/[0-9a-f]{32}/events$")]
    status: JobStatus


class ConfigValue(TypedDict):
    """One setting: its path and value (``null`` after removing a key without default)."""
    path: Annotated[str, Doc("Dot-separated keys with [n] indices.", minLength=1)]
    value: Any


class CreateInstanceBody(TypedDict):
    """``POST /v1/instances``: a new instance of a state."""
    state_id: Annotated[str, Doc("A state id or a unique prefix of 8+ hex digits.",
                                 pattern="^[0-9a-fA-F]{8,64}$")]
    name: NotRequired[Annotated[str | None, Doc(pattern=NAME_RE.pattern)]]
    ttl_seconds: NotRequired[Annotated[int | None, Doc(minimum=1, maximum=MAX_TTL_SECONDS)]]


class SnapshotBody(TypedDict):
    """``POST /v1/instances/{idOrName}/snapshot`` (the body is optional)."""
    name: NotRequired[Annotated[str | None, Doc("A name for the new state (unique).",
                                                pattern=NAME_RE.pattern)]]


class ResetBody(TypedDict):
    """``POST /v1/instances/{idOrName}/reset`` (the body is optional)."""
    state_id: NotRequired[Annotated[str | None, Doc(
        "A state of the instance's image (a state id or a unique prefix of 8+ hex digits);"
        " default: the instance's own state.", pattern="^[0-9a-fA-F]{8,64}$")]]


class ImportAnswer(TypedDict):
    """``POST /v1/states/import``: the bundle's states, by what became of them."""
    imported: Annotated[list[Hex64], Doc("Published here now (origin imported).")]
    present: Annotated[list[Hex64], Doc("Here already: left as they were.")]


class ResetAnswer(InstanceEntry):
    """An instance after a reset: the same id, DSN, port and password, the state's data."""
    disconnected_sessions: Annotated[Count, Doc(
        "Client sessions the reset ended (clients reconnect with the same DSN).")]


class PutNameBody(TypedDict):
    instance_id: Hex32


@dataclass(frozen=True)
class Answer:
    """A documented response: its shape (a TypedDict, ``list[...]``, None: empty body)."""

    description: str
    shape: Any = None
    media: str = "application/json"


def error_answer(description: str) -> Answer:  # a JSON error
    return Answer(description, ErrorBody)


TEXT_404 = Answer("Not found (text/plain `404 page not found`).", str, "text/plain")
NDJSON = "application/x-ndjson"
BOOL_QUERY = {"type": "string", "pattern": "^(|[01tTfF]|TRUE|true|True|FALSE|false|False)$"}
#: query and header parameters: name → (schema, description)
PARAMETERS: dict[str, tuple[JsonDict, str]] = {
    "force": (BOOL_QUERY, "Delete despite active connections or tasks."),
    "dry_run": (BOOL_QUERY, "Only say what would be deleted."),
    "recurse": (BOOL_QUERY, "Delete the state's instances and child states too."),
    "effective": (BOOL_QUERY, "Defaults merged with overrides."),
    "path": ({"type": "string"}, "Config path: dot-separated keys with [n] indices."),
    "state": ({"type": "string"}, "Exact state id."),
    "image": ({"type": "string"}, "Exact image id."),
    "instance": ({"type": "string"}, "Exact instance id."),
    "kind": ({"type": "string"}, "Exact prepare kind."),
    "job": ({"type": "string"}, "Job id (a prefix on /v1/prepare-jobs)."),
    "id_prefix": ({"type": "string"}, "At least 8 hex digits; empty means no filter."),
    "Range": ({"type": "string", "pattern": "^events=[0-9]+-$"},
              "Resume at the 0-based event index N (others: 416)."),
}
PATH_PARAMETERS = {"name": "A name bound to an instance.", "stateId": "A state id (64 hex).",
                   "jobId": "A prepare job id (32 hex).",
                   "idOrName": "GET: an instance id or name (a name redirects); DELETE: an id."}


@dataclass
class Operation:
    """One method of a route: its handler and what the OpenAPI document says of it."""

    handler: Handler
    summary: str
    answers: dict[int, Answer]
    params: tuple[str, ...] = ()
    body: Any = None
    #: the media type of a body streamed to the handler (``Request.upload``), not read whole
    upload: str | None = None


@dataclass
class Route:
    """A path template (``/v1/names/{name}``) and the operations served on it."""

    template: str
    operations: dict[str, Operation]
    auth: bool = True
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        self.pattern = re.compile(re.sub(r"\\\{\w+\\\}", "([^/]*)", re.escape(self.template)))


def json_schema(shape: Any, schemas: JsonDict, request: bool = False,
                optional: bool = False) -> JsonDict:
    """The JSON Schema of a type annotation; a TypedDict becomes a named component (closed
    for responses). An optional field's None means "omitted" in a response and ``null`` in a
    request."""
    origin, args = typing.get_origin(shape), typing.get_args(shape)
    if origin is Annotated:
        schema = json_schema(args[0], schemas, request, optional)
        for meta in args[1:]:
            schema = {**schema, **meta.keywords} if isinstance(meta, Doc) else schema
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [json_schema(a, schemas, request) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        nullable = len(options) < len(args) and (request or not optional)
        return {"anyOf": [schema, {"type": "null"}]} if nullable else schema
    if origin is list:
        return {"type": "array", "items": json_schema(args[0], schemas, request)}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], schemas, request)}
    if typing.is_typeddict(shape):
        return _component(shape, schemas, request)
    if shape is bytes:  # a file, not JSON
        return {"type": "string", "format": "binary"}
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return {"type": names[shape]} if shape in names else {}  # Any: every JSON value


def _component(shape: Any, schemas: JsonDict, request: bool) -> JsonDict:
    name = shape.__name__
    if name not in schemas:
        schemas[name] = {}  # a placeholder, so recursive shapes refer to themselves
        hints = typing.get_type_hints(shape, include_extras=True)
        # from the hints: 3.11's __optional_keys__ misses NotRequired in postponed annotations
        optional = {key for key, hint in hints.items() if typing.get_origin(hint) is NotRequired}
        properties = {key: json_schema(typing.get_args(hint)[0] if key in optional else hint,
                                       schemas, request, key in optional)
                      for key, hint in hints.items()}
        schemas[name] = {"type": "object", "properties": properties,
                         "required": [key for key in hints if key not in optional],
                         "additionalProperties": False}
        if shape.__doc__:
            schemas[name]["description"] = " ".join(shape.__doc__.split())
    if request:  # request bodies may carry fields we ignore
        schemas[name].pop("additionalProperties", None)
    return {"$ref": f"#/components/schemas/{name}"}


def _content(answer: Answer, schemas: JsonDict) -> JsonDict:
    if answer.shape is None:
        return {}
    schema = json_schema(answer.shape, schemas)
    if typing.get_origin(answer.shape) is list:  # negotiated: a JSON array or NDJSON lines
        return {"application/json": {"schema": schema}, NDJSON: {"schema": schema["items"]}}
    return {answer.media: {"schema": schema}}


def _operation(route: Route, method: str, op: Operation, schemas: JsonDict) -> JsonDict:
    answers = dict(op.answers)
    common = {403: error_answer("Host header is not a loopback name."),
              405: Answer("Method not served on this path (empty body).")}
    if route.auth:
        common |= {401: Answer("Missing or wrong bearer token (empty body)."),
                   500: error_answer("Internal error.")}
    if op.body is not None:
        common |= {400: error_answer("Invalid JSON or argument."),
                   411: error_answer("A body without Content-Length."),
                   413: error_answer("Body over the limit.")}
    elif op.params:
        common[400] = error_answer("Invalid parameter.")
    answers = {**common, **answers}
    parameters = [{"name": name, "in": "path", "required": True, "description": text,
                   "schema": {"type": "string"}}
                  for name, text in PATH_PARAMETERS.items() if f"{{{name}}}" in route.template]
    parameters += [{"name": name, "in": "header" if name[0].isupper() else "query",
                    "required": name == "path" and method == "DELETE",
                    "schema": PARAMETERS[name][0], "description": PARAMETERS[name][1]}
                   for name in op.params]
    out: JsonDict = {"operationId": op.handler.__name__, "summary": op.summary,
                     "tags": [route.template.split("/")[2] if route.auth else "meta"],
                     "parameters": parameters,
                     "responses": {str(status): {"description": answer.description,
                                                 "content": _content(answer, schemas)}
                                   for status, answer in sorted(answers.items())}}
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": json_schema(op.body, schemas, request=True)}}}
    if op.upload is not None:
        out["requestBody"] = {"required": True, "content": {op.upload: {
            "schema": json_schema(bytes, schemas)}}}
    if not route.auth:
        out["security"] = []
    return out


def openapi_document(version: str, routes: Sequence[Route]) -> JsonDict:
    """The engine's OpenAPI 3.1 document, generated from the route table and the shapes."""
    schemas: JsonDict = {}
    paths = {route.template: {method.lower(): _operation(route, method, op, schemas)
                              for method, op in route.operations.items()}
             for route in routes}
    return {
        "openapi": "3.1.0", "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "sqlrs engine", "version": version, "description": (
            "The local sqlrs engine. Errors are {code, message[, details]}; 401 and 405 have "
            "empty bodies; unknown paths are a text/plain 404. Lists are JSON arrays ([] when "
            "empty), or NDJSON when Accept names application/x-ndjson. HEAD is GET without a "
            "body; OPTIONS answers 204 with Allow.")},
        "security": [{"bearerAuth": []}], "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "Authorization: Bearer <authToken from engine.json>."}}},
    }


@dataclass
class Api:
    """The engine's HTTP endpoints; each method turns a Request into a Response using the
    managers it is given."""

    version: str
    instance_id: str
    config: ConfigManager
    store: MetadataStore
    jobs: JobQueue
    registry: Registry
    instances: InstanceManager
    deletion: DeletionManager
    cache: CacheManager
    prepare: PrepareManager
    runs: RunManager
    pool: WarmPool
    remote: RemoteCache
    routes: list[Route] = field(init=False)
    document: JsonDict = field(init=False)  #: the OpenAPI document, built once

    def __post_init__(self) -> None:
        self.routes = self._routes()
        self.document = openapi_document(self.version, self.routes)

    def _routes(self) -> list[Route]:
        op, err = Operation, error_answer
        deleted = {200: Answer("Deleted, or what a dry run would do.", DeleteResult),
                   409: Answer("Blocked (nothing deleted).", DeleteResult)}
        missing = {404: TEXT_404}
        filters = ("state", "image", "id_prefix")
        return [
            Route("/v1/health", {"GET": op(self.health, "Engine liveness and identity", {
                200: Answer("Up.", HealthResponse)})}, auth=False),
            Route("/v1/openapi.json", {"GET": op(self.openapi, "This OpenAPI document", {
                200: Answer("The document.", dict[str, Any])})}, auth=False),
            Route("/v1/config", {
                "GET": op(self.config_get, "Read the config", {
                    200: Answer("Without path: the overrides (or the effective config); with "
                                "path: that value.", ConfigValue | dict[str, Any]),
                    404: err("No such path.")}, ("path", "effective")),
                "PATCH": op(self.config_patch, "Set one setting", {
                    200: Answer("Set.", ConfigValue)}, body=ConfigValue),
                "DELETE": op(self.config_delete, "Remove one override", {
                    200: Answer("The effective value after removal.", ConfigValue),
                    404: err("No such path.")}, ("path",))}),
            Route("/v1/config/schema", {"GET": op(self.config_schema, "The config's JSON Schema",
                                                  {200: Answer("Schema.", dict[str, Any])})}),
            Route("/v1/names", {"GET": op(self.names_list, "List names", {
                200: Answer("Matching names.", list[NameEntry])}, ("instance", "state",
                                                                      "image"))}),
            Route("/v1/names/{name}", {
                "GET": op(self.name_get, "Get a name", {200: Answer("The binding.", NameEntry),
                                                        **missing}),
                "PUT": op(self.name_put, "Bind a name to an instance", {
                    200: Answer("Re-bound.", NameEntry), 201: Answer("Bound.", NameEntry),
                    404: err("No such instance.")}, body=PutNameBody),
                "DELETE": op(self.name_delete, "Unbind a name", {
                    200: Answer("The removed binding.", NameEntry),
                    404: err("No such name.")})}),
            Route("/v1/instances", {
                "GET": op(self.instances_list, "List instances", {
                    200: Answer("Matching instances.", list[InstanceEntry])}, filters),
                "POST": op(self.instances_create, "Start an instance of a state", {
                    201: Answer("Running.", InstanceEntry), 404: err("No such state."),
                    409: err("Name in use, or an ambiguous prefix.")},
                    body=CreateInstanceBody)}),
            Route("/v1/instances/{idOrName}", {
                "GET": op(self.instance_get, "Get an instance (a name redirects)", {
                    200: Answer("The instance.", InstanceEntry),
                    307: Answer("Found by name: see Location."), **missing}),
                "DELETE": op(self.instance_delete, "Delete an instance", {
                    **deleted, 404: err("No such instance.")}, ("force", "dry_run"))}),
            Route("/v1/instances/{idOrName}/snapshot", {
                "POST": op(self.instance_snapshot, "A new state of the instance's data now,"
                           " its clients connected", {
                               201: Answer("The new state (kind snapshot), a child of the"
                                           " instance's state.", StateEntry),
                               400: err("Invalid name."), 404: err("No such instance."),
                               409: err("Name in use, or the instance cannot be snapshotted"
                                        " (see details).")},
                           body=SnapshotBody)}),
            Route("/v1/instances/{idOrName}/reset", {
                "POST": op(self.instance_reset, "Reset an instance to a state in place", {
                    200: Answer("Reset: the same DSN answers with the state's data; its"
                                " client sessions were disconnected.", ResetAnswer),
                    400: err("Invalid state id."), 404: err("No such instance or state."),
                    409: err("A run uses the instance, the state is of another image or is"
                             " being deleted, or an ambiguous prefix.")},
                    body=ResetBody)}),
            Route("/v1/states", {"GET": op(self.states_list, "List states", {
                200: Answer("Matching states.", list[StateEntry])}, ("kind", "image",
                                                                        "id_prefix"))}),
            Route("/v1/states/import", {"POST": op(
                self.states_import, "Import states from an OCI image layout (a tar)", {
                    200: Answer("What was imported and what was here already.", ImportAnswer),
                    400: err("Not an OCI layout of states, or refused (see message)."),
                    411: err("A body without Content-Length."),
                    413: err("Larger than the store could take."),
                    415: err("Content-Type is not application/x-tar."),
                    507: err("No room for the states.")}, upload="application/x-tar")}),
            Route("/v1/states/{stateId}/export", {"GET": op(
                self.state_export, "The state and its ancestors as an OCI image layout", {
                    200: Answer("A tar (an OCI image layout; skopeo's oci-archive).", bytes,
                                "application/x-tar"), 404: err("No such state.")})}),
            Route("/v1/states/{stateId}", {
                "GET": op(self.state_get, "Get a state", {200: Answer("The state.", StateEntry),
                                                          **missing}),
                "DELETE": op(self.state_delete, "Delete a state (and, with recurse, its "
                             "subtree)", {**deleted, 404: err("No such state.")},
                             ("recurse", "force", "dry_run"))}),
            Route("/v1/prepare-jobs", {
                "GET": op(self.jobs_list, "List prepare jobs", {
                    200: Answer("Jobs, oldest first.", list[PrepareJobEntry])}, ("job",)),
                "POST": op(self.jobs_submit, "Submit a prepare job", {
                    201: Answer("Queued.", JobAccepted)}, body=PrepareBody)}),
            Route("/v1/prepare-jobs/{jobId}", {
                "GET": op(self.job_get, "A job's status, plan and outcome", {
                    200: Answer("The job.", PrepareJobStatus), **missing}),
                "DELETE": op(self.job_delete, "Delete a prepare job", {
                    **deleted, 404: err("No such job.")}, ("force", "dry_run"))}),
            Route("/v1/prepare-jobs/{jobId}/cancel", {"POST": op(self.job_cancel, "Cancel a job", {
                200: Answer("It had ended.", PrepareJobStatus),
                202: Answer("Cancelling.", PrepareJobStatus), 404: err("No such job.")})}),
            Route("/v1/prepare-jobs/{jobId}/events", {"GET": op(
                self.job_events, "A job's events, live (NDJSON)", {
                    200: Answer("From the first event to the job's end.", PrepareJobEvent,
                                NDJSON),
                    206: Answer("From event N on (Content-Range: events N-).",
                                PrepareJobEvent, NDJSON),
                    416: err("A Range other than events=N-."), **missing}, ("Range",))}),
            Route("/v1/tasks", {"GET": op(self.tasks_list, "List tasks of all jobs", {
                200: Answer("Tasks by job, in plan order.", list[TaskEntry])}, ("job",))}),
            Route("/v1/runs", {"POST": op(self.runs_create, "Run psql or pgbench (NDJSON)", {
                200: Answer("Live output, then the real exit code.", RunEvent, NDJSON),
                404: err("No such instance."), 409: err("Connection arguments given.")},
                body=RunBody)}),
            Route("/v1/pool", {"GET": op(self.pool_status, "The warm pool of ready instances", {
                200: Answer("Settings and what is pooled, most recently used state first.",
                            PoolStatus)})}),
            Route("/v1/cache/status", {"GET": op(self.cache_status, "Cache usage and limits", {
                200: Answer("Status.", CacheStatus)})}),
            Route("/v1/cache/explain/prepare", {"POST": op(
                self.cache_explain, "Would this prepare hit the cache?", {
                    200: Answer("Decision.", CacheExplain)}, body=PrepareBody)}),
        ]

    def match(self, path: str) -> tuple[Route, tuple[str, ...]] | None:
        for candidate in self.routes:
            found = candidate.pattern.fullmatch(path)
            if found:
                return candidate, found.groups()
        if re.fullmatch(r"/v1/(names|instances|states|prepare-jobs)/.*", path):
            return Route("", {}), ()
        return None

    # meta ---------------------------------------------------------------------------------
    def health(self, req: Request) -> Response:
        return json_response(HTTPStatus.OK, {"ok": True, "version": self.version,
                                   "instanceId": self.instance_id, "pid": os.getpid()})

    def openapi(self, req: Request) -> Response:
        return json_response(HTTPStatus.OK, self.document)

    # config -------------------------------------------------------------------------------
    def _config_path(self, req: Request, required: bool) -> str | None:
        path = req.arg("path")
        if path is None or path == "":
            if required:
                raise invalid_argument("path is required")
            return None
        try:
            parse_config_path(path)
        except ValueError as exc:
            raise invalid_argument("invalid path", str(exc)) from None
        return path

    def config_get(self, req: Request) -> Response:
        effective = req.flag("effective")
        path = self._config_path(req, required=False)
        config = self.config
        if path is None:
            tree = config.effective() if effective else config.overrides()
            return json_response(HTTPStatus.OK, tree)
        try:
            value = config.get(path, effective)
            return json_response(HTTPStatus.OK, {"path": path, "value": value})
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND, "not_found", "path not found", path) from None

    def config_patch(self, req: Request) -> Response:
        body = req.json_object()
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise invalid_argument("path is required")
        if "value" not in body:
            raise invalid_argument("invalid config value", "value is required")
        try:
            parse_config_path(path)
        except ValueError as exc:
            raise invalid_argument("invalid path", str(exc)) from None
        value = self.config.set(path, body["value"])
        return json_response(HTTPStatus.OK, {"path": path, "value": value})

    def config_delete(self, req: Request) -> Response:
        path = self._config_path(req, required=True)
        assert path is not None
        try:
            value = self.config.delete(path)
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND, "not_found", "path not found", path) from None
        return json_response(HTTPStatus.OK, {"path": path, "value": value})

    def config_schema(self, req: Request) -> Response:
        return json_response(HTTPStatus.OK, CONFIG_SCHEMA)

    # names --------------------------------------------------------------------------------
    def names_list(self, req: Request) -> Response:
        rows = self.store.list_names(req.arg("instance") or None, req.arg("state") or None,
                                       req.arg("image") or None)
        return list_response(req, [row.to_json() for row in rows])

    def name_get(self, req: Request, name: str) -> Response:
        row = self.store.get_name(name) if name else None
        return json_response(HTTPStatus.OK, row.to_json()) if row else text_not_found()

    def name_put(self, req: Request, name: str) -> Response:
        validate_name(name)
        body = req.json_object()
        ref = body.get("instance_id")
        if not isinstance(ref, str) or not ref:
            raise invalid_argument("instance_id is required")
        resolved = self.registry.resolve(ref) if is_instance_id(ref) else None
        if resolved is None or resolved.by_name:
            raise not_found("instance not found")
        created = self.store.bind_name(name, resolved.instance)
        row = self.store.get_name(name)
        assert row
        status = HTTPStatus.CREATED if created else HTTPStatus.OK
        return json_response(status, row.to_json())

    def name_delete(self, req: Request, name: str) -> Response:
        row = self.store.get_name(name) if name else None
        if row is None or not self.store.unbind_name(name):
            raise not_found("name not found")
        return json_response(HTTPStatus.OK, row.to_json())

    # instances ----------------------------------------------------------------------------
    def instances_list(self, req: Request) -> Response:
        rows = self.store.list_instances(req.arg("state") or None, req.arg("image") or None,
                                           id_prefix_arg(req))
        return list_response(req, [self.instances.entry(row) for row in rows])

    def instance_get(self, req: Request, ref: str) -> Response:
        found = self.registry.resolve(ref)
        if found is None:
            return text_not_found()
        if found.by_name:
            location = f"/v1/instances/{found.instance.instance_id}"
            return Response(HTTPStatus.TEMPORARY_REDIRECT, headers={"Location": location})
        return json_response(HTTPStatus.OK, self.instances.entry(found.instance))

    def instances_create(self, req: Request) -> Response:
        body = req.json_object()
        ref = body.get("state_id")
        if not isinstance(ref, str) or not ref.strip():
            raise invalid_argument("state_id is required")
        name = body.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid_argument("invalid name", "name must be a string")
            validate_name(name)
            if self.store.get_name(name):
                raise conflict("name already in use", name)
        ttl = parse_ttl(body.get("ttl_seconds"))
        state = self.registry.resolve_state(ref.strip())
        row = self.pool.instance(state, ttl)
        pause_point("instances.before_name")
        if name is not None and not self.store.bind_name(name, row, only_if_free=True):
            self.instances.destroy(row)
            raise conflict("name already in use", name)
        created = self.store.get_instance(row.instance_id)
        assert created
        return json_response(HTTPStatus.CREATED, self.instances.entry(created),
                             {"Location": f"/v1/instances/{row.instance_id}"})

    def _instance_and_options(self, req: Request, ref: str) -> tuple[InstanceRow, JsonDict]:
        """The instance ``ref`` names (404) and the request's optional JSON object body."""
        found = self.registry.resolve(ref)
        if found is None:
            raise not_found("instance not found")
        return found.instance, req.json_object() if req.body.strip() else {}

    def instance_snapshot(self, req: Request, ref: str) -> Response:
        instance, body = self._instance_and_options(req, ref)
        name = body.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid_argument("invalid name", "name must be a string")
            validate_name(name)
        state = self.instances.snapshot(instance, name)
        self.remote.queue_push(state.state_id)
        return json_response(HTTPStatus.CREATED, state.to_json(),
                             {"Location": f"/v1/states/{state.state_id}"})

    def instance_reset(self, req: Request, ref: str) -> Response:
        instance, body = self._instance_and_options(req, ref)
        state_ref = body.get("state_id")
        if state_ref is not None and (not isinstance(state_ref, str) or not state_ref.strip()):
            raise invalid_argument("invalid state_id", "state_id must be a state id or prefix")
        state = self.registry.resolve_state(state_ref.strip() if state_ref
                                            else instance.state_id)
        row, disconnected = self.instances.reset(instance, state)
        return json_response(HTTPStatus.OK, ResetAnswer(**self.instances.entry(row),
                                                        disconnected_sessions=disconnected))

    def instance_delete(self, req: Request, instance_id: str) -> Response:
        force, dry_run = req.flag("force"), req.flag("dry_run")
        status, result = self.deletion.delete_instance(instance_id, force, dry_run)
        return json_response(status, result)

    # states -------------------------------------------------------------------------------
    def states_list(self, req: Request) -> Response:
        rows = self.store.list_states(req.arg("kind") or None, req.arg("image") or None,
                                        id_prefix_arg(req))
        return list_response(req, [row.to_json() for row in rows])

    def state_get(self, req: Request, state_id: str) -> Response:
        row = self.store.get_state(state_id) if is_state_id(state_id) else None
        if row is None:
            return text_not_found()
        entry = row.to_json()
        if pushed := self.remote.push_status(row.state_id):
            entry["push_status"], entry["push_error"] = pushed.status, pushed.error
        return json_response(HTTPStatus.OK, omit_none(entry))

    def state_export(self, req: Request, state_ref: str) -> Response:
        row = self.registry.resolve_state(state_ref)
        bundle, done = self.remote.export(row)

        def chunks() -> Iterator[bytes]:
            try:
                with open(bundle, "rb") as handle:
                    while chunk := handle.read(BLOB_CHUNK):
                        yield chunk
            finally:
                done()

        return Response(HTTPStatus.OK, content_type="application/x-tar", stream=chunks(),
                        headers={"Content-Disposition":
                                 f'attachment; filename="sqlrs-state-{row.state_id[:12]}.tar"'})

    def states_import(self, req: Request) -> Response:
        media = (req.header("Content-Type") or "").split(";")[0].strip().lower()
        if media != "application/x-tar":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                           "an import is a tar", "Content-Type must be application/x-tar")
        assert req.upload is not None
        imported, present = self.remote.import_bundle(req.upload)
        return json_response(HTTPStatus.OK, ImportAnswer(imported=imported, present=present))

    def state_delete(self, req: Request, state_id: str) -> Response:
        recurse, force, dry_run = req.flag("recurse"), req.flag("force"), req.flag("dry_run")
        status, result = self.deletion.delete_state(state_id, recurse, force, dry_run)
        return json_response(status, result)

    # prepare jobs -------------------------------------------------------------------------
    def jobs_list(self, req: Request) -> Response:
        jobs = self.jobs.list_jobs(req.arg("job") or None)
        return list_response(req, [self.prepare.entry_json(job) for job in jobs])

    def jobs_submit(self, req: Request) -> Response:
        job = self.prepare.submit(req.json())
        url = f"/v1/prepare-jobs/{job.job_id}"
        return json_response(HTTPStatus.CREATED, {"job_id": job.job_id, "status_url": url,
                                   "events_url": f"{url}/events", "status": job.status},
                             {"Location": url})

    def job_get(self, req: Request, job_id: str) -> Response:
        job = self.prepare.get(job_id)
        if job is None:
            return text_not_found()
        return json_response(HTTPStatus.OK, self.prepare.status_json(job))

    def job_delete(self, req: Request, job_id: str) -> Response:
        force, dry_run = req.flag("force"), req.flag("dry_run")
        status, result = self.prepare.delete(job_id, force, dry_run)
        return json_response(status, result)

    def job_cancel(self, req: Request, job_id: str) -> Response:
        if not job_id:
            return text_not_found()
        status, body = self.prepare.cancel(job_id)
        return json_response(status, body)

    def job_events(self, req: Request, job_id: str) -> Response:
        if self.prepare.get(job_id) is None:
            return text_not_found()
        start = parse_events_range(req.header("Range"))
        headers = {"Accept-Ranges": "events"}
        if start is not None:
            headers["Content-Range"] = f"events {start}-"
        status = HTTPStatus.OK if start is None else HTTPStatus.PARTIAL_CONTENT
        return Response(status, content_type="application/x-ndjson",
                        headers=headers,
                        stream=self._event_stream(job_id, event_index(start or "0")))

    def _event_stream(self, job_id: str, index: int) -> Iterator[bytes]:
        jobs = self.jobs
        while True:
            since = jobs.version
            job = jobs.get_job(job_id)
            events = jobs.events(job_id, index)
            for event in events:
                yield json_line(event)
            index += len(events)
            if job is None or job.terminal:
                return
            jobs.wait_for_change(since, STREAM_POLL_SECONDS)

    def tasks_list(self, req: Request) -> Response:
        rows = self.jobs.list_tasks(req.arg("job") or None)
        return list_response(req, [task.to_json(job_id) for job_id, task in rows])

    def pool_status(self, req: Request) -> Response:
        return json_response(HTTPStatus.OK, self.pool.status())

    # cache --------------------------------------------------------------------------------
    def cache_status(self, req: Request) -> Response:
        status = self.cache.status()
        if url := self.config.value("cache.remote.url"):
            counts = self.remote.counts()
            status["remote_url"] = url
            status["remote_pushes_pending"] = counts.get("pending", 0)
            status["remote_pushes_failed"] = counts.get("failed", 0)
        return json_response(HTTPStatus.OK, status)

    def cache_explain(self, req: Request) -> Response:
        return json_response(HTTPStatus.OK, self.prepare.explain(req.json()))

    # runs ---------------------------------------------------------------------------------
    def runs_create(self, req: Request) -> Response:
        stream = self.runs.start(req.json_object())
        return Response(HTTPStatus.OK, content_type="application/x-ndjson", stream=stream)


class ReadWatch:
    """Cuts off connections that take longer than the read timeout to send a request.

    A watchdog rather than socket timeouts: a socket with a timeout costs a poll() before
    every read and write (measured: ~8 % fewer requests per second)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: guards ``_reading``: connection → when it started to send its request
        self._lock = threading.Lock()
        self._reading: dict[socket.socket, float] = {}

    def reading(self, conn: socket.socket) -> None:
        with self._lock:
            self._reading[conn] = time.monotonic()

    def done(self, conn: socket.socket) -> None:
        with self._lock:
            self._reading.pop(conn, None)

    def run(self, stopped: threading.Event) -> None:
        while not stopped.wait(min(1.0, self.timeout / 4)):
            started_before = time.monotonic() - self.timeout
            with self._lock:
                late = [c for c, since in self._reading.items() if since < started_before]
                for conn in late:
                    del self._reading[conn]
            for conn in late:
                log.info("http: a client took over %gs to send its request: cut off",
                         self.timeout)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError as exc:
                    log.debug("http: cut-off of a slow client: %s", exc)


class HttpHandler(http.server.BaseHTTPRequestHandler):
    """Applies the HTTP conventions around every route: Host check, auth, 404/405, logging."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: EngineHttpServer
    server_version = "sqlrs-engine"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing: ``_serve`` logs each request once, with its duration."""

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http: %s", printable(format % args))

    def handle_one_request(self) -> None:
        self.server.watch.reading(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.watch.done(self.connection)

    def _serve(self) -> None:
        """Answer one request. Host, route, token and method are checked from the headers
        alone, so nobody without the token makes the engine read (or hold) a body; then the
        body is read whole and the route answers. Only the answering counts as activity: a
        client that sends slowly neither keeps the engine awake nor holds it longer than the
        read timeout."""
        started = time.monotonic()
        try:
            target = self._route()
            if (isinstance(target, Response) or not target[2]) and (
                    self.headers.get("Content-Length", "0").strip() not in ("", "0")
                    or self.headers.get("Transfer-Encoding") is not None):
                self.close_connection = True  # a body never read must not become a request
            if isinstance(target, Response):
                response = target
            elif target[0].upload:  # streamed to disk: no larger than the store's room
                length = body_length(self.headers, self.server.api.remote.room())
                with self.server.activity.request():
                    response = self._answer(target, b"", length)
            else:
                body = self._read_body() if target[2] else b""
                if body is None:
                    return
                with self.server.activity.request():
                    response = self._answer(target, body)
        except EngineError as exc:
            self.close_connection = True
            response = json_response(exc.status, exc.body())
        sent = self._send(response)
        log.info("http request method=%s path=%s status=%d bytes=%d dur=%.6fs remote=%s",
                 self.command, printable(urllib.parse.urlsplit(self.path).path),
                 response.status, sent, time.monotonic() - started, self.client_address[0])

    def _read_body(self) -> bytes | None:
        """The request body (413 above the limit before a byte of it is read); None when the
        client went away or timed out before sending it all (nobody to answer)."""
        length = body_length(self.headers)
        try:
            body = self.rfile.read(length)
        except OSError as exc:
            log.info("http request method=%s body not received: %s", self.command, exc)
            body = b""
        self.server.watch.done(self.connection)
        if len(body) < length:
            self.close_connection = True
            return None
        return body

    def _answer(self, target: tuple[Operation, tuple[str, ...], bool], body: bytes,
                upload_length: int = 0) -> Response:
        operation, groups, _ = target
        parts = urllib.parse.urlsplit(self.path)
        received = [0]
        request = Request(self.command, parts.path,
                          urllib.parse.parse_qs(parts.query, keep_blank_values=True),
                          self.headers.get, body,
                          partial(self._receive, upload_length, received) if operation.upload
                          else None)
        try:
            return operation.handler(request, *groups)
        except EngineError as exc:
            return json_response(exc.status, exc.body())
        except Exception as exc:
            log.exception("request %s %s failed", self.command, printable(self.path))
            return json_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                 internal_error(str(exc)).body())
        finally:
            if operation.upload:
                self.server.watch.done(self.connection)
                if received[0] < upload_length:  # a body left unread ends the connection
                    self.close_connection = True

    def _receive(self, length: int, received: list[int], out: typing.BinaryIO) -> int:
        """Copy an upload's body into ``out``: the read watch gives each chunk its timeout,
        not the whole body (400 when the client stops early, 507 when the disk is full)."""
        try:
            while received[0] < length:
                self.server.watch.reading(self.connection)
                chunk = self.rfile.read(min(length - received[0], BLOB_CHUNK))
                if not chunk:
                    break
                out.write(chunk)
                received[0] += len(chunk)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full("no space left for the upload", str(exc)) from None
            log.info("http upload not received: %s", exc)
        if received[0] < length:
            raise invalid_argument("request body ended early",
                                   f"{received[0]} of {length} bytes received")
        return length

    def _route(self) -> Response | tuple[Operation, tuple[str, ...], bool]:
        """The operation that answers this request (with its path parameters, and whether it
        takes a body: only with the token), or the answer refusing it, decided from the
        request line and headers only."""
        if not self.server.guard.host_allowed(self.headers.get("Host")):
            return json_response(HTTPStatus.FORBIDDEN,
                                 {"code": "forbidden", "message": "host not allowed"})
        parts = urllib.parse.urlsplit(self.path)
        found = self.server.api.match(parts.path)
        if found is None:
            return text_not_found()
        route, groups = found
        if route.auth and not self.server.guard.authorized(self.headers.get("Authorization")):
            return Response(HTTPStatus.UNAUTHORIZED)
        if not route.operations:
            return text_not_found()
        if self.command == "OPTIONS":
            allowed = sorted({*route.operations, "OPTIONS"} | (
                {"HEAD"} if "GET" in route.operations else set()))
            return Response(HTTPStatus.NO_CONTENT, headers={"Allow": ", ".join(allowed)})
        operation = route.operations.get("GET" if self.command == "HEAD" else self.command)
        if operation is None:
            return Response(HTTPStatus.METHOD_NOT_ALLOWED)
        if not route.auth:
            body_length(self.headers)  # framing is checked even where no body is read
        return (operation, tuple(urllib.parse.unquote(group) for group in groups),
                route.auth)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors http.server detects itself (bad request line, 414, 431, 501) as JSON too."""
        status = HTTPStatus(code)
        error = ApiError(code, status.phrase.lower().replace(" ", "_").replace("-", "_"),
                         message or status.phrase, explain or status.description)
        log.info("http error status=%d message=%s remote=%s", code, message,
                 self.client_address[0])
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # unparsable request line: answer as HTTP/1.1
            self.request_version = self.protocol_version
        self._send(json_response(code, error.body(), {"Connection": "close"}))

    def _send(self, response: Response) -> int:
        try:
            return self._write(response)
        except OSError as exc:
            log.info("http response status=%d not delivered: %s", response.status, exc)
            self.close_connection = True
            return 0

    def _write(self, response: Response) -> int:
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if self.close_connection and "Connection" not in response.headers:
            self.send_header("Connection", "close")  # the client opens a new one
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            return len(response.body)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command == "HEAD":
            getattr(response.stream, "close", lambda: None)()
            return 0
        return self._send_chunks(response.stream)

    def _send_chunks(self, chunks: Iterator[bytes]) -> int:
        sent = 0
        try:
            for chunk in chunks:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            log.info("http stream ended early: %s", exc)
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()
        return sent


class EngineHttpServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the engine's Api, Guard and Activity, with a bound on
    connections served at once (``max_connections``, SQLRS_ENGINE_MAX_CONNECTIONS): past it,
    a new connection is answered 503 ``too_many_connections`` and closed, so no local user can
    make the engine start a thread per connection without limit."""

    daemon_threads = True
    request_queue_size = 128
    watch: ReadWatch
    api: Api
    guard: Guard
    activity: Activity
    max_connections = DEFAULT_MAX_CONNECTIONS
    #: counts connections being served (taken on accept, released when its thread ends)
    _slots: threading.BoundedSemaphore | None = None
    #: counts refusals still lingering (each a short thread); past it a refusal just closes
    _refusals = threading.BoundedSemaphore(16)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(self.max_connections)
        if not self._slots.acquire(blocking=False):
            log.warning("http: %d connections open: refusing one", self.max_connections)
            if self._refusals.acquire(blocking=False):
                threading.Thread(target=self._refuse, args=(request,), daemon=True,
                                 name="http-refuse").start()
            else:
                self.close_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert self._slots is not None
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            body = json.dumps(ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "too_many_connections",
                "too many connections", f"the engine serves at most {self.max_connections}"
                " connections at once").body()).encode() + b"\n"
            request.settimeout(LINGER_SECONDS)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                            b"application/json\r\nConnection: close\r\nContent-Length: " +
                            str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError as exc:
            log.debug("http: refusal not delivered: %s", exc)
        finally:
            self.shutdown_request(request)
            self._refusals.release()

    def shutdown_request(self, request: Any) -> None:
        """Lingering close: read what the client still sends (for a bounded time) before
        closing, so a connection closed early never resets away an answer not yet read."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(65536):
                    break
        except OSError as exc:
            log.debug("http lingering close: %s", exc)
        self.close_request(request)


class EngineHttpServer6(EngineHttpServer):
    address_family = socket.AF_INET6



###############################################################################
# cli/main: flags, start-up order, engine.json, signals and idle shutdown.
# Owns the process; wires every section together.
###############################################################################

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class UsageError(Exception):
    """A command-line mistake: exit code 2."""


@dataclass
class Options:
    listen: str
    engine_json: str
    run_dir: str
    idle_timeout: float
    version: str


def parse_options(argv: Sequence[str]) -> Options | str:
    """Parse flags the way the reference engine does; a str result is text to print."""
    parser = argparse.ArgumentParser(
        prog="sqlrs-engine", add_help=True, allow_abbrev=False,
        description="Local engine for the sqlrs CLI: disposable PostgreSQL databases.",
    )
    parser.add_argument("--listen", "-listen", help="TCP listen address, e.g. 127.0.0.1:0")
    parser.add_argument("--write-engine-json", "-write-engine-json", dest="engine_json",
                        help="path of engine.json; its directory is the state dir")
    parser.add_argument("--run-dir", "-run-dir", default="", help="runtime dir (created 0700)")
    parser.add_argument("--idle-timeout", "-idle-timeout", default="30s",
                        help="Go duration of HTTP inactivity before exit; 0 disables")
    parser.add_argument("--version", "-version", nargs="?", const=None, default="dev",
                        help="engine version (mixed into state ids); alone: print version")
    try:
        ns = parser.parse_args(_attach_values(argv))
    except SystemExit as exc:
        if exc.code == 0:
            return ""
        raise UsageError("invalid arguments") from None
    if ns.version is None:
        return f"sqlrs-engine {__version__}"
    if not ns.listen:
        raise UsageError("missing --listen")
    if not ns.engine_json:
        raise UsageError("missing --write-engine-json")
    try:
        idle = parse_go_duration(ns.idle_timeout)
    except ValueError as exc:
        raise UsageError(f"invalid value for --idle-timeout: {exc}") from None
    return Options(ns.listen, ns.engine_json, ns.run_dir, idle, ns.version)


def _attach_values(argv: Sequence[str]) -> list[str]:
    """``--flag value`` → ``--flag=value`` so a value may start with '-' (Go's flag does that)."""
    valued = {f"{dash}{name}" for dash in ("-", "--")
              for name in ("listen", "write-engine-json", "run-dir", "idle-timeout")}
    out: list[str] = []
    pending = False
    for arg in argv:
        if pending:
            out[-1] += "=" + arg
            pending = False
        else:
            out.append(arg)
            pending = arg in valued
    return out


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid listen address {listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"refusing to listen on non-loopback address {host!r}")
    return host, int(port)


def setup_logging(state_dir: str) -> None:
    logs = os.path.join(state_dir, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    path = os.path.join(logs, "engine.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if sys.stderr.isatty():
        log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)  # until the config's log.level is read


def expose_root_for(store_root: str) -> str | None:
    """Where server data dirs are mounted for the server user when the engine is root."""
    if os.geteuid() != 0:
        return None
    base = "/run" if os.path.isdir("/run") else tempfile.gettempdir()
    digest = hashlib.sha256(store_root.encode()).hexdigest()[:12]
    root = os.path.join(base, "sqlrs-engine", digest)
    for path in (os.path.dirname(root), root):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        problem = private_dir_problem(path, follow=False)
        if problem:
            raise ValueError(f"refusing an unsafe directory: {problem}")
        os.chmod(path, 0o711)  # the engine's own (checked): servers pass through to their data
    return root


class Engine:
    """Every manager of one engine process, wired together in dependency order."""

    def __init__(self, options: Options, state_dir: str, store_root: str) -> None:
        self.version = options.version
        self.instance_id = random_hex(16)
        self.token = random_hex(32)
        self.state_dir = state_dir
        self.store_root = store_root
        self.db = SqlitePool(os.environ.get("SQLRS_STATE_DB") or
                           os.path.join(store_root, "state.db"))
        self.store = MetadataStore(self.db)
        self.jobs = JobQueue(self.db)
        self.config = ConfigManager(os.path.join(store_root, "config.json"))
        self.config.apply_log_level()
        self.registry = Registry(self.store)
        self.layout = StoreLayout(store_root)
        user = ServerUser.detect()
        self.snapshots = SnapshotManager(self.config.value("snapshot.backend"),
                                         expose_root_for(store_root), store_root)
        dbms = PostgresDbms(user)
        docker = DockerRuntime(hashlib.sha256(store_root.encode()).hexdigest()[:12],
                               self.config.value("container.runtime"), store_root,
                               self.snapshots, self.layout.engines_root())
        self.runtimes = Runtimes(HostRuntime(dbms, self.snapshots), docker, self.layout,
                                 self.snapshots)
        self.instances = InstanceManager(self.store, self.layout, self.snapshots, self.runtimes,
                                         ConnectionTracker())
        self.pool = WarmPool(self.instances, self.store, self.config)
        self.deletion = DeletionManager(self.store, self.instances, self.pool)
        self.cache = CacheManager(self.db, self.store, self.config, store_root, self.instances,
                                  self.pool, (self.snapshots.backend, self.snapshots.reason))
        self.remote = RemoteCache(self.config, self.store, self.db, self.layout, self.runtimes,
                                  self.snapshots, self.instances, self.cache, self.version)
        liquibase = LiquibaseRunner(self.instances, self.runtimes.host.dbms, os.path.join(
            self.snapshots.expose_root or self.layout.root, ".liquibase"),
            self.snapshots.expose_root)
        lb_planner = LiquibasePlanner(self.jobs, self.store, self.runtimes, self.instances,
                                      self.cache, liquibase)
        executor = Executor(self.jobs, self.store, self.layout, self.runtimes, self.instances,
                            self.snapshots, self.cache, self.pool, self.remote, lb_planner,
                            self.version)
        self.prepare = PrepareManager(self.jobs, executor, self.config, self.instances)
        self.runs = RunManager(self.registry, self.instances)

    def recover(self) -> None:
        """Clean up after an earlier process: instances first, then half-built states, then
        resume jobs."""
        self.instances.recover()
        if self.snapshots.expose_root:  # Liquibase workspaces staged by an interrupted run
            for name in os.listdir(self.snapshots.expose_root):
                if name.startswith(LB_STAGE_PREFIX):
                    remove_tree(os.path.join(self.snapshots.expose_root, name))
        self._remove_half_states()
        self.remote.sweep()
        try:
            self.cache.enforce("startup")
        except JobFailure as exc:
            log.warning("startup cache check failed: %s", exc.error)
        resumed = self.prepare.recover()
        keep = {row.instance_id for row in self.store.list_instances()}
        keep |= {derived_instance_id(job_id) for job_id in resumed}
        threading.Thread(target=self._sweep_containers, args=(keep,), daemon=True,
                         name="container-sweep").start()

    def _sweep_containers(self, keep: set[str]) -> None:
        """Remove containers of interrupted work (found by label); Docker may be absent."""
        if not self.runtimes.docker.configured():
            return
        pause_point("container-sweep")
        try:
            removed = self.runtimes.docker.sweep(keep)
        except Exception as exc:
            log.info("container sweep skipped: %s", exc)
            return
        if removed:
            log.info("removed %d leftover containers", len(removed))

    def _remove_half_states(self) -> None:
        """Remove what interrupted work left in the store: base clusters half initialised
        (``.init-*``), states half published (``.tmp-*``, no marker, no row) and states no
        engine may reuse."""
        engines = os.path.join(self.store_root, "engines")
        for engine_dir in _glob_dirs(engines, 2, ""):
            for name in os.listdir(engine_dir):
                if name.startswith(".init-"):
                    log.info("removing an interrupted base initialisation %s", name)
                    remove_tree(os.path.join(engine_dir, name))
        known = {row.state_dir for row in self.store.list_states()}
        for states_dir in _glob_dirs(engines, 2, "states"):
            for name in os.listdir(states_dir):
                path = os.path.join(states_dir, name)
                complete = is_published(path)
                if name.startswith(".tmp-") or (is_state_id(name) and (
                        path not in known or not complete)):
                    remove_tree(path)
        for row in self.store.list_states():
            unused = not self.store.list_instances(state=row.state_id)
            lost = bool(row.unflushed_boot) and row.unflushed_boot != boot_id()
            if row.unflushed_boot and not lost:  # published in this boot: flush it now
                self.instances.flush_state(row)
            elif lost and (row.children or not unused):
                log.warning("state %s was not flushed before a reboot and may be incomplete;"
                            " delete it with its instances and children", row.state_id)
            if unused and ((lost and not row.children) or _trusts_tcp(row.state_dir)
                           or not is_published(row.state_dir)):
                remove_published(row.state_dir)
                self.store.delete_state(row.state_id)

    def busy(self) -> bool:
        return self.prepare.busy()

    def api(self) -> Api:
        """The HTTP endpoints over these managers."""
        return Api(version=self.version, instance_id=self.instance_id, config=self.config,
                   store=self.store, jobs=self.jobs, registry=self.registry,
                   instances=self.instances, deletion=self.deletion, cache=self.cache,
                   prepare=self.prepare, runs=self.runs, pool=self.pool, remote=self.remote)

    @contextlib.contextmanager
    def running(self, server: EngineHttpServer, idle_timeout: float) -> Iterator[None]:
        """Every background thread of the engine runs during the block: the warm pool's
        refill, the read watch of slow clients, remote pushes, the reaper of expired
        instances and (``idle_timeout`` > 0) the idle timer. After the block they are told to
        stop (each ends at its next wake-up; none holds anything a restart needs) and the
        managers close: running jobs are stopped, pooled servers too."""
        stopped = threading.Event()
        background: list[tuple[str, Callable[[threading.Event], None]]] = [
            ("warm-pool", self.pool.run), ("read-watch", server.watch.run),
            ("remote-push", self.remote.run_pushes),
            ("reaper", Reaper(self.store, self.deletion).run)]
        if idle_timeout > 0:
            background.append(("idle", partial(watch_idle, server, self, idle_timeout)))
        for name, loop in background:
            threading.Thread(target=loop, args=(stopped,), daemon=True, name=name).start()
        try:
            yield
        finally:
            stopped.set()
            self.close()

    def close(self) -> None:
        self.prepare.shutdown()
        self.pool.close()
        self.db.close()


def _trusts_tcp(state_dir: str) -> bool:
    """A full-copy state built by an engine that let TCP clients in without a password: it
    is never reused (layered host states have new ids: the auth set-up is in their image id)."""
    try:
        hba = read_regular_file(os.path.join(state_dir, "pgdata", "pg_hba.conf"))
    except OSError:
        return False
    return bool(re.search(rb"^\s*host\S*\s.*\btrust\b", hba, re.MULTILINE))


def _glob_dirs(root: str, depth: int, leaf: str) -> list[str]:
    level = [root] if os.path.isdir(root) else []
    for _ in range(depth):
        level = [os.path.join(d, n) for d in level for n in sorted(os.listdir(d))
                 if os.path.isdir(os.path.join(d, n))]
    return [os.path.join(d, leaf) for d in level if os.path.isdir(os.path.join(d, leaf))]


def write_engine_json(path: str, endpoint: str, engine: Engine, started_at: str) -> None:
    document = {
        "endpoint": endpoint, "pid": os.getpid(), "startedAt": started_at,
        "authToken": engine.token, "version": engine.version, "instanceId": engine.instance_id,
    }
    atomic_write(path, json.dumps(document, indent=2).encode() + b"\n", 0o600)


def remove_engine_json(path: str, instance_id: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as handle:
            if json.load(handle).get("instanceId") != instance_id:
                return
        os.unlink(path)


def watch_idle(server: EngineHttpServer, engine: Engine, timeout: float,
               stopped: threading.Event) -> None:
    interval = min(1.0, max(timeout / 4, 0.05))
    while not stopped.wait(interval):
        if server.activity.idle_for() >= timeout and not engine.busy():
            log.info("idle for %s: shutting down", format_go_duration(timeout))
            server.shutdown()
            return


def run_engine(options: Options) -> int:
    engine_json = os.path.abspath(options.engine_json)
    state_dir = os.path.dirname(engine_json)
    store_root = os.path.abspath(os.environ.get("SQLRS_STATE_STORE") or
                                 os.path.join(state_dir, "state-store"))
    for path in (state_dir, store_root, *([options.run_dir] if options.run_dir else [])):
        ensure_private_dir(path)
    for inner in (os.path.join(state_dir, "logs"), os.path.join(store_root, "instances"),
                  os.path.join(store_root, "engines")):  # the engine never makes these links
        if os.path.lexists(inner) and (problem := private_dir_problem(inner, follow=False)):
            raise ValueError(f"refusing an unsafe directory: {problem}")
    setup_logging(state_dir)
    log.info("sqlrs-engine version=%s build=%s", options.version, __version__)
    host, port = split_listen(options.listen)
    max_connections = int(os.environ.get("SQLRS_ENGINE_MAX_CONNECTIONS") or
                          DEFAULT_MAX_CONNECTIONS)
    if max_connections < 1:
        raise ValueError("SQLRS_ENGINE_MAX_CONNECTIONS must be at least 1")
    server_class = EngineHttpServer6 if ":" in host else EngineHttpServer
    server = server_class((host, port), HttpHandler)
    engine = Engine(options, state_dir, store_root)
    backend, reason = engine.snapshots.backend, engine.snapshots.reason
    log.info("snapshots: %s%s", backend, f" ({reason})" if reason else "")
    server.api = engine.api()
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    server.guard = Guard(engine.token, bound_host, bound_port)
    server.max_connections = max_connections
    server.activity = Activity()
    server.watch = ReadWatch(float(os.environ.get("SQLRS_ENGINE_READ_TIMEOUT") or
                                   READ_TIMEOUT_SECONDS))
    engine.recover()
    endpoint = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    write_engine_json(engine_json, endpoint, engine, format_ts())

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with engine.running(server, options.idle_timeout):
        log.info("listening on %s", endpoint)
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            remove_engine_json(engine_json, engine.instance_id)
            server.server_close()
    log.info("stopped")
    return 0


def default_engine_json() -> str:
    """The sqlrs CLI's ``engine.json`` (contract §1.5)."""
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Application Support/sqlrs/state/engine.json")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "sqlrs", "engine.json")


def bundle_command(argv: Sequence[str]) -> int:
    """``sqlrs-engine export STATE_ID -o FILE`` and ``sqlrs-engine import FILE``: a client of
    the running engine that ``engine.json`` names (``--engine-json``; default the CLI's)."""
    parser = argparse.ArgumentParser(prog="sqlrs-engine", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a state and its ancestors to a file"
                                 " (an OCI image layout tar)")
    export.add_argument("state_id", help="state id or unique prefix")
    export.add_argument("-o", "--output", required=True, help="the tar to write")
    load = commands.add_parser("import", help="add the states of an exported file")
    load.add_argument("file")
    for command in (export, load):
        command.add_argument("--engine-json", default=None,
                             help="the running engine's engine.json (default: the CLI's)")
    ns = parser.parse_args(argv)
    try:
        with open(ns.engine_json or default_engine_json(), encoding="utf-8") as handle:
            found = json.load(handle)
        host, _, port = str(found["endpoint"]).rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=600,
                                          blocksize=BLOB_CHUNK)
        headers = {"Authorization": f"Bearer {found['authToken']}"}
        if ns.command == "export":
            conn.request("GET", f"/v1/states/{urllib.parse.quote(ns.state_id, safe='')}/export",
                         headers=headers)
            response = conn.getresponse()
            if response.status != HTTPStatus.OK:
                raise ValueError(response.read(4096).decode("utf-8", "replace").strip())
            partial_file = f"{ns.output}.part"
            with open(partial_file, "wb") as out:
                shutil.copyfileobj(response, out, BLOB_CHUNK)
            os.replace(partial_file, ns.output)
            print(json.dumps({"file": ns.output, "bytes": os.path.getsize(ns.output)}))
        else:
            with open(ns.file, "rb") as body:
                conn.request("POST", "/v1/states/import", body=body, headers={
                    **headers, "Content-Type": "application/x-tar",
                    "Content-Length": str(os.fstat(body.fileno()).st_size)})
                response = conn.getresponse()
            answer = response.read().decode("utf-8", "replace").strip()
            if response.status != HTTPStatus.OK:
                raise ValueError(answer)
            print(answer)
    except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
        print(f"sqlrs-engine {ns.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in ("export", "import"):
        return bundle_command(arguments)
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"sqlrs-engine: {exc}", file=sys.stderr)
        return 2
    if isinstance(options, str):
        if options:
            print(options)
        return 0
    try:
        return run_engine(options)
    except Exception as exc:
        log.exception("startup failed")
        print(f"sqlrs-engine: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
