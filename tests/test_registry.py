"""Pulling an image that is not present locally from a real registry (issue: "a path that has
never run"). Needs the registry of scripts/setup-registry.sh on 127.0.0.1:5000, which holds a copy
of the test image as ``127.0.0.1:5000/sqlrs-test/postgres:15`` (a LABEL-only child of
``sqlrs-test/postgres:15``: same layers, its own image id, so removing it locally and pulling it
back only moves the config and manifest, and ``sqlrs-test/postgres:15`` itself never gets a
RepoDigest)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import (
    DOCKER_IMAGE,
    EngineProcess,
    containers_of,
    job_to_end,
    poll,
    psql,
    without_warm_pool,
)

pytestmark = pytest.mark.parametrize("runtime_image", ["docker"], indirect=True)

REGISTRY = "127.0.0.1:5000"
REPOSITORY, _, TAG = DOCKER_IMAGE.split("@", 1)[0].rpartition(":")
REGISTRY_REPOSITORY = f"{REGISTRY}/{REPOSITORY}"
REGISTRY_IMAGE = f"{REGISTRY_REPOSITORY}:{TAG}"
BASE_LABEL = "org.sqlrs.test.base-image"  # as scripts/setup-registry.sh labels its copy
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])
PULL_DEADLINE = 300.0
FAIL_DEADLINE = 120.0
SETUP_HINT = "run scripts/setup-registry.sh"


# ------------------------------------------------------------------------------------ helpers


def docker(*args: str, check: bool = True, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], input=stdin, capture_output=True, text=True,
                            timeout=300, check=False, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr.strip()}"
    return result


def image_present(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False).returncode == 0


def repo_digests(ref: str) -> list[str]:
    out = docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
    digests: list[str] = json.loads(out) or []
    return digests


def http_status(url: str, accept: str | None = None) -> int | None:
    """The HTTP status of a GET (``None`` when nothing answers)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def registry_has(repository: str, tag: str) -> bool:
    url = f"http://{REGISTRY}/v2/{repository}/manifests/{tag}"
    return http_status(url, MANIFEST_TYPES) == 200


def ensure_registry_copy() -> None:
    """Push the registry copy of the test image when the registry lacks it (e.g. after the
    registry's storage was wiped), building it the way scripts/setup-registry.sh does."""
    if registry_has(REPOSITORY, TAG):
        return
    if not image_present(REGISTRY_IMAGE):
        base_id = docker("image", "inspect", "--format", "{{.Id}}", DOCKER_IMAGE).stdout.strip()
        dockerfile = f"FROM {DOCKER_IMAGE}\nLABEL {BASE_LABEL}={base_id}\n"
        # The classic builder needs no registry for a local FROM image.
        docker("build", "-q", "-t", REGISTRY_IMAGE, "-", stdin=dockerfile,
               env={"DOCKER_BUILDKIT": "0"})
    docker("push", REGISTRY_IMAGE)
    assert registry_has(REPOSITORY, TAG), f"push of {REGISTRY_IMAGE} did not reach the registry"


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_messages(events: list[dict[str, Any]]) -> list[str]:
    return [str(e["message"]) for e in events if e["type"] == "log"]


def assert_clean_pull_failure(engine: EngineProcess, image: str, code: str, message: str,
                              *detail_words: str) -> None:
    job_id = engine.submit(["-c", "create table t(x int)"], image=image)
    job, events = job_to_end(engine, job_id, FAIL_DEADLINE)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == code, error
    assert error["message"] == message, error
    details = str(error.get("details", ""))
    for word in detail_words:
        assert word in details, error
    assert f"docker: pull {image}" in log_messages(events)
    assert events[-1]["type"] == "error" and events[-1]["error"] == error, events[-3:]
    assert "result" not in job or not job["result"], job
    assert engine.get("/v1/health", auth=False).status == 200
    assert engine.get("/v1/states").json() == []
    assert containers_of(engine.store) == []
    assert not image_present(image)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def registry(runtime_image: str) -> str:
    """The local registry's address; a missing registry fails (Docker tests are skipped only
    with SQLRS_SKIP_DOCKER_TESTS=1, which the runtime_image fixture handles)."""
    status = poll(lambda: http_status(f"http://{REGISTRY}/v2/"), 10.0, interval=0.5,
                  what=f"a registry on {REGISTRY} ({SETUP_HINT})")
    assert status == 200, f"{REGISTRY}/v2/ answered {status}, not as an anonymous registry: " \
                          f"{SETUP_HINT}"
    return REGISTRY


# ------------------------------------------------------------------------------------ tests


def test_absent_image_is_pulled_and_pinned_to_its_repo_digest(engine_factory: Any,
                                                               registry: str) -> None:
    ensure_registry_copy()
    if image_present(REGISTRY_IMAGE):
        docker("rmi", REGISTRY_IMAGE)
    assert not image_present(REGISTRY_IMAGE)
    assert image_present(DOCKER_IMAGE), f"docker rmi {REGISTRY_IMAGE} removed {DOCKER_IMAGE}"

    engine: EngineProcess = without_warm_pool(engine_factory())
    job_id = engine.submit(["-c", "create table t(x int)"], image=REGISTRY_IMAGE)
    job, events = job_to_end(engine, job_id, PULL_DEADLINE)
    logs = log_messages(events)
    assert f"docker: pull {REGISTRY_IMAGE}" in logs, logs
    # The image is back, whatever happened after the pull.
    assert image_present(REGISTRY_IMAGE)
    digests = [d for d in repo_digests(REGISTRY_IMAGE) if d.startswith(f"{REGISTRY_REPOSITORY}@")]
    assert len(digests) == 1, repo_digests(REGISTRY_IMAGE)
    pinned = digests[0]
    resolved = [t for t in job.get("tasks", []) if t["type"] == "resolve_image"]
    assert [t["resolved_image_id"] for t in resolved] == [pinned], job.get("tasks")
    assert job["status"] == "succeeded", job.get("error")

    result = job["result"]
    assert result["image_id"] == pinned
    state = engine.get(f"/v1/states/{result['state_id']}")
    assert state.status == 200, state.body
    assert state.json()["image_id"] == pinned
    assert psql(result["dsn"], "select count(*) from t") == "0"

    created = engine.post("/v1/instances", {"state_id": result["state_id"]})
    assert created.status == 201, created.body
    instance = created.json()
    assert instance["image_id"] == pinned
    psql(instance["dsn"], "insert into t values (42)")
    assert psql(instance["dsn"], "select x from t") == "42"
    assert psql(result["dsn"], "select count(*) from t") == "0"
    for instance_id in (instance["instance_id"], result["instance_id"]):
        assert engine.delete(f"/v1/instances/{instance_id}").status == 200
    poll(lambda: containers_of(engine.store) == [], 60.0, interval=0.2,
         what="the instances' containers to be removed")

    # Present now: a second prepare resolves the same digest without pulling again.
    again, events = job_to_end(engine, engine.submit(["-c", "select 1"], image=REGISTRY_IMAGE),
                               PULL_DEADLINE)
    assert again["status"] == "succeeded", again.get("error")
    assert again["result"]["image_id"] == pinned
    assert not any(m.startswith("docker: pull") for m in log_messages(events))


def test_unreachable_registry_fails_the_job_cleanly(engine_factory: Any, registry: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    engine: EngineProcess = engine_factory()
    image = f"{address}/sqlrs-test/nothing:1"
    assert_clean_pull_failure(engine, image, "registry_unavailable",
                              f"cannot reach the registry of image {image}", address,
                              "connection refused")


def test_image_missing_from_the_registry_fails_the_job_cleanly(engine_factory: Any,
                                                                registry: str) -> None:
    assert not registry_has("sqlrs-test/nothing", "1")
    engine: EngineProcess = engine_factory()
    image = f"{registry}/sqlrs-test/nothing:1"
    assert_clean_pull_failure(engine, image, "image_not_found", f"cannot pull image {image}",
                              "manifest unknown")
