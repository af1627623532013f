"""Fast in-process unit tests of the engine's pure logic: psql argument validation, content
hashing (golden vectors), Go durations and booleans, the auth guard, config validation,
deletion trees and request-level parsing. No engine process, Postgres, Docker or network."""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import http.client
import io
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import sqlrs_engine as se

pytestmark = pytest.mark.unit

ZERO_IMAGE = "postgres@sha256:" + "0" * 64
BOUNDARY_INPUT = b"\n-- sqlrs: input-boundary\n"
BOUNDARY_INCLUDE = b"\n-- sqlrs: include-boundary\n"
DEFAULT_SHARED = ["-X", "-v", "ON_ERROR_STOP=1"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@contextlib.contextmanager
def raises_api(status: int, code: str,
               message: str) -> Iterator[pytest.ExceptionInfo[se.ApiError]]:
    """Expect an ApiError with exactly this status, code and message."""
    with pytest.raises(se.ApiError) as info:
        yield info
    assert (int(info.value.status), info.value.code, info.value.message) == (
        status, code, message)


###############################################################################
# 1. psql argument validation and normalisation (§5.2)
###############################################################################


@pytest.fixture
def sql_file(tmp_path: Path) -> str:
    return write(tmp_path / "scripts" / "prepare.sql", b"select 1;\n")


def test_plan_psql_no_args_adds_defaults(tmp_path: Path) -> None:
    plan = se.plan_psql([], None, str(tmp_path))
    assert plan.normalized == DEFAULT_SHARED
    assert plan.shared == DEFAULT_SHARED
    assert plan.inputs == []
    assert plan.work_dir == str(tmp_path)
    assert plan.step_count == 1
    assert plan.step_args(0) == DEFAULT_SHARED


def test_plan_psql_single_file_matches_contract_example(sql_file: str) -> None:
    plan = se.plan_psql(["-f", sql_file], None, "/")
    assert plan.normalized == ["-f", sql_file, *DEFAULT_SHARED]
    assert " ".join(plan.normalized) == f"-f {sql_file} -X -v ON_ERROR_STOP=1"
    assert plan.inputs == [se.PsqlInput("file", sql_file)]
    assert plan.work_dir == os.path.dirname(sql_file)
    assert plan.step_args(0) == [*DEFAULT_SHARED, "-f", sql_file]
    assert plan.inputs[0].summary == f"-f {sql_file}"


@pytest.mark.parametrize("spelling", ["split", "long", "long_eq", "attached"])
def test_plan_psql_file_spellings(sql_file: str, spelling: str) -> None:
    args = {"split": ["-f", sql_file], "long": ["--file", sql_file],
            "long_eq": [f"--file={sql_file}"], "attached": [f"-f{sql_file}"]}[spelling]
    plan = se.plan_psql(args, None, "/")
    assert plan.inputs == [se.PsqlInput("file", sql_file)]
    assert plan.normalized == ["-f", sql_file, *DEFAULT_SHARED]


def test_plan_psql_file_path_is_normalised(tmp_path: Path, sql_file: str) -> None:
    messy = str(tmp_path / "scripts" / ".." / "scripts" / "." / "prepare.sql")
    plan = se.plan_psql(["-f", messy], None, "/")
    assert plan.inputs[0].value == sql_file


@pytest.mark.parametrize("args", [["-c", "select 1"], ["--command", "select 1"],
                                  ["--command=select 1"], ["-cselect 1"]])
def test_plan_psql_command_spellings(tmp_path: Path, args: list[str]) -> None:
    plan = se.plan_psql(args, None, str(tmp_path))
    assert plan.inputs == [se.PsqlInput("command", "select 1")]
    assert plan.normalized == ["-c", "select 1", *DEFAULT_SHARED]
    assert plan.work_dir == str(tmp_path)
    assert plan.step_args(0) == [*DEFAULT_SHARED, "-c", "select 1"]


def test_plan_psql_mixed_inputs_become_steps(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / "one.sql", b"select 1;")
    second = write(tmp_path / "b" / "two.sql", b"select 2;")
    args = ["--echo-all", "-f", first, "-c", "select 3", f"--file={second}",
            "-v", "X=1", "--set=Y=2", "-vZ=3", "-P", "pager=off", "--pset=format=csv",
            "-o/dev/null"]
    plan = se.plan_psql(args, None, "/")
    shared = ["--echo-all", "-v", "X=1", "-v", "Y=2", "-v", "Z=3", "-P", "pager=off",
              "--pset", "format=csv", "-o", "/dev/null", *DEFAULT_SHARED]
    assert plan.shared == shared
    assert [(i.kind, i.value) for i in plan.inputs] == [
        ("file", first), ("command", "select 3"), ("file", second)]
    assert plan.normalized == ["-f", first, "-c", "select 3", "-f", second, *shared]
    assert plan.step_count == 3
    assert plan.step_args(1) == [*shared, "-c", "select 3"]
    assert plan.step_args(2) == [*shared, "-f", second]
    assert plan.work_dir == os.path.dirname(first)  # the first file's directory


@pytest.mark.parametrize("args, expected_shared", [
    (["-X"], ["-X", "-v", "ON_ERROR_STOP=1"]),
    (["--no-psqlrc"], ["--no-psqlrc", "-v", "ON_ERROR_STOP=1"]),
    (["-v", "ON_ERROR_STOP=1"], ["-v", "ON_ERROR_STOP=1", "-X"]),
    (["--set=ON_ERROR_STOP=1"], ["-v", "ON_ERROR_STOP=1", "-X"]),
    (["--variable", "ON_ERROR_STOP=1", "-X"], ["-v", "ON_ERROR_STOP=1", "-X"]),
    (["-vON_ERROR_STOP=1"], ["-v", "ON_ERROR_STOP=1", "-X"]),
    (["-Pformat=unaligned"], ["-P", "format=unaligned", *DEFAULT_SHARED]),  # -P is no -p
    (["--"], DEFAULT_SHARED),  # a trailing -- alone is fine
    (["-c", "-h"], DEFAULT_SHARED),  # a flag value is not checked as a flag
])
def test_plan_psql_defaults_not_duplicated(args: list[str], expected_shared: list[str]) -> None:
    assert se.plan_psql(args, None, "/").shared == expected_shared


def test_plan_psql_stdin_input(tmp_path: Path) -> None:
    plan = se.plan_psql(["-f", "-"], "select 1;", str(tmp_path))
    assert plan.inputs == [se.PsqlInput("stdin", "-")]
    assert plan.normalized == ["-f", "-", *DEFAULT_SHARED]
    assert plan.stdin == "select 1;"
    assert plan.work_dir == str(tmp_path)
    assert se.plan_psql(["--file=-"], "", "/").inputs == [se.PsqlInput("stdin", "-")]


def _rejections(tmp: str) -> list[tuple[list[str], str | None, str, str | None]]:
    """(args, stdin, message, details) for every rule of §5.2 (details None: not checked)."""
    conn = "connection flags are not allowed"
    table: list[tuple[list[str], str | None, str, str | None]] = []
    for token in ["-h", "-p", "-U", "-d", "--host", "--port", "--username", "--dbname",
                  "--database"]:
        table.append(([token, "x"], None, conn, token))
    for token in ["-hlocalhost", "-p5432", "-Upostgres", "-dother", "--host=db",
                  "--port=5432", "--username=u", "--dbname=d", "--database=d", "--host="]:
        table.append(([token], None, conn, token))
    table += [
        (["-X", "-h"], None, conn, "-h"),
        (["--", "x"], None, "positional arguments are not allowed", None),
        (["--", "-c", "select 1"], None, "positional arguments are not allowed", None),
        (["mydb"], None, "positional database arguments are not allowed", "mydb"),
        (["-X", "mydb"], None, "positional database arguments are not allowed", "mydb"),
        (["-"], None, "positional database arguments are not allowed", "-"),
        (["-v", "ON_ERROR_STOP=0"], None, "ON_ERROR_STOP must be set to 1", "ON_ERROR_STOP=0"),
        (["--set=ON_ERROR_STOP=on"], None, "ON_ERROR_STOP must be set to 1",
         "ON_ERROR_STOP=on"),
        (["--variable", "ON_ERROR_STOP"], None, "ON_ERROR_STOP must be set to 1",
         "ON_ERROR_STOP"),
        (["-vON_ERROR_STOP=true"], None, "ON_ERROR_STOP must be set to 1",
         "ON_ERROR_STOP=true"),
        (["-v"], None, "missing value for variable flag", "-v"),
        (["--set"], None, "missing value for variable flag", "--set"),
        (["--variable"], None, "missing value for variable flag", "--variable"),
        (["-f"], None, "missing value for -f", "-f"),
        (["--file"], None, "missing value for --file", "--file"),
        (["-c"], None, "missing value for -c", "-c"),
        (["--command"], None, "missing value for --command", "--command"),
        (["-o"], None, "missing value for -o", "-o"),
        (["-f", "prepare.sql"], None, "file path must be absolute", "prepare.sql"),
        (["--file=./prepare.sql"], None, "file path must be absolute", "./prepare.sql"),
        (["--file="], None, "file path must be absolute", ""),
        (["-f", f"{tmp}/missing.sql"], None, "cannot read file", f"{tmp}/missing.sql"),
        (["-f", tmp], None, "cannot read file", tmp),  # a directory
        (["-f", "-"], None, "stdin is required when using -f -", None),
        ([], "select 1;", "stdin is only valid with -f -", None),
        (["-c", "select 1"], "", "stdin is only valid with -f -", None),
    ]
    return table


REJECTION_COUNT = len(_rejections("/t"))


@pytest.mark.parametrize("index", range(REJECTION_COUNT),
                         ids=[" ".join(r[0]) or f"stdin={r[1]!r}" for r in _rejections("<tmp>")])
def test_plan_psql_rejections(tmp_path: Path, index: int) -> None:
    args, stdin, message, details = _rejections(str(tmp_path))[index]
    with raises_api(400, "invalid_argument", message) as info:
        se.plan_psql(args, stdin, str(tmp_path))
    if details is not None:
        assert info.value.details == details
    assert info.value.body()["code"] == "invalid_argument"


# psql's getopt accepts unique prefixes of long options and bundled short options
# (`psql --hos=/x` and `psql -Xh/x` both connect to /x): the planner reads them the same way.
@pytest.mark.parametrize("args", [["--hos=/tmp"], ["--user=other"], ["--db=other"],
                                  ["-Xh/tmp"], ["-qdother"]])
def test_plan_psql_rejects_abbreviated_or_bundled_connection_flags(args: list[str]) -> None:
    with raises_api(400, "invalid_argument", "connection flags are not allowed"):
        se.plan_psql(args, None, "/")


@pytest.mark.parametrize(("args", "kind", "value"), [
    (["-Xf/etc/hostname"], "file", "/etc/hostname"), (["--comm=drop table t"], "command",
                                                      "drop table t"),
    (["-Xcselect 1"], "command", "select 1")])
def test_plan_psql_hashes_abbreviated_or_bundled_inputs(args: list[str], kind: str,
                                                        value: str) -> None:
    plan = se.plan_psql(args, None, "/")
    assert [(item.kind, item.value) for item in plan.inputs] == [(kind, value)]


###############################################################################
# 2. content hashing (§5.5) with golden vectors
###############################################################################

CONTRACT_CONTENT = "4a45092ccf992ea92250053a80b931b787924ba61648f420555511b84f10ab6c"
CONTRACT_TASK = "904f08c8d4c596305b5c9467fdacb842ed10536a80e8c541a3eae88749928cb1"
CONTRACT_STATE = "c8df7a5b0f5be1f4691b09597b6f3f42478594c1eaaf4591eb1e6107db37aabf"


def test_contract_test_vector(tmp_path: Path) -> None:
    path = write(tmp_path / "one.sql", b"select 1;")
    hasher = se.ContentHasher(str(tmp_path), None)
    content = hasher.content_hash([se.PsqlInput("file", path)])
    assert content == CONTRACT_CONTENT == sha256(b"select 1;\n")
    task = se.psql_task_hash(content, "dev")
    assert task == CONTRACT_TASK
    assert se.state_id_for("image", ZERO_IMAGE, task) == CONTRACT_STATE


def test_contract_vector_through_plan_steps(tmp_path: Path) -> None:
    path = write(tmp_path / "one.sql", b"select 1;")
    request = se.PrepareRequest.parse(
        {"prepare_kind": "psql", "image_id": ZERO_IMAGE, "psql_args": ["-f", path]}, "/")
    steps, signature = se.plan_steps(request, ZERO_IMAGE, "dev")
    assert [(s.input_kind, s.input_id, s.task_hash, s.state_id) for s in steps] == [
        ("image", ZERO_IMAGE, CONTRACT_TASK, CONTRACT_STATE)]
    assert steps[0].script == b"select 1;\n"
    assert steps[0].normalized == f"-f {path} -X -v ON_ERROR_STOP=1"
    assert signature == JOB_SIGNATURE_FALSE


def test_hash_records_format() -> None:
    expected = sha256(b"a=1:x\nkey=6:\xc3\xa9t\xc3\xa9s\n")
    assert se.hash_records(("a", "x"), ("key", "\u00e9t\u00e9s")) == expected  # byte length


TWO_INPUTS = "2d5ed8c271666dc983168cf33da7e5f77edf8452a39bef59f602596ae14fd600"


def test_two_inputs_have_an_input_boundary(tmp_path: Path) -> None:
    one = write(tmp_path / "a.sql", b"select 1;")
    two = write(tmp_path / "b.sql", b"select 2;\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    content = hasher.content_hash([se.PsqlInput("file", one), se.PsqlInput("file", two)])
    assert content == TWO_INPUTS == sha256(b"select 1;\n" + BOUNDARY_INPUT + b"select 2;\n")


INCLUDES = "12d12642e874a5b15551a1613eb860e886164f9362f44f3b1a8b504deeb77c07"


def test_includes_have_include_boundaries(tmp_path: Path) -> None:
    # \i is relative to the work dir (first file's dir), \ir to the including file.
    main = write(tmp_path / "main.sql",
                 b"begin;\n  \\ir 'sub/nested.sql'  \ncommit;\n")
    write(tmp_path / "sub" / "nested.sql",
          b"\\i other.sql\n\\include_relative \"leaf.sql\"\n\\include /ABS\nend nested\n"
          .replace(b"/ABS", str(tmp_path / "abs.sql").encode()))
    write(tmp_path / "other.sql", b"select 'work dir';\n")
    write(tmp_path / "sub" / "leaf.sql", b"select 'relative';")
    write(tmp_path / "abs.sql", b"select 'absolute';\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    item = se.PsqlInput("file", main)
    B = BOUNDARY_INCLUDE
    nested = (B + b"select 'work dir';\n" + B + B + b"select 'relative';\n" + B
              + B + b"select 'absolute';\n" + B + b"end nested\n")
    expected = b"begin;\n" + B + nested + B + b"commit;\n"
    assert hasher.input_text(item) == expected
    assert hasher.content_hash([item]) == INCLUDES == sha256(expected)


def test_if_meta_command_is_not_an_include(tmp_path: Path) -> None:
    path = write(tmp_path / "x.sql", b"\\if :flag\n\\iX y\n\\endif")
    hasher = se.ContentHasher(str(tmp_path), None)
    assert hasher.input_text(se.PsqlInput("file", path)) == b"\\if :flag\n\\iX y\n\\endif\n"


CRLF = "061e995aebcb765888ac7580f67ee3815a03b9b9c3fd5ff2dbb40db98b53a737"


@pytest.mark.parametrize("data", [b"select 1;\r\nselect 2;\r\n", b"select 1;\nselect 2;\n",
                                  b"select 1;\r\nselect 2;", b"select 1;\nselect 2;\r"])
def test_crlf_line_endings_are_normalised(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "x.sql", data)
    hasher = se.ContentHasher(str(tmp_path), None)
    assert hasher.content_hash([se.PsqlInput("file", path)]) == CRLF
    assert sha256(b"select 1;\nselect 2;\n") == CRLF


def test_crlf_in_include_line(tmp_path: Path) -> None:
    main = write(tmp_path / "m.sql", b"\\i inc.sql\r\nselect 2;\r\n")
    write(tmp_path / "inc.sql", b"select 1;\r\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    assert hasher.input_text(se.PsqlInput("file", main)) == (
        BOUNDARY_INCLUDE + b"select 1;\n" + BOUNDARY_INCLUDE + b"select 2;\n")


def test_command_input_hash(tmp_path: Path) -> None:
    hasher = se.ContentHasher(str(tmp_path), None)
    # a -c command hashes like a file with the same text
    assert hasher.content_hash([se.PsqlInput("command", "select 1;")]) == CONTRACT_CONTENT


STDIN = "8b8a0860d9b183efe119246b8d010f32b1030c93fa12275792b5847fd4fe929f"


def test_stdin_input_hash(tmp_path: Path) -> None:
    hasher = se.ContentHasher(str(tmp_path), "select 3;")
    assert hasher.content_hash([se.PsqlInput("stdin", "-")]) == STDIN == sha256(b"select 3;\n")


JOB_SIGNATURE_FALSE = "a552f7fc1a8f356b1a2944dabfbfefc053c96e59364e547edd9e6305f8730122"
JOB_SIGNATURE_TRUE = "0653aad8880b1e3f1f32973897e804d76e3d7a8773e9e57e7e32ae08d155e43e"


def test_job_signature_vectors() -> None:
    assert se.job_signature(CONTRACT_TASK, ZERO_IMAGE, False) == JOB_SIGNATURE_FALSE
    assert se.job_signature(CONTRACT_TASK, ZERO_IMAGE, True) == JOB_SIGNATURE_TRUE
    reference = se.hash_records(
        ("task_hash", CONTRACT_TASK), ("image_id", ZERO_IMAGE), ("plan_only", "false"))
    assert reference == JOB_SIGNATURE_FALSE


def test_task_hash_depends_on_engine_version() -> None:
    assert se.psql_task_hash(CONTRACT_CONTENT, "1.2.3") != CONTRACT_TASK
    assert se.psql_task_hash(CONTRACT_CONTENT, "1.2.3") == se.hash_records(
        ("prepare_kind", "psql"), ("content_hash", CONTRACT_CONTENT),
        ("engine_version", "1.2.3"), ("psql_task_hash_schema", "psql-task-hash-v2"))


def test_state_chain_of_two_steps(tmp_path: Path) -> None:
    one = write(tmp_path / "a.sql", b"select 1;")
    two = write(tmp_path / "b.sql", b"select 2;\n")
    request = se.PrepareRequest.parse(
        {"prepare_kind": "psql", "image_id": ZERO_IMAGE, "psql_args": ["-f", one, "-f", two]},
        "/")
    steps, signature = se.plan_steps(request, ZERO_IMAGE, "dev")
    assert steps[0].state_id == CONTRACT_STATE
    second_task = se.psql_task_hash(sha256(b"select 2;\n"), "dev")
    assert steps[1].input_kind == "state"
    assert steps[1].input_id == CONTRACT_STATE
    assert steps[1].state_id == se.state_id_for("state", CONTRACT_STATE, second_task)
    whole = se.psql_task_hash(TWO_INPUTS, "dev")
    assert signature == se.job_signature(whole, ZERO_IMAGE, False)


@pytest.mark.parametrize("layout", ["self", "mutual"])
def test_recursive_include_is_an_error(tmp_path: Path, layout: str) -> None:
    if layout == "self":
        start = write(tmp_path / "a.sql", b"select 1;\n\\i a.sql\n")
    else:
        start = write(tmp_path / "a.sql", b"\\ir sub/b.sql\n")
        write(tmp_path / "sub" / "b.sql", b"\\i a.sql\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    with raises_api(400, "invalid_argument", "recursive include") as info:
        hasher.content_hash([se.PsqlInput("file", start)])
    assert str(info.value.details).endswith(f"-> {start}")


def test_missing_include_is_an_error(tmp_path: Path) -> None:
    start = write(tmp_path / "a.sql", b"\\i nowhere.sql\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    with raises_api(400, "invalid_argument", "cannot read file") as info:
        hasher.content_hash([se.PsqlInput("file", start)])
    assert str(tmp_path / "nowhere.sql") in str(info.value.details)


def test_same_file_included_twice_is_not_recursion(tmp_path: Path) -> None:
    start = write(tmp_path / "a.sql", b"\\i b.sql\n\\i b.sql\n")
    write(tmp_path / "b.sql", b"x\n")
    hasher = se.ContentHasher(str(tmp_path), None)
    B = BOUNDARY_INCLUDE
    assert hasher.input_text(se.PsqlInput("file", start)) == B + b"x\n" + B + B + b"x\n" + B


###############################################################################
# 3. Go durations and booleans
###############################################################################

MICRO = "\u00b5"  # MICRO SIGN
GREEK_MU = "\u03bc"


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("-0", 0.0), ("+0", 0.0), ("30s", 30.0), ("2m0s", 120.0), ("1h30m", 5400.0),
    ("1.5s", 1.5), ("500ms", 0.5), (f"1{MICRO}s", 1e-6), (f"1{GREEK_MU}s", 1e-6),
    ("1us", 1e-6), ("1ns", 1e-9), ("-5m", -300.0), ("+5m", 300.0), (".5s", 0.5),
    ("5.s", 5.0), ("168h", 604800.0), ("1h1m1.001s", 3661.001),
])
def test_parse_go_duration_valid(text: str, seconds: float) -> None:
    assert se.parse_go_duration(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize("text", ["", " ", "5", "1x", "h", "1h 2m", "-", "+", ".s", "0.0",
                                  "00", "1e3s", "1.5.5s", "5 s", "s5", "1H", "ms"])
def test_parse_go_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        se.parse_go_duration(text)


# Go's time.ParseDuration takes one optional sign, no surrounding spaces, and fails on
# overflow (> ~2562047h); the engine accepts these.
@pytest.mark.parametrize("text", ["--5m", "+-5m", " 5m", "9999999999999h"])
def test_parse_go_duration_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        se.parse_go_duration(text)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (1, "1s"), (0.5, "500ms"), (1.5, "1.5s"), (120, "2m0s"), (600, "10m0s"),
    (3600, "1h0m0s"), (5400, "1h30m0s"), (-300, "-5m0s"), (1e-6, f"1{MICRO}s"),
    (1e-9, "1ns"), (0.0015, "1.5ms"), (90061.5, "25h1m1.5s"), (1.000000001, "1.000000001s"),
    (-0.25, "-250ms"), (604800, "168h0m0s"),
])
def test_format_go_duration(seconds: float, text: str) -> None:
    assert se.format_go_duration(seconds) == text


@pytest.mark.parametrize("text", ["0s", "30s", "2m0s", "1h30m0s", "1.5s", "500ms",
                                  f"1{MICRO}s", "-5m0s", "25h1m1.5s", "1ns", "168h0m0s"])
def test_duration_round_trip_text(text: str) -> None:
    assert se.format_go_duration(se.parse_go_duration(text)) == text


@pytest.mark.parametrize("text, canonical", [("0", "0s"), ("1h30m", "1h30m0s"),
                                             ("90m", "1h30m0s"), ("10m", "10m0s"),
                                             ("1500ms", "1.5s"), ("-0", "0s")])
def test_duration_canonical_form(text: str, canonical: str) -> None:
    assert se.format_go_duration(se.parse_go_duration(text)) == canonical


@pytest.mark.parametrize("seconds", [0.0, 1.0, 0.25, 59.999, 3600.5, -42.0, 1e-9, 86400.0])
def test_duration_round_trip_seconds(seconds: float) -> None:
    assert se.parse_go_duration(se.format_go_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("value, expected", [
    *((v, True) for v in ["1", "t", "T", "TRUE", "true", "True"]),
    *((v, False) for v in ["0", "f", "F", "FALSE", "false", "False"]),
])
def test_parse_go_bool_valid(value: str, expected: bool) -> None:
    assert se.parse_go_bool(value) is expected


@pytest.mark.parametrize("value", ["", "yes", "no", "TrUe", "on", " true", "true ", "2", "y"])
def test_parse_go_bool_invalid(value: str) -> None:
    with pytest.raises(ValueError) as info:
        se.parse_go_bool(value)
    assert str(info.value) == f'strconv.ParseBool: parsing "{value}": invalid syntax'


###############################################################################
# 4. the auth guard
###############################################################################

TOKEN = "ab" * 32


@pytest.mark.parametrize("header, allowed", [
    (f"Bearer {TOKEN}", True),
    (f"  Bearer {TOKEN}\t ", True),
    (f"bearer {TOKEN}", False),
    (f"BEARER {TOKEN}", False),
    (f"Bearer {TOKEN.upper()}", False),
    (f"Bearer  {TOKEN}", False),
    (f"Bearer {TOKEN}x", False),
    (f"Bearer {TOKEN[:-1]}", False),
    (f"Basic {TOKEN}", False),
    (TOKEN, False),
    ("Bearer", False),
    ("Bearer ", False),
    ("", False),
    (None, False),
    ("Bearer \u00e9", False),
])
def test_guard_authorized(header: str | None, allowed: bool) -> None:
    assert se.Guard(TOKEN, "127.0.0.1", 5555).authorized(header) is allowed


@pytest.mark.parametrize("header", [None, "", "Bearer x", "garbage"])
def test_guard_empty_token_allows_everything(header: str | None) -> None:
    assert se.Guard("", "127.0.0.1", 5555).authorized(header) is True


@pytest.mark.parametrize("header, allowed", [
    (None, True),  # HTTP/1.0 without Host
    ("localhost", True), ("localhost:5555", True), ("LOCALHOST:5555", True),
    ("127.0.0.1", True), ("127.0.0.1:5555", True), ("[::1]", True), ("[::1]:5555", True),
    ("localhost.", True), ("localhost.:5555", True), (" localhost:5555 ", True),
    ("localhost:1", False), ("127.0.0.1:80", False), ("[::1]:1", False),
    ("localhost:05555", False), ("localhost:5555:5555", False),
    ("evil.com", False), ("evil.com:5555", False), ("localhost.evil.com:5555", False),
    ("127.0.0.2:5555", False), ("0.0.0.0:5555", False), ("::1", False), ("[::1", False),
    ("[::1]evil", False), ("", False),
])
def test_guard_host_allowed(header: str | None, allowed: bool) -> None:
    assert se.Guard(TOKEN, "127.0.0.1", 5555).host_allowed(header) is allowed


def test_guard_allows_its_listen_host() -> None:
    guard = se.Guard(TOKEN, "My-Host.local", 8080)
    assert guard.host_allowed("my-host.local:8080")
    assert guard.host_allowed("localhost:8080")
    assert not guard.host_allowed("my-host.local:5555")
    assert not guard.host_allowed("other.local:8080")


###############################################################################
# 5. config validation
###############################################################################


def effective(overrides: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = se.deep_merge(se.CONFIG_DEFAULTS, overrides)
    return merged


def test_defaults_are_valid_and_deep_merge_copies() -> None:
    se.validate_config(effective({}))
    merged = effective({"cache": {"capacity": {"maxBytes": 5}}})
    assert merged["cache"]["capacity"] == {**se.CONFIG_DEFAULTS["cache"]["capacity"],
                                           "maxBytes": 5}
    merged["log"]["level"] = "error"
    assert se.CONFIG_DEFAULTS["log"]["level"] == "debug"


@pytest.mark.parametrize("overrides", [
    {"log": {"level": "warn"}},
    {"cache": {"capacity": {"maxBytes": 0, "reserveBytes": None}}},
    {"cache": {"capacity": {"maxBytes": se.MAX_CONFIG_INT, "reserveBytes": 1}}},
    {"cache": {"capacity": {"maxBytes": None}}},
    {"cache": {"capacity": {"highWatermark": 1, "lowWatermark": 0.99}}},
    {"cache": {"capacity": {"highWatermark": 0.5, "lowWatermark": 0.01}}},
    {"cache": {"capacity": {"minStateAge": "0"}}},
    {"cache": {"capacity": {"minStateAge": "1h30m"}}},
    {"container": {"runtime": "podman"}},
    {"snapshot": {"backend": "copy"}},
    {"orchestrator": {"jobs": {"maxIdentical": None, "maxHistory": None,
                               "maxHistoryAge": "0s"}}},
])
def test_validate_config_accepts(overrides: dict[str, Any]) -> None:
    se.validate_config(effective(overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"aaaa": 1}, "config.aaaa is not a setting"),
    ({"__proto__": {"polluted": True}}, "config.__proto__ is not a setting"),
    ({"cache": {"capacity": {"nope": 1}}}, "config.cache.capacity.nope is not a setting"),
    ({"log": {"level": "trace"}}, "config.log.level must be one of debug, info, warn, error"),
    ({"log": {"level": None}}, "config.log.level must be one of debug, info, warn, error"),
    ({"log": "debug"}, 'config.log must be object, not "debug"'),
    ({"cache": None}, "config.cache must be object, not null"),
    ({"container": {"runtime": "lxc"}}, "config.container.runtime must be one of"),
    ({"snapshot": {"backend": "zfs"}}, "config.snapshot.backend must be one of"),
    ({"cache": {"capacity": {"maxBytes": "5"}}},
     'config.cache.capacity.maxBytes must be integer or null, not "5"'),
    ({"cache": {"capacity": {"maxBytes": 1.0}}},
     "config.cache.capacity.maxBytes must be integer or null, not 1.0"),
    ({"cache": {"capacity": {"maxBytes": True}}},
     "config.cache.capacity.maxBytes must be integer or null, not true"),
    ({"cache": {"capacity": {"maxBytes": -1}}}, "config.cache.capacity.maxBytes is out of range"),
    ({"cache": {"capacity": {"reserveBytes": 1 << 63}}},
     "config.cache.capacity.reserveBytes is out of range"),
    ({"orchestrator": {"jobs": {"maxIdentical": -2}}},
     "config.orchestrator.jobs.maxIdentical is out of range"),
    ({"orchestrator": {"jobs": {"maxHistory": 10**30}}},
     "config.orchestrator.jobs.maxHistory is out of range"),
    ({"cache": {"capacity": {"highWatermark": None}}},
     "config.cache.capacity.highWatermark must be number, not null"),
    ({"cache": {"capacity": {"highWatermark": "0.9"}}},
     'config.cache.capacity.highWatermark must be number, not "0.9"'),
    ({"cache": {"capacity": {"highWatermark": True}}},
     "config.cache.capacity.highWatermark must be number, not true"),
    ({"cache": {"capacity": {"highWatermark": float("nan")}}},
     "config.cache.capacity.highWatermark must be number"),
    ({"cache": {"capacity": {"highWatermark": 1.5}}},
     "config.cache.capacity.highWatermark is out of range"),
    ({"cache": {"capacity": {"lowWatermark": 0}}},
     "config.cache.capacity.lowWatermark must be above 0"),
    ({"cache": {"capacity": {"lowWatermark": -0.1}}},
     "config.cache.capacity.lowWatermark must be above 0"),
    ({"cache": {"capacity": {"lowWatermark": 0.9}}}, "lowWatermark must be below highWatermark"),
    ({"cache": {"capacity": {"lowWatermark": 0.95}}},
     "lowWatermark must be below highWatermark"),
    ({"cache": {"capacity": {"highWatermark": 0.5}}},
     "lowWatermark must be below highWatermark"),
    ({"cache": {"capacity": {"minStateAge": "-5m"}}},
     "config.cache.capacity.minStateAge must not be negative"),
    ({"orchestrator": {"jobs": {"maxHistoryAge": "-1s"}}},
     "config.orchestrator.jobs.maxHistoryAge must not be negative"),
    ({"cache": {"capacity": {"minStateAge": "10 minutes"}}}, "invalid duration"),
    ({"cache": {"capacity": {"minStateAge": 600}}},
     "config.cache.capacity.minStateAge must be string, not 600"),
    ({"cache": {"capacity": {"minStateAge": None}}},
     "config.cache.capacity.minStateAge must be string, not null"),
])
def test_validate_config_rejects(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        se.validate_config(effective(overrides))
    assert str(info.value).startswith(message)


def test_check_schema_directly() -> None:
    se.check_schema(3, {"type": ["integer", "null"], "minimum": 0, "maximum": 3}, "x")
    with pytest.raises(ValueError, match=r"^x is out of range$"):
        se.check_schema(4, {"type": ["integer", "null"], "minimum": 0, "maximum": 3}, "x")
    with pytest.raises(ValueError, match=r"^x\.y is not a setting$"):
        se.check_schema({"y": 1}, {"type": "object", "properties": {}}, "x")


@pytest.mark.parametrize("path, parts", [
    ("a", ["a"]), ("a.b", ["a", "b"]), ("a[0]", ["a", 0]), ("a.b[12].c", ["a", "b", 12, "c"]),
    ("a[0][1]", ["a", 0, 1]), ("cache.capacity.maxBytes", ["cache", "capacity", "maxBytes"]),
    ("__proto__.polluted", ["__proto__", "polluted"]), ("a[01]", ["a", 1]),
])
def test_parse_config_path_good(path: str, parts: list[str | int]) -> None:
    assert se.parse_config_path(path) == parts


@pytest.mark.parametrize("path", ["", "[0]x", "[0]", "a..b", "a.", ".a", "a[x]", " a", "a ",
                                  "a[0]b", "a[-1]", "a[]", "a]", "a[0", ".", "a.[0]"])
def test_parse_config_path_malformed(path: str) -> None:
    with pytest.raises(ValueError, match="dot-separated keys"):
        se.parse_config_path(path)


@pytest.fixture
def config(tmp_path: Path) -> se.ConfigManager:
    manager = se.ConfigManager(str(tmp_path / "config.json"))
    manager.set("cache.capacity.maxBytes", 1000)
    return manager


def test_config_set_and_delete(config: se.ConfigManager) -> None:
    assert config.set("cache.capacity.reserveBytes", None) is None
    assert config.set("log.level", "info") == "info"
    assert config.set("orchestrator.jobs.maxHistory", None) is None
    on_disk = json.loads(Path(config.path).read_text())
    assert on_disk == {"cache": {"capacity": {"maxBytes": 1000, "reserveBytes": None}},
                       "log": {"level": "info"}, "orchestrator": {"jobs": {"maxHistory": None}}}
    assert config.value("cache.capacity.lowWatermark") == 0.8
    assert config.delete("log.level") == "debug"  # the effective value after removal
    assert config.delete("log") == {"level": "debug"}
    assert "log" not in json.loads(Path(config.path).read_text())
    assert se.ConfigManager(config.path).overrides() == config.overrides()
    with pytest.raises(KeyError):
        config.delete("log.level")  # not overridden any more


@pytest.mark.parametrize("path, value, message, details", [
    ("aaaa", 1, "invalid path", "aaaa is not a setting"),
    ("__proto__.polluted", True, "invalid path", "__proto__.polluted is not a setting"),
    ("cache.capacity.nope", 1, "invalid path", "cache.capacity.nope is not a setting"),
    ("cache.capacity.maxBytes.deeper", 1, "invalid path", None),
    ("cache.capacity[0]", 1, "invalid path", None),
    ("cache.capacity.maxBytes", "1", "invalid config value", None),
    ("cache.capacity.maxBytes", -1, "invalid config value", None),
    ("cache.capacity.maxBytes", 1 << 63, "invalid config value", None),
    ("cache.capacity.highWatermark", None, "invalid config value", None),
    ("cache.capacity.highWatermark", 0.8, "invalid config value",
     "lowWatermark must be below highWatermark"),
    ("cache.capacity.lowWatermark", 0.9, "invalid config value",
     "lowWatermark must be below highWatermark"),
    ("cache.capacity.lowWatermark", 0, "invalid config value", None),
    ("cache.capacity.highWatermark", 1.01, "invalid config value", None),
    ("cache.capacity.minStateAge", "-5m", "invalid config value", None),
    ("cache.capacity.minStateAge", "5", "invalid config value", None),
    ("cache.capacity", {"maxBytes": 1, "bogus": 2}, "invalid config value", None),
    ("cache", None, "invalid config value", None),
    ("log.level", "verbose", "invalid config value", None),
    ("snapshot.backend", None, "invalid config value", None),
])
def test_config_rejected_set_leaves_file_identical(
        config: se.ConfigManager, path: str, value: Any, message: str,
        details: str | None) -> None:
    before = Path(config.path).read_bytes()
    overrides = config.overrides()
    with raises_api(400, "invalid_argument", message) as info:
        config.set(path, value)
    if details is not None:
        assert info.value.details == details
    assert Path(config.path).read_bytes() == before
    assert config.overrides() == overrides


def test_config_rejected_delete_leaves_file_identical(tmp_path: Path) -> None:
    config = se.ConfigManager(str(tmp_path / "config.json"))
    config.set("cache.capacity.lowWatermark", 0.4)  # low first: the pair must stay ordered
    config.set("cache.capacity.highWatermark", 0.5)
    before = Path(config.path).read_bytes()
    with raises_api(400, "invalid_argument", "invalid config value"):
        config.delete("cache.capacity.lowWatermark")  # default 0.8 >= 0.5
    assert Path(config.path).read_bytes() == before


def test_config_rejected_set_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config = se.ConfigManager(str(path))
    with raises_api(400, "invalid_argument", "invalid path"):
        config.set("aaaa", 1)
    with raises_api(400, "invalid_argument", "invalid config value"):
        config.set("log.level", 1)
    assert not path.exists()


@pytest.mark.parametrize("path", ["a..b", "[0]x", " a"])
def test_config_malformed_path_is_value_error(config: se.ConfigManager, path: str) -> None:
    with pytest.raises(ValueError):
        config.set(path, 1)
    with pytest.raises(ValueError):
        config.delete(path)


@pytest.mark.parametrize("content", [b"[]", b'{"aaaa": 1}',
                                     b'{"cache": {"capacity": {"lowWatermark": 0.95}}}'])
def test_config_invalid_file_refused_at_load(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "config.json", content)
    with pytest.raises(ValueError):
        se.ConfigManager(path)


###############################################################################
# 6. deletion trees
###############################################################################

ROOT = "a" * 64
CHILD = "b" * 64
GRANDCHILD = "c" * 64
INST = "1" * 32
INST2 = "2" * 32


def state_row(state_id: str, parent: str | None, state_dir: str) -> se.StateRow:
    return se.StateRow(state_id=state_id, parent_state_id=parent, image_id=ZERO_IMAGE,
                       prepare_kind="psql", prepare_args_normalized="-c select",
                       created_at="2026-01-01T00:00:00.000000000Z", size_bytes=None,
                       last_used_at=None, use_count=0,
                       state_dir=state_dir)


def instance_row(instance_id: str, state_id: str, runtime_id: str | None) -> se.InstanceRow:
    return se.InstanceRow(instance_id=instance_id, state_id=state_id, image_id=ZERO_IMAGE,
                          created_at="2026-01-01T00:00:00.000000000Z", expires_at=None,
                          runtime_id=runtime_id, runtime_dir=None, status="active", port=None,
                          job_id=None)


class FakeStore:
    def __init__(self, states: list[se.StateRow], instances: list[se.InstanceRow]) -> None:
        self.states = {s.state_id: s for s in states}
        self.instances = {i.instance_id: i for i in instances}
        self.log: list[str] = []

    def list_instances(self, state: str | None = None) -> list[se.InstanceRow]:
        return [i for i in self.instances.values() if state is None or i.state_id == state]

    def list_states(self, parent: str | None = None) -> list[se.StateRow]:
        return [s for s in self.states.values() if s.parent_state_id == parent]

    def get_state(self, state_id: str) -> se.StateRow | None:
        return self.states.get(state_id)

    def get_instance(self, instance_id: str) -> se.InstanceRow | None:
        return self.instances.get(instance_id)

    def delete_state(self, state_id: str) -> None:
        self.log.append(f"delete state {state_id[:1]}")
        del self.states[state_id]


class FakeInstances:
    def __init__(self, store: FakeStore, connections: dict[str, int | None] | None = None,
                 pinned: set[str] | None = None, claimable: bool = True) -> None:
        self.store = store
        self.counts = connections or {}
        self.pins = pinned or set()
        self.claimable = claimable
        self.claimed: set[str] = set()
        self.locks: list[str] = []

    def connections(self, row: se.InstanceRow) -> int | None:
        return self.counts.get(row.instance_id, 0)

    def pinned(self, state_dir: str) -> bool:
        return state_dir in self.pins

    @contextlib.contextmanager
    def claiming(self, state_dirs: set[str]) -> Iterator[bool]:
        if not self.claimable:
            yield False
            return
        self.claimed |= state_dirs
        try:
            yield True
        finally:
            self.claimed -= state_dirs

    @contextlib.contextmanager
    def locked(self, instance_id: str) -> Iterator[None]:
        self.locks.append(instance_id)
        yield

    def destroy(self, row: se.InstanceRow) -> None:
        self.store.log.append(f"destroy {row.instance_id[:1]}")
        del self.store.instances[row.instance_id]


class FakePool:
    """The warm pool: deletions drain it first."""

    def __init__(self) -> None:
        self.drained: list[set[str]] = []

    def drain(self, state_ids: set[str]) -> None:
        self.drained.append(state_ids)


def manager(store: FakeStore, instances: FakeInstances) -> se.DeletionManager:
    return se.DeletionManager(cast(se.MetadataStore, store),
                              cast(se.InstanceManager, instances), cast(se.WarmPool, FakePool()))


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    out = {}
    for key in (ROOT, CHILD, GRANDCHILD):
        path = tmp_path / "states" / key[:1]
        (path / "data").mkdir(parents=True)
        (path / ".build.ok").write_text("")
        out[key] = str(path)
    return out


def tree(dirs: dict[str, str], conns: dict[str, int | None] | None = None,
         pinned: set[str] | None = None) -> tuple[FakeStore, FakeInstances]:
    """ROOT ← (INST on ROOT, CHILD ← (INST2 on CHILD, GRANDCHILD))."""
    store = FakeStore([state_row(ROOT, None, dirs[ROOT]), state_row(CHILD, ROOT, dirs[CHILD]),
                       state_row(GRANDCHILD, CHILD, dirs[GRANDCHILD])],
                      [instance_row(INST, ROOT, "rt-1"), instance_row(INST2, CHILD, None)])
    return store, FakeInstances(store, conns, pinned)


def test_leaf_state_would_delete(dirs: dict[str, str]) -> None:
    store = FakeStore([state_row(ROOT, None, dirs[ROOT])], [])
    instances = FakeInstances(store)
    status, result = manager(store, instances).delete_state(ROOT, False, False, True)
    assert (status, result) == (200, {"dry_run": True, "outcome": "would_delete",
                                      "root": {"kind": "state", "id": ROOT}})
    assert store.log == []
    assert os.path.isdir(dirs[ROOT])


def test_leaf_state_deleted(dirs: dict[str, str]) -> None:
    store = FakeStore([state_row(ROOT, None, dirs[ROOT])], [])
    instances = FakeInstances(store)
    status, result = manager(store, instances).delete_state(ROOT, False, False, False)
    assert (status, result["outcome"]) == (200, "deleted")
    assert store.log == ["delete state a"]
    assert not os.path.exists(dirs[ROOT])
    assert instances.claimed == set()  # unclaimed again


@pytest.mark.parametrize("dry_run, status", [(True, 200), (False, 409)])
def test_state_with_descendants_needs_recurse(dirs: dict[str, str], dry_run: bool,
                                              status: int) -> None:
    store, instances = tree(dirs)
    got = manager(store, instances).delete_state(ROOT, False, False, dry_run)
    assert got == (status, {"dry_run": dry_run, "outcome": "blocked",
                            "root": {"kind": "state", "id": ROOT,
                                     "blocked": "has_descendants"}})
    assert store.log == []


def test_state_with_only_an_instance_needs_recurse(dirs: dict[str, str]) -> None:
    store = FakeStore([state_row(ROOT, None, dirs[ROOT])], [instance_row(INST, ROOT, None)])
    node = manager(store, FakeInstances(store))._state_node(store.states[ROOT], False, False)
    assert node == {"kind": "state", "id": ROOT, "blocked": "has_descendants"}


def test_recurse_full_tree_would_delete(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs)
    status, result = manager(store, instances).delete_state(ROOT, True, False, True)
    assert status == 200
    assert result == {"dry_run": True, "outcome": "would_delete", "root": {
        "kind": "state", "id": ROOT, "children": [
            {"kind": "instance", "id": INST, "connections": 0, "runtime_id": "rt-1"},
            {"kind": "state", "id": CHILD, "children": [
                {"kind": "instance", "id": INST2, "connections": 0},
                {"kind": "state", "id": GRANDCHILD}]}]}}
    assert store.log == []


def test_recurse_deletes_post_order(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs)
    status, result = manager(store, instances).delete_state(ROOT, True, False, False)
    assert (status, result["outcome"]) == (200, "deleted")
    assert store.log == ["destroy 1", "destroy 2",
                         "delete state c", "delete state b", "delete state a"]
    assert not any(os.path.exists(path) for path in dirs.values())
    assert instances.claimed == set()


def test_recurse_blocked_by_active_connections(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, conns={INST2: 3})
    status, result = manager(store, instances).delete_state(ROOT, True, False, False)
    assert status == 409
    root = result["root"]
    assert result["outcome"] == "blocked"
    assert root["blocked"] == "blocked_by_descendant"
    assert root["children"][0] == {"kind": "instance", "id": INST, "connections": 0,
                                   "runtime_id": "rt-1"}
    child = root["children"][1]
    assert child["blocked"] == "blocked_by_descendant"
    assert child["children"][0] == {"kind": "instance", "id": INST2, "connections": 3,
                                    "blocked": "active_connections"}
    assert "blocked" not in child["children"][1]
    assert store.log == []  # nothing deleted: all or nothing


def test_force_overrides_connections(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, conns={INST: 2, INST2: None})
    status, result = manager(store, instances).delete_state(ROOT, True, True, True)
    assert (status, result["outcome"]) == (200, "would_delete")
    assert result["root"]["children"][0]["connections"] == 2
    assert result["root"]["children"][1]["children"][0]["connections"] == 0
    status, result = manager(store, instances).delete_state(ROOT, True, True, False)
    assert (status, result["outcome"]) == (200, "deleted")
    assert store.log[:2] == ["destroy 1", "destroy 2"]


def test_connections_unknown_blocks_unless_forced(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, conns={INST: None})
    deletion = manager(store, instances)
    status, result = deletion.delete_state(ROOT, True, False, True)
    assert (status, result["outcome"]) == (200, "blocked")
    assert result["root"]["blocked"] == "blocked_by_descendant"
    assert result["root"]["children"][0] == {"kind": "instance", "id": INST, "connections": 0,
                                             "runtime_id": "rt-1",
                                             "blocked": "connections_unknown"}
    node = deletion._instance_node(store.instances[INST], force=True)
    assert node == {"kind": "instance", "id": INST, "connections": 0, "runtime_id": "rt-1"}


def test_pinned_state_is_blocked_by_active_tasks(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, pinned={dirs[ROOT]})
    deletion = manager(store, instances)
    for recurse in (False, True):
        node = deletion._state_node(store.states[ROOT], recurse, False)
        assert node == {"kind": "state", "id": ROOT, "blocked": "active_tasks"}
    assert deletion.delete_state(ROOT, True, True, False)[0] == 409  # force does not help


def test_pinned_descendant_blocks_the_root(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, pinned={dirs[GRANDCHILD]})
    node = manager(store, instances)._state_node(store.states[ROOT], True, False)
    assert node["blocked"] == "blocked_by_descendant"
    assert node["children"][1]["blocked"] == "blocked_by_descendant"
    assert node["children"][1]["children"][1] == {"kind": "state", "id": GRANDCHILD,
                                                  "blocked": "active_tasks"}


def test_claim_refused_blocks_with_active_tasks(dirs: dict[str, str]) -> None:
    store = FakeStore([state_row(ROOT, None, dirs[ROOT])], [])
    instances = FakeInstances(store, claimable=False)
    status, result = manager(store, instances).delete_state(ROOT, False, False, False)
    assert (status, result["outcome"], result["root"]["blocked"]) == (409, "blocked",
                                                                      "active_tasks")
    assert store.log == []


@pytest.mark.parametrize("state_id", [ROOT.upper(), "a" * 63, "nope", "d" * 64])
def test_delete_unknown_state_is_404(dirs: dict[str, str], state_id: str) -> None:
    store = FakeStore([state_row(ROOT, None, dirs[ROOT])], [])
    with raises_api(404, "not_found", "state not found"):
        manager(store, FakeInstances(store)).delete_state(state_id, True, False, True)


def test_delete_instance(dirs: dict[str, str]) -> None:
    store, instances = tree(dirs, conns={INST: 1})
    deletion = manager(store, instances)
    assert deletion.delete_instance(INST, False, False)[0] == 409
    assert deletion.delete_instance(INST, False, True)[1]["outcome"] == "blocked"
    assert deletion.delete_instance(INST, True, False)[1]["outcome"] == "deleted"
    assert store.log == ["destroy 1"]
    with raises_api(404, "not_found", "instance not found"):
        deletion.delete_instance(INST, False, True)
    with raises_api(404, "not_found", "instance not found"):
        deletion.delete_instance("../etc", False, True)


@pytest.mark.parametrize("dry_run, blocked, status, outcome", [
    (True, False, 200, "would_delete"), (False, False, 200, "deleted"),
    (True, True, 200, "blocked"), (False, True, 409, "blocked"),
])
def test_delete_result(dry_run: bool, blocked: bool, status: int, outcome: str) -> None:
    root: Any = {"kind": "state", "id": ROOT}  # a DeleteNode
    if blocked:
        root["blocked"] = "has_descendants"
    assert se.delete_result(dry_run, root) == (
        status, {"dry_run": dry_run, "outcome": outcome, "root": root})


###############################################################################
# 7. request-level helpers
###############################################################################

INVALID_JSON = (400, "invalid_argument", "invalid json payload")


@pytest.mark.parametrize("raw, expected", [
    (b"{}", {}), (b"[]", []), (b'{"a": [1, 2.5, null, true, "x"]}',
                               {"a": [1, 2.5, None, True, "x"]}),
    (b'"\\ud83d\\ude00"', "\U0001f600"), (b'"\xc3\xa9"', "\u00e9"),
    (b"[" * 64 + b"]" * 64, None), (b'{"a":' * 64 + b"1" + b"}" * 64, None),
    (b"1" * 4300, int("1" * 4300)),
])
def test_parse_json_body_accepts(raw: bytes, expected: Any) -> None:
    value = se.parse_json_body(raw)
    if expected is not None:
        assert value == expected


@pytest.mark.parametrize("raw, details", [
    (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "nested deeper than 64 levels"),
    (b'[{"a":' * 40 + b"1" + b"}]" * 40, "nested deeper than 64 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    (b"NaN", "NaN is not a JSON number"),
    (b"[Infinity]", "Infinity is not a JSON number"),
    (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
    (b'"\\ud800"', "surrogates not allowed"),
    (b'{"k\\udfff": 1}', "surrogates not allowed"),
    (b"\xff", "can't decode byte 0xff"),
    (b'"\xc3\x28"', "invalid continuation byte"),
    (b'"\xed\xa0\x80"', "can't decode"),  # a surrogate encoded as UTF-8
    (b"1" * 4301, "Exceeds the limit (4300 digits)"),
    (b"", "Expecting value"),
    (b"{", "Expecting property name"),
    (b"\xef\xbb\xbf{}", "BOM"),
])
def test_parse_json_body_rejects(raw: bytes, details: str) -> None:
    with raises_api(*INVALID_JSON) as info:
        se.parse_json_body(raw)
    assert details in str(info.value.details)


@pytest.mark.parametrize("raw", [b"1e400", b"[-1e400]"])
def test_parse_json_body_rejects_overflowing_floats(raw: bytes) -> None:
    with pytest.raises(se.ApiError):
        se.parse_json_body(raw)


def parsed_headers(*lines: str) -> email.message.Message:
    data = "".join(f"{line}\r\n" for line in lines).encode("latin-1") + b"\r\n"
    return http.client.parse_headers(io.BytesIO(data))


@pytest.mark.parametrize("lines, length", [
    ((), 0), (("Content-Length: 0",), 0), (("Content-Length: 5",), 5),
    (("Content-Length:  7 ",), 7), (("Content-Length: 007",), 7),
    (("Content-Length: 5", "Content-Length: 5"), 5),  # identical repeats are one value
    ((f"Content-Length: {se.MAX_BODY_BYTES}",), se.MAX_BODY_BYTES),
])
def test_body_length_ok(lines: tuple[str, ...], length: int) -> None:
    assert se.body_length(parsed_headers(*lines)) == length


@pytest.mark.parametrize("lines, status, code, message", [
    (("Content-Length: -1",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: +5",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: abc",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: 1e3",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: 0x10",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: ",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: 5, 5",), 400, "invalid_argument", "invalid Content-Length"),
    (("Content-Length: 5", "Content-Length: 6"), 400, "invalid_argument",
     "invalid Content-Length"),
    (("Content-Length: 99999999999999999999",), 400, "invalid_argument",
     "invalid Content-Length"),
    (("Transfer-Encoding: chunked",), 411, "length_required",
     "a request body needs a Content-Length"),
    (("Transfer-Encoding: chunked", "Content-Length: 5"), 411, "length_required",
     "a request body needs a Content-Length"),
    ((f"Content-Length: {se.MAX_BODY_BYTES + 1}",), 413, "payload_too_large",
     "request body too large"),
    (("Content-Length: 9999999999999999999",), 413, "payload_too_large",
     "request body too large"),
])
def test_body_length_rejects(lines: tuple[str, ...], status: int, code: str,
                             message: str) -> None:
    with raises_api(status, code, message):
        se.body_length(parsed_headers(*lines))


def test_body_length_with_email_message() -> None:
    headers = email.message.Message()
    headers["Content-Length"] = "12"
    assert se.body_length(headers) == 12
    headers["Content-Length"] = "13"
    with raises_api(400, "invalid_argument", "invalid Content-Length"):
        se.body_length(headers)


@pytest.mark.parametrize("header, start", [
    (None, None), ("events=0-", "0"), ("events=5-", "5"), ("events=0005-", "5"),
    ("events=000-", "0"), (" events = 3 - ", "3"), ("events=123456789012345678901-",
                                                     "123456789012345678901"),
])
def test_parse_events_range_ok(header: str | None, start: str | None) -> None:
    assert se.parse_events_range(header) == start


@pytest.mark.parametrize("header", ["", "events=", "events=-", "events=-1", "events=1-2",
                                    "events=a-", "bytes=0-", "events 0-", "Events=0-",
                                    "events=0-,5-", "events=+1-"])
def test_parse_events_range_rejects(header: str) -> None:
    with raises_api(416, "invalid_range", "unsupported Range"):
        se.parse_events_range(header)


def test_event_index_caps_huge_starts() -> None:
    assert se.event_index("42") == 42
    assert se.event_index("9" * 30) == se.MAX_EVENT_INDEX


# --- Liquibase plan keys, background work, client kills -------------------------------------


def lb_plan(work_dir: Path, *args: str) -> se.LiquibasePlan:
    exe = work_dir / "liquibase"
    if not exe.exists():
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    body = {"liquibase_args": list(args) or ["update", "--changelog-file=cl.sql"],
            "liquibase_exec": str(exe), "work_dir": str(work_dir)}
    return se.plan_liquibase(body, str(work_dir))


def test_lb_plan_keys_tell_file_content_from_the_command(tmp_path: Path) -> None:
    changelog = tmp_path / "cl.sql"
    changelog.write_text("--liquibase formatted sql\n")
    strict, command = se.lb_plan_keys(lb_plan(tmp_path), ZERO_IMAGE)
    changelog.write_text("--liquibase formatted sql\n--changeset a:1\nselect 1;\n")
    strict_after, command_after = se.lb_plan_keys(lb_plan(tmp_path), ZERO_IMAGE)
    assert strict_after != strict and strict is not None
    assert command_after == command  # the same command, whatever its files hold
    other_strict, other_command = se.lb_plan_keys(
        lb_plan(tmp_path, "update", "--changelog-file=cl.sql", "--contexts=x"), ZERO_IMAGE)
    assert other_command != command and other_strict != strict_after
    assert se.lb_plan_keys(lb_plan(tmp_path), "other@sha256:" + "1" * 64)[1] != command


def test_in_background_hands_back_results_and_exceptions() -> None:
    assert se.in_background("t", lambda a, b: a + b, 2, b=3).result(timeout=10) == 5

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        se.in_background("t", fail).result(timeout=10)


def test_host_client_kill_reaches_what_the_client_started(tmp_path: Path) -> None:
    """A ``liquibase`` script runs its JVM as a child: killing only the script would leave the
    JVM holding the output pipe (the job would wait for it)."""

    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    client = se.HostClient(proc, None)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    child = int(pid_file.read_text())
    client.kill()
    assert list(client.lines()) == []  # the pipe closes: no process holds it any more
    assert client.wait() != 0
    assert not alive(child)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_lb_plan_files_hashed_fails_closed_on_files_outside(tmp_path: Path) -> None:
    work, shared = tmp_path / "work", tmp_path / "shared"
    work.mkdir()
    shared.mkdir()
    (shared / "body.sql").write_text("select 1;")
    (work / "in.sql").write_text("select 2;")
    changelog = work / "main.yaml"
    plan = lb_plan(work, "update", "--changelog-file=main.yaml")
    changeset = se.Changeset("1", "a", "main.yaml", "9:x")

    def hashed(text: str, *changesets: se.Changeset) -> bool:
        changelog.write_text(text)
        return se.lb_plan_files_hashed(plan, changesets or (changeset,))

    assert hashed("- sqlFile:\n    path: in.sql\n    relativeToChangelogFile: true\n")
    assert hashed('<sqlFile path="missing/../../nowhere.sql"/>')  # names nothing that exists
    assert not hashed("- sqlFile:\n    path: ../shared/body.sql\n")
    assert not hashed('<sqlFile path="../shared/body.sql" relativeToChangelogFile="true"/>')
    assert not hashed("", se.Changeset("1", "a", "../shared/body.sql", "9:x"))
    assert not hashed("", se.Changeset("1", "a", "gone.yaml", "9:x"))  # cannot be found


# ------------------------------------------------------------------ session counting


def test_sessions_are_counted_from_the_socket_tables(tmp_path: Path) -> None:
    """Accepted TCP connections on the port and accepted streams on the unix socket are
    sessions; the listeners, the client ends and a closed connection are not."""
    import socket

    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        port = listener.getsockname()[1]
        path = str(tmp_path / f".s.PGSQL.{port}")
        unix_listener = stack.enter_context(socket.socket(socket.AF_UNIX))
        unix_listener.bind(path)
        unix_listener.listen()
        assert (se.tcp_sessions(port), se.unix_sessions(path)) == (0, 0)
        clients = [stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                   for _ in range(2)]
        accepted = [stack.enter_context(listener.accept()[0]) for _ in clients]
        unix_client = stack.enter_context(socket.socket(socket.AF_UNIX))
        unix_client.connect(path)
        stack.enter_context(unix_listener.accept()[0])
        assert (se.tcp_sessions(port), se.unix_sessions(path)) == (2, 1)
        accepted[0].close()
        assert se.tcp_sessions(port) == 1


def test_job_and_task_updates_take_declared_columns_only() -> None:
    """Column names in an UPDATE come from the TypedDicts that declare them, never from a
    caller's keyword: an unknown one is refused before any SQL is built."""
    assert se._assignments({"status": "x", "attempts": 1}, se.JobColumns) == \
        "status = ?, attempts = ?"
    with pytest.raises(ValueError, match="not a column of TaskColumns"):
        se._assignments({"status": "x", "status = 'y' --": 1}, se.TaskColumns)


def test_a_store_that_kept_state_fingerprints_is_migrated(tmp_path: Path) -> None:
    """Stores of earlier engines copied the state id into ``state_fingerprint`` columns: the
    names table loses its copy (a NULL state id takes it first), the states table keeps its
    UNIQUE column, NULL from then on; the wire still says state_fingerprint = state_id."""
    path = str(tmp_path / "state.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            se.STORE_SCHEMA.replace("parent_state_id TEXT,",
                                    "parent_state_id TEXT, state_fingerprint TEXT UNIQUE,")
            .replace("state_id TEXT NOT NULL,\n    image_id",
                     "state_id TEXT,\n    state_fingerprint TEXT NOT NULL,\n    image_id"))
        conn.execute("INSERT INTO names (name, instance_id, state_id, state_fingerprint,"
                     " image_id) VALUES ('old', NULL, NULL, ?, 'host:15')", ("a" * 64,))
    conn.close()
    db = se.SqlitePool(path)
    store = se.MetadataStore(db)
    store.insert_state(state_row("b" * 64, None, str(tmp_path / "b")))
    store.insert_state(state_row("c" * 64, None, str(tmp_path / "c")))  # NULLs are not equal
    name = store.get_name("old")
    assert name is not None and name.to_json()["state_id"] == "a" * 64
    assert name.to_json()["state_fingerprint"] == "a" * 64
    assert [n.name for n in store.list_names(state="a" * 64)] == ["old"]
    with db.read() as conn:
        assert "state_fingerprint" not in {r["name"] for r in
                                           conn.execute("PRAGMA table_info(names)")}
    db.close()
