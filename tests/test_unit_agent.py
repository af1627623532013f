"""The command agent a Docker runtime keeps in each container (``AGENT_SCRIPT``), run here by
this machine's ``sh`` (the script is POSIX sh, as in the image), and the engine's side of its
protocol (``agent_word``, ``AgentOutput``): words arrive unchanged, output and marks are told
apart, SIGTERM ends the foreground command and the agent serves on."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import poll

import sqlrs_engine as se

pytestmark = pytest.mark.unit

NONCE = b"0123456789abcdef0123456789abcdef"
TRICKY = ["plain", "", " lead and trail ", "new\nline", "back\\slash\\", "quote'\"",
          "$HOME `id` $(id) * ?", "tab\tend\n", "ünïcødé ✓", "-n", "\\0101", "%b %s"]


class LocalAgent:
    """AGENT_SCRIPT run by ``sh`` here, fed through a pipe as the engine feeds a container's."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sh", "-c", se.AGENT_SCRIPT, "sqlrs-agent"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={"PATH": "/usr/bin:/bin"})
        assert self.proc.stdin and self.proc.stdout
        self.marks = se.AgentOutput(NONCE)
        self.send(NONCE + b"\n")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def submit(self, argv: Sequence[str], mode: str = "fg", path: str = "/dev/null") -> None:
        self.marks.expect()
        self.send(f"{len(argv)}\n{mode}\n{path}\n".encode()
                  + b"".join(se.agent_word(word) for word in argv))

    def output(self) -> Iterator[bytes]:
        assert self.proc.stdout
        while self.marks.exit_code is None:
            data = os.read(self.proc.stdout.fileno(), 4096)
            assert data, "the agent ended"
            yield from self.marks.feed(data)

    def run(self, argv: Sequence[str], path: str = "/dev/null") -> tuple[int, bytes]:
        self.submit(argv, "fg", path)
        output = b"".join(self.output())
        assert self.marks.exit_code is not None
        return self.marks.exit_code, output

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def agent() -> Iterator[LocalAgent]:
    local = LocalAgent()
    try:
        yield local
    finally:
        if local.proc.poll() is None:
            local.proc.kill()
            local.proc.wait()


def test_every_word_arrives_unchanged(agent: LocalAgent) -> None:
    code, output = agent.run(["printf", "%s\\0", *TRICKY])
    assert code == 0
    assert output.split(b"\0")[:-1] == [word.encode() for word in TRICKY]


def test_output_without_a_final_newline_and_exit_statuses(agent: LocalAgent) -> None:
    assert agent.run(["printf", "no newline"]) == (0, b"no newline")
    assert agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, b"out\nerr\n")
    code, output = agent.run(["/nonexistent/program"])
    assert code == 127 and b"nonexistent" in output
    assert agent.marks.ns_pid > 0
    agent.close()


def test_stdin_comes_from_the_path(agent: LocalAgent, tmp_path: os.PathLike[str]) -> None:
    script = os.path.join(tmp_path, "stdin")
    with open(script, "wb") as handle:
        handle.write(b"first\nsecond")
    assert agent.run(["cat"], script) == (0, b"first\nsecond")
    assert agent.run(["cat"]) == (0, b"")  # /dev/null


def test_background_commands_return_at_once_and_append_to_their_log(
        agent: LocalAgent, tmp_path: os.PathLike[str]) -> None:
    log = os.path.join(tmp_path, "log")
    agent.submit(["sh", "-c", "echo started; exec sleep 30"], "bg", log)
    assert list(agent.output()) == [] and agent.marks.exit_code == 0
    pid = agent.marks.ns_pid
    try:
        assert agent.run(["echo", "served on"]) == (0, b"served on\n")
        poll(lambda: Path(log).exists() and Path(log).read_bytes() == b"started\n", 30,
             what="its output in its log")
        os.kill(pid, 0)  # still running
    finally:
        os.kill(pid, signal.SIGKILL)


def test_sigterm_ends_the_foreground_command_and_the_agent_serves_on(agent: LocalAgent) -> None:
    agent.submit(["sleep", "300"])
    output = agent.output()
    assert agent.proc.stdout
    while not agent.marks.ns_pid:  # the pid mark comes once the command started
        agent.marks.feed(os.read(agent.proc.stdout.fileno(), 4096))
    os.kill(agent.proc.pid, signal.SIGTERM)
    assert list(output) == []
    assert agent.marks.exit_code == 128 + signal.SIGKILL
    assert agent.run(["echo", "still here"]) == (0, b"still here\n")


def test_marks_are_found_after_partial_output_and_long_lines_are_not_held() -> None:
    marks = se.AgentOutput(NONCE)
    marks.expect()
    assert marks.feed(b"a line\npartial") == [b"a line\n"]
    assert marks.feed(NONCE + b" pid 42\n") == [b"partial"]
    assert marks.ns_pid == 42 and marks.exit_code is None
    huge = b"x" * (se.AgentOutput.HOLD_BYTES + 100)
    held_back = marks.feed(huge)
    assert held_back and b"".join(held_back) == huge[:len(b"".join(held_back))]
    rest = marks.feed(NONCE + b" rc 0\n")
    assert b"".join(held_back + rest) == huge
    assert marks.exit_code == 0
    marks.expect()
    assert marks.exit_code is None and marks.ns_pid == 0


def test_a_forged_mark_needs_the_nonce() -> None:
    marks = se.AgentOutput(NONCE)
    assert marks.feed(b"ffffffffffffffffffffffffffffffff rc 0\n") == [
        b"ffffffffffffffffffffffffffffffff rc 0\n"]
    assert marks.exit_code is None


class FakeAgent:
    """An agent as the pool sees it: alive until closed or told otherwise."""

    def __init__(self, container_id: str, user: str) -> None:
        self.container_id, self.user = container_id, user
        self.broken = False
        self.closed = False
        self.alive = True

    def idle_and_alive(self) -> bool:
        return self.alive and not self.broken

    def close(self) -> None:
        self.closed = self.broken = True


class Injected(BaseException):
    """Raised inside a block: not an Exception, so no ``except Exception`` swallows it."""


def test_the_agent_pool_hands_out_live_agents_one_caller_at_a_time() -> None:
    made: list[FakeAgent] = []

    def new(container_id: str, user: str) -> FakeAgent:
        made.append(FakeAgent(container_id, user))
        return made[-1]

    pool = se.AgentPool(new)  # type: ignore[arg-type]
    with pool.use("c1", "999:999") as first, pool.use("c1", "999:999") as second:
        assert first is not second  # one caller at a time
    with pool.use("c1", "999:999") as again:
        assert again in (first, second)  # an idle one is used again
    with pool.use("c1", "root") as other_user:
        assert other_user not in (first, second)
    again.alive = False  # e.g. a DSN holder killed it while it was idle
    with pool.use("c1", "999:999") as replacement:
        assert replacement is not again and again.closed
    with pytest.raises(Injected), pool.use("c1", "999:999") as raised_through:
        raise Injected
    assert raised_through.closed  # not handed out again
    broken = pool.checkout("c2", "root")
    broken.broken = True
    pool.checkin(broken)
    assert broken.closed
    idle = [agent for agent in made if not agent.closed]
    pool.forget("c1")
    assert all(agent.closed for agent in idle if agent.container_id == "c1")
    assert pool.checkout("c1", "999:999") not in made[:-1]
