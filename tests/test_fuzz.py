"""Hostile input over HTTP (§2): a seeded fuzz over every route, then one focused test per case.

The fuzz sends well-framed requests through ``http.client`` and badly framed ones over raw
sockets, and holds every answer to the same rules:

* an answer arrives (full status line, headers and a body framed by Content-Length or chunked),
  within ``ANSWER_DEADLINE`` seconds, with a status below 500 (501 only for unknown methods);
* error bodies are JSON ``{code, message[, details]}``, except the bare answers the contract
  mandates: 401 and 405 with an empty body and 404 ``text/plain`` ``404 page not found``;
* no request creates or deletes anything: the bodies sent to mutating routes are invalid by
  construction and ids are never real ones except on GET.

``SQLRS_FUZZ_SEED`` and ``SQLRS_FUZZ_REQUESTS`` replay or widen a run; ``SQLRS_FUZZ_REPORT``
sets how many failures the message shows (all are counted).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import EngineProcess, cleanup_store, poll, spawn_engine

import sqlrs_engine

ANSWER_DEADLINE = 2.0
SOCKET_TIMEOUT = 2.5
FUZZ_SEED = int(os.environ.get("SQLRS_FUZZ_SEED", "20240611"))
FUZZ_REQUESTS = int(os.environ.get("SQLRS_FUZZ_REQUESTS", "3000"))
MAX_REPORTED = int(os.environ.get("SQLRS_FUZZ_REPORT", "20"))
BODY_LIMIT = 16 * 1024 * 1024
NOT_FOUND_BODY = b"404 page not found\n"
STANDARD_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
ODD_METHODS = ("BREW", "PROPFIND", "TRACE", "CONNECT", "PRI", "M-SEARCH", "X" * 64)
STATUS_LINE_RE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")
CONTENT_RANGE_RE = re.compile(r"events (\d+)-")
WELL_FORMED_RANGE_RE = re.compile(r"events=(0|[1-9]\d{0,29})-")
JOB_IMAGE = "host:15"
JOB_ARGS = ["-c", "select 1"]

# (method, route template) pairs that would create, change or delete something when the body or
# id were valid: the fuzz only ever sends them invalid bodies or unknown ids, so they must be 4xx.
MUTATING = {
    ("POST", "/v1/prepare-jobs"), ("POST", "/v1/instances"), ("PUT", "/v1/names/{}"),
    ("DELETE", "/v1/names/{}"), ("POST", "/v1/runs"), ("PATCH", "/v1/config"),
    ("DELETE", "/v1/config"), ("POST", "/v1/cache/explain/prepare"),
    ("DELETE", "/v1/instances/{}"), ("DELETE", "/v1/states/{}"),
    ("DELETE", "/v1/prepare-jobs/{}"), ("POST", "/v1/prepare-jobs/{}/cancel"),
}


# ------------------------------------------------------------------------------ the target


@dataclass(frozen=True)
class Target:
    """Where to send requests and the real ids that GETs may use."""

    host: str
    port: int
    token: str
    job_id: str
    instance_id: str
    state_id: str
    events: int  # number of events the finished job has

    @classmethod
    def of(cls, engine: EngineProcess, job: dict[str, Any] | None = None,
           events: int = 0) -> Target:
        result = (job or {}).get("result") or {}
        return cls(engine.host, engine.port, engine.token,
                   str((job or {}).get("job_id") or "0" * 32),
                   str(result.get("instance_id") or "1" * 32),
                   str(result.get("state_id") or "2" * 64), events)

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def real_id(self, collection: str) -> str | None:
        return {"instances": self.instance_id, "states": self.state_id,
                "prepare-jobs": self.job_id}.get(collection)


def served_routes() -> list[tuple[str, tuple[str, ...]]]:
    """``(template, methods)`` for every route the engine serves, ``{}`` for an id segment."""
    api = sqlrs_engine.Api.__new__(sqlrs_engine.Api)
    routes = []
    for route in api._routes():
        routes.append((re.sub(r"\{\w+\}", "{}", route.template), tuple(route.operations)))
    assert len(routes) > 10, routes
    return routes


# -------------------------------------------------------------------------- cases and answers


@dataclass
class Case:
    """One request. ``raw`` requests go over a socket as-is; the others through http.client."""

    label: str
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    raw: bytes | None = None
    shut_write: bool = False
    expect_client_error: bool = False
    expect_status: int | None = None
    expect_statuses: tuple[int, ...] = ()
    may_close_silently: bool = False  # an incomplete request: closing without an answer is fine
    check_events: bool = False
    range_header: str | None = None

    def wire(self) -> bytes:
        if self.raw is not None:
            return self.raw
        head = f"{self.method} {self.target} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        if self.body is not None:
            head += f"Content-Length: {len(self.body)}\r\n"
        return head.encode("latin-1", "replace") + b"\r\n" + (self.body or b"")

    def preview(self, limit: int = 320) -> str:
        data = self.wire()
        shown = repr(data[:limit])
        return shown + (f" ... ({len(data)} bytes in all)" if len(data) > limit else "")


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    elapsed: float
    error: str | None = None
    silent: bool = False  # the connection ended before the server sent a single byte

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def preview(self, limit: int = 200) -> str:
        if self.error:
            return f"no answer ({self.error}) after {self.elapsed:.2f}s"
        return f"{self.status} {self.content_type or '-'} {self.body[:limit]!r}"


class NoAnswer(Exception):
    """The connection ended, stalled or carried something that is not an HTTP response."""

    def __init__(self, message: str, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.total = 0

    def _fill(self, what: str) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise NoAnswer(f"timed out waiting for {what}; got {self.buf[:80]!r}") from None
        except OSError as exc:
            raise NoAnswer(f"{type(exc).__name__} waiting for {what}; got {self.buf[:80]!r}",
                           silent=not self.total) from None
        if not chunk:
            raise NoAnswer(f"connection closed waiting for {what}; got {self.buf[:80]!r}",
                           silent=not self.total)
        self.buf += chunk
        self.total += len(chunk)

    def until(self, sep: bytes, what: str) -> bytes:
        while sep not in self.buf:
            if len(self.buf) > 1 << 20:
                raise NoAnswer(f"no {what} in the first MiB")
            self._fill(what)
        out, self.buf = self.buf.split(sep, 1)
        return out

    def exactly(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            self._fill(what)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def to_eof(self) -> bytes:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise NoAnswer("timed out reading a close-delimited body") from None
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk


def read_answer(sock: socket.socket, head_only: bool) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response strictly: status line, headers, framed body."""
    reader = _Reader(sock)
    while True:
        head = reader.until(b"\r\n\r\n", "the status line and headers")
        lines = head.split(b"\r\n")
        match = STATUS_LINE_RE.fullmatch(lines[0])
        if not match:
            raise NoAnswer(f"not an HTTP/1.1 status line: {head[:120]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise NoAnswer(f"malformed response header {line[:80]!r}")
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
        status = int(match.group(1))
        if status >= 200:
            break
    if head_only or status in (204, 304):
        return status, headers, b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = reader.until(b"\r\n", "a chunk size")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise NoAnswer(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while reader.until(b"\r\n", "the chunked trailer"):
                    pass
                return status, headers, body
            body += reader.exactly(size, "chunk data")
            if reader.exactly(2, "a chunk end") != b"\r\n":
                raise NoAnswer("chunk not followed by CRLF")
    if "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise NoAnswer(f"response Content-Length {length!r}")
        return status, headers, reader.exactly(int(length), "the body")
    return status, headers, reader.to_eof()


def send(case: Case, host: str, port: int, timeout: float = SOCKET_TIMEOUT) -> Answer:
    started = time.monotonic()
    try:
        if case.raw is not None:
            status, headers, body = _send_raw(case, host, port, timeout)
        else:
            status, headers, body = _send_http(case, host, port, timeout)
    except NoAnswer as exc:
        return Answer(None, {}, b"", time.monotonic() - started, str(exc), exc.silent)
    return Answer(status, headers, body, time.monotonic() - started)


def _send_raw(case: Case, host: str, port: int,
              timeout: float) -> tuple[int, dict[str, str], bytes]:
    assert case.raw is not None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise NoAnswer(f"connect: {exc}") from None
    with sock:
        # The server may answer and close before reading everything (414, 431, 413): go on
        # and read what it answered.
        with contextlib.suppress(OSError):
            sock.sendall(case.raw)
            if case.shut_write:
                sock.shutdown(socket.SHUT_WR)
        return read_answer(sock, head_only=case.method == "HEAD")


def _send_http(case: Case, host: str, port: int,
               timeout: float) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(case.method, case.target, skip_host=True, skip_accept_encoding=True)
        for name, value in case.headers:
            conn.putheader(name, value)
        if case.body is not None:
            conn.putheader("Content-Length", str(len(case.body)))
        conn.endheaders(case.body)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (http.client.HTTPException, OSError) as exc:
        raise NoAnswer(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


# ------------------------------------------------------------------------------ answer rules


def error_body_problems(method: str, answer: Answer) -> list[str]:
    """The contract's rules for error bodies (§2)."""
    status = answer.status or 0
    if status < 400 or method == "HEAD":
        return []
    if status in (401, 405):
        return [] if answer.body == b"" else [f"{status} must have an empty body"]
    if status == 404 and answer.content_type == "text/plain":
        return [] if answer.body == NOT_FOUND_BODY else ["404 text/plain body is not "
                                                         "'404 page not found\\n'"]
    if answer.content_type != "application/json":
        return [f"{status} error is {answer.content_type or 'untyped'}, not application/json"]
    try:
        body = json.loads(answer.body)
    except ValueError:
        return [f"{status} error body is not JSON"]
    if not isinstance(body, dict):
        return [f"{status} error body is not a JSON object"]
    problems = []
    if not isinstance(body.get("code"), str) or not body["code"]:
        problems.append(f"{status} error without a string code")
    if not isinstance(body.get("message"), str) or not body["message"]:
        problems.append(f"{status} error without a string message")
    extra = set(body) - {"code", "message", "details"}
    if extra:
        problems.append(f"{status} error with unexpected keys {sorted(extra)}")
    return problems


def ndjson_lines(body: bytes) -> list[Any] | None:
    try:
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError:
        return None


def events_problems(case: Case, answer: Answer, total: int) -> list[str]:
    """Range rules for ``GET /v1/prepare-jobs/{finished job}/events``."""
    status = answer.status
    header = case.range_header
    well_formed = WELL_FORMED_RANGE_RE.fullmatch(header) if header is not None else None
    allowed = {200} if header is None else {206} if well_formed else {200, 206, 416}
    if status not in allowed:
        return [f"events with Range {header!r}: status {status}, expected one of "
                f"{sorted(allowed)}"]
    if status == 416:
        return []
    lines = ndjson_lines(answer.body)
    if lines is None or answer.content_type != "application/x-ndjson":
        return [f"events answer is not NDJSON ({answer.content_type})"]
    start = 0
    if status == 206:
        content_range = answer.headers.get("content-range", "")
        found = CONTENT_RANGE_RE.fullmatch(content_range)
        if not found:
            return [f"206 with Content-Range {content_range!r}"]
        digits = found.group(1)
        if well_formed and digits != well_formed.group(1):
            return [f"Range {header!r} answered with Content-Range {content_range!r}"]
        start = int(digits) if len(digits) < 19 else total  # far past the end either way
    if len(lines) != max(0, total - start):
        return [f"{len(lines)} events from {start}, expected {max(0, total - start)}"]
    return []


def answer_problems(case: Case, answer: Answer, target: Target) -> list[str]:
    if answer.error is not None:
        if case.may_close_silently and answer.silent and answer.elapsed <= ANSWER_DEADLINE:
            return []
        return [f"no complete answer: {answer.error}"]
    status = answer.status or 0
    problems = []
    if answer.elapsed > ANSWER_DEADLINE:
        problems.append(f"answered after {answer.elapsed:.2f}s")
    if status >= 500 and not (status == 501 and case.method not in STANDARD_METHODS):
        problems.append(f"status {status}")
    problems += error_body_problems(case.method, answer)
    if case.expect_status is not None and status != case.expect_status:
        problems.append(f"status {status}, expected {case.expect_status}")
    if case.expect_statuses and status not in case.expect_statuses:
        problems.append(f"status {status}, expected one of {list(case.expect_statuses)}")
    if case.expect_client_error and not 400 <= status < 500:
        problems.append(f"status {status} for a request that must be refused (4xx)")
    if case.check_events and status < 500:
        problems += events_problems(case, answer, target.events)
    return problems


# ----------------------------------------------------------------------------- generators


def nested(opener: str, depth: int) -> str:
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def huge_digits(n: int = 5000) -> str:
    return "9" * n


J = json.dumps
WEIRD_VALUES: list[Callable[[random.Random], str]] = [
    lambda r: "1e400", lambda r: "-1e400", lambda r: huge_digits(),
    lambda r: "-" + huge_digits(), lambda r: "0." + "0" * 4000 + "1", lambda r: "1e-400",
    lambda r: "NaN", lambda r: "Infinity", lambda r: '"\\ud800"', lambda r: '"\\udfff\\ud800"',
    lambda r: '"\\u0000"', lambda r: "null", lambda r: "[]", lambda r: "{}", lambda r: "true",
    lambda r: "-0", lambda r: J("x" * r.choice([1, 1000, 100_000])),
    lambda r: nested(r.choice("[{"), r.choice([10, 65, 1000, 20_000])),
    lambda r: J(["-c", "select 1"]), lambda r: J({"-c": "select 1"}),
]


def weird(rng: random.Random) -> str:
    return rng.choice(WEIRD_VALUES)(rng)


def fake_hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


PREPARE_POISON = {
    "prepare_kind": ["5", "[]", "{}", '"lb"', '"nope"', '""', "true", '"\\ud800"', "1e400",
                     huge_digits()],
    "image_id": ["[]", "5", "{}", '""', '"   "', "true", "1e400", "[null]"],
    "psql_args": ["5", '"-c select 1"', "[1]", "[null]", '{"-c": "x"}', '[["-c"]]', "1e400",
                  '["-c", 5]', huge_digits()],
}
CONFIG_PATH_POISON = ["5", "[]", "null", '""', '"a..b"', '"[0]x"', '"aaaa"',
                      '"__proto__.polluted"', '"log.level.deeper"', '"constructor.prototype"',
                      '" log.level"', J("x" * 3000), '"a[-1]"', '"\\ud800"']
CONFIG_VALUE_POISON = {
    "log.level": ['"loud"', "5", "null", "[]", "1e400", '"\\ud800"'],
    "cache.capacity.minStateAge": ['"-5m"', "600", '"soon"', '""', "1e400"],
    "cache.capacity.maxBytes": ["-1", "1.5", "true", '"10"', "1e400", huge_digits(), "-0.5"],
    "cache.capacity.highWatermark": ["0", "1.5", '"0.5"', "NaN", "-1e400"],
    "snapshot.backend": ['"zfs"', "[]"],
    "cache.capacity": ['"big"', "[]", "5"],
}


def poisoned_pairs(rng: random.Random, template: str) -> list[tuple[str, str]]:
    """Key/raw-JSON pairs of an object that the route must refuse, whatever it ignores."""
    pairs: list[tuple[str, str]]
    if template in ("/v1/prepare-jobs", "/v1/cache/explain/prepare"):
        base = {"prepare_kind": J("psql"), "image_id": J(JOB_IMAGE), "psql_args": J(JOB_ARGS)}
        key = rng.choice(list(PREPARE_POISON))
        if key != "psql_args" and rng.random() < 0.2:
            del base[key]
        else:
            base[key] = rng.choice(PREPARE_POISON[key])
        pairs = list(base.items())
        noise = ["ttl_seconds", "plan_only", "stdin", "x"]
        poison = PREPARE_POISON[key]
    elif template == "/v1/instances":
        poison = ["5", "[]", "null", '""', '"zz"', '"../.."', "{}", '"\\ud800"', "1e400"]
        pairs = [("state_id", rng.choice(poison))]
        noise = ["name", "ttl_seconds", "x"]
    elif template == "/v1/names/{}":
        poison = ["5", "[]", "null", '""', "{}", '"zz"', J(fake_hex(rng, 32)), "1e400"]
        pairs = [("instance_id", rng.choice(poison))]
        noise = ["x"]
    elif template == "/v1/runs":
        poison = ["5", "[]", "null", '""', "{}", "1e400", '"\\ud800"']
        key = rng.choice(["instance_ref", "kind"])
        pairs = [("instance_ref", J(fake_hex(rng, 32))), ("kind", J("psql")),
                 ("args", J(["-c", "select 1"]))]
        pairs = [(k, rng.choice(poison) if k == key else v) for k, v in pairs]
        noise = ["steps", "stdin", "command"]
    elif template == "/v1/config":
        if rng.random() < 0.5:
            poison = CONFIG_PATH_POISON
            key, pairs = "path", [("path", rng.choice(poison)), ("value", weird(rng))]
        else:
            path = rng.choice(list(CONFIG_VALUE_POISON))
            poison = CONFIG_VALUE_POISON[path]
            key, pairs = "value", [("path", J(path)), ("value", rng.choice(poison))]
        noise = ["x"]
        if rng.random() < 0.2:  # a duplicate key: both values are refused
            pairs.append((key, rng.choice(poison)))
        rng.shuffle(pairs)
        return pairs
    else:
        poison = ["5"]
        pairs = [("x", weird(rng))]
        noise = ["y"]
    for _ in range(rng.choice([0, 0, 1, 2])):
        pairs.append((rng.choice(noise), weird(rng)))
    if rng.random() < 0.2:  # a duplicate of a poisoned key: both values are refused
        pairs.append((pairs[0][0], rng.choice(poison)))
    rng.shuffle(pairs)
    return pairs


def object_text(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{J(key)}: {value}" for key, value in pairs) + "}"


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]


def make_body(rng: random.Random, template: str) -> tuple[str, bytes]:
    """``(kind, body)``: a body the route must refuse when it is a mutating one."""
    roll = rng.random()
    text = object_text(poisoned_pairs(rng, template))
    if roll < 0.40:
        return "poisoned", text.encode("utf-8", "surrogatepass")
    if roll < 0.50:
        depth = rng.choice([100, 1000, 100_000])
        return f"nested{depth}", nested(rng.choice("[{"), depth).encode()
    if roll < 0.60:
        return "top-level", rng.choice(["[]", '"x"', "null", "5", "true", '[{"a": 1}]',
                                        "1e400", huge_digits(), '"\\ud800"']).encode()
    if roll < 0.70:
        return "truncated", text.encode()[: rng.randrange(0, max(1, len(text) - 1))]
    if roll < 0.82:
        data = text.encode()
        where = data.find(b'"') + 1
        bad = rng.choice(INVALID_UTF8)
        choice = rng.random()
        if choice < 0.6:
            return "bad-utf8", data[:where] + bad + data[where:]
        if choice < 0.8:
            return "utf16", text.encode("utf-16")
        return "bom", b"\xef\xbb\xbf" + data
    if roll < 0.92:
        return "bytes", rng.randbytes(rng.randrange(0, 300))
    return "empty", b""


RANGE_VALUES: list[Callable[[random.Random, int], str]] = [
    lambda r, n: f"events={r.randrange(0, max(1, n))}-", lambda r, n: "events=0-",
    lambda r, n: f"events={n}-", lambda r, n: f"events={n + 1}-",
    lambda r, n: f"events={r.choice([10**6, 2**63 - 1, 2**63, 2**64 - 1, 2**64])}-",
    lambda r, n: "events=1844674407370955161500-", lambda r, n: f"events={10**29}-",
    lambda r, n: "events=1844674407370955161500", lambda r, n: "events=" + huge_digits() + "-",
    lambda r, n: "bytes=0-", lambda r, n: "events=-5", lambda r, n: "events=abc-",
    lambda r, n: "events=1-2", lambda r, n: "", lambda r, n: "events=", lambda r, n: "events",
    lambda r, n: "events=0-,5-", lambda r, n: "events=1_0-", lambda r, n: "events=+1-",
    lambda r, n: "events=0x10-", lambda r, n: "events=1.5-", lambda r, n: "EVENTS=1-",
    lambda r, n: "events=-", lambda r, n: " events = 2 - ", lambda r, n: "events=007-",
    lambda r, n: "events=-0", lambda r, n: "bytes=-1", lambda r, n: "events=1-;x",
]

SEGMENTS: list[Callable[[random.Random], str]] = [
    lambda r: fake_hex(r, 32), lambda r: fake_hex(r, 64), lambda r: fake_hex(r, 32).upper(),
    lambda r: fake_hex(r, 8), lambda r: fake_hex(r, 31), lambda r: "", lambda r: "..",
    lambda r: ".", lambda r: "%2e%2e", lambda r: "..%2F..%2Fetc%2Fpasswd", lambda r: "a%2Fb",
    lambda r: "%2F", lambda r: "%00", lambda r: "x%00y", lambda r: "%ff%fe", lambda r: "%",
    lambda r: "%zz", lambda r: "%C3%A9t%C3%A9", lambda r: "%F0%9F%98%80", lambda r: "%20",
    lambda r: "my-name", lambda r: "a.b_c-1", lambda r: "a" * r.choice([63, 64, 300, 5000]),
    lambda r: "-", lambda r: "~", lambda r: "%2e", lambda r: "..%5C..%5Cwindows",
]

QUERY_VALUES = ["", "true", "1", "T", "maybe", "deadbeef", "DEADBEEF", "zzzzzzzz", "1234567",
                "[0]x", "a..b", "no.such.key", "log.level.deeper", "%ff", "%00", "1e400",
                "-1", "../..", "x" * 2000, "%", "a%2Fb", "__proto__.polluted"]
READ_ONLY_PATHS = ["log", "log.level", "cache.capacity.minStateAge"]
QUERY_NAMES = ["id_prefix", "force", "dry_run", "recurse", "effective", "path", "job", "kind",
               "image", "state", "instance", "x"]


def fill(rng: random.Random, template: str, target: Target, method: str) -> str:
    out = template
    while "{}" in out:
        collection = out.split("/")[2]
        real = target.real_id(collection)
        if method == "GET" and real and rng.random() < 0.3:
            segment = rng.choice([real, real, real.upper()])
        else:
            segment = rng.choice(SEGMENTS)(rng)
        out = out.replace("{}", segment, 1)
    return out


def query(rng: random.Random, method: str) -> str:
    if rng.random() < 0.6:
        return ""
    values = QUERY_VALUES + (READ_ONLY_PATHS if method == "GET" else [])
    params = [f"{rng.choice(QUERY_NAMES)}={rng.choice(values)}"
              for _ in range(rng.choice([1, 1, 2, 3]))]
    if rng.random() < 0.1:
        params.append(rng.choice(["%%%", "=x", "&&", "a=%ZZ", "a", "a=b=c"]))
    return "?" + "&".join(params)


@dataclass
class Headers:
    items: list[tuple[str, str]]
    foreign_host: bool = False
    auth_ok: bool = True
    host_ok: bool = True


def headers_for(rng: random.Random, target: Target, mutate: bool = True) -> Headers:
    host = target.host_header
    auth: str | None = f"Bearer {target.token}"
    out = Headers([])
    if mutate and rng.random() < 0.15:
        out.host_ok = False
        choice = rng.randrange(6)
        host = ["evil.example.com", f"attacker.com:{target.port}", f"127.0.0.1:{target.port + 1}",
                f"localhost.attacker.com:{target.port}", f"127.0.0.1.nip.io:{target.port}",
                ""][choice]
        out.foreign_host = choice < 5
    elif mutate and rng.random() < 0.1:
        host = rng.choice([f"localhost:{target.port}", f"LOCALHOST:{target.port}", "localhost",
                           "127.0.0.1"])
    if mutate and rng.random() < 0.2:
        out.auth_ok = False
        auth = rng.choice([None, "Bearer wrong", f"bearer {target.token}", target.token,
                           f"Bearer {target.token}x", f"Bearer {target.token[:-1]}",
                           "Basic dXNlcjpwYXNz", "Bearer " + "a" * 8000, "Bearer", "",
                           f"Bearer  {target.token}", f"Bearer {target.token}\t"])
    out.items.append(("Host", host))
    if auth is not None:
        out.items.append(("Authorization", auth))
    if mutate and rng.random() < 0.2:
        out.items.append(("Accept", rng.choice(["application/x-ndjson", "*/*", "text/html",
                                                "application/json;q=0", "x" * 5000, ""])))
    if mutate and rng.random() < 0.1:
        out.items.append(("Range", rng.choice(RANGE_VALUES)(rng, target.events)))
    if mutate and rng.random() < 0.05:
        out.items.append(rng.choice([("Expect", "100-continue"), ("Connection", "Upgrade"),
                                     ("Upgrade", "h2c"), ("Content-Encoding", "gzip"),
                                     ("X-Forwarded-Host", "evil.example.com")]))
    return out


def pick_method(rng: random.Random, methods: tuple[str, ...]) -> str:
    roll = rng.random()
    if roll < 0.7 and methods:
        return rng.choice(methods)
    if roll < 0.85:
        return rng.choice(STANDARD_METHODS)
    if roll < 0.95:
        return rng.choice(ODD_METHODS)
    return rng.choice(methods or STANDARD_METHODS).lower()


def route_case(rng: random.Random, target: Target, template: str, methods: tuple[str, ...],
               method: str | None = None) -> Case:
    """A well-framed request to one route (http.client)."""
    method = method or pick_method(rng, methods)
    path = fill(rng, template, target, method) + query(rng, method)
    hdrs = headers_for(rng, target)
    body: bytes | None = None
    kind = "no body"
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.1:
        kind, body = make_body(rng, template)
        if rng.random() < 0.9:
            hdrs.items.append(("Content-Type", rng.choice(
                ["application/json"] * 4 + ["text/plain", "application/json; charset=utf-16"])))
    case = Case(f"route {method} {template} ({kind})", method, path, hdrs.items, body)
    case.expect_client_error = (method, template) in MUTATING
    if hdrs.foreign_host and method in STANDARD_METHODS:
        case.expect_status = 403
    elif (method == "GET" and template == "/v1/prepare-jobs/{}/events"
          and path.split("/")[3] == target.job_id and hdrs.auth_ok and hdrs.host_ok
          and "?" not in path):
        case.check_events = True
        case.range_header = next((v for k, v in hdrs.items if k == "Range"), None)
    return case


def range_case(rng: random.Random, target: Target) -> Case:
    """GET the finished job's events with a Range header (or none)."""
    hdrs = headers_for(rng, target, mutate=False)
    value = rng.choice(RANGE_VALUES)(rng, target.events) if rng.random() < 0.9 else None
    if value is not None:
        hdrs.items.append(("Range", value))
    if rng.random() < 0.3:
        hdrs.items.append(("Accept", rng.choice(["application/x-ndjson", "application/json"])))
    return Case(f"range {value!r}", "GET", f"/v1/prepare-jobs/{target.job_id}/events",
                hdrs.items, check_events=True, range_header=value)


def _raw(line: bytes, headers: list[bytes], body: bytes = b"") -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


BAD_REQUEST_LINES = [  # each must be 400
    b"GET /v1/health HTTP/1.x", b"GET /v1/health HTTP/1.1.1", b"GET /v1/health FOO/1.1",
    b"GET /v1/health HTTP/", b"GET /v1/health http/1.1", b"GET /v1/health HTTP/01234567890.1",
    b"GET /a /b HTTP/1.1", b"POST /v1/prepare-jobs", b"GET /v1/health HTTP/1.1 extra",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET /v1/health HTTP/-1.1",
    b"GET /v1/health HTTP/1.", b"DELETE /v1/config", b"G\x00ET /v1/health HTTP/1.1 x",
]
ODD_REQUEST_LINES = [  # any well-formed answer
    b"GET /v1/he\x00alth HTTP/1.1", b"GET /v1/names/\xc3\xa9 HTTP/1.1",
    b"GET http://evil.example.com/v1/health HTTP/1.1", b"GET * HTTP/1.1", b"OPTIONS * HTTP/1.1",
    b"GET v1/health HTTP/1.1", b"GET //v1//health HTTP/1.1", b"GET /v1/health HTTP/1.0",
    b"GET /v1/health?\xff\xfe HTTP/1.1", b"GET /v1/./health HTTP/1.1",
    b"GET /v1/instances/../states HTTP/1.1", b"get /v1/health HTTP/1.1",
]
BAD_LENGTHS = ["-1", "-0", "-5", "abc", "1e3", "+{n}", "0x{n:x}", "{n}.0", "1_{n}", "{n}abc",
               "{n} 1", "\xd9\xa3", "\xef\xbc\x91"]


def framing_case(rng: random.Random, target: Target) -> Case:
    """A request with bad framing or bad syntax, sent over a raw socket."""
    template, methods = rng.choice(served_routes_cached())
    method = rng.choice(methods)
    path = fill(rng, template, target, "DELETE")  # never a real id
    host = f"Host: {target.host_header}".encode()
    auth = f"Authorization: Bearer {target.token}".encode()
    base = [host, auth, b"Connection: close", b"Content-Type: application/json"]
    _kind, body = make_body(rng, template)
    line = f"{method} {path} HTTP/1.1".encode()
    mutating = (method, template) in MUTATING
    n = len(body)
    kind = rng.choice(["cl-bad", "cl-bad", "cl-conflict", "cl-oversized", "cl-missing",
                       "chunked", "chunked", "cl-short-eof", "cl-long-body", "request-line",
                       "request-line", "huge-url", "huge-header", "many-headers",
                       "header-syntax", "host"])
    case = Case(f"framing {kind} {method} {template}", method, path,
                expect_client_error=mutating)
    if kind == "cl-bad":
        value = rng.choice(BAD_LENGTHS).format(n=max(n, 1))
        case.raw = _raw(line, [*base, b"Content-Length: " + value.encode("latin-1")], body)
        case.label += f" Content-Length {value!r}"
        case.expect_status = 400
    elif kind == "cl-conflict":
        first, second = rng.choice([(n, n + 3), (n + 3, n), (0, n + 1)])  # never equal
        case.raw = _raw(line, [*base, f"Content-Length: {first}".encode(),
                               f"Content-Length: {second}".encode()], body)
        case.expect_status = 400
    elif kind == "cl-oversized":
        text = rng.choice([str(BODY_LIMIT + 1), str(10**12), str(2**63 - 1), str(2**63),
                           str(10**30), huge_digits()])
        case.raw = _raw(line, [*base, f"Content-Length: {text}".encode()])
        case.label += f" Content-Length {text[:40]}"
        if len(text) < 20 and int(text) < 2**63:  # a length Go's net/http parses: too large
            case.expect_status = 413
        else:  # beyond int64 it may be refused as malformed too (net/http answers 400)
            case.expect_statuses = (400, 413)
    elif kind == "cl-missing":
        case.raw = _raw(line, base, body)
    elif kind == "chunked":
        coding = rng.choice(["chunked", "Chunked"])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                          for part in (body[:10], body[10:]) if part)
        case.raw = _raw(line, [*base, f"Transfer-Encoding: {coding}".encode()],
                        chunks + b"0\r\n\r\n")
        case.expect_status = 411
    elif kind == "cl-short-eof":
        case.raw = _raw(line, [*base, f"Content-Length: {n + rng.randint(1, 1000)}".encode()],
                        body)
        case.shut_write = True
        case.may_close_silently = True
    elif kind == "cl-long-body":
        case.raw = _raw(line, [*base, f"Content-Length: {n // 2}".encode()], body)
    elif kind == "request-line":
        case.expect_client_error = False
        if rng.random() < 0.6:
            case.raw = _raw(rng.choice(BAD_REQUEST_LINES), base)
            case.expect_status = 400
        else:
            case.raw = _raw(rng.choice(ODD_REQUEST_LINES), base)
        case.method = "?"
    elif kind == "huge-url":
        filler = "a" * rng.choice([66_000, 70_000, 200_000])
        target_line = rng.choice([f"{path}?q={filler}", f"/v1/names/{filler}"])
        case.raw = _raw(f"{method} {target_line} HTTP/1.1".encode(), base)
        case.expect_status = 414
    elif kind == "huge-header":
        name = rng.choice([b"X-Big", b"Authorization", b"Cookie", b"Range"])
        case.raw = _raw(line, [*base, name + b": " + b"a" * rng.choice([70_000, 300_000])])
        case.expect_status = 431
    elif kind == "many-headers":
        extra = [b"X-H%d: v" % i for i in range(rng.choice([101, 150, 1000]))]
        case.raw = _raw(line, [*base, *extra])
        case.expect_status = 431
    elif kind == "header-syntax":
        bad = rng.choice([b"NoColonHere", b"Bad Name: x", b": empty-name", b" folded-line",
                          b"X-Nul: a\x00b", b"X-Latin: \xff\xfe", b"X-Ctl: \x01\x02",
                          b"Host : 127.0.0.1", b"X-Lf: a\nb"])
        case.raw = _raw(line, [*base[:2], bad, *base[2:]])
    else:  # host
        variants = [[auth], [host, b"Host: evil.example.com", auth],
                    [b"Host: evil.example.com", host, auth], [b"Host:", auth],
                    [f"Host: user@{target.host_header}".encode(), auth]]
        case.raw = _raw(line, [*rng.choice(variants), b"Connection: close"])
        case.expect_client_error = False
    return case


_ROUTES: list[tuple[str, tuple[str, ...]]] = []


def served_routes_cached() -> list[tuple[str, tuple[str, ...]]]:
    if not _ROUTES:
        _ROUTES.extend(served_routes())
    return _ROUTES


def fuzz_cases(rng: random.Random, target: Target, count: int) -> Iterator[Case]:
    """Every route with every standard method and one odd one, then random cases."""
    routes = served_routes_cached()
    sent = 0
    for template, methods in routes:
        for method in (*STANDARD_METHODS, rng.choice(ODD_METHODS)):
            yield route_case(rng, target, template, methods, method)
            sent += 1
    while sent < count:
        roll = rng.random()
        if roll < 0.25:
            yield framing_case(rng, target)
        elif roll < 0.33:
            yield range_case(rng, target)
        else:
            template, methods = rng.choice(routes)
            yield route_case(rng, target, template, methods)
        sent += 1


# --------------------------------------------------------------------------------- helpers


def snapshot(engine: EngineProcess) -> dict[str, Any]:
    """What the fuzz must leave unchanged."""
    def ids(path: str, key: str) -> list[str]:
        result = engine.get(path)
        assert result.status == 200, (path, result.status, result.body[:300])
        return sorted(str(item[key]) for item in result.json())

    config_file = engine.store / "config.json"
    return {
        "states": ids("/v1/states", "state_id"),
        "instances": ids("/v1/instances", "instance_id"),
        "prepare-jobs": ids("/v1/prepare-jobs", "job_id"),
        "names": ids("/v1/names", "name"),
        "config": engine.get("/v1/config").json(),
        "config.json": config_file.read_bytes() if config_file.exists() else None,
    }


def raw_exchange(engine: EngineProcess, data: bytes, *, method: str = "POST",
                 shut_write: bool = False, timeout: float = 5.0) -> Answer:
    case = Case("raw", method, "", raw=data, shut_write=shut_write)
    return send(case, engine.host, engine.port, timeout)


def raw_head(engine: EngineProcess, method: str, path: str, *extra: str,
             close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {engine.host}:{engine.port}",
             f"Authorization: Bearer {engine.token}", "Content-Type: application/json",
             *(["Connection: close"] if close else []), *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_json_error(answer: Answer, status: int | tuple[int, ...]) -> dict[str, Any]:
    assert answer.error is None, f"no complete answer: {answer.error}"
    wanted = (status,) if isinstance(status, int) else status
    assert answer.status in wanted, answer.preview()
    assert answer.content_type == "application/json", answer.preview()
    problems = error_body_problems("GET", answer)
    assert not problems, (problems, answer.preview())
    body: dict[str, Any] = json.loads(answer.body)
    return body


def explain_body() -> bytes:
    return json.dumps({"prepare_kind": "psql", "image_id": JOB_IMAGE,
                       "psql_args": JOB_ARGS}).encode()


# -------------------------------------------------------------------------------- fixtures


@dataclass
class Finished:
    engine: EngineProcess
    job: dict[str, Any]
    events: list[Any]

    @property
    def job_id(self) -> str:
        return str(self.job["job_id"])


def prepare_finished(engine: EngineProcess) -> Finished:
    job = engine.prepare(JOB_ARGS, JOB_IMAGE)
    assert job["status"] == "succeeded", job
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").ndjson()
    assert events, "a finished job has events"
    return Finished(engine, job, events)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A module-wide engine with one finished prepare job; tests only send it bad input."""
    proc = spawn_engine(tmp_path_factory.mktemp("fuzz-shared") / "state")
    try:
        yield prepare_finished(proc)
    finally:
        proc.stop()
        cleanup_store(proc.store)


# ==================================================================================== fuzz


def test_fuzz_every_route(engine: EngineProcess) -> None:
    ready = prepare_finished(engine)
    target = Target.of(engine, ready.job, len(ready.events))
    before = snapshot(engine)
    rng = random.Random(FUZZ_SEED)
    failures: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    sent = 0
    for case in fuzz_cases(rng, target, FUZZ_REQUESTS):
        answer = send(case, target.host, target.port)
        sent += 1
        problems = answer_problems(case, answer, target)
        if problems:
            kinds.update(re.sub(r"[\d.]+", "N", p.split(":")[0])[:60] for p in problems)
            failures.append(f"#{sent} {case.label}: {'; '.join(problems)}\n"
                            f"    request:  {case.preview()}\n    response: {answer.preview()}")
        if engine.proc.poll() is not None:
            failures.append(f"#{sent} the engine exited with {engine.proc.returncode} after "
                            f"{case.label}\n    request:  {case.preview()}")
            break
    duration = time.monotonic() - started
    print(f"\nfuzz: seed={FUZZ_SEED} requests={sent} in {duration:.1f}s "
          f"({sent / duration:.0f} req/s), failing={len(failures)}")
    assert sent >= min(FUZZ_REQUESTS, 1000) or engine.proc.poll() is not None
    if engine.proc.poll() is None:
        health = engine.get("/v1/health", auth=False, timeout=5)
        if health.status != 200:
            failures.append(f"/v1/health answers {health.status} after the fuzz")
        after = snapshot(engine)
        for key, value in before.items():
            if after[key] != value:
                failures.append(f"fuzzing changed {key}: {value!r:.300} -> {after[key]!r:.300}")
    assert not failures, (
        f"{len(failures)} of {sent} fuzz requests failed (seed {FUZZ_SEED}); by kind: "
        f"{dict(kinds.most_common(12))}\n" + "\n".join(failures[:MAX_REPORTED]))


# ========================================================================= JSON bodies


DEEP_ROUTES = [("POST", "/v1/prepare-jobs"), ("PATCH", "/v1/config"),
               ("POST", "/v1/cache/explain/prepare"), ("POST", "/v1/instances")]


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize(("method", "path"), DEEP_ROUTES)
def test_deeply_nested_json_is_400(finished: Finished, method: str, path: str, opener: str,
                                   depth: int) -> None:
    before = snapshot(finished.engine)
    data = nested(opener, depth).encode()
    answer = raw_exchange(finished.engine, raw_head(finished.engine, method, path,
                                                    f"Content-Length: {len(data)}") + data)
    assert_json_error(answer, 400)
    assert snapshot(finished.engine) == before


@pytest.mark.parametrize("opener", ["[", "{"])
def test_nesting_deeper_than_64_is_400_even_in_ignored_fields(finished: Finished,
                                                             opener: str) -> None:
    """An otherwise valid explain body with a 70-level value in a field nobody reads."""
    body = explain_body()[:-1] + b', "x": ' + nested(opener, 69).encode() + b"}"
    result = finished.engine.request("POST", "/v1/cache/explain/prepare", raw=body)
    answer = Answer(result.status, result.headers, result.body, 0.0)
    assert_json_error(answer, 400)


JSON_EDGE_BODIES: dict[str, bytes] = {
    "invalid-utf8": b'{"prepare_kind": "ps\xffql", "path": "lo\xc3\x28g"}',
    "overlong-utf8": b'{"prepare_kind": "\xc0\xafpsql"}',
    "utf16-surrogate-bytes": b'{"prepare_kind": "\xed\xa0\x80"}',
    "lone-surrogate-escape": b'{"prepare_kind": "\\ud800", "image_id": "\\ud800", '
                             b'"path": "\\ud800", "state_id": "\\ud800", '
                             b'"instance_id": "\\ud800", "instance_ref": "\\ud800"}',
    "huge-exponent": b'{"prepare_kind": 1e400, "path": 1e400, "state_id": 1e400, '
                     b'"instance_id": 1e400, "instance_ref": 1e400}',
    "huge-integer": b'{"psql_args": ' + huge_digits().encode() + b', "value": '
                    + huge_digits().encode() + b', "ttl_seconds": '
                    + huge_digits().encode() + b"}",
    "psql-args-number": b'{"prepare_kind": "psql", "image_id": "host:15", "psql_args": 5}',
    "image-id-array": b'{"prepare_kind": "psql", "image_id": [], "psql_args": ["-c", "x"]}',
    "null": b"null",
    "top-level-array": b'[{"prepare_kind": "psql"}]',
    "top-level-string": b'"psql"',
    "duplicate-keys": b'{"prepare_kind": 5, "prepare_kind": [], "path": 5, "path": [], '
                      b'"state_id": 5, "state_id": [], "instance_id": 5, "instance_id": [], '
                      b'"instance_ref": 5, "instance_ref": []}',
    "truncated": b'{"prepare_kind": "psql", "image_id": "ho',
    "nan": b'{"prepare_kind": NaN, "path": NaN, "state_id": NaN, "instance_id": NaN}',
}
EDGE_ROUTES = [("POST", "/v1/prepare-jobs"), ("POST", "/v1/cache/explain/prepare"),
               ("PATCH", "/v1/config"), ("POST", "/v1/instances"), ("PUT", "/v1/names/edge"),
               ("POST", "/v1/runs")]


@pytest.mark.parametrize("name", list(JSON_EDGE_BODIES))
@pytest.mark.parametrize(("method", "path"), EDGE_ROUTES)
def test_hostile_json_is_4xx(finished: Finished, method: str, path: str, name: str) -> None:
    engine = finished.engine
    before = snapshot(engine)
    result = engine.request(method, path, raw=JSON_EDGE_BODIES[name], timeout=10)
    answer = Answer(result.status, result.headers, result.body, 0.0)
    assert_json_error(answer, tuple(range(400, 500)))
    assert snapshot(engine) == before


# ===================================================================== framing


def test_negative_content_length_is_answered_at_once(finished: Finished) -> None:
    engine = finished.engine
    head = raw_head(engine, "POST", "/v1/prepare-jobs", "Content-Length: -1", close=False)
    answer = raw_exchange(engine, head + b"{}", timeout=5)  # the socket stays open for writing
    assert answer.error is None, f"no answer while the client keeps the connection: {answer}"
    assert answer.elapsed < ANSWER_DEADLINE, answer.elapsed
    assert_json_error(answer, 400)


BAD_CONTENT_LENGTHS: dict[str, Callable[[int], list[str]]] = {
    "abc": lambda n: ["abc"],
    "1e3": lambda n: ["1e3"],
    "plus-sign": lambda n: [f"+{n}"],
    "hex": lambda n: [f"0x{n:x}"],
    "underscore": lambda n: [f"{str(n)[0]}_{str(n)[1:]}"],
    "decimal-point": lambda n: [f"{n}.0"],
    "conflicting": lambda n: [str(n), str(n + 1)],
    "conflicting-zero": lambda n: [str(n), "0"],
}


@pytest.mark.parametrize("name", list(BAD_CONTENT_LENGTHS))
def test_malformed_content_length_is_400(finished: Finished, name: str) -> None:
    """The body would be a valid explain request: only the framing is wrong."""
    engine = finished.engine
    body = explain_body()
    headers = [f"Content-Length: {value}" for value in BAD_CONTENT_LENGTHS[name](len(body))]
    answer = raw_exchange(engine, raw_head(engine, "POST", "/v1/cache/explain/prepare",
                                           *headers) + body)
    assert_json_error(answer, 400)
    assert answer.elapsed < ANSWER_DEADLINE, answer.elapsed


def test_chunked_body_is_411(finished: Finished) -> None:
    engine = finished.engine
    body = explain_body()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = raw_exchange(engine, raw_head(engine, "POST", "/v1/cache/explain/prepare",
                                           "Transfer-Encoding: chunked") + chunked)
    assert_json_error(answer, 411)


@pytest.mark.parametrize(("length", "statuses"), [
    (str(BODY_LIMIT + 1), (413,)), (str(2**63 - 1), (413,)),
    # beyond int64 a length may also be refused as malformed (Go's net/http answers 400)
    (str(10**30), (400, 413)), (huge_digits(), (400, 413))],
    ids=["limit+1", "int64-max", "1e30", "5000-digits"])
def test_oversized_content_length_is_413_without_the_body(finished: Finished, length: str,
                                                          statuses: tuple[int, ...]) -> None:
    engine = finished.engine
    answer = raw_exchange(engine, raw_head(engine, "POST", "/v1/prepare-jobs",
                                           f"Content-Length: {length}", close=False))
    assert_json_error(answer, statuses)
    assert answer.elapsed < ANSWER_DEADLINE, answer.elapsed


# ============================================= errors http.server used to render as HTML


def _huge_url(engine: EngineProcess) -> bytes:
    return raw_head(engine, "GET", "/v1/health?q=" + "a" * 70_000)


SERVER_ERRORS: dict[str, tuple[Callable[[EngineProcess], bytes], tuple[int, ...]]] = {
    "414-uri-too-long": (_huge_url, (414,)),
    "400-bad-version": (lambda e: raw_head(e, "GET", "/v1/health").replace(
        b"HTTP/1.1", b"HTTP/1.x", 1), (400,)),
    "400-bad-request-line": (lambda e: raw_head(e, "GET", "/a /b"), (400,)),
    "400-two-word-post": (lambda e: raw_head(e, "POST", "/v1/prepare-jobs").replace(
        b" HTTP/1.1", b"", 1), (400,)),
    "431-too-many-headers": (lambda e: raw_head(e, "GET", "/v1/health",
                                                *(f"X-H{i}: v" for i in range(150))), (431,)),
    "431-header-too-long": (lambda e: raw_head(e, "GET", "/v1/health", "X-Big: " + "a" * 70_000),
                            (431,)),
    "501-unknown-method": (lambda e: raw_head(e, "BREW", "/v1/health"), (501,)),
}


@pytest.mark.parametrize("name", list(SERVER_ERRORS))
def test_server_rendered_errors_are_json(finished: Finished, name: str) -> None:
    build, statuses = SERVER_ERRORS[name]
    answer = raw_exchange(finished.engine, build(finished.engine), method="GET")
    if name.startswith("501") and answer.status == 405:
        assert answer.body == b"", answer.preview()  # the bare 405 of a known path is fine too
        return
    assert_json_error(answer, statuses)
    assert answer.elapsed < ANSWER_DEADLINE, answer.elapsed


# ================================================================== Range on events


@pytest.mark.parametrize("start", ["past-end", "end", "1e6", "2**64", "1844674407370955161500"])
def test_range_past_the_end_is_206_and_empty(finished: Finished, start: str) -> None:
    total = len(finished.events)
    value = {"past-end": total + 1, "end": total, "1e6": 10**6, "2**64": 2**64,
             "1844674407370955161500": 1844674407370955161500}[start]
    answer = send(Case("range", "GET", f"/v1/prepare-jobs/{finished.job_id}/events",
                       [("Host", f"{finished.engine.host}:{finished.engine.port}"),
                        ("Authorization", f"Bearer {finished.engine.token}"),
                        ("Range", f"events={value}-")]),
                  finished.engine.host, finished.engine.port, timeout=5)
    assert answer.error is None, answer.error
    assert answer.status == 206, answer.preview()
    assert answer.headers.get("content-range") == f"events {value}-", answer.headers
    assert answer.body == b"", answer.preview()


def test_range_from_the_middle_resumes(finished: Finished) -> None:
    result = finished.engine.get(f"/v1/prepare-jobs/{finished.job_id}/events",
                                 headers={"Range": "events=2-"})
    assert result.status == 206
    assert result.headers.get("content-range") == "events 2-"
    assert result.ndjson() == finished.events[2:]


@pytest.mark.parametrize("value", ["bytes=0-", "events=-5", "events=abc-", "events=1-2", "",
                                   "events=1844674407370955161500", "events=0-,5-",
                                   "events=+1-", "events=" + huge_digits() + "-"],
                         ids=lambda v: v[:32] or "empty")
def test_malformed_range_is_416_or_well_formed(finished: Finished, value: str) -> None:
    target = Target.of(finished.engine, finished.job, len(finished.events))
    case = Case("range", "GET", f"/v1/prepare-jobs/{finished.job_id}/events",
                [("Host", target.host_header), ("Authorization", f"Bearer {target.token}"),
                 ("Range", value)], check_events=True, range_header=value)
    answer = send(case, target.host, target.port, timeout=5)
    problems = answer_problems(case, answer, target)
    assert not problems, (problems, answer.preview())


# ====================================================================== Host and auth


@pytest.mark.parametrize("host", ["evil.example.com", "127.0.0.1:{other}",
                                  "localhost.attacker.com:{port}", "127.0.0.1.nip.io:{port}"])
def test_foreign_host_is_403_json(finished: Finished, host: str) -> None:
    engine = finished.engine
    value = host.format(port=engine.port, other=engine.port + 1)
    result = engine.get("/v1/states", headers={"Host": value})
    assert_json_error(Answer(result.status, result.headers, result.body, 0.0), 403)


@pytest.mark.parametrize("auth", ["", "Bearer", "bearer {token}", "Basic {token}", "{token}",
                                  "Bearer {token}x", "Bearer  {token}x", "Bearer " + "a" * 8000])
def test_bad_authorization_is_bare_401(finished: Finished, auth: str) -> None:
    engine = finished.engine
    result = engine.get("/v1/states", auth=False,
                        headers={"Authorization": auth.format(token=engine.token)})
    assert result.status == 401, (result.status, result.body[:200])
    assert result.body == b""


# ======================================================================= queries and config


@pytest.mark.parametrize("path", ["/v1/instances", "/v1/states"])
def test_empty_id_prefix_means_no_filter(finished: Finished, path: str) -> None:
    engine = finished.engine
    everything = engine.get(path)
    assert everything.status == 200
    filtered = engine.get(f"{path}?id_prefix=")
    assert filtered.status == 200, (filtered.status, filtered.body[:300])
    assert filtered.json() == everything.json()


def test_config_path_with_trailing_garbage_is_400(finished: Finished) -> None:
    result = finished.engine.get("/v1/config?path=%5B0%5Dx")
    body = assert_json_error(Answer(result.status, result.headers, result.body, 0.0), 400)
    assert body["code"] == "invalid_argument", body


BAD_PATCHES: dict[str, bytes] = {
    "unknown-key": b'{"path": "aaaa", "value": 1}',
    "proto-pollution": b'{"path": "__proto__.polluted", "value": true}',
    "constructor": b'{"path": "constructor.prototype.x", "value": 1}',
    "unknown-leaf": b'{"path": "cache.capacity.maxBytez", "value": 1}',
    "index-into-object": b'{"path": "log[0]", "value": "info"}',
    "negative-duration": b'{"path": "cache.capacity.minStateAge", "value": "-5m"}',
    "duration-number": b'{"path": "cache.capacity.minStateAge", "value": 600}',
    "level-number": b'{"path": "log.level", "value": 5}',
    "bytes-string": b'{"path": "cache.capacity.maxBytes", "value": "10"}',
    "bytes-huge": b'{"path": "cache.capacity.maxBytes", "value": ' + huge_digits().encode()
                  + b"}",
    "bytes-inf": b'{"path": "cache.capacity.maxBytes", "value": 1e400}',
    "object-replaced": b'{"path": "cache.capacity", "value": []}',
    "leaf-below-leaf": b'{"path": "log.level.deeper", "value": "info"}',
    "dup-value": b'{"path": "log.level", "value": "info", "value": "loud"}',
}


@pytest.mark.parametrize("existing", [False, True], ids=["no-config-json", "config-json"])
@pytest.mark.parametrize("name", list(BAD_PATCHES))
def test_rejected_config_patch_leaves_config_json_untouched(engine: EngineProcess, name: str,
                                                            existing: bool) -> None:
    config_file = engine.store / "config.json"
    if existing:
        ok = engine.request("PATCH", "/v1/config", {"path": "log.level", "value": "info"})
        assert ok.status == 200, ok.body
    before = config_file.read_bytes() if config_file.exists() else None
    assert (before is not None) == existing
    overrides = engine.get("/v1/config").json()
    result = engine.request("PATCH", "/v1/config", raw=BAD_PATCHES[name])
    assert_json_error(Answer(result.status, result.headers, result.body, 0.0), 400)
    after = config_file.read_bytes() if config_file.exists() else None
    assert after == before, f"config.json changed: {before!r} -> {after!r}"
    assert engine.get("/v1/config").json() == overrides


def test_config_schema_lists_what_patch_accepts(finished: Finished) -> None:
    """Sanity for the PATCH rejections above: the keys they use are not in the schema."""
    schema = finished.engine.get("/v1/config/schema").json()
    assert "aaaa" not in schema["properties"]
    assert "maxBytez" not in schema["properties"]["cache"]["properties"]["capacity"][
        "properties"]


# ========================================================================= slow clients


READ_TIMEOUT_ENV = {"SQLRS_ENGINE_READ_TIMEOUT": "1"}


def stall(engine: EngineProcess, kind: str) -> socket.socket:
    """Open a connection that sends part of a request and then nothing."""
    sock = socket.create_connection((engine.host, engine.port), timeout=30)
    if kind == "partial-body":
        sock.sendall(raw_head(engine, "POST", "/v1/prepare-jobs", "Content-Length: 100",
                              close=False) + b'{"prepare')
    else:
        sock.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {engine.host}:{engine.port}\r\nX-Ha"
                     .encode())
    return sock


def wait_closed(sock: socket.socket, deadline: float) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    started = time.monotonic()
    received = b""
    sock.settimeout(deadline)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept a stalled connection open for {deadline}s "
                             f"(received {received[:200]!r})") from None
    return time.monotonic() - started, received


@pytest.mark.parametrize("kind", ["partial-body", "partial-header"])
def test_stalled_client_is_cut_after_the_read_timeout(engine_factory: Any, kind: str) -> None:
    engine: EngineProcess = engine_factory(env=READ_TIMEOUT_ENV)
    started = time.monotonic()
    with stall(engine, kind) as sock:
        _, received = wait_closed(sock, 15)
    waited = time.monotonic() - started
    assert waited >= 0.5, f"cut after {waited:.2f}s: sooner than the 1s read timeout"
    if received:
        match = STATUS_LINE_RE.match(received)
        assert match and 400 <= int(match.group(1)) < 500, received[:300]
    assert engine.get("/v1/health", auth=False, timeout=5).status == 200


@pytest.mark.parametrize("kind", ["partial-body", "partial-header"])
def test_stalled_client_does_not_keep_the_engine_alive(tmp_path: Path, kind: str) -> None:
    engine = spawn_engine(tmp_path / "state", idle="2s", env=READ_TIMEOUT_ENV)
    try:
        with stall(engine, kind) as sock:
            poll(lambda: engine.proc.poll() is not None, 30, interval=0.1,
                 what="idle shutdown with a stalled client connected")
            assert engine.proc.returncode == 0
            wait_closed(sock, 5)
    finally:
        with contextlib.suppress(Exception):
            engine.stop(timeout=10)
        with contextlib.suppress(Exception):
            engine.proc.kill()
        cleanup_store(engine.store)
