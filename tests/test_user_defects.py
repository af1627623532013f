"""What users hit (issue 19), driven over HTTP against real Postgres: a step's last output
lines arrive after a burst, a request path can not forge log lines, and an instance whose
image is gone is a clear error, not a 500."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    RUNTIMES,
    EngineProcess,
    assert_error,
    without_warm_pool,
)


@RUNTIMES
def test_the_end_of_a_steps_output_always_arrives(engine: EngineProcess, tmp_path: Path) -> None:
    """A burst of 1,000 lines, then a last one: the events carry the last line, and every
    line is forwarded or counted by a forwarded line (issue 19, defect 3)."""
    script = tmp_path / "burst.sql"
    script.write_text("\\pset tuples_only on\n"
                      "select 'line ' || g from generate_series(1, 1000) g;\n"
                      "\\echo the very last line\n")
    job = engine.prepare(["-f", str(script)])
    assert job["status"] == "succeeded", job
    events = engine.get(f"/v1/prepare-jobs/{job['job_id']}/events").ndjson()
    psql_lines = [e["message"] for e in events if e["type"] == "log"
                  and str(e.get("message", "")).startswith("psql: ")]
    assert any("the very last line" in line for line in psql_lines), psql_lines[-5:]
    assert any("(+" in line for line in psql_lines), "the burst was not rate limited"


def test_a_request_path_can_not_forge_log_lines(engine: EngineProcess) -> None:
    """Control characters of a request path are escaped in the log (issue 19, defect 9)."""
    forged = f"FORGED-{secrets.token_hex(4)}"
    result = engine.get(f"/v1/names/x%0a{forged}%1b[31m", timeout=10)
    assert result.status in (400, 404)
    engine.get("/v1/health")  # the request log line is written before this answer
    log_text = (engine.state_dir / "logs" / "engine.log").read_text()
    assert forged in log_text
    assert not any(line.startswith(forged) for line in log_text.splitlines())
    assert "\x1b" not in log_text


def test_an_instance_of_a_vanished_image_is_a_clear_error(engine_factory: Any,
                                                           tmp_path: Path) -> None:
    """POST /v1/instances for a state whose Docker image is gone (and can not be pulled)
    answers with the failure's own status and code, never 500 (issue 19, defect 6)."""
    if not Path("/var/run/docker.sock").exists():
        pytest.fail("Docker is not running: run scripts/setup-docker.sh")
    tag = f"sqlrs-test/vanishing:{secrets.token_hex(4)}"
    subprocess.run(["docker", "build", "-q", "-t", tag, "-"], check=True, capture_output=True,
                   input=f"FROM {DOCKER_IMAGE}\nLABEL sqlrs.test.vanishing={tag}\n".encode())
    try:
        engine: EngineProcess = engine_factory()
        without_warm_pool(engine)
        job = engine.prepare(["-c", "create table t(x int)"], image=tag)
        assert job["status"] == "succeeded", job
        state_id = job["result"]["state_id"]
        gone = engine.delete(f"/v1/instances/{job['result']['instance_id']}?force=true")
        assert gone.status == 200, gone.body
        subprocess.run(["docker", "rmi", "-f", tag], check=True, capture_output=True)
        result = engine.post("/v1/instances", {"state_id": state_id}, timeout=120)
        assert result.status != 500, result.body
        body = assert_error(result, result.status)
        assert 400 <= result.status < 600 and body["code"] in (
            "image_not_found", "registry_unavailable", "docker_unavailable"), body
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], check=False, capture_output=True)
